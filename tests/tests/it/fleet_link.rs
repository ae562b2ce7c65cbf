//! The link between the relays of a fleet: what a stranger on the fleet's
//! network can hold of a cluster listener, a forwarded request for a tunnel
//! that changed hands on its way, and the link's counters in `/metrics`.

use std::net::Ipv4Addr;
use std::time::Duration;

use ferry_tests::{
    connect_from, empty, full, read_body, send, within, Api, Body, ClientOptions, TestClient,
    TestRelay, FLEET_SECRET,
};
use hyper::client::conn::http2::SendRequest;
use hyper::{Request, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use crate::fleet::{fleet, forwarded, host_on, recording_origin, send_to_cluster, LEASE};

/// Cluster settings for [`fleet`] with the listener's limits given.
fn cluster_limits(
    max_connections_per_ip: usize,
    first_request_timeout: Duration,
) -> ferry_relay::Config {
    ferry_relay::Config {
        cluster: Some(ferry_relay::config::Cluster {
            advertise_url: String::new(),
            secret: ferry_relay::cluster::Secret::new(FLEET_SECRET),
            lease: LEASE,
            unknown_names_per_minute:
                ferry_relay::config::Cluster::DEFAULT_UNKNOWN_NAMES_PER_MINUTE,
            max_connections_per_ip,
            first_request_timeout,
        }),
        ..ferry_relay::Config::default()
    }
}

/// The value of the `/metrics` line that starts with `series` and a space.
async fn metric(relay: &TestRelay, series: &str) -> u64 {
    let (status, body) = Api::of(relay).get("/metrics").await;
    assert_eq!(status, StatusCode::OK);
    let text = String::from_utf8(body).expect("text");
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no {series} in {text}"))
}

/// Waits until the relay closes `stream`: its read ends.
async fn closed(what: &str, mut stream: TcpStream) {
    let mut rest = Vec::new();
    // An error (a reset) is a close too.
    let _ = within(what, stream.read_to_end(&mut rest)).await;
}

/// An HTTP/2 connection to a cluster listener over `stream`, as another
/// relay opens one.
async fn h2(stream: TcpStream) -> SendRequest<Body> {
    let (sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("an HTTP/2 handshake");
    tokio::spawn(connection);
    sender
}

/// Sends `request` on `sender` and returns the status.
async fn status_on(sender: &mut SendRequest<Body>, request: Request<Body>) -> StatusCode {
    let response = within(
        "the cluster listener's answer",
        sender.send_request(request),
    )
    .await
    .expect("an answer");
    let status = response.status();
    read_body(response.into_body()).await;
    status
}

/// A client of `relay` with the reconnect key `key`, and its owner key.
async fn client_with_key(relay: &TestRelay, target: &str, key: &str) -> (TestClient, String) {
    let options = ClientOptions {
        client_key: Some(key.to_owned()),
        ..ClientOptions::default()
    };
    let client = TestClient::start(relay, target, options).await;
    (client, ferry_relay::tunnels::Owner::of_key(Some(key)).key())
}

#[tokio::test]
async fn one_address_holds_only_its_share_of_the_cluster_listener_and_the_fleet_still_forwards() {
    const CAP: usize = 2;
    // No deadline gets in the way of the connections this test holds.
    let relays = fleet(2, cluster_limits(CAP, Duration::from_secs(600))).await;
    let holder = &relays[0];
    let cluster = holder.cluster_addr.expect("a relay of a fleet");
    let (origin, mut received) = recording_origin("still served").await;
    let (client, owner) = client_with_key(holder, &origin.target(), "the-owners-key").await;

    // A host on the fleet's network opens connections and sends nothing:
    // those beyond its share are closed at once.
    let stranger = Ipv4Addr::new(127, 0, 0, 7);
    let mut held = Vec::new();
    for _ in 0..CAP {
        held.push(connect_from(stranger, cluster).await);
    }
    for _ in 0..3 {
        closed(
            "the connection beyond the cap to close",
            connect_from(stranger, cluster).await,
        )
        .await;
    }
    assert_eq!(
        metric(
            holder,
            r#"ferry_cluster_refused_total{reason="connections_per_ip"}"#
        )
        .await,
        3
    );

    // The other relay, at another address, forwards as before.
    let response = send(
        relays[1].addr,
        &host_on(&client.name, &relays[1]),
        Request::post("/through-the-fleet")
            .body(full("forwarded"))
            .expect("request"),
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(read_body(response.into_body()).await, b"still served");
    let (_, body) = within("the origin", received.recv())
        .await
        .expect("a request");
    assert_eq!(body, b"forwarded");

    // The connections within the share were taken and are served.
    for stream in held {
        let mut sender = h2(stream).await;
        let request = forwarded(cluster, (&client.name, &owner), None, "no secret");
        assert_eq!(
            status_on(&mut sender, request).await,
            StatusCode::UNAUTHORIZED
        );
    }

    client.stop().await.expect("client stops");
    origin.stop().await;
    for relay in relays {
        relay.stop().await;
    }
}

#[tokio::test]
async fn a_connection_to_the_cluster_listener_without_a_request_bearing_the_secret_in_time_is_closed(
) {
    let relays = fleet(1, cluster_limits(16, Duration::from_secs(2))).await;
    let holder = &relays[0];
    let cluster = holder.cluster_addr.expect("a relay of a fleet");
    let (origin, mut received) = recording_origin("served").await;
    let (client, owner) = client_with_key(holder, &origin.target(), "the-owners-key").await;
    let tunnel = (client.name.as_str(), owner.as_str());

    // The fleet's own connection, opened first: its first request bears
    // the secret, so the deadline does not apply to it.
    let mut fleet_link = h2(within("a connection", TcpStream::connect(cluster))
        .await
        .expect("connect"))
    .await;
    let request = forwarded(cluster, tunnel, Some(FLEET_SECRET), "first");
    assert_eq!(status_on(&mut fleet_link, request).await, StatusCode::OK);

    // A TCP connection that says nothing, and an HTTP/2 one that never
    // sends a request, are closed at the deadline.
    let silent = within("a connection", TcpStream::connect(cluster))
        .await
        .expect("connect");
    let (_sender, idle) = hyper::client::conn::http2::handshake::<_, _, Body>(
        TokioExecutor::new(),
        TokioIo::new(
            within("a connection", TcpStream::connect(cluster))
                .await
                .expect("connect"),
        ),
    )
    .await
    .expect("an HTTP/2 handshake");
    closed("the silent connection to close", silent).await;
    let _ = within("the idle HTTP/2 connection to close", idle).await;
    assert_eq!(
        metric(
            holder,
            r#"ferry_cluster_refused_total{reason="first_request_timeout"}"#
        )
        .await,
        2
    );

    // Past its own deadline, the fleet's connection still carries requests.
    let request = forwarded(cluster, tunnel, Some(FLEET_SECRET), "second");
    assert_eq!(status_on(&mut fleet_link, request).await, StatusCode::OK);
    for expected in [&b"first"[..], b"second"] {
        let (_, body) = within("the origin", received.recv())
            .await
            .expect("a request");
        assert_eq!(body, expected);
    }

    client.stop().await.expect("client stops");
    origin.stop().await;
    for relay in relays {
        relay.stop().await;
    }
}

#[tokio::test]
async fn a_forwarded_request_for_another_owner_never_reaches_the_tunnel_that_serves_the_name_now() {
    let relays = fleet(1, ferry_relay::Config::default()).await;
    let holder = &relays[0];
    let cluster = holder.cluster_addr.expect("a relay of a fleet");
    let (origin, mut received) = recording_origin("served").await;
    let (client, owner) = client_with_key(holder, &origin.target(), "the-new-owners-key").await;
    let previous = ferry_relay::tunnels::Owner::of_key(Some("the-old-owners-key")).key();

    // What an ingress relay sends after looking the name up just before it
    // changed hands: the previous owner's request.
    let response = send_to_cluster(
        cluster,
        forwarded(
            cluster,
            (&client.name, &previous),
            Some(FLEET_SECRET),
            "for the previous owner",
        ),
    )
    .await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        response.headers().get("retry-after").map(|v| v.as_bytes()),
        Some(&b"1"[..])
    );
    assert_eq!(
        response
            .headers()
            .get("ferry-outcome")
            .map(|v| v.as_bytes()),
        Some(&b"failed"[..])
    );
    let body = String::from_utf8(read_body(response.into_body()).await).expect("text");
    assert!(body.contains("moved"), "{body}");

    // A forwarded request that names no owner is malformed.
    let mut request = forwarded(cluster, (&client.name, &owner), Some(FLEET_SECRET), "none");
    request.headers_mut().remove("ferry-cluster-owner");
    let response = send_to_cluster(cluster, request).await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    // So is one without the caller's address, or for a host outside the
    // fleet's domain: neither reaches a tunnel.
    let mut request = forwarded(cluster, (&client.name, &owner), Some(FLEET_SECRET), "none");
    request.headers_mut().remove("ferry-client-ip");
    let response = send_to_cluster(cluster, request).await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let mut request = forwarded(cluster, (&client.name, &owner), Some(FLEET_SECRET), "none");
    request.headers_mut().insert(
        "ferry-cluster-host",
        format!("{}.elsewhere.example", client.name)
            .parse()
            .expect("header value"),
    );
    let response = send_to_cluster(cluster, request).await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);

    // The owner's own request is the first to reach the origin.
    let response = send_to_cluster(
        cluster,
        forwarded(
            cluster,
            (&client.name, &owner),
            Some(FLEET_SECRET),
            "for the owner",
        ),
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    read_body(response.into_body()).await;
    let (_, body) = within("the origin", received.recv())
        .await
        .expect("a request");
    assert_eq!(body, b"for the owner", "nothing else got through first");
    assert_eq!(
        metric(
            holder,
            r#"ferry_cluster_refused_total{reason="tunnel_moved"}"#
        )
        .await,
        1
    );

    client.stop().await.expect("client stops");
    origin.stop().await;
    for relay in relays {
        relay.stop().await;
    }
}

#[tokio::test]
async fn a_stale_lookup_gets_the_caller_a_503_recorded_for_the_owner_it_found_and_the_tunnel_nothing(
) {
    let url = ferry_tests::postgres::fresh_database().await;
    let mut relays = Vec::new();
    for _ in 0..2 {
        let config = ferry_relay::Config {
            database_url: Some(url.clone()),
            ..ferry_relay::Config::default()
        };
        relays.push(TestRelay::start_in_fleet(config, LEASE).await);
    }
    let (origin, mut received) = recording_origin("served").await;
    let (client, owner) = client_with_key(&relays[0], &origin.target(), "the-new-owners-key").await;

    // The registry says what a lookup made just before the name changed
    // hands on its relay would have found: the previous owner.
    let (db, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .expect("a connection to the fleet's database");
    tokio::spawn(connection);
    let stale = "UPDATE ferry_sessions SET owner = $1 WHERE name = $2";
    let previous = ferry_relay::tunnels::Owner::of_key(Some("the-old-owners-key")).key();
    let updated = db
        .execute(stale, &[&previous, &client.name])
        .await
        .expect("the registry row updated");
    assert_eq!(updated, 1);

    let mut tail = Api::of(&relays[1]).tail("").await;
    let response = send(
        relays[1].addr,
        &host_on(&client.name, &relays[1]),
        Request::post("/stale")
            .body(full("stale"))
            .expect("request"),
    )
    .await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        response.headers().get("retry-after").map(|v| v.as_bytes()),
        Some(&b"1"[..])
    );
    read_body(response.into_body()).await;
    let (_, item) = tail.next_item().await;
    assert_eq!(item["path"], "/stale");
    assert_eq!(item["status"], 503);
    assert_eq!(item["outcome"], "failed");

    // Once the registry is right again, the owner's callers get through,
    // and the stale request never reached the origin.
    db.execute(stale, &[&owner, &client.name])
        .await
        .expect("the registry row updated");
    let response = send(
        relays[1].addr,
        &host_on(&client.name, &relays[1]),
        Request::post("/fresh")
            .body(full("fresh"))
            .expect("request"),
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    read_body(response.into_body()).await;
    let (_, body) = within("the origin", received.recv())
        .await
        .expect("a request");
    assert_eq!(body, b"fresh", "the stale request never reached the origin");

    client.stop().await.expect("client stops");
    origin.stop().await;
    for relay in relays {
        relay.stop().await;
    }
}

#[tokio::test]
async fn metrics_count_the_requests_one_relay_forwards_and_the_other_serves() {
    let relays = fleet(2, ferry_relay::Config::default()).await;
    let (origin, _received) = recording_origin("served").await;
    let client = TestClient::start(&relays[0], &origin.target(), ClientOptions::default()).await;
    let before = (
        metric(&relays[1], "ferry_cluster_forwarded_total").await,
        metric(&relays[0], "ferry_cluster_served_total").await,
    );

    let response = send(
        relays[1].addr,
        &host_on(&client.name, &relays[1]),
        Request::new(empty()),
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    read_body(response.into_body()).await;

    assert_eq!(
        metric(&relays[1], "ferry_cluster_forwarded_total").await,
        before.0 + 1
    );
    assert_eq!(
        metric(&relays[0], "ferry_cluster_served_total").await,
        before.1 + 1
    );
    // Each counts only its own side.
    assert_eq!(metric(&relays[0], "ferry_cluster_forwarded_total").await, 0);
    assert_eq!(metric(&relays[1], "ferry_cluster_served_total").await, 0);

    client.stop().await.expect("client stops");
    origin.stop().await;
    for relay in relays {
        relay.stop().await;
    }
}
