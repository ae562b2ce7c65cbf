//! Link drops, relay restarts and graceful shutdowns.

use std::sync::Arc;

use ferry::Event;
use ferry_tests::{
    full, host_of, read_body, send, stop_all, within, Body, ClientOptions, Origin, TestClient,
    TestRelay,
};
use hyper::{Request, Response, StatusCode};
use tokio::sync::{mpsc, Mutex};

async fn hello_origin() -> Origin {
    Origin::start(|_req| async { Response::new(full("hello")) }).await
}

/// Checks that a request through `client`'s tunnel reaches the hello origin.
async fn assert_requests_flow(relay: &TestRelay, client: &TestClient) {
    let response = send(
        relay.addr,
        &host_of(&client.public_url),
        Request::new(full("")),
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(read_body(response.into_body()).await, b"hello");
}

/// An origin that reports each request, then answers only when the test
/// sends it a go-ahead.
async fn held_origin() -> (
    Origin,
    mpsc::UnboundedReceiver<()>,
    mpsc::UnboundedSender<()>,
) {
    let (started_tx, started) = mpsc::unbounded_channel();
    let (release, release_rx) = mpsc::unbounded_channel::<()>();
    let release_rx = Arc::new(Mutex::new(release_rx));
    let origin = Origin::start(move |_req| {
        let (started_tx, release_rx) = (started_tx.clone(), Arc::clone(&release_rx));
        async move {
            let _ = started_tx.send(());
            release_rx.lock().await.recv().await;
            Response::<Body>::new(full("finished"))
        }
    })
    .await;
    (origin, started, release)
}

#[tokio::test]
async fn the_client_comes_back_with_its_name_after_a_relay_restart() {
    let relay = TestRelay::open().await;
    let addr = relay.addr;
    let origin = hello_origin().await;
    let mut client = TestClient::start(&relay, &origin.target(), ClientOptions::default()).await;

    relay.stop().await;
    let event = client
        .wait_for("the disconnect", |e| {
            matches!(e, Event::Disconnected { .. })
        })
        .await;
    let Event::Disconnected { reason } = event else {
        unreachable!()
    };
    assert!(reason.contains("relay is shutting down"), "{reason}");

    let relay = TestRelay::start_on(addr, ferry_relay::Config::default()).await;
    client.wait_for_reconnect().await;
    assert_requests_flow(&relay, &client).await;

    stop_all(client, origin, relay).await;
}

#[tokio::test]
async fn a_client_whose_name_was_taken_while_away_keeps_retrying_and_says_why() {
    let relay = TestRelay::open().await;
    let addr = relay.addr;
    let origin = hello_origin().await;
    let keyed = |key: &str| ClientOptions {
        subdomain: Some("demo"),
        client_key: Some(key.to_owned()),
        ..ClientOptions::default()
    };
    let mut client = TestClient::start(&relay, &origin.target(), keyed("aaaa")).await;
    relay.stop().await;
    // While the relay is away the client's retries back off; once the next
    // one is a second off, another client has ample time to take the name
    // on the restarted relay, which lost its holds.
    client
        .wait_for("a long reconnect delay", |e| {
            matches!(e, Event::Reconnecting { delay } if *delay >= std::time::Duration::from_secs(1))
        })
        .await;
    let config = ferry_relay::Config {
        name_hold: std::time::Duration::ZERO,
        ..ferry_relay::Config::default()
    };
    let relay = TestRelay::start_on(addr, config).await;
    let other = TestClient::start(&relay, &origin.target(), keyed("bbbb")).await;
    let event = client
        .wait_for("the refusal to be reported", |e| {
            matches!(e, Event::Warning(_))
        })
        .await;
    let Event::Warning(warning) = event else {
        unreachable!()
    };
    assert!(warning.contains("our subdomain is taken"), "{warning}");
    other.stop().await.expect("the other client stops");
    client.wait_for_reconnect().await;
    assert_requests_flow(&relay, &client).await;
    stop_all(client, origin, relay).await;
}

#[tokio::test]
async fn requests_in_flight_when_the_link_drops_get_502() {
    let relay = TestRelay::open().await;
    let (origin, mut started, _release) = held_origin().await;
    let client = TestClient::start(&relay, &origin.target(), ClientOptions::default()).await;
    let host = host_of(&client.public_url);

    let relay_addr = relay.addr;
    let caller_host = host.clone();
    let caller =
        tokio::spawn(async move { send(relay_addr, &caller_host, Request::new(full(""))).await });
    within("the origin to get the request", started.recv())
        .await
        .expect("started");
    client.kill().await;

    let response = within("the caller's answer", caller)
        .await
        .expect("caller task");
    assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
    let body = String::from_utf8(read_body(response.into_body()).await).expect("text");
    assert!(body.contains("lost its client"), "{body}");

    origin.stop().await;
    relay.stop().await;
}

#[tokio::test]
async fn a_client_shutting_down_lets_requests_in_flight_finish() {
    let relay = TestRelay::open().await;
    let (origin, mut started, release) = held_origin().await;
    let mut client = TestClient::start(&relay, &origin.target(), ClientOptions::default()).await;
    let host = host_of(&client.public_url);

    let relay_addr = relay.addr;
    let caller = tokio::spawn(async move { send(relay_addr, &host, Request::new(full(""))).await });
    within("the origin to get the request", started.recv())
        .await
        .expect("started");
    client.begin_stop();
    client
        .wait_for("the client to start stopping", |e| {
            matches!(e, Event::Stopping)
        })
        .await;
    release.send(()).expect("origin waiting");
    let response = within("the caller's answer", caller)
        .await
        .expect("caller task");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(read_body(response.into_body()).await, b"finished");
    client.finished().await.expect("client stops cleanly");

    origin.stop().await;
    relay.stop().await;
}

#[tokio::test]
async fn a_link_that_goes_silent_is_noticed_by_pings_and_the_client_comes_back() {
    let keepalive = ferry_common::handshake::Keepalive {
        interval: std::time::Duration::from_millis(100),
        timeout: std::time::Duration::from_millis(300),
    };
    let relay = TestRelay::start(ferry_relay::Config {
        keepalive,
        ..ferry_relay::Config::default()
    })
    .await;
    let proxy = ferry_tests::FreezableProxy::start(relay.addr).await;
    let origin = hello_origin().await;
    let options = ClientOptions {
        keepalive: Some(keepalive),
        via: Some(proxy.addr),
        ..ClientOptions::default()
    };
    let mut client = TestClient::start(&relay, &origin.target(), options).await;

    proxy.freeze();
    client
        .wait_for("the dead link to be noticed", |e| {
            matches!(e, Event::Disconnected { .. })
        })
        .await;
    client.wait_for_reconnect().await;
    assert_requests_flow(&relay, &client).await;

    stop_all(client, origin, relay).await;
}
