//! `per_key_stats`: counters `key.<key_id>.allowed` and `key.<key_id>.denied` for the
//! first `max_keys` distinct `key_id`s the node sees, the others under `key.other`, so
//! that a flood of keys cannot grow Envoy's stats.
//!
//! Which `key_id`s have counters is decided once per node, in a fixed table of shared-data
//! slots (as buckets are: created empty, claimed with compare-and-swap). A `key_id` whose
//! probe slots are all claimed by others counts under `key.other`, so the bound may be
//! reached a little before `max_keys` distinct ones. Each worker then keeps what it
//! decided, with the counters' ids.
use super::ports::{SetError, SharedStore, Stats};
use crate::limits::buckets::owner_id;
use crate::storage::slots::Table;
use std::collections::HashMap;

/// Slots tried from a `key_id`'s home slot.
const PROBES: u32 = 8;
const MAX_ATTEMPTS: u32 = 8;

/// A `key_id`'s two counters, or `None`: it counts under `key.other`.
type Counters = Option<(u32, u32)>;

pub struct PerKeyStats {
    table: Table,
    decided: HashMap<String, Counters>,
    other: Option<Counters>,
}

impl PerKeyStats {
    pub fn new(max_keys: u32) -> PerKeyStats {
        PerKeyStats {
            table: Table::per_key_stats(max_keys),
            decided: HashMap::new(),
            other: None,
        }
    }

    pub fn table(&self) -> Table {
        self.table
    }

    /// Counts one request of `key_id`, allowed or denied.
    pub fn count<H: SharedStore + Stats>(&mut self, host: &H, key_id: &str, allowed: bool) {
        let counters = match self.decided.get(key_id) {
            Some(counters) => *counters,
            None => {
                let counters = if self.admit(host, key_id) {
                    define_pair(host, &format!("key.{}", stat_name(key_id)))
                } else {
                    None
                };
                self.decided.insert(key_id.to_string(), counters);
                counters
            }
        };
        let counters = counters.or_else(|| {
            *self
                .other
                .get_or_insert_with(|| define_pair(host, "key.other"))
        });
        if let Some((allowed_id, denied_id)) = counters {
            host.count_defined(if allowed { allowed_id } else { denied_id });
        }
    }

    /// Whether `key_id` has (or now gets) a slot of the node's table.
    fn admit(&self, store: &impl SharedStore, key_id: &str) -> bool {
        let owner = owner_id(key_id).to_le_bytes();
        let home = self.table.home_of(owner_id(key_id));
        for probe in 0..PROBES.min(self.table.slots) {
            let key = self.table.slot_key(home.wrapping_add(probe));
            for _ in 0..MAX_ATTEMPTS {
                let Some((value, cas)) = store.get(&key) else {
                    return false; // slots not created: no per-key counters
                };
                if value == owner {
                    return true;
                }
                if !value.is_empty() {
                    break; // another key_id's: the next slot
                }
                match store.set(&key, &owner, Some(cas)) {
                    Ok(()) => return true,
                    Err(SetError::CasMismatch) => continue, // claimed meanwhile: look again
                    Err(SetError::Failed) => return false,
                }
            }
        }
        false
    }
}

fn define_pair(stats: &impl Stats, stem: &str) -> Counters {
    Some((
        stats.define_counter(&format!("{stem}.allowed"))?,
        stats.define_counter(&format!("{stem}.denied"))?,
    ))
}

/// A `key_id` as a stat name segment: characters outside `A-Za-z0-9_-` written as `_`.
pub fn stat_name(key_id: &str) -> String {
    key_id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::fake::{FakeHost, FakeNode};
    use crate::storage::slots::create_slots;
    use std::rc::Rc;

    fn host(max_keys: u32) -> FakeHost {
        let host = FakeHost::new(Rc::new(FakeNode::default()));
        create_slots(&host, Table::per_key_stats(max_keys));
        host
    }

    #[test]
    fn the_first_max_keys_key_ids_get_counters_and_the_others_share_one() {
        let host = host(3);
        let mut stats = PerKeyStats::new(3);
        for (key_id, allowed) in [
            ("a", true),
            ("b", false),
            ("a", true),
            ("c.1", true),
            ("d", true),
            ("e", false),
        ] {
            stats.count(&host, key_id, allowed);
        }
        let counted = host.stats();
        assert_eq!(counted.get("key.a.allowed"), Some(&2));
        assert_eq!(counted.get("key.b.denied"), Some(&1));
        assert_eq!(counted.get("key.c_1.allowed"), Some(&1));
        assert_eq!(counted.get("key.other.allowed"), Some(&1));
        assert_eq!(counted.get("key.other.denied"), Some(&1));
        let per_key = counted
            .keys()
            .filter(|n| n.starts_with("key.") && !n.starts_with("key.other"))
            .count();
        assert_eq!(per_key, 3);
    }

    #[test]
    fn workers_of_a_node_agree_on_which_key_ids_have_counters() {
        let node = Rc::new(FakeNode::default());
        let (a, b) = (FakeHost::new(node.clone()), FakeHost::new(node));
        create_slots(&a, Table::per_key_stats(1));
        let (mut on_a, mut on_b) = (PerKeyStats::new(1), PerKeyStats::new(1));
        on_a.count(&a, "first", true);
        on_b.count(&b, "second", true);
        on_b.count(&b, "first", true);
        assert_eq!(b.stats().get("key.first.allowed"), Some(&1));
        assert_eq!(
            b.stats().get("key.other.allowed"),
            Some(&1),
            "second came after the bound"
        );
    }

    #[test]
    fn names_keep_only_what_a_stat_name_may_hold() {
        assert_eq!(stat_name("k_1-A"), "k_1-A");
        assert_eq!(stat_name("acme.com/key 1é"), "acme_com_key_1_");
    }
}
