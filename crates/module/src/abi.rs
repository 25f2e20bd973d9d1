//! The part of Envoy's dynamic module ABI (Envoy 1.40, `abi/abi.h`) the filter calls,
//! declared by hand and checked against the symbols Envoy 1.40's binary exports (it loads
//! a module only if every symbol the module references exists). Each wrapper turns a
//! refusal into a value; none can panic.
use std::ffi::c_void;
use std::ptr;

/// The ABI version this module speaks (Envoy 1.40's `ENVOY_DYNAMIC_MODULES_ABI_VERSION`).
pub const ABI_VERSION: &[u8] = b"v0.2.0\0";

/// Bytes the module lends to Envoy for the length of a call, or Envoy lends to the module
/// for the length of a hook.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Buffer {
    pub ptr: *const u8,
    pub length: usize,
}

impl Buffer {
    pub fn of(bytes: &[u8]) -> Buffer {
        Buffer {
            ptr: bytes.as_ptr(),
            length: bytes.len(),
        }
    }

    const NONE: Buffer = Buffer {
        ptr: ptr::null(),
        length: 0,
    };

    /// The bytes Envoy lent (empty for a null pointer).
    ///
    /// # Safety
    /// `ptr` must point at `length` bytes that live for `'a`.
    pub unsafe fn bytes<'a>(self) -> &'a [u8] {
        if self.ptr.is_null() {
            &[]
        } else {
            // SAFETY: the caller's promise.
            unsafe { std::slice::from_raw_parts(self.ptr, self.length) }
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct HeaderPair {
    pub key: Buffer,
    pub value: Buffer,
}

impl HeaderPair {
    pub fn of(name: &[u8], value: &[u8]) -> HeaderPair {
        HeaderPair {
            key: Buffer::of(name),
            value: Buffer::of(value),
        }
    }
}

pub type EnvoyPtr = *mut c_void;

/// `envoy_dynamic_module_type_http_header_type`.
pub const REQUEST_HEADER: u32 = 0;
pub const RESPONSE_HEADER: u32 = 2;
/// `envoy_dynamic_module_type_attribute_id_SourceAddress`.
const SOURCE_ADDRESS: u32 = 24;
/// `envoy_dynamic_module_type_http_callout_init_result_Success`, and the metrics one.
const SUCCESS: u32 = 0;
/// `envoy_dynamic_module_type_http_callout_init_result_CannotCreateRequest`: Envoy's async
/// client failed the call inside `send` (a circuit breaker's overflow, no healthy host).
pub const CANNOT_CREATE_REQUEST: u32 = 4;

mod imports {
    use super::{Buffer, EnvoyPtr, HeaderPair};
    extern "C" {
        pub fn envoy_dynamic_module_callback_log(level: u32, message: Buffer);
        pub fn envoy_dynamic_module_callback_log_enabled(level: u32) -> bool;
        pub fn envoy_dynamic_module_callback_http_get_headers_size(
            filter: EnvoyPtr,
            header_type: u32,
        ) -> usize;
        pub fn envoy_dynamic_module_callback_http_get_headers(
            filter: EnvoyPtr,
            header_type: u32,
            result: *mut HeaderPair,
        ) -> bool;
        pub fn envoy_dynamic_module_callback_http_set_header(
            filter: EnvoyPtr,
            header_type: u32,
            key: Buffer,
            value: Buffer,
        ) -> bool;
        pub fn envoy_dynamic_module_callback_http_add_header(
            filter: EnvoyPtr,
            header_type: u32,
            key: Buffer,
            value: Buffer,
        ) -> bool;
        pub fn envoy_dynamic_module_callback_http_send_response(
            filter: EnvoyPtr,
            status: u32,
            headers: *const HeaderPair,
            headers_size: usize,
            body: Buffer,
            details: Buffer,
        );
        pub fn envoy_dynamic_module_callback_http_filter_continue_decoding(filter: EnvoyPtr);
        pub fn envoy_dynamic_module_callback_http_filter_get_attribute_string(
            filter: EnvoyPtr,
            id: u32,
            result: *mut Buffer,
        ) -> bool;
        pub fn envoy_dynamic_module_callback_http_set_filter_state_bytes(
            filter: EnvoyPtr,
            key: Buffer,
            value: Buffer,
        ) -> bool;
        pub fn envoy_dynamic_module_callback_http_filter_scheduler_new(
            filter: EnvoyPtr,
        ) -> EnvoyPtr;
        pub fn envoy_dynamic_module_callback_http_filter_scheduler_commit(
            scheduler: EnvoyPtr,
            event_id: u64,
        );
        pub fn envoy_dynamic_module_callback_http_filter_scheduler_delete(scheduler: EnvoyPtr);
        pub fn envoy_dynamic_module_callback_http_filter_config_scheduler_new(
            config: EnvoyPtr,
        ) -> EnvoyPtr;
        pub fn envoy_dynamic_module_callback_http_filter_config_scheduler_commit(
            scheduler: EnvoyPtr,
            event_id: u64,
        );
        pub fn envoy_dynamic_module_callback_http_filter_config_scheduler_delete(
            scheduler: EnvoyPtr,
        );
        pub fn envoy_dynamic_module_callback_http_filter_config_http_callout(
            config: EnvoyPtr,
            callout_id: *mut u64,
            cluster: Buffer,
            headers: *const HeaderPair,
            headers_size: usize,
            body: Buffer,
            timeout_ms: u64,
        ) -> u32;
        pub fn envoy_dynamic_module_callback_http_filter_config_start_http_stream(
            config: EnvoyPtr,
            stream_id: *mut u64,
            cluster: Buffer,
            headers: *const HeaderPair,
            headers_size: usize,
            body: Buffer,
            end_stream: bool,
            timeout_ms: u64,
        ) -> u32;
        pub fn envoy_dynamic_module_callback_http_filter_config_define_counter(
            config: EnvoyPtr,
            name: Buffer,
            label_names: *const Buffer,
            label_names_size: usize,
            id: *mut usize,
        ) -> u32;
        pub fn envoy_dynamic_module_callback_http_filter_config_define_gauge(
            config: EnvoyPtr,
            name: Buffer,
            label_names: *const Buffer,
            label_names_size: usize,
            id: *mut usize,
        ) -> u32;
        pub fn envoy_dynamic_module_callback_http_filter_config_define_histogram(
            config: EnvoyPtr,
            name: Buffer,
            label_names: *const Buffer,
            label_names_size: usize,
            id: *mut usize,
        ) -> u32;
        pub fn envoy_dynamic_module_callback_http_filter_config_increment_counter(
            config: EnvoyPtr,
            id: usize,
            label_values: *const Buffer,
            label_values_size: usize,
            value: u64,
        ) -> u32;
        pub fn envoy_dynamic_module_callback_http_filter_config_set_gauge(
            config: EnvoyPtr,
            id: usize,
            label_values: *const Buffer,
            label_values_size: usize,
            value: u64,
        ) -> u32;
        pub fn envoy_dynamic_module_callback_http_filter_config_record_histogram_value(
            config: EnvoyPtr,
            id: usize,
            label_values: *const Buffer,
            label_values_size: usize,
            value: u64,
        ) -> u32;
    }
}

pub fn log(level: u32, message: &str) {
    // SAFETY: the message lives for the call.
    unsafe { imports::envoy_dynamic_module_callback_log(level, Buffer::of(message.as_bytes())) }
}

pub fn log_enabled(level: u32) -> bool {
    // SAFETY: a plain value.
    unsafe { imports::envoy_dynamic_module_callback_log_enabled(level) }
}

/// Fills `pairs` with the request's (or response's) headers, lent by Envoy until the
/// hook returns or a header is changed.
///
/// # Safety
/// `filter` is the stream of the hook running now.
pub unsafe fn headers(filter: EnvoyPtr, header_type: u32, pairs: &mut Vec<HeaderPair>) {
    pairs.clear();
    // SAFETY: the caller's promise; Envoy writes `size` pairs into room for `size`.
    unsafe {
        let size =
            imports::envoy_dynamic_module_callback_http_get_headers_size(filter, header_type);
        pairs.reserve(size);
        if size > 0
            && imports::envoy_dynamic_module_callback_http_get_headers(
                filter,
                header_type,
                pairs.as_mut_ptr(),
            )
        {
            pairs.set_len(size);
        }
    }
}

/// Sets a header (replacing every value), or removes it when `value` is `None`.
///
/// # Safety
/// `filter` is a live stream, on its own thread.
pub unsafe fn set_header(filter: EnvoyPtr, header_type: u32, name: &[u8], value: Option<&[u8]>) {
    let value = value.map_or(Buffer::NONE, Buffer::of);
    // SAFETY: the caller's promise; the buffers live for the call.
    unsafe {
        imports::envoy_dynamic_module_callback_http_set_header(
            filter,
            header_type,
            Buffer::of(name),
            value,
        );
    }
}

/// # Safety
/// `filter` is a live stream, on its own thread.
pub unsafe fn add_header(filter: EnvoyPtr, header_type: u32, name: &[u8], value: &[u8]) {
    // SAFETY: the caller's promise; the buffers live for the call.
    unsafe {
        imports::envoy_dynamic_module_callback_http_add_header(
            filter,
            header_type,
            Buffer::of(name),
            Buffer::of(value),
        );
    }
}

/// # Safety
/// `filter` is a live stream, on its own thread.
pub unsafe fn send_response(
    filter: EnvoyPtr,
    status: u32,
    headers: &[(&[u8], &[u8])],
    body: &[u8],
) {
    let pairs: Vec<HeaderPair> = headers.iter().map(|(n, v)| HeaderPair::of(n, v)).collect();
    // SAFETY: the caller's promise; the buffers live for the call.
    unsafe {
        imports::envoy_dynamic_module_callback_http_send_response(
            filter,
            status,
            pairs.as_ptr(),
            pairs.len(),
            Buffer::of(body),
            Buffer::of(b"apikey_filter"),
        );
    }
}

/// # Safety
/// `filter` is a live stream, on its own thread.
pub unsafe fn continue_decoding(filter: EnvoyPtr) {
    // SAFETY: the caller's promise.
    unsafe { imports::envoy_dynamic_module_callback_http_filter_continue_decoding(filter) }
}

/// The downstream remote address, `ip:port`.
///
/// # Safety
/// `filter` is a live stream, on its own thread.
pub unsafe fn source_address(filter: EnvoyPtr) -> Option<Vec<u8>> {
    let mut result = Buffer::NONE;
    // SAFETY: the caller's promise; Envoy lends the bytes until the hook returns.
    unsafe {
        imports::envoy_dynamic_module_callback_http_filter_get_attribute_string(
            filter,
            SOURCE_ADDRESS,
            &mut result,
        )
        .then(|| result.bytes().to_vec())
    }
}

/// # Safety
/// `filter` is a live stream, on its own thread.
pub unsafe fn set_filter_state(filter: EnvoyPtr, name: &str, value: &[u8]) {
    // SAFETY: the caller's promise; the buffers live for the call.
    unsafe {
        imports::envoy_dynamic_module_callback_http_set_filter_state_bytes(
            filter,
            Buffer::of(name.as_bytes()),
            Buffer::of(value),
        );
    }
}

/// A stream's scheduler: wakes the stream on its own thread from any thread.
///
/// # Safety
/// `filter` is a live stream, on its own thread.
pub unsafe fn stream_scheduler(filter: EnvoyPtr) -> EnvoyPtr {
    // SAFETY: the caller's promise.
    unsafe { imports::envoy_dynamic_module_callback_http_filter_scheduler_new(filter) }
}

/// # Safety
/// `scheduler` came from `stream_scheduler` and is not deleted.
pub unsafe fn commit_stream(scheduler: EnvoyPtr, event_id: u64) {
    // SAFETY: the caller's promise.
    unsafe {
        imports::envoy_dynamic_module_callback_http_filter_scheduler_commit(scheduler, event_id)
    }
}

/// # Safety
/// `scheduler` came from `stream_scheduler`, once.
pub unsafe fn delete_stream_scheduler(scheduler: EnvoyPtr) {
    // SAFETY: the caller's promise.
    unsafe { imports::envoy_dynamic_module_callback_http_filter_scheduler_delete(scheduler) }
}

/// The configuration's scheduler: runs `on_http_filter_config_scheduled` on the main
/// thread, committed from any thread.
///
/// # Safety
/// `config` is the live configuration, in `on_http_filter_config_new`.
pub unsafe fn config_scheduler(config: EnvoyPtr) -> EnvoyPtr {
    // SAFETY: the caller's promise.
    unsafe { imports::envoy_dynamic_module_callback_http_filter_config_scheduler_new(config) }
}

/// # Safety
/// `scheduler` came from `config_scheduler` and is not deleted.
pub unsafe fn commit_config(scheduler: EnvoyPtr, event_id: u64) {
    // SAFETY: the caller's promise.
    unsafe {
        imports::envoy_dynamic_module_callback_http_filter_config_scheduler_commit(
            scheduler, event_id,
        )
    }
}

/// # Safety
/// `scheduler` came from `config_scheduler`, once.
pub unsafe fn delete_config_scheduler(scheduler: EnvoyPtr) {
    // SAFETY: the caller's promise.
    unsafe { imports::envoy_dynamic_module_callback_http_filter_config_scheduler_delete(scheduler) }
}

/// Sends a request from the configuration (`POST` or `GET` as `headers` say, `body` whole):
/// a one-shot callout, whose answer comes to `on_http_filter_config_http_callout_done`,
/// or (`stream`) a stream sent whole at once, as a unary gRPC call is, whose answer comes
/// to the `on_http_filter_config_http_stream_*` hooks. Envoy's id for it, or its refusal.
///
/// # Safety
/// `config` is the live configuration, on the main thread.
pub unsafe fn config_send(
    config: EnvoyPtr,
    cluster: &str,
    headers: &[(String, String)],
    body: &[u8],
    timeout_ms: u64,
    stream: bool,
) -> Result<u64, u32> {
    let pairs: Vec<HeaderPair> = headers
        .iter()
        .map(|(n, v)| HeaderPair::of(n.as_bytes(), v.as_bytes()))
        .collect();
    let (cluster, body) = (Buffer::of(cluster.as_bytes()), Buffer::of(body));
    let mut id = 0;
    // SAFETY: the caller's promise; the buffers live for the call.
    let result = unsafe {
        if stream {
            imports::envoy_dynamic_module_callback_http_filter_config_start_http_stream(
                config,
                &mut id,
                cluster,
                pairs.as_ptr(),
                pairs.len(),
                body,
                true,
                timeout_ms,
            )
        } else {
            imports::envoy_dynamic_module_callback_http_filter_config_http_callout(
                config,
                &mut id,
                cluster,
                pairs.as_ptr(),
                pairs.len(),
                body,
                timeout_ms,
            )
        }
    };
    if result == SUCCESS {
        Ok(id)
    } else {
        Err(result)
    }
}

fn buffers(texts: &[&str]) -> Vec<Buffer> {
    texts.iter().map(|t| Buffer::of(t.as_bytes())).collect()
}

pub enum MetricType {
    Counter,
    Gauge,
    Histogram,
}

/// Defines a metric (only while the configuration is being created); its id.
///
/// # Safety
/// `config` is the configuration being created, in `on_http_filter_config_new`.
pub unsafe fn define_metric(
    config: EnvoyPtr,
    metric_type: MetricType,
    name: &str,
    labels: &[&str],
) -> Option<usize> {
    let labels = buffers(labels);
    let define = match metric_type {
        MetricType::Counter => {
            imports::envoy_dynamic_module_callback_http_filter_config_define_counter
        }
        MetricType::Gauge => imports::envoy_dynamic_module_callback_http_filter_config_define_gauge,
        MetricType::Histogram => {
            imports::envoy_dynamic_module_callback_http_filter_config_define_histogram
        }
    };
    let mut id = 0;
    // SAFETY: the caller's promise; the buffers live for the call.
    let result = unsafe {
        define(
            config,
            Buffer::of(name.as_bytes()),
            labels.as_ptr(),
            labels.len(),
            &mut id,
        )
    };
    (result == SUCCESS).then_some(id)
}

/// Changes a metric: counters add `value`, gauges take it, histograms record it.
/// Thread-safe: Envoy's stats are atomic.
///
/// # Safety
/// `config` is a live configuration; `id` one of its metrics of `metric_type`.
pub unsafe fn change_metric(
    config: EnvoyPtr,
    metric_type: MetricType,
    id: usize,
    labels: &[&str],
    value: u64,
) {
    let labels = buffers(labels);
    let change = match metric_type {
        MetricType::Counter => {
            imports::envoy_dynamic_module_callback_http_filter_config_increment_counter
        }
        MetricType::Gauge => imports::envoy_dynamic_module_callback_http_filter_config_set_gauge,
        MetricType::Histogram => {
            imports::envoy_dynamic_module_callback_http_filter_config_record_histogram_value
        }
    };
    // SAFETY: the caller's promise; the buffers live for the call.
    unsafe {
        change(config, id, labels.as_ptr(), labels.len(), value);
    }
}
