//! One client's tunnel: the connect handshake, then HTTP/2 over the
//! WebSocket until either side closes it.

use std::net::IpAddr;
use std::pin::pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use ferry_common::byte_stream::{ByteStream, CloseReason};
use ferry_common::handshake::{ConnectAnswer, ConnectRequest, HandshakeError};
use ferry_common::link::{http2_client, websocket_config, Heard, FIRST_BYTES_WAIT};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::upgrade::OnUpgrade;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::WebSocketStream;
use tracing::{debug, info, info_span, warn, Instrument};

use crate::accounts::AuthError;
use crate::api::ApiError;
use crate::connection::ActiveGuard;
use crate::store::{now_micros, Micros, NameRecord};
use crate::tunnels::{ClaimError, ClientInfo, Owner, Tunnel};
use crate::{Body, State};

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
/// `connection` marks the client's connection busy for the session's life,
/// so that its idle timeout never cuts a tunnel.
pub(crate) async fn connect(
    state: &Arc<State>,
    peer: IpAddr,
    connection: ActiveGuard,
    mut req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    if !is_websocket_upgrade(req.method(), req.headers()) {
        return Err(ApiError::bad_request(
            "this is the tunnel endpoint: it expects the WebSocket upgrade that `ferry http` sends",
        ));
    }
    if req
        .headers()
        .get(header::SEC_WEBSOCKET_VERSION)
        .map(HeaderValue::as_bytes)
        != Some(b"13")
    {
        return Err(ApiError::new(
            StatusCode::UPGRADE_REQUIRED,
            "upgrade_required",
            "only WebSocket version 13 is supported",
        )
        .with_header(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        ));
    }
    // Browsers send `Origin` on every WebSocket handshake and ferry never
    // does: a web page (a tunnel's own, say) must not open tunnels with
    // whatever the browser holds, nor on a relay without tokens.
    if req.headers().contains_key(header::ORIGIN) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "browser_refused",
            "tunnels are opened by the ferry client, not by web pages",
        ));
    }
    if state.shutdown.is_cancelled() {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "the relay is shutting down: connect again in a moment",
        ));
    }
    if let Err(wait) = state.connects.spend(peer) {
        return Err(ApiError::too_many(
            format!(
                "too many tunnel connects from your address: try again in {} s",
                wait.as_secs().max(1)
            ),
            wait,
        ));
    }
    let principal = state.accounts.authorize(req.headers(), peer)?;
    let request = ConnectRequest::from_parts(req.headers(), req.uri().query()).map_err(|err| {
        let status = match err {
            HandshakeError::ClientTooOld { .. } | HandshakeError::RelayTooOld { .. } => {
                StatusCode::UPGRADE_REQUIRED
            }
            _ => StatusCode::BAD_REQUEST,
        };
        ApiError::new(status, "bad_handshake", err.to_string())
    })?;
    let token = principal.as_ref().map(|p| p.token);
    let owner = match principal {
        Some(principal) => Owner::Account(principal.account),
        None => Owner::of_key(request.client_key.as_deref()),
    };
    let client = ClientInfo {
        version: request.client_version,
        target: request.target,
        token,
    };
    let claim = |owner, client| {
        state
            .tunnels
            .claim(request.subdomain.clone(), owner, client, |name| {
                state.public_url(name)
            })
    };
    let tunnel = claim(owner.clone(), client.clone()).map_err(refusal)?;
    // A reload of the tokens file may have removed the token since it was
    // checked, after the reload ended the tunnels that token had opened.
    if token.is_some_and(|token| state.accounts.principal(&token).is_none()) {
        state.tunnels.discard(&tunnel);
        return Err(AuthError::Wrong.into());
    }
    let tunnel = match &state.cluster {
        Some(cluster) => {
            claim_in_fleet(state, cluster, tunnel, || {
                // A random name another relay serves: draw another.
                (request.subdomain.is_none()).then(|| claim(owner.clone(), client.clone()))
            })
            .await?
        }
        None => tunnel,
    };
    let accept = req
        .headers()
        .get(header::SEC_WEBSOCKET_KEY)
        .map(|key| derive_accept_key(key.as_bytes()))
        .unwrap_or_default();
    let on_upgrade = hyper::upgrade::on(&mut req);
    let span = info_span!("tunnel", name = %tunnel.name, id = tunnel.id, client = %peer);
    state.spawn(
        run(
            Arc::clone(state),
            Arc::clone(&tunnel),
            on_upgrade,
            connection,
        )
        .instrument(span),
    );

    let mut response = Response::new(crate::full(""));
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    if let Ok(accept) = HeaderValue::from_str(&accept) {
        headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    }
    ConnectAnswer {
        subdomain: tunnel.name.clone(),
        public_url: tunnel.public_url.clone(),
    }
    .write(headers);
    Ok(response)
}

/// The answer to a connect whose name this relay's registry refused.
fn refusal(err: ClaimError) -> ApiError {
    let (status, code) = match err {
        ClaimError::InUse(_) | ClaimError::Held(..) => (StatusCode::CONFLICT, "name_taken"),
        ClaimError::Reserved(_) => (StatusCode::FORBIDDEN, "name_reserved"),
        ClaimError::TooMany(_) => (StatusCode::TOO_MANY_REQUESTS, "too_many_tunnels"),
        ClaimError::Full(_) | ClaimError::Exhausted => {
            (StatusCode::SERVICE_UNAVAILABLE, "relay_full")
        }
        ClaimError::TokenRemoved => return AuthError::Wrong.into(),
    };
    ApiError::new(status, code, err.to_string())
}

/// How many random names a relay of a fleet tries when the ones it drew
/// are served by other relays.
const FLEET_NAME_ATTEMPTS: usize = 3;

/// Claims `tunnel`'s name (granted by this relay's registry) in the fleet's
/// registry too. A random name that another relay serves or holds is given
/// back and `another` draws a new one, a few times.
async fn claim_in_fleet(
    state: &State,
    cluster: &crate::cluster::Cluster,
    mut tunnel: Arc<Tunnel>,
    another: impl Fn() -> Option<Result<Arc<Tunnel>, ClaimError>>,
) -> Result<Arc<Tunnel>, ApiError> {
    let mut attempts = 1;
    loop {
        let max = state.tunnels.tunnel_limit(&tunnel.owner);
        // A name held for another owner since its session ended, here or on
        // another relay, is theirs; unless it is reserved for this one.
        let hold = (!state.tunnels.reserved_for(&tunnel.name, &tunnel.owner))
            .then_some(state.config.name_hold);
        let err = match cluster.claim(&tunnel, max, hold).await {
            Ok(()) => {
                tunnel.confirm();
                return Ok(tunnel);
            }
            Err(err) => err,
        };
        state.tunnels.discard(&tunnel);
        let answer = match &err {
            crate::cluster::ClaimError::InUse(_) | crate::cluster::ClaimError::Held(_) => {
                ApiError::new(StatusCode::CONFLICT, "name_taken", err.to_string())
            }
            crate::cluster::ClaimError::TooMany(_) => ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_tunnels",
                err.to_string(),
            ),
            crate::cluster::ClaimError::Store(_) => {
                warn!(%err, tunnel = %tunnel.name, "tunnel refused: the fleet's database did not answer");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "store_unavailable",
                    err.to_string(),
                )
            }
        };
        let taken = matches!(
            err,
            crate::cluster::ClaimError::InUse(_) | crate::cluster::ClaimError::Held(_)
        );
        if attempts >= FLEET_NAME_ATTEMPTS || !taken {
            return Err(answer);
        }
        match another() {
            Some(Ok(next)) => tunnel = next,
            Some(Err(err)) => return Err(refusal(err)),
            None => return Err(answer),
        }
        attempts += 1;
    }
}

/// Runs one session: HTTP/2 over the upgraded WebSocket, until it ends.
async fn run(
    state: Arc<State>,
    tunnel: Arc<Tunnel>,
    on_upgrade: OnUpgrade,
    _connection: ActiveGuard,
) {
    let mut saved = None;
    if let Err(err) = serve(&state, &tunnel, on_upgrade, &mut saved).await {
        debug!(%err, "tunnel connection ended with an error");
    }
    state.tunnels.release(&tunnel);
    // A name another relay of the fleet took over is that relay's to save.
    let ours = state
        .cluster
        .as_ref()
        .is_none_or(|cluster| cluster.holds(&tunnel.name));
    // The hold is saved after the session's start was, never before.
    if let Some(saved) = saved {
        let _ = saved.await;
    }
    if ours && state.tunnels.get(&tunnel.name).is_none() {
        let hold = i64::try_from(state.config.name_hold.as_micros()).unwrap_or(i64::MAX);
        remember(&state, &tunnel, Some(now_micros().saturating_add(hold))).await;
    }
    // Only then is the name free in the fleet: another relay's claim finds
    // the hold.
    if let Some(cluster) = &state.cluster {
        cluster.end(&state.tunnels, &tunnel).await;
    }
    let reason = tunnel.close.remote_reason().map(|r| r.reason);
    info!(
        reason = reason.as_deref().unwrap_or("connection closed"),
        "tunnel disconnected"
    );
}

/// Saves `tunnel`'s name in the store: served (`hold_until` None) or held.
/// A failed save is logged; the name's hold then lasts until a restart.
async fn remember(state: &State, tunnel: &Tunnel, hold_until: Option<Micros>) {
    if tunnel.owner == Owner::Anonymous {
        return;
    }
    let record = NameRecord {
        name: tunnel.name.to_string(),
        owner: tunnel.owner.key(),
        last_seen: now_micros(),
        hold_until,
        target: tunnel.client.target.clone(),
    };
    if let Err(err) = state.names.save_name(record).await {
        warn!(%err, "tunnel name not saved");
    }
}

/// Why a session ended.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error(transparent)]
    Http(#[from] hyper::Error),
    #[error("the client {0} after the upgrade")]
    Silent(&'static str),
    #[error("the takeover was refused as it came up: {0}")]
    Lost(#[source] ClaimError),
}

async fn serve(
    state: &Arc<State>,
    tunnel: &Arc<Tunnel>,
    on_upgrade: OnUpgrade,
    saved: &mut Option<tokio::task::JoinHandle<()>>,
) -> Result<(), SessionError> {
    let upgraded = on_upgrade.await?;
    let ws = WebSocketStream::from_raw_socket(
        TokioIo::new(upgraded),
        Role::Server,
        Some(websocket_config()),
    )
    .await;
    let (stream, heard) = Heard::new(ByteStream::new(ws, tunnel.close.clone()));
    let (sender, connection) = http2_client(state.config.keepalive)
        .handshake::<_, Body>(TokioIo::new(stream))
        .await?;
    let mut connection = pin!(connection);
    // Until the client has spoken (its HTTP/2 SETTINGS) the session is not
    // up, and a takeover must not replace anyone. Both arms are
    // cancel-safe: the connection is pinned outside and polled on after.
    tokio::select! {
        ended = connection.as_mut() => {
            ended?;
            return Err(SessionError::Silent("closed the tunnel"));
        }
        heard = tokio::time::timeout(FIRST_BYTES_WAIT, heard) => {
            if !matches!(heard, Ok(Ok(()))) {
                return Err(SessionError::Silent("sent nothing"));
            }
        }
    }
    tunnel.set_sender(sender);
    let replaced = state
        .tunnels
        .activate(tunnel, |token| state.accounts.principal(token).is_some())
        .map_err(|err| {
            tunnel.close.close(CloseReason::policy(err.to_string()));
            SessionError::Lost(err)
        })?;
    if let Some(old) = replaced {
        info!(old = old.id, "tunnel taken over by a new session");
        old.close.close(CloseReason::policy(
            "a new session with the same credentials took over this subdomain",
        ));
    }
    state.metrics.sessions.fetch_add(1, Ordering::Relaxed);
    info!(public_url = %tunnel.public_url, "tunnel connected");
    // Saved beside the serving connection, which never waits on the disk.
    let (state, tunnel) = (Arc::clone(state), Arc::clone(tunnel));
    *saved = Some(tokio::spawn(async move {
        remember(&state, &tunnel, None).await
    }));
    Ok(connection.await?)
}
