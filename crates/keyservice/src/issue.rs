//! New keys and ids, from the operating system's cryptographic random source, in the
//! contract's key format (CONTRACT "Key format"): the prefix, 30 random base62 characters
//! and the 6-character base62 CRC-32 of those, as the filter's `key_format` checks them.
use apikey_core::request::key_format::{checksum, BASE62};
use apikey_core::vocabulary::key_hash::{hash_hex, hash_key};

/// Random base62 characters in a new key.
pub const RANDOM_CHARS: usize = 30;

/// A new key with `prefix`, and the hash the service files it under. Only the hash is
/// ever stored.
pub fn new_key(prefix: &str) -> Result<(String, String), getrandom::Error> {
    let random = base62(RANDOM_CHARS)?;
    let check = checksum(random.as_bytes());
    let mut key = String::with_capacity(prefix.len() + RANDOM_CHARS + check.len());
    key.push_str(prefix);
    key.push_str(&random);
    key.extend(check.iter().map(|&b| char::from(b)));
    let hash = key_hash(&key);
    Ok((key, hash))
}

/// The lowercase hex SHA-256 of a key, as the filter asks for it.
pub fn key_hash(key: &str) -> String {
    hash_hex(&hash_key(key.as_bytes()))
}

/// A new key id: `k_` and 16 random base62 characters.
pub fn new_key_id() -> Result<String, getrandom::Error> {
    Ok(format!("k_{}", base62(16)?))
}

/// A new admin token: `akadm_` and 40 random base62 characters.
pub fn new_admin_token() -> Result<String, getrandom::Error> {
    Ok(format!("akadm_{}", base62(40)?))
}

/// A `serve` process's name among those on one database.
pub fn new_process_id() -> Result<String, getrandom::Error> {
    base62(16)
}

/// `n` characters drawn uniformly from base62 (rejection sampling: no modulo bias).
fn base62(n: usize) -> Result<String, getrandom::Error> {
    let mut out = String::with_capacity(n);
    let mut bytes = [0u8; 64];
    while out.len() < n {
        getrandom::fill(&mut bytes)?;
        for byte in bytes {
            // 248 = 4 × 62: values at or above it would favour the first digits.
            if byte < 248 && out.len() < n {
                if let Some(&digit) = BASE62.get(usize::from(byte % 62)) {
                    out.push(char::from(digit));
                }
            }
        }
    }
    Ok(out)
}

/// Whether `prefix` can start a key: 1 to 64 visible ASCII characters, as the filter's
/// `key_format.prefixes`.
pub fn is_prefix(prefix: &str) -> bool {
    (1..=64).contains(&prefix.len()) && prefix.bytes().all(|b| b.is_ascii_graphic())
}

#[cfg(test)]
mod tests {
    use super::*;
    use apikey_core::config::{Checksum, KeyFormat};
    use apikey_core::request::key_format::conforms;

    #[test]
    fn a_new_key_is_in_the_filters_key_format_and_filed_under_its_hash() {
        let format = KeyFormat {
            prefixes: vec!["ak_live_".into()],
            checksum: Some(Checksum::Crc32),
        };
        let (key, hash) = new_key("ak_live_").unwrap();
        assert!(conforms(key.as_bytes(), &format), "{key}");
        assert_eq!(key.len(), "ak_live_".len() + RANDOM_CHARS + 6);
        assert_eq!(hash, key_hash(&key));
        assert_eq!(hash.len(), 64);
        assert_ne!(new_key("ak_live_").unwrap().0, key);
    }

    #[test]
    fn ids_and_tokens_are_random_base62() {
        let id = new_key_id().unwrap();
        assert!(id.starts_with("k_") && id.len() == 18, "{id}");
        assert!(id[2..].bytes().all(|b| b.is_ascii_alphanumeric()));
        assert_ne!(new_admin_token().unwrap(), new_admin_token().unwrap());
    }

    #[test]
    fn prefixes_are_visible_ascii() {
        assert!(is_prefix("ak_live_"));
        for bad in ["", "a b", "ключ", &"x".repeat(65)] {
            assert!(!is_prefix(bad), "{bad}");
        }
    }
}
