//! The filter's behaviour as one piece of plain Rust behind host ports: a request's way
//! through the checks (`request`), the worker (`worker`) and its desks (`lookups`,
//! `feed`, `quotas`, over a shared `context`), the stats (`stats`) and the log throttle
//! (`warnings`). Tested natively against a fake host (`fake`).
mod context;
mod feed;
mod lookups;
mod per_key;
pub mod ports;
pub mod quotas;
pub mod rebuild;
pub mod request;
pub mod stats;
mod warnings;
pub mod worker;

#[cfg(test)]
pub mod fake;
#[cfg(test)]
mod tests;
