//! Every way a request can be refused, and what the client is told (CONTRACT "What the
//! client gets").

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denial {
    Missing,
    Duplicate,
    /// A key that cannot be one (too long, control or non-ASCII bytes); answered like an
    /// unknown key, without asking the key service.
    Malformed,
    Invalid,
    Revoked,
    Expired,
    AddressNotAllowed,
    ReferrerNotAllowed,
    PermissionDenied,
    RateLimited,
    QuotaExceeded,
    TooManyFailedAttempts,
    KeyServiceUnavailable,
    RateLimitServiceUnavailable,
}

/// The contract's error codes, in the order of its table; stats are named after them.
pub const CODES: [&str; 13] = [
    "api_key_missing",
    "api_key_duplicate",
    "api_key_invalid",
    "api_key_revoked",
    "api_key_expired",
    "address_not_allowed",
    "referrer_not_allowed",
    "permission_denied",
    "rate_limit_exceeded",
    "quota_exceeded",
    "too_many_failed_attempts",
    "key_service_unavailable",
    "rate_limit_service_unavailable",
];

impl Denial {
    /// Position of this denial's code in `CODES`.
    pub fn code_index(self) -> usize {
        match self {
            Denial::Missing => 0,
            Denial::Duplicate => 1,
            Denial::Malformed | Denial::Invalid => 2,
            Denial::Revoked => 3,
            Denial::Expired => 4,
            Denial::AddressNotAllowed => 5,
            Denial::ReferrerNotAllowed => 6,
            Denial::PermissionDenied => 7,
            Denial::RateLimited => 8,
            Denial::QuotaExceeded => 9,
            Denial::TooManyFailedAttempts => 10,
            Denial::KeyServiceUnavailable => 11,
            Denial::RateLimitServiceUnavailable => 12,
        }
    }

    pub fn code(self) -> &'static str {
        CODES.get(self.code_index()).copied().unwrap_or("internal")
    }

    pub fn status(self) -> u32 {
        match self {
            Denial::Missing
            | Denial::Duplicate
            | Denial::Malformed
            | Denial::Invalid
            | Denial::Revoked
            | Denial::Expired => 401,
            Denial::AddressNotAllowed | Denial::ReferrerNotAllowed | Denial::PermissionDenied => {
                403
            }
            Denial::RateLimited | Denial::QuotaExceeded | Denial::TooManyFailedAttempts => 429,
            Denial::KeyServiceUnavailable | Denial::RateLimitServiceUnavailable => 503,
        }
    }

    pub fn message(self) -> &'static str {
        match self {
            Denial::Missing => "No API key was given.",
            Denial::Duplicate => "The API key was given more than once.",
            Denial::Malformed => "The API key is malformed.",
            Denial::Invalid => "The API key is not valid.",
            Denial::Revoked => "The API key has been revoked.",
            Denial::Expired => "The API key has expired.",
            Denial::AddressNotAllowed => "The API key may not be used from this address.",
            Denial::ReferrerNotAllowed => "The API key may not be used from this site.",
            Denial::PermissionDenied => "The API key lacks a scope this request needs.",
            Denial::RateLimited => "The API key's rate limit is exceeded.",
            Denial::QuotaExceeded => "The API key's quota is spent for this period.",
            Denial::TooManyFailedAttempts => "Too many failed API key attempts from this address.",
            Denial::KeyServiceUnavailable => "API keys cannot be checked right now.",
            Denial::RateLimitServiceUnavailable => "API key quotas cannot be checked right now.",
        }
    }

    /// Codes and messages are fixed ASCII without quotes or backslashes, so the JSON
    /// needs no escaping.
    pub fn body(self) -> String {
        format!(
            r#"{{"error":{{"code":"{}","message":"{}"}}}}"#,
            self.code(),
            self.message()
        )
    }

    /// What a key-guessing client is charged for (CONTRACT `brute_force`).
    pub fn is_failed_attempt(self) -> bool {
        matches!(
            self,
            Denial::Duplicate
                | Denial::Malformed
                | Denial::Invalid
                | Denial::Revoked
                | Denial::Expired
                | Denial::AddressNotAllowed
                | Denial::ReferrerNotAllowed
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [Denial; 14] = [
        Denial::Missing,
        Denial::Duplicate,
        Denial::Malformed,
        Denial::Invalid,
        Denial::Revoked,
        Denial::Expired,
        Denial::AddressNotAllowed,
        Denial::ReferrerNotAllowed,
        Denial::PermissionDenied,
        Denial::RateLimited,
        Denial::QuotaExceeded,
        Denial::TooManyFailedAttempts,
        Denial::KeyServiceUnavailable,
        Denial::RateLimitServiceUnavailable,
    ];

    #[test]
    fn statuses_and_codes_follow_the_contract_table() {
        let table: Vec<(u32, &str)> = ALL.iter().map(|d| (d.status(), d.code())).collect();
        assert_eq!(
            table,
            vec![
                (401, "api_key_missing"),
                (401, "api_key_duplicate"),
                (401, "api_key_invalid"),
                (401, "api_key_invalid"),
                (401, "api_key_revoked"),
                (401, "api_key_expired"),
                (403, "address_not_allowed"),
                (403, "referrer_not_allowed"),
                (403, "permission_denied"),
                (429, "rate_limit_exceeded"),
                (429, "quota_exceeded"),
                (429, "too_many_failed_attempts"),
                (503, "key_service_unavailable"),
                (503, "rate_limit_service_unavailable"),
            ]
        );
    }

    #[test]
    fn body_is_the_spec_json() {
        let body: serde_json::Value = serde_json::from_str(&Denial::Revoked.body()).unwrap();
        assert_eq!(body["error"]["code"], "api_key_revoked");
        assert_eq!(body["error"]["message"], "The API key has been revoked.");
    }
}
