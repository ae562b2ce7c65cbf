//! Durations and sizes as people type them on the command line: `30s`,
//! `5m`, `7d`; `64KiB`, `1MiB`, `1GiB`. Both binaries parse their flags
//! here, so units mean the same everywhere.

use std::time::Duration;

/// Parses a duration such as `30s`, `5m`, `1h30m` or `7d`. A bare number
/// is seconds, as the flags took before they had units.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if let Ok(seconds) = text.parse::<u64>() {
        return Ok(Duration::from_secs(seconds));
    }
    humantime::parse_duration(text)
        .map_err(|err| format!("`{text}` is not a duration ({err}): write it like 30s, 5m or 7d"))
}

/// Parses a size such as `64KiB`, `1MiB`, `1GiB` or `500kB`. A bare number
/// is bytes.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    text.parse::<bytesize::ByteSize>()
        .map(|size| size.as_u64())
        .map_err(|_| format!("`{text}` is not a size: write it like 64KiB, 1MiB or 1GiB"))
}

/// A duration as the flags take it: `7d`, `30s`, `250ms`.
pub fn format_duration(duration: Duration) -> String {
    humantime::format_duration(duration).to_string()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{parse_duration, parse_size};

    #[test]
    fn durations_take_units_and_bare_seconds() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("120"), Ok(Duration::from_secs(120)));
        let err = parse_duration("soon").unwrap_err();
        assert!(err.contains("like 30s"), "{err}");
    }

    #[test]
    fn sizes_take_units() {
        assert_eq!(parse_size("64KiB"), Ok(64 * 1024));
        assert_eq!(parse_size("1MiB"), Ok(1024 * 1024));
        assert_eq!(parse_size("1GiB"), Ok(1024 * 1024 * 1024));
        assert_eq!(parse_size("1000"), Ok(1000));
        assert!(parse_size("lots").is_err());
    }
}
