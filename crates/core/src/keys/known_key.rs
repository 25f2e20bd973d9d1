//! A found key with what each of its requests needs worked out once, when its record
//! arrives: not on every request.
use crate::keys::record::{KeyRecord, RecordLimit};
use crate::limits::bucket::ratelimit_policy;
use crate::limits::buckets;
use crate::quotas::quota::Quota;
use crate::vocabulary::bucket_spec::BucketSpec;
use std::rc::Rc;

/// A found key with what each of its requests needs worked out once.
#[derive(Debug, PartialEq, Eq)]
pub struct KnownKey {
    pub record: KeyRecord,
    /// `record.scopes` as the scopes header carries them.
    pub scopes_header: String,
    /// The token bucket its requests take from; none when the key is unlimited.
    pub limit: Option<KeyLimit>,
    /// The quotas its requests count against; none without `rate_limit_service` or when
    /// the key has none.
    pub quotas: Option<KeyQuotas>,
}

#[derive(Debug, PartialEq, Eq)]
pub struct KeyQuotas {
    pub list: Rc<[Quota]>,
    /// Whose allowance it is (`buckets::owner_id` of the `key_id`).
    pub id: u64,
    /// The `RateLimit-Policy` field of a response counted against them: the bucket's
    /// item, if any, then one per quota.
    pub policy_header: Rc<str>,
}

#[derive(Debug, PartialEq, Eq)]
pub struct KeyLimit {
    pub spec: BucketSpec,
    /// Whose bucket it is (`buckets::owner_id` of the `key_id`).
    pub owner: u64,
    /// The `RateLimit-Policy` field of every response.
    pub policy_header: Rc<str>,
}

impl KnownKey {
    /// `configured`: the `rate_limit` of the configuration, for records that name none;
    /// `default_quotas`: `rate_limit_service.default_quotas`, `None` when quotas are off.
    pub fn new(
        record: KeyRecord,
        configured: Option<BucketSpec>,
        default_quotas: Option<&Rc<[Quota]>>,
    ) -> KnownKey {
        let spec = match record.rate_limit {
            RecordLimit::Default => configured,
            RecordLimit::Unlimited => None,
            RecordLimit::Bucket(spec) => Some(spec),
        };
        let quotas = default_quotas
            .map(|defaults| match &record.quotas {
                Some(own) => own.as_slice().into(),
                None => defaults.clone(),
            })
            .filter(|list: &Rc<[Quota]>| !list.is_empty())
            .map(|list| KeyQuotas {
                policy_header: quota_policy(spec, &list).into(),
                list,
                id: buckets::owner_id(&record.key_id),
            });
        KnownKey {
            scopes_header: record.scopes.join(","),
            quotas,
            limit: spec.map(|spec| KeyLimit {
                spec,
                owner: buckets::owner_id(&record.key_id),
                policy_header: ratelimit_policy(spec).into(),
            }),
            record,
        }
    }
}

fn quota_policy(bucket: Option<BucketSpec>, quotas: &[Quota]) -> String {
    let items = bucket
        .map(ratelimit_policy)
        .into_iter()
        .chain(quotas.iter().map(|q| {
            format!(
                "\"{}\";q={};w={}",
                q.item_name(),
                q.requests,
                q.unit.seconds()
            )
        }));
    items.collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIGURED: BucketSpec = BucketSpec {
        requests: 10,
        period_s: 60,
        burst: 20,
    };

    fn record(key_id: &str, rate_limit: RecordLimit) -> KeyRecord {
        KeyRecord {
            scopes: vec!["read".into(), "write".into()],
            rate_limit,
            ..KeyRecord::for_tests(key_id, "team")
        }
    }

    #[test]
    fn works_out_what_requests_need_once() {
        let k = KnownKey::new(record("id-1", RecordLimit::Default), Some(CONFIGURED), None);
        assert_eq!(k.scopes_header, "read,write");
        assert_eq!(
            k.limit,
            Some(KeyLimit {
                spec: CONFIGURED,
                owner: buckets::owner_id("id-1"),
                policy_header: "\"apikey\";q=10;w=60".into(),
            })
        );
    }

    #[test]
    fn the_records_own_limit_wins_over_the_configured_one() {
        let own = BucketSpec {
            requests: 1,
            period_s: 1,
            burst: 1,
        };
        let limit =
            |rate_limit, configured| KnownKey::new(record("k", rate_limit), configured, None).limit;
        assert_eq!(
            limit(RecordLimit::Bucket(own), Some(CONFIGURED)).map(|l| l.spec),
            Some(own)
        );
        assert_eq!(limit(RecordLimit::Unlimited, Some(CONFIGURED)), None);
        assert_eq!(limit(RecordLimit::Default, None), None);
    }
}
