//! Public ingress: accept connections, route each request by Host, and
//! forward tunnel traffic to the client as HTTP/2 streams.
//!
//! `NAME.DOMAIN` is tunnel NAME; `DOMAIN` itself and IP-literal hosts are the
//! relay's own endpoints ([`crate::admin`]); anything else is a 404 that
//! names the host.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use ferry_common::handshake::meta;
use ferry_common::headers::{remove_ferry_headers, remove_hop_by_hop};
use ferry_common::subdomain::Subdomain;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{self, HeaderName, HeaderValue};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode, Uri, Version};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info_span, warn, Instrument};

use crate::session::is_websocket_upgrade;
use crate::{admin, text, tls, Body, Listeners, State};

/// How long a public client may take to send a request's headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause after a failed `accept` (such as running out of file descriptors),
/// so the loop does not spin while the condition lasts.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// Where a request goes, by its Host.
#[derive(Debug, PartialEq, Eq)]
enum Route {
    /// The relay's own endpoints.
    Relay,
    /// A tunnel's subdomain.
    Tunnel(Subdomain),
}

/// Why a public request could not be forwarded. Mapped to a status in one
/// place, [`error_response`].
#[derive(Debug, thiserror::Error)]
enum IngressError {
    #[error(
        "missing or malformed Host header: send the tunnel's host name, such as brave-otter.{0}"
    )]
    BadHost(String),
    #[error("this relay serves {domain} and its subdomains, not `{host}`")]
    UnknownHost { host: String, domain: String },
    #[error("`{name}` is not a valid tunnel name on this relay")]
    BadName { name: String },
    #[error("no tunnel named `{0}` is connected. Start one with `ferry http 3000 --subdomain {0}` (3000 being your local port)")]
    NotConnected(Subdomain),
    #[error("the tunnel `{0}` lost its client before it answered: check the terminal running `ferry http`")]
    TunnelGone(Subdomain, #[source] hyper::Error),
    #[error("only WebSocket upgrades can pass through a tunnel, not `{0}`")]
    UnsupportedUpgrade(String),
    #[error("the tunnel `{0}` did not answer within {1} s")]
    Timeout(Subdomain, u64),
    #[error("the tunnel `{0}` has {1} requests in flight, its limit: try again shortly")]
    Busy(Subdomain, usize),
}

fn error_response(err: &IngressError) -> Response<Body> {
    let status = match err {
        IngressError::BadHost(_) | IngressError::UnsupportedUpgrade(_) => StatusCode::BAD_REQUEST,
        IngressError::UnknownHost { .. }
        | IngressError::BadName { .. }
        | IngressError::NotConnected(_) => StatusCode::NOT_FOUND,
        IngressError::TunnelGone(..) => StatusCode::BAD_GATEWAY,
        IngressError::Timeout(..) => StatusCode::GATEWAY_TIMEOUT,
        IngressError::Busy(..) => StatusCode::SERVICE_UNAVAILABLE,
    };
    if let IngressError::TunnelGone(name, source) = err {
        debug!(%name, %source, "tunnel request failed");
    }
    text(status, err.to_string())
}

/// How long a TLS client may take to complete its handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts one connection from `listener`; never resolves without one, so
/// an absent listener simply never wins a `select!`.
async fn accept(listener: Option<&TcpListener>) -> std::io::Result<(TcpStream, SocketAddr)> {
    match listener {
        Some(listener) => listener.accept().await,
        None => std::future::pending().await,
    }
}

/// Accepts connections until `shutdown`, then waits up to `grace` for open
/// connections to finish their requests and drops the rest.
pub(crate) async fn serve(
    state: Arc<State>,
    listeners: Listeners,
    shutdown: CancellationToken,
    grace: Duration,
) {
    let graceful = GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    builder.http2().timer(TokioTimer::new());
    let builder = Arc::new(builder);
    let (tls_listener, acceptor) = match listeners.tls {
        Some((listener, resolver)) => (
            Some(listener),
            Some(TlsAcceptor::from(tls::server_config(resolver))),
        ),
        None => (None, None),
    };
    // Owns the connection tasks: those still open after the grace period are
    // aborted when it drops.
    let mut connections = tokio::task::JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        // All arms are cancel-safe: `accept` loses no connection when
        // another arm wins.
        let (accepted, tls) = tokio::select! {
            accepted = accept(listeners.plain.as_ref()) => (accepted, None),
            accepted = accept(tls_listener.as_ref()) => (accepted, acceptor.clone()),
            () = shutdown.cancelled() => break,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(err) => {
                warn!(%err, "accept failed");
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                continue;
            }
        };
        if let Err(err) = stream.set_nodelay(true) {
            debug!(%err, "could not set TCP_NODELAY");
        }
        let (state, builder, watcher) =
            (Arc::clone(&state), Arc::clone(&builder), graceful.watcher());
        let connection = async move {
            let result = match tls {
                None => {
                    serve_connection(state, &builder, watcher, TokioIo::new(stream), peer, "http")
                        .await
                }
                Some(acceptor) => {
                    match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await
                    {
                        Ok(Ok(stream)) => {
                            serve_connection(
                                state,
                                &builder,
                                watcher,
                                TokioIo::new(stream),
                                peer,
                                "https",
                            )
                            .await
                        }
                        Ok(Err(err)) => return debug!(%err, "tls handshake failed"),
                        Err(_) => return debug!("tls handshake timed out"),
                    }
                }
            };
            if let Err(err) = result {
                debug!(%err, "connection ended with an error");
            }
        };
        connections.spawn(connection.instrument(info_span!("conn", %peer)));
    }
    drop(listeners.plain);
    drop(tls_listener);
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        warn!(
            ?grace,
            "connections still open after the shutdown grace period"
        );
    }
}

/// Serves HTTP/1.1 or HTTP/2 on one accepted connection, plain or TLS.
async fn serve_connection<I>(
    state: Arc<State>,
    builder: &auto::Builder<TokioExecutor>,
    watcher: Watcher,
    io: I,
    peer: SocketAddr,
    scheme: &'static str,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let service = service_fn(move |req| {
        let state = Arc::clone(&state);
        async move { Ok::<_, Infallible>(handle(state, peer, scheme, req).await) }
    });
    watcher
        .watch(
            builder
                .serve_connection_with_upgrades(io, service)
                .into_owned(),
        )
        .await
}

/// Routes one public request.
async fn handle(
    state: Arc<State>,
    peer: SocketAddr,
    scheme: &'static str,
    req: Request<Incoming>,
) -> Response<Body> {
    let host = match request_host(&req) {
        Some(host) => host,
        None => return error_response(&IngressError::BadHost(state.config.domain.clone())),
    };
    match route(&host, &state.config.domain) {
        Ok(Route::Relay) => admin::handle(&state, req).await,
        Ok(Route::Tunnel(name)) => {
            let span = info_span!("request", tunnel = %name, method = %req.method(), path = %req.uri().path());
            match forward(&state, name, peer, scheme, req)
                .instrument(span)
                .await
            {
                Ok(response) => response,
                Err(err) => {
                    if matches!(err, IngressError::TunnelGone(..)) {
                        state.metrics.request_errors.fetch_add(1, Ordering::Relaxed);
                    }
                    error_response(&err)
                }
            }
        }
        Err(err) => error_response(&err),
    }
}

/// The request's host as sent (`:authority` for HTTP/2 and absolute-form
/// URIs, else `Host`), with its port if any.
fn request_host(req: &Request<Incoming>) -> Option<String> {
    if let Some(authority) = req.uri().authority() {
        return Some(authority.as_str().to_owned());
    }
    let host = req.headers().get(header::HOST)?.to_str().ok()?;
    (!host.is_empty()).then(|| host.to_owned())
}

/// Strips the port and a trailing dot and folds case: `Brave-Otter.localhost.:8080`
/// becomes `brave-otter.localhost`. IPv6 literals keep their brackets; user
/// info (`user@host`) is refused.
fn normalize_host(host: &str) -> Option<String> {
    let authority: hyper::http::uri::Authority = host.trim().parse().ok()?;
    // `http` accepts user info and a port that is not a number; a Host
    // header has no business with either.
    let has_bad_port =
        authority.port_u16().is_none() && authority.as_str().len() > authority.host().len();
    if authority.as_str().contains('@') || has_bad_port {
        return None;
    }
    let name = authority.host();
    let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
    (!name.is_empty()).then_some(name)
}

fn route(host: &str, domain: &str) -> Result<Route, IngressError> {
    let name = normalize_host(host).ok_or_else(|| IngressError::BadHost(domain.to_owned()))?;
    if name == domain || name.trim_matches(['[', ']']).parse::<IpAddr>().is_ok() {
        return Ok(Route::Relay);
    }
    let label = name
        .strip_suffix(domain)
        .and_then(|rest| rest.strip_suffix('.'))
        .ok_or_else(|| IngressError::UnknownHost {
            host: name.clone(),
            domain: domain.to_owned(),
        })?;
    if label.contains('.') {
        return Err(IngressError::UnknownHost {
            host: name.clone(),
            domain: domain.to_owned(),
        });
    }
    Subdomain::parse(label)
        .map(Route::Tunnel)
        .map_err(|_| IngressError::BadName {
            name: label.to_owned(),
        })
}

/// Sends a public request through tunnel `name` and returns the client's
/// response, streaming both bodies.
async fn forward(
    state: &State,
    name: Subdomain,
    peer: SocketAddr,
    scheme: &'static str,
    mut req: Request<Incoming>,
) -> Result<Response<Body>, IngressError> {
    let tunnel = state
        .tunnels
        .get(&name)
        .ok_or_else(|| IngressError::NotConnected(name.clone()))?;
    let permit = tunnel
        .admit()
        .ok_or_else(|| IngressError::Busy(name.clone(), state.config.max_requests_per_tunnel))?;
    let mut sender = tunnel
        .sender()
        .await
        .ok_or_else(|| IngressError::NotConnected(name.clone()))?;
    state.metrics.requests.fetch_add(1, Ordering::Relaxed);

    let websocket = if req.headers().contains_key(header::UPGRADE) {
        if !is_websocket_upgrade(req.method(), req.headers()) {
            let wanted = req
                .headers()
                .get(header::UPGRADE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("?");
            return Err(IngressError::UnsupportedUpgrade(wanted.to_owned()));
        }
        Some(hyper::upgrade::on(&mut req))
    } else {
        None
    };
    let exchange = state.next_exchange.fetch_add(1, Ordering::Relaxed);
    let (mut parts, body) = req.into_parts();
    let authority = parts
        .uri
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| {
            parts
                .headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned)
        })
        .unwrap_or_default();
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    parts.uri = Uri::builder()
        .scheme(scheme)
        .authority(authority)
        .path_and_query(path)
        .build()
        .map_err(|_| IngressError::BadHost(state.config.domain.clone()))?;
    parts.version = Version::HTTP_2;
    let websocket_key = parts.headers.remove(header::SEC_WEBSOCKET_KEY);
    remove_hop_by_hop(&mut parts.headers);
    remove_ferry_headers(&mut parts.headers);
    parts.headers.remove(header::HOST);
    let metadata = [
        (meta::EXCHANGE_ID, exchange.to_string()),
        (meta::CLIENT_IP, peer.ip().to_string()),
        (meta::SCHEME, scheme.to_owned()),
    ];
    for (name, value) in metadata {
        if let Ok(value) = HeaderValue::from_str(&value) {
            parts.headers.insert(HeaderName::from_static(name), value);
        }
    }
    if websocket.is_some() {
        // RFC 8441: a WebSocket travels over HTTP/2 as an extended CONNECT.
        parts.method = Method::CONNECT;
        parts
            .extensions
            .insert(hyper::ext::Protocol::from_static("websocket"));
    }
    let request = Request::from_parts(parts, body.boxed_unsync());
    let timeout = state.config.request_timeout;
    let mut response = tokio::time::timeout(timeout, sender.send_request(request))
        .await
        .map_err(|_| IngressError::Timeout(name.clone(), timeout.as_secs()))?
        .map_err(|err| IngressError::TunnelGone(name.clone(), err))?;
    let tunnel_side = websocket
        .is_some()
        .then(|| hyper::upgrade::on(&mut response));
    let (mut parts, body) = response.into_parts();
    remove_hop_by_hop(&mut parts.headers);
    match websocket.zip(tunnel_side) {
        Some((public, tunnel_side)) if parts.status == StatusCode::OK => {
            state
                .tasks
                .spawn(bridge(public, tunnel_side, permit).in_current_span());
            parts.status = StatusCode::SWITCHING_PROTOCOLS;
            parts
                .headers
                .insert(header::UPGRADE, HeaderValue::from_static("websocket"));
            parts
                .headers
                .insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
            if let Some(key) = websocket_key {
                if let Ok(accept) = HeaderValue::from_str(&derive_accept_key(key.as_bytes())) {
                    parts.headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
                }
            }
            Ok(Response::from_parts(parts, crate::full("")))
        }
        _ => {
            // The request counts as in flight until its response body ends.
            let body = body.map_frame(move |frame| {
                let _held = &permit;
                frame
            });
            Ok(Response::from_parts(parts, body.boxed_unsync()))
        }
    }
}

/// Copies bytes both ways between the public caller's upgraded connection
/// and the tunnel stream, until either side closes; `_permit` keeps the
/// WebSocket counted as a request in flight meanwhile.
async fn bridge(
    public: hyper::upgrade::OnUpgrade,
    tunnel: hyper::upgrade::OnUpgrade,
    _permit: tokio::sync::OwnedSemaphorePermit,
) {
    let (public, tunnel) = match tokio::try_join!(public, tunnel) {
        Ok(both) => both,
        Err(err) => {
            debug!(%err, "websocket upgrade through the tunnel failed");
            return;
        }
    };
    let (mut public, mut tunnel) = (TokioIo::new(public), TokioIo::new(tunnel));
    if let Err(err) = tokio::io::copy_bidirectional(&mut public, &mut tunnel).await {
        debug!(%err, "websocket through the tunnel ended with an error");
    }
}

#[cfg(test)]
mod tests {
    use super::{normalize_host, route, Route};

    #[test]
    fn hosts_are_normalized() {
        assert_eq!(
            normalize_host("Brave-Otter.LOCALHOST.:8080").as_deref(),
            Some("brave-otter.localhost")
        );
        assert_eq!(normalize_host("[::1]:8080").as_deref(), Some("[::1]"));
        assert_eq!(normalize_host("a.b:http"), None);
        assert_eq!(normalize_host(""), None);
        assert_eq!(normalize_host("bad host"), None);
        assert_eq!(normalize_host("user@demo.localhost"), None);
        assert_eq!(normalize_host("demo.localhost:"), None);
        assert_eq!(normalize_host("[::1]junk"), None);
    }

    #[test]
    fn routes_by_host() {
        let tunnel = |n: &str| Route::Tunnel(n.parse().unwrap());
        assert_eq!(route("localhost:8080", "localhost").unwrap(), Route::Relay);
        assert_eq!(route("127.0.0.1:8080", "localhost").unwrap(), Route::Relay);
        assert_eq!(route("[::1]:8080", "localhost").unwrap(), Route::Relay);
        assert_eq!(
            route("Demo.localhost", "localhost").unwrap(),
            tunnel("demo")
        );
        assert_eq!(
            route("demo.relay.example.com.", "relay.example.com").unwrap(),
            tunnel("demo")
        );
        assert!(route("a.demo.localhost", "localhost").is_err());
        assert!(route("example.org", "localhost").is_err());
        assert!(route("notlocalhost", "localhost").is_err());
        assert!(route("-x-.localhost", "localhost").is_err());
    }
}
