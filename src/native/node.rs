//! A filter configuration's side of the process: its worker behind a lock, and what the
//! main thread does for it (callouts and gRPC calls, the worker's messages and ticks).
//!
//! Envoy lets a configuration send callouts only from the main thread, and runs code
//! there when its scheduler is committed (from any thread). So the worker queues what it
//! sends and its messages to itself (`NodeShared`), commits the scheduler, and the main
//! thread takes the lock and does the rest. A thread of the module's own keeps the
//! worker's tick.
use super::abi::{self, EnvoyPtr};
use super::host::{Answer, NativeHost};
use crate::pipeline::ports::{Host, NotSent};
use crate::pipeline::quotas::GrpcOutcome;
use crate::pipeline::stats::Counter;
use crate::pipeline::worker::Worker;
use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Config scheduler events.
const WORK: u64 = 0;
const TICK: u64 = 1;
/// gRPC's UNAVAILABLE: what a call that got no gRPC answer ends with.
const UNAVAILABLE: u32 = 14;

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic caught while the lock was held leaves the data as whole as the panic did;
    // refusing every later request would be worse.
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

pub enum OutgoingKind {
    Callout,
    Grpc,
}

/// A callout or gRPC call the worker asked for, with the token its answer comes back
/// with.
pub struct Outgoing {
    pub cluster: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub timeout_ms: u64,
    pub kind: OutgoingKind,
}

#[derive(Default)]
struct Queued {
    messages: Vec<Vec<u8>>,
    outgoing: Vec<(u32, Outgoing)>,
}

/// A gRPC call's answer as it arrives.
#[derive(Default)]
struct GrpcAnswer {
    http_ok: bool,
    status: Option<u32>,
    body: Vec<u8>,
}

enum InFlight {
    Callout(u32),
    Grpc(u32, GrpcAnswer),
}

/// A configuration's parts any thread may reach.
pub struct NodeShared {
    config: usize,
    scheduler: usize,
    pub queue: u32,
    queued: Mutex<Queued>,
    next_token: AtomicU32,
    ticker: Arc<Ticker>,
}

// SAFETY: the two pointers are Envoy's configuration and its scheduler, whose callbacks
// the ABI allows from any thread (stats, scheduler commits); the rest is synchronised.
unsafe impl Send for NodeShared {}
unsafe impl Sync for NodeShared {}

impl NodeShared {
    pub fn config(&self) -> EnvoyPtr {
        self.config as EnvoyPtr
    }

    fn commit(&self, event: u64) {
        // SAFETY: the scheduler lives until the configuration is destroyed, after its
        // ticker thread has stopped and its streams have ended.
        unsafe { abi::commit_config(self.scheduler as EnvoyPtr, event) }
    }

    /// Queues `outgoing` for the main thread; the token its answer will carry.
    pub fn send(&self, outgoing: Outgoing) -> u32 {
        let token = self.next_token.fetch_add(1, Ordering::Relaxed);
        lock(&self.queued).outgoing.push((token, outgoing));
        self.commit(WORK);
        token
    }

    pub fn set_tick_ms(&self, period_ms: u64) {
        self.ticker.set(period_ms);
    }
}

/// Every configuration's queue, by number: how one worker wakes another (a flight it
/// waited for landed, the change feed moved).
fn queues() -> &'static Mutex<HashMap<u32, Weak<NodeShared>>> {
    static QUEUES: OnceLock<Mutex<HashMap<u32, Weak<NodeShared>>>> = OnceLock::new();
    QUEUES.get_or_init(Mutex::default)
}

pub fn wake(queue: u32, message: Vec<u8>) -> bool {
    let Some(node) = lock(queues()).get(&queue).and_then(Weak::upgrade) else {
        return false;
    };
    lock(&node.queued).messages.push(message);
    node.commit(WORK);
    true
}

/// Runs `f` on the worker in `slot`. If `f` panics, the worker's state is in doubt: it is
/// abandoned (the requests it holds are refused, never forwarded), the `panics` counter
/// moves, and a worker configured anew from `raw_config` takes its place, over the same
/// host and so the same node-wide store. The panic is handed back.
pub fn run_or_rebuild<H: Host, T>(
    slot: &mut Option<Worker<H>>,
    raw_config: &[u8],
    queue: u32,
    f: impl FnOnce(&Worker<H>) -> T,
) -> Result<Option<T>, Box<dyn std::any::Any + Send>> {
    let Some(worker) = slot.as_ref() else {
        return Ok(None);
    };
    let panic = match catch_unwind(AssertUnwindSafe(|| f(worker))) {
        Ok(done) => return Ok(Some(done)),
        Err(panic) => panic,
    };
    if let Some(broken) = slot.take() {
        let host = broken.abandon();
        host.count(Counter::Panics);
        log::error!("apikey-filter: a panic was caught; the worker is built again");
        let worker = Worker::new(host);
        worker.set_queue(queue);
        if worker.configure(raw_config) {
            *slot = Some(worker);
        }
    }
    Err(panic)
}

/// The worker, touched only under its lock.
struct Guarded(Option<Worker<NativeHost>>);

// SAFETY: the worker (its `Rc`s and `RefCell`s included) is only reached through the
// mutex around it, and nothing it holds leaves the lock: whatever a hook takes from it
// is copied out first.
unsafe impl Send for Guarded {}

/// A filter configuration: `on_http_filter_config_new` makes one.
pub struct Node {
    pub shared: Arc<NodeShared>,
    worker: Mutex<Guarded>,
    /// The configuration, to build the worker again after a panic.
    raw_config: Vec<u8>,
    /// Main-thread state: calls in flight by Envoy's id, and the one being sent (its
    /// answer can come before its id does).
    in_flight: Mutex<HashMap<u64, InFlight>>,
    sending: Mutex<Option<InFlight>>,
    ticker_thread: Mutex<Option<JoinHandle<()>>>,
}

impl Node {
    /// A configuration's node, with its worker configured from `raw`; `None` if the
    /// configuration is refused.
    ///
    /// # Safety
    /// `config` is the configuration being created, in `on_http_filter_config_new`, on
    /// the main thread.
    pub unsafe fn new(config: EnvoyPtr, raw: &[u8]) -> Option<Arc<Node>> {
        static NEXT_QUEUE: AtomicU32 = AtomicU32::new(1);
        // SAFETY: the caller's promise.
        let scheduler = unsafe { abi::config_scheduler(config) };
        let ticker = Arc::new(Ticker::default());
        let shared = Arc::new(NodeShared {
            config: config as usize,
            scheduler: scheduler as usize,
            queue: NEXT_QUEUE.fetch_add(1, Ordering::Relaxed),
            queued: Mutex::default(),
            next_token: AtomicU32::new(1),
            ticker: ticker.clone(),
        });
        // SAFETY: the caller's promise.
        let host = unsafe { NativeHost::new(shared.clone(), config) };
        let worker = Worker::new(host);
        worker.set_queue(shared.queue);
        lock(queues()).insert(shared.queue, Arc::downgrade(&shared));
        let configured = worker.configure(raw);
        let scheduler_ptr = shared.scheduler;
        let thread = std::thread::Builder::new()
            .name("apikey-filter-tick".into())
            .spawn(move || {
                ticker.run(|| {
                    // SAFETY: the thread is stopped before the scheduler is deleted.
                    unsafe { abi::commit_config(scheduler_ptr as EnvoyPtr, TICK) }
                })
            })
            .map_err(|e| log::error!("apikey-filter cannot start its tick thread: {e}"))
            .ok();
        let node = Arc::new(Node {
            shared,
            worker: Mutex::new(Guarded(Some(worker))),
            raw_config: raw.to_vec(),
            in_flight: Mutex::default(),
            sending: Mutex::default(),
            ticker_thread: Mutex::new(thread),
        });
        if configured {
            Some(node)
        } else {
            node.destroy();
            None
        }
    }

    /// Runs `f` on the worker, under its lock. A panic in `f` rebuilds the worker
    /// (`run_or_rebuild`), then goes on to the hook, whose guard answers for it.
    pub fn with_worker<T>(&self, f: impl FnOnce(&Worker<NativeHost>) -> T) -> Option<T> {
        let mut guarded = lock(&self.worker);
        let queue = self.shared.queue;
        match run_or_rebuild(&mut guarded.0, &self.raw_config, queue, f) {
            Ok(done) => done,
            Err(panic) => {
                // The hook that panicked did not get to say it was done with its request.
                if let Some(worker) = guarded.0.as_ref() {
                    worker.host().end();
                }
                std::panic::resume_unwind(panic)
            }
        }
    }

    /// The configuration is going: stops its tick, drops its worker, deletes its
    /// scheduler.
    pub fn destroy(&self) {
        self.shared.ticker.stop();
        if let Some(thread) = lock(&self.ticker_thread).take() {
            let _ = thread.join();
        }
        lock(queues()).remove(&self.shared.queue);
        lock(&self.worker).0 = None;
        // SAFETY: created in `new`, deleted once: nothing commits it any more.
        unsafe { abi::delete_config_scheduler(self.shared.scheduler as EnvoyPtr) }
    }

    /// On the main thread, when the scheduler was committed: the worker's messages and
    /// tick, then what it queued to send.
    pub fn on_scheduled(&self, event: u64) {
        if event == TICK {
            self.with_worker(|w| w.on_tick());
        }
        loop {
            let queued = std::mem::take(&mut *lock(&self.shared.queued));
            if queued.messages.is_empty() && queued.outgoing.is_empty() {
                return;
            }
            if !queued.messages.is_empty() {
                self.with_worker(|w| {
                    for message in &queued.messages {
                        w.on_message(message);
                    }
                });
            }
            for (token, outgoing) in queued.outgoing {
                self.send_now(token, &outgoing);
            }
        }
    }

    fn send_now(&self, token: u32, outgoing: &Outgoing) {
        let stream = matches!(outgoing.kind, OutgoingKind::Grpc);
        let pending = if stream {
            InFlight::Grpc(token, GrpcAnswer::default())
        } else {
            InFlight::Callout(token)
        };
        *lock(&self.sending) = Some(pending);
        // SAFETY: on the main thread (the scheduler's), with the live configuration.
        let sent = unsafe {
            let Outgoing {
                cluster,
                headers,
                body,
                timeout_ms,
                ..
            } = outgoing;
            abi::config_send(
                self.shared.config(),
                cluster,
                headers,
                body,
                *timeout_ms,
                stream,
            )
        };
        // Taken back unless answered during the call.
        let pending = lock(&self.sending).take();
        match (sent, pending) {
            (Ok(id), Some(pending)) => {
                lock(&self.in_flight).insert(id, pending);
            }
            (Ok(_), None) => {}
            (Err(result), _) => {
                log::debug!("call to cluster {} refused ({result})", outgoing.cluster);
                let why = match result {
                    abi::CANNOT_CREATE_REQUEST => NotSent::AnsweredAtOnce,
                    _ => NotSent::Refused,
                };
                self.with_worker(|w| match outgoing.kind {
                    OutgoingKind::Callout => w.on_callout_refused(token, why),
                    OutgoingKind::Grpc => w.on_grpc_answer(token, GrpcOutcome::NotSent),
                });
                self.on_scheduled(WORK);
            }
        }
    }

    /// The call Envoy's `id` answers: in flight, or being sent now.
    fn take_in_flight(&self, id: u64) -> Option<InFlight> {
        lock(&self.in_flight)
            .remove(&id)
            .or_else(|| lock(&self.sending).take())
    }

    pub fn on_callout_done(&self, id: u64, answer: Answer) {
        if let Some(InFlight::Callout(token)) = self.take_in_flight(id) {
            self.deliver_callout(token, answer);
        }
    }

    fn deliver_callout(&self, token: u32, answer: Answer) {
        let size = answer.body.len();
        self.with_worker(|w| {
            w.host().set_answer(answer);
            w.on_callout_answer(token, size);
            w.host().set_answer(Answer::default());
        });
        self.on_scheduled(WORK);
    }

    /// A part of a gRPC call's answer: `f` adds it.
    fn grpc_part(&self, id: u64, f: impl FnOnce(&mut GrpcAnswer)) {
        let mut in_flight = lock(&self.in_flight);
        if let Some(InFlight::Grpc(_, answer)) = in_flight.get_mut(&id) {
            f(answer);
            return;
        }
        drop(in_flight);
        if let Some(InFlight::Grpc(_, answer)) = lock(&self.sending).as_mut() {
            f(answer);
        }
    }

    /// The answer's headers or trailers: `grpc-status` comes in the trailers, or in the
    /// headers of an answer that has no message.
    pub fn on_stream_headers(&self, id: u64, headers: &[(&[u8], &[u8])]) {
        self.grpc_part(id, |answer| {
            for (name, value) in headers {
                match *name {
                    b":status" => answer.http_ok = *value == b"200",
                    b"grpc-status" => answer.status = parse_status(value),
                    _ => {}
                }
            }
        });
    }

    pub fn on_stream_data(&self, id: u64, data: &[u8]) {
        self.grpc_part(id, |answer| answer.body.extend_from_slice(data));
    }

    /// The call ended (completed or reset).
    pub fn on_stream_end(&self, id: u64) {
        if let Some(InFlight::Grpc(token, answer)) = self.take_in_flight(id) {
            self.deliver_grpc(token, answer);
        }
    }

    fn deliver_grpc(&self, token: u32, answer: GrpcAnswer) {
        let status = match (answer.http_ok, answer.status) {
            (true, Some(status)) => status,
            _ => UNAVAILABLE,
        };
        let message = grpc_message(&answer.body).filter(|_| status == 0);
        self.with_worker(|w| match message {
            Some(message) => {
                let size = message.len();
                w.host().set_answer(Answer {
                    body: message.to_vec(),
                    ..Answer::default()
                });
                w.on_grpc_answer(token, GrpcOutcome::Message(size));
                w.host().set_answer(Answer::default());
            }
            None => w.on_grpc_answer(token, GrpcOutcome::Closed(status)),
        });
        self.on_scheduled(WORK);
    }
}

fn parse_status(value: &[u8]) -> Option<u32> {
    std::str::from_utf8(value).ok()?.trim().parse().ok()
}

/// The message of a unary gRPC answer's body: a flag byte (0: not compressed), a
/// big-endian length, the message.
fn grpc_message(body: &[u8]) -> Option<&[u8]> {
    let (&compressed, rest) = body.split_first()?;
    let (length, rest) = rest.split_first_chunk::<4>()?;
    let length = u32::from_be_bytes(*length) as usize;
    (compressed == 0).then(|| rest.get(..length)).flatten()
}

/// The worker's tick, on a thread of the module's: every `period_ms`, commits the
/// configuration's scheduler (which runs the tick on the main thread).
#[derive(Default)]
struct Ticker {
    state: Mutex<TickState>,
    changed: Condvar,
}

#[derive(Default)]
struct TickState {
    period_ms: u64,
    next: Option<Instant>,
    stopped: bool,
}

impl Ticker {
    fn set(&self, period_ms: u64) {
        let mut state = lock(&self.state);
        state.period_ms = period_ms;
        state.next = (period_ms > 0).then(|| Instant::now() + Duration::from_millis(period_ms));
        self.changed.notify_one();
    }

    fn stop(&self) {
        lock(&self.state).stopped = true;
        self.changed.notify_one();
    }

    fn run(&self, tick: impl Fn()) {
        let mut state = lock(&self.state);
        while !state.stopped {
            let Some(next) = state.next else {
                state = self.changed.wait(state).unwrap_or_else(|p| p.into_inner());
                continue;
            };
            let now = Instant::now();
            if now < next {
                state = self
                    .changed
                    .wait_timeout(state, next - now)
                    .map(|(state, _)| state)
                    .unwrap_or_else(|p| p.into_inner().0);
                continue;
            }
            state.next = Some(next + Duration::from_millis(state.period_ms.max(1)));
            tick();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::fake::{FakeHost, Node as FakeNode};
    use crate::pipeline::worker::Flow;
    use std::rc::Rc;

    #[test]
    fn a_panic_rebuilds_the_worker_refuses_what_it_held_and_keeps_the_node_store() {
        let raw = br#"{"key_service": {"cluster": "keys"}, "rate_limit": {"requests": 5, "period_s": 60}}"#;
        let fake = Rc::new(FakeNode::default());
        let worker = Worker::new(FakeHost::new(fake.clone()));
        worker.set_queue(7);
        assert!(worker.configure(raw));
        let mut slot = Some(worker);
        // A request parked on a lookup, then a panic in the next hook.
        let parked = run_or_rebuild(&mut slot, raw, 7, |w| {
            let mut io = w.host().request(1);
            w.on_request(1, &mut io, &[(b":path", b"/"), (b"x-api-key", b"k")])
        });
        assert!(matches!(parked, Ok(Some(Flow::Pause))));
        let slots_before = fake.store.data.borrow().len();
        let panicked = run_or_rebuild(&mut slot, raw, 7, |_| panic!("a bug"));
        assert!(
            panicked.is_err(),
            "the panic is handed back to the hook's guard"
        );
        let worker = slot.as_ref().expect("a worker again");
        assert_eq!(worker.queue(), Some(7));
        assert_eq!(worker.host().stat("panics"), 1);
        let reply = worker
            .host()
            .log_of(1)
            .reply
            .expect("the parked request answered");
        assert_eq!(reply.status, 503);
        assert!(!worker.host().log_of(1).resumed, "never forwarded");
        assert_eq!(
            fake.store.data.borrow().len(),
            slots_before,
            "the node's store kept"
        );
        let served = run_or_rebuild(&mut slot, raw, 7, |w| {
            let mut io = w.host().request(2);
            w.on_request(2, &mut io, &[(b":path", b"/")])
        });
        assert!(matches!(served, Ok(Some(Flow::Pause))));
        assert_eq!(
            slot.as_ref()
                .unwrap()
                .host()
                .log_of(2)
                .reply
                .map(|r| r.status),
            Some(401),
            "the new worker serves"
        );
    }

    #[test]
    fn a_grpc_answer_body_gives_its_message() {
        assert_eq!(grpc_message(&[0, 0, 0, 0, 2, 8, 1]), Some(&[8, 1][..]));
        assert_eq!(grpc_message(&[0, 0, 0, 0, 0]), Some(&[][..]));
        assert_eq!(grpc_message(&[0, 0, 0, 0, 3, 8, 1]), None, "cut short");
        assert_eq!(grpc_message(&[1, 0, 0, 0, 2, 8, 1]), None, "compressed");
        assert_eq!(grpc_message(&[0, 0]), None);
    }

    #[test]
    fn the_ticker_ticks_at_its_period_until_stopped() {
        let ticker = Arc::new(Ticker::default());
        let ticks = Arc::new(AtomicU32::new(0));
        let thread = {
            let (ticker, ticks) = (ticker.clone(), ticks.clone());
            std::thread::spawn(move || {
                ticker.run(|| {
                    ticks.fetch_add(1, Ordering::SeqCst);
                })
            })
        };
        ticker.set(5);
        while ticks.load(Ordering::SeqCst) < 3 {
            std::thread::yield_now();
        }
        ticker.set(0);
        ticker.stop();
        thread.join().unwrap();
    }
}
