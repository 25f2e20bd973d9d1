//! Numbers written into text made on every request (shared-data slot names, the
//! `RateLimit` field), without the formatting machinery: it costs more than the rest of
//! building such a string.

/// Appends `n` in decimal.
pub fn push(out: &mut String, n: u64) {
    if n >= 10 {
        push(out, n / 10);
    }
    out.push(char::from(b'0' + (n % 10) as u8));
}

#[cfg(test)]
mod tests {
    #[test]
    fn writes_what_display_writes() {
        for n in [0, 7, 10, 99, 100, 4096, 1_000_000_007, u64::MAX] {
            let mut out = String::from("x=");
            super::push(&mut out, n);
            assert_eq!(out, format!("x={n}"));
        }
    }
}
