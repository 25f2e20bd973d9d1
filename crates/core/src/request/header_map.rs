//! Request headers as the host hands them over: one buffer in proxy-wasm's map
//! serialization, read in place instead of copied into a string per header.
//!
//! The layout: a little-endian u32 count; a (name length, value length) pair of u32 per
//! header; then each name and each value, in order, each followed by a NUL byte.

/// A header's name and value, borrowed from the host's buffer.
pub type Header<'a> = (&'a [u8], &'a [u8]);

/// The headers in `bytes`; none when the buffer is not a well-formed map (the key is
/// then missing, so the request is refused rather than judged on part of its headers).
pub fn parse(bytes: &[u8]) -> Vec<Header<'_>> {
    parse_all(bytes).unwrap_or_default()
}

fn parse_all(bytes: &[u8]) -> Option<Vec<Header<'_>>> {
    if bytes.is_empty() {
        return Some(Vec::new());
    }
    let count = read_u32(bytes, 0)?;
    let mut data = 4usize.checked_add(count.checked_mul(8)?)?;
    // Each header takes at least 10 bytes, so a count the buffer cannot hold is refused
    // before anything is allocated for it.
    let mut headers = Vec::with_capacity(count.min(bytes.len() / 10));
    for i in 0..count {
        let name_len = read_u32(bytes, 4 + i * 8)?;
        let value_len = read_u32(bytes, 8 + i * 8)?;
        let name = bytes.get(data..data.checked_add(name_len)?)?;
        data = data + name_len + 1;
        let value = bytes.get(data..data.checked_add(value_len)?)?;
        data = data + value_len + 1;
        headers.push((name, value));
    }
    Some(headers)
}

fn read_u32(bytes: &[u8], at: usize) -> Option<usize> {
    let field: [u8; 4] = bytes.get(at..at.checked_add(4)?)?.try_into().ok()?;
    usize::try_from(u32::from_le_bytes(field)).ok()
}

/// The first value of header `name` (a pseudo-header such as `:path`, say).
pub fn first<'a>(headers: &[Header<'a>], name: &str) -> Option<&'a [u8]> {
    headers
        .iter()
        .find(|(n, _)| *n == name.as_bytes())
        .map(|(_, v)| *v)
}

/// `headers` as the host serializes a map: what local replies send, and what tests and
/// fuzzing feed `parse`.
pub fn serialize(headers: &[Header]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(headers.len() as u32).to_le_bytes());
    for (name, value) in headers {
        out.extend_from_slice(&(name.len() as u32).to_le_bytes());
        out.extend_from_slice(&(value.len() as u32).to_le_bytes());
    }
    for (name, value) in headers {
        for part in [name, value] {
            out.extend_from_slice(part);
            out.push(0);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_the_host_writes() {
        let headers: Vec<Header> = vec![
            (b":path", b"/a?b=c"),
            (b"x-api-key", b"k1"),
            (b"x-api-key", b""),
            (b"empty-name-next", b"\0inner nul"),
        ];
        assert_eq!(parse(&serialize(&headers)), headers);
        assert_eq!(first(&headers, ":path"), Some(&b"/a?b=c"[..]));
        assert_eq!(first(&headers, ":method"), None);
    }

    #[test]
    fn nothing_is_no_headers() {
        assert!(parse(b"").is_empty());
        assert!(parse(&serialize(&[])).is_empty());
    }

    #[test]
    fn a_broken_buffer_gives_no_headers_at_all() {
        let whole = serialize(&[(b"a", b"1"), (b"x-api-key", b"secret")]);
        for cut in 1..whole.len() - 1 {
            assert!(parse(&whole[..cut]).is_empty(), "cut at {cut}");
        }
        let mut huge_count = whole.clone();
        huge_count[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(parse(&huge_count).is_empty());
        let mut huge_len = whole;
        huge_len[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(parse(&huge_len).is_empty());
    }
}
