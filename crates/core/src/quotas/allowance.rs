//! A key's quotas as one node keeps them between calls to the rate limit service: the
//! allowance it may still admit without asking, what it admitted and has not reported,
//! and what the service last said. Pure arithmetic: `quotas::store` keeps it in shared
//! data with compare-and-swap, so every worker of the node works on one state.
//!
//! The allowance: after each answer a node may hold, admitted and not yet counted by the
//! service (not reported, in a call, lent to a worker, or still to admit), at most
//! `min(left / SHARE_DIVISOR, 2 × recent + MIN_ALLOWANCE)` requests, where `left` is the
//! smallest `limit_remaining` the service answered (the smallest quota when it answers no
//! statuses) and `recent` what the node admitted in the current or the last
//! `sync_interval_ms`, whichever is more. Every call reports what the node admitted: the
//! tick's report, due an interval after the node's last call once half of what it holds
//! is admitted (at least every `REPORT_EVERY_INTERVALS`), and a request that finds the
//! allowance spent carries it in its own call, while the requests arriving before its
//! answer are admitted up to the tenth (`may_overdraw`) instead of each calling. So a node
//! holds about two intervals of its own traffic, never more than a tenth of what is left,
//! and nothing once fewer than `SHARE_DIVISOR` requests are left: then every request
//! asks. Across M nodes at most `N + Σ allowances` pass in a window.
//!
//! Workers borrow a share of the node's allowance (`Decision::Admit { lent }`) and admit
//! from it without touching shared data; what they admitted is settled on their tick or
//! when they borrow again.
use crate::quotas::quota::Quota;
use crate::quotas::rls::RlsVerdict;
use crate::storage::bytes::Reader;

/// A node takes at most this fraction of what is left of a quota as its allowance.
pub const SHARE_DIVISOR: u32 = 10;
/// An allowance is at least this (within a tenth of what is left), so that a key of low
/// traffic is reported in batches, not request by request.
pub const MIN_ALLOWANCE: u32 = 32;
/// A worker borrows this fraction of the node's allowance at a time, to admit from
/// without touching shared data.
pub const WORKER_SHARE: u32 = 2;
/// A node reports a key at least every this many intervals while it has admitted any;
/// sooner once half of what it may hold is admitted.
pub const REPORT_EVERY_INTERVALS: u64 = 10;
/// After a failed call, the node makes no call for the key for this long.
pub const PAUSE_MS: u64 = 1_000;

const FORMAT_VERSION: u8 = 1;

/// What the service last said of one quota.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Known {
    pub remaining: u32,
    pub resets_at_ms: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QuotaState {
    /// Whose state it is (`buckets::owner_id` of the `key_id`).
    pub key: u64,
    /// Requests the node may still admit without asking.
    pub grant: u32,
    /// Admitted, not reported yet.
    pub spent: u32,
    /// Admitted, in a report now.
    pub reporting: u32,
    /// Admitted, carried in requests' own calls now.
    pub asking: u32,
    /// Lent to workers, to admit from on their own; settled when they come back.
    pub lent: u32,
    /// A worker is reporting until then (its call's timeout and a margin).
    pub claim_until_ms: u64,
    pub last_report_ms: u64,
    /// A quota is spent: requests are refused until then without asking.
    pub blocked_until_ms: u64,
    /// The service failed: no call until then; `failure_mode` answers meanwhile.
    pub failing_until_ms: u64,
    /// No allowance until then: every request asks. Set when the service says a quota is
    /// over without saying what is left (Limitador), for the rest of the key's longest
    /// window: a report refused whole is not counted, and more allowances would let the
    /// node pass requests the service never counts.
    pub asks_until_ms: u64,
    /// Requests the node admitted in the interval that started at `interval_started_ms`,
    /// and in the one before: its recent traffic, which sizes the allowance.
    pub admitted_now: u32,
    pub admitted_before: u32,
    pub interval_started_ms: u64,
    /// Per quota, in the key's order, as last answered; empty without statuses.
    pub known: Vec<Known>,
}

/// How the node uses the service (`rate_limit_service`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mode {
    /// 0: the exact mode, every request asks.
    pub sync_interval_ms: u64,
    /// `failure_mode` open.
    pub failure_open: bool,
}

impl Mode {
    fn exact(self) -> bool {
        self.sync_interval_ms == 0
    }
}

/// What to do with a request that has quotas.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Admitted from the node's allowance; `lent` more lent to the worker, to admit
    /// from on its own (see `settle`).
    Admit { lent: u32 },
    /// Ask the service for this request, carrying the requests the node admitted
    /// unasked since its last call (taken out of `spent`; given back if the call fails),
    /// so that no node holds more unreported requests than one allowance.
    Ask { carried: u32 },
    /// A quota is spent (as last answered).
    Deny { retry_after_s: u64 },
    /// The service is failing and `failure_mode` is open: admitted, to be reported.
    AdmitUnasked,
    /// The service is failing and `failure_mode` is closed.
    Unavailable,
}

/// How an asked request's answer ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checked {
    Admitted,
    Denied { retry_after_s: u64 },
}

impl QuotaState {
    pub fn new(key: u64) -> QuotaState {
        QuotaState {
            key,
            ..QuotaState::default()
        }
    }

    /// A request's decision.
    pub fn decide(&mut self, now_ms: u64, mode: Mode, quotas: &[Quota]) -> Decision {
        let exact = mode.exact();
        if !exact && now_ms < self.blocked_until_ms {
            return Decision::Deny {
                retry_after_s: seconds_until(self.blocked_until_ms, now_ms),
            };
        }
        if !exact && self.grant > 0 {
            self.grant -= 1;
            self.spent = self.spent.saturating_add(1);
            self.count_admitted(1, now_ms, mode);
            let lent = self.grant / WORKER_SHARE;
            self.grant -= lent;
            self.lent = self.lent.saturating_add(lent);
            return Decision::Admit { lent };
        }
        if now_ms < self.failing_until_ms {
            return self.while_failing(now_ms, mode);
        }
        if !exact && self.may_overdraw(quotas, now_ms) {
            self.spent = self.spent.saturating_add(1);
            self.count_admitted(1, now_ms, mode);
            return Decision::Admit { lent: 0 };
        }
        // The exact mode reports what it admitted while the service failed on its tick.
        let carried = if exact {
            0
        } else {
            // This call is the node's report: the next is due an interval later.
            self.last_report_ms = now_ms;
            std::mem::take(&mut self.spent)
        };
        self.asking = self.asking.saturating_add(carried);
        Decision::Ask { carried }
    }

    /// What a request gets while the service fails: with `failure_mode` open it is
    /// admitted and kept to be reported once the service is back.
    fn while_failing(&mut self, now_ms: u64, mode: Mode) -> Decision {
        if !mode.failure_open {
            return Decision::Unavailable;
        }
        self.spent = self.spent.saturating_add(1);
        self.count_admitted(1, now_ms, mode);
        Decision::AdmitUnasked
    }

    /// The answer to one request's own call, which carried `hits` requests (itself and
    /// those `Decision::Ask` carried).
    pub fn on_check(
        &mut self,
        verdict: &RlsVerdict,
        quotas: &[Quota],
        hits: u32,
        now_ms: u64,
        mode: Mode,
    ) -> Checked {
        // What it carried is counted now (or, refused whole, never will be).
        self.asking = self.asking.saturating_sub(hits.saturating_sub(1));
        self.learn(verdict, quotas, now_ms);
        if verdict.over_limit {
            self.grant = 0;
            let Some(retry_after_s) = spent_for_good(verdict, quotas, hits, now_ms) else {
                // The call did not fit whole (what it carried was refused with it), yet
                // the quota is not spent: the request is refused, the key not blocked.
                return Checked::Denied {
                    retry_after_s: retry_after_s(verdict, quotas, now_ms),
                };
            };
            if !mode.exact() {
                self.blocked_until_ms = now_ms + retry_after_s * 1000;
            }
            return Checked::Denied { retry_after_s };
        }
        self.count_admitted(1, now_ms, mode);
        if !mode.exact() {
            self.grant = self.allowance(quotas, now_ms);
        }
        Checked::Admitted
    }

    /// Claims the node's report, when one is due: what it carries (moved to
    /// `reporting`). `hold_ms`: how long the claim keeps others off.
    pub fn claim_report(&mut self, now_ms: u64, interval_ms: u64, hold_ms: u64) -> Option<u32> {
        if now_ms < self.claim_until_ms {
            return None;
        }
        // A claim that ran out without an answer: its hits go out again.
        self.spent = self
            .spent
            .saturating_add(std::mem::take(&mut self.reporting));
        // Due once an interval has passed and half of what the node may hold is
        // admitted (so that the answer brings a new allowance before it runs out), or
        // when the last report is many intervals old.
        let half_used = self.report_wanted();
        let long_ago = now_ms
            >= self
                .last_report_ms
                .saturating_add(interval_ms.saturating_mul(REPORT_EVERY_INTERVALS));
        if self.spent == 0
            || now_ms < self.last_report_ms.saturating_add(interval_ms)
            || !(half_used || long_ago)
            || now_ms < self.failing_until_ms
        {
            return None;
        }
        self.reporting = std::mem::take(&mut self.spent);
        self.claim_until_ms = now_ms + hold_ms;
        self.last_report_ms = now_ms;
        Some(self.reporting)
    }

    /// The answer to the node's report.
    pub fn on_report(&mut self, verdict: &RlsVerdict, quotas: &[Quota], now_ms: u64, mode: Mode) {
        let reported = std::mem::take(&mut self.reporting);
        self.claim_until_ms = 0;
        self.learn(verdict, quotas, now_ms);
        if let Some(retry_after_s) = spent_for_good(verdict, quotas, reported, now_ms) {
            if !mode.exact() {
                self.blocked_until_ms = now_ms + retry_after_s * 1000;
            }
        }
        // Over the limit without knowing what is left (Limitador refuses a report that
        // does not fit whole): ask request by request until an answer says.
        self.grant = if verdict.over_limit || mode.exact() {
            0
        } else {
            self.allowance(quotas, now_ms)
        };
    }

    /// A report failed: its hits go back to be reported later, and the node pauses.
    pub fn on_report_failed(&mut self, now_ms: u64) {
        let reporting = std::mem::take(&mut self.reporting);
        self.spent = self.spent.saturating_add(reporting);
        self.claim_until_ms = 0;
        self.failing_until_ms = now_ms + PAUSE_MS;
    }

    /// A request's own call failed: what it carried goes back, the node pauses, and the
    /// request gets what `failure_mode` says.
    pub fn on_check_failed(&mut self, carried: u32, now_ms: u64, mode: Mode) -> Decision {
        self.give_back(carried);
        self.failing_until_ms = now_ms + PAUSE_MS;
        self.while_failing(now_ms, mode)
    }

    /// A worker brings back what it was lent: `used` admitted (now the node's to report),
    /// `unused` back into the allowance.
    pub fn settle(&mut self, used: u32, unused: u32, now_ms: u64, mode: Mode) {
        self.lent = self.lent.saturating_sub(used.saturating_add(unused));
        self.spent = self.spent.saturating_add(used);
        self.grant = self.grant.saturating_add(unused);
        self.count_admitted(used, now_ms, mode);
    }

    /// Requests a call carried that will never be answered (its request went away):
    /// they are reported later.
    pub fn give_back(&mut self, carried: u32) {
        self.asking = self.asking.saturating_sub(carried);
        self.spent = self.spent.saturating_add(carried);
    }

    /// Half of what the node may hold is admitted unreported: a report would bring a new
    /// allowance before this one runs out.
    pub fn report_wanted(&self) -> bool {
        self.spent > 0 && self.spent >= self.grant
    }

    /// The earliest time `claim_report` can claim a report that is wanted: an interval
    /// after the last one, once no other claim holds and the service is not paused.
    pub fn report_possible_at_ms(&self, interval_ms: u64) -> u64 {
        self.last_report_ms
            .saturating_add(interval_ms)
            .max(self.claim_until_ms)
            .max(self.failing_until_ms)
    }

    /// Nothing here is owed to the service or refused: the slot may go to another key.
    pub fn idle(&self, now_ms: u64) -> bool {
        self.spent == 0
            && self.reporting == 0
            && self.asking == 0
            && self.lent == 0
            && now_ms >= self.blocked_until_ms
            && now_ms >= self.claim_until_ms
    }

    /// `(r, t)` of each quota's RateLimit item: left as last known here, seconds until
    /// its window ends. `None` without statuses.
    pub fn rate_items(&self, quotas: &[Quota], now_ms: u64) -> Option<Vec<(u32, u64)>> {
        let unreported = self.spent.saturating_add(self.reporting);
        rate_items(&self.known, unreported, quotas, now_ms)
    }

    fn learn(&mut self, verdict: &RlsVerdict, quotas: &[Quota], now_ms: u64) {
        let Some(statuses) = &verdict.statuses else {
            self.known.clear();
            if verdict.over_limit {
                let longest = quotas.iter().map(|q| window_left_s(q, now_ms)).max();
                self.asks_until_ms = now_ms + longest.unwrap_or(1) * 1000;
            }
            return;
        };
        self.known = statuses
            .iter()
            .map(|s| Known {
                remaining: s.remaining,
                resets_at_ms: now_ms + s.resets_in_s.unwrap_or(0) * 1000,
            })
            .collect();
    }

    /// Counts `n` requests the node admitted, in the interval they fall in.
    fn count_admitted(&mut self, n: u32, now_ms: u64, mode: Mode) {
        let interval_ms = mode.sync_interval_ms;
        if now_ms >= self.interval_started_ms.saturating_add(interval_ms) {
            let just_before = now_ms < self.interval_started_ms.saturating_add(2 * interval_ms);
            self.admitted_before = if just_before { self.admitted_now } else { 0 };
            self.admitted_now = 0;
            self.interval_started_ms = now_ms;
        }
        self.admitted_now = self.admitted_now.saturating_add(n);
    }

    /// How many more requests the node may admit unasked: at most a tenth of what is
    /// left and about two intervals of its recent traffic, less what it admitted that the
    /// service has not counted yet (not reported, or in calls now).
    fn allowance(&self, quotas: &[Quota], now_ms: u64) -> u32 {
        let recent = self.admitted_now.max(self.admitted_before);
        self.ceiling(quotas, now_ms)
            .min(recent.saturating_mul(2).saturating_add(MIN_ALLOWANCE))
            .saturating_sub(self.uncounted())
    }

    /// The allowance ran out before the answer that brings the next one: while a call
    /// that carries the node's admissions is in flight, a request is admitted up to the
    /// ceiling rather than each making a call of its own. Traffic outgrew the allowance;
    /// the answer sizes the next one to it.
    fn may_overdraw(&self, quotas: &[Quota], now_ms: u64) -> bool {
        let in_flight = self.asking > 0 || self.reporting > 0;
        in_flight && self.uncounted() < self.ceiling(quotas, now_ms)
    }

    /// What the node may hold at most: a tenth of what is left (the smallest quota
    /// without statuses); nothing while every request must ask.
    fn ceiling(&self, quotas: &[Quota], now_ms: u64) -> u32 {
        if now_ms < self.asks_until_ms {
            return 0;
        }
        let left = if self.known.len() == quotas.len() && !quotas.is_empty() {
            self.known.iter().map(|k| k.remaining).min()
        } else {
            quotas.iter().map(|q| q.requests).min()
        };
        left.unwrap_or(0) / SHARE_DIVISOR
    }

    /// Admitted and not counted by the service yet: not reported, in calls now, or lent.
    fn uncounted(&self) -> u32 {
        self.spent
            .saturating_add(self.asking)
            .saturating_add(self.reporting)
            .saturating_add(self.lent)
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(89 + 12 * self.known.len());
        out.push(FORMAT_VERSION);
        out.extend_from_slice(&self.key.to_le_bytes());
        for n in [
            self.grant,
            self.spent,
            self.reporting,
            self.asking,
            self.lent,
            self.admitted_now,
            self.admitted_before,
        ] {
            out.extend_from_slice(&n.to_le_bytes());
        }
        for t in [
            self.claim_until_ms,
            self.last_report_ms,
            self.blocked_until_ms,
            self.failing_until_ms,
            self.asks_until_ms,
            self.interval_started_ms,
        ] {
            out.extend_from_slice(&t.to_le_bytes());
        }
        for k in &self.known {
            out.extend_from_slice(&k.remaining.to_le_bytes());
            out.extend_from_slice(&k.resets_at_ms.to_le_bytes());
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Option<QuotaState> {
        let mut r = Reader(bytes);
        if r.u8()? != FORMAT_VERSION {
            return None;
        }
        let mut state = QuotaState {
            key: r.u64()?,
            grant: r.u32()?,
            spent: r.u32()?,
            reporting: r.u32()?,
            asking: r.u32()?,
            lent: r.u32()?,
            admitted_now: r.u32()?,
            admitted_before: r.u32()?,
            claim_until_ms: r.u64()?,
            last_report_ms: r.u64()?,
            blocked_until_ms: r.u64()?,
            failing_until_ms: r.u64()?,
            asks_until_ms: r.u64()?,
            interval_started_ms: r.u64()?,
            known: Vec::new(),
        };
        while !r.is_done() {
            state.known.push(Known {
                remaining: r.u32()?,
                resets_at_ms: r.u64()?,
            });
        }
        Some(state)
    }
}

/// `(r, t)` of each quota's RateLimit item from what the service last said (`known`) and
/// what was admitted since (`unreported`). `None` without statuses.
pub fn rate_items(
    known: &[Known],
    unreported: u32,
    quotas: &[Quota],
    now_ms: u64,
) -> Option<Vec<(u32, u64)>> {
    if known.len() != quotas.len() || quotas.is_empty() {
        return None;
    }
    let item = |(k, q): (&Known, &Quota)| {
        if now_ms < k.resets_at_ms {
            let left = k.remaining.saturating_sub(unreported);
            (left, seconds_until(k.resets_at_ms, now_ms))
        } else {
            (q.requests, window_left_s(q, now_ms))
        }
    };
    Some(known.iter().zip(quotas).map(item).collect())
}

/// Seconds until the window of `quota` that holds `now_ms` ends, windows aligned on the
/// Unix epoch as envoyproxy/ratelimit aligns them.
pub fn window_left_s(quota: &Quota, now_ms: u64) -> u64 {
    let unit = quota.unit.seconds();
    unit - (now_ms / 1000) % unit
}

/// When an over-limit answer means a quota is spent (not just that the call's hits did
/// not fit): seconds until its window ends. A status over the limit with nothing left
/// says so; without statuses, only a call for one request does.
fn spent_for_good(verdict: &RlsVerdict, quotas: &[Quota], hits: u32, now_ms: u64) -> Option<u64> {
    match &verdict.statuses {
        Some(statuses) => statuses
            .iter()
            .zip(quotas)
            .filter(|(s, _)| s.over_limit && s.remaining == 0)
            .map(|(s, q)| {
                s.resets_in_s
                    .unwrap_or_else(|| window_left_s(q, now_ms))
                    .max(1)
            })
            .max(),
        None => (verdict.over_limit && hits <= 1).then(|| retry_after_s(verdict, quotas, now_ms)),
    }
}

/// A spent quota's `Retry-After`: until its window ends, as the service says; without
/// statuses, until the shortest of the key's windows ends (the service does not say
/// which quota is spent).
fn retry_after_s(verdict: &RlsVerdict, quotas: &[Quota], now_ms: u64) -> u64 {
    let said = verdict.statuses.as_ref().and_then(|statuses| {
        statuses
            .iter()
            .zip(quotas)
            .filter(|(s, _)| s.over_limit)
            .map(|(s, q)| s.resets_in_s.unwrap_or_else(|| window_left_s(q, now_ms)))
            .max()
    });
    said.or_else(|| quotas.iter().map(|q| window_left_s(q, now_ms)).min())
        .unwrap_or(1)
        .max(1)
}

fn seconds_until(at_ms: u64, now_ms: u64) -> u64 {
    at_ms.saturating_sub(now_ms).div_ceil(1000).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quotas::quota::{Per, Unit};
    use crate::quotas::rls::QuotaStatus;

    const BATCHED: Mode = Mode {
        sync_interval_ms: 1_000,
        failure_open: true,
    };
    const EXACT: Mode = Mode {
        sync_interval_ms: 0,
        failure_open: true,
    };
    const CLOSED: Mode = Mode {
        failure_open: false,
        ..BATCHED
    };

    const DAY: Quota = Quota {
        requests: 1000,
        unit: Unit::Day,
        per: Per::Key,
    };

    fn said(over_limit: bool, remaining: u32) -> RlsVerdict {
        RlsVerdict {
            over_limit,
            statuses: Some(vec![QuotaStatus {
                over_limit,
                remaining,
                resets_in_s: Some(600),
            }]),
        }
    }

    fn limitador(over_limit: bool) -> RlsVerdict {
        RlsVerdict {
            over_limit,
            statuses: None,
        }
    }

    /// Admits `n` requests from the node's allowance, taking no share for workers.
    fn admit_n(s: &mut QuotaState, n: u32, now_ms: u64) {
        for _ in 0..n {
            let lent = match s.decide(now_ms, BATCHED, &[DAY]) {
                Decision::Admit { lent } => lent,
                other => panic!("{other:?}"),
            };
            s.settle(0, lent, now_ms, BATCHED);
        }
    }

    #[test]
    fn a_new_key_asks_then_spends_its_allowance_locally() {
        let mut s = QuotaState::new(1);
        assert_eq!(s.decide(0, BATCHED, &[DAY]), Decision::Ask { carried: 0 });
        assert_eq!(
            s.on_check(&said(false, 999), &[DAY], 1, 0, BATCHED),
            Checked::Admitted
        );
        // recent = 1: an allowance of 2 × 1 + MIN_ALLOWANCE.
        assert_eq!(s.grant, 2 + MIN_ALLOWANCE);
        admit_n(&mut s, 2 + MIN_ALLOWANCE, 1);
        assert_eq!(s.spent, 2 + MIN_ALLOWANCE);
        // Spent: the next request's call carries them, and the allowance grows with
        // what the node admitted in this interval.
        assert_eq!(
            s.decide(1, BATCHED, &[DAY]),
            Decision::Ask {
                carried: 2 + MIN_ALLOWANCE
            }
        );
        assert_eq!(s.spent, 0);
        s.on_check(&said(false, 5000), &[DAY], 3 + MIN_ALLOWANCE, 2, BATCHED);
        let admitted = 4 + MIN_ALLOWANCE;
        assert_eq!(s.grant, 2 * admitted + MIN_ALLOWANCE);
    }

    /// A key whose service said `remaining` at 0, and whose allowance was then admitted
    /// whole at `now_ms`.
    fn allowance_spent(remaining: u32, now_ms: u64) -> QuotaState {
        let mut s = QuotaState::new(1);
        s.on_check(&said(false, remaining), &[DAY], 1, 0, BATCHED);
        let grant = s.grant;
        admit_n(&mut s, grant, now_ms);
        s
    }

    #[test]
    fn while_a_call_is_in_flight_a_spent_allowance_is_overdrawn_up_to_the_ceiling() {
        let mut s = allowance_spent(400, 0);
        let held = s.spent;
        assert_eq!(
            s.decide(1, BATCHED, &[DAY]),
            Decision::Ask { carried: held },
            "the first request past the allowance asks, carrying it"
        );
        // Until that answer, the others are admitted without calls of their own, up to
        // a tenth of what is left.
        for _ in held..400 / SHARE_DIVISOR {
            assert_eq!(s.decide(1, BATCHED, &[DAY]), Decision::Admit { lent: 0 });
        }
        assert_eq!(
            s.decide(1, BATCHED, &[DAY]),
            Decision::Ask { carried: 40 - held }
        );
        // While the service fails, `failure_mode` answers, not the ceiling.
        let mut failing = allowance_spent(400, 0);
        assert!(matches!(
            failing.decide(1, CLOSED, &[DAY]),
            Decision::Ask { .. }
        ));
        failing.failing_until_ms = 1_000;
        assert_eq!(failing.decide(2, CLOSED, &[DAY]), Decision::Unavailable);
        // Nothing in flight: a request asks.
        let mut idle = QuotaState::new(1);
        idle.on_check(&said(false, 400), &[DAY], 1, 0, BATCHED);
        idle.grant = 0;
        assert_eq!(
            idle.decide(1, BATCHED, &[DAY]),
            Decision::Ask { carried: 0 }
        );
    }

    #[test]
    fn a_call_that_carries_admissions_is_the_intervals_report() {
        let mut s = allowance_spent(990, 500);
        assert!(matches!(
            s.decide(600, BATCHED, &[DAY]),
            Decision::Ask { .. }
        ));
        s.on_check(&said(false, 900), &[DAY], 36, 610, BATCHED);
        let grant = s.grant;
        admit_n(&mut s, grant, 1_000);
        assert_eq!(s.claim_report(1_000, 1_000, 1_100), None);
        assert_eq!(s.report_possible_at_ms(1_000), 1_600);
        assert!(s.claim_report(1_600, 1_000, 1_100).is_some());
    }

    #[test]
    fn a_worker_borrows_half_and_settles_what_it_used() {
        let mut s = QuotaState::new(1);
        s.grant = 41;
        assert_eq!(s.decide(0, BATCHED, &[DAY]), Decision::Admit { lent: 20 });
        assert_eq!((s.grant, s.lent, s.spent), (20, 20, 1));
        // It admitted 7 of the 20 on its own and gives the rest back.
        s.settle(7, 13, 0, BATCHED);
        assert_eq!((s.grant, s.lent, s.spent), (33, 0, 8));
        assert_eq!(s.admitted_now, 8);
    }

    #[test]
    fn the_allowance_is_never_more_than_a_tenth_of_what_is_left() {
        let mut s = QuotaState::new(1);
        s.admitted_now = 1_000;
        s.on_check(&said(false, 600), &[DAY], 1, 0, BATCHED);
        assert_eq!(s.grant, 600 / SHARE_DIVISOR);
        // Fewer than SHARE_DIVISOR left: every request asks.
        let mut near = QuotaState::new(1);
        near.on_check(&said(false, 9), &[DAY], 1, 0, BATCHED);
        assert_eq!(near.grant, 0);
        assert_eq!(
            near.decide(0, BATCHED, &[DAY]),
            Decision::Ask { carried: 0 }
        );
    }

    #[test]
    fn without_statuses_the_allowance_is_bounded_by_the_quota() {
        let small = Quota {
            requests: 30,
            ..DAY
        };
        let mut s = QuotaState::new(1);
        s.on_check(&limitador(false), &[small], 1, 0, BATCHED);
        assert_eq!(s.grant, 30 / SHARE_DIVISOR);
        assert_eq!(s.rate_items(&[small], 0), None);
    }

    #[test]
    fn over_limit_refuses_until_the_window_ends_and_exact_mode_keeps_asking() {
        let mut s = QuotaState::new(1);
        let checked = s.on_check(&said(true, 0), &[DAY], 1, 5_000, BATCHED);
        assert_eq!(checked, Checked::Denied { retry_after_s: 600 });
        assert_eq!(
            s.decide(6_000, BATCHED, &[DAY]),
            Decision::Deny { retry_after_s: 599 }
        );
        assert_eq!(
            s.decide(605_000, BATCHED, &[DAY]),
            Decision::Ask { carried: 0 }
        );

        let mut exact = QuotaState::new(1);
        exact.on_check(&said(true, 0), &[DAY], 1, 5_000, EXACT);
        assert_eq!(
            exact.decide(6_000, EXACT, &[DAY]),
            Decision::Ask { carried: 0 }
        );
    }

    #[test]
    fn without_statuses_retry_after_is_the_shortest_window_left() {
        let minute = Quota {
            unit: Unit::Minute,
            ..DAY
        };
        let mut s = QuotaState::new(1);
        let checked = s.on_check(&limitador(true), &[DAY, minute], 1, 61_000, BATCHED);
        assert_eq!(checked, Checked::Denied { retry_after_s: 59 });
    }

    #[test]
    fn a_report_is_due_once_an_interval_passed_and_half_the_allowance_is_admitted() {
        let mut s = QuotaState::new(1);
        s.on_check(&said(false, 990), &[DAY], 1, 0, BATCHED);
        s.last_report_ms = 0;
        let held = s.grant;
        admit_n(&mut s, held / 2 - 1, 0);
        assert_eq!(s.claim_report(1_000, 1_000, 1_100), None, "less than half");
        admit_n(&mut s, 1, 1_000);
        assert_eq!(s.claim_report(1_000, 1_000, 1_100), Some(held / 2));
        // Claimed: nobody else reports until it lands or its claim runs out.
        admit_n(&mut s, 1, 1_001);
        assert_eq!(s.claim_report(1_050, 1_000, 1_100), None);
        s.on_report(&said(false, 990 - held / 2), &[DAY], 1_100, BATCHED);
        assert_eq!((s.reporting, s.spent), (0, 1));
        // Sized by the busier interval, less the one admitted since the claim.
        let busier = s.admitted_now.max(s.admitted_before);
        assert_eq!(s.grant, 2 * busier + MIN_ALLOWANCE - 1);
        // A key of little traffic is reported every REPORT_EVERY_INTERVALS.
        assert_eq!(s.claim_report(2_000, 1_000, 1_100), None);
        assert_eq!(s.claim_report(11_000, 1_000, 1_100), Some(1));
    }

    #[test]
    fn a_failed_report_keeps_its_hits_for_the_next_and_pauses_calls() {
        let mut s = QuotaState::new(1);
        s.spent = 5;
        assert_eq!(s.claim_report(1_000, 1_000, 1_100), Some(5));
        s.on_report_failed(1_050);
        assert_eq!((s.spent, s.reporting), (5, 0));
        assert_eq!(s.decide(1_100, CLOSED, &[DAY]), Decision::Unavailable);
        assert_eq!(s.decide(1_100, BATCHED, &[DAY]), Decision::AdmitUnasked);
        assert_eq!(s.claim_report(2_000, 1_000, 1_100), None, "paused");
        assert_eq!(s.claim_report(2_100, 1_000, 1_100), Some(6));
    }

    #[test]
    fn a_claim_that_runs_out_gives_its_hits_back() {
        let mut s = QuotaState::new(1);
        s.spent = 3;
        s.claim_report(1_000, 1_000, 1_100);
        assert_eq!(s.claim_report(2_100, 1_000, 1_100), Some(3));
    }

    #[test]
    fn a_report_over_the_limit_stops_the_allowance() {
        let mut s = QuotaState::new(1);
        s.spent = 50;
        s.claim_report(1_000, 1_000, 1_100);
        s.on_report(&limitador(true), &[DAY], 1_050, BATCHED);
        assert_eq!(s.grant, 0);
        assert_eq!(
            s.decide(1_060, BATCHED, &[DAY]),
            Decision::Ask { carried: 0 }
        );
        // A status that says the quota is spent refuses at once.
        s.spent = 1;
        s.claim_report(3_000, 1_000, 1_100);
        s.on_report(&said(true, 0), &[DAY], 3_050, BATCHED);
        assert!(matches!(
            s.decide(3_060, BATCHED, &[DAY]),
            Decision::Deny { .. }
        ));
    }

    #[test]
    fn without_statuses_a_quota_over_stops_allowances_for_the_longest_window() {
        let minute = Quota {
            unit: Unit::Minute,
            ..DAY
        };
        let mut s = QuotaState::new(1);
        s.spent = 5;
        assert_eq!(s.claim_report(1_000, 1_000, 1_100), Some(5));
        // Limitador refuses a report that does not fit whole, and counts none of it.
        s.on_report(&limitador(true), &[minute, DAY], 1_050, BATCHED);
        // An answer that admits one request grants nothing until the day is over.
        s.on_check(&limitador(false), &[minute, DAY], 1, 70_000, BATCHED);
        assert_eq!(s.grant, 0);
        assert_eq!(
            s.decide(70_000, BATCHED, &[DAY]),
            Decision::Ask { carried: 0 }
        );
        s.on_check(&limitador(false), &[minute, DAY], 1, 86_400_100, BATCHED);
        assert!(s.grant > 0);
    }

    #[test]
    fn rate_items_subtract_what_was_spent_since_the_answer() {
        let mut s = QuotaState::new(1);
        s.on_check(&said(false, 100), &[DAY], 1, 0, BATCHED);
        admit_n(&mut s, 2, 0);
        assert_eq!(s.rate_items(&[DAY], 1_000), Some(vec![(98, 599)]));
        // Past the window: a new one, as far as this node knows.
        assert_eq!(
            s.rate_items(&[DAY], 600_000),
            Some(vec![(1000, 86_400 - 600)])
        );
    }

    #[test]
    fn round_trips_and_refuses_garbage() {
        let mut s = QuotaState::new(42);
        s.on_check(&said(false, 100), &[DAY], 1, 7, BATCHED);
        s.spent = 3;
        assert_eq!(QuotaState::decode(&s.encode()), Some(s.clone()));
        let bytes = s.encode();
        assert_eq!(QuotaState::decode(&bytes[..bytes.len() - 1]), None);
        assert_eq!(QuotaState::decode(&[]), None);
        assert_eq!(QuotaState::decode(&[9; 80]), None);
    }

    /// Several nodes, one service, any order of requests, answers and reports: never
    /// more than `N + M × ⌊N / 10⌋` pass in the window (README "Quotas").
    mod fleet {
        use super::*;
        use proptest::prelude::*;

        const N: u32 = 60;
        const QUOTA: Quota = Quota {
            requests: N,
            unit: Unit::Day,
            per: Per::Key,
        };

        /// The service: Limitador refuses a call that does not fit whole and counts none
        /// of it; envoyproxy/ratelimit counts every hit.
        struct Service {
            counted: u32,
            counts_refused: bool,
            statuses: bool,
        }

        impl Service {
            fn answer(&mut self, hits: u32) -> RlsVerdict {
                let fits = self.counted + hits <= N;
                if fits || self.counts_refused {
                    self.counted += hits;
                }
                let over_limit = !fits;
                let remaining = N.saturating_sub(self.counted);
                RlsVerdict {
                    over_limit,
                    statuses: self.statuses.then(|| {
                        vec![QuotaStatus {
                            over_limit,
                            remaining,
                            resets_in_s: Some(3600),
                        }]
                    }),
                }
            }
        }

        enum Call {
            Check { node: usize, hits: u32 },
            Report { node: usize },
        }

        #[derive(Debug, Clone)]
        enum Event {
            /// A request on (node, worker).
            Request(usize, usize),
            Answer(usize),
            Tick(usize),
            Wait(u64),
        }

        const WORKERS: usize = 2;

        fn event(nodes: usize) -> impl Strategy<Value = Event> {
            prop_oneof![
                6 => (0..nodes, 0..WORKERS).prop_map(|(n, w)| Event::Request(n, w)),
                4 => (0..16usize).prop_map(Event::Answer),
                1 => (0..nodes).prop_map(Event::Tick),
                1 => (1..400u64).prop_map(Event::Wait),
            ]
        }

        /// A worker's share: (left, used).
        type Share = (u32, u32);

        fn run(events: &[Event], nodes: usize, counts_refused: bool, statuses: bool) -> u32 {
            let mut states = vec![QuotaState::new(1); nodes];
            let mut shares: Vec<[Share; WORKERS]> = vec![[(0, 0); WORKERS]; nodes];
            let mut service = Service {
                counted: 0,
                counts_refused,
                statuses,
            };
            let mut calls: Vec<Call> = Vec::new();
            let (mut now, mut passed) = (0u64, 0u32);
            for e in events {
                match *e {
                    Event::Request(node, worker) => {
                        let share = &mut shares[node][worker];
                        if share.0 > 0 {
                            // From the worker's own share (pipeline::quotas).
                            share.0 -= 1;
                            share.1 += 1;
                            passed += 1;
                            continue;
                        }
                        let used = std::mem::take(&mut share.1);
                        states[node].settle(used, 0, now, BATCHED);
                        match states[node].decide(now, BATCHED, &[QUOTA]) {
                            Decision::Admit { lent } => {
                                *share = (lent, 0);
                                passed += 1;
                            }
                            Decision::AdmitUnasked => passed += 1,
                            Decision::Ask { carried } => calls.push(Call::Check {
                                node,
                                hits: carried + 1,
                            }),
                            Decision::Deny { .. } | Decision::Unavailable => {}
                        }
                    }
                    Event::Answer(i) if !calls.is_empty() => match calls.remove(i % calls.len()) {
                        Call::Check { node, hits } => {
                            let verdict = service.answer(hits);
                            let checked =
                                states[node].on_check(&verdict, &[QUOTA], hits, now, BATCHED);
                            passed += u32::from(checked == Checked::Admitted);
                        }
                        Call::Report { node } => {
                            let verdict = service.answer(states[node].reporting);
                            states[node].on_report(&verdict, &[QUOTA], now, BATCHED);
                        }
                    },
                    Event::Answer(_) => {}
                    Event::Tick(node) => {
                        // The worker keeps the rest of its share (pipeline::quotas).
                        for share in shares[node].iter_mut() {
                            let used = std::mem::take(&mut share.1);
                            states[node].settle(used, 0, now, BATCHED);
                        }
                        if states[node].claim_report(now, 1_000, 60_000).is_some() {
                            calls.push(Call::Report { node });
                        }
                    }
                    Event::Wait(ms) => now += ms,
                }
            }
            passed
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(400))]
            #[test]
            fn never_more_than_n_plus_each_nodes_tenth(
                nodes in 1..4usize,
                counts_refused: bool,
                statuses: bool,
                events in proptest::collection::vec(event(3), 0..400),
            ) {
                let events: Vec<Event> = events
                    .into_iter()
                    .map(|e| match e {
                        Event::Request(n, w) => Event::Request(n % nodes, w),
                        Event::Tick(n) => Event::Tick(n % nodes),
                        other => other,
                    })
                    .collect();
                let passed = run(&events, nodes, counts_refused, statuses);
                prop_assert!(passed <= N + nodes as u32 * (N / SHARE_DIVISOR), "{passed}");
            }
        }
    }
}
