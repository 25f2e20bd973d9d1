//! Whether a known key may make this request (SPEC steps 5: revoked, expired, scopes).
use crate::keys::record::KeyRecord;
use crate::request::denial::Denial;

pub fn authorize(record: &KeyRecord, now_s: i64, required_scopes: &[String]) -> Result<(), Denial> {
    if record.revoked {
        return Err(Denial::Revoked);
    }
    if record.expires_at.is_some_and(|at| now_s >= at) {
        return Err(Denial::Expired);
    }
    if !required_scopes.iter().all(|s| record.scopes.contains(s)) {
        return Err(Denial::PermissionDenied);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::record::RecordLimit;

    fn record() -> KeyRecord {
        KeyRecord {
            key_id: "k".into(),
            owner: "o".into(),
            scopes: vec!["a".into(), "b".into()],
            rate_limit: RecordLimit::Default,
            expires_at: Some(100),
            revoked: false,
        }
    }

    fn scopes(s: &[&str]) -> Vec<String> {
        s.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn allows_a_valid_key_holding_every_scope() {
        assert_eq!(authorize(&record(), 99, &scopes(&["a", "b"])), Ok(()));
        assert_eq!(authorize(&record(), 99, &[]), Ok(()));
    }

    #[test]
    fn denies_in_the_spec_order() {
        let revoked = KeyRecord {
            revoked: true,
            ..record()
        };
        assert_eq!(
            authorize(&revoked, 200, &scopes(&["z"])),
            Err(Denial::Revoked)
        );
        assert_eq!(
            authorize(&record(), 100, &scopes(&["z"])),
            Err(Denial::Expired)
        );
        assert_eq!(
            authorize(&record(), 99, &scopes(&["a", "z"])),
            Err(Denial::PermissionDenied)
        );
    }

    #[test]
    fn no_expiry_never_expires() {
        let forever = KeyRecord {
            expires_at: None,
            ..record()
        };
        assert_eq!(authorize(&forever, i64::MAX, &[]), Ok(()));
    }
}
