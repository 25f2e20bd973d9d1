//! apikey-filter: API key authentication for Envoy as a proxy-wasm filter.
//!
//! Everything that decides lives in plain modules that know nothing of proxy-wasm and
//! are unit-tested natively; `filter` is the thin layer that turns them into host calls
//! and only exists in the wasm build.
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )
)]

pub mod authorize;
pub mod bucket;
pub mod cache_entry;
pub mod callout;
pub mod client_address;
pub mod config;
pub mod decimal;
pub mod denial;
pub mod extract;
pub mod header_map;
pub mod json_fields;
pub mod key_hash;
pub mod local_cache;
pub mod lookup_lock;
pub mod query;
pub mod rate_limit;
pub mod record;
pub mod rules;
pub mod shared_store;
pub mod slots;

#[cfg(target_arch = "wasm32")]
mod filter;
