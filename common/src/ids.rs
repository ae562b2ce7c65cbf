//! Ids that leave the process: unique across restarts and sortable by time.

use std::fmt;
use std::str::FromStr;

/// The relay's id for one exchange: a public request to a tunnel name and
/// its answer, whoever gave it (the client, or the relay itself with a 404,
/// 503 or 504). A UUIDv7, so ids sort by the time they were allocated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ExchangeId(uuid::Uuid);

impl ExchangeId {
    /// A new id, later than every id this process allocated before.
    pub fn new() -> Self {
        Self(uuid::Uuid::now_v7())
    }
}

impl Default for ExchangeId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for ExchangeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

/// Text that is not an exchange id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not an exchange id")]
pub struct InvalidId(String);

impl FromStr for ExchangeId {
    type Err = InvalidId;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        uuid::Uuid::try_parse(text)
            .ok()
            .filter(|id| id.get_version_num() == 7)
            .map(Self)
            .ok_or_else(|| InvalidId(text.chars().take(64).collect()))
    }
}

#[cfg(test)]
mod tests {
    use super::ExchangeId;

    #[test]
    fn ids_sort_by_allocation_and_round_trip_as_text() {
        let ids: Vec<ExchangeId> = (0..1000).map(|_| ExchangeId::new()).collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]));
        let text: Vec<String> = ids.iter().map(ToString::to_string).collect();
        assert!(text.windows(2).all(|w| w[0] < w[1]), "text sorts too");
        assert_eq!(text[0].parse::<ExchangeId>(), Ok(ids[0]));
        assert!("not-an-id".parse::<ExchangeId>().is_err());
        // A UUID of another version is not one of ours.
        assert!("67e55044-10b1-426f-9247-bb680e5fe0c8"
            .parse::<ExchangeId>()
            .is_err());
    }
}
