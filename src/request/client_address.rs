//! The client address `brute_force` budgets are kept per: Envoy's `source.address`
//! without its port, and the network it counts as (`budget_network`).
use std::net::IpAddr;

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

/// The network whose budget `client` spends: its first `ipv4_prefix` or `ipv6_prefix`
/// bits, as text (`2001:db8:1:2::/64`). Every IPv6 client holds a /64 at least, so a
/// budget per address would be a budget per attempt. An address that does not parse is
/// its own network (it is what Envoy says the client is).
pub fn budget_network(client: &str, ipv4_prefix: u8, ipv6_prefix: u8) -> String {
    match client.parse::<IpAddr>() {
        Ok(IpAddr::V4(v4)) => {
            let bits = u32::from(v4) & mask_u32(ipv4_prefix);
            format!("{}/{ipv4_prefix}", std::net::Ipv4Addr::from(bits))
        }
        Ok(IpAddr::V6(v6)) => match v6.to_ipv4_mapped() {
            Some(v4) => budget_network(&v4.to_string(), ipv4_prefix, ipv6_prefix),
            None => {
                let bits = u128::from(v6) & mask_u128(ipv6_prefix);
                format!("{}/{ipv6_prefix}", std::net::Ipv6Addr::from(bits))
            }
        },
        Err(_) => client.to_string(),
    }
}

fn mask_u32(prefix: u8) -> u32 {
    u32::MAX
        .checked_shl(32 - u32::from(prefix.min(32)))
        .unwrap_or(0)
}

fn mask_u128(prefix: u8) -> u128 {
    u128::MAX
        .checked_shl(128 - u32::from(prefix.min(128)))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets_are_kept_per_network() {
        let net = |c| budget_network(c, 32, 64);
        assert_eq!(net("2001:db8:1:2:aaaa::1"), "2001:db8:1:2::/64");
        assert_eq!(net("2001:db8:1:2:bbbb::9"), "2001:db8:1:2::/64");
        assert_ne!(net("2001:db8:1:3::1"), net("2001:db8:1:2::1"));
        assert_eq!(net("10.0.0.7"), "10.0.0.7/32");
        assert_eq!(net("::ffff:10.0.0.7"), "10.0.0.7/32");
        assert_eq!(budget_network("10.0.9.7", 24, 64), "10.0.9.0/24");
        assert_eq!(budget_network("2001:db8::1", 32, 128), "2001:db8::1/128");
        assert_eq!(budget_network("2001:db8:ffff::1", 32, 32), "2001:db8::/32");
        assert_eq!(net("not an address"), "not an address");
    }

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
