#![cfg(test)]
// Test code only (declared under #[cfg(test)] in pipeline/mod.rs): unwrap, expect and panic! are fine here.
//! A host for native tests: shared data with Envoy's CAS rules (shared by every worker
//! made on it), a clock the test moves, callouts the test answers, queues the test
//! delivers, stats by name, and requests that record what was done to them.
use super::ports::{
    Callout, Callouts, Clock, GrpcCall, Host, NotSent, RequestIo, SetError, SharedStore, Stats,
    Wake,
};
use super::stats::{counter_names, Counter, Gauge, Histogram};
use crate::storage::process_store::ProcessStore;
use crate::storage::shared_store::fake::FakeStore;
use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::sync::{Arc, Mutex};

/// What the node's workers share: shared data, the clock, the queues.
#[derive(Default)]
pub struct FakeNode {
    pub store: FakeStore,
    pub now_ms: Cell<u64>,
    pub queues: RefCell<HashMap<u32, VecDeque<Vec<u8>>>>,
    next_token: Cell<u32>,
}

/// What workers on different threads share, as the dynamic module's do: the process
/// store and their queues. A host made `on_process` uses these instead of its node's.
#[derive(Default)]
pub struct Process {
    pub store: ProcessStore,
    pub queues: Mutex<HashMap<u32, VecDeque<Vec<u8>>>>,
}

impl Process {
    /// The next message queued for `queue`.
    pub fn next_message(&self, queue: u32) -> Option<Vec<u8>> {
        self.queues.lock().unwrap().get_mut(&queue)?.pop_front()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentCallout {
    pub token: u32,
    pub cluster: String,
    pub headers: Vec<(String, String)>,
    pub timeout_ms: u64,
}

impl SentCallout {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A gRPC call a worker sent, and from which context (0: the worker's own).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentGrpc {
    pub token: u32,
    pub context_id: u32,
    pub service: Vec<u8>,
    pub method: String,
    pub message: Vec<u8>,
    pub timeout_ms: u64,
}

/// What was done to one request.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RequestLog {
    pub client_address: Option<Vec<u8>>,
    pub removed: Vec<String>,
    pub set: Vec<(String, Vec<u8>)>,
    pub response_headers: Vec<(String, String)>,
    /// The fingerprint it named for the access log.
    pub log_fingerprint: Option<String>,
    pub reply: Option<Reply>,
    pub resumed: bool,
    /// Its client went away.
    pub gone: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: u32,
    pub body: String,
    pub headers: Vec<(String, String)>,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The `code` of the contract's JSON error body.
    pub fn code(&self) -> String {
        let body: serde_json::Value = serde_json::from_str(&self.body).unwrap();
        body["error"]["code"].as_str().unwrap().to_string()
    }
}

impl RequestLog {
    pub fn header_set(&self, name: &str) -> Option<String> {
        self.set
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    }
}

pub type Requests = Rc<RefCell<HashMap<u32, RequestLog>>>;

/// One worker's host.
pub struct FakeHost {
    pub node: Rc<FakeNode>,
    pub process: Option<Arc<Process>>,
    pub refuse_callouts: Cell<bool>,
    pub callouts: RefCell<Vec<SentCallout>>,
    pub grpc_calls: RefCell<Vec<SentGrpc>>,
    /// The request acting now (0: the worker's own context).
    pub acting: Cell<u32>,
    /// The gRPC message being delivered.
    pub grpc_answer: RefCell<Vec<u8>>,
    /// The answer being delivered: `:status` (None: a reset) and body.
    pub answer: RefCell<(Option<Vec<u8>>, Vec<u8>)>,
    /// The answer being delivered carries `x-envoy-overloaded`.
    pub overloaded: Cell<bool>,
    /// Callouts are answered by Envoy at once (proxy-wasm's overflow).
    pub answer_at_once: Cell<bool>,
    pub tick_ms: Cell<u64>,
    counters: RefCell<Vec<u64>>,
    pub histograms: RefCell<Vec<(Histogram, u64)>>,
    pub gauges: RefCell<HashMap<&'static str, u64>>,
    /// Counters defined at run time: (name, count).
    pub defined: RefCell<Vec<(String, u64)>>,
    pub requests: Requests,
    /// How many times the worker went back to its own context.
    pub unparked: Cell<u32>,
}

impl FakeHost {
    pub fn new(node: Rc<FakeNode>) -> FakeHost {
        FakeHost {
            node,
            process: None,
            refuse_callouts: Cell::new(false),
            callouts: RefCell::default(),
            grpc_calls: RefCell::default(),
            acting: Cell::new(0),
            grpc_answer: RefCell::default(),
            answer: RefCell::new((None, Vec::new())),
            overloaded: Cell::default(),
            answer_at_once: Cell::default(),
            tick_ms: Cell::new(0),
            counters: RefCell::new(vec![0; counter_names().len()]),
            histograms: RefCell::default(),
            gauges: RefCell::default(),
            defined: RefCell::default(),
            requests: Requests::default(),
            unparked: Cell::new(0),
        }
    }

    /// A worker thread's host in a process (`Process`).
    pub fn on_process(node: Rc<FakeNode>, process: Arc<Process>) -> FakeHost {
        FakeHost {
            process: Some(process),
            ..FakeHost::new(node)
        }
    }

    /// Stats that are not zero, by name (per-key ones too).
    pub fn stats(&self) -> HashMap<String, u64> {
        counter_names()
            .into_iter()
            .zip(self.counters.borrow().iter().copied())
            .chain(self.defined.borrow().iter().cloned())
            .chain(
                self.gauges
                    .borrow()
                    .iter()
                    .map(|(n, v)| (n.to_string(), *v)),
            )
            .filter(|(_, n)| *n > 0)
            .collect()
    }

    /// The counts of `names`, in order (0 for a stat never counted).
    pub fn stats_of<const N: usize>(&self, names: [&str; N]) -> [u64; N] {
        let stats = self.stats();
        names.map(|name| stats.get(name).copied().unwrap_or(0))
    }

    pub fn stat(&self, name: &str) -> u64 {
        self.stats().get(name).copied().unwrap_or(0)
    }

    /// The request `context_id`, as a `RequestIo` recording into `requests`.
    pub fn request(&self, context_id: u32) -> FakeRequest {
        self.requests.borrow_mut().entry(context_id).or_default();
        FakeRequest {
            id: context_id,
            requests: self.requests.clone(),
        }
    }

    pub fn log_of(&self, context_id: u32) -> RequestLog {
        self.requests
            .borrow()
            .get(&context_id)
            .cloned()
            .unwrap_or_default()
    }
}

impl Clock for FakeHost {
    fn now_ms(&self) -> u64 {
        self.node.now_ms.get()
    }
}

impl SharedStore for FakeHost {
    fn get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        match &self.process {
            Some(process) => process.store.get(key),
            None => self.node.store.get(key),
        }
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), SetError> {
        match &self.process {
            Some(process) => process.store.set(key, value, cas),
            None => self.node.store.set(key, value, cas),
        }
    }
}

impl Callouts for FakeHost {
    fn send_callout(&self, callout: &Callout) -> Result<u32, NotSent> {
        if self.refuse_callouts.get() {
            return Err(NotSent::Refused);
        }
        if self.answer_at_once.get() {
            return Err(NotSent::AnsweredAtOnce);
        }
        let token = self.node.next_token.get() + 1;
        self.node.next_token.set(token);
        self.callouts.borrow_mut().push(SentCallout {
            token,
            cluster: callout.cluster.to_string(),
            headers: callout
                .headers
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect(),
            timeout_ms: callout.timeout_ms,
        });
        Ok(token)
    }

    fn callout_status(&self) -> Option<Vec<u8>> {
        self.answer.borrow().0.clone()
    }

    fn callout_body(&self, size: usize) -> Vec<u8> {
        let body = &self.answer.borrow().1;
        body[..size.min(body.len())].to_vec()
    }

    fn callout_overloaded(&self) -> bool {
        self.overloaded.get()
    }

    fn send_grpc(&self, call: &GrpcCall) -> Option<u32> {
        if self.refuse_callouts.get() {
            return None;
        }
        let token = self.node.next_token.get() + 1;
        self.node.next_token.set(token);
        self.grpc_calls.borrow_mut().push(SentGrpc {
            token,
            context_id: self.acting.get(),
            service: call.service.to_vec(),
            method: format!("{}/{}", call.service_name, call.method),
            message: call.message.to_vec(),
            timeout_ms: call.timeout_ms,
        });
        Some(token)
    }

    fn grpc_message(&self, size: usize) -> Vec<u8> {
        let message = &self.grpc_answer.borrow();
        message[..size.min(message.len())].to_vec()
    }
}

impl Wake for FakeHost {
    fn wake(&self, queue: u32, message: &[u8]) -> bool {
        let message = message.to_vec();
        match &self.process {
            Some(process) => process
                .queues
                .lock()
                .unwrap()
                .entry(queue)
                .or_default()
                .push_back(message),
            None => self
                .node
                .queues
                .borrow_mut()
                .entry(queue)
                .or_default()
                .push_back(message),
        }
        true
    }

    fn set_tick_ms(&self, period_ms: u64) {
        self.tick_ms.set(period_ms);
    }
}

impl Stats for FakeHost {
    fn count_n(&self, counter: Counter, n: u64) {
        assert!(n > 0, "Envoy refuses to add 0");
        self.counters.borrow_mut()[counter.index()] += n;
    }

    fn set_gauge(&self, gauge: Gauge, value: u64) {
        self.gauges.borrow_mut().insert(gauge.name(), value);
    }

    fn record(&self, histogram: Histogram, value: u64) {
        self.histograms.borrow_mut().push((histogram, value));
    }

    fn define_counter(&self, name: &str) -> Option<u32> {
        let mut defined = self.defined.borrow_mut();
        // Envoy gives a name defined again the same metric.
        if let Some(at) = defined.iter().position(|(n, _)| n == name) {
            return Some(at as u32);
        }
        defined.push((name.to_string(), 0));
        Some(defined.len() as u32 - 1)
    }

    fn count_defined(&self, id: u32) {
        self.defined.borrow_mut()[id as usize].1 += 1;
    }
}

impl Host for FakeHost {
    type Parked = FakeRequest;

    fn parked(&self, context_id: u32) -> Option<FakeRequest> {
        let gone = self
            .requests
            .borrow()
            .get(&context_id)
            .is_none_or(|r| r.gone);
        (!gone).then(|| {
            self.acting.set(context_id);
            self.request(context_id)
        })
    }

    fn unpark(&self) {
        self.acting.set(0);
        self.unparked.set(self.unparked.get() + 1);
    }
}

pub struct FakeRequest {
    id: u32,
    requests: Requests,
}

impl FakeRequest {
    fn log(&self, change: impl FnOnce(&mut RequestLog)) {
        change(self.requests.borrow_mut().entry(self.id).or_default());
    }
}

impl RequestIo for FakeRequest {
    fn client_address(&mut self) -> Option<Vec<u8>> {
        self.requests
            .borrow()
            .get(&self.id)
            .and_then(|r| r.client_address.clone())
    }

    fn remove_header(&mut self, name: &str) {
        self.log(|r| r.removed.push(name.to_string()));
    }

    fn set_header(&mut self, name: &str, value: &[u8]) {
        self.log(|r| r.set.push((name.to_string(), value.to_vec())));
    }

    fn add_response_header(&mut self, name: &str, value: &str) {
        self.log(|r| {
            r.response_headers
                .push((name.to_string(), value.to_string()))
        });
    }

    fn log_fingerprint(&mut self, fingerprint: &str) {
        self.log(|r| r.log_fingerprint = Some(fingerprint.to_string()));
    }

    fn reply(&mut self, status: u32, body: &str, headers: &[(&str, &str)]) {
        let reply = Reply {
            status,
            body: body.to_string(),
            headers: headers
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect(),
        };
        self.log(|r| {
            assert!(r.reply.is_none(), "one reply per request");
            r.reply = Some(reply);
        });
    }

    fn resume(&mut self) {
        self.log(|r| r.resumed = true);
    }
}
