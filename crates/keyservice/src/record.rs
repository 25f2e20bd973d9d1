//! A key's record as the admin API takes it: the contract's record fields, checked with
//! the filter's own record rules (`apikey_core::keys::record`), so that a key the service
//! accepts is a record every filter accepts.
use apikey_core::keys::record::parse_record;
use serde_json::{Map, Value};

/// The record fields the admin API sets (`key_id` is the service's, `revoked` its
/// `revoke` call's).
pub const RECORD_FIELDS: [&str; 7] = [
    "owner",
    "scopes",
    "rate_limit",
    "quotas",
    "expires_at",
    "allowed_cidrs",
    "allowed_referrers",
];

/// A field the admin API refuses, and why: answered 400 `invalid_field`.
#[derive(Debug, PartialEq, Eq)]
pub struct InvalidField {
    pub field: String,
    pub reason: String,
}

impl InvalidField {
    pub fn new(field: &str, reason: impl Into<String>) -> InvalidField {
        InvalidField {
            field: field.into(),
            reason: reason.into(),
        }
    }

    pub fn message(&self) -> String {
        match self.field.as_str() {
            "" => self.reason.clone(),
            field => format!("{field}: {}", self.reason),
        }
    }
}

/// The body of an admin call as a JSON object whose every field is one of `allowed`.
pub fn object<'a>(
    body: &'a Value,
    allowed: &[&str],
) -> Result<&'a Map<String, Value>, InvalidField> {
    let fields = body
        .as_object()
        .ok_or_else(|| InvalidField::new("", "the body must be a JSON object"))?;
    if let Some(unknown) = fields.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(InvalidField::new(unknown, "no such field"));
    }
    Ok(fields)
}

/// `record` with the record fields of `changes` set (a `null` is kept: it means what the
/// contract says it means, e.g. no limit), checked as the filter will read it.
pub fn with_changes(
    key_id: &str,
    record: &Map<String, Value>,
    changes: &Map<String, Value>,
) -> Result<Map<String, Value>, InvalidField> {
    let mut next = record.clone();
    for field in RECORD_FIELDS {
        if let Some(value) = changes.get(field) {
            next.insert(field.into(), value.clone());
        }
    }
    next.insert("key_id".into(), Value::String(key_id.into()));
    check(&next)?;
    Ok(next)
}

/// Whether the filter accepts `record`.
pub fn check(record: &Map<String, Value>) -> Result<(), InvalidField> {
    let body = serde_json::to_vec(record).map_err(|e| InvalidField::new("", e.to_string()))?;
    parse_record(&body)
        .map(|_| ())
        .map_err(|e| InvalidField::new(&e.field, e.reason))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn fields(value: Value) -> Map<String, Value> {
        value.as_object().unwrap().clone()
    }

    #[test]
    fn record_fields_are_checked_with_the_filters_rules() {
        let changes = fields(json!({"owner": "acme", "scopes": ["orders:read"],
            "rate_limit": {"requests": 10, "period_s": 1}, "allowed_cidrs": ["10.0.0.0/8"]}));
        let record = with_changes("k_1", &Map::new(), &changes).unwrap();
        assert_eq!(record["key_id"], "k_1");
        assert_eq!(record["owner"], "acme");
        for (bad, field) in [
            (json!({"scopes": ["a,b"]}), "scopes"),
            (
                json!({"rate_limit": {"requests": 0, "period_s": 1}}),
                "rate_limit.requests",
            ),
            (json!({"allowed_cidrs": ["10.0.0.0/99"]}), "allowed_cidrs"),
            (json!({"expires_at": "tomorrow"}), "expires_at"),
            (json!({"owner": "a\nb"}), "owner"),
        ] {
            let err = with_changes("k_1", &record, &fields(bad.clone())).unwrap_err();
            assert!(err.field.starts_with(field), "{bad}: {err:?}");
        }
    }

    #[test]
    fn a_null_is_kept_and_other_fields_stay() {
        let record = with_changes(
            "k_1",
            &Map::new(),
            &fields(json!({"owner": "acme",
            "rate_limit": {"requests": 5, "period_s": 1}})),
        )
        .unwrap();
        let next = with_changes("k_1", &record, &fields(json!({"rate_limit": null}))).unwrap();
        assert_eq!(next["rate_limit"], Value::Null);
        assert_eq!(next["owner"], "acme");
    }

    #[test]
    fn unknown_fields_are_named() {
        let body = json!({"owner": "a", "ownr": "b"});
        assert_eq!(
            object(&body, &RECORD_FIELDS).unwrap_err(),
            InvalidField::new("ownr", "no such field")
        );
        assert!(object(&json!([1]), &RECORD_FIELDS).is_err());
    }
}
