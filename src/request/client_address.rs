//! The client address `brute_force` budgets are kept per: Envoy's `source.address`
//! without its port.

/// `1.2.3.4:5678` → `1.2.3.4`; `[2001:db8::1]:5678` → `2001:db8::1`; an address
/// without a port is kept whole. `None` for nothing usable.
pub fn without_port(address: &[u8]) -> Option<String> {
    let address = std::str::from_utf8(address).ok()?.trim();
    let host = if let Some(bracketed) = address.strip_prefix('[') {
        bracketed.split_once(']').map(|(host, _)| host)?
    } else {
        match address.rsplit_once(':') {
            // One colon: IPv4 with a port. More: a bare IPv6 address.
            Some((host, _)) if !host.contains(':') => host,
            _ => address,
        }
    };
    (!host.is_empty()).then(|| host.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_the_port() {
        assert_eq!(without_port(b"10.0.0.7:51234").as_deref(), Some("10.0.0.7"));
        assert_eq!(
            without_port(b"[2001:db8::1]:443").as_deref(),
            Some("2001:db8::1")
        );
        assert_eq!(without_port(b"2001:db8::1").as_deref(), Some("2001:db8::1"));
        assert_eq!(without_port(b"10.0.0.7").as_deref(), Some("10.0.0.7"));
    }

    #[test]
    fn nothing_usable() {
        assert_eq!(without_port(b""), None);
        assert_eq!(without_port(b"[::1"), None);
        assert_eq!(without_port(b"\xff:1"), None);
    }
}
