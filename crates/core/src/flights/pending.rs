//! `key_service.max_pending`: how many lookups the node has in flight, one counter in
//! shared data for every worker, so that a flood of made-up keys cannot queue lookups
//! without bound. A lookup that would pass the limit is not sent and is answered as
//! overloaded (closed, whatever `failure_mode` says).
//!
//! Every lookup in flight ends (answered, failed or timed out) within its timeout, and
//! each end writes the counter. So a counter not written for longer than that can only
//! hold the lookups of a worker that died with them in flight: it is read as 0.
use crate::storage::shared_store::{SetError, SharedStore};

const KEY: &str = "apikey_filter/v1/lookups-in-flight";
const MAX_ATTEMPTS: u32 = 16;

/// Makes the counter, at configuration: Envoy's shared data inserts a key that does not
/// exist whatever the CAS, so two first increments could both win.
pub fn create(store: &impl SharedStore) {
    if store.get(KEY).is_none() {
        let _ = store.set(KEY, &[0; 12], None);
    }
}

/// Counts a lookup in before it is sent; false when `max` are in flight already (or the
/// counter cannot be written: a lookup the node cannot count is not sent).
pub fn enter(store: &impl SharedStore, max: u32, now_ms: u64, stale_after_ms: u64) -> bool {
    update(store, now_ms, stale_after_ms, |n| (n < max).then(|| n + 1))
}

/// Counts a lookup out: it was answered, failed, or could not be sent after all.
pub fn leave(store: &impl SharedStore, now_ms: u64, stale_after_ms: u64) {
    let _ = update(store, now_ms, stale_after_ms, |n| Some(n.saturating_sub(1)));
}

/// The lookups in flight now, as the counter says.
#[cfg(test)]
fn in_flight(store: &impl SharedStore, now_ms: u64, stale_after_ms: u64) -> u32 {
    let value = store.get(KEY).map(|(value, _)| value).unwrap_or_default();
    read(&value, now_ms, stale_after_ms)
}

fn update(
    store: &impl SharedStore,
    now_ms: u64,
    stale_after_ms: u64,
    change: impl Fn(u32) -> Option<u32>,
) -> bool {
    for _ in 0..MAX_ATTEMPTS {
        let (value, cas) = match store.get(KEY) {
            Some((value, cas)) => (value, Some(cas)),
            None => (Vec::new(), None),
        };
        let Some(count) = change(read(&value, now_ms, stale_after_ms)) else {
            return false;
        };
        let mut out = Vec::with_capacity(12);
        out.extend_from_slice(&count.to_le_bytes());
        out.extend_from_slice(&now_ms.to_le_bytes());
        match store.set(KEY, &out, cas) {
            Ok(()) => return true,
            Err(SetError::CasMismatch) => continue,
            Err(SetError::Failed) => return false,
        }
    }
    false
}

fn read(value: &[u8], now_ms: u64, stale_after_ms: u64) -> u32 {
    let count = value
        .get(..4)
        .and_then(|b| b.try_into().ok())
        .map(u32::from_le_bytes);
    let at_ms = value
        .get(4..12)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_le_bytes);
    match (count, at_ms) {
        (Some(count), Some(at_ms)) if now_ms.saturating_sub(at_ms) <= stale_after_ms => count,
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::shared_store::fake::FakeStore;

    #[test]
    fn at_most_max_are_in_flight_and_each_end_makes_room() {
        let s = FakeStore::default();
        assert!(enter(&s, 2, 0, 1_000));
        assert!(enter(&s, 2, 0, 1_000));
        assert!(!enter(&s, 2, 0, 1_000));
        assert_eq!(in_flight(&s, 10, 1_000), 2);
        leave(&s, 10, 1_000);
        assert!(enter(&s, 2, 20, 1_000));
        assert!(!enter(&s, 2, 20, 1_000));
    }

    #[test]
    fn a_counter_no_lookup_ended_on_for_longer_than_a_timeout_is_read_as_empty() {
        let s = FakeStore::default();
        assert!(enter(&s, 1, 0, 1_000));
        assert!(!enter(&s, 1, 1_000, 1_000));
        assert!(enter(&s, 1, 1_001, 1_000));
    }

    #[test]
    fn another_worker_counting_meanwhile_is_not_lost() {
        let s = FakeStore::default();
        create(&s);
        let raced = std::cell::Cell::new(false);
        *s.interleave.borrow_mut() = Some(Box::new(move |s: &FakeStore| {
            if !raced.replace(true) {
                assert!(enter(s, 10, 0, 1_000));
            }
        }));
        assert!(enter(&s, 10, 0, 1_000));
        *s.interleave.borrow_mut() = None;
        assert_eq!(in_flight(&s, 0, 1_000), 2);
    }
}
