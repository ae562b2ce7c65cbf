//! The relay's settings, already validated by `main` or the embedding code.

use std::fmt;

/// How the relay is set up.
#[derive(Debug, Clone)]
pub struct Config {
    /// The domain tunnels are subdomains of, lowercase, without a trailing
    /// dot: `localhost` or `relay.example.com`.
    pub domain: String,
    /// Tokens that clients and API callers must present; empty means the
    /// relay is open, as suits a relay on loopback.
    pub tokens: Vec<Token>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            domain: "localhost".to_owned(),
            tokens: Vec::new(),
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
