//! The dynamic module host (`libapikey_filter.so`, Envoy 1.40's
//! `envoy.filters.http.dynamic_modules`): the ABI's entry points, and the pipeline's
//! ports as Envoy calls (`host`, over `abi`; the main thread's part in `node`).
//!
//! One worker per filter configuration and Envoy thread (`local`), as the `.wasm` has one
//! per VM, so no lock is taken on the request path: the node-wide state the `.wasm` keeps
//! in shared data (entries, buckets, leases) lives in the process
//! (`storage::process_store`), and what other threads tell a worker waits in its mailbox
//! (`mailbox`). What the worker does to a request is carried out once it is done
//! (`actions`).
//!
//! Every entry point catches panics: a panic here would take Envoy down with it.
#![cfg(not(target_arch = "wasm32"))]
use apikey_core::host_log::{self, HostLogger};

mod abi;
mod actions;
mod filter_config;
mod host;
mod local;
mod mailbox;

use abi::{Buffer, EnvoyPtr, HeaderPair};
use actions::{carry_out_current, Ending, Parked};
use apikey_core::pipeline::request::reply;
use apikey_core::pipeline::worker::Flow;
use apikey_core::request::denial::Denial;
use apikey_core::request::header_map::Header;
use filter_config::FilterConfig;
use host::NativeRequest;
use local::Local;
use mailbox::CallAnswer;
use std::cell::RefCell;
use std::ffi::c_void;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::rc::Rc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

/// `on_http_filter_request_headers` statuses.
const CONTINUE: u32 = 0;
/// Holds the request, its body included, until the filter lets it go (as proxy-wasm's
/// pause does).
const STOP_ALL_ITERATION_AND_WATERMARK: u32 = 4;

/// Runs a hook, turning a panic into `fallback` (and a log line).
fn guarded<T>(fallback: T, hook: impl FnOnce() -> T) -> T {
    catch_unwind(AssertUnwindSafe(hook)).unwrap_or(fallback)
}

thread_local! {
    /// The request headers' buffers, reused from one request to the next (empty between).
    static REUSED_HEADERS: RefCell<(Vec<HeaderPair>, Vec<Header<'static>>)> = RefCell::default();
}

/// One request.
struct Stream {
    /// This thread's worker for the stream's configuration (None: it could not be made,
    /// and the stream is refused).
    local: Option<Rc<Local>>,
    context_id: u32,
    /// RateLimit fields for its response, when it took a token without waiting.
    rate_headers: Option<RateFields>,
    /// Set while it waits (on the key service or the rate limit service), and after:
    /// the worker knows it.
    parked: Option<Rc<Parked>>,
}

/// The RateLimit-Policy and RateLimit values, in one string.
struct RateFields {
    both: String,
    policy_len: usize,
}

static LOGGER: HostLogger = HostLogger { write: abi::log };

/// Follows Envoy's own log level, so debug lines cost nothing unless asked for.
fn follow_host_log_level() {
    let levels = [
        log::Level::Trace,
        log::Level::Debug,
        log::Level::Info,
        log::Level::Warn,
        log::Level::Error,
    ];
    let max = levels
        .into_iter()
        .find(|l| abi::log_enabled(host_log::number(*l)))
        .map_or(log::LevelFilter::Off, |l| l.to_level_filter());
    log::set_max_level(max);
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_program_init() -> *const u8 {
    guarded(std::ptr::null(), || {
        // Every entry point catches a panic; the log says where it was.
        LOGGER.install();
        abi::ABI_VERSION.as_ptr()
    })
}

/// # Safety
/// Envoy's: `config` lives until `..._config_destroy`; the buffers for the call.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_config_new(
    config: EnvoyPtr,
    _name: Buffer,
    raw: Buffer,
) -> *const c_void {
    guarded(std::ptr::null(), || {
        follow_host_log_level();
        // SAFETY: Envoy's promise above; on the main thread.
        let node = unsafe { FilterConfig::new(config, raw.bytes()) };
        // Its main thread's worker, configured: a refused configuration makes none.
        if local::start_main(&node) {
            Arc::into_raw(node) as *const c_void
        } else {
            node.destroy();
            std::ptr::null()
        }
    })
}

/// # Safety
/// `node` came from `..._config_new`.
unsafe fn node<'a>(node: *const c_void) -> &'a FilterConfig {
    // SAFETY: the caller's promise; the node lives until `..._config_destroy`.
    unsafe { &*(node as *const FilterConfig) }
}

/// # Safety
/// Envoy's: called once, after every stream of the configuration.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_config_destroy(node: *const c_void) {
    guarded((), || {
        // SAFETY: made by `Arc::into_raw` in `..._config_new`, given back once.
        let node = unsafe { Arc::from_raw(node as *const FilterConfig) };
        local::remove(&node);
        node.destroy();
    })
}

/// # Safety
/// Envoy's, on the main thread.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_config_scheduled(
    _config: EnvoyPtr,
    node_ptr: *const c_void,
    event: u64,
) {
    guarded((), || {
        // SAFETY: Envoy's promise.
        let node = unsafe { node(node_ptr) };
        let main = local::existing(node);
        node.on_scheduled(event, || {
            if let Some(main) = &main {
                main.take_mail();
            }
        })
    })
}

/// # Safety
/// Envoy's: the headers and body for the call.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_config_http_callout_done(
    _config: EnvoyPtr,
    node_ptr: *const c_void,
    callout_id: u64,
    _result: u32,
    headers: *const HeaderPair,
    headers_size: usize,
    chunks: *const Buffer,
    chunks_size: usize,
) {
    guarded((), || {
        // SAFETY: Envoy's promise.
        let (headers, chunks) =
            unsafe { (pairs(headers, headers_size), slice(chunks, chunks_size)) };
        let status = headers
            .iter()
            .find(|(name, _)| *name == b":status")
            .map(|(_, value)| value.to_vec());
        let overloaded = headers
            .iter()
            .any(|(name, _)| *name == b"x-envoy-overloaded");
        // SAFETY: Envoy's promise.
        let body = chunks
            .iter()
            .flat_map(|c| unsafe { c.bytes() })
            .copied()
            .collect();
        // SAFETY: Envoy's promise.
        unsafe { node(node_ptr) }.on_callout_done(
            callout_id,
            CallAnswer {
                status,
                body,
                overloaded,
            },
        );
    })
}

/// # Safety
/// `ptr` points at `size` items (or is null), for the call.
unsafe fn slice<'a, T>(ptr: *const T, size: usize) -> &'a [T] {
    if ptr.is_null() || size == 0 {
        &[]
    } else {
        // SAFETY: the caller's promise.
        unsafe { std::slice::from_raw_parts(ptr, size) }
    }
}

/// # Safety
/// `ptr` points at `size` header pairs Envoy lends (or is null), for the call.
unsafe fn pairs<'a>(ptr: *const HeaderPair, size: usize) -> Vec<Header<'a>> {
    // SAFETY: the caller's promise.
    unsafe { slice(ptr, size) }
        .iter()
        // SAFETY: the caller's promise.
        .map(|p| unsafe { (p.key.bytes(), p.value.bytes()) })
        .collect()
}

/// # Safety
/// Envoy's, on the main thread.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_config_http_stream_headers(
    _config: EnvoyPtr,
    node_ptr: *const c_void,
    stream_id: u64,
    headers: *const HeaderPair,
    headers_size: usize,
    _end_stream: bool,
) {
    guarded((), || {
        // SAFETY: Envoy's promise.
        let headers = unsafe { pairs(headers, headers_size) };
        // SAFETY: Envoy's promise.
        unsafe { node(node_ptr) }.on_stream_headers(stream_id, &headers);
    })
}

/// # Safety
/// Envoy's, on the main thread.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_config_http_stream_data(
    _config: EnvoyPtr,
    node_ptr: *const c_void,
    stream_id: u64,
    data: *const Buffer,
    data_size: usize,
    _end_stream: bool,
) {
    guarded((), || {
        // SAFETY: Envoy's promise.
        let node = unsafe { node(node_ptr) };
        // SAFETY: Envoy's promise.
        for chunk in unsafe { slice(data, data_size) } {
            // SAFETY: Envoy's promise.
            node.on_stream_data(stream_id, unsafe { chunk.bytes() });
        }
    })
}

/// # Safety
/// Envoy's, on the main thread.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_config_http_stream_trailers(
    config: EnvoyPtr,
    node_ptr: *const c_void,
    stream_id: u64,
    trailers: *const HeaderPair,
    trailers_size: usize,
) {
    // SAFETY: Envoy's promise, passed on.
    unsafe {
        envoy_dynamic_module_on_http_filter_config_http_stream_headers(
            config,
            node_ptr,
            stream_id,
            trailers,
            trailers_size,
            true,
        )
    }
}

/// # Safety
/// Envoy's, on the main thread.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_config_http_stream_complete(
    _config: EnvoyPtr,
    node_ptr: *const c_void,
    stream_id: u64,
) {
    // SAFETY: Envoy's promise.
    guarded((), || unsafe { node(node_ptr) }.on_stream_end(stream_id))
}

/// # Safety
/// Envoy's, on the main thread.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_config_http_stream_reset(
    _config: EnvoyPtr,
    node_ptr: *const c_void,
    stream_id: u64,
    _reason: u32,
) {
    // SAFETY: Envoy's promise.
    guarded((), || unsafe { node(node_ptr) }.on_stream_end(stream_id))
}

/// # Safety
/// Envoy's: `node_ptr` is a live configuration's, `filter` the new stream's.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_new(
    node_ptr: *const c_void,
    _filter: EnvoyPtr,
) -> *const c_void {
    static NEXT_CONTEXT: AtomicU32 = AtomicU32::new(1);
    guarded(std::ptr::null(), || {
        // SAFETY: the configuration outlives its streams.
        let local = local::existing(unsafe { node(node_ptr) }).or_else(|| {
            // SAFETY: made by `Arc::into_raw`, and live, as above.
            let node = unsafe {
                Arc::increment_strong_count(node_ptr as *const FilterConfig);
                Arc::from_raw(node_ptr as *const FilterConfig)
            };
            local::start_thread(&node)
        });
        let stream = Stream {
            local,
            context_id: NEXT_CONTEXT.fetch_add(1, Ordering::Relaxed),
            rate_headers: None,
            parked: None,
        };
        Box::into_raw(Box::new(stream)) as *const c_void
    })
}

/// # Safety
/// `stream` came from `..._filter_new` and is not destroyed.
unsafe fn stream<'a>(stream: *const c_void) -> &'a mut Stream {
    // SAFETY: the caller's promise; Envoy calls a stream's hooks on one thread, one at a
    // time.
    unsafe { &mut *(stream as *mut Stream) }
}

/// # Safety
/// Envoy's, on the stream's thread.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_request_headers(
    filter: EnvoyPtr,
    stream_ptr: *const c_void,
    _end_of_stream: bool,
) -> u32 {
    let decided = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: Envoy's promise.
        unsafe { on_request_headers(filter, stream_ptr) }
    }));
    decided.unwrap_or_else(|_| {
        // SAFETY: Envoy's promise, as above.
        unsafe { refuse_unchecked(filter) };
        STOP_ALL_ITERATION_AND_WATERMARK
    })
}

/// Answers a request whose key cannot be checked (no worker, or a panic on the way):
/// it is not forwarded.
///
/// # Safety
/// `filter` is the stream of the hook running now, on its thread.
unsafe fn refuse_unchecked(filter: EnvoyPtr) {
    let _ = actions::with_current(std::mem::take);
    reply(
        &mut NativeRequest::current(std::ptr::null_mut()),
        "",
        Denial::KeyServiceUnavailable,
        &[],
    );
    // SAFETY: the caller's promise.
    unsafe { carry_out_current(filter) };
}

/// # Safety
/// As `envoy_dynamic_module_on_http_filter_request_headers`.
unsafe fn on_request_headers(filter: EnvoyPtr, stream_ptr: *const c_void) -> u32 {
    // SAFETY: Envoy's promise.
    let stream = unsafe { stream(stream_ptr) };
    let (mut lent, views) = REUSED_HEADERS.with(|r| std::mem::take(&mut *r.borrow_mut()));
    // SAFETY: Envoy's promise: lent until the hook returns or a header changes, and
    // the headers change only after `headers` is gone.
    unsafe { abi::headers(filter, abi::REQUEST_HEADER, &mut lent) };
    let mut headers: Vec<Header> = views;
    // SAFETY: as above.
    headers.extend(
        lent.iter()
            .map(|p| unsafe { (p.key.bytes(), p.value.bytes()) }),
    );
    let context_id = stream.context_id;
    let Some(local) = stream.local.clone() else {
        // SAFETY: Envoy's promise.
        unsafe { refuse_unchecked(filter) };
        return STOP_ALL_ITERATION_AND_WATERMARK;
    };
    local.take_mail();
    let decided = local.with_worker(|worker| {
        #[cfg(feature = "panic-probe")]
        #[allow(clippy::panic)]
        if headers
            .iter()
            .any(|(name, _)| *name == b"x-apikey-filter-panic")
        {
            panic!("apikey-filter panic probe");
        }
        let mut io = worker.host().begin(context_id, filter);
        let flow = worker.on_request(context_id, &mut io, &headers);
        worker.host().end();
        match flow {
            Flow::Forward(rate_headers) => Some(rate_headers.map(|r| {
                let [(_, policy), (_, state)] = r.fields();
                let mut both = String::with_capacity(policy.len() + state.len());
                both.push_str(policy);
                both.push_str(state);
                RateFields {
                    both,
                    policy_len: policy.len(),
                }
            })),
            Flow::Pause => {
                if !actions::with_current(|log| log.has_ending()) {
                    // It waits; its scheduler runs its hook when the worker acted on it,
                    // and may wake the worker for its mail.
                    // SAFETY: on the stream's thread, in its hook.
                    let parked = unsafe {
                        Rc::new(Parked::new(
                            abi::stream_scheduler(filter),
                            abi::source_address(filter),
                        ))
                    };
                    local.mailbox.add_stream(context_id, parked.scheduler());
                    worker.host().park(context_id, parked.clone());
                    stream.parked = Some(parked);
                }
                None
            }
        }
    });
    let Some(decided) = decided else {
        // SAFETY: Envoy's promise.
        unsafe { refuse_unchecked(filter) };
        return STOP_ALL_ITERATION_AND_WATERMARK;
    };
    actions::with_current(|log| {
        log.add_where_absent(|name| headers.iter().any(|(n, _)| *n == name))
    });
    // Kept for the next request, empty: Envoy's bytes are not to be held.
    headers.clear();
    let views = headers.into_iter().map(|_| (&[][..], &[][..])).collect();
    REUSED_HEADERS.with(|r| *r.borrow_mut() = (lent, views));
    // Forwarded now (with its RateLimit fields, if any), or not yet.
    let forwarded = match decided {
        Some(rate_headers) => {
            stream.rate_headers = rate_headers;
            true
        }
        None => false,
    };
    // The stream is not touched after this: a local reply runs its response hook now.
    // SAFETY: Envoy's promise, on the stream's thread.
    let ended = unsafe { carry_out_current(filter) };
    if forwarded || ended == Ending::Resumed {
        CONTINUE
    } else {
        STOP_ALL_ITERATION_AND_WATERMARK
    }
}

/// # Safety
/// Envoy's, on the stream's thread.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_response_headers(
    filter: EnvoyPtr,
    stream_ptr: *const c_void,
    _end_of_stream: bool,
) -> u32 {
    guarded(CONTINUE, || {
        // SAFETY: Envoy's promise.
        let stream = unsafe { stream(stream_ptr) };
        if let Some(RateFields { both, policy_len }) = stream.rate_headers.take() {
            let (policy, state) = both.split_at(policy_len.min(both.len()));
            // SAFETY: Envoy's promise.
            unsafe {
                abi::add_header(
                    filter,
                    abi::RESPONSE_HEADER,
                    b"ratelimit-policy",
                    policy.as_bytes(),
                );
                abi::add_header(filter, abi::RESPONSE_HEADER, b"ratelimit", state.as_bytes());
            }
        }
        if let (Some(_), Some(local)) = (&stream.parked, &stream.local) {
            let context_id = stream.context_id;
            local.with_worker(|worker| {
                worker.on_response(context_id, None, &mut NativeRequest::current(filter));
            });
            // SAFETY: Envoy's promise.
            unsafe { carry_out_current(filter) };
        }
        CONTINUE
    })
}

/// # Safety
/// Envoy's, on the stream's thread: the worker has mail, or acted on the parked request.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_scheduled(
    filter: EnvoyPtr,
    stream_ptr: *const c_void,
    _event: u64,
) {
    guarded((), || {
        // SAFETY: Envoy's promise. Not touched after this: a local reply runs its response
        // hook now.
        let stream = unsafe { stream(stream_ptr) };
        if let Some(local) = &stream.local {
            local.take_mail();
        }
        let Some(parked) = stream.parked.clone() else {
            return;
        };
        // SAFETY: Envoy's promise.
        if unsafe { parked.carry_out(filter) } == Ending::Resumed {
            // SAFETY: Envoy's promise.
            unsafe { abi::continue_decoding(filter) };
        }
    })
}

/// Forgets a parked request: the worker lets it go, and its scheduler is deleted.
fn forget(stream: &mut Stream) {
    let Some(parked) = stream.parked.take() else {
        return;
    };
    let context_id = stream.context_id;
    if let Some(local) = &stream.local {
        local.with_worker(|worker| {
            worker.forget(context_id);
            worker.host().forget(context_id);
        });
        // No other thread commits it once this returns.
        local.mailbox.remove_stream(context_id);
        // Mail that woke the worker through this stream's scheduler may never run its
        // hook now: it is taken here.
        local.take_mail();
    }
    let scheduler = parked.take_scheduler();
    if !scheduler.is_null() {
        // SAFETY: made in the request headers hook, deleted once.
        unsafe { abi::delete_stream_scheduler(scheduler) };
    }
}

/// # Safety
/// Envoy's, on the stream's thread.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_stream_complete(
    _filter: EnvoyPtr,
    stream_ptr: *const c_void,
) {
    // SAFETY: Envoy's promise.
    guarded((), || forget(unsafe { stream(stream_ptr) }))
}

/// # Safety
/// Envoy's: the stream's last call.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_destroy(stream_ptr: *const c_void) {
    guarded((), || {
        // SAFETY: made by `Box::into_raw` in `..._filter_new`, given back once.
        let mut stream = unsafe { Box::from_raw(stream_ptr as *mut Stream) };
        forget(&mut stream);
    })
}

// Hooks the filter has no use for; Envoy 1.40 requires a module to export them.

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_request_body(
    _: EnvoyPtr,
    _: *const c_void,
    _: bool,
) -> u32 {
    CONTINUE
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_request_trailers(
    _: EnvoyPtr,
    _: *const c_void,
) -> u32 {
    CONTINUE
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_body(
    _: EnvoyPtr,
    _: *const c_void,
    _: bool,
) -> u32 {
    CONTINUE
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_trailers(
    _: EnvoyPtr,
    _: *const c_void,
) -> u32 {
    CONTINUE
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_callout_done(
    _: EnvoyPtr,
    _: *const c_void,
    _: u64,
    _: u32,
    _: *const HeaderPair,
    _: usize,
    _: *const Buffer,
    _: usize,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_headers(
    _: EnvoyPtr,
    _: *const c_void,
    _: u64,
    _: *const HeaderPair,
    _: usize,
    _: bool,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_data(
    _: EnvoyPtr,
    _: *const c_void,
    _: u64,
    _: *const Buffer,
    _: usize,
    _: bool,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_trailers(
    _: EnvoyPtr,
    _: *const c_void,
    _: u64,
    _: *const HeaderPair,
    _: usize,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_complete(
    _: EnvoyPtr,
    _: *const c_void,
    _: u64,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_reset(
    _: EnvoyPtr,
    _: *const c_void,
    _: u64,
    _: u32,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_downstream_above_write_buffer_high_watermark(
    _: EnvoyPtr,
    _: *const c_void,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_downstream_below_write_buffer_low_watermark(
    _: EnvoyPtr,
    _: *const c_void,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_local_reply(
    _: EnvoyPtr,
    _: *const c_void,
    _: u32,
    _: Buffer,
    _: bool,
) -> u32 {
    CONTINUE
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_per_route_config_new(
    _: Buffer,
    _: Buffer,
) -> *const c_void {
    std::ptr::null()
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_per_route_config_destroy(_: *const c_void) {}
