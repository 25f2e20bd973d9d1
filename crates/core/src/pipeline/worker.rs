//! What one worker (one Envoy worker thread: one wasm VM) keeps between its callbacks:
//! the configuration, the key cache, the requests parked on the key service and the
//! flights they wait for. The host layer calls in on each event; everything the worker
//! does goes out through the host ports.
//!
//! Callouts are made by the worker's own context (the root context in proxy-wasm), never
//! by a request: Envoy cancels a callout when the request that made it ends, and routes
//! the answer to the context that made it. Owned by the worker, one callout serves every
//! request waiting on a key even after the client that caused it has gone.
use super::per_key::PerKeyStats;
use super::ports::{Callout, Host, NotSent, RequestIo};
use super::quotas::{Lent, QuotaCall, Unreported};
use super::request::{
    charge_lookup, deny, finish, on_key_service_failure, referrer, refuse_if_budget_spent, reply,
    ClientBudget, Handled, Outcome, RateHeaders, Request,
};
use super::stats::{Counter, Histogram};
use super::warnings::Warnings;
use crate::config::Config;
use crate::flights::coordinator::{FlightKey, Flights, Message, Start};
use crate::flights::lease::FlightEnd;
use crate::flights::pending;
use crate::flights::scheduler::Scheduler;
use crate::keys::answer::{self, classify, LookupAnswer, LookupFailure};
use crate::keys::cache::{BeforeLookup, Cached, KeyCache, Looked};
use crate::keys::copies::CopyId;
use crate::keys::entry::Verdict;
use crate::keys::feed;
use crate::keys::known_key::KnownKey;
use crate::keys::record::KeyRecord;
use crate::request::client_address::without_port;
use crate::request::denial::Denial;
use crate::request::extract::{extract, KeyOutcome};
use crate::request::header_map::{self, Header};
use crate::request::key_format::conforms;
use crate::request::rules::matching_rule;
use crate::storage::slots::{create_slots, Table};
use crate::vocabulary::key_hash::{fingerprint, hash_hex, hash_key, KeyHash};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;

/// A lease outlives its callout's timeout by this much before others take over.
pub(super) const LEASE_MARGIN_MS: u64 = 1_000;
/// Where the digest of the configuration last announced in the log is kept.
const ANNOUNCED_KEY: &str = "apikey_filter/v1/announced-config";

/// What the request headers phase decided.
#[derive(Debug, PartialEq, Eq)]
pub enum Flow {
    /// The request goes on upstream now; its response gets these RateLimit fields.
    Forward(Option<RateHeaders>),
    /// It was answered here, or waits for the key service.
    Pause,
}

/// What a worker holds for one request between its callbacks.
pub(super) enum RequestState {
    /// Parked until the key service answers for its key.
    Parked(Request),
    /// Waiting for its own call to the rate limit service (`quota_calls`, by token).
    AskingQuotas { token: u32 },
    /// Forwarded after waiting: its response gets these RateLimit fields (a request
    /// forwarded at once keeps its own: see `Flow`).
    Forwarded(RateHeaders),
}

/// How a key lookup ended, for the requests parked on it.
pub(super) enum Resolution {
    /// Found, as stored in the node's cache at `.1` (what a refreshed copy is trusted as).
    Known(Rc<KnownKey>, u64),
    Unknown,
    Failed,
    /// Not sent for load: refused whatever `failure_mode` says.
    Overloaded,
    /// The change feed forgot the key while the lookup flew: its answer may predate the
    /// change, so the parked requests wait for a new lookup, asked for changes since `.0`.
    Superseded(u64),
}

/// What a flight keeps while it flies.
pub(super) enum Payload {
    Lookup {
        /// A found key past its TTL, usable if the key service fails (worked out once
        /// per lookup, not per parked request).
        stale: Option<Rc<KnownKey>>,
        /// Set for a refresh: the copy of the request that started it, to replace.
        refresh: Option<CopyId>,
        /// What the node knew when it was asked for: a tombstone written since, or a
        /// new feed epoch, supersedes its answer.
        asked: Asked,
        /// It counts against `key_service.max_pending` until it ends.
        counted: bool,
    },
    /// A feed poll, and the cursor it sent.
    Poll { after: Option<String> },
}

/// When a lookup was asked for, as the change feed saw it then.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Asked {
    pub since_ms: u64,
    /// The node's feed epoch (None: no change feed).
    pub epoch: Option<u32>,
}

pub struct Worker<H: Host> {
    pub(super) host: H,
    pub(super) config: RefCell<Option<Rc<Config>>>,
    pub(super) cache: RefCell<Option<KeyCache>>,
    /// This worker's queue: how it is woken, and its name in leases.
    pub(super) queue: Cell<Option<u32>>,
    pub(super) flights: RefCell<Flights<Payload>>,
    /// What it holds for each request between callbacks, by context id: forgetting a
    /// request is one removal.
    pub(super) requests: RefCell<HashMap<u32, RequestState>>,
    pub(super) warnings: Warnings,
    scheduler: RefCell<Scheduler>,
    /// The change feed as this worker last saw it (see `pipeline::feed`).
    pub(super) feed: RefCell<super::feed::FeedView>,
    per_key: RefCell<Option<PerKeyStats>>,
    /// Calls to the rate limit service in flight, by token.
    pub(super) quota_calls: RefCell<HashMap<u32, QuotaCall>>,
    /// Keys with quotas this worker admitted requests of unasked, by quota id: its tick
    /// reports them.
    pub(super) unreported: RefCell<HashMap<u64, Unreported>>,
    /// When the tick next reports (None: nothing to report).
    pub(super) report_due_ms: Cell<Option<u64>>,
    /// Shares of nodes' allowances this worker admits from on its own, by quota id.
    pub(super) lent: RefCell<HashMap<u64, Lent>>,
    /// The worker that keeps the node's duties (polls the change feed, reports what the
    /// node admitted unasked), when not this one.
    pub(super) on_duty: Cell<Option<u32>>,
}

impl<H: Host> Worker<H> {
    pub fn new(host: H) -> Worker<H> {
        Worker {
            host,
            config: RefCell::new(None),
            cache: RefCell::new(None),
            queue: Cell::new(None),
            flights: RefCell::default(),
            requests: RefCell::default(),
            warnings: Warnings::default(),
            scheduler: RefCell::default(),
            feed: RefCell::default(),
            per_key: RefCell::default(),
            quota_calls: RefCell::default(),
            unreported: RefCell::default(),
            report_due_ms: Cell::default(),
            on_duty: Cell::new(None),
            lent: RefCell::default(),
        }
    }

    pub fn host(&self) -> &H {
        &self.host
    }

    pub fn queue(&self) -> Option<u32> {
        self.queue.get()
    }

    /// Leaves the node's duties (feed polls, reports) to the worker of queue `on_duty`
    /// (None: this one keeps them). A host whose workers do not all run when idle leaves
    /// them to one that does.
    pub fn set_on_duty(&self, on_duty: Option<u32>) {
        self.on_duty.set(on_duty);
    }

    pub fn on_duty(&self) -> Option<u32> {
        self.on_duty.get()
    }

    pub fn set_queue(&self, queue: u32) {
        self.queue.set(Some(queue));
    }

    pub(super) fn config(&self) -> Option<Rc<Config>> {
        self.config.borrow().clone()
    }

    /// Takes a configuration (every VM runs this, on every push). False: refused, with
    /// one log line naming the field and the reason.
    pub fn configure(&self, raw: &[u8]) -> bool {
        let config = match Config::parse(raw) {
            Ok(config) => config,
            Err(e) => {
                log::error!("apikey-filter configuration refused: {e}");
                return false;
            }
        };
        // Creating slots keeps those that exist: running buckets and leases survive.
        create_slots(&self.host, Table::keys(config.cache.max_entries));
        create_slots(&self.host, Table::leases());
        pending::create(&self.host);
        if config.brute_force.is_some() {
            create_slots(
                &self.host,
                Table::client_addresses(config.cache.max_entries),
            );
        }
        let per_key = config.per_key_stats.map(PerKeyStats::new);
        if let Some(per_key) = &per_key {
            create_slots(&self.host, per_key.table());
        }
        if config.rate_limit_service.is_some() {
            create_slots(&self.host, Table::quotas(config.cache.max_entries));
        }
        *self.per_key.borrow_mut() = per_key;
        self.announce(raw, &config);
        // Copies carry what the old configuration made of them (its default rate limit).
        *self.cache.borrow_mut() = Some(KeyCache::new(&config));
        let feed_on = config.key_service.changes.is_some();
        *self.config.borrow_mut() = Some(Rc::new(config));
        *self.feed.borrow_mut() = Default::default();
        if feed_on {
            self.start_following_feed();
        }
        self.reschedule(self.host.now_ms());
        true
    }

    /// Logs the effective configuration at info level once per node and configuration
    /// (every VM runs `configure`; one line is enough), at debug level in the others.
    fn announce(&self, raw: &[u8], config: &Config) {
        let digest = hash_key(raw);
        let line = format!(
            "apikey-filter {} configured: {}",
            env!("CARGO_PKG_VERSION"),
            config.summary()
        );
        if self
            .host
            .get(ANNOUNCED_KEY)
            .is_some_and(|(value, _)| value == digest)
        {
            log::debug!("{line}");
        } else {
            let _ = self.host.set(ANNOUNCED_KEY, &digest, None);
            log::info!("{line}");
        }
    }

    /// The request headers phase of request `context_id`, whose header map is `headers`.
    pub fn on_request(&self, context_id: u32, io: &mut impl RequestIo, headers: &[Header]) -> Flow {
        let Some(config) = self.config() else {
            // No configuration, no way to check a key: refused like any failure to.
            let denial = Denial::KeyServiceUnavailable;
            self.host.count(Counter::Denied(denial));
            reply(io, "", denial, &[]);
            return Flow::Pause;
        };
        let pseudo = |name| header_map::first(headers, name).unwrap_or_default();
        let (method, path) = (pseudo(":method"), pseudo(":path"));

        // Strip first, decide after: a denied request's key reaches no access log either.
        let extraction = extract(&config.key_sources, headers, path);
        for name in &extraction.remove_headers {
            io.remove_header(name);
        }
        let names = &config.identity_headers;
        for name in [&names.key_id, &names.owner, &names.scopes] {
            if header_map::first(headers, name).is_some() {
                io.remove_header(name);
            }
        }
        if let Some(rewritten) = &extraction.rewritten_path {
            io.set_header(":path", rewritten);
        }

        let client = config
            .brute_force
            .and_then(|_| io.client_address())
            .and_then(|address| without_port(&address));
        let client = client.as_deref();
        let budget = ClientBudget::of(&config, client);
        if refuse_if_budget_spent(&self.host, io, &config, budget) {
            return Flow::Pause;
        }
        let key = match extraction.outcome {
            KeyOutcome::Key(key)
                if config
                    .key_format
                    .as_ref()
                    .is_some_and(|format| !conforms(&key, format)) =>
            {
                return self.deny(io, &config, budget, Denial::Malformed)
            }
            KeyOutcome::Key(key) => key,
            KeyOutcome::Missing => return self.deny(io, &config, budget, Denial::Missing),
            KeyOutcome::Duplicate => return self.deny(io, &config, budget, Denial::Duplicate),
            KeyOutcome::Malformed => return self.deny(io, &config, budget, Denial::Malformed),
        };
        let now_ms = self.host.now_ms();
        let Some(Looked {
            key_hash,
            copy,
            cached,
        }) = self
            .cache
            .borrow_mut()
            .as_mut()
            .map(|cache| cache.lookup(&self.host, &key, now_ms))
        else {
            return self.deny(io, &config, budget, Denial::KeyServiceUnavailable);
        };
        let mut request = Request {
            client: client.map(str::to_string),
            budget,
            charged: false,
            key_hash,
            rule: matching_rule(&config.rules, method, path),
            referrer: None,
            config,
            now_ms,
        };
        let handled = match cached {
            Cached::Hit {
                known, refresh_due, ..
            } => {
                self.host.count(Counter::CacheHit);
                if refresh_due {
                    self.refresh(key_hash, copy);
                }
                let outcome = Outcome::Known(&known);
                let handled = finish(&self.host, &self.warnings, io, &request, headers, outcome);
                match self.after_checks(context_id, io, request, &known, handled) {
                    Some(handled) => handled,
                    None => return Flow::Pause, // waits for its answer
                }
            }
            Cached::NegativeHit => {
                self.host.count(Counter::CacheNegativeHit);
                let outcome = Outcome::Deny(Denial::Invalid);
                finish(&self.host, &self.warnings, io, &request, headers, outcome)
            }
            Cached::Miss { stale } => {
                self.host.count(Counter::CacheMiss);
                if !charge_lookup(&self.host, io, &request.config, budget) {
                    return Flow::Pause;
                }
                request.charged = budget.is_some();
                request.referrer = referrer(headers).map(<[u8]>::to_vec);
                self.park(context_id, request, stale);
                return Flow::Pause;
            }
        };
        match handled {
            Handled::Forward(rate_headers) => Flow::Forward(rate_headers),
            Handled::Answered | Handled::CountQuotas(_) => Flow::Pause,
        }
    }

    fn deny(
        &self,
        io: &mut impl RequestIo,
        config: &Config,
        budget: Option<ClientBudget>,
        denial: Denial,
    ) -> Flow {
        deny(&self.host, io, config, budget, denial);
        Flow::Pause
    }

    /// The response headers phase: the RateLimit fields of a request that took a token,
    /// `own` when it did so at once, else as kept for it after it waited.
    pub fn on_response(&self, context_id: u32, own: Option<RateHeaders>, io: &mut impl RequestIo) {
        let rate_headers = own.or_else(|| self.take_forwarded(context_id));
        for (name, value) in rate_headers.iter().flat_map(RateHeaders::fields) {
            io.add_response_header(name, value);
        }
    }

    /// Gives the worker up after a panic left its state in doubt: every request it holds
    /// (parked on a lookup, or waiting for a quota answer) is answered 503
    /// `key_service_unavailable`, never forwarded, and the host is handed back for the
    /// worker built in its place.
    pub fn abandon(self) -> H {
        let held = self
            .requests
            .take()
            .into_iter()
            .filter_map(|(context_id, state)| {
                let waits = matches!(
                    state,
                    RequestState::Parked(_) | RequestState::AskingQuotas { .. }
                );
                waits.then_some(context_id)
            });
        let denial = Denial::KeyServiceUnavailable; // a 503: no WWW-Authenticate
        for context_id in held {
            if let Some(mut io) = self.host.parked(context_id) {
                self.host.count(Counter::Denied(denial));
                reply(&mut io, "", denial, &[]);
            }
        }
        self.host.unpark();
        self.host
    }

    /// A request that ended (its client went away, or it is done).
    pub fn forget(&self, context_id: u32) {
        if let Some(RequestState::AskingQuotas { token }) =
            remove_if_any(&self.requests, context_id)
        {
            self.drop_quota_check(token);
        }
    }

    /// The RateLimit fields kept for request `context_id`, if it was forwarded after
    /// waiting.
    fn take_forwarded(&self, context_id: u32) -> Option<RateHeaders> {
        match self.take_state(context_id, |s| matches!(s, RequestState::Forwarded(_)))? {
            RequestState::Forwarded(rate_headers) => Some(rate_headers),
            _ => None,
        }
    }

    /// Request `context_id`, taken out if it is parked on a lookup.
    fn take_parked(&self, context_id: u32) -> Option<Request> {
        match self.take_state(context_id, |s| matches!(s, RequestState::Parked(_)))? {
            RequestState::Parked(request) => Some(request),
            _ => None,
        }
    }

    /// Request `context_id`'s state, taken out if it is the `wanted` kind. Most requests
    /// hold none: with nothing held, no hashing (the response hook asks for every one).
    fn take_state(
        &self,
        context_id: u32,
        wanted: fn(&RequestState) -> bool,
    ) -> Option<RequestState> {
        let mut requests = self.requests.borrow_mut();
        if requests.is_empty() || !requests.get(&context_id).is_some_and(wanted) {
            return None;
        }
        requests.remove(&context_id)
    }

    /// Parks request `context_id` until the key service answers for its key. Requests
    /// for a key already being looked up join that lookup.
    fn park(&self, context_id: u32, request: Request, stale: Option<KeyRecord>) {
        let key_hash = request.key_hash;
        self.requests
            .borrow_mut()
            .insert(context_id, RequestState::Parked(request));
        let stale = stale.and_then(|record| {
            self.cache
                .borrow()
                .as_ref()
                .map(|cache| cache.known_key(record))
        });
        let asked = self.asked(self.host.now_ms());
        self.ask(key_hash, Some(context_id), lookup(stale, None, asked));
    }

    /// A lookup asked for now, for changes since `since_ms`.
    fn asked(&self, since_ms: u64) -> Asked {
        Asked {
            since_ms,
            epoch: self.node_feed_epoch(),
        }
    }

    /// Starts a background lookup of a key in use whose entry is due for a refresh: the
    /// request that found it goes on at once; the answer replaces the entry (and `copy`).
    fn refresh(&self, key_hash: KeyHash, copy: CopyId) {
        let asked = self.asked(self.host.now_ms());
        self.ask(key_hash, None, lookup(None, Some(copy), asked));
    }

    /// Joins the lookup of `key_hash`, asking for a new one if there is none.
    fn ask(&self, key_hash: KeyHash, parked: Option<u32>, payload: Payload) {
        let key = FlightKey::Lookup(key_hash);
        if !self.flights.borrow_mut().join(key, parked, || payload) {
            return;
        }
        // A request cannot own the callout (see the module comment): the worker's own
        // context is woken through its queue to send it.
        let ask = Message::Ask(key_hash).encode();
        let woken = self.queue.get().is_some_and(|q| self.host.wake(q, &ask));
        if !woken {
            self.warnings.warn(self.host.now_ms(), || {
                "cannot reach the worker's own context to ask the key service".into()
            });
            self.land(key, Resolution::Failed);
        }
    }

    /// A message on this worker's queue: from its own requests (start a flight) or from
    /// another worker (a flight this one waited for has landed).
    pub fn on_message(&self, bytes: &[u8]) {
        match Message::decode(bytes) {
            Some(Message::Ask(key_hash)) => self.start(FlightKey::Lookup(key_hash), true),
            Some(Message::Woken(ended, key_hash)) => {
                self.on_peer_landed(ended, FlightKey::Lookup(key_hash))
            }
            Some(Message::Feed(news)) => self.on_feed_news(&news),
            Some(Message::Unreported(key_hash)) => self.on_unreported_elsewhere(&key_hash),
            None => {}
        }
    }

    /// Starts `key`'s queued flight: asks the key service unless another worker of the
    /// node already is, or has just put the answer in the cache.
    fn start(&self, key: FlightKey, trust_recent_answer: bool) {
        let (Some(config), FlightKey::Lookup(key_hash)) = (self.config(), key) else {
            return;
        };
        let me = self.queue.get().unwrap_or_default();
        let hold_ms = config.key_service.timeout_ms + LEASE_MARGIN_MS;
        let now_ms = self.host.now_ms();
        let refresh = match self.flights.borrow().get(&key).map(|f| &f.payload) {
            Some(Payload::Lookup { refresh, .. }) => *refresh,
            _ => return, // no such lookup
        };
        if !self.flights.borrow().is_queued(&key) {
            return; // under way already
        }
        let before = match self.cache.borrow().as_ref() {
            Some(cache) => cache.before_lookup(&self.host, &key_hash, refresh.is_some(), now_ms),
            None => return,
        };
        match before {
            BeforeLookup::Ask => {}
            BeforeLookup::Paused => {
                self.host.count(Counter::KeyServicePaused);
                return self.land(key, Resolution::Failed);
            }
            BeforeLookup::Refreshed {
                known,
                stored_at_ms,
            } => return self.land(key, Resolution::Known(known, stored_at_ms)),
        }
        let start = self.flights.borrow_mut().start(
            &self.host,
            key,
            me,
            now_ms,
            hold_ms,
            trust_recent_answer,
        );
        match start {
            Start::Send => {
                let max_pending = config.key_service.max_pending;
                if !pending::enter(&self.host, max_pending, now_ms, hold_ms) {
                    return self
                        .on_answer(key_hash, LookupAnswer::Failed(LookupFailure::Overloaded));
                }
                if let Some(Payload::Lookup { counted, .. }) = self
                    .flights
                    .borrow_mut()
                    .get_mut(&key)
                    .map(|f| &mut f.payload)
                {
                    *counted = true;
                }
                if refresh.is_some() {
                    self.host.count(Counter::CacheRefresh);
                }
                let path = config.key_service.path_for(&hash_hex(&key_hash));
                self.send_callout(key, &path, &config);
            }
            Start::Wait => {
                self.host.count(Counter::KeyServiceJoined);
                self.reschedule(now_ms);
            }
            // The verdict is not in the cache after all (a TTL of 0, or evicted already).
            Start::AlreadyAnswered if !self.answer_from_cache(key) => self.start(key, false),
            Start::AlreadyAnswered | Start::Nothing => {}
        }
    }

    /// Lands `key`'s flight from the cache if it holds a verdict now.
    fn answer_from_cache(&self, key: FlightKey) -> bool {
        let FlightKey::Lookup(key_hash) = key else {
            return false;
        };
        let now_ms = self.host.now_ms();
        let cached = match self.cache.borrow().as_ref() {
            Some(cache) => cache.node_wide(&self.host, &key_hash, now_ms),
            None => return false,
        };
        let resolution = match cached {
            Cached::Hit {
                known,
                stored_at_ms,
                ..
            } => Resolution::Known(known, stored_at_ms),
            Cached::NegativeHit => Resolution::Unknown,
            Cached::Miss { .. } => return false,
        };
        self.land(key, resolution);
        true
    }

    fn on_peer_landed(&self, ended: FlightEnd, key: FlightKey) {
        if !self.flights.borrow().is_waiting_on_peer(&key) {
            return;
        }
        match ended {
            FlightEnd::Failed => self.land(key, Resolution::Failed),
            FlightEnd::Overloaded => self.land(key, Resolution::Overloaded),
            FlightEnd::Answered if !self.answer_from_cache(key) => {
                // The verdict may already be gone (a tiny cache, or ttl 0): ask again.
                self.flights.borrow_mut().requeue(key);
                self.start(key, false);
            }
            FlightEnd::Answered => {}
        }
    }

    /// The periodic tick: takes over lookups whose owner in another worker went silent,
    /// and follows (or polls) the change feed.
    pub fn on_tick(&self) {
        let now_ms = self.host.now_ms();
        let overdue = self.flights.borrow_mut().take_over_overdue(now_ms);
        for key in overdue {
            self.start(key, true);
        }
        self.on_feed_tick(now_ms);
        self.on_quota_tick(now_ms);
        self.reschedule(self.host.now_ms());
    }

    /// Asks the host to tick when the earliest pending deadline falls due.
    pub(super) fn reschedule(&self, now_ms: u64) {
        let takeover = self.flights.borrow().next_deadline_ms();
        let feed = self.feed.borrow().next_check_ms;
        let report = self.report_due_ms.get();
        let next = [takeover, feed, report].into_iter().flatten().min();
        if let Some(period_ms) = self.scheduler.borrow_mut().plan(now_ms, next) {
            self.host.set_tick_ms(period_ms);
        }
    }

    /// Sends `key`'s callout: `GET path` to the key service.
    pub(super) fn send_callout(&self, key: FlightKey, path: &str, config: &Config) {
        let service = &config.key_service;
        let mut headers: Vec<(&str, &str)> = vec![
            (":method", "GET"),
            (":path", path),
            (":authority", &service.authority),
        ];
        headers.extend(
            service
                .headers
                .iter()
                .map(|(n, v)| (n.as_str(), v.as_str())),
        );
        let callout = Callout {
            cluster: &service.cluster,
            headers,
            timeout_ms: service.timeout_ms,
        };
        match self.host.send_callout(&callout) {
            Ok(token) => self.flights.borrow_mut().sent(key, token),
            Err(NotSent::Refused) => self.not_sent(key, LookupFailure::NotSent),
            Err(NotSent::AnsweredAtOnce) => self.not_sent(key, LookupFailure::Overloaded),
        }
    }

    fn not_sent(&self, key: FlightKey, failure: LookupFailure) {
        match key {
            FlightKey::Lookup(key_hash) => self.on_answer(key_hash, LookupAnswer::Failed(failure)),
            FlightKey::FeedPoll => {
                self.on_poll_answer(feed::FeedAnswer::Failed(failure.describe()))
            }
        }
    }

    /// Callout `token`, accepted by the host, could not be sent after all (a host that
    /// sends callouts later, from another thread).
    pub fn on_callout_refused(&self, token: u32, why: NotSent) {
        let key = self.flights.borrow_mut().answered(token);
        let failure = match why {
            NotSent::Refused => LookupFailure::NotSent,
            NotSent::AnsweredAtOnce => LookupFailure::Overloaded,
        };
        if let Some(key) = key {
            self.not_sent(key, failure);
        }
    }

    /// The answer to callout `token` is being delivered, with a body of `body_size`.
    pub fn on_callout_answer(&self, token: u32, body_size: usize) {
        let Some(key) = self.flights.borrow_mut().answered(token) else {
            return;
        };
        let status = self.host.callout_status();
        let read = |limit| (body_size <= limit).then(|| self.host.callout_body(body_size));
        match key {
            FlightKey::Lookup(key_hash) => {
                let body = read(answer::MAX_ANSWER_BYTES);
                let overloaded = self.host.callout_overloaded();
                let answer = classify(status.as_deref(), body.as_deref(), overloaded);
                self.on_answer(key_hash, answer);
            }
            FlightKey::FeedPoll => {
                let body = read(feed::MAX_ANSWER_BYTES);
                self.on_poll_answer(feed::classify(status.as_deref(), body.as_deref()));
            }
        }
    }

    /// Counts the key service's answer, puts its verdict in the cache, and lands the
    /// flight.
    fn on_answer(&self, key_hash: KeyHash, answer: LookupAnswer) {
        let key = FlightKey::Lookup(key_hash);
        let now_ms = self.host.now_ms();
        let (asked, counted, sent_at_ms) = match self.flights.borrow().get(&key) {
            Some(flight) => match &flight.payload {
                Payload::Lookup { asked, counted, .. } => {
                    (Some(*asked), *counted, flight.sent_at_ms())
                }
                Payload::Poll { .. } => (None, false, None),
            },
            None => (None, false, None),
        };
        if counted {
            if let Some(config) = self.config() {
                let hold_ms = config.key_service.timeout_ms + LEASE_MARGIN_MS;
                pending::leave(&self.host, now_ms, hold_ms);
            }
        }
        let answered = !matches!(
            answer,
            LookupAnswer::Failed(LookupFailure::NotSent | LookupFailure::Overloaded)
        );
        if let Some(sent_at_ms) = sent_at_ms.filter(|_| answered) {
            let latency_ms = now_ms.saturating_sub(sent_at_ms);
            self.host.record(Histogram::KeyServiceLatencyMs, latency_ms);
        }
        if matches!(answer, LookupAnswer::Found(_) | LookupAnswer::NotFound) {
            if let Some(since_ms) = asked.and_then(|asked| self.superseded(&key_hash, asked)) {
                self.host.count(Counter::KeyServiceSuperseded);
                return self.land(key, Resolution::Superseded(since_ms));
            }
        }
        let resolution = match self.cache.borrow().as_ref() {
            None => Resolution::Failed,
            Some(cache) => match answer {
                LookupAnswer::Found(record) => {
                    self.host.count(Counter::KeyServiceFound);
                    let known = cache.known_key(record.clone());
                    cache.store_verdict(&self.host, &key_hash, Verdict::Found(record), now_ms);
                    Resolution::Known(known, now_ms)
                }
                LookupAnswer::NotFound => {
                    self.host.count(Counter::KeyServiceNotFound);
                    cache.store_verdict(&self.host, &key_hash, Verdict::NotFound, now_ms);
                    Resolution::Unknown
                }
                LookupAnswer::Failed(failure) => {
                    self.host.count(Counter::KeyServiceError);
                    self.host
                        .count(Counter::KeyServiceErrorKind(failure.kind()));
                    self.warnings.warn(now_ms, || {
                        format!(
                            "key service lookup for key {} failed: {}",
                            fingerprint(&key_hash),
                            failure.describe()
                        )
                    });
                    if failure == LookupFailure::Overloaded {
                        // Not the key service's failure: no pause (a paused key is
                        // answered as failed, which `failure_mode` open forwards).
                        Resolution::Overloaded
                    } else {
                        cache.record_failure(&self.host, &key_hash, now_ms);
                        Resolution::Failed
                    }
                }
            },
        };
        self.land(key, resolution);
    }

    /// Ends `key`'s flight: releases its lease and wakes the workers that waited for it,
    /// then answers every request parked on it.
    pub(super) fn land(&self, key: FlightKey, resolution: Resolution) {
        let ended = match resolution {
            // Superseded: the workers that waited read the tombstone, and ask again.
            Resolution::Known(..) | Resolution::Unknown | Resolution::Superseded(_) => {
                FlightEnd::Answered
            }
            Resolution::Failed => FlightEnd::Failed,
            Resolution::Overloaded => FlightEnd::Overloaded,
        };
        let me = self.queue.get().unwrap_or_default();
        let now_ms = self.host.now_ms();
        let landed = self
            .flights
            .borrow_mut()
            .land(&self.host, key, me, ended, now_ms);
        let Some((flight, peers)) = landed else {
            return;
        };
        let (FlightKey::Lookup(key_hash), Payload::Lookup { stale, refresh, .. }) =
            (key, &flight.payload)
        else {
            return;
        };
        let woken = Message::Woken(ended, key_hash).encode();
        for peer in peers {
            let _ = self.host.wake(peer, &woken);
        }
        if let Resolution::Known(known, stored_at_ms) = &resolution {
            self.keep_refreshed_copy(*refresh, key_hash, *stored_at_ms, known);
        }
        if flight.parked.is_empty() {
            return;
        }
        if let Resolution::Superseded(since_ms) = resolution {
            // The requests stay parked, on a new lookup (a refresh is simply dropped).
            let asked = self.asked(since_ms);
            for context_id in flight.parked {
                let payload = lookup(stale.clone(), None, asked);
                self.ask(key_hash, Some(context_id), payload);
            }
            return;
        }
        for context_id in flight.parked {
            let Some(mut request) = self.take_parked(context_id) else {
                continue; // its client went away
            };
            let Some(mut io) = self.host.parked(context_id) else {
                continue;
            };
            request.now_ms = now_ms;
            let (outcome, known) = match &resolution {
                Resolution::Known(known, _) => (Outcome::Known(known), Some(known)),
                Resolution::Unknown => (Outcome::Deny(Denial::Invalid), None),
                Resolution::Failed | Resolution::Overloaded | Resolution::Superseded(_) => {
                    let overloaded = matches!(resolution, Resolution::Overloaded);
                    let outcome = on_key_service_failure(
                        &self.host,
                        &request.config,
                        stale.as_deref(),
                        overloaded,
                    );
                    let used_stale = matches!(outcome, Outcome::Known(_));
                    (outcome, stale.as_ref().filter(|_| used_stale))
                }
            };
            let handled = finish(&self.host, &self.warnings, &mut io, &request, &[], outcome);
            let Some(known) = known else {
                self.resume_waited(context_id, &mut io, handled);
                continue;
            };
            let Some(handled) = self.after_checks(context_id, &mut io, request, known, handled)
            else {
                continue; // waits for its answer
            };
            self.resume_waited(context_id, &mut io, handled);
        }
        self.host.unpark();
    }

    /// Whether the node forgot the key (the change feed's tombstone, or a new epoch) since
    /// the lookup was asked for: then when a new lookup is to look for changes from.
    fn superseded(&self, key_hash: &KeyHash, asked: Asked) -> Option<u64> {
        let now_ms = self.host.now_ms();
        if asked.epoch.is_some() && asked.epoch != self.node_feed_epoch() {
            return Some(now_ms);
        }
        let cache = self.cache.borrow();
        let forgotten_ms = cache
            .as_ref()?
            .forgotten_since(&self.host, key_hash, asked.since_ms)?;
        // A tombstone of the same millisecond must not supersede the new lookup too.
        Some(forgotten_ms.saturating_add(1))
    }

    /// `per_key_stats`: the key's request, allowed or denied.
    pub(super) fn count_key(&self, known: &KnownKey, handled: &Handled) {
        if let Some(per_key) = self.per_key.borrow().as_ref() {
            let allowed = matches!(handled, Handled::Forward(_));
            per_key.count(&self.host, &known.record.key_id, allowed);
        }
    }

    /// A refresh's answer replaces the copy of the request that started it.
    fn keep_refreshed_copy(
        &self,
        refresh: Option<CopyId>,
        key_hash: KeyHash,
        stored_at_ms: u64,
        known: &Rc<KnownKey>,
    ) {
        if let (Some(copy), Some(cache)) = (refresh, self.cache.borrow_mut().as_mut()) {
            cache.keep_copy(copy, key_hash, stored_at_ms, known.clone());
        }
    }
}

fn lookup(stale: Option<Rc<KnownKey>>, refresh: Option<CopyId>, asked: Asked) -> Payload {
    Payload::Lookup {
        stale,
        refresh,
        asked,
        counted: false,
    }
}

/// Every request ends with these lookups, often in empty maps (they hold only requests
/// waiting on the key service, or between their token and their response): skip the hashing.
pub(super) fn remove_if_any<K: std::hash::Hash + Eq, T>(
    map: &RefCell<HashMap<K, T>>,
    key: K,
) -> Option<T> {
    let mut map = map.borrow_mut();
    if map.is_empty() {
        return None;
    }
    map.remove(&key)
}
