//! The webhook dispatcher: events fan out to the webhooks that listen to
//! them as deliveries in a durable queue ([`crate::store::Webhooks`]), and
//! workers attempt them as Standard Webhooks requests, signed, retried on
//! a schedule, each attempt recorded in the activity log.
//!
//! - A delivery to a URL goes out through the egress guard.
//! - A delivery to a tunnel on this relay (`http(s)://NAME.DOMAIN/…`) goes
//!   through the tunnel, with no network hop. While the tunnel's client is
//!   offline and its owner holds the name, its deliveries wait without
//!   spending attempts, and drain one at a time, in order, when it is back.
//!
//! One scheduler claims due deliveries under a global and a per-webhook
//! limit; each attempt runs as its own task; one finisher stores results
//! in batches and wakes the scheduler.

pub mod catalogue;
pub mod schedule;
pub mod sign;

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use ferry_common::handshake::meta::RequestMeta;
use ferry_common::ids::ExchangeId;
use ferry_common::subdomain::Subdomain;
use http_body_util::BodyExt;
use hyper::header::{self, HeaderName, HeaderValue};
use hyper::{HeaderMap, Method, Request, Uri};
use tokio::sync::{mpsc, Notify, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::activity::capture::{headers_of, Capture, Recorder, Side};
use crate::activity::replay::{failure_of_egress, failure_of_send, record_response};
use crate::cluster::Cluster;
use crate::egress::Egress;
use crate::full;
use crate::store::postgres::SessionHolder;
use crate::store::{
    now_micros, AttemptRecord, CapturedBody, Claimed, DispatchRef, Exchange, Finished, Kind,
    Micros, Next, Outcome, WebhookRecord, Webhooks,
};
use crate::tunnels::{Owner, Tunnels};

use schedule::RetrySchedule;

/// Deliveries one claim takes at most.
const CLAIM_BATCH: usize = 256;
/// Results the finisher stores in one transaction at most.
const FINISH_BATCH: usize = 512;
/// How often an idle scheduler looks at the queue anyway, and how often
/// webhooks waiting for an offline tunnel are looked at.
const IDLE_CHECK: Duration = Duration::from_secs(1);
/// The shortest wait of a scheduler that found due deliveries it could not
/// take, so that it never spins.
const MIN_WAIT: Duration = Duration::from_millis(20);
/// How long a claim holds a delivery beyond the attempt's timeout.
const LEASE_MARGIN: Duration = Duration::from_secs(60);
/// How long an account's count of pending deliveries is trusted.
const PENDING_RECOUNT: Duration = Duration::from_secs(1);
/// Accounts whose pending count is kept at most; the cache starts over
/// beyond.
const PENDING_CACHE: usize = 10_000;
/// Event ids remembered per account.
pub const DEDUP_WINDOW: Duration = Duration::from_secs(24 * 3600);
/// How long the secret before a rotation keeps signing.
pub const ROTATION_OVERLAP: Duration = Duration::from_secs(24 * 3600);

/// Headers the dispatcher sets on every delivery, which a webhook's own
/// headers may not replace.
pub const RESERVED_HEADERS: &[&str] = &[
    "webhook-id",
    "webhook-timestamp",
    "webhook-signature",
    ferry_common::headers::EVENT_TYPE,
    "content-type",
    "content-length",
    "transfer-encoding",
    "host",
    "connection",
    "keep-alive",
    "upgrade",
    "te",
    "trailer",
    "proxy-connection",
];

/// How the dispatcher works; every field has a relay flag.
#[derive(Debug, Clone)]
pub struct Settings {
    /// How long one attempt may take, response body included.
    pub timeout: Duration,
    /// Attempts in flight at once, for all webhooks.
    pub concurrency: usize,
    /// Attempts in flight at once for one webhook (1 for an ordered one).
    pub per_webhook: usize,
    /// Attempts in flight at once for one account's webhooks, so that one
    /// account's slow receivers leave room for everyone else's.
    pub per_account: usize,
    /// Pending deliveries one account may have; events beyond get 429.
    pub max_pending: u64,
    /// The waits before each attempt.
    pub schedule: RetrySchedule,
    /// A webhook whose deliveries only failed for this long is disabled.
    pub disable_after: Duration,
    /// The operator's event types, `(name, description)`.
    pub event_types: Vec<(String, String)>,
}

impl Settings {
    /// The default for [`Settings::timeout`].
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(15);
    /// The default for [`Settings::concurrency`].
    pub const DEFAULT_CONCURRENCY: usize = 64;
    /// The default for [`Settings::per_webhook`].
    pub const DEFAULT_PER_WEBHOOK: usize = 16;
    /// The default for [`Settings::per_account`]: half the slots.
    pub const DEFAULT_PER_ACCOUNT: usize = 32;
    /// The default for [`Settings::max_pending`].
    pub const DEFAULT_MAX_PENDING: u64 = 100_000;
    /// The default for [`Settings::disable_after`].
    pub const DEFAULT_DISABLE_AFTER: Duration = Duration::from_secs(5 * 86_400);
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            timeout: Self::DEFAULT_TIMEOUT,
            concurrency: Self::DEFAULT_CONCURRENCY,
            per_webhook: Self::DEFAULT_PER_WEBHOOK,
            per_account: Self::DEFAULT_PER_ACCOUNT,
            max_pending: Self::DEFAULT_MAX_PENDING,
            schedule: RetrySchedule::standard(),
            disable_after: Self::DEFAULT_DISABLE_AFTER,
            event_types: Vec::new(),
        }
    }
}

/// Wall-clock time that advances with tokio's clock, so that tests with
/// paused time see the schedule unfold in virtual hours.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    /// The wall clock at `start`.
    wall: Micros,
    /// When the clock was made.
    start: tokio::time::Instant,
}

impl Clock {
    /// A clock reading the wall clock now.
    pub fn new() -> Self {
        Self {
            wall: now_micros(),
            start: tokio::time::Instant::now(),
        }
    }

    /// The time now.
    pub fn now(&self) -> Micros {
        let elapsed = i64::try_from(self.start.elapsed().as_micros()).unwrap_or(i64::MAX);
        self.wall.saturating_add(elapsed)
    }

    /// The tokio instant at which it will be `at`.
    fn instant_of(&self, at: Micros) -> tokio::time::Instant {
        let offset = u64::try_from(at.saturating_sub(self.wall)).unwrap_or(0);
        self.start + Duration::from_micros(offset)
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

/// Where a webhook's URL leads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A tunnel on this relay.
    Tunnel(Subdomain),
    /// Anywhere else, through the egress guard.
    Url,
}

/// Whether a webhook of `owner` may deliver into a tunnel of `holder`: on
/// a relay without tokens webhooks have no owner and may use any tunnel.
pub fn may_use(owner: &str, holder: &Owner) -> bool {
    owner.is_empty() || holder.key() == owner
}

/// Counters served at `/metrics`.
#[derive(Debug, Default)]
pub struct DispatchStats {
    /// Attempts made.
    pub attempts: AtomicU64,
    /// Deliveries that succeeded.
    pub succeeded: AtomicU64,
    /// Deliveries that failed for good.
    pub failed: AtomicU64,
    /// Times a store write of the queue failed.
    pub store_errors: AtomicU64,
}

/// What an attempt task hands the finisher.
enum Done {
    /// The attempt was made: store it.
    Attempted {
        /// The result.
        finished: Finished,
        /// The webhook, for its in-flight count.
        webhook: String,
        /// Its slot of the global limit.
        _permit: OwnedSemaphorePermit,
    },
    /// The tunnel it goes into is offline but held: no attempt.
    Deferred {
        /// The delivery and its claim's lease.
        delivery: (String, Micros),
        /// The webhook, paused until the tunnel is back.
        webhook: String,
        /// The tunnel.
        tunnel: Subdomain,
        /// Its slot of the global limit.
        _permit: OwnedSemaphorePermit,
    },
}

/// What the scheduler knows of webhooks between claims.
#[derive(Default)]
struct Busy {
    /// Attempts in flight per webhook.
    in_flight: HashMap<String, usize>,
    /// Webhooks waiting for their offline tunnel.
    paused: HashMap<String, Subdomain>,
    /// Webhooks whose tunnel came back: one delivery at a time until the
    /// backlog is gone, so it arrives in order.
    draining: HashSet<String>,
    /// Ordered webhooks.
    ordered: HashSet<String>,
    /// Each webhook's owner, as claims showed it.
    owners: HashMap<String, String>,
    /// Attempts in flight per owner.
    owner_in_flight: HashMap<String, usize>,
}

/// The dispatcher.
pub struct Dispatcher {
    /// The queue and the webhooks.
    store: Arc<dyn Webhooks>,
    /// Everything sent to a URL passes it.
    egress: Egress,
    /// Records each attempt in the activity log.
    recorder: Recorder,
    /// Tunnels, for deliveries into them.
    tunnels: Arc<Tunnels>,
    /// The fleet this relay belongs to, for deliveries into tunnels another
    /// relay serves.
    cluster: Option<Arc<Cluster>>,
    /// The relay's domain: `NAME.DOMAIN` URLs are tunnels.
    domain: String,
    /// Limits and schedule.
    settings: Settings,
    /// The known event types.
    catalogue: catalogue::Catalogue,
    /// The time.
    clock: Clock,
    /// Wakes the scheduler: an event was queued, an attempt finished.
    wake: Notify,
    /// The global limit's slots.
    permits: Arc<Semaphore>,
    /// In-flight counts and paused webhooks.
    busy: Mutex<Busy>,
    /// Results on their way to the store.
    done: mpsc::UnboundedSender<Done>,
    /// The finisher's end, taken by [`Dispatcher::run`].
    done_rx: Mutex<Option<mpsc::UnboundedReceiver<Done>>>,
    /// Counters.
    stats: DispatchStats,
    /// Each account's pending deliveries, and when they were counted.
    pending: Mutex<HashMap<String, (tokio::time::Instant, u64)>>,
    /// Held while a webhook or event type is counted and added, so that
    /// concurrent calls cannot pass a per-account cap together.
    adding: tokio::sync::Mutex<()>,
}

impl Dispatcher {
    /// A dispatcher over `store`; nothing is sent until [`Dispatcher::run`].
    pub fn new(
        store: Arc<dyn Webhooks>,
        egress: Egress,
        recorder: Recorder,
        (tunnels, cluster): (Arc<Tunnels>, Option<Arc<Cluster>>),
        domain: &str,
        settings: Settings,
    ) -> Arc<Self> {
        let (done, done_rx) = mpsc::unbounded_channel();
        Arc::new(Self {
            store,
            egress,
            recorder,
            tunnels,
            cluster,
            domain: domain.to_ascii_lowercase(),
            catalogue: catalogue::Catalogue::new(settings.event_types.clone()),
            permits: Arc::new(Semaphore::new(settings.concurrency.max(1))),
            settings,
            clock: Clock::new(),
            wake: Notify::new(),
            busy: Mutex::default(),
            done,
            done_rx: Mutex::new(Some(done_rx)),
            stats: DispatchStats::default(),
            adding: tokio::sync::Mutex::new(()),
            pending: Mutex::default(),
        })
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn Webhooks> {
        &self.store
    }

    /// The settings.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The built-in and operator event types.
    pub fn catalogue(&self) -> &catalogue::Catalogue {
        &self.catalogue
    }

    /// The time, as the dispatcher reads it.
    pub fn now(&self) -> Micros {
        self.clock.now()
    }

    /// The counters.
    pub fn stats(&self) -> &DispatchStats {
        &self.stats
    }

    /// Looks at the queue now: call after queueing deliveries.
    pub fn poke(&self) {
        self.wake.notify_one();
    }

    /// Waits for the right to count and add webhooks or event types.
    pub async fn adding(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.adding.lock().await
    }

    /// The relay's domain.
    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// Where `url` leads: a tunnel of this relay, or elsewhere. A trailing
    /// dot names the same host, as ingress reads it.
    pub fn target_of(&self, url: &Uri) -> Target {
        let host = url
            .host()
            .unwrap_or_default()
            .trim_end_matches('.')
            .to_ascii_lowercase();
        host.strip_suffix(&self.domain)
            .and_then(|rest| rest.strip_suffix('.'))
            .and_then(|name| name.parse::<Subdomain>().ok())
            .map_or(Target::Url, Target::Tunnel)
    }

    /// The owner of tunnel `name` now, live or held here, or live on another
    /// relay of the fleet.
    pub async fn tunnel_owner(&self, name: &Subdomain) -> Option<Owner> {
        if let Some(owner) = self.tunnels.owner_of(name) {
            return Some(owner);
        }
        // Served by another relay of the fleet; a registry that does not
        // answer knows of no owner.
        match self.elsewhere(name).await {
            Ok(holder) => holder.map(|holder| Owner::from_key(&holder.owner)),
            Err(err) => {
                tracing::warn!(%err, tunnel = %name, "the fleet's registry did not answer");
                None
            }
        }
    }

    fn busy(&self) -> std::sync::MutexGuard<'_, Busy> {
        self.busy.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn limit_of(&self, busy: &Busy, webhook: &str) -> usize {
        if busy.ordered.contains(webhook) || busy.draining.contains(webhook) {
            1
        } else {
            self.settings.per_webhook.max(1)
        }
    }

    /// Webhooks the next claim leaves alone: at their limit, their owner's,
    /// or paused.
    fn skip_list(&self) -> Vec<String> {
        let busy = self.busy();
        let mut skip: Vec<String> = busy.paused.keys().cloned().collect();
        skip.extend(
            busy.in_flight
                .iter()
                .filter(|(webhook, count)| **count >= self.limit_of(&busy, webhook))
                .map(|(webhook, _)| webhook.clone()),
        );
        skip.extend(
            busy.owners
                .iter()
                .filter(|(_, owner)| self.owner_full(&busy, owner))
                .map(|(webhook, _)| webhook.clone()),
        );
        skip
    }

    fn owner_full(&self, busy: &Busy, owner: &str) -> bool {
        busy.owner_in_flight.get(owner).copied().unwrap_or(0) >= self.settings.per_account.max(1)
    }

    /// Whether `owner` may queue more deliveries (the count if not). The
    /// pending count is read at most once a second, so a flood of events
    /// costs one count a second; what was queued since is added to it.
    pub async fn pending_room(&self, owner: &str) -> Result<(), u64> {
        let now = tokio::time::Instant::now();
        let cached = self
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(owner)
            .filter(|(at, _)| now.duration_since(*at) < PENDING_RECOUNT)
            .map(|(_, count)| *count);
        let count = match cached {
            Some(count) => count,
            None => {
                let count = self.store.pending(owner).await.unwrap_or(0);
                let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
                if pending.len() > PENDING_CACHE {
                    pending.clear();
                }
                pending.insert(owner.to_owned(), (now, count));
                count
            }
        };
        if count >= self.settings.max_pending {
            Err(count)
        } else {
            Ok(())
        }
    }

    /// Counts `queued` more pending deliveries of `owner` until the next
    /// recount.
    pub fn queued(&self, owner: &str, queued: u64) {
        if let Some((_, count)) = self
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get_mut(owner)
        {
            *count += queued;
        }
    }

    /// Sends due deliveries until `shutdown`, then waits for the attempts
    /// in flight (each bounded by the timeout) and stores their results.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let Some(done_rx) = self
            .done_rx
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        else {
            return;
        };
        // Nothing is in flight at start: leases left by a process that died
        // are given back, and those deliveries are attempted again.
        match self.store.release_all().await {
            Ok(0) => {}
            Ok(released) => tracing::info!(
                released,
                "deliveries in flight when the relay stopped are queued again"
            ),
            Err(err) => tracing::warn!(%err, "cannot release the delivery queue's leases"),
        }
        let finisher = tokio::spawn(Arc::clone(&self).finish_loop(done_rx));
        while !shutdown.is_cancelled() {
            let wait = self.schedule_round().await;
            tokio::select! {
                () = self.wake.notified() => {}
                () = tokio::time::sleep_until(wait) => {}
                () = shutdown.cancelled() => {}
            }
        }
        // Every attempt holds a permit until its result is stored.
        let all = u32::try_from(self.settings.concurrency.max(1)).unwrap_or(u32::MAX);
        let _ = tokio::time::timeout(
            self.settings.timeout + Duration::from_secs(5),
            self.permits.acquire_many(all),
        )
        .await;
        finisher.abort();
    }

    /// One round: looks at paused webhooks, claims what is due and starts
    /// it; returns when to look again at the latest.
    async fn schedule_round(self: &Arc<Self>) -> tokio::time::Instant {
        let now_instant = tokio::time::Instant::now();
        self.check_paused().await;
        let free = self.permits.available_permits().min(CLAIM_BATCH);
        if free == 0 {
            return now_instant + IDLE_CHECK;
        }
        let skip = self.skip_list();
        let now = self.clock.now();
        let lease =
            now + i64::try_from((self.settings.timeout + LEASE_MARGIN).as_micros()).unwrap_or(0);
        let claimed = match self.store.claim(now, free, lease, skip).await {
            Ok(claimed) => claimed,
            Err(err) => {
                self.stats.store_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%err, "cannot read the delivery queue; trying again");
                return now_instant + IDLE_CHECK;
            }
        };
        let full_batch = claimed.len() == free;
        let started = self.start(claimed).await;
        if full_batch {
            return now_instant;
        }
        self.end_drains(&started);
        let next = self
            .store
            .next_due(self.clock.now(), self.skip_list())
            .await
            .ok()
            .flatten();
        let mut at = next.map_or(now_instant + IDLE_CHECK, |at| {
            self.clock.instant_of(at).min(now_instant + IDLE_CHECK)
        });
        if started.is_empty() {
            at = at.max(now_instant + MIN_WAIT);
        }
        if !self.busy().paused.is_empty() {
            at = at.min(now_instant + IDLE_CHECK);
        }
        at
    }

    /// Starts an attempt task for each claimed delivery its webhook's limit
    /// allows; gives the rest back. Returns the webhooks started.
    async fn start(self: &Arc<Self>, claimed: Vec<Claimed>) -> HashSet<String> {
        let mut give_back = Vec::new();
        let mut started = HashSet::new();
        for claim in claimed {
            let webhook = claim.webhook.id.clone();
            let permit = {
                let mut busy = self.busy();
                if claim.webhook.ordered {
                    busy.ordered.insert(webhook.clone());
                } else {
                    busy.ordered.remove(&webhook);
                }
                let owner = claim.webhook.owner.clone();
                busy.owners.insert(webhook.clone(), owner.clone());
                let limit = self.limit_of(&busy, &webhook);
                let count = busy.in_flight.get(&webhook).copied().unwrap_or(0);
                if count >= limit
                    || busy.paused.contains_key(&webhook)
                    || self.owner_full(&busy, &owner)
                {
                    None
                } else {
                    Arc::clone(&self.permits)
                        .try_acquire_owned()
                        .ok()
                        .inspect(|_| {
                            *busy.in_flight.entry(webhook.clone()).or_default() += 1;
                            *busy.owner_in_flight.entry(owner).or_default() += 1;
                        })
                }
            };
            match permit {
                Some(permit) => {
                    started.insert(webhook);
                    let dispatcher = Arc::clone(self);
                    tokio::spawn(async move {
                        let done = dispatcher.attempt(claim, permit).await;
                        let _ = dispatcher.done.send(done);
                    });
                }
                None => give_back.push((claim.delivery.id, claim.lease)),
            }
        }
        if !give_back.is_empty() {
            if let Err(err) = self.store.release(give_back, None).await {
                tracing::warn!(%err, "cannot give deliveries back to the queue");
            }
        }
        started
    }

    /// Ends the one-at-a-time drain of webhooks with nothing in flight
    /// that the last claim found nothing for.
    fn end_drains(&self, started: &HashSet<String>) {
        let mut busy = self.busy();
        let idle: Vec<String> = busy
            .draining
            .iter()
            .filter(|w| !started.contains(*w) && busy.in_flight.get(*w).copied().unwrap_or(0) == 0)
            .cloned()
            .collect();
        for webhook in idle {
            busy.draining.remove(&webhook);
        }
    }

    /// Unpauses webhooks whose tunnel is back (to drain in order), and
    /// fails the queue of those whose tunnel's hold ended.
    async fn check_paused(&self) {
        let paused: Vec<(String, Subdomain)> = self
            .busy()
            .paused
            .iter()
            .map(|(w, t)| (w.clone(), t.clone()))
            .collect();
        for (webhook, tunnel) in paused {
            if self.tunnels.get(&tunnel).is_some() {
                let mut busy = self.busy();
                busy.paused.remove(&webhook);
                busy.draining.insert(webhook);
            } else if self.tunnels.owner_of(&tunnel).is_none() {
                let reason = format!(
                    "not sent: the tunnel {tunnel} went offline and its hold ended; once it is back, queue them again with `ferry webhooks recover`"
                );
                match self.store.fail_pending(&webhook, &reason).await {
                    Ok(failed) => {
                        self.stats.failed.fetch_add(failed, Ordering::Relaxed);
                        self.busy().paused.remove(&webhook);
                    }
                    Err(err) => tracing::warn!(%err, "cannot fail the deliveries of an ended hold"),
                }
            }
        }
    }

    /// Stores results in batches, then frees their slots and wakes the
    /// scheduler.
    async fn finish_loop(self: Arc<Self>, mut done_rx: mpsc::UnboundedReceiver<Done>) {
        while let Some(first) = done_rx.recv().await {
            let mut batch = vec![first];
            while batch.len() < FINISH_BATCH {
                match done_rx.try_recv() {
                    Ok(done) => batch.push(done),
                    Err(_) => break,
                }
            }
            let mut results = Vec::new();
            let mut deferred = Vec::new();
            for done in &batch {
                match done {
                    Done::Attempted { finished, .. } => results.push(finished.clone()),
                    Done::Deferred { delivery, .. } => deferred.push(delivery.clone()),
                }
            }
            // A failed write leaves the deliveries leased: they are tried
            // again after a restart, never lost.
            if !results.is_empty() {
                let count =
                    |f: fn(&Next) -> bool| results.iter().filter(|r| f(&r.next)).count() as u64;
                let (succeeded, failed) = (
                    count(|n| matches!(n, Next::Succeeded)),
                    count(|n| matches!(n, Next::Failed | Next::DisableWebhook(_))),
                );
                match self.store.finish(results).await {
                    Ok(()) => {
                        self.stats.succeeded.fetch_add(succeeded, Ordering::Relaxed);
                        self.stats.failed.fetch_add(failed, Ordering::Relaxed);
                    }
                    Err(err) => {
                        self.stats.store_errors.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(%err, "cannot store delivery attempts");
                    }
                }
            }
            if !deferred.is_empty() {
                if let Err(err) = self.store.release(deferred, None).await {
                    self.stats.store_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%err, "cannot give deferred deliveries back");
                }
            }
            {
                let mut busy = self.busy();
                for done in &batch {
                    let webhook = match done {
                        Done::Attempted { webhook, .. } => webhook,
                        Done::Deferred {
                            webhook, tunnel, ..
                        } => {
                            busy.paused.insert(webhook.clone(), tunnel.clone());
                            busy.draining.remove(webhook);
                            webhook
                        }
                    };
                    if let Some(count) = busy.in_flight.get_mut(webhook) {
                        *count = count.saturating_sub(1);
                        if *count == 0 {
                            busy.in_flight.remove(webhook);
                        }
                    }
                    let owner = busy.owners.get(webhook).cloned().unwrap_or_default();
                    if let Some(count) = busy.owner_in_flight.get_mut(&owner) {
                        *count = count.saturating_sub(1);
                        if *count == 0 {
                            busy.owner_in_flight.remove(&owner);
                        }
                    }
                    // A webhook with nothing in flight is learned again at
                    // its next claim, so deleted ones are not kept.
                    if !busy.in_flight.contains_key(webhook) {
                        busy.owners.remove(webhook);
                        busy.ordered.remove(webhook);
                    }
                }
            }
            drop(batch);
            self.wake.notify_one();
        }
    }

    /// Makes one attempt of `claim`.
    async fn attempt(self: &Arc<Self>, claim: Claimed, permit: OwnedSemaphorePermit) -> Done {
        let Claimed {
            delivery,
            webhook,
            lease,
        } = claim;
        let url = Uri::from_str(&webhook.url).ok();
        let target = url.as_ref().map_or(Target::Url, |url| self.target_of(url));
        let mut tunnel = None;
        let mut remote = None;
        let mut refusal = None;
        if let Target::Tunnel(name) = &target {
            match self.tunnels.get(name) {
                Some(live) if may_use(&webhook.owner, &live.owner) => tunnel = Some(live),
                Some(_) => {
                    refusal = Some((
                        Outcome::EgressRefused,
                        format!("the tunnel {name} belongs to another account now; only its owner's webhooks deliver into it"),
                        false,
                    ));
                }
                None => {
                    match self.elsewhere(name).await {
                        Ok(Some(holder))
                            if may_use(&webhook.owner, &Owner::from_key(&holder.owner)) =>
                        {
                            remote = Some(holder);
                        }
                        Ok(Some(_)) => {
                            refusal = Some((
                            Outcome::EgressRefused,
                            format!("the tunnel {name} belongs to another account now; only its owner's webhooks deliver into it"),
                            false,
                        ));
                        }
                        Err(err) => {
                            refusal = Some((
                            Outcome::Failed,
                            format!("not sent: the fleet's registry of tunnels did not answer ({err})"),
                            false,
                        ));
                        }
                        Ok(None) => match self.tunnels.owner_of(name) {
                            Some(holder) if may_use(&webhook.owner, &holder) => {
                                return Done::Deferred {
                                    delivery: (delivery.id, lease),
                                    webhook: webhook.id,
                                    tunnel: name.clone(),
                                    _permit: permit,
                                };
                            }
                            _ => {
                                refusal = Some((
                                Outcome::ClientOffline,
                                format!("not sent: the tunnel {name} is offline and no hold keeps it for this webhook's owner"),
                                true,
                            ));
                            }
                        },
                    }
                }
            }
        }
        let number = delivery.attempts + 1;
        let started = self.clock.now();
        let id = ExchangeId::new();
        let timestamp = started / 1_000_000;
        let request_headers = self.headers(
            &webhook,
            &delivery.id,
            &delivery.kind,
            timestamp,
            &delivery.payload,
            started,
        );
        let method = Method::from_bytes(webhook.method.as_bytes()).unwrap_or(Method::POST);
        let capture = Capture::new(
            &self.recorder,
            Exchange {
                id,
                tunnel: match &target {
                    Target::Tunnel(name) => name.to_string(),
                    Target::Url => String::new(),
                },
                owner: webhook.owner.clone(),
                kind: Kind::Dispatch,
                replay_of: None,
                received_at: now_micros(),
                method: method.to_string(),
                url: webhook.url.clone(),
                http_version: if tunnel.is_some() || remote.is_some() {
                    "HTTP/2.0"
                } else {
                    "HTTP/1.1"
                }
                .to_owned(),
                remote_addr: "dispatch".to_owned(),
                request_headers: headers_of(&request_headers),
                request_body: CapturedBody::default(),
                response: None,
                responded_at: None,
                done_at: None,
                outcome: Outcome::Failed,
                error: None,
                incomplete: false,
                replayed_at: None,
                dispatch: Some(DispatchRef {
                    webhook: webhook.id.clone(),
                    event: delivery.event.clone(),
                    delivery: delivery.id.clone(),
                    attempt: number,
                }),
            },
        );
        let mut request = Request::new(
            capture
                .tap(full(delivery.payload.clone()), Side::Request)
                .boxed_unsync(),
        );
        *request.method_mut() = method;
        *request.headers_mut() = request_headers;
        let (status, error, final_failure) = match (refusal, url) {
            (Some((outcome, message, final_failure)), _) => {
                capture.failed(outcome, message.clone(), None);
                (None, Some(message), final_failure)
            }
            (None, None) => {
                let message = format!("`{}` is not a URL the relay can send to", webhook.url);
                capture.failed(Outcome::EgressRefused, message.clone(), None);
                (None, Some(message), false)
            }
            (None, Some(url)) => {
                *request.uri_mut() = url;
                let via = match (tunnel, remote, &target) {
                    (Some(tunnel), _, _) => Via::Tunnel(tunnel),
                    (None, Some(holder), Target::Tunnel(name)) => Via::Relay(holder, name.clone()),
                    _ => Via::Egress,
                };
                let (status, error) = self.exchange(request, via, &capture, id).await;
                (status, error, false)
            }
        };
        drop(capture);
        self.stats.attempts.fetch_add(1, Ordering::Relaxed);
        let ended = self.clock.now();
        let next = match status {
            Some(status) if (200..300).contains(&status.0) => Next::Succeeded,
            Some((410, _)) => Next::DisableWebhook("the receiver answered 410 Gone".to_owned()),
            _ if final_failure || number >= delivery.max_attempts => Next::Failed,
            Some((_, Some(wait))) => Next::RetryAt(ended + micros(wait)),
            _ => match self.settings.schedule.wait_after(number) {
                Some(wait) => Next::RetryAt(ended + micros(wait)),
                None => Next::Failed,
            },
        };
        Done::Attempted {
            finished: Finished {
                delivery: delivery.id,
                lease,
                attempt: AttemptRecord {
                    number,
                    at: started,
                    status: status.map(|s| s.0),
                    error,
                    duration_ms: u64::try_from((ended - started) / 1000).unwrap_or(0),
                    exchange: id,
                },
                next,
                disable_after: micros(self.settings.disable_after),
            },
            webhook: webhook.id,
            _permit: permit,
        }
    }

    /// A delivery's header fields: the webhook's own, then the signed
    /// Standard Webhooks fields and the event type.
    fn headers(
        &self,
        webhook: &WebhookRecord,
        id: &str,
        kind: &str,
        timestamp: i64,
        body: &Bytes,
        now: Micros,
    ) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in &webhook.headers {
            if let (Ok(name), Ok(value)) = (
                HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_str(value),
            ) {
                headers.append(name, value);
            }
        }
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        headers
            .entry(header::USER_AGENT)
            .or_insert(HeaderValue::from_static(concat!(
                "Ferry-Dispatcher/",
                env!("CARGO_PKG_VERSION")
            )));
        let mut set = |name: &'static str, value: &str| {
            if let Ok(value) = HeaderValue::from_str(value) {
                headers.insert(HeaderName::from_static(name), value);
            }
        };
        set("webhook-id", id);
        set("webhook-timestamp", &timestamp.to_string());
        if let Ok(signature) = sign::header(webhook, id, timestamp, body, now) {
            set("webhook-signature", &signature);
        }
        set(ferry_common::headers::EVENT_TYPE, kind);
        headers
    }

    /// The relay of the fleet whose client serves tunnel `name`, when it is
    /// not this one.
    async fn elsewhere(
        &self,
        name: &Subdomain,
    ) -> Result<Option<SessionHolder>, crate::store::StoreError> {
        match &self.cluster {
            Some(cluster) => cluster.holder_of(name).await,
            None => Ok(None),
        }
    }

    /// Sends `request` the way `via` says, reads the response to its end
    /// (capturing it) within the timeout, and returns the status with the
    /// `Retry-After` wait it asked for, and the error.
    async fn exchange(
        &self,
        request: Request<crate::Body>,
        via: Via,
        capture: &Arc<Capture>,
        id: ExchangeId,
    ) -> (Option<(u16, Option<Duration>)>, Option<String>) {
        let timeout = self.settings.timeout;
        let deadline = tokio::time::Instant::now() + timeout;
        let from_client = !matches!(via, Via::Egress);
        let meta = RequestMeta {
            exchange: id,
            client_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            https: request.uri().scheme_str() == Some("https"),
        };
        let sent = match via {
            Via::Relay(holder, name) => {
                let host = request
                    .uri()
                    .authority()
                    .map_or_else(|| name.to_string(), |a| a.as_str().to_owned());
                match &self.cluster {
                    Some(cluster) => cluster
                        .send_to_holder(&holder, (&name, &host), request, &meta, timeout)
                        .await
                        .map(|response| (response, None))
                        .map_err(|message| (Outcome::TargetUnreachable, message)),
                    None => Err((
                        Outcome::Failed,
                        format!("the tunnel {name} is served by another relay, and this one is not in a fleet"),
                    )),
                }
            }
            Via::Tunnel(tunnel) => match tunnel.admit(IpAddr::V4(Ipv4Addr::UNSPECIFIED)) {
                Ok(admission) => tunnel
                    .send(request, &meta, timeout)
                    .await
                    .map(|response| (response, Some(admission)))
                    .map_err(|err| unstatused(failure_of_send(&err))),
                Err(err) => Err(unstatused(failure_of_send(&err))),
            },
            Via::Egress => self
                .egress
                .send(request, timeout)
                .await
                .map(|response| (response, None))
                .map_err(|err| unstatused(failure_of_egress(&err))),
        };
        let (response, _admission) = match sent {
            Ok(sent) => sent,
            Err((outcome, message)) => {
                capture.failed(outcome, message.clone(), None);
                return (None, Some(message));
            }
        };
        let (parts, _, mut error) = record_response(capture, response, deadline, from_client).await;
        let status = parts.status.as_u16();
        let wait = schedule::retry_after(status, &parts.headers, std::time::SystemTime::now());
        if error.is_none() {
            error = match status {
                200..=299 => None,
                300..=399 => {
                    let location = parts
                        .headers
                        .get(header::LOCATION)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("nowhere");
                    Some(format!("the receiver answered {status}, a redirect to {location}; redirects are not followed: point the webhook at the final URL"))
                }
                _ => Some(format!("the receiver answered {status}")),
            };
        }
        (Some((status, wait)), error)
    }
}

/// How an attempt reaches its receiver.
enum Via {
    /// Into a tunnel this relay serves.
    Tunnel(Arc<crate::tunnels::Tunnel>),
    /// Into a tunnel another relay of the fleet serves, through that relay.
    Relay(SessionHolder, Subdomain),
    /// To a URL, through the egress guard.
    Egress,
}

/// A failure's outcome and message; the API status it would have is the
/// replay endpoint's business, not an attempt's.
fn unstatused((outcome, _, message): (Outcome, hyper::StatusCode, String)) -> (Outcome, String) {
    (outcome, message)
}

fn micros(wait: Duration) -> Micros {
    i64::try_from(wait.as_micros()).unwrap_or(i64::MAX)
}
