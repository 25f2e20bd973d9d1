//! The cheapest HTTP filter Envoy 1.40's dynamic module ABI allows: every hook Envoy looks
//! up, each doing nothing. Every request still costs Envoy its filter object and the calls
//! into the module (new, request headers, response headers, stream complete, destroy),
//! which is what lab/bench measures as the dynamic module floor. No callback into
//! Envoy: the module references no Envoy symbol.
#![allow(clippy::missing_safety_doc)]
use std::ffi::c_void;

type Ptr = *mut c_void;
type Module = *const c_void;

#[repr(C)]
pub struct Buffer {
    ptr: *const u8,
    length: usize,
}

/// A non-null pointer for Envoy to hand back (a null one refuses the configuration or
/// the stream).
static SOMETHING: u8 = 0;

fn something() -> Module {
    &SOMETHING as *const u8 as Module
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_program_init() -> *const u8 {
    b"v0.2.0\0".as_ptr()
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_new(
    _: Ptr,
    _: Buffer,
    _: Buffer,
) -> Module {
    something()
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_destroy(_: Module) {}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_scheduled(_: Ptr, _: Module, _: u64) {}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_http_callout_done(
    _: Ptr,
    _: Module,
    _: u64,
    _: u32,
    _: *const c_void,
    _: usize,
    _: *const c_void,
    _: usize,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_http_stream_headers(
    _: Ptr,
    _: Module,
    _: u64,
    _: *const c_void,
    _: usize,
    _: bool,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_http_stream_data(
    _: Ptr,
    _: Module,
    _: u64,
    _: *const c_void,
    _: usize,
    _: bool,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_http_stream_trailers(
    _: Ptr,
    _: Module,
    _: u64,
    _: *const c_void,
    _: usize,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_http_stream_complete(
    _: Ptr,
    _: Module,
    _: u64,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_http_stream_reset(
    _: Ptr,
    _: Module,
    _: u64,
    _: u32,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_per_route_config_new(
    _: Buffer,
    _: Buffer,
) -> Module {
    something()
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_per_route_config_destroy(_: Module) {}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_new(_: Module, _: Ptr) -> Module {
    something()
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_destroy(_: Module) {}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_stream_complete(_: Ptr, _: Module) {}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_request_headers(
    _: Ptr,
    _: Module,
    _: bool,
) -> u32 {
    0
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_request_body(
    _: Ptr,
    _: Module,
    _: bool,
) -> u32 {
    0
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_request_trailers(_: Ptr, _: Module) -> u32 {
    0
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_headers(
    _: Ptr,
    _: Module,
    _: bool,
) -> u32 {
    0
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_body(
    _: Ptr,
    _: Module,
    _: bool,
) -> u32 {
    0
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_trailers(_: Ptr, _: Module) -> u32 {
    0
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_callout_done(
    _: Ptr,
    _: Module,
    _: u64,
    _: u32,
    _: *const c_void,
    _: usize,
    _: *const c_void,
    _: usize,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_headers(
    _: Ptr,
    _: Module,
    _: u64,
    _: *const c_void,
    _: usize,
    _: bool,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_data(
    _: Ptr,
    _: Module,
    _: u64,
    _: *const c_void,
    _: usize,
    _: bool,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_trailers(
    _: Ptr,
    _: Module,
    _: u64,
    _: *const c_void,
    _: usize,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_complete(
    _: Ptr,
    _: Module,
    _: u64,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_reset(
    _: Ptr,
    _: Module,
    _: u64,
    _: u32,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_scheduled(_: Ptr, _: Module, _: u64) {}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_local_reply(
    _: Ptr,
    _: Module,
    _: u32,
    _: Buffer,
    _: bool,
) -> u32 {
    0
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_downstream_above_write_buffer_high_watermark(
    _: Ptr,
    _: Module,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_downstream_below_write_buffer_low_watermark(
    _: Ptr,
    _: Module,
) {
}
