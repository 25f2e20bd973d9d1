//! `allowed_cidrs`: the client addresses a key may be used from, parsed once when its
//! record arrives. IPv4 and IPv6 networks, or bare addresses (a /32 or a /128).
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    /// The network, with the bits past `prefix_len` cleared.
    pub network: IpAddr,
    pub prefix_len: u8,
}

impl Cidr {
    /// `203.0.113.0/24`, `2001:db8::/32`, `198.51.100.7`. Host bits past the prefix are
    /// allowed and ignored, as most tools do.
    pub fn parse(text: &str) -> Option<Cidr> {
        let (address, prefix_len) = match text.split_once('/') {
            Some((address, len)) if !len.is_empty() && len.bytes().all(|b| b.is_ascii_digit()) => {
                (address, Some(len.parse::<u8>().ok()?))
            }
            Some(_) => return None,
            None => (text, None),
        };
        let network: IpAddr = address.parse().ok()?;
        let max = bits(network);
        let prefix_len = prefix_len.unwrap_or(max);
        (prefix_len <= max).then(|| Cidr {
            network: masked(network, prefix_len),
            prefix_len,
        })
    }

    /// Whether `client` is inside. An IPv4 client seen as an IPv4-mapped IPv6 address
    /// (`::ffff:203.0.113.7`, as a dual-stack listener reports it) is its IPv4 address.
    pub fn contains(&self, client: IpAddr) -> bool {
        let client = client.to_canonical();
        bits(client) == bits(self.network) && masked(client, self.prefix_len) == self.network
    }

    /// 18 bytes: family (4 or 6), the network's 16 bytes (IPv4 in the first 4), and the
    /// prefix length, for the cache entry.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let mut octets = [0u8; 16];
        match self.network {
            IpAddr::V4(v4) => {
                out.push(4);
                octets[..4].copy_from_slice(&v4.octets());
            }
            IpAddr::V6(v6) => {
                out.push(6);
                octets = v6.octets();
            }
        }
        out.extend_from_slice(&octets);
        out.push(self.prefix_len);
    }

    pub fn decode(bytes: &[u8; 18]) -> Option<Cidr> {
        let (family, rest) = bytes.split_first()?;
        let octets: [u8; 16] = rest.get(..16)?.try_into().ok()?;
        let network = match family {
            4 => IpAddr::from(<[u8; 4]>::try_from(octets.get(..4)?).ok()?),
            6 => IpAddr::from(octets),
            _ => return None,
        };
        let prefix_len = *rest.get(16)?;
        (prefix_len <= bits(network)).then_some(Cidr {
            network,
            prefix_len,
        })
    }
}

fn bits(address: IpAddr) -> u8 {
    match address {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    }
}

fn masked(address: IpAddr, prefix_len: u8) -> IpAddr {
    match address {
        IpAddr::V4(v4) => {
            let mask = u32::MAX
                .checked_shl(32 - u32::from(prefix_len))
                .unwrap_or(0);
            IpAddr::from(Ipv4Addr::from(u32::from(v4) & mask))
        }
        IpAddr::V6(v6) => {
            let mask = u128::MAX
                .checked_shl(128 - u32::from(prefix_len))
                .unwrap_or(0);
            IpAddr::from(Ipv6Addr::from(u128::from(v6) & mask))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn networks_and_bare_addresses() {
        let net = Cidr::parse("203.0.113.0/24").unwrap();
        assert!(net.contains(ip("203.0.113.0")) && net.contains(ip("203.0.113.255")));
        assert!(!net.contains(ip("203.0.114.1")));
        let one = Cidr::parse("198.51.100.7").unwrap();
        assert_eq!(one.prefix_len, 32);
        assert!(one.contains(ip("198.51.100.7")) && !one.contains(ip("198.51.100.8")));
        let v6 = Cidr::parse("2001:db8::/32").unwrap();
        assert!(v6.contains(ip("2001:db8:ffff::1")) && !v6.contains(ip("2001:db9::1")));
        assert!(Cidr::parse("::1").unwrap().contains(ip("::1")));
        let all = Cidr::parse("0.0.0.0/0").unwrap();
        assert!(
            all.contains(ip("8.8.8.8")) && !all.contains(ip("::1")),
            "families apart"
        );
        assert_eq!(
            Cidr::parse("203.0.113.77/24"),
            Some(net),
            "host bits ignored"
        );
    }

    #[test]
    fn an_ipv4_client_seen_as_mapped_ipv6_is_its_ipv4_address() {
        let net = Cidr::parse("203.0.113.0/24").unwrap();
        assert!(net.contains(ip("::ffff:203.0.113.9")));
    }

    #[test]
    fn malformed_ones_are_refused() {
        for text in [
            "",
            "/24",
            "203.0.113.0/",
            "203.0.113.0/33",
            "2001:db8::/129",
            "203.0.113/24",
            "203.0.113.0/+8",
            "203.0.113.0/24/1",
            "example.com",
            " 203.0.113.0/24",
            "[::1]",
        ] {
            assert_eq!(Cidr::parse(text), None, "{text:?}");
        }
    }

    #[test]
    fn encoding_round_trips() {
        for text in ["203.0.113.0/24", "2001:db8::/32", "0.0.0.0/0", "::1"] {
            let cidr = Cidr::parse(text).unwrap();
            let mut out = Vec::new();
            cidr.encode(&mut out);
            assert_eq!(Cidr::decode(&out.try_into().unwrap()), Some(cidr), "{text}");
        }
        assert_eq!(Cidr::decode(&[5; 18]), None);
    }
}
