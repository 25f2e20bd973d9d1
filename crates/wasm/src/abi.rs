//! The proxy-wasm ABI (0.2.1) calls the filter makes, declared here with each status
//! read as a plain number, and wrapped so that every refusal is a value: no call here can
//! panic, whatever the host answers. (The SDK's helpers `panic!` on statuses they do not
//! expect, and a panic kills the VM with every request on its worker.)

pub const OK: u32 = 0;
pub const CAS_MISMATCH: u32 = 8;
/// `InternalFailure`: e.g. an HTTP call that Envoy failed inside `send` (its answer is lost).
pub const INTERNAL_FAILURE: u32 = 10;

/// Header maps.
pub const REQUEST_HEADERS: u32 = 0;
pub const RESPONSE_HEADERS: u32 = 2;
pub const CALLOUT_RESPONSE_HEADERS: u32 = 6;
/// Buffers.
const CALLOUT_RESPONSE_BODY: u32 = 4;
const GRPC_RECEIVE_BUFFER: u32 = 5;
const PLUGIN_CONFIGURATION: u32 = 7;
/// Metric types.
pub const COUNTER: u32 = 0;
pub const GAUGE: u32 = 1;
pub const HISTOGRAM: u32 = 2;
/// Stream types.
const HTTP_REQUEST: u32 = 0;

mod imports {
    #[link(wasm_import_module = "env")]
    extern "C" {
        pub fn proxy_log(level: u32, message_data: *const u8, message_size: usize) -> u32;
        pub fn proxy_get_log_level(return_level: *mut u32) -> u32;
        pub fn proxy_get_current_time_nanoseconds(return_time: *mut u64) -> u32;
        pub fn proxy_set_tick_period_milliseconds(period: u32) -> u32;
        pub fn proxy_get_buffer_bytes(
            buffer_type: u32,
            start: usize,
            max_size: usize,
            return_data: *mut *mut u8,
            return_size: *mut usize,
        ) -> u32;
        pub fn proxy_get_header_map_pairs(
            map_type: u32,
            return_data: *mut *mut u8,
            return_size: *mut usize,
        ) -> u32;
        pub fn proxy_get_header_map_value(
            map_type: u32,
            key_data: *const u8,
            key_size: usize,
            return_data: *mut *mut u8,
            return_size: *mut usize,
        ) -> u32;
        pub fn proxy_replace_header_map_value(
            map_type: u32,
            key_data: *const u8,
            key_size: usize,
            value_data: *const u8,
            value_size: usize,
        ) -> u32;
        pub fn proxy_add_header_map_value(
            map_type: u32,
            key_data: *const u8,
            key_size: usize,
            value_data: *const u8,
            value_size: usize,
        ) -> u32;
        pub fn proxy_remove_header_map_value(
            map_type: u32,
            key_data: *const u8,
            key_size: usize,
        ) -> u32;
        pub fn proxy_get_property(
            path_data: *const u8,
            path_size: usize,
            return_data: *mut *mut u8,
            return_size: *mut usize,
        ) -> u32;
        pub fn proxy_set_property(
            path_data: *const u8,
            path_size: usize,
            value_data: *const u8,
            value_size: usize,
        ) -> u32;
        pub fn proxy_get_shared_data(
            key_data: *const u8,
            key_size: usize,
            return_data: *mut *mut u8,
            return_size: *mut usize,
            return_cas: *mut u32,
        ) -> u32;
        pub fn proxy_set_shared_data(
            key_data: *const u8,
            key_size: usize,
            value_data: *const u8,
            value_size: usize,
            cas: u32,
        ) -> u32;
        pub fn proxy_register_shared_queue(
            name_data: *const u8,
            name_size: usize,
            return_id: *mut u32,
        ) -> u32;
        pub fn proxy_enqueue_shared_queue(
            queue_id: u32,
            value_data: *const u8,
            value_size: usize,
        ) -> u32;
        pub fn proxy_dequeue_shared_queue(
            queue_id: u32,
            return_data: *mut *mut u8,
            return_size: *mut usize,
        ) -> u32;
        pub fn proxy_continue_stream(stream_type: u32) -> u32;
        pub fn proxy_send_local_response(
            status_code: u32,
            details_data: *const u8,
            details_size: usize,
            body_data: *const u8,
            body_size: usize,
            headers_data: *const u8,
            headers_size: usize,
            grpc_status: i32,
        ) -> u32;
        pub fn proxy_http_call(
            upstream_data: *const u8,
            upstream_size: usize,
            headers_data: *const u8,
            headers_size: usize,
            body_data: *const u8,
            body_size: usize,
            trailers_data: *const u8,
            trailers_size: usize,
            timeout_ms: u32,
            return_token: *mut u32,
        ) -> u32;
        pub fn proxy_grpc_call(
            service_data: *const u8,
            service_size: usize,
            service_name_data: *const u8,
            service_name_size: usize,
            method_name_data: *const u8,
            method_name_size: usize,
            initial_metadata_data: *const u8,
            initial_metadata_size: usize,
            message_data: *const u8,
            message_size: usize,
            timeout_ms: u32,
            return_token: *mut u32,
        ) -> u32;
        pub fn proxy_set_effective_context(context_id: u32) -> u32;
        pub fn proxy_define_metric(
            metric_type: u32,
            name_data: *const u8,
            name_size: usize,
            return_id: *mut u32,
        ) -> u32;
        pub fn proxy_increment_metric(metric_id: u32, offset: i64) -> u32;
        pub fn proxy_record_metric(metric_id: u32, value: u64) -> u32;
    }
}

use imports::*;

/// Takes ownership of bytes the host handed back, allocated through
/// `proxy_on_memory_allocate` (see `wasm::entry`): a boxed slice of exactly `size` bytes.
///
/// # Safety
/// `data` is null or was filled by the host as described.
unsafe fn host_bytes(data: *mut u8, size: usize) -> Vec<u8> {
    if data.is_null() {
        Vec::new()
    } else {
        Vec::from_raw_parts(data, size, size)
    }
}

/// Calls a host function that hands bytes back; `None` unless it says Ok.
fn bytes_from(call: impl FnOnce(*mut *mut u8, *mut usize) -> u32) -> Option<Vec<u8>> {
    let (mut data, mut size) = (std::ptr::null_mut(), 0usize);
    let status = call(&mut data, &mut size);
    // SAFETY: whatever the status, anything the host allocated is ours to free.
    let bytes = unsafe { host_bytes(data, size) };
    (status == OK).then_some(bytes)
}

// SAFETY (every call below): each pointer is valid for its size for the whole call, and
// the host writes only through the return pointers it is given.

pub fn log(level: u32, message: &str) {
    let _ = unsafe { proxy_log(level, message.as_ptr(), message.len()) };
}

pub fn log_level() -> Option<u32> {
    let mut level = 0u32;
    (unsafe { proxy_get_log_level(&mut level) } == OK).then_some(level)
}

/// The host's wall clock, in milliseconds since the Unix epoch (0 if it refuses).
pub fn now_ms() -> u64 {
    let mut nanos = 0u64;
    match unsafe { proxy_get_current_time_nanoseconds(&mut nanos) } {
        OK => nanos / 1_000_000,
        _ => 0,
    }
}

pub fn set_tick_period_ms(period_ms: u64) {
    let period = u32::try_from(period_ms).unwrap_or(u32::MAX);
    let _ = unsafe { proxy_set_tick_period_milliseconds(period) };
}

pub fn plugin_configuration(size: usize) -> Vec<u8> {
    bytes_from(|data, len| unsafe {
        proxy_get_buffer_bytes(PLUGIN_CONFIGURATION, 0, size, data, len)
    })
    .unwrap_or_default()
}

pub fn callout_body(size: usize) -> Vec<u8> {
    bytes_from(|data, len| unsafe {
        proxy_get_buffer_bytes(CALLOUT_RESPONSE_BODY, 0, size, data, len)
    })
    .unwrap_or_default()
}

/// A header map in the host's serialization (see `request::header_map`).
pub fn header_map(map: u32) -> Vec<u8> {
    bytes_from(|data, len| unsafe { proxy_get_header_map_pairs(map, data, len) })
        .unwrap_or_default()
}

pub fn header_value(map: u32, name: &str) -> Option<Vec<u8>> {
    bytes_from(|data, len| unsafe {
        proxy_get_header_map_value(map, name.as_ptr(), name.len(), data, len)
    })
}

pub fn replace_header(map: u32, name: &str, value: &[u8]) {
    let _ = unsafe {
        proxy_replace_header_map_value(map, name.as_ptr(), name.len(), value.as_ptr(), value.len())
    };
}

pub fn add_header(map: u32, name: &str, value: &[u8]) {
    let _ = unsafe {
        proxy_add_header_map_value(map, name.as_ptr(), name.len(), value.as_ptr(), value.len())
    };
}

pub fn remove_header(map: u32, name: &str) {
    let _ = unsafe { proxy_remove_header_map_value(map, name.as_ptr(), name.len()) };
}

/// A property by its path, segments joined with NUL as the ABI wants them.
pub fn property(path: &[u8]) -> Option<Vec<u8>> {
    bytes_from(|data, len| unsafe { proxy_get_property(path.as_ptr(), path.len(), data, len) })
}

pub fn set_property(path: &str, value: &str) {
    let _ = unsafe { proxy_set_property(path.as_ptr(), path.len(), value.as_ptr(), value.len()) };
}

/// Shared data under `key`: its value and CAS; `None` when there is none or the host
/// refused.
pub fn shared_data(key: &str) -> Option<(Vec<u8>, u32)> {
    let mut cas = 0u32;
    let value = bytes_from(|data, len| unsafe {
        proxy_get_shared_data(key.as_ptr(), key.len(), data, len, &mut cas)
    })?;
    Some((value, cas))
}

pub fn set_shared_data(key: &str, value: &[u8], cas: u32) -> u32 {
    unsafe { proxy_set_shared_data(key.as_ptr(), key.len(), value.as_ptr(), value.len(), cas) }
}

pub fn register_queue(name: &str) -> Result<u32, u32> {
    let mut id = 0u32;
    match unsafe { proxy_register_shared_queue(name.as_ptr(), name.len(), &mut id) } {
        OK => Ok(id),
        status => Err(status),
    }
}

pub fn enqueue(queue: u32, message: &[u8]) -> bool {
    unsafe { proxy_enqueue_shared_queue(queue, message.as_ptr(), message.len()) == OK }
}

/// The next message on `queue`; `None` when it is empty (or the host refused).
pub fn dequeue(queue: u32) -> Option<Vec<u8>> {
    bytes_from(|data, len| unsafe { proxy_dequeue_shared_queue(queue, data, len) })
}

pub fn resume_request() {
    let _ = unsafe { proxy_continue_stream(HTTP_REQUEST) };
}

/// A local reply; `headers` in the host's map serialization.
pub fn send_local_response(status: u32, body: &str, headers: &[u8]) {
    // The last argument is a gRPC status; -1: none.
    let _ = unsafe {
        proxy_send_local_response(
            status,
            std::ptr::null(),
            0,
            body.as_ptr(),
            body.len(),
            headers.as_ptr(),
            headers.len(),
            -1,
        )
    };
}

/// Sends an HTTP callout; its token, or the status the host refused it with.
pub fn http_call(cluster: &str, headers: &[u8], timeout_ms: u64) -> Result<u32, u32> {
    let mut token = 0u32;
    let status = unsafe {
        proxy_http_call(
            cluster.as_ptr(),
            cluster.len(),
            headers.as_ptr(),
            headers.len(),
            std::ptr::null(),
            0,
            std::ptr::null(),
            0,
            timeout_of(timeout_ms),
            &mut token,
        )
    };
    token_or(status, token)
}

fn timeout_of(timeout_ms: u64) -> u32 {
    u32::try_from(timeout_ms).unwrap_or(u32::MAX)
}

/// A call's token if the host took it, else its status.
fn token_or(status: u32, token: u32) -> Result<u32, u32> {
    if status == OK {
        Ok(token)
    } else {
        Err(status)
    }
}

/// Sends a unary gRPC call from the context acting now; its token, or the status the
/// host refused it with.
pub fn grpc_call(
    service: &[u8],
    service_name: &str,
    method: &str,
    message: &[u8],
    timeout_ms: u64,
) -> Result<u32, u32> {
    let mut token = 0u32;
    // No initial metadata: an empty header map is four zero bytes (no pairs).
    let metadata = [0u8; 4];
    let status = unsafe {
        proxy_grpc_call(
            service.as_ptr(),
            service.len(),
            service_name.as_ptr(),
            service_name.len(),
            method.as_ptr(),
            method.len(),
            metadata.as_ptr(),
            metadata.len(),
            message.as_ptr(),
            message.len(),
            timeout_of(timeout_ms),
            &mut token,
        )
    };
    token_or(status, token)
}

/// The first `size` bytes of the gRPC message being delivered.
pub fn grpc_message(size: usize) -> Vec<u8> {
    bytes_from(|data, len| unsafe {
        proxy_get_buffer_bytes(GRPC_RECEIVE_BUFFER, 0, size, data, len)
    })
    .unwrap_or_default()
}

pub fn set_effective_context(context_id: u32) -> bool {
    unsafe { proxy_set_effective_context(context_id) == OK }
}

pub fn define_metric(metric_type: u32, name: &str) -> Option<u32> {
    let mut id = 0u32;
    (unsafe { proxy_define_metric(metric_type, name.as_ptr(), name.len(), &mut id) } == OK)
        .then_some(id)
}

pub fn increment_metric(id: u32, by: i64) {
    let _ = unsafe { proxy_increment_metric(id, by) };
}

pub fn record_metric(id: u32, value: u64) {
    let _ = unsafe { proxy_record_metric(id, value) };
}
