//! The end-to-end harness: real relays, clients and origin servers on
//! `127.0.0.1:0`, in-process, with handles that shut them down.
//!
//! - [`TestRelay`]: a relay on a port-0 listener (or a given address, to
//!   restart one in place).
//! - [`TestClient`]: a `ferry http` tunnel; its [`ferry::Event`]s are the
//!   readiness signals tests await.
//! - [`Origin`]: the local server behind a tunnel, a hyper server built from
//!   a closure.
//! - [`send`]: a public request to a relay with a chosen Host.
//! - [`Api`]: the relay's JSON API, and [`Tail`], its live feed.
//! - [`FreezableProxy`]: a TCP proxy whose connections can go silent, as a
//!   dead network link does.
//! - [`postgres`]: a PostgreSQL server of the test process's own, and a
//!   fresh database on it per test.
//! - [`fleet`]: relays as processes, and HAProxy in front of them.

pub mod fleet;
pub mod postgres;

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use ferry::{Event, HostHeader, Target};
use ferry_common::handshake::Keepalive;
use ferry_common::subdomain::Subdomain;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast;
use tokio::task::JoinHandle;
use tokio_util::sync::{CancellationToken, DropGuard};

/// A body for test requests and origin responses.
pub type Body = UnsyncBoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

/// How long any one awaited event may take before the test fails rather
/// than hangs.
pub const PATIENCE: Duration = Duration::from_secs(60);

/// Awaits `future`, failing the test if it takes longer than [`PATIENCE`].
pub async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    match tokio::time::timeout(PATIENCE, future).await {
        Ok(value) => value,
        Err(_) => panic!("timed out waiting for {what}"),
    }
}

/// A body from bytes.
pub fn full(data: impl Into<Bytes>) -> Body {
    Full::new(data.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// An empty body.
pub fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

/// Reads a whole body.
pub async fn read_body(body: Incoming) -> Vec<u8> {
    within("a body", body.collect())
        .await
        .expect("body should arrive whole")
        .to_bytes()
        .to_vec()
}

/// The secret of the fleets [`TestRelay::start_in_fleet`] starts.
pub const FLEET_SECRET: &str = "the-test-fleet-secret";

/// A relay running in this process.
pub struct TestRelay {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Where its cluster listener takes requests from the fleet's other
    /// relays, for a relay of a fleet.
    pub cluster_addr: Option<SocketAddr>,
    /// Shuts the relay down when cancelled, or when the handle drops (a
    /// test that panics stops its relay too).
    shutdown: DropGuard,
    /// The relay's task.
    task: JoinHandle<std::io::Result<()>>,
    /// Its data directory.
    pub data_dir: std::path::PathBuf,
    /// Removes the data directory the harness made, when dropped.
    _made: Option<tempfile::TempDir>,
}

impl TestRelay {
    /// Starts a relay with `config` on a free port.
    pub async fn start(config: ferry_relay::Config) -> Self {
        Self::start_on("127.0.0.1:0".parse().expect("literal address"), config).await
    }

    /// Starts a relay with `config` on `addr`.
    pub async fn start_on(addr: SocketAddr, config: ferry_relay::Config) -> Self {
        let listener = TcpListener::bind(addr).await.expect("relay should bind");
        Self::start_with(ferry_relay::Listeners::plain(listener), config).await
    }

    /// Starts a relay with `config` on already-bound `listeners`; `addr` is
    /// the plain listener's, or the TLS one's when there is no plain one.
    pub async fn start_with(
        listeners: ferry_relay::Listeners,
        config: ferry_relay::Config,
    ) -> Self {
        Self::launch(listeners, config, None).await
    }

    /// Starts a relay of the fleet on `config.database_url` on a free
    /// port, its cluster listener on another, sharing [`FLEET_SECRET`] and
    /// holding names with leases of `lease`. It advertises its cluster
    /// listener's address, unless `config.cluster` names another URL (a
    /// relay the others cannot reach); a given `config.cluster` also sets
    /// its limit on unknown names and its cluster listener's limits (with
    /// an empty URL, for those alone).
    pub async fn start_in_fleet(mut config: ferry_relay::Config, lease: Duration) -> Self {
        assert!(config.database_url.is_some(), "a fleet shares a database");
        let cluster = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("cluster listener should bind");
        let cluster_addr = cluster.local_addr().expect("bound listener has an address");
        let advertise_url = config
            .cluster
            .as_ref()
            .filter(|c| !c.advertise_url.is_empty())
            .map_or_else(
                || format!("http://{cluster_addr}"),
                |c| c.advertise_url.clone(),
            );
        config.cluster = Some(ferry_relay::config::Cluster {
            advertise_url,
            secret: ferry_relay::cluster::Secret::new(FLEET_SECRET),
            lease,
            unknown_names_per_minute: config.cluster.as_ref().map_or(
                ferry_relay::config::Cluster::DEFAULT_UNKNOWN_NAMES_PER_MINUTE,
                |c| c.unknown_names_per_minute,
            ),
            max_connections_per_ip: config.cluster.as_ref().map_or(
                ferry_relay::config::Cluster::DEFAULT_MAX_CONNECTIONS_PER_IP,
                |c| c.max_connections_per_ip,
            ),
            first_request_timeout: config.cluster.as_ref().map_or(
                ferry_relay::config::Cluster::DEFAULT_FIRST_REQUEST_TIMEOUT,
                |c| c.first_request_timeout,
            ),
        });
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("relay should bind");
        Self::launch(
            ferry_relay::Listeners::plain(listener),
            config,
            Some(cluster),
        )
        .await
    }

    async fn launch(
        listeners: ferry_relay::Listeners,
        config: ferry_relay::Config,
        cluster: Option<TcpListener>,
    ) -> Self {
        let bound = match (&listeners.plain, &listeners.tls) {
            (Some(listener), _) | (None, Some((listener, _))) => listener,
            (None, None) => panic!("a test relay needs a listener"),
        };
        let addr = bound.local_addr().expect("bound listener has an address");
        // A relay given no data directory of its own gets a fresh one.
        let mut config = config;
        let made = (config.data_dir.as_os_str() == ferry_relay::Config::DEFAULT_DATA_DIR)
            .then(|| tempfile::tempdir().expect("a temporary data directory"));
        if let Some(made) = &made {
            config.data_dir = made.path().to_owned();
        }
        let data_dir = config.data_dir.clone();
        let shutdown = CancellationToken::new();
        let cluster_addr = cluster.as_ref().map(|listener| {
            listener
                .local_addr()
                .expect("bound listener has an address")
        });
        let stop = shutdown.clone();
        let task = tokio::spawn(async move {
            let relay = ferry_relay::Relay::open(config).await?;
            let relay = match cluster {
                Some(listener) => relay.with_cluster_listener(listener),
                None => relay,
            };
            relay.run(listeners, stop).await
        });
        Self {
            addr,
            cluster_addr,
            shutdown: shutdown.drop_guard(),
            task,
            data_dir,
            _made: made,
        }
    }

    /// An open relay on a free port.
    pub async fn open() -> Self {
        Self::start(ferry_relay::Config::default()).await
    }

    /// The URL a client connects to.
    pub fn url(&self) -> String {
        ferry_common::handshake::connect_url(self.addr)
    }

    /// Shuts the relay down gracefully and waits for it.
    pub async fn stop(self) {
        drop(self.shutdown);
        within("the relay to stop", self.task)
            .await
            .expect("relay task")
            .expect("relay run");
    }
}

/// Options for a [`TestClient`] beyond its relay and target.
#[derive(Clone, Default)]
pub struct ClientOptions {
    /// The token to present.
    pub token: Option<String>,
    /// The subdomain to ask for.
    pub subdomain: Option<&'static str>,
    /// The Host header mode.
    pub host_header: HostHeader,
    /// The local timeout; the default when `None`.
    pub local_timeout: Option<Duration>,
    /// The keepalive; the default when `None`.
    pub keepalive: Option<Keepalive>,
    /// Connect here instead of straight to the relay (through a
    /// [`FreezableProxy`]).
    pub via: Option<SocketAddr>,
    /// A `wss://` URL to connect to instead of the relay's plain one.
    pub relay_url: Option<String>,
    /// Certificate authorities to trust for a `wss://` relay.
    pub relay_ca: Vec<rustls::pki_types::CertificateDer<'static>>,
    /// The reconnect key, as a restarted client would bring it.
    pub client_key: Option<String>,
}

/// A `ferry http` tunnel running in this process.
pub struct TestClient {
    /// The tunnel's public URL.
    pub public_url: String,
    /// The subdomain, from the public URL.
    pub name: String,
    /// What the tunnel reports: the readiness signals tests await.
    events: broadcast::Receiver<Event>,
    /// Shuts the client down when cancelled.
    shutdown: CancellationToken,
    /// Cancels `shutdown` when the handle drops: a test that panics stops
    /// its client too.
    _stop_on_drop: DropGuard,
    /// The client's task.
    task: JoinHandle<Result<(), ferry::Error>>,
}

impl TestClient {
    /// Starts a tunnel from `relay` to `target` and waits until it is up.
    pub async fn start(relay: &TestRelay, target: &str, options: ClientOptions) -> Self {
        let mut client = Self::spawn(relay, target, options);
        let event = within("the tunnel to connect", client.next_event()).await;
        let Some(Event::Connected { public_url, .. }) = event else {
            let outcome = within("the client to end", client.task).await;
            panic!("tunnel did not connect: {event:?}, {outcome:?}");
        };
        let name = public_url
            .trim_start_matches("http://")
            .split('.')
            .next()
            .expect("public URL has a host")
            .to_owned();
        Self {
            public_url,
            name,
            ..client
        }
    }

    /// Starts a tunnel without waiting; for tests of refused connects.
    pub fn spawn(relay: &TestRelay, target: &str, options: ClientOptions) -> Self {
        let relay_url = match (options.relay_url, options.via) {
            (Some(url), _) => url,
            (None, Some(via)) => ferry_common::handshake::connect_url(via),
            (None, None) => relay.url(),
        };
        let config = ferry::Config {
            relay: relay_url,
            token: options.token,
            subdomain: options
                .subdomain
                .map(|s| Subdomain::parse(s).expect("valid test subdomain")),
            target: Target::parse(target).expect("valid test target"),
            host_header: options.host_header,
            local_timeout: options
                .local_timeout
                .unwrap_or(ferry::DEFAULT_LOCAL_TIMEOUT),
            keepalive: options.keepalive.unwrap_or_default(),
            relay_ca: options.relay_ca,
            client_key: options.client_key,
        };
        let (sender, events) = broadcast::channel(4096);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(ferry::run(config, sender, shutdown.clone()));
        Self {
            public_url: String::new(),
            name: String::new(),
            events,
            _stop_on_drop: shutdown.clone().drop_guard(),
            shutdown,
            task,
        }
    }

    /// The next event, or `None` once the client has stopped.
    pub async fn next_event(&mut self) -> Option<Event> {
        loop {
            match self.events.recv().await {
                Ok(event) => return Some(event),
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }

    /// The next event already reported, without waiting.
    pub fn try_event(&mut self) -> Option<Event> {
        loop {
            match self.events.try_recv() {
                Ok(event) => return Some(event),
                Err(broadcast::error::TryRecvError::Lagged(_)) => continue,
                Err(_) => return None,
            }
        }
    }

    /// Waits for the first event that `matches`, skipping others.
    pub async fn wait_for(&mut self, what: &str, matches: impl Fn(&Event) -> bool) -> Event {
        within(what, async {
            loop {
                match self.next_event().await {
                    Some(event) if matches(&event) => return event,
                    Some(_) => continue,
                    None => panic!("client stopped while waiting for {what}"),
                }
            }
        })
        .await
    }

    /// Waits for the tunnel to be back after a drop, and checks it kept its
    /// public URL.
    pub async fn wait_for_reconnect(&mut self) {
        let event = self
            .wait_for("the reconnect", |e| matches!(e, Event::Connected { .. }))
            .await;
        let Event::Connected {
            public_url,
            reconnected,
            ..
        } = event
        else {
            unreachable!("wait_for returns a matching event")
        };
        assert!(reconnected, "the event says reconnected");
        assert_eq!(
            public_url, self.public_url,
            "the client keeps its subdomain"
        );
    }

    /// Waits for the client to end by itself and returns how it ended.
    pub async fn finished(self) -> Result<(), ferry::Error> {
        within("the client to end", self.task)
            .await
            .expect("client task")
    }

    /// Starts a graceful shutdown without waiting for it.
    pub fn begin_stop(&self) {
        self.shutdown.cancel();
    }

    /// Shuts the client down gracefully and waits for it.
    pub async fn stop(self) -> Result<(), ferry::Error> {
        self.begin_stop();
        self.finished().await
    }

    /// Kills the client at once, as a crash or a lost network would: its
    /// sockets close without a goodbye.
    pub async fn kill(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

/// A local server behind a tunnel.
pub struct Origin {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Stops the server when cancelled or dropped.
    shutdown: DropGuard,
    /// The server's task.
    task: JoinHandle<()>,
}

impl Origin {
    /// Starts a server on a free port answering each request with `handler`.
    pub async fn start<F, Fut>(handler: F) -> Self
    where
        F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = Response<Body>> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("origin should bind");
        let addr = listener
            .local_addr()
            .expect("bound listener has an address");
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        let task = tokio::spawn(async move {
            let connections = tokio_util::task::TaskTracker::new();
            loop {
                let (stream, _) = tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok(accepted) => accepted,
                        Err(_) => continue,
                    },
                    () = stop.cancelled() => break,
                };
                let handler = handler.clone();
                let service = service_fn(move |req| {
                    let response = handler(req);
                    async move { Ok::<_, std::convert::Infallible>(response.await) }
                });
                let stop = stop.clone();
                connections.spawn(async move {
                    let builder = auto::Builder::new(TokioExecutor::new());
                    let connection =
                        builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
                    tokio::select! {
                        _ = connection => {}
                        () = stop.cancelled() => {}
                    }
                });
            }
            connections.close();
            connections.wait().await;
        });
        Self {
            addr,
            shutdown: shutdown.drop_guard(),
            task,
        }
    }

    /// The target string for a client: `http://127.0.0.1:PORT`.
    pub fn target(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops the server and waits for it.
    pub async fn stop(self) {
        drop(self.shutdown);
        within("the origin to stop", self.task)
            .await
            .expect("origin task");
    }
}

/// Ends a test the way every test ends: the client stops cleanly, then the
/// origin and the relay are shut down and awaited.
pub async fn stop_all(client: TestClient, origin: Origin, relay: TestRelay) {
    client.stop().await.expect("client stops cleanly");
    origin.stop().await;
    relay.stop().await;
}

/// Sends `request` to the relay at `relay` with `Host: host` over a new
/// HTTP/1.1 connection and returns the response.
pub async fn send(relay: SocketAddr, host: &str, request: Request<Body>) -> Response<Incoming> {
    let stream = TcpStream::connect(relay)
        .await
        .expect("relay should accept");
    send_on(stream, host, request).await
}

/// Sends `request` with `Host: host` over `stream` as HTTP/1.1.
async fn send_on(stream: TcpStream, host: &str, mut request: Request<Body>) -> Response<Incoming> {
    request
        .headers_mut()
        .insert(hyper::header::HOST, host.parse().expect("valid test host"));
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("http/1.1 handshake");
    tokio::spawn(connection.with_upgrades());
    within("a response", sender.send_request(request))
        .await
        .expect("response")
}

/// Opens a TCP connection to `relay` from the loopback address `from`
/// (`127.0.0.2`, …), so that a test can play callers at other addresses.
pub async fn connect_from(from: std::net::Ipv4Addr, relay: SocketAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind(SocketAddr::from((from, 0)))
        .expect("bind a loopback source address");
    within("a connection to the relay", socket.connect(relay))
        .await
        .expect("relay should accept")
}

/// Like [`send`], from the loopback address `from`.
pub async fn send_from(
    from: std::net::Ipv4Addr,
    relay: SocketAddr,
    host: &str,
    request: Request<Body>,
) -> Response<Incoming> {
    send_on(connect_from(from, relay).await, host, request).await
}

/// The host of a tunnel's public URL, with port: `brave-otter.localhost:PORT`.
pub fn host_of(public_url: &str) -> String {
    public_url
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned()
}

/// A TCP proxy to one address whose open connections can be frozen: they
/// stay open but carry nothing more, as when a network link dies without a
/// reset. Connections made after a freeze flow normally.
pub struct FreezableProxy {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Frozen once cancelled; a fresh token afterwards for new connections.
    freeze: std::sync::Arc<std::sync::Mutex<CancellationToken>>,
    /// Stops the proxy when dropped.
    _stop: DropGuard,
}

impl FreezableProxy {
    /// Starts a proxy to `upstream` on a free port.
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("proxy should bind");
        let addr = listener
            .local_addr()
            .expect("bound listener has an address");
        let freeze = std::sync::Arc::new(std::sync::Mutex::new(CancellationToken::new()));
        let stop = CancellationToken::new();
        let (current, stopped) = (std::sync::Arc::clone(&freeze), stop.clone());
        tokio::spawn(async move {
            loop {
                let (mut inbound, _) = tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok(accepted) => accepted,
                        Err(_) => continue,
                    },
                    () = stopped.cancelled() => return,
                };
                let frozen = current.lock().expect("proxy lock").clone();
                let stopped = stopped.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        () = frozen.cancelled() => {
                            // Hold both sockets open and silent until the proxy stops.
                            stopped.cancelled().await;
                        }
                        () = stopped.cancelled() => {}
                    }
                });
            }
        });
        Self {
            addr,
            freeze,
            _stop: stop.drop_guard(),
        }
    }

    /// Freezes every open connection.
    pub fn freeze(&self) {
        let mut current = self.freeze.lock().expect("proxy lock");
        current.cancel();
        *current = CancellationToken::new();
    }
}

/// The relay's JSON API, called as a user would: over HTTP/1.1 to the
/// relay's own host, with a bearer token when given.
#[derive(Clone)]
pub struct Api {
    /// The relay.
    relay: SocketAddr,
    /// The bearer token, if any.
    token: Option<String>,
}

impl Api {
    /// The API of `relay`, without a token.
    pub fn of(relay: &TestRelay) -> Self {
        Self {
            relay: relay.addr,
            token: None,
        }
    }

    /// The API of the relay listening at `relay`, without a token.
    pub fn at(relay: SocketAddr) -> Self {
        Self { relay, token: None }
    }

    /// The API of `relay` with `token`.
    pub fn with_token(relay: &TestRelay, token: &str) -> Self {
        Self {
            relay: relay.addr,
            token: Some(token.to_owned()),
        }
    }

    /// A request to `path` with the token, if any.
    pub fn request(&self, method: &str, path: &str, body: Body) -> Request<Body> {
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .body(body)
            .expect("valid API request");
        if let Some(token) = &self.token {
            request.headers_mut().insert(
                hyper::header::AUTHORIZATION,
                format!("Bearer {token}")
                    .parse()
                    .expect("valid token header"),
            );
        }
        request
    }

    /// Sends `request` to the relay's host.
    pub async fn send(&self, request: Request<Body>) -> Response<Incoming> {
        send(self.relay, &self.relay.to_string(), request).await
    }

    /// `GET path`: the status and the body.
    pub async fn get(&self, path: &str) -> (hyper::StatusCode, Vec<u8>) {
        let response = self.send(self.request("GET", path, empty())).await;
        let status = response.status();
        (status, read_body(response.into_body()).await)
    }

    /// `GET path`, which must answer 200 with JSON.
    pub async fn get_json(&self, path: &str) -> serde_json::Value {
        let (status, body) = self.get(path).await;
        assert_eq!(
            status,
            hyper::StatusCode::OK,
            "GET {path}: {}",
            String::from_utf8_lossy(&body)
        );
        serde_json::from_slice(&body).expect("the API answers JSON")
    }

    /// `POST path` with a JSON body: the status and the JSON answer.
    pub async fn post_json(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> (hyper::StatusCode, serde_json::Value) {
        let mut request = self.request("POST", path, full(body.to_string()));
        request.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            "application/json".parse().expect("valid header"),
        );
        let response = self.send(request).await;
        let status = response.status();
        let body = read_body(response.into_body()).await;
        let json = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
        (status, json)
    }

    /// Opens the live tail `GET /api/v1/requests/stream?query`.
    pub async fn tail(&self, query: &str) -> Tail {
        self.tail_after(query, None).await
    }

    /// Opens the live tail, resuming after entry `last` when given.
    pub async fn tail_after(&self, query: &str, last: Option<&str>) -> Tail {
        let mut request = self.request("GET", &format!("/api/v1/requests/stream?{query}"), empty());
        if let Some(last) = last {
            request
                .headers_mut()
                .insert("last-event-id", last.parse().expect("valid event id"));
        }
        let response = self.send(request).await;
        assert_eq!(
            response.status(),
            hyper::StatusCode::OK,
            "the live tail opens"
        );
        let mut tail = Tail {
            body: response.into_body(),
            buffer: Vec::new(),
        };
        // The opening comment says the stream is live: entries committed
        // from now on will come.
        within("the live tail to open", tail.next_block()).await;
        tail
    }
}

/// A live tail of the activity log: server-sent events, read one by one.
pub struct Tail {
    /// The stream.
    body: Incoming,
    /// Bytes read but not yet parsed.
    buffer: Vec<u8>,
}

impl Tail {
    /// The next event block (up to a blank line), comments included.
    async fn next_block(&mut self) -> String {
        loop {
            if let Some(at) = self.buffer.windows(2).position(|w| w == b"\n\n") {
                let block: Vec<u8> = self.buffer.drain(..at + 2).collect();
                return String::from_utf8(block).expect("the stream is UTF-8");
            }
            let frame = self
                .body
                .frame()
                .await
                .expect("the live tail stays open")
                .expect("the live tail reads");
            if let Ok(data) = frame.into_data() {
                self.buffer.extend_from_slice(&data);
            }
        }
    }

    /// Waits for the relay to end the stream: the event ids it sent
    /// before it did.
    pub async fn end(mut self) -> Vec<String> {
        within("the live tail to end", async {
            while let Some(Ok(frame)) = self.body.frame().await {
                if let Ok(data) = frame.into_data() {
                    self.buffer.extend_from_slice(&data);
                }
            }
        })
        .await;
        String::from_utf8_lossy(&self.buffer)
            .lines()
            .filter_map(|line| line.strip_prefix("id: "))
            .map(str::to_owned)
            .collect()
    }

    /// The next entry: its event id and its list item.
    pub async fn next_item(&mut self) -> (String, serde_json::Value) {
        within("an entry in the live tail", async {
            loop {
                let block = self.next_block().await;
                let mut id = None;
                let mut data = None;
                for line in block.lines() {
                    if let Some(value) = line.strip_prefix("id: ") {
                        id = Some(value.to_owned());
                    } else if let Some(value) = line.strip_prefix("data: ") {
                        data = Some(value.to_owned());
                    }
                }
                if let (Some(id), Some(data)) = (id, data) {
                    return (id, serde_json::from_str(&data).expect("items are JSON"));
                }
            }
        })
        .await
    }
}
