//! Each limit on what public callers and clients send, with the attack it
//! stops: bodies too large, floods of requests, oversized messages on a
//! tunnel's WebSocket, callers trickling their headers (slowloris) and
//! callers resetting HTTP/2 streams as fast as they can (rapid reset).

use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ferry_common::handshake::{MAX_MESSAGE, PROTOCOL_VERSION, VERSION_HEADER};
use ferry_relay::Config;
use ferry_tests::{
    connect_from, full, host_of, read_body, send, within, Api, Body, ClientOptions, Origin,
    TestClient, TestRelay,
};
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper::header::HeaderValue;
use hyper::{Request, Response, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

const ATTACKER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);

async fn status_and_body(response: Response<hyper::body::Incoming>) -> (StatusCode, String) {
    let status = response.status();
    let body = read_body(response.into_body()).await;
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// An origin that reports the size of each request body it read whole, or
/// `None` when the body failed, and answers `fine`.
async fn measuring_origin() -> (Origin, mpsc::UnboundedReceiver<Option<usize>>) {
    let (sizes, received) = mpsc::unbounded_channel();
    let origin = Origin::start(move |req: Request<hyper::body::Incoming>| {
        let sizes = sizes.clone();
        async move {
            let size = req
                .into_body()
                .collect()
                .await
                .ok()
                .map(|b| b.to_bytes().len());
            let _ = sizes.send(size);
            Response::new(full("fine"))
        }
    })
    .await;
    (origin, received)
}

fn post(body: Body) -> Request<Body> {
    Request::builder()
        .method("POST")
        .body(body)
        .expect("request")
}

/// A body of `chunks` parts of `size` bytes, without a declared length.
fn chunked(chunks: usize, size: usize) -> Body {
    let parts = (0..chunks).map(move |_| {
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(Frame::data(Bytes::from(vec![
            b'x';
            size
        ])))
    });
    StreamBody::new(futures_util::stream::iter(parts)).boxed_unsync()
}

#[tokio::test]
async fn a_body_declared_too_large_gets_413_at_once_and_never_reaches_the_tunnel() {
    let relay = TestRelay::start(Config {
        max_body_size: 1024,
        ..Config::default()
    })
    .await;
    let (origin, mut received) = measuring_origin().await;
    let client = TestClient::start(&relay, &origin.target(), ClientOptions::default()).await;
    let host = host_of(&client.public_url);
    let api = Api::of(&relay);
    let mut tail = api.tail("").await;

    let (status, body) =
        status_and_body(send(relay.addr, &host, post(full(vec![b'x'; 4096]))).await).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    assert!(
        body.contains("larger than 1024 bytes") && body.contains("send a smaller body"),
        "{body}"
    );
    let (_, refused) = tail.next_item().await;
    assert_eq!(
        (refused["status"].as_u64(), refused["outcome"].as_str()),
        (Some(413), Some("relay_limit")),
        "{refused}"
    );

    let (status, body) =
        status_and_body(send(relay.addr, &host, post(full(vec![b'x'; 1024]))).await).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "fine"));
    assert_eq!(
        within("the origin", received.recv()).await,
        Some(Some(1024)),
        "the first request the origin saw is the one within the limit"
    );
    client.stop().await.expect("client stops");
    origin.stop().await;
    relay.stop().await;
}

#[tokio::test]
async fn a_body_without_a_length_is_cut_with_413_once_it_passes_the_limit() {
    let relay = TestRelay::start(Config {
        max_body_size: 8 * 1024,
        ..Config::default()
    })
    .await;
    let (origin, mut received) = measuring_origin().await;
    let client = TestClient::start(&relay, &origin.target(), ClientOptions::default()).await;
    let host = host_of(&client.public_url);

    let (status, body) =
        status_and_body(send(relay.addr, &host, post(chunked(12, 1024))).await).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    assert!(body.contains("larger than 8192 bytes"), "{body}");

    let (status, _) = status_and_body(send(relay.addr, &host, post(chunked(8, 1024))).await).await;
    assert_eq!(status, StatusCode::OK, "a body at the limit passes");
    // The cut body may have reached the origin in part (and failed there),
    // never whole: the first whole body it read is the one at the limit.
    let first_whole = within("the origin", async {
        loop {
            match received.recv().await {
                Some(None) => {}
                other => break other,
            }
        }
    })
    .await;
    assert_eq!(first_whole, Some(Some(8192)));
    client.stop().await.expect("client stops");
    origin.stop().await;
    relay.stop().await;
}

#[tokio::test]
async fn a_flood_on_one_tunnel_gets_429_with_retry_after_and_other_tunnels_carry_on() {
    let relay = TestRelay::start(Config {
        max_requests_per_second: 1,
        ..Config::default()
    })
    .await;
    let origin = Origin::start(|_req| async { Response::new(full("fine")) }).await;
    let flooded = TestClient::start(&relay, &origin.target(), ClientOptions::default()).await;
    let other = TestClient::start(&relay, &origin.target(), ClientOptions::default()).await;
    let host = host_of(&flooded.public_url);
    let api = Api::of(&relay);
    let mut tail = api.tail("").await;

    // One a second in bursts of five, a caller half of it (rounded up): a
    // burst passes, then the flood is cut (the bound only keeps a broken
    // limit from looping forever).
    let mut passed = 0;
    let limited = loop {
        let response = send(relay.addr, &host, Request::new(full(""))).await;
        if response.status() != StatusCode::OK {
            break response;
        }
        read_body(response.into_body()).await;
        passed += 1;
        assert!(passed < 100, "the flood was never limited");
    };
    assert!(passed >= 3, "only {passed} passed before the limit");
    assert_eq!(limited.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry_after: u64 = limited
        .headers()
        .get(hyper::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .expect("Retry-After in whole seconds");
    assert!(retry_after >= 1, "{retry_after}");
    let (_, body) = status_and_body(limited).await;
    assert!(
        body.contains("more requests per second than this relay allows"),
        "{body}"
    );
    // The owner sees in the log that the relay refused it, like its other
    // limits' answers.
    let limited = within("the limited entry in the log", async {
        loop {
            let (_, item) = tail.next_item().await;
            if item["status"] == 429 {
                break item;
            }
        }
    })
    .await;
    assert_eq!(limited["outcome"], "relay_limit", "{limited}");

    let (status, body) = status_and_body(
        send(
            relay.addr,
            &host_of(&other.public_url),
            Request::new(full("")),
        )
        .await,
    )
    .await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "fine"));
    flooded.stop().await.expect("client stops");
    other.stop().await.expect("client stops");
    origin.stop().await;
    relay.stop().await;
}

#[tokio::test]
async fn one_caller_flooding_a_tunnel_gets_429_while_others_still_get_through() {
    let relay = TestRelay::start(Config {
        max_requests_per_second: 4,
        max_requests_per_second_per_ip: Some(1),
        ..Config::default()
    })
    .await;
    let origin = Origin::start(|_req| async { Response::new(full("fine")) }).await;
    let client = TestClient::start(&relay, &origin.target(), ClientOptions::default()).await;
    let host = host_of(&client.public_url);
    let api = Api::of(&relay);
    let mut tail = api.tail("").await;

    // The tunnel takes 4 a second in bursts of 20; one caller, 1 in bursts
    // of 5. The flood goes on well past its share.
    let started = std::time::Instant::now();
    let (mut passed, mut refused) = (0, 0);
    while refused < 50 {
        let response = send(relay.addr, &host, Request::new(full(""))).await;
        match response.status() {
            StatusCode::OK => passed += 1,
            StatusCode::TOO_MANY_REQUESTS => refused += 1,
            other => panic!("the flood got {other}"),
        }
        read_body(response.into_body()).await;
        assert!(passed < 100, "the flood was never limited");
    }
    let flooded_for = started.elapsed();
    assert!(passed >= 5, "only {passed} passed before the limit");
    assert!(
        passed <= 5 + flooded_for.as_secs() + 1,
        "{passed} passed in {flooded_for:?}: more than the caller's own rate"
    );

    let mut other = Request::new(full(""));
    *other.uri_mut() = hyper::Uri::from_static("/other");
    let response = ferry_tests::send_from(ATTACKER, relay.addr, &host, other).await;
    let (status, body) = status_and_body(response).await;
    assert_eq!(
        (status, body.as_str()),
        (StatusCode::OK, "fine"),
        "another caller is served while the first is refused"
    );

    // The refusals do not fill the log: at most one a second per caller.
    let logged_refusals = within("the other caller's entry in the log", async {
        let mut logged_refusals = 0;
        loop {
            let (_, item) = tail.next_item().await;
            match item["status"].as_u64() {
                Some(429) => logged_refusals += 1,
                _ if item["path"] == "/other" => break logged_refusals,
                _ => {}
            }
        }
    })
    .await;
    assert!(
        logged_refusals >= 1 && logged_refusals <= flooded_for.as_secs() + 1,
        "{logged_refusals} of {refused} refusals logged in {flooded_for:?}"
    );
    client.stop().await.expect("client stops");
    origin.stop().await;
    relay.stop().await;
}

#[tokio::test]
async fn an_oversized_message_on_a_tunnel_websocket_closes_it_with_1009_and_others_carry_on() {
    let relay = TestRelay::open().await;
    let origin = Origin::start(|_req| async { Response::new(full("fine")) }).await;
    let client = TestClient::start(&relay, &origin.target(), ClientOptions::default()).await;

    let mut request = relay.url().into_client_request().expect("valid url");
    request.headers_mut().insert(
        VERSION_HEADER,
        HeaderValue::from_str(&PROTOCOL_VERSION.to_string()).expect("header"),
    );
    let (mut ws, _) = within("the connect", tokio_tungstenite::connect_async(request))
        .await
        .expect("the relay accepts the tunnel");
    ws.send(Message::Binary(vec![0u8; MAX_MESSAGE + 1].into()))
        .await
        .expect("sent");
    let close = within("the relay's close frame", async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(frame))) => break frame,
                Some(Ok(_)) => {}
                other => panic!("expected a close frame, got {other:?}"),
            }
        }
    })
    .await
    .expect("a close frame with a code");
    assert_eq!(close.code, CloseCode::Size);
    assert!(close.reason.contains("at most"), "{}", close.reason);

    let (status, body) = status_and_body(
        send(
            relay.addr,
            &host_of(&client.public_url),
            Request::new(full("")),
        )
        .await,
    )
    .await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "fine"));
    client.stop().await.expect("client stops");
    origin.stop().await;
    relay.stop().await;
}

/// A slowloris connection from [`ATTACKER`]: a request line, then one
/// header byte every `pace`, never the blank line; reports on `started`
/// once its first bytes are out, and returns when the relay cuts it (ends
/// or resets the connection).
async fn slowloris(
    relay: std::net::SocketAddr,
    host: String,
    pace: Duration,
    started: mpsc::UnboundedSender<()>,
) {
    let stream = connect_from(ATTACKER, relay).await;
    let (mut reader, mut writer) = stream.into_split();
    let head = format!("GET / HTTP/1.1\r\nHost: {host}\r\n");
    if writer.write_all(head.as_bytes()).await.is_err() {
        return;
    }
    let _ = started.send(());
    let trickle = async move {
        let mut ticks = tokio::time::interval(pace);
        loop {
            ticks.tick().await;
            if writer.write_all(b"x").await.is_err() {
                return;
            }
        }
    };
    let mut buf = [0u8; 1024];
    let cut = async {
        loop {
            match reader.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                // A 408 before the close is fine too.
                Ok(_) => {}
            }
        }
    };
    tokio::select! {
        () = cut => {}
        () = trickle => {}
    }
}

#[tokio::test]
async fn slowloris_connections_are_cut_at_the_header_timeout_while_others_are_served() {
    let relay = TestRelay::start(Config {
        header_timeout: Duration::from_secs(2),
        ..Config::default()
    })
    .await;
    let origin = Origin::start(|_req| async { Response::new(full("fine")) }).await;
    let client = TestClient::start(&relay, &origin.target(), ClientOptions::default()).await;
    let host = host_of(&client.public_url);

    let (started_tx, mut started) = mpsc::unbounded_channel();
    let attackers: Vec<_> = (0..100)
        .map(|_| {
            tokio::spawn(slowloris(
                relay.addr,
                host.clone(),
                Duration::from_millis(100),
                started_tx.clone(),
            ))
        })
        .collect();
    for _ in 0..attackers.len() {
        within("an attacker to start", started.recv()).await;
    }
    for _ in 0..20 {
        let (status, body) =
            status_and_body(send(relay.addr, &host, Request::new(full(""))).await).await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "fine"));
    }
    for attacker in attackers {
        within("the relay to cut a slowloris connection", attacker)
            .await
            .expect("attacker task");
    }
    let (status, _) = status_and_body(send(relay.addr, &host, Request::new(full(""))).await).await;
    assert_eq!(status, StatusCode::OK);
    client.stop().await.expect("client stops");
    origin.stop().await;
    relay.stop().await;
}

/// Debian's Python with its `python3-h2` package, which the rapid-reset
/// script needs.
const PYTHON: &str = "/usr/bin/python3";

#[tokio::test]
async fn rapid_reset_gets_goaway_and_the_relay_keeps_answering_others() {
    let has_h2 = Command::new(PYTHON)
        .args(["-c", "import h2"])
        .output()
        .is_ok_and(|out| out.status.success());
    assert!(
        has_h2,
        "the rapid-reset test needs {PYTHON} with the h2 package: apt-get install python3-h2"
    );
    let relay = TestRelay::open().await;
    let origin = Origin::start(|_req| async { Response::new(full("fine")) }).await;
    let client = TestClient::start(&relay, &origin.target(), ClientOptions::default()).await;
    let host = host_of(&client.public_url);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/rapid_reset.py");
    let addr = relay.addr;
    let attack_host = host.clone();
    let attack = tokio::task::spawn_blocking(move || {
        Command::new(PYTHON)
            .args([
                script,
                &addr.ip().to_string(),
                &addr.port().to_string(),
                &attack_host,
                "100000",
            ])
            .output()
    });
    for _ in 0..20 {
        let (status, body) =
            status_and_body(send(relay.addr, &host, Request::new(full(""))).await).await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "fine"));
    }
    let output = within("the rapid-reset script", attack)
        .await
        .expect("script task")
        .expect("the script runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.starts_with("goaway") || stdout.starts_with("closed"),
        "the relay let the connection reset streams forever: {stdout}"
    );
    let (status, body) =
        status_and_body(send(relay.addr, &host, Request::new(full(""))).await).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "fine"));
    client.stop().await.expect("client stops");
    origin.stop().await;
    relay.stop().await;
}

/// The 50th and 90th percentile of `samples`.
fn percentiles(mut samples: Vec<Duration>) -> (Duration, Duration) {
    samples.sort();
    let at = |q: usize| samples[(samples.len() * q / 100).min(samples.len() - 1)];
    (at(50), at(90))
}

/// Latency of `count` GETs through the tunnel, each on a new connection.
async fn latencies(relay: std::net::SocketAddr, host: &str, count: usize) -> (Duration, Duration) {
    let mut samples = Vec::with_capacity(count);
    for _ in 0..count {
        let started = std::time::Instant::now();
        let (status, _) = status_and_body(send(relay, host, Request::new(full(""))).await).await;
        assert_eq!(status, StatusCode::OK);
        samples.push(started.elapsed());
    }
    percentiles(samples)
}

/// Not a check but a measurement for the docs: a normal caller's latency
/// through a tunnel with no attack, during a slowloris attack and during a
/// rapid-reset attack, as ratios. Run with
/// `cargo test --release -p ferry-tests --test it latency_under_attack -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement that prints, run by hand"]
async fn latency_under_attack() {
    const SAMPLES: usize = 3000;
    // The measurement's own callers go faster than a tunnel's default rate.
    let relay = TestRelay::start(Config {
        max_requests_per_second: 1_000_000,
        ..Config::default()
    })
    .await;
    let origin = Origin::start(|_req| async { Response::new(full("fine")) }).await;
    let client = TestClient::start(&relay, &origin.target(), ClientOptions::default()).await;
    let host = host_of(&client.public_url);
    latencies(relay.addr, &host, SAMPLES).await;
    let calm = latencies(relay.addr, &host, SAMPLES).await;

    // 200 slowloris connections (within the per-address cap of 256), each
    // trickling a byte every 100 ms; the default header timeout (30 s)
    // outlasts the measurement.
    let (started_tx, mut started) = mpsc::unbounded_channel();
    let attackers: Vec<_> = (0..200)
        .map(|_| {
            tokio::spawn(slowloris(
                relay.addr,
                host.clone(),
                Duration::from_millis(100),
                started_tx.clone(),
            ))
        })
        .collect();
    for _ in 0..attackers.len() {
        within("an attacker to start", started.recv()).await;
    }
    let slowloris_run = latencies(relay.addr, &host, SAMPLES).await;
    for attacker in attackers {
        attacker.abort();
    }

    // Two attackers running the rapid-reset script again and again.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (ran_tx, ran) = std::sync::mpsc::channel();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/rapid_reset.py");
    let resetters: Vec<_> = (0..2)
        .map(|_| {
            let (stop, addr, host, ran) =
                (Arc::clone(&stop), relay.addr, host.clone(), ran_tx.clone());
            std::thread::spawn(move || {
                let mut outcomes = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let output = Command::new(PYTHON)
                        .args([
                            script,
                            &addr.ip().to_string(),
                            &addr.port().to_string(),
                            &host,
                            "100000",
                        ])
                        .output()
                        .expect("the script runs");
                    outcomes.push(String::from_utf8_lossy(&output.stdout).trim().to_owned());
                    let _ = ran.send(());
                }
                outcomes
            })
        })
        .collect();
    // Measured once both attackers are past Python's start-up.
    for _ in 0..2 {
        ran.recv().expect("a rapid-reset run");
    }
    let reset_run = latencies(relay.addr, &host, SAMPLES).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut outcomes = Vec::new();
    for resetter in resetters {
        outcomes.extend(resetter.join().expect("resetter"));
    }
    let calm_again = latencies(relay.addr, &host, SAMPLES).await;

    let ratio = |a: Duration, b: Duration| a.as_secs_f64() / b.as_secs_f64();
    println!("normal GETs, each on a new connection, {SAMPLES} per run:");
    println!("  no attack:   p50 {:?}  p90 {:?}", calm.0, calm.1);
    println!(
        "  no attack, after the attacks: p50 {:?}  p90 {:?}",
        calm_again.0, calm_again.1
    );
    println!(
        "  slowloris:   p50 {:?}  p90 {:?}  ratio p50 {:.2} p90 {:.2}",
        slowloris_run.0,
        slowloris_run.1,
        ratio(slowloris_run.0, calm.0),
        ratio(slowloris_run.1, calm.1)
    );
    println!(
        "  rapid reset: p50 {:?}  p90 {:?}  ratio p50 {:.2} p90 {:.2}",
        reset_run.0,
        reset_run.1,
        ratio(reset_run.0, calm.0),
        ratio(reset_run.1, calm.1)
    );
    println!(
        "  rapid-reset connections: {}, outcomes: {:?}",
        outcomes.len(),
        outcomes.iter().collect::<std::collections::BTreeSet<_>>()
    );
    client.stop().await.expect("client stops");
    origin.stop().await;
    relay.stop().await;
}
