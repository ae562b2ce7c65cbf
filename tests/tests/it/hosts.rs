//! Host handling as one table: case, trailing dots, ports, punycode,
//! duplicate Host headers, absolute-form targets and HTTP/2's `:authority`
//! against `Host`. Each row reaches the tunnel it names or gets the status
//! it names, never another user's tunnel. Also: the `X-Forwarded-*` headers
//! an origin sees are the relay's, not the caller's.

use bytes::Bytes;
use ferry_tests::{empty, full, within, Api, ClientOptions, Origin, TestClient, TestRelay};
use http_body_util::BodyExt;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Where a row's request must end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reaches {
    /// Alice's tunnel, `alice-app`.
    Alice,
    /// Bob's tunnel, `bob-app`.
    Bob,
    /// The relay's own host (the dashboard and API), no tunnel.
    Relay,
    /// No tunnel: the relay answers this status, with a message holding
    /// the text.
    Refused(u16, &'static str),
}

/// What the caller got: the status and the body.
struct Answer {
    status: u16,
    body: String,
}

impl Answer {
    /// Which tunnel's origin answered, by the marker each origin puts in
    /// its body.
    fn tunnel(&self) -> Option<Reaches> {
        match (
            self.body.contains("origin:alice"),
            self.body.contains("origin:bob"),
        ) {
            (true, false) => Some(Reaches::Alice),
            (false, true) => Some(Reaches::Bob),
            (false, false) => None,
            (true, true) => panic!("one answer from both origins: {}", self.body),
        }
    }

    /// Checks the answer against `expected`, for the row `what`.
    fn check(&self, what: &str, expected: Reaches) {
        let tunnel = self.tunnel();
        match expected {
            Reaches::Alice | Reaches::Bob => {
                assert_eq!(self.status, 200, "{what}: {}", self.body);
                assert_eq!(tunnel, Some(expected), "{what}: {}", self.body);
            }
            Reaches::Relay => {
                assert_eq!(tunnel, None, "{what} reached a tunnel: {}", self.body);
                assert_eq!(self.status, 200, "{what}: the relay's page");
            }
            Reaches::Refused(status, message) => {
                assert_eq!(tunnel, None, "{what} reached a tunnel: {}", self.body);
                assert_eq!(self.status, status, "{what}: {}", self.body);
                assert!(
                    self.body.contains(message),
                    "{what}: `{message}` not in {}",
                    self.body
                );
            }
        }
    }
}

/// An origin that answers `origin:{owner}` and the forwarding headers it
/// got, one a line.
async fn origin_of(owner: &'static str) -> Origin {
    Origin::start(move |req: Request<hyper::body::Incoming>| async move {
        let mut body = format!("origin:{owner}\n");
        for name in [
            "x-forwarded-for",
            "x-forwarded-host",
            "x-forwarded-proto",
            "forwarded",
            "x-real-ip",
        ] {
            for value in req.headers().get_all(name) {
                body.push_str(&format!(
                    "{name}: {}\n",
                    value.to_str().unwrap_or("(not text)")
                ));
            }
        }
        Response::new(full(body))
    })
    .await
}

/// Sends `head` (a request line and headers, without the blank line) as
/// raw bytes with `Connection: close` and reads the whole answer.
async fn raw(relay: std::net::SocketAddr, head: &str) -> Answer {
    let mut stream = TcpStream::connect(relay).await.expect("relay accepts");
    let request = format!("{head}\r\nConnection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .expect("request written");
    let mut bytes = Vec::new();
    within("the raw answer", stream.read_to_end(&mut bytes))
        .await
        .expect("answer read");
    let text = String::from_utf8_lossy(&bytes).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {text:?}"));
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_owned()
    };
    Answer { status, body }
}

/// The data of a chunked body.
fn dechunk(mut rest: &str) -> String {
    let mut data = String::new();
    while let Some((size, after)) = rest.split_once("\r\n") {
        let size = usize::from_str_radix(size.trim(), 16).expect("a chunk size");
        if size == 0 {
            break;
        }
        data.push_str(&after[..size]);
        rest = &after[size + 2..];
    }
    data
}

/// Sends a GET over HTTP/2 with prior knowledge (h2c) with `:authority`
/// from `uri` and, when given, a `host` header.
async fn h2(relay: std::net::SocketAddr, uri: &str, host: Option<&str>) -> Answer {
    let stream = TcpStream::connect(relay).await.expect("relay accepts");
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("h2c handshake");
    tokio::spawn(connection);
    let mut request = Request::builder()
        .uri(uri)
        .body(empty())
        .expect("valid request");
    if let Some(host) = host {
        request
            .headers_mut()
            .insert(hyper::header::HOST, host.parse().expect("valid host"));
    }
    let response = within("an h2 answer", sender.send_request(request))
        .await
        .expect("h2 answer");
    let status = response.status().as_u16();
    let body: Bytes = within("an h2 body", response.into_body().collect())
        .await
        .expect("h2 body")
        .to_bytes();
    Answer {
        status,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

fn named(token: &str, subdomain: &'static str) -> ClientOptions {
    ClientOptions {
        token: Some(token.to_owned()),
        subdomain: Some(subdomain),
        ..ClientOptions::default()
    }
}

fn two_users() -> ferry_relay::Config {
    ferry_relay::Config {
        tokens: vec![
            ferry_relay::Token::new("alice"),
            ferry_relay::Token::new("bob"),
        ],
        ..ferry_relay::Config::default()
    }
}

#[tokio::test]
async fn every_host_form_reaches_the_tunnel_it_names_or_is_refused() {
    let relay = TestRelay::start(two_users()).await;
    let (alice_origin, bob_origin) = (origin_of("alice").await, origin_of("bob").await);
    let alice =
        TestClient::start(&relay, &alice_origin.target(), named("alice", "alice-app")).await;
    let bob = TestClient::start(&relay, &bob_origin.target(), named("bob", "bob-app")).await;
    let port = relay.addr.port();
    let bad_host = "missing or malformed Host header";

    use Reaches::{Alice, Bob, Refused, Relay};
    let rows: Vec<(&str, String, Reaches)> = vec![
        (
            "plain",
            format!("GET / HTTP/1.1\r\nHost: alice-app.localhost:{port}"),
            Alice,
        ),
        (
            "plain, bob",
            format!("GET / HTTP/1.1\r\nHost: bob-app.localhost:{port}"),
            Bob,
        ),
        (
            "upper case",
            format!("GET / HTTP/1.1\r\nHost: ALICE-APP.LOCALHOST:{port}"),
            Alice,
        ),
        (
            "mixed case",
            format!("GET / HTTP/1.1\r\nHost: Bob-App.LocalHost:{port}"),
            Bob,
        ),
        (
            "trailing dot",
            format!("GET / HTTP/1.1\r\nHost: alice-app.localhost.:{port}"),
            Alice,
        ),
        (
            "trailing dot, no port",
            "GET / HTTP/1.1\r\nHost: alice-app.localhost.".to_owned(),
            Alice,
        ),
        (
            "two trailing dots",
            "GET / HTTP/1.1\r\nHost: alice-app.localhost..".to_owned(),
            Refused(404, "this relay serves localhost"),
        ),
        (
            "no port",
            "GET / HTTP/1.1\r\nHost: alice-app.localhost".to_owned(),
            Alice,
        ),
        (
            "another port (the relay routes by name)",
            "GET / HTTP/1.1\r\nHost: alice-app.localhost:1".to_owned(),
            Alice,
        ),
        (
            "port 443",
            "GET / HTTP/1.1\r\nHost: bob-app.localhost:443".to_owned(),
            Bob,
        ),
        (
            "port not a number",
            "GET / HTTP/1.1\r\nHost: alice-app.localhost:http".to_owned(),
            Refused(400, bad_host),
        ),
        (
            "empty port",
            "GET / HTTP/1.1\r\nHost: alice-app.localhost:".to_owned(),
            Refused(400, bad_host),
        ),
        (
            "punycode label: a different name",
            "GET / HTTP/1.1\r\nHost: xn--alice-app-9ya.localhost".to_owned(),
            Refused(404, "no tunnel"),
        ),
        (
            "raw UTF-8 label",
            "GET / HTTP/1.1\r\nHost: älice-app.localhost".to_owned(),
            Refused(400, bad_host),
        ),
        (
            "duplicate Host, two tunnels",
            format!(
                "GET / HTTP/1.1\r\nHost: alice-app.localhost:{port}\r\nHost: bob-app.localhost:{port}"
            ),
            Refused(400, "more than one Host header"),
        ),
        (
            "duplicate Host, same tunnel",
            format!(
                "GET / HTTP/1.1\r\nHost: alice-app.localhost:{port}\r\nHost: alice-app.localhost:{port}"
            ),
            Refused(400, "more than one Host header"),
        ),
        (
            "Host as a list",
            "GET / HTTP/1.1\r\nHost: alice-app.localhost, bob-app.localhost".to_owned(),
            Refused(400, bad_host),
        ),
        (
            // RFC 9112 §3.2.2: the target's authority wins over Host.
            "absolute form naming bob, Host naming alice",
            format!(
                "GET http://bob-app.localhost:{port}/ HTTP/1.1\r\nHost: alice-app.localhost:{port}"
            ),
            Bob,
        ),
        (
            "absolute form naming alice, Host naming bob",
            format!(
                "GET http://alice-app.localhost:{port}/ HTTP/1.1\r\nHost: bob-app.localhost:{port}"
            ),
            Alice,
        ),
        (
            "absolute form with user info",
            format!(
                "GET http://bob-app.localhost@alice-app.localhost:{port}/ HTTP/1.1\r\nHost: alice-app.localhost:{port}"
            ),
            Refused(400, bad_host),
        ),
        (
            "empty Host",
            "GET / HTTP/1.1\r\nHost: ".to_owned(),
            Refused(400, bad_host),
        ),
        (
            "no Host",
            "GET / HTTP/1.1".to_owned(),
            Refused(400, bad_host),
        ),
        (
            "user info in Host",
            "GET / HTTP/1.1\r\nHost: bob-app.localhost@alice-app.localhost".to_owned(),
            Refused(400, bad_host),
        ),
        (
            "user info in Host, reversed",
            "GET / HTTP/1.1\r\nHost: alice-app.localhost@bob-app.localhost".to_owned(),
            Refused(400, bad_host),
        ),
        (
            "IPv6 literal: the relay itself",
            format!("GET / HTTP/1.1\r\nHost: [::1]:{port}"),
            Relay,
        ),
        (
            "IPv4 literal: the relay itself",
            format!("GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}"),
            Relay,
        ),
        (
            "space inside",
            "GET / HTTP/1.1\r\nHost: alice-app .localhost".to_owned(),
            Refused(400, bad_host),
        ),
        (
            "spaces around (optional whitespace)",
            "GET / HTTP/1.1\r\nHost:   bob-app.localhost   ".to_owned(),
            Bob,
        ),
        (
            "tab inside",
            "GET / HTTP/1.1\r\nHost: alice-app\t.localhost".to_owned(),
            Refused(400, bad_host),
        ),
        (
            "a deeper name",
            "GET / HTTP/1.1\r\nHost: alice-app.bob-app.localhost".to_owned(),
            Refused(404, "this relay serves localhost"),
        ),
        (
            "another domain ending in the tunnel's host",
            "GET / HTTP/1.1\r\nHost: bob-app.localhost.evil.example".to_owned(),
            Refused(404, "this relay serves localhost"),
        ),
        (
            "a name that is not a tunnel name",
            "GET / HTTP/1.1\r\nHost: alice_app.localhost".to_owned(),
            Refused(404, "not a valid tunnel name"),
        ),
    ];
    for (what, head, expected) in rows {
        raw(relay.addr, &head).await.check(what, expected);
    }

    // HTTP/2 over plain TCP (the relay's listener speaks h2c with prior
    // knowledge).
    let h2_rows: Vec<(&str, String, Option<String>, Reaches)> = vec![
        (
            "h2 :authority alone",
            format!("http://alice-app.localhost:{port}/"),
            None,
            Alice,
        ),
        (
            "h2 :authority in upper case",
            format!("http://BOB-APP.LOCALHOST:{port}/"),
            None,
            Bob,
        ),
        (
            "h2 :authority and host agree",
            format!("http://alice-app.localhost:{port}/"),
            Some(format!("alice-app.localhost:{port}")),
            Alice,
        ),
        (
            // RFC 9113 §8.3.1: a server SHOULD treat this as malformed.
            "h2 :authority naming bob, host naming alice",
            format!("http://bob-app.localhost:{port}/"),
            Some(format!("alice-app.localhost:{port}")),
            Refused(400, "disagree"),
        ),
        (
            "h2 :authority naming alice, host naming bob",
            format!("http://alice-app.localhost:{port}/"),
            Some(format!("bob-app.localhost:{port}")),
            Refused(400, "disagree"),
        ),
    ];
    for (what, uri, host, expected) in h2_rows {
        h2(relay.addr, &uri, host.as_deref())
            .await
            .check(what, expected);
    }

    alice.stop().await.expect("alice stops");
    bob.stop().await.expect("bob stops");
    alice_origin.stop().await;
    bob_origin.stop().await;
    relay.stop().await;
}

/// A public caller's `X-Forwarded-*` headers are replaced by the relay's
/// own view: the peer's address, the scheme it used and the public host.
#[tokio::test]
async fn forwarding_headers_are_the_relays_not_the_callers() {
    let relay = TestRelay::start(two_users()).await;
    let origin = origin_of("alice").await;
    let alice = TestClient::start(&relay, &origin.target(), named("alice", "alice-app")).await;
    let port = relay.addr.port();
    let answer = raw(
        relay.addr,
        &format!(
            "GET / HTTP/1.1\r\nHost: alice-app.localhost:{port}\r\n\
             X-Forwarded-For: 203.0.113.7\r\n\
             X-Forwarded-For: 198.51.100.1\r\n\
             X-Forwarded-Host: bob-app.localhost\r\n\
             X-Forwarded-Proto: https\r\n\
             Forwarded: for=203.0.113.7;host=bob-app.localhost;proto=https\r\n\
             X-Real-IP: 203.0.113.7"
        ),
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    let seen: Vec<&str> = answer.body.lines().skip(1).collect();
    assert_eq!(
        seen,
        [
            "x-forwarded-for: 127.0.0.1".to_owned(),
            format!("x-forwarded-host: alice-app.localhost:{port}"),
            "x-forwarded-proto: http".to_owned(),
        ],
        "the origin sees the relay's view, not the caller's"
    );

    alice.stop().await.expect("alice stops");
    origin.stop().await;
    relay.stop().await;
}

/// The activity log keeps a caller's forged forwarding headers as it sent
/// them, but a replay through the tunnel does not send them on: the origin
/// sees the relay's view, as it did the first time.
#[tokio::test]
async fn a_replay_does_not_send_a_callers_forged_forwarding_headers() {
    let relay = TestRelay::start(two_users()).await;
    let origin = origin_of("alice").await;
    let alice = TestClient::start(&relay, &origin.target(), named("alice", "alice-app")).await;
    let api = Api::with_token(&relay, "alice");
    let mut tail = api.tail("").await;
    let port = relay.addr.port();
    let answer = raw(
        relay.addr,
        &format!(
            "GET / HTTP/1.1\r\nHost: alice-app.localhost:{port}\r\n\
             X-Forwarded-For: 203.0.113.7\r\n\
             X-Real-IP: 203.0.113.7\r\n\
             Forwarded: for=203.0.113.7"
        ),
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    let (id, _) = tail.next_item().await;
    let detail = api.get_json(&format!("/api/v1/requests/{id}")).await;
    assert!(
        detail.to_string().contains("203.0.113.7"),
        "the log keeps what the caller sent: {detail}"
    );

    let (status, replayed) = api
        .post_json(
            &format!("/api/v1/requests/{id}/replay"),
            &serde_json::json!({}),
        )
        .await;
    assert_eq!(status, hyper::StatusCode::OK, "{replayed}");
    let replay_id = replayed["id"].as_str().expect("the replay's id");
    let detail = api.get_json(&format!("/api/v1/requests/{replay_id}")).await;
    let seen = detail["response"]["body"]["text"]
        .as_str()
        .unwrap_or_else(|| panic!("the origin's answer as text: {detail}"));
    assert_eq!(
        seen.lines().skip(1).collect::<Vec<_>>(),
        [
            "x-forwarded-for: 127.0.0.1".to_owned(),
            format!("x-forwarded-host: alice-app.localhost:{port}"),
            "x-forwarded-proto: http".to_owned(),
        ],
        "the replay carries the relay's view only"
    );

    alice.stop().await.expect("alice stops");
    origin.stop().await;
    relay.stop().await;
}
