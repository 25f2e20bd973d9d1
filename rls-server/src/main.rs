//! rls-server: Envoy's rate limit service (`envoy.service.ratelimit.v3.RateLimitService`,
//! method `ShouldRateLimit`) on Kuadrant's Limitador, for the filter's tests and demos.
//! The counting is Limitador's (`check_rate_limited_and_update`, in-memory counters: every
//! node of a test shares this one process); only the mapping of an RLS call onto
//! Limitador is ours:
//!
//! * namespace = the request's `domain`; hits = `hits_addend`, 0 meaning 1. All the
//!   descriptors of a call are checked and counted together: when one is over its limit
//!   the answer is OVER_LIMIT and nothing is counted (Limitador's behaviour).
//! * Override mode (default, like envoyproxy/ratelimit): a descriptor with a `limit`
//!   {N, unit} is counted under a limit of N per unit (a month is 30 days, a year 365),
//!   keyed by all its entries, whatever its place in the call. Other descriptors are not
//!   limited.
//! * `--limits FILE`: Limitador's own limits file; the descriptors are exposed to the
//!   limits' conditions and variables as limitador-server does (`descriptors[0].key_id`,
//!   a list of maps), and overrides are ignored. A counter's status goes to each
//!   descriptor its limit depends on.
//!
//! Answers carry one DescriptorStatus per descriptor (code, limit, remaining, time to
//! reset) unless `--no-statuses`, which answers only `overall_code` as Limitador's own
//! server does. A small HTTP admin endpoint (`--admin`) counts calls and switches the
//! server into failure modes for the tests (see `admin`).
//!
//! No protoc: the messages are the filter's own (the core's `quotas::rls_messages`) and
//! the service is wired by hand the way tonic's generated code does it.

use apikey_core::quotas::rls_messages::{
    code, unit, CurrentLimit, DescriptorStatus, Duration, RateLimitDescriptor, RateLimitRequest,
    RateLimitResponse,
};
use limitador::counter::Counter;
use limitador::limit::{Context, Expression, Limit, Namespace};
use limitador::RateLimiter;
use prost::bytes::BufMut;
use prost::Message;
use std::cell::Cell;
use std::collections::HashMap;
use std::convert::Infallible;
use std::io::Write;
use std::net::SocketAddr;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::task::Poll;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::{http, Body, BoxFuture, Service, StdError};
use tonic::server::{Grpc, NamedService, UnaryService};
use tonic::Status;

const USAGE: &str = "usage: rls-server [--grpc ADDR] [--admin ADDR] [--limits FILE] [--no-statuses]
  --grpc ADDR     gRPC listen address (default 127.0.0.1:8081; port 0: any free port)
  --admin ADDR    test admin HTTP endpoint (port 0: any free port); none when absent
  --limits FILE   Limitador limits file (YAML); descriptors' overrides are then ignored
  --no-statuses   answer overall_code only, as Limitador's own server does";

/// The full gRPC path of the one method served.
const SHOULD_RATE_LIMIT_PATH: &str = "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit";
/// Counters kept by the in-memory storage (limitador-server's default).
const MEMORY_CACHE_SIZE: u64 = 10_000;
/// What `--mode garbage` answers: a varint cut short, not a RateLimitResponse.
const GARBAGE: [u8; 3] = [0xff, 0xff, 0xff];

// -- options -------------------------------------------------------------------------------

struct Options {
    grpc: SocketAddr,
    admin: Option<SocketAddr>,
    limits_file: Option<String>,
    statuses: bool,
}

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Options, String> {
    let mut grpc: SocketAddr = ([127, 0, 0, 1], 8081).into();
    let mut admin = None;
    let mut limits_file = None;
    let mut statuses = true;
    let addr = |flag: &str, value: Option<String>| -> Result<SocketAddr, String> {
        let value = value.ok_or_else(|| format!("{flag} needs an address"))?;
        value
            .parse()
            .map_err(|_| format!("{flag} {value}: not an address like 127.0.0.1:8081"))
    };
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--grpc" => grpc = addr("--grpc", args.next())?,
            "--admin" => admin = Some(addr("--admin", args.next())?),
            "--limits" => limits_file = Some(args.next().ok_or("--limits needs a file")?),
            "--no-statuses" => statuses = false,
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(Options {
        grpc,
        admin,
        limits_file,
        statuses,
    })
}

// -- state ---------------------------------------------------------------------------------

/// How the server answers, set through the admin endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Normal,
    /// Every call fails with gRPC status UNAVAILABLE (14).
    GrpcError,
    /// Every call gets grpc-status 0 and a message that is not a RateLimitResponse.
    Garbage,
    /// Every answer waits this many milliseconds, then is a normal one.
    Slow(u64),
}

struct State {
    limiter: RateLimiter,
    /// `--limits`: descriptors are matched by the file's limits, overrides ignored.
    limits_file: bool,
    statuses: bool,
    /// The override limits added so far: (namespace, binding, seconds) -> max value. An
    /// override's counter is keyed by its entries and window, not by its N: a new N for
    /// the same descriptor changes the limit in place and keeps the count (as
    /// envoyproxy/ratelimit does).
    overrides: RwLock<HashMap<(String, String, u64), u64>>,
    /// Held across each check-and-count, so that this server's counting is exact
    /// whatever Limitador's storage does between reading a counter and adding to it
    /// (its Redis storage, measured earlier, admitted 15 of 10 with 40 calls at once).
    serial: Mutex<()>,
    mode: Mutex<Mode>,
    calls: AtomicU64,
    hits: AtomicU64,
}

impl State {
    fn mode(&self) -> Mode {
        *self.mode.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set_mode(&self, mode: Mode) {
        *self.mode.lock().unwrap_or_else(|e| e.into_inner()) = mode;
    }
}

// -- the call ------------------------------------------------------------------------------

/// What a call is answered with: a message, or (garbage mode) raw bytes.
enum Reply {
    Message(RateLimitResponse),
    Raw(Vec<u8>),
}

async fn should_rate_limit(state: Arc<State>, request: RateLimitRequest) -> Result<Reply, Status> {
    match state.mode() {
        Mode::GrpcError => return Err(Status::unavailable("rls-server: grpc-error mode")),
        Mode::Garbage => return Ok(Reply::Raw(GARBAGE.to_vec())),
        Mode::Slow(ms) => tokio::time::sleep(std::time::Duration::from_millis(ms)).await,
        Mode::Normal => {}
    }
    let hits = u64::from(request.hits_addend.max(1));
    let checker = Arc::clone(&state);
    // Limitador's calls block, and a limit whose
    // condition cannot be evaluated (e.g. `descriptors[1]` on a call with one descriptor)
    // panics inside Limitador: both stay off the async workers.
    let answer = tokio::task::spawn_blocking(move || {
        QUIET_PANICS.with(|q| q.set(true));
        let result = catch_unwind(AssertUnwindSafe(|| check(&checker, &request, hits)));
        result.unwrap_or_else(|payload| {
            Err(format!(
                "domain {:?}, {} descriptor(s): Limitador panicked: {}",
                request.domain,
                request.descriptors.len(),
                panic_message(payload.as_ref())
            ))
        })
    })
    .await
    .unwrap_or_else(|e| Err(format!("the check did not finish: {e}")));
    match answer {
        Ok(response) => {
            state.calls.fetch_add(1, Ordering::Relaxed);
            state.hits.fetch_add(hits, Ordering::Relaxed);
            Ok(Reply::Message(response))
        }
        Err(message) => {
            eprintln!("rls-server: call failed: {message}; answered UNAVAILABLE");
            Err(Status::unavailable(message))
        }
    }
}

fn check(
    state: &State,
    request: &RateLimitRequest,
    hits: u64,
) -> Result<RateLimitResponse, String> {
    if request.domain.is_empty() {
        // As limitador-server: no namespace, no verdict.
        eprintln!("rls-server: bad request: empty domain; answered UNKNOWN");
        return Ok(RateLimitResponse {
            overall_code: code::UNKNOWN,
            statuses: vec![],
        });
    }
    let namespace = Namespace::from(request.domain.as_str());
    let mut ctx = Context::default();
    let entries: Vec<HashMap<String, String>> = request
        .descriptors
        .iter()
        .map(|d| {
            d.entries
                .iter()
                .map(|e| (e.key.clone(), e.value.clone()))
                .collect()
        })
        .collect();
    // Override mode: the limit made for each descriptor (None: not limited).
    let mut override_limits: Vec<Option<Limit>> = vec![None; request.descriptors.len()];
    if state.limits_file {
        // As limitador-server: `descriptors` is the list of the descriptors' entries.
        ctx.list_binding("descriptors".to_string(), entries.clone());
    } else {
        let mut occurrences: HashMap<String, usize> = HashMap::new();
        for (i, descriptor) in request.descriptors.iter().enumerate() {
            match override_limit(&namespace, descriptor, &mut occurrences) {
                Ok(None) => {}
                Ok(Some((limit, binding, values))) => {
                    ctx.list_binding(binding.clone(), vec![values]);
                    ensure_override(state, &limit, &binding)?;
                    override_limits[i] = Some(limit);
                }
                Err(message) => eprintln!(
                    "rls-server: bad request: domain {:?}, descriptor {i}: {message}; not limited",
                    request.domain
                ),
            }
        }
    }

    let result = {
        let _one_at_a_time = state.serial.lock().unwrap_or_else(|e| e.into_inner());
        state
            .limiter
            .check_rate_limited_and_update(&namespace, &ctx, hits)
            .map_err(|e| format!("domain {:?}: Limitador: {e}", request.domain))?
    };
    let overall_code = if result.limited {
        code::OVER_LIMIT
    } else {
        code::OK
    };
    if !state.statuses {
        return Ok(RateLimitResponse {
            overall_code,
            statuses: vec![],
        });
    }

    // Which counters speak for which descriptor.
    let mut owned: Vec<Vec<&Counter>> = vec![vec![]; request.descriptors.len()];
    for counter in &result.counters {
        if state.limits_file {
            for i in descriptors_of(counter, &entries) {
                owned[i].push(counter);
            }
        } else if let Some(i) = override_limits
            .iter()
            .position(|l| l.as_ref() == Some(counter.limit()))
        {
            owned[i].push(counter);
        }
    }
    let statuses = owned
        .iter()
        .map(|counters| descriptor_status(counters, result.limited, hits))
        .collect();
    Ok(RateLimitResponse {
        overall_code,
        statuses,
    })
}

/// An override's limit, the name its entries are bound to, and the entries.
type OverrideLimit = (Limit, String, HashMap<String, String>);

/// The limit of a descriptor's override: N per unit in `namespace`, with one variable per
/// entry. The entries are bound to a name of their own, made from the entries' keys and
/// the window (and how many such descriptors came before in the call), so that the
/// counter does not depend on the descriptor's place in the call.
fn override_limit(
    namespace: &Namespace,
    descriptor: &RateLimitDescriptor,
    occurrences: &mut HashMap<String, usize>,
) -> Result<Option<OverrideLimit>, String> {
    let Some(limit) = &descriptor.limit else {
        return Ok(None);
    };
    let seconds = unit_seconds(limit.unit).ok_or_else(|| format!("unknown unit {}", limit.unit))?;
    if descriptor.entries.is_empty() {
        return Err("an override on a descriptor without entries".to_string());
    }
    let mut hash = Fnv::new();
    hash.write(&seconds.to_le_bytes());
    for entry in &descriptor.entries {
        hash.write(&(entry.key.len() as u64).to_le_bytes());
        hash.write(entry.key.as_bytes());
    }
    let shape = format!("d{:016x}", hash.0);
    let occurrence = occurrences.entry(shape.clone()).or_insert(0);
    let binding = format!("{shape}_{occurrence}");
    *occurrence += 1;

    let mut values = HashMap::new();
    let mut variables = Vec::with_capacity(descriptor.entries.len());
    for entry in &descriptor.entries {
        // A key repeated in the descriptor keeps each value: "key", "key#2", ...
        let mut label = entry.key.clone();
        let mut n = 1;
        while values.contains_key(&label) {
            n += 1;
            label = format!("{}#{n}", entry.key);
        }
        let source = format!("{binding}[0][{}]", cel_string(&label));
        let variable = Expression::parse(&source)
            .map_err(|e| format!("entry key {:?} gives no variable: {e}", entry.key))?;
        variables.push(variable);
        values.insert(label, entry.value.clone());
    }
    let limit = Limit::new(
        namespace.clone(),
        u64::from(limit.requests_per_unit),
        seconds,
        [],
        variables,
    );
    Ok(Some((limit, binding, values)))
}

/// Adds an override's limit to Limitador, or changes its max value in place.
fn ensure_override(state: &State, limit: &Limit, binding: &str) -> Result<(), String> {
    let key = (
        limit.namespace().as_ref().to_string(),
        binding.to_string(),
        limit.seconds(),
    );
    let known = |map: &HashMap<_, u64>| map.get(&key).copied();
    if known(&state.overrides.read().unwrap_or_else(|e| e.into_inner())) == Some(limit.max_value())
    {
        return Ok(());
    }
    let mut overrides = state.overrides.write().unwrap_or_else(|e| e.into_inner());
    match known(&overrides) {
        Some(max) if max == limit.max_value() => return Ok(()),
        Some(_) => {
            // Limitador's only way to change a limit's max value without dropping its
            // counters: configure_with every limit, this one changed (a Limit's identity
            // leaves its max value out). All limit changes happen under this lock.
            let mut all: Vec<Limit> = vec![limit.clone()];
            for ns in state.limiter.get_namespaces() {
                all.extend(
                    state
                        .limiter
                        .get_limits(&ns)
                        .into_iter()
                        .filter(|l| l != limit),
                );
            }
            state
                .limiter
                .configure_with(all)
                .map_err(|e| format!("changing a limit: {e}"))?;
        }
        None => {
            state.limiter.add_limit(limit.clone());
        }
    }
    overrides.insert(key, limit.max_value());
    Ok(())
}

/// Limits-file mode: the descriptors a counter speaks for: each descriptor without which
/// (its entries emptied, the others left in place) the counter's limit would not apply
/// or would count another counter. A limit that names no descriptor (a namespace-wide
/// one) speaks for none: it shows in `overall_code` only.
fn descriptors_of(counter: &Counter, entries: &[HashMap<String, String>]) -> Vec<usize> {
    let limit = counter.limit();
    (0..entries.len())
        .filter(|&i| {
            let mut without = entries.to_vec();
            without[i] = HashMap::new();
            let mut ctx = Context::default();
            ctx.list_binding("descriptors".to_string(), without);
            // Limitador panics on conditions it cannot evaluate: then i counts as needed.
            let same = catch_unwind(AssertUnwindSafe(|| {
                limit.applies(&ctx)
                    && matches!(Counter::new(limit.clone(), &ctx),
                        Ok(Some(c)) if c.set_variables() == counter.set_variables())
            }));
            !same.unwrap_or(false)
        })
        .collect()
}

fn descriptor_status(counters: &[&Counter], limited: bool, hits: u64) -> DescriptorStatus {
    let remaining = |c: &Counter| c.remaining().unwrap_or(c.max_value());
    // When limited, nothing was counted and `remaining` is what was left before the call:
    // a counter is over if it had less than the call's hits.
    let over = limited && counters.iter().any(|c| remaining(c) < hits);
    let Some(tightest) = counters.iter().min_by_key(|c| remaining(c)) else {
        return DescriptorStatus {
            code: code::OK,
            current_limit: None,
            limit_remaining: 0,
            duration_until_reset: None,
        };
    };
    DescriptorStatus {
        code: if over { code::OVER_LIMIT } else { code::OK },
        current_limit: Some(CurrentLimit {
            name: tightest.limit().name().unwrap_or_default().to_string(),
            requests_per_unit: u32::try_from(tightest.max_value()).unwrap_or(u32::MAX),
            unit: seconds_unit(tightest.window().as_secs()),
        }),
        limit_remaining: u32::try_from(remaining(tightest)).unwrap_or(u32::MAX),
        duration_until_reset: tightest.expires_in().map(|d| Duration {
            seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
            nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
        }),
    }
}

/// Window lengths as envoyproxy/ratelimit counts them.
const UNITS: [(i32, u64); 6] = [
    (unit::SECOND, 1),
    (unit::MINUTE, 60),
    (unit::HOUR, 3_600),
    (unit::DAY, 86_400),
    (unit::MONTH, 30 * 86_400),
    (unit::YEAR, 365 * 86_400),
];

fn unit_seconds(u: i32) -> Option<u64> {
    UNITS.iter().find(|(x, _)| *x == u).map(|(_, s)| *s)
}

/// The unit of a window, or UNKNOWN (0) for a window that is none of them.
fn seconds_unit(seconds: u64) -> i32 {
    UNITS
        .iter()
        .find(|(_, s)| *s == seconds)
        .map_or(0, |(u, _)| *u)
}

/// A CEL string literal.
fn cel_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('\'');
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\'' => out.push_str("\\'"),
            c if c.is_control() => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

/// `GET /counters/<domain>`: what Limitador counts in that namespace, as JSON.
fn counters(state: &State, domain: &str) -> (&'static str, String) {
    let counters = match state.limiter.get_counters(&Namespace::from(domain)) {
        Ok(counters) => counters,
        Err(e) => {
            let error = json_string(&e.to_string());
            return (
                "500 Internal Server Error",
                format!(r#"{{"error": {error}}}"#),
            );
        }
    };
    let items: Vec<String> = counters
        .iter()
        .map(|c| {
            let values: Vec<String> = c.set_variables().values().map(|v| json_string(v)).collect();
            format!(
                r#"{{"values": [{}], "max": {}, "remaining": {}, "expires_in_s": {}}}"#,
                values.join(", "),
                c.max_value(),
                c.remaining().unwrap_or_else(|| c.max_value()),
                c.expires_in().map_or(0, |d| d.as_secs())
            )
        })
        .collect();
    ("200 OK", format!("[{}]", items.join(", ")))
}

/// `text` as a JSON string.
fn json_string(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// FNV-1a, 64 bits: binding names the same in every run (a log line from one run reads
/// like another's), which std's hashers do not promise.
struct Fnv(u64);

impl Fnv {
    fn new() -> Fnv {
        Fnv(0xcbf2_9ce4_8422_2325)
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
}

thread_local! {
    /// Set on the threads that run Limitador's checks: their panics are caught and
    /// reported as one line for the call, not by the panic hook.
    static QUIET_PANICS: Cell<bool> = const { Cell::new(false) };
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(no message)".to_string()
    }
}

// -- gRPC wiring (what tonic-build would generate) -----------------------------------------

/// Prost for the request; the reply is a RateLimitResponse or, in garbage mode, raw bytes.
#[derive(Debug, Clone, Copy, Default)]
struct RlsCodec;

struct RlsEncoder;
struct RlsDecoder;

impl Codec for RlsCodec {
    type Encode = Reply;
    type Decode = RateLimitRequest;
    type Encoder = RlsEncoder;
    type Decoder = RlsDecoder;

    fn encoder(&mut self) -> RlsEncoder {
        RlsEncoder
    }

    fn decoder(&mut self) -> RlsDecoder {
        RlsDecoder
    }
}

impl Encoder for RlsEncoder {
    type Item = Reply;
    type Error = Status;

    fn encode(&mut self, item: Reply, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        match item {
            Reply::Message(message) => message
                .encode(dst)
                .map_err(|e| Status::internal(format!("encoding the answer: {e}"))),
            Reply::Raw(bytes) => {
                dst.put_slice(&bytes);
                Ok(())
            }
        }
    }
}

impl Decoder for RlsDecoder {
    type Item = RateLimitRequest;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<RateLimitRequest>, Status> {
        match RateLimitRequest::decode(src) {
            Ok(request) => Ok(Some(request)),
            Err(e) => {
                eprintln!("rls-server: bad request: not a RateLimitRequest: {e}");
                Err(Status::invalid_argument(format!(
                    "not a RateLimitRequest: {e}"
                )))
            }
        }
    }
}

struct ShouldRateLimit(Arc<State>);

impl UnaryService<RateLimitRequest> for ShouldRateLimit {
    type Response = Reply;
    type Future = BoxFuture<tonic::Response<Reply>, Status>;

    fn call(&mut self, request: tonic::Request<RateLimitRequest>) -> Self::Future {
        let state = Arc::clone(&self.0);
        Box::pin(async move {
            should_rate_limit(state, request.into_inner())
                .await
                .map(tonic::Response::new)
        })
    }
}

#[derive(Clone)]
struct RateLimitService(Arc<State>);

impl NamedService for RateLimitService {
    const NAME: &'static str = apikey_core::quotas::rls_messages::SERVICE;
}

impl<B> Service<http::Request<B>> for RateLimitService
where
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut std::task::Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if request.uri().path() == SHOULD_RATE_LIMIT_PATH {
            let state = Arc::clone(&self.0);
            return Box::pin(async move {
                let mut grpc = Grpc::new(RlsCodec);
                Ok(grpc.unary(ShouldRateLimit(state), request).await)
            });
        }
        eprintln!(
            "rls-server: bad request: no method {}; answered UNIMPLEMENTED",
            request.uri().path()
        );
        Box::pin(async move {
            let mut response = http::Response::new(tonic::body::Body::default());
            let headers = response.headers_mut();
            headers.insert("grpc-status", http::HeaderValue::from_static("12"));
            headers.insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/grpc"),
            );
            Ok(response)
        })
    }
}

// -- admin endpoint ------------------------------------------------------------------------

/// The tests' HTTP/1.1 endpoint, one request per connection:
///   GET  /calls            {"calls": C, "hits": H}: calls answered with a
///                          RateLimitResponse (normal and slow modes) and their hits
///   GET  /counters/<domain> [{"values": [...], "max": M, "remaining": R, "expires_in_s": S}]:
///                          Limitador's counters of that domain, each with the values it
///                          is kept for (a key_id, a window)
///   POST /mode/normal
///   POST /mode/grpc-error  every call fails with gRPC status UNAVAILABLE (14)
///   POST /mode/garbage     grpc-status 0 with a message that is no RateLimitResponse
///   POST /mode/slow/<ms>   every answer waits <ms>, then is a normal one
async fn admin(listener: TcpListener, state: Arc<State>) {
    loop {
        match listener.accept().await {
            Ok((socket, _)) => {
                tokio::spawn(admin_connection(socket, Arc::clone(&state)));
            }
            Err(e) => {
                eprintln!("rls-server: admin accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

async fn admin_connection(mut socket: TcpStream, state: Arc<State>) {
    let read = tokio::time::timeout(std::time::Duration::from_secs(5), read_head(&mut socket));
    let (status, body) = match read.await {
        Ok(Ok(Some(head))) => admin_answer(&head, &state),
        _ => ("400 Bad Request", r#"{"error": "bad request"}"#.to_string()),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    );
    // A client that went away is no concern of the server's.
    let _ = socket.write_all(response.as_bytes()).await;
    let _ = socket.shutdown().await;
}

/// The request line and headers, once read whole (a body is read and dropped).
async fn read_head(socket: &mut TcpStream) -> std::io::Result<Option<String>> {
    const MAX: usize = 16 * 1024;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let end = loop {
        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break at;
        }
        let n = socket.read(&mut chunk).await?;
        if n == 0 || buf.len() + n > MAX {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let length = head
        .lines()
        .filter_map(|line| line.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, value)| value.trim().parse::<usize>().ok())
        .unwrap_or(0);
    let mut left = length.saturating_sub(buf.len() - end - 4);
    if left > MAX {
        return Ok(None);
    }
    while left > 0 {
        let n = socket.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        left = left.saturating_sub(n);
    }
    Ok(Some(head))
}

fn admin_answer(head: &str, state: &State) -> (&'static str, String) {
    let mut words = head.lines().next().unwrap_or_default().split_whitespace();
    let (method, path) = (
        words.next().unwrap_or_default(),
        words.next().unwrap_or_default(),
    );
    let mode = match (method, path) {
        ("GET", "/calls") => {
            let calls = state.calls.load(Ordering::Relaxed);
            let hits = state.hits.load(Ordering::Relaxed);
            return ("200 OK", format!(r#"{{"calls": {calls}, "hits": {hits}}}"#));
        }
        ("GET", p) if p.starts_with("/counters/") => {
            return counters(state, &p["/counters/".len()..]);
        }
        ("POST", "/mode/normal") => Mode::Normal,
        ("POST", "/mode/grpc-error") => Mode::GrpcError,
        ("POST", "/mode/garbage") => Mode::Garbage,
        ("POST", p) if p.starts_with("/mode/slow/") => match p["/mode/slow/".len()..].parse() {
            Ok(ms) => Mode::Slow(ms),
            Err(_) => {
                return (
                    "400 Bad Request",
                    r#"{"error": "/mode/slow/<ms>: ms must be a whole number"}"#.to_string(),
                )
            }
        },
        _ => {
            return (
                "404 Not Found",
                r#"{"error": "no such endpoint"}"#.to_string(),
            )
        }
    };
    state.set_mode(mode);
    eprintln!("rls-server: mode {mode:?}");
    (
        "200 OK",
        format!(r#"{{"mode": "{}"}}"#, &path["/mode/".len()..]),
    )
}

// -- main ----------------------------------------------------------------------------------

fn main() -> ExitCode {
    let options = match parse_args(std::env::args().skip(1)) {
        Ok(options) => options,
        Err(message) => {
            if message.is_empty() {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            eprintln!("rls-server: {message}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if !QUIET_PANICS.with(Cell::get) {
            default_hook(info);
        }
    }));
    match run(options) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("rls-server: {message}");
            ExitCode::FAILURE
        }
    }
}

fn run(options: Options) -> Result<(), String> {
    let limiter = RateLimiter::new(MEMORY_CACHE_SIZE);
    if let Some(path) = &options.limits_file {
        let text = std::fs::read_to_string(path).map_err(|e| format!("--limits {path}: {e}"))?;
        let limits: Vec<Limit> =
            serde_yaml::from_str(&text).map_err(|e| format!("--limits {path}: {e}"))?;
        eprintln!("rls-server: {} limit(s) from {path}", limits.len());
        limiter
            .configure_with(limits)
            .map_err(|e| format!("--limits {path}: {e}"))?;
    }
    let state = Arc::new(State {
        limiter,
        limits_file: options.limits_file.is_some(),
        statuses: options.statuses,
        overrides: RwLock::new(HashMap::new()),
        serial: Mutex::new(()),
        mode: Mutex::new(Mode::Normal),
        calls: AtomicU64::new(0),
        hits: AtomicU64::new(0),
    });

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("tokio runtime: {e}"))?;
    runtime.block_on(async move {
        let grpc = TcpListener::bind(options.grpc)
            .await
            .map_err(|e| format!("--grpc {}: {e}", options.grpc))?;
        let grpc_addr = grpc.local_addr().map_err(|e| e.to_string())?;
        let mut stdout = std::io::stdout();
        if let Some(addr) = options.admin {
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|e| format!("--admin {addr}: {e}"))?;
            let admin_addr = listener.local_addr().map_err(|e| e.to_string())?;
            tokio::spawn(admin(listener, Arc::clone(&state)));
            let _ = writeln!(stdout, "rls-server admin on {admin_addr}");
        }
        let _ = writeln!(stdout, "rls-server listening on {grpc_addr}");
        let _ = stdout.flush();
        tonic::transport::Server::builder()
            .add_service(RateLimitService(state))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(grpc))
            .await
            .map_err(|e| format!("gRPC server: {e}"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cel_strings_are_quoted() {
        assert_eq!(cel_string("key_id"), "'key_id'");
        assert_eq!(cel_string("a'b\\c\n"), "'a\\'b\\\\c\\u000a'");
    }

    #[test]
    fn json_strings_are_escaped() {
        assert_eq!(json_string("k_1"), r#""k_1""#);
        assert_eq!(json_string("a\"b\\c\n"), r#""a\"b\\c\u000a""#);
    }

    #[test]
    fn units_and_windows() {
        assert_eq!(unit_seconds(unit::MONTH), Some(2_592_000));
        assert_eq!(seconds_unit(31_536_000), unit::YEAR);
        assert_eq!(seconds_unit(7), 0);
        assert_eq!(unit_seconds(0), None);
    }
}
