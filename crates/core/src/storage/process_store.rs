//! Shared data for a host without proxy-wasm's (the dynamic module): the same
//! compare-and-swap rules (`SharedStore`), kept in the process and shared by every worker
//! thread, in shards so that threads writing different keys seldom wait for each other.
use super::shared_store::{SetError, SharedStore};
use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};
use std::sync::Mutex;

const SHARDS: usize = 16;

/// FNV-1a. The keys are the filter's own (slots of fixed tables: `storage::slots`), so
/// nobody can choose them to collide, and SipHash's defence against that would cost more
/// than the lookup it protects.
struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.0 = (self.0 ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3);
        }
    }
}

type FnvBuild = BuildHasherDefault<Fnv>;

/// A key's value and its CAS (never 0: proxy-wasm's "no CAS").
type Shard = HashMap<String, (Vec<u8>, u32), FnvBuild>;

pub struct ProcessStore {
    shards: [Mutex<Shard>; SHARDS],
}

impl Default for ProcessStore {
    fn default() -> Self {
        ProcessStore {
            shards: std::array::from_fn(|_| Mutex::default()),
        }
    }
}

impl ProcessStore {
    #[allow(clippy::indexing_slicing)] // the index is taken modulo the array's length
    fn shard(&self, key: &str) -> std::sync::MutexGuard<'_, Shard> {
        // The high bits: the map in the shard uses the low ones.
        let index = (FnvBuild::default().hash_one(key) >> 32) as usize % SHARDS;
        // A thread that panicked holding a shard left whole values behind (each write
        // is one insert): the data stays usable.
        self.shards[index]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl SharedStore for ProcessStore {
    fn get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        self.shard(key).get(key).cloned()
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), SetError> {
        let mut shard = self.shard(key);
        match shard.get_mut(key) {
            Some((_, current)) if cas.is_some_and(|cas| cas != 0 && cas != *current) => {
                Err(SetError::CasMismatch)
            }
            Some((stored, current)) => {
                stored.clear();
                stored.extend_from_slice(value);
                *current = current.checked_add(1).unwrap_or(1);
                Ok(())
            }
            None => {
                shard.insert(key.to_string(), (value.to_vec(), 1));
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn follows_envoys_compare_and_swap_rules() {
        let store = ProcessStore::default();
        assert_eq!(store.get("k"), None);
        // A key that does not exist is inserted whatever the CAS.
        store.set("k", b"a", Some(7)).unwrap();
        let (value, cas) = store.get("k").unwrap();
        assert_eq!((value.as_slice(), cas != 0), (b"a".as_slice(), true));
        assert_eq!(
            store.set("k", b"b", Some(cas + 1)),
            Err(SetError::CasMismatch)
        );
        store.set("k", b"b", Some(cas)).unwrap();
        assert_eq!(store.set("k", b"c", Some(cas)), Err(SetError::CasMismatch));
        // No CAS writes unconditionally.
        store.set("k", b"d", None).unwrap();
        assert_eq!(store.get("k").unwrap().0, b"d");
    }

    #[test]
    fn threads_counting_with_compare_and_swap_lose_no_update() {
        let store = Arc::new(ProcessStore::default());
        store.set("n", &0u64.to_le_bytes(), None).unwrap();
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let store = store.clone();
                std::thread::spawn(move || {
                    for _ in 0..1_000 {
                        loop {
                            let (value, cas) = store.get("n").unwrap();
                            let n = u64::from_le_bytes(value.try_into().unwrap()) + 1;
                            if store.set("n", &n.to_le_bytes(), Some(cas)).is_ok() {
                                break;
                            }
                        }
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        let (value, _) = store.get("n").unwrap();
        assert_eq!(u64::from_le_bytes(value.try_into().unwrap()), 4_000);
    }
}
