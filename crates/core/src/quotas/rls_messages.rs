//! The messages of Envoy's rate limit service API (`envoy.service.ratelimit.v3`), as
//! much of them as the filter and the project's RLS server use, declared with prost's
//! derive (no protoc). Unknown fields in an answer are skipped by prost, so a server
//! that sends more (headers to add, quotas, metadata) is read as well.
//!
//! The project's RLS server (`rls-server/`) compiles this same file.

/// `envoy.service.ratelimit.v3.RateLimitRequest`.
#[derive(Clone, PartialEq, ::prost::Message)]
pub struct RateLimitRequest {
    #[prost(string, tag = "1")]
    pub domain: ::prost::alloc::string::String,
    #[prost(message, repeated, tag = "2")]
    pub descriptors: ::prost::alloc::vec::Vec<RateLimitDescriptor>,
    /// Requests counted by this call; 0 means 1.
    #[prost(uint32, tag = "3")]
    pub hits_addend: u32,
}

/// `envoy.extensions.common.ratelimit.v3.RateLimitDescriptor`.
#[derive(Clone, PartialEq, ::prost::Message)]
pub struct RateLimitDescriptor {
    #[prost(message, repeated, tag = "1")]
    pub entries: ::prost::alloc::vec::Vec<Entry>,
    #[prost(message, optional, tag = "2")]
    pub limit: ::core::option::Option<RateLimitOverride>,
}

/// `RateLimitDescriptor.Entry`.
#[derive(Clone, PartialEq, ::prost::Message)]
pub struct Entry {
    #[prost(string, tag = "1")]
    pub key: ::prost::alloc::string::String,
    #[prost(string, tag = "2")]
    pub value: ::prost::alloc::string::String,
}

/// `RateLimitDescriptor.RateLimitOverride`.
#[derive(Clone, PartialEq, ::prost::Message)]
pub struct RateLimitOverride {
    #[prost(uint32, tag = "1")]
    pub requests_per_unit: u32,
    /// `envoy.type.v3.RateLimitUnit`: see [`Unit`].
    #[prost(int32, tag = "2")]
    pub unit: i32,
}

/// `envoy.service.ratelimit.v3.RateLimitResponse`.
#[derive(Clone, PartialEq, ::prost::Message)]
pub struct RateLimitResponse {
    /// See [`Code`].
    #[prost(int32, tag = "1")]
    pub overall_code: i32,
    #[prost(message, repeated, tag = "2")]
    pub statuses: ::prost::alloc::vec::Vec<DescriptorStatus>,
}

/// `RateLimitResponse.DescriptorStatus`: one per descriptor, in the request's order.
#[derive(Clone, PartialEq, ::prost::Message)]
pub struct DescriptorStatus {
    #[prost(int32, tag = "1")]
    pub code: i32,
    #[prost(message, optional, tag = "2")]
    pub current_limit: ::core::option::Option<CurrentLimit>,
    #[prost(uint32, tag = "3")]
    pub limit_remaining: u32,
    #[prost(message, optional, tag = "4")]
    pub duration_until_reset: ::core::option::Option<Duration>,
}

/// `RateLimitResponse.RateLimit`.
#[derive(Clone, PartialEq, ::prost::Message)]
pub struct CurrentLimit {
    #[prost(string, tag = "3")]
    pub name: ::prost::alloc::string::String,
    #[prost(uint32, tag = "1")]
    pub requests_per_unit: u32,
    #[prost(int32, tag = "2")]
    pub unit: i32,
}

/// `google.protobuf.Duration`.
#[derive(Clone, Copy, PartialEq, ::prost::Message)]
pub struct Duration {
    #[prost(int64, tag = "1")]
    pub seconds: i64,
    #[prost(int32, tag = "2")]
    pub nanos: i32,
}

/// `RateLimitResponse.Code`.
pub mod code {
    pub const UNKNOWN: i32 = 0;
    pub const OK: i32 = 1;
    pub const OVER_LIMIT: i32 = 2;
}

/// `envoy.type.v3.RateLimitUnit` (the same numbers as `RateLimitResponse.RateLimit.Unit`
/// for these six).
pub mod unit {
    pub const SECOND: i32 = 1;
    pub const MINUTE: i32 = 2;
    pub const HOUR: i32 = 3;
    pub const DAY: i32 = 4;
    pub const MONTH: i32 = 5;
    pub const YEAR: i32 = 6;
}

/// The method's gRPC service and name, as the host's gRPC call takes them.
pub const SERVICE: &str = "envoy.service.ratelimit.v3.RateLimitService";
pub const METHOD: &str = "ShouldRateLimit";
