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

/// The network whose budget `client` spends, as bytes to name its budget by: its first
/// `ipv4_prefix` or `ipv6_prefix` bits, and the prefix. Every IPv6 client holds a /64 at
/// least, so a budget per address would be a budget per attempt. An address that does not
/// parse is its own network (it is what Envoy says the client is). No text formatting:
/// the `.wasm` pays for every formatter it carries.
pub fn budget_network(client: &str, ipv4_prefix: u8, ipv6_prefix: u8) -> Vec<u8> {
    let v4 = |v4: std::net::Ipv4Addr| {
        let bits = u32::from(v4) & mask_u32(ipv4_prefix);
        [&[4, ipv4_prefix][..], &bits.to_be_bytes()].concat()
    };
    match client.parse::<IpAddr>() {
        Ok(IpAddr::V4(address)) => v4(address),
        Ok(IpAddr::V6(v6)) => match v6.to_ipv4_mapped() {
            Some(address) => v4(address),
            None => {
                let bits = u128::from(v6) & mask_u128(ipv6_prefix);
                [&[6, ipv6_prefix][..], &bits.to_be_bytes()].concat()
            }
        },
        Err(_) => client.as_bytes().to_vec(),
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
        let v6 = |prefix: u8, address: &str| {
            let bits = u128::from(address.parse::<std::net::Ipv6Addr>().unwrap());
            [&[6, prefix][..], &bits.to_be_bytes()].concat()
        };
        assert_eq!(net("2001:db8:1:2:aaaa::1"), v6(64, "2001:db8:1:2::"));
        assert_eq!(net("2001:db8:1:2:bbbb::9"), v6(64, "2001:db8:1:2::"));
        assert_ne!(net("2001:db8:1:3::1"), net("2001:db8:1:2::1"));
        assert_eq!(net("10.0.0.7"), [4, 32, 10, 0, 0, 7]);
        assert_eq!(net("::ffff:10.0.0.7"), [4, 32, 10, 0, 0, 7]);
        assert_eq!(budget_network("10.0.9.7", 24, 64), [4, 24, 10, 0, 9, 0]);
        assert_eq!(
            budget_network("2001:db8::1", 32, 128),
            v6(128, "2001:db8::1")
        );
        assert_eq!(
            budget_network("2001:db8:ffff::1", 32, 32),
            v6(32, "2001:db8::")
        );
        assert_ne!(
            budget_network("2001:db8::", 32, 32),
            budget_network("2001:db8::", 32, 33)
        );
        assert_eq!(net("not an address"), b"not an address");
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
