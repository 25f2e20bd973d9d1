//! A filter configuration's side of the process, shared by its workers on every thread
//! (`super::local`), and what the main thread does for it: callouts and gRPC calls, and
//! the workers' ticks.
//!
//! Envoy lets a configuration send callouts only from the main thread, and runs code
//! there when its scheduler is committed (from any thread). So a worker queues what it
//! sends, commits the scheduler, and the main thread sends it; the answer goes back to
//! the worker's mailbox. A thread of the module's own keeps the ticks.
use super::abi::{self, EnvoyPtr, MetricType};
use super::mailbox::{lock, CallAnswer, Event, GrpcEnd, Mailbox, MAIN_WORK};
use apikey_core::pipeline::ports::NotSent;
use apikey_core::pipeline::stats::{counter_names, Gauge, Histogram, PREFIX};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The configuration scheduler's tick event (`MAIN_WORK` is the other).
const TICK: u64 = 2;
/// gRPC's UNAVAILABLE: what a call that got no gRPC answer ends with.
const UNAVAILABLE: u32 = 14;

pub enum OutgoingKind {
    Callout,
    Grpc,
}

/// A callout or gRPC call a worker asked for.
pub struct Outgoing {
    pub cluster: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub timeout_ms: u64,
    pub kind: OutgoingKind,
}

/// Whose call it is: the worker's queue, and the token its answer comes back with.
#[derive(Clone, Copy)]
struct Caller {
    queue: u32,
    token: u32,
}

/// A gRPC call's answer as it arrives.
#[derive(Default)]
struct GrpcAnswer {
    http_ok: bool,
    status: Option<u32>,
    body: Vec<u8>,
}

enum InFlight {
    Callout(Caller),
    Grpc(Caller, GrpcAnswer),
}

/// The filter's stats: Envoy's ids, defined with the configuration (Envoy defines no
/// metric after that).
pub struct Metrics {
    pub counters: Vec<Option<usize>>,
    pub histograms: Vec<Option<usize>>,
    pub gauges: Vec<Option<usize>>,
    /// `key.allowed` and `key.denied`, with the label `key_id` (`per_key_stats`).
    pub per_key: Option<(usize, usize)>,
}

impl Metrics {
    /// Defines every stat (a stat Envoy refuses is skipped).
    ///
    /// # Safety
    /// `config` is the configuration being created, in `on_http_filter_config_new`.
    pub unsafe fn define(config: EnvoyPtr) -> Metrics {
        // SAFETY: the caller's promise.
        let define = |metric_type, name: &str, labels: &[&str]| unsafe {
            abi::define_metric(config, metric_type, &format!("{PREFIX}{name}"), labels)
        };
        Metrics {
            counters: counter_names()
                .iter()
                .map(|name| define(MetricType::Counter, name, &[]))
                .collect(),
            histograms: Histogram::ALL
                .iter()
                .map(|h| define(MetricType::Histogram, h.name(), &[]))
                .collect(),
            gauges: Gauge::ALL
                .iter()
                .map(|g| define(MetricType::Gauge, g.name(), &[]))
                .collect(),
            per_key: define(MetricType::Counter, "key.allowed", &["key_id"]).zip(define(
                MetricType::Counter,
                "key.denied",
                &["key_id"],
            )),
        }
    }
}

/// A filter configuration: `on_http_filter_config_new` makes one.
pub struct FilterConfig {
    /// Its name among this process's configurations (each thread's workers by it).
    pub id: u32,
    /// The queue of its main thread's worker, which keeps the node's duties.
    main_queue: u32,
    /// Envoy's configuration and its scheduler, as addresses: both live until
    /// `..._config_destroy`, and the ABI takes stats and scheduler commits from any thread.
    config: usize,
    scheduler: usize,
    pub metrics: Metrics,
    /// The configuration, for each thread's worker (and a worker built again).
    raw_config: Vec<u8>,
    destroyed: AtomicBool,
    /// Every worker's mailbox, for the ticks.
    mailboxes: Mutex<Vec<Weak<Mailbox>>>,
    /// What workers asked to send, for the main thread.
    outgoing: Mutex<Vec<(Caller, Outgoing)>>,
    next_token: AtomicU32,
    /// Main-thread state: calls in flight by Envoy's id, and the one being sent (its
    /// answer can come before its id does).
    in_flight: Mutex<HashMap<u64, InFlight>>,
    sending: Mutex<Option<InFlight>>,
    ticker: Arc<Ticker>,
    ticker_thread: Mutex<Option<JoinHandle<()>>>,
}

impl FilterConfig {
    /// A configuration's node: its stats, scheduler and tick (its main thread's worker
    /// is made by `local::start_main`).
    ///
    /// # Safety
    /// `config` is the configuration being created, in `on_http_filter_config_new`, on
    /// the main thread.
    pub unsafe fn new(config: EnvoyPtr, raw: &[u8]) -> Arc<FilterConfig> {
        static NEXT_ID: AtomicU32 = AtomicU32::new(1);
        // SAFETY: the caller's promise.
        let (scheduler, metrics) =
            unsafe { (abi::config_scheduler(config), Metrics::define(config)) };
        let ticker = Arc::new(Ticker::default());
        let node = Arc::new(FilterConfig {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            main_queue: next_queue(),
            config: config as usize,
            scheduler: scheduler as usize,
            metrics,
            raw_config: raw.to_vec(),
            destroyed: AtomicBool::new(false),
            mailboxes: Mutex::default(),
            outgoing: Mutex::default(),
            next_token: AtomicU32::new(1),
            in_flight: Mutex::default(),
            sending: Mutex::default(),
            ticker: ticker.clone(),
            ticker_thread: Mutex::default(),
        });
        let scheduler_ptr = node.scheduler;
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
        *lock(&node.ticker_thread) = thread;
        node
    }

    pub fn config(&self) -> EnvoyPtr {
        self.config as EnvoyPtr
    }

    pub fn scheduler(&self) -> EnvoyPtr {
        self.scheduler as EnvoyPtr
    }

    pub fn raw_config(&self) -> &[u8] {
        &self.raw_config
    }

    pub fn is_destroyed(&self) -> bool {
        self.destroyed.load(Ordering::Acquire)
    }

    pub fn main_queue(&self) -> u32 {
        self.main_queue
    }

    pub fn add_mailbox(&self, mailbox: &Arc<Mailbox>) {
        let mut mailboxes = lock(&self.mailboxes);
        mailboxes.retain(|m| m.strong_count() > 0);
        mailboxes.push(Arc::downgrade(mailbox));
    }

    fn mailboxes(&self) -> Vec<Arc<Mailbox>> {
        lock(&self.mailboxes)
            .iter()
            .filter_map(Weak::upgrade)
            .collect()
    }

    /// Queues `outgoing` for the main thread; the token its answer will carry to `queue`.
    pub fn send(&self, queue: u32, outgoing: Outgoing) -> u32 {
        let token = self.next_token.fetch_add(1, Ordering::Relaxed);
        lock(&self.outgoing).push((Caller { queue, token }, outgoing));
        // SAFETY: the scheduler lives until the configuration is destroyed, after its
        // streams have ended (a worker sends only for one of them, or on the main thread).
        unsafe { abi::commit_config(self.scheduler(), MAIN_WORK) };
        token
    }

    /// A worker's tick period changed: the node ticks at the shortest any worker asked.
    pub fn retune_ticker(&self) {
        use std::sync::atomic::Ordering::Relaxed;
        let shortest = self
            .mailboxes()
            .iter()
            .map(|m| m.tick_ms.load(Relaxed))
            .filter(|&ms| ms > 0)
            .min();
        self.ticker.set(shortest.unwrap_or(0));
    }

    /// The configuration is going: stops its tick, closes its workers' mailboxes, deletes
    /// its scheduler. Each worker thread drops its own worker with its next new one.
    pub fn destroy(&self) {
        self.destroyed.store(true, Ordering::Release);
        self.ticker.stop();
        if let Some(thread) = lock(&self.ticker_thread).take() {
            let _ = thread.join();
        }
        for mailbox in self.mailboxes() {
            mailbox.close();
        }
        // SAFETY: created in `new`, deleted once: nothing commits it any more.
        unsafe { abi::delete_config_scheduler(self.scheduler()) }
    }

    /// On the main thread, when the scheduler was committed: the ticks, the main worker's
    /// mail (`take_main_mail`), then what the workers queued to send.
    pub fn on_scheduled(&self, event: u64, take_main_mail: impl Fn()) {
        if event == TICK {
            for mailbox in self.mailboxes() {
                if mailbox.tick_ms.load(Ordering::Relaxed) > 0 {
                    mailbox.post_tick();
                }
            }
        }
        loop {
            take_main_mail();
            let outgoing = std::mem::take(&mut *lock(&self.outgoing));
            if outgoing.is_empty() {
                return;
            }
            for (caller, outgoing) in outgoing {
                self.send_now(caller, &outgoing);
            }
        }
    }

    fn send_now(&self, caller: Caller, outgoing: &Outgoing) {
        let stream = matches!(outgoing.kind, OutgoingKind::Grpc);
        let pending = if stream {
            InFlight::Grpc(caller, GrpcAnswer::default())
        } else {
            InFlight::Callout(caller)
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
            abi::config_send(self.config(), cluster, headers, body, *timeout_ms, stream)
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
                let event = match outgoing.kind {
                    OutgoingKind::Callout => Event::CalloutRefused(caller.token, why),
                    OutgoingKind::Grpc => Event::Grpc(caller.token, GrpcEnd::NotSent),
                };
                super::mailbox::post(caller.queue, event);
            }
        }
    }

    /// The call Envoy's `id` answers: in flight, or being sent now.
    fn take_in_flight(&self, id: u64) -> Option<InFlight> {
        lock(&self.in_flight)
            .remove(&id)
            .or_else(|| lock(&self.sending).take())
    }

    pub fn on_callout_done(&self, id: u64, answer: CallAnswer) {
        if let Some(InFlight::Callout(caller)) = self.take_in_flight(id) {
            super::mailbox::post(caller.queue, Event::CalloutAnswer(caller.token, answer));
        }
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
        let Some(InFlight::Grpc(caller, answer)) = self.take_in_flight(id) else {
            return;
        };
        let status = match (answer.http_ok, answer.status) {
            (true, Some(status)) => status,
            _ => UNAVAILABLE,
        };
        let end = match grpc_message(&answer.body).filter(|_| status == 0) {
            Some(message) => GrpcEnd::Message(message.to_vec()),
            None => GrpcEnd::Closed(status),
        };
        super::mailbox::post(caller.queue, Event::Grpc(caller.token, end));
    }
}

/// A queue for a new worker: unique in the process, as workers of every configuration
/// share the node's store.
pub fn next_queue() -> u32 {
    static NEXT_QUEUE: AtomicU32 = AtomicU32::new(1);
    NEXT_QUEUE.fetch_add(1, Ordering::Relaxed)
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
    use std::sync::atomic::AtomicU32;

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
