//! The filter's Envoy stats (SPEC "Observability"), defined once per VM.
use crate::callout::Failure;
use crate::denial::{Denial, CODES};
use proxy_wasm::hostcalls;
use proxy_wasm::types::MetricType;

pub struct Metrics {
    allowed: u32,
    denied: [u32; CODES.len()],
    pub cache_hit: u32,
    pub cache_miss: u32,
    pub cache_negative_hit: u32,
    pub cache_stale: u32,
    pub key_service_found: u32,
    pub key_service_not_found: u32,
    pub key_service_error: u32,
    /// `key_service.error.<kind>`, in the order of `Failure::KINDS`.
    key_service_errors: [u32; Failure::KINDS.len()],
    key_service_latency_ms: u32,
    pub rate_limit_unavailable: u32,
    pub key_service_joined: u32,
    pub failure_open: u32,
}

/// Metric ids are only ever used to count; a metric Envoy refused to define is skipped.
const UNDEFINED: u32 = u32::MAX;

fn define(metric_type: MetricType, name: &str) -> u32 {
    hostcalls::define_metric(metric_type, &format!("apikey_filter.{name}")).unwrap_or(UNDEFINED)
}

impl Metrics {
    pub fn define() -> Metrics {
        let counter = |name: &str| define(MetricType::Counter, name);
        Metrics {
            allowed: counter("allowed"),
            denied: CODES.map(|code| counter(&format!("denied.{code}"))),
            cache_hit: counter("cache.hit"),
            cache_miss: counter("cache.miss"),
            cache_negative_hit: counter("cache.negative_hit"),
            cache_stale: counter("cache.stale"),
            key_service_found: counter("key_service.found"),
            key_service_not_found: counter("key_service.not_found"),
            key_service_error: counter("key_service.error"),
            key_service_errors: Failure::KINDS
                .map(|kind| counter(&format!("key_service.error.{kind}"))),
            key_service_latency_ms: define(MetricType::Histogram, "key_service.latency_ms"),
            rate_limit_unavailable: counter("rate_limit.unavailable"),
            key_service_joined: counter("key_service.joined"),
            failure_open: counter("failure_open"),
        }
    }

    pub fn count(&self, id: u32) {
        if id != UNDEFINED {
            super::host::increment_counter(id);
        }
    }

    pub fn allowed(&self) {
        self.count(self.allowed);
    }

    pub fn denied(&self, denial: Denial) {
        if let Some(&id) = self.denied.get(denial.code_index()) {
            self.count(id);
        }
    }

    pub fn key_service_failed(&self, failure: &Failure) {
        self.count(self.key_service_error);
        if let Some(&id) = self.key_service_errors.get(failure.kind_index()) {
            self.count(id);
        }
    }

    pub fn key_service_latency(&self, ms: u64) {
        if self.key_service_latency_ms != UNDEFINED {
            let _ = hostcalls::record_metric(self.key_service_latency_ms, ms);
        }
    }
}
