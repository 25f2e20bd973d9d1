//! The key cache: the one place that says when what is known about a key may be trusted,
//! for both tiers (the node-wide entries in shared data and each worker's own copies),
//! and that reads, writes and forgets them.
//!
//! - A found key is trusted for `ttl_s` (`changes.ttl_s` while the change feed is
//!   healthy); in the last `refresh_ahead_pct` percent of that period it is still
//!   trusted, and due for a refresh.
//! - Past `ttl_s`, and younger than `ttl_s + stale_if_error_s`, it is stale: used only
//!   while the key service fails.
//! - An unknown key is remembered for `negative_ttl_s`.
//! - A forgotten entry (the change feed's tombstone, or any entry of an epoch before the
//!   feed's last 410) is never used, not even as stale.
//! - After two failed lookups of a key in a row, the key service is not asked about it for
//!   1 s, then 2 s, 4 s, at most 5 s (`Failures`), unless the key service has answered
//!   anything on the node since.
use crate::config::Config;
use crate::keys::copies::{Copies, CopyId};
use crate::keys::entry::{self, CacheEntry, Verdict};
use crate::keys::known_key::KnownKey;
use crate::keys::record::KeyRecord;
use crate::keys::trust::{Failures, Trust, TrustRules};
use crate::quotas::quota::Quota;
use crate::storage::shared_store::SharedStore;
use crate::storage::slots::Table;
use crate::vocabulary::bucket_spec::BucketSpec;
use crate::vocabulary::key_hash::{hash_key, KeyHash};
use std::rc::Rc;

/// What the cache says about a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cached {
    /// `refresh_due`: in the last part of its trust period (see `TrustRules::found`);
    /// `stored_at_ms`: when the node-wide entry it comes from was stored.
    Hit {
        known: Rc<KnownKey>,
        refresh_due: bool,
        stored_at_ms: u64,
    },
    NegativeHit,
    /// Ask the key service. `stale` is a found record still usable if it fails.
    Miss {
        stale: Option<KeyRecord>,
    },
}

/// What a request's key is, as the cache knows it.
pub struct Looked {
    pub key_hash: KeyHash,
    /// Where this worker keeps (or would keep) its copy.
    pub copy: CopyId,
    pub cached: Cached,
}

/// What to do when a lookup of a key is about to be sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BeforeLookup {
    Ask,
    /// The key's failure pause holds: answer as if the lookup failed, without asking.
    Paused,
    /// A refresh that another worker already made: the entry is fresh again.
    Refreshed {
        known: Rc<KnownKey>,
        stored_at_ms: u64,
    },
}

/// When the key service last answered with a verdict, on this node: it ends every pause.
const ANSWERED_KEY: &str = "apikey_filter/v1/key-service-answered";

pub struct KeyCache {
    table: Table,
    rules: TrustRules,
    /// `cache.ttl_s`, and `changes.ttl_s` when the change feed is on.
    ttl_s: u64,
    feed_ttl_s: Option<u64>,
    /// The configured `rate_limit`, for records that name none.
    default_limit: Option<BucketSpec>,
    /// `rate_limit_service.default_quotas`, for records that name none; `None`: quotas off.
    default_quotas: Option<Rc<[Quota]>>,
    copies: Copies,
}

impl KeyCache {
    pub fn new(config: &Config) -> KeyCache {
        KeyCache {
            table: Table::cache(config.cache.max_entries),
            rules: TrustRules::new(&config.cache),
            ttl_s: config.cache.ttl_s,
            feed_ttl_s: config.key_service.changes.as_ref().map(|c| c.ttl_s),
            default_limit: config.rate_limit,
            default_quotas: config
                .rate_limit_service
                .as_ref()
                .map(|r| r.default_quotas.clone()),
            copies: Copies::new(config.cache.max_entries),
        }
    }

    /// What the node's change feed says now: whether it is healthy (found keys are then
    /// trusted for `changes.ttl_s`), and its epoch (a new one forgets this worker's
    /// copies; the node's older entries are forgotten by being of another epoch).
    pub fn follow_feed(&mut self, healthy: bool, epoch: u32) {
        self.rules.ttl_s = match (healthy, self.feed_ttl_s) {
            (true, Some(feed_ttl_s)) => feed_ttl_s,
            _ => self.ttl_s,
        };
        if epoch != self.rules.epoch {
            self.rules.epoch = epoch;
            self.copies.clear();
        }
    }

    /// What the cache says about `raw_key`, and its hash: this worker's copy if it has a
    /// trusted one, else the node-wide entry (which then leaves a copy here). A hit on a
    /// copy computes no SHA-256.
    pub fn lookup(&mut self, store: &impl SharedStore, raw_key: &[u8], now_ms: u64) -> Looked {
        let copy = self.copies.id_of(raw_key);
        if let Some(held) = self.copies.get(copy) {
            if let Trust::Fresh { refresh_due } = self.rules.found(held.stored_at_ms, now_ms) {
                let cached = Cached::Hit {
                    known: held.known.clone(),
                    refresh_due,
                    stored_at_ms: held.stored_at_ms,
                };
                let key_hash = held.key_hash;
                return Looked {
                    key_hash,
                    copy,
                    cached,
                };
            }
        }
        let key_hash = hash_key(raw_key);
        let cached = match self.entry(store, &key_hash) {
            Some(e) => match (self.rules.judge(&e, now_ms), e.verdict) {
                (Trust::Fresh { refresh_due }, Verdict::Found(record)) => {
                    let known = self.known_key(record);
                    self.copies
                        .put(copy, key_hash, e.stored_at_ms, known.clone());
                    Cached::Hit {
                        known,
                        refresh_due,
                        stored_at_ms: e.stored_at_ms,
                    }
                }
                (trust, verdict) => judged(trust, verdict),
            },
            None => Cached::Miss { stale: None },
        };
        Looked {
            key_hash,
            copy,
            cached,
        }
    }

    /// What the node-wide entry says about `key_hash` (no copy is left: the raw key the
    /// copy would be found by is not at hand).
    pub fn node_wide(&self, store: &impl SharedStore, key_hash: &KeyHash, now_ms: u64) -> Cached {
        match self.entry(store, key_hash) {
            Some(e) => match (self.rules.judge(&e, now_ms), e.verdict) {
                (Trust::Fresh { refresh_due }, Verdict::Found(record)) => Cached::Hit {
                    known: self.known_key(record),
                    refresh_due,
                    stored_at_ms: e.stored_at_ms,
                },
                (trust, verdict) => judged(trust, verdict),
            },
            None => Cached::Miss { stale: None },
        }
    }

    /// Whether a lookup of `key_hash` should go out now. A `refresh` (no request waits
    /// for it) is not needed if another worker already refreshed the entry.
    pub fn before_lookup(
        &self,
        store: &impl SharedStore,
        key_hash: &KeyHash,
        refresh: bool,
        now_ms: u64,
    ) -> BeforeLookup {
        let Some(entry) = self.entry(store, key_hash) else {
            return BeforeLookup::Ask;
        };
        let failures = entry.failures;
        if failures.is_paused(now_ms) && self.answered_since(store, failures.last_failed_ms()) {
            return BeforeLookup::Ask;
        }
        if failures.is_paused(now_ms) {
            return BeforeLookup::Paused;
        }
        match (refresh, self.rules.judge(&entry, now_ms), entry.verdict) {
            (true, Trust::Fresh { refresh_due: false }, Verdict::Found(record)) => {
                BeforeLookup::Refreshed {
                    known: self.known_key(record),
                    stored_at_ms: entry.stored_at_ms,
                }
            }
            _ => BeforeLookup::Ask,
        }
    }

    fn answered_since(&self, store: &impl SharedStore, at_ms: u64) -> bool {
        store
            .get(ANSWERED_KEY)
            .and_then(|(value, _)| value.try_into().ok().map(u64::from_le_bytes))
            .is_some_and(|answered_ms| answered_ms > at_ms)
    }

    /// Puts the key service's verdict in the node-wide cache; it ends the key's failures,
    /// and any pause on the node.
    pub fn store_verdict(
        &self,
        store: &impl SharedStore,
        key_hash: &KeyHash,
        verdict: Verdict,
        now_ms: u64,
    ) {
        self.write(store, &self.new_entry(key_hash, now_ms, verdict), now_ms);
        let _ = store.set(ANSWERED_KEY, &now_ms.to_le_bytes(), None);
    }

    /// Keeps (or replaces) this worker's copy of a found key, found by `copy`.
    pub fn keep_copy(
        &mut self,
        copy: CopyId,
        key_hash: KeyHash,
        stored_at_ms: u64,
        known: Rc<KnownKey>,
    ) {
        self.copies.put(copy, key_hash, stored_at_ms, known);
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
            .filter(|e| e.epoch == self.rules.epoch)
            .unwrap_or_else(|| self.new_entry(key_hash, now_ms, Verdict::Forgotten));
        entry.failures = entry.failures.after_failure(now_ms);
        self.write(store, &entry, now_ms);
        entry.failures
    }

    /// Forgets what the node and this worker know of the keys the change feed listed: each
    /// entry becomes a tombstone, never used again, not even as stale. The tombstone is
    /// written also when the node held nothing, since a lookup of the key may be in
    /// flight: its answer must not be cached (`forgotten_since`). It never displaces a
    /// usable entry of another key. This worker's copies go in one scan whatever the
    /// list's length. How many of the keys the node held.
    pub fn forget_all(
        &mut self,
        store: &impl SharedStore,
        key_hashes: &[KeyHash],
        now_ms: u64,
    ) -> usize {
        self.copies.forget(key_hashes);
        key_hashes
            .iter()
            .filter(|key_hash| self.tombstone(store, key_hash, now_ms))
            .count()
    }

    /// Writes the key's tombstone; whether the node held an entry for it.
    fn tombstone(&self, store: &impl SharedStore, key_hash: &KeyHash, now_ms: u64) -> bool {
        let held = self
            .entry(store, key_hash)
            .is_some_and(|e| e.verdict != Verdict::Forgotten);
        let tombstone = self.new_entry(key_hash, now_ms, Verdict::Forgotten);
        self.write(store, &tombstone, now_ms);
        held
    }

    /// When the node forgot the key, if it did at or after `since_ms` (by the change
    /// feed, or a failed lookup since): an answer asked for before then may be older
    /// than the change, and must not be cached.
    pub fn forgotten_since(
        &self,
        store: &impl SharedStore,
        key_hash: &KeyHash,
        since_ms: u64,
    ) -> Option<u64> {
        self.entry(store, key_hash)
            .filter(|e| e.verdict == Verdict::Forgotten && e.stored_at_ms >= since_ms)
            .map(|e| e.stored_at_ms)
    }

    /// Forgets this worker's copies of the keys (the node's entries are another worker's
    /// to forget).
    pub fn forget_copies(&mut self, key_hashes: &[KeyHash]) {
        self.copies.forget(key_hashes);
    }

    pub fn known_key(&self, record: KeyRecord) -> Rc<KnownKey> {
        Rc::new(KnownKey::new(
            record,
            self.default_limit,
            self.default_quotas.as_ref(),
        ))
    }

    fn new_entry(&self, key_hash: &KeyHash, now_ms: u64, verdict: Verdict) -> CacheEntry {
        CacheEntry {
            epoch: self.rules.epoch,
            ..CacheEntry::new(*key_hash, now_ms, verdict)
        }
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

fn judged(trust: Trust, verdict: Verdict) -> Cached {
    match (trust, verdict) {
        (Trust::Stale, Verdict::Found(record)) => Cached::Miss {
            stale: Some(record),
        },
        (Trust::Negative, _) => Cached::NegativeHit,
        _ => Cached::Miss { stale: None },
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::storage::shared_store::fake::FakeStore;

    /// ttl 60 s, negative ttl 10 s, stale 300 s, no refresh ahead, epoch 0.
    pub(crate) fn rules() -> TrustRules {
        TrustRules {
            ttl_s: 60,
            negative_ttl_s: 10,
            stale_if_error_s: 300,
            refresh_ahead_pct: 0,
            epoch: 0,
        }
    }

    fn record(key_id: &str) -> KeyRecord {
        KeyRecord::for_tests(key_id, "acme")
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
        let mut config = Config::parse(
            br#"{"key_service": {"cluster": "ks", "changes": {"ttl_s": 3600}},
                 "cache": {"refresh_ahead_pct": 0}}"#,
        )
        .unwrap();
        config.cache.max_entries = max_entries;
        config
    }

    fn cached(cache: &mut KeyCache, store: &FakeStore, raw_key: &[u8], now_ms: u64) -> Cached {
        cache.lookup(store, raw_key, now_ms).cached
    }

    fn is_hit(cached: &Cached, key_id: &str) -> bool {
        matches!(cached, Cached::Hit { known, .. } if known.record.key_id == key_id)
    }

    #[test]
    fn a_hit_leaves_a_copy_that_is_trusted_as_the_entry_was() {
        let store = FakeStore::default();
        let mut cache = KeyCache::new(&config(100));
        let key_hash = hash_key(b"key-a");
        cache.store_verdict(&store, &key_hash, Verdict::Found(record("a")), 1_000);
        let looked = cache.lookup(&store, b"key-a", 1_000);
        assert_eq!(looked.key_hash, key_hash);
        assert!(is_hit(&looked.cached, "a"));
        let reads = store.reads.get();
        assert!(is_hit(&cached(&mut cache, &store, b"key-a", 60_999), "a"));
        assert_eq!(store.reads.get(), reads, "the copy, not shared data");
        assert_eq!(
            cached(&mut cache, &store, b"key-a", 61_000),
            Cached::Miss {
                stale: Some(record("a"))
            },
            "past ttl_s neither the copy nor the entry is a hit"
        );
    }

    #[test]
    fn a_healthy_feed_stretches_trust_and_a_dead_one_takes_it_back() {
        let store = FakeStore::default();
        let mut cache = KeyCache::new(&config(100));
        cache.store_verdict(&store, &hash_key(b"key-a"), Verdict::Found(record("a")), 0);
        assert!(
            is_hit(&cached(&mut cache, &store, b"key-a", 0), "a"),
            "a copy"
        );
        cache.follow_feed(true, 0);
        assert!(is_hit(
            &cached(&mut cache, &store, b"key-a", 3_599_999),
            "a"
        ));
        cache.follow_feed(false, 0);
        assert!(!is_hit(&cached(&mut cache, &store, b"key-a", 61_000), "a"));
    }

    #[test]
    fn a_new_epoch_forgets_every_entry_and_copy_at_once() {
        let store = FakeStore::default();
        let mut cache = KeyCache::new(&config(100));
        cache.store_verdict(&store, &hash_key(b"key-a"), Verdict::Found(record("a")), 0);
        cache.store_verdict(&store, &hash_key(b"key-b"), Verdict::NotFound, 0);
        assert!(is_hit(&cached(&mut cache, &store, b"key-a", 0), "a"));
        cache.follow_feed(true, 1);
        assert_eq!(
            cached(&mut cache, &store, b"key-a", 1),
            Cached::Miss { stale: None }
        );
        assert_eq!(
            cached(&mut cache, &store, b"key-b", 1),
            Cached::Miss { stale: None }
        );
        cache.store_verdict(&store, &hash_key(b"key-a"), Verdict::Found(record("a2")), 2);
        assert!(is_hit(&cached(&mut cache, &store, b"key-a", 2), "a2"));
    }

    #[test]
    fn a_refresh_is_due_in_the_last_part_and_skipped_once_another_worker_made_it() {
        let store = FakeStore::default();
        let mut config = config(100);
        config.cache.refresh_ahead_pct = 20;
        let mut cache = KeyCache::new(&config);
        let key_hash = hash_key(b"key-a");
        cache.store_verdict(&store, &key_hash, Verdict::Found(record("a")), 0);
        assert_eq!(
            cached(&mut cache, &store, b"key-a", 47_999),
            Cached::Hit {
                known: cache.known_key(record("a")),
                refresh_due: false,
                stored_at_ms: 0
            }
        );
        assert_eq!(
            cached(&mut cache, &store, b"key-a", 48_000),
            Cached::Hit {
                known: cache.known_key(record("a")),
                refresh_due: true,
                stored_at_ms: 0
            }
        );
        assert_eq!(
            cache.before_lookup(&store, &key_hash, true, 48_000),
            BeforeLookup::Ask
        );
        cache.store_verdict(&store, &key_hash, Verdict::Found(record("a2")), 48_100);
        assert_eq!(
            cache.before_lookup(&store, &key_hash, true, 48_200),
            BeforeLookup::Refreshed {
                known: cache.known_key(record("a2")),
                stored_at_ms: 48_100
            }
        );
        assert_eq!(
            cache.before_lookup(&store, &key_hash, false, 48_200),
            BeforeLookup::Ask,
            "a request's own lookup goes out"
        );
    }

    #[test]
    fn a_paused_key_is_not_asked_for_until_the_pause_ends_or_any_answer_comes() {
        let store = FakeStore::default();
        let cache = KeyCache::new(&config(100));
        let (key, other) = (hash_key(b"key-a"), hash_key(b"key-b"));
        cache.record_failure(&store, &key, 1_000);
        assert_eq!(
            cache.before_lookup(&store, &key, false, 1_001),
            BeforeLookup::Ask,
            "one failure: ask again"
        );
        cache.record_failure(&store, &key, 1_001);
        assert_eq!(
            cache.before_lookup(&store, &key, false, 1_002),
            BeforeLookup::Paused
        );
        assert_eq!(
            cache.before_lookup(&store, &key, false, 2_001),
            BeforeLookup::Ask,
            "1 s later"
        );
        cache.record_failure(&store, &key, 2_001);
        assert_eq!(
            cache.before_lookup(&store, &key, false, 3_000),
            BeforeLookup::Paused,
            "then 2 s"
        );
        cache.store_verdict(&store, &other, Verdict::NotFound, 3_100);
        assert_eq!(
            cache.before_lookup(&store, &key, false, 3_101),
            BeforeLookup::Ask,
            "the key service answered another key: the pause ends"
        );
    }

    #[test]
    fn a_forgotten_key_is_asked_again_and_never_served_stale() {
        let store = FakeStore::default();
        let mut cache = KeyCache::new(&config(100));
        let key_hash = hash_key(b"key-a");
        cache.store_verdict(&store, &key_hash, Verdict::Found(record("a")), 0);
        assert!(is_hit(&cached(&mut cache, &store, b"key-a", 0), "a"));
        assert_eq!(cache.forget_all(&store, &[key_hash], 10), 1);
        assert_eq!(
            cache.forget_all(&store, &[key_hash], 11),
            0,
            "forgotten already"
        );
        assert_eq!(
            cached(&mut cache, &store, b"key-a", 20),
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
    fn forgetting_a_key_the_node_never_saw_leaves_a_tombstone_for_a_lookup_in_flight() {
        let store = FakeStore::default();
        let mut cache = KeyCache::new(&config(100));
        let key_hash = hash_key(b"never");
        assert_eq!(
            cache.forget_all(&store, &[key_hash], 50),
            0,
            "it held nothing"
        );
        assert_eq!(cache.forgotten_since(&store, &key_hash, 40), Some(50));
        assert_eq!(cache.forgotten_since(&store, &key_hash, 51), None);
        cache.store_verdict(&store, &key_hash, Verdict::NotFound, 60);
        assert_eq!(cache.forgotten_since(&store, &key_hash, 40), None);
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
