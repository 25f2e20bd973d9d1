//! The key service's answer: `parse_record` on the body, and `classify` with a status
//! taken from the input. The key service is another team's program, reached over the
//! network, so its answers are outside input.
//!
//! Input layout: `STATUS\nBODY` when a newline occurs within the first 8 bytes, else
//! the whole input is the body of a `200`.
#![no_main]

use apikey_core::keys::answer::{classify, LookupAnswer, LookupFailure};
use apikey_core::keys::entry::{self, CacheEntry, Verdict};
use apikey_core::keys::record::{parse_record, KeyRecord, RecordLimit, MAX_SCOPES, MAX_TEXT_LEN};
use libfuzzer_sys::fuzz_target;

fn header_safe(s: &str) -> bool {
    s.len() <= MAX_TEXT_LEN && !s.bytes().any(|b| b < 0x20 || b == 0x7f)
}

fn check_record(record: &KeyRecord) {
    assert!(!record.key_id.is_empty() && header_safe(&record.key_id));
    assert!(header_safe(&record.owner));
    assert!(record.scopes.len() <= MAX_SCOPES);
    for scope in &record.scopes {
        assert!(!scope.is_empty() && !scope.contains(',') && header_safe(scope));
    }
    if let RecordLimit::Bucket(b) = record.rate_limit {
        for n in [b.requests, b.period_s, b.burst] {
            assert!((1..=1_000_000_000).contains(&n));
        }
    }
    // Every accepted record goes into the cache: it must come back out unchanged.
    let entry = CacheEntry::new(
        [0xab; 32],
        1_700_000_000_000,
        Verdict::Found(record.clone()),
    );
    assert_eq!(entry::decode(&entry::encode(&entry)), Some(entry));
}

fuzz_target!(|data: &[u8]| {
    let (status, body): (&[u8], &[u8]) = match data.iter().take(8).position(|&b| b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (b"200", data),
    };

    let parsed = parse_record(body);
    match &parsed {
        Ok(record) => check_record(record),
        Err(error) => assert!(!error.reason.is_empty()),
    }

    let answer = classify(Some(status), Some(body), false);
    let code = std::str::from_utf8(status)
        .ok()
        .and_then(|s| s.trim().parse::<u16>().ok());
    match (&answer, code) {
        (LookupAnswer::Found(record), Some(200)) => assert_eq!(Ok(record), parsed.as_ref()),
        (LookupAnswer::Failed(LookupFailure::BadRecord(why)), Some(200)) => {
            assert!(parsed.is_err() && !why.is_empty())
        }
        (LookupAnswer::NotFound, Some(404)) => {}
        (LookupAnswer::Failed(LookupFailure::Timeout), Some(504)) => {}
        (LookupAnswer::Failed(LookupFailure::Status(s)), Some(c)) => {
            assert!(*s == c && ![200, 404, 504].contains(&c))
        }
        (LookupAnswer::Failed(LookupFailure::Reset), None) => {}
        (answer, code) => panic!("status {code:?} classified as {answer:?}"),
    }
    if let LookupAnswer::Failed(failure) = &answer {
        assert!(!failure.kind().name().is_empty());
        assert!(!failure.describe().is_empty());
    }
    assert_eq!(
        classify(None, Some(body), false),
        LookupAnswer::Failed(LookupFailure::Reset)
    );
    // `x-envoy-overloaded` matters on Envoy's own 503 only.
    let overloaded = classify(Some(status), Some(body), true);
    if code == Some(503) {
        assert_eq!(overloaded, LookupAnswer::Failed(LookupFailure::Overloaded));
    } else {
        assert_eq!(overloaded, answer);
    }
});
