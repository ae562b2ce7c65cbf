//! The tunnel session: connect to the relay, serve HTTP/2 over the
//! WebSocket, and reconnect with backoff when the link drops.

use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use ferry_common::api::ErrorBody;
use ferry_common::byte_stream::{ByteStream, CloseReason, CloseSignal};
use ferry_common::handshake::{ConnectAnswer, ConnectRequest, Keepalive};
use ferry_common::link::{http2_server, websocket_config, Heard, FIRST_BYTES_WAIT};
use ferry_common::subdomain::Subdomain;
use hyper::header::{HeaderValue, AUTHORIZATION};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use rustls::pki_types::CertificateDer;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::{Connector, MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::forward::{Forwarder, InFlight};
use crate::{Config, Error, Event};

/// How long requests in flight may run on once the client shuts down.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// How long the close frame may take once the grace period is over.
const CLOSE_WAIT: Duration = Duration::from_secs(1);
/// The first reconnect delay, before jitter; it doubles per failed attempt.
const BACKOFF_BASE: Duration = Duration::from_millis(200);
/// How long opening the tunnel may take (TCP, TLS and the upgrade), so a
/// relay that accepts and never answers cannot stall reconnecting.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest reconnect delay.
const BACKOFF_CAP: Duration = Duration::from_secs(30);

/// The delay before reconnect attempt `attempt` (0 for the first): capped
/// exponential backoff with "equal jitter", half fixed and half random, so
/// clients of a restarted relay do not all return at once. `jitter` is a
/// random number in `[0, 1)`.
pub fn reconnect_delay(attempt: u32, jitter: f64) -> Duration {
    let exponential = BACKOFF_BASE.saturating_mul(1u32 << attempt.min(16));
    let capped = exponential.min(BACKOFF_CAP);
    capped / 2 + capped.mul_f64(jitter.clamp(0.0, 1.0) / 2.0)
}

type Tunnel = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// How a session ended.
enum SessionEnd {
    /// This client is shutting down.
    Shutdown,
    /// The link dropped or the relay closed it.
    Dropped(Option<CloseReason>),
}

/// Runs the tunnel until `shutdown`, reconnecting after drops. Returns an
/// error when the relay refuses the client, or when the very first connect
/// fails (a wrong relay address is better reported than retried).
pub async fn run(
    config: Config,
    events: tokio::sync::broadcast::Sender<Event>,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    run_counting(config, events, InFlight::default(), shutdown).await
}

/// [`run`], counting the requests that wait for the local server's answer
/// in `in_flight`, which the terminal shows.
pub async fn run_counting(
    config: Config,
    events: tokio::sync::broadcast::Sender<Event>,
    in_flight: InFlight,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    // Ends the WebSockets passed through to the target however the tunnel
    // stops: by shutdown, a refusal or a takeover.
    let bridges = shutdown.child_token();
    let forwarder = Arc::new(
        Forwarder::new(
            config.target.clone(),
            config.host_header.clone(),
            config.local_timeout,
            events.clone(),
            bridges.clone(),
        )
        .with_in_flight(in_flight),
    );
    let result = sessions(&config, &events, &shutdown, &forwarder).await;
    bridges.cancel();
    if !forwarder.close_and_wait(CLOSE_WAIT).await {
        debug!("websocket bridges still open after the wait");
    }
    result
}

/// Connects, serves and reconnects until `shutdown` or a final error.
async fn sessions(
    config: &Config,
    events: &tokio::sync::broadcast::Sender<Event>,
    shutdown: &CancellationToken,
    forwarder: &Arc<Forwarder>,
) -> Result<(), Error> {
    let connector = relay_connector(&config.relay_ca)?;
    let client_key = config
        .client_key
        .clone()
        .unwrap_or_else(|| format!("{:032x}", rand::random::<u128>()));
    if let Some(warning) = insecure_token_warning(config) {
        let _ = events.send(Event::Warning(warning));
    }
    let mut subdomain = config.subdomain.clone();
    let mut connected_before = false;
    let mut attempt = 0;
    loop {
        let connected = tokio::select! {
            connected = connect(config, &connector, subdomain.as_ref(), &client_key) => connected,
            () = shutdown.cancelled() => return Ok(()),
        };
        match connected {
            Ok((ws, answer)) => {
                attempt = 0;
                subdomain = Some(answer.subdomain.clone());
                let _ = events.send(Event::Connected {
                    public_url: answer.public_url.clone(),
                    target: config.target.to_string(),
                    reconnected: connected_before,
                });
                connected_before = true;
                match serve(
                    ws,
                    config.keepalive,
                    Arc::clone(forwarder),
                    events,
                    shutdown,
                )
                .await
                {
                    SessionEnd::Shutdown => return Ok(()),
                    SessionEnd::Dropped(Some(reason)) if reason.code == 1008 => {
                        return Err(Error::Closed(reason.reason));
                    }
                    SessionEnd::Dropped(reason) => {
                        let reason = reason.map_or_else(
                            || "the connection to the relay was lost".to_owned(),
                            |r| r.reason,
                        );
                        let _ = events.send(Event::Disconnected { reason });
                    }
                }
            }
            // The name was ours, yet the relay sees it taken: a relay that
            // restarted and lost its holds, or our old session not yet
            // noticed gone. Worth retrying, saying so.
            Err(Error::Refused {
                status: 409,
                message,
            }) if connected_before => {
                let _ = events.send(Event::Warning(format!(
                    "our subdomain is taken on the relay; retrying until it is free ({message})"
                )));
            }
            Err(err) if err.is_final() || !connected_before => return Err(err),
            Err(err) => debug!(%err, "reconnect failed"),
        }
        let delay = reconnect_delay(attempt, rand::random::<f64>());
        attempt = attempt.saturating_add(1);
        let _ = events.send(Event::Reconnecting { delay });
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = shutdown.cancelled() => return Ok(()),
        }
    }
}

/// The TLS settings for a `wss://` relay: the public roots plus any CA the
/// user trusts, on ring (tungstenite's own default would ask the process for
/// a provider).
fn relay_connector(relay_ca: &[CertificateDer<'static>]) -> Result<Connector, Error> {
    let mut roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    for ca in relay_ca {
        roots
            .add(ca.clone())
            .map_err(|err| Error::RelayCa(err.to_string()))?;
    }
    let config = crate::local_tls::client_config()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Connector::Rustls(Arc::new(config)))
}

/// Opens the tunnel WebSocket and reads the relay's answer.
async fn connect(
    config: &Config,
    connector: &Connector,
    subdomain: Option<&Subdomain>,
    client_key: &str,
) -> Result<(Tunnel, ConnectAnswer), Error> {
    let mut request = config
        .relay
        .as_str()
        .into_client_request()
        .map_err(|err| Error::BadRelay(config.relay.clone(), err.to_string()))?;
    ConnectRequest {
        client_key: Some(client_key.to_owned()),
        client_version: Some(format!("ferry/{}", env!("CARGO_PKG_VERSION"))),
        target: Some(config.target.to_string()),
        ..ConnectRequest::new(subdomain.cloned())
    }
    .write(request.headers_mut());
    if let Some(token) = &config.token {
        if let Ok(value) = HeaderValue::from_str(&format!("Bearer {token}")) {
            request.headers_mut().insert(AUTHORIZATION, value);
        }
    }
    let connecting = tokio_tungstenite::connect_async_tls_with_config(
        request,
        Some(websocket_config()),
        true,
        Some(connector.clone()),
    );
    let (ws, response) = tokio::time::timeout(CONNECT_TIMEOUT, connecting)
        .await
        .map_err(|_| {
            Error::Unreachable(
                config.relay.clone(),
                format!("no answer within {} s", CONNECT_TIMEOUT.as_secs()),
            )
        })?
        .map_err(|err| match err {
            tungstenite::Error::Http(response) => {
                let status = response.status();
                let message = response
                    .body()
                    .as_deref()
                    .map(refusal_message)
                    .filter(|m| !m.is_empty())
                    .unwrap_or_else(|| status.to_string());
                Error::Refused {
                    status: status.as_u16(),
                    message,
                }
            }
            other => {
                let mut cause = other.to_string();
                if cause.contains("certificate") {
                    cause.push_str(" (for a relay with a private certificate authority, pass it with --relay-ca)");
                }
                Error::Unreachable(config.relay.clone(), cause)
            }
        })?;
    let answer = ConnectAnswer::read(response.headers())
        .map_err(|err| Error::BadRelay(config.relay.clone(), err.to_string()))?;
    Ok((ws, answer))
}

/// What a refusal says: the API's JSON error message, or the body's text.
fn refusal_message(body: &[u8]) -> String {
    match serde_json::from_slice::<ErrorBody>(body) {
        Ok(error) => error.error.message,
        Err(_) => String::from_utf8_lossy(body).trim().to_owned(),
    }
}

/// A warning when the token would cross the network unencrypted: a `ws://`
/// relay that is not on this machine.
fn insecure_token_warning(config: &Config) -> Option<String> {
    config.token.as_ref()?;
    let uri: hyper::Uri = config.relay.parse().ok()?;
    if uri.scheme_str() != Some("ws") {
        return None;
    }
    let host = uri.host()?.trim_matches(['[', ']']);
    let loopback = host.eq_ignore_ascii_case("localhost")
        || host.ends_with(".localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    (!loopback).then(|| {
        format!(
            "the token is sent unencrypted to {host} over ws://: anyone on the network path can read it. Use a wss:// relay"
        )
    })
}

/// Serves the relay's HTTP/2 streams until the link ends or `shutdown`.
async fn serve(
    ws: Tunnel,
    keepalive: Keepalive,
    forwarder: Arc<Forwarder>,
    events: &tokio::sync::broadcast::Sender<Event>,
    shutdown: &CancellationToken,
) -> SessionEnd {
    let signal = CloseSignal::default();
    let (stream, heard) = Heard::new(ByteStream::new(ws, signal.clone()));
    let io = TokioIo::new(stream);
    let service = service_fn(move |req| {
        let forwarder = Arc::clone(&forwarder);
        async move { Ok::<_, std::convert::Infallible>(forwarder.handle(req).await) }
    });
    let connection = http2_server(keepalive).serve_connection(io, service);
    let mut connection = pin!(connection);
    // A relay that never speaks (a link that died during the handshake)
    // would leave HTTP/2 waiting forever: pings start only after it.
    let silent = async {
        if let Ok(Ok(())) = tokio::time::timeout(FIRST_BYTES_WAIT, heard).await {
            std::future::pending::<()>().await;
        }
    };
    // The arms are cancel-safe: the connection is pinned outside and
    // polled again after the shutdown arm wins.
    tokio::select! {
        () = silent => {
            SessionEnd::Dropped(Some(CloseReason::going_away(
                "the relay did not speak HTTP/2 after the upgrade",
            )))
        }
        result = connection.as_mut() => {
            if let Err(err) = result {
                debug!(%err, "tunnel connection ended with an error");
            }
            SessionEnd::Dropped(signal.remote_reason())
        }
        () = shutdown.cancelled() => {
            signal.set_reason(CloseReason::going_away("the ferry client is shutting down"));
            connection.as_mut().graceful_shutdown();
            let _ = events.send(Event::Stopping);
            if tokio::time::timeout(SHUTDOWN_GRACE, connection.as_mut()).await.is_err() {
                signal.close(CloseReason::going_away("the ferry client is shutting down"));
                let _ = tokio::time::timeout(CLOSE_WAIT, connection.as_mut()).await;
            }
            SessionEnd::Shutdown
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{insecure_token_warning, reconnect_delay, BACKOFF_CAP};

    #[test]
    fn backoff_doubles_with_jitter_and_is_capped() {
        assert_eq!(reconnect_delay(0, 0.0), Duration::from_millis(100));
        assert_eq!(reconnect_delay(0, 1.0), Duration::from_millis(200));
        assert_eq!(reconnect_delay(1, 0.0), Duration::from_millis(200));
        assert_eq!(reconnect_delay(3, 0.5), Duration::from_millis(1200));
        for attempt in [10, 20, 1000, u32::MAX] {
            assert!(reconnect_delay(attempt, 1.0) <= BACKOFF_CAP);
            assert!(reconnect_delay(attempt, 0.0) >= BACKOFF_CAP / 2);
        }
    }

    #[test]
    fn a_token_sent_in_clear_off_this_machine_is_warned_about() {
        let config = |relay: &str, token: Option<&str>| crate::Config {
            relay: relay.to_owned(),
            token: token.map(str::to_owned),
            subdomain: None,
            target: crate::Target::parse("3000").unwrap(),
            host_header: crate::HostHeader::default(),
            local_timeout: crate::DEFAULT_LOCAL_TIMEOUT,
            keepalive: ferry_common::handshake::Keepalive::default(),
            relay_ca: Vec::new(),
            client_key: None,
        };
        let warned =
            |relay: &str, token: Option<&str>| insecure_token_warning(&config(relay, token));
        let warning = warned("ws://relay.example.com/api/v1/tunnels/connect", Some("t")).unwrap();
        assert!(
            warning.contains("unencrypted to relay.example.com"),
            "{warning}"
        );
        assert!(warned("ws://10.1.2.3:8080/x", Some("t")).is_some());
        assert!(warned("wss://relay.example.com/x", Some("t")).is_none());
        assert!(warned("ws://127.0.0.1:8080/x", Some("t")).is_none());
        assert!(warned("ws://[::1]:8080/x", Some("t")).is_none());
        assert!(warned("ws://demo.localhost:8080/x", Some("t")).is_none());
        assert!(
            warned("ws://relay.example.com/x", None).is_none(),
            "no token, nothing to leak"
        );
    }
}
