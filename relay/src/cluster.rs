//! A relay's place in a fleet of relays sharing one PostgreSQL database:
//! its claims in the live-session registry (which relay serves which
//! tunnel name, as leases its heartbeat renews), the takeovers other relays
//! tell it about, and the pooled HTTP/2 client it forwards public requests
//! with to the relay that holds their tunnel. The other side of forwarding,
//! the cluster listener, lives in [`crate::ingress`].

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use ferry_common::byte_stream::CloseReason;
use ferry_common::handshake::meta::RequestMeta;
use ferry_common::handshake::{CONNECTION_WINDOW, STREAM_WINDOW};
use ferry_common::headers::{remove_hop_by_hop, remove_relay_headers};
use ferry_common::subdomain::Subdomain;
use hyper::body::Incoming;
use hyper::header::{self, HeaderName, HeaderValue};
use hyper::{Request, Response, Uri, Version};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use ring::hmac;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::limits::RateLimit;
use crate::store::postgres::{self, Postgres, SessionClaim, SessionClaimed, SessionHolder};
use crate::store::StoreError;
use crate::tunnels::{Tunnel, Tunnels};
use crate::Body;

/// The header in which a relay presents the fleet's secret to another.
pub const SECRET_HEADER: &str = "ferry-cluster-secret";
/// The header naming the public host a forwarded request was sent to.
pub const HOST_HEADER: &str = "ferry-cluster-host";
/// On a forwarded request's answer: the holder refused the request in a
/// way the ingress relay must not record (a flood's refusals beyond one a
/// second).
pub const UNRECORDED_HEADER: &str = "ferry-cluster-unrecorded";
/// The header naming the owner the ingress relay found holding the tunnel
/// (and records the exchange for): the holder sends the request into its
/// tunnel only if that tunnel is still this owner's.
pub const OWNER_HEADER: &str = "ferry-cluster-owner";

/// How often the pooled connections to other relays are pinged, and how
/// long a ping may go unanswered before the connection is dropped.
const PEER_KEEPALIVE: Duration = Duration::from_secs(10);
/// How long a connection to another relay may take to open.
const PEER_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a claim or a lookup in the fleet's registry may take: a
/// database that hangs (a lost link, not a refused one) must not hold
/// connects and public requests forever.
const REGISTRY_TIMEOUT: Duration = Duration::from_secs(5);
/// The shortest heartbeat, whatever the lease: the database is not asked
/// more often.
const MIN_HEARTBEAT: Duration = Duration::from_millis(100);
/// Why a session taken over on another relay is closed here.
const TAKEN_OVER: &str = "a new session with the same credentials on another relay of the fleet took over this subdomain";

/// The secret every relay of a fleet shares; it prints `MASKED`.
#[derive(Clone)]
pub struct Secret(Arc<str>);

impl Secret {
    /// Wraps `secret`.
    pub fn new(secret: impl Into<Arc<str>>) -> Self {
        Self(secret.into())
    }

    /// Its length in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(MASKED)")
    }
}

/// Why a tunnel could not claim its name in the fleet.
#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    /// Another relay's live session holds it for somebody else.
    #[error("the subdomain `{0}` is in use by another client on another relay of this fleet: choose another name with --subdomain, or stop the other client")]
    InUse(Subdomain),
    /// The name is held for another owner since its session ended (on this
    /// relay or another).
    #[error("the subdomain `{0}` is held for the client that used it last: choose another name with --subdomain")]
    Held(Subdomain),
    /// The account holds as many tunnels as it may, on all relays together.
    #[error("this account already holds {0} tunnels on the relays of this fleet, its limit: stop one of them first")]
    TooMany(usize),
    /// The database did not answer.
    #[error("the fleet's database did not answer ({0}): try again shortly")]
    Store(#[from] StoreError),
}

/// Why the relay holding a name could not be looked up.
#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    /// The caller asked for names no relay serves too often; it may again
    /// after the wait.
    #[error("too many requests from your address for tunnels that no relay of this fleet serves: try again in {} s", .0.as_secs().max(1))]
    Refused(Duration),
    /// The database did not answer.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What the link between the relays of the fleet carried and refused, for
/// `/metrics`.
#[derive(Debug, Default)]
pub struct LinkStats {
    /// Requests this relay sent to the relay holding their tunnel: public
    /// requests it took as the ingress relay, and webhook deliveries.
    pub forwarded: AtomicU64,
    /// Requests from other relays that this relay sent into its tunnels.
    pub served: AtomicU64,
    /// Requests to the cluster listener without the fleet's secret.
    pub refused_secret: AtomicU64,
    /// Connections to the cluster listener closed at accept: their address
    /// held its limit.
    pub refused_connections: AtomicU64,
    /// Connections to the cluster listener closed for sending no request
    /// with the fleet's secret in time.
    pub refused_silent: AtomicU64,
    /// Forwarded requests refused because the tunnel serving the name here
    /// belongs to another owner than the one the ingress relay found.
    pub refused_moved: AtomicU64,
}

impl LinkStats {
    /// Adds one to `counter`.
    pub(crate) fn count(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// This relay in its fleet.
pub struct Cluster {
    /// This relay's id, new at every start.
    relay: String,
    /// Where the other relays reach this one.
    advertise_url: String,
    /// The secret, as sent to other relays.
    secret: HeaderValue,
    /// Checks a presented secret in constant time: the HMAC of the secret
    /// under a key of this process.
    verifier: (hmac::Key, hmac::Tag),
    /// How long a claim lasts unless renewed.
    lease: Duration,
    /// The shared database.
    db: Postgres,
    /// The names this relay's rows hold, with the session that claimed each.
    held: Mutex<HashMap<Subdomain, i64>>,
    /// The pooled HTTP/2 connections to other relays.
    client: hyper_util::client::legacy::Client<HttpConnector, Body>,
    /// Lookups per caller that found no relay serving the name.
    unknown_names: RateLimit,
    /// What the link to the other relays carried and refused.
    stats: LinkStats,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("relay", &self.relay)
            .field("advertise_url", &self.advertise_url)
            .finish_non_exhaustive()
    }
}

/// A session id as the registry keeps it.
fn session_id(tunnel: &Tunnel) -> i64 {
    i64::try_from(tunnel.id).unwrap_or(i64::MAX)
}

impl Cluster {
    /// This relay in the fleet of `config`, on the shared database `db`.
    pub fn new(config: &crate::config::Cluster, db: Postgres) -> Result<Self, String> {
        let secret = HeaderValue::from_str(&config.secret.0)
            .map_err(|_| "the cluster secret must be printable ASCII".to_owned())
            .map(|mut value| {
                value.set_sensitive(true);
                value
            })?;
        let key = hmac::Key::generate(hmac::HMAC_SHA256, &ring::rand::SystemRandom::new())
            .map_err(|_| "no randomness for the cluster secret's check".to_owned())?;
        let tag = hmac::sign(&key, config.secret.0.as_bytes());
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(PEER_CONNECT_TIMEOUT));
        let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .http2_only(true)
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .http2_keep_alive_interval(PEER_KEEPALIVE)
            .http2_keep_alive_timeout(PEER_KEEPALIVE)
            .http2_keep_alive_while_idle(true)
            // The tunnel's windows: one caller that stops reading holds at
            // most a stream's window, never the whole link between relays.
            .http2_initial_stream_window_size(STREAM_WINDOW)
            .http2_initial_connection_window_size(CONNECTION_WINDOW)
            .build(connector);
        Ok(Self {
            relay: uuid::Uuid::now_v7().simple().to_string(),
            advertise_url: config.advertise_url.trim_end_matches('/').to_owned(),
            secret,
            verifier: (key, tag),
            lease: config.lease,
            db,
            held: Mutex::default(),
            client,
            unknown_names: RateLimit::per_minute(config.unknown_names_per_minute),
            stats: LinkStats::default(),
        })
    }

    fn held(&self) -> std::sync::MutexGuard<'_, HashMap<Subdomain, i64>> {
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether `presented` is the fleet's secret.
    pub fn verify(&self, presented: &[u8]) -> bool {
        hmac::verify(&self.verifier.0, presented, self.verifier.1.as_ref()).is_ok()
    }

    /// The secret to present to another relay.
    pub(crate) fn secret(&self) -> &HeaderValue {
        &self.secret
    }

    /// What the link to the other relays carried and refused.
    pub fn stats(&self) -> &LinkStats {
        &self.stats
    }

    /// The pooled client to other relays.
    pub(crate) fn client(&self) -> &hyper_util::client::legacy::Client<HttpConnector, Body> {
        &self.client
    }

    /// Claims `tunnel`'s name for this relay, after this relay's own
    /// registry granted it. Refused while another relay's live session
    /// holds it, unless that session has the same owner (a takeover, which
    /// the other relay is told of).
    pub async fn claim(
        &self,
        tunnel: &Tunnel,
        max_per_owner: Option<usize>,
        hold: Option<Duration>,
    ) -> Result<(), ClaimError> {
        let name = tunnel.name.to_string();
        let owner = tunnel.owner.key();
        let claim = SessionClaim {
            name: &name,
            relay: &self.relay,
            url: &self.advertise_url,
            owner: &owner,
            session: session_id(tunnel),
            lease: self.lease,
            max_per_owner,
            hold,
        };
        let claimed = tokio::time::timeout(REGISTRY_TIMEOUT, self.db.claim_session(&claim))
            .await
            .map_err(|_| hung())??;
        match claimed {
            SessionClaimed::Yes(replaced) => {
                if let Some((relay, session)) = replaced {
                    info!(%relay, session, "tunnel taken over from another relay");
                }
                self.held().insert(tunnel.name.clone(), claim.session);
                Ok(())
            }
            SessionClaimed::InUse => Err(ClaimError::InUse(tunnel.name.clone())),
            SessionClaimed::TooMany(max) => Err(ClaimError::TooMany(max)),
            SessionClaimed::Held => Err(ClaimError::Held(tunnel.name.clone())),
        }
    }

    /// Whether this relay's row still holds `name`: `false` once another
    /// relay took it over.
    pub fn holds(&self, name: &Subdomain) -> bool {
        self.held().contains_key(name)
    }

    /// Ends `tunnel`'s claim now that its session ended, unless another
    /// session of this relay serves the name.
    pub async fn end(&self, tunnels: &Tunnels, tunnel: &Tunnel) {
        let session = {
            let mut held = self.held();
            // Checked under the lock a new claim's record takes, so that a
            // claim made since cannot lose its row (see `claim`).
            if tunnels.get(&tunnel.name).is_some() {
                return;
            }
            match held.remove(&tunnel.name) {
                Some(session) => session,
                None => return,
            }
        };
        if let Err(err) = self
            .db
            .end_session(tunnel.name.as_str(), &self.relay, session)
            .await
        {
            // Its lease ends on its own, unrenewed.
            warn!(%err, "tunnel's session not removed from the fleet's registry");
        }
    }

    /// The other relay whose live session holds `name`, if any, looked up
    /// for `caller`: `Err(Refused)` with the wait, without a query, once
    /// the caller's lookups found nothing too often.
    pub async fn holder(
        &self,
        name: &Subdomain,
        caller: IpAddr,
    ) -> Result<Option<SessionHolder>, LookupError> {
        if let Some(wait) = self.unknown_names.blocked(caller) {
            return Err(LookupError::Refused(wait));
        }
        let holder = tokio::time::timeout(
            REGISTRY_TIMEOUT,
            self.db.session_holder(name.as_str(), &self.relay),
        )
        .await
        .map_err(|_| hung())??;
        if holder.is_none() {
            // A refusal starts with the next lookup.
            let _ = self.unknown_names.spend(caller);
        }
        Ok(holder)
    }

    /// The other relay whose live session holds `name`, for this relay's
    /// own requests (webhook deliveries): no per-caller limit applies.
    pub async fn holder_of(&self, name: &Subdomain) -> Result<Option<SessionHolder>, StoreError> {
        tokio::time::timeout(
            REGISTRY_TIMEOUT,
            self.db.session_holder(name.as_str(), &self.relay),
        )
        .await
        .map_err(|_| hung())?
    }

    /// The owner `name` is held for because the relay that served it died
    /// less than `hold` ago.
    pub async fn held_after_crash(
        &self,
        name: &Subdomain,
        hold: Duration,
    ) -> Result<Option<String>, StoreError> {
        tokio::time::timeout(
            REGISTRY_TIMEOUT,
            self.db.held_after_crash(name.as_str(), hold),
        )
        .await
        .map_err(|_| hung())?
    }

    /// Sends this relay's own `request` for tunnel `name`, reached as
    /// `host`, to the relay `holder` that serves it, which passes it through
    /// the tunnel and records nothing (this relay records it). The answer
    /// carries the client's outcome header, as a tunnel's does.
    pub async fn send_to_holder(
        &self,
        holder: &SessionHolder,
        (name, host): (&Subdomain, &str),
        mut request: Request<Body>,
        meta: &RequestMeta,
        timeout: Duration,
    ) -> Result<Response<Incoming>, String> {
        let unreachable = |why: String| {
            format!("the relay serving the tunnel {name} could not be reached ({why}); the attempt is retried")
        };
        let path = request
            .uri()
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned();
        *request.uri_mut() = format!("{}{path}", holder.url)
            .parse::<Uri>()
            .map_err(|err| unreachable(err.to_string()))?;
        *request.version_mut() = Version::HTTP_2;
        let headers = request.headers_mut();
        remove_hop_by_hop(headers);
        remove_relay_headers(headers);
        headers.remove(header::HOST);
        let host = HeaderValue::from_str(host).map_err(|err| unreachable(err.to_string()))?;
        headers.insert(HeaderName::from_static(HOST_HEADER), host);
        headers.insert(HeaderName::from_static(SECRET_HEADER), self.secret.clone());
        let owner =
            HeaderValue::from_str(&holder.owner).map_err(|err| unreachable(err.to_string()))?;
        headers.insert(HeaderName::from_static(OWNER_HEADER), owner);
        meta.insert(headers);
        LinkStats::count(&self.stats.forwarded);
        match tokio::time::timeout(timeout, self.client.request(request)).await {
            Ok(Ok(mut response)) => {
                response.headers_mut().remove(UNRECORDED_HEADER);
                Ok(response)
            }
            Ok(Err(err)) => Err(unreachable(err.to_string())),
            Err(_) => Err(format!(
                "the tunnel {name} did not answer within {} s",
                timeout.as_secs()
            )),
        }
    }

    /// Renews this relay's leases every third of a lease and closes the
    /// sessions other relays took over, as they say or as the renewal
    /// finds, until `shutdown`; then ends every claim of this relay.
    pub async fn run(self: Arc<Self>, tunnels: Arc<Tunnels>, shutdown: CancellationToken) {
        let mut beats = tokio::time::interval((self.lease / 3).max(MIN_HEARTBEAT));
        beats.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut listener = None;
        loop {
            // Cancel-safe arms: a tick is not lost, and a notification
            // stays queued in the listener's channel.
            tokio::select! {
                _ = beats.tick() => {
                    if listener.is_none() {
                        listener = self.listen().await;
                    }
                    self.renew(&tunnels).await;
                }
                payload = next(&mut listener) => match payload {
                    Some(payload) => {
                        if let Some((name, session)) = postgres::parse_takeover(&payload) {
                            self.taken_over(&tunnels, &name, session);
                        }
                    }
                    None => listener = None,
                },
                () = shutdown.cancelled() => break,
            }
        }
        // A hung database does not hold the shutdown: the leases end on
        // their own.
        let ended = tokio::time::timeout(REGISTRY_TIMEOUT, self.db.end_relay_sessions(&self.relay))
            .await
            .map_err(|_| hung())
            .and_then(|ended| ended);
        if let Err(err) = ended {
            warn!(%err, "this relay's sessions not removed from the fleet's registry; their leases end on their own");
        }
    }

    /// Listens on this relay's channel; `None` (logged) while the database
    /// cannot be reached: the heartbeat still finds takeovers.
    async fn listen(&self) -> Option<postgres::Listener> {
        let channel = postgres::channel(&self.relay);
        match self.db.listen(&channel).await {
            Ok(listener) => Some(listener),
            Err(err) => {
                warn!(%err, "cannot listen for takeovers on the fleet's database");
                None
            }
        }
    }

    async fn renew(&self, tunnels: &Tunnels) {
        let claimed: Vec<(Subdomain, i64)> = self
            .held()
            .iter()
            .map(|(name, session)| (name.clone(), *session))
            .collect();
        let names: Vec<String> = claimed.iter().map(|(name, _)| name.to_string()).collect();
        // Bounded, so that a hung database does not stop the loop from
        // hearing takeovers or shutting down.
        let renewed = match tokio::time::timeout(
            REGISTRY_TIMEOUT,
            self.db.renew_sessions(&self.relay, &names, self.lease),
        )
        .await
        .map_err(|_| hung())
        .and_then(|renewed| renewed)
        {
            Ok(renewed) => renewed,
            Err(err) => {
                warn!(%err, "tunnel leases not renewed in the fleet's database");
                return;
            }
        };
        for (name, session) in claimed {
            if !renewed.iter().any(|renewed| renewed == name.as_str()) {
                debug!(%name, "lease found taken by another relay");
                self.taken_over(tunnels, name.as_str(), session);
            }
        }
    }

    /// Another relay took `name` over from this relay's `session`: the
    /// sessions of this relay that claimed it up to then are closed.
    fn taken_over(&self, tunnels: &Tunnels, name: &str, session: i64) {
        let Ok(name) = Subdomain::parse(name) else {
            return;
        };
        {
            let mut held = self.held();
            if held.get(&name).is_some_and(|claimed| *claimed <= session) {
                held.remove(&name);
            }
        }
        if let Some(tunnel) = tunnels.get(&name) {
            if session_id(&tunnel) <= session {
                info!(%name, "tunnel taken over by another relay");
                // Out of the registry first, so that this relay forwards
                // the name's requests to its new holder from now on; the
                // name is the fleet's to hold, not this relay's.
                tunnels.discard(&tunnel);
                tunnel.close.close(CloseReason::policy(TAKEN_OVER));
            }
        }
    }
}

/// The error of a registry call that took longer than [`REGISTRY_TIMEOUT`].
fn hung() -> StoreError {
    StoreError(format!(
        "{}: no answer within {} s",
        crate::store::UNAVAILABLE,
        REGISTRY_TIMEOUT.as_secs()
    ))
}

/// The listener's next payload; never resolves without a listener.
async fn next(listener: &mut Option<postgres::Listener>) -> Option<String> {
    match listener {
        Some(listener) => listener.next().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::Secret;

    #[test]
    fn the_secret_never_prints() {
        let secret = Secret::new("s3cr3t-of-the-fleet");
        assert_eq!(format!("{secret:?}"), "Secret(MASKED)");
        let config = crate::config::Cluster {
            advertise_url: "http://10.0.0.2:7070".to_owned(),
            secret,
            lease: crate::config::Cluster::DEFAULT_LEASE,
            unknown_names_per_minute: 1,
            max_connections_per_ip: crate::config::Cluster::DEFAULT_MAX_CONNECTIONS_PER_IP,
            first_request_timeout: crate::config::Cluster::DEFAULT_FIRST_REQUEST_TIMEOUT,
        };
        assert!(!format!("{config:?}").contains("s3cr3t"));
    }
}
