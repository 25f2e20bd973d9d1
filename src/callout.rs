//! Reading the key service's answer. Only a 200 with a valid record and a 404 are
//! verdicts; everything else is a failure and is never cached.
use crate::record::{parse_record, KeyRecord};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    Found(KeyRecord),
    NotFound,
    Failed(Failure),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// Envoy refused to send it (e.g. the cluster does not exist).
    NotSent,
    /// No response at all: connection refused or reset.
    Reset,
    /// Envoy answers a timed-out callout with a 504 of its own.
    Timeout,
    Status(u16),
    BadRecord(String),
    /// Another worker's lookup of the key, which this one waited for, failed.
    Peer,
}

impl Failure {
    /// Low-cardinality names for stats (`key_service.error.<kind>`).
    pub const KINDS: [&'static str; 6] = [
        "not_sent",
        "reset",
        "timeout",
        "status",
        "bad_record",
        "peer",
    ];

    pub fn kind_index(&self) -> usize {
        match self {
            Failure::NotSent => 0,
            Failure::Reset => 1,
            Failure::Timeout => 2,
            Failure::Status(_) => 3,
            Failure::BadRecord(_) => 4,
            Failure::Peer => 5,
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Failure::NotSent => "could not be sent (does the cluster exist?)".into(),
            Failure::Reset => "no response (connection refused or reset)".into(),
            Failure::Timeout => "timed out (504)".into(),
            Failure::Status(s) => format!("answered HTTP {s}"),
            Failure::BadRecord(why) => format!("answered 200 with a bad record: {why}"),
            Failure::Peer => "failed in another worker's lookup".into(),
        }
    }
}

/// How Envoy's own 503 begins when it could not reach the key service at all.
const ENVOY_UNREACHABLE: [&[u8]; 2] = [b"upstream connect error", b"no healthy upstream"];

/// `status` is the callout response's `:status` value, `None` when it had no headers.
pub fn classify(status: Option<&[u8]>, body: &[u8]) -> Answer {
    let Some(status) = status else {
        return Answer::Failed(Failure::Reset);
    };
    let code = std::str::from_utf8(status)
        .ok()
        .and_then(|s| s.trim().parse::<u16>().ok());
    match code {
        Some(200) => match parse_record(body) {
            Ok(record) => Answer::Found(record),
            Err(e) => Answer::Failed(Failure::BadRecord(e.to_string())),
        },
        Some(404) => Answer::NotFound,
        Some(504) => Answer::Failed(Failure::Timeout),
        // Envoy answers a refused or reset connection with a 503 of its own.
        Some(503) if ENVOY_UNREACHABLE.iter().any(|p| body.starts_with(p)) => {
            Answer::Failed(Failure::Reset)
        }
        Some(other) => Answer::Failed(Failure::Status(other)),
        None => Answer::Failed(Failure::Reset),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts() {
        assert!(
            matches!(classify(Some(b"200"), br#"{"key_id":"k"}"#), Answer::Found(r) if r.key_id == "k")
        );
        assert_eq!(classify(Some(b"404"), b"whatever"), Answer::NotFound);
    }

    #[test]
    fn failures() {
        assert_eq!(classify(None, b""), Answer::Failed(Failure::Reset));
        assert_eq!(
            classify(Some(b"504"), b"upstream request timeout"),
            Answer::Failed(Failure::Timeout)
        );
        assert_eq!(
            classify(Some(b"500"), b""),
            Answer::Failed(Failure::Status(500))
        );
        assert_eq!(
            classify(Some(b"401"), b""),
            Answer::Failed(Failure::Status(401))
        );
        assert_eq!(classify(Some(b"x"), b""), Answer::Failed(Failure::Reset));
        assert!(matches!(
            classify(Some(b"200"), b"{\"key_id\": "),
            Answer::Failed(Failure::BadRecord(_))
        ));
    }
}
