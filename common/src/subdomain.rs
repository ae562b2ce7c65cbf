//! Tunnel names: the `NAME` in `NAME.DOMAIN`.

use std::fmt;
use std::str::FromStr;

/// Names a client may not ask for, because they read as the relay's own hosts.
pub const RESERVED: &[&str] = &[
    "www",
    "api",
    "app",
    "admin",
    "dashboard",
    "relay",
    "status",
    "mail",
    "ftp",
    "ns1",
    "ns2",
    "localhost",
    "ferry",
];

/// The longest DNS label (RFC 1035 §2.3.4).
pub const MAX_LEN: usize = 63;

const ADJECTIVES: &[&str] = &[
    "amber", "brave", "bright", "calm", "clever", "cosy", "crisp", "curious", "daring", "eager",
    "fancy", "fuzzy", "gentle", "glad", "golden", "happy", "humble", "jolly", "keen", "kind",
    "lively", "lucky", "merry", "misty", "nimble", "noble", "patient", "plucky", "proud", "quick",
    "quiet", "rapid", "rosy", "rusty", "shiny", "silent", "silver", "sleepy", "snowy", "sunny",
    "swift", "tidy", "vivid", "warm", "wild", "witty", "young", "zesty",
];

const ANIMALS: &[&str] = &[
    "badger", "bear", "beaver", "bison", "crane", "deer", "dolphin", "eagle", "falcon", "ferret",
    "finch", "fox", "gecko", "heron", "ibex", "jackal", "koala", "lark", "lemur", "lynx", "marten",
    "mole", "moose", "newt", "orca", "otter", "owl", "panda", "puffin", "quail", "rabbit", "raven",
    "robin", "salmon", "seal", "sparrow", "stoat", "swan", "tapir", "tiger", "toad", "trout",
    "turtle", "walrus", "whale", "wolf", "wombat", "yak", "zebra",
];

/// A validated tunnel name: one DNS label of `a-z`, `0-9` and `-`, lowercase.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Subdomain(String);

/// Why a requested name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidSubdomain {
    /// The name was empty.
    #[error("the subdomain is empty: pass a name such as `my-app`")]
    Empty,
    /// The name was longer than a DNS label may be.
    #[error("the subdomain `{0}` is longer than {MAX_LEN} characters")]
    TooLong(String),
    /// The name held a character other than a-z, 0-9 and `-`.
    #[error("the subdomain `{0}` may only contain a-z, 0-9 and `-`")]
    BadCharacter(String),
    /// The name started or ended with a hyphen.
    #[error("the subdomain `{0}` may not start or end with `-`")]
    EdgeHyphen(String),
    /// The name is kept for the relay itself.
    #[error("the subdomain `{0}` is reserved: choose another name")]
    Reserved(String),
}

impl Subdomain {
    /// Validates `name` as a tunnel name. Upper case is folded to lower case,
    /// since DNS names are case-insensitive.
    pub fn parse(name: &str) -> Result<Self, InvalidSubdomain> {
        let name = name.to_ascii_lowercase();
        if name.is_empty() {
            return Err(InvalidSubdomain::Empty);
        }
        if name.len() > MAX_LEN {
            return Err(InvalidSubdomain::TooLong(name));
        }
        if !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err(InvalidSubdomain::BadCharacter(name));
        }
        if name.starts_with('-') || name.ends_with('-') {
            return Err(InvalidSubdomain::EdgeHyphen(name));
        }
        if RESERVED.contains(&name.as_str()) {
            return Err(InvalidSubdomain::Reserved(name));
        }
        Ok(Self(name))
    }

    /// A random memorable name such as `brave-otter`; `attempt` above zero
    /// appends a number, for when the short names are taken.
    pub fn random(attempt: u32) -> Self {
        let adjective = ADJECTIVES[rand::random_range(0..ADJECTIVES.len())];
        let animal = ANIMALS[rand::random_range(0..ANIMALS.len())];
        if attempt == 0 {
            Self(format!("{adjective}-{animal}"))
        } else {
            let number: u32 = rand::random_range(10..10_000);
            Self(format!("{adjective}-{animal}-{number}"))
        }
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Subdomain {
    type Err = InvalidSubdomain;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for Subdomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::{InvalidSubdomain, Subdomain};

    #[test]
    fn accepts_dns_labels_and_folds_case() {
        assert_eq!(
            Subdomain::parse("My-App2").map(|s| s.0),
            Ok("my-app2".into())
        );
        assert!(Subdomain::parse(&"a".repeat(63)).is_ok());
    }

    #[test]
    fn refuses_what_is_not_a_label() {
        assert_eq!(Subdomain::parse(""), Err(InvalidSubdomain::Empty));
        assert!(matches!(
            Subdomain::parse(&"a".repeat(64)),
            Err(InvalidSubdomain::TooLong(_))
        ));
        for bad in ["a.b", "a_b", "ä", "a b", "a/b"] {
            assert!(
                matches!(
                    Subdomain::parse(bad),
                    Err(InvalidSubdomain::BadCharacter(_))
                ),
                "{bad}"
            );
        }
        assert!(matches!(
            Subdomain::parse("-a"),
            Err(InvalidSubdomain::EdgeHyphen(_))
        ));
        assert!(matches!(
            Subdomain::parse("a-"),
            Err(InvalidSubdomain::EdgeHyphen(_))
        ));
        assert!(matches!(
            Subdomain::parse("WWW"),
            Err(InvalidSubdomain::Reserved(_))
        ));
    }

    #[test]
    fn random_names_are_valid() {
        for attempt in 0..200 {
            let name = Subdomain::random(attempt % 3);
            assert_eq!(Subdomain::parse(name.as_str()), Ok(name));
        }
    }
}
