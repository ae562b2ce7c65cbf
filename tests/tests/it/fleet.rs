//! A fleet: relays sharing one PostgreSQL database route each public
//! request to the relay that holds its tunnel, record it once at the relay
//! the caller reached, and hand names over when a client moves.

use std::collections::HashSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use ferry_tests::{
    empty, full, read_body, send, send_from, within, Api, Body, ClientOptions, Origin, TestClient,
    TestRelay, FLEET_SECRET,
};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;
use tokio::sync::{mpsc, Mutex};

/// Long enough that no lease ends during a test unless a test wants it to.
pub(crate) const LEASE: Duration = Duration::from_secs(30);

/// `n` relays on one fresh database, with `config` otherwise.
pub(crate) async fn fleet(n: usize, config: ferry_relay::Config) -> Vec<TestRelay> {
    let url = ferry_tests::postgres::fresh_database().await;
    let mut relays = Vec::new();
    for _ in 0..n {
        let config = ferry_relay::Config {
            database_url: Some(url.clone()),
            ..config.clone()
        };
        relays.push(TestRelay::start_in_fleet(config, LEASE).await);
    }
    relays
}

/// The host of tunnel `name` on `relay`.
pub(crate) fn host_on(name: &str, relay: &TestRelay) -> String {
    format!("{name}.localhost:{}", relay.addr.port())
}

/// What an origin received: the headers and the body.
pub(crate) type Received = (hyper::HeaderMap, Vec<u8>);

/// An origin that reports what it receives and answers `answer`.
pub(crate) async fn recording_origin(
    answer: &'static str,
) -> (Origin, mpsc::UnboundedReceiver<Received>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let origin = Origin::start(move |req: Request<hyper::body::Incoming>| {
        let tx = tx.clone();
        async move {
            let (parts, body) = req.into_parts();
            let body = read_body(body).await;
            let _ = tx.send((parts.headers, body));
            Response::new(full(answer))
        }
    })
    .await;
    (origin, rx)
}

/// The ids `GET /api/v1/requests` lists on `relay`.
pub(crate) async fn listed(relay: &TestRelay) -> Vec<String> {
    let page = Api::of(relay).get_json("/api/v1/requests").await;
    page["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|item| item["id"].as_str().expect("an id").to_owned())
        .collect()
}

#[tokio::test]
async fn a_client_on_one_relay_answers_requests_sent_to_the_others_each_logged_once_everywhere() {
    let relays = fleet(3, ferry_relay::Config::default()).await;
    let (origin, mut received) = recording_origin("hello from the origin").await;
    let client = TestClient::start(&relays[0], &origin.target(), ClientOptions::default()).await;

    let mut ids = Vec::new();
    for (i, relay) in relays.iter().enumerate().skip(1) {
        let mut tail = Api::of(relay).tail("").await;
        // A caller that forges what relays tell each other gets nowhere:
        // the ingress relay drops it and says who the caller really is.
        let request = Request::post(format!("/hook-{i}"))
            .header("x-forwarded-for", "6.6.6.6")
            .header("ferry-client-ip", "6.6.6.6")
            .header("ferry-event-type", "forged.by.a.caller")
            .header("ferry-cluster-secret", FLEET_SECRET)
            .header("ferry-cluster-host", "elsewhere.localhost")
            .body(full(format!("payload {i}")))
            .expect("request");
        let response = send(relay.addr, &host_on(&client.name, relay), request).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            read_body(response.into_body()).await,
            b"hello from the origin"
        );
        let (headers, body) = within("the origin", received.recv())
            .await
            .expect("a request");
        assert_eq!(body, format!("payload {i}").as_bytes());
        assert_eq!(
            headers.get("x-forwarded-for").map(|v| v.as_bytes()),
            Some(&b"127.0.0.1"[..])
        );
        assert!(
            !headers
                .keys()
                .any(|name| name.as_str().starts_with("ferry-")),
            "{headers:?}"
        );

        let (id, item) = tail.next_item().await;
        assert_eq!(item["tunnel"], client.name.as_str());
        assert_eq!(item["path"], format!("/hook-{i}").as_str());
        assert_eq!(item["status"], 200);
        assert_eq!(item["outcome"], "answered");
        assert_eq!(item["request_size"], format!("payload {i}").len());
        let detail = Api::of(relay)
            .get_json(&format!("/api/v1/requests/{id}"))
            .await;
        let caller = detail["remote_addr"].as_str().expect("remote_addr");
        assert!(caller.starts_with("127.0.0.1:"), "{caller}");
        ids.push(id);
    }
    // One request at the holder itself: its capture comes after any the
    // holder would (wrongly) have made of the forwarded ones.
    // A public request to the holder that poses as a forwarded one is a
    // public request like any other.
    let mut tail = Api::of(&relays[0]).tail("").await;
    let request = Request::post("/direct")
        .header("ferry-client-ip", "6.6.6.6")
        .header("ferry-cluster-secret", FLEET_SECRET)
        .header("ferry-cluster-host", "elsewhere.localhost")
        .body(full("payload 0"))
        .expect("request");
    let response = send(relays[0].addr, &host_on(&client.name, &relays[0]), request).await;
    assert_eq!(response.status(), StatusCode::OK);
    read_body(response.into_body()).await;
    let (headers, _) = within("the origin", received.recv())
        .await
        .expect("a request");
    assert_eq!(
        headers.get("x-forwarded-for").map(|v| v.as_bytes()),
        Some(&b"127.0.0.1"[..])
    );
    assert!(!headers
        .keys()
        .any(|name| name.as_str().starts_with("ferry-")));
    ids.push(tail.next_item().await.0);

    let expected: HashSet<&String> = ids.iter().collect();
    assert_eq!(expected.len(), 3);
    for relay in &relays {
        let listed = listed(relay).await;
        assert_eq!(listed.len(), 3, "each request logged once: {listed:?}");
        assert_eq!(listed.iter().collect::<HashSet<_>>(), expected);
    }

    client.stop().await.expect("client stops");
    origin.stop().await;
    for relay in relays {
        relay.stop().await;
    }
}

#[tokio::test]
async fn a_name_no_relay_serves_gets_the_usual_404() {
    let relays = fleet(2, ferry_relay::Config::default()).await;
    let response = send(
        relays[1].addr,
        &host_on("nobody-here", &relays[1]),
        Request::new(empty()),
    )
    .await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    let body = String::from_utf8(read_body(response.into_body()).await).expect("text");
    assert!(body.contains("no tunnel named `nobody-here`"), "{body}");
    assert!(
        listed(&relays[0]).await.is_empty(),
        "unknown names are not logged"
    );
    for relay in relays {
        relay.stop().await;
    }
}

/// Sends `request` to the cluster listener at `addr` over HTTP/2, as
/// another relay would.
pub(crate) async fn send_to_cluster(
    addr: SocketAddr,
    request: Request<Body>,
) -> Response<hyper::body::Incoming> {
    let stream = within("a connection", tokio::net::TcpStream::connect(addr))
        .await
        .expect("the cluster listener accepts");
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("an HTTP/2 handshake");
    tokio::spawn(connection);
    within(
        "the cluster listener's answer",
        sender.send_request(request),
    )
    .await
    .expect("an answer")
}

/// A request as the relays of a fleet forward them, to tunnel `name` of
/// `owner` (as its owner key), with `secret` if any.
pub(crate) fn forwarded(
    addr: SocketAddr,
    (name, owner): (&str, &str),
    secret: Option<&str>,
    body: &str,
) -> Request<Body> {
    let mut request = Request::post(format!("http://{addr}/from-a-peer"))
        .header("ferry-cluster-host", format!("{name}.localhost"))
        .header("ferry-cluster-owner", owner)
        .header(
            "ferry-exchange-id",
            ferry_common::ids::ExchangeId::new().to_string(),
        )
        .header("ferry-client-ip", "127.0.0.9")
        .header("ferry-scheme", "http")
        .body(full(body.to_owned()))
        .expect("request");
    if let Some(secret) = secret {
        request.headers_mut().insert(
            "ferry-cluster-secret",
            secret.parse().expect("header value"),
        );
    }
    request
}

#[tokio::test]
async fn the_cluster_listener_forwards_nothing_without_the_fleets_secret() {
    let relays = fleet(1, ferry_relay::Config::default()).await;
    let relay = &relays[0];
    let cluster = relay.cluster_addr.expect("a relay of a fleet");
    let (origin, mut received) = recording_origin("reached").await;
    let key = "the-clients-key";
    let client = TestClient::start(
        relay,
        &origin.target(),
        ClientOptions {
            client_key: Some(key.to_owned()),
            ..ClientOptions::default()
        },
    )
    .await;
    let owner = ferry_relay::tunnels::Owner::of_key(Some(key)).key();
    let tunnel = (client.name.as_str(), owner.as_str());

    for secret in [None, Some("not-the-fleet-secret"), Some("")] {
        let response = send_to_cluster(cluster, forwarded(cluster, tunnel, secret, "forged")).await;
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{secret:?}");
        let body = String::from_utf8(read_body(response.into_body()).await).expect("text");
        assert!(body.contains("fleet's secret"), "{body}");
    }
    // HTTP/1.1, as a browser or a scanner would speak, gets no answer.
    let mut stream = tokio::net::TcpStream::connect(cluster)
        .await
        .expect("connect");
    let hello = format!(
        "GET / HTTP/1.1\r\nhost: {}.localhost\r\nferry-cluster-secret: {FLEET_SECRET}\r\n\r\n",
        client.name
    );
    tokio::io::AsyncWriteExt::write_all(&mut stream, hello.as_bytes())
        .await
        .expect("write");
    let mut answer = Vec::new();
    let _ = within(
        "the connection to close",
        tokio::io::AsyncReadExt::read_to_end(&mut stream, &mut answer),
    )
    .await;
    assert!(!answer.starts_with(b"HTTP/1.1 2"), "{answer:?}");

    // The fleet's own request, with the secret, is the first to arrive.
    let response = send_to_cluster(
        cluster,
        forwarded(cluster, tunnel, Some(FLEET_SECRET), "from the fleet"),
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(read_body(response.into_body()).await, b"reached");
    let (headers, body) = within("the origin", received.recv())
        .await
        .expect("a request");
    assert_eq!(body, b"from the fleet", "nothing forged got through first");
    assert_eq!(
        headers.get("x-forwarded-for").map(|v| v.as_bytes()),
        Some(&b"127.0.0.9"[..]),
        "the caller the ingress relay names"
    );
    assert!(listed(relay).await.is_empty(), "the holder records nothing");

    client.stop().await.expect("client stops");
    origin.stop().await;
    for relay in relays {
        relay.stop().await;
    }
}

#[tokio::test]
async fn the_holder_applies_its_per_caller_limit_to_the_real_caller_of_a_forwarded_request() {
    let relays = fleet(
        3,
        ferry_relay::Config {
            max_requests_per_ip: 1,
            ..ferry_relay::Config::default()
        },
    )
    .await;
    let (started_tx, mut started) = mpsc::unbounded_channel();
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
    let client = TestClient::start(&relays[0], &origin.target(), ClientOptions::default()).await;
    let (first, second) = (Ipv4Addr::new(127, 0, 0, 2), Ipv4Addr::new(127, 0, 0, 3));

    let host = host_on(&client.name, &relays[1]);
    let addr = relays[1].addr;
    let held =
        tokio::spawn(async move { send_from(first, addr, &host, Request::new(empty())).await });
    within("the first request at the origin", started.recv()).await;
    // The same caller through another relay: refused by the holder, which
    // sees the caller, not the relay in between.
    let response = send_from(
        first,
        relays[2].addr,
        &host_on(&client.name, &relays[2]),
        Request::new(empty()),
    )
    .await;
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    // Another caller through that relay is not.
    let other = {
        let (host, addr) = (host_on(&client.name, &relays[2]), relays[2].addr);
        tokio::spawn(async move { send_from(second, addr, &host, Request::new(empty())).await })
    };
    within("the other caller's request at the origin", started.recv()).await;
    for _ in 0..2 {
        release.send(()).expect("origin waits");
    }
    for response in [held, other] {
        let response = within("an answer", response).await.expect("task");
        assert_eq!(response.status(), StatusCode::OK);
    }

    client.stop().await.expect("client stops");
    origin.stop().await;
    for relay in relays {
        relay.stop().await;
    }
}

#[tokio::test]
async fn a_client_reconnecting_to_another_relay_keeps_its_name_and_the_old_relay_lets_go() {
    let relays = fleet(3, ferry_relay::Config::default()).await;
    let (one, _) = recording_origin("one").await;
    let (two, _) = recording_origin("two").await;
    let keyed = ClientOptions {
        subdomain: Some("moving"),
        client_key: Some("the-same-client".to_owned()),
        ..ClientOptions::default()
    };
    let answer = |relay: &TestRelay| {
        let (addr, host) = (relay.addr, host_on("moving", relay));
        async move {
            let response = send(addr, &host, Request::new(empty())).await;
            assert_eq!(response.status(), StatusCode::OK);
            read_body(response.into_body()).await
        }
    };
    let first = TestClient::start(&relays[0], &one.target(), keyed.clone()).await;
    assert_eq!(answer(&relays[2]).await, b"one");

    // Another client cannot take the name from another relay.
    let stranger = TestClient::spawn(
        &relays[1],
        &two.target(),
        ClientOptions {
            client_key: Some("a-stranger".to_owned()),
            ..keyed.clone()
        },
    );
    let refused = within("the stranger to give up", stranger.finished()).await;
    let refused = refused.expect_err("the stranger is refused").to_string();
    assert!(refused.contains("in use"), "{refused}");

    let second = TestClient::start(&relays[1], &two.target(), keyed).await;
    assert_eq!(second.name, "moving");
    // The old session is closed by policy, which its client takes as final.
    let ended = within("the old client to end", first.finished()).await;
    let reason = ended.expect_err("the old session is closed").to_string();
    assert!(reason.contains("another relay"), "{reason}");
    for relay in &relays {
        assert_eq!(
            answer(relay).await,
            b"two",
            "every relay routes to the new one"
        );
    }
    let tunnels = Api::of(&relays[0]).get_json("/api/v1/tunnels").await;
    assert!(
        !tunnels.to_string().contains("moving"),
        "the old relay lets go: {tunnels}"
    );

    second.stop().await.expect("client stops");
    one.stop().await;
    two.stop().await;
    for relay in relays {
        relay.stop().await;
    }
}

#[tokio::test]
async fn a_holder_that_does_not_answer_gets_the_caller_a_502_recorded_at_the_ingress() {
    let url = ferry_tests::postgres::fresh_database().await;
    // A relay that advertises an address where nothing listens.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let nowhere = closed.local_addr().expect("address");
    drop(closed);
    let unreachable = TestRelay::start_in_fleet(
        ferry_relay::Config {
            database_url: Some(url.clone()),
            cluster: Some(ferry_relay::config::Cluster {
                advertise_url: format!("http://{nowhere}"),
                secret: ferry_relay::cluster::Secret::new(FLEET_SECRET),
                lease: LEASE,
                unknown_names_per_minute: 600,
                max_connections_per_ip:
                    ferry_relay::config::Cluster::DEFAULT_MAX_CONNECTIONS_PER_IP,
                first_request_timeout: ferry_relay::config::Cluster::DEFAULT_FIRST_REQUEST_TIMEOUT,
            }),
            ..ferry_relay::Config::default()
        },
        LEASE,
    )
    .await;
    let ingress = TestRelay::start_in_fleet(
        ferry_relay::Config {
            database_url: Some(url),
            ..ferry_relay::Config::default()
        },
        LEASE,
    )
    .await;
    let (origin, _) = recording_origin("never").await;
    let client = TestClient::start(&unreachable, &origin.target(), ClientOptions::default()).await;

    let mut tail = Api::of(&ingress).tail("").await;
    let response = send(
        ingress.addr,
        &host_on(&client.name, &ingress),
        Request::new(full("lost")),
    )
    .await;
    assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
    let body = String::from_utf8(read_body(response.into_body()).await).expect("text");
    assert!(body.contains("did not answer"), "{body}");
    let (_, item): (String, Value) = tail.next_item().await;
    assert_eq!(item["status"], 502);
    assert_eq!(item["outcome"], "failed");

    client.stop().await.expect("client stops");
    origin.stop().await;
    unreachable.stop().await;
    ingress.stop().await;
}

/// The name in a public URL, `http://NAME.localhost:PORT`.
fn name_in(public_url: &str) -> &str {
    public_url
        .trim_start_matches("http://")
        .split('.')
        .next()
        .expect("a host")
}

/// Waits for `client` to connect again, and returns the name it got.
async fn reconnected(client: &mut TestClient) -> String {
    let event = client
        .wait_for("the reconnect", |e| {
            matches!(e, ferry::Event::Connected { .. })
        })
        .await;
    let ferry::Event::Connected { public_url, .. } = event else {
        unreachable!("wait_for returns a matching event")
    };
    name_in(&public_url).to_owned()
}

/// A relay of the fleet on the database at `url` as a process of its own,
/// for a test to kill with SIGKILL: a lease of 1 s, and `extra` flags.
async fn doomed_relay(url: &str, extra: &[&str]) -> ferry_tests::fleet::RelayProcess {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port();
    let cluster = format!("127.0.0.1:{port}");
    let advertise = format!("http://{cluster}");
    let mut args = vec![
        "--database-url",
        url,
        "--cluster-listen",
        &cluster,
        "--advertise-url",
        &advertise,
        "--cluster-secret",
        FLEET_SECRET,
        "--cluster-lease",
        "1s",
    ];
    args.extend_from_slice(extra);
    let args: Vec<String> = args.into_iter().map(str::to_owned).collect();
    ferry_tests::fleet::RelayProcess::start(&args).await
}

#[tokio::test]
async fn when_a_relay_dies_its_clients_keep_their_names_on_another_and_its_leases_end() {
    const SHORT_LEASE: Duration = Duration::from_secs(1);
    let url = ferry_tests::postgres::fresh_database().await;
    // The relay that dies is a process of its own, killed with SIGKILL.
    let doomed = doomed_relay(&url, &["--trusted-proxy", "127.0.0.1/32"]).await;
    let survivor = TestRelay::start_in_fleet(
        ferry_relay::Config {
            database_url: Some(url),
            trusted_proxies: vec!["127.0.0.1/32".parse().expect("network")],
            ..ferry_relay::Config::default()
        },
        SHORT_LEASE,
    )
    .await;
    // Clients reach the fleet through HAProxy, which sends them to the
    // doomed relay while it is up.
    let haproxy = ferry_tests::fleet::HaProxy::start(&[doomed.addr, survivor.addr]).await;
    let (origin, _) = recording_origin("alive").await;
    let through_haproxy = |subdomain, key: Option<&str>| ClientOptions {
        subdomain: Some(subdomain),
        client_key: key.map(str::to_owned),
        relay_url: Some(ferry_common::handshake::connect_url(haproxy.addr)),
        ..ClientOptions::default()
    };
    let mut keyed = TestClient::start(
        &survivor,
        &origin.target(),
        through_haproxy("keeper", Some("the-keepers-key")),
    )
    .await;
    // A client connected to the doomed relay itself, not through HAProxy:
    // it never comes back, and its name is free once the lease ends.
    let stranded = TestClient::start(
        &survivor,
        &origin.target(),
        ClientOptions {
            subdomain: Some("stranded"),
            relay_url: Some(ferry_common::handshake::connect_url(doomed.addr)),
            ..ClientOptions::default()
        },
    )
    .await;
    let get = |name: &'static str| {
        let (addr, host) = (survivor.addr, host_on(name, &survivor));
        async move { send(addr, &host, Request::new(empty())).await.status() }
    };
    assert_eq!(
        get("keeper").await,
        StatusCode::OK,
        "forwarded to the doomed relay"
    );
    let tunnels = Api::of(&survivor).get_json("/api/v1/tunnels").await;
    assert!(!tunnels.to_string().contains("keeper"), "{tunnels}");

    doomed.kill().await;
    let killed = tokio::time::Instant::now();
    assert_eq!(reconnected(&mut keyed).await, "keeper");
    assert_eq!(
        get("keeper").await,
        StatusCode::OK,
        "served by the survivor"
    );
    // Until the lease ends the survivor still sends `stranded`'s requests
    // to the dead relay (502); then its callers get the offline answer
    // (503): the name is held for its owner, as a relay restarted after a
    // crash holds what it served.
    let mut statuses = Vec::new();
    within("the dead relay's lease to end", async {
        loop {
            let status = get("stranded").await;
            if statuses.last() != Some(&status) {
                statuses.push(status);
            }
            if status == StatusCode::SERVICE_UNAVAILABLE {
                break;
            }
        }
    })
    .await;
    let freed = killed.elapsed();
    assert!(
        statuses
            .iter()
            .all(|s| [StatusCode::BAD_GATEWAY, StatusCode::SERVICE_UNAVAILABLE].contains(s)),
        "{statuses:?}"
    );
    assert!(freed <= SHORT_LEASE * 3, "freed {freed:?} after the kill");
    println!("the dead relay's leases ended {freed:?} after SIGKILL (lease {SHORT_LEASE:?})");

    drop(stranded);
    keyed.stop().await.expect("client stops");
    origin.stop().await;
    survivor.stop().await;
}

#[tokio::test]
async fn a_name_whose_relay_died_stays_held_for_its_owner_and_its_callers_are_recorded_for_them() {
    let url = ferry_tests::postgres::fresh_database().await;
    let doomed = doomed_relay(&url, &[]).await;
    let survivor = TestRelay::start_in_fleet(
        ferry_relay::Config {
            database_url: Some(url),
            ..ferry_relay::Config::default()
        },
        Duration::from_secs(1),
    )
    .await;
    let (origin, _) = recording_origin("back").await;
    let owner = ClientOptions {
        subdomain: Some("crashed"),
        client_key: Some("the-owners-key".to_owned()),
        relay_url: Some(ferry_common::handshake::connect_url(doomed.addr)),
        ..ClientOptions::default()
    };
    let client = TestClient::start(&survivor, &origin.target(), owner.clone()).await;
    doomed.kill().await;

    // The dead relay saved no hold: its session's row says whose the name
    // was. Callers get 502 while the lease lasts, then the offline answer
    // (not 404), recorded for the owner.
    let mut tail = Api::of(&survivor).tail("").await;
    let host = host_on("crashed", &survivor);
    let status = within("the dead relay's lease to end", async {
        loop {
            let status = send(survivor.addr, &host, Request::new(empty()))
                .await
                .status();
            if status != StatusCode::BAD_GATEWAY {
                break status;
            }
        }
    })
    .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    let offline = within("the offline answer recorded", async {
        loop {
            let (_, item) = tail.next_item().await;
            if item["outcome"] != "relay_unreachable" && item["status"] != 502 {
                break item;
            }
        }
    })
    .await;
    assert_eq!(offline["outcome"], "client_offline", "{offline}");
    assert_eq!(offline["tunnel"], "crashed");

    // A stranger is refused; the owner gets its name back.
    let mut attempt = TestClient::spawn(
        &survivor,
        &origin.target(),
        ClientOptions {
            client_key: Some("a-strangers-key".to_owned()),
            relay_url: None,
            ..owner.clone()
        },
    );
    while let Some(event) = attempt.next_event().await {
        assert!(
            !matches!(event, ferry::Event::Connected { .. }),
            "the stranger got a dead relay's name"
        );
    }
    let refused = attempt
        .finished()
        .await
        .expect_err("the stranger is refused")
        .to_string();
    assert!(
        refused.contains("held for the client that used it last"),
        "{refused}"
    );
    let back = TestClient::start(
        &survivor,
        &origin.target(),
        ClientOptions {
            relay_url: None,
            ..owner
        },
    )
    .await;
    assert_eq!(back.name, "crashed");

    drop(client);
    back.stop().await.expect("client stops");
    origin.stop().await;
    survivor.stop().await;
}

/// An origin whose WebSockets echo every message.
async fn echo_origin() -> Origin {
    use futures_util::{SinkExt, StreamExt};
    use hyper::header;
    Origin::start(|mut req: Request<hyper::body::Incoming>| async move {
        let key = req
            .headers()
            .get(header::SEC_WEBSOCKET_KEY)
            .cloned()
            .expect("a WebSocket handshake");
        let on_upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            let Ok(upgraded) = on_upgrade.await else {
                return;
            };
            let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
                TokioIo::new(upgraded),
                tokio_tungstenite::tungstenite::protocol::Role::Server,
                None,
            )
            .await;
            while let Some(Ok(message)) = ws.next().await {
                if (message.is_text() || message.is_binary()) && ws.send(message).await.is_err() {
                    break;
                }
            }
        });
        Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header(header::UPGRADE, "websocket")
            .header(header::CONNECTION, "Upgrade")
            .header(
                header::SEC_WEBSOCKET_ACCEPT,
                tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes()),
            )
            .body(empty())
            .expect("response")
    })
    .await
}

#[tokio::test]
async fn a_websocket_through_another_relay_reaches_the_tunnel_and_is_logged_there() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let relays = fleet(2, ferry_relay::Config::default()).await;
    let origin = echo_origin().await;
    let client = TestClient::start(&relays[0], &origin.target(), ClientOptions::default()).await;
    let mut tail = Api::of(&relays[1]).tail("").await;

    let stream = tokio::net::TcpStream::connect(relays[1].addr)
        .await
        .expect("the relay accepts");
    let url = format!("ws://{}/socket", host_on(&client.name, &relays[1]));
    let (mut ws, response) = within(
        "the websocket handshake",
        tokio_tungstenite::client_async(url, stream),
    )
    .await
    .expect("a WebSocket through the other relay");
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
    for text in ["hello", "across the fleet"] {
        ws.send(Message::text(text)).await.expect("send");
        let echoed = within("the echo", ws.next())
            .await
            .expect("a message")
            .expect("message");
        assert_eq!(echoed, Message::text(text));
    }
    let binary: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 256) as u8).collect();
    ws.send(Message::binary(binary.clone()))
        .await
        .expect("send");
    let echoed = within("the binary echo", ws.next())
        .await
        .expect("a message")
        .expect("message");
    assert_eq!(echoed, Message::binary(binary));
    let (_, item) = tail.next_item().await;
    assert_eq!(item["path"], "/socket");
    assert_eq!(item["status"], 101);
    drop(ws);

    client.stop().await.expect("client stops");
    origin.stop().await;
    for relay in relays {
        relay.stop().await;
    }
}

#[tokio::test]
async fn while_the_database_is_down_each_relay_serves_its_own_tunnels_and_says_why_for_the_rest_until_it_is_back(
) {
    let (server, url) = ferry_tests::postgres::PgServer::own().await;
    let mut relays = Vec::new();
    for _ in 0..2 {
        let config = ferry_relay::Config {
            database_url: Some(url.clone()),
            ..ferry_relay::Config::default()
        };
        relays.push(TestRelay::start_in_fleet(config, LEASE).await);
    }
    let (origin, _) = recording_origin("here").await;
    let client = TestClient::start(&relays[0], &origin.target(), ClientOptions::default()).await;
    let get = |relay: &TestRelay| {
        let (addr, host) = (relay.addr, host_on(&client.name, relay));
        async move { send(addr, &host, Request::new(empty())).await }
    };
    assert_eq!(get(&relays[1]).await.status(), StatusCode::OK);

    server.pause().await;
    assert_eq!(
        get(&relays[0]).await.status(),
        StatusCode::OK,
        "a relay's own tunnels need no database"
    );
    let response = get(&relays[1]).await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(response.headers().contains_key("retry-after"));
    let body = String::from_utf8(read_body(response.into_body()).await).expect("text");
    assert!(body.contains("cannot reach the fleet's database"), "{body}");

    // Back up, the pool finds its connections broken and makes new ones;
    // each answer until then is the same 503.
    server.resume().await;
    within("forwarding to work again", async {
        loop {
            let status = get(&relays[1]).await.status();
            if status == StatusCode::OK {
                break;
            }
            assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        }
    })
    .await;

    client.stop().await.expect("client stops");
    origin.stop().await;
    for relay in relays {
        relay.stop().await;
    }
}

#[tokio::test]
async fn a_name_held_for_its_owner_is_kept_from_others_and_its_callers_recorded_on_every_relay() {
    let relays = fleet(2, ferry_relay::Config::default()).await;
    let (origin, _) = recording_origin("kept").await;
    let owner = ClientOptions {
        subdomain: Some("kept"),
        client_key: Some("the-owners-key".to_owned()),
        ..ClientOptions::default()
    };
    let client = TestClient::start(&relays[0], &origin.target(), owner.clone()).await;
    client.stop().await.expect("client stops");

    // A stranger on the other relay is refused: while the session's row
    // lives because the name is in use, once it is gone because the name
    // is held for its owner. Each refusal is an answer to wait on.
    let stranger = ClientOptions {
        client_key: Some("a-strangers-key".to_owned()),
        ..owner.clone()
    };
    within("the refusal to say the name is held", async {
        loop {
            let mut attempt = TestClient::spawn(&relays[1], &origin.target(), stranger.clone());
            while let Some(event) = attempt.next_event().await {
                assert!(
                    !matches!(event, ferry::Event::Connected { .. }),
                    "the stranger got the name"
                );
            }
            let refused = attempt
                .finished()
                .await
                .expect_err("the stranger is refused")
                .to_string();
            assert!(refused.contains("409"), "{refused}");
            if refused.contains("held for the client that used it last") {
                break;
            }
        }
    })
    .await;

    // Its callers get the offline answer at either relay, recorded.
    let mut tail = Api::of(&relays[1]).tail("").await;
    let response = send(
        relays[1].addr,
        &host_on("kept", &relays[1]),
        Request::post("/while-away")
            .body(full("missed"))
            .expect("request"),
    )
    .await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    let (_, item) = tail.next_item().await;
    assert_eq!(item["path"], "/while-away");
    assert_eq!(item["outcome"], "client_offline");

    // The owner gets it back on the other relay.
    let back = TestClient::start(&relays[1], &origin.target(), owner).await;
    assert_eq!(back.name, "kept");

    back.stop().await.expect("client stops");
    origin.stop().await;
    for relay in relays {
        relay.stop().await;
    }
}

#[tokio::test]
async fn an_account_holds_no_more_tunnels_on_the_whole_fleet_than_on_one_relay() {
    let relays = fleet(
        2,
        ferry_relay::Config {
            tokens: vec![ferry_relay::Token::new("alices-token")],
            max_tunnels_per_token: 1,
            ..ferry_relay::Config::default()
        },
    )
    .await;
    let (origin, _) = recording_origin("one").await;
    let alice = |subdomain| ClientOptions {
        token: Some("alices-token".to_owned()),
        subdomain: Some(subdomain),
        ..ClientOptions::default()
    };
    let first = TestClient::start(&relays[0], &origin.target(), alice("first")).await;
    // A second tunnel on the other relay, which holds none of hers, is
    // still one too many.
    let refused = within(
        "the second tunnel to be refused",
        TestClient::spawn(&relays[1], &origin.target(), alice("second")).finished(),
    )
    .await
    .expect_err("one tunnel is the limit")
    .to_string();
    assert!(refused.contains("429"), "{refused}");
    assert!(refused.contains("relays of this fleet"), "{refused}");
    // Taking her own name over on the other relay adds none.
    let moved = TestClient::start(&relays[1], &origin.target(), alice("first")).await;
    assert_eq!(moved.name, "first");
    let ended = within("the old session to end", first.finished()).await;
    assert!(ended.is_err(), "closed by the takeover");

    moved.stop().await.expect("client stops");
    origin.stop().await;
    for relay in relays {
        relay.stop().await;
    }
}

#[tokio::test]
async fn a_caller_asking_for_names_no_relay_serves_stops_costing_database_queries() {
    let relays = fleet(
        2,
        ferry_relay::Config {
            cluster: Some(ferry_relay::config::Cluster {
                advertise_url: String::new(),
                secret: ferry_relay::cluster::Secret::new(FLEET_SECRET),
                lease: LEASE,
                unknown_names_per_minute: 3,
                max_connections_per_ip:
                    ferry_relay::config::Cluster::DEFAULT_MAX_CONNECTIONS_PER_IP,
                first_request_timeout: ferry_relay::config::Cluster::DEFAULT_FIRST_REQUEST_TIMEOUT,
            }),
            ..ferry_relay::Config::default()
        },
    )
    .await;
    let (origin, _) = recording_origin("served").await;
    let client = TestClient::start(&relays[0], &origin.target(), ClientOptions::default()).await;
    let (scanner, other) = (Ipv4Addr::new(127, 0, 0, 8), Ipv4Addr::new(127, 0, 0, 9));
    let get = |from: Ipv4Addr, name: String| {
        let (addr, host) = (relays[1].addr, host_on(&name, &relays[1]));
        async move { send_from(from, addr, &host, Request::new(empty())).await }
    };
    // A scanner trying made-up names: each is a lookup, until its share
    // is spent.
    for i in 0..3 {
        let response = get(scanner, format!("made-up-{i}")).await;
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
    }
    let response = get(scanner, "made-up-3".to_owned()).await;
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(response.headers().contains_key("retry-after"));
    let body = String::from_utf8(read_body(response.into_body()).await).expect("text");
    assert!(body.contains("no relay of this fleet serves"), "{body}");
    // Others are not refused, and neither are the scanner's requests to
    // the relay's own tunnels, which need no lookup.
    assert_eq!(
        get(other, client.name.clone()).await.status(),
        StatusCode::OK
    );
    let own = send_from(
        scanner,
        relays[0].addr,
        &host_on(&client.name, &relays[0]),
        Request::new(empty()),
    )
    .await;
    assert_eq!(own.status(), StatusCode::OK);

    client.stop().await.expect("client stops");
    origin.stop().await;
    for relay in relays {
        relay.stop().await;
    }
}

#[tokio::test]
async fn deliveries_into_a_tunnel_another_relay_serves_arrive_through_that_relay_once() {
    const EVENTS: usize = 30;
    let relays = fleet(3, ferry_relay::Config::default()).await;
    let (origin, mut received) = recording_origin("ok").await;
    let client = TestClient::start(&relays[0], &origin.target(), ClientOptions::default()).await;
    let name = client
        .public_url
        .trim_start_matches("http://")
        .split('.')
        .next()
        .expect("a name")
        .to_owned();
    let apis: Vec<Api> = relays.iter().map(Api::of).collect();
    let (status, webhook) = apis[1]
        .post_json(
            "/api/v1/webhooks",
            &serde_json::json!({
                "name": "into the tunnel",
                "url": format!("http://{}/hook", host_on(&name, &relays[0])),
                "actions": ["*"],
            }),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{webhook}");
    let webhook = webhook["id"].as_str().expect("an id").to_owned();
    // Posted to the relays that do not serve the tunnel: their workers
    // take most of the deliveries.
    for n in 0..EVENTS {
        let event = serde_json::json!({"type": "document.create", "id": format!("ev-{n}"), "data": {"n": n}});
        let (status, accepted) = apis[1 + n % 2].post_json("/api/v1/events", &event).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{accepted}");
    }

    let mut ids = HashSet::new();
    for _ in 0..EVENTS {
        let (headers, _) = within("a delivery through the tunnel", received.recv())
            .await
            .expect("the origin runs");
        let id = headers
            .get("webhook-id")
            .and_then(|v| v.to_str().ok())
            .expect("a webhook-id")
            .to_owned();
        assert!(ids.insert(id.clone()), "{id} arrived twice");
        assert_eq!(
            headers.get("ferry-event-type").and_then(|v| v.to_str().ok()),
            Some("document.create"),
            "a delivery through another relay keeps its event type, as one through a tunnel of its own"
        );
    }
    let path = format!("/api/v1/webhooks/{webhook}/deliveries?limit=100");
    let deliveries = within("every delivery succeeded", async {
        loop {
            let page = apis[2].get_json(&path).await;
            let items = page["items"].as_array().cloned().unwrap_or_default();
            if items.len() == EVENTS && items.iter().all(|d| d["state"] == "succeeded") {
                return items;
            }
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert!(
        deliveries.iter().all(|d| d["attempts"] == 1),
        "{deliveries:?}"
    );
    assert!(received.try_recv().is_err(), "nothing arrived twice");
    // Each relay's /metrics shows its share of the attempts.
    let mut shares = Vec::new();
    for api in &apis {
        let (_, metrics) = api.get("/metrics").await;
        let metrics = String::from_utf8_lossy(&metrics).into_owned();
        let attempts: u64 = metrics
            .lines()
            .find_map(|line| line.strip_prefix("ferry_dispatch_attempts_total "))
            .and_then(|n| n.trim().parse().ok())
            .expect("ferry_dispatch_attempts_total");
        shares.push(attempts);
    }
    assert_eq!(shares.iter().sum::<u64>(), EVENTS as u64, "{shares:?}");

    client.stop().await.expect("client stops");
    origin.stop().await;
    for relay in relays {
        relay.stop().await;
    }
}
