//! Requests and responses cross the tunnel unchanged.

use std::sync::Arc;

use ferry::HostHeader;
use ferry_tests::{
    full, host_of, read_body, send, stop_all, within, ClientOptions, Origin, TestClient, TestRelay,
};
use hyper::{Method, Request, Response, StatusCode};
use tokio::sync::{mpsc, Barrier};

/// What the origin saw of one request.
#[derive(Debug)]
struct Seen {
    method: Method,
    path: String,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
}

/// An origin that reports each request and echoes its body back.
async fn echo_origin() -> (Origin, mpsc::UnboundedReceiver<Seen>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let origin = Origin::start(move |req: Request<hyper::body::Incoming>| {
        let tx = tx.clone();
        async move {
            let (parts, body) = req.into_parts();
            let body = read_body(body).await;
            let headers = parts
                .headers
                .iter()
                .map(|(name, value)| (name.as_str().to_owned(), value.as_bytes().to_vec()))
                .collect();
            let path = parts
                .uri
                .path_and_query()
                .map(|p| p.to_string())
                .unwrap_or_default();
            let _ = tx.send(Seen {
                method: parts.method,
                path,
                headers,
                body: body.clone(),
            });
            Response::builder()
                .header("set-cookie", "a=1")
                .header("x-echo", "first")
                .header("set-cookie", "b=2")
                .header("x-echo", "second")
                .body(full(body))
                .expect("valid response")
        }
    })
    .await;
    (origin, rx)
}

fn binary_body() -> Vec<u8> {
    (0..70_000u32).map(|i| (i % 256) as u8).rev().collect()
}

#[tokio::test]
async fn get_post_and_put_carry_binary_bodies_byte_exact() {
    let relay = TestRelay::open().await;
    let (origin, mut seen) = echo_origin().await;
    let client = TestClient::start(&relay, &origin.target(), ClientOptions::default()).await;
    let host = host_of(&client.public_url);

    for method in [Method::GET, Method::POST, Method::PUT] {
        let body = if method == Method::GET {
            Vec::new()
        } else {
            binary_body()
        };
        let request = Request::builder()
            .method(method.clone())
            .uri("/hooks/stripe?event=charge.succeeded&x=%20y")
            .header("content-type", "application/octet-stream")
            .body(full(body.clone()))
            .expect("valid request");
        let response = send(relay.addr, &host, request).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            read_body(response.into_body()).await,
            body,
            "{method} response body"
        );
        let got = within("the origin to see the request", seen.recv())
            .await
            .expect("origin saw it");
        assert_eq!(got.method, method);
        assert_eq!(got.path, "/hooks/stripe?event=charge.succeeded&x=%20y");
        assert_eq!(got.body, body, "{method} request body");
    }

    stop_all(client, origin, relay).await;
}

/// hyper's `HeaderMap` keeps the order of one name's values, not the order
/// across names, so that is what is promised and checked.
#[tokio::test]
async fn values_of_one_header_name_keep_their_order_and_every_name_arrives() {
    let relay = TestRelay::open().await;
    let (origin, mut seen) = echo_origin().await;
    let client = TestClient::start(&relay, &origin.target(), ClientOptions::default()).await;

    let request = Request::builder()
        .uri("/")
        .header("x-multi", "one")
        .header("x-other", "between")
        .header("x-multi", "two")
        .header("x-multi", "three, four")
        .header("ferry-client-ip", "6.6.6.6")
        .header("ferry-event-type", "forged.by.a.caller")
        .body(full(""))
        .expect("valid request");
    let response = send(relay.addr, &host_of(&client.public_url), request).await;
    let cookies: Vec<_> = response.headers().get_all("set-cookie").iter().collect();
    assert_eq!(cookies, ["a=1", "b=2"]);
    let echoes: Vec<_> = response.headers().get_all("x-echo").iter().collect();
    assert_eq!(echoes, ["first", "second"]);

    let got = within("the request", seen.recv())
        .await
        .expect("origin saw it");
    let multi: Vec<_> = got
        .headers
        .iter()
        .filter(|(name, _)| name == "x-multi")
        .map(|(_, value)| String::from_utf8_lossy(value).into_owned())
        .collect();
    assert_eq!(multi, ["one", "two", "three, four"]);
    let other: Vec<_> = got
        .headers
        .iter()
        .filter(|(name, _)| name == "x-other")
        .map(|(_, value)| value.as_slice())
        .collect();
    assert_eq!(other, [b"between"]);
    // A caller cannot forge the relay's metadata, and none of it reaches the origin.
    assert!(got
        .headers
        .iter()
        .all(|(name, _)| !name.starts_with("ferry-")));
    let header = |name: &str| {
        got.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    };
    assert_eq!(header("x-forwarded-for").as_deref(), Some("127.0.0.1"));
    assert_eq!(header("x-forwarded-proto").as_deref(), Some("http"));
    assert_eq!(
        header("x-forwarded-host"),
        Some(host_of(&client.public_url))
    );
    assert_eq!(header("host"), Some(host_of(&client.public_url)));

    stop_all(client, origin, relay).await;
}

#[tokio::test]
async fn host_header_can_be_rewritten_to_the_target() {
    let relay = TestRelay::open().await;
    let (origin, mut seen) = echo_origin().await;
    let options = ClientOptions {
        host_header: HostHeader::Rewrite,
        ..ClientOptions::default()
    };
    let client = TestClient::start(&relay, &origin.target(), options).await;
    let response = send(
        relay.addr,
        &host_of(&client.public_url),
        Request::new(full("")),
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    let got = within("the request", seen.recv())
        .await
        .expect("origin saw it");
    let host = got
        .headers
        .iter()
        .find(|(n, _)| n == "host")
        .map(|(_, v)| v.clone());
    assert_eq!(host, Some(origin.addr.to_string().into_bytes()));
    stop_all(client, origin, relay).await;
}

#[tokio::test]
async fn two_hundred_concurrent_requests_share_one_tunnel() {
    const REQUESTS: usize = 200;
    // All come from this one address, which the default share would cap.
    let relay = TestRelay::start(ferry_relay::Config {
        max_requests_per_ip: REQUESTS,
        ..ferry_relay::Config::default()
    })
    .await;
    // The origin answers nobody until all 200 are in flight at once, which
    // only a tunnel that multiplexes them can achieve.
    let barrier = Arc::new(Barrier::new(REQUESTS));
    let origin = Origin::start(move |req: Request<hyper::body::Incoming>| {
        let barrier = Arc::clone(&barrier);
        async move {
            let path = req.uri().path().to_owned();
            barrier.wait().await;
            Response::new(full(path))
        }
    })
    .await;
    let client = TestClient::start(&relay, &origin.target(), ClientOptions::default()).await;
    let host = host_of(&client.public_url);
    let requests = (0..REQUESTS).map(|i| {
        let host = host.clone();
        let relay = relay.addr;
        tokio::spawn(async move {
            let request = Request::builder()
                .uri(format!("/r/{i}"))
                .body(full(""))
                .expect("valid request");
            let response = send(relay, &host, request).await;
            assert_eq!(response.status(), StatusCode::OK);
            assert_eq!(
                read_body(response.into_body()).await,
                format!("/r/{i}").into_bytes()
            );
        })
    });
    for request in futures_util::future::join_all(requests).await {
        request.expect("request task");
    }
    stop_all(client, origin, relay).await;
}

#[tokio::test]
async fn http2_callers_are_routed_by_authority() {
    let relay = TestRelay::open().await;
    let (origin, mut seen) = echo_origin().await;
    let client = TestClient::start(&relay, &origin.target(), ClientOptions::default()).await;

    let stream = tokio::net::TcpStream::connect(relay.addr)
        .await
        .expect("relay accepts");
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .expect("h2c handshake");
    let driver = tokio::spawn(connection);
    let request = Request::builder()
        .method(Method::POST)
        .uri(format!("{}/over-h2", client.public_url))
        .body(full(binary_body()))
        .expect("valid request");
    let response = within("the h2 response", sender.send_request(request))
        .await
        .expect("response");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(read_body(response.into_body()).await, binary_body());
    let got = within("the request", seen.recv())
        .await
        .expect("origin saw it");
    assert_eq!(got.path, "/over-h2");
    drop(sender);
    let _ = driver.await;

    stop_all(client, origin, relay).await;
}
