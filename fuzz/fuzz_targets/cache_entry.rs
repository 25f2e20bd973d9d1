//! `keys::entry::decode` on arbitrary bytes: slots of shared data may hold anything (an
//! older layout, another VM's write, corruption). Whatever decodes must survive
//! encode → decode unchanged, and judging its trust must never panic on it.
#![no_main]

use apikey_core::keys::entry::{decode, encode, find, Verdict};
use apikey_core::keys::trust::{Trust, TrustRules};
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

    let rules = TrustRules {
        ttl_s: 60,
        negative_ttl_s: 10,
        stale_if_error_s: 300,
        refresh_ahead_pct: 20,
        epoch: entry.epoch,
    };
    let next_epoch = TrustRules {
        epoch: entry.epoch.wrapping_add(1),
        ..rules
    };
    for now_ms in [
        0,
        entry.stored_at_ms,
        entry.stored_at_ms.wrapping_add(59_999),
        u64::MAX,
    ] {
        let in_slot = |key_hash| find(key_hash, 1, |_| Some(data.to_vec()));
        let found = in_slot(&entry.key_hash).expect("its own entry");
        match (&entry.verdict, rules.judge(&found, now_ms)) {
            (Verdict::Found(_), Trust::Fresh { .. } | Trust::Stale)
            | (Verdict::NotFound, Trust::Negative)
            | (_, Trust::Useless) => {}
            (verdict, trust) => panic!("{verdict:?} judged {trust:?}"),
        }
        assert_eq!(next_epoch.judge(&found, now_ms), Trust::Useless);
        let mut other = entry.key_hash;
        other[0] ^= 1;
        assert_eq!(in_slot(&other), None);
    }
});
