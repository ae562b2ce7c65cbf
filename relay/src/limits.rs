//! Per-caller limits: what one IP address may hold or do at a time.
//!
//! Callers are keyed by [`IpKey`]: an IPv4 address, or the /64 an IPv6
//! address belongs to, since one IPv6 host commonly has a whole /64 to pick
//! addresses from.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// How many callers a limiter tracks before it forgets idle ones.
const TRACKED_CALLERS: usize = 65_536;

/// One caller, for limits: an IPv4 address or an IPv6 /64.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IpKey(u128);

impl From<IpAddr> for IpKey {
    fn from(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => Self(u128::from(u32::from(v4))),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Self(u128::from(u32::from(v4))),
                None => Self((u128::from(v6) >> 64) << 64 | 1 << 63),
            },
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Counts what each caller holds at once (connections, requests in flight),
/// up to a per-caller limit.
#[derive(Debug)]
pub struct PerIp {
    /// What each caller holds now; callers holding nothing are removed.
    held: Mutex<HashMap<IpKey, usize>>,
    /// The most one caller may hold.
    limit: usize,
}

/// One unit a caller holds; dropping it gives the unit back.
#[derive(Debug)]
pub struct PerIpGuard {
    /// The counter it belongs to.
    owner: Arc<PerIp>,
    /// Whose unit it is.
    key: IpKey,
}

impl PerIp {
    /// A counter allowing `limit` units per caller.
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self {
            held: Mutex::default(),
            limit,
        })
    }

    /// The most one caller may hold.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// One more unit for `ip`, or `None` when it holds its limit.
    pub fn acquire(self: &Arc<Self>, ip: IpAddr) -> Option<PerIpGuard> {
        let key = IpKey::from(ip);
        let mut held = lock(&self.held);
        let count = held.entry(key).or_insert(0);
        if *count >= self.limit {
            return None;
        }
        *count += 1;
        Some(PerIpGuard {
            owner: Arc::clone(self),
            key,
        })
    }
}

impl Drop for PerIpGuard {
    fn drop(&mut self) {
        let mut held = lock(&self.owner.held);
        if let Some(count) = held.get_mut(&self.key) {
            *count -= 1;
            if *count == 0 {
                held.remove(&self.key);
            }
        }
    }
}

/// A token bucket per caller: `per_minute` events a minute, in bursts of up
/// to `per_minute`. Written here rather than taken from a rate-limiting
/// crate because the failed-token throttle must ask whether a caller is
/// blocked without spending anything (only failures spend), which the
/// keyed limiters on crates.io do not offer.
#[derive(Debug)]
pub struct RateLimit {
    /// Each caller's tokens and when they were last counted.
    buckets: Mutex<HashMap<IpKey, (f64, Instant)>>,
    /// Events per minute, also the bucket's size.
    per_minute: f64,
}

impl RateLimit {
    /// A limiter allowing `per_minute` events a minute per caller.
    pub fn per_minute(per_minute: u32) -> Self {
        Self {
            buckets: Mutex::default(),
            per_minute: f64::from(per_minute.max(1)),
        }
    }

    fn refill(&self, tokens: f64, since: Instant, now: Instant) -> f64 {
        let earned = now.duration_since(since).as_secs_f64() * self.per_minute / 60.0;
        (tokens + earned).min(self.per_minute)
    }

    /// How long until `ip` may act again; `None` when it may now. Spends
    /// nothing.
    pub fn blocked(&self, ip: IpAddr) -> Option<Duration> {
        let now = Instant::now();
        let buckets = lock(&self.buckets);
        let &(tokens, since) = buckets.get(&IpKey::from(ip))?;
        let tokens = self.refill(tokens, since, now);
        (tokens < 1.0).then(|| Duration::from_secs_f64((1.0 - tokens) * 60.0 / self.per_minute))
    }

    /// Spends one event for `ip`; `Err` with the wait when it has none left.
    pub fn spend(&self, ip: IpAddr) -> Result<(), Duration> {
        let now = Instant::now();
        let mut buckets = lock(&self.buckets);
        if buckets.len() >= TRACKED_CALLERS {
            // Callers whose bucket has refilled are as good as new.
            let full = self.per_minute;
            buckets.retain(|_, (tokens, since)| self.refill(*tokens, *since, now) < full);
        }
        let (tokens, since) = buckets
            .entry(IpKey::from(ip))
            .or_insert((self.per_minute, now));
        let available = self.refill(*tokens, *since, now);
        *since = now;
        if available < 1.0 {
            *tokens = available;
            return Err(Duration::from_secs_f64(
                (1.0 - available) * 60.0 / self.per_minute,
            ));
        }
        *tokens = available - 1.0;
        Ok(())
    }
}

/// One token bucket, unkeyed: `per_second` events a second in bursts of up
/// to `burst`. A tunnel owns its own, so no keyed limiter (and no crate such
/// as `governor`, with its clock and map dependencies) is needed for it.
#[derive(Debug)]
pub struct Bucket {
    /// Tokens left and when they were last counted.
    state: Mutex<(f64, Instant)>,
    /// Tokens earned per second.
    per_second: f64,
    /// The most tokens the bucket holds.
    burst: f64,
}

impl Bucket {
    /// A full bucket earning `per_second` tokens a second, holding `burst`.
    pub fn new(per_second: u32, burst: u32) -> Self {
        let burst = f64::from(burst.max(1));
        Self {
            state: Mutex::new((burst, Instant::now())),
            per_second: f64::from(per_second.max(1)),
            burst,
        }
    }

    /// Spends one token; `Err` with the wait until the next when none is left.
    pub fn spend(&self) -> Result<(), Duration> {
        let now = Instant::now();
        let mut state = lock(&self.state);
        let (tokens, since) = *state;
        let available =
            (tokens + now.duration_since(since).as_secs_f64() * self.per_second).min(self.burst);
        if available < 1.0 {
            *state = (available, now);
            return Err(Duration::from_secs_f64((1.0 - available) / self.per_second));
        }
        *state = (available - 1.0, now);
        Ok(())
    }
}

/// One caller's tokens, when they were last counted, and when a refusal of
/// it was last noted.
type CallerBucket = (f64, Instant, Option<Instant>);

/// How many spends pass between sweeps of refilled callers, so a table
/// grown by a burst of callers shrinks again once they are gone.
const SWEEP_EVERY: u32 = 1024;

/// The callers one tunnel tracks, and the bucket shared by those it has no
/// room for.
#[derive(Debug)]
struct Callers {
    /// Each caller's tokens, when they were last counted, and when a refusal
    /// of it was last noted.
    tracked: HashMap<IpKey, CallerBucket>,
    /// One bucket for every caller that finds the table full.
    overflow: CallerBucket,
    /// Spends since the last sweep.
    spends: u32,
}

/// A token bucket per caller of one tunnel: each may take `per_second`
/// events a second in bursts of up to `burst`. At most `tracked` callers are
/// kept; callers whose bucket has refilled are forgotten when the table is
/// full and every `SWEEP_EVERY` spends, and callers that still find no room
/// share one more bucket of the same size, so memory stays bounded whatever
/// a flood does and no caller goes unlimited.
#[derive(Debug)]
pub struct PerIpRate {
    callers: Mutex<Callers>,
    /// Tokens each caller earns per second.
    per_second: f64,
    /// The most tokens one caller's bucket holds.
    burst: f64,
    /// The most callers kept.
    tracked: usize,
}

impl PerIpRate {
    /// Full buckets earning `per_second` tokens a second, holding `burst`,
    /// for up to `tracked` callers.
    pub fn new(per_second: u32, burst: u32, tracked: usize) -> Self {
        let burst = f64::from(burst.max(1));
        Self {
            callers: Mutex::new(Callers {
                tracked: HashMap::new(),
                overflow: (burst, Instant::now(), None),
                spends: 0,
            }),
            per_second: f64::from(per_second.max(1)),
            burst,
            tracked,
        }
    }

    fn refill(&self, tokens: f64, since: Instant, now: Instant) -> f64 {
        (tokens + now.duration_since(since).as_secs_f64() * self.per_second).min(self.burst)
    }

    /// Forgets the callers whose bucket has refilled: they are as if new.
    fn sweep(&self, tracked: &mut HashMap<IpKey, CallerBucket>, now: Instant) {
        tracked.retain(|_, (tokens, since, _)| self.refill(*tokens, *since, now) < self.burst);
    }

    /// Spends one token of `ip`'s; `Err` with the wait until its next when
    /// it has none left.
    pub fn spend(&self, ip: IpAddr) -> Result<(), Duration> {
        self.spend_at(ip, Instant::now())
    }

    /// [`Self::spend`] at `now`.
    fn spend_at(&self, ip: IpAddr, now: Instant) -> Result<(), Duration> {
        let key = IpKey::from(ip);
        let mut callers = lock(&self.callers);
        let callers = &mut *callers;
        callers.spends += 1;
        if callers.spends >= SWEEP_EVERY {
            callers.spends = 0;
            self.sweep(&mut callers.tracked, now);
            // Give back what a past burst of callers grew the table to.
            if callers.tracked.capacity() > 2 * callers.tracked.len().max(16) {
                callers.tracked.shrink_to(callers.tracked.len());
            }
        }
        if callers.tracked.len() >= self.tracked && !callers.tracked.contains_key(&key) {
            self.sweep(&mut callers.tracked, now);
        }
        let (tokens, since, _) =
            if callers.tracked.len() >= self.tracked && !callers.tracked.contains_key(&key) {
                &mut callers.overflow
            } else {
                callers
                    .tracked
                    .entry(key)
                    .or_insert((self.burst, now, None))
            };
        let available = self.refill(*tokens, *since, now);
        *since = now;
        if available < 1.0 {
            *tokens = available;
            return Err(Duration::from_secs_f64((1.0 - available) / self.per_second));
        }
        *tokens = available - 1.0;
        Ok(())
    }

    /// Whether a refusal of `ip` is worth noting: true at most once a
    /// second per tracked caller, and once a second for all the callers
    /// sharing the overflow bucket.
    pub fn note_refusal(&self, ip: IpAddr) -> bool {
        self.note_refusal_at(ip, Instant::now())
    }

    /// [`Self::note_refusal`] at `now`.
    fn note_refusal_at(&self, ip: IpAddr, now: Instant) -> bool {
        let mut callers = lock(&self.callers);
        let callers = &mut *callers;
        let (_, _, noted) = match callers.tracked.get_mut(&IpKey::from(ip)) {
            Some(bucket) => bucket,
            None => &mut callers.overflow,
        };
        if noted.is_some_and(|at| now.duration_since(at) < Duration::from_secs(1)) {
            return false;
        }
        *noted = Some(now);
        true
    }

    /// How many callers are tracked, and room for how many is held.
    #[cfg(test)]
    fn size(&self) -> (usize, usize) {
        let callers = lock(&self.callers);
        (callers.tracked.len(), callers.tracked.capacity())
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;
    use std::time::{Duration, Instant};

    use super::{Bucket, IpKey, PerIp, PerIpRate, RateLimit};

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn ipv6_callers_are_keyed_by_their_64() {
        assert_eq!(
            IpKey::from(ip("2001:db8::1")),
            IpKey::from(ip("2001:db8::2"))
        );
        assert_ne!(
            IpKey::from(ip("2001:db8::1")),
            IpKey::from(ip("2001:db8:0:1::1"))
        );
        assert_eq!(
            IpKey::from(ip("::ffff:192.0.2.1")),
            IpKey::from(ip("192.0.2.1"))
        );
        assert_ne!(IpKey::from(ip("192.0.2.1")), IpKey::from(ip("192.0.2.2")));
    }

    #[test]
    fn per_ip_units_are_limited_and_given_back() {
        let counter = PerIp::new(2);
        let a = counter.acquire(ip("192.0.2.1")).unwrap();
        let _b = counter.acquire(ip("192.0.2.1")).unwrap();
        assert!(counter.acquire(ip("192.0.2.1")).is_none());
        assert!(
            counter.acquire(ip("192.0.2.2")).is_some(),
            "others are not affected"
        );
        drop(a);
        assert!(counter.acquire(ip("192.0.2.1")).is_some());
    }

    #[test]
    fn rate_limits_spend_per_caller_and_peeking_is_free() {
        let limit = RateLimit::per_minute(3);
        for _ in 0..3 {
            assert_eq!(limit.blocked(ip("192.0.2.1")), None);
            limit.spend(ip("192.0.2.1")).unwrap();
        }
        let wait = limit.spend(ip("192.0.2.1")).unwrap_err();
        assert!(
            wait.as_secs_f64() > 10.0 && wait.as_secs_f64() <= 20.0,
            "{wait:?}"
        );
        assert!(limit.blocked(ip("192.0.2.1")).is_some());
        assert_eq!(limit.blocked(ip("192.0.2.2")), None);
        limit.spend(ip("192.0.2.2")).unwrap();
    }

    #[test]
    fn a_bucket_allows_its_burst_then_its_rate() {
        let bucket = Bucket::new(10, 3);
        for _ in 0..3 {
            bucket.spend().unwrap();
        }
        let wait = bucket.spend().unwrap_err();
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_millis(100),
            "{wait:?}"
        );
    }

    #[test]
    fn per_caller_rates_are_separate_noted_once_a_second_and_bounded() {
        // Fixed instants: a stalled test machine must not refill a bucket.
        let start = Instant::now();
        let at = |millis| start + Duration::from_millis(millis);
        let rate = PerIpRate::new(1, 2, 2);
        rate.spend_at(ip("192.0.2.1"), at(0)).unwrap();
        rate.spend_at(ip("192.0.2.1"), at(0)).unwrap();
        assert_eq!(
            rate.spend_at(ip("192.0.2.1"), at(0)),
            Err(Duration::from_secs(1))
        );
        assert!(rate.note_refusal_at(ip("192.0.2.1"), at(0)));
        assert!(
            !rate.note_refusal_at(ip("192.0.2.1"), at(999)),
            "once a second"
        );
        assert!(rate.note_refusal_at(ip("192.0.2.1"), at(1000)));
        rate.spend_at(ip("192.0.2.2"), at(0)).unwrap();
        assert!(
            rate.spend_at(ip("192.0.2.1"), at(0)).is_err(),
            "still remembered"
        );
    }

    #[test]
    fn callers_the_table_has_no_room_for_share_one_bucket() {
        let start = Instant::now();
        let at = |millis| start + Duration::from_millis(millis);
        let rate = PerIpRate::new(1, 2, 2);
        rate.spend_at(ip("192.0.2.1"), at(0)).unwrap();
        rate.spend_at(ip("192.0.2.2"), at(0)).unwrap();
        // The attack: a flood from addresses the full table cannot track
        // is held to one caller's share, not let through unlimited.
        rate.spend_at(ip("192.0.2.3"), at(0)).unwrap();
        rate.spend_at(ip("2001:db8::1"), at(0)).unwrap();
        assert!(rate.spend_at(ip("192.0.2.4"), at(0)).is_err());
        assert!(rate.spend_at(ip("192.0.2.3"), at(0)).is_err());
        assert!(rate.note_refusal_at(ip("192.0.2.3"), at(0)));
        assert!(
            !rate.note_refusal_at(ip("192.0.2.4"), at(500)),
            "noted once a second for all of them"
        );
        // Once the tracked callers have refilled they are forgotten, and a
        // new caller gets a bucket of its own again.
        rate.spend_at(ip("192.0.2.5"), at(2000)).unwrap();
        rate.spend_at(ip("192.0.2.5"), at(2000)).unwrap();
        assert!(rate.spend_at(ip("192.0.2.5"), at(2000)).is_err());
        rate.spend_at(ip("192.0.2.6"), at(2000)).unwrap();
    }

    #[test]
    fn a_table_grown_by_many_callers_shrinks_once_they_have_refilled() {
        let start = Instant::now();
        let rate = PerIpRate::new(1, 2, 4096);
        for n in 0..1000_u32 {
            let caller = IpAddr::from(std::net::Ipv4Addr::from(0xc000_0000 + n));
            rate.spend_at(caller, start).unwrap();
        }
        assert_eq!(rate.size().0, 1000);
        // Two seconds on, every bucket is full again: the next spends
        // sweep those callers out and give their memory back.
        let later = start + Duration::from_secs(2);
        for _ in 0..super::SWEEP_EVERY {
            let _ = rate.spend_at(ip("198.51.100.1"), later);
        }
        let (tracked, room) = rate.size();
        assert!(
            tracked <= 1 && room < 64,
            "{tracked} tracked, room for {room}"
        );
    }
}
