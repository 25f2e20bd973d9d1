//! `cache_entry::decode` on arbitrary bytes: slots of shared data may hold anything (an
//! older layout, another VM's write, corruption). Whatever decodes must survive
//! encode → decode unchanged, and `lookup` must never panic on it.
#![no_main]

use apikey_filter::cache_entry::{decode, encode, find, lookup, Lookup, Verdict};
use apikey_filter::config::CacheConfig;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some(entry) = decode(data) else {
        return;
    };
    let encoded = encode(&entry);
    assert_eq!(decode(&encoded).as_ref(), Some(&entry));
    // The layout has no optional padding: the canonical form is just as long (it only
    // differs where a flag byte other than 0/1/2 was read as "set").
    assert_eq!(encoded.len(), data.len());
    assert_eq!(encode(&decode(&encoded).unwrap()), encoded);

    let cache = CacheConfig {
        ttl_s: 60,
        negative_ttl_s: 10,
        stale_if_error_s: 300,
        max_entries: 100,
    };
    for now_ms in [
        0,
        entry.stored_at_ms,
        entry.stored_at_ms.wrapping_add(59_999),
        u64::MAX,
    ] {
        let in_slot = |key_hash| find(key_hash, 1, |_| Some(data.to_vec()));
        let seen = lookup(in_slot(&entry.key_hash), now_ms, &cache);
        match (&entry.verdict, &seen) {
            (Verdict::Found(r), Lookup::Hit { record, .. }) => assert_eq!(r, record),
            (Verdict::Found(r), Lookup::Miss { stale: Some(s) }) => assert_eq!(r, s),
            (Verdict::NotFound, Lookup::NegativeHit) | (_, Lookup::Miss { stale: None }) => {}
            (verdict, seen) => panic!("{verdict:?} looked up as {seen:?}"),
        }
        let mut other = entry.key_hash;
        other[0] ^= 1;
        assert_eq!(
            lookup(in_slot(&other), now_ms, &cache),
            Lookup::Miss { stale: None }
        );
    }
});
