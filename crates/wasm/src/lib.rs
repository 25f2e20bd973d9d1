//! The proxy-wasm host: the ABI's entry points, and the pipeline's ports as host calls
//! (`host`, over `abi`). It holds I/O only: each callback reads what the host offers and
//! hands it to the worker of its root context.
//!
//! The entry points are the filter's own rather than the SDK's dispatcher, which panics
//! on host answers it does not expect (an unknown callout token, a refused context
//! switch); here nothing the host says can panic.
// Only the wasm build has a proxy-wasm host; natively the crate is empty.
#![cfg(target_arch = "wasm32")]
mod abi;
mod host;

use apikey_core::host_log::{self, HostLogger};
use apikey_core::pipeline::quotas::GrpcOutcome;
use apikey_core::pipeline::request::{reply, RateHeaders};
use apikey_core::pipeline::worker::{Flow, Worker};
use apikey_core::request::denial::Denial;
use apikey_core::request::header_map;
use host::{WasmHost, WasmRequest};
use std::cell::RefCell;
use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::rc::Rc;

/// A root context's worker, shared with its streams' contexts. Each hook borrows it for
/// its own length: Envoy runs no hook of a VM inside another (a local reply and a resumed
/// stream go out once the hook has returned).
type FilterWorker = Rc<RefCell<Worker<WasmHost>>>;

/// One request's context.
struct Stream {
    worker: FilterWorker,
    /// Set when the request took a token without waiting; a request that waited finds
    /// its fields with the worker.
    rate_headers: Option<RateHeaders>,
}

/// The VM's contexts: each root context (a filter configuration) has its worker.
#[derive(Default)]
struct Contexts {
    roots: HashMap<u32, FilterWorker>,
    streams: HashMap<u32, Stream>,
}

thread_local! {
    static CONTEXTS: RefCell<Contexts> = RefCell::default();
}

fn root(root_id: u32) -> Option<FilterWorker> {
    CONTEXTS.with(|c| c.borrow().roots.get(&root_id).cloned())
}

fn stream_worker(context_id: u32) -> Option<FilterWorker> {
    CONTEXTS.with(|c| {
        c.borrow()
            .streams
            .get(&context_id)
            .map(|s| s.worker.clone())
    })
}

/// Runs `f` on the worker; `None` if a hook is already running on it (which Envoy does
/// not do: the event is logged and dropped rather than a panic taking the VM down).
fn with<T>(worker: &FilterWorker, f: impl FnOnce(&mut Worker<WasmHost>) -> T) -> Option<T> {
    match worker.try_borrow_mut() {
        Ok(mut worker) => Some(f(&mut worker)),
        Err(_) => {
            log::error!("apikey-filter: a hook was called inside another; its event is dropped");
            None
        }
    }
}

const ACTION_CONTINUE: u32 = 0;
const ACTION_PAUSE: u32 = 1;
static LOGGER: HostLogger = HostLogger { write: abi::log };

/// Follows Envoy's own log level, so debug lines cost nothing unless asked for.
fn follow_host_log_level() {
    log::set_max_level(match abi::log_level().unwrap_or(host_log::INFO) {
        0 => log::LevelFilter::Trace,
        1 => log::LevelFilter::Debug,
        2 => log::LevelFilter::Info,
        3 => log::LevelFilter::Warn,
        4 => log::LevelFilter::Error,
        _ => log::LevelFilter::Off,
    });
}

#[cfg(target_os = "wasi")]
extern "C" {
    fn __wasm_call_ctors();
}

/// The module's start: run once when the VM loads it.
#[no_mangle]
pub extern "C" fn _initialize() {
    #[cfg(target_os = "wasi")]
    // SAFETY: the linker's constructors, run once before anything else, as a reactor must.
    unsafe {
        __wasm_call_ctors();
    }
    // A panic aborts the VM (panic = "abort"): the log says why before it goes.
    LOGGER.install();
}

/// Tells the host which ABI the module speaks.
#[no_mangle]
pub extern "C" fn proxy_abi_version_0_2_1() {}

/// Memory for what the host hands over; `abi::host_bytes` takes it back as a `Vec`.
#[no_mangle]
pub extern "C" fn proxy_on_memory_allocate(size: usize) -> *mut u8 {
    let mut bytes: Vec<std::mem::MaybeUninit<u8>> = Vec::with_capacity(size);
    // SAFETY: the capacity is `size`; the host writes every byte before anyone reads.
    unsafe { bytes.set_len(size) };
    Box::into_raw(bytes.into_boxed_slice()) as *mut u8
}

#[no_mangle]
pub extern "C" fn proxy_on_context_create(context_id: u32, parent_id: u32) {
    CONTEXTS.with(|c| {
        let mut contexts = c.borrow_mut();
        if parent_id == 0 {
            let worker = Rc::new(RefCell::new(Worker::new(WasmHost::new(context_id))));
            contexts.roots.insert(context_id, worker);
        } else if let Some(worker) = contexts.roots.get(&parent_id).cloned() {
            let stream = Stream {
                worker,
                rate_headers: None,
            };
            contexts.streams.insert(context_id, stream);
        }
    });
}

#[no_mangle]
pub extern "C" fn proxy_on_vm_start(_root_id: u32, _vm_configuration_size: usize) -> bool {
    true
}

#[no_mangle]
pub extern "C" fn proxy_on_configure(root_id: u32, configuration_size: usize) -> bool {
    follow_host_log_level();
    let Some(worker) = root(root_id) else {
        return false;
    };
    with(&worker, |worker| {
        configure(root_id, worker, configuration_size)
    })
    .unwrap_or(false)
}

fn configure(root_id: u32, worker: &mut Worker<WasmHost>, configuration_size: usize) -> bool {
    if worker.queue().is_none() {
        // Each VM needs a queue of its own (a queue wakes only the VM that registered it
        // last), so its name carries a random id; configuring again keeps the first one.
        let id = RandomState::new().hash_one(root_id);
        match abi::register_queue(&format!("apikey_filter/v1/lookups/{id:016x}")) {
            Ok(queue) => worker.set_queue(queue),
            Err(status) => {
                log::error!("apikey-filter cannot register its shared queue (status {status})");
                return false;
            }
        }
    }
    worker.configure(&abi::plugin_configuration(configuration_size))
}

#[no_mangle]
pub extern "C" fn proxy_on_tick(root_id: u32) {
    if let Some(worker) = root(root_id) {
        with(&worker, Worker::on_tick);
    }
}

#[no_mangle]
pub extern "C" fn proxy_on_queue_ready(root_id: u32, queue_id: u32) {
    let Some(worker) = root(root_id) else {
        return;
    };
    with(&worker, |worker| {
        if worker.queue() == Some(queue_id) {
            while let Some(message) = abi::dequeue(queue_id) {
                worker.on_message(&message);
            }
        }
    });
}

#[no_mangle]
pub extern "C" fn proxy_on_http_call_response(
    root_id: u32,
    token: u32,
    _headers: usize,
    body_size: usize,
    _trailers: usize,
) {
    if let Some(worker) = root(root_id) {
        with(&worker, |w| w.on_callout_answer(token, body_size));
    }
}

/// gRPC answers come to the context that made the call: a request's own (its quota
/// check) or the root's (a report).
fn context_worker(context_id: u32) -> Option<FilterWorker> {
    root(context_id).or_else(|| stream_worker(context_id))
}

#[no_mangle]
pub extern "C" fn proxy_on_grpc_receive(context_id: u32, token: u32, message_size: usize) {
    if let Some(worker) = context_worker(context_id) {
        with(&worker, |w| {
            w.on_grpc_answer(token, GrpcOutcome::Message(message_size))
        });
    }
}

#[no_mangle]
pub extern "C" fn proxy_on_grpc_close(context_id: u32, token: u32, status: u32) {
    if let Some(worker) = context_worker(context_id) {
        with(&worker, |w| {
            w.on_grpc_answer(token, GrpcOutcome::Closed(status))
        });
    }
}

#[no_mangle]
pub extern "C" fn proxy_on_grpc_receive_initial_metadata(_context: u32, _token: u32, _n: u32) {}

#[no_mangle]
pub extern "C" fn proxy_on_grpc_receive_trailing_metadata(_context: u32, _token: u32, _n: u32) {}

#[no_mangle]
pub extern "C" fn proxy_on_request_headers(context_id: u32, _headers: usize, _end: bool) -> u32 {
    let serialized = abi::header_map(abi::REQUEST_HEADERS);
    let headers = header_map::parse(&serialized);
    let flow = stream_worker(context_id).and_then(|worker| {
        with(&worker, |w| {
            w.on_request(context_id, &mut WasmRequest, &headers)
        })
    });
    match flow {
        None => {
            // No worker for its filter: a key that cannot be checked is not forwarded.
            reply(&mut WasmRequest, "", Denial::KeyServiceUnavailable, &[]);
            ACTION_PAUSE
        }
        Some(Flow::Forward(rate_headers)) => {
            if rate_headers.is_some() {
                CONTEXTS.with(|c| {
                    if let Some(stream) = c.borrow_mut().streams.get_mut(&context_id) {
                        stream.rate_headers = rate_headers;
                    }
                });
            }
            ACTION_CONTINUE
        }
        Some(Flow::Pause) => ACTION_PAUSE,
    }
}

#[no_mangle]
pub extern "C" fn proxy_on_response_headers(context_id: u32, _headers: usize, _end: bool) -> u32 {
    let taken = CONTEXTS.with(|c| {
        c.borrow_mut()
            .streams
            .get_mut(&context_id)
            .map(|s| (s.worker.clone(), s.rate_headers.take()))
    });
    if let Some((worker, own)) = taken {
        with(&worker, |w| {
            w.on_response(context_id, own, &mut WasmRequest)
        });
    }
    ACTION_CONTINUE
}

#[no_mangle]
pub extern "C" fn proxy_on_done(context_id: u32) -> bool {
    if let Some(worker) = stream_worker(context_id) {
        with(&worker, |w| w.forget(context_id));
    }
    true
}

#[no_mangle]
pub extern "C" fn proxy_on_delete(context_id: u32) {
    CONTEXTS.with(|c| {
        let mut contexts = c.borrow_mut();
        if contexts.streams.remove(&context_id).is_none() {
            contexts.roots.remove(&context_id);
        }
    });
}
