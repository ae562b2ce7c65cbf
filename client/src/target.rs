//! The local server a tunnel forwards to, and how its Host header is set.

use std::fmt;

use hyper::header::HeaderValue;
use hyper::Uri;

/// Where requests are forwarded: scheme, host and port of the local server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// `http` or `https`.
    scheme: &'static str,
    /// `host:port`, with brackets around an IPv6 address.
    authority: String,
}

/// Why a TARGET argument was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{input}` is not a target: {why}. Use a port (3000), host:port (localhost:3000) or a URL (http://127.0.0.1:3000)")]
pub struct InvalidTarget {
    /// What was given.
    input: String,
    /// What is wrong with it.
    why: &'static str,
}

impl Target {
    /// Reads `3000`, `localhost:3000`, `http://127.0.0.1:3000` or
    /// `https://app.test:8443`.
    pub fn parse(input: &str) -> Result<Self, InvalidTarget> {
        let fail = |why| InvalidTarget {
            input: input.to_owned(),
            why,
        };
        let text = input.trim();
        if text.is_empty() {
            return Err(fail("it is empty"));
        }
        if text.bytes().all(|b| b.is_ascii_digit()) {
            let port =
                parse_port(text).ok_or_else(|| fail("a port is a number from 1 to 65535"))?;
            return Ok(Self {
                scheme: "http",
                authority: format!("localhost:{port}"),
            });
        }
        let (scheme, rest) = match text.split_once("://") {
            Some((scheme, rest)) => match scheme.to_ascii_lowercase().as_str() {
                "http" => ("http", rest),
                "https" => ("https", rest),
                _ => {
                    return Err(fail(
                        "only http:// and https:// targets can be forwarded to",
                    ))
                }
            },
            None => ("http", text),
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.contains(['/', '?', '#', '@']) {
            return Err(fail("a target is a server, without a path, query or user"));
        }
        let uri: Uri = format!("{scheme}://{rest}/")
            .parse()
            .map_err(|_| fail("the host or port is malformed"))?;
        let host = uri
            .host()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| fail("the host is missing"))?;
        // `http` reads `host:` and `host:abc` as having no port; a `:` after
        // the host (past an IPv6 address's `]`) means one was meant.
        let port_meant = rest
            .rsplit(']')
            .next()
            .is_some_and(|tail| tail.contains(':'));
        let port = match uri.port() {
            Some(port) => parse_port(port.as_str())
                .ok_or_else(|| fail("a port is a number from 1 to 65535"))?,
            None if port_meant => {
                return Err(fail("the port after `:` is missing or not a number"))
            }
            None if scheme == "https" => 443,
            None => 80,
        };
        Ok(Self {
            scheme,
            authority: format!("{host}:{port}"),
        })
    }

    /// `http` or `https`.
    pub fn scheme(&self) -> &'static str {
        self.scheme
    }

    /// `host:port`.
    pub fn authority(&self) -> &str {
        &self.authority
    }
}

fn parse_port(text: &str) -> Option<u16> {
    text.parse::<u16>().ok().filter(|port| *port != 0)
}

impl Default for Target {
    fn default() -> Self {
        Self {
            scheme: "http",
            authority: "localhost:3000".to_owned(),
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}", self.scheme, self.authority)
    }
}

/// What Host header the local server sees.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum HostHeader {
    /// The public host the caller used, as a proxy normally passes it on.
    #[default]
    Preserve,
    /// The target's `host:port`, for dev servers that check Host.
    Rewrite,
    /// A fixed value.
    Value(HeaderValue),
}

impl std::str::FromStr for HostHeader {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "preserve" => Ok(Self::Preserve),
            "rewrite" => Ok(Self::Rewrite),
            value if !value.is_empty() && !value.contains(char::is_whitespace) => {
                HeaderValue::from_str(value)
                    .map(Self::Value)
                    .map_err(|_| format!("`{value}` cannot be a Host header"))
            }
            _ => Err(format!("`{s}` is not preserve, rewrite or a host name")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{HostHeader, Target};

    fn target(input: &str) -> String {
        Target::parse(input).unwrap().to_string()
    }

    #[test]
    fn reads_ports_hosts_and_urls() {
        assert_eq!(target("3000"), "http://localhost:3000");
        assert_eq!(target("localhost:3000"), "http://localhost:3000");
        assert_eq!(target("http://127.0.0.1:3000"), "http://127.0.0.1:3000");
        assert_eq!(target("http://127.0.0.1:3000/"), "http://127.0.0.1:3000");
        assert_eq!(target("HTTPS://app.test"), "https://app.test:443");
        assert_eq!(target("http://app.test"), "http://app.test:80");
        assert_eq!(target("[::1]:8080"), "http://[::1]:8080");
    }

    #[test]
    fn refuses_absurd_targets() {
        for bad in [
            "",
            "0",
            "65536",
            "99999999999",
            "ftp://x:21",
            "http://",
            "localhost:",
            "localhost:abc",
            "http://x:3000/path",
            "http://u@x:1",
            "::::",
            "a b:1",
            "http://x:0",
        ] {
            let err = Target::parse(bad)
                .map(|t| t.to_string())
                .expect_err(bad)
                .to_string();
            assert!(err.contains("Use a port"), "{bad}: {err}");
        }
    }

    #[test]
    fn host_header_modes() {
        assert_eq!("preserve".parse(), Ok(HostHeader::Preserve));
        assert_eq!("rewrite".parse(), Ok(HostHeader::Rewrite));
        assert!(matches!("example.test".parse(), Ok(HostHeader::Value(_))));
        assert!("a b".parse::<HostHeader>().is_err());
        assert!("".parse::<HostHeader>().is_err());
    }
}
