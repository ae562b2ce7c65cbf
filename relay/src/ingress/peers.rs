//! Forwarding between the relays of a fleet: a public request for a tunnel
//! whose client is connected to another relay goes there over the pooled
//! HTTP/2 client of [`crate::cluster::Cluster`], and the cluster listener
//! takes such requests from the other relays and sends them through the
//! local tunnel.
//!
//! The ingress relay (the one the public caller reached) applies the limits
//! it can (connections, declared size, body pacing) and records the
//! exchange; the holder applies the tunnel's own limits to the caller's
//! real address, which travels with the request, and records nothing. The
//! fleet's secret authenticates every forwarded request, and the owner the
//! ingress relay found travels with it: the holder sends it only into a
//! tunnel of that owner. The cluster listener holds a few connections per
//! address, and drops those that send no request with the secret in time.
//! A WebSocket upgrade travels as it does through a tunnel, an extended
//! CONNECT, and the ingress relay answers its caller's upgrade.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ferry_common::handshake::meta::{self, RequestMeta};
use ferry_common::headers::{remove_ferry_headers, remove_hop_by_hop};
use ferry_common::ids::ExchangeId;
use ferry_common::subdomain::Subdomain;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{self, HeaderName, HeaderValue};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode, Uri, Version};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, debug_span, info_span, warn, Instrument};

use super::{
    check_declared_size, error_outcome, error_response, forward, relay_body,
    remove_forwarding_headers, route, IngressError, Link, Route,
};
use crate::activity::capture::{Capture, Side};
use crate::body::{BodyError, BodyFailure, PacedBody};
use crate::cluster::{
    Cluster, LinkStats, HOST_HEADER, OWNER_HEADER, SECRET_HEADER, UNRECORDED_HEADER,
};
use crate::connection::Activity;
use crate::limits::PerIp;
use crate::session::is_websocket_upgrade;
use crate::store::postgres::SessionHolder;
use crate::store::Outcome;
use crate::tunnels::SendError;
use crate::{text, Body, State};

/// Connections the cluster listener holds open at once: a fleet needs one
/// per other relay, so this only bounds what strangers can open, together
/// with the per-address limit and the deadline for the first request.
const MAX_PEER_CONNECTIONS: usize = 1024;
/// How much longer than the holder's own request timeout the ingress relay
/// waits for its answer, so that the holder's 504 arrives first.
const PEER_ANSWER_MARGIN: Duration = Duration::from_secs(5);

/// Sends a public request for tunnel `name`, reached as `host`, to the
/// relay `holder` that serves it, and returns that relay's answer with
/// both bodies streaming. The exchange is recorded here, with `capture`.
pub(super) async fn forward_to_holder(
    link: &Link,
    cluster: &Cluster,
    holder: &SessionHolder,
    (name, host, exchange): (&Subdomain, String, ExchangeId),
    mut req: Request<Incoming>,
    capture: Option<&Arc<Capture>>,
) -> Result<(Response<Body>, bool), IngressError> {
    let state = &link.state;
    if req.method() == Method::CONNECT {
        return Err(IngressError::Connect);
    }
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
    check_declared_size(req.headers(), state.config.max_body_size)?;
    let caller_version = req.version();
    let (mut parts, body) = req.into_parts();
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    parts.uri = format!("{}{path}", holder.url)
        .parse::<Uri>()
        .map_err(|_| IngressError::PeerUnreachable(name.clone()))?;
    parts.version = Version::HTTP_2;
    let websocket_key = parts.headers.remove(header::SEC_WEBSOCKET_KEY);
    if websocket.is_some() {
        // As the tunnel carries it: an extended CONNECT (RFC 8441).
        parts.method = Method::CONNECT;
        parts
            .extensions
            .insert(hyper::ext::Protocol::from_static("websocket"));
    }
    remove_hop_by_hop(&mut parts.headers);
    remove_ferry_headers(&mut parts.headers);
    remove_forwarding_headers(&mut parts.headers);
    parts.headers.remove(header::HOST);
    let host = HeaderValue::from_str(&host)
        .map_err(|_| IngressError::BadHost(state.config.domain.clone()))?;
    parts
        .headers
        .insert(HeaderName::from_static(HOST_HEADER), host);
    parts.headers.insert(
        HeaderName::from_static(SECRET_HEADER),
        cluster.secret().clone(),
    );
    let owner = HeaderValue::from_str(&holder.owner)
        .map_err(|_| IngressError::PeerUnreachable(name.clone()))?;
    parts
        .headers
        .insert(HeaderName::from_static(OWNER_HEADER), owner);
    RequestMeta {
        exchange,
        client_ip: link.peer.ip(),
        https: link.https,
    }
    .insert(&mut parts.headers);
    let (body, watch) = PacedBody::new(
        body,
        state.config.body_timeout,
        state.config.body_min_rate,
        state.config.max_body_size,
    );
    let body = match capture {
        Some(capture) => capture.tap(body, Side::Request).boxed_unsync(),
        None => body.boxed_unsync(),
    };
    let wait = state.config.request_timeout + PEER_ANSWER_MARGIN;
    LinkStats::count(&cluster.stats().forwarded);
    let sent = tokio::time::timeout(
        wait,
        cluster.client().request(Request::from_parts(parts, body)),
    )
    .await
    .map_err(|_| SendError::Timeout(name.clone(), wait.as_secs()))?;
    let mut response = sent.map_err(|err| match watch.failure() {
        Some(BodyFailure::Stalled(pause)) => IngressError::SlowBody(BodyError::Stalled(pause)),
        Some(BodyFailure::TooSlow(rate)) => IngressError::SlowBody(BodyError::TooSlow(rate)),
        Some(BodyFailure::TooLarge(limit)) => IngressError::BodyTooLarge(limit),
        Some(BodyFailure::Caller) => IngressError::BadBody,
        None => {
            debug!(%err, relay = %holder.relay, "the relay holding the tunnel did not answer");
            IngressError::PeerUnreachable(name.clone())
        }
    })?;
    let upgraded = websocket.is_some() && response.status() == StatusCode::OK;
    let peer_side = upgraded.then(|| hyper::upgrade::on(&mut response));
    let (mut parts, body) = response.into_parts();
    remove_hop_by_hop(&mut parts.headers);
    let unrecorded = parts.headers.remove(UNRECORDED_HEADER).is_some();
    let outcome = parts
        .headers
        .remove(meta::OUTCOME)
        .and_then(|v| v.to_str().ok().and_then(|v| v.parse().ok()))
        .unwrap_or(Outcome::Answered);
    if let Some((public, peer_side)) = websocket.zip(peer_side) {
        let active = link.activity.begin();
        state.spawn(super::bridge(public, peer_side, active).in_current_span());
        super::switching_protocols(&mut parts, websocket_key);
        if let Some(capture) = capture {
            capture.responded(parts.status.as_u16(), &parts.headers, outcome);
        }
        return Ok((Response::from_parts(parts, crate::full("")), false));
    }
    let body = body.map_err(BodyError::Tunnel);
    let body = match capture {
        Some(capture) if !unrecorded => {
            capture.responded(parts.status.as_u16(), &parts.headers, outcome);
            capture.tap(body, Side::Response).boxed_unsync()
        }
        _ => body.boxed_unsync(),
    };
    let body = if caller_version == Version::HTTP_2 {
        relay_body(link, body, ())
    } else {
        body
    };
    Ok((Response::from_parts(parts, body), unrecorded))
}

/// Serves the fleet's forwarded requests on `listener` until `shutdown`,
/// then lets the requests in flight finish, for up to `grace`.
pub(crate) async fn serve_peers(
    state: Arc<State>,
    listener: Option<TcpListener>,
    shutdown: CancellationToken,
    grace: Duration,
) {
    let (Some(listener), Some(cluster), Some(settings)) = (
        listener,
        state.cluster.clone(),
        state.config.cluster.as_ref(),
    ) else {
        return;
    };
    let first_request_timeout = settings.first_request_timeout;
    let builder = Arc::new(ferry_common::link::http2_server(state.config.keepalive));
    let capacity = Arc::new(Semaphore::new(MAX_PEER_CONNECTIONS));
    let per_ip = PerIp::new(settings.max_connections_per_ip);
    // Owns the connection tasks: those still open after the grace period
    // are aborted when it drops.
    let mut connections = tokio::task::JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        // Cancel-safe: nothing is taken when shutdown wins.
        let permit = tokio::select! {
            permit = Arc::clone(&capacity).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
            () = shutdown.cancelled() => break,
        };
        // Cancel-safe: `accept` loses no connection when shutdown wins.
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    warn!(%err, "cluster listener's accept failed");
                    tokio::time::sleep(super::ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => break,
        };
        // Dropped at once: one address on the fleet's network cannot take
        // the places the other relays need.
        let Some(place) = per_ip.acquire(peer.ip()) else {
            LinkStats::count(&cluster.stats().refused_connections);
            debug!(%peer, "cluster connection refused: its address holds its limit");
            continue;
        };
        if let Err(err) = stream.set_nodelay(true) {
            debug!(%err, "could not set TCP_NODELAY");
        }
        let (state, cluster, builder, shutdown) = (
            Arc::clone(&state),
            Arc::clone(&cluster),
            Arc::clone(&builder),
            shutdown.clone(),
        );
        connections.spawn(
            async move {
                let _held = (permit, place);
                // A wrong secret closes the connection: a stranger gets one
                // guess per connection, and holds none open.
                let refused = CancellationToken::new();
                // Set by the first request with the fleet's secret; a
                // connection without one by the deadline is closed.
                let trusted = CancellationToken::new();
                let activity = Activity::new();
                let service = {
                    let signals = (refused.clone(), trusted.clone());
                    let cluster = Arc::clone(&cluster);
                    service_fn(move |req| {
                        let (state, cluster, activity, signals) = (
                            Arc::clone(&state),
                            Arc::clone(&cluster),
                            Arc::clone(&activity),
                            signals.clone(),
                        );
                        async move {
                            Ok::<_, std::convert::Infallible>(
                                answer_peer(state, &cluster, activity, &signals, req).await,
                            )
                        }
                    })
                };
                let deadline = async {
                    tokio::select! {
                        () = trusted.cancelled() => std::future::pending().await,
                        () = tokio::time::sleep(first_request_timeout) => {}
                    }
                };
                let connection = builder.serve_connection(TokioIo::new(stream), service);
                let mut connection = std::pin::pin!(connection);
                let mut deadline = std::pin::pin!(deadline);
                // Cancel-safe: the connection and the deadline are pinned
                // outside and polled on after any signal. At the deadline
                // the connection is dropped, not closed gracefully, which a
                // peer that does not read could hold open.
                let ended = tokio::select! {
                    ended = connection.as_mut() => Some(ended),
                    () = deadline.as_mut() => None,
                    () = refused.cancelled() => {
                        connection.as_mut().graceful_shutdown();
                        tokio::select! {
                            ended = connection.as_mut() => Some(ended),
                            () = deadline.as_mut() => None,
                        }
                    }
                    () = shutdown.cancelled() => {
                        connection.as_mut().graceful_shutdown();
                        Some(connection.await)
                    }
                };
                match ended {
                    None => {
                        LinkStats::count(&cluster.stats().refused_silent);
                        debug!(
                            "cluster connection closed: no request with the fleet's secret in time"
                        );
                    }
                    Some(Err(err)) => debug!(%err, "cluster connection ended with an error"),
                    Some(Ok(())) => {}
                }
            }
            .instrument(info_span!("peer", %peer)),
        );
    }
    drop(listener);
    let drained = async { while connections.join_next().await.is_some() {} };
    if tokio::time::timeout(grace, drained).await.is_err() {
        warn!(
            ?grace,
            "cluster connections still open after the shutdown grace period"
        );
    }
}

/// Answers one forwarded request: checks the fleet's secret (cancelling
/// `refused` when it is wrong, `trusted` when it is right), then sends the
/// request through the local tunnel as the ingress relay described it, if
/// that tunnel is the named owner's.
async fn answer_peer(
    state: Arc<State>,
    cluster: &Cluster,
    activity: Arc<Activity>,
    (refused, trusted): &(CancellationToken, CancellationToken),
    mut req: Request<Incoming>,
) -> Response<Body> {
    let presented = req
        .headers()
        .get(SECRET_HEADER)
        .map_or(&b""[..], HeaderValue::as_bytes);
    if !cluster.verify(presented) {
        refused.cancel();
        LinkStats::count(&cluster.stats().refused_secret);
        debug!("forwarded request without the fleet's secret refused");
        return text(
            StatusCode::UNAUTHORIZED,
            "this is a relay's cluster listener: only the relays of its fleet, which send the fleet's secret, may use it",
        );
    }
    trusted.cancel();
    let header = |name| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let (host, owner) = (header(HOST_HEADER), header(OWNER_HEADER));
    let meta = RequestMeta::take(req.headers_mut());
    let (Some(host), Some(owner), Some(meta)) = (host, owner, meta) else {
        return text(
            StatusCode::BAD_REQUEST,
            "a forwarded request names its host, the tunnel's owner, exchange, caller and scheme",
        );
    };
    let name = match route(&host, &state.config.domain) {
        Ok(Route::Tunnel(name)) => name,
        _ => {
            return text(
                StatusCode::BAD_REQUEST,
                format!("`{host}` is not a tunnel of this fleet's domain"),
            )
        }
    };
    let link = Link {
        peer: SocketAddr::new(meta.client_ip, 0),
        proxies: None,
        activity,
        https: meta.https,
        forwarded: true,
        owner: Some(owner),
        state,
    };
    let span = debug_span!("forwarded", exchange = %meta.exchange, tunnel = %name, method = %req.method(), path = %req.uri().path());
    let result = forward(&link, name, host, meta.exchange, req, None)
        .instrument(span)
        .await;
    let counter = match &result {
        Err(IngressError::Moved(_)) => &cluster.stats().refused_moved,
        _ => &cluster.stats().served,
    };
    LinkStats::count(counter);
    match result {
        // Only this relay says what goes unrecorded, never the client.
        Ok(mut response) => {
            response.headers_mut().remove(UNRECORDED_HEADER);
            response
        }
        Err(err) => {
            let mut response = error_response(&err);
            let outcome = error_outcome(&err);
            response.headers_mut().insert(
                HeaderName::from_static(meta::OUTCOME),
                HeaderValue::from_static(outcome.as_str()),
            );
            if let IngressError::Send(SendError::RateLimited(.., false)) = err {
                response.headers_mut().insert(
                    HeaderName::from_static(UNRECORDED_HEADER),
                    HeaderValue::from_static("1"),
                );
            }
            response
        }
    }
}

/// The answer for a request that reached a relay serving no tunnel, when
/// the fleet's database could not say which relay serves it.
pub(super) fn holder_unknown(name: &Subdomain) -> Response<Body> {
    let mut response = text(
        StatusCode::SERVICE_UNAVAILABLE,
        format!("this relay cannot reach the fleet's database to find the tunnel `{name}`: try again shortly"),
    );
    response.headers_mut().insert(
        header::RETRY_AFTER,
        HeaderValue::from_static(super::OFFLINE_RETRY_AFTER),
    );
    response
}
