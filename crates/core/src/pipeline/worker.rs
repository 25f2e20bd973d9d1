//! What one worker (one Envoy worker thread: one wasm VM) keeps between its callbacks:
//! its configured state and host (`context`), one desk per concern (`lookups`, `feed`,
//! `quotas`) and one state per request it holds. The host layer calls in on each event;
//! the worker hands the event to its desk, then carries out what the desk left for it
//! (the requests to answer, the tick to plan). Each request's way on after its key is
//! known (`after_checks`) is written here once, for every path that leads to it.
use super::context::{Configured, Context};
use super::feed::Feed;
use super::lookups::{Landing, Lookups, Resolution};
use super::per_key::PerKeyStats;
use super::ports::{Host, NotSent, RequestIo};
use super::quotas::{Counted, GrpcOutcome, Quotas};
use super::request::{
    charge_lookup, deny, finish, on_key_service_failure, referrer, refuse_if_budget_spent, reply,
    ClientBudget, Handled, Outcome, RateHeaders, Request,
};
use super::stats::Counter;
use crate::config::Config;
use crate::flights::coordinator::Message;
use crate::flights::pending;
use crate::flights::scheduler::Scheduler;
use crate::keys::cache::{Cached, KeyCache, Looked};
use crate::keys::copies::CopyId;
use crate::keys::known_key::KnownKey;
use crate::request::client_address::without_port;
use crate::request::denial::Denial;
use crate::request::extract::{extract, KeyOutcome};
use crate::request::header_map::{self, Header};
use crate::request::key_format::conforms;
use crate::request::rules::matching_rule;
use crate::storage::slots::{create_slots, Table};
use crate::vocabulary::key_hash::{hash_key, KeyHash};
use std::collections::HashMap;
use std::rc::Rc;

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
enum RequestState {
    /// Parked until the key service answers for its key.
    Parked(Request),
    /// Waiting for its own call to the rate limit service (the quotas desk's, by token).
    AskingQuotas { token: u32 },
    /// Forwarded after waiting: its response gets these RateLimit fields (a request
    /// forwarded at once keeps its own: see `Flow`).
    Forwarded(RateHeaders),
}

pub struct Worker<H: Host> {
    cx: Context<H>,
    lookups: Lookups,
    feed: Feed,
    quotas: Quotas,
    /// What it holds for each request between callbacks, by context id: forgetting a
    /// request is one removal.
    requests: HashMap<u32, RequestState>,
    scheduler: Scheduler,
}

impl<H: Host> Worker<H> {
    pub fn new(host: H) -> Worker<H> {
        Worker {
            cx: Context::new(host),
            lookups: Lookups::default(),
            feed: Feed::default(),
            quotas: Quotas::default(),
            requests: HashMap::new(),
            scheduler: Scheduler::default(),
        }
    }

    pub fn host(&self) -> &H {
        &self.cx.host
    }

    pub fn queue(&self) -> Option<u32> {
        self.cx.queue
    }

    pub fn set_queue(&mut self, queue: u32) {
        self.cx.queue = Some(queue);
    }

    /// Leaves the node's duties (feed polls, reports) to the worker of queue `on_duty`
    /// (None: this one keeps them). A host whose workers do not all run when idle leaves
    /// them to one that does.
    pub fn set_on_duty(&mut self, on_duty: Option<u32>) {
        self.cx.on_duty = on_duty;
    }

    pub fn on_duty(&self) -> Option<u32> {
        self.cx.on_duty
    }

    /// Takes a configuration (every VM runs this, on every push). False: refused, with
    /// one log line naming the field and the reason.
    pub fn configure(&mut self, raw: &[u8]) -> bool {
        let config = match Config::parse(raw) {
            Ok(config) => config,
            Err(e) => {
                log::error!("apikey-filter configuration refused: {e}");
                return false;
            }
        };
        let host = &self.cx.host;
        // Creating slots keeps those that exist: running buckets and leases survive.
        create_slots(host, Table::keys(config.cache.max_entries));
        create_slots(host, Table::leases());
        pending::create(host);
        if config.brute_force.is_some() {
            create_slots(host, Table::client_addresses(config.cache.max_entries));
        }
        let per_key = config.per_key_stats.map(PerKeyStats::new);
        if let Some(per_key) = &per_key {
            create_slots(host, per_key.table());
        }
        if config.rate_limit_service.is_some() {
            create_slots(host, Table::quotas(config.cache.max_entries));
        }
        self.announce(raw, &config);
        // Copies carry what the old configuration made of them (its default rate limit).
        self.cx.configured = Some(Configured {
            cache: KeyCache::new(&config),
            config: Rc::new(config),
            per_key,
        });
        self.feed = Feed::start_following(&mut self.cx);
        self.reschedule(self.cx.host.now_ms());
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
        let host = &self.cx.host;
        if host
            .get(ANNOUNCED_KEY)
            .is_some_and(|(value, _)| value == digest)
        {
            log::debug!("{line}");
        } else {
            let _ = host.set(ANNOUNCED_KEY, &digest, None);
            log::info!("{line}");
        }
    }

    /// The request headers phase of request `context_id`, whose header map is `headers`.
    pub fn on_request(
        &mut self,
        context_id: u32,
        io: &mut impl RequestIo,
        headers: &[Header],
    ) -> Flow {
        let flow = self.decide(context_id, io, headers);
        self.settle();
        flow
    }

    fn decide(&mut self, context_id: u32, io: &mut impl RequestIo, headers: &[Header]) -> Flow {
        let cx = &mut self.cx;
        let Some(configured) = cx.configured.as_mut() else {
            // No configuration, no way to check a key: refused like any failure to.
            let denial = Denial::KeyServiceUnavailable;
            cx.host.count(Counter::Denied(denial));
            reply(io, "", denial, &[]);
            return Flow::Pause;
        };
        let config = configured.config.clone();
        let host = &cx.host;
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
        if refuse_if_budget_spent(host, io, &config, budget) {
            return Flow::Pause;
        }
        let denial = match extraction.outcome {
            KeyOutcome::Key(key)
                if config
                    .key_format
                    .as_ref()
                    .is_some_and(|format| !conforms(&key, format)) =>
            {
                Denial::Malformed
            }
            KeyOutcome::Key(key) => {
                let now_ms = host.now_ms();
                let Looked {
                    key_hash,
                    copy,
                    cached,
                } = configured.cache.lookup(host, &key, now_ms);
                let request = Request {
                    client: client.map(str::to_string),
                    budget,
                    charged: false,
                    key_hash,
                    rule: matching_rule(&config.rules, method, path),
                    referrer: None,
                    config,
                    now_ms,
                };
                return self.on_looked(context_id, io, headers, request, copy, cached);
            }
            KeyOutcome::Missing => Denial::Missing,
            KeyOutcome::Duplicate => Denial::Duplicate,
            KeyOutcome::Malformed => Denial::Malformed,
        };
        deny(host, io, &config, budget, denial);
        Flow::Pause
    }

    /// A request whose key was looked up in the cache (`cached`, from its `copy`).
    fn on_looked(
        &mut self,
        context_id: u32,
        io: &mut impl RequestIo,
        headers: &[Header],
        mut request: Request,
        copy: CopyId,
        cached: Cached,
    ) -> Flow {
        let (key_hash, budget) = (request.key_hash, request.budget);
        let cx = &mut self.cx;
        let handled = match cached {
            Cached::Hit {
                known, refresh_due, ..
            } => {
                cx.host.count(Counter::CacheHit);
                if refresh_due {
                    self.lookups.refresh(cx, key_hash, copy);
                }
                let outcome = Outcome::Known(&known);
                let handled = finish(&cx.host, &mut cx.warnings, io, &request, headers, outcome);
                match self.after_checks(context_id, io, request, &known, handled) {
                    Some(handled) => handled,
                    None => return Flow::Pause, // waits for its answer
                }
            }
            Cached::NegativeHit => {
                cx.host.count(Counter::CacheNegativeHit);
                let outcome = Outcome::Deny(Denial::Invalid);
                finish(&cx.host, &mut cx.warnings, io, &request, headers, outcome)
            }
            Cached::Miss { stale } => {
                cx.host.count(Counter::CacheMiss);
                if !charge_lookup(&cx.host, io, &request.config, budget) {
                    return Flow::Pause;
                }
                request.charged = budget.is_some();
                request.referrer = referrer(headers).map(<[u8]>::to_vec);
                self.requests
                    .insert(context_id, RequestState::Parked(request));
                self.lookups.park(cx, context_id, key_hash, stale);
                return Flow::Pause;
            }
        };
        match handled {
            Handled::Forward(rate_headers) => Flow::Forward(rate_headers),
            Handled::Answered | Handled::CountQuotas(_) => Flow::Pause,
        }
    }

    /// The response headers phase: the RateLimit fields of a request that took a token,
    /// `own` when it did so at once, else as kept for it after it waited.
    pub fn on_response(
        &mut self,
        context_id: u32,
        own: Option<RateHeaders>,
        io: &mut impl RequestIo,
    ) {
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
        let host = self.cx.host;
        let held = self.requests.into_iter().filter_map(|(context_id, state)| {
            let waits = matches!(
                state,
                RequestState::Parked(_) | RequestState::AskingQuotas { .. }
            );
            waits.then_some(context_id)
        });
        let denial = Denial::KeyServiceUnavailable; // a 503: no WWW-Authenticate
        for context_id in held {
            if let Some(mut io) = host.parked(context_id) {
                host.count(Counter::Denied(denial));
                reply(&mut io, "", denial, &[]);
            }
        }
        host.unpark();
        host
    }

    /// A request that ended (its client went away, or it is done).
    pub fn forget(&mut self, context_id: u32) {
        // Most requests hold nothing: then no hashing.
        if self.requests.is_empty() {
            return;
        }
        if let Some(RequestState::AskingQuotas { token }) = self.requests.remove(&context_id) {
            self.quotas.drop_check(&self.cx, token);
        }
    }

    /// The RateLimit fields kept for request `context_id`, if it was forwarded after
    /// waiting.
    fn take_forwarded(&mut self, context_id: u32) -> Option<RateHeaders> {
        match self.take_state(context_id, |s| matches!(s, RequestState::Forwarded(_)))? {
            RequestState::Forwarded(rate_headers) => Some(rate_headers),
            _ => None,
        }
    }

    /// Request `context_id`, taken out if it is parked on a lookup.
    fn take_parked(&mut self, context_id: u32) -> Option<Request> {
        match self.take_state(context_id, |s| matches!(s, RequestState::Parked(_)))? {
            RequestState::Parked(request) => Some(request),
            _ => None,
        }
    }

    /// Request `context_id`'s state, taken out if it is the `wanted` kind. Most requests
    /// hold none: with nothing held, no hashing (the response hook asks for every one).
    fn take_state(
        &mut self,
        context_id: u32,
        wanted: fn(&RequestState) -> bool,
    ) -> Option<RequestState> {
        let requests = &mut self.requests;
        if requests.is_empty() || !requests.get(&context_id).is_some_and(wanted) {
            return None;
        }
        requests.remove(&context_id)
    }

    /// A message on this worker's queue: from its own requests (start a lookup) or from
    /// another worker (a lookup this one waited for has landed, the feed's news, a key
    /// to report).
    pub fn on_message(&mut self, bytes: &[u8]) {
        let cx = &mut self.cx;
        match Message::decode(bytes) {
            Some(Message::Ask(key_hash)) => self.lookups.start(cx, key_hash, true),
            Some(Message::Woken(ended, key_hash)) => {
                self.lookups.on_peer_landed(cx, ended, key_hash)
            }
            Some(Message::Feed(news)) => self.feed.on_news(cx, &news),
            Some(Message::Unreported(key_hash)) => {
                self.quotas.on_unreported_elsewhere(cx, &key_hash)
            }
            None => {}
        }
        self.settle();
    }

    /// The periodic tick: takes over lookups whose owner in another worker went silent,
    /// follows (or polls) the change feed, and reports quotas.
    pub fn on_tick(&mut self) {
        let cx = &mut self.cx;
        let now_ms = cx.host.now_ms();
        self.lookups.take_over_overdue(cx, now_ms);
        self.feed.on_tick(cx, now_ms);
        self.quotas.on_tick(cx, now_ms);
        self.settle();
        self.reschedule(self.cx.host.now_ms());
    }

    /// Callout `token`, accepted by the host, could not be sent after all (a host that
    /// sends callouts later, from another thread).
    pub fn on_callout_refused(&mut self, token: u32, why: NotSent) {
        let cx = &mut self.cx;
        if !self.feed.on_callout_refused(cx, token, why) {
            self.lookups.on_callout_refused(cx, token, why);
        }
        self.settle();
    }

    /// The answer to callout `token` is being delivered, with a body of `body_size`.
    pub fn on_callout_answer(&mut self, token: u32, body_size: usize) {
        let cx = &mut self.cx;
        if !self.feed.on_callout_answer(cx, token, body_size) {
            self.lookups.on_callout_answer(cx, token, body_size);
        }
        self.settle();
    }

    /// The answer to a call to the rate limit service, by its token: a request's own, or
    /// a report.
    pub fn on_grpc_answer(&mut self, token: u32, outcome: GrpcOutcome) {
        if let Some(answered) = self.quotas.on_grpc_answer(&mut self.cx, token, outcome) {
            let check = &answered.check;
            let (context_id, key_hash, known) = (
                check.context_id,
                check.request.key_hash,
                check.known.clone(),
            );
            self.take_state(context_id, |s| {
                matches!(s, RequestState::AskingQuotas { .. })
            });
            match self.cx.host.parked(context_id) {
                Some(mut io) => {
                    let handled = self.quotas.conclude_check(&mut self.cx, &mut io, answered);
                    self.counted(&key_hash, &known, &handled);
                    self.resume_waited(context_id, &mut io, handled);
                    self.cx.host.unpark();
                }
                // The request is gone, its answer here: what the call carried is settled
                // all the same (counted by the service, or to be reported).
                None => self.quotas.settle_without_request(&self.cx, &answered),
            }
        }
        self.settle();
    }

    /// Carries out what the desks left: answers the requests of the lookups that landed,
    /// and plans the tick again when a desk set a new deadline.
    fn settle(&mut self) {
        for landing in self.lookups.take_landed() {
            self.resume_landed(landing);
        }
        if self.cx.take_wake_by() {
            self.reschedule(self.cx.host.now_ms());
        }
    }

    /// Answers the requests parked on a lookup that landed.
    fn resume_landed(&mut self, landing: Landing) {
        let Landing {
            parked,
            resolution,
            stale,
        } = landing;
        let now_ms = self.cx.host.now_ms();
        for context_id in parked {
            let Some(mut request) = self.take_parked(context_id) else {
                continue; // its client went away
            };
            let Some(mut io) = self.cx.host.parked(context_id) else {
                continue;
            };
            request.now_ms = now_ms;
            let cx = &mut self.cx;
            let (outcome, known) = match &resolution {
                Resolution::Known(known, _) => (Outcome::Known(known), Some(known)),
                Resolution::Unknown => (Outcome::Deny(Denial::Invalid), None),
                Resolution::Failed | Resolution::Overloaded => {
                    let overloaded = matches!(resolution, Resolution::Overloaded);
                    let outcome = on_key_service_failure(
                        &cx.host,
                        &request.config,
                        stale.as_deref(),
                        overloaded,
                    );
                    let used_stale = matches!(outcome, Outcome::Known(_));
                    (outcome, stale.as_ref().filter(|_| used_stale))
                }
            };
            let handled = finish(&cx.host, &mut cx.warnings, &mut io, &request, &[], outcome);
            let handled = match known {
                Some(known) => self.after_checks(context_id, &mut io, request, known, handled),
                None => Some(handled),
            };
            if let Some(handled) = handled {
                self.resume_waited(context_id, &mut io, handled);
            } // else it waits for its quota answer
        }
        self.cx.host.unpark();
    }

    /// A known key's request after its checks (`finish`): its quotas counted when it has
    /// any, then the request counted for its key. `None`: it waits for the rate limit
    /// service, whose answer goes on from `on_grpc_answer`.
    fn after_checks(
        &mut self,
        context_id: u32,
        io: &mut impl RequestIo,
        request: Request,
        known: &Rc<KnownKey>,
        handled: Handled,
    ) -> Option<Handled> {
        let key_hash = request.key_hash;
        let handled = match handled {
            Handled::CountQuotas(rate_headers) => {
                let cx = &mut self.cx;
                match self
                    .quotas
                    .count(cx, context_id, io, request, known.clone(), rate_headers)
                {
                    Counted::Decided(handled) => handled,
                    Counted::Asking { token } => {
                        let asking = RequestState::AskingQuotas { token };
                        self.requests.insert(context_id, asking);
                        return None;
                    }
                }
            }
            handled => handled,
        };
        self.counted(&key_hash, known, &handled);
        Some(handled)
    }

    /// A known key's request, decided: counted for its key (`per_key_stats`), and its key
    /// noted for the node's report when it went on.
    fn counted(&mut self, key_hash: &KeyHash, known: &Rc<KnownKey>, handled: &Handled) {
        let cx = &mut self.cx;
        let allowed = matches!(handled, Handled::Forward(_));
        if let Some(per_key) = cx.configured.as_mut().and_then(|c| c.per_key.as_mut()) {
            per_key.count(&cx.host, &known.record.key_id, allowed);
        }
        if allowed {
            self.quotas.note_unreported(cx, key_hash, known, None);
        }
    }

    /// A request that waited (on the key service or the rate limit service) and was
    /// decided: resumed, with its RateLimit fields kept for its response, or left
    /// answered.
    fn resume_waited(&mut self, context_id: u32, io: &mut impl RequestIo, handled: Handled) {
        if let Handled::Forward(rate_headers) = handled {
            if let Some(rate_headers) = rate_headers {
                self.requests
                    .insert(context_id, RequestState::Forwarded(rate_headers));
            }
            io.resume();
        }
    }

    /// Asks the host to tick when the earliest pending deadline falls due.
    fn reschedule(&mut self, now_ms: u64) {
        let next = [
            self.lookups.next_deadline_ms(),
            self.feed.next_check_ms(),
            self.quotas.report_due_ms(),
        ]
        .into_iter()
        .flatten()
        .min();
        if let Some(period_ms) = self.scheduler.plan(now_ms, next) {
            self.cx.host.set_tick_ms(period_ms);
        }
    }
}
