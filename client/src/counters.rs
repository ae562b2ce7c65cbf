//! The request counters of `ferry http`'s status block: how many requests
//! in total, how many per second over the last minute, and the median and
//! 90th percentile of their durations.
//!
//! Time is passed in as the time since the counters started, so that the
//! arithmetic is tested without clocks.

use std::time::Duration;

/// The rate is over this many seconds, in buckets of one second.
const RATE_WINDOW: usize = 60;
/// The percentiles are of this many most recent durations.
const DURATIONS_KEPT: usize = 1024;

/// Requests counted as they finish.
#[derive(Debug, Clone)]
pub struct Counters {
    /// Every request counted.
    total: u64,
    /// Requests per whole second since the start, a ring: second `s` is in
    /// `per_second[s % RATE_WINDOW]`.
    per_second: [u64; RATE_WINDOW],
    /// The newest second `per_second` holds.
    newest: u64,
    /// The most recent durations, a ring of up to [`DURATIONS_KEPT`].
    durations: Vec<Duration>,
    /// Where the next duration goes once the ring is full.
    next: usize,
}

impl Default for Counters {
    fn default() -> Self {
        Self::new()
    }
}

impl Counters {
    /// Counters with nothing counted.
    pub fn new() -> Self {
        Self {
            total: 0,
            per_second: [0; RATE_WINDOW],
            newest: 0,
            durations: Vec::new(),
            next: 0,
        }
    }

    /// Counts a request that finished at `at` (since the start) after
    /// `duration`.
    pub fn record(&mut self, at: Duration, duration: Duration) {
        self.count(at, 1);
        if self.durations.len() < DURATIONS_KEPT {
            self.durations.push(duration);
        } else {
            self.durations[self.next] = duration;
            self.next = (self.next + 1) % DURATIONS_KEPT;
        }
    }

    /// Counts `count` requests whose details were lost (the terminal fell
    /// behind): in the total and the rate, not in the percentiles.
    pub fn record_unseen(&mut self, at: Duration, count: u64) {
        self.count(at, count);
    }

    fn count(&mut self, at: Duration, count: u64) {
        self.total = self.total.saturating_add(count);
        self.advance(at.as_secs());
        // A time older than the window (clocks are monotonic, so never by
        // much) counts in its oldest second rather than a newer one's slot.
        let oldest = self.newest.saturating_sub(RATE_WINDOW as u64 - 1);
        let bucket = &mut self.per_second[second_slot(at.as_secs().max(oldest))];
        *bucket = bucket.saturating_add(count);
    }

    /// Moves the ring on to second `now`, emptying the seconds in between.
    fn advance(&mut self, now: u64) {
        if now <= self.newest {
            return;
        }
        let gap = (now - self.newest).min(RATE_WINDOW as u64);
        for second in now + 1 - gap..=now {
            self.per_second[second_slot(second)] = 0;
        }
        self.newest = now;
    }

    /// Every request counted.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Requests per second at `now` (since the start): those of the last
    /// minute, or since the start when that is shorter (but at least a
    /// second, so that the first request is not a spike).
    pub fn rate(&mut self, now: Duration) -> f64 {
        self.advance(now.as_secs());
        let counted: u64 = self.per_second.iter().sum();
        // The buckets hold the whole seconds now-59 … now-1 and the part
        // of second `now` gone by.
        let span = if now.as_secs() < RATE_WINDOW as u64 {
            now.as_secs_f64()
        } else {
            (RATE_WINDOW - 1) as f64 + f64::from(now.subsec_nanos()) / 1e9
        };
        counted as f64 / span.max(1.0)
    }

    /// The duration below which `fraction` (0.5 for the median) of the
    /// recent requests finished (nearest rank); `None` before any.
    pub fn percentile(&self, fraction: f64) -> Option<Duration> {
        if self.durations.is_empty() {
            return None;
        }
        let mut sorted = self.durations.clone();
        sorted.sort_unstable();
        let rank = (fraction.clamp(0.0, 1.0) * sorted.len() as f64).ceil() as usize;
        Some(sorted[rank.clamp(1, sorted.len()) - 1])
    }
}

fn second_slot(second: u64) -> usize {
    (second % RATE_WINDOW as u64) as usize
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{Counters, DURATIONS_KEPT};

    fn ms(millis: u64) -> Duration {
        Duration::from_millis(millis)
    }

    fn secs(seconds: f64) -> Duration {
        Duration::from_secs_f64(seconds)
    }

    #[test]
    fn percentiles_are_nearest_rank_of_the_durations() {
        let mut counters = Counters::new();
        assert_eq!(counters.percentile(0.5), None);
        counters.record(secs(0.1), ms(7));
        assert_eq!(counters.percentile(0.5), Some(ms(7)));
        assert_eq!(counters.percentile(0.9), Some(ms(7)));
        let mut counters = Counters::new();
        // 1 … 10 ms, out of order.
        for millis in [5, 3, 9, 1, 10, 2, 8, 4, 7, 6] {
            counters.record(secs(0.5), ms(millis));
        }
        assert_eq!(counters.percentile(0.5), Some(ms(5)));
        assert_eq!(counters.percentile(0.9), Some(ms(9)));
        assert_eq!(counters.percentile(1.0), Some(ms(10)));
        assert_eq!(counters.percentile(0.0), Some(ms(1)));
        assert_eq!(counters.total(), 10);
    }

    #[test]
    fn percentiles_forget_old_durations() {
        let mut counters = Counters::new();
        for _ in 0..DURATIONS_KEPT {
            counters.record(secs(1.0), ms(1000));
        }
        for _ in 0..DURATIONS_KEPT {
            counters.record(secs(2.0), ms(2));
        }
        assert_eq!(counters.percentile(0.9), Some(ms(2)));
        assert_eq!(counters.total(), 2 * DURATIONS_KEPT as u64);
    }

    #[test]
    fn the_rate_is_over_the_time_since_the_start_in_the_first_minute() {
        let mut counters = Counters::new();
        assert_eq!(counters.rate(secs(0.0)), 0.0);
        // The first request is not a spike of a thousand per second.
        counters.record(secs(0.001), ms(1));
        assert_eq!(counters.rate(secs(0.001)), 1.0);
        for i in 0..19 {
            counters.record(secs(1.0 + f64::from(i) * 0.5), ms(1));
        }
        assert_eq!(counters.rate(secs(10.0)), 2.0);
        assert_eq!(counters.rate(secs(40.0)), 0.5);
    }

    #[test]
    fn the_rate_is_over_the_last_minute_after_that() {
        let mut counters = Counters::new();
        // Ten a second for two minutes.
        for tenth in 0..1200 {
            counters.record(secs(f64::from(tenth) / 10.0 + 0.05), ms(1));
        }
        let rate = counters.rate(secs(120.0));
        assert!((rate - 10.0).abs() < 0.2, "{rate}");
        // Quiet for half a minute: half of that, then none.
        let rate = counters.rate(secs(150.0));
        assert!((rate - 5.0).abs() < 0.2, "{rate}");
        assert_eq!(counters.rate(secs(181.0)), 0.0);
        assert_eq!(counters.rate(secs(100_000.0)), 0.0);
        assert_eq!(counters.total(), 1200);
    }

    #[test]
    fn unseen_requests_count_in_the_total_and_rate_only() {
        let mut counters = Counters::new();
        counters.record(secs(1.0), ms(4));
        counters.record_unseen(secs(1.5), 9);
        assert_eq!(counters.total(), 10);
        assert_eq!(counters.rate(secs(2.0)), 5.0);
        assert_eq!(counters.percentile(0.9), Some(ms(4)));
    }

    #[test]
    fn a_late_count_lands_in_the_window() {
        let mut counters = Counters::new();
        counters.record(secs(5.0), ms(1));
        counters.record(secs(4.0), ms(1));
        assert_eq!(counters.rate(secs(5.0)), 2.0 / 5.0);
        counters.record(secs(100.0), ms(1));
        counters.record(secs(3.0), ms(1));
        assert_eq!(counters.rate(secs(100.0)), 2.0 / 59.0);
    }
}
