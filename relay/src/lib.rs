//! The Ferry relay: the public side of Ferry's tunnels.
//!
//! - [`ingress`]: accepts public HTTP/1.1 and HTTP/2 connections, routes by
//!   Host and sends tunnel traffic through [`tunnels::Tunnel::send`].
//! - [`connection`]: a public connection's idle and first-request timeouts.
//! - [`body`]: the relay's body type, and the pacing of request bodies.
//! - [`session`]: the connect handshake and the life of one client's tunnel.
//! - [`tunnels`]: the registry of subdomain → live session and held names.
//! - [`activity`]: the activity log: capture, retention, replay and export.
//! - [`dispatch`]: the webhook dispatcher: events, signed deliveries,
//!   retries, and its durable queue.
//! - [`data_dir`]: the data directory and the lock that makes one relay
//!   its owner.
//! - [`accounts`]: accounts, the tokens that prove them, and the throttle
//!   on wrong tokens.
//! - [`limits`]: what one caller address may hold or do at a time.
//! - [`proxy`]: the trusted proxies in front of the relay, and the PROXY
//!   protocol headers they send.
//! - [`api`]: the relay's own endpoints (`/healthz`, `/metrics`, the API)
//!   and their route table.
//! - [`config`]: the settings `main` validates.
//! - [`dns`]: the relay's own authoritative DNS for its domain, with the
//!   ACME challenge records.
//! - [`egress`]: the guard every request the relay sends out passes, which
//!   refuses private and local targets unless the operator allows them.
//! - [`cluster`]: the relay's place in a fleet sharing one PostgreSQL
//!   database: leases on tunnel names, takeovers between relays, and the
//!   client that forwards requests to the relay holding their tunnel.
//! - [`store`]: what the relay keeps on disk: the activity log and the
//!   name registry.
//! - [`shutdown`]: the signals that stop the process gracefully.
//! - [`tls`]: the HTTPS listener's certificate, reloaded when its files change.
//!
//! [`run`] serves on already-bound [`Listeners`] until its shutdown token is
//! cancelled, so the binary, the client's embedded mode and the tests all run
//! the very same relay.

pub mod accounts;
pub mod activity;
pub mod api;
pub mod body;
pub mod cluster;
pub mod config;
pub mod connection;
pub mod data_dir;
pub mod dispatch;
pub mod dns;
pub mod egress;
pub mod ingress;
pub mod limits;
pub mod proxy;
pub mod session;
pub mod shutdown;
pub mod store;
pub mod tls;
pub mod tunnels;

use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ferry_common::byte_stream::CloseReason;
use http_body_util::{BodyExt, Full};
use hyper::{Response, StatusCode};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use accounts::{AccountId, Token};
pub use body::{Body, BodyError};
pub use config::Config;

/// How long in-flight public requests may run on after shutdown starts.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// How long tunnel sessions get to send their close frames at shutdown.
const SESSION_CLOSE_WAIT: Duration = Duration::from_secs(2);

/// What every connection of one relay shares.
pub(crate) struct State {
    /// The validated settings.
    config: Config,
    /// The live tunnels and held names.
    tunnels: Arc<tunnels::Tunnels>,
    /// Token checks.
    accounts: accounts::Accounts,
    /// Tunnel connects per address.
    connects: limits::RateLimit,
    /// Open public connections per address.
    connections_per_ip: Arc<limits::PerIp>,
    /// The relay host's routes.
    router: api::Router,
    /// `http` or `https`: what public URLs use.
    url_scheme: &'static str,
    /// `:PORT` for public URLs, empty for the scheme's default port.
    port_suffix: String,
    /// Tunnel sessions and WebSocket bridges, awaited at shutdown.
    tasks: TaskTracker,
    /// Ends the tasks still running when the shutdown wait is over.
    abort_tasks: CancellationToken,
    /// Counters for `/metrics`.
    metrics: api::Metrics,
    /// The activity log.
    log: Arc<dyn store::ActivityLog>,
    /// The persisted name registry.
    names: Arc<dyn store::NameRegistry>,
    /// Records exchanges into the log.
    recorder: activity::capture::Recorder,
    /// Whether the store answers, for `/healthz`.
    store_health: api::StoreHealth,
    /// Everything the relay sends out passes it.
    egress: egress::Egress,
    /// Delivers webhooks.
    dispatcher: Arc<dispatch::Dispatcher>,
    /// Live feeds of the activity log open per address.
    live_feeds: Arc<limits::PerIp>,
    /// Requests for bodies, exports and replays running per address.
    heavy_calls: Arc<limits::PerIp>,
    /// Requests to offline names in flight per address, and in all: the
    /// same limits a live tunnel's requests have.
    offline: (Arc<limits::PerIp>, Arc<tokio::sync::Semaphore>),
    /// Cancelled when shutdown starts: no new tunnel is accepted after it.
    shutdown: CancellationToken,
    /// The fleet this relay routes requests within, if any.
    cluster: Option<Arc<cluster::Cluster>>,
}

impl State {
    /// The URL public callers use to reach tunnel `name`.
    fn public_url(&self, name: &ferry_common::subdomain::Subdomain) -> String {
        format!(
            "{}://{name}.{}{}",
            self.url_scheme, self.config.domain, self.port_suffix
        )
    }

    /// Runs `task` as one of the relay's own, awaited at shutdown and ended
    /// if it outlives the wait.
    fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        let abort = self.abort_tasks.clone();
        self.tasks.spawn(async move {
            tokio::select! {
                () = task => {}
                () = abort.cancelled() => {}
            }
        });
    }
}

/// The sockets a relay serves, bound by the caller.
pub struct Listeners {
    /// Plain HTTP.
    pub plain: Option<TcpListener>,
    /// HTTPS, with the certificate it serves.
    pub tls: Option<(TcpListener, Arc<tls::CertResolver>)>,
}

impl Listeners {
    /// Plain HTTP only, as on loopback.
    pub fn plain(listener: TcpListener) -> Self {
        Self {
            plain: Some(listener),
            tls: None,
        }
    }
}

/// Opens the relay's data directory and store with `config`, then serves
/// on `listeners` until `shutdown` is cancelled (see [`Relay::run`]).
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    Relay::open(config).await?.run(listeners, shutdown).await
}

/// A relay whose data directory and store are open, ready to serve.
pub struct Relay {
    /// The validated settings.
    config: Config,
    /// The data directory, locked for this relay.
    data_dir: data_dir::DataDir,
    /// The store: the SQLite file in the data directory, or the shared
    /// PostgreSQL database.
    store: Arc<dyn store::Store>,
    /// The accounts of the tokens file, as read at start.
    file_accounts: Vec<accounts::Account>,
    /// The shared database, when the store is one.
    postgres: Option<store::postgres::Postgres>,
    /// Where the fleet's other relays forward requests to this one.
    cluster_listener: Option<TcpListener>,
}

impl Relay {
    /// Reads the tokens file, takes the data directory (creating it if
    /// missing) and opens the store: fails at once when the tokens file is
    /// not valid, the directory is not writable, another relay holds it or
    /// the database cannot be opened or reached.
    pub async fn open(config: Config) -> std::io::Result<Self> {
        let file_accounts = match &config.tokens_file {
            Some(path) => accounts::file::load(path)
                .map_err(|err| std::io::Error::new(std::io::ErrorKind::InvalidInput, err))?,
            None => Vec::new(),
        };
        let data_dir = data_dir::DataDir::open(&config.data_dir)?;
        let postgres = match &config.database_url {
            Some(url) => Some(
                store::postgres::Postgres::connect_trusting(url, config.database_ca.as_deref())
                    .await
                    .map_err(|err| {
                        std::io::Error::other(format!("cannot open the PostgreSQL store: {err}"))
                    })?,
            ),
            None => None,
        };
        let store: Arc<dyn store::Store> = match &postgres {
            Some(postgres) => Arc::new(postgres.clone()),
            None => Arc::new(
                store::sqlite::Sqlite::open(&data_dir.database()).map_err(|err| {
                    std::io::Error::other(format!(
                        "cannot open the activity log in {}: {err}",
                        data_dir.path().display()
                    ))
                })?,
            ),
        };
        Ok(Self {
            config,
            data_dir,
            store,
            file_accounts,
            postgres,
            cluster_listener: None,
        })
    }

    /// The fleet's database, with `--database-url`.
    pub fn postgres(&self) -> Option<&store::postgres::Postgres> {
        self.postgres.as_ref()
    }

    /// Serves the fleet's forwarded requests on `listener`, which
    /// [`Config::cluster`] advertises to the other relays.
    pub fn with_cluster_listener(mut self, listener: TcpListener) -> Self {
        self.cluster_listener = Some(listener);
        self
    }

    /// Serves on `listeners` until `shutdown` is cancelled, then stops
    /// accepting, lets in-flight requests finish (within a bounded wait),
    /// closes every tunnel with a reason and stores what capture still
    /// holds. Public URLs use HTTPS when there is a TLS listener. Every task
    /// it started has ended when it returns.
    pub async fn run(
        self,
        listeners: Listeners,
        shutdown: CancellationToken,
    ) -> std::io::Result<()> {
        let Relay {
            config,
            mut data_dir,
            store,
            file_accounts,
            postgres,
            cluster_listener,
        } = self;
        let cluster = match (&config.cluster, postgres, cluster_listener) {
            (None, _, None) => None,
            (Some(settings), Some(postgres), Some(listener)) => {
                let cluster = cluster::Cluster::new(settings, postgres)
                    .map_err(|err| std::io::Error::new(std::io::ErrorKind::InvalidInput, err))?;
                Some((Arc::new(cluster), listener))
            }
            (Some(_), None, _) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "a relay of a fleet needs the fleet's PostgreSQL database (--database-url)",
                ))
            }
            (_, _, listener) => {
                let missing = if listener.is_some() {
                    "a cluster listener without the fleet's settings (--advertise-url, --cluster-secret)"
                } else {
                    "the fleet's settings without a cluster listener (--cluster-listen)"
                };
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("the relay was given {missing}"),
                ));
            }
        };
        let accounts =
            accounts::Accounts::new(config.tokens.clone(), config.failed_auths_per_minute);
        accounts
            .set_file(file_accounts)
            .map_err(|err| std::io::Error::new(std::io::ErrorKind::InvalidInput, err))?;
        serve(
            config,
            accounts,
            &mut data_dir,
            store,
            (listeners, cluster),
            shutdown,
        )
        .await
    }
}

async fn serve(
    config: Config,
    accounts: accounts::Accounts,
    data_dir: &mut data_dir::DataDir,
    store: Arc<dyn store::Store>,
    (listeners, cluster): (Listeners, Option<(Arc<cluster::Cluster>, TcpListener)>),
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let (url_scheme, port, default_port) = match (&listeners.tls, &listeners.plain) {
        (Some((listener, _)), _) => ("https", listener.local_addr()?.port(), 443),
        (None, Some(listener)) => ("http", listener.local_addr()?.port(), 80),
        (None, None) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "the relay needs a plain or a TLS listener",
            ))
        }
    };
    // Local programs (`ferry log` …) reach the API at the plain listener
    // when there is one.
    let api_url = match (&listeners.plain, &listeners.tls) {
        (Some(listener), _) => format!("http://{}", listener.local_addr()?),
        (_, Some((listener, _))) => format!("https://{}", listener.local_addr()?),
        (None, None) => String::new(),
    };
    let store_health = api::StoreHealth::new(store.clone());
    let foreign_commits = store.commits();
    let (log, names, webhooks): (
        Arc<dyn store::ActivityLog>,
        Arc<dyn store::NameRegistry>,
        Arc<dyn store::Webhooks>,
    ) = (store.clone(), store.clone(), store);
    let writer_stop = CancellationToken::new();
    let (recorder, writer) = activity::capture::Recorder::new(
        Arc::clone(&log),
        config.capture_body_limit,
        activity::capture::QUEUE_BYTES,
        writer_stop.clone(),
    );
    let writer = tokio::spawn(writer);
    if let Some(mut commits) = foreign_commits {
        let (recorder, shutdown) = (recorder.clone(), shutdown.clone());
        tokio::spawn(async move {
            loop {
                // Cancel-safe: `changed` loses nothing.
                tokio::select! {
                    changed = commits.changed() => match changed {
                        Ok(()) => recorder.note_foreign_commit(),
                        Err(_) => return,
                    },
                    () = shutdown.cancelled() => return,
                }
            }
        });
    }
    let tunnels = Arc::new(tunnels::Tunnels::new(tunnels::RegistryLimits {
        max_in_flight: config.max_requests_per_tunnel,
        max_in_flight_per_ip: config.max_requests_per_ip,
        max_per_account: config.max_tunnels_per_token,
        max_tunnels: config.max_tunnels,
        name_hold: config.name_hold,
        requests_per_second: (
            config.max_requests_per_second,
            config
                .max_requests_per_second
                .saturating_mul(config::RATE_BURST_SECONDS),
        ),
        requests_per_second_per_ip: {
            let rate = config
                .max_requests_per_second_per_ip
                .unwrap_or_else(|| config::share_per_ip(config.max_requests_per_second))
                .min(config.max_requests_per_second);
            (rate, rate.saturating_mul(config::RATE_BURST_SECONDS))
        },
    }));
    let egress = egress::Egress::new(
        config.egress_allow.clone(),
        Arc::new(egress::SystemResolver),
    );
    if cluster.is_some() {
        tunnels.join_fleet();
    }
    let dispatcher = dispatch::Dispatcher::new(
        webhooks,
        egress.clone(),
        recorder.clone(),
        (
            Arc::clone(&tunnels),
            cluster.as_ref().map(|(cluster, _)| Arc::clone(cluster)),
        ),
        &config.domain,
        config.dispatch.clone(),
    );
    let state = Arc::new(State {
        shutdown: shutdown.clone(),
        tunnels,
        accounts,
        connects: limits::RateLimit::per_minute(config.connects_per_minute),
        connections_per_ip: limits::PerIp::new(config.max_connections_per_ip),
        router: api::Router::new(),
        url_scheme,
        port_suffix: if port == default_port {
            String::new()
        } else {
            format!(":{port}")
        },
        tasks: TaskTracker::new(),
        abort_tasks: CancellationToken::new(),
        metrics: api::Metrics::default(),
        log,
        names,
        recorder,
        store_health,
        live_feeds: limits::PerIp::new(api::requests::LIVE_FEEDS_PER_IP),
        heavy_calls: limits::PerIp::new(api::HEAVY_CALLS_PER_IP),
        offline: (
            limits::PerIp::new(config.max_requests_per_ip),
            Arc::new(tokio::sync::Semaphore::new(config.max_requests_per_tunnel)),
        ),
        egress,
        dispatcher: Arc::clone(&dispatcher),
        cluster: cluster.as_ref().map(|(cluster, _)| Arc::clone(cluster)),
        config,
    });
    restore_holds(&state).await.map_err(std::io::Error::other)?;
    apply_accounts(&state);
    data_dir.announce(&api_url)?;
    state.spawn(activity::retention::prune_until(
        Arc::clone(&state.log),
        Arc::clone(&state.names),
        Arc::clone(state.dispatcher.store()),
        state.config.retention,
        state.recorder.clone(),
        shutdown.clone(),
    ));
    let dispatch_stop = CancellationToken::new();
    let dispatching = tokio::spawn(dispatcher.run(dispatch_stop.clone()));
    if let Some(path) = state.config.tokens_file.clone() {
        state.spawn(reload_accounts(Arc::clone(&state), path, shutdown.clone()));
    }
    if let Some((_, resolver)) = &listeners.tls {
        state.spawn(reload_certificates(Arc::clone(resolver), shutdown.clone()));
    }
    let cluster_stop = CancellationToken::new();
    let (peers, heartbeat) = match cluster {
        Some((cluster, listener)) => (
            Some(listener),
            Some(tokio::spawn(
                cluster.run(Arc::clone(&state.tunnels), cluster_stop.clone()),
            )),
        ),
        None => (None, None),
    };
    tokio::join!(
        ingress::serve(
            Arc::clone(&state),
            listeners,
            shutdown.clone(),
            SHUTDOWN_GRACE
        ),
        ingress::serve_peers(Arc::clone(&state), peers, shutdown, SHUTDOWN_GRACE),
    );
    state
        .tunnels
        .close_all(&CloseReason::going_away("the relay is shutting down"));
    state.tasks.close();
    if tokio::time::timeout(SESSION_CLOSE_WAIT, state.tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!("tunnel sessions still open after the shutdown wait; ending them");
        state.abort_tasks.cancel();
        state.tasks.wait().await;
    }
    // The sessions have ended: the fleet's registry loses what is left of
    // this relay's claims.
    cluster_stop.cancel();
    if let Some(Err(err)) = match heartbeat {
        Some(heartbeat) => Some(heartbeat.await),
        None => None,
    } {
        tracing::warn!(%err, "fleet heartbeat failed");
    }
    // Attempts in flight end within their timeout and store their results.
    dispatch_stop.cancel();
    if let Err(err) = dispatching.await {
        tracing::warn!(%err, "webhook dispatcher failed");
    }
    // Everything that captured has ended: the writer stores what is queued.
    writer_stop.cancel();
    if let Err(err) = writer.await {
        tracing::warn!(%err, "activity log writer failed");
    }
    Ok(())
}

/// Holds again the names that were held (or served) when the relay last
/// stopped; a name served at a crash is held for a full hold period.
async fn restore_holds(state: &State) -> Result<(), store::StoreError> {
    let now = store::now_micros();
    let full_hold = i64::try_from(state.config.name_hold.as_micros()).unwrap_or(i64::MAX);
    for record in state.names.names(now).await? {
        let Ok(name) = record.name.parse::<ferry_common::subdomain::Subdomain>() else {
            continue;
        };
        let until = record.hold_until.unwrap_or(now.saturating_add(full_hold));
        let left = Duration::from_micros(u64::try_from(until - now).unwrap_or(0));
        state
            .tunnels
            .restore_hold(name, tunnels::Owner::from_key(&record.owner), left);
    }
    Ok(())
}

/// Gives the registry the accounts' reserved names and limits, and ends
/// the tunnels they no longer allow.
fn apply_accounts(state: &State) {
    let accounts = &state.accounts;
    state
        .tunnels
        .set_accounts(&accounts.all(), |token| accounts.principal(token).is_some());
}

/// Reads the tokens file at `path` every `tokens_file_check` until
/// shutdown, and applies it when its content changed. A file that is not
/// valid is logged and the accounts stay as they were.
async fn reload_accounts(state: Arc<State>, path: std::path::PathBuf, shutdown: CancellationToken) {
    // The first check applies the file again, in case it changed since
    // the relay read it at start.
    let mut last: Option<Vec<u8>> = None;
    let mut unreadable = false;
    let mut checks = tokio::time::interval(state.config.tokens_file_check);
    checks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    checks.tick().await;
    loop {
        tokio::select! {
            _ = checks.tick() => {}
            () = shutdown.cancelled() => return,
        }
        let content = match tokio::fs::read(&path).await {
            Ok(content) => content,
            Err(err) => {
                // Reported once, until it reads again.
                if !unreadable {
                    state
                        .metrics
                        .tokens_file_errors
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(path = %path.display(), %err, "tokens file not readable; the accounts stay as they were");
                }
                unreadable = true;
                continue;
            }
        };
        unreadable = false;
        if last.as_ref() == Some(&content) {
            continue;
        }
        last = Some(content.clone());
        let read = String::from_utf8(content)
            .map_err(|_| "not UTF-8 text".to_owned())
            .and_then(|text| accounts::file::parse(&text))
            .and_then(|file| state.accounts.set_file(file));
        match read {
            Ok(()) => {
                apply_accounts(&state);
                tracing::info!(path = %path.display(), "tokens file reloaded");
            }
            Err(err) => {
                state
                    .metrics
                    .tokens_file_errors
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    path = %path.display(),
                    %err,
                    "tokens file not reloaded; the accounts stay as they were"
                );
            }
        }
    }
}

/// Checks the certificate files every [`tls::RELOAD_CHECK`] until shutdown.
async fn reload_certificates(resolver: Arc<tls::CertResolver>, shutdown: CancellationToken) {
    let mut checks = tokio::time::interval(tls::RELOAD_CHECK);
    checks.tick().await;
    loop {
        tokio::select! {
            _ = checks.tick() => {}
            () = shutdown.cancelled() => return,
        }
        match resolver.reload_if_changed() {
            Ok(true) => tracing::info!("tls certificate reloaded"),
            Ok(false) => {}
            Err(err) => {
                tracing::warn!(%err, "tls certificate not reloaded; the previous one stays")
            }
        }
    }
}

/// A plain-text response: the relay's errors to public callers are
/// sentences for people.
pub(crate) fn text(status: StatusCode, message: impl Into<String>) -> Response<Body> {
    let mut message = message.into();
    message.push('\n');
    let mut response = Response::new(full(message));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// A body from bytes in memory.
pub(crate) fn full(data: impl Into<Bytes>) -> Body {
    Full::new(data.into())
        .map_err(|never: Infallible| match never {})
        .boxed_unsync()
}
