//! The relay's settings, already validated by `main` or the embedding code.

use std::fmt;
use std::time::Duration;

use ferry_common::handshake::Keepalive;

/// How the relay is set up.
#[derive(Debug, Clone)]
pub struct Config {
    /// The domain tunnels are subdomains of, lowercase, without a trailing
    /// dot: `localhost` or `relay.example.com`.
    pub domain: String,
    /// Tokens that clients and API callers must present; empty means the
    /// relay is open, as suits a relay on loopback.
    pub tokens: Vec<Token>,
    /// How long a tunnel may take to answer a public request with headers
    /// before the caller gets 504.
    pub request_timeout: Duration,
    /// Public requests one tunnel may have in flight; more get 503.
    pub max_requests_per_tunnel: usize,
    /// Tunnels one token may hold at once; more are refused with 429.
    pub max_tunnels_per_token: usize,
    /// How the relay pings each client to notice dead links.
    pub keepalive: Keepalive,
}

impl Config {
    /// The default for [`Config::request_timeout`]: above the client's own
    /// default local timeout, so that the client's clearer 504 comes first.
    pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
    /// The default for [`Config::max_requests_per_tunnel`]: below the
    /// client's HTTP/2 stream limit, so that no request queues unseen.
    pub const DEFAULT_MAX_REQUESTS_PER_TUNNEL: usize = 1000;
    /// The default for [`Config::max_tunnels_per_token`].
    pub const DEFAULT_MAX_TUNNELS_PER_TOKEN: usize = 32;
}

impl Default for Config {
    fn default() -> Self {
        Self {
            domain: "localhost".to_owned(),
            tokens: Vec::new(),
            request_timeout: Self::DEFAULT_REQUEST_TIMEOUT,
            max_requests_per_tunnel: Self::DEFAULT_MAX_REQUESTS_PER_TUNNEL,
            max_tunnels_per_token: Self::DEFAULT_MAX_TUNNELS_PER_TOKEN,
            keepalive: Keepalive::default(),
        }
    }
}

/// A secret bearer token. `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

impl Token {
    /// Wraps a token's text.
    pub fn new(text: impl Into<String>) -> Self {
        Self(text.into())
    }

    /// Compares in time independent of where the first difference is, so
    /// that response timing does not leak a token's prefix.
    pub fn matches(&self, presented: &str) -> bool {
        let (a, b) = (self.0.as_bytes(), presented.as_bytes());
        a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MASKED")
    }
}

#[cfg(test)]
mod tests {
    use super::Token;

    #[test]
    fn tokens_compare_exactly_and_never_print() {
        let token = Token::new("s3cret");
        assert!(token.matches("s3cret"));
        assert!(!token.matches("s3cre"));
        assert!(!token.matches("s3cret!"));
        assert!(!token.matches("S3cret"));
        assert_eq!(format!("{token:?}"), "MASKED");
    }
}
