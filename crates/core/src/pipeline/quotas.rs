//! Quotas (CONTRACT "Quotas"), worker by worker. On the request path a key with quotas is
//! admitted from the node's allowance (`quotas::allowance`, in shared data) or, when it
//! has none, asks the rate limit service in a call of its own and waits for the answer.
//! Off the request path, on its tick, a worker reports what the node admitted unasked,
//! for each key it admitted some of: one report per key per interval for the whole node,
//! claimed in the key's shared state, and the answer sets the next allowance.
use super::context::{Context, LEASE_MARGIN_MS};
use super::ports::{Clock, GrpcCall, Host, RequestIo, SharedStore, Stats};
use super::request::{admit, log_key, refuse, Handled, RateHeaders, Request};
use super::stats::{Counter, Histogram, RlsFailureKind};
use crate::config::Config;
use crate::flights::coordinator::Message;
use crate::keys::cache::Cached;
use crate::keys::known_key::{KeyQuotas, KnownKey};
use crate::quotas::allowance::{
    rate_items, window_left_s, Checked, Decision, Known, QuotaState, MIN_ALLOWANCE,
    REPORT_EVERY_INTERVALS,
};
use crate::quotas::quota::Quota;
use crate::quotas::rls::{self, RlsAnswer, RlsFailure, RlsVerdict};
use crate::quotas::rls_messages;
use crate::quotas::store;
use crate::request::denial::Denial;
use crate::storage::slots::Table;
use crate::vocabulary::key_hash::KeyHash;
use std::collections::HashMap;
use std::rc::Rc;

/// `(r, t)` of each quota's RateLimit item; `None` when the service sends no statuses.
type Items = Option<Vec<(u32, u64)>>;

pub enum QuotaStep {
    Admitted(Items),
    /// No allowance: the service must be asked for this request, and told of `carried`
    /// requests the node admitted unasked.
    Ask {
        carried: u32,
    },
    Refused(Refusal),
}

/// Why a request is refused for its quotas, and what its answer tells.
pub struct Refusal {
    denial: Denial,
    retry_after_s: Option<u64>,
    items: Items,
}

impl Refusal {
    fn spent(retry_after_s: u64, items: Items) -> Refusal {
        Refusal {
            denial: Denial::QuotaExceeded,
            retry_after_s: Some(retry_after_s),
            items,
        }
    }

    fn unavailable() -> Refusal {
        Refusal {
            denial: Denial::RateLimitServiceUnavailable,
            retry_after_s: None,
            items: None,
        }
    }
}

/// How a gRPC call ended, as the host delivers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrpcOutcome {
    /// A response message of this size.
    Message(usize),
    /// Closed with this gRPC status, without a message.
    Closed(u32),
    /// Taken by the host but never sent (a host that sends calls later, from another
    /// thread, and found no such cluster).
    NotSent,
}

/// A request that must ask the rate limit service: its RateLimit fields so far (its
/// bucket's), and the requests its call carries besides itself.
#[derive(Debug, PartialEq, Eq)]
pub struct QuotaAsk {
    pub rate_headers: Option<RateHeaders>,
    pub carried: u32,
}

/// A share of the node's allowance for a key that this worker admits from on its own.
struct Lent {
    left: u32,
    used: u32,
    /// What the node knew of the quotas when it lent the share, and what it had admitted
    /// unreported: the RateLimit items of the requests admitted from it.
    known: Vec<Known>,
    unreported: u32,
    lent_at_ms: u64,
}

/// A key this worker admitted requests of, for its tick.
struct Unreported {
    known: Rc<KnownKey>,
    /// The node's state asked for a report when this worker last saw it.
    due: bool,
    /// When the tick last looked at the key.
    visited_ms: u64,
}

/// A call to the rate limit service in flight.
enum QuotaCall {
    /// A request's own call, for itself.
    Check(Check),
    /// The node's report of what it admitted unasked.
    Report {
        known: Rc<KnownKey>,
        hits: u32,
        sent_at_ms: u64,
    },
}

/// A request's own call to the rate limit service, for itself.
pub struct Check {
    pub context_id: u32,
    pub request: Request,
    pub known: Rc<KnownKey>,
    ask: QuotaAsk,
    sent_at_ms: u64,
}

/// A request's own call, answered (or failed).
pub struct CheckAnswered {
    pub check: Check,
    answer: RlsAnswer,
}

/// How counting a request against its quotas went.
pub enum Counted {
    Decided(Handled),
    /// It waits for its own call, `token`, to be answered.
    Asking {
        token: u32,
    },
}

/// The quotas desk: this worker's calls to the rate limit service, the keys it admitted
/// requests of unasked, and its shares of the node's allowances.
#[derive(Default)]
pub struct Quotas {
    /// Calls to the rate limit service in flight, by token.
    calls: HashMap<u32, QuotaCall>,
    /// Keys with quotas this worker admitted requests of unasked, by quota id: its tick
    /// reports them.
    unreported: HashMap<u64, Unreported>,
    /// When the tick next reports (None: nothing to report).
    report_due_ms: Option<u64>,
    /// Shares of nodes' allowances this worker admits from on its own, by quota id.
    lent: HashMap<u64, Lent>,
}

fn table(config: &Config) -> Table {
    Table::quotas(config.cache.max_entries)
}

fn step_of(stats: &impl Stats, decision: Decision, items: Items) -> QuotaStep {
    match decision {
        Decision::Admit { .. } => {
            stats.count(Counter::QuotaAllowance);
            QuotaStep::Admitted(items)
        }
        Decision::AdmitUnasked => {
            stats.count(Counter::QuotaFailureOpen);
            QuotaStep::Admitted(items)
        }
        Decision::Ask { carried } => QuotaStep::Ask { carried },
        Decision::Deny { retry_after_s } => {
            QuotaStep::Refused(Refusal::spent(retry_after_s, items))
        }
        Decision::Unavailable => QuotaStep::Refused(Refusal::unavailable()),
    }
}

/// The RateLimit fields with one item per quota added: as the service said, else (nothing
/// known yet, or the service failing) what a window grants (nothing on a `spent` refusal)
/// and when it ends.
pub fn with_quota_items(
    bucket: Option<RateHeaders>,
    quotas: &KeyQuotas,
    items: Items,
    spent: bool,
    now_ms: u64,
) -> Option<RateHeaders> {
    let items = items.unwrap_or_else(|| {
        let left = |q: &Quota| if spent { 0 } else { q.requests };
        let unknown = |q: &Quota| (left(q), window_left_s(q, now_ms));
        quotas.list.iter().map(unknown).collect()
    });
    let mut state = bucket.map(|b| b.state).unwrap_or_default();
    for ((left, reset_s), quota) in items.iter().zip(quotas.list.iter()) {
        if !state.is_empty() {
            state.push_str(", ");
        }
        state.push('"');
        state.push_str(quota.per.name());
        state.push('-');
        state.push_str(quota.unit.name());
        state.push_str("\";r=");
        crate::vocabulary::decimal::push(&mut state, u64::from(*left));
        state.push_str(";t=");
        crate::vocabulary::decimal::push(&mut state, *reset_s);
    }
    Some(RateHeaders {
        policy: quotas.policy_header.clone(),
        state,
    })
}

/// Answers a request refused for its quotas.
pub fn refuse_quota(
    host: &(impl Clock + SharedStore + Stats),
    io: &mut impl RequestIo,
    request: &Request,
    quotas: &KeyQuotas,
    bucket: Option<RateHeaders>,
    refusal: Refusal,
) {
    let headers = match refusal.denial {
        Denial::QuotaExceeded => {
            with_quota_items(bucket, quotas, refusal.items, true, request.now_ms)
        }
        _ => bucket,
    };
    let retry_after = refusal.retry_after_s.map(|s| s.to_string());
    let mut extra = Vec::with_capacity(3);
    if let Some(retry_after) = &retry_after {
        extra.push(("retry-after", retry_after.as_str()));
    }
    if let Some(headers) = &headers {
        extra.extend(headers.fields());
    }
    log_key(io, request);
    refuse(host, io, &request.config, refusal.denial, &extra);
}

impl Quotas {
    /// When the tick next reports.
    pub fn report_due_ms(&self) -> Option<u64> {
        self.report_due_ms
    }

    /// Counts a request against its key's quotas: from this worker's share of the node's
    /// allowance (no shared data), else from the node's allowance, else by asking the
    /// service.
    pub fn count<H: Host>(
        &mut self,
        cx: &mut Context<H>,
        context_id: u32,
        io: &mut impl RequestIo,
        request: Request,
        known: Rc<KnownKey>,
        rate_headers: Option<RateHeaders>,
    ) -> Counted {
        let config = request.config.clone();
        let (Some(service), Some(quotas)) = (&config.rate_limit_service, &known.quotas) else {
            // Callers count only keys with quotas under a service: never left unanswered.
            let denial = Denial::RateLimitServiceUnavailable;
            refuse(&cx.host, io, &config, denial, &[]);
            return Counted::Decided(Handled::Answered);
        };
        let now_ms = request.now_ms;
        if let Some(items) = self.admit_lent(quotas, now_ms) {
            cx.host.count(Counter::QuotaAllowance);
            admit(&cx.host, io, &request, &known);
            let fields = with_quota_items(rate_headers, quotas, items, false, now_ms);
            return Counted::Decided(Handled::Forward(fields));
        }
        // This worker's share is used up: it is settled, and the node decides.
        let used = match self.lent.is_empty() {
            true => 0,
            false => self.lent.remove(&quotas.id).map_or(0, |l| l.used),
        };
        let mode = service.mode();
        let interval_ms = service.report_interval_ms();
        let decided = store::update(&cx.host, table(&config), quotas.id, now_ms, |state| {
            state.settle(used, 0, now_ms, mode);
            let decision = state.decide(now_ms, mode, &quotas.list);
            let unreported = state.spent.saturating_add(state.reporting);
            let report_at = state
                .report_wanted()
                .then(|| state.report_possible_at_ms(interval_ms));
            (decision, state.known.clone(), unreported, report_at)
        });
        let Some((decision, known_now, unreported, report_at)) = decided else {
            // No slot for the key (the table is busy): it asks, request by request.
            self.give_back_used(quotas.id, used, 0);
            let ask = QuotaAsk {
                rate_headers,
                carried: 0,
            };
            return self.ask(cx, context_id, io, request, known, ask);
        };
        if report_at.is_some() {
            self.note_unreported(cx, &request.key_hash, &known, report_at);
        }
        let items = rate_items(&known_now, unreported, &quotas.list, now_ms);
        if let Decision::Admit { lent } = decision {
            if lent > 0 {
                let share = Lent {
                    left: lent,
                    used: 0,
                    known: known_now,
                    unreported,
                    lent_at_ms: now_ms,
                };
                self.lent.insert(quotas.id, share);
            }
        }
        match step_of(&cx.host, decision, items) {
            QuotaStep::Admitted(items) => {
                admit(&cx.host, io, &request, &known);
                let fields = with_quota_items(rate_headers, quotas, items, false, now_ms);
                Counted::Decided(Handled::Forward(fields))
            }
            QuotaStep::Ask { carried } => {
                let ask = QuotaAsk {
                    rate_headers,
                    carried,
                };
                self.ask(cx, context_id, io, request, known, ask)
            }
            QuotaStep::Refused(refusal) => {
                refuse_quota(&cx.host, io, &request, quotas, rate_headers, refusal);
                Counted::Decided(Handled::Answered)
            }
        }
    }

    /// One request from this worker's share of the node's allowance: its RateLimit items.
    fn admit_lent(&mut self, quotas: &KeyQuotas, now_ms: u64) -> Option<Items> {
        if self.lent.is_empty() {
            return None;
        }
        let share = self
            .lent
            .get_mut(&quotas.id)
            .filter(|share| share.left > 0)?;
        share.left -= 1;
        share.used += 1;
        let unreported = share.unreported.saturating_add(share.used);
        Some(rate_items(&share.known, unreported, &quotas.list, now_ms))
    }

    /// Sends a request's own call about its quotas; it is decided at once when the call
    /// could not be sent.
    fn ask<H: Host>(
        &mut self,
        cx: &mut Context<H>,
        context_id: u32,
        io: &mut impl RequestIo,
        request: Request,
        known: Rc<KnownKey>,
        ask: QuotaAsk,
    ) -> Counted {
        let now_ms = cx.host.now_ms();
        let hits = ask.carried.saturating_add(1);
        let check = Check {
            context_id,
            request,
            known,
            ask,
            sent_at_ms: now_ms,
        };
        let Some(token) = send_call(&cx.host, &check.request.config, &check.known, hits) else {
            let answered = CheckAnswered {
                check,
                answer: Err(RlsFailure::NotSent),
            };
            return Counted::Decided(self.conclude_check(cx, io, answered));
        };
        self.calls.insert(token, QuotaCall::Check(check));
        Counted::Asking { token }
    }

    /// A request's own call answered (or failed): admits or refuses it.
    pub fn conclude_check<H: Host>(
        &mut self,
        cx: &mut Context<H>,
        io: &mut impl RequestIo,
        answered: CheckAnswered,
    ) -> Handled {
        let CheckAnswered {
            check:
                Check {
                    request,
                    known,
                    ask:
                        QuotaAsk {
                            rate_headers,
                            carried,
                        },
                    ..
                },
            answer,
        } = answered;
        let config = &request.config;
        let (Some(service), Some(quotas)) = (&config.rate_limit_service, &known.quotas) else {
            refuse(
                &cx.host,
                io,
                config,
                Denial::RateLimitServiceUnavailable,
                &[],
            );
            return Handled::Answered;
        };
        let now_ms = cx.host.now_ms();
        let mode = service.mode();
        let step = match answer {
            Ok(verdict) => {
                count_verdict(&cx.host, &verdict);
                let check = |state: &mut QuotaState| {
                    let hits = carried.saturating_add(1);
                    let checked = state.on_check(&verdict, &quotas.list, hits, now_ms, mode);
                    (checked, state.rate_items(&quotas.list, now_ms))
                };
                let (checked, items) =
                    store::update(&cx.host, table(config), quotas.id, now_ms, check)
                        .unwrap_or_else(|| check(&mut QuotaState::new(quotas.id)));
                match checked {
                    Checked::Admitted => QuotaStep::Admitted(items),
                    Checked::Denied { retry_after_s } => {
                        QuotaStep::Refused(Refusal::spent(retry_after_s, items))
                    }
                }
            }
            Err(failure) => {
                count_failure(cx, failure, &known, now_ms);
                let interval_ms = service.report_interval_ms();
                let failing = |state: &mut QuotaState| {
                    let decision = state.on_check_failed(carried, now_ms, mode);
                    (decision, state.report_possible_at_ms(interval_ms))
                };
                let (decision, report_at) =
                    store::update(&cx.host, table(config), quotas.id, now_ms, failing)
                        .unwrap_or_else(|| failing(&mut QuotaState::new(quotas.id)));
                if decision == Decision::AdmitUnasked {
                    self.note_unreported(cx, &request.key_hash, &known, Some(report_at));
                }
                step_of(&cx.host, decision, None)
            }
        };
        match step {
            QuotaStep::Admitted(items) => {
                admit(&cx.host, io, &request, &known);
                let fields = with_quota_items(rate_headers, quotas, items, false, now_ms);
                Handled::Forward(fields)
            }
            QuotaStep::Refused(refusal) => {
                refuse_quota(&cx.host, io, &request, quotas, rate_headers, refusal);
                Handled::Answered
            }
            // A failed call is answered by `failure_mode` (`on_check_failed`), never asked
            // again: refused like the closed mode, should it ever get here.
            QuotaStep::Ask { .. } => {
                let refusal = Refusal::unavailable();
                refuse_quota(&cx.host, io, &request, quotas, rate_headers, refusal);
                Handled::Answered
            }
        }
    }

    /// The answer to call `token`: a report's is taken in here; a request's own is handed
    /// back, for its request.
    pub fn on_grpc_answer<H: Host>(
        &mut self,
        cx: &mut Context<H>,
        token: u32,
        outcome: GrpcOutcome,
    ) -> Option<CheckAnswered> {
        if self.calls.is_empty() {
            return None;
        }
        let call = self.calls.remove(&token)?;
        let (known, sent_at_ms) = match &call {
            QuotaCall::Check(check) => (check.known.clone(), check.sent_at_ms),
            QuotaCall::Report {
                known, sent_at_ms, ..
            } => (known.clone(), *sent_at_ms),
        };
        let descriptors = known.quotas.as_ref().map_or(0, |q| q.list.len());
        let now_ms = cx.host.now_ms();
        let waited_ms = now_ms.saturating_sub(sent_at_ms);
        if outcome != GrpcOutcome::NotSent {
            cx.host.record(Histogram::RlsLatencyMs, waited_ms);
        }
        let answer = match outcome {
            GrpcOutcome::NotSent => Err(RlsFailure::NotSent),
            GrpcOutcome::Message(size) => {
                let message = (size <= rls::MAX_ANSWER_BYTES).then(|| cx.host.grpc_message(size));
                rls::classify(message.as_deref(), descriptors)
            }
            GrpcOutcome::Closed(status) => {
                let timeout_ms = cx
                    .config()
                    .and_then(|c| c.rate_limit_service.as_ref().map(|r| r.timeout_ms));
                Err(RlsFailure::from_status(
                    status,
                    waited_ms,
                    timeout_ms.unwrap_or(u64::MAX),
                ))
            }
        };
        match call {
            QuotaCall::Check(check) => Some(CheckAnswered { check, answer }),
            QuotaCall::Report { known, hits, .. } => {
                self.on_report_answer(cx, &known, hits, answer);
                None
            }
        }
    }

    /// Remembers a key this worker admitted requests of, so that its tick reports them;
    /// `report_at`: the node's state asks for a report, which can be claimed then. A
    /// worker that leaves the node's duties to another tells it of each new key: its own
    /// tick may not run until its next request.
    pub fn note_unreported<H: Host>(
        &mut self,
        cx: &mut Context<H>,
        key_hash: &KeyHash,
        known: &Rc<KnownKey>,
        report_at: Option<u64>,
    ) {
        let Some(quotas) = &known.quotas else {
            return;
        };
        let new = !self.unreported.contains_key(&quotas.id);
        // The request path's common case, with no host call: nothing new to plan.
        if report_at.is_none() && !new {
            return;
        }
        if let (true, Some(on_duty)) = (new, cx.on_duty) {
            let _ = cx
                .host
                .wake(on_duty, &Message::Unreported(*key_hash).encode());
        }
        let now_ms = cx.host.now_ms();
        self.unreported
            .entry(quotas.id)
            .and_modify(|entry| entry.due = true)
            .or_insert_with(|| Unreported {
                known: known.clone(),
                due: report_at.is_some(),
                visited_ms: now_ms,
            });
        let Some(interval_ms) = cx
            .config()
            .and_then(|c| c.rate_limit_service.as_ref())
            .map(|s| s.report_interval_ms())
        else {
            return;
        };
        // A wanted report is claimed as soon as it can be, not on the next round of the
        // tick: the rest of the allowance lasts about an interval.
        let due_ms = report_at.unwrap_or(now_ms + interval_ms);
        if self.report_due_ms.is_none_or(|planned| due_ms < planned) {
            self.report_due_ms = Some(due_ms);
            cx.wake_by(due_ms);
        }
    }

    /// Another worker admitted requests of `key_hash` unreported: the worker on duty
    /// reports for the node too, from the node's entry of the key, so that the report
    /// does not wait for that worker's next request.
    pub fn on_unreported_elsewhere<H: Host>(&mut self, cx: &mut Context<H>, key_hash: &KeyHash) {
        let now_ms = cx.host.now_ms();
        let Some(configured) = &cx.configured else {
            return;
        };
        let cached = configured.cache.node_wide(&cx.host, key_hash, now_ms);
        let Some(service) = &configured.config.rate_limit_service else {
            return;
        };
        let report_at = now_ms + service.report_interval_ms();
        if let Cached::Hit { known, .. } = cached {
            self.note_unreported(cx, key_hash, &known, Some(report_at));
        }
    }

    /// The tick: reports, for each key this worker admitted requests of, what the node
    /// admitted unasked, when the node's report for the key is due and this worker
    /// claims it.
    pub fn on_tick<H: Host>(&mut self, cx: &mut Context<H>, now_ms: u64) {
        if self.report_due_ms.is_none_or(|due| now_ms < due) {
            return;
        }
        let Some(config) = cx.config().cloned() else {
            return;
        };
        let Some(service) = &config.rate_limit_service else {
            return;
        };
        let interval_ms = service.report_interval_ms();
        let hold_ms = service.timeout_ms + LEASE_MARGIN_MS;
        let mode = service.mode();
        // A share held this long goes back whole, so that none is held for ever.
        let expired_at_ms = now_ms.saturating_sub(interval_ms * REPORT_EVERY_INTERVALS);
        // A key is looked at when its node asked for a report, when this worker admitted
        // a good part of a small allowance from its share since the last tick (so that
        // the node sizes its allowance by what was admitted in the interval, not when
        // shares happen to come back; below that MIN_ALLOWANCE sizes it anyway), and at
        // least every REPORT_EVERY_INTERVALS: a quiet key costs no compare-and-swap.
        let every_ms = interval_ms * REPORT_EVERY_INTERVALS;
        let keys: Vec<Rc<KnownKey>> = self
            .unreported
            .iter()
            .filter(|(id, u)| {
                u.due
                    || self
                        .lent
                        .get(id)
                        .is_some_and(|share| share.used >= MIN_ALLOWANCE / 2)
                    || now_ms >= u.visited_ms.saturating_add(every_ms)
            })
            .map(|(_, u)| u.known.clone())
            .collect();
        let mut next_ms = now_ms + interval_ms;
        for known in keys {
            let Some(quotas) = &known.quotas else {
                continue;
            };
            // What this worker admitted from its share goes to the node, in the same
            // compare-and-swap as the report's claim; it keeps the rest of the share.
            let (used, unused) = self.take_used(quotas.id, expired_at_ms);
            let claimed = store::update(&cx.host, table(&config), quotas.id, now_ms, |s| {
                s.settle(used, unused, now_ms, mode);
                let claim = s.claim_report(now_ms, interval_ms, hold_ms);
                let owes_nothing = s.spent == 0 && s.reporting == 0;
                let wanted_at = (claim.is_none() && s.report_wanted())
                    .then(|| s.report_possible_at_ms(interval_ms));
                (claim, owes_nothing, wanted_at)
            });
            let holds_share = self.lent.contains_key(&quotas.id);
            let wanted_at = claimed.and_then(|(_, _, wanted_at)| wanted_at);
            if let Some(entry) = self.unreported.get_mut(&quotas.id) {
                entry.visited_ms = now_ms;
                entry.due = wanted_at.is_some();
            }
            if let Some(at) = wanted_at {
                next_ms = next_ms.min(at);
            }
            match claimed {
                Some((Some(hits), ..)) => {
                    self.send_report(cx, &config, known.clone(), hits, now_ms)
                }
                // Nothing owed on the node any more, and no share held: done with the key.
                Some((None, true, _)) if !holds_share => {
                    self.unreported.remove(&quotas.id);
                }
                Some(_) => {}
                // The store refused: the share's count stays with this worker.
                None => self.give_back_used(quotas.id, used, unused),
            }
        }
        self.report_due_ms = (!self.unreported.is_empty()).then_some(next_ms);
    }

    /// Takes what this worker admitted from its share of `id`, and the rest of the
    /// share too when it was lent before `expired_at_ms`.
    fn take_used(&mut self, id: u64, expired_at_ms: u64) -> (u32, u32) {
        let Some(share) = self.lent.get_mut(&id) else {
            return (0, 0);
        };
        let used = std::mem::take(&mut share.used);
        share.unreported = share.unreported.saturating_add(used);
        if share.lent_at_ms > expired_at_ms {
            return (used, 0);
        }
        let unused = share.left;
        self.lent.remove(&id);
        (used, unused)
    }

    fn give_back_used(&mut self, id: u64, used: u32, unused: u32) {
        match self.lent.get_mut(&id) {
            Some(share) => share.used += used,
            None if used > 0 || unused > 0 => {
                let share = Lent {
                    left: unused,
                    used,
                    known: Vec::new(),
                    unreported: 0,
                    lent_at_ms: 0,
                };
                self.lent.insert(id, share);
            }
            None => {}
        }
    }

    fn send_report<H: Host>(
        &mut self,
        cx: &mut Context<H>,
        config: &Config,
        known: Rc<KnownKey>,
        hits: u32,
        now_ms: u64,
    ) {
        match send_call(&cx.host, config, &known, hits) {
            Some(token) => {
                let call = QuotaCall::Report {
                    known,
                    hits,
                    sent_at_ms: now_ms,
                };
                self.calls.insert(token, call);
            }
            None => self.on_report_answer(cx, &known, hits, Err(RlsFailure::NotSent)),
        }
    }

    fn on_report_answer<H: Host>(
        &mut self,
        cx: &mut Context<H>,
        known: &KnownKey,
        hits: u32,
        answer: RlsAnswer,
    ) {
        let (Some(config), Some(quotas)) = (cx.config().cloned(), &known.quotas) else {
            return;
        };
        let Some(service) = &config.rate_limit_service else {
            return;
        };
        let now_ms = cx.host.now_ms();
        let mode = service.mode();
        match answer {
            Ok(verdict) => {
                count_verdict(&cx.host, &verdict);
                cx.host.count_n(Counter::QuotaReported, u64::from(hits));
                store::update(&cx.host, table(&config), quotas.id, now_ms, |s| {
                    s.on_report(&verdict, &quotas.list, now_ms, mode)
                });
                if verdict.over_limit {
                    log::debug!(
                        "key {}: report of {hits} requests over the quota",
                        known.record.key_id
                    );
                }
            }
            Err(failure) => {
                count_failure(cx, failure, known, now_ms);
                store::update(&cx.host, table(&config), quotas.id, now_ms, |s| {
                    s.on_report_failed(now_ms)
                });
            }
        }
    }

    /// The node's part of a request's own call whose request is gone: the requests it
    /// carried are counted as the answer says, or given back to be reported.
    pub fn settle_without_request<H: Host>(&mut self, cx: &Context<H>, answered: &CheckAnswered) {
        let Check {
            request,
            known,
            ask,
            ..
        } = &answered.check;
        let config = &request.config;
        let (Some(service), Some(quotas)) = (&config.rate_limit_service, &known.quotas) else {
            return;
        };
        let now_ms = cx.host.now_ms();
        let mode = service.mode();
        store::update(
            &cx.host,
            table(config),
            quotas.id,
            now_ms,
            |state| match &answered.answer {
                Ok(verdict) => {
                    let hits = ask.carried.saturating_add(1);
                    let _ = state.on_check(verdict, &quotas.list, hits, now_ms, mode);
                }
                Err(_) => state.give_back(ask.carried),
            },
        );
    }

    /// A request that ended while its own call was out: the call is dropped, and what it
    /// carried goes back to the node, to be reported.
    pub fn drop_check<H: Host>(&mut self, cx: &Context<H>, token: u32) {
        let Some(QuotaCall::Check(check)) = self.calls.remove(&token) else {
            return;
        };
        if let Some(quotas) = &check.known.quotas {
            let now_ms = cx.host.now_ms();
            let table = table(&check.request.config);
            store::update(&cx.host, table, quotas.id, now_ms, |s| {
                s.give_back(check.ask.carried)
            });
        }
    }
}

/// `ShouldRateLimit` for `hits` requests of `known`'s key, from the context acting now.
fn send_call(host: &impl Host, config: &Config, known: &KnownKey, hits: u32) -> Option<u32> {
    let (Some(service), Some(quotas)) = (&config.rate_limit_service, &known.quotas) else {
        return None;
    };
    let record = &known.record;
    let message = rls::encode_call(
        &service.domain,
        &quotas.list,
        &record.key_id,
        &record.owner,
        hits,
    );
    host.send_grpc(&GrpcCall {
        cluster: &service.cluster,
        service: &rls::grpc_service(&service.cluster),
        service_name: rls_messages::SERVICE,
        method: rls_messages::METHOD,
        message: &message,
        timeout_ms: service.timeout_ms,
    })
}

fn count_verdict(stats: &impl Stats, verdict: &RlsVerdict) {
    stats.count(if verdict.over_limit {
        Counter::RlsOverLimit
    } else {
        Counter::RlsOk
    });
}

fn count_failure<H: Host>(cx: &mut Context<H>, failure: RlsFailure, known: &KnownKey, now_ms: u64) {
    cx.host.count(Counter::RlsError);
    cx.host
        .count(Counter::RlsErrorKind(RlsFailureKind::of(failure)));
    cx.warnings.warn(now_ms, || {
        format!(
            "rate limit service call for key {} failed: {}",
            known.record.key_id,
            failure.describe()
        )
    });
}
