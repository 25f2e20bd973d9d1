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

#[cfg(test)]
pub mod fake {
    use super::*;
    use std::cell::{Cell, RefCell};
    use std::collections::HashMap;

    pub type OtherWorker = Box<dyn FnMut(&FakeStore)>;

    /// Shared data with Envoy's CAS rules, and a hook that lets "another worker" act
    /// between a read and the write that follows it.
    #[derive(Default)]
    pub struct FakeStore {
        pub data: RefCell<HashMap<String, (Vec<u8>, u32)>>,
        pub next_cas: Cell<u32>,
        pub interleave: RefCell<Option<OtherWorker>>,
        pub mismatches: Cell<u32>,
        pub reads: Cell<u32>,
    }

    impl SharedStore for FakeStore {
        fn get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
            self.reads.set(self.reads.get() + 1);
            self.data.borrow().get(key).cloned()
        }

        fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), SetError> {
            let hook = self.interleave.borrow_mut().take();
            if let Some(mut other_worker) = hook {
                other_worker(self);
                *self.interleave.borrow_mut() = Some(other_worker);
            }
            let mut data = self.data.borrow_mut();
            if let (Some(cas), Some((_, current))) = (cas, data.get(key)) {
                if cas != 0 && cas != *current {
                    self.mismatches.set(self.mismatches.get() + 1);
                    return Err(SetError::CasMismatch);
                }
            }
            self.next_cas.set(self.next_cas.get() + 1);
            data.insert(key.to_string(), (value.to_vec(), self.next_cas.get()));
            Ok(())
        }
    }
}
