//! The part of proxy-wasm shared data the rate limiter needs, as a trait, so the
//! compare-and-swap loop can be tested natively against a store that interleaves writers.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetError {
    /// Someone wrote the key since it was read.
    CasMismatch,
    Failed,
}

pub trait SharedStore {
    /// The value and its CAS; `None` when the key was never written.
    fn get(&self, key: &str) -> Option<(Vec<u8>, u32)>;
    /// Writes if the key's CAS is still `cas`. Envoy's rules: `None` writes
    /// unconditionally, and a key that does not exist is always inserted.
    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), SetError>;
}
