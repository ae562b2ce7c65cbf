//! Public ingress: accept connections within their limits, route each
//! request by Host, and send tunnel traffic through [`Tunnel::send`].
//!
//! `NAME.DOMAIN` is tunnel NAME; `DOMAIN` itself and IP-literal hosts are the
//! relay's own endpoints ([`crate::api`]); anything else is a 404 that
//! names the host.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ferry_common::coalesce::Coalesce;
use ferry_common::handshake::meta::{self, RequestMeta};
use ferry_common::handshake::MAX_REQUEST_HEADER_LIST;
use ferry_common::headers::{remove_ferry_headers, remove_hop_by_hop, remove_relay_headers};
use ferry_common::ids::ExchangeId;
use ferry_common::subdomain::Subdomain;
use http_body_util::BodyExt;
use hyper::body::Frame;
use hyper::body::Incoming;
use hyper::header::{self, HeaderName, HeaderValue};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode, Uri, Version};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_util::sync::CancellationToken;
use tracing::{debug, debug_span, warn, Instrument};

use crate::activity::capture::{headers_of, Capture, Side};
use crate::body::{BodyError, BodyFailure, Holding, PacedBody};
use crate::connection::{Activity, GuardedIo, Timeouts};
use crate::session::is_websocket_upgrade;
use crate::store::{now_micros, CapturedBody, Exchange, Kind, Outcome};
use crate::tunnels::SendError;
use crate::{api, proxy, text, tls, Body, Listeners, State};

mod peers;

pub(crate) use peers::serve_peers;

/// Pause after a failed `accept` (such as running out of file descriptors),
/// so the loop does not spin while the condition lasts.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);
/// Seconds a caller to an offline tunnel is told to wait before retrying.
const OFFLINE_RETRY_AFTER: &str = "30";
/// How long a TLS client may take to complete its handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

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
    #[error("the request has more than one Host header: send exactly one")]
    DuplicateHost,
    #[error("the request's :authority and Host header disagree: send one host name")]
    ConflictingHost,
    #[error("this relay serves {domain} and its subdomains, not `{host}`")]
    UnknownHost { host: String, domain: String },
    #[error("`{name}` is not a valid tunnel name on this relay")]
    BadName { name: String },
    #[error("only WebSocket upgrades can pass through a tunnel, not `{0}`")]
    UnsupportedUpgrade(String),
    #[error("CONNECT is for proxies: a tunnel forwards requests to its local server, it does not open connections elsewhere")]
    Connect,
    #[error("{0}: send the body without long pauses")]
    SlowBody(BodyError),
    #[error("the request body is larger than {0} bytes, this relay's limit for requests through a tunnel: send a smaller body")]
    BodyTooLarge(u64),
    #[error("the request body could not be read (malformed chunked encoding, or the connection failed): send a well-formed body")]
    BadBody,
    #[error(transparent)]
    Send(#[from] SendError),
    #[error(
        "the relay of this fleet that serves the tunnel `{0}` did not answer: try again shortly"
    )]
    PeerUnreachable(Subdomain),
    #[error(
        "the tunnel `{0}` moved to another client while this request was on its way: try again"
    )]
    Moved(Subdomain),
}

fn error_status(err: &IngressError) -> StatusCode {
    match err {
        IngressError::BadHost(_)
        | IngressError::DuplicateHost
        | IngressError::ConflictingHost
        | IngressError::UnsupportedUpgrade(_)
        | IngressError::BadBody => StatusCode::BAD_REQUEST,
        IngressError::UnknownHost { .. } | IngressError::BadName { .. } => StatusCode::NOT_FOUND,
        IngressError::Connect => StatusCode::NOT_IMPLEMENTED,
        IngressError::PeerUnreachable(_) => StatusCode::BAD_GATEWAY,
        IngressError::Moved(_) => StatusCode::SERVICE_UNAVAILABLE,
        IngressError::SlowBody(_) => StatusCode::REQUEST_TIMEOUT,
        IngressError::BodyTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
        IngressError::Send(err) => match err {
            SendError::NotConnected(_) => StatusCode::NOT_FOUND,
            SendError::Busy(..) => StatusCode::SERVICE_UNAVAILABLE,
            SendError::CallerBusy(..) | SendError::RateLimited(..) => StatusCode::TOO_MANY_REQUESTS,
            SendError::HeadersTooLarge(_) => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            SendError::Timeout(..) => StatusCode::GATEWAY_TIMEOUT,
            SendError::Gone(..) | SendError::Refused(..) => StatusCode::BAD_GATEWAY,
        },
    }
}

/// How the activity log names the end of an exchange that failed with `err`.
fn error_outcome(err: &IngressError) -> Outcome {
    match err {
        IngressError::SlowBody(_)
        | IngressError::BodyTooLarge(_)
        | IngressError::Send(
            SendError::Busy(..)
            | SendError::CallerBusy(..)
            | SendError::RateLimited(..)
            | SendError::HeadersTooLarge(_),
        ) => Outcome::RelayLimit,
        IngressError::Send(SendError::Timeout(..)) => Outcome::TargetTimeout,
        _ => Outcome::Failed,
    }
}

fn error_response(err: &IngressError) -> Response<Body> {
    if let IngressError::Send(SendError::Gone(name, source) | SendError::Refused(name, source)) =
        err
    {
        debug!(%name, %source, "tunnel request failed");
    }
    let mut response = text(error_status(err), err.to_string());
    if let IngressError::Send(SendError::RateLimited(_, seconds, _)) = err {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(*seconds));
    }
    if let IngressError::Moved(_) = err {
        // The next lookup finds the name's new holder.
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    response
}

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
        .header_read_timeout(state.config.header_timeout)
        // A request head beyond this gets a bare 431 from hyper, unread;
        // up to it, the relay's own 431 says what to send instead.
        .max_buf_size(4 * MAX_REQUEST_HEADER_LIST);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(MAX_REQUEST_HEADER_LIST as u32);
    let builder = Arc::new(builder);
    let timeouts = Timeouts {
        first_request: state.config.header_timeout,
        idle: state.config.idle_timeout,
        write: state.config.write_timeout,
    };
    let (tls_listener, acceptor) = match listeners.tls {
        Some((listener, resolver)) => (
            Some(listener),
            Some(TlsAcceptor::from(tls::server_config(resolver))),
        ),
        None => (None, None),
    };
    let capacity = Arc::new(Semaphore::new(state.config.max_connections));
    let proxies = Arc::new(proxy::TrustedProxies::new(
        state.config.trusted_proxies.clone(),
    ));
    // Owns the connection tasks: those still open after the grace period are
    // aborted when it drops.
    let mut connections = tokio::task::JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        // At the cap, stop accepting until a connection ends; the kernel's
        // backlog holds callers meanwhile. Cancel-safe: nothing is taken.
        let permit = tokio::select! {
            permit = Arc::clone(&capacity).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
            () = shutdown.cancelled() => break,
        };
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
        // A trusted proxy's connections are counted against the caller it
        // names, once its PROXY header is read, or not at all.
        let trusted = proxies.contains(peer.ip());
        let per_ip = if trusted {
            None
        } else {
            let Some(per_ip) = connection_place(&state, peer) else {
                continue;
            };
            Some(per_ip)
        };
        if let Err(err) = stream.set_nodelay(true) {
            debug!(%err, "could not set TCP_NODELAY");
        }
        let activity = Activity::new();
        let (state, builder, watcher, proxies) = (
            Arc::clone(&state),
            Arc::clone(&builder),
            graceful.watcher(),
            Arc::clone(&proxies),
        );
        let connection = async move {
            let mut stream = stream;
            let (caller, rest, per_ip) = if trusted {
                let header = tokio::time::timeout(
                    state.config.header_timeout,
                    proxy::read_header(&mut stream),
                );
                let required = state.config.proxy_protocol == proxy::ProxyProtocol::Required;
                match header.await {
                    Ok(Ok((proxy::Opening::Header(Some(caller)), rest))) => {
                        match connection_place(&state, caller) {
                            Some(per_ip) => (Some(caller), rest, Some(per_ip)),
                            None => return,
                        }
                    }
                    Ok(Ok((proxy::Opening::Plain, _))) if required => {
                        return debug!(
                            "trusted proxy's connection without the required PROXY header refused"
                        );
                    }
                    Ok(Ok((_, rest))) => (None, rest, None),
                    Ok(Err(err)) => return debug!(%err, "trusted proxy's connection refused"),
                    Err(_) => return debug!("trusted proxy sent no request in time"),
                }
            } else {
                (None, Bytes::new(), per_ip)
            };
            let stream = GuardedIo::new(
                proxy::Prefixed::new(rest, stream),
                Arc::clone(&activity),
                timeouts,
                (permit, per_ip),
            );
            // Without a PROXY header, each request may name its caller,
            // unless the peer is a load balancer that must send one (a
            // health check's LOCAL header names no caller).
            let forwarded = trusted
                && caller.is_none()
                && state.config.proxy_protocol == proxy::ProxyProtocol::Optional;
            let link = Link {
                state,
                peer: caller.unwrap_or(peer),
                proxies: forwarded.then_some(proxies),
                activity,
                https: tls.is_some(),
                forwarded: false,
                owner: None,
            };
            let result = match tls {
                None => serve_connection(link, &builder, watcher, TokioIo::new(stream)).await,
                Some(acceptor) => {
                    match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await
                    {
                        Ok(Ok(stream)) => {
                            serve_connection(link, &builder, watcher, TokioIo::new(stream)).await
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
        // At debug, as each request's span: a tunnel's span names its
        // client, and an enabled span costs a formatted field per connection.
        connections.spawn(connection.instrument(debug_span!("conn", %peer)));
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

/// A place under the per-address connection cap for `caller`, or `None`
/// (counted) when it holds its limit.
fn connection_place(state: &State, caller: SocketAddr) -> Option<crate::limits::PerIpGuard> {
    let place = state.connections_per_ip.acquire(caller.ip());
    if place.is_none() {
        // One address at its limit must not crowd out everyone else.
        state
            .metrics
            .connections_refused
            .fetch_add(1, Ordering::Relaxed);
        debug!(%caller, "connection refused: its address holds its limit");
    }
    place
}

/// What each request of one connection needs to know about it.
#[derive(Clone)]
struct Link {
    /// The relay.
    state: Arc<State>,
    /// The caller's address: the peer's, the one a trusted proxy's PROXY
    /// header named, or (per request) the one its `X-Forwarded-For` names.
    peer: SocketAddr,
    /// Set when the peer is a trusted proxy that sent no PROXY header:
    /// each request's `X-Forwarded-For` then names its caller.
    proxies: Option<Arc<proxy::TrustedProxies>>,
    /// The connection's activity, for its idle timeout.
    activity: Arc<Activity>,
    /// Whether the caller came over TLS.
    https: bool,
    /// Set when the request came from another relay of the fleet, which
    /// records it: the answer keeps the client's outcome for that relay.
    forwarded: bool,
    /// For a request from another relay of the fleet: the owner that relay
    /// found holding the tunnel, and records the exchange for. Only a
    /// tunnel of that owner may take it.
    owner: Option<crate::store::OwnerKey>,
}

/// Serves HTTP/1.1 or HTTP/2 on one accepted connection, plain or TLS.
async fn serve_connection<I>(
    link: Link,
    builder: &auto::Builder<TokioExecutor>,
    watcher: Watcher,
    io: I,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let service = service_fn(move |req: Request<Incoming>| {
        let mut link = link.clone();
        if let Some(proxies) = &link.proxies {
            if let Some(caller) = proxies.forwarded_for(req.headers()) {
                // The port behind an HTTP proxy is unknown.
                link.peer = SocketAddr::new(caller, 0);
            }
            if let Some(https) = proxy::forwarded_https(req.headers()) {
                link.https = https;
            }
        }
        async move {
            let active = link.activity.begin();
            let response = handle(&link, req).await;
            // The request counts as in flight until its response body ends.
            let (parts, body) = response.into_parts();
            let body = Holding::new(body, active);
            Ok::<_, Infallible>(Response::from_parts(parts, body.boxed_unsync()))
        }
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
async fn handle(link: &Link, req: Request<Incoming>) -> Response<Body> {
    let state = &link.state;
    let host = match request_host(&req, &state.config.domain) {
        Ok(host) => host,
        Err(err) => return error_response(&err),
    };
    match route(&host, &state.config.domain) {
        Ok(Route::Relay) => {
            let h2_caller = req.version() == Version::HTTP_2;
            let caller = api::Caller {
                peer: link.peer.ip(),
                https: link.https,
            };
            let response = api::handle(state, caller, &link.activity, req).await;
            if h2_caller {
                // An API answer (a detail view, a HAR, a live feed) waits
                // on an HTTP/2 caller's credit like a tunnel's does.
                let (parts, body) = response.into_parts();
                Response::from_parts(parts, relay_body(link, body, ()))
            } else {
                response
            }
        }
        Ok(Route::Tunnel(name)) => {
            let exchange = ExchangeId::new();
            // At debug: nothing inside logs at info or above, and an
            // enabled span formats its fields on every request.
            let span = debug_span!("request", %exchange, tunnel = %name, method = %req.method(), path = %req.uri().path());
            // A name this relay does not serve may be another relay's.
            let holder = match &state.cluster {
                Some(cluster) if state.tunnels.get(&name).is_none() => {
                    match cluster.holder(&name, link.peer.ip()).await {
                        Ok(holder) => holder.map(|holder| (cluster, holder)),
                        Err(err @ crate::cluster::LookupError::Refused(wait)) => {
                            let mut response = text(StatusCode::TOO_MANY_REQUESTS, err.to_string());
                            response.headers_mut().insert(
                                header::RETRY_AFTER,
                                HeaderValue::from(wait.as_secs().max(1)),
                            );
                            return response;
                        }
                        Err(err) => {
                            warn!(%err, tunnel = %name, "the fleet's registry did not answer");
                            return peers::holder_unknown(&name);
                        }
                    }
                }
                _ => None,
            };
            let (capture, result) = match holder {
                Some((cluster, holder)) => {
                    let owner = crate::tunnels::Owner::from_key(&holder.owner);
                    let capture = capture_for(link, &name, &host, exchange, &req, owner);
                    let result = peers::forward_to_holder(
                        link,
                        cluster,
                        &holder,
                        (&name, host, exchange),
                        req,
                        capture.as_ref(),
                    )
                    .instrument(span)
                    .await;
                    match result {
                        Ok((response, true)) => {
                            if let Some(capture) = capture {
                                capture.discard();
                            }
                            return response;
                        }
                        Ok((response, false)) => (capture, Ok(response)),
                        Err(err) => (capture, Err(err)),
                    }
                }
                None => {
                    let capture = match start_capture(link, &name, &host, exchange, &req) {
                        Some(capture) => Some(capture),
                        // Held for its owner by another relay of the fleet,
                        // whose session ended there: recorded here as
                        // that relay would.
                        None => held_in_fleet(link, &name).await.and_then(|owner| {
                            capture_for(link, &name, &host, exchange, &req, owner)
                        }),
                    };
                    let result = forward(link, name, host, exchange, req, capture.as_ref())
                        .instrument(span)
                        .await;
                    (capture, result)
                }
            };
            match result {
                Ok(response) => response,
                Err(err) => {
                    state.metrics.request_errors.fetch_add(1, Ordering::Relaxed);
                    let response = error_response(&err);
                    if let Some(capture) = capture {
                        if let IngressError::Send(SendError::RateLimited(.., false)) = err {
                            // Counted above; a flood does not fill the log.
                            capture.discard();
                            return response;
                        }
                        let message = format!("{err}\n");
                        capture.failed(
                            error_outcome(&err),
                            err.to_string(),
                            Some((
                                response.status().as_u16(),
                                response.headers(),
                                message.into(),
                            )),
                        );
                    }
                    response
                }
            }
        }
        Err(err) => error_response(&err),
    }
}

/// Starts recording an exchange with tunnel `name`, if capture is on and
/// the name has an owner (a live tunnel or a hold): unknown names are not
/// recorded.
fn start_capture(
    link: &Link,
    name: &Subdomain,
    host: &str,
    id: ExchangeId,
    req: &Request<Incoming>,
) -> Option<Arc<Capture>> {
    if !link.state.config.capture {
        return None;
    }
    let owner = link.state.tunnels.owner_of(name)?;
    capture_for(link, name, host, id, req, owner)
}

/// The owner another relay of the fleet holds `name` for since its session
/// ended there, as the shared name registry says, or since that relay died,
/// as its last session's row says; `None` off a fleet, or when the
/// registry does not answer.
async fn held_in_fleet(link: &Link, name: &Subdomain) -> Option<crate::tunnels::Owner> {
    let state = &link.state;
    let cluster = state.cluster.as_ref()?;
    if !state.config.capture {
        return None;
    }
    let unread = |err: crate::store::StoreError| {
        debug!(%err, tunnel = %name, "name's hold not read");
    };
    match state.names.name(name.as_str()).await {
        Ok(Some(record)) if record.hold_until.is_some_and(|until| until > now_micros()) => {
            return Some(crate::tunnels::Owner::from_key(&record.owner));
        }
        // The name registry is saved beside a session as it starts, so a
        // relay that died at once may have left only its session's row.
        Ok(_) => {}
        Err(err) => {
            unread(err);
            return None;
        }
    }
    match cluster.held_after_crash(name, state.config.name_hold).await {
        Ok(owner) => owner.map(|owner| crate::tunnels::Owner::from_key(&owner)),
        Err(err) => {
            unread(err);
            None
        }
    }
}

/// Starts recording an exchange with tunnel `name`, owned by `owner`, if
/// capture is on.
fn capture_for(
    link: &Link,
    name: &Subdomain,
    host: &str,
    id: ExchangeId,
    req: &Request<Incoming>,
    owner: crate::tunnels::Owner,
) -> Option<Arc<Capture>> {
    if !link.state.config.capture {
        return None;
    }
    let scheme = if link.https { "https" } else { "http" };
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
    // A header list the tunnel refuses (431) is kept only up to what it
    // would carry: a stranger's oversized headers do not fill the log.
    let mut request_headers = headers_of(req.headers());
    let cut = cap_headers(&mut request_headers, MAX_REQUEST_HEADER_LIST);
    let entry = Exchange {
        id,
        tunnel: name.to_string(),
        owner: owner.key(),
        kind: Kind::Tunnel,
        replay_of: None,
        received_at: now_micros(),
        method: req.method().to_string(),
        url: format!("{scheme}://{host}{path}"),
        http_version: format!("{:?}", req.version()),
        remote_addr: link.peer.to_string(),
        request_headers,
        request_body: CapturedBody::default(),
        response: None,
        responded_at: None,
        done_at: None,
        // Until an answer is recorded, the caller is the one who left.
        outcome: Outcome::CallerHungUp,
        error: None,
        incomplete: cut,
        replayed_at: None,
        dispatch: None,
    };
    Some(Capture::new(&link.state.recorder, entry))
}

/// Cuts header values so that names and values total at most `cap` bytes;
/// returns whether anything was cut.
fn cap_headers(headers: &mut [crate::store::Header], cap: usize) -> bool {
    let mut left = cap;
    let mut cut = false;
    for header in headers {
        let size = header.name.len() + header.value.len();
        if size > left {
            header
                .value
                .truncate(left.saturating_sub(header.name.len()));
            cut = true;
        }
        left = left.saturating_sub(header.name.len() + header.value.len());
    }
    cut
}

/// The `content-length` a request declares.
fn content_length(headers: &hyper::HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

/// Refuses a request whose `content-length` is above `max`, before any of
/// its body is read.
fn check_declared_size(headers: &hyper::HeaderMap, max: u64) -> Result<(), IngressError> {
    match content_length(headers) {
        Some(declared) if declared > max => Err(IngressError::BodyTooLarge(max)),
        _ => Ok(()),
    }
}

/// Answers a request for a held name whose client is not connected, and
/// tells the caller to come back: webhook senders retry on their own. The
/// request is recorded for a later replay when capture is on.
async fn offline(
    link: &Link,
    name: &Subdomain,
    capture: Option<&Arc<Capture>>,
    req: Request<Incoming>,
) -> Result<Response<Body>, IngressError> {
    let state = &link.state;
    // The limits a live tunnel's requests meet, so a name whose client is
    // away is no cheaper to flood.
    let size = crate::tunnels::request_header_list_size(&req);
    if size > MAX_REQUEST_HEADER_LIST {
        return Err(SendError::HeadersTooLarge(size).into());
    }
    check_declared_size(req.headers(), state.config.max_body_size)?;
    let (per_ip, slots) = &state.offline;
    let _caller = per_ip
        .acquire(link.peer.ip())
        .ok_or_else(|| SendError::CallerBusy(name.clone(), per_ip.limit()))?;
    let _slot = Arc::clone(slots)
        .try_acquire_owned()
        .map_err(|_| SendError::Busy(name.clone(), state.config.max_requests_per_tunnel))?;
    let (body, watch) = PacedBody::new(
        req.into_body(),
        state.config.body_timeout,
        state.config.body_min_rate,
        state.config.max_body_size,
    );
    // Read whole either way, so the caller's connection stays usable.
    let mut body = match capture {
        Some(capture) => capture.tap(body, Side::Request).boxed_unsync(),
        None => body.boxed_unsync(),
    };
    while let Some(frame) = body.frame().await {
        if frame.is_err() {
            return Err(match watch.failure() {
                Some(BodyFailure::Stalled(pause)) => {
                    IngressError::SlowBody(BodyError::Stalled(pause))
                }
                Some(BodyFailure::TooSlow(rate)) => {
                    IngressError::SlowBody(BodyError::TooSlow(rate))
                }
                Some(BodyFailure::TooLarge(limit)) => IngressError::BodyTooLarge(limit),
                _ => IngressError::BadBody,
            });
        }
    }
    drop(body);
    let recorded = if capture.is_some() {
        ". The request was recorded for its owner to replay"
    } else {
        ""
    };
    let message = format!(
        "the tunnel {name} is offline: its client is not connected{recorded}; try again later\n"
    );
    let mut response = text(StatusCode::SERVICE_UNAVAILABLE, message.trim_end());
    response.headers_mut().insert(
        header::RETRY_AFTER,
        HeaderValue::from_static(OFFLINE_RETRY_AFTER),
    );
    if link.forwarded {
        // For the ingress relay, which records it.
        response.headers_mut().insert(
            HeaderName::from_static(meta::OUTCOME),
            HeaderValue::from_static(Outcome::ClientOffline.as_str()),
        );
    }
    if let Some(capture) = capture {
        capture.failed(
            Outcome::ClientOffline,
            "the tunnel's client was not connected".to_owned(),
            Some((503, response.headers(), message.into())),
        );
    }
    Ok(response)
}

/// The request's host as sent (`:authority` for HTTP/2 and absolute-form
/// URIs, else the one `Host` header), with its port if any.
fn request_host(req: &Request<Incoming>, domain: &str) -> Result<String, IngressError> {
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        // RFC 9112 §3.2: a request with more than one Host is a 400.
        return Err(IngressError::DuplicateHost);
    }
    if let Some(authority) = req.uri().authority() {
        // RFC 9113 §8.3.1: an HTTP/2 request whose Host names another host
        // than its `:authority` is malformed; routing by either would let a
        // proxy in front check one name while the relay serves another.
        // (HTTP/1.1's absolute form is different: RFC 9112 §3.2.2 says the
        // target wins and Host is ignored.)
        if req.version() == Version::HTTP_2 {
            if let Some(host) = host {
                let same = host.to_str().ok().and_then(normalize_host)
                    == normalize_host(authority.as_str());
                if !same {
                    return Err(IngressError::ConflictingHost);
                }
            }
        }
        return Ok(authority.as_str().to_owned());
    }
    host.and_then(|h| h.to_str().ok())
        .filter(|h| !h.is_empty())
        .map(str::to_owned)
        .ok_or_else(|| IngressError::BadHost(domain.to_owned()))
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

/// Sends a public request through tunnel `name` (reached as `host`) and
/// returns the client's response, streaming both bodies.
async fn forward(
    link: &Link,
    name: Subdomain,
    host: String,
    exchange: ExchangeId,
    mut req: Request<Incoming>,
    capture: Option<&Arc<Capture>>,
) -> Result<Response<Body>, IngressError> {
    let state = &link.state;
    // Another relay of the fleet forwards a caller's WebSocket upgrade as
    // the tunnel carries it: an extended CONNECT (RFC 8441).
    let forwarded_websocket = link.forwarded
        && req.method() == Method::CONNECT
        && req
            .extensions()
            .get::<hyper::ext::Protocol>()
            .is_some_and(|protocol| protocol.as_str() == "websocket");
    if req.method() == Method::CONNECT && !forwarded_websocket {
        return Err(IngressError::Connect);
    }
    let websocket = if forwarded_websocket {
        Some(hyper::upgrade::on(&mut req))
    } else if req.headers().contains_key(header::UPGRADE) {
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
    let tunnel = match state.tunnels.get(&name) {
        Some(tunnel) => tunnel,
        // Held for its owner: a capture exists only for names with one.
        None if capture.is_some() || state.tunnels.owner_of(&name).is_some() => {
            return offline(link, &name, capture, req).await
        }
        None => return Err(SendError::NotConnected(name.clone()).into()),
    };
    // Checked on the very tunnel the request goes into: the name may have
    // changed hands here since the ingress relay looked it up.
    if link
        .owner
        .as_ref()
        .is_some_and(|owner| tunnel.owner.key() != *owner)
    {
        return Err(IngressError::Moved(name));
    }
    // Refused before anything reaches the client: a flood costs the tunnel
    // nothing, and a body announced too large is never read.
    tunnel.spend_rate(link.peer.ip())?;
    check_declared_size(req.headers(), state.config.max_body_size)?;
    let admission = tunnel.admit(link.peer.ip())?;

    let caller_version = req.version();
    let (mut parts, body) = req.into_parts();
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let scheme = if link.https { "https" } else { "http" };
    parts.uri = Uri::builder()
        .scheme(scheme)
        .authority(host)
        .path_and_query(path)
        .build()
        .map_err(|_| IngressError::BadHost(state.config.domain.clone()))?;
    let websocket_key = parts.headers.remove(header::SEC_WEBSOCKET_KEY);
    remove_hop_by_hop(&mut parts.headers);
    if link.forwarded {
        // Written by another relay of the fleet, which removed its
        // caller's `ferry-*` headers: a webhook delivery keeps its type.
        remove_relay_headers(&mut parts.headers);
    } else {
        remove_ferry_headers(&mut parts.headers);
    }
    remove_forwarding_headers(&mut parts.headers);
    parts.headers.remove(header::HOST);
    if websocket.is_some() {
        // RFC 8441: a WebSocket travels over HTTP/2 as an extended CONNECT.
        parts.method = Method::CONNECT;
        parts
            .extensions
            .insert(hyper::ext::Protocol::from_static("websocket"));
    }
    let declared = content_length(&parts.headers);
    let (body, watch) = PacedBody::new(
        body,
        state.config.body_timeout,
        state.config.body_min_rate,
        state.config.max_body_size,
    );
    let body = match capture {
        Some(capture) => {
            Coalesce::new(capture.tap(body, Side::Request).declared(declared)).boxed_unsync()
        }
        None => Coalesce::new(body).boxed_unsync(),
    };
    let request = Request::from_parts(parts, body);
    let meta = RequestMeta {
        exchange,
        client_ip: link.peer.ip(),
        https: link.https,
    };
    state.metrics.requests.fetch_add(1, Ordering::Relaxed);
    let mut response = tunnel
        .send(request, &meta, state.config.request_timeout)
        .await
        .map_err(|err| match watch.failure() {
            Some(BodyFailure::Stalled(pause)) => IngressError::SlowBody(BodyError::Stalled(pause)),
            Some(BodyFailure::TooSlow(rate)) => IngressError::SlowBody(BodyError::TooSlow(rate)),
            Some(BodyFailure::TooLarge(limit)) => IngressError::BodyTooLarge(limit),
            Some(BodyFailure::Caller) => IngressError::BadBody,
            None => IngressError::Send(err),
        })?;
    let h2_caller = caller_version == Version::HTTP_2;
    let tunnel_side = websocket
        .is_some()
        .then(|| hyper::upgrade::on(&mut response));
    let (mut parts, body) = response.into_parts();
    remove_hop_by_hop(&mut parts.headers);
    // A forwarded request's outcome is the ingress relay's to record.
    let outcome = if link.forwarded {
        parts.headers.get(meta::OUTCOME).cloned()
    } else {
        parts.headers.remove(meta::OUTCOME)
    }
    .and_then(|v| v.to_str().ok().and_then(|v| v.parse().ok()))
    .unwrap_or(Outcome::Answered);
    let body = body.map_err(BodyError::Tunnel);
    let upgraded = websocket.is_some() && parts.status == StatusCode::OK;
    let body = match capture {
        // An upgrade's answer is recorded as the caller sees it, below.
        Some(capture) if !upgraded => {
            capture.responded(parts.status.as_u16(), &parts.headers, outcome);
            capture.tap(body, Side::Response).boxed_unsync()
        }
        _ => body.boxed_unsync(),
    };
    match websocket.zip(tunnel_side) {
        Some((public, tunnel_side)) if upgraded => {
            let active = link.activity.begin();
            state.spawn(bridge(public, tunnel_side, (admission, active)).in_current_span());
            if link.forwarded {
                // The ingress relay answers its caller's upgrade itself.
                return Ok(Response::from_parts(parts, crate::full("")));
            }
            switching_protocols(&mut parts, websocket_key);
            if let Some(capture) = capture {
                capture.responded(parts.status.as_u16(), &parts.headers, outcome);
            }
            Ok(Response::from_parts(parts, crate::full("")))
        }
        // The ingress relay of a forwarded request watches its caller's
        // reading and resets the stream when it stalls; closing the pooled
        // connection here would end every other request on it.
        _ if h2_caller && !link.forwarded => {
            let body = relay_body(link, body, admission);
            Ok(Response::from_parts(parts, body))
        }
        _ => {
            // The request counts as in flight until its response body ends.
            let body = Holding::new(body, admission);
            Ok(Response::from_parts(parts, body.boxed_unsync()))
        }
    }
}

/// Turns the head of a WebSocket stream's answer into the caller's `101`,
/// with the accept key for the key the caller sent.
fn switching_protocols(parts: &mut http::response::Parts, websocket_key: Option<HeaderValue>) {
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
}

/// Drops what a public caller claims about where it came from: the relay
/// is the edge, so the client sets `X-Forwarded-*` from the relay's own view
/// (the peer, the scheme, the public host), and a forged `X-Forwarded-For`,
/// `X-Real-IP` or `Forwarded` would otherwise reach the origin as if a proxy
/// had said it. Replays drop them from the captured request too.
pub(crate) fn remove_forwarding_headers(headers: &mut hyper::HeaderMap) {
    const FORWARDING: &[&str] = &[
        "x-forwarded-for",
        "x-forwarded-host",
        "x-forwarded-proto",
        "x-real-ip",
        "forwarded",
    ];
    let forged: Vec<HeaderName> = headers
        .keys()
        .filter(|name| FORWARDING.contains(&name.as_str()))
        .cloned()
        .collect();
    for name in forged {
        headers.remove(name);
    }
}

/// Carries a response body to an HTTP/2 caller through a task that gives up
/// when the caller takes nothing for `stall`.
///
/// An HTTP/2 caller can stop reading by withholding flow-control credit,
/// and then its connection never blocks a write: hyper simply stops pulling
/// the body, and the response data piles up unread in the tunnel, where it
/// would hold the tunnel's connection window (stalling every other response
/// on it) and count against HTTP/2's budget for buffered frames, which ends
/// the whole session. The task reads the tunnel side and hands each frame
/// over; a caller that takes none for `stall` has its exchange reset, which
/// frees the data, the window and the request's slot, and the caller's
/// connection is closed (hyper would wait on its credit forever). HTTP/1.1
/// callers need none of this: their socket blocks, and [`GuardedIo`] times
/// the write out.
fn relay_body<G: Send + 'static>(link: &Link, mut body: Body, held: G) -> Body {
    let (frames, receiver) = tokio::sync::mpsc::channel(1);
    let stall = link.state.config.write_timeout;
    let connection = Arc::clone(&link.activity);
    link.state.spawn(async move {
        let _held = held;
        while let Some(frame) = body.frame().await {
            let last = frame.is_err();
            for piece in pieces(frame) {
                match tokio::time::timeout(stall, frames.send(piece)).await {
                    Ok(Ok(())) if !last => {}
                    Ok(Ok(())) => return,
                    Ok(Err(_)) => return,
                    Err(_) => {
                        debug!("the caller took no response data in time; closing its connection");
                        connection.abort();
                        return;
                    }
                }
            }
        }
    });
    ChannelBody(receiver).boxed_unsync()
}

/// The largest frame handed to an HTTP/2 caller at once.
const RELAYED_FRAME: usize = 16 * 1024;

/// `frame` in pieces of at most [`RELAYED_FRAME`]: hyper takes one piece
/// ahead of the caller's credit, so an answer built whole in memory (an API
/// view) still stalls the sender, and is noticed, when the caller takes
/// nothing.
fn pieces(frame: Result<Frame<Bytes>, BodyError>) -> Vec<Result<Frame<Bytes>, BodyError>> {
    match frame {
        Ok(frame) if frame.data_ref().is_some_and(|d| d.len() > RELAYED_FRAME) => {
            let mut data = frame.into_data().unwrap_or_default();
            let mut pieces = Vec::with_capacity(data.len() / RELAYED_FRAME + 1);
            while !data.is_empty() {
                let piece = data.split_to(data.len().min(RELAYED_FRAME));
                pieces.push(Ok(Frame::data(piece)));
            }
            pieces
        }
        other => vec![other],
    }
}

/// A body fed frame by frame through a channel.
struct ChannelBody(tokio::sync::mpsc::Receiver<Result<Frame<Bytes>, BodyError>>);

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        self.0.poll_recv(cx)
    }
}

/// Copies bytes both ways between the public caller's upgraded connection
/// and the tunnel stream (or the stream to the relay holding the tunnel),
/// until either side closes; `_held` keeps the WebSocket counted as a
/// request in flight (on its tunnel and on its connection) meanwhile.
async fn bridge<H>(public: hyper::upgrade::OnUpgrade, tunnel: hyper::upgrade::OnUpgrade, _held: H) {
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
