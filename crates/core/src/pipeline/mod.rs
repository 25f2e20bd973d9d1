//! The filter's behaviour as one piece of plain Rust behind host ports: a request's way
//! through the checks (`request`), the per-worker state and the key service lookups
//! (`worker`), the stats (`stats`) and the log throttle (`warnings`). Tested natively
//! against a fake host (`fake`).
pub mod feed;
pub mod per_key;
pub mod ports;
pub mod quotas;
pub mod rebuild;
pub mod request;
pub mod stats;
pub mod warnings;
pub mod worker;

#[cfg(test)]
pub mod fake;
#[cfg(test)]
mod tests;
