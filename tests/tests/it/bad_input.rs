//! Bad input gets a clear error, never a panic, and other tunnels carry on.

use ferry_tests::{
    full, host_of, read_body, send, stop_all, within, ClientOptions, Origin, TestClient, TestRelay,
};
use hyper::{Method, Request, Response, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Writes `bytes` to the relay on a fresh connection and returns all it
/// answers before closing.
async fn raw(relay: &TestRelay, bytes: &[u8]) -> String {
    let mut stream = TcpStream::connect(relay.addr).await.expect("relay accepts");
    stream.write_all(bytes).await.expect("write");
    let mut answer = Vec::new();
    // The relay may close while we still write; what it said is what counts.
    let _ = within(
        "the relay to answer and close",
        stream.read_to_end(&mut answer),
    )
    .await;
    String::from_utf8_lossy(&answer).into_owned()
}

async fn status_and_body(
    relay: &TestRelay,
    host: &str,
    request: Request<ferry_tests::Body>,
) -> (StatusCode, String) {
    let response = send(relay.addr, host, request).await;
    let status = response.status();
    (
        status,
        String::from_utf8_lossy(&read_body(response.into_body()).await).into_owned(),
    )
}

#[tokio::test]
async fn garbage_and_malformed_requests_get_clear_errors_and_tunnels_carry_on() {
    let relay = TestRelay::open().await;
    let origin = Origin::start(|_req| async { Response::new(full("still here")) }).await;
    let client = TestClient::start(&relay, &origin.target(), ClientOptions::default()).await;
    let relay_host = relay.addr.to_string();
    let port = relay.addr.port();

    // TLS-looking bytes on the plain port are no HTTP/1.1 request: hyper
    // answers 400 with no body and closes.
    let answer = raw(&relay, b"\x16\x03\x01\x02\x00garbage\r\n\r\n").await;
    let (head, body) = answer.split_once("\r\n\r\n").expect("a whole response");
    assert!(
        head.starts_with("HTTP/1.1 400 Bad Request\r\n"),
        "{answer:?}"
    );
    assert!(head.contains("\r\nconnection: close"), "{answer:?}");
    assert_eq!(body, "", "{answer:?}");
    // An HTTP/1.0 request is answered in HTTP/1.0.
    let answer = raw(&relay, b"GET / HTTP/1.0\r\n\r\n").await;
    assert!(
        answer.starts_with("HTTP/1.0 400 Bad Request\r\n"),
        "{answer:?}"
    );
    assert!(answer.contains("Host header"), "{answer}");

    let nowhere = Request::builder()
        .uri("/nothing-here")
        .body(full(""))
        .expect("request");
    let (status, body) = status_and_body(&relay, &relay_host, nowhere).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    // Not a WebSocket, on the connect path: a GET is told what the path
    // is for, and other methods that only GET is allowed.
    for (method, status, says) in [
        (Method::GET, StatusCode::BAD_REQUEST, "ferry http"),
        (Method::POST, StatusCode::METHOD_NOT_ALLOWED, "answers GET"),
    ] {
        let request = Request::builder()
            .method(method)
            .uri("/api/v1/tunnels/connect")
            .body(full("{\"hello\":1}"))
            .expect("valid request");
        let (got, body) = status_and_body(&relay, &relay_host, request).await;
        assert_eq!(got, status, "{body}");
        assert!(body.contains(says), "{body}");
    }
    // A WebSocket upgrade that is not Ferry's.
    let request = Request::builder()
        .uri("/api/v1/tunnels/connect")
        .header("upgrade", "websocket")
        .header("connection", "upgrade")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .header("sec-websocket-version", "13")
        .body(full(""))
        .expect("valid request");
    let (status, body) = status_and_body(&relay, &relay_host, request).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body.contains("ferry-protocol-version"), "{body}");

    // Hosts the relay does not serve.
    for (host, status, says) in [
        (
            "example.org".to_owned(),
            StatusCode::NOT_FOUND,
            "not `example.org`",
        ),
        (
            format!("a.b.localhost:{port}"),
            StatusCode::NOT_FOUND,
            "not `a.b.localhost`",
        ),
        (
            format!("-x-.localhost:{port}"),
            StatusCode::NOT_FOUND,
            "not a valid tunnel name",
        ),
        (
            "localhost:http".to_owned(),
            StatusCode::BAD_REQUEST,
            "Host header",
        ),
    ] {
        let (got, body) = status_and_body(&relay, &host, Request::new(full(""))).await;
        assert_eq!(got, status, "{host}: {body}");
        assert!(body.contains(says), "{host}: {body}");
    }
    // Upgrades other than WebSocket cannot pass.
    let request = Request::builder()
        .header("upgrade", "h2c")
        .header("connection", "upgrade")
        .body(full(""))
        .expect("valid request");
    let (status, body) = status_and_body(&relay, &host_of(&client.public_url), request).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");

    // Through all of that, the tunnel kept working.
    let (status, body) =
        status_and_body(&relay, &host_of(&client.public_url), Request::new(full(""))).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "still here"));

    stop_all(client, origin, relay).await;
}

#[tokio::test]
async fn nothing_listening_on_the_target_gives_502_saying_so() {
    let relay = TestRelay::open().await;
    // A port that was free a moment ago and now has no listener.
    let unused = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr");
    let target = format!("http://{unused}");
    let client = TestClient::start(&relay, &target, ClientOptions::default()).await;
    let (status, body) =
        status_and_body(&relay, &host_of(&client.public_url), Request::new(full(""))).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert!(
        body.contains("the tunnel is up but nothing answers on"),
        "{body}"
    );
    assert!(body.contains(&target), "{body}");
    client.stop().await.expect("client stops cleanly");
    relay.stop().await;
}

/// A local server written by hand on a free port: it reads each
/// connection's request head and writes `answer`, or with `None` closes
/// each connection as soon as it is accepted. Stops when dropped.
struct RawOrigin {
    target: String,
    task: tokio::task::JoinHandle<()>,
}

impl RawOrigin {
    async fn start(answer: Option<&'static [u8]>) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("origin binds");
        let target = format!("http://{}", listener.local_addr().expect("addr"));
        let task = tokio::spawn(async move {
            // One connection at a time: nothing outlives the task.
            while let Ok((mut stream, _)) = listener.accept().await {
                let Some(answer) = answer else { continue };
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = stream.write_all(answer).await;
            }
        });
        Self { target, task }
    }
}

impl Drop for RawOrigin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What a caller gets through a tunnel to `origin`.
async fn answer_through(origin: &RawOrigin) -> (StatusCode, String) {
    let relay = TestRelay::open().await;
    let client = TestClient::start(&relay, &origin.target, ClientOptions::default()).await;
    let answer =
        status_and_body(&relay, &host_of(&client.public_url), Request::new(full(""))).await;
    client.stop().await.expect("client stops cleanly");
    relay.stop().await;
    answer
}

#[tokio::test]
async fn a_target_that_closes_without_answering_gives_502_saying_so() {
    let origin = RawOrigin::start(None).await;
    let (status, body) = answer_through(&origin).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    assert!(
        body.contains(&format!(
            "the local server at {} closed the connection before answering",
            origin.target
        )),
        "{body}"
    );
}

#[tokio::test]
async fn a_target_answering_garbage_gives_502_saying_so() {
    let origin = RawOrigin::start(Some(b"HELLO\r\n\r\n")).await;
    let (status, body) = answer_through(&origin).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    assert!(
        body.contains(&format!(
            "the local server at {} sent a response that is not valid HTTP/1.1 (invalid HTTP version parsed)",
            origin.target
        )),
        "{body}"
    );
}

/// What a caller gets from a tunnel whose origin never answers.
async fn answer_of_a_silent_origin(
    relay: ferry_relay::Config,
    client: ClientOptions,
) -> (StatusCode, String) {
    let relay = TestRelay::start(relay).await;
    let origin = Origin::start(|_req| std::future::pending()).await;
    let client = TestClient::start(&relay, &origin.target(), client).await;
    let answer =
        status_and_body(&relay, &host_of(&client.public_url), Request::new(full(""))).await;
    stop_all(client, origin, relay).await;
    answer
}

#[tokio::test]
async fn a_target_slower_than_the_local_timeout_gives_504() {
    let options = ClientOptions {
        local_timeout: Some(std::time::Duration::from_millis(200)),
        ..ClientOptions::default()
    };
    let (status, body) = answer_of_a_silent_origin(ferry_relay::Config::default(), options).await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
    assert!(
        body.contains("ferry: http://127.0.0.1:"),
        "the client answers: {body}"
    );
    assert!(body.contains("did not answer within 0.2 s"), "{body}");
}

#[tokio::test]
async fn a_tunnel_that_does_not_answer_in_time_gives_504_from_the_relay() {
    let config = ferry_relay::Config {
        request_timeout: std::time::Duration::from_millis(200),
        ..ferry_relay::Config::default()
    };
    let (status, body) = answer_of_a_silent_origin(config, ClientOptions::default()).await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
    assert!(body.contains("the tunnel `"), "the relay answers: {body}");
    assert!(body.contains("did not answer within"), "{body}");
}

#[tokio::test]
async fn requests_beyond_the_per_tunnel_limit_get_503_and_the_rest_carry_on() {
    let config = ferry_relay::Config {
        max_requests_per_tunnel: 2,
        ..ferry_relay::Config::default()
    };
    let relay = TestRelay::start(config).await;
    let (started_tx, mut started) = tokio::sync::mpsc::unbounded_channel();
    let release = std::sync::Arc::new(tokio::sync::Notify::new());
    let origin_release = std::sync::Arc::clone(&release);
    let origin = Origin::start(move |_req| {
        let (started_tx, release) = (started_tx.clone(), std::sync::Arc::clone(&origin_release));
        async move {
            let released = release.notified();
            let _ = started_tx.send(());
            released.await;
            Response::new(full("done"))
        }
    })
    .await;
    let client = TestClient::start(&relay, &origin.target(), ClientOptions::default()).await;
    let host = host_of(&client.public_url);

    let held: Vec<_> = (0..2)
        .map(|_| {
            let (addr, host) = (relay.addr, host.clone());
            tokio::spawn(async move { send(addr, &host, Request::new(full(""))).await })
        })
        .collect();
    for _ in 0..2 {
        within("a request to reach the origin", started.recv())
            .await
            .expect("started");
    }
    let (status, body) = status_and_body(&relay, &host, Request::new(full(""))).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(body.contains("2 requests in flight"), "{body}");

    release.notify_waiters();
    for request in held {
        let response = within("a held request", request)
            .await
            .expect("request task");
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(read_body(response.into_body()).await, b"done");
    }
    stop_all(client, origin, relay).await;
}
