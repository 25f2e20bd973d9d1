//! `Config::parse` on arbitrary bytes: the plugin configuration comes from whoever
//! writes the Envoy or Istio resource. A refusal must be an `Err`, never a panic; an
//! accepted configuration must hold what the parser promises, and `summary()` (the
//! start-up log line) must work and never show a `key_service.headers` value.
#![no_main]

use apikey_core::config::{Config, FailureMode, KeySource};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let config = match Config::parse(data) {
        Ok(config) => config,
        Err(error) => {
            assert!(!error.reason.is_empty(), "a refusal says why");
            let _ = error.to_string();
            return;
        }
    };
    let summary = config.summary();
    for field in [
        "key_sources=",
        "key_service=",
        "cache=",
        "rate_limit=",
        "rules=",
        "identity_headers=",
        "brute_force=",
        "failure_mode=",
    ] {
        assert!(summary.contains(field), "{field} missing from {summary}");
    }

    // The summary does not depend on the callout header values (often credentials).
    let mut masked = config.clone();
    for (_, value) in &mut masked.key_service.headers {
        *value = format!("{value}\u{1}masked");
    }
    assert_eq!(masked.summary(), summary, "summary shows a header value");

    // What `parse` promises to the request path, which re-checks none of it.
    let is_header_name = |n: &str| {
        !n.is_empty()
            && n.bytes().all(|b| {
                (b.is_ascii_alphanumeric() && !b.is_ascii_uppercase())
                    || b"!#$%&'*+-.^_`|~".contains(&b)
            })
    };
    assert!(!config.key_sources.is_empty());
    for source in &config.key_sources {
        match source {
            KeySource::Header { name } => assert!(is_header_name(name), "{name:?}"),
            KeySource::SchemeHeader { name, scheme } => {
                assert!(is_header_name(name), "{name:?}");
                assert!(!scheme.is_empty() && !scheme.contains([' ', '\t', ',']));
            }
            KeySource::Query { name } => assert!(!name.is_empty()),
        }
    }
    assert!(!config.www_authenticate.is_empty());
    let ks = &config.key_service;
    assert!(!ks.cluster.is_empty());
    assert!(!ks.authority.is_empty());
    assert!((1..=60_000).contains(&ks.timeout_ms));
    let path = ks.path_for("00ff");
    assert!(path.starts_with('/') && path.contains("00ff"), "{path:?}");
    assert!(!path.bytes().any(|b| b < 0x20 || b == 0x7f || b == b' '));
    for (name, value) in &ks.headers {
        assert!(is_header_name(name), "{name:?}");
        assert!(!value.bytes().any(|b| b < 0x20 || b == 0x7f));
    }
    assert!(config.cache.max_entries >= 1);
    for bucket in [config.rate_limit].into_iter().flatten() {
        for n in [bucket.requests, bucket.period_s, bucket.burst] {
            assert!((1..=1_000_000_000).contains(&n));
        }
    }
    if let Some(bf) = config.brute_force {
        assert!(bf.max_failures >= 1 && bf.period_s >= 1);
    }
    for rule in &config.rules {
        assert!(rule.path_prefix.starts_with('/'));
        if let Some(methods) = &rule.methods {
            assert!(methods.iter().all(|m| !m.is_empty()));
        }
    }
    let ih = &config.identity_headers;
    for name in [&ih.key_id, &ih.owner, &ih.scopes] {
        assert!(is_header_name(name), "{name:?}");
    }
    let _ = matches!(config.failure_mode, FailureMode::Open);

    // Parsing is a pure function of the bytes.
    assert_eq!(Config::parse(data).ok(), Some(config));
});
