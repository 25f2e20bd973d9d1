//! State one VM (one Envoy worker thread) shares between its root context and its
//! requests: the configuration, the stats, and the requests waiting on the key service.
//!
//! Callouts are made by the root context, never by a request: Envoy cancels a callout
//! when the request that made it ends, and the SDK routes the answer to the context
//! that made it. Owned by the root, one callout serves every request waiting on a key
//! even after the client that caused it has gone.
use super::host::{self, HostStore};
use super::metrics::Metrics;
use crate::authorize::authorize;
use crate::bucket::Take;
use crate::cache_entry::Lookup;
use crate::cache_entry::{self, CacheEntry, Verdict};
use crate::callout::{Answer, Failure};
use crate::config::{BucketSpec, Config, FailureMode};
use crate::denial::Denial;
use crate::header_map;
use crate::key_hash::{fingerprint, hash_hex, hash_key, KeyHash};
use crate::local_cache::{KnownKey, LocalCache};
use crate::lookup_lock::{self, Acquired, Ended, Message};
use crate::rate_limit;
use crate::record::KeyRecord;
use crate::rules::required_scopes;
use crate::slots::Table;
use proxy_wasm::hostcalls;
use proxy_wasm::types::MapType;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::time::Duration;

/// A request whose key has been read: all a verdict needs.
pub struct Request {
    pub config: Rc<Config>,
    /// Set when `brute_force` is on: whose failures this request's would count against.
    pub client: Option<String>,
    pub key_hash: KeyHash,
    /// Index of the scope rule that applies.
    pub rule: Option<usize>,
    /// When the verdict is made: one reading of the host clock serves the whole request.
    pub now_ms: u64,
}

/// What is known about a request's key.
pub enum Outcome<'a> {
    Known(&'a KnownKey),
    Deny(Denial),
    /// The key service failed and `failure_mode` is open.
    ForwardAnonymous,
}

/// What became of a request once its key is known.
pub enum Handled {
    /// It goes on upstream; its response gets these RateLimit fields if it took a token.
    Forward(Option<RateHeaders>),
    /// It has been answered here.
    Answered,
}

/// The RateLimit fields of a response to a request that took a token.
pub struct RateHeaders {
    policy: Rc<str>,
    state: String,
}

impl RateHeaders {
    pub fn fields(&self) -> [(&'static str, &str); 2] {
        [
            ("ratelimit-policy", &self.policy),
            ("ratelimit", &self.state),
        ]
    }
}

/// What the cache says about a key.
pub enum Cached {
    Hit(Rc<KnownKey>),
    NegativeHit,
    /// Ask the key service. `stale` is a found record still usable if it fails.
    Miss {
        stale: Option<KeyRecord>,
    },
}

/// How a lookup ended, for the requests that waited on it.
enum Resolution {
    Known(Rc<KnownKey>),
    Unknown,
    Failed,
}

/// A key being looked up, and who waits for it.
struct PendingLookup {
    waiters: Vec<u32>,
    /// A found key past its TTL, usable if the key service fails.
    stale: Option<Rc<KnownKey>>,
    sent_at_ms: Option<u64>,
    /// Set while another worker asks the key service: when to stop waiting for it.
    peer_deadline_ms: Option<u64>,
    /// This worker holds the key's lookup lock and must release it.
    holds_lock: bool,
}

pub struct Worker {
    root_id: u32,
    config: RefCell<Option<Rc<Config>>>,
    /// This worker's copies of found keys (see `local_cache`).
    known_keys: RefCell<LocalCache>,
    pub metrics: Metrics,
    /// Wakes the root context to send callouts: see `ask_key_service`.
    queue: Cell<Option<u32>>,
    lookups: RefCell<HashMap<KeyHash, PendingLookup>>,
    callouts: RefCell<HashMap<u32, KeyHash>>,
    waiting: RefCell<HashMap<u32, Request>>,
    /// RateLimit fields for the responses of requests that took a token after waiting
    /// on the key service (the others keep theirs: see `Handled`).
    rate_headers: RefCell<HashMap<u32, RateHeaders>>,
    /// When the last key service warning was logged, and how many were held back since.
    last_warning: Cell<(u64, u32)>,
}

const WARN_INTERVAL_MS: u64 = 10_000;
/// A lookup lock outlives its callout's timeout by this much before others take over.
const LOCK_MARGIN_MS: u64 = 1_000;
/// How often a worker waiting on another's lookup checks that the owner is still there.
const TAKEOVER_CHECK_MS: u64 = 250;
/// Larger answers are not records; they are refused rather than copied in.
const MAX_ANSWER_BYTES: usize = 64 * 1024;

impl Worker {
    pub fn new(root_id: u32) -> Worker {
        Worker {
            root_id,
            config: RefCell::new(None),
            known_keys: RefCell::new(LocalCache::new(0)),
            metrics: Metrics::define(),
            queue: Cell::new(None),
            lookups: RefCell::default(),
            callouts: RefCell::default(),
            waiting: RefCell::default(),
            rate_headers: RefCell::default(),
            last_warning: Cell::new((0, 0)),
        }
    }

    pub fn config(&self) -> Option<Rc<Config>> {
        self.config.borrow().clone()
    }

    pub fn set_config(&self, config: Config) {
        // Copies carry what the old configuration made of them (its default rate limit).
        *self.known_keys.borrow_mut() = LocalCache::new(config.cache.max_entries);
        *self.config.borrow_mut() = Some(Rc::new(config));
    }

    pub fn set_queue(&self, queue_id: u32) {
        self.queue.set(Some(queue_id));
    }

    pub fn has_queue(&self) -> bool {
        self.queue.get().is_some()
    }

    pub fn is_own_queue(&self, queue_id: u32) -> bool {
        self.queue.get() == Some(queue_id)
    }

    /// What the cache says about `raw_key`, and its hash: this worker's copy if it has
    /// one, else the node-wide entry (which then leaves a copy here).
    pub fn cache_lookup(&self, raw_key: &[u8], now_ms: u64, config: &Config) -> (KeyHash, Cached) {
        let copies = self.known_keys.borrow();
        let id = copies.id_of(raw_key);
        if let Some((key_hash, known)) = copies.get(id, now_ms, config.cache.ttl_s) {
            return (key_hash, Cached::Hit(known));
        }
        drop(copies);
        let key_hash = hash_key(raw_key);
        let cached = match self.node_wide_lookup(&key_hash, now_ms, config) {
            Lookup::Hit {
                record,
                stored_at_ms,
            } => {
                let known = known_key(record, config);
                self.known_keys
                    .borrow_mut()
                    .put(id, key_hash, stored_at_ms, known.clone());
                Cached::Hit(known)
            }
            Lookup::NegativeHit => Cached::NegativeHit,
            Lookup::Miss { stale } => Cached::Miss { stale },
        };
        (key_hash, cached)
    }

    fn node_wide_lookup(&self, key_hash: &KeyHash, now_ms: u64, config: &Config) -> Lookup {
        let table = Table::cache(config.cache.max_entries);
        let entry = cache_entry::find(key_hash, table.slots, |slot| {
            host::shared_get(&table.slot_key(slot))
        });
        cache_entry::lookup(entry, now_ms, &config.cache)
    }

    /// Applies what is known about the key to the current request.
    pub fn finish(&self, request: &Request, outcome: Outcome) -> Handled {
        let config = &request.config;
        let known = match outcome {
            Outcome::Known(known) => known,
            Outcome::Deny(denial) => {
                self.deny(config, request.client.as_deref(), denial);
                return Handled::Answered;
            }
            Outcome::ForwardAnonymous => {
                log::debug!(
                    "key {}: key service failing, forwarded without identity (failure_mode open)",
                    fingerprint(&request.key_hash)
                );
                self.metrics.count(self.metrics.failure_open);
                self.metrics.allowed();
                return Handled::Forward(None);
            }
        };
        let record = &known.record;
        host::set_log_identity(&record.key_id, &record.owner);
        let scopes = required_scopes(&config.rules, request.rule);
        if let Err(denial) = authorize(record, (request.now_ms / 1000) as i64, scopes) {
            self.deny(config, request.client.as_deref(), denial);
            return Handled::Answered;
        }
        let Ok(rate_headers) = self.take_token(request, known) else {
            return Handled::Answered;
        };
        log::debug!(
            "key {} ({}): allowed",
            fingerprint(&request.key_hash),
            record.key_id
        );
        let names = &config.identity_headers;
        for (name, value) in [
            (&names.key_id, record.key_id.as_str()),
            (&names.owner, record.owner.as_str()),
            (&names.scopes, known.scopes_header.as_str()),
        ] {
            if !value.is_empty() {
                host::set_request_header(name, value.as_bytes());
            }
        }
        self.metrics.allowed();
        Handled::Forward(rate_headers)
    }

    /// Answers the current request with `denial`, charging a failed attempt to the
    /// client's `brute_force` budget when it is one.
    pub fn deny(&self, config: &Config, client: Option<&str>, denial: Denial) {
        if let (Some((table, budget)), Some(client), true) =
            (failure_budget(config), client, denial.is_failed_attempt())
        {
            let owner = rate_limit::owner_id(client);
            let _ = rate_limit::take_token(&HostStore, table, owner, budget, host::now_ms());
        }
        log::debug!("request denied: {}", denial.code());
        self.metrics.denied(denial);
        host::send_denial(denial, &config.www_authenticate, &[]);
    }

    /// Whether `client` has spent its `brute_force` budget; if so, the request has been
    /// answered with a 429.
    pub fn refuse_if_budget_spent(&self, config: &Config, client: Option<&str>) -> bool {
        let (Some((table, budget)), Some(client)) = (failure_budget(config), client) else {
            return false;
        };
        let owner = rate_limit::owner_id(client);
        let budget = rate_limit::peek(&HostStore, table, owner, budget, host::now_ms());
        if budget.allowed {
            return false;
        }
        let denial = Denial::TooManyFailedAttempts;
        self.metrics.denied(denial);
        let retry_after = budget.retry_after_s.to_string();
        host::send_denial(
            denial,
            &config.www_authenticate,
            &[("retry-after", &retry_after)],
        );
        true
    }

    /// Takes a token from the key's bucket: the RateLimit fields of the response, none
    /// for an unlimited key, or Err when the request has been answered with a 429.
    fn take_token(&self, request: &Request, known: &KnownKey) -> Result<Option<RateHeaders>, ()> {
        let config = &request.config;
        let Some(limit) = &known.limit else {
            return Ok(None);
        };
        let table = Table::keys(config.cache.max_entries);
        let (owner, spec) = (limit.owner, limit.spec);
        let take = match rate_limit::take_token(&HostStore, table, owner, spec, request.now_ms) {
            Ok(take) => take,
            Err(why) => {
                self.metrics.count(self.metrics.rate_limit_unavailable);
                // Fail closed: the limit is a promise to the upstream, never exceeded.
                log::warn!(
                    "rate limit for key {} unavailable ({})",
                    fingerprint(&request.key_hash),
                    match why {
                        rate_limit::Unavailable::Contention => "contention",
                        rate_limit::Unavailable::StoreFailed => "shared data refused the write",
                    }
                );
                Take {
                    allowed: false,
                    remaining: 0,
                    retry_after_s: 1,
                    full_in_s: 1,
                }
            }
        };
        let headers = RateHeaders {
            policy: limit.policy_header.clone(),
            state: take.ratelimit(),
        };
        if take.allowed {
            return Ok(Some(headers));
        }
        let denial = Denial::RateLimited;
        self.metrics.denied(denial);
        let retry_after = take.retry_after_s.to_string();
        let [policy, state] = headers.fields();
        host::send_denial(
            denial,
            &config.www_authenticate,
            &[("retry-after", &retry_after), policy, state],
        );
        Err(())
    }

    /// Response phase: the RateLimit fields of a request that took a token after waiting.
    pub fn take_rate_headers(&self, context_id: u32) -> Option<RateHeaders> {
        remove_if_any(&self.rate_headers, context_id)
    }

    /// The key service failed for this request: a stale record, else `failure_mode`.
    fn on_key_service_failure<'a>(
        &self,
        request: &Request,
        stale: Option<&'a KnownKey>,
    ) -> Outcome<'a> {
        if let Some(known) = stale {
            self.metrics.count(self.metrics.cache_stale);
            return Outcome::Known(known);
        }
        match request.config.failure_mode {
            FailureMode::Closed => Outcome::Deny(Denial::KeyServiceUnavailable),
            FailureMode::Open => Outcome::ForwardAnonymous,
        }
    }

    /// Parks the request (context `context_id`) until the key service answers for its
    /// key. Requests for a key already being looked up join that lookup.
    pub fn ask_key_service(&self, context_id: u32, request: Request, stale: Option<KeyRecord>) {
        let (key_hash, config) = (request.key_hash, request.config.clone());
        self.waiting.borrow_mut().insert(context_id, request);
        let mut lookups = self.lookups.borrow_mut();
        if let Some(lookup) = lookups.get_mut(&key_hash) {
            lookup.waiters.push(context_id);
            return;
        }
        lookups.insert(
            key_hash,
            PendingLookup {
                waiters: vec![context_id],
                // Worked out once per lookup: joiners' stale records are the same one.
                stale: stale.map(|record| known_key(record, &config)),
                sent_at_ms: None,
                peer_deadline_ms: None,
                holds_lock: false,
            },
        );
        drop(lookups);
        // A request context cannot own the callout (see the module comment), so the
        // root context is woken through this VM's own queue to send it.
        let ask = Message::Ask(key_hash).encode();
        let woken = self
            .queue
            .get()
            .is_some_and(|q| hostcalls::enqueue_shared_queue(q, Some(&ask)).is_ok());
        if !woken {
            log::warn!("cannot reach the root context to ask the key service");
            self.answer_waiters(key_hash, &Resolution::Failed);
        }
    }

    /// A request that ended (its client went away) before its answer.
    pub fn forget(&self, context_id: u32) {
        remove_if_any(&self.waiting, context_id);
        remove_if_any(&self.rate_headers, context_id);
    }

    /// Root context: this worker's queue has messages, from its own requests (ask the
    /// key service) or from other workers (a lookup this one waited for has ended).
    pub fn on_queue(&self, queue_id: u32) {
        while let Ok(Some(bytes)) = hostcalls::dequeue_shared_queue(queue_id) {
            match Message::decode(&bytes) {
                Some(Message::Ask(key_hash)) => {
                    let unsent =
                        self.lookups.borrow().get(&key_hash).is_some_and(|l| {
                            l.sent_at_ms.is_none() && l.peer_deadline_ms.is_none()
                        });
                    if unsent {
                        self.start_lookup(key_hash);
                    }
                }
                Some(Message::Woken(ended, key_hash)) => self.on_peer_lookup_ended(ended, key_hash),
                None => {}
            }
        }
    }

    /// Root context: asks the key service about `key_hash` unless another worker of the
    /// node already is (see `lookup_lock`), or has just put the answer in the cache.
    fn start_lookup(&self, key_hash: KeyHash) {
        let Some(config) = self.config() else {
            return;
        };
        let me = self.queue.get().unwrap_or_default();
        let hold_ms = config.key_service.timeout_ms + LOCK_MARGIN_MS;
        let acquire = |trust_recent_answer| {
            let now_ms = host::now_ms();
            lookup_lock::acquire(
                &HostStore,
                &key_hash,
                me,
                now_ms,
                hold_ms,
                trust_recent_answer,
            )
        };
        let mut acquired = acquire(true);
        if acquired == Acquired::Answered {
            if self.answer_from_cache(&key_hash, &config) {
                return;
            }
            // The verdict is not in the cache after all (a TTL of 0, or evicted already).
            acquired = acquire(false);
        }
        match acquired {
            Acquired::Owner => {
                if let Some(lookup) = self.lookups.borrow_mut().get_mut(&key_hash) {
                    lookup.holds_lock = true;
                    lookup.peer_deadline_ms = None;
                }
                self.send_callout(key_hash);
            }
            Acquired::Bypass | Acquired::Answered => self.send_callout(key_hash),
            Acquired::Waiting { deadline_ms } => {
                if let Some(lookup) = self.lookups.borrow_mut().get_mut(&key_hash) {
                    lookup.peer_deadline_ms = Some(deadline_ms);
                }
                self.metrics.count(self.metrics.key_service_joined);
                // Only a safety net for an owner that vanished: wake-ups come by queue.
                let _ = hostcalls::set_tick_period(Duration::from_millis(TAKEOVER_CHECK_MS));
            }
        }
    }

    /// Answers the key's waiters from the cache if it holds a verdict now.
    fn answer_from_cache(&self, key_hash: &KeyHash, config: &Config) -> bool {
        // No copy is left here: the raw key it would be found by is not at hand. The
        // next request for the key leaves one.
        let resolution = match self.node_wide_lookup(key_hash, host::now_ms(), config) {
            Lookup::Hit { record, .. } => Resolution::Known(known_key(record, config)),
            Lookup::NegativeHit => Resolution::Unknown,
            Lookup::Miss { .. } => return false,
        };
        self.answer_waiters(*key_hash, &resolution);
        true
    }

    fn on_peer_lookup_ended(&self, ended: Ended, key_hash: KeyHash) {
        let Some(config) = self.config() else {
            return;
        };
        let waiting = self
            .lookups
            .borrow()
            .get(&key_hash)
            .is_some_and(|l| l.peer_deadline_ms.is_some());
        if !waiting {
            return;
        }
        match ended {
            Ended::Failed => self.answer_waiters(key_hash, &Resolution::Failed),
            // The verdict may already be gone (a tiny cache, or ttl 0): ask again.
            Ended::Answered if !self.answer_from_cache(&key_hash, &config) => {
                self.start_lookup(key_hash)
            }
            Ended::Answered => {}
        }
    }

    /// Root context: takes over lookups whose owner in another worker went silent.
    pub fn on_tick(&self) {
        let now = host::now_ms();
        let overdue: Vec<KeyHash> = self
            .lookups
            .borrow()
            .iter()
            .filter(|(_, l)| l.peer_deadline_ms.is_some_and(|d| d <= now))
            .map(|(h, _)| *h)
            .collect();
        for key_hash in overdue {
            if let Some(lookup) = self.lookups.borrow_mut().get_mut(&key_hash) {
                lookup.peer_deadline_ms = None;
            }
            self.start_lookup(key_hash);
        }
        let still_waiting = self
            .lookups
            .borrow()
            .values()
            .any(|l| l.peer_deadline_ms.is_some());
        if !still_waiting {
            let _ = hostcalls::set_tick_period(Duration::ZERO);
        }
    }

    fn send_callout(&self, key_hash: KeyHash) {
        let Some(config) = self.config() else {
            return;
        };
        let service = &config.key_service;
        let path = service.path_for(&hash_hex(&key_hash));
        let mut headers: Vec<(&str, &str)> = vec![
            (":method", "GET"),
            (":path", &path),
            (":authority", &service.authority),
        ];
        headers.extend(
            service
                .headers
                .iter()
                .map(|(n, v)| (n.as_str(), v.as_str())),
        );
        match hostcalls::dispatch_http_call(
            &service.cluster,
            headers,
            None,
            vec![],
            Duration::from_millis(service.timeout_ms),
        ) {
            Ok(token) => {
                self.callouts.borrow_mut().insert(token, key_hash);
                if let Some(lookup) = self.lookups.borrow_mut().get_mut(&key_hash) {
                    lookup.sent_at_ms = Some(host::now_ms());
                }
            }
            Err(status) => {
                log::warn!(
                    "key service callout to cluster {} not sent (status {})",
                    service.cluster,
                    status as u32
                );
                self.answer_waiters(key_hash, &Resolution::Failed);
            }
        }
    }

    /// Root context: the key service answered callout `token`.
    pub fn on_callout_answer(&self, token: u32, body_size: usize) {
        let Some(key_hash) = self.callouts.borrow_mut().remove(&token) else {
            return;
        };
        let serialized = host::header_bytes(MapType::HttpCallResponseHeaders);
        let status = header_map::first(&header_map::parse(&serialized), ":status");
        let body = if body_size > MAX_ANSWER_BYTES {
            Vec::new()
        } else {
            hostcalls::get_buffer(
                proxy_wasm::types::BufferType::HttpCallResponseBody,
                0,
                body_size,
            )
            .ok()
            .flatten()
            .unwrap_or_default()
        };
        let answer = crate::callout::classify(status, &body);
        let resolution = match self.config() {
            Some(config) => self.record_answer(&key_hash, answer, &config),
            None => Resolution::Failed,
        };
        self.answer_waiters(key_hash, &resolution);
    }

    /// Releases this worker's lookup lock of the key, and wakes the workers that waited
    /// for the answer.
    fn release_lock(&self, key_hash: &KeyHash, resolution: &Resolution) {
        let Some(me) = self.queue.get() else {
            return;
        };
        let ended = match resolution {
            Resolution::Known(_) | Resolution::Unknown => Ended::Answered,
            Resolution::Failed => Ended::Failed,
        };
        let message = Message::Woken(ended, *key_hash).encode();
        for waiter in lookup_lock::release(&HostStore, key_hash, me, ended, host::now_ms()) {
            let _ = hostcalls::enqueue_shared_queue(waiter, Some(&message));
        }
    }

    /// Counts the key service's answer and puts its verdict in the cache.
    fn record_answer(&self, key_hash: &KeyHash, answer: Answer, config: &Config) -> Resolution {
        let now = host::now_ms();
        if let Some(sent) = self
            .lookups
            .borrow()
            .get(key_hash)
            .and_then(|l| l.sent_at_ms)
        {
            self.metrics.key_service_latency(now.saturating_sub(sent));
        }
        let (verdict, resolution) = match answer {
            Answer::Found(record) => {
                self.metrics.count(self.metrics.key_service_found);
                let known = known_key(record.clone(), config);
                (Verdict::Found(record), Resolution::Known(known))
            }
            Answer::NotFound => {
                self.metrics.count(self.metrics.key_service_not_found);
                (Verdict::NotFound, Resolution::Unknown)
            }
            Answer::Failed(failure) => {
                self.metrics.key_service_failed(&failure);
                self.warn_key_service_failure(key_hash, &failure, now);
                return Resolution::Failed;
            }
        };
        let entry = CacheEntry {
            key_hash: *key_hash,
            stored_at_ms: now,
            verdict,
        };
        let table = Table::cache(config.cache.max_entries);
        let read = |slot| host::shared_get(&table.slot_key(slot));
        // Written without CAS: two workers racing for one slot at worst cost a lookup.
        if let Some(slot) = cache_entry::placement(&entry, table.slots, read, now, &config.cache) {
            host::shared_set(&table.slot_key(slot), &cache_entry::encode(&entry));
        }
        resolution
    }

    /// One warning per `WARN_INTERVAL_MS` at most, so an outage does not flood the log;
    /// the next one says how many were held back. Stats count every failure.
    fn warn_key_service_failure(&self, key_hash: &KeyHash, failure: &Failure, now_ms: u64) {
        let (last, held_back) = self.last_warning.get();
        if last != 0 && now_ms.saturating_sub(last) < WARN_INTERVAL_MS {
            self.last_warning.set((last, held_back + 1));
            return;
        }
        self.last_warning.set((now_ms, 0));
        log::warn!(
            "key service lookup for key {} failed: {} ({} similar warning(s) held back)",
            fingerprint(key_hash),
            failure.describe(),
            held_back
        );
    }

    /// Ends the key's lookup: releases its lock if this worker holds it, then answers
    /// every request waiting for it.
    fn answer_waiters(&self, key_hash: KeyHash, resolution: &Resolution) {
        let Some(lookup) = self.lookups.borrow_mut().remove(&key_hash) else {
            return;
        };
        if lookup.holds_lock {
            self.release_lock(&key_hash, resolution);
        }
        let now_ms = host::now_ms();
        for context_id in lookup.waiters {
            let Some(mut request) = self.waiting.borrow_mut().remove(&context_id) else {
                continue; // its client went away
            };
            request.now_ms = now_ms;
            if hostcalls::set_effective_context(context_id).is_err() {
                continue;
            }
            let outcome = match resolution {
                Resolution::Known(known) => Outcome::Known(known),
                Resolution::Unknown => Outcome::Deny(Denial::Invalid),
                Resolution::Failed => {
                    self.on_key_service_failure(&request, lookup.stale.as_deref())
                }
            };
            if let Handled::Forward(rate_headers) = self.finish(&request, outcome) {
                if let Some(rate_headers) = rate_headers {
                    self.rate_headers
                        .borrow_mut()
                        .insert(context_id, rate_headers);
                }
                let _ = hostcalls::resume_http_request();
            }
        }
        let _ = hostcalls::set_effective_context(self.root_id);
    }
}

/// Every request ends with these lookups, often in empty maps (they hold only requests
/// waiting on the key service, or between their token and their response): skip the hashing.
fn remove_if_any<T>(map: &RefCell<HashMap<u32, T>>, context_id: u32) -> Option<T> {
    let mut map = map.borrow_mut();
    if map.is_empty() {
        return None;
    }
    map.remove(&context_id)
}

fn known_key(record: KeyRecord, config: &Config) -> Rc<KnownKey> {
    Rc::new(KnownKey::new(record, config.rate_limit))
}

/// With `brute_force` on, where client budgets live and what each holds: `max_failures`
/// per `period_s`, all of them available at once.
fn failure_budget(config: &Config) -> Option<(Table, BucketSpec)> {
    let limit = config.brute_force?;
    let budget = BucketSpec {
        requests: limit.max_failures,
        period_s: limit.period_s,
        burst: limit.max_failures,
    };
    Some((Table::client_addresses(config.cache.max_entries), budget))
}
