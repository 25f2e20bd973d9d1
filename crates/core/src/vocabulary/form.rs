//! `application/x-www-form-urlencoded` components: what a query parameter's value is, and
//! how one is written.

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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

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
    }
}
