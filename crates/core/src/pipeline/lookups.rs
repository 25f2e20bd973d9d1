//! The lookups desk: asks the key service about keys, once per key for the whole node.
//!
//! A request whose key is not cached is parked on the key's flight; the flight's callout
//! is made by the worker's own context (the root context in proxy-wasm), never by a
//! request: Envoy cancels a callout when the request that made it ends, and routes the
//! answer to the context that made it. Owned by the worker, one callout serves every
//! request waiting on a key even after the client that caused it has gone. Another
//! worker of the node asking for the same key waits on the first one's lease instead.
//!
//! When a flight lands, the desk leaves a `Landing` for the worker: the requests parked
//! on it, and what they get.
use super::context::{failure_of, Context, LEASE_MARGIN_MS};
use super::feed;
use super::ports::{Host, NotSent};
use super::stats::{Counter, Histogram};
use crate::flights::coordinator::{Flights, Message, Start};
use crate::flights::lease::FlightEnd;
use crate::flights::pending;
use crate::keys::answer::{self, classify, LookupAnswer, LookupFailure};
use crate::keys::cache::{BeforeLookup, Cached};
use crate::keys::copies::CopyId;
use crate::keys::entry::Verdict;
use crate::keys::known_key::KnownKey;
use crate::keys::record::KeyRecord;
use crate::vocabulary::key_hash::{fingerprint, hash_hex, KeyHash};
use std::rc::Rc;

/// How a key lookup ended, for the requests parked on it.
pub enum Resolution {
    /// Found, as stored in the node's cache at `.1` (what a refreshed copy is trusted as).
    Known(Rc<KnownKey>, u64),
    Unknown,
    Failed,
    /// Not sent for load: refused whatever `failure_mode` says.
    Overloaded,
}

/// A lookup that landed with requests parked on it: the worker answers them.
pub struct Landing {
    pub parked: Vec<u32>,
    pub resolution: Resolution,
    /// A found key past its TTL, usable if the key service failed.
    pub stale: Option<Rc<KnownKey>>,
}

/// What a lookup keeps while it flies.
struct Lookup {
    /// A found key past its TTL, usable if the key service fails (worked out once per
    /// lookup, not per parked request).
    stale: Option<Rc<KnownKey>>,
    /// Set for a refresh: the copy of the request that started it, to replace.
    refresh: Option<CopyId>,
    /// What the node knew when it was asked for: a tombstone written since, or a new feed
    /// epoch, supersedes its answer.
    asked: Asked,
    /// It counts against `key_service.max_pending` until it ends.
    counted: bool,
}

/// When a lookup was asked for, as the change feed saw it then.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Asked {
    since_ms: u64,
    /// The node's feed epoch (None: no change feed).
    epoch: Option<u32>,
}

#[derive(Default)]
pub struct Lookups {
    flights: Flights<Lookup>,
    landed: Vec<Landing>,
}

impl Lookups {
    /// The lookups that landed with requests parked on them since the last call.
    pub fn take_landed(&mut self) -> Vec<Landing> {
        std::mem::take(&mut self.landed)
    }

    /// When a lookup waiting on another worker's is to be taken over.
    pub fn next_deadline_ms(&self) -> Option<u64> {
        self.flights.next_deadline_ms()
    }

    /// Parks request `context_id` until the key service answers for its key. Requests
    /// for a key already being looked up join that lookup.
    pub fn park<H: Host>(
        &mut self,
        cx: &mut Context<H>,
        context_id: u32,
        key_hash: KeyHash,
        stale: Option<KeyRecord>,
    ) {
        let stale = stale.and_then(|record| {
            let configured = cx.configured.as_ref()?;
            Some(configured.cache.known_key(record))
        });
        let asked = asked(cx, cx.host.now_ms());
        self.ask(cx, key_hash, Some(context_id), lookup(stale, None, asked));
    }

    /// Starts a background lookup of a key in use whose entry is due for a refresh: the
    /// request that found it goes on at once; the answer replaces the entry (and `copy`).
    pub fn refresh<H: Host>(&mut self, cx: &mut Context<H>, key_hash: KeyHash, copy: CopyId) {
        let asked = asked(cx, cx.host.now_ms());
        self.ask(cx, key_hash, None, lookup(None, Some(copy), asked));
    }

    /// Joins the lookup of `key_hash`, asking for a new one if there is none.
    fn ask<H: Host>(
        &mut self,
        cx: &mut Context<H>,
        key_hash: KeyHash,
        parked: Option<u32>,
        lookup: Lookup,
    ) {
        if !self.flights.join(key_hash, parked, || lookup) {
            return;
        }
        // A request cannot own the callout (see the module comment): the worker's own
        // context is woken through its queue to send it.
        let ask = Message::Ask(key_hash).encode();
        let woken = cx.queue.is_some_and(|q| cx.host.wake(q, &ask));
        if !woken {
            let now_ms = cx.host.now_ms();
            cx.warnings.warn(now_ms, || {
                "cannot reach the worker's own context to ask the key service".into()
            });
            self.land(cx, key_hash, Resolution::Failed);
        }
    }

    /// Starts `key_hash`'s queued lookup: asks the key service unless another worker of
    /// the node already is, or has just put the answer in the cache.
    pub fn start<H: Host>(
        &mut self,
        cx: &mut Context<H>,
        key_hash: KeyHash,
        trust_recent_answer: bool,
    ) {
        let Some(config) = cx.config().cloned() else {
            return;
        };
        let me = cx.me();
        let hold_ms = config.key_service.timeout_ms + LEASE_MARGIN_MS;
        let now_ms = cx.host.now_ms();
        let Some(refresh) = self.flights.get(&key_hash).map(|f| f.payload.refresh) else {
            return; // no such lookup
        };
        if !self.flights.is_queued(&key_hash) {
            return; // under way already
        }
        let before = match &cx.configured {
            Some(c) => c
                .cache
                .before_lookup(&cx.host, &key_hash, refresh.is_some(), now_ms),
            None => return,
        };
        match before {
            BeforeLookup::Ask => {}
            BeforeLookup::Paused => {
                cx.host.count(Counter::KeyServicePaused);
                return self.land(cx, key_hash, Resolution::Failed);
            }
            BeforeLookup::Refreshed {
                known,
                stored_at_ms,
            } => return self.land(cx, key_hash, Resolution::Known(known, stored_at_ms)),
        }
        let start =
            self.flights
                .start(&cx.host, key_hash, me, now_ms, hold_ms, trust_recent_answer);
        match start {
            Start::Send => {
                let max_pending = config.key_service.max_pending;
                if !pending::enter(&cx.host, max_pending, now_ms, hold_ms) {
                    let overloaded = LookupAnswer::Failed(LookupFailure::Overloaded);
                    return self.on_answer(cx, key_hash, overloaded);
                }
                if let Some(flight) = self.flights.get_mut(&key_hash) {
                    flight.payload.counted = true;
                }
                if refresh.is_some() {
                    cx.host.count(Counter::CacheRefresh);
                }
                let path = config.key_service.path_for(&hash_hex(&key_hash));
                match cx.send_to_key_service(&config, &path) {
                    Ok(token) => self.flights.sent(key_hash, token),
                    Err(why) => self.on_answer(cx, key_hash, not_sent(why)),
                }
            }
            Start::Wait => {
                cx.host.count(Counter::KeyServiceJoined);
                cx.wake_by(now_ms);
            }
            // The verdict is not in the cache after all (a TTL of 0, or evicted already).
            Start::AlreadyAnswered if !self.answer_from_cache(cx, key_hash) => {
                self.start(cx, key_hash, false)
            }
            Start::AlreadyAnswered | Start::Nothing => {}
        }
    }

    /// Lands `key_hash`'s lookup from the cache if it holds a verdict now.
    fn answer_from_cache<H: Host>(&mut self, cx: &mut Context<H>, key_hash: KeyHash) -> bool {
        let now_ms = cx.host.now_ms();
        let cached = match &cx.configured {
            Some(c) => c.cache.node_wide(&cx.host, &key_hash, now_ms),
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
        self.land(cx, key_hash, resolution);
        true
    }

    /// Another worker's lookup of `key_hash`, which this one waited for, landed.
    pub fn on_peer_landed<H: Host>(
        &mut self,
        cx: &mut Context<H>,
        ended: FlightEnd,
        key_hash: KeyHash,
    ) {
        if !self.flights.is_waiting_on_peer(&key_hash) {
            return;
        }
        match ended {
            FlightEnd::Failed => self.land(cx, key_hash, Resolution::Failed),
            FlightEnd::Overloaded => self.land(cx, key_hash, Resolution::Overloaded),
            FlightEnd::Answered if !self.answer_from_cache(cx, key_hash) => {
                // The verdict may already be gone (a tiny cache, or ttl 0): ask again.
                self.flights.requeue(key_hash);
                self.start(cx, key_hash, false);
            }
            FlightEnd::Answered => {}
        }
    }

    /// Takes over the lookups whose owner in another worker went silent.
    pub fn take_over_overdue<H: Host>(&mut self, cx: &mut Context<H>, now_ms: u64) {
        for key_hash in self.flights.take_over_overdue(now_ms) {
            self.start(cx, key_hash, true);
        }
    }

    /// Callout `token`, if it is one of this desk's, could not be sent after all (a host
    /// that sends callouts later, from another thread). False: not this desk's.
    pub fn on_callout_refused<H: Host>(
        &mut self,
        cx: &mut Context<H>,
        token: u32,
        why: NotSent,
    ) -> bool {
        let Some(key_hash) = self.flights.answered(token) else {
            return false;
        };
        self.on_answer(cx, key_hash, not_sent(why));
        true
    }

    /// The answer to callout `token`, if it is one of this desk's, is being delivered,
    /// with a body of `body_size`. False: not this desk's.
    pub fn on_callout_answer<H: Host>(
        &mut self,
        cx: &mut Context<H>,
        token: u32,
        body_size: usize,
    ) -> bool {
        let Some(key_hash) = self.flights.answered(token) else {
            return false;
        };
        let (status, body) = cx.delivered(body_size, answer::MAX_ANSWER_BYTES);
        let answer = classify(
            status.as_deref(),
            body.as_deref(),
            cx.host.callout_overloaded(),
        );
        self.on_answer(cx, key_hash, answer);
        true
    }

    /// Counts the key service's answer, puts its verdict in the cache, and lands the
    /// lookup.
    fn on_answer<H: Host>(&mut self, cx: &mut Context<H>, key_hash: KeyHash, answer: LookupAnswer) {
        let now_ms = cx.host.now_ms();
        let (asked, counted, sent_at_ms) = match self.flights.get(&key_hash) {
            Some(flight) => (
                Some(flight.payload.asked),
                flight.payload.counted,
                flight.sent_at_ms(),
            ),
            None => (None, false, None),
        };
        if let (true, Some(config)) = (counted, cx.config()) {
            let hold_ms = config.key_service.timeout_ms + LEASE_MARGIN_MS;
            pending::leave(&cx.host, now_ms, hold_ms);
        }
        let answered = !matches!(
            answer,
            LookupAnswer::Failed(LookupFailure::NotSent | LookupFailure::Overloaded)
        );
        if let Some(sent_at_ms) = sent_at_ms.filter(|_| answered) {
            let latency_ms = now_ms.saturating_sub(sent_at_ms);
            cx.host.record(Histogram::KeyServiceLatencyMs, latency_ms);
        }
        if matches!(answer, LookupAnswer::Found(_) | LookupAnswer::NotFound) {
            if let Some(since_ms) = asked.and_then(|asked| superseded(cx, &key_hash, asked)) {
                cx.host.count(Counter::KeyServiceSuperseded);
                return self.ask_again(cx, key_hash, since_ms);
            }
        }
        let Some(configured) = &cx.configured else {
            return self.land(cx, key_hash, Resolution::Failed);
        };
        let (cache, host) = (&configured.cache, &cx.host);
        let resolution = match answer {
            LookupAnswer::Found(record) => {
                host.count(Counter::KeyServiceFound);
                let known = cache.known_key(record.clone());
                cache.store_verdict(host, &key_hash, Verdict::Found(record), now_ms);
                Resolution::Known(known, now_ms)
            }
            LookupAnswer::NotFound => {
                host.count(Counter::KeyServiceNotFound);
                cache.store_verdict(host, &key_hash, Verdict::NotFound, now_ms);
                Resolution::Unknown
            }
            LookupAnswer::Failed(failure) => {
                host.count(Counter::KeyServiceError);
                host.count(Counter::KeyServiceErrorKind(failure.kind()));
                cx.warnings.warn(now_ms, || {
                    format!(
                        "key service lookup for key {} failed: {}",
                        fingerprint(&key_hash),
                        failure.describe()
                    )
                });
                if failure == LookupFailure::Overloaded {
                    // Not the key service's failure: no pause (a paused key is answered
                    // as failed, which `failure_mode` open forwards).
                    Resolution::Overloaded
                } else {
                    cache.record_failure(host, &key_hash, now_ms);
                    Resolution::Failed
                }
            }
        };
        self.land(cx, key_hash, resolution);
    }

    /// The change feed forgot the key while its lookup flew: the answer may predate the
    /// change. The workers that waited read the tombstone and ask again; the requests
    /// parked here stay parked, on a new lookup for changes since `since_ms` (a refresh
    /// is simply dropped).
    fn ask_again<H: Host>(&mut self, cx: &mut Context<H>, key_hash: KeyHash, since_ms: u64) {
        let Some((parked, superseded)) = self.end(cx, key_hash, FlightEnd::Answered) else {
            return;
        };
        let asked = asked(cx, since_ms);
        for context_id in parked {
            let again = lookup(superseded.stale.clone(), None, asked);
            self.ask(cx, key_hash, Some(context_id), again);
        }
    }

    /// Ends `key_hash`'s lookup: releases its lease and wakes the workers that waited for
    /// it, keeps a refreshed copy, and leaves its parked requests to the worker.
    fn land<H: Host>(&mut self, cx: &mut Context<H>, key_hash: KeyHash, resolution: Resolution) {
        let ended = match resolution {
            Resolution::Known(..) | Resolution::Unknown => FlightEnd::Answered,
            Resolution::Failed => FlightEnd::Failed,
            Resolution::Overloaded => FlightEnd::Overloaded,
        };
        let Some((parked, lookup)) = self.end(cx, key_hash, ended) else {
            return;
        };
        if let (Resolution::Known(known, stored_at_ms), Some(copy), Some(configured)) =
            (&resolution, lookup.refresh, cx.configured.as_mut())
        {
            let cache = &mut configured.cache;
            cache.keep_copy(copy, key_hash, *stored_at_ms, known.clone());
        }
        if !parked.is_empty() {
            self.landed.push(Landing {
                parked,
                resolution,
                stale: lookup.stale,
            });
        }
    }

    /// Removes `key_hash`'s flight, releasing its lease and waking the workers that
    /// waited for it: its parked requests and what it kept.
    fn end<H: Host>(
        &mut self,
        cx: &Context<H>,
        key_hash: KeyHash,
        ended: FlightEnd,
    ) -> Option<(Vec<u32>, Lookup)> {
        let now_ms = cx.host.now_ms();
        let (flight, peers) = self
            .flights
            .land(&cx.host, key_hash, cx.me(), ended, now_ms)?;
        let woken = Message::Woken(ended, key_hash).encode();
        for peer in peers {
            let _ = cx.host.wake(peer, &woken);
        }
        Some((flight.parked, flight.payload))
    }
}

fn lookup(stale: Option<Rc<KnownKey>>, refresh: Option<CopyId>, asked: Asked) -> Lookup {
    Lookup {
        stale,
        refresh,
        asked,
        counted: false,
    }
}

fn not_sent(why: NotSent) -> LookupAnswer {
    LookupAnswer::Failed(failure_of(why))
}

/// A lookup asked for now, for changes since `since_ms`.
fn asked<H: Host>(cx: &Context<H>, since_ms: u64) -> Asked {
    Asked {
        since_ms,
        epoch: feed::node_epoch(cx),
    }
}

/// Whether the node forgot the key (the change feed's tombstone, or a new epoch) since
/// the lookup was asked for: then when a new lookup is to look for changes from.
fn superseded<H: Host>(cx: &Context<H>, key_hash: &KeyHash, asked: Asked) -> Option<u64> {
    let now_ms = cx.host.now_ms();
    if asked.epoch.is_some() && asked.epoch != feed::node_epoch(cx) {
        return Some(now_ms);
    }
    let cache = &cx.configured.as_ref()?.cache;
    let forgotten_ms = cache.forgotten_since(&cx.host, key_hash, asked.since_ms)?;
    // A tombstone of the same millisecond must not supersede the new lookup too.
    Some(forgotten_ms.saturating_add(1))
}
