//! One token bucket per `key_id`, shared by every worker thread through shared data
//! and updated with compare-and-swap, so the limit is exact across threads.
//!
//! Envoy's shared data has no insert-if-absent: two workers creating the same key both
//! "win". So buckets live in a fixed set of slots created once at configure time
//! (`slots::create_slots`) and are only ever updated with the CAS they were read with. A key's
//! bucket sits in the first of `PROBES` slots from its home slot that is its own, free,
//! or holds a full bucket (a full bucket carries no information, so reusing its slot
//! loses nothing). A slot is empty only until its first bucket, so no key's bucket lies
//! past an empty slot, and reading stops there: a new key costs one read in a table with
//! room to spare.
use crate::limits::bucket::{Bucket, Take};
use crate::storage::shared_store::{SetError, SharedStore};
use crate::storage::slots::Table;
use crate::vocabulary::bucket_spec::BucketSpec;
use crate::vocabulary::key_hash::hash_key;

const FORMAT_VERSION: u8 = 1;

/// Slots tried from a key's home slot.
pub const PROBES: u32 = 4;
/// Compare-and-swap attempts before giving up. Each failed attempt means another
/// worker took a token meanwhile, so this only runs out under extreme contention.
pub const MAX_ATTEMPTS: u32 = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unavailable {
    /// Every attempt lost the compare-and-swap race.
    Contention,
    /// Shared data refused a write.
    StoreFailed,
}

/// A slot's content: whose bucket it is, and the bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SlotState {
    owner: u64,
    bucket: Bucket,
}

/// What `owner`'s bucket holds now, without taking anything: `allowed` says whether a
/// token is there.
pub fn peek(
    store: &impl SharedStore,
    table: Table,
    owner: u64,
    spec: BucketSpec,
    now_ms: u64,
) -> Take {
    let (_, _, bucket) = choose_slot(store, table, owner, spec, now_ms);
    bucket.take().1
}

/// Takes a token from `owner`'s bucket.
pub fn take_token(
    store: &impl SharedStore,
    table: Table,
    owner: u64,
    spec: BucketSpec,
    now_ms: u64,
) -> Result<Take, Unavailable> {
    for _ in 0..MAX_ATTEMPTS {
        let (key, cas, bucket) = choose_slot(store, table, owner, spec, now_ms);
        let (after, take) = bucket.take();
        if !take.allowed {
            // Nothing changed that a later read would not compute again.
            return Ok(take);
        }
        let state = SlotState {
            owner,
            bucket: after,
        };
        match store.set(&key, &encode(&state), cas) {
            Ok(()) => return Ok(take),
            Err(SetError::CasMismatch) => continue,
            Err(SetError::Failed) => return Err(Unavailable::StoreFailed),
        }
    }
    Err(Unavailable::Contention)
}

/// Gives back a token `owner` took earlier (a `brute_force` charge for a lookup whose key
/// was found). Nothing when its bucket is gone or full: it then holds all it may.
pub fn give_back(
    store: &impl SharedStore,
    table: Table,
    owner: u64,
    spec: BucketSpec,
    now_ms: u64,
) {
    for _ in 0..MAX_ATTEMPTS {
        let (key, cas, bucket) = choose_slot(store, table, owner, spec, now_ms);
        if bucket.is_full() {
            return;
        }
        let state = SlotState {
            owner,
            bucket: bucket.give_back(),
        };
        match store.set(&key, &encode(&state), cas) {
            Err(SetError::CasMismatch) => continue,
            _ => return,
        }
    }
}

/// The slot for `owner`'s bucket with the CAS it was read with, and the bucket as of now.
fn choose_slot(
    store: &impl SharedStore,
    table: Table,
    owner: u64,
    spec: BucketSpec,
    now_ms: u64,
) -> (String, Option<u32>, Bucket) {
    let home = table.home_of(owner);
    let mut free: Option<(String, Option<u32>)> = None;
    let mut home_cas = None;
    for probe in 0..PROBES.min(table.slots) {
        let key = table.slot_key(home.wrapping_add(probe));
        // A slot that was never created is used as free: only possible while a larger
        // `max_entries` is being rolled out, and creating it can race (see module docs).
        let (value, cas) = match store.get(&key) {
            Some((value, cas)) => (value, Some(cas)),
            None => (Vec::new(), None),
        };
        if probe == 0 {
            home_cas = cas;
        }
        if value.is_empty() {
            let (key, cas) = free.unwrap_or((key, cas));
            return (key, cas, Bucket::full(spec, now_ms));
        }
        match decode(&value) {
            Some(state) if state.owner == owner => {
                return (key, cas, state.bucket.at(spec, now_ms))
            }
            Some(state) if !state.bucket.at(state.bucket.spec, now_ms).is_full() => {}
            _ => {
                if free.is_none() {
                    free = Some((key, cas));
                }
            }
        }
    }
    // Every probed slot holds another key's live bucket: take over the home slot. Only
    // with more live buckets than slots; the evicted key starts afresh.
    let (key, cas) = free.unwrap_or_else(|| (table.slot_key(home), home_cas));
    (key, cas, Bucket::full(spec, now_ms))
}

/// Who a bucket belongs to (a `key_id`, a client address), as slots record it.
pub fn owner_id(owner: impl AsRef<[u8]>) -> u64 {
    let hash = hash_key(owner.as_ref());
    let mut id = [0u8; 8];
    id.copy_from_slice(hash.get(..8).unwrap_or(&[0; 8]));
    u64::from_le_bytes(id)
}

fn encode(state: &SlotState) -> Vec<u8> {
    let b = &state.bucket;
    let mut out = Vec::with_capacity(45);
    out.push(FORMAT_VERSION);
    out.extend_from_slice(&state.owner.to_le_bytes());
    for n in [b.spec.requests, b.spec.period_s, b.spec.burst] {
        out.extend_from_slice(&n.to_le_bytes());
    }
    out.extend_from_slice(&b.units.to_le_bytes());
    out.extend_from_slice(&b.updated_at_ms.to_le_bytes());
    out
}

fn decode(bytes: &[u8]) -> Option<SlotState> {
    let (&version, rest) = bytes.split_first()?;
    if version != FORMAT_VERSION || rest.len() != 44 {
        return None;
    }
    let u32_at = |i: usize| Some(u32::from_le_bytes(rest.get(i..i + 4)?.try_into().ok()?));
    let u64_at = |i: usize| Some(u64::from_le_bytes(rest.get(i..i + 8)?.try_into().ok()?));
    Some(SlotState {
        owner: u64_at(0)?,
        bucket: Bucket {
            spec: BucketSpec {
                requests: u32_at(8)?,
                period_s: u32_at(12)?,
                burst: u32_at(16)?,
            },
            units: u128::from_le_bytes(rest.get(20..36)?.try_into().ok()?),
            updated_at_ms: u64_at(36)?,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::shared_store::fake::FakeStore;
    use crate::storage::slots::create_slots;
    use std::cell::Cell;

    fn spec(burst: u32) -> BucketSpec {
        BucketSpec {
            requests: 1,
            period_s: 3600,
            burst,
        }
    }

    fn store(slots: u32) -> FakeStore {
        let s = FakeStore::default();
        create_slots(&s, Table::keys(slots));
        s
    }

    fn take(
        s: &FakeStore,
        owner: &str,
        spec: BucketSpec,
        slots: u32,
        now_ms: u64,
    ) -> Result<Take, Unavailable> {
        take_token(s, Table::keys(slots), owner_id(owner), spec, now_ms)
    }

    #[test]
    fn a_token_given_back_can_be_taken_again_and_never_past_the_burst() {
        let s = store(8);
        let owner = owner_id("10.0.0.1/32");
        let table = Table::keys(8);
        assert!(take(&s, "10.0.0.1/32", spec(2), 8, 0).unwrap().allowed);
        assert!(take(&s, "10.0.0.1/32", spec(2), 8, 0).unwrap().allowed);
        assert!(!take(&s, "10.0.0.1/32", spec(2), 8, 0).unwrap().allowed);
        give_back(&s, table, owner, spec(2), 0);
        assert!(take(&s, "10.0.0.1/32", spec(2), 8, 0).unwrap().allowed);
        give_back(&s, table, owner, spec(2), 0);
        give_back(&s, table, owner, spec(2), 0);
        give_back(&s, table, owner, spec(2), 0);
        assert_eq!(peek(&s, table, owner, spec(2), 0).remaining, 1);
    }

    #[test]
    fn exactly_burst_pass_when_every_write_races_another_worker() {
        let s = store(64);
        let allowed = std::rc::Rc::new(Cell::new(0u32));
        let counted = allowed.clone();
        let rounds = Cell::new(0u32);
        *s.interleave.borrow_mut() = Some(Box::new(move |s: &FakeStore| {
            rounds.set(rounds.get() + 1);
            // Every third write, another worker takes a token first.
            if rounds.get().is_multiple_of(3) {
                let t = take(s, "k_1", spec(25), 64, 0).expect("one race at a time");
                counted.set(counted.get() + u32::from(t.allowed));
            }
        }));
        for _ in 0..100 {
            let t = take(&s, "k_1", spec(25), 64, 0).expect("one race at a time");
            allowed.set(allowed.get() + u32::from(t.allowed));
        }
        assert_eq!(allowed.get(), 25);
        assert!(s.mismatches.get() > 0, "the test must really interleave");
    }

    #[test]
    fn gives_up_after_bounded_attempts_under_endless_contention() {
        let s = store(8);
        *s.interleave.borrow_mut() = Some(Box::new(|s: &FakeStore| {
            // Another worker rewrites every slot before each of our writes.
            for slot in 0..8 {
                let key = Table::keys(8).slot_key(slot);
                let value = s.get(&key).map(|(v, _)| v).unwrap_or_default();
                s.next_cas.set(s.next_cas.get() + 1);
                s.data.borrow_mut().insert(key, (value, s.next_cas.get()));
            }
        }));
        assert_eq!(take(&s, "k", spec(5), 8, 0), Err(Unavailable::Contention));
    }

    #[test]
    fn keys_have_separate_buckets_even_when_their_slots_collide() {
        let s = store(1);
        // One slot: the second key can only take over when the first is full again.
        assert!(take(&s, "a", spec(2), 1, 0).unwrap().allowed);
        assert!(take(&s, "a", spec(2), 1, 0).unwrap().allowed);
        assert!(!take(&s, "a", spec(2), 1, 0).unwrap().allowed);
        assert!(take(&s, "b", spec(2), 1, 0).unwrap().allowed);

        let s = store(64);
        for key in ["a", "b", "c", "d", "e"] {
            assert!(take(&s, key, spec(1), 64, 0).unwrap().allowed, "{key}");
            assert!(!take(&s, key, spec(1), 64, 0).unwrap().allowed, "{key}");
        }
    }

    #[test]
    fn reading_stops_at_the_first_empty_slot() {
        let s = store(4);
        let table = Table::keys(4);
        let home = |key: &str| table.home_of(owner_id(key));
        // Keys sharing one home slot, in a table their probes cover whole.
        let keys: Vec<String> = (0..100)
            .map(|i| format!("k{i}"))
            .filter(|k| home(k) == home("k0"))
            .take(3)
            .collect();
        let reads_to_take = |key: &str| {
            s.reads.set(0);
            assert!(take(&s, key, spec(2), 4, 0).unwrap().allowed, "{key}");
            s.reads.get()
        };
        assert_eq!(reads_to_take(&keys[0]), 1, "an empty table: the home slot");
        assert_eq!(
            reads_to_take(&keys[1]),
            2,
            "the first key's, then an empty one"
        );
        assert_eq!(reads_to_take(&keys[2]), 3);
        assert_eq!(reads_to_take(&keys[1]), 2, "its own bucket, second");
        assert!(
            !take(&s, &keys[1], spec(2), 4, 0).unwrap().allowed,
            "burst 2, exact"
        );
    }

    #[test]
    fn refills_over_time() {
        let s = store(16);
        let per_second = BucketSpec {
            requests: 1,
            period_s: 1,
            burst: 1,
        };
        assert!(take(&s, "k", per_second, 16, 0).unwrap().allowed);
        assert!(!take(&s, "k", per_second, 16, 999).unwrap().allowed);
        assert!(take(&s, "k", per_second, 16, 1000).unwrap().allowed);
    }

    #[test]
    fn creating_slots_again_keeps_running_buckets() {
        let s = store(16);
        assert!(take(&s, "k", spec(1), 16, 0).unwrap().allowed);
        create_slots(&s, Table::keys(16));
        create_slots(&s, Table::keys(32));
        assert!(!take(&s, "k", spec(1), 16, 0).unwrap().allowed);
        assert!(s.get(&Table::keys(32).slot_key(31)).is_some());
    }

    #[test]
    fn peeking_takes_nothing_and_tables_are_apart() {
        let s = store(16);
        create_slots(&s, Table::client_addresses(16));
        let one = spec(1);
        assert!(peek(&s, Table::keys(16), owner_id("k"), one, 0).allowed);
        assert!(peek(&s, Table::keys(16), owner_id("k"), one, 0).allowed);
        assert!(take(&s, "k", one, 16, 0).unwrap().allowed);
        assert!(!peek(&s, Table::keys(16), owner_id("k"), one, 0).allowed);
        assert!(peek(&s, Table::client_addresses(16), owner_id("k"), one, 0).allowed);
    }

    #[test]
    fn slot_encoding_round_trips() {
        let state = SlotState {
            owner: 7,
            bucket: Bucket {
                spec: spec(3),
                units: 123_456,
                updated_at_ms: 99,
            },
        };
        assert_eq!(decode(&encode(&state)), Some(state));
        assert_eq!(decode(&[]), None);
        assert_eq!(decode(&encode(&state)[..44]), None);
    }
}
