//! One slot of the node-wide key cache: a compact binary value (no JSON on the hot
//! path) and the rules for when it may be trusted.
use crate::config::{BucketSpec, CacheConfig};
use crate::key_hash::KeyHash;
use crate::record::{KeyRecord, RecordLimit};

/// Bumped whenever the layout changes; older entries then read as misses.
const FORMAT_VERSION: u8 = 1;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Found(KeyRecord),
    NotFound,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheEntry {
    /// The whole hash: slots are shared by many keys, so an entry says whose it is.
    pub key_hash: KeyHash,
    pub stored_at_ms: u64,
    pub verdict: Verdict,
}

/// What the cache says about a key right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    Hit(KeyRecord),
    NegativeHit,
    /// Ask the key service. `stale` is a found record still usable if it fails.
    Miss {
        stale: Option<KeyRecord>,
    },
}

pub fn lookup(slot: Option<&[u8]>, key_hash: &KeyHash, now_ms: u64, cache: &CacheConfig) -> Lookup {
    let Some(entry) = slot.and_then(decode).filter(|e| &e.key_hash == key_hash) else {
        return Lookup::Miss { stale: None };
    };
    let age_ms = now_ms.saturating_sub(entry.stored_at_ms);
    let within = |seconds: u64| age_ms < seconds.saturating_mul(1000);
    match entry.verdict {
        Verdict::Found(record) if within(cache.ttl_s) => Lookup::Hit(record),
        Verdict::Found(record) if within(cache.ttl_s.saturating_add(cache.stale_if_error_s)) => {
            Lookup::Miss {
                stale: Some(record),
            }
        }
        Verdict::NotFound if within(cache.negative_ttl_s) => Lookup::NegativeHit,
        _ => Lookup::Miss { stale: None },
    }
}

pub fn encode(entry: &CacheEntry) -> Vec<u8> {
    let mut out = Vec::with_capacity(96);
    out.push(FORMAT_VERSION);
    out.extend_from_slice(&entry.key_hash);
    out.extend_from_slice(&entry.stored_at_ms.to_le_bytes());
    match &entry.verdict {
        Verdict::NotFound => out.push(0),
        Verdict::Found(record) => {
            out.push(1);
            out.push(u8::from(record.revoked));
            match record.expires_at {
                None => out.push(0),
                Some(at) => {
                    out.push(1);
                    out.extend_from_slice(&at.to_le_bytes());
                }
            }
            match record.rate_limit {
                RecordLimit::Default => out.push(0),
                RecordLimit::Unlimited => out.push(1),
                RecordLimit::Bucket(b) => {
                    out.push(2);
                    for n in [b.requests, b.period_s, b.burst] {
                        out.extend_from_slice(&n.to_le_bytes());
                    }
                }
            }
            put_str(&mut out, &record.key_id);
            put_str(&mut out, &record.owner);
            out.push(record.scopes.len().min(255) as u8);
            for scope in record.scopes.iter().take(255) {
                put_str(&mut out, scope);
            }
        }
    }
    out
}

/// `None` for anything that is not a well-formed entry of this format version: an
/// emptied slot, an older layout, or corruption all simply read as a miss.
pub fn decode(bytes: &[u8]) -> Option<CacheEntry> {
    let mut r = Reader(bytes);
    if r.u8()? != FORMAT_VERSION {
        return None;
    }
    let key_hash: KeyHash = r.take(32)?.try_into().ok()?;
    let stored_at_ms = r.u64()?;
    let verdict = match r.u8()? {
        0 => Verdict::NotFound,
        1 => {
            let revoked = r.u8()? != 0;
            let expires_at = match r.u8()? {
                0 => None,
                _ => Some(r.u64()? as i64),
            };
            let rate_limit = match r.u8()? {
                0 => RecordLimit::Default,
                1 => RecordLimit::Unlimited,
                _ => RecordLimit::Bucket(BucketSpec {
                    requests: r.u32()?,
                    period_s: r.u32()?,
                    burst: r.u32()?,
                }),
            };
            let key_id = r.str()?;
            let owner = r.str()?;
            let scopes = (0..r.u8()?).map(|_| r.str()).collect::<Option<Vec<_>>>()?;
            Verdict::Found(KeyRecord {
                key_id,
                owner,
                scopes,
                rate_limit,
                expires_at,
                revoked,
            })
        }
        _ => return None,
    };
    r.0.is_empty().then_some(CacheEntry {
        key_hash,
        stored_at_ms,
        verdict,
    })
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    let bytes = s.as_bytes();
    let len = bytes.len().min(u16::MAX as usize);
    out.extend_from_slice(&(len as u16).to_le_bytes());
    out.extend_from_slice(bytes.get(..len).unwrap_or_default());
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1)?.first().copied()
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    fn str(&mut self) -> Option<String> {
        let len = u16::from_le_bytes(self.take(2)?.try_into().ok()?);
        String::from_utf8(self.take(len as usize)?.to_vec()).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn record() -> KeyRecord {
        KeyRecord {
            key_id: "k_1".into(),
            owner: "acme".into(),
            scopes: vec!["a".into(), "b:c".into()],
            rate_limit: RecordLimit::Bucket(BucketSpec {
                requests: 10,
                period_s: 1,
                burst: 20,
            }),
            expires_at: Some(-5),
            revoked: true,
        }
    }

    fn cfg() -> CacheConfig {
        CacheConfig {
            ttl_s: 60,
            negative_ttl_s: 10,
            stale_if_error_s: 300,
            max_entries: 100,
        }
    }

    fn stored(verdict: Verdict) -> Vec<u8> {
        encode(&CacheEntry {
            key_hash: [7; 32],
            stored_at_ms: 1_000_000,
            verdict,
        })
    }

    #[test]
    fn round_trips() {
        for verdict in [
            Verdict::NotFound,
            Verdict::Found(record()),
            Verdict::Found(KeyRecord {
                rate_limit: RecordLimit::Unlimited,
                expires_at: None,
                ..record()
            }),
            Verdict::Found(KeyRecord {
                rate_limit: RecordLimit::Default,
                scopes: vec![],
                ..record()
            }),
        ] {
            let entry = CacheEntry {
                key_hash: [3; 32],
                stored_at_ms: 42,
                verdict,
            };
            assert_eq!(decode(&encode(&entry)), Some(entry));
        }
    }

    #[test]
    fn found_is_fresh_then_stale_then_gone() {
        let slot = stored(Verdict::Found(record()));
        let at = |s: u64| lookup(Some(&slot), &[7; 32], 1_000_000 + s * 1000, &cfg());
        assert_eq!(at(59), Lookup::Hit(record()));
        assert_eq!(
            at(60),
            Lookup::Miss {
                stale: Some(record())
            }
        );
        assert_eq!(
            at(359),
            Lookup::Miss {
                stale: Some(record())
            }
        );
        assert_eq!(at(360), Lookup::Miss { stale: None });
    }

    #[test]
    fn not_found_is_remembered_for_the_negative_ttl() {
        let slot = stored(Verdict::NotFound);
        assert_eq!(
            lookup(Some(&slot), &[7; 32], 1_009_999, &cfg()),
            Lookup::NegativeHit
        );
        assert_eq!(
            lookup(Some(&slot), &[7; 32], 1_010_000, &cfg()),
            Lookup::Miss { stale: None }
        );
    }

    #[test]
    fn another_keys_entry_or_garbage_is_a_miss() {
        let slot = stored(Verdict::Found(record()));
        assert_eq!(
            lookup(Some(&slot), &[8; 32], 1_000_000, &cfg()),
            Lookup::Miss { stale: None }
        );
        assert_eq!(
            lookup(None, &[7; 32], 0, &cfg()),
            Lookup::Miss { stale: None }
        );
        assert_eq!(
            lookup(Some(b""), &[7; 32], 0, &cfg()),
            Lookup::Miss { stale: None }
        );
        let mut truncated = slot.clone();
        truncated.pop();
        assert_eq!(decode(&truncated), None);
        let mut longer = slot;
        longer.push(0);
        assert_eq!(decode(&longer), None);
    }

    #[test]
    fn a_clock_that_steps_back_keeps_the_entry_fresh() {
        let slot = stored(Verdict::Found(record()));
        assert_eq!(
            lookup(Some(&slot), &[7; 32], 0, &cfg()),
            Lookup::Hit(record())
        );
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode(&bytes);
        }
    }
}
