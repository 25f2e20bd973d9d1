//! The key service's answer for a found key (CONTRACT "Key service protocol").
use crate::quotas::quota::{parse_quotas, Quota};
use crate::vocabulary::bucket_spec::{parse_bucket, BucketSpec};
use crate::vocabulary::cidr::Cidr;
use crate::vocabulary::json_fields::{FieldError, FieldResult, Object};
use crate::vocabulary::referrer::ReferrerPattern;
use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordLimit {
    /// The record names none: the configured `rate_limit` applies.
    Default,
    /// `"rate_limit": null`.
    Unlimited,
    Bucket(BucketSpec),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRecord {
    pub key_id: String,
    pub owner: String,
    pub scopes: Vec<String>,
    pub rate_limit: RecordLimit,
    /// Unix seconds; `None` never expires.
    pub expires_at: Option<i64>,
    pub revoked: bool,
    /// Empty: any client address.
    pub allowed_cidrs: Vec<Cidr>,
    /// Empty: any request.
    pub allowed_referrers: Vec<ReferrerPattern>,
    /// `None`: the record names none, `rate_limit_service.default_quotas` apply.
    pub quotas: Option<Vec<Quota>>,
}

/// Bounds that keep a cache entry small; a record beyond them is a broken key service.
pub const MAX_TEXT_LEN: usize = 256;
pub const MAX_SCOPES: usize = 64;
/// Addresses or referrer patterns a record may list, each.
pub const MAX_RESTRICTIONS: usize = 64;

pub fn parse_record(body: &[u8]) -> FieldResult<KeyRecord> {
    let doc: Value =
        serde_json::from_slice(body).map_err(|e| FieldError::new("", format!("not JSON: {e}")))?;
    let record = Object::new("", &doc)?;
    let key_id = match record.string("key_id")? {
        Some(id) if !id.is_empty() => header_safe("key_id", id)?,
        _ => return Err(FieldError::new("key_id", "must be a non-empty string")),
    };
    let owner = header_safe("owner", record.string("owner")?.unwrap_or(""))?;
    let scopes = record.string_list("scopes")?.unwrap_or_default();
    if scopes.len() > MAX_SCOPES {
        return Err(FieldError::new("scopes", format!("more than {MAX_SCOPES}")));
    }
    for scope in &scopes {
        header_safe("scopes", scope)?;
        if scope.is_empty() || scope.contains(',') {
            return Err(FieldError::new(
                "scopes",
                "a scope must be non-empty, without commas",
            ));
        }
    }
    let rate_limit = match record.value("rate_limit") {
        None => RecordLimit::Default,
        Some(Value::Null) => RecordLimit::Unlimited,
        Some(value) => RecordLimit::Bucket(parse_bucket(&Object::new("rate_limit", value)?)?),
    };
    let expires_at = match record.value("expires_at") {
        None | Some(Value::Null) => None,
        Some(value) => Some(
            value
                .as_i64()
                .ok_or_else(|| FieldError::new("expires_at", "must be whole Unix seconds"))?,
        ),
    };
    Ok(KeyRecord {
        key_id,
        owner,
        scopes,
        rate_limit,
        expires_at,
        revoked: record.bool("revoked")?.unwrap_or(false),
        allowed_cidrs: restriction(&record, "allowed_cidrs", Cidr::parse)?,
        allowed_referrers: restriction(&record, "allowed_referrers", ReferrerPattern::parse)?,
        quotas: match record.value("quotas") {
            None | Some(Value::Null) => None,
            Some(value) => Some(parse_quotas("quotas", value)?),
        },
    })
}

#[cfg(test)]
impl KeyRecord {
    /// A record with `key_id`, `owner` and every other field at its default, for tests.
    pub fn for_tests(key_id: &str, owner: &str) -> KeyRecord {
        KeyRecord {
            key_id: key_id.into(),
            owner: owner.into(),
            scopes: vec![],
            rate_limit: RecordLimit::Default,
            expires_at: None,
            revoked: false,
            allowed_cidrs: vec![],
            allowed_referrers: vec![],
            quotas: None,
        }
    }
}

/// A restriction's list, each item parsed now rather than on every request. A record
/// with one that does not parse is refused (a key service failure), never half-applied.
fn restriction<T>(
    record: &Object,
    field: &str,
    parse: fn(&str) -> Option<T>,
) -> FieldResult<Vec<T>> {
    let items = record.string_list(field)?.unwrap_or_default();
    if items.len() > MAX_RESTRICTIONS {
        return Err(FieldError::new(
            field,
            format!("more than {MAX_RESTRICTIONS}"),
        ));
    }
    items
        .iter()
        .map(|item| {
            parse(item).ok_or_else(|| FieldError::new(field, format!("{item:?} does not parse")))
        })
        .collect()
}

/// Record values become request headers: no control bytes, bounded length.
fn header_safe(field: &str, value: &str) -> FieldResult<String> {
    if value.len() > MAX_TEXT_LEN || value.bytes().any(|b| b < 0x20 || b == 0x7f) {
        return Err(FieldError::new(
            field,
            format!("must be at most {MAX_TEXT_LEN} bytes without control characters"),
        ));
    }
    Ok(value.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> FieldResult<KeyRecord> {
        parse_record(json.as_bytes())
    }

    #[test]
    fn full_record() {
        let r = parse(
            r#"{"key_id": "k_1", "owner": "acme", "scopes": ["orders:read"],
                "rate_limit": {"requests": 10, "period_s": 1, "burst": 20},
                "expires_at": 1767225600, "revoked": false, "colour": "ignored"}"#,
        )
        .unwrap();
        assert_eq!(
            r,
            KeyRecord {
                key_id: "k_1".into(),
                owner: "acme".into(),
                scopes: vec!["orders:read".into()],
                rate_limit: RecordLimit::Bucket(BucketSpec {
                    requests: 10,
                    period_s: 1,
                    burst: 20
                }),
                expires_at: Some(1767225600),
                revoked: false,
                allowed_cidrs: vec![],
                allowed_referrers: vec![],
                quotas: None,
            }
        );
    }

    #[test]
    fn only_key_id_is_required() {
        let r = parse(r#"{"key_id": "k"}"#).unwrap();
        assert_eq!(r.owner, "");
        assert!(r.scopes.is_empty());
        assert_eq!(r.rate_limit, RecordLimit::Default);
        assert_eq!(r.expires_at, None);
        assert!(!r.revoked);
    }

    #[test]
    fn null_rate_limit_is_unlimited_and_null_expiry_never_expires() {
        let r = parse(r#"{"key_id": "k", "rate_limit": null, "expires_at": null}"#).unwrap();
        assert_eq!(r.rate_limit, RecordLimit::Unlimited);
        assert_eq!(r.expires_at, None);
    }

    #[test]
    fn broken_records_are_refused() {
        for body in [
            "",
            "not json",
            "[]",
            r#"{"key_id": ""}"#,
            r#"{"key_id": 5}"#,
            r#"{"owner": "x"}"#,
            r#"{"key_id": "a\nb"}"#,
            r#"{"key_id": "k", "scopes": "a"}"#,
            r#"{"key_id": "k", "scopes": ["a,b"]}"#,
            r#"{"key_id": "k", "revoked": "no"}"#,
            r#"{"key_id": "k", "expires_at": "tomorrow"}"#,
            r#"{"key_id": "k", "expires_at": 1.5}"#,
            r#"{"key_id": "k", "rate_limit": {"requests": 0, "period_s": 1}}"#,
            r#"{"key_id": "k", "rate_limit": 5}"#,
        ] {
            assert!(parse(body).is_err(), "{body}");
        }
        let long = format!(r#"{{"key_id": "{}"}}"#, "x".repeat(MAX_TEXT_LEN + 1));
        assert!(parse(&long).is_err());
    }
}
