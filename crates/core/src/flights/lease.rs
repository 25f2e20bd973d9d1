//! The node-wide lease of a flight: one callout per key (or task) for the whole node.
//!
//! Each worker thread runs its own VM, so without coordination every worker that sees a
//! cold key asks the key service about it. The worker that takes a flight's lease (a slot
//! of `Table::leases`, compare-and-swap) sends the callout; the others add their
//! wake-up queue to the lease and wait. When the answer lands, the owner stores it,
//! releases the lease with the outcome, and wakes the waiters through their queues. A
//! lease carries a deadline, so an owner that vanished (a crashed VM) stalls nobody:
//! after it, the next worker takes over.
//!
//! A lease released with a verdict says so for a moment, so that a worker whose request
//! missed the cache just before the verdict landed reads the cache again instead of
//! asking a second time, without every worker re-reading the cache before each lookup.
use crate::storage::shared_store::{SetError, SharedStore};
use crate::storage::slots::Table;
use crate::vocabulary::key_hash::slot_of;

/// What a lease is for, as 32 bytes (a key's hash, for its lookup).
pub type LeaseId = [u8; 32];

/// First byte of a held lock (the version of its format).
const FORMAT_VERSION: u8 = 1;
/// First byte of a lock released with a verdict: the key hash and when.
const ANSWERED_TAG: u8 = 2;
/// How long a released lock says "answered": far longer than a request waits between
/// missing the cache and asking, far shorter than any cache TTL worth having.
const ANSWERED_FOR_MS: u64 = 1_000;
/// Compare-and-swap attempts before asking without the lock.
const MAX_ATTEMPTS: u32 = 16;
/// More waiting workers than this ask on their own (Envoy seldom runs more threads).
pub const MAX_WAITERS: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Acquired {
    /// This worker asks the key service; it must `release` afterwards.
    Owner,
    /// Another worker is asking; this one is woken through its queue.
    Waiting { deadline_ms: u64 },
    /// The slot is busy with another key, or contended: ask without the lock.
    Bypass,
    /// A lookup of this key ended with a verdict moments ago: the cache has it (unless
    /// something evicted it since).
    Answered,
}

/// How a released lookup ended, for the workers woken by it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlightEnd {
    /// The verdict is in the cache.
    Answered,
    /// The key service failed: nothing was cached.
    Failed,
    /// The lookup was not sent because the key service cluster, or the filter's own
    /// lookups in flight, are over their limit: nothing was cached, and the requests that
    /// waited are refused whatever `failure_mode` says.
    Overloaded,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Lock {
    id: LeaseId,
    owner: u32,
    deadline_ms: u64,
    waiters: Vec<u32>,
}

/// Takes the lease of `id` for worker `me` (its queue id) until `now_ms + hold_ms`,
/// or joins the worker that holds it. With `trust_recent_answer`, a lookup of the key
/// that ended with a verdict moments ago is `Answered` instead.
pub fn acquire(
    store: &impl SharedStore,
    id: &LeaseId,
    me: u32,
    now_ms: u64,
    hold_ms: u64,
    trust_recent_answer: bool,
) -> Acquired {
    let key = slot_key(id);
    let recent = |at: u64| now_ms.saturating_sub(at) < ANSWERED_FOR_MS;
    for _ in 0..MAX_ATTEMPTS {
        let Some((value, cas)) = store.get(&key) else {
            return Acquired::Bypass; // slots not created yet: see `slots`
        };
        if trust_recent_answer && answered_at(&value, id).is_some_and(recent) {
            return Acquired::Answered;
        }
        let (lock, outcome) = match decode(&value) {
            Some(held) if held.deadline_ms > now_ms && held.owner != me => {
                if &held.id != id || held.waiters.len() >= MAX_WAITERS {
                    return Acquired::Bypass;
                }
                let deadline_ms = held.deadline_ms;
                let mut joined = held;
                if !joined.waiters.contains(&me) {
                    joined.waiters.push(me);
                }
                (joined, Acquired::Waiting { deadline_ms })
            }
            // Free, released, expired, or (after a restart of this worker) its own.
            _ => (
                Lock {
                    id: *id,
                    owner: me,
                    deadline_ms: now_ms.saturating_add(hold_ms),
                    waiters: Vec::new(),
                },
                Acquired::Owner,
            ),
        };
        match store.set(&key, &encode(&lock), Some(cas)) {
            Ok(()) => return outcome,
            Err(SetError::CasMismatch) => continue,
            Err(SetError::Failed) => return Acquired::Bypass,
        }
    }
    Acquired::Bypass
}

/// Releases `me`'s lease of `id` at `now_ms`, saying how the lookup `ended`, and
/// returns the queues of the workers to wake. Nothing to wake if the lock expired and
/// another worker took it over meanwhile.
pub fn release(
    store: &impl SharedStore,
    id: &LeaseId,
    me: u32,
    ended: FlightEnd,
    now_ms: u64,
) -> Vec<u32> {
    let released = match ended {
        FlightEnd::Answered => encode_answered(id, now_ms),
        // Nothing was cached: the next request asks again.
        FlightEnd::Failed | FlightEnd::Overloaded => Vec::new(),
    };
    let key = slot_key(id);
    for _ in 0..MAX_ATTEMPTS {
        let Some((value, cas)) = store.get(&key) else {
            return Vec::new();
        };
        let Some(lock) = decode(&value).filter(|l| &l.id == id && l.owner == me) else {
            return Vec::new();
        };
        match store.set(&key, &released, Some(cas)) {
            Ok(()) => return lock.waiters,
            Err(SetError::CasMismatch) => continue, // a waiter joined meanwhile
            Err(SetError::Failed) => return lock.waiters,
        }
    }
    Vec::new()
}

fn slot_key(id: &LeaseId) -> String {
    let table = Table::leases();
    table.slot_key(slot_of(id, table.slots))
}

fn encode(lock: &Lock) -> Vec<u8> {
    let mut out = Vec::with_capacity(45 + 4 * lock.waiters.len());
    out.push(FORMAT_VERSION);
    out.extend_from_slice(&lock.id);
    out.extend_from_slice(&lock.owner.to_le_bytes());
    out.extend_from_slice(&lock.deadline_ms.to_le_bytes());
    for waiter in &lock.waiters {
        out.extend_from_slice(&waiter.to_le_bytes());
    }
    out
}

fn encode_answered(id: &LeaseId, at_ms: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(41);
    out.push(ANSWERED_TAG);
    out.extend_from_slice(id);
    out.extend_from_slice(&at_ms.to_le_bytes());
    out
}

/// When a lookup of `id` ended with a verdict, if the slot says so.
fn answered_at(bytes: &[u8], id: &LeaseId) -> Option<u64> {
    let (&version, rest) = bytes.split_first()?;
    if version != ANSWERED_TAG || rest.len() != 40 || rest.get(..32)? != id {
        return None;
    }
    Some(u64::from_le_bytes(rest.get(32..)?.try_into().ok()?))
}

fn decode(bytes: &[u8]) -> Option<Lock> {
    let (&version, rest) = bytes.split_first()?;
    if version != FORMAT_VERSION || rest.len() < 44 || (rest.len() - 44) % 4 != 0 {
        return None;
    }
    let (head, waiters) = rest.split_at(44);
    Some(Lock {
        id: head.get(..32)?.try_into().ok()?,
        owner: u32::from_le_bytes(head.get(32..36)?.try_into().ok()?),
        deadline_ms: u64::from_le_bytes(head.get(36..44)?.try_into().ok()?),
        waiters: waiters
            .chunks_exact(4)
            .filter_map(|c| c.try_into().ok().map(u32::from_le_bytes))
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::shared_store::fake::FakeStore;
    use crate::storage::slots::create_slots;

    fn store() -> FakeStore {
        let s = FakeStore::default();
        create_slots(&s, Table::leases());
        s
    }

    const KEY: LeaseId = [5; 32];

    #[test]
    fn one_owner_and_the_others_wait_then_are_woken() {
        let s = store();
        assert_eq!(acquire(&s, &KEY, 1, 1000, 500, true), Acquired::Owner);
        assert_eq!(
            acquire(&s, &KEY, 2, 1001, 500, true),
            Acquired::Waiting { deadline_ms: 1500 }
        );
        assert_eq!(
            acquire(&s, &KEY, 3, 1002, 500, true),
            Acquired::Waiting { deadline_ms: 1500 }
        );
        assert_eq!(
            acquire(&s, &KEY, 3, 1003, 500, true),
            Acquired::Waiting { deadline_ms: 1500 }
        );
        assert_eq!(release(&s, &KEY, 1, FlightEnd::Failed, 1004), vec![2, 3]);
        assert_eq!(
            acquire(&s, &KEY, 2, 1004, 500, true),
            Acquired::Owner,
            "released after a failure: free again"
        );
    }

    #[test]
    fn an_expired_lock_is_taken_over_and_its_old_owner_wakes_nobody() {
        let s = store();
        assert_eq!(acquire(&s, &KEY, 1, 1000, 500, true), Acquired::Owner);
        assert_eq!(acquire(&s, &KEY, 2, 1500, 500, true), Acquired::Owner);
        assert_eq!(
            release(&s, &KEY, 1, FlightEnd::Answered, 1600),
            Vec::<u32>::new()
        );
        assert_eq!(
            release(&s, &KEY, 2, FlightEnd::Answered, 1600),
            Vec::<u32>::new()
        );
    }

    #[test]
    fn another_id_in_the_slot_means_asking_without_the_lease() {
        let s = store();
        // Adding the slot count to the id's first eight bytes (little-endian) keeps its slot.
        let mut other = KEY;
        other[1] += (Table::leases().slots / 256) as u8;
        assert_ne!(other, KEY);
        assert_eq!(slot_key(&other), slot_key(&KEY));
        assert_eq!(acquire(&s, &KEY, 1, 1000, 500, true), Acquired::Owner);
        assert_eq!(acquire(&s, &other, 2, 1000, 500, true), Acquired::Bypass);
    }

    #[test]
    fn a_waiter_joining_during_release_is_not_lost() {
        let s = store();
        assert_eq!(acquire(&s, &KEY, 1, 1000, 500, true), Acquired::Owner);
        let joined = std::cell::Cell::new(false);
        *s.interleave.borrow_mut() = Some(Box::new(move |s: &FakeStore| {
            if !joined.replace(true) {
                assert_eq!(
                    acquire(s, &KEY, 9, 1001, 500, true),
                    Acquired::Waiting { deadline_ms: 1500 }
                );
            }
        }));
        assert_eq!(release(&s, &KEY, 1, FlightEnd::Answered, 1002), vec![9]);
    }

    #[test]
    fn a_lock_released_with_a_verdict_sends_latecomers_to_the_cache_for_a_moment() {
        let s = store();
        assert_eq!(acquire(&s, &KEY, 1, 1000, 500, true), Acquired::Owner);
        assert_eq!(
            release(&s, &KEY, 1, FlightEnd::Answered, 1100),
            Vec::<u32>::new()
        );
        assert_eq!(acquire(&s, &KEY, 2, 1100, 500, true), Acquired::Answered);
        assert_eq!(
            acquire(&s, &KEY, 2, 1100 + ANSWERED_FOR_MS - 1, 500, true),
            Acquired::Answered
        );
        assert_eq!(
            acquire(&s, &KEY, 2, 1100 + ANSWERED_FOR_MS, 500, true),
            Acquired::Owner,
            "later, a lookup is a new one (the entry may have expired)"
        );
        assert_eq!(
            release(&s, &KEY, 2, FlightEnd::Answered, 5000),
            Vec::<u32>::new()
        );
        assert_eq!(
            acquire(&s, &KEY, 3, 5000, 500, false),
            Acquired::Owner,
            "not trusted: the verdict was not in the cache after all"
        );
    }

    #[test]
    fn an_answered_slot_names_its_key_and_is_not_a_held_lock() {
        let mut other = KEY;
        other[31] ^= 1;
        assert_eq!(answered_at(&encode_answered(&KEY, 7), &other), None);
        assert_eq!(answered_at(&encode_answered(&KEY, 7), &KEY), Some(7));
        assert_eq!(decode(&encode_answered(&KEY, 7)), None, "not a held lock");
    }

    #[test]
    fn decode_rejects_garbage() {
        assert_eq!(decode(&[]), None);
        assert_eq!(decode(&[FORMAT_VERSION; 47]), None);
    }
}
