//! `allowed_referrers`: the web pages a key may be used from, as patterns
//! `[SCHEME://]HOST[:PORT][PATH]` parsed once when its record arrives, matched against the
//! request's `Referer` (or, without one, its `Origin`).
//!
//! - `HOST` may start with `*.`: any subdomain, not the bare domain.
//! - `PATH` may end with `*`: any rest. No `PATH`: any path.
//! - No `SCHEME`: `http` or `https`. No `PORT`: the scheme's default port only.
//! - Scheme and host compare case-insensitively; the path exactly.
//! - A URL's userinfo (`user@`) is never part of its host, and its query and fragment are
//!   never part of its path.

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReferrerPattern {
    /// Lowercase; `None`: `http` or `https`.
    pub scheme: Option<String>,
    /// Lowercase, without the `*.` of a wildcard.
    pub host: String,
    /// `*.host`: any subdomain of `host`.
    pub any_subdomain: bool,
    pub port: Option<u16>,
    pub path: PathMatch,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathMatch {
    Any,
    Prefix(String),
    Exact(String),
}

/// A `Referer` or `Origin` value, as far as matching needs it: borrowed, so that a
/// request pays no allocation for it.
#[derive(Debug, PartialEq, Eq)]
struct Url<'a> {
    scheme: &'a str,
    host: &'a str,
    port: Option<u16>,
    path: &'a str,
}

impl ReferrerPattern {
    pub fn parse(text: &str) -> Option<ReferrerPattern> {
        if text.is_empty() || !text.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
            return None;
        }
        let (scheme, rest) = match text.split_once("://") {
            Some((scheme, rest)) if is_scheme(scheme) => (Some(scheme.to_ascii_lowercase()), rest),
            Some(_) => return None,
            None => (None, text),
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        let (host, port) = split_port(authority)?;
        let (host, any_subdomain) = match host.strip_prefix("*.") {
            Some(domain) => (domain, true),
            None => (host, false),
        };
        if !is_host(host) || path.contains(['?', '#']) {
            return None;
        }
        let path = match path {
            "" | "/*" => PathMatch::Any,
            _ => match path.strip_suffix('*') {
                Some(prefix) if !prefix.contains('*') => PathMatch::Prefix(prefix.to_string()),
                None if !path.contains('*') => PathMatch::Exact(path.to_string()),
                _ => return None,
            },
        };
        Some(ReferrerPattern {
            scheme,
            host: host.to_ascii_lowercase(),
            any_subdomain,
            port,
            path,
        })
    }

    fn matches(&self, url: &Url) -> bool {
        let scheme_ok = match &self.scheme {
            Some(scheme) => scheme.eq_ignore_ascii_case(url.scheme),
            None => is_web(url.scheme),
        };
        let host_ok = if self.any_subdomain {
            // "<at least one character>." then the domain.
            let (host, domain) = (url.host.as_bytes(), self.host.as_bytes());
            host.len() > domain.len() + 1
                && host
                    .get(host.len() - domain.len()..)
                    .is_some_and(|tail| tail.eq_ignore_ascii_case(domain))
                && host.get(host.len() - domain.len() - 1) == Some(&b'.')
        } else {
            url.host.eq_ignore_ascii_case(&self.host)
        };
        let port_ok = match (self.port, url.port) {
            (Some(port), Some(url_port)) => port == url_port,
            (Some(port), None) => Some(port) == default_port(url.scheme),
            (None, Some(url_port)) => Some(url_port) == default_port(url.scheme),
            (None, None) => true,
        };
        let path_ok = match &self.path {
            PathMatch::Any => true,
            PathMatch::Prefix(prefix) => url.path.starts_with(prefix.as_str()),
            PathMatch::Exact(path) => url.path == path,
        };
        scheme_ok && host_ok && port_ok && path_ok
    }

    /// The pattern as text again, for the cache entry (parsed again when read back).
    pub fn to_text(&self) -> String {
        let mut text = String::new();
        if let Some(scheme) = &self.scheme {
            text.push_str(scheme);
            text.push_str("://");
        }
        if self.any_subdomain {
            text.push_str("*.");
        }
        text.push_str(&self.host);
        if let Some(port) = self.port {
            text.push_str(&format!(":{port}"));
        }
        match &self.path {
            PathMatch::Any => {}
            PathMatch::Prefix(prefix) => {
                text.push_str(prefix);
                text.push('*');
            }
            PathMatch::Exact(path) => text.push_str(path),
        }
        text
    }
}

/// Whether the request's referrer (`Referer`, else `Origin`) matches one of `patterns`.
/// A request with neither, or with one that is not a URL, matches none.
pub fn allowed(patterns: &[ReferrerPattern], referrer: Option<&[u8]>) -> bool {
    let Some(url) = referrer.and_then(parse_url) else {
        return false;
    };
    patterns.iter().any(|pattern| pattern.matches(&url))
}

fn parse_url(value: &[u8]) -> Option<Url<'_>> {
    let value = std::str::from_utf8(value).ok()?.trim();
    let (scheme, rest) = value.split_once("://")?;
    if !is_scheme(scheme) {
        return None;
    }
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, rest) = rest.split_at(end);
    // userinfo never names the host: "https://app.example.com@evil.test/" is evil.test.
    let authority = authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host);
    let (host, port) = split_port(authority)?;
    if !is_host(host) {
        return None;
    }
    let path_end = rest.find(['?', '#']).unwrap_or(rest.len());
    let path = rest
        .get(..path_end)
        .filter(|p| !p.is_empty())
        .unwrap_or("/");
    Some(Url {
        scheme,
        host: host.trim_end_matches('.'),
        port,
        path,
    })
}

/// `host` or `host:port` (IPv6 literals in brackets).
fn split_port(authority: &str) -> Option<(&str, Option<u16>)> {
    let port_at = if authority.starts_with('[') {
        authority.find(']').map(|i| i + 1)?
    } else {
        authority.find(':').unwrap_or(authority.len())
    };
    let (host, port) = authority.split_at(port_at);
    match port.strip_prefix(':') {
        None if port.is_empty() => Some((host, None)),
        Some(digits) if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) => {
            Some((host, Some(digits.parse().ok()?)))
        }
        _ => None,
    }
}

fn is_scheme(scheme: &str) -> bool {
    scheme
        .bytes()
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic())
        && scheme
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'))
}

fn is_host(host: &str) -> bool {
    !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'[' | b']' | b':'))
}

fn is_web(scheme: &str) -> bool {
    scheme.eq_ignore_ascii_case("http") || scheme.eq_ignore_ascii_case("https")
}

fn default_port(scheme: &str) -> Option<u16> {
    if scheme.eq_ignore_ascii_case("http") {
        Some(80)
    } else if scheme.eq_ignore_ascii_case("https") {
        Some(443)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allows(pattern: &str, referrer: &str) -> bool {
        let pattern = ReferrerPattern::parse(pattern).unwrap_or_else(|| panic!("{pattern}"));
        allowed(&[pattern], Some(referrer.as_bytes()))
    }

    #[test]
    fn the_specs_patterns() {
        assert!(allows(
            "https://app.example.com/*",
            "https://app.example.com/orders?x=1"
        ));
        assert!(allows(
            "https://app.example.com/*",
            "https://app.example.com"
        ));
        assert!(!allows(
            "https://app.example.com/*",
            "http://app.example.com/"
        ));
        assert!(allows("*.example.com", "https://a.b.example.com/x"));
        assert!(allows("*.example.com", "http://shop.example.com/"));
        assert!(
            !allows("*.example.com", "https://example.com/"),
            "not the bare domain"
        );
        assert!(!allows("*.example.com", "https://badexample.com/"));
        assert!(
            !allows("*.example.com", "ftp://shop.example.com/"),
            "no scheme: http or https"
        );
    }

    #[test]
    fn host_and_scheme_compare_case_insensitively_and_the_path_exactly() {
        assert!(allows(
            "https://App.Example.com/*",
            "HTTPS://APP.EXAMPLE.COM/Orders"
        ));
        assert!(allows(
            "app.example.com/app/*",
            "https://app.example.com/app/x"
        ));
        assert!(!allows(
            "app.example.com/app/*",
            "https://app.example.com/App/x"
        ));
        assert!(allows(
            "app.example.com/login",
            "https://app.example.com/login#top"
        ));
        assert!(!allows(
            "app.example.com/login",
            "https://app.example.com/login/again"
        ));
    }

    #[test]
    fn userinfo_never_names_the_host() {
        assert!(!allows(
            "app.example.com",
            "https://app.example.com@evil.test/"
        ));
        assert!(allows(
            "app.example.com",
            "https://evil.test@app.example.com/"
        ));
        assert!(allows(
            "app.example.com",
            "https://user:pw@app.example.com/"
        ));
    }

    #[test]
    fn ports_must_match_and_default_to_the_schemes() {
        assert!(!allows("app.example.com", "https://app.example.com:8443/"));
        assert!(allows("app.example.com", "https://app.example.com:443/"));
        assert!(allows(
            "https://app.example.com:8443",
            "https://app.example.com:8443/x"
        ));
        assert!(!allows(
            "https://app.example.com:8443",
            "https://app.example.com/x"
        ));
        assert!(allows(
            "http://localhost:3000/*",
            "http://localhost:3000/dev"
        ));
    }

    #[test]
    fn no_referrer_or_garbage_matches_nothing() {
        let pattern = vec![ReferrerPattern::parse("app.example.com").unwrap()];
        assert!(!allowed(&pattern, None));
        for garbage in [
            "",
            "null",
            "app.example.com",
            "https://",
            "https://a b/",
            "https://[::1/",
        ] {
            assert!(!allowed(&pattern, Some(garbage.as_bytes())), "{garbage:?}");
        }
    }

    #[test]
    fn malformed_patterns_are_refused() {
        for text in [
            "",
            "https://",
            "*.",
            "a*b.com",
            "app.example.com/a*b",
            "app.example.com:port",
            "app.example.com:",
            "1http://x",
            "app.example.com/?q",
            "app example.com",
        ] {
            assert_eq!(ReferrerPattern::parse(text), None, "{text:?}");
        }
    }

    #[test]
    fn patterns_survive_the_round_trip_through_text() {
        for text in [
            "https://app.example.com/*",
            "*.example.com",
            "http://localhost:3000/app/*",
            "app.example.com/login",
            "https://[2001:db8::1]:8443/x",
        ] {
            let pattern = ReferrerPattern::parse(text).unwrap();
            assert_eq!(
                ReferrerPattern::parse(&pattern.to_text()),
                Some(pattern),
                "{text}"
            );
        }
    }
}
