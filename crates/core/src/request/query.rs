//! The query string of `:path`: reading a parameter as
//! `application/x-www-form-urlencoded` and removing it while keeping every other
//! parameter byte for byte, in order.
use crate::vocabulary::form::form_decode;

/// `:path` split at the first `?` into the path proper and the query.
pub fn split_path(path: &[u8]) -> (&[u8], Option<&[u8]>) {
    match path.iter().position(|&b| b == b'?') {
        Some(i) => (path.get(..i).unwrap_or(path), path.get(i + 1..)),
        None => (path, None),
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

    proptest! {
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
