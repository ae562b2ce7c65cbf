//! The delivery queue survives `kill -9`: a relay killed with deliveries in
//! flight and a thousand queued, then started again on the same data
//! directory, delivers every event at least once, and a delivery sent
//! twice carries the same `webhook-id` both times.

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HOST};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

/// Events queued before the kill.
const EVENTS: usize = 1_000;
/// Attempts the relay may have in flight for the one webhook.
const IN_FLIGHT: usize = 32;
/// How long any one step may take before the test fails rather than hangs.
const PATIENCE: Duration = Duration::from_secs(20);

async fn within<T>(what: &str, future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(PATIENCE, future)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// A relay process and the address its banner named.
struct Relay {
    /// The process, killed when dropped.
    child: Child,
    /// Where it listens.
    addr: SocketAddr,
}

impl Relay {
    /// Starts `ferry-relay` on a free port over `data_dir` and waits for
    /// its banner.
    async fn start(data_dir: &std::path::Path) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_ferry-relay"))
            .args(["--listen", "127.0.0.1:0", "--egress-allow", "127.0.0.0/8"])
            .args(["--dispatch-per-webhook", &IN_FLIGHT.to_string()])
            // Held attempts must still be in flight at the kill.
            .args(["--dispatch-timeout", "60s"])
            .arg("--data-dir")
            .arg(data_dir)
            .env_remove("RUST_LOG")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("ferry-relay starts");
        let stdout = child.stdout.take().expect("piped stdout");
        let first = within("the banner", BufReader::new(stdout).lines().next_line())
            .await
            .expect("stdout reads")
            .expect("a banner line");
        let addr = first
            .strip_prefix("ferry-relay listening on http://")
            .and_then(|rest| rest.split(' ').next())
            .and_then(|addr| addr.parse().ok())
            .unwrap_or_else(|| panic!("no bound address in `{first}`"));
        Self { child, addr }
    }

    /// `POST path` with a JSON body to the relay's API, on a connection of
    /// its own.
    async fn post(&self, path: &str, body: serde_json::Value) -> (StatusCode, serde_json::Value) {
        self.call(
            Request::post(path),
            Full::new(Bytes::from(body.to_string())),
        )
        .await
    }

    /// `GET path` of the relay's API: the JSON answer.
    async fn get(&self, path: &str) -> serde_json::Value {
        let (status, body) = self.call(Request::get(path), Full::default()).await;
        assert_eq!(status, StatusCode::OK, "GET {path}: {body}");
        body
    }

    async fn call(
        &self,
        request: hyper::http::request::Builder,
        body: Full<Bytes>,
    ) -> (StatusCode, serde_json::Value) {
        let stream = TcpStream::connect(self.addr)
            .await
            .expect("the relay accepts");
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("an HTTP/1.1 handshake");
        tokio::spawn(connection);
        let request = request
            .header(HOST, self.addr.to_string())
            .header(CONTENT_TYPE, "application/json")
            .body(body)
            .expect("a valid request");
        let response = within("the API", sender.send_request(request))
            .await
            .expect("an answer");
        let status = response.status();
        let body = within("the API's body", response.into_body().collect())
            .await
            .expect("a whole body")
            .to_bytes();
        (
            status,
            serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null),
        )
    }

    /// `kill -9`: no shutdown, no flush, leases left as they are.
    async fn kill(mut self) {
        self.child.kill().await.expect("the relay is killed");
    }
}

/// A request the receiver got: the event's id and the `webhook-id`.
struct Arrival {
    /// From the body's `data`.
    event: String,
    /// The delivery's id.
    message: String,
}

/// A webhook receiver that holds every request open until `answer` turns
/// true, then answers 200; each request is reported as it arrives.
struct Receiver {
    /// Where it listens.
    addr: SocketAddr,
    /// Turned true to let every request, held or new, have its 200.
    answer: watch::Sender<bool>,
    /// The server and its connections, aborted when dropped.
    _tasks: JoinSet<()>,
}

impl Receiver {
    async fn start() -> (Self, mpsc::Receiver<Arrival>) {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("the receiver binds");
        let addr = listener.local_addr().expect("a bound address");
        let (answer, answering) = watch::channel(false);
        // Room for two attempts of every event, so a handler never waits
        // on the test.
        let (arrived, arrivals) = mpsc::channel(4 * EVENTS);
        let mut tasks = JoinSet::new();
        tasks.spawn(async move {
            let mut connections = JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (arrived, answering) = (arrived.clone(), answering.clone());
                let service = service_fn(move |request: Request<Incoming>| {
                    let (arrived, mut answering) = (arrived.clone(), answering.clone());
                    async move {
                        let message = request
                            .headers()
                            .get("webhook-id")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or_default()
                            .to_owned();
                        let body = request
                            .into_body()
                            .collect()
                            .await
                            .map(|b| b.to_bytes())
                            .unwrap_or_default();
                        let json: serde_json::Value =
                            serde_json::from_slice(&body).unwrap_or_default();
                        let event = json["data"]["event"].as_str().unwrap_or_default();
                        let _ = arrived
                            .send(Arrival {
                                event: event.to_owned(),
                                message,
                            })
                            .await;
                        let _ = answering.wait_for(|answer| *answer).await;
                        Ok::<_, Infallible>(Response::new(Empty::<Bytes>::new()))
                    }
                });
                connections.spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
                // Finished connections are reaped as new ones come.
                while connections.try_join_next().is_some() {}
            }
        });
        (
            Self {
                addr,
                answer,
                _tasks: tasks,
            },
            arrivals,
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_killed_with_deliveries_in_flight_delivers_every_event_after_a_restart() {
    let data = tempfile::tempdir().expect("a data directory");
    let (receiver, mut arrivals) = Receiver::start().await;
    let first = Relay::start(data.path()).await;
    let (status, created) = first
        .post(
            "/api/v1/webhooks",
            serde_json::json!({
                "name": "kill",
                "url": format!("http://{}/hook", receiver.addr),
                "actions": ["*"],
            }),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let webhook = created["id"].as_str().expect("a webhook id").to_owned();

    // Eight producers; each event is durably queued once its 202 is in.
    let first = std::sync::Arc::new(first);
    let mut producers = JoinSet::new();
    for p in 0..8 {
        let relay = std::sync::Arc::clone(&first);
        producers.spawn(async move {
            for i in (p..EVENTS).step_by(8) {
                let id = format!("evt_{i:04}");
                let (status, answer) = relay
                    .post(
                        "/api/v1/events",
                        serde_json::json!({
                            "type": "document.create",
                            "id": id,
                            "data": {"event": id},
                        }),
                    )
                    .await;
                assert_eq!(status, StatusCode::ACCEPTED, "{id}: {answer}");
                assert_eq!(answer["queued"], 1, "{id}: {answer}");
            }
        });
    }
    while let Some(done) = within("the producers", producers.join_next()).await {
        done.expect("a producer ran");
    }

    // The relay has as many attempts in flight as it may, all held by the
    // receiver: kill it now.
    let mut seen: HashMap<String, HashSet<String>> = HashMap::new();
    let mut in_flight = Vec::new();
    while in_flight.len() < IN_FLIGHT {
        let arrival = within("attempts in flight", arrivals.recv())
            .await
            .expect("the receiver runs");
        in_flight.push(arrival.event.clone());
        seen.entry(arrival.event)
            .or_default()
            .insert(arrival.message);
    }
    let first = std::sync::Arc::into_inner(first).expect("the producers are done");
    first.kill().await;

    let second = Relay::start(data.path()).await;
    receiver.answer.send_replace(true);
    let mut arrived_twice = HashSet::new();
    within("every event to arrive", async {
        while seen.len() < EVENTS || arrived_twice.len() < in_flight.len() {
            let arrival = arrivals.recv().await.expect("the receiver runs");
            let messages = seen.entry(arrival.event.clone()).or_default();
            if !messages.is_empty() {
                arrived_twice.insert(arrival.event);
            }
            messages.insert(arrival.message);
        }
    })
    .await;
    let expected: HashSet<String> = (0..EVENTS).map(|i| format!("evt_{i:04}")).collect();
    assert_eq!(seen.keys().cloned().collect::<HashSet<_>>(), expected);
    for (event, messages) in &seen {
        assert_eq!(messages.len(), 1, "{event} came under two webhook-ids");
    }
    // What was in flight at the kill is sent again: nothing is taken for
    // delivered without a 2xx.
    assert_eq!(
        arrived_twice,
        in_flight.iter().cloned().collect::<HashSet<_>>()
    );

    // The restarted relay stores every delivery as succeeded.
    within("the queue to drain", async {
        loop {
            let pending = second
                .get(&format!(
                    "/api/v1/webhooks/{webhook}/deliveries?state=pending&limit=1"
                ))
                .await;
            if pending["items"].as_array().is_some_and(Vec::is_empty) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let mut succeeded = 0;
    let mut before = String::new();
    loop {
        let page = second
            .get(&format!(
                "/api/v1/webhooks/{webhook}/deliveries?state=succeeded&limit=200{before}"
            ))
            .await;
        succeeded += page["items"].as_array().map_or(0, Vec::len);
        match page["next_cursor"].as_str() {
            Some(cursor) => before = format!("&before={cursor}"),
            None => break,
        }
    }
    assert_eq!(succeeded, EVENTS);
    second.kill().await;
}
