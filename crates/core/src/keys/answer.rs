//! Reading the key service's answer. Only a 200 with a valid record and a 404 are
//! verdicts; everything else is a failure and is never cached.
use crate::keys::record::{parse_record, KeyRecord};

/// Larger answers are not records; they are refused rather than copied in.
pub const MAX_ANSWER_BYTES: usize = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LookupAnswer {
    Found(KeyRecord),
    NotFound,
    Failed(LookupFailure),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LookupFailure {
    /// Envoy refused to send it (e.g. the cluster does not exist).
    NotSent,
    /// Not sent for load: Envoy's own 503 for a cluster over its circuit breaker
    /// (`x-envoy-overloaded`), or the filter's `max_pending` lookups in flight. Anyone
    /// can cause it with made-up keys, so it never opens the gate.
    Overloaded,
    /// No response at all: connection refused or reset.
    Reset,
    /// Envoy answers a timed-out callout with a 504 of its own.
    Timeout,
    Status(u16),
    BadRecord(String),
}

/// A failure's class, for stats (`key_service.error.<kind>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    NotSent,
    Overloaded,
    Reset,
    Timeout,
    Status,
    BadRecord,
}

impl FailureKind {
    pub const ALL: [FailureKind; 6] = [
        FailureKind::NotSent,
        FailureKind::Overloaded,
        FailureKind::Reset,
        FailureKind::Timeout,
        FailureKind::Status,
        FailureKind::BadRecord,
    ];

    pub fn name(self) -> &'static str {
        match self {
            FailureKind::NotSent => "not_sent",
            FailureKind::Overloaded => "overloaded",
            FailureKind::Reset => "reset",
            FailureKind::Timeout => "timeout",
            FailureKind::Status => "status",
            FailureKind::BadRecord => "bad_record",
        }
    }
}

impl LookupFailure {
    pub fn kind(&self) -> FailureKind {
        match self {
            LookupFailure::NotSent => FailureKind::NotSent,
            LookupFailure::Overloaded => FailureKind::Overloaded,
            LookupFailure::Reset => FailureKind::Reset,
            LookupFailure::Timeout => FailureKind::Timeout,
            LookupFailure::Status(_) => FailureKind::Status,
            LookupFailure::BadRecord(_) => FailureKind::BadRecord,
        }
    }

    pub fn describe(&self) -> String {
        match self {
            LookupFailure::NotSent => "could not be sent (does the cluster exist?)".into(),
            LookupFailure::Overloaded => {
                "not sent: the key service cluster or key_service.max_pending is at its limit"
                    .into()
            }
            LookupFailure::Reset => "no response (connection refused or reset)".into(),
            LookupFailure::Timeout => "timed out (504)".into(),
            LookupFailure::Status(s) => format!("answered HTTP {s}"),
            LookupFailure::BadRecord(why) => format!("answered 200 with a bad record: {why}"),
        }
    }
}

/// How Envoy's own 503 begins when it could not reach the key service at all.
const ENVOY_UNREACHABLE: [&[u8]; 2] = [b"upstream connect error", b"no healthy upstream"];

/// A callout answer's `:status` as a number.
pub fn status_code(status: &[u8]) -> Option<u16> {
    std::str::from_utf8(status).ok()?.trim().parse().ok()
}

/// `status` is the callout response's `:status` value, `None` when it had no headers.
/// `body` is `None` when it was longer than `MAX_ANSWER_BYTES` and so not read.
/// `overloaded`: it carried `x-envoy-overloaded` (Envoy's own answer for a cluster over
/// its circuit breaker).
pub fn classify(status: Option<&[u8]>, body: Option<&[u8]>, overloaded: bool) -> LookupAnswer {
    let Some(status) = status else {
        return LookupAnswer::Failed(LookupFailure::Reset);
    };
    if overloaded && status_code(status) == Some(503) {
        return LookupAnswer::Failed(LookupFailure::Overloaded);
    }
    let code = status_code(status);
    let Some(body) = body else {
        let why = format!("an answer of more than {MAX_ANSWER_BYTES} bytes");
        return LookupAnswer::Failed(match code {
            Some(200) => LookupFailure::BadRecord(why),
            Some(other) => LookupFailure::Status(other),
            None => LookupFailure::Reset,
        });
    };
    match code {
        Some(200) => match parse_record(body) {
            Ok(record) => LookupAnswer::Found(record),
            Err(e) => LookupAnswer::Failed(LookupFailure::BadRecord(e.to_string())),
        },
        Some(404) => LookupAnswer::NotFound,
        Some(504) => LookupAnswer::Failed(LookupFailure::Timeout),
        // Envoy answers a refused or reset connection with a 503 of its own.
        Some(503) if ENVOY_UNREACHABLE.iter().any(|p| body.starts_with(p)) => {
            LookupAnswer::Failed(LookupFailure::Reset)
        }
        Some(other) => LookupAnswer::Failed(LookupFailure::Status(other)),
        None => LookupAnswer::Failed(LookupFailure::Reset),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn classify_(status: Option<&[u8]>, body: Option<&[u8]>) -> LookupAnswer {
        classify(status, body, false)
    }

    #[test]
    fn envoy_s_own_overload_answer_is_overloaded() {
        let body = Some(
            &b"upstream connect error or disconnect/reset before headers. reset reason: overflow"[..],
        );
        assert_eq!(
            classify(Some(b"503"), body, true),
            LookupAnswer::Failed(LookupFailure::Overloaded)
        );
        // The key service's own 503 with the header is not Envoy's overload.
        assert_eq!(
            classify(Some(b"200"), Some(br#"{"key_id":"k"}"#), true),
            LookupAnswer::Found(parse_record(br#"{"key_id":"k"}"#).unwrap())
        );
    }

    #[test]
    fn verdicts() {
        assert!(
            matches!(classify_(Some(b"200"), Some(br#"{"key_id":"k"}"#)), LookupAnswer::Found(r) if r.key_id == "k")
        );
        assert_eq!(
            classify_(Some(b"404"), Some(b"whatever")),
            LookupAnswer::NotFound
        );
    }

    #[test]
    fn failures() {
        assert_eq!(
            classify_(None, Some(b"")),
            LookupAnswer::Failed(LookupFailure::Reset)
        );
        assert_eq!(
            classify_(Some(b"504"), Some(b"upstream request timeout")),
            LookupAnswer::Failed(LookupFailure::Timeout)
        );
        assert_eq!(
            classify_(Some(b"503"), Some(b"upstream connect error or disconnect")),
            LookupAnswer::Failed(LookupFailure::Reset)
        );
        assert_eq!(
            classify_(Some(b"500"), Some(b"")),
            LookupAnswer::Failed(LookupFailure::Status(500))
        );
        assert_eq!(
            classify_(Some(b"401"), Some(b"")),
            LookupAnswer::Failed(LookupFailure::Status(401))
        );
        assert_eq!(
            classify_(Some(b"x"), Some(b"")),
            LookupAnswer::Failed(LookupFailure::Reset)
        );
        assert!(matches!(
            classify_(Some(b"200"), Some(b"{\"key_id\": ")),
            LookupAnswer::Failed(LookupFailure::BadRecord(_))
        ));
    }

    #[test]
    fn an_answer_too_large_to_read_is_a_failure_never_a_verdict() {
        assert!(matches!(
            classify_(Some(b"200"), None),
            LookupAnswer::Failed(LookupFailure::BadRecord(why)) if why.contains("65536")
        ));
        assert_eq!(
            classify_(Some(b"404"), None),
            LookupAnswer::Failed(LookupFailure::Status(404))
        );
    }

    #[test]
    fn every_kind_has_its_own_name() {
        let names: std::collections::HashSet<_> =
            FailureKind::ALL.iter().map(|k| k.name()).collect();
        assert_eq!(names.len(), FailureKind::ALL.len());
    }
}
