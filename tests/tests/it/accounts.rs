//! Accounts of a TOML `--tokens-file`: missing, wrong and removed tokens,
//! a token rotated without the account losing its tunnels, log or
//! webhooks, and reserved names that only their account may ever claim.

use std::path::Path;
use std::time::Duration;

use ferry_relay::accounts::TokenHash;
use ferry_tests::{
    empty, full, host_of, read_body, send, within, Api, ClientOptions, Origin, TestClient,
    TestRelay,
};
use hyper::{Request, Response, StatusCode};
use serde_json::{json, Value};

fn hash(token: &str) -> String {
    TokenHash::of(token).to_string()
}

/// Writes the tokens file: (name, tokens, reserved subdomains) per account.
fn write(path: &Path, accounts: &[(&str, &[&str], &[&str])]) {
    let mut text = String::new();
    for (name, tokens, subdomains) in accounts {
        let tokens: Vec<String> = tokens.iter().map(|t| format!("\"{}\"", hash(t))).collect();
        let subdomains: Vec<String> = subdomains.iter().map(|s| format!("\"{s}\"")).collect();
        text.push_str(&format!(
            "[[account]]\nname = \"{name}\"\ntokens = [{}]\nsubdomains = [{}]\n\n",
            tokens.join(", "),
            subdomains.join(", ")
        ));
    }
    // Written whole, then renamed over the old one, so that the relay never
    // reads half a file.
    let partial = path.with_extension("partial");
    std::fs::write(&partial, text).expect("the tokens file is written");
    std::fs::rename(&partial, path).expect("the tokens file is replaced");
}

async fn relay_with(path: &Path) -> TestRelay {
    TestRelay::start(ferry_relay::Config {
        tokens_file: Some(path.to_owned()),
        tokens_file_check: Duration::from_millis(20),
        // Waiting for a reload polls with a token not yet (or no longer)
        // valid; the throttle on wrong tokens is attacks.rs's.
        failed_auths_per_minute: 1_000_000,
        egress_allow: ferry_relay::egress::Allow::loopback(),
        ..ferry_relay::Config::default()
    })
    .await
}

fn with(token: Option<&str>, subdomain: &'static str) -> ClientOptions {
    ClientOptions {
        token: token.map(str::to_owned),
        subdomain: Some(subdomain),
        ..ClientOptions::default()
    }
}

/// Waits until `token` is accepted (`true`) or refused (`false`) by the
/// API: the reload has happened.
async fn until_token(relay: &TestRelay, token: &str, accepted: bool) {
    let api = Api::with_token(relay, token);
    within("the tokens file to be reloaded", async {
        loop {
            let (status, _) = api.get("/api/v1/tunnels").await;
            if (status == StatusCode::OK) == accepted {
                return;
            }
            assert!(
                matches!(status, StatusCode::OK | StatusCode::UNAUTHORIZED),
                "{status}"
            );
            tokio::task::yield_now().await;
        }
    })
    .await;
}

async fn status_at(relay: &TestRelay, public_url: &str) -> StatusCode {
    let response = send(relay.addr, &host_of(public_url), Request::new(empty())).await;
    let status = response.status();
    read_body(response.into_body()).await;
    status
}

/// Waits until `/metrics` counts `errors` tokens files not applied.
async fn until_errors(relay: &TestRelay, errors: u32) {
    let counted = format!("ferry_tokens_file_errors_total {errors}\n");
    within("the bad tokens file to be counted", async {
        loop {
            let (_, metrics) = Api::of(relay).get("/metrics").await;
            if String::from_utf8_lossy(&metrics).contains(&counted) {
                return;
            }
            tokio::task::yield_now().await;
        }
    })
    .await;
}

/// Signs the dashboard in with `token`: the session cookie.
async fn sign_in(relay: &TestRelay, token: &str) -> String {
    let api = Api::of(relay);
    let mut request = api.request(
        "POST",
        "/api/v1/session",
        full(json!({ "token": token }).to_string()),
    );
    request.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    let response = api.send(request).await;
    assert_eq!(response.status(), StatusCode::OK, "{token} signs in");
    response
        .headers()
        .get(hyper::header::SET_COOKIE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .expect("a session cookie")
        .to_owned()
}

/// The status of listing tunnels with the dashboard's session `cookie`.
async fn with_cookie(relay: &TestRelay, cookie: &str) -> StatusCode {
    let api = Api::of(relay);
    let mut request = api.request("GET", "/api/v1/tunnels", empty());
    request.headers_mut().insert(
        hyper::header::COOKIE,
        cookie.parse().expect("a valid cookie"),
    );
    let response = api.send(request).await;
    let status = response.status();
    read_body(response.into_body()).await;
    status
}

fn items(list: &Value) -> &Vec<Value> {
    list["items"].as_array().expect("items")
}

#[tokio::test]
async fn tokens_are_checked_rotated_and_removed_from_the_file() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("tokens.toml");
    write(&path, &[("alice", &["old"], &[]), ("bob", &["bob"], &[])]);
    let relay = relay_with(&path).await;
    let origin = Origin::start(|_req| async { Response::new(full("hello")) }).await;

    // Missing and wrong tokens are refused; the file holds only hashes, so
    // a hash is no token either.
    for token in [None, Some("wrong"), Some(hash("old").as_str())] {
        let refused = TestClient::spawn(&relay, &origin.target(), with(token, "nobody"));
        assert!(
            matches!(
                refused.finished().await,
                Err(ferry::Error::Refused { status: 401, .. })
            ),
            "{token:?}"
        );
    }

    let old = TestClient::start(&relay, &origin.target(), with(Some("old"), "alice-app")).await;
    let bob = TestClient::start(&relay, &origin.target(), with(Some("bob"), "bob-app")).await;
    assert_eq!(status_at(&relay, &old.public_url).await, StatusCode::OK);
    let receiver = Origin::start(|_req| async { Response::new(full("")) }).await;
    let (status, webhook) = Api::with_token(&relay, "old")
        .post_json(
            "/api/v1/webhooks",
            &json!({"name": "alices-hook", "url": format!("{}/hook", receiver.target()), "actions": ["*"]}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{webhook}");

    // Rotation: the new token is added, a client moves to it, the old one
    // is removed. The account keeps its log and webhooks.
    write(
        &path,
        &[("alice", &["old", "new"], &[]), ("bob", &["bob"], &[])],
    );
    until_token(&relay, "new", true).await;
    let new = TestClient::start(&relay, &origin.target(), with(Some("new"), "alice-new")).await;
    let (old_session, new_session) = (sign_in(&relay, "old").await, sign_in(&relay, "new").await);
    write(&path, &[("alice", &["new"], &[]), ("bob", &["bob"], &[])]);
    until_token(&relay, "old", false).await;
    // The tunnel the old token opened ends, and its name no longer
    // reaches it.
    let ended = old.finished().await;
    assert!(
        matches!(&ended, Err(ferry::Error::Closed(reason)) if reason.contains("removed")),
        "{ended:?}"
    );
    assert_ne!(
        status_at(&relay, "http://alice-app.localhost").await,
        StatusCode::OK
    );
    // So does the dashboard session it signed in; the new token's stays.
    assert_eq!(
        with_cookie(&relay, &old_session).await,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(with_cookie(&relay, &new_session).await, StatusCode::OK);
    assert_eq!(status_at(&relay, &new.public_url).await, StatusCode::OK);
    let api = Api::with_token(&relay, "new");
    within("alice's log to hold her first request", async {
        loop {
            let log = api.get_json("/api/v1/requests?tunnel=alice-app").await;
            if items(&log).iter().any(|entry| entry["status"] == 200) {
                return;
            }
            tokio::task::yield_now().await;
        }
    })
    .await;
    let hooks = api.get_json("/api/v1/webhooks").await;
    assert_eq!(items(&hooks).len(), 1, "alice keeps her webhook: {hooks}");
    assert_eq!(items(&hooks)[0]["name"], "alices-hook");
    // Alice may take her old name back with the new token.
    let back = TestClient::start(&relay, &origin.target(), with(Some("new"), "alice-app")).await;

    // A file that is not valid is logged and counted, and the accounts
    // stay: bob, missing from it, keeps his tunnel.
    std::fs::write(&path, "[[account]]\nname = \"alice\"\n").expect("written");
    until_errors(&relay, 1).await;
    let (status, _) = Api::with_token(&relay, "bob").get("/api/v1/tunnels").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(status_at(&relay, &bob.public_url).await, StatusCode::OK);
    // So is a file that is gone.
    std::fs::remove_file(&path).expect("removed");
    until_errors(&relay, 2).await;
    assert_eq!(status_at(&relay, &bob.public_url).await, StatusCode::OK);

    // Bob removed entirely: his tunnel ends, his token is refused.
    write(&path, &[("alice", &["new"], &[])]);
    until_token(&relay, "bob", false).await;
    let ended = bob.finished().await;
    assert!(matches!(ended, Err(ferry::Error::Closed(_))), "{ended:?}");
    assert_eq!(status_at(&relay, &new.public_url).await, StatusCode::OK);

    back.stop().await.expect("alice stops");
    new.stop().await.expect("alice stops");
    receiver.stop().await;
    origin.stop().await;
    relay.stop().await;
}

#[tokio::test]
async fn a_reserved_name_is_its_accounts_alone_online_and_offline() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("tokens.toml");
    write(
        &path,
        &[("alice", &["alice"], &["shop"]), ("bob", &["bob"], &[])],
    );
    let relay = relay_with(&path).await;
    let origin = Origin::start(|_req| async { Response::new(full("alice's shop")) }).await;
    let bobs = Origin::start(|_req| async { Response::new(full("bob's page")) }).await;
    let bob_tries = || TestClient::spawn(&relay, &bobs.target(), with(Some("bob"), "shop"));
    // Before alice ever came.
    let ended = bob_tries().finished().await;
    assert!(
        matches!(&ended, Err(ferry::Error::Refused { status: 403, message }) if message.contains("reserved")),
        "{ended:?}"
    );
    // While she is online.
    let alice = TestClient::start(&relay, &origin.target(), with(Some("alice"), "shop")).await;
    assert_eq!(status_at(&relay, &alice.public_url).await, StatusCode::OK);
    let ended = bob_tries().finished().await;
    assert!(
        matches!(ended, Err(ferry::Error::Refused { status: 403, .. })),
        "{ended:?}"
    );
    // After she left: nobody else puts a page up on her name.
    let url = alice.public_url.clone();
    alice.stop().await.expect("alice stops");
    let ended = bob_tries().finished().await;
    assert!(
        matches!(ended, Err(ferry::Error::Refused { status: 403, .. })),
        "{ended:?}"
    );
    assert_ne!(status_at(&relay, &url).await, StatusCode::OK);
    // Nor an anonymous client: there is none on a relay with tokens.
    let ended = TestClient::spawn(&relay, &bobs.target(), with(None, "shop"))
        .finished()
        .await;
    assert!(
        matches!(ended, Err(ferry::Error::Refused { status: 401, .. })),
        "{ended:?}"
    );
    // Alice comes back to it.
    let alice = TestClient::start(&relay, &origin.target(), with(Some("alice"), "shop")).await;
    let response = send(
        relay.addr,
        &host_of(&alice.public_url),
        Request::new(empty()),
    )
    .await;
    assert_eq!(read_body(response.into_body()).await, b"alice's shop");

    // A name reserved while someone else serves it stops being theirs.
    let corner = TestClient::start(&relay, &bobs.target(), with(Some("bob"), "corner")).await;
    write(
        &path,
        &[
            ("alice", &["alice"], &["shop", "corner"]),
            ("bob", &["bob"], &[]),
        ],
    );
    let ended = corner.finished().await;
    assert!(
        matches!(&ended, Err(ferry::Error::Closed(reason)) if reason.contains("reserved")),
        "{ended:?}"
    );
    let corner = TestClient::start(&relay, &origin.target(), with(Some("alice"), "corner")).await;
    corner.stop().await.expect("alice stops");

    alice.stop().await.expect("alice stops");
    bobs.stop().await;
    origin.stop().await;
    relay.stop().await;
}

#[tokio::test]
async fn an_account_holds_no_more_tunnels_than_its_own_limit() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("tokens.toml");
    std::fs::write(
        &path,
        format!(
            "[[account]]\nname = \"small\"\ntokens = [\"{}\"]\nmax_tunnels = 1\n",
            hash("small")
        ),
    )
    .expect("the tokens file is written");
    let relay = relay_with(&path).await;
    let origin = Origin::start(|_req| async { Response::new(full("")) }).await;
    let first = TestClient::start(&relay, &origin.target(), with(Some("small"), "one")).await;
    // A second tunnel would be one more than the account's 1, though the
    // relay's --max-tunnels-per-token is 32.
    let ended = TestClient::spawn(&relay, &origin.target(), with(Some("small"), "two"))
        .finished()
        .await;
    assert!(
        matches!(&ended, Err(ferry::Error::Refused { status: 429, message }) if message.contains("1 tunnels")),
        "{ended:?}"
    );
    first.stop().await.expect("the client stops");
    origin.stop().await;
    relay.stop().await;
}

/// Opens a tunnel's WebSocket for `subdomain` with `token`, as `ferry http`
/// would, but speaks no HTTP/2 on it yet.
async fn upgraded(
    relay: &TestRelay,
    token: &str,
    subdomain: &str,
) -> tokio_tungstenite::WebSocketStream<tokio::net::TcpStream> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut request = format!("ws://{}/api/v1/tunnels/connect", relay.addr)
        .into_client_request()
        .expect("a connect request");
    let headers = request.headers_mut();
    let version = ferry_common::handshake::PROTOCOL_VERSION.to_string();
    headers.insert("ferry-protocol-version", version.parse().expect("a header"));
    headers.insert("ferry-subdomain", subdomain.parse().expect("a header"));
    let bearer = format!("Bearer {token}");
    headers.insert("authorization", bearer.parse().expect("a header"));
    let tcp = tokio::net::TcpStream::connect(relay.addr)
        .await
        .expect("connect");
    let (ws, response) = within(
        "the upgrade",
        tokio_tungstenite::client_async_with_config(
            request,
            tcp,
            Some(ferry_common::link::websocket_config()),
        ),
    )
    .await
    .expect("the relay upgrades");
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
    ws
}

#[tokio::test]
async fn a_takeover_pending_when_its_token_is_removed_never_comes_up() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("tokens.toml");
    write(&path, &[("alice", &["alice"], &[]), ("bob", &["bob"], &[])]);
    let relay = relay_with(&path).await;
    let origin = Origin::start(|_req| async { Response::new(full("old")) }).await;
    let old = TestClient::start(&relay, &origin.target(), with(Some("alice"), "shop")).await;

    // A takeover of alice's own name, upgraded before her token is removed
    // but not up yet: its HTTP/2 is withheld.
    let ws = upgraded(&relay, "alice", "shop").await;
    write(&path, &[("bob", &["bob"], &[])]);
    until_token(&relay, "alice", false).await;
    let ended = old.finished().await;
    assert!(matches!(ended, Err(ferry::Error::Closed(_))), "{ended:?}");

    // Now it speaks: the relay refuses it and closes the link.
    let served = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = std::sync::Arc::clone(&served);
    let service = hyper::service::service_fn(move |_req| {
        flag.store(true, std::sync::atomic::Ordering::SeqCst);
        async { Ok::<_, std::convert::Infallible>(Response::new(full("revoked"))) }
    });
    let stream = ferry_common::byte_stream::ByteStream::new(
        ws,
        ferry_common::byte_stream::CloseSignal::default(),
    );
    let connection =
        ferry_common::link::http2_server(ferry_common::handshake::Keepalive::default())
            .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
    let _ = within("the relay to close the refused takeover", connection).await;
    assert_ne!(
        status_at(&relay, "http://shop.localhost").await,
        StatusCode::OK
    );
    assert!(
        !served.load(std::sync::atomic::Ordering::SeqCst),
        "no public request reached the revoked tunnel"
    );
    origin.stop().await;
    relay.stop().await;
}

#[tokio::test]
async fn live_feeds_end_when_their_token_is_removed_or_its_admin_flag_taken() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("tokens.toml");
    let file = |admins: &[&str]| {
        let mut text = format!(
            "[[account]]\nname = \"alice\"\ntokens = [\"{}\"]\n",
            hash("alice")
        );
        for admin in admins {
            text.push_str(&format!(
                "[[account]]\nname = \"{admin}\"\ntokens = [\"{}\"]\nadmin = true\n",
                hash(admin)
            ));
        }
        text
    };
    std::fs::write(&path, file(&["ops", "root"])).expect("written");
    let relay = relay_with(&path).await;
    let origin = Origin::start(|_req| async { Response::new(full("hello")) }).await;
    let alice = TestClient::start(&relay, &origin.target(), with(Some("alice"), "alice-app")).await;
    let mut ops = Api::with_token(&relay, "ops").tail("").await;
    let mut root = Api::with_token(&relay, "root").tail("").await;
    assert_eq!(status_at(&relay, &alice.public_url).await, StatusCode::OK);
    // Admins see alice's entries.
    let (first, _) = ops.next_item().await;
    assert_eq!(root.next_item().await.0, first);

    // ops is no admin any more, root is gone.
    let partial = path.with_extension("partial");
    let demoted = file(&[])
        + &format!(
            "[[account]]\nname = \"ops\"\ntokens = [\"{}\"]\n",
            hash("ops")
        );
    std::fs::write(&partial, demoted).expect("written");
    std::fs::rename(&partial, &path).expect("replaced");
    until_token(&relay, "root", false).await;
    // Alice's next entry reaches neither: both feeds have ended.
    assert_eq!(status_at(&relay, &alice.public_url).await, StatusCode::OK);
    assert_eq!(ops.end().await, Vec::<String>::new());
    assert_eq!(root.end().await, Vec::<String>::new());

    alice.stop().await.expect("alice stops");
    origin.stop().await;
    relay.stop().await;
}
