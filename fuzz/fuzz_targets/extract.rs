//! `extract` over headers and `:path` straight from the client, with the source list
//! of the demo configuration: `x-api-key`, `Bearer` on `authorization`, `?api_key=`.
#![no_main]

use apikey_core::config::KeySource;
use apikey_core::request::extract::{extract, KeyOutcome, MAX_KEY_LEN};
use apikey_core::request::header_map::{self, Header};
use apikey_core::request::query::take_param;
use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
enum Name<'a> {
    XApiKey,
    Authorization,
    /// Envoy hands filters lowercased names; the extractor must not depend on it.
    MixedCase(bool),
    Other(&'a str),
}

/// Borrowed slices rather than `Vec<u8>`: `arbitrary` builds a `Vec` a byte at a time,
/// each behind a "one more?" byte, which makes raw bytes hard to mutate.
#[derive(Arbitrary, Debug)]
struct Request<'a> {
    headers: Vec<(Name<'a>, &'a [u8])>,
    /// The rest of the input.
    path: &'a [u8],
}

const MAX_HEADERS: usize = 8;

fuzz_target!(|request: Request<'_>| {
    let sources = vec![
        KeySource::Header {
            name: "x-api-key".into(),
        },
        KeySource::SchemeHeader {
            name: "authorization".into(),
            scheme: "Bearer".into(),
        },
        KeySource::Query {
            name: "api_key".into(),
        },
    ];
    let headers: Vec<Header> = request
        .headers
        .into_iter()
        .take(MAX_HEADERS)
        .map(|(name, value)| {
            let name: &[u8] = match name {
                Name::XApiKey => b"x-api-key",
                Name::Authorization => b"authorization",
                Name::MixedCase(false) => b"X-Api-Key",
                Name::MixedCase(true) => b"Authorization",
                Name::Other(name) => name.as_bytes(),
            };
            (name, value)
        })
        .collect();
    let path = request.path;

    // As the filter sees them: through the host's serialization.
    let serialized = header_map::serialize(&headers);
    let parsed = header_map::parse(&serialized);
    assert_eq!(parsed, headers);
    let e = extract(&sources, &parsed, path);

    // The key parameter never reaches the upstream, and the rewrite is exactly the
    // one `take_param` makes (the only query source).
    let in_path = take_param(path, b"api_key");
    assert_eq!(e.rewritten_path, in_path.rewritten);
    if let Some(rewritten) = &e.rewritten_path {
        assert!(take_param(rewritten, b"api_key").values.is_empty());
        assert!(rewritten.len() < path.len());
    }

    if let KeyOutcome::Key(key) = &e.outcome {
        assert!(
            (1..=MAX_KEY_LEN).contains(&key.len()),
            "{} bytes",
            key.len()
        );
        assert!(key.iter().all(|b| (0x21..=0x7e).contains(b)), "{key:?}");
    }

    // Header removal: named once each, in source order, and every present `x-api-key`
    // (whatever its value) goes.
    let values = |name: &str| -> Vec<&[u8]> {
        headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name.as_bytes()))
            .map(|(_, v)| *v)
            .collect()
    };
    let x_api_key = values("x-api-key");
    assert!(
        e.remove_headers == ["x-api-key", "authorization"]
            || e.remove_headers == ["x-api-key"]
            || e.remove_headers == ["authorization"]
            || e.remove_headers.is_empty(),
        "{:?}",
        e.remove_headers
    );
    assert_eq!(
        e.remove_headers.contains(&"x-api-key"),
        !x_api_key.is_empty()
    );

    // A value that is obviously a Bearer credential (the whole value is `Bearer <key>`)
    // is always stripped.
    let authorization = values("authorization");
    if authorization.iter().any(|v| {
        let v = v.trim_ascii();
        v.len() > 6 && v[..6].eq_ignore_ascii_case(b"bearer") && v[6] == b' ' && !v.contains(&b',')
    }) {
        assert!(e.remove_headers.contains(&"authorization"));
    }

    // The outcome agrees with what is plainly there.
    let repeated = x_api_key.len() > 1 || in_path.values.len() > 1;
    if repeated {
        assert_eq!(e.outcome, KeyOutcome::Duplicate);
    }
    let some_key = x_api_key.iter().any(|v| !v.trim_ascii().is_empty())
        || in_path.values.iter().any(|v| !v.is_empty());
    if some_key {
        assert_ne!(e.outcome, KeyOutcome::Missing);
    }
    if x_api_key.is_empty() && authorization.is_empty() && in_path.values.is_empty() {
        assert_eq!(e.outcome, KeyOutcome::Missing);
        assert!(e.remove_headers.is_empty());
    }
    // A single, well-formed `x-api-key` wins unless another source repeats its key.
    if let [only] = x_api_key[..] {
        let key = only.trim_ascii();
        if !key.is_empty()
            && key.len() <= MAX_KEY_LEN
            && key.iter().all(|b| (0x21..=0x7e).contains(b))
            && e.outcome != KeyOutcome::Duplicate
        {
            assert_eq!(e.outcome, KeyOutcome::Key(key.to_vec()));
        }
    }
});
