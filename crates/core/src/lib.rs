//! apikey-filter's core: API key authentication for Envoy, every decision of it.
//!
//! Plain modules that know nothing of proxy-wasm or Envoy's module ABI and are unit-tested
//! natively, grouped by concern; `pipeline` puts them together behind small host ports
//! (`pipeline::ports`). The hosts are crates of their own on this one: `apikey-filter-wasm`
//! (proxy-wasm) and `apikey-filter-module` (Envoy's dynamic modules) only turn those ports
//! into host calls.

/// The plugin configuration and its JSON reading.
pub mod config;
/// One callout per key (or task) for the whole node: leases, waiters, takeover, ticks.
pub mod flights;
/// The key cache (node-wide entries and each worker's copies) and the key service's answers.
pub mod keys;
/// Token buckets: their arithmetic and the compare-and-swap slots they live in.
pub mod limits;
/// The request pipeline, the per-worker state, and the host ports they act through.
pub mod pipeline;
/// Quotas across every node through a rate limit service: the RLS messages, each key's
/// allowance on the node.
pub mod quotas;
/// The request and its key: finding and stripping it, rules, refusals.
pub mod request;
/// Node-wide storage: the shared-data store trait and its fixed slot tables.
pub mod storage;
/// The ground floor: the words every other folder shares (a key's hash, a bucket's form,
/// JSON fields, addresses and web origins, the canonical path, form encoding, decimals).
/// It uses no other folder.
pub mod vocabulary;

/// The hosts' log lines: the `log` crate's records, written through a host's call.
pub mod host_log;

/// A `## heading` section of a page of `docs/` (`configuration.md`, `observability.md`),
/// for the tests that hold it to the code.
#[cfg(test)]
pub fn doc_section(page: &str, heading: &str) -> &'static str {
    let text = match page {
        "configuration.md" => include_str!("../../../docs/configuration.md"),
        "observability.md" => include_str!("../../../docs/observability.md"),
        other => panic!("no page {other} in the tests' list"),
    };
    text.split(&format!("\n## {heading}\n"))
        .nth(1)
        .and_then(|rest| rest.split("\n## ").next())
        .unwrap_or_else(|| panic!("docs/{page} has a {heading} section"))
}
