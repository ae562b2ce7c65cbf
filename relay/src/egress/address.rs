//! Which addresses the egress guard refuses by default: everything that is
//! not a public unicast address, after IANA's special-purpose registries.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};

const LOOPBACK: &str = "a loopback address";
const PRIVATE: &str = "a private address";
const LINK_LOCAL: &str = "a link-local address";
const MULTICAST: &str = "a multicast address";
const DOCUMENTATION: &str = "a documentation address";
const BENCHMARKING: &str = "a benchmarking address";
const UNSPECIFIED: &str = "the unspecified address";
const RESERVED: &str = "a reserved address";
const PROTOCOL: &str = "an address reserved for protocol assignments";

const fn v4(a: u8, b: u8, c: u8, d: u8, prefix: u8) -> Ipv4Net {
    Ipv4Net::new_assert(Ipv4Addr::new(a, b, c, d), prefix)
}

const fn v6(s: [u16; 8], prefix: u8) -> Ipv6Net {
    Ipv6Net::new_assert(
        Ipv6Addr::new(s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7]),
        prefix,
    )
}

/// IPv4 ranges refused by default, the narrower before the wider that
/// holds them (IANA's special-purpose address registry).
const V4_REFUSED: &[(Ipv4Net, &str)] = &[
    (v4(0, 0, 0, 0, 32), UNSPECIFIED),
    (v4(0, 0, 0, 0, 8), "a \"this network\" address"),
    (v4(10, 0, 0, 0, 8), PRIVATE),
    (
        v4(100, 64, 0, 0, 10),
        "a shared (carrier-grade NAT) address",
    ),
    (v4(127, 0, 0, 0, 8), LOOPBACK),
    (v4(169, 254, 0, 0, 16), LINK_LOCAL),
    (v4(172, 16, 0, 0, 12), PRIVATE),
    (v4(192, 0, 0, 0, 24), PROTOCOL),
    (v4(192, 0, 2, 0, 24), DOCUMENTATION),
    (v4(192, 88, 99, 0, 24), "a deprecated 6to4 relay address"),
    (v4(192, 168, 0, 0, 16), PRIVATE),
    (v4(198, 18, 0, 0, 15), BENCHMARKING),
    (v4(198, 51, 100, 0, 24), DOCUMENTATION),
    (v4(203, 0, 113, 0, 24), DOCUMENTATION),
    (v4(224, 0, 0, 0, 4), MULTICAST),
    (v4(255, 255, 255, 255, 32), "the broadcast address"),
    (v4(240, 0, 0, 0, 4), RESERVED),
];

/// IPv6 ranges refused by default, the narrower before the wider.
const V6_REFUSED: &[(Ipv6Net, &str)] = &[
    (v6([0, 0, 0, 0, 0, 0, 0, 0], 128), UNSPECIFIED),
    (v6([0, 0, 0, 0, 0, 0, 0, 1], 128), LOOPBACK),
    (
        v6([0, 0, 0, 0, 0, 0, 0, 0], 96),
        "an IPv4-compatible address, a deprecated form",
    ),
    (
        v6([0x64, 0xff9b, 1, 0, 0, 0, 0, 0], 48),
        "a local-use translation address",
    ),
    (
        v6([0x100, 0, 0, 0, 0, 0, 0, 0], 64),
        "a discard-only address",
    ),
    (
        v6([0x2001, 0, 0, 0, 0, 0, 0, 0], 32),
        "a Teredo tunnel address",
    ),
    (v6([0x2001, 2, 0, 0, 0, 0, 0, 0], 48), BENCHMARKING),
    (v6([0x2001, 0, 0, 0, 0, 0, 0, 0], 23), PROTOCOL),
    (v6([0x2001, 0xdb8, 0, 0, 0, 0, 0, 0], 32), DOCUMENTATION),
    (v6([0x3fff, 0, 0, 0, 0, 0, 0, 0], 20), DOCUMENTATION),
    (
        v6([0x5f00, 0, 0, 0, 0, 0, 0, 0], 16),
        "a segment-routing address",
    ),
    (v6([0xfc00, 0, 0, 0, 0, 0, 0, 0], 7), PRIVATE),
    (v6([0xfe80, 0, 0, 0, 0, 0, 0, 0], 10), LINK_LOCAL),
    (
        v6([0xfec0, 0, 0, 0, 0, 0, 0, 0], 10),
        "a site-local address, a deprecated form",
    ),
    (v6([0xff00, 0, 0, 0, 0, 0, 0, 0], 8), MULTICAST),
];

/// All public IPv6 unicast space; the rest is unassigned or special.
const V6_GLOBAL_UNICAST: Ipv6Net = v6([0x2000, 0, 0, 0, 0, 0, 0, 0], 3);
/// NAT64's well-known prefix: the last 32 bits are the IPv4 address.
const V6_NAT64: Ipv6Net = v6([0x64, 0xff9b, 0, 0, 0, 0, 0, 0], 96);
/// 6to4: bits 16 to 48 are the IPv4 address.
const V6_6TO4: Ipv6Net = v6([0x2002, 0, 0, 0, 0, 0, 0, 0], 16);

/// Why the guard refuses `ip` by default (`"a loopback address"`), or
/// `None` for a public address. An IPv6 address that carries an IPv4 one
/// (mapped, NAT64, 6to4) is judged as that IPv4 address.
pub fn refusal(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(ip) => V4_REFUSED
            .iter()
            .find(|(net, _)| net.contains(&ip))
            .map(|(_, why)| *why),
        IpAddr::V6(ip) => {
            if let Some(embedded) = embedded_v4(ip) {
                return refusal(IpAddr::V4(embedded));
            }
            V6_REFUSED
                .iter()
                .find(|(net, _)| net.contains(&ip))
                .map(|(_, why)| *why)
                .or_else(|| (!V6_GLOBAL_UNICAST.contains(&ip)).then_some(RESERVED))
        }
    }
}

/// The IPv4 address an IPv6 address reaches through, if it carries one.
fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let o = ip.octets();
    if let Some(mapped) = ip.to_ipv4_mapped() {
        Some(mapped)
    } else if V6_NAT64.contains(&ip) {
        Some(Ipv4Addr::new(o[12], o[13], o[14], o[15]))
    } else if V6_6TO4.contains(&ip) {
        Some(Ipv4Addr::new(o[2], o[3], o[4], o[5]))
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::refusal;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn non_public_addresses_are_refused_with_their_kind() {
        let refused = [
            ("127.0.0.1", "loopback"),
            ("127.255.255.254", "loopback"),
            ("::1", "loopback"),
            ("10.1.2.3", "private"),
            ("172.16.0.1", "private"),
            ("172.31.255.255", "private"),
            ("192.168.1.1", "private"),
            ("fc00::1", "private"),
            ("fd12:3456::1", "private"),
            ("169.254.169.254", "link-local"),
            ("fe80::1", "link-local"),
            ("100.64.0.1", "carrier-grade NAT"),
            ("100.127.255.255", "carrier-grade NAT"),
            ("224.0.0.1", "multicast"),
            ("239.255.255.250", "multicast"),
            ("ff02::1", "multicast"),
            ("192.0.2.1", "documentation"),
            ("198.51.100.7", "documentation"),
            ("203.0.113.9", "documentation"),
            ("2001:db8::1", "documentation"),
            ("3fff::1", "documentation"),
            ("198.18.0.1", "benchmarking"),
            ("198.19.255.255", "benchmarking"),
            ("2001:2::1", "benchmarking"),
            ("240.0.0.1", "reserved"),
            ("255.255.255.255", "broadcast"),
            ("0.0.0.0", "unspecified"),
            ("0.1.2.3", "this network"),
            ("::", "unspecified"),
            ("192.0.0.8", "protocol assignments"),
            ("2001:20::1", "protocol assignments"),
            ("2001::1", "Teredo"),
            ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "Teredo"),
            ("fec0::1", "site-local"),
            ("100::1", "discard"),
            ("64:ff9b:1::a00:1", "translation"),
            ("::7f00:1", "IPv4-compatible"),
            ("::8.8.8.8", "IPv4-compatible"),
            ("4000::1", "reserved"),
            ("5f00::1", "segment-routing"),
            // IPv6 forms that reach an IPv4 address are judged by it.
            ("::ffff:127.0.0.1", "loopback"),
            ("::ffff:7f00:1", "loopback"),
            ("::ffff:10.0.0.1", "private"),
            ("::ffff:169.254.169.254", "link-local"),
            ("64:ff9b::7f00:1", "loopback"),
            ("64:ff9b::192.168.0.1", "private"),
            ("2002:7f00:1::1", "loopback"),
            ("2002:a9fe:a9fe::", "link-local"),
        ];
        for (addr, kind) in refused {
            let why = refusal(ip(addr)).unwrap_or_else(|| panic!("{addr} passed"));
            assert!(why.contains(kind), "{addr}: {why}, expected {kind}");
        }
    }

    #[test]
    fn public_addresses_pass() {
        for addr in [
            "93.184.216.34",
            "8.8.8.8",
            "1.1.1.1",
            "172.32.0.1",
            "100.128.0.1",
            "192.0.3.1",
            "223.255.255.255",
            "2606:4700::1111",
            "2a00:1450:4001::200e",
            "::ffff:93.184.216.34",
            "64:ff9b::808:808",
            "2002:808:808::1",
        ] {
            assert_eq!(refusal(ip(addr)), None, "{addr}");
        }
    }
}
