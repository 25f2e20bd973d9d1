//! The host calls a request makes, each with the one sensible answer to its failure.
use crate::denial::Denial;
use crate::header_map::{self, Header};
use crate::shared_store::{SetError, SharedStore};
use proxy_wasm::types::{MapType, Status};

/// The host calls every request makes, declared here rather than called through the
/// SDK's helpers: those `panic!` on any status they do not expect, and a panic kills the
/// VM with every request on its worker. Here a refusal is an answer like any other.
mod abi {
    use proxy_wasm::types::{MapType, Status};

    #[link(wasm_import_module = "env")]
    extern "C" {
        pub fn proxy_get_header_map_pairs(
            map_type: MapType,
            return_map_data: *mut *mut u8,
            return_map_size: *mut usize,
        ) -> Status;
        pub fn proxy_replace_header_map_value(
            map_type: MapType,
            key_data: *const u8,
            key_size: usize,
            value_data: *const u8,
            value_size: usize,
        ) -> Status;
        pub fn proxy_add_header_map_value(
            map_type: MapType,
            key_data: *const u8,
            key_size: usize,
            value_data: *const u8,
            value_size: usize,
        ) -> Status;
        pub fn proxy_remove_header_map_value(
            map_type: MapType,
            key_data: *const u8,
            key_size: usize,
        ) -> Status;
        pub fn proxy_set_property(
            path_data: *const u8,
            path_size: usize,
            value_data: *const u8,
            value_size: usize,
        ) -> Status;
        pub fn proxy_get_shared_data(
            key_data: *const u8,
            key_size: usize,
            return_value_data: *mut *mut u8,
            return_value_size: *mut usize,
            return_cas: *mut u32,
        ) -> Status;
        pub fn proxy_set_shared_data(
            key_data: *const u8,
            key_size: usize,
            value_data: *const u8,
            value_size: usize,
            cas: u32,
        ) -> Status;
        pub fn proxy_increment_metric(metric_id: u32, offset: i64) -> Status;
        pub fn proxy_get_current_time_nanoseconds(return_time: *mut u64) -> Status;
        pub fn proxy_send_local_response(
            status_code: u32,
            status_code_details_data: *const u8,
            status_code_details_size: usize,
            body_data: *const u8,
            body_size: usize,
            headers_data: *const u8,
            headers_size: usize,
            grpc_status: i32,
        ) -> Status;
    }
}

/// The host's wall clock, in milliseconds since the Unix epoch (0 if it refuses).
pub fn now_ms() -> u64 {
    let mut nanos = 0u64;
    // SAFETY: the pointer is valid for the whole call.
    match unsafe { abi::proxy_get_current_time_nanoseconds(&mut nanos) } {
        Status::Ok => nanos / 1_000_000,
        _ => 0,
    }
}

/// Takes ownership of bytes the host handed back.
///
/// # Safety
/// `data` is null or was filled by the host with `size` bytes it allocated through the
/// SDK's `proxy_on_memory_allocate`: a boxed slice of exactly that length (as in the
/// SDK's own readers).
unsafe fn host_bytes(data: *mut u8, size: usize) -> Vec<u8> {
    if data.is_null() {
        Vec::new()
    } else {
        Vec::from_raw_parts(data, size, size)
    }
}

/// A header map as the host serializes it, for `header_map::parse`: the SDK's own
/// reader would copy every name and value into a string of its own (and panic on a name
/// that is not UTF-8).
pub fn header_bytes(map: MapType) -> Vec<u8> {
    let mut data: *mut u8 = std::ptr::null_mut();
    let mut size = 0usize;
    // SAFETY: see `host_bytes`.
    unsafe {
        match abi::proxy_get_header_map_pairs(map, &mut data, &mut size) {
            Status::Ok => host_bytes(data, size),
            _ => Vec::new(),
        }
    }
}

/// `proxy_replace_header_map_value` or `proxy_add_header_map_value`.
type HeaderWrite = unsafe extern "C" fn(MapType, *const u8, usize, *const u8, usize) -> Status;

fn write_header(write: HeaderWrite, map: MapType, name: &str, value: &[u8]) {
    // SAFETY (here and below): every pointer is valid for its size for the whole call.
    let _ = unsafe { write(map, name.as_ptr(), name.len(), value.as_ptr(), value.len()) };
}

pub fn set_request_header(name: &str, value: &[u8]) {
    write_header(
        abi::proxy_replace_header_map_value,
        MapType::HttpRequestHeaders,
        name,
        value,
    );
}

pub fn remove_request_header(name: &str) {
    let _ = unsafe {
        abi::proxy_remove_header_map_value(MapType::HttpRequestHeaders, name.as_ptr(), name.len())
    };
}

pub fn add_response_header(name: &str, value: &str) {
    write_header(
        abi::proxy_add_header_map_value,
        MapType::HttpResponseHeaders,
        name,
        value.as_bytes(),
    );
}

pub fn increment_counter(metric_id: u32) {
    let _ = unsafe { abi::proxy_increment_metric(metric_id, 1) };
}

/// Shared data under `key`: its value and CAS, or None when there is none (or the host
/// refused).
fn shared_data(key: &str) -> Option<(Vec<u8>, u32)> {
    let (mut data, mut size, mut cas) = (std::ptr::null_mut(), 0usize, 0u32);
    // SAFETY: see `host_bytes`.
    unsafe {
        match abi::proxy_get_shared_data(key.as_ptr(), key.len(), &mut data, &mut size, &mut cas) {
            Status::Ok => Some((host_bytes(data, size), cas)),
            _ => None,
        }
    }
}

fn set_shared_data(key: &str, value: &[u8], cas: u32) -> Status {
    unsafe { abi::proxy_set_shared_data(key.as_ptr(), key.len(), value.as_ptr(), value.len(), cas) }
}

/// The value under `key`; None when there is none, or it is empty.
pub fn shared_get(key: &str) -> Option<Vec<u8>> {
    shared_data(key)
        .map(|(value, _)| value)
        .filter(|value| !value.is_empty())
}

pub fn shared_set(key: &str, value: &[u8]) {
    // The cache is best effort: a lost write only costs another lookup later.
    let _ = set_shared_data(key, value, 0);
}

/// Filter state for access logs, read as `%FILTER_STATE(wasm.apikey_filter.<name>:PLAIN)%`
/// (Envoy puts properties a wasm filter sets under `wasm.`). A path of one segment is its
/// bytes as they are (segments are joined with NUL).
fn set_log_field(name: &str, value: &str) {
    let _ =
        unsafe { abi::proxy_set_property(name.as_ptr(), name.len(), value.as_ptr(), value.len()) };
}

/// Who the key belongs to, for the access log: never the key itself.
pub fn set_log_fingerprint(fingerprint: &str) {
    set_log_field("apikey_filter.fingerprint", fingerprint);
}

pub fn set_log_identity(key_id: &str, owner: &str) {
    set_log_field("apikey_filter.key_id", key_id);
    set_log_field("apikey_filter.owner", owner);
}

/// Sends the spec's JSON error as a local reply of the current request.
pub fn send_denial(denial: Denial, www_authenticate: &str, extra: &[(&str, &str)]) {
    let mut headers: Vec<Header> = vec![(b"content-type", b"application/json")];
    if denial.status() == 401 {
        headers.push((b"www-authenticate", www_authenticate.as_bytes()));
    }
    headers.extend(extra.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes())));
    let headers = header_map::serialize(&headers);
    let body = denial.body();
    // The last argument is a gRPC status; -1: none.
    let _ = unsafe {
        abi::proxy_send_local_response(
            denial.status(),
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

/// Envoy's shared data, as the rate limiter sees it.
pub struct HostStore;

impl SharedStore for HostStore {
    fn get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        // A CAS of 0 would make the write that follows unconditional.
        shared_data(key).filter(|&(_, cas)| cas != 0)
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), SetError> {
        match set_shared_data(key, value, cas.unwrap_or(0)) {
            Status::Ok => Ok(()),
            Status::CasMismatch => Err(SetError::CasMismatch),
            _ => Err(SetError::Failed),
        }
    }
}
