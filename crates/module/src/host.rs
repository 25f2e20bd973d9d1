//! The pipeline's host ports for the dynamic module: nothing here decides anything.
//!
//! What a worker does to a request is recorded and carried out once the worker is done
//! (`super::actions`): Envoy's header getters lend bytes a header change may free, and a
//! local reply runs the response hooks at once. Callouts and gRPC calls are queued for
//! the main thread, which sends them (`super::node`).
use super::abi::{self, EnvoyPtr, MetricType};
use super::actions::{self, ActionLog, Parked};
use super::filter_config::{FilterConfig, Outgoing, OutgoingKind};
use super::mailbox::{self, CallAnswer, Event, Mailbox};
use apikey_core::pipeline::ports::{
    Callout, Callouts, Clock, GrpcCall, Host, NotSent, RequestIo, SetError, SharedStore, Stats,
    Wake,
};
use apikey_core::pipeline::stats::{Counter, Gauge, Histogram};
use apikey_core::storage::process_store::ProcessStore;
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::{Arc, OnceLock};

use std::time::{SystemTime, UNIX_EPOCH};

/// Shared data of the whole process: every configuration's worker uses it, as every
/// wasm VM of one `vm_id` shares one store.
pub fn store() -> &'static ProcessStore {
    static STORE: OnceLock<ProcessStore> = OnceLock::new();
    STORE.get_or_init(ProcessStore::default)
}

/// The request a hook is handling on the calling thread.
struct Current {
    context_id: u32,
    filter: EnvoyPtr,
}

pub struct NativeHost {
    node: Arc<FilterConfig>,
    mailbox: Arc<Mailbox>,
    answer: RefCell<CallAnswer>,
    current: RefCell<Option<Current>>,
    /// Parked requests, by context id.
    parked: RefCell<HashMap<u32, Rc<Parked>>>,
    /// The `key_id` label of each per-key counter pair `define_counter` gave out.
    per_key_labels: RefCell<PerKeyLabels>,
}

/// The `key_id` labels of per-key counters, by the index their ids are made of, and the
/// index of each (a key's first request on a worker finds it without a scan).
#[derive(Default)]
struct PerKeyLabels {
    by_index: Vec<String>,
    index: HashMap<String, usize>,
}

impl NativeHost {
    pub fn new(node: Arc<FilterConfig>, mailbox: Arc<Mailbox>) -> NativeHost {
        NativeHost {
            node,
            mailbox,
            answer: RefCell::default(),
            current: RefCell::default(),
            parked: RefCell::default(),
            per_key_labels: RefCell::default(),
        }
    }

    /// The request the calling hook hands to the worker.
    pub fn begin(&self, context_id: u32, filter: EnvoyPtr) -> NativeRequest {
        *self.current.borrow_mut() = Some(Current { context_id, filter });
        NativeRequest::current(filter)
    }

    /// Done with the calling hook's request.
    pub fn end(&self) {
        *self.current.borrow_mut() = None;
    }

    /// Keeps a waiting request reachable (`Host::parked`).
    pub fn park(&self, context_id: u32, parked: Rc<Parked>) {
        self.parked.borrow_mut().insert(context_id, parked);
    }

    /// Forgets a parked request that ended.
    pub fn forget(&self, context_id: u32) {
        self.parked.borrow_mut().remove(&context_id);
    }

    pub fn set_answer(&self, answer: CallAnswer) {
        *self.answer.borrow_mut() = answer;
    }

    fn config(&self) -> EnvoyPtr {
        self.node.config()
    }

    fn change(
        &self,
        metric_type: MetricType,
        id: Option<&Option<usize>>,
        labels: &[&str],
        value: u64,
    ) {
        if let Some(Some(id)) = id {
            // SAFETY: the configuration lives as long as its worker; stats are atomic.
            unsafe { abi::change_metric(self.config(), metric_type, *id, labels, value) }
        }
    }
}

impl Clock for NativeHost {
    fn now_ms(&self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64)
    }
}

impl SharedStore for NativeHost {
    fn get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        store().get(key)
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), SetError> {
        store().set(key, value, cas)
    }
}

impl Callouts for NativeHost {
    fn send_callout(&self, callout: &Callout) -> Result<u32, NotSent> {
        let headers = callout
            .headers
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect();
        // Sent later, from the main thread: Envoy's own answers arrive as answers.
        Ok(self.node.send(
            self.mailbox.queue,
            Outgoing {
                cluster: callout.cluster.to_string(),
                headers,
                body: Vec::new(),
                timeout_ms: callout.timeout_ms,
                kind: OutgoingKind::Callout,
            },
        ))
    }

    fn callout_status(&self) -> Option<Vec<u8>> {
        self.answer.borrow().status.clone()
    }

    fn callout_body(&self, size: usize) -> Vec<u8> {
        let answer = self.answer.borrow();
        answer.body.get(..size).unwrap_or(&answer.body).to_vec()
    }

    fn callout_overloaded(&self) -> bool {
        self.answer.borrow().overloaded
    }

    fn send_grpc(&self, call: &GrpcCall) -> Option<u32> {
        let mut headers = vec![
            (":method".to_string(), "POST".to_string()),
            (
                ":path".to_string(),
                format!("/{}/{}", call.service_name, call.method),
            ),
            (":authority".to_string(), call.cluster.to_string()),
            ("content-type".to_string(), "application/grpc".to_string()),
            ("te".to_string(), "trailers".to_string()),
        ];
        if call.timeout_ms > 0 {
            headers.push(("grpc-timeout".to_string(), format!("{}m", call.timeout_ms)));
        }
        // A gRPC message: uncompressed, its length, its bytes.
        let mut body = Vec::with_capacity(5 + call.message.len());
        body.push(0);
        body.extend_from_slice(&u32::try_from(call.message.len()).ok()?.to_be_bytes());
        body.extend_from_slice(call.message);
        Some(self.node.send(
            self.mailbox.queue,
            Outgoing {
                cluster: call.cluster.to_string(),
                headers,
                body,
                timeout_ms: call.timeout_ms,
                kind: OutgoingKind::Grpc,
            },
        ))
    }

    fn grpc_message(&self, size: usize) -> Vec<u8> {
        self.callout_body(size)
    }
}

impl Wake for NativeHost {
    fn wake(&self, queue: u32, message: &[u8]) -> bool {
        mailbox::post(queue, Event::Message(message.to_vec()))
    }

    fn set_tick_ms(&self, period_ms: u64) {
        use std::sync::atomic::Ordering::Relaxed;
        self.mailbox.tick_ms.store(period_ms, Relaxed);
        self.node.retune_ticker();
    }
}

impl Stats for NativeHost {
    fn count_n(&self, counter: Counter, n: u64) {
        let id = self.node.metrics.counters.get(counter.index());
        self.change(MetricType::Counter, id, &[], n);
    }

    /// Per-key counters are one labelled pair (Envoy defines no metric once the
    /// configuration is made): `key.<key_id>.allowed` becomes `key.allowed` labelled
    /// `key_id`. Ids are `2 × label + 0 (allowed) or 1 (denied)`.
    fn define_counter(&self, name: &str) -> Option<u32> {
        let rest = name.strip_prefix("key.")?;
        let (key_id, which) = match rest.rsplit_once('.')? {
            (key_id, "allowed") => (key_id, 0),
            (key_id, "denied") => (key_id, 1),
            _ => return None,
        };
        let mut labels = self.per_key_labels.borrow_mut();
        let index = match labels.index.get(key_id) {
            Some(&index) => index,
            None => {
                // Both counters show from the start, at 0, as the .wasm's do.
                for counter in [
                    self.node.metrics.per_key.map(|(a, _)| a),
                    self.node.metrics.per_key.map(|(_, d)| d),
                ] {
                    self.change(MetricType::Counter, Some(&counter), &[key_id], 0);
                }
                labels.by_index.push(key_id.to_string());
                let index = labels.by_index.len() - 1;
                labels.index.insert(key_id.to_string(), index);
                index
            }
        };
        u32::try_from(index * 2 + which).ok()
    }

    fn count_defined(&self, id: u32) {
        let Some((allowed, denied)) = self.node.metrics.per_key else {
            return;
        };
        let labels = self.per_key_labels.borrow();
        let Some(key_id) = labels.by_index.get(id as usize / 2) else {
            return;
        };
        let counter = if id.is_multiple_of(2) {
            allowed
        } else {
            denied
        };
        self.change(MetricType::Counter, Some(&Some(counter)), &[key_id], 1);
    }

    fn record(&self, histogram: Histogram, value: u64) {
        let id = self.node.metrics.histograms.get(histogram as usize);
        self.change(MetricType::Histogram, id, &[], value);
    }

    fn set_gauge(&self, gauge: Gauge, value: u64) {
        let id = self.node.metrics.gauges.get(gauge as usize);
        self.change(MetricType::Gauge, id, &[], value);
    }
}

impl Host for NativeHost {
    type Parked = NativeRequest;

    fn parked(&self, context_id: u32) -> Option<NativeRequest> {
        if let Some(current) = self.current.borrow().as_ref() {
            if current.context_id == context_id {
                return Some(NativeRequest::current(current.filter));
            }
        }
        let parked = self.parked.borrow().get(&context_id)?.clone();
        Some(NativeRequest {
            target: Target::Parked(parked),
            filter: std::ptr::null_mut(),
        })
    }

    fn unpark(&self) {}
}

/// A request as the worker sees it: what it does is recorded (see `super::actions`).
pub struct NativeRequest {
    target: Target,
    /// The stream, when the worker runs in its hook; else null.
    filter: EnvoyPtr,
}

enum Target {
    /// The request the calling hook handles: its thread's log.
    Current,
    /// A parked request acted on outside its hooks: its own log, and its hook run when
    /// done.
    Parked(Rc<Parked>),
}

impl NativeRequest {
    /// The request the calling hook handles (`filter`: null outside the worker's call).
    pub fn current(filter: EnvoyPtr) -> NativeRequest {
        NativeRequest {
            target: Target::Current,
            filter,
        }
    }

    fn record(&self, f: impl FnOnce(&mut ActionLog)) {
        match &self.target {
            Target::Current => actions::with_current(f),
            Target::Parked(parked) => f(&mut parked.log()),
        }
    }
}

impl Drop for NativeRequest {
    fn drop(&mut self) {
        if let Target::Parked(parked) = &self.target {
            let scheduler = parked.scheduler();
            if !scheduler.is_null() {
                // SAFETY: a parked request's scheduler lives until the request is
                // forgotten, on this thread, and the worker that acts on it is running.
                unsafe { abi::commit_stream(scheduler, 0) }
            }
        }
    }
}

impl RequestIo for NativeRequest {
    fn client_address(&mut self) -> Option<Vec<u8>> {
        match &self.target {
            // SAFETY: the stream's hook is running (`current`).
            Target::Current if !self.filter.is_null() => unsafe {
                abi::source_address(self.filter)
            },
            Target::Current => None,
            Target::Parked(parked) => parked.client_address.clone(),
        }
    }

    fn remove_header(&mut self, name: &str) {
        self.record(|log| log.set_header(name, None));
    }

    fn set_header(&mut self, name: &str, value: &[u8]) {
        self.record(|log| log.set_header(name, Some(value)));
    }

    fn add_response_header(&mut self, name: &str, value: &str) {
        self.record(|log| log.add_response_header(name, value));
    }

    fn log_fingerprint(&mut self, fingerprint: &str) {
        self.record(|log| log.filter_state(fingerprint));
    }

    fn reply(&mut self, status: u32, body: &str, headers: &[(&str, &str)]) {
        self.record(|log| log.reply(status, body, headers));
    }

    fn resume(&mut self) {
        self.record(ActionLog::resume);
    }
}
