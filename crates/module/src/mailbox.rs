//! How a worker is reached from another thread. Each worker (one per configuration and
//! Envoy thread: `super::local`) has a mailbox: other threads post what it must hear
//! (another worker's message, an answer the main thread received for it, its tick), and
//! the worker takes it on its own thread.
//!
//! Envoy runs code on a worker thread only for a stream, so a worker is woken through the
//! scheduler of one of its parked requests, or else takes its mail at the start of its
//! next request (one atomic load when there is none). The main thread's worker is woken
//! through the configuration's scheduler.
use super::abi::{self, EnvoyPtr};
use apikey_core::pipeline::ports::NotSent;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};

/// The configuration scheduler's event that runs the main thread's work.
pub const MAIN_WORK: u64 = 0;
/// A parked stream's scheduler event: its worker has mail (any event also carries out the
/// stream's own actions).
pub const STREAM_MAIL: u64 = 1;

pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic caught while a lock was held leaves the data as whole as the panic did;
    // refusing every later request would be worse.
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// The answer being handed to the worker (a callout's status and body, or a gRPC
/// message).
#[derive(Default)]
pub struct CallAnswer {
    pub status: Option<Vec<u8>>,
    pub body: Vec<u8>,
    /// It carried `x-envoy-overloaded`.
    pub overloaded: bool,
}

/// What a worker is told.
pub enum Event {
    /// Another worker's message (a flight landed, the change feed moved).
    Message(Vec<u8>),
    /// The answer to a callout it sent, by token.
    CalloutAnswer(u32, CallAnswer),
    /// A callout Envoy would not send.
    CalloutRefused(u32, NotSent),
    /// How a gRPC call it sent ended.
    Grpc(u32, GrpcEnd),
}

pub enum GrpcEnd {
    Message(Vec<u8>),
    /// Closed with this gRPC status, without a message.
    Closed(u32),
    NotSent,
}

/// How a worker's thread is made to run.
enum Waker {
    /// The main thread: the configuration's scheduler (None once the configuration is
    /// destroyed).
    Config(Option<usize>),
    /// A worker thread: the schedulers of its parked streams, by context id.
    Streams(Vec<(u32, usize)>),
}

pub struct Mailbox {
    /// The worker's queue: its name in leases and in the node's list of workers.
    pub queue: u32,
    events: Mutex<Vec<Event>>,
    tick_due: AtomicBool,
    /// Set with every post, cleared by `take`: what a request checks.
    pending: AtomicBool,
    waker: Mutex<Waker>,
    /// The tick period its worker asked for (0: none).
    pub tick_ms: AtomicU64,
}

/// Every worker's mailbox, by queue: how a worker reaches another, of any configuration.
fn mailboxes() -> &'static Mutex<HashMap<u32, Weak<Mailbox>>> {
    static MAILBOXES: OnceLock<Mutex<HashMap<u32, Weak<Mailbox>>>> = OnceLock::new();
    MAILBOXES.get_or_init(Mutex::default)
}

/// Posts `event` to the worker of `queue`; false if that worker is gone.
pub fn post(queue: u32, event: Event) -> bool {
    let Some(mailbox) = lock(mailboxes()).get(&queue).and_then(Weak::upgrade) else {
        return false;
    };
    mailbox.post(event);
    true
}

impl Mailbox {
    fn new(queue: u32, waker: Waker) -> Arc<Mailbox> {
        let mailbox = Arc::new(Mailbox {
            queue,
            events: Mutex::default(),
            tick_due: AtomicBool::new(false),
            pending: AtomicBool::new(false),
            waker: Mutex::new(waker),
            tick_ms: AtomicU64::new(0),
        });
        lock(mailboxes()).insert(queue, Arc::downgrade(&mailbox));
        mailbox
    }

    /// The main thread's worker's, woken through the configuration's `scheduler`.
    pub fn for_main(queue: u32, scheduler: EnvoyPtr) -> Arc<Mailbox> {
        Mailbox::new(queue, Waker::Config(Some(scheduler as usize)))
    }

    /// A worker thread's worker's.
    pub fn for_thread(queue: u32) -> Arc<Mailbox> {
        Mailbox::new(queue, Waker::Streams(Vec::new()))
    }

    pub fn post(&self, event: Event) {
        lock(&self.events).push(event);
        self.pending.store(true, Ordering::Release);
        self.wake();
    }

    /// Its worker's tick is due (posted once however many ticks pass before it runs).
    pub fn post_tick(&self) {
        if !self.tick_due.swap(true, Ordering::AcqRel) {
            self.pending.store(true, Ordering::Release);
            self.wake();
        }
    }

    fn wake(&self) {
        let waker = lock(&self.waker);
        // SAFETY: a scheduler in the waker lives until it is taken out, under this lock.
        unsafe {
            match &*waker {
                Waker::Config(Some(scheduler)) => {
                    abi::commit_config(*scheduler as EnvoyPtr, MAIN_WORK)
                }
                Waker::Streams(streams) => {
                    if let Some((_, scheduler)) = streams.first() {
                        abi::commit_stream(*scheduler as EnvoyPtr, STREAM_MAIL)
                    }
                }
                Waker::Config(None) => {}
            }
        }
    }

    /// What was posted since the last call, and whether the tick is due; cheap when
    /// nothing was.
    pub fn take(&self) -> Option<(Vec<Event>, bool)> {
        if !self.pending.load(Ordering::Acquire) || !self.pending.swap(false, Ordering::AcqRel) {
            return None;
        }
        let events = std::mem::take(&mut *lock(&self.events));
        Some((events, self.tick_due.swap(false, Ordering::AcqRel)))
    }

    /// A parked stream whose scheduler may wake the worker. Mail posted while the worker
    /// had no stream to wake it by wakes it now.
    pub fn add_stream(&self, context_id: u32, scheduler: EnvoyPtr) {
        if let Waker::Streams(streams) = &mut *lock(&self.waker) {
            streams.push((context_id, scheduler as usize));
            if self.pending.load(Ordering::Acquire) {
                // SAFETY: the stream's hook is running: its scheduler is live.
                unsafe { abi::commit_stream(scheduler, STREAM_MAIL) }
            }
        }
    }

    /// The stream is ending: once this returns, no other thread commits its scheduler.
    pub fn remove_stream(&self, context_id: u32) {
        if let Waker::Streams(streams) = &mut *lock(&self.waker) {
            streams.retain(|(id, _)| *id != context_id);
        }
    }

    /// The configuration is going: nothing reaches this worker any more.
    pub fn close(&self) {
        lock(mailboxes()).remove(&self.queue);
        if let Waker::Config(scheduler) = &mut *lock(&self.waker) {
            *scheduler = None;
        }
    }
}
