//! Reading a URL's host as a browser would, so that every spelling of an
//! address is judged as the address it means.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// A URL's host, as the relay reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Host {
    /// An address, however it was written.
    Ip(IpAddr),
    /// A name to resolve: lowercase, without a trailing dot.
    Name(String),
}

/// Reads a host as a browser would (the WHATWG URL standard): `[v6]`, an
/// IPv4 address in any form `inet_aton` takes (`2130706433`, `0177.0.0.1`,
/// `0x7f.1`, `127.1`), or a name. A numeric host is read here rather than
/// left to the resolver, so that it is judged as the address it means even
/// where the resolver would read it differently or not at all.
pub(super) fn parse_host(host: &str) -> Result<Host, String> {
    if let Some(inner) = host.strip_prefix('[') {
        return inner
            .strip_suffix(']')
            .and_then(|inner| inner.parse::<Ipv6Addr>().ok())
            .map(|ip| Host::Ip(IpAddr::V6(ip)))
            .ok_or_else(|| format!("has `{host}`, which is not an IPv6 address"));
    }
    let lower = host.to_ascii_lowercase();
    let name = lower.strip_suffix('.').unwrap_or(&lower);
    if name.is_empty() || name.len() > 253 {
        return Err("has no valid host name".to_owned());
    }
    let last = name.rsplit('.').next().unwrap_or(name);
    if ends_in_number(last) {
        return parse_ipv4(name)
            .map(|ip| Host::Ip(IpAddr::V4(ip)))
            .ok_or_else(|| format!("has `{host}`, which is neither a host name nor an address"));
    }
    let label_ok = |label: &str| {
        !label.is_empty()
            && label.len() <= 63
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    if !name.split('.').all(label_ok) {
        return Err(format!("has `{host}`, which is not a valid host name"));
    }
    Ok(Host::Name(name.to_owned()))
}

/// Whether a host's last label is a number (decimal, or hex after `0x`):
/// then the host is an IPv4 address or invalid, never a name.
fn ends_in_number(label: &str) -> bool {
    match label.strip_prefix("0x") {
        Some(hex) => hex.bytes().all(|b| b.is_ascii_hexdigit()),
        None => !label.is_empty() && label.bytes().all(|b| b.is_ascii_digit()),
    }
}

/// An IPv4 address of one to four parts, each decimal, octal (leading 0)
/// or hex (`0x`); the last part fills the bytes that remain.
fn parse_ipv4(text: &str) -> Option<Ipv4Addr> {
    let numbers = text
        .split('.')
        .map(parse_ipv4_number)
        .collect::<Option<Vec<u64>>>()?;
    let (last, leading) = numbers.split_last()?;
    if numbers.len() > 4 || leading.iter().any(|&n| n > 255) {
        return None;
    }
    let room = 8 * (5 - numbers.len() as u32);
    if *last >= 1u64 << room {
        return None;
    }
    let value = leading
        .iter()
        .enumerate()
        .fold(*last, |value, (i, &n)| value | n << (24 - 8 * i));
    u32::try_from(value).ok().map(Ipv4Addr::from)
}

fn parse_ipv4_number(part: &str) -> Option<u64> {
    let (digits, radix) = if let Some(hex) = part.strip_prefix("0x") {
        (hex, 16)
    } else if part.len() > 1 && part.starts_with('0') {
        (&part[1..], 8)
    } else {
        (part, 10)
    };
    if part.is_empty() || !digits.bytes().all(|b| (b as char).is_digit(radix)) {
        return None;
    }
    if digits.is_empty() {
        // `0x` alone is zero, as browsers read it.
        return Some(0);
    }
    u64::from_str_radix(digits, radix).ok()
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::{parse_host, Host};

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn numeric_hosts_are_read_as_the_address_they_mean() {
        let loopback = Host::Ip(ip("127.0.0.1"));
        for host in [
            "2130706433",
            "0177.0.0.1",
            "0x7f.1",
            "0X7F.0.0.1",
            "127.1",
            "127.0.1",
            "0x7f000001",
            "017700000001",
            "127.0.0.1.",
            "[::ffff:7f00:1]",
            "[::ffff:127.0.0.1]",
        ] {
            let parsed = parse_host(host).unwrap();
            let canonical = match parsed {
                Host::Ip(addr) => Host::Ip(addr.to_canonical()),
                other => other,
            };
            assert_eq!(canonical, loopback, "{host}");
        }
        assert_eq!(parse_host("0x").unwrap(), Host::Ip(ip("0.0.0.0")));
        assert_eq!(parse_host("[::1]").unwrap(), Host::Ip(ip("::1")));
        assert_eq!(parse_host("10.0.0.1").unwrap(), Host::Ip(ip("10.0.0.1")));
    }

    #[test]
    fn names_are_lowercased_and_lose_their_trailing_dot() {
        assert_eq!(
            parse_host("Hooks.Example.COM.").unwrap(),
            Host::Name("hooks.example.com".to_owned())
        );
        assert_eq!(
            parse_host("0x7f.example").unwrap(),
            Host::Name("0x7f.example".to_owned()),
            "a name whose last label is not a number is a name"
        );
    }

    #[test]
    fn hosts_that_are_neither_names_nor_addresses_are_refused() {
        for host in [
            "",
            ".",
            "1.2.3.4.5",
            "256.0.0.1",
            "127.0.0.256",
            "127.16777216",
            "4294967296",
            "08.0.0.1",
            "0x7g.0.0.1",
            "1..1",
            "example.123",
            "a..b",
            "exa mple.com",
            "exa%41mple.com",
            "[::1",
            "[127.0.0.1]",
            "[fe80::1%25eth0]",
        ] {
            assert!(parse_host(host).is_err(), "{host:?} was accepted");
        }
    }
}
