//! A key is only ever handled as its SHA-256: that is what is cached, what the key
//! service is asked about, and (shortened) what logs name.
use sha2::{Digest, Sha256};

pub type KeyHash = [u8; 32];

pub fn hash_key(raw_key: &[u8]) -> KeyHash {
    Sha256::digest(raw_key).into()
}

/// Lowercase hex of the whole hash: what the key service protocol uses.
pub fn hash_hex(hash: &KeyHash) -> String {
    let mut digits = [0u8; 64];
    // Cannot fail: 32 bytes always fill 64 digits. (`hex::encode` goes char by char.)
    let _ = hex::encode_to_slice(hash, &mut digits);
    String::from_utf8_lossy(&digits).into_owned()
}

/// First 12 hex digits: enough to tell keys apart in a log, useless to an attacker.
/// Made on every request, so it lives on the stack.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Fingerprint([u8; 12]);

impl Fingerprint {
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

impl std::fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

pub fn fingerprint(hash: &KeyHash) -> Fingerprint {
    let mut digits = [0u8; 12];
    // Cannot fail: 6 bytes always fill 12 digits.
    let _ = hex::encode_to_slice(hash.get(..6).unwrap_or_default(), &mut digits);
    Fingerprint(digits)
}

/// Which of `slots` fixed shared-data slots holds this hash's cache entry.
pub fn slot_of(hash: &KeyHash, slots: u32) -> u32 {
    let mut prefix = [0u8; 8];
    prefix.copy_from_slice(hash.get(..8).unwrap_or(&[0; 8]));
    (u64::from_le_bytes(prefix) % u64::from(slots.max(1))) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_is_sha256_of_the_raw_bytes() {
        assert_eq!(
            hash_hex(&hash_key(b"abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn fingerprint_is_the_first_twelve_hex_digits() {
        let fingerprint = fingerprint(&hash_key(b"abc"));
        assert_eq!(fingerprint.as_str(), "ba7816bf8f01");
        assert_eq!(fingerprint.to_string(), "ba7816bf8f01");
    }

    #[test]
    fn slots_stay_in_range() {
        for i in 0..1000u32 {
            assert!(slot_of(&hash_key(&i.to_le_bytes()), 7) < 7);
        }
        assert_eq!(slot_of(&hash_key(b"x"), 1), 0);
    }
}
