//! The path as upstreams read it, for scope rules (CONTRACT "What rules match"): a request that
//! matches no rule is allowed, so a path one upstream reads as `/orders` must never escape
//! the rule for `/orders` by how it is spelled. The forwarded path is not changed.
//!
//! From `:path`: the query (and a fragment) is cut off; percent-encoded unreserved
//! characters and `%2F` / `%5C` are decoded (once); a backslash is a slash; `;` parameters
//! are dropped from every segment (Tomcat, Spring); empty segments are merged (nginx);
//! `.` and `..` are resolved, never above the root. Case is left alone: rules compare
//! ignoring ASCII case (IIS, ASP.NET), see `starts_with_ignoring_case`.

use std::borrow::Cow;

/// The canonical form of `path` (`:path`, with or without its query). Always starts with
/// `/`; ends with `/` when the last segment of the path did (or was `.` or `..`). A path
/// that is canonical already (most are) is lent back as it is, without a copy.
pub fn canonical_path(path: &[u8]) -> Cow<'_, [u8]> {
    let end = path
        .iter()
        .position(|&b| b == b'?' || b == b'#')
        .unwrap_or(path.len());
    let path = path.get(..end).unwrap_or(path);
    if is_canonical(path) {
        Cow::Borrowed(path)
    } else {
        Cow::Owned(canonicalise(path))
    }
}

/// Whether `path` (without its query) is its own canonical form: it starts with `/`,
/// holds no escape, backslash or `;`, and no empty (but the last), `.` or `..` segment.
fn is_canonical(path: &[u8]) -> bool {
    let Some(rest) = path.strip_prefix(b"/") else {
        return false;
    };
    if rest.iter().any(|b| matches!(b, b'%' | b'\\' | b';')) {
        return false;
    }
    let mut segments = rest.split(|&b| b == b'/').peekable();
    while let Some(segment) = segments.next() {
        let last = segments.peek().is_none();
        if (segment.is_empty() && !last) || segment == b"." || segment == b".." {
            return false;
        }
    }
    true
}

/// `canonical_path` of a path without its query, worked out in full.
fn canonicalise(path: &[u8]) -> Vec<u8> {
    let decoded = decode(path);
    let mut out: Vec<u8> = Vec::with_capacity(decoded.len() + 1);
    // Where each kept segment starts in `out` (its slash), to pop on `..`.
    let mut starts: Vec<usize> = Vec::new();
    let mut trailing_slash = false;
    for raw in decoded.split(|&b| b == b'/') {
        let segment = match raw.iter().position(|&b| b == b';') {
            Some(at) => raw.get(..at).unwrap_or_default(),
            None => raw,
        };
        match segment {
            b"" | b"." => trailing_slash = true,
            b".." => {
                if let Some(start) = starts.pop() {
                    out.truncate(start);
                }
                trailing_slash = true;
            }
            _ => {
                starts.push(out.len());
                out.push(b'/');
                out.extend_from_slice(segment);
                trailing_slash = false;
            }
        }
    }
    if out.is_empty() || trailing_slash {
        out.push(b'/');
    }
    out
}

/// Whether `path` starts with `prefix`, ignoring ASCII case.
pub fn starts_with_ignoring_case(path: &[u8], prefix: &[u8]) -> bool {
    path.get(..prefix.len())
        .is_some_and(|head| head.eq_ignore_ascii_case(prefix))
}

/// Decodes what upstreams commonly decode before routing (unreserved characters, `%2F`,
/// `%5C`), and turns backslashes into slashes; every other escape is kept as written.
fn decode(path: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(path.len());
    let mut i = 0;
    while let Some(&b) = path.get(i) {
        let decoded = match (b, path.get(i + 1), path.get(i + 2)) {
            (b'%', Some(&hi), Some(&lo)) => hex(hi)
                .zip(hex(lo))
                .map(|(hi, lo)| hi << 4 | lo)
                .filter(|&c| is_unreserved(c) || c == b'/' || c == b'\\'),
            _ => None,
        };
        let (byte, width) = match decoded {
            Some(c) => (c, 3),
            None => (b, 1),
        };
        out.push(if byte == b'\\' { b'/' } else { byte });
        i += width;
    }
    out
}

fn is_unreserved(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~')
}

fn hex(c: u8) -> Option<u8> {
    (c as char).to_digit(16).map(|d| d as u8)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn canon(path: &str) -> String {
        String::from_utf8(canonical_path(path.as_bytes()).into_owned()).unwrap()
    }

    #[test]
    fn the_review_s_bypasses_all_read_as_orders() {
        for path in [
            "/orders",
            "//orders",
            "/;x/orders",
            "/.;/orders",
            "/orders;v=1",
            "/./orders",
            "/a/../orders",
            "/../orders",
            "\\orders",
            "/%2Forders",
            "/%2forders",
            "/%5Corders",
            "/%6Frders",
            "/x/%2E%2E/orders",
            "/orders?x=1",
            "/orders#frag",
            "orders",
        ] {
            assert_eq!(canon(path), "/orders", "{path}");
        }
    }

    #[test]
    fn segments_keep_their_order_and_a_trailing_slash_stays() {
        assert_eq!(canon("/orders;v=1/5"), "/orders/5");
        assert_eq!(canon("/orders/"), "/orders/");
        assert_eq!(canon("/orders/5/.."), "/orders/");
        assert_eq!(canon("/"), "/");
        assert_eq!(canon(""), "/");
        assert_eq!(canon("/.."), "/");
        assert_eq!(canon("?/orders"), "/");
    }

    #[test]
    fn other_escapes_are_kept_as_written_and_decoded_once() {
        assert_eq!(canon("/a%20b"), "/a%20b");
        assert_eq!(canon("/a%3Bb"), "/a%3Bb");
        assert_eq!(canon("/%252F"), "/%252F");
        assert_eq!(canon("/%zz/%2"), "/%zz/%2");
    }

    #[test]
    fn case_is_compared_not_changed() {
        assert_eq!(canon("/Orders"), "/Orders");
        assert!(starts_with_ignoring_case(b"/ORDERS/1", b"/orders"));
        assert!(!starts_with_ignoring_case(b"/ord", b"/orders"));
    }

    proptest! {
        #[test]
        fn canonical_paths_have_no_empty_dot_or_parameter_segment(path in proptest::collection::vec(any::<u8>(), 0..40)) {
            let once = canonical_path(&path);
            let end = path.iter().position(|&b| b == b'?' || b == b'#').unwrap_or(path.len());
            prop_assert_eq!(&*once, &canonicalise(&path[..end])[..], "lent only when canonical");
            prop_assert!(once.starts_with(b"/"));
            let inner = once.strip_suffix(b"/").unwrap_or(&once);
            for segment in inner.split(|&b| b == b'/').skip(1) {
                prop_assert!(!segment.is_empty() && segment != b"." && segment != b"..");
                prop_assert!(!segment.contains(&b';') && !segment.contains(&b'\\'));
            }
        }

        #[test]
        fn a_path_lent_back_is_what_the_full_work_gives(path in proptest::collection::vec(proptest::sample::select(b"/ab.;%2FA\\".to_vec()), 0..16)) {
            prop_assert_eq!(&*canonical_path(&path), &canonicalise(&path)[..]);
        }
    }
}
