//! Each limit meets the attack it stops: a hostile public caller or client
//! must not drop, reach or starve another user's tunnel.

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ferry::Event;
use ferry_tests::{
    connect_from, full, host_of, read_body, send, send_from, stop_all, within, Body, ClientOptions,
    Origin, TestClient, TestRelay,
};
use futures_util::StreamExt;
use http_body_util::BodyExt;
use hyper::{Request, Response, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, Notify};

const ATTACKER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);

/// Status and body of an empty GET to `host` through the relay.
async fn get(relay: &TestRelay, host: &str) -> (StatusCode, String) {
    status_and_body(send(relay.addr, host, Request::new(full(""))).await).await
}

async fn status_and_body(response: Response<hyper::body::Incoming>) -> (StatusCode, String) {
    let status = response.status();
    let body = read_body(response.into_body()).await;
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// An origin that answers each request once `release` is notified, and
/// reports on `started` when a request reaches it.
async fn held_origin() -> (Origin, mpsc::UnboundedReceiver<()>, Arc<Notify>) {
    let (started_tx, started) = mpsc::unbounded_channel();
    let release = Arc::new(Notify::new());
    let origin_release = Arc::clone(&release);
    let origin = Origin::start(move |_req| {
        let (started_tx, release) = (started_tx.clone(), Arc::clone(&origin_release));
        async move {
            let released = release.notified();
            let _ = started_tx.send(());
            released.await;
            Response::new(full("released"))
        }
    })
    .await;
    (origin, started, release)
}

/// Asserts the client reported no drop among the events so far.
fn assert_still_connected(client: &mut TestClient) {
    while let Some(event) = client.try_event() {
        assert!(
            !matches!(
                event,
                Event::Disconnected { .. } | Event::Reconnecting { .. }
            ),
            "the tunnel dropped: {event:?}"
        );
    }
}

#[tokio::test]
async fn oversized_headers_get_431_and_never_drop_the_tunnel() {
    let relay = TestRelay::open().await;
    let (origin, mut started, release) = held_origin().await;
    let mut client = TestClient::start(&relay, &origin.target(), ClientOptions::default()).await;
    let host = host_of(&client.public_url);

    // A request in flight that the attack must not fail.
    let (addr, held_host) = (relay.addr, host.clone());
    let in_flight =
        tokio::spawn(async move { send(addr, &held_host, Request::new(full(""))).await });
    within("the held request to reach the origin", started.recv()).await;

    let big = "a".repeat(70_000);
    for _ in 0..20 {
        let request = Request::builder()
            .header("x-big", big.as_str())
            .body(full(""))
            .expect("request");
        let (status, body) = status_and_body(send(relay.addr, &host, request).await).await;
        assert_eq!(
            status,
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "{body}"
        );
        assert!(body.contains("send fewer or smaller headers"), "{body}");
    }
    // Many headers that each pass, whose list does not.
    let mut request = Request::builder();
    for i in 0..400 {
        request = request.header(format!("x-h{i}"), "b".repeat(100));
    }
    let (status, _) =
        status_and_body(send(relay.addr, &host, request.body(full("")).expect("request")).await)
            .await;
    assert_eq!(status, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);

    release.notify_waiters();
    let response = within("the held request", in_flight).await.expect("task");
    assert_eq!(
        status_and_body(response).await,
        (StatusCode::OK, "released".to_owned())
    );
    assert_still_connected(&mut client);
    stop_all(client, origin, relay).await;
}

#[tokio::test]
async fn callers_hanging_up_at_once_many_times_never_drop_the_tunnel() {
    let relay = TestRelay::open().await;
    let origin = Origin::start(|_req| async { Response::new(full("fine")) }).await;
    let mut client = TestClient::start(&relay, &origin.target(), ClientOptions::default()).await;
    let host = host_of(&client.public_url);
    // Each caller sends a request and hangs up before any answer, so the
    // relay resets its stream; h2 counts such resets against the session.
    for _ in 0..300 {
        let mut stream = tokio::net::TcpStream::connect(relay.addr)
            .await
            .expect("connect");
        let request = format!("POST / HTTP/1.1\r\nhost: {host}\r\ncontent-length: 10\r\n\r\n");
        stream.write_all(request.as_bytes()).await.expect("write");
        drop(stream);
    }
    let (status, body) = get(&relay, &host).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "fine"));
    assert_still_connected(&mut client);
    stop_all(client, origin, relay).await;
}

fn token_options(token: &str, subdomain: &'static str) -> ClientOptions {
    ClientOptions {
        token: Some(token.to_owned()),
        subdomain: Some(subdomain),
        ..ClientOptions::default()
    }
}

#[tokio::test]
async fn a_dropped_tunnel_stays_its_owners_and_cannot_be_claimed_by_another_token() {
    let config = ferry_relay::Config {
        tokens: vec![
            ferry_relay::Token::new("alice"),
            ferry_relay::Token::new("mallory"),
        ],
        ..ferry_relay::Config::default()
    };
    let relay = TestRelay::start(config).await;
    let origin = Origin::start(|_req| async { Response::new(full("alice's")) }).await;
    let alice = TestClient::start(&relay, &origin.target(), token_options("alice", "shop")).await;
    alice.kill().await;

    let mallory = TestClient::spawn(&relay, &origin.target(), token_options("mallory", "shop"));
    match mallory.finished().await {
        Err(ferry::Error::Refused {
            status: 409,
            message,
        }) => {
            assert!(
                message.contains("held for the client that used it last"),
                "{message}"
            )
        }
        other => panic!("mallory should be refused, got {other:?}"),
    }
    let alice = TestClient::start(&relay, &origin.target(), token_options("alice", "shop")).await;
    let (status, body) = get(&relay, &host_of(&alice.public_url)).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "alice's"));
    stop_all(alice, origin, relay).await;
}

#[tokio::test]
async fn on_an_open_relay_a_restarted_client_gets_its_name_back_by_its_key() {
    let relay = TestRelay::open().await;
    let origin = Origin::start(|_req| async { Response::new(full("mine")) }).await;
    let keyed = |key: &str| ClientOptions {
        subdomain: Some("demo"),
        client_key: Some(key.to_owned()),
        ..ClientOptions::default()
    };
    let first = TestClient::start(&relay, &origin.target(), keyed("aaaa")).await;
    first.kill().await;
    let thief = TestClient::spawn(&relay, &origin.target(), keyed("bbbb"));
    assert!(matches!(
        thief.finished().await,
        Err(ferry::Error::Refused { status: 409, .. })
    ));
    let again = TestClient::start(&relay, &origin.target(), keyed("aaaa")).await;
    stop_all(again, origin, relay).await;
}

#[tokio::test]
async fn a_takeover_that_fails_to_come_up_leaves_the_old_session_serving() {
    let config = ferry_relay::Config {
        tokens: vec![ferry_relay::Token::new("alice")],
        ..ferry_relay::Config::default()
    };
    let relay = TestRelay::start(config).await;
    let origin = Origin::start(|_req| async { Response::new(full("old")) }).await;
    let mut old = TestClient::start(&relay, &origin.target(), token_options("alice", "shop")).await;
    // A newcomer with the same token that upgrades and then vanishes.
    let mut stream = tokio::net::TcpStream::connect(relay.addr)
        .await
        .expect("connect");
    let handshake = format!(
        "GET /api/v1/tunnels/connect HTTP/1.1\r\nhost: {}\r\nupgrade: websocket\r\nconnection: upgrade\r\n\
         sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n\
         ferry-protocol-version: {}\r\nferry-subdomain: shop\r\nauthorization: Bearer alice\r\n\r\n",
        relay.addr,
        ferry_common::handshake::PROTOCOL_VERSION
    );
    stream.write_all(handshake.as_bytes()).await.expect("write");
    let mut answer = vec![0u8; 1024];
    let n = within("the 101", stream.read(&mut answer))
        .await
        .expect("read");
    assert!(
        answer[..n].starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&answer[..n])
    );
    drop(stream);

    for _ in 0..5 {
        let (status, body) = get(&relay, &host_of(&old.public_url)).await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "old"));
    }
    assert_still_connected(&mut old);
    stop_all(old, origin, relay).await;
}

/// A request body that sends one byte, then nothing more.
fn trickle() -> Body {
    let first = futures_util::stream::once(async {
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(hyper::body::Frame::data(
            Bytes::from_static(b"x"),
        ))
    });
    http_body_util::StreamBody::new(first.chain(futures_util::stream::pending())).boxed_unsync()
}

#[tokio::test]
async fn slow_bodies_from_one_caller_cannot_starve_a_tunnel() {
    let config = ferry_relay::Config {
        max_requests_per_tunnel: 8,
        max_requests_per_ip: 4,
        body_timeout: Duration::from_secs(2),
        ..ferry_relay::Config::default()
    };
    let relay = TestRelay::start(config).await;
    let (arrived_tx, mut arrived) = mpsc::unbounded_channel();
    let origin = Origin::start(move |req: Request<hyper::body::Incoming>| {
        let arrived_tx = arrived_tx.clone();
        async move {
            let _ = arrived_tx.send(());
            let body = req
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes().len())
                .unwrap_or(0);
            Response::new(full(format!("read {body}")))
        }
    })
    .await;
    let client = TestClient::start(&relay, &origin.target(), ClientOptions::default()).await;
    let host = host_of(&client.public_url);
    let slow_post = || {
        Request::builder()
            .method("POST")
            .header("content-length", "1000")
            .body(trickle())
            .expect("request")
    };

    let mut slow = Vec::new();
    for _ in 0..4 {
        let (addr, host, request) = (relay.addr, host.clone(), slow_post());
        slow.push(tokio::spawn(async move {
            send_from(ATTACKER, addr, &host, request).await
        }));
        within("a slow request to reach the origin", arrived.recv()).await;
    }
    // The attacker's fifth is beyond its share while the four are held.
    let (status, body) =
        status_and_body(send_from(ATTACKER, relay.addr, &host, slow_post()).await).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert!(body.contains("the most one caller may"), "{body}");
    // Everybody else is still served.
    let (status, body) =
        status_and_body(send(relay.addr, &host, Request::new(full("hello"))).await).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "read 5"));
    // And the stalled bodies are cut off with 408.
    for request in slow {
        let response = within("a stalled request", request).await.expect("task");
        let (status, body) = status_and_body(response).await;
        assert_eq!(status, StatusCode::REQUEST_TIMEOUT, "{body}");
        assert!(body.contains("paused"), "{body}");
    }
    stop_all(client, origin, relay).await;
}

#[tokio::test]
async fn silent_connections_are_closed_and_the_cap_does_not_lock_others_out() {
    let config = ferry_relay::Config {
        max_connections: 20,
        header_timeout: Duration::from_millis(300),
        ..ferry_relay::Config::default()
    };
    let relay = TestRelay::start(config).await;
    let origin = Origin::start(|_req| async { Response::new(full("served")) }).await;
    let client = TestClient::start(&relay, &origin.target(), ClientOptions::default()).await;
    let mut silent = Vec::new();
    for _ in 0..20 {
        silent.push(connect_from(ATTACKER, relay.addr).await);
    }
    // The relay is at its cap; it serves again once the silent ones time out.
    let (status, body) = get(&relay, &host_of(&client.public_url)).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "served"));
    for mut stream in silent {
        let mut byte = [0u8; 1];
        let read = within("a silent connection to be closed", stream.read(&mut byte)).await;
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    }
    stop_all(client, origin, relay).await;
}

#[tokio::test]
async fn one_address_cannot_hold_every_connection() {
    let config = ferry_relay::Config {
        max_connections_per_ip: 5,
        ..ferry_relay::Config::default()
    };
    let relay = TestRelay::start(config).await;
    let origin = Origin::start(|_req| async { Response::new(full("served")) }).await;
    let client = TestClient::start(&relay, &origin.target(), ClientOptions::default()).await;
    let mut held = Vec::new();
    for _ in 0..5 {
        held.push(connect_from(ATTACKER, relay.addr).await);
    }
    let mut sixth = connect_from(ATTACKER, relay.addr).await;
    let mut byte = [0u8; 1];
    let read = within("the sixth connection to be closed", sixth.read(&mut byte)).await;
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    let (status, _) = get(&relay, &host_of(&client.public_url)).await;
    assert_eq!(status, StatusCode::OK, "other addresses are served");
    drop(held);
    stop_all(client, origin, relay).await;
}

#[tokio::test]
async fn idle_http1_and_http2_connections_are_closed() {
    // The header timeout is far beyond the test's patience: only the idle
    // timeout can close these connections in time.
    let config = ferry_relay::Config {
        idle_timeout: Duration::from_millis(300),
        header_timeout: Duration::from_secs(3600),
        ..ferry_relay::Config::default()
    };
    let relay = TestRelay::start(config).await;
    let mut stream = tokio::net::TcpStream::connect(relay.addr)
        .await
        .expect("connect");
    stream
        .write_all(format!("GET /healthz HTTP/1.1\r\nhost: {}\r\n\r\n", relay.addr).as_bytes())
        .await
        .expect("write");
    let mut answer = Vec::new();
    within(
        "the answer, then the close",
        stream.read_to_end(&mut answer),
    )
    .await
    .expect("read");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    let stream = tokio::net::TcpStream::connect(relay.addr)
        .await
        .expect("connect");
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .expect("h2 handshake");
    let connection = tokio::spawn(connection);
    let request = Request::builder()
        .uri(format!("http://{}/healthz", relay.addr))
        .body(full(""))
        .expect("request");
    let response = within("an h2 answer", sender.send_request(request))
        .await
        .expect("response");
    assert_eq!(response.status(), StatusCode::OK);
    drop(response);
    within("the idle h2 connection to be closed", connection)
        .await
        .expect("task")
        .ok();
    relay.stop().await;
}

#[tokio::test]
async fn a_quiet_tunnel_outlives_the_idle_timeout_of_public_connections() {
    let config = ferry_relay::Config {
        idle_timeout: Duration::from_millis(100),
        ..ferry_relay::Config::default()
    };
    let relay = TestRelay::start(config).await;
    let origin = Origin::start(|_req| async { Response::new(full("still up")) }).await;
    let mut client = TestClient::start(&relay, &origin.target(), ClientOptions::default()).await;
    // The scenario is a quiet spell longer than the idle timeout (and
    // shorter than the tunnel's ping interval), not a wait for an event.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (status, body) = get(&relay, &host_of(&client.public_url)).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "still up"));
    assert_still_connected(&mut client);
    stop_all(client, origin, relay).await;
}

#[tokio::test]
async fn tunnel_connects_are_rate_limited_per_address_and_capped_per_relay() {
    let config = ferry_relay::Config {
        connects_per_minute: 3,
        ..ferry_relay::Config::default()
    };
    let relay = TestRelay::start(config).await;
    let origin = Origin::start(|_req| async { Response::new(full("")) }).await;
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(TestClient::start(&relay, &origin.target(), ClientOptions::default()).await);
    }
    let fourth = TestClient::spawn(&relay, &origin.target(), ClientOptions::default());
    match fourth.finished().await {
        Err(ferry::Error::Refused {
            status: 429,
            message,
        }) => {
            assert!(message.contains("too many tunnel connects"), "{message}")
        }
        other => panic!("the fourth connect should get 429, got {other:?}"),
    }
    for client in clients {
        client.stop().await.expect("client stops");
    }
    relay.stop().await;

    let config = ferry_relay::Config {
        max_tunnels: 2,
        ..ferry_relay::Config::default()
    };
    let relay = TestRelay::start(config).await;
    let a = TestClient::start(&relay, &origin.target(), ClientOptions::default()).await;
    let b = TestClient::start(&relay, &origin.target(), ClientOptions::default()).await;
    let third = TestClient::spawn(&relay, &origin.target(), ClientOptions::default());
    match third.finished().await {
        Err(ferry::Error::Refused {
            status: 503,
            message,
        }) => {
            assert!(message.contains("tunnels open, its limit"), "{message}")
        }
        other => panic!("the third tunnel should get 503, got {other:?}"),
    }
    a.stop().await.expect("a stops");
    b.stop().await.expect("b stops");
    origin.stop().await;
    relay.stop().await;
}

#[tokio::test]
async fn token_guessing_is_throttled_per_address() {
    let config = ferry_relay::Config {
        tokens: vec![ferry_relay::Token::new("right")],
        failed_auths_per_minute: 5,
        ..ferry_relay::Config::default()
    };
    let relay = TestRelay::start(config).await;
    let api = relay.addr.to_string();
    let ask = |token: &str| {
        Request::builder()
            .uri("/api/v1/tunnels")
            .header("authorization", format!("Bearer {token}"))
            .body(full(""))
            .expect("request")
    };
    for _ in 0..5 {
        let (status, _) =
            status_and_body(send_from(ATTACKER, relay.addr, &api, ask("guess")).await).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }
    let response = send_from(ATTACKER, relay.addr, &api, ask("right")).await;
    assert!(response.headers().contains_key("retry-after"));
    let (status, body) = status_and_body(response).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert!(body.contains("\"code\":\"rate_limited\""), "{body}");
    let (status, _) = status_and_body(send(relay.addr, &api, ask("right")).await).await;
    assert_eq!(status, StatusCode::OK, "other addresses are not affected");
    relay.stop().await;
}

/// Writes `bytes` to the relay on a fresh connection and returns what it
/// answers until it closes or `until` appears.
async fn raw_exchange(relay: &TestRelay, bytes: &[u8], until: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(relay.addr)
        .await
        .expect("connect");
    // The relay may answer and close while we still write.
    let _ = stream.write_all(bytes).await;
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    within("the relay's answer", async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
            if String::from_utf8_lossy(&answer).contains(until) {
                break;
            }
        }
    })
    .await;
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test]
async fn malformed_requests_to_a_tunnel_get_400_or_501_and_the_session_carries_on() {
    let relay = TestRelay::open().await;
    let origin = Origin::start(|req: Request<hyper::body::Incoming>| async move {
        let body = req.into_body().collect().await.map(|b| b.to_bytes().len());
        Response::new(full(format!("read {body:?}")))
    })
    .await;
    let mut client = TestClient::start(&relay, &origin.target(), ClientOptions::default()).await;
    let host = host_of(&client.public_url);

    let answer = raw_exchange(
        &relay,
        format!("GET / HTTP/1.1\r\nhost: {host}\r\nhost: other.localhost\r\n\r\n").as_bytes(),
        "send exactly one",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("more than one Host"), "{answer}");

    let answer = raw_exchange(
        &relay,
        format!("POST / HTTP/1.1\r\nhost: {host}\r\ntransfer-encoding: chunked\r\n\r\nZZZ\r\nhello\r\n0\r\n\r\n")
            .as_bytes(),
        "well-formed body",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("could not be read"), "{answer}");

    for target in [host.as_str(), "/"] {
        let answer = raw_exchange(
            &relay,
            format!("CONNECT {target} HTTP/1.1\r\nhost: {host}\r\n\r\n").as_bytes(),
            "elsewhere",
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 501"), "{target}: {answer}");
        assert!(answer.contains("CONNECT is for proxies"), "{answer}");
    }

    // Trailers a proxy must not pass on (connection-specific ones) end at
    // most this one exchange.
    let answer = raw_exchange(
        &relay,
        format!(
            "POST / HTTP/1.1\r\nhost: {host}\r\ntransfer-encoding: chunked\r\ntrailer: x-sum\r\n\r\n\
             5\r\nhello\r\n0\r\nconnection: close\r\nx-sum: 1\r\n\r\n"
        )
        .as_bytes(),
        "read ",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("read Ok(5)"), "{answer}");

    let (status, body) =
        status_and_body(send(relay.addr, &host, Request::new(full("abc"))).await).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "read Ok(3)"));
    assert_still_connected(&mut client);
    stop_all(client, origin, relay).await;
}

#[tokio::test]
async fn every_error_the_relay_answers_for_a_tunnel_is_counted() {
    let config = ferry_relay::Config {
        request_timeout: Duration::from_millis(200),
        max_requests_per_tunnel: 1,
        ..ferry_relay::Config::default()
    };
    let relay = TestRelay::start(config).await;
    let (origin, mut started, release) = held_origin().await;
    let client = TestClient::start(&relay, &origin.target(), ClientOptions::default()).await;
    let host = host_of(&client.public_url);
    // 504: the origin holds the request past the relay's timeout; while it
    // is held, a second request is beyond the limit of one: 503.
    let (addr, held_host) = (relay.addr, host.clone());
    let held = tokio::spawn(async move { send(addr, &held_host, Request::new(full(""))).await });
    within("the held request", started.recv()).await;
    let (status, _) = get(&relay, &host).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    let response = within("the 504", held).await.expect("task");
    assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
    release.notify_waiters();
    let port = relay.addr.port();
    let (status, _) = status_and_body(
        send(
            relay.addr,
            &format!("nobody.localhost:{port}"),
            Request::new(full("")),
        )
        .await,
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    let (_, metrics) = status_and_body(
        send(
            relay.addr,
            &relay.addr.to_string(),
            Request::builder()
                .uri("/metrics")
                .body(full(""))
                .expect("request"),
        )
        .await,
    )
    .await;
    assert!(
        metrics.contains("ferry_request_errors_total 3\n"),
        "{metrics}"
    );
    stop_all(client, origin, relay).await;
}

#[tokio::test]
async fn the_api_routes_answer_405_with_allow_and_errors_in_one_json_shape() {
    let relay = TestRelay::open().await;
    let api = relay.addr.to_string();
    for route in ferry_relay::api::ROUTES {
        assert!(
            !route.methods.contains(&"PATCH"),
            "PATCH is what no route answers"
        );
        let request = Request::builder()
            .method("PATCH")
            .uri(route.path)
            .body(full(""))
            .expect("request");
        let response = send(relay.addr, &api, request).await;
        let allow = response
            .headers()
            .get("allow")
            .map(|v| v.to_str().unwrap_or("").to_owned());
        assert_eq!(
            allow.as_deref(),
            Some(route.methods.join(", ").as_str()),
            "{}",
            route.path
        );
        assert!(
            response.headers().contains_key("content-length"),
            "answers of known length say so"
        );
        let (status, body) = status_and_body(response).await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED, "{}", route.path);
        let error: ferry_common::api::ErrorBody =
            serde_json::from_str(&body).expect("the error is JSON");
        assert_eq!(error.error.code, "method_not_allowed");
    }
    let (status, body) = status_and_body(
        send(
            relay.addr,
            &api,
            Request::builder()
                .uri("/api/v1/nothing")
                .body(full(""))
                .expect("request"),
        )
        .await,
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(body.contains("\"code\":\"not_found\""), "{body}");
    relay.stop().await;
}

/// Sends a response to `/short` at once, and to anything else a body that
/// never ends; reports on the channel when such a body is dropped (its
/// exchange was given up).
async fn endless_origin() -> (Origin, mpsc::UnboundedReceiver<()>) {
    struct Abandoned(mpsc::UnboundedSender<()>);
    impl Drop for Abandoned {
        fn drop(&mut self) {
            let _ = self.0.send(());
        }
    }
    let (tx, rx) = mpsc::unbounded_channel();
    let origin = Origin::start(move |req: Request<hyper::body::Incoming>| {
        let tx = tx.clone();
        async move {
            if req.uri().path() == "/short" {
                return Response::new(full("short"));
            }
            let guard = Abandoned(tx);
            let chunks = futures_util::stream::iter(0u64..).map(move |i| {
                let _held = &guard;
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(hyper::body::Frame::data(
                    Bytes::from(format!("data: {i}\n\n")),
                ))
            });
            Response::new(http_body_util::StreamBody::new(chunks).boxed_unsync())
        }
    })
    .await;
    (origin, rx)
}

/// Asks for `url` `count` times over one HTTP/2 connection from the
/// attacker's address that grants no flow-control credit at all, and
/// returns the responses, whose bodies can never arrive.
async fn stalled_responses(
    relay: &TestRelay,
    url: &str,
    count: usize,
) -> Vec<Response<hyper::body::Incoming>> {
    let stream = connect_from(ATTACKER, relay.addr).await;
    let (mut sender, connection) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .initial_stream_window_size(0)
            .initial_connection_window_size(65_535)
            .handshake::<_, Body>(hyper_util::rt::TokioIo::new(stream))
            .await
            .expect("h2 handshake");
    tokio::spawn(connection);
    let mut responses = Vec::new();
    for _ in 0..count {
        let request = Request::builder().uri(url).body(full("")).expect("request");
        responses.push(
            within("a stalled response's headers", sender.send_request(request))
                .await
                .expect("response"),
        );
    }
    responses
}

#[tokio::test]
async fn callers_that_stop_reading_lose_their_slots_and_stall_no_one_else() {
    // Long enough for the four requests to be sent before the first stall
    // closes the caller's connection, even on a loaded machine.
    let config = ferry_relay::Config {
        max_requests_per_tunnel: 4,
        write_timeout: Duration::from_secs(2),
        ..ferry_relay::Config::default()
    };
    let relay = TestRelay::start(config).await;
    // Small chunks without end, as a server-sent-events stream sends.
    let (origin, mut abandoned) = endless_origin().await;
    let mut client = TestClient::start(&relay, &origin.target(), ClientOptions::default()).await;
    let host = host_of(&client.public_url);

    // An HTTP/2 caller that grants no flow-control credit at all.
    let stalled = stalled_responses(&relay, &format!("http://{host}/events"), 4).await;
    for response in &stalled {
        assert_eq!(response.status(), StatusCode::OK);
    }
    // The relay resets each stalled exchange, which frees its slot.
    for response in stalled {
        let mut body = response.into_body();
        let end = within("the stalled exchange to be reset", async {
            loop {
                match body.frame().await {
                    Some(Ok(_)) => continue,
                    other => return other.map(|frame| frame.is_ok()),
                }
            }
        })
        .await;
        assert_eq!(end, Some(false), "the stream ends with an error");
    }
    for _ in 0..4 {
        within(
            "each exchange to be given up at the origin",
            abandoned.recv(),
        )
        .await;
    }
    let response = send(
        relay.addr,
        &host,
        Request::builder()
            .uri("/short")
            .body(full(""))
            .expect("request"),
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(read_body(response.into_body()).await, b"short");
    assert_still_connected(&mut client);
    stop_all(client, origin, relay).await;
}

#[tokio::test]
async fn an_http1_caller_that_stops_reading_loses_its_connection() {
    let config = ferry_relay::Config {
        max_requests_per_tunnel: 1,
        write_timeout: Duration::from_millis(300),
        ..ferry_relay::Config::default()
    };
    let relay = TestRelay::start(config).await;
    let (origin, mut abandoned) = endless_origin().await;
    let mut client = TestClient::start(&relay, &origin.target(), ClientOptions::default()).await;
    let host = host_of(&client.public_url);
    let mut reader = connect_from(ATTACKER, relay.addr).await;
    reader
        .write_all(format!("GET /big HTTP/1.1\r\nhost: {host}\r\n\r\n").as_bytes())
        .await
        .expect("write");
    // It never reads. The relay gives up on it, which resets the exchange
    // back to the origin, and its one slot is free again.
    within(
        "the stalled exchange to reach back to the origin",
        abandoned.recv(),
    )
    .await;
    let response = send(
        relay.addr,
        &host,
        Request::builder()
            .uri("/short")
            .body(full(""))
            .expect("request"),
    )
    .await;
    let (status, body) = status_and_body(response).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "short"));
    drop(reader);
    assert_still_connected(&mut client);
    stop_all(client, origin, relay).await;
}

#[tokio::test]
async fn one_callers_stalled_responses_cannot_stall_other_callers_on_the_tunnel() {
    // Only the window's size can keep the victim flowing here: the write
    // timeout is far beyond the test's patience.
    let config = ferry_relay::Config {
        write_timeout: Duration::from_secs(3600),
        ..ferry_relay::Config::default()
    };
    let share = config.max_requests_per_ip;
    let relay = TestRelay::start(config).await;
    // `/big` streams 64 KiB chunks without end and reports once it has
    // produced more than a stream window (so the tunnel holds a full one).
    let (produced_tx, mut produced) = mpsc::unbounded_channel();
    let origin = Origin::start(move |req: Request<hyper::body::Incoming>| {
        let produced_tx = produced_tx.clone();
        async move {
            if req.uri().path() != "/big" {
                return Response::new(full("short"));
            }
            let enough = ferry_common::handshake::STREAM_WINDOW as usize * 5 / 4;
            let chunks = futures_util::stream::iter(0usize..).map(move |i| {
                if (i + 1) * 65_536 >= enough && i * 65_536 < enough {
                    let _ = produced_tx.send(());
                }
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(hyper::body::Frame::data(
                    Bytes::from(vec![b'x'; 65_536]),
                ))
            });
            Response::new(http_body_util::StreamBody::new(chunks).boxed_unsync())
        }
    })
    .await;
    let mut client = TestClient::start(&relay, &origin.target(), ClientOptions::default()).await;
    let host = host_of(&client.public_url);

    let stalled = stalled_responses(&relay, &format!("http://{host}/big"), share).await;
    for _ in 0..share {
        within("each stalled stream to fill its window", produced.recv()).await;
    }
    let (status, body) = get(&relay, &host).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "short"));
    drop(stalled);
    assert_still_connected(&mut client);
    stop_all(client, origin, relay).await;
}
