//! Numbers written into text made on every request (shared-data slot names, the
//! `RateLimit` field), without the formatting machinery: it costs more than the rest of
//! building such a string.

/// Appends `n` in decimal.
pub fn push(out: &mut String, mut n: u64) {
    // Written from the right; u64::MAX has 20 digits.
    let mut digits = [0u8; 20];
    let mut used = 0;
    for digit in digits.iter_mut().rev() {
        *digit = b'0' + (n % 10) as u8;
        used += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    let digits = digits.get(digits.len() - used..).unwrap_or_default();
    out.extend(digits.iter().map(|&d| char::from(d)));
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
