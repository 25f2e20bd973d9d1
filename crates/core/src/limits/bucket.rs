//! Token bucket arithmetic, exact in integers.
//!
//! Tokens are counted in units of `1 / (period_s * 1000)` of a token, so that a bucket
//! refilling `requests` tokens per `period_s` seconds gains exactly `requests` units per
//! millisecond: no rounding, however often it is updated.
use crate::vocabulary::bucket_spec::BucketSpec;
use crate::vocabulary::decimal;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bucket {
    /// The spec the units below are in.
    pub spec: BucketSpec,
    pub units: u128,
    pub updated_at_ms: u64,
}

/// What taking a token told the client (CONTRACT "What the client gets").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Take {
    pub allowed: bool,
    /// Whole tokens left.
    pub remaining: u64,
    /// Whole seconds until a token is back (at least 1); meaningful when denied.
    pub retry_after_s: u64,
    /// Whole seconds until the bucket is full again.
    pub full_in_s: u64,
}

/// The IETF `RateLimit-Policy` field (draft-ietf-httpapi-ratelimit-headers-11, policy
/// `"apikey"`) of a bucket of `spec`: the same for every response, so made once.
pub fn ratelimit_policy(spec: BucketSpec) -> String {
    format!("\"apikey\";q={};w={}", spec.requests, spec.period_s)
}

impl Take {
    /// The IETF `RateLimit` field for a response after this take.
    pub fn ratelimit(&self) -> String {
        let mut field = String::with_capacity(48);
        field.push_str("\"apikey\";r=");
        decimal::push(&mut field, self.remaining);
        field.push_str(";t=");
        decimal::push(&mut field, self.full_in_s);
        field
    }
}

fn units_per_token(spec: BucketSpec) -> u128 {
    u128::from(spec.period_s) * 1000
}

fn capacity(spec: BucketSpec) -> u128 {
    u128::from(spec.burst) * units_per_token(spec)
}

fn ceil_div(a: u128, b: u128) -> u128 {
    a.div_ceil(b.max(1))
}

fn ms_to_whole_seconds(ms: u128) -> u64 {
    ceil_div(ms, 1000).min(u128::from(u64::MAX)) as u64
}

impl Bucket {
    pub fn full(spec: BucketSpec, now_ms: u64) -> Bucket {
        Bucket {
            spec,
            units: capacity(spec),
            updated_at_ms: now_ms,
        }
    }

    /// The bucket as it stands at `now_ms`, in `spec`. A changed spec keeps the whole
    /// tokens the key had (never more than the new capacity): a new limit is no reason
    /// to hand out a fresh full bucket. A clock that steps back refills nothing.
    pub fn at(self, spec: BucketSpec, now_ms: u64) -> Bucket {
        let mut units = self.units;
        if spec != self.spec {
            units = units / units_per_token(self.spec) * units_per_token(spec);
        }
        let elapsed = u128::from(now_ms.saturating_sub(self.updated_at_ms));
        Bucket {
            spec,
            units: units
                .saturating_add(elapsed.saturating_mul(u128::from(spec.requests)))
                .min(capacity(spec)),
            updated_at_ms: self.updated_at_ms.max(now_ms),
        }
    }

    pub fn is_full(&self) -> bool {
        self.units >= capacity(self.spec)
    }

    /// Gives back one token taken earlier (never past the capacity). `self` must already
    /// be brought to `now` by `at`.
    pub fn give_back(self) -> Bucket {
        Bucket {
            units: self
                .units
                .saturating_add(units_per_token(self.spec))
                .min(capacity(self.spec)),
            ..self
        }
    }

    /// Takes one token if there is one. `self` must already be brought to `now` by `at`.
    pub fn take(self) -> (Bucket, Take) {
        let cost = units_per_token(self.spec);
        let allowed = self.units >= cost;
        let after = Bucket {
            units: if allowed {
                self.units - cost
            } else {
                self.units
            },
            ..self
        };
        let rate = u128::from(self.spec.requests);
        let take = Take {
            allowed,
            remaining: (after.units / cost).min(u128::from(u64::MAX)) as u64,
            retry_after_s: ms_to_whole_seconds(ceil_div(cost.saturating_sub(after.units), rate))
                .max(1),
            full_in_s: ms_to_whole_seconds(ceil_div(capacity(self.spec) - after.units, rate)),
        };
        (after, take)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn spec(requests: u32, period_s: u32, burst: u32) -> BucketSpec {
        BucketSpec {
            requests,
            period_s,
            burst,
        }
    }

    fn take_at(bucket: Bucket, now_ms: u64) -> (Bucket, Take) {
        bucket.at(bucket.spec, now_ms).take()
    }

    #[test]
    fn a_full_bucket_lets_exactly_burst_through() {
        let mut b = Bucket::full(spec(1, 3600, 5), 0);
        let mut allowed = 0;
        for _ in 0..20 {
            let (next, t) = take_at(b, 0);
            allowed += u32::from(t.allowed);
            b = next;
        }
        assert_eq!(allowed, 5);
    }

    #[test]
    fn headers_values() {
        let b = Bucket::full(spec(10, 60, 10), 0);
        let (b, t) = take_at(b, 0);
        assert_eq!((t.allowed, t.remaining, t.full_in_s), (true, 9, 6));
        let mut b = b;
        for _ in 0..9 {
            b = take_at(b, 0).0;
        }
        let (_, t) = take_at(b, 0);
        assert_eq!(
            (t.allowed, t.remaining, t.retry_after_s, t.full_in_s),
            (false, 0, 6, 60)
        );
    }

    #[test]
    fn ratelimit_fields_follow_the_draft() {
        let s = spec(10, 60, 20);
        let (_, t) = take_at(Bucket::full(s, 0), 0);
        assert_eq!(ratelimit_policy(s), "\"apikey\";q=10;w=60");
        assert_eq!(t.ratelimit(), "\"apikey\";r=19;t=6");
    }

    #[test]
    fn refill_accumulates_fractions_over_many_small_steps() {
        // One token a minute, updated every millisecond: exactly one token after 60 s.
        let empty = Bucket {
            spec: spec(1, 60, 1),
            units: 0,
            updated_at_ms: 0,
        };
        let mut b = empty;
        for ms in 1..60_000 {
            b = b.at(b.spec, ms);
        }
        assert!(!b.take().1.allowed);
        assert!(b.at(b.spec, 60_000).take().1.allowed);
    }

    #[test]
    fn retry_after_is_at_least_one_second() {
        let empty = Bucket {
            spec: spec(1000, 1, 1),
            units: 0,
            updated_at_ms: 0,
        };
        assert_eq!(empty.take().1.retry_after_s, 1);
    }

    #[test]
    fn a_new_limit_keeps_the_tokens_left() {
        let b = Bucket {
            spec: spec(10, 1, 10),
            units: 3 * 1000,
            updated_at_ms: 0,
        };
        let moved = b.at(spec(100, 60, 100), 0);
        assert_eq!(moved.take().1.remaining, 2);
        let shrunk = Bucket::full(spec(10, 1, 10), 0).at(spec(1, 1, 2), 0);
        assert_eq!(shrunk.take().1.remaining, 1);
    }

    proptest! {
        #[test]
        fn never_negative_never_above_capacity(
            requests in 1u32..1000, period in 1u32..100, burst in 1u32..1000,
            steps in proptest::collection::vec((0u64..5000, any::<bool>()), 1..50),
        ) {
            let s = spec(requests, period, burst);
            let mut b = Bucket::full(s, 1_000_000);
            let mut now = 1_000_000u64;
            for (step, backwards) in steps {
                now = if backwards { now.saturating_sub(step) } else { now + step };
                let before = b;
                b = b.at(s, now);
                prop_assert!(b.units <= capacity(s));
                prop_assert!(b.updated_at_ms >= before.updated_at_ms);
                if backwards {
                    prop_assert_eq!(b.units, before.units);
                }
                let (after, t) = b.take();
                prop_assert!(after.units <= b.units);
                prop_assert_eq!(t.allowed, b.units >= units_per_token(s));
                b = after;
            }
        }

        #[test]
        fn refill_matches_the_rate(requests in 1u32..100, period in 1u32..100, elapsed_ms in 0u64..1_000_000) {
            let s = spec(requests, period, u32::MAX / 2);
            let empty = Bucket { spec: s, units: 0, updated_at_ms: 0 };
            let tokens = empty.at(s, elapsed_ms).take().1.remaining + u64::from(empty.at(s, elapsed_ms).take().1.allowed);
            let expected = u128::from(elapsed_ms) * u128::from(requests) / (u128::from(period) * 1000);
            prop_assert_eq!(u128::from(tokens), expected);
        }
    }
}
