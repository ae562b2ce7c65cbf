//! The Ferry relay: the public side of Ferry's tunnels.
//!
//! - [`ingress`]: accepts public HTTP/1.1 and HTTP/2 connections, routes by
//!   Host and sends tunnel traffic through [`tunnels::Tunnel::send`].
//! - [`connection`]: a public connection's idle and first-request timeouts.
//! - [`body`]: the relay's body type, and the pacing of request bodies.
//! - [`session`]: the connect handshake and the life of one client's tunnel.
//! - [`tunnels`]: the registry of subdomain → live session and held names.
//! - [`accounts`]: accounts, the tokens that prove them, and the throttle
//!   on wrong tokens.
//! - [`limits`]: what one caller address may hold or do at a time.
//! - [`api`]: the relay's own endpoints (`/healthz`, `/metrics`, the API)
//!   and their route table.
//! - [`config`]: the settings `main` validates.
//! - [`egress`]: the guard every request the relay sends out passes, which
//!   refuses private and local targets unless the operator allows them.
//! - [`activity`]: views of captured exchanges: decoded bodies, and the
//!   exports to curl and HAR.
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
pub mod config;
pub mod connection;
pub mod egress;
pub mod ingress;
pub mod limits;
pub mod session;
pub mod shutdown;
pub mod store;
pub mod tls;
pub mod tunnels;

use std::convert::Infallible;
use std::future::Future;
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
    tunnels: tunnels::Tunnels,
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
    /// Cancelled when shutdown starts: no new tunnel is accepted after it.
    shutdown: CancellationToken,
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

/// Serves the relay on `listeners` until `shutdown` is cancelled, then stops
/// accepting, lets in-flight requests finish (within a bounded wait) and
/// closes every tunnel with a reason. Public URLs use HTTPS when there is a
/// TLS listener. Every task it started has ended when it returns.
pub async fn run(
    config: Config,
    listeners: Listeners,
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
    let state = Arc::new(State {
        shutdown: shutdown.clone(),
        tunnels: tunnels::Tunnels::new(tunnels::RegistryLimits {
            max_in_flight: config.max_requests_per_tunnel,
            max_in_flight_per_ip: config.max_requests_per_ip,
            max_per_account: config.max_tunnels_per_token,
            max_tunnels: config.max_tunnels,
            name_hold: config.name_hold,
        }),
        accounts: accounts::Accounts::new(config.tokens.clone(), config.failed_auths_per_minute),
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
        config,
    });
    if let Some((_, resolver)) = &listeners.tls {
        state.spawn(reload_certificates(Arc::clone(resolver), shutdown.clone()));
    }
    ingress::serve(Arc::clone(&state), listeners, shutdown, SHUTDOWN_GRACE).await;
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
    Ok(())
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
