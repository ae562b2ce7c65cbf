//! One client's tunnel: the connect handshake, then HTTP/2 over the
//! WebSocket until either side closes it.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use ferry_common::byte_stream::{websocket_config, ByteStream, CloseReason};
use ferry_common::handshake::{
    ConnectRequest, HandshakeError, ASSIGNED_SUBDOMAIN_HEADER, CONNECTION_WINDOW, MAX_FRAME_SIZE,
    PUBLIC_URL_HEADER, STREAM_WINDOW,
};
use hyper::body::Incoming;
use hyper::client::conn::http2;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::upgrade::OnUpgrade;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::WebSocketStream;
use tracing::{debug, info, info_span, Instrument};

use crate::tunnels::{ClaimError, Owner, Tunnel};
use crate::{text, Body, State, Token};

/// Checks the bearer token when the relay has tokens. `Ok(None)` on an open
/// relay; the matching token otherwise; a 401 response when it is missing or
/// wrong.
pub(crate) fn authorize(
    state: &State,
    headers: &HeaderMap,
) -> Result<Option<Token>, Box<Response<Body>>> {
    if state.config.tokens.is_empty() {
        return Ok(None);
    }
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim);
    let Some(presented) = presented else {
        return Err(Box::new(unauthorized(
            "this relay needs a token: pass --token TOKEN to ferry (or set FERRY_TOKEN)",
        )));
    };
    state
        .config
        .tokens
        .iter()
        .find(|token| token.matches(presented))
        .cloned()
        .map(Some)
        .ok_or_else(|| {
            Box::new(unauthorized(
                "the token was not accepted by this relay: check --token or FERRY_TOKEN",
            ))
        })
}

fn unauthorized(message: &str) -> Response<Body> {
    let mut response = text(StatusCode::UNAUTHORIZED, message);
    response
        .headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    response
}

/// Whether `headers` ask for a WebSocket upgrade (RFC 6455 §4.2.1).
pub(crate) fn is_websocket_upgrade(method: &Method, headers: &HeaderMap) -> bool {
    let has_token = |name: header::HeaderName, token: &str| {
        headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    method == Method::GET
        && has_token(header::UPGRADE, "websocket")
        && has_token(header::CONNECTION, "upgrade")
        && headers.contains_key(header::SEC_WEBSOCKET_KEY)
}

/// Answers `GET /api/v1/tunnels/connect`: checks the handshake, claims the
/// subdomain, switches protocols and starts the session.
pub(crate) async fn connect(state: &Arc<State>, mut req: Request<Incoming>) -> Response<Body> {
    if !is_websocket_upgrade(req.method(), req.headers()) {
        return text(
            StatusCode::BAD_REQUEST,
            "this is the tunnel endpoint: it expects the WebSocket upgrade that `ferry http` sends",
        );
    }
    if req
        .headers()
        .get(header::SEC_WEBSOCKET_VERSION)
        .map(HeaderValue::as_bytes)
        != Some(b"13")
    {
        let mut response = text(
            StatusCode::UPGRADE_REQUIRED,
            "only WebSocket version 13 is supported",
        );
        response.headers_mut().insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
        return response;
    }
    if state.shutdown.is_cancelled() {
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            "the relay is shutting down: connect again in a moment",
        );
    }
    let token = match authorize(state, req.headers()) {
        Ok(token) => token,
        Err(response) => return *response,
    };
    let request = match ConnectRequest::from_parts(req.headers(), req.uri().query()) {
        Ok(request) => request,
        Err(err) => {
            let status = match err {
                HandshakeError::ClientTooOld { .. } | HandshakeError::RelayTooOld { .. } => {
                    StatusCode::UPGRADE_REQUIRED
                }
                _ => StatusCode::BAD_REQUEST,
            };
            return text(status, err.to_string());
        }
    };
    let owner = match (token, request.client_key) {
        (Some(_), _) => Owner::Token(bearer(req.headers())),
        (None, Some(key)) => Owner::Key(key),
        (None, None) => Owner::Anonymous,
    };
    let claim = match state
        .tunnels
        .claim(request.subdomain, owner, |name| state.public_url(name))
    {
        Ok(claim) => claim,
        Err(err @ ClaimError::InUse(_)) => return text(StatusCode::CONFLICT, err.to_string()),
        Err(err @ ClaimError::TooMany(_)) => {
            return text(StatusCode::TOO_MANY_REQUESTS, err.to_string())
        }
        Err(err @ ClaimError::Exhausted) => {
            return text(StatusCode::SERVICE_UNAVAILABLE, err.to_string())
        }
    };
    if let Some(old) = claim.replaced {
        info!(name = %old.name, id = old.id, "tunnel taken over by a new session");
        old.close.close(CloseReason::policy(
            "a new session with the same credentials took over this subdomain",
        ));
    }
    let tunnel = claim.tunnel;
    let accept = req
        .headers()
        .get(header::SEC_WEBSOCKET_KEY)
        .map(|key| derive_accept_key(key.as_bytes()))
        .unwrap_or_default();
    let on_upgrade = hyper::upgrade::on(&mut req);
    let span = info_span!("tunnel", name = %tunnel.name, id = tunnel.id);
    state
        .tasks
        .spawn(run(Arc::clone(state), Arc::clone(&tunnel), on_upgrade).instrument(span));

    let mut response = Response::new(crate::full(""));
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    let values = [
        (header::SEC_WEBSOCKET_ACCEPT, accept),
        (
            header::HeaderName::from_static(PUBLIC_URL_HEADER),
            tunnel.public_url.clone(),
        ),
        (
            header::HeaderName::from_static(ASSIGNED_SUBDOMAIN_HEADER),
            tunnel.name.to_string(),
        ),
    ];
    for (name, value) in values {
        if let Ok(value) = HeaderValue::from_str(&value) {
            headers.insert(name, value);
        }
    }
    response
}

/// The raw bearer token, which identifies the owner of a tunnel.
fn bearer(headers: &HeaderMap) -> String {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .map(|(_, token)| token.trim().to_owned())
        .unwrap_or_default()
}

/// Runs one session: HTTP/2 over the upgraded WebSocket, until it ends.
async fn run(state: Arc<State>, tunnel: Arc<Tunnel>, on_upgrade: OnUpgrade) {
    if let Err(err) = serve(&state, &tunnel, on_upgrade).await {
        debug!(%err, "tunnel connection ended with an error");
    }
    state.tunnels.release(&tunnel);
    let reason = tunnel.close.remote_reason().map(|r| r.reason);
    info!(
        reason = reason.as_deref().unwrap_or("connection closed"),
        "tunnel disconnected"
    );
}

async fn serve(state: &State, tunnel: &Tunnel, on_upgrade: OnUpgrade) -> Result<(), hyper::Error> {
    let upgraded = on_upgrade.await?;
    let ws = WebSocketStream::from_raw_socket(
        TokioIo::new(upgraded),
        Role::Server,
        Some(websocket_config()),
    )
    .await;
    let io = TokioIo::new(ByteStream::new(ws, tunnel.close.clone()));
    let (sender, connection) = http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME_SIZE)
        .keep_alive_interval(state.config.keepalive.interval)
        .keep_alive_timeout(state.config.keepalive.timeout)
        .keep_alive_while_idle(true)
        .handshake::<_, Body>(io)
        .await?;
    tunnel.set_sender(sender);
    state.metrics.sessions.fetch_add(1, Ordering::Relaxed);
    info!(public_url = %tunnel.public_url, "tunnel connected");
    connection.await
}
