//! Scope rules: the first rule whose path prefix and method match says which scopes a
//! request needs.
use crate::config::Rule;
use crate::request::query::split_path;

/// Index of the rule that applies, if any. `path` is `:path` with or without its query,
/// which is never part of the match.
pub fn matching_rule(rules: &[Rule], method: &[u8], path: &[u8]) -> Option<usize> {
    let (path, _) = split_path(path);
    rules.iter().position(|rule| {
        path.starts_with(rule.path_prefix.as_bytes())
            && rule
                .methods
                .as_ref()
                .is_none_or(|methods| methods.iter().any(|m| m.as_bytes() == method))
    })
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
    fn methods_are_compared_exactly() {
        let r = rules();
        assert_eq!(required(&r, b"post", b"/orders"), ["orders:read"]);
    }
}
