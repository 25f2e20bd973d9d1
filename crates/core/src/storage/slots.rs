//! Fixed tables of shared-data slots.
//!
//! Envoy's shared data is never deleted and has no insert-if-absent: a write to a
//! missing key always inserts, so two workers creating the same key can both "win".
//! Everything the filter keeps per key or per client therefore lives in a fixed number
//! of slots: memory stays bounded, and slots that must be updated with compare-and-swap
//! are created once, before anyone contends for them.
use crate::storage::shared_store::SharedStore;
use crate::vocabulary::decimal;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Table {
    prefix: &'static str,
    pub slots: u32,
}

/// Leases are held only for a callout's duration: a few thousand slots serve any burst
/// of distinct cold keys (two keys sharing a slot just skip the lease).
const LEASE_SLOTS: u32 = 4096;

impl Table {
    /// The key cache (written without CAS, so never pre-created).
    pub fn cache(slots: u32) -> Table {
        Table::new("apikey_filter/v1/cache/", slots)
    }

    /// One token bucket per `key_id`.
    pub fn keys(slots: u32) -> Table {
        Table::new("apikey_filter/v1/bucket/", slots)
    }

    /// One failed-attempt budget per client address (`brute_force`), apart from the
    /// key buckets so that a spray from many addresses cannot evict those.
    pub fn client_addresses(slots: u32) -> Table {
        Table::new("apikey_filter/v1/failures/", slots)
    }

    /// One quota allowance per `key_id` (`rate_limit_service`).
    pub fn quotas(slots: u32) -> Table {
        Table::new("apikey_filter/v1/quota/", slots)
    }

    /// Which `key_id`s have per-key stats (`per_key_stats`).
    pub fn per_key_stats(max_keys: u32) -> Table {
        Table::new("apikey_filter/v1/per-key-stats/", max_keys)
    }

    /// Who is making a flight's callout right now (one callout per node). The prefix
    /// predates flights other than key lookups; the format is unchanged.
    pub fn leases() -> Table {
        Table::new("apikey_filter/v1/lookup-lock/", LEASE_SLOTS)
    }

    fn new(prefix: &'static str, slots: u32) -> Table {
        Table {
            prefix,
            slots: slots.max(1),
        }
    }

    /// The slot a 64-bit id lives in (its home slot).
    pub fn home_of(&self, id: u64) -> u32 {
        (id % u64::from(self.slots)) as u32
    }

    pub fn slot_key(&self, slot: u32) -> String {
        let mut key = String::with_capacity(self.prefix.len() + 10);
        key.push_str(self.prefix);
        decimal::push(&mut key, u64::from(slot % self.slots));
        key
    }

    fn marker_key(&self) -> String {
        format!("{}slots", self.prefix)
    }
}

/// Creates the slots that do not exist yet; never touches one that does, so running it
/// again (every VM, every configuration push) keeps everything that is running.
pub fn create_slots(store: &impl SharedStore, table: Table) {
    let marker = table.slots.to_le_bytes();
    if store
        .get(&table.marker_key())
        .is_some_and(|(v, _)| v == marker)
    {
        return;
    }
    for slot in 0..table.slots {
        let key = table.slot_key(slot);
        if store.get(&key).is_none() {
            let _ = store.set(&key, &[], None);
        }
    }
    let _ = store.set(&table.marker_key(), &marker, None);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_keys_are_the_prefix_and_the_slot_in_decimal() {
        let table = Table::cache(100_000);
        for slot in [0, 7, 10, 99, 100, 4095, 99_999] {
            assert_eq!(
                table.slot_key(slot),
                format!("apikey_filter/v1/cache/{slot}")
            );
        }
        assert_eq!(table.slot_key(100_003), "apikey_filter/v1/cache/3");
        let widest = Table::keys(u32::MAX);
        assert_eq!(
            widest.slot_key(u32::MAX - 1),
            format!("apikey_filter/v1/bucket/{}", u32::MAX - 1)
        );
    }
}
