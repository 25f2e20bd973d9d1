//! Each worker's own copies of the found keys it has served, in front of the node-wide
//! cache in shared data.
//!
//! Reading shared data copies the entry across the host boundary and decodes it: the
//! dearest part of a cached request. A copy remembers when the node-wide entry it came
//! from was stored, and `keys::cache` trusts it exactly as it would trust that entry, so
//! no answer is older than the node-wide rules allow. (A copy may outlive its node-wide
//! entry when another key takes that slot; never past the trust period.) Unknown keys are
//! never copied: a flood of random keys cannot push out the keys that are in use.
//!
//! Copies are found by a `CopyId` of the raw key rather than its SHA-256, which was a
//! third of a cached request's own code: a hit needs no SHA-256 at all.
use crate::keys::known_key::KnownKey;
use crate::vocabulary::key_hash::KeyHash;
use std::collections::HashSet;
use std::hash::{BuildHasher, RandomState};
use std::rc::Rc;

/// At most this many copies per worker, however large `cache.max_entries` is.
pub const MAX_CAPACITY: u32 = 8192;
/// Records with more text than this (restrictions counted at their size in memory) are
/// not copied (they are read from the node-wide cache each time), so a worker's copies
/// stay within a few MiB whatever the key service sends: a record may hold up to 64
/// scopes of 256 bytes, and 64 addresses and 64 referrer patterns.
pub const MAX_COPIED_TEXT_BYTES: usize = 1024;

/// A raw key as this worker's copies know it: 128 bits of SipHash under a secret drawn
/// when the copies are made. Without the secret nobody can make two keys share an id, and
/// by chance two keys share one with odds of 2^-128. It says no more about the key than
/// the SHA-256 that shared data already holds.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct CopyId([u64; 2]);

pub struct Copy {
    id: CopyId,
    pub key_hash: KeyHash,
    /// When the node-wide entry it was copied from was stored.
    pub stored_at_ms: u64,
    pub known: Rc<KnownKey>,
}

/// A key has two places, one from each half of its id: a copy goes to the one that holds
/// the key already, else to an empty one, else it takes the first from whoever held it.
/// With one place each, two busy keys that shared it would take it from each other on
/// every request and read shared data each time; with two, that needs three keys sharing.
pub struct Copies {
    places: Vec<Option<Box<Copy>>>,
    secret: RandomState,
}

impl Copies {
    /// Room for `min(max_entries, MAX_CAPACITY)` copies.
    pub fn new(max_entries: u32) -> Copies {
        let capacity = max_entries.clamp(1, MAX_CAPACITY) as usize;
        Copies {
            places: (0..capacity).map(|_| None).collect(),
            secret: RandomState::new(),
        }
    }

    pub fn id_of(&self, raw_key: &[u8]) -> CopyId {
        CopyId([1u8, 2].map(|half| self.secret.hash_one((half, raw_key))))
    }

    /// The key's copy, if this worker has one.
    pub fn get(&self, id: CopyId) -> Option<&Copy> {
        self.places_of(id)
            .into_iter()
            .find_map(|place| self.copy_at(place).filter(|copy| copy.id == id))
    }

    /// Keeps a copy of a found entry the node-wide cache holds as stored at `stored_at_ms`.
    pub fn put(&mut self, id: CopyId, key_hash: KeyHash, stored_at_ms: u64, known: Rc<KnownKey>) {
        let record = &known.record;
        let restrictions = 32 * record.allowed_cidrs.len()
            + record
                .allowed_referrers
                .iter()
                .map(|p| 64 + p.host.len())
                .sum::<usize>();
        let text =
            record.key_id.len() + record.owner.len() + 2 * known.scopes_header.len() + restrictions;
        if text > MAX_COPIED_TEXT_BYTES {
            return;
        }
        let places = self.places_of(id);
        let holds_it = |place: &usize| self.copy_at(*place).is_some_and(|copy| copy.id == id);
        let is_free = |place: &usize| self.places.get(*place).is_some_and(Option::is_none);
        let place = (places.into_iter().find(holds_it))
            .or_else(|| places.into_iter().find(is_free))
            .unwrap_or(places[0]);
        if let Some(slot) = self.places.get_mut(place) {
            *slot = Some(Box::new(Copy {
                id,
                key_hash,
                stored_at_ms,
                known,
            }));
        }
    }

    /// Drops the copies of `key_hashes` (found by hash, not by raw key: one scan of every
    /// place for the whole list, off the request path, as the change feed's work is).
    pub fn forget(&mut self, key_hashes: &[KeyHash]) {
        match key_hashes {
            [] => {}
            [one] => self.drop_where(|key_hash| key_hash == one),
            many => {
                let listed: HashSet<&KeyHash> = many.iter().collect();
                self.drop_where(|key_hash| listed.contains(key_hash));
            }
        }
    }

    fn drop_where(&mut self, listed: impl Fn(&KeyHash) -> bool) {
        for place in &mut self.places {
            if place.as_ref().is_some_and(|copy| listed(&copy.key_hash)) {
                *place = None;
            }
        }
    }

    /// Drops every copy (the feed's 410: the node forgot everything).
    pub fn clear(&mut self) {
        self.places.iter_mut().for_each(|place| *place = None);
    }

    fn copy_at(&self, place: usize) -> Option<&Copy> {
        self.places.get(place)?.as_deref()
    }

    fn places_of(&self, id: CopyId) -> [usize; 2] {
        let places = self.places.len().max(1) as u64;
        id.0.map(|half| (half % places) as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::record::KeyRecord;
    use crate::vocabulary::key_hash::hash_key;

    fn known(key_id: &str) -> Rc<KnownKey> {
        let record = KeyRecord {
            scopes: vec!["read".into()],
            ..KeyRecord::for_tests(key_id, "team")
        };
        Rc::new(KnownKey::new(record, None, None))
    }

    fn put(copies: &mut Copies, raw_key: &str, stored_at_ms: u64, known: Rc<KnownKey>) {
        let id = copies.id_of(raw_key.as_bytes());
        copies.put(id, hash_key(raw_key.as_bytes()), stored_at_ms, known);
    }

    fn get(copies: &Copies, raw_key: &str) -> Option<(u64, Rc<KnownKey>)> {
        let copy = copies.get(copies.id_of(raw_key.as_bytes()))?;
        assert_eq!(copy.key_hash, hash_key(raw_key.as_bytes()));
        Some((copy.stored_at_ms, copy.known.clone()))
    }

    #[test]
    fn a_key_never_gets_another_keys_copy() {
        let mut copies = Copies::new(1);
        put(&mut copies, "key-a", 0, known("a"));
        assert_eq!(get(&copies, "key-b"), None);
        put(&mut copies, "key-b", 0, known("b"));
        assert_eq!(get(&copies, "key-b"), Some((0, known("b"))));
        assert_eq!(get(&copies, "key-a"), None, "its place was taken");
    }

    #[test]
    fn two_keys_that_share_a_place_both_keep_their_copies() {
        let mut copies = Copies::new(16);
        let places = |copies: &Copies, key: &str| copies.places_of(copies.id_of(key.as_bytes()));
        let a = "key-a";
        let [a_first, a_second] = places(&copies, a);
        let b = (0..10_000)
            .map(|i| format!("key-{i}"))
            .find(|b| {
                let [b_first, b_second] = places(&copies, b);
                b_first == a_first && b_second != a_second && b_second != a_first
            })
            .expect("a key sharing key-a's first place");
        put(&mut copies, a, 0, known("a"));
        put(&mut copies, &b, 0, known("b"));
        put(&mut copies, a, 60_000, known("a2"));
        assert_eq!(get(&copies, a), Some((60_000, known("a2"))));
        assert_eq!(get(&copies, &b), Some((0, known("b"))));
        assert_eq!(copies.places.iter().flatten().count(), 2, "one copy each");
    }

    #[test]
    fn ids_are_the_same_for_a_key_and_secret_to_each_worker() {
        let (copies, other) = (Copies::new(1), Copies::new(1));
        assert_eq!(copies.id_of(b"key-a"), copies.id_of(b"key-a"));
        assert_ne!(copies.id_of(b"key-a"), copies.id_of(b"key-b"));
        assert_ne!(copies.id_of(b"key-a"), other.id_of(b"key-a"));
        let CopyId([low, high]) = copies.id_of(b"key-a");
        assert_ne!(low, high, "two independent halves");
    }

    #[test]
    fn a_refreshed_entry_replaces_the_copy() {
        let mut copies = Copies::new(100);
        put(&mut copies, "key-a", 0, known("a"));
        put(&mut copies, "key-a", 60_000, known("a2"));
        assert_eq!(get(&copies, "key-a"), Some((60_000, known("a2"))));
    }

    #[test]
    fn a_forgotten_key_loses_its_copy_and_no_other() {
        let mut copies = Copies::new(100);
        put(&mut copies, "key-a", 0, known("a"));
        put(&mut copies, "key-b", 0, known("b"));
        copies.forget(&[hash_key(b"key-a")]);
        assert_eq!(get(&copies, "key-a"), None);
        assert_eq!(get(&copies, "key-b"), Some((0, known("b"))));
    }

    #[test]
    fn a_feed_list_of_many_keys_drops_each_copy_and_keeps_the_others() {
        // Room enough that no two of the ten keys share both their places.
        let mut copies = Copies::new(MAX_CAPACITY);
        for i in 0..10 {
            put(&mut copies, &format!("key-{i}"), 0, known(&format!("k{i}")));
        }
        let listed: Vec<KeyHash> = (0..10)
            .filter(|i| i % 2 == 0)
            .map(|i| hash_key(format!("key-{i}").as_bytes()))
            .collect();
        copies.forget(&listed);
        for i in 0..10 {
            let kept = get(&copies, &format!("key-{i}")).is_some();
            assert_eq!(kept, i % 2 == 1, "key-{i}");
        }
        copies.forget(&[]);
        assert!(get(&copies, "key-1").is_some());
    }

    #[test]
    fn records_with_much_text_are_not_copied() {
        let mut copies = Copies::new(100);
        let mut big = known("big").record.clone();
        big.scopes = (0..10).map(|i| format!("{i}").repeat(100)).collect();
        put(
            &mut copies,
            "key-a",
            0,
            Rc::new(KnownKey::new(big, None, None)),
        );
        assert_eq!(get(&copies, "key-a"), None);
    }

    #[test]
    fn room_is_bounded() {
        assert_eq!(Copies::new(0).places.len(), 1);
        assert_eq!(Copies::new(10).places.len(), 10);
        assert_eq!(Copies::new(1_000_000).places.len(), MAX_CAPACITY as usize);
    }
}
