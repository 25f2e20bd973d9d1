//! Lookups served from memory: a cold start or a `410` makes every node ask for every key
//! in use at once, and the records rarely change. The cache is kept coherent by the change
//! log itself: a write in this process forgets the key at once, and `follow` reads the log
//! for changes made through any process on the same database.
//!
//! A lookup that read the database while a change was being forgotten does not keep what
//! it read (the `generation` moved): it may predate the change. And the cache is only
//! used while this process keeps telling the database how far it has read the log
//! (`reported`): the feed lists a change only once every live process has forgotten it,
//! and a process that cannot tell is soon not counted as live, so it must not answer from
//! memory either.
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

/// How long after its last report a process answers from memory: well inside
/// `store::PROCESS_LIVE_MS`, after which the feed stops waiting for it.
pub const TRUSTED_FOR: Duration = Duration::from_millis(2_000);

/// Entries kept at most; past it the cache starts again empty (bounded memory).
pub const MAX_ENTRIES: usize = 500_000;

/// A record as the filter gets it (None: no such key).
pub type Answer = Option<Arc<str>>;

#[derive(Default)]
pub struct LookupCache {
    entries: RwLock<HashMap<String, Answer>>,
    generation: AtomicU64,
    reported: Mutex<Option<Instant>>,
}

impl LookupCache {
    /// This process told the database how far it has read the change log.
    pub fn reported(&self) {
        if let Ok(mut at) = self.reported.lock() {
            *at = Some(Instant::now());
        }
    }

    fn trusted(&self) -> bool {
        self.reported
            .lock()
            .ok()
            .and_then(|at| *at)
            .is_some_and(|at| at.elapsed() < TRUSTED_FOR)
    }

    pub fn get(&self, key_hash: &str) -> Option<Answer> {
        if !self.trusted() {
            return None;
        }
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
        if self.generation.load(Ordering::Acquire) != generation || !self.trusted() {
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
        cache.reported();
        let before = cache.generation();
        cache.forget(["h1"]);
        cache.keep("h1", Some("old".into()), before);
        assert_eq!(cache.get("h1"), None, "it may predate the change");
        cache.keep("h1", Some("new".into()), cache.generation());
        assert_eq!(cache.get("h1"), Some(Some("new".into())));
        cache.forget(["h1"]);
        assert_eq!(cache.get("h1"), None);
    }

    #[test]
    fn a_process_that_has_not_reported_lately_answers_from_the_database() {
        let cache = LookupCache::default();
        cache.keep("h1", None, cache.generation());
        assert_eq!(cache.len(), 0, "never reported: nothing kept");
        cache.reported();
        cache.keep("h1", None, cache.generation());
        assert_eq!(cache.get("h1"), Some(None));
        *cache.reported.lock().unwrap() = Some(Instant::now() - TRUSTED_FOR);
        assert_eq!(cache.get("h1"), None, "not reported for too long: not used");
    }
}
