//! A request's way through the checks, in the contract's order, once its key is read: the
//! brute-force budget, the key's verdict, revoked / expired / address / referrer / scopes,
//! the bucket, and the identity headers. Each step acts on the request through `RequestIo` and counts through
//! `Stats`, so that every row of the status table is tested natively.
use super::ports::{Clock, RequestIo, SharedStore, Stats};
use super::stats::Counter;
use super::warnings::Warnings;
use crate::config::{Config, FailureMode};
use crate::keys::known_key::KnownKey;
use crate::limits::bucket::Take;
use crate::limits::buckets::{self, Unavailable};
use crate::request::authorize::{authorize, Origin};
use crate::request::client_address::{budget_network, without_port};
use crate::request::denial::Denial;
use crate::request::header_map::{self, Header};
use crate::request::rules::required_scopes;
use crate::storage::slots::Table;
use crate::vocabulary::bucket_spec::BucketSpec;
use crate::vocabulary::key_hash::{fingerprint, KeyHash};
use std::net::IpAddr;
use std::rc::Rc;

/// A request whose key has been read: all a verdict needs.
pub struct Request {
    pub config: Rc<Config>,
    /// Set when `brute_force` is on: whose failures this request's would count against.
    pub client: Option<String>,
    /// With `brute_force` on, the budget its failures are charged to.
    pub budget: Option<ClientBudget>,
    /// Its lookup was charged to the client's `brute_force` budget when it started: a
    /// failure is not charged again, and a found key gives the charge back.
    pub charged: bool,
    pub key_hash: KeyHash,
    /// Index of the scope rule that applies.
    pub rule: Option<usize>,
    /// `Referer`, else `Origin`, for keys bound to referrers: kept when the request is
    /// parked (its headers are then gone); read in place otherwise.
    pub referrer: Option<Vec<u8>>,
    /// When the verdict is made: one reading of the clock serves the whole request.
    pub now_ms: u64,
}

/// What is known about a request's key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome<'a> {
    Known(&'a KnownKey),
    Deny(Denial),
    /// The key service failed and `failure_mode` is open.
    ForwardAnonymous,
}

/// What became of a request once its key is known.
#[derive(Debug, PartialEq, Eq)]
pub enum Handled {
    /// It goes on upstream; its response gets these RateLimit fields if it took a token.
    Forward(Option<RateHeaders>),
    /// It has been answered here.
    Answered,
    /// Its key passed every check and took its token (these fields); it must now be
    /// counted against its quotas (`pipeline::quotas`).
    CountQuotas(Option<RateHeaders>),
}

/// The RateLimit fields of a response to a request that took a token or was counted
/// against quotas.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateHeaders {
    pub(super) policy: Rc<str>,
    pub(super) state: String,
}

impl RateHeaders {
    pub fn fields(&self) -> [(&'static str, &str); 2] {
        [
            ("ratelimit-policy", &self.policy),
            ("ratelimit", &self.state),
        ]
    }
}

/// What a request gets when the key service failed for it: a stale record if there is
/// one, else what `failure_mode` says. A lookup not sent for load (`overloaded`) is
/// refused whatever `failure_mode` says: anyone can cause it with made-up keys.
pub fn on_key_service_failure<'a>(
    stats: &impl Stats,
    config: &Config,
    stale: Option<&'a KnownKey>,
    overloaded: bool,
) -> Outcome<'a> {
    if let Some(known) = stale {
        stats.count(Counter::CacheStale);
        return Outcome::Known(known);
    }
    match config.failure_mode {
        FailureMode::Open if !overloaded => Outcome::ForwardAnonymous,
        _ => Outcome::Deny(Denial::KeyServiceUnavailable),
    }
}

/// The referrer a request carries: `Referer`, else `Origin`.
pub fn referrer<'h>(headers: &[Header<'h>]) -> Option<&'h [u8]> {
    header_map::first(headers, "referer").or_else(|| header_map::first(headers, "origin"))
}

/// Applies what is known about the key to the request; `headers`: its headers when they
/// are at hand (not for a request that was parked).
pub fn finish<H: Clock + SharedStore + Stats>(
    host: &H,
    warnings: &mut Warnings,
    io: &mut impl RequestIo,
    request: &Request,
    headers: &[Header],
    outcome: Outcome,
) -> Handled {
    let config = &request.config;
    let known = match outcome {
        Outcome::Known(known) => {
            if let Some(budget) = request.budget.filter(|_| request.charged) {
                budget.give_back(host, config);
            }
            known
        }
        Outcome::Deny(denial) => {
            log_key(io, request);
            let uncharged = request.budget.filter(|_| !request.charged);
            deny(host, io, config, uncharged, denial);
            return Handled::Answered;
        }
        Outcome::ForwardAnonymous => {
            log_key(io, request);
            log::debug!(
                "key {}: key service failing, forwarded without identity (failure_mode open)",
                fingerprint(&request.key_hash)
            );
            host.count(Counter::FailureOpen);
            host.count(Counter::Allowed);
            return Handled::Forward(None);
        }
    };
    let record = &known.record;
    // Set before any check: a request refused here is not forwarded, and its access log
    // line names the key as an accepted one's does.
    let names = &config.identity_headers;
    set_identity(io, &names.key_id, &record.key_id);
    set_identity(io, &names.owner, &record.owner);
    let scopes = required_scopes(&config.rules, request.rule);
    let mut origin = RequestOrigin {
        io,
        request,
        headers,
    };
    if let Err(denial) = authorize(record, (request.now_ms / 1000) as i64, scopes, &mut origin) {
        log_key(io, request);
        deny(host, io, config, request.budget, denial);
        return Handled::Answered;
    }
    let rate_headers = match &known.limit {
        None => None,
        Some(limit) => {
            let table = Table::keys(config.cache.max_entries);
            let take = buckets::take_token(host, table, limit.owner, limit.spec, request.now_ms)
                .unwrap_or_else(|why| unavailable(host, warnings, request, why));
            let headers = RateHeaders {
                policy: limit.policy_header.clone(),
                state: take.ratelimit(),
            };
            if !take.allowed {
                let retry_after = take.retry_after_s.to_string();
                let [policy, state] = headers.fields();
                let extra = [("retry-after", retry_after.as_str()), policy, state];
                log_key(io, request);
                refuse(host, io, config, Denial::RateLimited, &extra);
                return Handled::Answered;
            }
            Some(headers)
        }
    };
    if known.quotas.is_some() && config.rate_limit_service.is_some() {
        return Handled::CountQuotas(rate_headers);
    }
    admit(host, io, request, known);
    Handled::Forward(rate_headers)
}

/// Completes the identity headers of a request whose key passed every check (`finish`
/// set the others), and counts it.
pub fn admit(host: &impl Stats, io: &mut impl RequestIo, request: &Request, known: &KnownKey) {
    log::debug!(
        "key {} ({}): allowed",
        fingerprint(&request.key_hash),
        known.record.key_id
    );
    let names = &request.config.identity_headers;
    set_identity(io, &names.scopes, &known.scopes_header);
    host.count(Counter::Allowed);
}

/// An identity header; one whose value would be empty is left out.
fn set_identity(io: &mut impl RequestIo, name: &str, value: &str) {
    if !value.is_empty() {
        io.set_header(name, value.as_bytes());
    }
}

/// Names the request's key for the access log, by its fingerprint: for a request not
/// accepted (an accepted one is named by its identity headers).
pub fn log_key(io: &mut impl RequestIo, request: &Request) {
    io.log_fingerprint(fingerprint(&request.key_hash).as_str());
}

/// Where a request comes from, as `authorize` asks for it.
struct RequestOrigin<'a, 'h, R> {
    io: &'a mut R,
    request: &'a Request,
    headers: &'a [Header<'h>],
}

impl<R: RequestIo> Origin for RequestOrigin<'_, '_, R> {
    fn client(&mut self) -> Option<IpAddr> {
        match &self.request.client {
            Some(client) => client.parse().ok(),
            None => without_port(&self.io.client_address()?)?.parse().ok(),
        }
    }

    fn referrer(&self) -> Option<&[u8]> {
        self.request
            .referrer
            .as_deref()
            .or_else(|| referrer(self.headers))
    }
}

/// The bucket could not be read or written: fail closed, since the limit is a promise
/// to the upstream, never to be exceeded.
fn unavailable(
    host: &(impl Clock + Stats),
    warnings: &mut Warnings,
    request: &Request,
    why: Unavailable,
) -> Take {
    host.count(Counter::RateLimitUnavailable);
    warnings.warn(host.now_ms(), || {
        format!(
            "rate limit for key {} unavailable ({})",
            fingerprint(&request.key_hash),
            match why {
                Unavailable::Contention => "contention",
                Unavailable::StoreFailed => "shared data refused the write",
            }
        )
    });
    Take {
        allowed: false,
        remaining: 0,
        retry_after_s: 1,
        full_in_s: 1,
    }
}

/// Answers the request with `denial`, charging a failed attempt to the client's
/// `brute_force` budget when it is one.
pub fn deny<H: Clock + SharedStore + Stats>(
    host: &H,
    io: &mut impl RequestIo,
    config: &Config,
    budget: Option<ClientBudget>,
    denial: Denial,
) {
    if let (Some(budget), true) = (budget, denial.is_failed_attempt()) {
        let _ = budget.take(host, config);
    }
    refuse(host, io, config, denial, &[]);
}

/// With `brute_force` on, charges a lookup to the client's budget as it starts, so that
/// lookups of unknown keys in flight or failing (and, with `failure_mode` open, forwarded
/// unverified) spend it too. False: the budget is spent, and the request has been
/// answered with a 429.
pub fn charge_lookup<H: Clock + SharedStore + Stats>(
    host: &H,
    io: &mut impl RequestIo,
    config: &Config,
    budget: Option<ClientBudget>,
) -> bool {
    let Some(budget) = budget else {
        return true;
    };
    match budget.take(host, config) {
        Ok(take) if take.allowed => true,
        Ok(take) => {
            refuse_for_budget(host, io, config, take.retry_after_s);
            false
        }
        // The store failed: the lookup goes on, as a refused write charges nothing.
        Err(_) => true,
    }
}

/// Whether the client has spent its `brute_force` budget; if so, the request has been
/// answered with a 429.
pub fn refuse_if_budget_spent<H: Clock + SharedStore + Stats>(
    host: &H,
    io: &mut impl RequestIo,
    config: &Config,
    budget: Option<ClientBudget>,
) -> bool {
    let Some(budget) = budget else {
        return false;
    };
    let Some(left) = budget.left(host, config).filter(|left| !left.allowed) else {
        return false;
    };
    refuse_for_budget(host, io, config, left.retry_after_s);
    true
}

fn refuse_for_budget(
    stats: &impl Stats,
    io: &mut impl RequestIo,
    config: &Config,
    retry_after_s: u64,
) {
    let retry_after = retry_after_s.to_string();
    let extra = [("retry-after", retry_after.as_str())];
    refuse(stats, io, config, Denial::TooManyFailedAttempts, &extra);
}

/// Sends the contract's JSON error, and counts it.
pub fn refuse(
    stats: &impl Stats,
    io: &mut impl RequestIo,
    config: &Config,
    denial: Denial,
    extra: &[(&str, &str)],
) {
    log::debug!("request denied: {}", denial.code());
    stats.count(Counter::Denied(denial));
    reply(io, &config.www_authenticate, denial, extra);
}

/// The contract's JSON error as a local reply, with `WWW-Authenticate` on every 401.
pub fn reply(
    io: &mut impl RequestIo,
    www_authenticate: &str,
    denial: Denial,
    extra: &[(&str, &str)],
) {
    let mut headers = Vec::with_capacity(2 + extra.len());
    headers.push(("content-type", "application/json"));
    if denial.status() == 401 {
        headers.push(("www-authenticate", www_authenticate));
    }
    headers.extend_from_slice(extra);
    io.reply(denial.status(), &denial.body(), &headers);
}

/// Whose `brute_force` budget a request's failures are charged to: its client's network,
/// worked out once per request. Where budgets live and what they hold come from the
/// configuration (`bucket_of`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientBudget(u64);

impl ClientBudget {
    /// `None` when `brute_force` is off or the client address is unknown.
    pub fn of(config: &Config, client: Option<&str>) -> Option<ClientBudget> {
        let limit = config.brute_force?;
        let network = budget_network(client?, limit.ipv4_prefix, limit.ipv6_prefix);
        Some(ClientBudget(buckets::owner_id(network)))
    }

    fn take(
        &self,
        host: &(impl Clock + SharedStore),
        config: &Config,
    ) -> Result<Take, Unavailable> {
        let (table, spec) = bucket_of(config).ok_or(Unavailable::StoreFailed)?;
        buckets::take_token(host, table, self.0, spec, host.now_ms())
    }

    fn give_back(&self, host: &(impl Clock + SharedStore), config: &Config) {
        if let Some((table, spec)) = bucket_of(config) {
            buckets::give_back(host, table, self.0, spec, host.now_ms());
        }
    }

    /// What is left, taking nothing (`allowed`: a failure may still be charged).
    fn left(&self, host: &(impl Clock + SharedStore), config: &Config) -> Option<Take> {
        let (table, spec) = bucket_of(config)?;
        Some(buckets::peek(host, table, self.0, spec, host.now_ms()))
    }
}

/// With `brute_force` on, where client budgets live and what each holds: `max_failures`
/// per `period_s`, all of them available at once.
fn bucket_of(config: &Config) -> Option<(Table, BucketSpec)> {
    let limit = config.brute_force?;
    let spec = BucketSpec {
        requests: limit.max_failures,
        period_s: limit.period_s,
        burst: limit.max_failures,
    };
    Some((Table::client_addresses(config.cache.max_entries), spec))
}
