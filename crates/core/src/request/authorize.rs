//! Whether a known key may make this request (CONTRACT step 5, in its order: revoked,
//! expired, the client address, the referrer, the scopes).
use crate::keys::record::KeyRecord;
use crate::request::denial::Denial;
use crate::vocabulary::referrer;
use std::net::IpAddr;

/// What the request says about where it comes from, read only when the key's record
/// restricts it.
pub trait Origin {
    /// The client address (the same as `brute_force`'s); `None` when unknown.
    fn client(&mut self) -> Option<IpAddr>;
    /// `Referer`, else `Origin`.
    fn referrer(&self) -> Option<&[u8]>;
}

pub fn authorize(
    record: &KeyRecord,
    now_s: i64,
    required_scopes: &[String],
    origin: &mut impl Origin,
) -> Result<(), Denial> {
    if record.revoked {
        return Err(Denial::Revoked);
    }
    if record.expires_at.is_some_and(|at| now_s >= at) {
        return Err(Denial::Expired);
    }
    if !record.allowed_cidrs.is_empty() {
        let inside = origin
            .client()
            .is_some_and(|client| record.allowed_cidrs.iter().any(|c| c.contains(client)));
        if !inside {
            return Err(Denial::AddressNotAllowed);
        }
    }
    if !record.allowed_referrers.is_empty()
        && !referrer::allowed(&record.allowed_referrers, origin.referrer())
    {
        return Err(Denial::ReferrerNotAllowed);
    }
    if !required_scopes.iter().all(|s| record.scopes.contains(s)) {
        return Err(Denial::PermissionDenied);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vocabulary::cidr::Cidr;
    use crate::vocabulary::referrer::ReferrerPattern;

    fn record() -> KeyRecord {
        KeyRecord {
            scopes: vec!["a".into(), "b".into()],
            expires_at: Some(100),
            ..KeyRecord::for_tests("k", "o")
        }
    }

    struct From(Option<&'static str>, Option<&'static str>, u32);

    impl Origin for From {
        fn client(&mut self) -> Option<IpAddr> {
            self.2 += 1;
            self.0.map(|a| a.parse().unwrap())
        }
        fn referrer(&self) -> Option<&[u8]> {
            self.1.map(str::as_bytes)
        }
    }

    fn anywhere() -> From {
        From(Some("192.0.2.1"), None, 0)
    }

    #[test]
    fn restrictions_come_after_expiry_and_before_scopes() {
        let bound = KeyRecord {
            allowed_cidrs: vec![Cidr::parse("203.0.113.0/24").unwrap()],
            allowed_referrers: vec![ReferrerPattern::parse("app.example.com").unwrap()],
            ..record()
        };
        let (ok_ip, ok_site) = (Some("203.0.113.5"), Some("https://app.example.com/"));
        let check = |ip, site, scopes: &[&str]| {
            authorize(&bound, 99, &self::scopes(scopes), &mut From(ip, site, 0))
        };
        assert_eq!(check(ok_ip, ok_site, &["a"]), Ok(()));
        assert_eq!(
            check(Some("198.51.100.1"), ok_site, &["z"]),
            Err(Denial::AddressNotAllowed)
        );
        assert_eq!(
            check(None, ok_site, &[]),
            Err(Denial::AddressNotAllowed),
            "unknown address"
        );
        assert_eq!(
            check(ok_ip, Some("https://evil.test/"), &["z"]),
            Err(Denial::ReferrerNotAllowed)
        );
        assert_eq!(
            check(ok_ip, None, &[]),
            Err(Denial::ReferrerNotAllowed),
            "no referrer"
        );
        assert_eq!(check(ok_ip, ok_site, &["z"]), Err(Denial::PermissionDenied));
        assert_eq!(
            authorize(&bound, 100, &[], &mut From(Some("198.51.100.1"), None, 0)),
            Err(Denial::Expired)
        );
    }

    #[test]
    fn the_address_is_read_only_for_a_key_bound_to_addresses() {
        let mut origin = anywhere();
        assert_eq!(authorize(&record(), 99, &[], &mut origin), Ok(()));
        assert_eq!(origin.2, 0);
    }

    fn scopes(s: &[&str]) -> Vec<String> {
        s.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn allows_a_valid_key_holding_every_scope() {
        assert_eq!(
            authorize(&record(), 99, &scopes(&["a", "b"]), &mut anywhere()),
            Ok(())
        );
        assert_eq!(authorize(&record(), 99, &[], &mut anywhere()), Ok(()));
    }

    #[test]
    fn denies_in_the_spec_order() {
        let revoked = KeyRecord {
            revoked: true,
            ..record()
        };
        assert_eq!(
            authorize(&revoked, 200, &scopes(&["z"]), &mut anywhere()),
            Err(Denial::Revoked)
        );
        assert_eq!(
            authorize(&record(), 100, &scopes(&["z"]), &mut anywhere()),
            Err(Denial::Expired)
        );
        assert_eq!(
            authorize(&record(), 99, &scopes(&["a", "z"]), &mut anywhere()),
            Err(Denial::PermissionDenied)
        );
    }

    #[test]
    fn no_expiry_never_expires() {
        let forever = KeyRecord {
            expires_at: None,
            ..record()
        };
        assert_eq!(authorize(&forever, i64::MAX, &[], &mut anywhere()), Ok(()));
    }
}
