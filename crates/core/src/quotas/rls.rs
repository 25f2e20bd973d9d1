//! The filter's side of the RLS API: a call for a key's quotas, and what an answer means.
use crate::quotas::quota::Quota;
use crate::quotas::rls_messages::{self as rls, code};
use prost::Message;

/// An answer larger than this is not an RLS answer for a few descriptors.
pub const MAX_ANSWER_BYTES: usize = 16 * 1024;
/// How early Envoy's timer may fire by the filter's clock.
const TIMER_SLACK_MS: u64 = 10;
/// gRPC statuses the filter tells apart.
const GRPC_OK: u32 = 0;
const GRPC_DEADLINE_EXCEEDED: u32 = 4;

/// `ShouldRateLimit` for `hits` requests of a key, one descriptor per quota.
pub fn encode_call(
    domain: &str,
    quotas: &[Quota],
    key_id: &str,
    owner: &str,
    hits: u32,
) -> Vec<u8> {
    rls::RateLimitRequest {
        domain: domain.into(),
        descriptors: quotas.iter().map(|q| q.descriptor(key_id, owner)).collect(),
        hits_addend: hits,
    }
    .encode_to_vec()
}

/// `envoy.config.core.v3.GrpcService` naming `cluster`: what the host's gRPC call takes
/// as its target. (A bare cluster name works too, unless its bytes happen to parse as
/// that message.)
#[derive(Clone, PartialEq, ::prost::Message)]
struct GrpcService {
    #[prost(message, optional, tag = "1")]
    envoy_grpc: Option<EnvoyGrpc>,
}

#[derive(Clone, PartialEq, ::prost::Message)]
struct EnvoyGrpc {
    #[prost(string, tag = "1")]
    cluster_name: String,
}

pub fn grpc_service(cluster: &str) -> Vec<u8> {
    GrpcService {
        envoy_grpc: Some(EnvoyGrpc {
            cluster_name: cluster.into(),
        }),
    }
    .encode_to_vec()
}

/// The service's verdict on a call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RlsVerdict {
    pub over_limit: bool,
    /// One per quota, in the call's order; `None` when the service sends none (Limitador)
    /// or not one per descriptor.
    pub statuses: Option<Vec<QuotaStatus>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaStatus {
    pub over_limit: bool,
    pub remaining: u32,
    /// Seconds until the window ends, when the service says.
    pub resets_in_s: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RlsFailure {
    /// The host refused to send the call (no such cluster).
    NotSent,
    /// No answer within `timeout_ms`.
    Timeout,
    /// The call ended with this gRPC status.
    Grpc(u32),
    /// An answer that is not a `RateLimitResponse`, or whose code is neither OK nor
    /// OVER_LIMIT.
    BadAnswer,
}

impl RlsFailure {
    pub fn describe(self) -> String {
        match self {
            RlsFailure::NotSent => "not sent (no such cluster?)".into(),
            RlsFailure::Timeout => "timed out".into(),
            RlsFailure::Grpc(status) => format!("gRPC status {status}"),
            RlsFailure::BadAnswer => "not an RLS answer".into(),
        }
    }

    /// A call that ended with gRPC status `status` and no message, `waited_ms` after it
    /// was sent with `timeout_ms`. Envoy ends a call it timed out with UNAVAILABLE, as it
    /// does one the server refused: the time tells them apart.
    pub fn from_status(status: u32, waited_ms: u64, timeout_ms: u64) -> RlsFailure {
        match status {
            GRPC_OK => RlsFailure::BadAnswer,
            GRPC_DEADLINE_EXCEEDED => RlsFailure::Timeout,
            // Envoy's timer may fire a little before the filter's clock says so.
            _ if waited_ms.saturating_add(TIMER_SLACK_MS) >= timeout_ms => RlsFailure::Timeout,
            _ => RlsFailure::Grpc(status),
        }
    }
}

pub type RlsAnswer = Result<RlsVerdict, RlsFailure>;

/// Reads an answer to a call with `descriptors` quotas: `message` is the response
/// message (`None`: larger than `MAX_ANSWER_BYTES`).
pub fn classify(message: Option<&[u8]>, descriptors: usize) -> RlsAnswer {
    let message = message.ok_or(RlsFailure::BadAnswer)?;
    let answer = rls::RateLimitResponse::decode(message).map_err(|_| RlsFailure::BadAnswer)?;
    let over_limit = match answer.overall_code {
        code::OK => false,
        code::OVER_LIMIT => true,
        _ => return Err(RlsFailure::BadAnswer),
    };
    let statuses = (answer.statuses.len() == descriptors && descriptors > 0).then(|| {
        answer
            .statuses
            .iter()
            .map(|s| QuotaStatus {
                over_limit: s.code == code::OVER_LIMIT,
                remaining: s.limit_remaining,
                resets_in_s: s
                    .duration_until_reset
                    .map(|d| u64::try_from(d.seconds).unwrap_or(0) + u64::from(d.nanos > 0)),
            })
            .collect()
    });
    Ok(RlsVerdict {
        over_limit,
        statuses,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quotas::quota::{Per, Unit};

    fn answer(overall: i32, statuses: Vec<rls::DescriptorStatus>) -> Vec<u8> {
        rls::RateLimitResponse {
            overall_code: overall,
            statuses,
        }
        .encode_to_vec()
    }

    fn status(code: i32, remaining: u32, reset_s: Option<i64>) -> rls::DescriptorStatus {
        rls::DescriptorStatus {
            code,
            current_limit: None,
            limit_remaining: remaining,
            duration_until_reset: reset_s.map(|seconds| rls::Duration { seconds, nanos: 0 }),
        }
    }

    #[test]
    fn a_call_carries_the_domain_the_hits_and_one_descriptor_per_quota() {
        let quotas = [
            Quota {
                requests: 100,
                unit: Unit::Day,
                per: Per::Key,
            },
            Quota {
                requests: 1000,
                unit: Unit::Month,
                per: Per::Owner,
            },
        ];
        let bytes = encode_call("apikey", &quotas, "k_1", "acme", 7);
        let call = rls::RateLimitRequest::decode(bytes.as_slice()).unwrap();
        assert_eq!(call.domain, "apikey");
        assert_eq!(call.hits_addend, 7);
        assert_eq!(call.descriptors.len(), 2);
        assert_eq!(call.descriptors[1].entries[0].value, "acme");
        assert_eq!(
            call.descriptors[1].limit.as_ref().unwrap().unit,
            rls::unit::MONTH
        );
    }

    #[test]
    fn reads_statuses_one_per_quota() {
        let bytes = answer(
            code::OVER_LIMIT,
            vec![
                status(code::OK, 5, Some(30)),
                status(code::OVER_LIMIT, 0, Some(3600)),
            ],
        );
        let verdict = classify(Some(&bytes), 2).unwrap();
        assert!(verdict.over_limit);
        let statuses = verdict.statuses.unwrap();
        assert_eq!(
            statuses[0],
            QuotaStatus {
                over_limit: false,
                remaining: 5,
                resets_in_s: Some(30)
            }
        );
        assert!(statuses[1].over_limit);
    }

    #[test]
    fn statuses_that_do_not_match_the_descriptors_are_none() {
        let bytes = answer(code::OK, vec![status(code::OK, 5, None)]);
        assert_eq!(
            classify(Some(&bytes), 2),
            Ok(RlsVerdict {
                over_limit: false,
                statuses: None
            })
        );
        let limitador = answer(code::OVER_LIMIT, vec![]);
        assert_eq!(
            classify(Some(&limitador), 1),
            Ok(RlsVerdict {
                over_limit: true,
                statuses: None
            })
        );
    }

    #[test]
    fn what_is_not_an_answer_is_a_bad_answer() {
        assert_eq!(
            classify(Some(&[0xff, 0xff, 0xff]), 1),
            Err(RlsFailure::BadAnswer)
        );
        assert_eq!(
            classify(Some(&answer(code::UNKNOWN, vec![])), 1),
            Err(RlsFailure::BadAnswer)
        );
        assert_eq!(classify(None, 1), Err(RlsFailure::BadAnswer));
        assert_eq!(RlsFailure::from_status(4, 10, 100), RlsFailure::Timeout);
        assert_eq!(RlsFailure::from_status(14, 10, 100), RlsFailure::Grpc(14));
        assert_eq!(RlsFailure::from_status(14, 100, 100), RlsFailure::Timeout);
        assert_eq!(RlsFailure::from_status(14, 95, 100), RlsFailure::Timeout);
        assert_eq!(
            RlsFailure::from_status(0, 10, 100),
            RlsFailure::BadAnswer,
            "OK without a message"
        );
    }

    proptest::proptest! {
        #[test]
        fn classify_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300)) {
            let _ = classify(Some(&bytes), 2);
        }
    }
}
