//! The query string of `:path`: reading a parameter as
//! `application/x-www-form-urlencoded` and removing it while keeping every other
//! parameter byte for byte, in order.

/// `:path` split at the first `?` into the path proper and the query.
pub fn split_path(path: &[u8]) -> (&[u8], Option<&[u8]>) {
    match path.iter().position(|&b| b == b'?') {
        Some(i) => (path.get(..i).unwrap_or(path), path.get(i + 1..)),
        None => (path, None),
    }
}

/// `component` percent-encoded for a query value: unreserved bytes as they are, every
/// other byte as `%XX`.
pub fn form_encode(component: &[u8]) -> String {
    let mut out = String::with_capacity(component.len());
    for &b in component {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Decodes one form component: `+` is a space, `%XX` a byte; a `%` that does not start
/// a valid escape is kept as it is (as browsers and the WHATWG URL standard do).
pub fn form_decode(component: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(component.len());
    let mut rest = component;
    while let Some((&b, tail)) = rest.split_first() {
        match (b, tail) {
            (b'+', _) => out.push(b' '),
            (b'%', [hi, lo, ..]) if hi.is_ascii_hexdigit() && lo.is_ascii_hexdigit() => {
                out.push(hex_value(*hi) << 4 | hex_value(*lo));
                rest = tail.get(2..).unwrap_or_default();
                continue;
            }
            _ => out.push(b),
        }
        rest = tail;
    }
    out
}

fn hex_value(digit: u8) -> u8 {
    match digit {
        b'0'..=b'9' => digit - b'0',
        b'a'..=b'f' => digit - b'a' + 10,
        b'A'..=b'F' => digit - b'A' + 10,
        _ => 0,
    }
}

/// What taking a parameter out of `:path` found and left.
#[derive(Debug, PartialEq, Eq)]
pub struct Taken {
    /// The decoded values of every occurrence, in order.
    pub values: Vec<Vec<u8>>,
    /// The path without them; `None` when there was nothing to remove.
    pub rewritten: Option<Vec<u8>>,
}

/// Removes every occurrence of parameter `name` from `path`. The `?` goes too when no
/// parameter is left.
pub fn take_param(path: &[u8], name: &[u8]) -> Taken {
    let (base, Some(query)) = split_path(path) else {
        return Taken {
            values: Vec::new(),
            rewritten: None,
        };
    };
    let mut values = Vec::new();
    let mut kept: Vec<&[u8]> = Vec::new();
    for pair in query.split(|&b| b == b'&') {
        let (raw_name, raw_value) = match pair.iter().position(|&b| b == b'=') {
            Some(i) => (
                pair.get(..i).unwrap_or(pair),
                pair.get(i + 1..).unwrap_or_default(),
            ),
            None => (pair, &b""[..]),
        };
        if !pair.is_empty() && form_decode(raw_name) == name {
            values.push(form_decode(raw_value));
        } else {
            kept.push(pair);
        }
    }
    if values.is_empty() {
        return Taken {
            values,
            rewritten: None,
        };
    }
    let mut rewritten = base.to_vec();
    // Empty pieces (`?api_key=k&`) are no parameters: with nothing else, no `?` either.
    if kept.iter().any(|piece| !piece.is_empty()) {
        rewritten.push(b'?');
        rewritten.extend_from_slice(&kept.join(&b'&'));
    }
    Taken {
        values,
        rewritten: Some(rewritten),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn take(path: &str, name: &str) -> (Vec<String>, Option<String>) {
        let t = take_param(path.as_bytes(), name.as_bytes());
        (
            t.values
                .iter()
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .collect(),
            t.rewritten.map(|p| String::from_utf8(p).unwrap()),
        )
    }

    #[test]
    fn removes_the_parameter_and_keeps_the_rest_in_order() {
        assert_eq!(
            take("/a?x=1&api_key=k1&y=%2F&z", "api_key"),
            (vec!["k1".into()], Some("/a?x=1&y=%2F&z".into()))
        );
    }

    #[test]
    fn drops_the_question_mark_when_nothing_is_left() {
        assert_eq!(
            take("/a?api_key=k1", "api_key"),
            (vec!["k1".into()], Some("/a".into()))
        );
    }

    #[test]
    fn empty_pieces_alone_leave_no_question_mark() {
        assert_eq!(
            take("/a?api_key=k&", "api_key"),
            (vec!["k".into()], Some("/a".into()))
        );
        assert_eq!(
            take("/a?&api_key=k", "api_key"),
            (vec!["k".into()], Some("/a".into()))
        );
        assert_eq!(take("/a?x&&api_key=k", "api_key").1, Some("/a?x&".into()));
    }

    #[test]
    fn leaves_the_path_alone_without_the_parameter() {
        assert_eq!(take("/a?x=1", "api_key"), (vec![], None));
        assert_eq!(take("/a", "api_key"), (vec![], None));
        assert_eq!(take("/a?api_keyx=1", "api_key"), (vec![], None));
    }

    #[test]
    fn finds_every_occurrence() {
        assert_eq!(
            take("/a?api_key=1&b=2&api_key=3", "api_key"),
            (vec!["1".into(), "3".into()], Some("/a?b=2".into()))
        );
    }

    #[test]
    fn decodes_names_and_values_as_forms_do() {
        assert_eq!(
            take("/?api%5Fkey=a+b%2Bc", "api_key").0,
            vec!["a b+c".to_string()]
        );
        assert_eq!(take("/?api_key", "api_key").0, vec!["".to_string()]);
    }

    #[test]
    fn keeps_bad_escapes_literally() {
        assert_eq!(form_decode(b"%zz%4"), b"%zz%4".to_vec());
        assert_eq!(form_decode(b"%41%e2%82%ac"), "A€".as_bytes().to_vec());
        assert_eq!(form_decode(b"%ff"), vec![0xff]);
    }

    proptest! {
        #[test]
        fn encoding_then_decoding_gives_the_bytes_back(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            prop_assert_eq!(form_decode(form_encode(&bytes).as_bytes()), bytes);
        }

        #[test]
        fn never_panics_and_never_keeps_the_parameter(path in proptest::collection::vec(any::<u8>(), 0..64)) {
            let taken = take_param(&path, b"k");
            match taken.rewritten {
                Some(rewritten) => {
                    prop_assert!(take_param(&rewritten, b"k").values.is_empty());
                    prop_assert!(rewritten.len() < path.len());
                }
                None => prop_assert!(taken.values.is_empty(), "a parameter found is removed"),
            }
        }
    }
}
