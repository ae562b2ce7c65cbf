//! The activity log: capture to the byte, live tail, offline capture,
//! replay, scoping between accounts, and persistence.

use base64::Engine;
use ferry_tests::{
    empty, full, host_of, read_body, send, within, Api, Body, ClientOptions, Origin, TestClient,
    TestRelay,
};
use hyper::{Request, Response, StatusCode};
use serde_json::{json, Value};
use tokio::sync::mpsc;

/// What an origin received.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Received {
    method: String,
    path: String,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
}

impl Received {
    /// The values of header `name`, in order.
    fn values(&self, name: &str) -> Vec<Vec<u8>> {
        self.headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
            .collect()
    }
}

/// An origin that reports every request it receives and answers with
/// `answer`'s status, headers and body.
async fn recording_origin(
    answer: fn() -> Response<Body>,
) -> (Origin, mpsc::UnboundedReceiver<Received>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let origin = Origin::start(move |req: Request<hyper::body::Incoming>| {
        let tx = tx.clone();
        async move {
            let (parts, body) = req.into_parts();
            let body = read_body(body).await;
            let _ = tx.send(Received {
                method: parts.method.to_string(),
                path: parts
                    .uri
                    .path_and_query()
                    .map_or("/", |p| p.as_str())
                    .to_owned(),
                headers: parts
                    .headers
                    .iter()
                    .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
                    .collect(),
                body,
            });
            answer()
        }
    })
    .await;
    (origin, rx)
}

fn ok_answer() -> Response<Body> {
    Response::builder()
        .status(201)
        .header("x-answer", "one")
        .header("x-answer", "two")
        .body(full(&b"answer\x00\xffbytes"[..]))
        .expect("valid response")
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn binary_body() -> Vec<u8> {
    (0..=255u8).cycle().take(70_000).collect()
}

fn values(headers: &Value, name: &str) -> Vec<String> {
    headers
        .as_array()
        .expect("headers are a list")
        .iter()
        .filter(|h| h["name"] == name)
        .map(|h| h["value"].as_str().expect("text value").to_owned())
        .collect()
}

#[tokio::test]
async fn capture_keeps_bodies_and_header_values_byte_exact() {
    let relay = TestRelay::open().await;
    let (origin, mut received) = recording_origin(ok_answer).await;
    let client = TestClient::start(&relay, &origin.target(), ClientOptions::default()).await;
    let api = Api::of(&relay);
    let mut tail = api.tail("").await;

    let body = binary_body();
    let request = Request::builder()
        .method("POST")
        .uri("/hooks/stripe?event=charge&event=refund")
        .header("x-multi", "first")
        .header("x-other", "between")
        .header("x-multi", "second")
        .header("content-type", "application/octet-stream")
        .body(full(body.clone()))
        .expect("valid request");
    let response = send(relay.addr, &host_of(&client.public_url), request).await;
    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(
        read_body(response.into_body()).await,
        b"answer\x00\xffbytes"
    );
    let at_origin = within("the origin", received.recv())
        .await
        .expect("request");
    assert_eq!(at_origin.body, body);

    let (id, item) = tail.next_item().await;
    assert_eq!(item["id"], id.as_str());
    assert_eq!(item["tunnel"], client.name.as_str());
    assert_eq!(item["kind"], "tunnel");
    assert_eq!(item["method"], "POST");
    assert_eq!(item["path"], "/hooks/stripe?event=charge&event=refund");
    assert_eq!(item["status"], 201);
    assert_eq!(item["request_size"], 70_000);
    assert_eq!(item["response_size"], 13);
    assert_eq!(item["outcome"], "answered");

    let detail = api.get_json(&format!("/api/v1/requests/{id}")).await;
    let request = &detail["request"];
    assert_eq!(request["body"]["base64"], b64(&body));
    assert_eq!(request["body"]["truncated"], false);
    assert_eq!(values(&request["headers"], "x-multi"), ["first", "second"]);
    assert!(request["url"]
        .as_str()
        .expect("url")
        .ends_with("/hooks/stripe?event=charge&event=refund"));
    assert_eq!(request["http_version"], "HTTP/1.1");
    let response = &detail["response"];
    assert_eq!(response["status"], 201);
    assert_eq!(values(&response["headers"], "x-answer"), ["one", "two"]);
    assert_eq!(response["body"]["base64"], b64(b"answer\x00\xffbytes"));
    assert!(detail["timings"]["done_at"].is_string());

    let (status, raw) = api
        .get(&format!("/api/v1/requests/{id}/body/request"))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(raw, body, "the raw body download is the exact bytes");

    client.stop().await.expect("client stops");
    origin.stop().await;
    relay.stop().await;
}

#[tokio::test]
async fn a_body_beyond_the_capture_limit_streams_whole_and_is_kept_cut_with_its_true_size() {
    let relay = TestRelay::start(ferry_relay::Config {
        capture_body_limit: 64 * 1024,
        ..ferry_relay::Config::default()
    })
    .await;
    let (origin, mut received) = recording_origin(|| Response::new(full("ok"))).await;
    let client = TestClient::start(&relay, &origin.target(), ClientOptions::default()).await;
    let api = Api::of(&relay);
    let mut tail = api.tail("").await;

    let body: Vec<u8> = (0..10 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
    let response = send(
        relay.addr,
        &host_of(&client.public_url),
        Request::post("/upload")
            .body(full(body.clone()))
            .expect("request"),
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    let at_origin = within("the origin", received.recv())
        .await
        .expect("request");
    assert_eq!(
        at_origin.body.len(),
        body.len(),
        "the origin got all 10 MiB"
    );
    assert!(at_origin.body == body);

    let (id, item) = tail.next_item().await;
    assert_eq!(item["request_size"], 10 * 1024 * 1024);
    let detail = api.get_json(&format!("/api/v1/requests/{id}")).await;
    let kept = &detail["request"]["body"];
    assert_eq!(kept["truncated"], true);
    assert_eq!(kept["size"], 10 * 1024 * 1024);
    assert_eq!(kept["captured"], 64 * 1024);
    assert_eq!(kept["base64"], b64(&body[..64 * 1024]));

    client.stop().await.expect("client stops");
    origin.stop().await;
    relay.stop().await;
}

#[tokio::test]
async fn a_gzip_body_is_stored_as_sent_with_a_decoded_view() {
    fn gzipped() -> Response<Body> {
        use std::io::Write;
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        encoder
            .write_all(br#"{"event":"invoice.paid"}"#)
            .expect("compress");
        Response::builder()
            .header("content-encoding", "gzip")
            .header("content-type", "application/json")
            .body(full(encoder.finish().expect("compress")))
            .expect("response")
    }
    let relay = TestRelay::open().await;
    let (origin, _received) = recording_origin(gzipped).await;
    let client = TestClient::start(&relay, &origin.target(), ClientOptions::default()).await;
    let api = Api::of(&relay);
    let mut tail = api.tail("").await;
    let response = send(
        relay.addr,
        &host_of(&client.public_url),
        Request::new(empty()),
    )
    .await;
    let sent = read_body(response.into_body()).await;
    let (id, _) = tail.next_item().await;
    let detail = api.get_json(&format!("/api/v1/requests/{id}")).await;
    let body = &detail["response"]["body"];
    assert_eq!(body["base64"], b64(&sent), "stored as sent, compressed");
    assert_eq!(body["decoded"]["text"], r#"{"event":"invoice.paid"}"#);
    client.stop().await.expect("client stops");
    origin.stop().await;
    relay.stop().await;
}

#[tokio::test]
async fn the_list_filters_searches_and_pages_newest_first() {
    let relay = TestRelay::open().await;
    let (origin, _received) = recording_origin(|| Response::new(full("fine"))).await;
    let client = TestClient::start(&relay, &origin.target(), ClientOptions::default()).await;
    let api = Api::of(&relay);
    let mut tail = api.tail("").await;
    let host = host_of(&client.public_url);
    let mut ids = Vec::new();
    for i in 0..5 {
        let method = if i % 2 == 0 { "POST" } else { "GET" };
        let request = Request::builder()
            .method(method)
            .uri(format!("/item/{i}"))
            .header("x-note", format!("Marker-{i}"))
            .body(full(format!("payload number {i}")))
            .expect("request");
        let response = send(relay.addr, &host, request).await;
        read_body(response.into_body()).await;
        ids.push(tail.next_item().await.0);
    }
    let page = api.get_json("/api/v1/requests?limit=2").await;
    let items = page["items"].as_array().expect("items");
    assert_eq!(items[0]["id"], ids[4].as_str(), "newest first");
    assert_eq!(items[1]["id"], ids[3].as_str());
    let cursor = page["next_cursor"].as_str().expect("more pages");
    let next = api
        .get_json(&format!("/api/v1/requests?limit=2&cursor={cursor}"))
        .await;
    assert_eq!(next["items"][0]["id"], ids[2].as_str(), "no gap, no repeat");

    let posts = api.get_json("/api/v1/requests?method=post").await;
    assert_eq!(posts["items"].as_array().expect("items").len(), 3);
    let found = api.get_json("/api/v1/requests?q=marker-3").await;
    assert_eq!(found["items"].as_array().expect("items").len(), 1);
    assert_eq!(
        found["items"][0]["id"],
        ids[3].as_str(),
        "header values are searched, any case"
    );
    let found = api.get_json("/api/v1/requests?q=NUMBER%204").await;
    assert_eq!(
        found["items"][0]["id"],
        ids[4].as_str(),
        "text bodies are searched"
    );
    let ok = api.get_json("/api/v1/requests?status=2xx").await;
    assert_eq!(ok["items"].as_array().expect("items").len(), 5);
    let none = api.get_json("/api/v1/requests?status=404").await;
    assert!(none["items"].as_array().expect("items").is_empty());

    for bad in [
        "status=abc",
        "kind=other",
        "since=yesterday-ish",
        "cursor=nope",
        "limit=0",
        "colour=red",
        "q=ab",
        "q=a%25b_c",
    ] {
        let (status, body) = api.get(&format!("/api/v1/requests?{bad}")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}");
        let error: Value = serde_json::from_slice(&body).expect("JSON error");
        assert!(error["error"]["message"].as_str().is_some(), "{bad}");
    }
    let (status, _) = api.get("/api/v1/requests/not-an-id").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = api
        .get("/api/v1/requests/0192f0c4-8e4b-7d3a-9f1e-2b6c8d4e5f60")
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    client.stop().await.expect("client stops");
    origin.stop().await;
    relay.stop().await;
}

#[tokio::test]
async fn the_live_tail_resumes_after_the_last_event_id_without_gaps() {
    let relay = TestRelay::open().await;
    let (origin, _received) = recording_origin(|| Response::new(full("fine"))).await;
    let client = TestClient::start(&relay, &origin.target(), ClientOptions::default()).await;
    let api = Api::of(&relay);
    let host = host_of(&client.public_url);
    let mut tail = api.tail("").await;
    let get = |path: &'static str| {
        let host = host.clone();
        let addr = relay.addr;
        async move {
            let response = send(addr, &host, Request::get(path).body(empty()).expect("req")).await;
            read_body(response.into_body()).await;
        }
    };
    get("/one").await;
    let (first, _) = tail.next_item().await;
    drop(tail);
    // Missed while disconnected:
    get("/two").await;
    get("/three").await;
    let mut resumed = api.tail_after("", Some(&first)).await;
    assert_eq!(resumed.next_item().await.1["path"], "/two");
    assert_eq!(resumed.next_item().await.1["path"], "/three");
    get("/four").await;
    assert_eq!(resumed.next_item().await.1["path"], "/four");

    let mut filtered = api.tail("method=POST").await;
    get("/five").await;
    let response = send(
        relay.addr,
        &host,
        Request::post("/six").body(full("x")).expect("req"),
    )
    .await;
    read_body(response.into_body()).await;
    assert_eq!(
        filtered.next_item().await.1["path"],
        "/six",
        "filters apply"
    );

    client.stop().await.expect("client stops");
    origin.stop().await;
    relay.stop().await;
}

#[tokio::test]
async fn replay_resends_the_original_through_the_tunnel_and_to_a_url() {
    let relay = TestRelay::start(ferry_relay::Config {
        egress_allow: ferry_relay::egress::Allow::loopback(),
        ..ferry_relay::Config::default()
    })
    .await;
    let (origin, mut received) = recording_origin(ok_answer).await;
    let client = TestClient::start(&relay, &origin.target(), ClientOptions::default()).await;
    let api = Api::of(&relay);
    let mut tail = api.tail("").await;
    let body = binary_body();
    let request = Request::builder()
        .method("PUT")
        .uri("/orders/7?verbose=1&verbose=2")
        .header("x-signature", "t=1,v1=abc")
        .header("x-multi", "a")
        .header("x-multi", "b")
        .body(full(body.clone()))
        .expect("request");
    let response = send(relay.addr, &host_of(&client.public_url), request).await;
    read_body(response.into_body()).await;
    let original = within("the origin", received.recv())
        .await
        .expect("request");
    let (id, _) = tail.next_item().await;

    let (status, answer) = api
        .post_json(&format!("/api/v1/requests/{id}/replay"), &json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["replay_of"], id.as_str());
    assert_eq!(answer["status"], 201);
    let again = within("the replay", received.recv()).await.expect("replay");
    assert_eq!(again.method, original.method);
    assert_eq!(again.path, original.path);
    assert_eq!(again.body, original.body);
    assert_eq!(again.values("x-multi"), original.values("x-multi"));
    assert_eq!(again.values("x-signature"), original.values("x-signature"));
    let (replay_id, item) = tail.next_item().await;
    assert_eq!(replay_id, answer["id"].as_str().expect("new id"));
    assert_eq!(item["kind"], "replay");
    assert_eq!(item["replay_of"], id.as_str());

    // Edited, to the origin's own URL.
    let (status, answer) = api
        .post_json(
            &format!("/api/v1/requests/{id}/replay"),
            &json!({
                "target": origin.target(),
                "method": "POST",
                "path": "/edited?x=1",
                "headers": {"x-multi": "only", "x-signature": null},
                "body": "edited body",
            }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let edited = within("the edited replay", received.recv())
        .await
        .expect("replay");
    assert_eq!(edited.method, "POST");
    assert_eq!(edited.path, "/edited?x=1");
    assert_eq!(edited.body, b"edited body");
    assert_eq!(edited.values("x-multi"), [b"only".to_vec()]);
    assert!(edited.values("x-signature").is_empty());

    for (edits, expected) in [
        (
            json!({"target": "ftp://example.com"}),
            StatusCode::BAD_REQUEST,
        ),
        (json!({"target": "/relative"}), StatusCode::BAD_REQUEST),
        (json!({"method": "NOT A METHOD"}), StatusCode::BAD_REQUEST),
        (json!({"path": "no-slash"}), StatusCode::BAD_REQUEST),
        (json!({"unknown": 1}), StatusCode::BAD_REQUEST),
        (
            json!({"body": "x".repeat(11 * 1024 * 1024)}),
            StatusCode::PAYLOAD_TOO_LARGE,
        ),
    ] {
        let (status, answer) = api
            .post_json(&format!("/api/v1/requests/{id}/replay"), &edits)
            .await;
        assert_eq!(status, expected, "{answer}");
        assert!(answer["error"]["message"].is_string(), "{answer}");
    }

    client.stop().await.expect("client stops");
    origin.stop().await;
    relay.stop().await;
}

#[tokio::test]
async fn replay_to_a_private_address_is_refused_and_logged() {
    let relay = TestRelay::open().await;
    let (origin, mut received) = recording_origin(ok_answer).await;
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
    within("the origin", received.recv())
        .await
        .expect("request");
    let (id, _) = tail.next_item().await;
    let (status, answer) = api
        .post_json(
            &format!("/api/v1/requests/{id}/replay"),
            &json!({"target": origin.target()}),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{answer}");
    assert!(
        answer["error"]["message"]
            .as_str()
            .expect("message")
            .contains("--egress-allow"),
        "{answer}"
    );
    let (_, item) = tail.next_item().await;
    assert_eq!(item["outcome"], "egress_refused");
    assert!(received.try_recv().is_err(), "nothing reached the origin");
    client.stop().await.expect("client stops");
    origin.stop().await;
    relay.stop().await;
}

#[tokio::test]
async fn state_changing_calls_from_another_site_or_without_json_are_refused() {
    let relay = TestRelay::open().await;
    let (origin, _received) = recording_origin(ok_answer).await;
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
    let path = format!("/api/v1/requests/{id}/replay");

    let mut cross_site = api.request("POST", &path, full("{}"));
    cross_site
        .headers_mut()
        .insert("origin", "http://evil.example".parse().expect("header"));
    cross_site
        .headers_mut()
        .insert("content-type", "application/json".parse().expect("header"));
    assert_eq!(api.send(cross_site).await.status(), StatusCode::FORBIDDEN);

    let mut form = api.request("POST", &path, full("{}"));
    form.headers_mut()
        .insert("content-type", "text/plain".parse().expect("header"));
    assert_eq!(
        api.send(form).await.status(),
        StatusCode::UNSUPPORTED_MEDIA_TYPE
    );
    let page = api.get_json("/api/v1/requests?kind=replay").await;
    assert!(
        page["items"].as_array().expect("items").is_empty(),
        "nothing was replayed"
    );
    client.stop().await.expect("client stops");
    origin.stop().await;
    relay.stop().await;
}

#[tokio::test]
async fn another_account_sees_none_of_an_entry() {
    let relay = TestRelay::start(ferry_relay::Config {
        tokens: vec![
            ferry_relay::Token::new("token-alice"),
            ferry_relay::Token::new("token-bob"),
        ],
        ..ferry_relay::Config::default()
    })
    .await;
    let (origin, _received) = recording_origin(ok_answer).await;
    let alice = TestClient::start(
        &relay,
        &origin.target(),
        ClientOptions {
            token: Some("token-alice".to_owned()),
            ..ClientOptions::default()
        },
    )
    .await;
    let bob = TestClient::start(
        &relay,
        &origin.target(),
        ClientOptions {
            token: Some("token-bob".to_owned()),
            ..ClientOptions::default()
        },
    )
    .await;
    let (alice_api, bob_api) = (
        Api::with_token(&relay, "token-alice"),
        Api::with_token(&relay, "token-bob"),
    );
    let mut alice_tail = alice_api.tail("").await;
    let mut bob_tail = bob_api.tail("").await;
    let response = send(
        relay.addr,
        &host_of(&alice.public_url),
        Request::new(empty()),
    )
    .await;
    read_body(response.into_body()).await;
    let (id, _) = alice_tail.next_item().await;
    let response = send(relay.addr, &host_of(&bob.public_url), Request::new(empty())).await;
    read_body(response.into_body()).await;
    let (bob_first, _) = bob_tail.next_item().await;
    assert_ne!(bob_first, id, "bob's tail skips alice's entry");

    for path in [
        format!("/api/v1/requests/{id}"),
        format!("/api/v1/requests/{id}/curl"),
        format!("/api/v1/requests/{id}/har"),
        format!("/api/v1/requests/{id}/body/request"),
    ] {
        let (status, _) = bob_api.get(&path).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
        let (status, _) = alice_api.get(&path).await;
        assert_eq!(status, StatusCode::OK, "{path}");
    }
    let (status, _) = bob_api
        .post_json(&format!("/api/v1/requests/{id}/replay"), &json!({}))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let listed = bob_api.get_json("/api/v1/requests").await;
    assert!(listed["items"]
        .as_array()
        .expect("items")
        .iter()
        .all(|item| item["id"] != id.as_str()));
    let har = bob_api.get_json("/api/v1/requests/har").await;
    assert!(!har.to_string().contains(&id));
    let (status, _) = Api::of(&relay).get("/api/v1/requests").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "no token, no log");

    alice.stop().await.expect("client stops");
    bob.stop().await.expect("client stops");
    origin.stop().await;
    relay.stop().await;
}

#[tokio::test]
async fn requests_to_an_offline_held_name_are_kept_and_answered_503() {
    let relay = TestRelay::open().await;
    let (origin, mut received) = recording_origin(|| Response::new(full("fine"))).await;
    let options = ClientOptions {
        client_key: Some("0123456789abcdef0123456789abcdef".to_owned()),
        ..ClientOptions::default()
    };
    let client = TestClient::start(&relay, &origin.target(), options.clone()).await;
    let host = host_of(&client.public_url);
    let name = client.name.clone();
    client.stop().await.expect("client stops");
    let api = Api::of(&relay);
    let mut tail = api.tail("").await;
    for i in 0..3 {
        let response = send(
            relay.addr,
            &host,
            Request::post(format!("/webhook/{i}"))
                .body(full(format!("event {i}")))
                .expect("request"),
        )
        .await;
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            response.headers().get("retry-after").map(|v| v.as_bytes()),
            Some(&b"30"[..])
        );
        let text = read_body(response.into_body()).await;
        assert!(String::from_utf8_lossy(&text).contains("offline"));
        let (_, item) = tail.next_item().await;
        assert_eq!(item["outcome"], "client_offline");
    }
    let unknown = send(
        relay.addr,
        &host.replacen(&name, "nobody-here", 1),
        Request::new(empty()),
    )
    .await;
    assert_eq!(
        unknown.status(),
        StatusCode::NOT_FOUND,
        "unknown names are not kept"
    );
    let tunnels = api.get_json("/api/v1/tunnels").await;
    assert_eq!(tunnels["offline"][0]["name"], name.as_str());
    assert_eq!(tunnels["offline"][0]["target"], origin.target().as_str());

    let missed = api.get_json("/api/v1/requests?missed=true").await;
    let missed = missed["items"].as_array().expect("items").clone();
    assert_eq!(missed.len(), 3);
    let replayed = ferry::activity::replay_missed(
        &ferry::activity::Source::api(&format!("http://{}", relay.addr), None),
        Some(&name),
        &ferry::Target::parse(&origin.target()).expect("target"),
    )
    .await
    .expect("missed requests replay");
    assert_eq!(replayed.len(), 3);
    for i in 0..3 {
        let got = within("a missed request", received.recv())
            .await
            .expect("request");
        assert_eq!(got.path, format!("/webhook/{i}"), "oldest first");
        assert_eq!(got.body, format!("event {i}").as_bytes());
    }
    let again = ferry::activity::replay_missed(
        &ferry::activity::Source::api(&format!("http://{}", relay.addr), None),
        Some(&name),
        &ferry::Target::parse(&origin.target()).expect("target"),
    )
    .await
    .expect("nothing left");
    assert!(again.is_empty(), "each missed request is replayed once");
    assert!(received.try_recv().is_err());
    origin.stop().await;
    relay.stop().await;
}

#[tokio::test]
async fn with_capture_off_nothing_is_recorded_and_a_held_name_still_answers_503() {
    let dir = tempfile::tempdir().expect("data dir");
    let relay = TestRelay::start(ferry_relay::Config {
        data_dir: dir.path().to_owned(),
        capture: false,
        ..ferry_relay::Config::default()
    })
    .await;
    let (origin, mut received) = recording_origin(|| Response::new(full("fine"))).await;
    let options = ClientOptions {
        client_key: Some("11112222333344441111222233334444".to_owned()),
        ..ClientOptions::default()
    };
    let client = TestClient::start(&relay, &origin.target(), options).await;
    let host = host_of(&client.public_url);
    let response = send(
        relay.addr,
        &host,
        Request::post("/webhook/live")
            .body(full("event"))
            .expect("request"),
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(read_body(response.into_body()).await, b"fine");
    within("the origin", received.recv())
        .await
        .expect("request");
    client.stop().await.expect("client stops");

    let response = send(
        relay.addr,
        &host,
        Request::post("/webhook/held")
            .body(full("event"))
            .expect("request"),
    )
    .await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        response.headers().get("retry-after").map(|v| v.as_bytes()),
        Some(&b"30"[..])
    );
    let text = String::from_utf8_lossy(&read_body(response.into_body()).await).into_owned();
    assert!(text.contains("offline"), "{text}");
    assert!(!text.contains("recorded"), "nothing was: {text}");
    origin.stop().await;
    // Shutdown stores whatever capture still holds, so the file is final.
    relay.stop().await;

    let log = ferry_relay::store::sqlite::Sqlite::open_read_only(
        &dir.path().join(ferry_relay::data_dir::DATABASE_FILE),
    )
    .expect("the database opens");
    let stored = ferry_relay::store::ActivityLog::list(
        &log,
        &ferry_relay::store::Filter::default(),
        None,
        10,
        false,
    )
    .await
    .expect("the log reads");
    assert!(stored.is_empty(), "capture off recorded {stored:?}");
}

#[tokio::test]
async fn entries_and_name_holds_survive_a_relay_restart() {
    let dir = tempfile::tempdir().expect("data dir");
    let config = || ferry_relay::Config {
        data_dir: dir.path().to_owned(),
        ..ferry_relay::Config::default()
    };
    let relay = TestRelay::start(config()).await;
    let (origin, _received) = recording_origin(|| Response::new(full("fine"))).await;
    let client = TestClient::start(
        &relay,
        &origin.target(),
        ClientOptions {
            client_key: Some("aaaabbbbccccddddaaaabbbbccccdddd".to_owned()),
            ..ClientOptions::default()
        },
    )
    .await;
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
    let name = client.name.clone();
    client.stop().await.expect("client stops");
    drop(tail);
    relay.stop().await;

    let relay = TestRelay::start(config()).await;
    let api = Api::of(&relay);
    let detail = api.get_json(&format!("/api/v1/requests/{id}")).await;
    assert_eq!(detail["tunnel"], name.as_str());
    let tunnels = api.get_json("/api/v1/tunnels").await;
    assert_eq!(
        tunnels["offline"][0]["name"],
        name.as_str(),
        "the hold came back"
    );
    let intruder = TestClient::spawn(
        &relay,
        &origin.target(),
        ClientOptions {
            subdomain: Some(Box::leak(name.clone().into_boxed_str())),
            client_key: Some("eeeeffffeeeeffffeeeeffffeeeeffff".to_owned()),
            ..ClientOptions::default()
        },
    );
    let refused = intruder.finished().await;
    assert!(
        refused.is_err(),
        "another key cannot take the held name: {refused:?}"
    );
    origin.stop().await;
    relay.stop().await;
}

#[tokio::test]
async fn curl_and_har_exports_answer_for_an_entry() {
    let relay = TestRelay::open().await;
    let (origin, _received) = recording_origin(ok_answer).await;
    let client = TestClient::start(&relay, &origin.target(), ClientOptions::default()).await;
    let api = Api::of(&relay);
    let mut tail = api.tail("").await;
    let response = send(
        relay.addr,
        &host_of(&client.public_url),
        Request::post("/x?y=1")
            .body(full("hello"))
            .expect("request"),
    )
    .await;
    read_body(response.into_body()).await;
    let (id, _) = tail.next_item().await;
    let (status, curl) = api
        .get(&format!(
            "/api/v1/requests/{id}/curl?to=http%3A%2F%2Flocalhost%3A3000"
        ))
        .await;
    assert_eq!(status, StatusCode::OK);
    let curl = String::from_utf8(curl).expect("text");
    assert!(curl.starts_with("curl"), "{curl}");
    assert!(curl.contains("http://localhost:3000/x?y=1"), "{curl}");
    let har = api.get_json(&format!("/api/v1/requests/{id}/har")).await;
    assert_eq!(har["log"]["version"], "1.2");
    assert_eq!(har["log"]["entries"][0]["request"]["method"], "POST");
    assert_eq!(har["log"]["entries"][0]["response"]["status"], 201);
    let all = api.get_json("/api/v1/requests/har?method=POST").await;
    assert_eq!(all["log"]["entries"].as_array().expect("entries").len(), 1);
    client.stop().await.expect("client stops");
    origin.stop().await;
    relay.stop().await;
}

#[tokio::test]
async fn forwarding_goes_on_while_the_database_is_locked_and_nothing_is_lost_after() {
    let relay = TestRelay::open().await;
    let (origin, _received) = recording_origin(|| Response::new(full("fine"))).await;
    let client = TestClient::start(&relay, &origin.target(), ClientOptions::default()).await;
    let api = Api::of(&relay);
    let mut tail = api.tail("").await;
    let blocker = rusqlite::Connection::open(relay.data_dir.join("ferry.db")).expect("open");
    blocker
        .execute_batch("BEGIN EXCLUSIVE")
        .expect("take the write lock");
    for i in 0..3 {
        let response = send(
            relay.addr,
            &host_of(&client.public_url),
            Request::get(format!("/while-locked/{i}"))
                .body(empty())
                .expect("request"),
        )
        .await;
        assert_eq!(
            response.status(),
            StatusCode::OK,
            "forwarding never waits on the disk"
        );
        read_body(response.into_body()).await;
    }
    blocker.execute_batch("ROLLBACK").expect("release the lock");
    let mut paths: Vec<String> = Vec::new();
    for _ in 0..3 {
        let (_, item) = tail.next_item().await;
        paths.push(item["path"].as_str().expect("path").to_owned());
    }
    paths.sort();
    assert_eq!(
        paths,
        ["/while-locked/0", "/while-locked/1", "/while-locked/2"]
    );
    client.stop().await.expect("client stops");
    origin.stop().await;
    relay.stop().await;
}

#[tokio::test]
async fn one_address_may_hold_only_a_few_live_feeds() {
    let relay = TestRelay::open().await;
    let api = Api::of(&relay);
    let mut feeds = Vec::new();
    for _ in 0..ferry_relay::api::requests::LIVE_FEEDS_PER_IP {
        feeds.push(api.tail("").await);
    }
    let refused = api
        .send(api.request("GET", "/api/v1/requests/stream", empty()))
        .await;
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(refused.headers().contains_key("retry-after"));
    let body = read_body(refused.into_body()).await;
    assert!(String::from_utf8_lossy(&body).contains("live feeds"));
    drop(feeds.pop());
    // The closed feed's place is freed once the relay notices the hang-up,
    // which it does at its next write (a commit or the keepalive): a
    // request through a tunnel makes a commit.
    let (origin, _received) = recording_origin(|| Response::new(full("fine"))).await;
    let client = TestClient::start(&relay, &origin.target(), ClientOptions::default()).await;
    let response = send(
        relay.addr,
        &host_of(&client.public_url),
        Request::new(empty()),
    )
    .await;
    read_body(response.into_body()).await;
    feeds[0].next_item().await;
    let reopened = within("a free place for a feed", async {
        loop {
            let response = api
                .send(api.request("GET", "/api/v1/requests/stream", empty()))
                .await;
            if response.status() == StatusCode::OK {
                return response;
            }
            tokio::task::yield_now().await;
        }
    })
    .await;
    drop((reopened, feeds));
    client.stop().await.expect("client stops");
    origin.stop().await;
    relay.stop().await;
}
