//! Each key's `QuotaState` in a fixed table of shared-data slots, changed only with the
//! compare-and-swap it was read with, so that the node's workers share one allowance.
//!
//! A key's state sits in the first of `PROBES` slots from its home slot that is its own,
//! empty, or idle (owes the service nothing and refuses nothing: reusing it loses at most
//! an allowance, and the next request asks). When every probed slot is busy with other
//! keys, there is no state for the key and its requests ask the service one by one.
use crate::limits::buckets::{MAX_ATTEMPTS, PROBES};
use crate::quotas::allowance::QuotaState;
use crate::storage::shared_store::{SetError, SharedStore};
use crate::storage::slots::Table;

/// Applies `change` to `key`'s state and writes it back if it changed; what `change`
/// returned, `None` when there is no slot for the key or the store refused. `change` may
/// run more than once (when another worker wrote first), each time on a fresh read.
pub fn update<R>(
    store: &impl SharedStore,
    table: Table,
    key: u64,
    now_ms: u64,
    change: impl Fn(&mut QuotaState) -> R,
) -> Option<R> {
    for _ in 0..MAX_ATTEMPTS {
        let (slot, cas, before) = choose_slot(store, table, key, now_ms)?;
        let mut state = before.clone();
        let result = change(&mut state);
        if state == before {
            return Some(result);
        }
        match store.set(&slot, &state.encode(), cas) {
            Ok(()) => return Some(result),
            Err(SetError::CasMismatch) => continue,
            Err(SetError::Failed) => return None,
        }
    }
    None
}

/// Reads `key`'s state without changing it.
pub fn read(store: &impl SharedStore, table: Table, key: u64, now_ms: u64) -> Option<QuotaState> {
    choose_slot(store, table, key, now_ms).map(|(_, _, state)| state)
}

fn choose_slot(
    store: &impl SharedStore,
    table: Table,
    key: u64,
    now_ms: u64,
) -> Option<(String, Option<u32>, QuotaState)> {
    let home = table.home_of(key);
    let mut free = None;
    for probe in 0..PROBES.min(table.slots) {
        let slot = table.slot_key(home.wrapping_add(probe));
        let Some((value, cas)) = store.get(&slot) else {
            // Never created (a larger table being rolled out): usable, as buckets do.
            let (slot, cas) = free.unwrap_or((slot, None));
            return Some((slot, cas, QuotaState::new(key)));
        };
        match QuotaState::decode(&value) {
            Some(state) if state.key == key => return Some((slot, Some(cas), state)),
            Some(state) if !state.idle(now_ms) => {}
            // Empty (no key's state lies past an empty slot), foreign bytes, or idle.
            decoded => {
                let empty = decoded.is_none() && value.is_empty();
                if free.is_none() {
                    free = Some((slot, Some(cas)));
                }
                if empty {
                    break;
                }
            }
        }
    }
    free.map(|(slot, cas)| (slot, cas, QuotaState::new(key)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quotas::allowance::Mode;
    use crate::storage::shared_store::fake::FakeStore;
    use crate::storage::slots::create_slots;

    const BATCHED: Mode = Mode {
        sync_interval_ms: 1_000,
        failure_open: true,
    };

    fn store(slots: u32) -> (FakeStore, Table) {
        let s = FakeStore::default();
        let table = Table::quotas(slots);
        create_slots(&s, table);
        (s, table)
    }

    #[test]
    fn workers_share_one_state_per_key() {
        let (s, table) = store(16);
        update(&s, table, 7, 0, |q| q.grant = 3);
        let taken: Vec<_> = (0..5)
            .map(|_| update(&s, table, 7, 0, |q| q.decide(0, BATCHED, &[])))
            .collect();
        let admitted = taken
            .iter()
            .filter(|d| matches!(d, Some(crate::quotas::allowance::Decision::Admit { .. })))
            .count();
        // Two admitted by the node, one lent to the first's worker.
        assert_eq!(admitted, 2);
        // The third asks and carries the two in its call.
        let carried_two = crate::quotas::allowance::Decision::Ask { carried: 2 };
        assert_eq!(taken[2], Some(carried_two));
        assert_eq!(
            read(&s, table, 7, 0).map(|q| (q.spent, q.lent)),
            Some((0, 1))
        );
    }

    #[test]
    fn a_busy_table_gives_no_state_and_an_idle_slot_is_reused() {
        let (s, table) = store(1);
        update(&s, table, 1, 0, |q| q.spent = 1);
        assert_eq!(
            update(&s, table, 2, 0, |q| q.spent = 1),
            None,
            "slot owes a report"
        );
        update(&s, table, 1, 0, |q| q.spent = 0);
        assert_eq!(update(&s, table, 2, 0, |q| q.spent), Some(0));
        assert_eq!(read(&s, table, 2, 0).map(|q| q.key), Some(2));
    }

    #[test]
    fn a_lost_race_is_run_again_on_a_fresh_read() {
        let (s, table) = store(4);
        update(&s, table, 9, 0, |q| q.grant = 1);
        // Another worker takes the last of the allowance between this read and write.
        let mut raced = false;
        *s.interleave.borrow_mut() = Some(Box::new(move |s: &FakeStore| {
            if !std::mem::replace(&mut raced, true) {
                update(s, table, 9, 0, |q| q.decide(0, BATCHED, &[]));
            }
        }));
        let decided = update(&s, table, 9, 0, |q| q.decide(0, BATCHED, &[]));
        // The other worker's request is carried in this one's call.
        let carried_one = crate::quotas::allowance::Decision::Ask { carried: 1 };
        assert_eq!(decided, Some(carried_one));
        assert_eq!(
            read(&s, table, 9, 0).map(|q| (q.grant, q.spent)),
            Some((0, 0))
        );
    }
}
