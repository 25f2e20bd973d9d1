//! The filter's stats (CONTRACT "Observability"): one name per counter, in one list that the
//! host defines at start-up and docs/observability.md's table is checked against.
use crate::keys::answer::FailureKind;
use crate::quotas::rls::RlsFailure;
use crate::request::denial::{Denial, CODES};

/// Every stat name starts with this (Envoy shows them as `wasmcustom.apikey_filter.*`).
pub const PREFIX: &str = "apikey_filter.";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counter {
    Allowed,
    Denied(Denial),
    CacheHit,
    CacheMiss,
    CacheNegativeHit,
    CacheStale,
    KeyServiceFound,
    KeyServiceNotFound,
    /// Every failed lookup; each is also counted by its kind.
    KeyServiceError,
    KeyServiceErrorKind(FailureKind),
    /// Lookups that waited for another worker's callout instead of making their own.
    KeyServiceJoined,
    /// Lookups not made because the key's failure pause held.
    KeyServicePaused,
    /// Lookup answers not cached because the change feed forgot the key meanwhile.
    KeyServiceSuperseded,
    /// Panics caught in the dynamic module (its worker is then rebuilt).
    Panics,
    /// Background lookups sent to refresh an entry in use before it expires.
    CacheRefresh,
    ChangesOk,
    ChangesError,
    /// Cache entries the change feed made the node forget.
    ChangesForgotten,
    /// The feed's 410s: the node forgot every entry.
    ChangesReset,
    RateLimitUnavailable,
    FailureOpen,
    /// Calls the rate limit service answered OK.
    RlsOk,
    RlsOverLimit,
    /// Every failed call; each is also counted by its kind.
    RlsError,
    RlsErrorKind(RlsFailureKind),
    /// Requests admitted from the node's allowance, without a call.
    QuotaAllowance,
    /// Requests admitted while the service failed (`rate_limit_service.failure_mode`
    /// open), kept to be reported.
    QuotaFailureOpen,
    /// Requests the node reported to the service after admitting them.
    QuotaReported,
}

/// How a call to the rate limit service failed, as its stats name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RlsFailureKind {
    NotSent,
    Timeout,
    GrpcStatus,
    BadAnswer,
}

impl RlsFailureKind {
    pub const ALL: [RlsFailureKind; 4] = [
        RlsFailureKind::NotSent,
        RlsFailureKind::Timeout,
        RlsFailureKind::GrpcStatus,
        RlsFailureKind::BadAnswer,
    ];

    pub fn of(failure: RlsFailure) -> RlsFailureKind {
        match failure {
            RlsFailure::NotSent => RlsFailureKind::NotSent,
            RlsFailure::Timeout => RlsFailureKind::Timeout,
            RlsFailure::Grpc(_) => RlsFailureKind::GrpcStatus,
            RlsFailure::BadAnswer => RlsFailureKind::BadAnswer,
        }
    }

    fn name(self) -> &'static str {
        match self {
            RlsFailureKind::NotSent => "not_sent",
            RlsFailureKind::Timeout => "timeout",
            RlsFailureKind::GrpcStatus => "grpc_status",
            RlsFailureKind::BadAnswer => "bad_answer",
        }
    }
}

/// The counters that are not one per denial code or failure kind, in index order after
/// `allowed` and the `denied.<code>` ones.
const PLAIN: [(Counter, &str); 24] = [
    (Counter::CacheHit, "cache.hit"),
    (Counter::CacheMiss, "cache.miss"),
    (Counter::CacheNegativeHit, "cache.negative_hit"),
    (Counter::CacheStale, "cache.stale"),
    (Counter::CacheRefresh, "cache.refresh"),
    (Counter::KeyServiceFound, "key_service.found"),
    (Counter::KeyServiceNotFound, "key_service.not_found"),
    (Counter::KeyServiceError, "key_service.error"),
    (Counter::KeyServiceJoined, "key_service.joined"),
    (Counter::KeyServicePaused, "key_service.paused"),
    (Counter::KeyServiceSuperseded, "key_service.superseded"),
    (Counter::ChangesOk, "key_service.changes.ok"),
    (Counter::ChangesError, "key_service.changes.error"),
    (Counter::ChangesForgotten, "key_service.changes.forgotten"),
    (Counter::ChangesReset, "key_service.changes.reset"),
    (Counter::RateLimitUnavailable, "rate_limit.unavailable"),
    (Counter::FailureOpen, "failure_open"),
    (Counter::RlsOk, "rate_limit_service.ok"),
    (Counter::RlsOverLimit, "rate_limit_service.over_limit"),
    (Counter::RlsError, "rate_limit_service.error"),
    (Counter::QuotaAllowance, "quota.allowance"),
    (Counter::QuotaFailureOpen, "quota.failure_open"),
    (Counter::QuotaReported, "quota.reported"),
    (Counter::Panics, "panics"),
];

const DENIED_FROM: usize = 1;
const PLAIN_FROM: usize = DENIED_FROM + CODES.len();
const KINDS_FROM: usize = PLAIN_FROM + PLAIN.len();
/// How many counters there are.
const RLS_KINDS_FROM: usize = KINDS_FROM + FailureKind::ALL.len();
pub const COUNTERS: usize = RLS_KINDS_FROM + RlsFailureKind::ALL.len();

impl Counter {
    /// Its position in `counter_names()`.
    pub fn index(self) -> usize {
        match self {
            Counter::Allowed => 0,
            Counter::Denied(denial) => DENIED_FROM + denial.code_index(),
            Counter::KeyServiceErrorKind(kind) => KINDS_FROM + kind as usize,
            Counter::RlsErrorKind(kind) => RLS_KINDS_FROM + kind as usize,
            plain => {
                PLAIN_FROM
                    + PLAIN
                        .iter()
                        .position(|(c, _)| *c == plain)
                        .unwrap_or_default()
            }
        }
    }
}

/// Every counter's name without the prefix, in index order.
pub fn counter_names() -> Vec<String> {
    let mut names = vec!["allowed".to_string()];
    names.extend(CODES.iter().map(|code| format!("denied.{code}")));
    names.extend(PLAIN.iter().map(|(_, name)| name.to_string()));
    names.extend(
        FailureKind::ALL
            .iter()
            .map(|kind| format!("key_service.error.{}", kind.name())),
    );
    names.extend(
        RlsFailureKind::ALL
            .iter()
            .map(|kind| format!("rate_limit_service.error.{}", kind.name())),
    );
    names
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Histogram {
    KeyServiceLatencyMs,
    RlsLatencyMs,
}

impl Histogram {
    pub const ALL: [Histogram; 2] = [Histogram::KeyServiceLatencyMs, Histogram::RlsLatencyMs];

    pub fn name(self) -> &'static str {
        match self {
            Histogram::KeyServiceLatencyMs => "key_service.latency_ms",
            Histogram::RlsLatencyMs => "rate_limit_service.latency_ms",
        }
    }
}

/// Values set rather than counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gauge {
    /// Seconds since the change feed's last good poll (since the worker started
    /// following it, before one), set on the worker's tick while the feed is on.
    ChangesAgeS,
}

impl Gauge {
    pub const ALL: [Gauge; 1] = [Gauge::ChangesAgeS];

    pub fn name(self) -> &'static str {
        match self {
            Gauge::ChangesAgeS => "key_service.changes.age_s",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn every_counter_has_its_own_name_at_its_index() {
        let names = counter_names();
        assert_eq!(names.len(), COUNTERS);
        let unique: std::collections::HashSet<_> = names.iter().collect();
        assert_eq!(unique.len(), COUNTERS);
        let check = |counter: Counter, name: &str| assert_eq!(names[counter.index()], name);
        check(Counter::Allowed, "allowed");
        check(Counter::Denied(Denial::Missing), "denied.api_key_missing");
        check(Counter::Denied(Denial::Malformed), "denied.api_key_invalid");
        check(
            Counter::Denied(Denial::KeyServiceUnavailable),
            "denied.key_service_unavailable",
        );
        for (counter, name) in PLAIN {
            check(counter, name);
        }
        for kind in FailureKind::ALL {
            check(
                Counter::KeyServiceErrorKind(kind),
                &format!("key_service.error.{}", kind.name()),
            );
        }
    }

    /// docs/observability.md's Observability table names, in its first column, every stat the
    /// filter defines and no other (`denied.<code>` standing for one per code).
    #[test]
    fn the_readme_lists_exactly_the_stats_defined() {
        let listed: BTreeSet<String> = crate::doc_section("observability.md", "Observability")
            .lines()
            .filter(|line| line.starts_with("| `"))
            .flat_map(|row| {
                let first_cell = row.split('|').nth(1).unwrap_or_default().to_string();
                let names: Vec<String> = first_cell
                    .split('`')
                    .skip(1)
                    .step_by(2)
                    .map(str::to_string)
                    .collect();
                names
            })
            .collect();
        let mut defined: BTreeSet<String> = counter_names()
            .into_iter()
            .filter(|name| !name.starts_with("denied."))
            .collect();
        defined.insert("denied.<code>".to_string());
        // per_key_stats: counters named at run time (see `pipeline::per_key`).
        for name in [
            "key.<key_id>.allowed",
            "key.<key_id>.denied",
            "key.other.allowed",
            "key.other.denied",
        ] {
            defined.insert(name.to_string());
        }
        defined.extend(Histogram::ALL.iter().map(|h| h.name().to_string()));
        defined.extend(Gauge::ALL.iter().map(|g| g.name().to_string()));
        assert_eq!(listed, defined);
    }
}
