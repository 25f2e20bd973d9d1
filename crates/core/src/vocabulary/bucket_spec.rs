//! A token bucket's form (the configuration's `rate_limit` and a key record's): how many
//! requests per period, and the burst.
use crate::vocabulary::json_fields::{FieldError, FieldResult, Object};

pub const MAX_BUCKET_NUMBER: u64 = 1_000_000_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BucketSpec {
    pub requests: u32,
    pub period_s: u32,
    pub burst: u32,
}

/// `{"requests": R, "period_s": P, "burst": B}`; shared with the key record.
pub fn parse_bucket(bucket: &Object) -> FieldResult<BucketSpec> {
    let required = |name: &str| {
        bucket
            .u64(name)?
            .ok_or_else(|| FieldError::new(bucket.path_of(name), "is required"))
    };
    let in_range = |name: &str, n: u64| {
        if (1..=MAX_BUCKET_NUMBER).contains(&n) {
            Ok(n as u32)
        } else {
            Err(FieldError::new(
                bucket.path_of(name),
                format!("must be between 1 and {MAX_BUCKET_NUMBER}"),
            ))
        }
    };
    let requests = in_range("requests", required("requests")?)?;
    let period_s = in_range("period_s", required("period_s")?)?;
    let burst = match bucket.u64("burst")? {
        Some(b) => in_range("burst", b)?,
        None => requests,
    };
    Ok(BucketSpec {
        requests,
        period_s,
        burst,
    })
}
