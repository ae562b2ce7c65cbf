//! Review findings: each test states what the relay should do and fails
//! where it does not.

use std::io::Write as _;
use std::time::Instant;

use ferry_tests::{
    empty, full, host_of, read_body, send, within, Api, Body, ClientOptions, Origin, TestClient,
    TestRelay,
};
use hyper::{Request, Response, StatusCode};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::mpsc;

fn two_accounts() -> ferry_relay::Config {
    ferry_relay::Config {
        tokens: vec![
            ferry_relay::Token::new("token-alice"),
            ferry_relay::Token::new("token-bob"),
        ],
        ..ferry_relay::Config::default()
    }
}

fn with_token(token: &str) -> ClientOptions {
    ClientOptions {
        token: Some(token.to_owned()),
        ..ClientOptions::default()
    }
}

/// Opens the live tail with `Last-Event-ID: id` and returns the status.
async fn tail_status(api: &Api, id: &str) -> StatusCode {
    let mut request = api.request("GET", "/api/v1/requests/stream", empty());
    request
        .headers_mut()
        .insert("last-event-id", id.parse().expect("header"));
    api.send(request).await.status()
}

/// docs/api.md: "Any other entry answers 404, exactly as an id that does
/// not exist, so ids reveal nothing." The live tail's Last-Event-ID is
/// looked up without the owner.
#[tokio::test]
async fn last_event_id_does_not_reveal_another_accounts_ids() {
    let relay = TestRelay::start(two_accounts()).await;
    let origin = Origin::start(|_req| async { Response::new(full("ok")) }).await;
    let alice = TestClient::start(&relay, &origin.target(), with_token("token-alice")).await;
    let (alice_api, bob_api) = (
        Api::with_token(&relay, "token-alice"),
        Api::with_token(&relay, "token-bob"),
    );
    let mut tail = alice_api.tail("").await;
    let response = send(
        relay.addr,
        &host_of(&alice.public_url),
        Request::new(empty()),
    )
    .await;
    read_body(response.into_body()).await;
    let (alices, _) = tail.next_item().await;
    drop(tail);

    let foreign = tail_status(&bob_api, &alices).await;
    let missing = tail_status(&bob_api, "019ad2f0-7c1e-7a53-9d54-3b1f6f0e2a11").await;
    assert_eq!(
        foreign, missing,
        "bob tells alice's id ({foreign}) from a missing one ({missing})"
    );
    alice.stop().await.expect("client stops");
    origin.stop().await;
    relay.stop().await;
}

/// A caller that hangs up before the response head is logged as
/// `caller_hung_up`, not `answered` without a response.
#[tokio::test]
async fn a_caller_hanging_up_before_the_answer_is_not_logged_as_answered() {
    let relay = TestRelay::open().await;
    let (arrived_tx, mut arrived) = mpsc::channel::<()>(4);
    let origin = Origin::start(move |_req| {
        let arrived_tx = arrived_tx.clone();
        async move {
            let _ = arrived_tx.send(()).await;
            std::future::pending::<()>().await;
            Response::new(full("never"))
        }
    })
    .await;
    let client = TestClient::start(&relay, &origin.target(), ClientOptions::default()).await;
    let api = Api::of(&relay);
    let mut tail = api.tail("").await;
    let mut caller = TcpStream::connect(relay.addr).await.expect("connect");
    caller
        .write_all(
            format!(
                "GET /slow HTTP/1.1\r\nhost: {}\r\n\r\n",
                host_of(&client.public_url)
            )
            .as_bytes(),
        )
        .await
        .expect("write");
    within("the origin", arrived.recv()).await;
    drop(caller);
    let (_, item) = tail.next_item().await;
    assert_eq!(item["status"], serde_json::Value::Null);
    assert_eq!(item["outcome"], "caller_hung_up", "{item}");
    client.stop().await.expect("client stops");
    origin.stop().await;
    relay.stop().await;
}

/// HEAD, 204 and 304 answers end without a body; they are `answered`.
#[tokio::test]
async fn bodiless_answers_are_logged_as_answered() {
    let relay = TestRelay::open().await;
    let origin = Origin::start(|req| async move {
        let status = match req.uri().path() {
            "/204" => 204,
            "/304" => 304,
            _ => 200,
        };
        Response::builder()
            .status(status)
            .header("content-length", if status == 200 { "5" } else { "0" })
            .body(if req.method() == "HEAD" || status != 200 {
                empty()
            } else {
                full("hello")
            })
            .expect("response")
    })
    .await;
    let client = TestClient::start(&relay, &origin.target(), ClientOptions::default()).await;
    let api = Api::of(&relay);
    let mut tail = api.tail("").await;
    let mut outcomes = Vec::new();
    for (method, path) in [("HEAD", "/"), ("GET", "/204"), ("GET", "/304")] {
        let response = send(
            relay.addr,
            &host_of(&client.public_url),
            Request::builder()
                .method(method)
                .uri(path)
                .body(empty())
                .expect("request"),
        )
        .await;
        read_body(response.into_body()).await;
        let (_, item) = tail.next_item().await;
        outcomes.push(format!("{method} {path}: {}", item["outcome"]));
    }
    assert!(
        outcomes.iter().all(|o| o.ends_with("\"answered\"")),
        "{outcomes:?}"
    );
    client.stop().await.expect("client stops");
    origin.stop().await;
    relay.stop().await;
}

/// `--max-requests-per-ip` bounds what one caller holds in flight on a
/// name; a held (offline) name admits any number.
#[tokio::test]
async fn an_offline_name_admits_no_more_requests_per_caller_than_a_live_one() {
    let relay = TestRelay::start(ferry_relay::Config {
        max_requests_per_ip: 1,
        ..ferry_relay::Config::default()
    })
    .await;
    let origin = Origin::start(|_req| async { Response::new(full("ok")) }).await;
    let client = TestClient::start(
        &relay,
        &origin.target(),
        ClientOptions {
            client_key: Some("0123456789abcdef0123456789abcdef".to_owned()),
            ..ClientOptions::default()
        },
    )
    .await;
    let host = host_of(&client.public_url);
    client.stop().await.expect("client stops");
    // One request in flight: its body is still coming.
    let mut first = TcpStream::connect(relay.addr).await.expect("connect");
    first
        .write_all(
            format!("POST /a HTTP/1.1\r\nhost: {host}\r\ncontent-length: 10\r\n\r\nhalf.")
                .as_bytes(),
        )
        .await
        .expect("write");
    let mut statuses = Vec::new();
    for _ in 0..5 {
        let response = send(
            relay.addr,
            &host,
            Request::post("/b").body(full("x")).expect("request"),
        )
        .await;
        statuses.push(response.status());
    }
    assert!(
        statuses.iter().all(|s| *s == StatusCode::TOO_MANY_REQUESTS),
        "while one request is in flight, the same caller got {statuses:?}"
    );
    drop(first);
    origin.stop().await;
    relay.stop().await;
}

fn gzip_of_zeros(len: usize) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..len >> 20 {
        encoder.write_all(&zeros).expect("to memory");
    }
    encoder.finish().expect("to memory")
}

/// One small stored entry should not make an answer (and the relay's
/// memory for it) a hundred times its size.
#[tokio::test]
async fn views_of_a_small_entry_stay_small() {
    let relay = TestRelay::open().await;
    let bomb = gzip_of_zeros(16 << 20);
    let stored = bomb.len();
    let origin = Origin::start(move |_req| {
        let bomb = bomb.clone();
        async move {
            Response::builder()
                .header("content-encoding", "gzip")
                .header("content-type", "text/plain")
                .body(full(bomb))
                .expect("response")
        }
    })
    .await;
    let client = TestClient::start(&relay, &origin.target(), ClientOptions::default()).await;
    let api = Api::of(&relay);
    let mut tail = api.tail("").await;
    let response = send(
        relay.addr,
        &host_of(&client.public_url),
        Request::new(empty()),
    )
    .await;
    read_body(response.into_body()).await;
    let (id, _) = tail.next_item().await;
    let mut sizes = Vec::new();
    for path in [
        format!("/api/v1/requests/{id}"),
        format!("/api/v1/requests/{id}/har"),
        "/api/v1/requests/har".to_owned(),
    ] {
        let started = Instant::now();
        let (status, body) = api.get(&path).await;
        assert_eq!(status, StatusCode::OK);
        sizes.push((path, body.len(), started.elapsed()));
    }
    eprintln!("stored body {stored} bytes; answers: {sizes:?}");
    assert!(
        sizes.iter().all(|(_, len, _)| *len < 100 * stored),
        "stored {stored} bytes, answered {sizes:?}"
    );
    client.stop().await.expect("client stops");
    origin.stop().await;
    relay.stop().await;
}

#[tokio::test]
async fn a_search_costs_the_searcher_not_the_whole_log() {
    let dir = tempfile::tempdir().expect("dir");
    {
        use ferry_relay::store::{ActivityLog, CapturedBody, Exchange, Header, Kind, Outcome};
        let store =
            ferry_relay::store::sqlite::Sqlite::open(&dir.path().join("ferry.db")).expect("store");
        let text: String = "hello world, lorem ipsum ".repeat(160);
        for _ in 0..10 {
            let batch = (0..2000)
                .map(|_| Exchange {
                    id: ferry_common::ids::ExchangeId::new(),
                    tunnel: "alice".to_owned(),
                    owner: ferry_relay::AccountId::of_token("token-alice").to_string(),
                    kind: Kind::Tunnel,
                    replay_of: None,
                    received_at: ferry_relay::store::now_micros(),
                    method: "POST".to_owned(),
                    url: "http://alice.localhost/hook".to_owned(),
                    http_version: "HTTP/1.1".to_owned(),
                    remote_addr: "127.0.0.1:1".to_owned(),
                    request_headers: vec![Header {
                        name: "content-type".to_owned(),
                        value: b"text/plain".to_vec(),
                    }],
                    request_body: CapturedBody {
                        size: text.len() as u64,
                        bytes: text.clone().into(),
                        truncated: false,
                    },
                    response: None,
                    responded_at: None,
                    done_at: Some(1),
                    outcome: Outcome::Answered,
                    error: None,
                    incomplete: false,
                    replayed_at: None,
                    dispatch: None,
                })
                .collect();
            within("append", store.append(batch)).await.expect("append");
        }
        // Bob has one entry of his own.
        let mut own = store
            .list(&ferry_relay::store::Filter::default(), None, 1, true)
            .await
            .expect("list");
        own[0].id = ferry_common::ids::ExchangeId::new();
        own[0].owner = ferry_relay::AccountId::of_token("token-bob").to_string();
        store.append(own.into()).await.expect("append");
        let conn = rusqlite::Connection::open(dir.path().join("ferry.db")).expect("open");
        let counted: i64 = conn
            .query_row("SELECT SUM(stored_size) FROM exchanges", [], |r| r.get(0))
            .expect("sum");
        let pages: i64 = conn
            .query_row("PRAGMA page_count", [], |r| r.get(0))
            .expect("pages");
        // The index fills in the background: it may be empty yet.
        let index: i64 = conn
            .query_row(
                "SELECT COALESCE(SUM(length(block)), 0) FROM exchange_search_data",
                [],
                |r| r.get(0),
            )
            .expect("index");
        let content: i64 = conn
            .query_row(
                "SELECT COALESCE(SUM(length(c0)), 0) FROM exchange_search_content",
                [],
                |r| r.get(0),
            )
            .expect("content");
        eprintln!(
            "retention counts {counted} bytes; the file holds {} bytes; search index {index}, its copy of the text {content}",
            pages * 4096
        );
    }
    let relay = TestRelay::start(ferry_relay::Config {
        data_dir: dir.path().to_owned(),
        ..two_accounts()
    })
    .await;
    let bob = Api::with_token(&relay, "token-bob");
    let started = Instant::now();
    let (status, _) = bob.get("/api/v1/requests").await;
    assert_eq!(status, StatusCode::OK);
    let plain = started.elapsed();
    let started = Instant::now();
    let (status, body) = bob.get("/api/v1/requests?q=hello_world").await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    let search = started.elapsed();
    eprintln!("bob, who has one entry: list {plain:?}, search {search:?}");
    // Six searches of bob's at once; alice lists her newest entry.
    let searches: Vec<_> = (0..12)
        .map(|_| {
            let bob = bob.clone();
            tokio::spawn(async move { bob.get("/api/v1/requests?q=hello_world").await })
        })
        .collect();
    let alice = Api::with_token(&relay, "token-alice");
    let mut times = Vec::new();
    for _ in 0..5 {
        let started = Instant::now();
        let (status, _) = alice.get("/api/v1/requests?limit=1").await;
        assert_eq!(status, StatusCode::OK);
        times.push(started.elapsed());
    }
    eprintln!("alice's one-item lists while bob searches: {times:?}");
    for search in searches {
        search.await.expect("search");
    }
    assert!(
        search < plain * 20 + std::time::Duration::from_millis(50),
        "list {plain:?}, search {search:?}"
    );
    relay.stop().await;
}

#[allow(dead_code)]
fn _unused(_: Body) {}

/// The log records what the caller got: a WebSocket upgrade is a 101.
#[tokio::test]
async fn a_websocket_upgrade_is_logged_with_the_status_the_caller_saw() {
    use hyper::header;
    let relay = TestRelay::open().await;
    let origin = Origin::start(|mut req: Request<hyper::body::Incoming>| async move {
        let key = req
            .headers()
            .get(header::SEC_WEBSOCKET_KEY)
            .cloned()
            .expect("a key");
        let on_upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            let _ = on_upgrade.await;
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
    .await;
    let client = TestClient::start(&relay, &origin.target(), ClientOptions::default()).await;
    let api = Api::of(&relay);
    let mut tail = api.tail("").await;
    let stream = TcpStream::connect(relay.addr).await.expect("relay accepts");
    let url = format!("ws://{}/socket", host_of(&client.public_url));
    let (ws, response) = within(
        "the websocket handshake",
        tokio_tungstenite::client_async(url, stream),
    )
    .await
    .expect("handshake");
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
    let (id, item) = tail.next_item().await;
    let detail = api.get_json(&format!("/api/v1/requests/{id}")).await;
    drop(ws);
    assert_eq!(
        item["status"], 101,
        "the caller saw 101; the log says {} with headers {}",
        item["status"], detail["response"]["headers"]
    );
    client.stop().await.expect("client stops");
    origin.stop().await;
    relay.stop().await;
}

/// A stranger's request with a large header block is refused (431) but
/// stored whole; every list page then loads those headers.
#[tokio::test]
async fn a_header_block_beyond_twice_the_tunnel_limit_is_refused_unread_and_not_stored() {
    let relay = TestRelay::open().await;
    let origin = Origin::start(|_req| async { Response::new(full("ok")) }).await;
    let client = TestClient::start(&relay, &origin.target(), ClientOptions::default()).await;
    let api = Api::of(&relay);
    let mut tail = api.tail("").await;
    let big = "a".repeat(300_000);
    let response = send(
        relay.addr,
        &host_of(&client.public_url),
        Request::get("/big")
            .header("x-big", big)
            .body(empty())
            .expect("request"),
    )
    .await;
    assert_eq!(
        response.status(),
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
    );
    let response = send(
        relay.addr,
        &host_of(&client.public_url),
        Request::get("/after").body(empty()).expect("request"),
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    let (_, item) = tail.next_item().await;
    assert_eq!(
        item["path"], "/after",
        "the oversized request left no entry"
    );
    client.stop().await.expect("client stops");
    origin.stop().await;
    relay.stop().await;
}

/// What `--retention-max-bytes` counts should be what the file holds.
#[tokio::test]
async fn retention_counts_what_the_search_index_holds() {
    use ferry_relay::store::{ActivityLog, CapturedBody, Exchange, Header, Kind, Outcome};
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("ferry.db");
    let store = ferry_relay::store::sqlite::Sqlite::open(&path).expect("store");
    let mut seed: u64 = 1;
    let mut noise = |len: usize| -> Vec<u8> {
        (0..len)
            .map(|_| {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                b"abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
                    [(seed >> 33) as usize % 62]
            })
            .collect()
    };
    let started = Instant::now();
    let as_body = std::env::var("REVIEW_AS_BODY").is_ok();
    for _ in 0..4 {
        let batch = (0..50)
            .map(|_| Exchange {
                id: ferry_common::ids::ExchangeId::new(),
                tunnel: "demo".to_owned(),
                owner: String::new(),
                kind: Kind::Tunnel,
                replay_of: None,
                received_at: ferry_relay::store::now_micros(),
                method: "GET".to_owned(),
                url: "http://demo.localhost/".to_owned(),
                http_version: "HTTP/1.1".to_owned(),
                remote_addr: "127.0.0.1:1".to_owned(),
                request_headers: if as_body {
                    Vec::new()
                } else {
                    vec![Header {
                        name: "x-big".to_owned(),
                        value: noise(300_000),
                    }]
                },
                request_body: if as_body {
                    CapturedBody {
                        size: 300_000,
                        bytes: noise(300_000).into(),
                        truncated: false,
                    }
                } else {
                    CapturedBody::default()
                },
                response: None,
                responded_at: None,
                done_at: Some(1),
                outcome: Outcome::RelayLimit,
                error: None,
                incomplete: false,
                replayed_at: None,
                dispatch: None,
            })
            .collect();
        store.append(batch).await.expect("append");
    }
    eprintln!("200 entries of 300 kB written in {:?}", started.elapsed());
    drop(store);
    let conn = rusqlite::Connection::open(&path).expect("open");
    conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")
        .expect("checkpoint");
    let counted: i64 = conn
        .query_row("SELECT SUM(stored_size) FROM exchanges", [], |r| r.get(0))
        .expect("sum");
    let file = std::fs::metadata(&path).expect("file").len() as i64;
    eprintln!("retention counts {counted} bytes; the file holds {file}");
    assert!(file < counted * 3 / 2, "counted {counted}, on disk {file}");
}

async fn dropped(api: &Api) -> u64 {
    let (_, metrics) = api.get("/metrics").await;
    String::from_utf8_lossy(&metrics)
        .lines()
        .find_map(|l| l.strip_prefix("ferry_capture_dropped_total "))
        .and_then(|n| n.parse().ok())
        .expect("the counter")
}

/// Strangers sending refused requests with large header blocks must not
/// make the relay lose other callers' entries.
#[tokio::test]
async fn strangers_big_headers_do_not_crowd_other_entries_out_of_the_log() {
    let relay = TestRelay::open().await;
    let origin = Origin::start(|_req| async { Response::new(full("ok")) }).await;
    let client = TestClient::start(&relay, &origin.target(), ClientOptions::default()).await;
    let host = host_of(&client.public_url);
    let api = Api::of(&relay);
    let mut seed: u64 = 7;
    for _ in 0..260 {
        let value: String = (0..300_000)
            .map(|_| {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                char::from(b"abcdefghijklmnopqrstuvwxyz0123456789"[(seed >> 33) as usize % 36])
            })
            .collect();
        let response = send(
            relay.addr,
            &host,
            Request::get("/flood")
                .header("x-big", value)
                .body(empty())
                .expect("request"),
        )
        .await;
        assert_eq!(
            response.status(),
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
        );
    }
    let before = dropped(&api).await;
    let response = send(
        relay.addr,
        &host,
        Request::post("/real-webhook")
            .body(full("{}"))
            .expect("request"),
    )
    .await;
    read_body(response.into_body()).await;
    let after = dropped(&api).await;
    assert_eq!(
        before, 0,
        "a stranger's 431s made the relay drop {before} entries already"
    );
    assert_eq!(after, before, "the real webhook's entry was dropped");
    client.stop().await.expect("client stops");
    origin.stop().await;
    relay.stop().await;
}

/// The curl export sends every captured header; a field name may start
/// with `-` (a token character).
#[tokio::test]
async fn curl_export_keeps_a_header_whose_name_starts_with_a_dash() {
    use ferry_relay::store::{CapturedBody, Exchange, Header, Kind, Outcome};
    let exchange = Exchange {
        id: ferry_common::ids::ExchangeId::new(),
        tunnel: "demo".to_owned(),
        owner: String::new(),
        kind: Kind::Tunnel,
        replay_of: None,
        received_at: 1,
        method: "GET".to_owned(),
        url: "http://demo.localhost/".to_owned(),
        http_version: "HTTP/1.1".to_owned(),
        remote_addr: "127.0.0.1:1".to_owned(),
        request_headers: vec![Header {
            name: "-x".to_owned(),
            value: b"caf\xe9".to_vec(),
        }],
        request_body: CapturedBody::default(),
        response: None,
        responded_at: None,
        done_at: Some(1),
        outcome: Outcome::Answered,
        error: None,
        incomplete: false,
        replayed_at: None,
        dispatch: None,
    };
    let command = ferry_relay::activity::export::curl(&exchange, None).expect("a command");
    let script =
        format!("curl() {{ for a in \"$@\"; do printf '[%s]\\n' \"$a\"; done; }}\n{command}");
    let output = std::process::Command::new("sh")
        .arg("-c")
        .arg(&script)
        .output()
        .expect("sh runs");
    let args = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.stdout.windows(7).any(|w| w == b"[-x: ca"),
        "command:\n{command}\nargs curl got:\n{args}\nstderr: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// An HTTP/2 caller that grants no flow-control credit cannot keep API
/// answers (here HAR exports of a decompression bomb) held in the relay:
/// its connection is closed after the write timeout.
#[tokio::test]
async fn api_answers_to_a_caller_that_reads_nothing_are_not_held() {
    let relay = TestRelay::start(ferry_relay::Config {
        write_timeout: std::time::Duration::from_secs(1),
        ..ferry_relay::Config::default()
    })
    .await;
    let bomb = gzip_of_zeros(16 << 20);
    let origin = Origin::start(move |_req| {
        let bomb = bomb.clone();
        async move {
            Response::builder()
                .header("content-encoding", "gzip")
                .body(full(bomb))
                .expect("response")
        }
    })
    .await;
    let client = TestClient::start(&relay, &origin.target(), ClientOptions::default()).await;
    let api = Api::of(&relay);
    let mut tail = api.tail("").await;
    let response = send(
        relay.addr,
        &host_of(&client.public_url),
        Request::new(empty()),
    )
    .await;
    read_body(response.into_body()).await;
    let (id, _) = tail.next_item().await;
    let stream = TcpStream::connect(relay.addr).await.expect("connect");
    let (mut sender, connection) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .initial_stream_window_size(0)
            .initial_connection_window_size(65_535)
            .handshake::<_, Body>(hyper_util::rt::TokioIo::new(stream))
            .await
            .expect("h2 handshake");
    let connection = tokio::spawn(connection);
    let mut held = Vec::new();
    for _ in 0..ferry_relay::api::HEAVY_CALLS_PER_IP {
        let request = Request::builder()
            .uri(format!("http://{}/api/v1/requests/{id}/har", relay.addr))
            .body(empty())
            .expect("request");
        let response = within("an answer's head", sender.send_request(request))
            .await
            .expect("response");
        assert_eq!(response.status(), StatusCode::OK);
        held.push(response);
    }
    within("the relay to close the stalled connection", connection)
        .await
        .expect("connection task")
        .ok();
    drop(held);
    let (status, _) = api.get(&format!("/api/v1/requests/{id}/har")).await;
    assert_eq!(status, StatusCode::OK, "the relay serves on");
    client.stop().await.expect("client stops");
    origin.stop().await;
    relay.stop().await;
}

/// An origin that answers before reading the request body: the entry must
/// not present the part the relay read as the whole body.
#[tokio::test]
async fn a_request_body_cut_short_by_an_early_answer_is_not_logged_as_whole() {
    let relay = TestRelay::open().await;
    let origin = Origin::start(|_req| async {
        Response::builder()
            .status(413)
            .body(full("too big"))
            .expect("response")
    })
    .await;
    let client = TestClient::start(&relay, &origin.target(), ClientOptions::default()).await;
    let api = Api::of(&relay);
    let mut tail = api.tail("").await;
    const SENT: usize = 4 << 20;
    let mut caller = TcpStream::connect(relay.addr).await.expect("connect");
    let head = format!(
        "POST /upload HTTP/1.1\r\nhost: {}\r\ncontent-length: {SENT}\r\n\r\n",
        host_of(&client.public_url)
    );
    caller.write_all(head.as_bytes()).await.expect("head");
    // Write the body as far as the relay takes it.
    let writer = tokio::spawn(async move {
        let chunk = vec![b'z'; 64 * 1024];
        for _ in 0..SENT / chunk.len() {
            if caller.write_all(&chunk).await.is_err() {
                break;
            }
        }
        caller
    });
    let (id, item) = tail.next_item().await;
    let detail = api.get_json(&format!("/api/v1/requests/{id}")).await;
    let body = &detail["request"]["body"];
    eprintln!(
        "sent {SENT}: logged {item}\nbody size {} truncated {} incomplete {}",
        body["size"], body["truncated"], detail["incomplete"]
    );
    let (status, answer) = api
        .post_json(
            &format!("/api/v1/requests/{id}/replay"),
            &serde_json::json!({}),
        )
        .await;
    eprintln!("replaying it as is: {status} {answer}");
    assert!(
        body["size"] == SENT || detail["incomplete"] == true,
        "the log gives {} bytes as the body's true size (truncated: {}); {SENT} were announced and sent",
        body["size"],
        body["truncated"]
    );
    drop(writer);
    client.stop().await.expect("client stops");
    origin.stop().await;
    relay.stop().await;
}

/// `q` is "any case": a word found as written must be found.
#[tokio::test]
async fn a_search_finds_non_ascii_text_as_written() {
    use ferry_relay::store::{ActivityLog, CapturedBody, Exchange, Filter, Kind, Outcome};
    let dir = tempfile::tempdir().expect("dir");
    let store =
        ferry_relay::store::sqlite::Sqlite::open(&dir.path().join("ferry.db")).expect("store");
    let text = "Grüße aus ÄRGERNIS";
    store
        .append(
            vec![Exchange {
                id: ferry_common::ids::ExchangeId::new(),
                tunnel: "demo".to_owned(),
                owner: String::new(),
                kind: Kind::Tunnel,
                replay_of: None,
                received_at: 1,
                method: "POST".to_owned(),
                url: "http://demo.localhost/".to_owned(),
                http_version: "HTTP/1.1".to_owned(),
                remote_addr: "127.0.0.1:1".to_owned(),
                request_headers: Vec::new(),
                request_body: CapturedBody {
                    size: text.len() as u64,
                    bytes: text.as_bytes().to_vec().into(),
                    truncated: false,
                },
                response: None,
                responded_at: None,
                done_at: Some(1),
                outcome: Outcome::Answered,
                error: None,
                incomplete: false,
                replayed_at: None,
                dispatch: None,
            }]
            .into(),
        )
        .await
        .expect("append");
    let mut missed = Vec::new();
    for q in ["Grüße", "ÄRGERNIS", "ärgernis", "GRÜSSE"] {
        let filter = Filter {
            text: Some(q.to_owned()),
            ..Filter::default()
        };
        if store
            .list(&filter, None, 10, false)
            .await
            .expect("list")
            .is_empty()
        {
            missed.push(q);
        }
    }
    assert!(missed.is_empty(), "not found: {missed:?}");
}

/// HTTP/2 callers are captured to the byte, as HTTP/1.1 callers are.
#[tokio::test]
async fn http2_callers_are_captured_byte_exact() {
    use base64::Engine;
    let relay = TestRelay::open().await;
    let answer: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let sent: Vec<u8> = (0..200_000u32).map(|i| (i % 241) as u8).collect();
    let echo = answer.clone();
    let origin = Origin::start(move |req: Request<hyper::body::Incoming>| {
        let echo = echo.clone();
        async move {
            read_body(req.into_body()).await;
            Response::new(full(echo))
        }
    })
    .await;
    let client = TestClient::start(&relay, &origin.target(), ClientOptions::default()).await;
    let api = Api::of(&relay);
    let mut tail = api.tail("").await;
    let stream = TcpStream::connect(relay.addr).await.expect("connect");
    let (mut sender, connection) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .handshake::<_, Body>(hyper_util::rt::TokioIo::new(stream))
            .await
            .expect("h2");
    tokio::spawn(connection);
    let request = Request::post(format!("http://{}/h2?x=1", host_of(&client.public_url)))
        .body(full(sent.clone()))
        .expect("request");
    let response = within("h2 answer", sender.send_request(request))
        .await
        .expect("response");
    assert_eq!(read_body(response.into_body()).await, answer);
    let (id, item) = tail.next_item().await;
    let detail = api.get_json(&format!("/api/v1/requests/{id}")).await;
    let b64 = base64::engine::general_purpose::STANDARD;
    assert_eq!(item["outcome"], "answered");
    assert_eq!(detail["request"]["http_version"], "HTTP/2.0");
    assert_eq!(detail["request"]["body"]["base64"], b64.encode(&sent));
    assert_eq!(detail["response"]["body"]["base64"], b64.encode(&answer));
    client.stop().await.expect("client stops");
    origin.stop().await;
    relay.stop().await;
}
