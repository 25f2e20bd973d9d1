//! The node's workers, by their queues, in shared data: whom the worker that polled the
//! change feed wakes with its news. Each worker adds itself when configured. Workers that
//! are gone (a VM replaced by a configuration push) are not removed; the list keeps the
//! newest `MAX_WORKERS`, and waking a gone worker's queue is simply refused.
use crate::storage::shared_store::{SetError, SharedStore};

const KEY: &str = "apikey_filter/v1/workers";
/// Far more than the worker threads of any Envoy, plus those replaced by a few pushes.
pub const MAX_WORKERS: usize = 256;
const MAX_ATTEMPTS: u32 = 16;

/// Adds worker `me` (its queue) to the node's list.
pub fn register(store: &impl SharedStore, me: u32) {
    for _ in 0..MAX_ATTEMPTS {
        let (value, cas) = match store.get(KEY) {
            Some((value, cas)) => (value, Some(cas)),
            None => (Vec::new(), None),
        };
        let mut workers = decode(&value);
        if workers.contains(&me) {
            return;
        }
        workers.push(me);
        let from = workers.len().saturating_sub(MAX_WORKERS);
        let kept = workers.get(from..).unwrap_or_default();
        match store.set(KEY, &encode(kept), cas) {
            Err(SetError::CasMismatch) => continue,
            _ => return,
        }
    }
}

/// The node's workers but `me`.
pub fn others(store: &impl SharedStore, me: u32) -> Vec<u32> {
    let value = store.get(KEY).map(|(value, _)| value).unwrap_or_default();
    decode(&value).into_iter().filter(|&w| w != me).collect()
}

fn encode(workers: &[u32]) -> Vec<u8> {
    workers.iter().flat_map(|w| w.to_le_bytes()).collect()
}

fn decode(bytes: &[u8]) -> Vec<u32> {
    bytes
        .chunks_exact(4)
        .filter_map(|c| c.try_into().ok().map(u32::from_le_bytes))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::shared_store::fake::FakeStore;

    #[test]
    fn every_worker_knows_the_others() {
        let s = FakeStore::default();
        for me in [7, 8, 9, 8] {
            register(&s, me);
        }
        assert_eq!(others(&s, 8), vec![7, 9]);
        assert_eq!(others(&s, 1), vec![7, 8, 9]);
    }

    #[test]
    fn a_worker_registering_meanwhile_is_not_lost() {
        let s = FakeStore::default();
        register(&s, 1);
        let joined = std::cell::Cell::new(false);
        *s.interleave.borrow_mut() = Some(Box::new(move |s: &FakeStore| {
            if !joined.replace(true) {
                register(s, 2);
            }
        }));
        register(&s, 3);
        *s.interleave.borrow_mut() = None;
        assert_eq!(others(&s, 0), vec![1, 2, 3]);
    }

    #[test]
    fn the_list_keeps_the_newest() {
        let s = FakeStore::default();
        for me in 0..(MAX_WORKERS as u32 + 10) {
            register(&s, me);
        }
        let all = others(&s, u32::MAX);
        assert_eq!(all.len(), MAX_WORKERS);
        assert_eq!(all.first(), Some(&10));
    }
}
