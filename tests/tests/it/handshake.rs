//! The connect handshake: names, tokens, conflicts and protocol versions.

use ferry_common::handshake::{PROTOCOL_VERSION, SUBDOMAIN_HEADER, VERSION_HEADER};
use ferry_relay::{Config, Token};
use ferry_tests::{full, read_body, send, within, ClientOptions, Origin, TestClient, TestRelay};
use hyper::header::{HeaderValue, AUTHORIZATION};
use hyper::{Request, Response, StatusCode};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Error as WsError;

fn relay_with_tokens() -> Config {
    Config {
        tokens: vec![Token::new("team-a"), Token::new("team-b")],
        ..Config::default()
    }
}

fn with(token: &str, subdomain: &'static str) -> ClientOptions {
    ClientOptions {
        token: Some(token.to_owned()),
        subdomain: Some(subdomain),
        ..ClientOptions::default()
    }
}

async fn hello_origin() -> Origin {
    Origin::start(|_req| async { Response::new(full("hello")) }).await
}

/// Opens the connect WebSocket by hand with `headers`, returning the refusal.
async fn refused_connect(
    relay: &TestRelay,
    headers: &[(&'static str, &str)],
) -> (StatusCode, String) {
    let mut request = relay.url().into_client_request().expect("valid url");
    for (name, value) in headers {
        request
            .headers_mut()
            .insert(*name, HeaderValue::from_str(value).expect("valid header"));
    }
    match within(
        "the connect answer",
        tokio_tungstenite::connect_async(request),
    )
    .await
    {
        Err(WsError::Http(response)) => {
            let body = response
                .body()
                .as_deref()
                .map(String::from_utf8_lossy)
                .unwrap_or_default()
                .into_owned();
            (response.status(), body)
        }
        Err(other) => panic!("expected an HTTP refusal, got {other}"),
        Ok(_) => panic!("expected a refusal, the relay accepted"),
    }
}

#[tokio::test]
async fn an_unknown_tunnel_gets_404_saying_how_to_start_one() {
    let relay = TestRelay::open().await;
    let host = format!("nobody.localhost:{}", relay.addr.port());
    let response = send(relay.addr, &host, Request::new(full(""))).await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    let body = String::from_utf8(read_body(response.into_body()).await).expect("text");
    assert!(
        body.contains("no tunnel named `nobody` is connected"),
        "{body}"
    );
    assert!(body.contains("ferry http"), "{body}");
    relay.stop().await;
}

#[tokio::test]
async fn a_wrong_protocol_version_names_the_side_to_upgrade() {
    let relay = TestRelay::open().await;
    let newer = (PROTOCOL_VERSION + 1).to_string();
    let (status, body) = refused_connect(&relay, &[(VERSION_HEADER, &newer)]).await;
    assert_eq!(status, StatusCode::UPGRADE_REQUIRED);
    assert!(body.contains("upgrade the relay"), "{body}");
    let (status, body) = refused_connect(&relay, &[(VERSION_HEADER, "0")]).await;
    assert_eq!(status, StatusCode::UPGRADE_REQUIRED);
    assert!(body.contains("upgrade the ferry client"), "{body}");
    let (status, body) = refused_connect(&relay, &[]).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body.contains(VERSION_HEADER), "{body}");
    relay.stop().await;
}

#[tokio::test]
async fn invalid_subdomains_are_refused_with_the_rule() {
    let relay = TestRelay::open().await;
    let version = PROTOCOL_VERSION.to_string();
    for (name, rule) in [
        ("no_way", "a-z, 0-9"),
        ("-edge", "start or end"),
        ("www", "reserved"),
    ] {
        let (status, body) = refused_connect(
            &relay,
            &[(VERSION_HEADER, &version), (SUBDOMAIN_HEADER, name)],
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{name}");
        assert!(body.contains(rule), "{name}: {body}");
    }
    relay.stop().await;
}

#[tokio::test]
async fn a_relay_with_tokens_refuses_clients_without_a_valid_one() {
    let relay = TestRelay::start(relay_with_tokens()).await;
    let origin = hello_origin().await;
    let missing = TestClient::spawn(&relay, &origin.target(), ClientOptions::default());
    match missing.finished().await {
        Err(ferry::Error::Refused {
            status: 401,
            message,
        }) => assert!(message.contains("--token"), "{message}"),
        other => panic!("expected 401, got {other:?}"),
    }
    let wrong = TestClient::spawn(&relay, &origin.target(), with("guess", "demo"));
    assert!(matches!(
        wrong.finished().await,
        Err(ferry::Error::Refused { status: 401, .. })
    ));
    let right = TestClient::start(&relay, &origin.target(), with("team-a", "demo")).await;
    assert_eq!(right.name, "demo");

    // The API needs the token too, and shows a token only its own tunnels.
    let api = |token: Option<&str>| {
        let mut request = Request::builder().uri("/api/v1/tunnels");
        if let Some(token) = token {
            request = request.header(AUTHORIZATION, format!("Bearer {token}"));
        }
        request.body(full("")).expect("valid request")
    };
    let host = relay.addr.to_string();
    assert_eq!(
        send(relay.addr, &host, api(None)).await.status(),
        StatusCode::UNAUTHORIZED
    );
    let mine = read_body(
        send(relay.addr, &host, api(Some("team-a")))
            .await
            .into_body(),
    )
    .await;
    assert!(String::from_utf8_lossy(&mine).contains("\"demo\""));
    let theirs = read_body(
        send(relay.addr, &host, api(Some("team-b")))
            .await
            .into_body(),
    )
    .await;
    assert_eq!(
        String::from_utf8_lossy(&theirs),
        r#"{"tunnels":[],"offline":[]}"#
    );

    right.stop().await.expect("client stops cleanly");
    origin.stop().await;
    relay.stop().await;
}

#[tokio::test]
async fn a_held_name_gives_409_to_others_and_is_taken_over_by_the_same_token() {
    let relay = TestRelay::start(relay_with_tokens()).await;
    let origin = hello_origin().await;
    let first = TestClient::start(&relay, &origin.target(), with("team-a", "demo")).await;

    let other = TestClient::spawn(&relay, &origin.target(), with("team-b", "demo"));
    match other.finished().await {
        Err(ferry::Error::Refused {
            status: 409,
            message,
        }) => assert!(message.contains("in use"), "{message}"),
        other => panic!("expected 409, got {other:?}"),
    }

    let second = TestClient::start(&relay, &origin.target(), with("team-a", "demo")).await;
    assert_eq!(second.name, "demo");
    match first.finished().await {
        Err(ferry::Error::Closed(reason)) => assert!(reason.contains("took over"), "{reason}"),
        other => panic!("expected the first session to be closed, got {other:?}"),
    }
    let host = ferry_tests::host_of(&second.public_url);
    let response = send(relay.addr, &host, Request::new(full(""))).await;
    assert_eq!(read_body(response.into_body()).await, b"hello");

    second.stop().await.expect("client stops cleanly");
    origin.stop().await;
    relay.stop().await;
}

#[tokio::test]
async fn on_an_open_relay_another_client_cannot_take_a_held_name() {
    let relay = TestRelay::open().await;
    let origin = hello_origin().await;
    let options = ClientOptions {
        subdomain: Some("mine"),
        ..ClientOptions::default()
    };
    let first = TestClient::start(&relay, &origin.target(), options.clone()).await;
    let second = TestClient::spawn(&relay, &origin.target(), options);
    assert!(matches!(
        second.finished().await,
        Err(ferry::Error::Refused { status: 409, .. })
    ));
    first.stop().await.expect("client stops cleanly");
    origin.stop().await;
    relay.stop().await;
}
