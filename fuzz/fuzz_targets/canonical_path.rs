//! `canonical_path`: the path scope rules match (CONTRACT "What rules match"). A request's
//! `:path` is anything a client sends; the canonical form must never panic, and must say
//! the same for spellings every common upstream reads alike.
#![no_main]

use apikey_core::vocabulary::canonical_path::{canonical_path, starts_with_ignoring_case};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|path: &[u8]| {
    let canonical = canonical_path(path);
    assert!(canonical.starts_with(b"/"));
    let inner = canonical.strip_suffix(b"/").unwrap_or(&canonical);
    for segment in inner.split(|&b| b == b'/').skip(1) {
        assert!(!segment.is_empty(), "{canonical:?}");
        assert!(segment != b"." && segment != b"..", "{canonical:?}");
        assert!(
            !segment.contains(&b';') && !segment.contains(&b'\\'),
            "{canonical:?}"
        );
    }
    // The query never counts.
    let at = path
        .iter()
        .position(|&b| b == b'?' || b == b'#')
        .unwrap_or(path.len());
    let mut with_query = path[..at].to_vec();
    with_query.extend_from_slice(b"?x=/orders");
    assert_eq!(canonical_path(&with_query), canonical);
    // Spellings upstreams read alike are alike: a doubled slash, a `/./`, a `;` parameter
    // or a `/x/..` in front.
    let body = &path[..at];
    if body.first() == Some(&b'/') {
        for front in [&b"/"[..], b"/.", b"/;p=1", b"/x/..", b"/%2E"] {
            let mut respelled = front.to_vec();
            respelled.extend_from_slice(body);
            assert_eq!(canonical_path(&respelled), canonical, "{respelled:?}");
        }
    }
    assert!(starts_with_ignoring_case(&canonical, b"/"));
});
