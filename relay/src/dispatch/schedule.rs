//! When a failed delivery is tried again: a fixed schedule with jitter, or
//! the receiver's `Retry-After` when it asks for one.

use std::str::FromStr;
use std::time::{Duration, SystemTime};

use hyper::header::{HeaderMap, RETRY_AFTER};

/// The longest wait a `Retry-After` may ask for: longer waits fall back to
/// the schedule.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 3600);

/// The waits before each attempt: the first is the wait before the first
/// attempt (normally none), so the schedule's length is the number of
/// attempts a delivery gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetrySchedule(Vec<Duration>);

impl RetrySchedule {
    /// Now, 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h: eight attempts over
    /// about a day and a quarter.
    pub fn standard() -> Self {
        let minutes = |m: u64| Duration::from_secs(m * 60);
        Self(vec![
            Duration::ZERO,
            Duration::from_secs(5),
            minutes(5),
            minutes(30),
            minutes(120),
            minutes(300),
            minutes(600),
            minutes(600),
        ])
    }

    /// Attempts a delivery gets.
    pub fn attempts(&self) -> u32 {
        u32::try_from(self.0.len()).unwrap_or(u32::MAX)
    }

    /// The wait before attempt `made + 1`, with up to a tenth of it added
    /// or taken at random so that deliveries failed together spread out;
    /// `None` when `made` attempts are all it gets.
    pub fn wait_after(&self, made: u32) -> Option<Duration> {
        let base = *self.0.get(usize::try_from(made).ok()?)?;
        let spread = base.as_secs_f64() / 10.0;
        let jitter = if spread > 0.0 {
            rand::random_range(-spread..spread)
        } else {
            0.0
        };
        Some(Duration::from_secs_f64(
            (base.as_secs_f64() + jitter).max(0.0),
        ))
    }
}

impl FromStr for RetrySchedule {
    type Err = String;

    /// Comma-separated durations (`0,5s,5m,30m`): one per attempt.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let waits = text
            .split(',')
            .map(|part| {
                let part = part.trim();
                if part == "0" {
                    return Ok(Duration::ZERO);
                }
                humantime::parse_duration(part).map_err(|err| {
                    format!(
                        "`{part}` in the retry schedule is not a duration such as 5s or 2h: {err}"
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        if waits.is_empty() || waits.len() > 100 {
            return Err("a retry schedule has 1 to 100 waits, such as 0,5s,5m".to_owned());
        }
        Ok(Self(waits))
    }
}

/// The wait a 429, 502, 503 or 504 asks for in `Retry-After` (seconds or
/// an HTTP date), if it is sensible.
pub fn retry_after(status: u16, headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    if !matches!(status, 429 | 502 | 503 | 504) {
        return None;
    }
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    let wait = match value.parse::<u64>() {
        Ok(seconds) => Duration::from_secs(seconds),
        Err(_) => httpdate(value)?
            .duration_since(now)
            .unwrap_or(Duration::ZERO),
    };
    (wait <= MAX_RETRY_AFTER).then_some(wait)
}

/// An IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`), the form HTTP dates
/// are sent in.
fn httpdate(value: &str) -> Option<SystemTime> {
    let rest = value.split_once(", ")?.1;
    let rest = rest.strip_suffix(" GMT")?;
    let mut parts = rest.split(' ');
    let (day, month, year, time) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let month = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ]
    .iter()
    .position(|m| *m == month)?
        + 1;
    humantime::parse_rfc3339(&format!("{year}-{month:02}-{day:0>2}T{time}Z")).ok()
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    use hyper::header::{HeaderMap, HeaderValue, RETRY_AFTER};

    use super::{retry_after, RetrySchedule};

    #[test]
    fn the_standard_schedule_has_eight_attempts_with_bounded_jitter() {
        let schedule = RetrySchedule::standard();
        assert_eq!(schedule.attempts(), 8);
        assert_eq!(schedule.wait_after(0), Some(Duration::ZERO));
        for _ in 0..100 {
            let wait = schedule.wait_after(2).expect("a third attempt");
            assert!((270.0..=330.0).contains(&wait.as_secs_f64()), "{wait:?}");
        }
        assert_eq!(schedule.wait_after(8), None);
    }

    #[test]
    fn schedules_parse_from_durations() {
        let schedule: RetrySchedule = "0, 1s,2m".parse().expect("valid");
        assert_eq!(schedule.attempts(), 3);
        assert!("0,soon".parse::<RetrySchedule>().is_err());
        assert!("".parse::<RetrySchedule>().is_err());
    }

    #[test]
    fn retry_after_is_read_as_seconds_or_a_date_for_the_statuses_that_send_it() {
        let mut headers = HeaderMap::new();
        headers.insert(RETRY_AFTER, HeaderValue::from_static("120"));
        let now = UNIX_EPOCH + Duration::from_secs(784_111_777);
        assert_eq!(
            retry_after(503, &headers, now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(retry_after(500, &headers, now), None);
        headers.insert(
            RETRY_AFTER,
            HeaderValue::from_static("Sun, 06 Nov 1994 08:50:37 GMT"),
        );
        assert_eq!(
            retry_after(429, &headers, now),
            Some(Duration::from_secs(60))
        );
        headers.insert(RETRY_AFTER, HeaderValue::from_static("999999999"));
        assert_eq!(retry_after(429, &headers, SystemTime::now()), None);
    }
}
