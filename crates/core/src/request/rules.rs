//! Scope rules: the first rule whose path prefix and method match says which scopes a
//! request needs. Rules are a boundary (a request that matches none is allowed), so they
//! match the path as upstreams read it (`canonical_path`), the prefix ignoring ASCII case,
//! methods ignoring case, and `HEAD` as `GET`.
use crate::config::Rule;
use crate::vocabulary::canonical_path::{canonical_path, starts_with_ignoring_case};

/// Index of the rule that applies, if any. `path` is `:path` with or without its query,
/// which is never part of the match. With no rules, nothing is worked out.
pub fn matching_rule(rules: &[Rule], method: &[u8], path: &[u8]) -> Option<usize> {
    if rules.is_empty() {
        return None;
    }
    let path = canonical_path(path);
    rules.iter().position(|rule| {
        starts_with_ignoring_case(&path, rule.path_prefix.as_bytes())
            && rule
                .methods
                .as_ref()
                .is_none_or(|methods| methods.iter().any(|m| method_matches(m, method)))
    })
}

/// A rule's method against the request's: ignoring case, and `HEAD` as `GET` (a server
/// answers `HEAD` by running its `GET` handler).
fn method_matches(rule_method: &str, method: &[u8]) -> bool {
    let rule_method = rule_method.as_bytes();
    rule_method.eq_ignore_ascii_case(method)
        || (rule_method.eq_ignore_ascii_case(b"GET") && method.eq_ignore_ascii_case(b"HEAD"))
}

/// Scopes the request must hold; empty when no rule matches.
pub fn required_scopes(rules: &[Rule], rule: Option<usize>) -> &[String] {
    rule.and_then(|i| rules.get(i))
        .map(|rule| rule.scopes.as_slice())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> Vec<Rule> {
        vec![
            Rule {
                path_prefix: "/orders".into(),
                methods: Some(vec!["POST".into(), "DELETE".into()]),
                scopes: vec!["orders:write".into()],
            },
            Rule {
                path_prefix: "/orders".into(),
                methods: None,
                scopes: vec!["orders:read".into()],
            },
            Rule {
                path_prefix: "/admin".into(),
                methods: None,
                scopes: vec!["admin".into(), "ops".into()],
            },
        ]
    }

    fn required<'r>(rules: &'r [Rule], method: &[u8], path: &[u8]) -> &'r [String] {
        required_scopes(rules, matching_rule(rules, method, path))
    }

    #[test]
    fn first_matching_rule_applies() {
        let r = rules();
        assert_eq!(required(&r, b"POST", b"/orders/1"), ["orders:write"]);
        assert_eq!(required(&r, b"GET", b"/orders/1"), ["orders:read"]);
        assert_eq!(required(&r, b"GET", b"/admin?x=/orders"), ["admin", "ops"]);
    }

    #[test]
    fn no_match_needs_nothing() {
        let r = rules();
        assert!(required(&r, b"GET", b"/public").is_empty());
        assert!(required(&r, b"GET", b"/x?/orders").is_empty());
        assert!(required(&[], b"GET", b"/orders").is_empty());
    }

    #[test]
    fn methods_compare_ignoring_case_and_head_is_get() {
        let r = rules();
        assert_eq!(required(&r, b"post", b"/orders"), ["orders:write"]);
        let reports = vec![Rule {
            path_prefix: "/reports".into(),
            methods: Some(vec!["GET".into()]),
            scopes: vec!["reports:read".into()],
        }];
        assert_eq!(required(&reports, b"HEAD", b"/reports/1"), ["reports:read"]);
        assert!(required(&reports, b"POST", b"/reports/1").is_empty());
    }

    #[test]
    fn the_review_s_bypasses_meet_the_rule() {
        let r = rules();
        for path in [
            "//orders",
            "/;x/orders",
            "/.;/orders",
            "/orders;v=1",
            "/Orders",
            "/%2Forders",
            "/x/../orders",
            "\\orders",
        ] {
            assert_eq!(
                required(&r, b"POST", path.as_bytes()),
                ["orders:write"],
                "{path}"
            );
        }
    }
}
