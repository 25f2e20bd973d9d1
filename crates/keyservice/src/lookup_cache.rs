//! Lookups served from memory: a cold start or a `410` makes every node ask for every key
//! in use at once, and the records rarely change. The cache is kept coherent by the change
//! log itself: a write in this process forgets the key at once, and `follow` reads the log
//! for changes made through any process on the same database.
//!
//! A lookup that read the database while a change was being forgotten does not keep what
//! it read (the `generation` moved): it may predate the change.
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

/// Entries kept at most; past it the cache starts again empty (bounded memory).
pub const MAX_ENTRIES: usize = 500_000;

/// A record as the filter gets it (None: no such key).
pub type Answer = Option<Arc<str>>;

#[derive(Default)]
pub struct LookupCache {
    entries: RwLock<HashMap<String, Answer>>,
    generation: AtomicU64,
}

impl LookupCache {
    pub fn get(&self, key_hash: &str) -> Option<Answer> {
        self.entries.read().ok()?.get(key_hash).cloned()
    }

    /// Where the cache stands, before reading the database for a miss.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Keeps what a miss read, unless something was forgotten since `generation`.
    pub fn keep(&self, key_hash: &str, answer: Answer, generation: u64) {
        let Ok(mut entries) = self.entries.write() else {
            return;
        };
        if self.generation.load(Ordering::Acquire) != generation {
            return;
        }
        if entries.len() >= MAX_ENTRIES {
            entries.clear();
        }
        entries.insert(key_hash.to_string(), answer);
    }

    pub fn forget<'a>(&self, key_hashes: impl IntoIterator<Item = &'a str>) {
        if let Ok(mut entries) = self.entries.write() {
            self.generation.fetch_add(1, Ordering::AcqRel);
            for key_hash in key_hashes {
                entries.remove(key_hash);
            }
        }
    }

    pub fn forget_all(&self) {
        if let Ok(mut entries) = self.entries.write() {
            self.generation.fetch_add(1, Ordering::AcqRel);
            entries.clear();
        }
    }

    pub fn len(&self) -> usize {
        self.entries.read().map_or(0, |e| e.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_miss_read_before_a_change_is_not_kept() {
        let cache = LookupCache::default();
        let before = cache.generation();
        cache.forget(["h1"]);
        cache.keep("h1", Some("old".into()), before);
        assert_eq!(cache.get("h1"), None, "it may predate the change");
        cache.keep("h1", Some("new".into()), cache.generation());
        assert_eq!(cache.get("h1"), Some(Some("new".into())));
        cache.forget(["h1"]);
        assert_eq!(cache.get("h1"), None);
    }
}
