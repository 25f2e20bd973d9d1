//! What the key service and clients say about where a key may be used, and what a key
//! looks like: `allowed_cidrs` and `allowed_referrers` patterns (from key service records),
//! `Referer` / `Origin` values and keys (from clients), and change feed answers.
//!
//! The first input byte picks the parser, the rest is its input.
#![no_main]

use apikey_core::config::{Checksum, KeyFormat};
use apikey_core::keys::feed::{classify, FeedAnswer};
use apikey_core::request::key_format::{checksum, conforms};
use apikey_core::vocabulary::cidr::Cidr;
use apikey_core::vocabulary::referrer::{allowed, ReferrerPattern};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&which, input)) = data.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(input);
    match which % 4 {
        0 => {
            if let Some(cidr) = Cidr::parse(&text) {
                let mut out = Vec::new();
                cidr.encode(&mut out);
                assert_eq!(Cidr::decode(&out.try_into().unwrap()), Some(cidr));
                assert!(
                    cidr.contains(cidr.network),
                    "a network holds its own address"
                );
            }
        }
        1 => {
            // A pattern, then a newline, then a referrer.
            let (pattern, referrer) = text.split_once('\n').unwrap_or((&text, ""));
            if let Some(parsed) = ReferrerPattern::parse(pattern) {
                assert_eq!(
                    ReferrerPattern::parse(&parsed.to_text()).as_ref(),
                    Some(&parsed)
                );
                let _ = allowed(&[parsed], Some(referrer.as_bytes()));
            }
        }
        2 => {
            let format = KeyFormat {
                prefixes: vec!["ghp_".into(), "sk_".into()],
                checksum: Some(Checksum::Crc32),
            };
            if conforms(input, &format) && input.len() > 6 {
                let (body, check) = input.split_at(input.len() - 6);
                let prefix = if body.starts_with(b"ghp_") { 4 } else { 3 };
                assert_eq!(check, checksum(&body[prefix..]));
            }
        }
        _ => {
            if let FeedAnswer::Changes { cursor, .. } = classify(Some(b"200"), Some(input)) {
                assert!((1..=256).contains(&cursor.len()));
            }
        }
    }
});
