//! A quota (CONTRACT "Configuration"): at most `requests` per window `unit`, counted for the
//! key or for every key of its owner together; and the RLS descriptor that names it.
use crate::quotas::rls_messages::{self as rls, unit};
use crate::storage::bytes::Reader;
use crate::vocabulary::json_fields::{FieldError, FieldResult, Object};
use serde_json::Value;

/// Quotas one key may have: each is one descriptor of every RLS call for the key.
pub const MAX_QUOTAS: usize = 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Unit {
    Second,
    Minute,
    Hour,
    Day,
    Month,
    Year,
}

impl Unit {
    const ALL: [Unit; 6] = [
        Unit::Second,
        Unit::Minute,
        Unit::Hour,
        Unit::Day,
        Unit::Month,
        Unit::Year,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Unit::Second => "second",
            Unit::Minute => "minute",
            Unit::Hour => "hour",
            Unit::Day => "day",
            Unit::Month => "month",
            Unit::Year => "year",
        }
    }

    /// The window's length as envoyproxy/ratelimit counts it (a month of 30 days, a
    /// year of 365).
    pub fn seconds(self) -> u64 {
        match self {
            Unit::Second => 1,
            Unit::Minute => 60,
            Unit::Hour => 3_600,
            Unit::Day => 86_400,
            Unit::Month => 30 * 86_400,
            Unit::Year => 365 * 86_400,
        }
    }

    /// `envoy.type.v3.RateLimitUnit`.
    pub fn rls_unit(self) -> i32 {
        match self {
            Unit::Second => unit::SECOND,
            Unit::Minute => unit::MINUTE,
            Unit::Hour => unit::HOUR,
            Unit::Day => unit::DAY,
            Unit::Month => unit::MONTH,
            Unit::Year => unit::YEAR,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Per {
    Key,
    Owner,
}

impl Per {
    pub fn name(self) -> &'static str {
        match self {
            Per::Key => "key",
            Per::Owner => "owner",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Quota {
    pub requests: u32,
    pub unit: Unit,
    pub per: Per,
}

impl Quota {
    /// Its item in the RateLimit fields: `"<per>-<unit>"`.
    pub fn item_name(&self) -> String {
        format!("{}-{}", self.per.name(), self.unit.name())
    }

    /// Its descriptor for a key: `("key_id", K)` or `("owner", O)`, then `("window", U)`,
    /// with the quota as the `limit` override. A key without an owner counts an owner's
    /// quota for itself alone, as a key's (never in one counter of every owner-less key).
    pub fn descriptor(&self, key_id: &str, owner: &str) -> rls::RateLimitDescriptor {
        let (name, value) = match self.per {
            Per::Owner if !owner.is_empty() => ("owner", owner),
            Per::Key | Per::Owner => ("key_id", key_id),
        };
        let entry = |key: &str, value: &str| rls::Entry {
            key: key.into(),
            value: value.into(),
        };
        rls::RateLimitDescriptor {
            entries: vec![entry(name, value), entry("window", self.unit.name())],
            limit: Some(rls::RateLimitOverride {
                requests_per_unit: self.requests,
                unit: self.unit.rls_unit(),
            }),
        }
    }
}

impl Quota {
    /// Its compact form in a cache entry.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.requests.to_le_bytes());
        out.push(self.unit.rls_unit() as u8);
        out.push(u8::from(self.per == Per::Owner));
    }

    pub fn decode(r: &mut Reader) -> Option<Quota> {
        let requests = r.u32()?;
        let unit = r.u8()?;
        let unit = Unit::ALL
            .into_iter()
            .find(|u| u.rls_unit() == i32::from(unit))?;
        let per = if r.u8()? == 0 { Per::Key } else { Per::Owner };
        Some(Quota {
            requests,
            unit,
            per,
        })
    }
}

/// A list of quotas, as `default_quotas` or a record's `quotas` holds it.
pub fn parse_quotas(field: &str, value: &Value) -> FieldResult<Vec<Quota>> {
    let items = value
        .as_array()
        .ok_or_else(|| FieldError::new(field, "must be a list of quotas"))?;
    if items.len() > MAX_QUOTAS {
        return Err(FieldError::new(field, format!("more than {MAX_QUOTAS}")));
    }
    let quotas = items
        .iter()
        .enumerate()
        .map(|(i, item)| parse_quota(&Object::new(format!("{field}[{i}]"), item)?))
        .collect::<FieldResult<Vec<Quota>>>()?;
    let mut seen: Vec<(Per, Unit)> = Vec::with_capacity(quotas.len());
    for q in &quotas {
        if seen.contains(&(q.per, q.unit)) {
            // Two would share one RLS counter and one RateLimit item.
            return Err(FieldError::new(
                field,
                format!("two quotas per {} and {}", q.per.name(), q.unit.name()),
            ));
        }
        seen.push((q.per, q.unit));
    }
    Ok(quotas)
}

fn parse_quota(quota: &Object) -> FieldResult<Quota> {
    quota.refuse_unknown(&["requests", "unit", "per"])?;
    let requests = quota
        .u64("requests")?
        .filter(|n| (1..=u64::from(u32::MAX)).contains(n))
        .ok_or_else(|| {
            FieldError::new(quota.path_of("requests"), "must be from 1 to 4294967295")
        })?;
    let unit = quota.string("unit")?.unwrap_or_default();
    let unit = Unit::ALL
        .into_iter()
        .find(|u| u.name() == unit)
        .ok_or_else(|| {
            FieldError::new(
                quota.path_of("unit"),
                "must be second, minute, hour, day, month or year",
            )
        })?;
    let per = match quota.string("per")? {
        None | Some("key") => Per::Key,
        Some("owner") => Per::Owner,
        Some(_) => {
            return Err(FieldError::new(
                quota.path_of("per"),
                "must be key or owner",
            ))
        }
    };
    Ok(Quota {
        requests: requests as u32,
        unit,
        per,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_the_quota_form() {
        let quotas = parse_quotas(
            "quotas",
            &json!([{"requests": 10000, "unit": "day"}, {"requests": 5, "unit": "second", "per": "owner"}]),
        )
        .unwrap();
        assert_eq!(
            quotas,
            vec![
                Quota {
                    requests: 10000,
                    unit: Unit::Day,
                    per: Per::Key
                },
                Quota {
                    requests: 5,
                    unit: Unit::Second,
                    per: Per::Owner
                },
            ]
        );
        assert_eq!(quotas[1].item_name(), "owner-second");
    }

    #[test]
    fn refuses_what_is_not_a_quota() {
        for bad in [
            json!({"requests": 1, "unit": "day"}),
            json!([{"requests": 0, "unit": "day"}]),
            json!([{"requests": 1, "unit": "week"}]),
            json!([{"requests": 1}]),
            json!([{"requests": 1, "unit": "day", "per": "team"}]),
            json!([{"requests": 1, "unit": "day", "burst": 2}]),
            json!([{"requests": 1, "unit": "day"}, {"requests": 2, "unit": "day", "per": "key"}]),
            json!([{"requests": 4294967296u64, "unit": "day"}]),
        ] {
            assert!(parse_quotas("quotas", &bad).is_err(), "{bad}");
        }
        let nine: Vec<_> = (0..9)
            .map(|_| json!({"requests": 1, "unit": "day"}))
            .collect();
        assert!(parse_quotas("quotas", &Value::Array(nine)).is_err());
    }

    #[test]
    fn the_descriptor_names_who_and_the_window_with_the_quota_as_override() {
        let q = Quota {
            requests: 7,
            unit: Unit::Hour,
            per: Per::Owner,
        };
        let entries = |d: &rls::RateLimitDescriptor| -> Vec<(String, String)> {
            d.entries
                .iter()
                .map(|e| (e.key.clone(), e.value.clone()))
                .collect()
        };
        let pairs = |p: [(&str, &str); 2]| p.map(|(k, v)| (k.to_string(), v.to_string()));
        let d = q.descriptor("k_1", "acme");
        assert_eq!(entries(&d), pairs([("owner", "acme"), ("window", "hour")]));
        let ownerless = q.descriptor("k_1", "");
        assert_eq!(
            entries(&ownerless),
            pairs([("key_id", "k_1"), ("window", "hour")])
        );
        assert_eq!(
            d.limit,
            Some(rls::RateLimitOverride {
                requests_per_unit: 7,
                unit: unit::HOUR
            })
        );
    }
}
