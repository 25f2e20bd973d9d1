//! The pipeline's host ports as proxy-wasm calls: nothing here decides anything.
use super::abi;
use apikey_core::pipeline::ports::{
    Callout, Callouts, Clock, GrpcCall, Host, NotSent, RequestIo, SetError, SharedStore, Stats,
    Wake,
};
use apikey_core::pipeline::stats::{counter_names, Counter, Gauge, Histogram, PREFIX};
use apikey_core::request::header_map;

/// A worker's host: its stats' ids, and the context it returns to.
pub struct WasmHost {
    root_id: u32,
    counters: Vec<Option<u32>>,
    histograms: Vec<Option<u32>>,
    gauges: Vec<Option<u32>>,
}

impl WasmHost {
    /// Defines every stat once, for the root context `root_id` (a stat Envoy refuses to
    /// define is skipped).
    pub fn new(root_id: u32) -> WasmHost {
        let define =
            |metric_type, name: &str| abi::define_metric(metric_type, &format!("{PREFIX}{name}"));
        WasmHost {
            root_id,
            counters: counter_names()
                .iter()
                .map(|name| define(abi::COUNTER, name))
                .collect(),
            histograms: Histogram::ALL
                .iter()
                .map(|h| define(abi::HISTOGRAM, h.name()))
                .collect(),
            gauges: Gauge::ALL
                .iter()
                .map(|g| define(abi::GAUGE, g.name()))
                .collect(),
        }
    }
}

impl Clock for WasmHost {
    fn now_ms(&self) -> u64 {
        abi::now_ms()
    }
}

impl SharedStore for WasmHost {
    fn get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        // A CAS of 0 would make the write that follows unconditional.
        abi::shared_data(key).filter(|&(_, cas)| cas != 0)
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), SetError> {
        match abi::set_shared_data(key, value, cas.unwrap_or(0)) {
            abi::OK => Ok(()),
            abi::CAS_MISMATCH => Err(SetError::CasMismatch),
            _ => Err(SetError::Failed),
        }
    }
}

impl Callouts for WasmHost {
    fn send_callout(&self, callout: &Callout) -> Result<u32, NotSent> {
        let headers: Vec<header_map::Header> = callout
            .headers
            .iter()
            .map(|(n, v)| (n.as_bytes(), v.as_bytes()))
            .collect();
        let headers = header_map::serialize(&headers);
        match abi::http_call(callout.cluster, &headers, callout.timeout_ms) {
            Ok(token) => Ok(token),
            // Envoy's async client failed the call inside `send`, and Envoy dropped its
            // answer (a circuit breaker's overflow, or no healthy host).
            Err(abi::INTERNAL_FAILURE) => Err(NotSent::AnsweredAtOnce),
            Err(status) => {
                log::debug!(
                    "callout to cluster {} refused (status {status})",
                    callout.cluster
                );
                Err(NotSent::Refused)
            }
        }
    }

    fn callout_status(&self) -> Option<Vec<u8>> {
        abi::header_value(abi::CALLOUT_RESPONSE_HEADERS, ":status")
    }

    fn callout_body(&self, size: usize) -> Vec<u8> {
        abi::callout_body(size)
    }

    fn callout_overloaded(&self) -> bool {
        abi::header_value(abi::CALLOUT_RESPONSE_HEADERS, "x-envoy-overloaded").is_some()
    }

    fn send_grpc(&self, call: &GrpcCall) -> Option<u32> {
        let sent = abi::grpc_call(
            call.service,
            call.service_name,
            call.method,
            call.message,
            call.timeout_ms,
        );
        match sent {
            Ok(token) => Some(token),
            Err(status) => {
                log::debug!("gRPC call refused (status {status})");
                None
            }
        }
    }

    fn grpc_message(&self, size: usize) -> Vec<u8> {
        abi::grpc_message(size)
    }
}

impl Wake for WasmHost {
    fn wake(&self, queue: u32, message: &[u8]) -> bool {
        abi::enqueue(queue, message)
    }

    fn set_tick_ms(&self, period_ms: u64) {
        abi::set_tick_period_ms(period_ms);
    }
}

impl Stats for WasmHost {
    fn count_n(&self, counter: Counter, n: u64) {
        if let (Some(Some(id)), Ok(n @ 1..)) =
            (self.counters.get(counter.index()), i64::try_from(n))
        {
            abi::increment_metric(*id, n);
        }
    }

    fn define_counter(&self, name: &str) -> Option<u32> {
        abi::define_metric(abi::COUNTER, &format!("{PREFIX}{name}"))
    }

    fn count_defined(&self, id: u32) {
        abi::increment_metric(id, 1);
    }

    fn record(&self, histogram: Histogram, value: u64) {
        if let Some(Some(id)) = self.histograms.get(histogram as usize) {
            abi::record_metric(*id, value);
        }
    }

    fn set_gauge(&self, gauge: Gauge, value: u64) {
        if let Some(Some(id)) = self.gauges.get(gauge as usize) {
            abi::record_metric(*id, value);
        }
    }
}

impl Host for WasmHost {
    type Parked = WasmRequest;

    fn parked(&self, context_id: u32) -> Option<WasmRequest> {
        abi::set_effective_context(context_id).then_some(WasmRequest)
    }

    fn unpark(&self) {
        let _ = abi::set_effective_context(self.root_id);
    }
}

/// The request whose context is the host's current (effective) one.
pub struct WasmRequest;

impl RequestIo for WasmRequest {
    fn client_address(&mut self) -> Option<Vec<u8>> {
        abi::property(b"source\0address")
    }

    fn remove_header(&mut self, name: &str) {
        abi::remove_header(abi::REQUEST_HEADERS, name);
    }

    fn set_header(&mut self, name: &str, value: &[u8]) {
        abi::replace_header(abi::REQUEST_HEADERS, name, value);
    }

    fn add_response_header(&mut self, name: &str, value: &str) {
        abi::add_header(abi::RESPONSE_HEADERS, name, value.as_bytes());
    }

    /// Filter state for access logs, read as `%FILTER_STATE(wasm.<name>:PLAIN)%` (Envoy
    /// puts properties a wasm filter sets under `wasm.`). A path of one segment is its
    /// bytes as they are.
    fn log_fingerprint(&mut self, fingerprint: &str) {
        abi::set_property("apikey_filter.fingerprint", fingerprint);
    }

    fn reply(&mut self, status: u32, body: &str, headers: &[(&str, &str)]) {
        let headers: Vec<header_map::Header> = headers
            .iter()
            .map(|(n, v)| (n.as_bytes(), v.as_bytes()))
            .collect();
        abi::send_local_response(status, body, &header_map::serialize(&headers));
    }

    fn resume(&mut self) {
        abi::resume_request();
    }
}
