//! Finding the API key in a request, and everything that must be taken out of the
//! request so the key goes no further.
use crate::config::KeySource;
use crate::request::header_map::Header;
use crate::request::query;

/// Keys longer than this are refused without asking the key service: no real key is
/// that long, and hashing and looking up megabytes of garbage helps nobody.
pub const MAX_KEY_LEN: usize = 1024;

#[derive(Debug, PartialEq, Eq)]
pub enum KeyOutcome {
    Key(Vec<u8>),
    Missing,
    /// A source held more than one key: ambiguous, so refused.
    Duplicate,
    /// Not something a key can be (too long, control or non-ASCII bytes).
    Malformed,
}

#[derive(Debug, PartialEq, Eq)]
pub struct Extraction<'c> {
    pub outcome: KeyOutcome,
    /// Header names to remove from the request: every configured source that was present.
    pub remove_headers: Vec<&'c str>,
    /// `:path` without the key parameters, when there were any.
    pub rewritten_path: Option<Vec<u8>>,
}

/// Tries `sources` in order over the request's headers (names lowercased, as Envoy
/// gives them) and `:path`. Every source is stripped, not just the one that won.
pub fn extract<'c>(sources: &'c [KeySource], headers: &[Header], path: &[u8]) -> Extraction<'c> {
    let mut remove_headers = Vec::new();
    let mut rewritten_path: Option<Vec<u8>> = None;
    let mut found: Option<Vec<u8>> = None;
    let mut duplicate = false;

    for source in sources {
        let values: Vec<Vec<u8>> = match source {
            KeySource::Header { name } => header_values(headers, name)
                .map(|v| v.trim_ascii().to_vec())
                .collect(),
            KeySource::SchemeHeader { name, scheme } => header_values(headers, name)
                .flat_map(credentials)
                .filter_map(|v| strip_scheme(v, scheme))
                .collect(),
            KeySource::Query { name } => {
                let taken =
                    query::take_param(rewritten_path.as_deref().unwrap_or(path), name.as_bytes());
                if taken.rewritten.is_some() {
                    rewritten_path = taken.rewritten;
                }
                taken.values
            }
        };
        if values.is_empty() {
            continue;
        }
        if let KeySource::Header { name } | KeySource::SchemeHeader { name, .. } = source {
            remove_headers.push(name.as_str());
        }
        duplicate |= values.len() > 1;
        if found.is_none() {
            found = values.into_iter().find(|v| !v.is_empty());
        }
    }

    let outcome = match found {
        _ if duplicate => KeyOutcome::Duplicate,
        None => KeyOutcome::Missing,
        Some(key) if !is_well_formed(&key) => KeyOutcome::Malformed,
        Some(key) => KeyOutcome::Key(key),
    };
    Extraction {
        outcome,
        remove_headers,
        rewritten_path,
    }
}

fn header_values<'h>(headers: &'h [Header], name: &'h str) -> impl Iterator<Item = &'h [u8]> {
    headers
        .iter()
        .filter(move |(n, _)| n.eq_ignore_ascii_case(name.as_bytes()))
        .map(|(_, v)| *v)
}

/// Envoy joins a repeated inline header such as `authorization` into one value with
/// commas. A comma starts a new credential only where `word ` (or a tab) follows it, so a key that
/// itself holds a comma (`Bearer a,1`) stays whole.
fn credentials(value: &[u8]) -> Vec<&[u8]> {
    let mut parts = Vec::new();
    let mut start = 0;
    for (i, _) in value.iter().enumerate().filter(|(_, &b)| b == b',') {
        let rest = value.get(i + 1..).unwrap_or_default().trim_ascii_start();
        let word_len = rest
            .iter()
            .take_while(|&&b| !matches!(b, b' ' | b'\t' | b','))
            .count();
        if word_len > 0 && matches!(rest.get(word_len), Some(b' ' | b'\t')) {
            parts.push(value.get(start..i).unwrap_or_default());
            start = i + 1;
        }
    }
    parts.push(value.get(start..).unwrap_or_default());
    parts
}

/// `Bearer abc` → `abc`; `Bearer` alone (Envoy trims the trailing space) → empty;
/// another scheme → not ours.
fn strip_scheme(value: &[u8], scheme: &str) -> Option<Vec<u8>> {
    let value = value.trim_ascii();
    let (word, rest) = match value.iter().position(|&b| b == b' ' || b == b'\t') {
        Some(i) => (value.get(..i)?, value.get(i..)?),
        None => (value, &b""[..]),
    };
    word.eq_ignore_ascii_case(scheme.as_bytes())
        .then(|| rest.trim_ascii().to_vec())
}

fn is_well_formed(key: &[u8]) -> bool {
    key.len() <= MAX_KEY_LEN && key.iter().all(|b| (0x21..=0x7e).contains(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sources() -> Vec<KeySource> {
        vec![
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
        ]
    }

    fn h<'a>(pairs: &[(&'a str, &'a [u8])]) -> Vec<Header<'a>> {
        pairs.iter().map(|(n, v)| (n.as_bytes(), *v)).collect()
    }

    fn run(headers: &[(&str, &[u8])], path: &str) -> (KeyOutcome, Vec<String>, Option<String>) {
        let s = sources();
        let e = extract(&s, &h(headers), path.as_bytes());
        (
            e.outcome,
            e.remove_headers.iter().map(|s| s.to_string()).collect(),
            e.rewritten_path.map(|p| String::from_utf8(p).unwrap()),
        )
    }

    #[test]
    fn header_key() {
        let (o, rm, p) = run(&[("x-api-key", b"k1")], "/a");
        assert_eq!(o, KeyOutcome::Key(b"k1".to_vec()));
        assert_eq!(rm, vec!["x-api-key"]);
        assert_eq!(p, None);
    }

    #[test]
    fn bearer_key_any_case() {
        let (o, rm, _) = run(&[("authorization", b"bEaReR   k2")], "/");
        assert_eq!(o, KeyOutcome::Key(b"k2".to_vec()));
        assert_eq!(rm, vec!["authorization"]);
    }

    #[test]
    fn other_schemes_are_left_alone() {
        let (o, rm, _) = run(&[("authorization", b"Basic dXNlcjpwYXNz")], "/");
        assert_eq!(o, KeyOutcome::Missing);
        assert!(rm.is_empty());
        let (o, _, _) = run(&[("authorization", b"Bearerabc")], "/");
        assert_eq!(o, KeyOutcome::Missing);
    }

    #[test]
    fn bare_bearer_is_no_key_but_is_stripped() {
        let (o, rm, _) = run(&[("authorization", b"Bearer")], "/");
        assert_eq!(o, KeyOutcome::Missing);
        assert_eq!(rm, vec!["authorization"]);
    }

    #[test]
    fn query_key_and_path_rewrite() {
        let (o, rm, p) = run(&[], "/a?x=1&api_key=k%2B3&y=2");
        assert_eq!(o, KeyOutcome::Key(b"k+3".to_vec()));
        assert!(rm.is_empty());
        assert_eq!(p.as_deref(), Some("/a?x=1&y=2"));
    }

    #[test]
    fn first_non_empty_source_wins_and_all_are_stripped() {
        let (o, rm, p) = run(
            &[("x-api-key", b""), ("authorization", b"Bearer k2")],
            "/?api_key=k3",
        );
        assert_eq!(o, KeyOutcome::Key(b"k2".to_vec()));
        assert_eq!(rm, vec!["x-api-key", "authorization"]);
        assert_eq!(p.as_deref(), Some("/"));
    }

    #[test]
    fn repeated_header_or_parameter_is_a_duplicate() {
        assert_eq!(
            run(&[("x-api-key", b"a"), ("x-api-key", b"b")], "/").0,
            KeyOutcome::Duplicate
        );
        assert_eq!(
            run(&[("x-api-key", b"a"), ("x-api-key", b"a")], "/").0,
            KeyOutcome::Duplicate
        );
        assert_eq!(run(&[], "/?api_key=a&api_key=b").0, KeyOutcome::Duplicate);
        assert_eq!(
            run(&[("authorization", b"Bearer a,Bearer b")], "/").0,
            KeyOutcome::Duplicate
        );
        assert_eq!(
            run(&[("authorization", b"Basic x, Bearer b")], "/").0,
            KeyOutcome::Key(b"b".to_vec())
        );
    }

    #[test]
    fn a_comma_inside_a_bearer_key_is_part_of_it() {
        assert_eq!(
            run(&[("authorization", b"Bearer k,1")], "/").0,
            KeyOutcome::Key(b"k,1".to_vec())
        );
        assert_eq!(
            run(&[("authorization", b"Bearer k,1,Bearer k,2")], "/").0,
            KeyOutcome::Duplicate
        );
    }

    #[test]
    fn a_joined_bearer_credential_after_a_tab_is_still_stripped() {
        // Found by fuzzing: Envoy joins two authorization headers with a comma.
        let (o, rm, _) = run(
            &[
                ("x-api-key", b"k_good"),
                ("authorization", b"Basic dXNlcg==,Bearer\tsecret"),
            ],
            "/",
        );
        assert_eq!(o, KeyOutcome::Key(b"k_good".to_vec()));
        assert_eq!(rm, vec!["x-api-key", "authorization"]);
        let (o, _, p) = run(&[("x-api-key", b"a")], "/?api_key=b&api_key=c");
        assert_eq!(o, KeyOutcome::Duplicate);
        assert_eq!(p.as_deref(), Some("/"));
    }

    #[test]
    fn missing_when_no_source_has_a_key() {
        assert_eq!(run(&[("other", b"x")], "/?q=1").0, KeyOutcome::Missing);
        assert_eq!(run(&[("x-api-key", b"   ")], "/").0, KeyOutcome::Missing);
    }

    #[test]
    fn malformed_keys() {
        assert_eq!(
            run(&[("x-api-key", b"ab\xffcd")], "/").0,
            KeyOutcome::Malformed
        );
        assert_eq!(
            run(&[("x-api-key", &[b'a'; 8192])], "/").0,
            KeyOutcome::Malformed
        );
        assert_eq!(run(&[], "/?api_key=a%00b").0, KeyOutcome::Malformed);
        assert_eq!(run(&[], "/?api_key=a+b").0, KeyOutcome::Malformed);
        assert_eq!(
            run(&[("x-api-key", &[b'a'; MAX_KEY_LEN])], "/").0,
            KeyOutcome::Key(vec![b'a'; MAX_KEY_LEN])
        );
    }
}
