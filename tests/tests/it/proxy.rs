//! Trusted proxies: a load balancer's PROXY protocol header (v1 or v2) or
//! an HTTP proxy's `X-Forwarded-For` names the caller, for the origin, the
//! activity log and the per-address limits; from anyone else, a PROXY
//! header is a bad request and forwarding headers are not believed.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use ferry_relay::proxy::ProxyProtocol;
use ferry_relay::Config;
use ferry_tests::{
    connect_from, full, host_of, within, Api, ClientOptions, Origin, TestClient, TestRelay,
};
use hyper::{Request, Response};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Notify};

/// A PROXY v2 header for a TCP/IPv4 caller 203.0.113.10:5555 reaching
/// 192.0.2.1:80.
const V2_HEADER: &[u8] =
    b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c\xcb\x00\x71\x0a\xc0\x00\x02\x01\x15\xb3\x00\x50";

fn trusting(networks: &[&str]) -> Config {
    Config {
        trusted_proxies: networks
            .iter()
            .map(|net| net.parse().expect("network"))
            .collect(),
        ..Config::default()
    }
}

/// An origin that answers with the `x-forwarded-for` it got, and reports
/// each request's path on a channel; `/hold` answers once `release` is
/// notified.
async fn echo_origin() -> (Origin, mpsc::UnboundedReceiver<String>, Arc<Notify>) {
    let (paths, received) = mpsc::unbounded_channel();
    let release = Arc::new(Notify::new());
    let origin_release = Arc::clone(&release);
    let origin = Origin::start(move |req: Request<hyper::body::Incoming>| {
        let (paths, release) = (paths.clone(), Arc::clone(&origin_release));
        async move {
            let released = release.notified();
            let _ = paths.send(req.uri().path().to_owned());
            if req.uri().path() == "/hold" {
                released.await;
            }
            let seen = req
                .headers()
                .get("x-forwarded-for")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("none")
                .to_owned();
            Response::new(full(seen))
        }
    })
    .await;
    (origin, received, release)
}

/// Writes `preface` and a GET of `path` with `extra` header lines on
/// `stream`, and reads the whole answer: its status and body.
async fn get_on(
    mut stream: TcpStream,
    preface: &[u8],
    host: &str,
    path: &str,
    extra: &str,
) -> (u16, String) {
    let mut request = preface.to_vec();
    request.extend_from_slice(
        format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}Connection: close\r\n\r\n")
            .as_bytes(),
    );
    stream.write_all(&request).await.expect("request written");
    let mut answer = Vec::new();
    within("the answer", stream.read_to_end(&mut answer))
        .await
        .expect("answer read");
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let status = answer
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no status in {answer:?}"));
    let body = answer
        .split_once("\r\n\r\n")
        .map_or("", |(_, body)| body)
        .to_owned();
    (status, body)
}

async fn connect(relay: &TestRelay) -> TcpStream {
    TcpStream::connect(relay.addr).await.expect("relay accepts")
}

/// The newest activity log entry's caller address.
async fn logged_caller(tail: &mut ferry_tests::Tail, api: &Api) -> String {
    let (id, _) = tail.next_item().await;
    let detail = api.get_json(&format!("/api/v1/requests/{id}")).await;
    detail["remote_addr"]
        .as_str()
        .unwrap_or_else(|| panic!("no remote_addr in {detail}"))
        .to_owned()
}

#[tokio::test]
async fn a_trusted_proxys_v1_and_v2_headers_name_the_caller_to_the_origin_and_the_log() {
    let relay = TestRelay::start(trusting(&["127.0.0.1/32"])).await;
    let (origin, _paths, _release) = echo_origin().await;
    let client = TestClient::start(&relay, &origin.target(), ClientOptions::default()).await;
    let host = host_of(&client.public_url);
    let api = Api::of(&relay);
    let mut tail = api.tail("").await;

    let v1 = b"PROXY TCP4 203.0.113.9 192.0.2.1 5555 80\r\n";
    let (status, seen) = get_on(connect(&relay).await, v1, &host, "/", "").await;
    assert_eq!((status, seen.as_str()), (200, "203.0.113.9"));
    assert_eq!(logged_caller(&mut tail, &api).await, "203.0.113.9:5555");

    let (status, seen) = get_on(connect(&relay).await, V2_HEADER, &host, "/", "").await;
    assert_eq!((status, seen.as_str()), (200, "203.0.113.10"));
    assert_eq!(logged_caller(&mut tail, &api).await, "203.0.113.10:5555");

    // A client's own X-Forwarded-For behind the load balancer is not
    // believed: the PROXY header already named the caller.
    let (status, seen) = get_on(
        connect(&relay).await,
        v1,
        &host,
        "/",
        "X-Forwarded-For: 198.51.100.66\r\n",
    )
    .await;
    assert_eq!((status, seen.as_str()), (200, "203.0.113.9"));

    client.stop().await.expect("client stops");
    origin.stop().await;
    relay.stop().await;
}

#[tokio::test]
async fn per_address_limits_count_the_caller_a_proxy_header_names_not_the_proxy() {
    let relay = TestRelay::start(Config {
        max_requests_per_ip: 1,
        ..trusting(&["127.0.0.1/32"])
    })
    .await;
    let (origin, mut paths, release) = echo_origin().await;
    let client = TestClient::start(&relay, &origin.target(), ClientOptions::default()).await;
    let host = host_of(&client.public_url);
    let v1 = |caller: &str| format!("PROXY TCP4 {caller} 192.0.2.1 5555 80\r\n").into_bytes();

    let (stream, held_host, held_v1) = (connect(&relay).await, host.clone(), v1("203.0.113.9"));
    let held = tokio::spawn(async move { get_on(stream, &held_v1, &held_host, "/hold", "").await });
    assert_eq!(
        within("the held request", paths.recv()).await.as_deref(),
        Some("/hold")
    );

    let (status, body) = get_on(connect(&relay).await, &v1("203.0.113.9"), &host, "/", "").await;
    assert_eq!(status, 429, "the same caller is at its limit: {body}");
    let (status, seen) = get_on(connect(&relay).await, &v1("203.0.113.10"), &host, "/", "").await;
    assert_eq!(
        (status, seen.as_str()),
        (200, "203.0.113.10"),
        "another caller behind the same proxy is not"
    );

    release.notify_waiters();
    let (status, _) = within("the held answer", held).await.expect("held task");
    assert_eq!(status, 200);
    client.stop().await.expect("client stops");
    origin.stop().await;
    relay.stop().await;
}

#[tokio::test]
async fn an_untrusted_peers_proxy_header_is_a_bad_request_that_reaches_no_one() {
    let relay = TestRelay::start(trusting(&["127.0.0.2/32"])).await;
    let (origin, mut paths, _release) = echo_origin().await;
    let client = TestClient::start(&relay, &origin.target(), ClientOptions::default()).await;
    let host = host_of(&client.public_url);

    let v1 = b"PROXY TCP4 203.0.113.9 192.0.2.1 5555 80\r\n";
    for header in [&v1[..], V2_HEADER] {
        let (status, _) = get_on(connect(&relay).await, header, &host, "/spoofed", "").await;
        assert_eq!(status, 400);
    }
    let (status, seen) = get_on(connect(&relay).await, b"", &host, "/", "").await;
    assert_eq!((status, seen.as_str()), (200, "127.0.0.1"));
    assert_eq!(
        within("the origin", paths.recv()).await.as_deref(),
        Some("/"),
        "the spoofed requests never reached the origin"
    );
    client.stop().await.expect("client stops");
    origin.stop().await;
    relay.stop().await;
}

#[tokio::test]
async fn a_trusted_http_proxys_forwarded_for_names_the_caller_and_no_one_elses_does() {
    let relay = TestRelay::start(trusting(&["127.0.0.1/32", "10.0.0.0/8"])).await;
    let (origin, _paths, _release) = echo_origin().await;
    let client = TestClient::start(&relay, &origin.target(), ClientOptions::default()).await;
    let host = host_of(&client.public_url);
    let api = Api::of(&relay);
    let mut tail = api.tail("").await;

    // A chain a caller began with a forged hop, through an inner proxy
    // (10.1.2.3) to the one at the relay: the rightmost untrusted hop is
    // the caller, and the forged part never reaches the origin.
    let chain = "X-Forwarded-For: 198.51.100.1, 203.0.113.9\r\nX-Forwarded-For: 10.1.2.3\r\nX-Real-IP: 198.51.100.1\r\nX-Forwarded-Proto: https\r\n";
    let (status, seen) = get_on(connect(&relay).await, b"", &host, "/", chain).await;
    assert_eq!((status, seen.as_str()), (200, "203.0.113.9"));
    let (id, _) = tail.next_item().await;
    let detail = api.get_json(&format!("/api/v1/requests/{id}")).await;
    assert_eq!(detail["remote_addr"], "203.0.113.9:0", "{detail}");
    assert!(
        detail["request"]["url"]
            .as_str()
            .is_some_and(|url| url.starts_with("https://")),
        "the proxy ended TLS for an https caller: {detail}"
    );

    // The same headers from a peer that is not a trusted proxy.
    let stranger = Ipv4Addr::new(127, 0, 0, 2);
    let (status, seen) = get_on(
        connect_from(stranger, relay.addr).await,
        b"",
        &host,
        "/",
        chain,
    )
    .await;
    assert_eq!((status, seen.as_str()), (200, "127.0.0.2"));
    let (id, _) = tail.next_item().await;
    let detail = api.get_json(&format!("/api/v1/requests/{id}")).await;
    let logged: SocketAddr = detail["remote_addr"]
        .as_str()
        .and_then(|a| a.parse().ok())
        .expect("an address");
    assert_eq!(logged.ip(), stranger);
    assert!(
        detail["request"]["url"]
            .as_str()
            .is_some_and(|url| url.starts_with("http://")),
        "a stranger's X-Forwarded-Proto is not believed: {detail}"
    );

    client.stop().await.expect("client stops");
    origin.stop().await;
    relay.stop().await;
}

#[tokio::test]
async fn a_callers_own_junk_forwarded_for_hop_does_not_make_it_the_proxy() {
    let relay = TestRelay::start(Config {
        max_requests_per_ip: 1,
        ..trusting(&["127.0.0.1/32"])
    })
    .await;
    let (origin, mut paths, release) = echo_origin().await;
    let client = TestClient::start(&relay, &origin.target(), ClientOptions::default()).await;
    let host = host_of(&client.public_url);
    let api = Api::of(&relay);
    let mut tail = api.tail("").await;

    // The caller sent `X-Forwarded-For: junk`; its proxy appended the
    // caller's real address (with a port, as some proxies do).
    let forged = "X-Forwarded-For: junk, 203.0.113.9:4444\r\n";
    let (stream, held_host) = (connect(&relay).await, host.clone());
    let held = tokio::spawn(async move { get_on(stream, b"", &held_host, "/hold", forged).await });
    assert_eq!(
        within("the held request", paths.recv()).await.as_deref(),
        Some("/hold")
    );

    // Had the junk made the caller count as the proxy, this other caller
    // behind it would share its one request in flight.
    let other = "X-Forwarded-For: [2001:db8::7]:80\r\n";
    let (status, seen) = get_on(connect(&relay).await, b"", &host, "/", other).await;
    assert_eq!((status, seen.as_str()), (200, "2001:db8::7"));
    assert_eq!(logged_caller(&mut tail, &api).await, "[2001:db8::7]:0");
    release.notify_waiters();
    let (status, seen) = within("the held answer", held).await.expect("held task");
    assert_eq!((status, seen.as_str()), (200, "203.0.113.9"));
    assert_eq!(logged_caller(&mut tail, &api).await, "203.0.113.9:0");

    client.stop().await.expect("client stops");
    origin.stop().await;
    relay.stop().await;
}

#[tokio::test]
async fn the_connection_cap_per_address_counts_the_caller_a_proxy_header_names() {
    let relay = TestRelay::start(Config {
        max_connections_per_ip: 1,
        ..trusting(&["127.0.0.1/32"])
    })
    .await;
    let (origin, _paths, _release) = echo_origin().await;
    let client = TestClient::start(&relay, &origin.target(), ClientOptions::default()).await;
    let host = host_of(&client.public_url);
    let v1 = |caller: &str| format!("PROXY TCP4 {caller} 192.0.2.1 5555 80\r\n").into_bytes();

    // One connection of 203.0.113.9 stays open after its answer, so the
    // relay has surely counted it.
    let mut open = connect(&relay).await;
    let mut request = v1("203.0.113.9");
    request.extend_from_slice(format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes());
    open.write_all(&request).await.expect("request written");
    let mut answer = Vec::new();
    within("the kept-alive answer", async {
        while !String::from_utf8_lossy(&answer).ends_with("203.0.113.9") {
            let mut buf = [0u8; 1024];
            let n = open.read(&mut buf).await.expect("answer read");
            assert!(n > 0, "the relay closed the first connection");
            answer.extend_from_slice(&buf[..n]);
        }
    })
    .await;

    let mut second = connect(&relay).await;
    let mut request = v1("203.0.113.9");
    request.extend_from_slice(format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes());
    // The relay may close before or after reading it all.
    let _ = second.write_all(&request).await;
    let mut rest = Vec::new();
    let _ = within(
        "the second connection to close",
        second.read_to_end(&mut rest),
    )
    .await;
    assert!(
        rest.is_empty(),
        "the caller's second connection was served: {rest:?}"
    );

    let (status, seen) = get_on(connect(&relay).await, &v1("203.0.113.10"), &host, "/", "").await;
    assert_eq!((status, seen.as_str()), (200, "203.0.113.10"));
    drop(open);
    client.stop().await.expect("client stops");
    origin.stop().await;
    relay.stop().await;
}

#[tokio::test]
async fn with_the_proxy_protocol_required_a_trusted_peers_connection_without_a_header_is_refused() {
    let relay = TestRelay::start(Config {
        proxy_protocol: ProxyProtocol::Required,
        ..trusting(&["127.0.0.2/32"])
    })
    .await;
    let (origin, mut paths, _release) = echo_origin().await;
    let client = TestClient::start(&relay, &origin.target(), ClientOptions::default()).await;
    let host = host_of(&client.public_url);
    let balancer = Ipv4Addr::new(127, 0, 0, 2);

    // Were the balancer to stop sending its header, a caller's own
    // X-Forwarded-For (or PROXY line) would pass as the balancer's: such a
    // connection is refused. Behind the balancer's header, the caller's
    // PROXY line is a bad request.
    let lb_then_caller = [
        &b"PROXY TCP4 203.0.113.9 192.0.2.1 5555 80\r\n"[..],
        b"PROXY TCP4 198.51.100.66 192.0.2.1 5555 80\r\n",
    ]
    .concat();
    for forged in [&b""[..], &lb_then_caller] {
        let mut stream = connect_from(balancer, relay.addr).await;
        let mut request = forged.to_vec();
        request.extend_from_slice(
            format!("GET /forged HTTP/1.1\r\nHost: {host}\r\nX-Forwarded-For: 198.51.100.66\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        );
        // The relay may close before or after reading it all.
        let _ = stream.write_all(&request).await;
        let mut answer = Vec::new();
        let _ = within(
            "the refused connection to close",
            stream.read_to_end(&mut answer),
        )
        .await;
        let answer = String::from_utf8_lossy(&answer);
        assert!(
            answer.is_empty() || answer.starts_with("HTTP/1.1 400"),
            "a forged caller was served: {answer}"
        );
    }

    let v1 = b"PROXY TCP4 203.0.113.9 192.0.2.1 5555 80\r\n";
    let stream = connect_from(balancer, relay.addr).await;
    let (status, seen) = get_on(stream, v1, &host, "/", "").await;
    assert_eq!((status, seen.as_str()), (200, "203.0.113.9"));
    assert_eq!(
        within("the origin", paths.recv()).await.as_deref(),
        Some("/"),
        "the forged requests never reached the origin"
    );
    client.stop().await.expect("client stops");
    origin.stop().await;
    relay.stop().await;
}
