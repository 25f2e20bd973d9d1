//! Small wrappers over host calls whose failures have one sensible answer.
use crate::denial::Denial;
use crate::shared_store::{SetError, SharedStore};
use proxy_wasm::hostcalls;
use proxy_wasm::types::{Bytes, MapType, Status};
use std::time::UNIX_EPOCH;

pub fn now_ms() -> u64 {
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_millis() as u64)
}

/// A header map as the host serializes it, for `header_map::parse`: the SDK's own
/// reader would copy every name and value into a string of its own (and panic on a name
/// that is not UTF-8).
pub fn header_bytes(map: MapType) -> Vec<u8> {
    #[link(wasm_import_module = "env")]
    extern "C" {
        fn proxy_get_header_map_pairs(
            map_type: MapType,
            return_map_data: *mut *mut u8,
            return_map_size: *mut usize,
        ) -> Status;
    }
    let mut data: *mut u8 = std::ptr::null_mut();
    let mut size = 0usize;
    // SAFETY: as in the SDK's `get_map_bytes`: on success the host has filled `data`
    // with `size` bytes it allocated through the SDK's `proxy_on_memory_allocate`, a
    // boxed slice of exactly that length, which the Vec now owns.
    unsafe {
        match proxy_get_header_map_pairs(map, &mut data, &mut size) {
            Status::Ok if !data.is_null() => Vec::from_raw_parts(data, size, size),
            _ => Vec::new(),
        }
    }
}

pub fn set_request_header(name: &str, value: &[u8]) {
    let _ = hostcalls::set_map_value_bytes(MapType::HttpRequestHeaders, name, Some(value));
}

pub fn remove_request_header(name: &str) {
    let _ = hostcalls::remove_map_value(MapType::HttpRequestHeaders, name);
}

pub fn add_response_header(name: &str, value: &str) {
    let _ = hostcalls::add_map_value(MapType::HttpResponseHeaders, name, value);
}

pub fn shared_get(key: &str) -> Option<Bytes> {
    hostcalls::get_shared_data(key)
        .ok()
        .and_then(|(value, _)| value)
}

pub fn shared_set(key: &str, value: &[u8]) {
    // The cache is best effort: a lost write only costs another lookup later.
    let _ = hostcalls::set_shared_data(key, Some(value), None);
}

/// Filter state for access logs, read as `%FILTER_STATE(wasm.apikey_filter.<name>:PLAIN)%`
/// (Envoy puts properties a wasm filter sets under `wasm.`). Called directly: the SDK's
/// `set_property` copies the path twice on every request and panics on any refusal.
fn set_log_field(name: &str, value: &str) {
    #[link(wasm_import_module = "env")]
    extern "C" {
        fn proxy_set_property(
            path_data: *const u8,
            path_size: usize,
            value_data: *const u8,
            value_size: usize,
        ) -> Status;
    }
    // SAFETY: both pointers are valid for their sizes for the whole call, and a path of
    // one segment is its bytes as they are (segments are joined with NUL).
    let _ = unsafe { proxy_set_property(name.as_ptr(), name.len(), value.as_ptr(), value.len()) };
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
    let mut headers: Vec<(&str, &str)> = vec![("content-type", "application/json")];
    if denial.status() == 401 {
        headers.push(("www-authenticate", www_authenticate));
    }
    headers.extend_from_slice(extra);
    let body = denial.body();
    let _ = hostcalls::send_http_response(denial.status(), headers, Some(body.as_bytes()));
}

/// Envoy's shared data, as the rate limiter sees it.
pub struct HostStore;

impl SharedStore for HostStore {
    fn get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        match hostcalls::get_shared_data(key) {
            Ok((value, Some(cas))) => Some((value.unwrap_or_default(), cas)),
            _ => None,
        }
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), SetError> {
        match hostcalls::set_shared_data(key, Some(value), cas) {
            Ok(()) => Ok(()),
            Err(Status::CasMismatch) => Err(SetError::CasMismatch),
            Err(_) => Err(SetError::Failed),
        }
    }
}
