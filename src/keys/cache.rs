//! The key cache: the one place that says when what is known about a key may be trusted,
//! for both tiers (the node-wide entries in shared data and each worker's own copies),
//! and that reads, writes and forgets them.
//!
//! - A found key is trusted for `ttl_s`; in the last `refresh_ahead_pct` percent of that
//!   period it is still trusted, and due for a refresh.
//! - Past `ttl_s`, and younger than `ttl_s + stale_if_error_s`, it is stale: used only
//!   while the key service fails.
//! - An unknown key is remembered for `negative_ttl_s`.
//! - A forgotten entry (the change feed's tombstone) is never used, not even as stale.
//! - After two failed lookups of a key in a row, the key service is not asked about it for
//!   1 s, then 2 s, 4 s, at most 5 s (`Failures`).
use crate::config::{BucketSpec, CacheConfig, Config};
use crate::keys::copies::Copies;
use crate::keys::entry::{self, CacheEntry, Verdict};
use crate::keys::key_hash::{hash_key, KeyHash};
use crate::keys::known_key::KnownKey;
use crate::keys::record::KeyRecord;
use crate::storage::shared_store::SharedStore;
use crate::storage::slots::Table;
use std::rc::Rc;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrustRules {
    pub ttl_s: u64,
    pub negative_ttl_s: u64,
    pub stale_if_error_s: u64,
    /// 0: no refresh ahead.
    pub refresh_ahead_pct: u8,
}

/// How far what an entry says may be trusted right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trust {
    /// A found key within its trust period; `refresh_due` in its last part.
    Fresh {
        refresh_due: bool,
    },
    /// A found key past its trust period, usable while the key service fails.
    Stale,
    /// An unknown key within `negative_ttl_s`.
    Negative,
    Useless,
}

impl TrustRules {
    pub fn new(cache: &CacheConfig) -> TrustRules {
        TrustRules {
            ttl_s: cache.ttl_s,
            negative_ttl_s: cache.negative_ttl_s,
            stale_if_error_s: cache.stale_if_error_s,
            refresh_ahead_pct: 0,
        }
    }

    pub fn judge(&self, entry: &CacheEntry, now_ms: u64) -> Trust {
        match entry.verdict {
            Verdict::Found(_) => self.found(entry.stored_at_ms, now_ms),
            Verdict::NotFound if age_ms(entry.stored_at_ms, now_ms) < ms(self.negative_ttl_s) => {
                Trust::Negative
            }
            Verdict::NotFound | Verdict::Forgotten => Trust::Useless,
        }
    }

    /// A found key stored at `stored_at_ms` (also a worker's copy of one).
    pub fn found(&self, stored_at_ms: u64, now_ms: u64) -> Trust {
        let (age, ttl) = (age_ms(stored_at_ms, now_ms), ms(self.ttl_s));
        if age < ttl {
            let refresh_from = ttl / 100 * u64::from(100 - self.refresh_ahead_pct.min(100));
            Trust::Fresh {
                refresh_due: self.refresh_ahead_pct > 0 && age >= refresh_from,
            }
        } else if age < ttl.saturating_add(ms(self.stale_if_error_s)) {
            Trust::Stale
        } else {
            Trust::Useless
        }
    }
}

/// A clock that steps back makes an entry younger, never older.
fn age_ms(stored_at_ms: u64, now_ms: u64) -> u64 {
    now_ms.saturating_sub(stored_at_ms)
}

fn ms(seconds: u64) -> u64 {
    seconds.saturating_mul(1000)
}

/// The key service's failures for one key since its last answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Failures {
    pub in_a_row: u8,
    /// No lookup of the key before this.
    pub paused_until_ms: u64,
}

/// The pauses after the 2nd, 3rd, 4th and any later failure in a row.
const PAUSES_MS: [u64; 4] = [1_000, 2_000, 4_000, 5_000];

impl Failures {
    pub fn after_failure(self, now_ms: u64) -> Failures {
        let in_a_row = self.in_a_row.saturating_add(1);
        let pause = match usize::from(in_a_row) {
            0 | 1 => 0,
            n => PAUSES_MS.get(n - 2).copied().unwrap_or(5_000),
        };
        Failures {
            in_a_row,
            paused_until_ms: now_ms.saturating_add(pause),
        }
    }

    pub fn is_paused(&self, now_ms: u64) -> bool {
        now_ms < self.paused_until_ms
    }
}

/// What the cache says about a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cached {
    Hit(Rc<KnownKey>),
    NegativeHit,
    /// Ask the key service. `stale` is a found record still usable if it fails.
    Miss {
        stale: Option<KeyRecord>,
    },
}

pub struct KeyCache {
    table: Table,
    rules: TrustRules,
    /// The configured `rate_limit`, for records that name none.
    default_limit: Option<BucketSpec>,
    copies: Copies,
}

impl KeyCache {
    pub fn new(config: &Config) -> KeyCache {
        KeyCache {
            table: Table::cache(config.cache.max_entries),
            rules: TrustRules::new(&config.cache),
            default_limit: config.rate_limit,
            copies: Copies::new(config.cache.max_entries),
        }
    }

    /// What the cache says about `raw_key`, and its hash: this worker's copy if it has a
    /// trusted one, else the node-wide entry (which then leaves a copy here). A hit on a
    /// copy computes no SHA-256.
    pub fn lookup(
        &mut self,
        store: &impl SharedStore,
        raw_key: &[u8],
        now_ms: u64,
    ) -> (KeyHash, Cached) {
        let id = self.copies.id_of(raw_key);
        if let Some(copy) = self.copies.get(id) {
            if let Trust::Fresh { .. } = self.rules.found(copy.stored_at_ms, now_ms) {
                return (copy.key_hash, Cached::Hit(copy.known.clone()));
            }
        }
        let key_hash = hash_key(raw_key);
        let entry = self.entry(store, &key_hash);
        let cached = match entry.map(|e| (self.rules.judge(&e, now_ms), e)) {
            Some((Trust::Fresh { .. }, e)) => {
                let Verdict::Found(record) = e.verdict else {
                    return (key_hash, Cached::Miss { stale: None });
                };
                let known = self.known_key(record);
                self.copies.put(id, key_hash, e.stored_at_ms, known.clone());
                Cached::Hit(known)
            }
            Some((trust, e)) => judged(trust, e),
            None => Cached::Miss { stale: None },
        };
        (key_hash, cached)
    }

    /// What the node-wide entry says about `key_hash` (no copy is left: the raw key the
    /// copy would be found by is not at hand).
    pub fn node_wide(&self, store: &impl SharedStore, key_hash: &KeyHash, now_ms: u64) -> Cached {
        match self.entry(store, key_hash) {
            Some(e) => match self.rules.judge(&e, now_ms) {
                Trust::Fresh { .. } => match e.verdict {
                    Verdict::Found(record) => Cached::Hit(self.known_key(record)),
                    _ => Cached::Miss { stale: None },
                },
                trust => judged(trust, e),
            },
            None => Cached::Miss { stale: None },
        }
    }

    /// Puts the key service's verdict in the node-wide cache; it ends the key's failures.
    pub fn store_verdict(
        &self,
        store: &impl SharedStore,
        key_hash: &KeyHash,
        verdict: Verdict,
        now_ms: u64,
    ) {
        self.write(store, &CacheEntry::new(*key_hash, now_ms, verdict), now_ms);
    }

    /// Counts a failed lookup of the key, keeping what the cache knew of it (a stale
    /// record stays usable), and returns its failures so far.
    pub fn record_failure(
        &self,
        store: &impl SharedStore,
        key_hash: &KeyHash,
        now_ms: u64,
    ) -> Failures {
        let mut entry = self
            .entry(store, key_hash)
            .unwrap_or_else(|| CacheEntry::new(*key_hash, now_ms, Verdict::Forgotten));
        entry.failures = entry.failures.after_failure(now_ms);
        self.write(store, &entry, now_ms);
        entry.failures
    }

    /// Forgets what the node and this worker know of the key: its entry becomes a
    /// tombstone, never used again, not even as stale.
    pub fn forget(&mut self, store: &impl SharedStore, key_hash: &KeyHash, now_ms: u64) {
        self.copies.forget(key_hash);
        if self.entry(store, key_hash).is_some() {
            let tombstone = CacheEntry::new(*key_hash, now_ms, Verdict::Forgotten);
            self.write(store, &tombstone, now_ms);
        }
    }

    pub fn known_key(&self, record: KeyRecord) -> Rc<KnownKey> {
        Rc::new(KnownKey::new(record, self.default_limit))
    }

    fn entry(&self, store: &impl SharedStore, key_hash: &KeyHash) -> Option<CacheEntry> {
        entry::find(key_hash, self.table.slots, |slot| self.read(store, slot))
    }

    fn read(&self, store: &impl SharedStore, slot: u32) -> Option<Vec<u8>> {
        store
            .get(&self.table.slot_key(slot))
            .map(|(value, _)| value)
            .filter(|value| !value.is_empty())
    }

    fn write(&self, store: &impl SharedStore, entry: &CacheEntry, now_ms: u64) {
        let read = |slot| self.read(store, slot);
        // Written without CAS: two workers racing for one slot at worst cost a lookup.
        if let Some(slot) = entry::placement(entry, self.table.slots, read, now_ms, &self.rules) {
            let _ = store.set(&self.table.slot_key(slot), &entry::encode(entry), None);
        }
    }
}

fn judged(trust: Trust, entry: CacheEntry) -> Cached {
    match (trust, entry.verdict) {
        (Trust::Stale, Verdict::Found(record)) => Cached::Miss {
            stale: Some(record),
        },
        (Trust::Negative, _) => Cached::NegativeHit,
        _ => Cached::Miss { stale: None },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::record::RecordLimit;
    use crate::storage::shared_store::fake::FakeStore;

    fn rules() -> TrustRules {
        TrustRules {
            ttl_s: 60,
            negative_ttl_s: 10,
            stale_if_error_s: 300,
            refresh_ahead_pct: 0,
        }
    }

    fn record(key_id: &str) -> KeyRecord {
        KeyRecord {
            key_id: key_id.into(),
            owner: "acme".into(),
            scopes: vec![],
            rate_limit: RecordLimit::Default,
            expires_at: None,
            revoked: false,
        }
    }

    fn judge(verdict: Verdict, rules: TrustRules, age_s: u64) -> Trust {
        let entry = CacheEntry::new([7; 32], 1_000_000, verdict);
        rules.judge(&entry, 1_000_000 + age_s * 1000)
    }

    const FRESH: Trust = Trust::Fresh { refresh_due: false };

    #[test]
    fn found_is_fresh_then_stale_then_useless() {
        let found = |age_s| judge(Verdict::Found(record("k")), rules(), age_s);
        assert_eq!(found(59), FRESH);
        assert_eq!(found(60), Trust::Stale);
        assert_eq!(found(359), Trust::Stale);
        assert_eq!(found(360), Trust::Useless);
    }

    #[test]
    fn the_last_part_of_the_trust_period_is_due_for_a_refresh() {
        let ahead = TrustRules {
            refresh_ahead_pct: 20,
            ..rules()
        };
        let found = |age_s| judge(Verdict::Found(record("k")), ahead, age_s);
        assert_eq!(found(47), FRESH);
        assert_eq!(found(48), Trust::Fresh { refresh_due: true });
        assert_eq!(found(59), Trust::Fresh { refresh_due: true });
        assert_eq!(found(60), Trust::Stale);
    }

    #[test]
    fn not_found_is_remembered_for_the_negative_ttl_and_a_tombstone_never() {
        assert_eq!(judge(Verdict::NotFound, rules(), 9), Trust::Negative);
        assert_eq!(judge(Verdict::NotFound, rules(), 10), Trust::Useless);
        assert_eq!(judge(Verdict::Forgotten, rules(), 0), Trust::Useless);
    }

    #[test]
    fn a_clock_that_steps_back_keeps_the_entry_fresh() {
        assert_eq!(rules().found(1_000_000, 0), FRESH);
        let no_ttl = TrustRules {
            ttl_s: 0,
            stale_if_error_s: 0,
            ..rules()
        };
        assert_eq!(no_ttl.found(0, 0), Trust::Useless, "ttl 0 caches nothing");
    }

    #[test]
    fn failures_pause_lookups_from_the_second_in_a_row() {
        let mut failures = Failures::default();
        let mut pauses = Vec::new();
        for _ in 0..6 {
            failures = failures.after_failure(10_000);
            pauses.push(failures.paused_until_ms - 10_000);
        }
        assert_eq!(pauses, vec![0, 1_000, 2_000, 4_000, 5_000, 5_000]);
        assert!(failures.is_paused(14_999));
        assert!(!failures.is_paused(15_000));
        let many = Failures {
            in_a_row: u8::MAX,
            paused_until_ms: 0,
        };
        assert_eq!(many.after_failure(0).paused_until_ms, 5_000);
    }

    fn config(max_entries: u32) -> Config {
        let mut config = Config::parse(br#"{"key_service": {"cluster": "ks"}}"#).unwrap();
        config.cache.max_entries = max_entries;
        config
    }

    #[test]
    fn a_hit_leaves_a_copy_that_is_trusted_as_the_entry_was() {
        let store = FakeStore::default();
        let mut cache = KeyCache::new(&config(100));
        let key_hash = hash_key(b"key-a");
        cache.store_verdict(&store, &key_hash, Verdict::Found(record("a")), 1_000);
        assert!(
            matches!(cache.lookup(&store, b"key-a", 1_000), (h, Cached::Hit(k)) if h == key_hash && k.record.key_id == "a")
        );
        let reads = store.reads.get();
        assert!(matches!(
            cache.lookup(&store, b"key-a", 60_999),
            (_, Cached::Hit(_))
        ));
        assert_eq!(store.reads.get(), reads, "the copy, not shared data");
        assert_eq!(
            cache.lookup(&store, b"key-a", 61_000).1,
            Cached::Miss {
                stale: Some(record("a"))
            },
            "past ttl_s neither the copy nor the entry is a hit"
        );
    }

    #[test]
    fn a_forgotten_key_is_asked_again_and_never_served_stale() {
        let store = FakeStore::default();
        let mut cache = KeyCache::new(&config(100));
        let key_hash = hash_key(b"key-a");
        cache.store_verdict(&store, &key_hash, Verdict::Found(record("a")), 0);
        assert!(matches!(
            cache.lookup(&store, b"key-a", 0).1,
            Cached::Hit(_)
        ));
        cache.forget(&store, &key_hash, 10);
        assert_eq!(
            cache.lookup(&store, b"key-a", 20).1,
            Cached::Miss { stale: None }
        );
        assert_eq!(
            cache.node_wide(&store, &key_hash, 20),
            Cached::Miss { stale: None }
        );
        cache.store_verdict(&store, &key_hash, Verdict::NotFound, 30);
        assert_eq!(cache.node_wide(&store, &key_hash, 30), Cached::NegativeHit);
    }

    #[test]
    fn forgetting_a_key_the_node_never_saw_writes_nothing() {
        let store = FakeStore::default();
        let mut cache = KeyCache::new(&config(100));
        cache.forget(&store, &hash_key(b"never"), 0);
        assert!(store.data.borrow().is_empty());
    }

    #[test]
    fn failures_are_recorded_on_the_entry_and_keep_the_stale_record() {
        let store = FakeStore::default();
        let cache = KeyCache::new(&config(100));
        let (found, unknown) = (hash_key(b"found"), hash_key(b"unknown"));
        cache.store_verdict(&store, &found, Verdict::Found(record("a")), 0);
        assert_eq!(cache.record_failure(&store, &found, 61_000).in_a_row, 1);
        assert_eq!(cache.record_failure(&store, &found, 61_000).in_a_row, 2);
        assert_eq!(
            cache.node_wide(&store, &found, 61_000),
            Cached::Miss {
                stale: Some(record("a"))
            }
        );
        let failures = cache.record_failure(&store, &unknown, 0);
        assert_eq!(failures.in_a_row, 1);
        assert_eq!(
            cache.node_wide(&store, &unknown, 0),
            Cached::Miss { stale: None }
        );
        cache.store_verdict(&store, &found, Verdict::Found(record("a")), 62_000);
        assert_eq!(
            cache.record_failure(&store, &found, 62_000).in_a_row,
            1,
            "an answer ends them"
        );
    }
}
