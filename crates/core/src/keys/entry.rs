//! The node-wide key cache's entries: a compact binary form (no JSON on the hot path),
//! and where one may be stored. When an entry may be trusted is `keys::cache`'s to say.
//!
//! A key's entry sits in one of `PROBES` slots from its home slot. A new entry takes
//! the key's own slot, else the least valuable one; an unknown key never displaces a
//! found key that may still be used, so a flood of random keys cannot strip valid keys
//! of their cache (and of stale-if-error while the key service is down).
//!
//! An empty slot is the least valuable, and the first one is taken; slots are never
//! emptied again: an entry that must be forgotten (the change feed) is overwritten by a
//! `Forgotten` one, a tombstone that says nothing about the key but keeps its place. So
//! no key's entry lies past an empty slot of its probes, and reading stops there: a key
//! that is not cached costs one read in a table with room to spare, not `PROBES`.
use crate::keys::record::{KeyRecord, RecordLimit};
use crate::keys::trust::{age_ms, ms, Failures, Trust, TrustRules};
use crate::quotas::quota::{Quota, MAX_QUOTAS};
use crate::storage::bytes::Reader;
use crate::vocabulary::bucket_spec::BucketSpec;
use crate::vocabulary::cidr::Cidr;
use crate::vocabulary::key_hash::{slot_of, KeyHash};
use crate::vocabulary::referrer::ReferrerPattern;

/// Bumped whenever the layout changes; older entries then read as misses.
const FORMAT_VERSION: u8 = 5;
/// The record names no `quotas`: the configured `default_quotas` apply.
const NO_QUOTAS_NAMED: u8 = 255;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Found(KeyRecord),
    NotFound,
    /// Nothing usable: forgotten (a tombstone), or only the key's failures are known.
    Forgotten,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheEntry {
    /// The whole hash: slots are shared by many keys, so an entry says whose it is.
    pub key_hash: KeyHash,
    pub stored_at_ms: u64,
    /// The node's feed epoch when it was stored: a 410 from the change feed moves the
    /// epoch on, and every older entry is then forgotten at once.
    pub epoch: u32,
    pub verdict: Verdict,
    /// The key service's failures for this key since its last answer.
    pub failures: Failures,
}

impl CacheEntry {
    pub fn new(key_hash: KeyHash, stored_at_ms: u64, verdict: Verdict) -> CacheEntry {
        CacheEntry {
            key_hash,
            stored_at_ms,
            epoch: 0,
            verdict,
            failures: Failures::default(),
        }
    }
}

/// Slots a key's entry may sit in, from its home slot on.
pub const PROBES: u32 = 4;

/// The table slots a key's entry may sit in, in the order they are tried.
pub fn probe_slots(key_hash: &KeyHash, slots: u32) -> impl Iterator<Item = u32> {
    let slots = slots.max(1);
    let home = slot_of(key_hash, slots);
    (0..PROBES.min(slots)).map(move |i| (home + i) % slots)
}

/// The key's own entry: reads its probe slots through `read` until it is found, or
/// until an empty slot (`None`) says it is not there.
pub fn find(
    key_hash: &KeyHash,
    slots: u32,
    read: impl FnMut(u32) -> Option<Vec<u8>>,
) -> Option<CacheEntry> {
    probe_slots(key_hash, slots)
        .map_while(read)
        .filter_map(|bytes| decode(&bytes))
        .find(|entry| &entry.key_hash == key_hash)
}

/// Where `entry` should be stored: the slot of the key's own entry, else the least
/// valuable of its probe slots. `None`: every probe slot holds a found key that may still
/// be used, and `entry` is not a found key, so must not displace them.
pub fn placement(
    entry: &CacheEntry,
    slots: u32,
    mut read: impl FnMut(u32) -> Option<Vec<u8>>,
    now_ms: u64,
    rules: &TrustRules,
) -> Option<u32> {
    let mut best: Option<(u8, u64, u32)> = None;
    for slot in probe_slots(&entry.key_hash, slots) {
        let bytes = read(slot);
        let held = bytes.as_deref().and_then(decode);
        let (value, stored_at) = match &held {
            Some(h) if h.key_hash == entry.key_hash => return Some(slot),
            Some(h) => (worth(h, now_ms, rules), h.stored_at_ms),
            None => (EMPTY, 0),
        };
        if best.is_none_or(|(v, at, _)| (value, stored_at) < (v, at)) {
            best = Some((value, stored_at, slot));
        }
        if bytes.is_none() {
            break; // nothing past an empty slot, the key's own entry neither
        }
    }
    let (value, _, slot) = best?;
    let displaces_usable_found = value == USABLE_FOUND;
    let is_found = matches!(entry.verdict, Verdict::Found(_));
    (!displaces_usable_found || is_found).then_some(slot)
}

/// What losing an entry costs, lowest first.
const EMPTY: u8 = 0;
const USELESS: u8 = 1;
const NEGATIVE: u8 = 2;
const USABLE_FOUND: u8 = 3;

fn worth(entry: &CacheEntry, now_ms: u64, rules: &TrustRules) -> u8 {
    match rules.judge(entry, now_ms) {
        Trust::Fresh { .. } | Trust::Stale => USABLE_FOUND,
        Trust::Negative => NEGATIVE,
        Trust::Useless => USELESS,
    }
}

pub fn encode(entry: &CacheEntry) -> Vec<u8> {
    let mut out = Vec::with_capacity(96);
    out.push(FORMAT_VERSION);
    out.extend_from_slice(&entry.key_hash);
    out.extend_from_slice(&entry.stored_at_ms.to_le_bytes());
    out.extend_from_slice(&entry.epoch.to_le_bytes());
    out.push(entry.failures.in_a_row);
    out.extend_from_slice(&entry.failures.paused_until_ms.to_le_bytes());
    match &entry.verdict {
        Verdict::NotFound => out.push(0),
        Verdict::Forgotten => out.push(2),
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
            out.push(record.allowed_cidrs.len().min(255) as u8);
            for cidr in record.allowed_cidrs.iter().take(255) {
                cidr.encode(&mut out);
            }
            out.push(record.allowed_referrers.len().min(255) as u8);
            for pattern in record.allowed_referrers.iter().take(255) {
                put_str(&mut out, &pattern.to_text());
            }
            match &record.quotas {
                None => out.push(NO_QUOTAS_NAMED),
                Some(quotas) => {
                    out.push(quotas.len().min(MAX_QUOTAS) as u8);
                    quotas
                        .iter()
                        .take(MAX_QUOTAS)
                        .for_each(|q| q.encode(&mut out));
                }
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
    let epoch = r.u32()?;
    let failures = Failures {
        in_a_row: r.u8()?,
        paused_until_ms: r.u64()?,
    };
    let verdict = match r.u8()? {
        0 => Verdict::NotFound,
        2 => Verdict::Forgotten,
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
            let allowed_cidrs = (0..r.u8()?)
                .map(|_| Cidr::decode(r.take(18)?.try_into().ok()?))
                .collect::<Option<Vec<_>>>()?;
            let allowed_referrers = (0..r.u8()?)
                .map(|_| ReferrerPattern::parse(&r.str()?))
                .collect::<Option<Vec<_>>>()?;
            let quotas = match r.u8()? {
                NO_QUOTAS_NAMED => None,
                // A record holds at most MAX_QUOTAS (and is encoded so): more is not ours.
                n if usize::from(n) > MAX_QUOTAS => return None,
                n => Some(
                    (0..n)
                        .map(|_| Quota::decode(&mut r))
                        .collect::<Option<Vec<_>>>()?,
                ),
            };
            Verdict::Found(KeyRecord {
                key_id,
                owner,
                scopes,
                rate_limit,
                expires_at,
                revoked,
                allowed_cidrs,
                allowed_referrers,
                quotas,
            })
        }
        _ => return None,
    };
    r.0.is_empty().then_some(CacheEntry {
        key_hash,
        stored_at_ms,
        epoch,
        verdict,
        failures,
    })
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    let bytes = s.as_bytes();
    let len = bytes.len().min(u16::MAX as usize);
    out.extend_from_slice(&(len as u16).to_le_bytes());
    out.extend_from_slice(bytes.get(..len).unwrap_or_default());
}

/// The trust rules applied to a node-wide entry (here, beside the entry: `trust` knows no
/// entry).
impl TrustRules {
    pub fn judge(&self, entry: &CacheEntry, now_ms: u64) -> Trust {
        if entry.epoch != self.epoch {
            return Trust::Useless;
        }
        match entry.verdict {
            Verdict::Found(_) => self.found(entry.stored_at_ms, now_ms),
            Verdict::NotFound if age_ms(entry.stored_at_ms, now_ms) < ms(self.negative_ttl_s) => {
                Trust::Negative
            }
            Verdict::NotFound | Verdict::Forgotten => Trust::Useless,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quotas::quota::{Per, Unit};
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
            allowed_cidrs: vec![],
            allowed_referrers: vec![],
            quotas: None,
        }
    }

    use crate::keys::cache::tests::rules as cfg;

    fn stored(verdict: Verdict) -> Vec<u8> {
        encode(&CacheEntry::new([7; 32], 1_000_000, verdict))
    }

    #[test]
    fn an_entry_with_more_quotas_than_a_record_may_hold_is_not_ours() {
        let quota = Quota {
            requests: 5,
            unit: Unit::Day,
            per: Per::Key,
        };
        let full = Verdict::Found(KeyRecord {
            quotas: Some(vec![quota; MAX_QUOTAS]),
            ..record()
        });
        let mut bytes = stored(full);
        assert!(decode(&bytes).is_some());
        // The quotas close the entry: one more, and a count past the limit (what the
        // cache_entry fuzz target found decoding and then encoding shorter).
        let per_quota = (bytes.len()
            - stored(Verdict::Found(KeyRecord {
                quotas: Some(vec![]),
                ..record()
            }))
            .len())
            / MAX_QUOTAS;
        let count_at = bytes.len() - per_quota * MAX_QUOTAS - 1;
        bytes.extend_from_within(count_at + 1..count_at + 1 + per_quota);
        bytes[count_at] += 1;
        assert_eq!(decode(&bytes), None);
    }

    #[test]
    fn round_trips() {
        for verdict in [
            Verdict::NotFound,
            Verdict::Forgotten,
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
            Verdict::Found(KeyRecord {
                allowed_cidrs: vec![
                    Cidr::parse("203.0.113.0/24").unwrap(),
                    Cidr::parse("2001:db8::/32").unwrap(),
                ],
                allowed_referrers: vec![
                    ReferrerPattern::parse("https://app.example.com/*").unwrap(),
                    ReferrerPattern::parse("*.example.com").unwrap(),
                ],
                quotas: Some(vec![
                    Quota {
                        requests: 10_000,
                        unit: Unit::Day,
                        per: Per::Key,
                    },
                    Quota {
                        requests: 7,
                        unit: Unit::Year,
                        per: Per::Owner,
                    },
                ]),
                ..record()
            }),
            Verdict::Found(KeyRecord {
                quotas: Some(vec![]),
                ..record()
            }),
        ] {
            let mut entry = CacheEntry::new([3; 32], 42, verdict);
            assert_eq!(decode(&encode(&entry)), Some(entry.clone()));
            entry.epoch = 7;
            entry.failures = Failures {
                in_a_row: 3,
                paused_until_ms: 1234,
            };
            assert_eq!(decode(&encode(&entry)), Some(entry));
        }
    }

    #[test]
    fn another_keys_entry_or_garbage_is_not_found() {
        let slot = stored(Verdict::Found(record()));
        let in_one_slot = |bytes: Option<&[u8]>, key_hash: &KeyHash| {
            find(key_hash, 1, |_| bytes.map(<[u8]>::to_vec))
        };
        assert_eq!(in_one_slot(Some(&slot), &[8; 32]), None);
        assert!(in_one_slot(Some(&slot), &[7; 32]).is_some());
        assert_eq!(in_one_slot(None, &[7; 32]), None);
        assert_eq!(in_one_slot(Some(b""), &[7; 32]), None);
        let mut older = slot.clone();
        older[0] = 1;
        assert_eq!(decode(&older), None, "an older layout");
        let mut truncated = slot.clone();
        truncated.pop();
        assert_eq!(decode(&truncated), None);
        let mut longer = slot;
        longer.push(0);
        assert_eq!(decode(&longer), None);
    }

    fn entry(key: u8, stored_at_ms: u64, verdict: Verdict) -> CacheEntry {
        CacheEntry::new([key; 32], stored_at_ms, verdict)
    }

    /// A table of `PROBES` slots, every key's home among them.
    fn placed(table: &[Option<CacheEntry>], new: &CacheEntry, now_ms: u64) -> Option<u32> {
        placement(
            new,
            PROBES,
            |slot| table[slot as usize].as_ref().map(encode),
            now_ms,
            &cfg(),
        )
    }

    #[test]
    fn an_entry_goes_to_its_own_slot_first_then_the_least_valuable() {
        let found = |k, at| Some(entry(k, at, Verdict::Found(record())));
        let negative = |k, at| Some(entry(k, at, Verdict::NotFound));
        let new_found = entry(9, 1_000_000, Verdict::Found(record()));
        let now = 1_000_000;
        let home = probe_slots(&[9; 32], PROBES).next().unwrap() as usize;

        let mut table = vec![found(1, now), found(2, now), found(3, now), found(4, now)];
        table[(home + 2) % 4] = found(9, 0);
        assert_eq!(
            placed(&table, &new_found, now),
            Some(((home + 2) % 4) as u32),
            "own slot"
        );

        let table = vec![found(1, now), negative(2, now), None, found(4, now)];
        assert_eq!(
            placed(&table, &new_found, now),
            Some(2),
            "an empty slot first"
        );

        let table = vec![found(1, now), negative(2, now), found(3, 0), found(4, now)];
        assert_eq!(
            placed(&table, &new_found, now),
            Some(2),
            "then a found entry past any use"
        );

        let table = vec![
            found(1, now),
            negative(2, now),
            found(3, now),
            found(4, now),
        ];
        assert_eq!(
            placed(&table, &new_found, now),
            Some(1),
            "then a negative one"
        );

        let table = vec![
            found(1, now),
            found(2, now - 5),
            found(3, now),
            found(4, now),
        ];
        assert_eq!(
            placed(&table, &new_found, now),
            Some(1),
            "then the oldest found"
        );
    }

    #[test]
    fn an_unknown_key_never_displaces_a_usable_found_one() {
        let now = 1_000_000;
        // Past its TTL but within stale-if-error: still worth keeping.
        let stale = |k| Some(entry(k, now - 100_000, Verdict::Found(record())));
        let table = vec![stale(1), stale(2), stale(3), stale(4)];
        assert_eq!(placed(&table, &entry(9, now, Verdict::NotFound), now), None);
        assert_eq!(
            placed(&table, &entry(9, now, Verdict::Forgotten), now),
            None,
            "nor does a key whose failures are all that is known"
        );
        let mut table = table;
        table[3] = Some(entry(4, 0, Verdict::NotFound));
        assert_eq!(
            placed(&table, &entry(9, now, Verdict::NotFound), now),
            Some(3)
        );
    }

    #[test]
    fn find_reads_probe_slots_until_the_keys_own_entry() {
        let (mine, other) = (
            entry(9, 5, Verdict::NotFound),
            entry(1, 5, Verdict::NotFound),
        );
        let home = probe_slots(&[9; 32], 100).next().unwrap();
        let mut reads = Vec::new();
        let found = find(&[9; 32], 100, |slot| {
            reads.push(slot);
            Some(encode(if slot == home { &other } else { &mine }))
        });
        assert_eq!(found, Some(mine));
        assert_eq!(reads, vec![home, (home + 1) % 100]);
    }

    #[test]
    fn reading_stops_at_an_empty_slot() {
        let home = probe_slots(&[9; 32], 100).next().unwrap();
        let other = entry(1, 5, Verdict::NotFound);
        let table = |slot| (slot == home).then(|| encode(&other));
        let mut reads = 0;
        let found = find(&[9; 32], 100, |slot| {
            reads += 1;
            table(slot)
        });
        assert_eq!(
            (found, reads),
            (None, 2),
            "the home slot, then the empty one"
        );

        let mut reads = 0;
        let new = entry(9, 5, Verdict::NotFound);
        let place = placement(
            &new,
            100,
            |slot| {
                reads += 1;
                table(slot)
            },
            5,
            &cfg(),
        );
        assert_eq!((place, reads), (Some((home + 1) % 100), 2));
    }

    proptest! {
        /// Whatever entries go in, in whatever order, each can be found where placement
        /// put it: stopping at an empty slot never loses one.
        #[test]
        fn every_placed_entry_is_found(keys in proptest::collection::vec(0u8..12, 1..40)) {
            let mut table: Vec<Option<Vec<u8>>> = vec![None; 8];
            let mut placed = std::collections::HashMap::new();
            for (at, key) in keys.into_iter().enumerate() {
                let mut new = entry(key, at as u64, Verdict::NotFound);
                new.key_hash[0] = key.wrapping_mul(37); // spread the home slots
                let read = |slot: u32| table[slot as usize].clone();
                if let Some(slot) = placement(&new, 8, read, at as u64, &cfg()) {
                    table[slot as usize] = Some(encode(&new));
                    placed.insert(new.key_hash, slot);
                }
            }
            let mut held = 0;
            for (key_hash, slot) in placed {
                // Only entries still held: a later one may have taken the slot.
                if table[slot as usize].as_deref().and_then(decode).is_some_and(|e| e.key_hash == key_hash) {
                    held += 1;
                    let found = find(&key_hash, 8, |slot| table[slot as usize].clone());
                    prop_assert_eq!(found.map(|e| e.key_hash), Some(key_hash));
                }
            }
            prop_assert!(held > 0, "the last entry placed at least is held");
        }
    }

    #[test]
    fn a_tombstone_keeps_probing_intact_and_is_the_first_to_go() {
        let now = 1_000_000;
        let home = probe_slots(&[9; 32], PROBES).next().unwrap() as usize;
        let mut table: Vec<Option<CacheEntry>> = (1..=4)
            .map(|k| Some(entry(k, now, Verdict::NotFound)))
            .collect();
        table[home] = Some(entry(1, now, Verdict::Forgotten));
        table[(home + 1) % 4] = Some(entry(9, now, Verdict::NotFound));
        let found = find(&[9; 32], PROBES, |slot| {
            table[slot as usize].as_ref().map(encode)
        });
        assert_eq!(
            found.map(|e| e.key_hash),
            Some([9; 32]),
            "read past the tombstone"
        );
        assert_eq!(
            placed(&table, &entry(9, now, Verdict::Found(record())), now),
            Some(((home + 1) % 4) as u32),
            "its own slot"
        );
        table[(home + 1) % 4] = Some(entry(2, now, Verdict::NotFound));
        assert_eq!(
            placed(&table, &entry(9, now, Verdict::NotFound), now),
            Some(home as u32),
            "the tombstone's slot before any negative entry"
        );
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode(&bytes);
        }
    }
}
