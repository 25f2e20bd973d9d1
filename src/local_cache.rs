//! Each worker's own copy of the found keys it has served, in front of the node-wide
//! cache in shared data.
//!
//! Reading shared data copies the entry across the host boundary and decodes it: the
//! dearest part of a cached request. A copy here is used only while the node-wide entry
//! it came from would itself be a hit (younger than `ttl_s`), so no answer is older than
//! `ttl_s` and a revocation is still seen within `ttl_s`. (A copy may outlive its
//! node-wide entry when another key takes that slot; never past `ttl_s`.) Unknown keys
//! are never copied: a flood of random keys cannot push out the keys that are in use.
//!
//! Copies are found by a `CopyId` of the raw key rather than its SHA-256, which was a
//! third of a cached request's own code: a hit needs no SHA-256 at all.
use crate::bucket::ratelimit_policy;
use crate::cache_entry::is_within;
use crate::config::BucketSpec;
use crate::key_hash::KeyHash;
use crate::rate_limit;
use crate::record::{KeyRecord, RecordLimit};
use std::hash::{BuildHasher, RandomState};
use std::rc::Rc;

/// At most this many copies per worker, however large `cache.max_entries` is.
pub const MAX_CAPACITY: u32 = 8192;
/// Records with more text than this are not copied (they are read from the node-wide
/// cache each time), so a worker's copies stay within a few MiB whatever the key service
/// sends: a record may hold up to 64 scopes of 256 bytes.
pub const MAX_COPIED_TEXT_BYTES: usize = 1024;

/// A found key with what each of its requests needs worked out once.
#[derive(Debug, PartialEq, Eq)]
pub struct KnownKey {
    pub record: KeyRecord,
    /// `record.scopes` as the scopes header carries them.
    pub scopes_header: String,
    /// The token bucket its requests take from; none when the key is unlimited.
    pub limit: Option<KeyLimit>,
}

#[derive(Debug, PartialEq, Eq)]
pub struct KeyLimit {
    pub spec: BucketSpec,
    /// Whose bucket it is (`rate_limit::owner_id` of the `key_id`).
    pub owner: u64,
    /// The `RateLimit-Policy` field of every response.
    pub policy_header: Rc<str>,
}

impl KnownKey {
    /// `configured`: the `rate_limit` of the configuration, for records that name none.
    pub fn new(record: KeyRecord, configured: Option<BucketSpec>) -> KnownKey {
        let spec = match record.rate_limit {
            RecordLimit::Default => configured,
            RecordLimit::Unlimited => None,
            RecordLimit::Bucket(spec) => Some(spec),
        };
        KnownKey {
            scopes_header: record.scopes.join(","),
            limit: spec.map(|spec| KeyLimit {
                spec,
                owner: rate_limit::owner_id(&record.key_id),
                policy_header: ratelimit_policy(spec).into(),
            }),
            record,
        }
    }
}

/// A raw key as this worker's copies know it: 128 bits of SipHash under a secret drawn
/// when the cache is made. Without the secret nobody can make two keys share an id, and
/// by chance two keys share one with odds of 2^-128. It says no more about the key than
/// the SHA-256 that shared data already holds.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct CopyId([u64; 2]);

struct Copy {
    id: CopyId,
    key_hash: KeyHash,
    stored_at_ms: u64,
    known: Rc<KnownKey>,
}

/// Direct-mapped: a key has one place, and a newer copy takes it from whoever held it.
pub struct LocalCache {
    places: Vec<Option<Box<Copy>>>,
    secret: RandomState,
}

impl LocalCache {
    /// Room for `min(max_entries, MAX_CAPACITY)` copies.
    pub fn new(max_entries: u32) -> LocalCache {
        let capacity = max_entries.clamp(1, MAX_CAPACITY) as usize;
        LocalCache {
            places: (0..capacity).map(|_| None).collect(),
            secret: RandomState::new(),
        }
    }

    pub fn id_of(&self, raw_key: &[u8]) -> CopyId {
        CopyId([1u8, 2].map(|half| self.secret.hash_one((half, raw_key))))
    }

    /// The key's hash and copy, if the node-wide entry it was stored as (at
    /// `stored_at_ms`) is still within `ttl_s`.
    pub fn get(&self, id: CopyId, now_ms: u64, ttl_s: u64) -> Option<(KeyHash, Rc<KnownKey>)> {
        let copy = self.places.get(self.place_of(id))?.as_ref()?;
        (copy.id == id && is_within(copy.stored_at_ms, now_ms, ttl_s))
            .then(|| (copy.key_hash, copy.known.clone()))
    }

    /// Keeps a copy of a found entry the node-wide cache holds as stored at `stored_at_ms`.
    pub fn put(&mut self, id: CopyId, key_hash: KeyHash, stored_at_ms: u64, known: Rc<KnownKey>) {
        let record = &known.record;
        let text = record.key_id.len() + record.owner.len() + 2 * known.scopes_header.len();
        if text > MAX_COPIED_TEXT_BYTES {
            return;
        }
        let place = self.place_of(id);
        if let Some(slot) = self.places.get_mut(place) {
            *slot = Some(Box::new(Copy {
                id,
                key_hash,
                stored_at_ms,
                known,
            }));
        }
    }

    fn place_of(&self, id: CopyId) -> usize {
        (id.0[0] % self.places.len().max(1) as u64) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key_hash::hash_key;
    use crate::record::RecordLimit;

    const CONFIGURED: BucketSpec = BucketSpec {
        requests: 10,
        period_s: 60,
        burst: 20,
    };

    fn record(key_id: &str, rate_limit: RecordLimit) -> KeyRecord {
        KeyRecord {
            key_id: key_id.into(),
            owner: "team".into(),
            scopes: vec!["read".into(), "write".into()],
            rate_limit,
            expires_at: None,
            revoked: false,
        }
    }

    fn known(key_id: &str) -> Rc<KnownKey> {
        Rc::new(KnownKey::new(
            record(key_id, RecordLimit::Default),
            Some(CONFIGURED),
        ))
    }

    fn put(cache: &mut LocalCache, raw_key: &str, stored_at_ms: u64, known: Rc<KnownKey>) {
        let id = cache.id_of(raw_key.as_bytes());
        cache.put(id, hash_key(raw_key.as_bytes()), stored_at_ms, known);
    }

    fn get(cache: &LocalCache, raw_key: &str, now_ms: u64, ttl_s: u64) -> Option<Rc<KnownKey>> {
        let (key_hash, known) = cache.get(cache.id_of(raw_key.as_bytes()), now_ms, ttl_s)?;
        assert_eq!(key_hash, hash_key(raw_key.as_bytes()));
        Some(known)
    }

    #[test]
    fn works_out_what_requests_need_once() {
        let k = known("id-1");
        assert_eq!(k.scopes_header, "read,write");
        assert_eq!(
            k.limit,
            Some(KeyLimit {
                spec: CONFIGURED,
                owner: rate_limit::owner_id("id-1"),
                policy_header: "\"apikey\";q=10;w=60".into(),
            })
        );
    }

    #[test]
    fn the_records_own_limit_wins_over_the_configured_one() {
        let own = BucketSpec {
            requests: 1,
            period_s: 1,
            burst: 1,
        };
        let limit =
            |rate_limit, configured| KnownKey::new(record("k", rate_limit), configured).limit;
        assert_eq!(
            limit(RecordLimit::Bucket(own), Some(CONFIGURED)).map(|l| l.spec),
            Some(own)
        );
        assert_eq!(limit(RecordLimit::Unlimited, Some(CONFIGURED)), None);
        assert_eq!(limit(RecordLimit::Default, None), None);
    }

    #[test]
    fn a_copy_lives_exactly_as_long_as_the_node_wide_hit() {
        let mut cache = LocalCache::new(100);
        put(&mut cache, "key-a", 1_000, known("a"));
        assert_eq!(get(&cache, "key-a", 1_000, 60), Some(known("a")));
        assert_eq!(get(&cache, "key-a", 60_999, 60), Some(known("a")));
        assert_eq!(get(&cache, "key-a", 61_000, 60), None);
        assert_eq!(get(&cache, "key-a", 1_000, 0), None, "ttl 0 caches nothing");
    }

    #[test]
    fn a_key_never_gets_another_keys_copy() {
        let mut cache = LocalCache::new(1);
        put(&mut cache, "key-a", 0, known("a"));
        assert_eq!(get(&cache, "key-b", 0, 60), None);
        put(&mut cache, "key-b", 0, known("b"));
        assert_eq!(get(&cache, "key-b", 0, 60), Some(known("b")));
        assert_eq!(get(&cache, "key-a", 0, 60), None, "its place was taken");
    }

    #[test]
    fn ids_are_the_same_for_a_key_and_secret_to_each_cache() {
        let (cache, other) = (LocalCache::new(1), LocalCache::new(1));
        assert_eq!(cache.id_of(b"key-a"), cache.id_of(b"key-a"));
        assert_ne!(cache.id_of(b"key-a"), cache.id_of(b"key-b"));
        assert_ne!(cache.id_of(b"key-a"), other.id_of(b"key-a"));
        let CopyId([low, high]) = cache.id_of(b"key-a");
        assert_ne!(low, high, "two independent halves");
    }

    #[test]
    fn a_refreshed_entry_replaces_the_copy() {
        let mut cache = LocalCache::new(100);
        put(&mut cache, "key-a", 0, known("a"));
        put(&mut cache, "key-a", 60_000, known("a2"));
        assert_eq!(get(&cache, "key-a", 100_000, 60), Some(known("a2")));
    }

    #[test]
    fn records_with_much_text_are_not_copied() {
        let mut cache = LocalCache::new(100);
        let mut big = record("big", RecordLimit::Default);
        big.scopes = (0..10).map(|i| format!("{i}").repeat(100)).collect();
        put(&mut cache, "key-a", 0, Rc::new(KnownKey::new(big, None)));
        assert_eq!(get(&cache, "key-a", 0, 60), None);
    }

    #[test]
    fn room_is_bounded() {
        assert_eq!(LocalCache::new(0).places.len(), 1);
        assert_eq!(LocalCache::new(10).places.len(), 10);
        assert_eq!(
            LocalCache::new(1_000_000).places.len(),
            MAX_CAPACITY as usize
        );
    }
}
