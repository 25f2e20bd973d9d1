//! What the pipeline needs from the host, as small traits. The wasm layer implements
//! them with proxy-wasm calls; the tests with a fake host; a dynamic module would with
//! its own ABI. Each port answers a refusal with a value, never a panic.
use super::stats::{Counter, Gauge, Histogram};
pub use crate::storage::shared_store::{SetError, SharedStore};

/// The host's wall clock.
pub trait Clock {
    /// Milliseconds since the Unix epoch (0 if the host refuses).
    fn now_ms(&self) -> u64;
}

/// An HTTP callout the host sends on the worker's behalf (`GET`, no body).
pub struct Callout<'a> {
    pub cluster: &'a str,
    pub headers: Vec<(&'a str, &'a str)>,
    pub timeout_ms: u64,
}

/// A unary gRPC call the host sends on the worker's (or a request's) behalf.
pub struct GrpcCall<'a> {
    pub cluster: &'a str,
    /// A serialized `envoy.config.core.v3.GrpcService` naming `cluster` (proxy-wasm's
    /// way to name it).
    pub service: &'a [u8],
    pub service_name: &'a str,
    pub method: &'a str,
    pub message: &'a [u8],
    pub timeout_ms: u64,
}

/// Why the host did not send a callout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotSent {
    /// It cannot be sent (e.g. the cluster does not exist).
    Refused,
    /// Envoy answered it itself, at once, before it left: proxy-wasm then reports a
    /// failure without the answer. That is how a cluster over its circuit breaker (and one
    /// with no healthy host) looks: load, as far as the filter can tell.
    AnsweredAtOnce,
}

pub trait Callouts {
    /// Sends `callout`; its answer comes back with the token returned.
    fn send_callout(&self, callout: &Callout) -> Result<u32, NotSent>;
    /// The `:status` of the answer being delivered; `None` when it had no headers (a
    /// reset).
    fn callout_status(&self) -> Option<Vec<u8>>;
    /// The first `size` bytes of the body of the answer being delivered.
    fn callout_body(&self, size: usize) -> Vec<u8>;
    /// Whether the answer being delivered is Envoy's own, for a cluster over its circuit
    /// breaker (`x-envoy-overloaded`): the key service was never asked.
    fn callout_overloaded(&self) -> bool;
    /// Sends `call` from the context that is acting now: a request's own call ends with
    /// the request. Its answer comes back with the token returned; `None`: refused.
    fn send_grpc(&self, call: &GrpcCall) -> Option<u32>;
    /// The first `size` bytes of the gRPC answer's message being delivered.
    fn grpc_message(&self, size: usize) -> Vec<u8>;
}

/// Waking a worker: this one's own root context, or another worker, through its queue;
/// and this worker's periodic tick.
pub trait Wake {
    /// Queues `message` for the worker that owns `queue`; false if the host refused.
    fn wake(&self, queue: u32, message: &[u8]) -> bool;
    /// Calls `on_tick` every `period_ms`; 0 stops the tick.
    fn set_tick_ms(&self, period_ms: u64);
}

pub trait Stats {
    /// Adds `n` (more than 0) to `counter`.
    fn count_n(&self, counter: Counter, n: u64);
    fn record(&self, histogram: Histogram, value: u64);
    fn set_gauge(&self, gauge: Gauge, value: u64);
    /// Defines a counter named at run time (per-key stats: `name` without the prefix);
    /// its id, `None` when the host refuses.
    fn define_counter(&self, name: &str) -> Option<u32>;
    /// Adds 1 to a counter `define_counter` made.
    fn count_defined(&self, id: u32);

    fn count(&self, counter: Counter) {
        self.count_n(counter, 1);
    }
}

/// One request: what it carries beyond its headers, header edits and replies.
pub trait RequestIo {
    /// Envoy's downstream remote address (`source.address`, `ip:port`).
    fn client_address(&mut self) -> Option<Vec<u8>>;
    fn remove_header(&mut self, name: &str);
    fn set_header(&mut self, name: &str, value: &[u8]);
    fn add_response_header(&mut self, name: &str, value: &str);
    /// Names, for the access log, a key the filter answered itself or forwarded without
    /// identity; an accepted key is named by its identity headers, at no cost.
    fn log_fingerprint(&mut self, fingerprint: &str);
    /// Answers the request here with a local reply.
    fn reply(&mut self, status: u32, body: &str, headers: &[(&str, &str)]);
    /// Lets a paused request go on upstream.
    fn resume(&mut self);
}

/// Everything a worker acts through.
pub trait Host: Clock + SharedStore + Callouts + Wake + Stats {
    /// A request parked on a lookup, acted on from outside its own callbacks.
    type Parked: RequestIo;
    /// Request `context_id` to act on; `None` when it is gone (its client went away).
    fn parked(&self, context_id: u32) -> Option<Self::Parked>;
    /// Done acting on parked requests: back to the worker's own context.
    fn unpark(&self);
}
