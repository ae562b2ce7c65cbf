//! Forwarding: each HTTP/2 stream the relay opens becomes a request to the
//! local target, and the target's response streams back.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use ferry_common::coalesce::Coalesce;
use ferry_common::handshake::meta::RequestMeta;
use ferry_common::handshake::MAX_RESPONSE_HEADER_LIST;
use ferry_common::headers::{header_list_size, remove_hop_by_hop, remove_relay_headers};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Request, Response, StatusCode, Uri, Version};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::debug;

use crate::target::{HostHeader, Target};
use crate::{Event, Exchange};

/// The body type of everything the forwarder sends and answers.
pub type Body = UnsyncBoxBody<Bytes, hyper::Error>;

/// How long an idle keep-alive connection to the target is kept.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

type Connector = hyper_rustls::HttpsConnector<HttpConnector>;

/// Forwards tunnel requests to the local target over a pooled keep-alive client.
pub struct Forwarder {
    /// The local server.
    target: Target,
    /// What Host the local server sees.
    host_header: HostHeader,
    /// How long the target may take to answer with headers.
    timeout: Duration,
    /// The pooled client to the target.
    client: Client<Connector, Body>,
    /// Where each exchange is reported for the terminal.
    events: broadcast::Sender<Event>,
    /// Ends the WebSockets passed through, which would otherwise hold the
    /// graceful shutdown for its whole grace period.
    shutdown: CancellationToken,
    /// The WebSockets passed through, each a task copying both ways, so
    /// that shutdown can wait for them to end.
    bridges: TaskTracker,
    /// The requests waiting for the target's answer, for the terminal.
    in_flight: InFlight,
}

/// How many requests are waiting for the local server's answer: a gauge
/// the terminal reads when it draws its counters. Clones share the count.
#[derive(Debug, Clone, Default)]
pub struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    /// The requests waiting now.
    pub fn get(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }

    /// Counts one request until the returned guard drops, however the
    /// request ends (the caller may hang up and cancel it).
    fn enter(&self) -> Entered {
        self.0.fetch_add(1, Ordering::Relaxed);
        Entered(self.clone())
    }
}

/// One request counted in an [`InFlight`].
struct Entered(InFlight);

impl Drop for Entered {
    fn drop(&mut self) {
        (self.0).0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Why a request did not reach the target. Mapped to a status in one place,
/// [`error_response`].
#[derive(Debug, thiserror::Error)]
enum ForwardError {
    #[error("ferry: the tunnel is up but nothing answers on {target} ({cause}). Start your server there, or run ferry http with the port it listens on")]
    Unreachable { target: String, cause: String },
    #[error(
        "ferry: the local server at {target} closed the connection before answering ({cause})"
    )]
    ClosedEarly { target: String, cause: String },
    #[error(
        "ferry: the local server at {target} sent a response that is not valid HTTP/1.1 ({cause})"
    )]
    Malformed { target: String, cause: String },
    #[error("ferry: the request to the local server at {target} failed ({cause})")]
    Failed { target: String, cause: String },
    #[error("ferry: {target} did not answer within {:.1} s (raise it with --timeout)", timeout.as_secs_f64())]
    Timeout { target: String, timeout: Duration },
    #[error("ferry: {target} answered a WebSocket upgrade with {status} instead of 101 Switching Protocols: is this path a WebSocket endpoint?")]
    NotWebSocket { target: String, status: u16 },
    #[error("ferry: could not build the request for {target}: {cause}")]
    BadRequest { target: String, cause: String },
    #[error("ferry: the local server at {target} answered with {size} bytes of headers, above the tunnel's {MAX_RESPONSE_HEADER_LIST}-byte limit: send fewer or smaller headers")]
    HeadersTooLarge { target: String, size: usize },
}

fn error_response(err: &ForwardError) -> Response<Body> {
    let status = match err {
        ForwardError::Unreachable { .. }
        | ForwardError::ClosedEarly { .. }
        | ForwardError::Malformed { .. }
        | ForwardError::Failed { .. }
        | ForwardError::HeadersTooLarge { .. }
        | ForwardError::NotWebSocket { .. } => StatusCode::BAD_GATEWAY,
        ForwardError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
        ForwardError::BadRequest { .. } => StatusCode::BAD_REQUEST,
    };
    let outcome = match err {
        ForwardError::Unreachable { .. } => "target_unreachable",
        ForwardError::Timeout { .. } => "target_timeout",
        _ => "failed",
    };
    let mut response = Response::new(full(format!("{err}\n")));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response.headers_mut().insert(
        ferry_common::handshake::meta::OUTCOME,
        HeaderValue::from_static(outcome),
    );
    response
}

fn full(text: String) -> Body {
    Full::new(Bytes::from(text))
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// The innermost cause of an error, which for a refused connection is the
/// operating system's own words.
fn root_cause(err: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = err;
    while let Some(source) = cause.source() {
        cause = source;
    }
    cause.to_string()
}

/// Says what went wrong between connecting to the target and its answer.
fn request_error(target: String, err: &hyper_util::client::legacy::Error) -> ForwardError {
    let cause = root_cause(err);
    if err.is_connect() {
        return ForwardError::Unreachable { target, cause };
    }
    let mut source = std::error::Error::source(err);
    while let Some(current) = source {
        if let Some(hyper) = current.downcast_ref::<hyper::Error>() {
            if hyper.is_parse() {
                return ForwardError::Malformed { target, cause };
            }
            // Canceled: the connection closed before the request was sent.
            if hyper.is_incomplete_message() || hyper.is_canceled() {
                return ForwardError::ClosedEarly { target, cause };
            }
        }
        if let Some(io) = current.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset};
            if matches!(io.kind(), ConnectionReset | ConnectionAborted | BrokenPipe) {
                return ForwardError::ClosedEarly { target, cause };
            }
        }
        source = current.source();
    }
    ForwardError::Failed { target, cause }
}

impl Forwarder {
    /// A forwarder to `target`.
    pub fn new(
        target: Target,
        host_header: HostHeader,
        timeout: Duration,
        events: broadcast::Sender<Event>,
        shutdown: CancellationToken,
    ) -> Self {
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.enforce_http(false);
        let tls = crate::local_tls::client_config()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(
                crate::local_tls::AcceptAnyCertificate::new(),
            ))
            .with_no_client_auth();
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .build(connector);
        Self {
            target,
            host_header,
            timeout,
            client,
            events,
            shutdown,
            bridges: TaskTracker::new(),
            in_flight: InFlight::default(),
        }
    }

    /// Counts the requests waiting for the target in `in_flight`.
    pub fn with_in_flight(mut self, in_flight: InFlight) -> Self {
        self.in_flight = in_flight;
        self
    }

    /// Waits up to `within` for the WebSockets passed through to end, which
    /// they do once the shutdown token is cancelled; returns whether they
    /// all did. Call it once the tunnel has stopped serving.
    pub async fn close_and_wait(&self, within: Duration) -> bool {
        self.bridges.close();
        tokio::time::timeout(within, self.bridges.wait())
            .await
            .is_ok()
    }

    /// Forwards one request from the tunnel and reports it.
    pub async fn handle(self: Arc<Self>, mut req: Request<Incoming>) -> Response<Body> {
        let received = SystemTime::now();
        let started = Instant::now();
        let waiting = self.in_flight.enter();
        let meta = RequestMeta::take(req.headers_mut());
        let id = meta.as_ref().map(|meta| meta.exchange);
        let method = req.method().clone();
        let path = req
            .uri()
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned();
        let (response, error) = match self.forward(req, meta.as_ref()).await {
            Ok(response) => (response, None),
            Err(err) => {
                debug!(%err, "forward failed");
                (error_response(&err), Some(err.to_string()))
            }
        };
        let exchange = Exchange {
            received,
            id,
            method: method.to_string(),
            path,
            status: response.status().as_u16(),
            elapsed: started.elapsed(),
            error,
        };
        // No longer waiting by the time the terminal hears of it.
        drop(waiting);
        // Nobody listening is fine: the terminal view is optional.
        let _ = self.events.send(Event::Request(exchange));
        response
    }

    async fn forward(
        &self,
        mut req: Request<Incoming>,
        meta: Option<&RequestMeta>,
    ) -> Result<Response<Body>, ForwardError> {
        let websocket = req.method() == Method::CONNECT
            && req
                .extensions()
                .get::<hyper::ext::Protocol>()
                .is_some_and(|p| p.as_str() == "websocket");
        let tunnel_side = websocket.then(|| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();
        let public_host = parts
            .uri
            .authority()
            .map(|a| a.as_str().to_owned())
            .unwrap_or_default();
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        parts.uri = Uri::builder()
            .scheme(self.target.scheme())
            .authority(self.target.authority())
            .path_and_query(path)
            .build()
            .map_err(|err| ForwardError::BadRequest {
                target: self.target.to_string(),
                cause: err.to_string(),
            })?;
        parts.version = Version::HTTP_11;
        remove_hop_by_hop(&mut parts.headers);
        // The relay removed its caller's `ferry-*` headers; a webhook
        // delivery's event type is for the local server.
        remove_relay_headers(&mut parts.headers);
        self.set_host(&mut parts.headers, &public_host);
        add_forwarded(&mut parts.headers, meta, &public_host);

        if let Some(tunnel_side) = tunnel_side {
            return self.forward_websocket(parts, tunnel_side).await;
        }
        let request = Request::from_parts(parts, body.boxed_unsync());
        let response = self.send(request).await?;
        let (mut parts, body) = response.into_parts();
        remove_hop_by_hop(&mut parts.headers);
        let size = header_list_size(&[(":status", parts.status.as_str())], &parts.headers);
        if size > MAX_RESPONSE_HEADER_LIST {
            return Err(ForwardError::HeadersTooLarge {
                target: self.target.to_string(),
                size,
            });
        }
        let body = Coalesce::new(body).map_frame(|mut frame| {
            if let Some(trailers) = frame.trailers_mut() {
                // HTTP/2 refuses connection-specific fields; one left in
                // would leave the stream hanging.
                remove_hop_by_hop(trailers);
            }
            frame
        });
        Ok(Response::from_parts(parts, body.boxed_unsync()))
    }

    async fn send(&self, request: Request<Body>) -> Result<Response<Incoming>, ForwardError> {
        match tokio::time::timeout(self.timeout, self.client.request(request)).await {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(err)) => Err(request_error(self.target.to_string(), &err)),
            Err(_) => Err(ForwardError::Timeout {
                target: self.target.to_string(),
                timeout: self.timeout,
            }),
        }
    }

    /// Turns an extended CONNECT (RFC 8441) into an HTTP/1.1 WebSocket
    /// upgrade to the target, then copies bytes both ways.
    async fn forward_websocket(
        &self,
        mut parts: hyper::http::request::Parts,
        tunnel_side: hyper::upgrade::OnUpgrade,
    ) -> Result<Response<Body>, ForwardError> {
        parts.method = Method::GET;
        parts.extensions = hyper::http::Extensions::new();
        let headers = &mut parts.headers;
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        let key = tokio_tungstenite::tungstenite::handshake::client::generate_key();
        if let Ok(key) = HeaderValue::from_str(&key) {
            headers.insert(header::SEC_WEBSOCKET_KEY, key);
        }
        headers
            .entry(header::SEC_WEBSOCKET_VERSION)
            .or_insert(HeaderValue::from_static("13"));
        let empty = Empty::<Bytes>::new()
            .map_err(|never| match never {})
            .boxed_unsync();
        let mut response = self.send(Request::from_parts(parts, empty)).await?;
        if response.status().is_success() {
            // Any 2xx would tell the relay the tunnel is open; a target that
            // answers 200 to an upgrade has not spoken WebSocket at all.
            return Err(ForwardError::NotWebSocket {
                target: self.target.to_string(),
                status: response.status().as_u16(),
            });
        }
        if response.status() != StatusCode::SWITCHING_PROTOCOLS {
            let (mut parts, body) = response.into_parts();
            remove_hop_by_hop(&mut parts.headers);
            return Ok(Response::from_parts(parts, body.boxed_unsync()));
        }
        let local_side = hyper::upgrade::on(&mut response);
        let shutdown = self.shutdown.clone();
        self.bridges.spawn(async move {
            let (local, tunnel) = match tokio::try_join!(local_side, tunnel_side) {
                Ok(both) => both,
                Err(err) => return debug!(%err, "websocket upgrade failed"),
            };
            let (mut local, mut tunnel) = (TokioIo::new(local), TokioIo::new(tunnel));
            // A WebSocket lasts as long as the page; shutdown ends it rather
            // than waiting on it.
            tokio::select! {
                copied = tokio::io::copy_bidirectional(&mut local, &mut tunnel) => {
                    if let Err(err) = copied {
                        debug!(%err, "websocket ended with an error");
                    }
                }
                () = shutdown.cancelled() => {}
            }
        });
        let mut answer = Response::new(
            Empty::<Bytes>::new()
                .map_err(|never| match never {})
                .boxed_unsync(),
        );
        for name in [
            header::SEC_WEBSOCKET_PROTOCOL,
            header::SEC_WEBSOCKET_EXTENSIONS,
        ] {
            if let Some(value) = response.headers().get(&name) {
                answer.headers_mut().insert(name, value.clone());
            }
        }
        Ok(answer)
    }

    fn set_host(&self, headers: &mut HeaderMap, public_host: &str) {
        let host = match &self.host_header {
            HostHeader::Preserve => HeaderValue::from_str(public_host).ok(),
            HostHeader::Rewrite => HeaderValue::from_str(self.target.authority()).ok(),
            HostHeader::Value(value) => Some(value.clone()),
        };
        if let Some(host) = host {
            headers.insert(header::HOST, host);
        }
    }
}

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Adds `X-Forwarded-For` (appending to what an earlier proxy sent),
/// `X-Forwarded-Proto` and `X-Forwarded-Host`.
fn add_forwarded(headers: &mut HeaderMap, meta: Option<&RequestMeta>, public_host: &str) {
    if let Some(ip) = meta.map(|meta| meta.client_ip) {
        let chain = match headers.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
            Some(earlier) => format!("{earlier}, {ip}"),
            None => ip.to_string(),
        };
        insert(headers, X_FORWARDED_FOR, chain);
    }
    let scheme = meta.map_or("http", RequestMeta::scheme);
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(scheme));
    if !public_host.is_empty() {
        insert(headers, X_FORWARDED_HOST, public_host.to_owned());
    }
}

fn insert(headers: &mut HeaderMap, name: HeaderName, value: String) {
    if let Ok(value) = HeaderValue::try_from(value) {
        headers.insert(name, value);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use futures_util::StreamExt;
    use http_body_util::Empty;
    use hyper::header::{HeaderMap, HeaderValue};
    use hyper::{Method, Request, StatusCode};
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use tokio::sync::broadcast;
    use tokio_util::sync::CancellationToken;

    use super::{add_forwarded, Forwarder, RequestMeta};
    use crate::{HostHeader, Target};

    const PATIENCE: Duration = Duration::from_secs(30);

    fn empty() -> Empty<bytes::Bytes> {
        Empty::new()
    }

    #[tokio::test]
    async fn websocket_bridges_are_waited_for_and_end_on_shutdown() {
        // The local server: upgrades each connection, then reads until the
        // bridge lets go of it.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let target = Target::parse(&format!("http://{}", listener.local_addr().expect("addr")))
            .expect("target");
        let (ended, mut ends) = tokio::sync::mpsc::unbounded_channel();
        let origin = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                if let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await {
                    while let Some(Ok(_)) = ws.next().await {}
                    let _ = ended.send(());
                }
            }
        });
        let shutdown = CancellationToken::new();
        let forwarder = Arc::new(Forwarder::new(
            target,
            HostHeader::Preserve,
            PATIENCE,
            broadcast::channel(16).0,
            shutdown.clone(),
        ));

        // The tunnel's HTTP/2 connection, over an in-memory pipe.
        let (relay_side, client_side) = tokio::io::duplex(64 * 1024);
        let serving = Arc::clone(&forwarder);
        let service = hyper::service::service_fn(move |req| {
            let forwarder = Arc::clone(&serving);
            async move { Ok::<_, std::convert::Infallible>(forwarder.handle(req).await) }
        });
        let server = tokio::spawn(
            hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .enable_connect_protocol()
                .serve_connection(TokioIo::new(client_side), service),
        );
        let (mut sender, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(relay_side))
                .await
                .expect("h2 handshake");
        let driver = tokio::spawn(connection);
        // Any answer comes after the server's SETTINGS, which allow the
        // extended CONNECT below.
        let plain = Request::get("http://demo.localhost/").body(empty());
        let _ = tokio::time::timeout(PATIENCE, sender.send_request(plain.expect("request")))
            .await
            .expect("an answer");

        let mut connect = Request::builder()
            .method(Method::CONNECT)
            .uri("http://demo.localhost/socket")
            .body(empty())
            .expect("request");
        connect
            .extensions_mut()
            .insert(hyper::ext::Protocol::from_static("websocket"));
        let response = tokio::time::timeout(PATIENCE, sender.send_request(connect))
            .await
            .expect("an answer")
            .expect("a response");
        assert_eq!(response.status(), StatusCode::OK);
        let tunnel_side = hyper::upgrade::on(response).await.expect("upgraded");

        assert!(
            !forwarder.close_and_wait(Duration::ZERO).await,
            "the bridge runs until shutdown"
        );
        shutdown.cancel();
        assert!(forwarder.close_and_wait(PATIENCE).await, "the bridge ends");
        tokio::time::timeout(PATIENCE, ends.recv())
            .await
            .expect("the local server sees the WebSocket end")
            .expect("the origin reports it");

        drop((tunnel_side, sender));
        let _ = tokio::time::timeout(PATIENCE, driver)
            .await
            .expect("client ends");
        let _ = tokio::time::timeout(PATIENCE, server)
            .await
            .expect("server ends");
        origin.abort();
        let _ = origin.await;
    }

    #[test]
    fn forwarded_headers_extend_an_existing_chain() {
        let mut headers = HeaderMap::new();
        headers.insert("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
        let meta = RequestMeta {
            exchange: ferry_common::ids::ExchangeId::new(),
            client_ip: "203.0.113.9".parse().unwrap(),
            https: true,
        };
        add_forwarded(&mut headers, Some(&meta), "demo.relay.test");
        assert_eq!(headers["x-forwarded-for"], "10.0.0.1, 203.0.113.9");
        assert_eq!(headers["x-forwarded-proto"], "https");
        assert_eq!(headers["x-forwarded-host"], "demo.relay.test");
    }
}
