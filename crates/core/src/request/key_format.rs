//! `key_format` (CONTRACT "Key format"): keys that prove their shape. A key must start with
//! one of the configured prefixes and, with the `crc32` checksum, end in 6 base62 digits
//! that are the CRC-32 (IEEE) of its random part, as GitHub's tokens do: a guessed key
//! fails before any lookup, and a leaked one is found by secret scanners.
use crate::config::{Checksum, KeyFormat};

/// Base62 digits, in the order of their values.
pub const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
/// Digits of the checksum at the end of a key.
pub const CHECKSUM_DIGITS: usize = 6;

/// Whether `key` is in the configured format.
pub fn conforms(key: &[u8], format: &KeyFormat) -> bool {
    let Some(prefix) = format
        .prefixes
        .iter()
        .find(|prefix| key.starts_with(prefix.as_bytes()))
    else {
        return false;
    };
    match format.checksum {
        None => true,
        Some(Checksum::Crc32) => {
            let rest = key.get(prefix.len()..).unwrap_or_default();
            let Some(split) = rest.len().checked_sub(CHECKSUM_DIGITS).filter(|&n| n > 0) else {
                return false;
            };
            let (random, check) = rest.split_at(split);
            random.iter().all(u8::is_ascii_alphanumeric) && check == checksum(random)
        }
    }
}

/// The CRC-32 of `random` in base62, most significant digit first, padded with `0`.
pub fn checksum(random: &[u8]) -> [u8; CHECKSUM_DIGITS] {
    let mut n = crc32fast::hash(random);
    let mut digits = [b'0'; CHECKSUM_DIGITS];
    for digit in digits.iter_mut().rev() {
        *digit = BASE62.get((n % 62) as usize).copied().unwrap_or(b'0');
        n /= 62;
    }
    digits
}

#[cfg(test)]
mod tests {
    use super::*;

    fn format(checksum: Option<Checksum>) -> KeyFormat {
        KeyFormat {
            prefixes: vec!["ghp_".into(), "sk_test_".into()],
            checksum,
        }
    }

    #[test]
    fn the_specs_worked_example() {
        assert_eq!(&checksum(b"zQWBuTSOoRi4A9spHcVY5ncnsDkxkJ"), b"0mLq17");
        assert!(conforms(
            b"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",
            &format(Some(Checksum::Crc32))
        ));
    }

    #[test]
    fn a_wrong_prefix_checksum_or_alphabet_does_not_conform() {
        let crc = format(Some(Checksum::Crc32));
        for key in [
            &b"ghx_zQWBuTSOoRi4A9spHcVY5ncnsDkxkJ0mLq17"[..],
            b"ghp_zQWBuTSOoRi4A9spHcVY5ncnsDkxkJ0mLq18",
            b"ghp_zQWBuTSOoRi4A9spHcVY5ncnsDkxkj0mLq17",
            b"ghp_0mLq17",
            b"ghp_",
            b"ghp_z-WBuT0mLq17",
            b"",
        ] {
            assert!(!conforms(key, &crc), "{}", String::from_utf8_lossy(key));
        }
    }

    #[test]
    fn without_a_checksum_the_prefix_is_enough() {
        assert!(conforms(b"sk_test_anything", &format(None)));
        assert!(!conforms(b"sk_live_anything", &format(None)));
    }

    #[test]
    fn small_checksums_are_padded_with_zeros() {
        // Find a random part whose CRC-32 is below 62^5, so it has a leading 0 digit.
        let random = (0u32..)
            .map(|i| format!("k{i}"))
            .find(|r| crc32fast::hash(r.as_bytes()) < 916_132_832)
            .unwrap();
        let digits = checksum(random.as_bytes());
        assert_eq!(digits[0], b'0');
        let key = format!("ghp_{random}{}", String::from_utf8_lossy(&digits));
        assert!(conforms(key.as_bytes(), &format(Some(Checksum::Crc32))));
    }
}
