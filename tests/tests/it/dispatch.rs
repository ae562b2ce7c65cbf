//! The webhook dispatcher end to end: signatures checked by the independent
//! `standardwebhooks` crate (across a secret rotation), methods and custom
//! headers, subscriptions, the receiver's answers (redirects, 410,
//! `Retry-After`), idempotent events, accounts, validation, test events,
//! resends and recovery, and deliveries into a tunnel that goes away.

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_tests::{
    full, host_of, read_body, within, Api, Body, ClientOptions, Origin, TestClient, TestRelay,
};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{HeaderMap, Request, Response, StatusCode};
use serde_json::{json, Value};
use tokio::sync::{mpsc, Semaphore};

/// A valid secret that no webhook in these tests has.
const STRANGER_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// A request a webhook receiver got.
#[derive(Debug)]
struct Arrival {
    method: String,
    path: String,
    headers: HeaderMap,
    body: Vec<u8>,
    /// When its headers arrived.
    at: Instant,
}

impl Arrival {
    /// The value of header `name`, which must be there as text.
    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .unwrap_or_else(|| panic!("the delivery has no `{name}` header"))
            .to_str()
            .expect("the header is text")
    }

    /// The body as JSON.
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("deliveries carry JSON")
    }

    /// Whether the `standardwebhooks` crate accepts the delivery under
    /// `secret` (any of the header's signatures may match).
    fn verifies_with(&self, secret: &str) -> bool {
        standardwebhooks::Webhook::new(secret)
            .expect("a valid secret")
            .verify(&self.body, &self.headers)
            .is_ok()
    }

    /// The signature `secret` gives this delivery, as `standardwebhooks`
    /// computes it.
    fn signature_under(&self, secret: &str) -> String {
        let timestamp = self
            .header("webhook-timestamp")
            .parse()
            .expect("the timestamp is a number");
        standardwebhooks::Webhook::new(secret)
            .expect("a valid secret")
            .sign(self.header("webhook-id"), timestamp, &self.body)
            .expect("the body is UTF-8")
    }

    /// `webhook-timestamp`, in seconds.
    fn timestamp(&self) -> i64 {
        self.header("webhook-timestamp")
            .parse()
            .expect("the timestamp is a number")
    }
}

/// A webhook receiver on a free port: it reports each request, then
/// answers the `n`th (from 0) with `answer(n)`.
async fn receiver<F, Fut>(answer: F) -> (Origin, mpsc::Receiver<Arrival>)
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(64);
    let answer = Arc::new(answer);
    let count = Arc::new(AtomicUsize::new(0));
    let origin = Origin::start(move |req: Request<Incoming>| {
        let (tx, answer, count) = (tx.clone(), Arc::clone(&answer), Arc::clone(&count));
        async move {
            let at = Instant::now();
            let n = count.fetch_add(1, Ordering::SeqCst);
            let (parts, body) = req.into_parts();
            let body = read_body(body).await;
            let _ = tx
                .send(Arrival {
                    method: parts.method.to_string(),
                    path: parts
                        .uri
                        .path_and_query()
                        .map_or("/", |p| p.as_str())
                        .to_owned(),
                    headers: parts.headers,
                    body,
                    at,
                })
                .await;
            answer(n).await
        }
    })
    .await;
    (origin, rx)
}

/// A receiver that answers everything 200.
async fn accepting_receiver() -> (Origin, mpsc::Receiver<Arrival>) {
    receiver(|_| async { reply(200) }).await
}

/// An empty response with `code`.
fn reply(code: u16) -> Response<Body> {
    Response::builder()
        .status(code)
        .body(full(""))
        .expect("valid response")
}

/// `http://ADDR{path}` on `origin`.
fn url_of(origin: &Origin, path: &str) -> String {
    format!("{}{path}", origin.target())
}

/// An open relay that may deliver to loopback receivers, with `schedule`.
fn config(schedule: &str) -> ferry_relay::Config {
    ferry_relay::Config {
        egress_allow: ferry_relay::egress::Allow::loopback(),
        dispatch: ferry_relay::dispatch::Settings {
            schedule: schedule.parse().expect("a valid schedule"),
            ..ferry_relay::dispatch::Settings::default()
        },
        ..ferry_relay::Config::default()
    }
}

/// Calls the API with `method` and an optional JSON body: the status and
/// the JSON answer (`null` when there is none).
async fn call(api: &Api, method: &str, path: &str, body: Option<&Value>) -> (StatusCode, Value) {
    let text = body.map(Value::to_string).unwrap_or_default();
    let mut request = api.request(method, path, full(text));
    if matches!(method, "POST" | "PUT") {
        request
            .headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    }
    let response = api.send(request).await;
    let status = response.status();
    let bytes = read_body(response.into_body()).await;
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

/// Creates a webhook, which must succeed.
async fn create(api: &Api, spec: Value) -> Value {
    let (status, webhook) = api.post_json("/api/v1/webhooks", &spec).await;
    assert_eq!(status, StatusCode::CREATED, "{webhook}");
    webhook
}

/// The `id` of an API object.
fn id_of(object: &Value) -> String {
    object["id"].as_str().expect("an id").to_owned()
}

/// Sends an event, which must be accepted.
async fn event(api: &Api, body: Value) -> Value {
    let (status, accepted) = api.post_json("/api/v1/events", &body).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{accepted}");
    accepted
}

/// The next delivery `arrivals` gets.
async fn next(arrivals: &mut mpsc::Receiver<Arrival>, what: &str) -> Arrival {
    within(what, arrivals.recv())
        .await
        .expect("the receiver is running")
}

/// Polls `GET path` until `done` holds for its answer, and returns it.
async fn poll(api: &Api, what: &str, path: &str, done: impl Fn(&Value) -> bool) -> Value {
    within(what, async {
        loop {
            let answer = api.get_json(path).await;
            if done(&answer) {
                return answer;
            }
            tokio::task::yield_now().await;
        }
    })
    .await
}

/// Waits until `webhook` has `count` deliveries, all in `state`; returns
/// them, newest first.
async fn settled(api: &Api, webhook: &str, count: usize, state: &str) -> Vec<Value> {
    let page = poll(
        api,
        &format!("{count} deliveries {state}"),
        &format!("/api/v1/webhooks/{webhook}/deliveries"),
        |page| {
            let items = page["items"].as_array().expect("items");
            items.len() == count && items.iter().all(|d| d["state"] == state)
        },
    )
    .await;
    page["items"].as_array().expect("items").clone()
}

/// The items of a list answer.
fn items(list: &Value) -> &Vec<Value> {
    list["items"].as_array().expect("items")
}

#[tokio::test]
async fn signatures_verify_with_standard_webhooks_and_with_both_secrets_after_a_rotation() {
    let relay = TestRelay::start(config("0")).await;
    let (origin, mut arrivals) = accepting_receiver().await;
    let api = Api::of(&relay);
    let webhook = create(
        &api,
        json!({"name": "signed", "url": url_of(&origin, "/hooks"), "actions": ["document.create"]}),
    )
    .await;
    let id = id_of(&webhook);
    let old = webhook["secret"].as_str().expect("a secret").to_owned();
    assert!(old.starts_with("whsec_"), "{old}");

    event(
        &api,
        json!({"type": "document.create", "data": {"document_id": "doc_1"}}),
    )
    .await;
    let first = next(&mut arrivals, "the first delivery").await;
    assert!(first.verifies_with(&old), "{:?}", first.headers);
    assert!(!first.verifies_with(STRANGER_SECRET));
    assert_eq!(
        first.header("webhook-signature"),
        first.signature_under(&old)
    );
    assert!(first.header("webhook-id").starts_with("msg_"));
    let body = first.json();
    assert_eq!(body["type"], "document.create");
    assert_eq!(body["data"], json!({"document_id": "doc_1"}));
    assert!(body["timestamp"].is_string(), "{body}");

    let (status, rotated) = call(
        &api,
        "POST",
        &format!("/api/v1/webhooks/{id}/rotate-secret"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{rotated}");
    let new = rotated["secret"].as_str().expect("a new secret").to_owned();
    assert_ne!(new, old);
    assert!(rotated["previous_secret_until"].is_string(), "{rotated}");

    event(
        &api,
        json!({"type": "document.create", "data": {"document_id": "doc_2"}}),
    )
    .await;
    let second = next(&mut arrivals, "the delivery after the rotation").await;
    let signatures: Vec<&str> = second.header("webhook-signature").split(' ').collect();
    assert_eq!(signatures.len(), 2, "{signatures:?}");
    assert!(signatures.iter().all(|s| s.starts_with("v1,")));
    assert_eq!(
        signatures,
        [second.signature_under(&new), second.signature_under(&old)],
        "the new secret's signature, then the old one's"
    );
    assert!(second.verifies_with(&new), "receivers on the new secret");
    assert!(second.verifies_with(&old), "receivers still on the old one");
    assert!(!second.verifies_with(STRANGER_SECRET));
    assert_ne!(second.header("webhook-id"), first.header("webhook-id"));

    // Each attempt is in the activity log with the exact request sent.
    let log = poll(
        &api,
        "both attempts in the activity log",
        "/api/v1/requests?kind=dispatch",
        |page| items(page).len() == 2,
    )
    .await;
    let latest = &items(&log)[0];
    assert_eq!(latest["kind"], "dispatch");
    assert_eq!(latest["dispatch"]["webhook_id"], id.as_str());
    assert_eq!(
        latest["dispatch"]["delivery_id"],
        second.header("webhook-id")
    );
    assert_eq!(latest["dispatch"]["attempt"], 1);
    let detail = api
        .get_json(&format!(
            "/api/v1/requests/{}",
            latest["id"].as_str().expect("an entry id")
        ))
        .await;
    let sent = &detail["request"];
    assert_eq!(
        sent["body"]["text"].as_str().map(str::as_bytes),
        Some(&second.body[..])
    );
    let signature = sent["headers"]
        .as_array()
        .expect("headers")
        .iter()
        .find(|h| h["name"] == "webhook-signature")
        .expect("the signature was recorded");
    assert_eq!(signature["value"], second.header("webhook-signature"));

    origin.stop().await;
    relay.stop().await;
}

#[tokio::test]
async fn every_method_carries_the_same_signed_body_and_the_custom_headers() {
    let relay = TestRelay::start(config("0")).await;
    let (origin, mut arrivals) = accepting_receiver().await;
    let api = Api::of(&relay);
    let methods = ["POST", "PUT", "PATCH", "GET", "DELETE"];
    let mut secrets = Vec::new();
    for method in methods {
        let webhook = create(
            &api,
            json!({
                "name": format!("by {method}"),
                "method": method.to_ascii_lowercase(),
                "url": url_of(&origin, &format!("/by/{method}")),
                "actions": ["document.create"],
                "headers": {"x-auth": format!("token-{method}")},
            }),
        )
        .await;
        assert_eq!(webhook["method"], method);
        assert_eq!(
            webhook["headers"],
            json!({"x-auth": format!("token-{method}")})
        );
        secrets.push(webhook["secret"].as_str().expect("a secret").to_owned());
    }

    let accepted = event(
        &api,
        json!({"type": "document.create", "data": {"document_id": "doc_9"}}),
    )
    .await;
    assert_eq!(accepted["queued"], 5);
    let mut bodies = BTreeSet::new();
    let mut seen = BTreeSet::new();
    for _ in methods {
        let arrival = next(&mut arrivals, "a delivery").await;
        let method = arrival.method.clone();
        let at = methods
            .iter()
            .position(|m| *m == method)
            .unwrap_or_else(|| panic!("a delivery with {method}"));
        assert_eq!(arrival.path, format!("/by/{method}"));
        assert_eq!(arrival.header("x-auth"), format!("token-{method}"));
        assert_eq!(arrival.header("ferry-event-type"), "document.create");
        assert_eq!(arrival.header("content-type"), "application/json");
        assert!(
            arrival.verifies_with(&secrets[at]),
            "{method}: {:?}",
            arrival.headers
        );
        assert_eq!(arrival.json()["data"], json!({"document_id": "doc_9"}));
        bodies.insert(arrival.body.clone());
        seen.insert(method);
    }
    assert_eq!(seen.len(), 5, "one delivery per method: {seen:?}");
    assert_eq!(bodies.len(), 1, "every method carries the same body");

    origin.stop().await;
    relay.stop().await;
}

#[tokio::test]
async fn wildcards_groups_and_exact_names_pick_their_events() {
    let relay = TestRelay::start(config("0")).await;
    let (origin, mut arrivals) = accepting_receiver().await;
    let api = Api::of(&relay);
    for (path, actions) in [
        ("/documents", json!(["document.*"])),
        ("/everything", json!(["*"])),
        ("/exact", json!(["blueprint.create"])),
    ] {
        create(
            &api,
            json!({"name": path, "url": url_of(&origin, path), "actions": actions}),
        )
        .await;
    }

    for (kind, queued) in [
        ("document.create", 2),
        ("blueprint.create", 2),
        ("project.member.deassign", 1),
    ] {
        let accepted = event(&api, json!({"type": kind, "data": {}})).await;
        assert_eq!(accepted["queued"], queued, "{kind}");
    }
    let mut got = BTreeSet::new();
    for _ in 0..5 {
        let arrival = next(&mut arrivals, "a delivery").await;
        got.insert((
            arrival.path.clone(),
            arrival.header("ferry-event-type").to_owned(),
        ));
    }
    let expected: BTreeSet<(String, String)> = [
        ("/documents", "document.create"),
        ("/everything", "blueprint.create"),
        ("/everything", "document.create"),
        ("/everything", "project.member.deassign"),
        ("/exact", "blueprint.create"),
    ]
    .into_iter()
    .map(|(p, k)| (p.to_owned(), k.to_owned()))
    .collect();
    assert_eq!(got, expected);

    origin.stop().await;
    relay.stop().await;
}

#[tokio::test]
async fn a_redirect_is_recorded_as_a_failure_and_never_followed() {
    let relay = TestRelay::start(config("0")).await;
    let (landing, mut landed) = accepting_receiver().await;
    let location = url_of(&landing, "/landing");
    let redirect_to = location.clone();
    let (origin, mut arrivals) = receiver(move |_| {
        let location = redirect_to.clone();
        async move {
            Response::builder()
                .status(302)
                .header("location", location)
                .body(full(""))
                .expect("valid response")
        }
    })
    .await;
    let api = Api::of(&relay);
    let webhook = create(
        &api,
        json!({"name": "moved", "url": url_of(&origin, "/old"), "actions": ["*"]}),
    )
    .await;
    event(&api, json!({"type": "document.create", "data": {}})).await;
    next(&mut arrivals, "the delivery").await;

    let failed = settled(&api, &id_of(&webhook), 1, "failed").await;
    let delivery = &failed[0];
    assert_eq!(delivery["last_status"], 302);
    let attempt = &delivery["attempt_log"][0];
    assert_eq!(attempt["status"], 302);
    let error = attempt["error"].as_str().expect("an error");
    assert!(error.contains("redirect"), "{error}");
    assert!(error.contains(&location), "{error}");
    // The attempt, redirect included, is over once its result is stored.
    assert!(landed.try_recv().is_err(), "the Location was contacted");

    origin.stop().await;
    landing.stop().await;
    relay.stop().await;
}

#[tokio::test]
async fn a_410_disables_the_webhook_and_fails_what_was_queued_for_it() {
    let relay = TestRelay::start(config("0,5s,5m")).await;
    let gate = Arc::new(Semaphore::new(0));
    let held = Arc::clone(&gate);
    let (origin, mut arrivals) = receiver(move |_| {
        let gate = Arc::clone(&held);
        async move {
            let _permit = gate.acquire().await.expect("the gate stays open");
            reply(410)
        }
    })
    .await;
    let api = Api::of(&relay);
    // Ordered: the second event waits while the first is in flight.
    let webhook = create(
        &api,
        json!({"name": "gone", "url": url_of(&origin, "/gone"), "actions": ["document.*"], "ordered": true}),
    )
    .await;
    let id = id_of(&webhook);
    event(&api, json!({"type": "document.create", "data": {"n": 1}})).await;
    let first = next(&mut arrivals, "the first delivery").await;
    assert_eq!(first.json()["data"]["n"], 1);
    let queued = event(&api, json!({"type": "document.update", "data": {"n": 2}})).await;
    assert_eq!(queued["queued"], 1);
    gate.add_permits(1);

    let disabled = poll(
        &api,
        "the webhook to be disabled",
        &format!("/api/v1/webhooks/{id}"),
        |w| w["enabled"] == false,
    )
    .await;
    let reason = disabled["disabled_reason"].as_str().expect("a reason");
    assert!(reason.contains("410"), "{reason}");
    let deliveries = settled(&api, &id, 2, "failed").await;
    assert_eq!(
        deliveries[0]["attempts"], 0,
        "the waiting one was never sent"
    );
    assert_eq!(deliveries[1]["last_status"], 410);

    let later = event(&api, json!({"type": "document.create", "data": {"n": 3}})).await;
    assert_eq!(later["queued"], 0, "a disabled webhook gets nothing");
    assert!(arrivals.try_recv().is_err());

    // Alone it reads as in the list, its last delivery included.
    let alone = api.get_json(&format!("/api/v1/webhooks/{id}")).await;
    assert_eq!(alone["last_delivery"], "failed", "{alone}");
    assert_eq!(items(&api.get_json("/api/v1/webhooks").await)[0], alone);

    // Enabled again by a partial update, it clears the reason and takes
    // events; the rest stays as it was.
    let (status, enabled) = call(
        &api,
        "PUT",
        &format!("/api/v1/webhooks/{id}"),
        Some(&json!({"enabled": true})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{enabled}");
    assert_eq!(enabled["enabled"], true);
    assert!(enabled["disabled_reason"].is_null(), "{enabled}");
    assert_eq!(enabled["last_delivery"], "failed");
    for field in ["name", "url", "actions", "secret", "ordered", "method"] {
        assert_eq!(enabled[field], webhook[field], "{field}");
    }
    let back = event(&api, json!({"type": "document.create", "data": {"n": 4}})).await;
    assert_eq!(back["queued"], 1);
    gate.add_permits(1);
    let arrival = next(&mut arrivals, "a delivery after enabling").await;
    assert_eq!(arrival.json()["data"]["n"], 4);

    origin.stop().await;
    relay.stop().await;
}

#[tokio::test]
async fn retry_after_sets_the_next_attempt_and_the_retry_keeps_its_webhook_id() {
    // Without Retry-After the second attempt would come an hour later.
    let relay = TestRelay::start(config("0,1h")).await;
    let (origin, mut arrivals) = receiver(|n| async move {
        if n == 0 {
            Response::builder()
                .status(503)
                .header("retry-after", "1")
                .body(full("busy"))
                .expect("valid response")
        } else {
            reply(200)
        }
    })
    .await;
    let api = Api::of(&relay);
    let webhook = create(
        &api,
        json!({"name": "busy", "url": url_of(&origin, "/busy"), "actions": ["*"]}),
    )
    .await;
    let secret = webhook["secret"].as_str().expect("a secret");
    event(&api, json!({"type": "document.delete", "data": {}})).await;
    let first = next(&mut arrivals, "the first attempt").await;
    let second = next(&mut arrivals, "the attempt Retry-After asked for").await;

    let waited = second.at - first.at;
    assert!(waited >= Duration::from_millis(900), "{waited:?}");
    assert_eq!(second.header("webhook-id"), first.header("webhook-id"));
    assert!(second.timestamp() > first.timestamp(), "a fresh timestamp");
    assert_ne!(
        second.header("webhook-signature"),
        first.header("webhook-signature")
    );
    assert_eq!(second.body, first.body);
    assert!(first.verifies_with(secret));
    assert!(second.verifies_with(secret));

    let done = settled(&api, &id_of(&webhook), 1, "succeeded").await;
    assert_eq!(done[0]["attempts"], 2);
    assert_eq!(done[0]["attempt_log"][0]["status"], 503);
    assert_eq!(done[0]["attempt_log"][1]["status"], 200);

    origin.stop().await;
    relay.stop().await;
}

#[tokio::test]
async fn retry_after_may_be_an_http_date() {
    let relay = TestRelay::start(config("0,1h")).await;
    let (origin, mut arrivals) = receiver(|n| async move {
        if n == 0 {
            // At least a second ahead, as the date has whole seconds.
            let when = std::time::SystemTime::now() + Duration::from_secs(2);
            Response::builder()
                .status(429)
                .header("retry-after", httpdate::fmt_http_date(when))
                .body(full("slow down"))
                .expect("valid response")
        } else {
            reply(200)
        }
    })
    .await;
    let api = Api::of(&relay);
    let webhook = create(
        &api,
        json!({"name": "limited", "url": url_of(&origin, "/limited"), "actions": ["*"]}),
    )
    .await;
    event(&api, json!({"type": "blueprint.update", "data": {}})).await;
    let first = next(&mut arrivals, "the first attempt").await;
    let second = next(&mut arrivals, "the attempt at the date asked for").await;
    let waited = second.at - first.at;
    assert!(waited >= Duration::from_millis(900), "{waited:?}");
    assert_eq!(second.header("webhook-id"), first.header("webhook-id"));
    let done = settled(&api, &id_of(&webhook), 1, "succeeded").await;
    assert_eq!(done[0]["attempt_log"][0]["status"], 429);

    origin.stop().await;
    relay.stop().await;
}

#[tokio::test]
async fn an_event_id_sent_twice_is_delivered_once() {
    let relay = TestRelay::start(config("0")).await;
    let (origin, mut arrivals) = accepting_receiver().await;
    let api = Api::of(&relay);
    // Ordered, so the marker sent last arrives after anything before it.
    let webhook = create(
        &api,
        json!({"name": "once", "url": url_of(&origin, "/once"), "actions": ["*"], "ordered": true}),
    )
    .await;
    let body = json!({"type": "document.create", "data": {"n": 1}, "id": "order-42"});
    let first = event(&api, body.clone()).await;
    assert_eq!(
        first,
        json!({"id": "order-42", "queued": 1, "duplicate": false})
    );
    let again = event(&api, body).await;
    assert_eq!(
        again,
        json!({"id": "order-42", "queued": 0, "duplicate": true})
    );
    event(
        &api,
        json!({"type": "document.create", "data": {"marker": true}, "id": "order-43"}),
    )
    .await;

    let got = next(&mut arrivals, "the event").await;
    assert_eq!(got.json()["data"], json!({"n": 1}));
    let marker = next(&mut arrivals, "the marker").await;
    assert_eq!(
        marker.json()["data"],
        json!({"marker": true}),
        "no second copy"
    );
    settled(&api, &id_of(&webhook), 2, "succeeded").await;

    origin.stop().await;
    relay.stop().await;
}

#[tokio::test]
async fn another_accounts_webhooks_and_deliveries_are_404() {
    let relay = TestRelay::start(ferry_relay::Config {
        tokens: vec![ferry_relay::Token::new("a"), ferry_relay::Token::new("b")],
        ..config("0")
    })
    .await;
    let (origin, mut arrivals) = accepting_receiver().await;
    let (a, b) = (Api::with_token(&relay, "a"), Api::with_token(&relay, "b"));
    let webhook = create(
        &a,
        json!({"name": "a's", "url": url_of(&origin, "/a"), "actions": ["*"]}),
    )
    .await;
    let id = id_of(&webhook);
    event(&a, json!({"type": "document.create", "data": {}})).await;
    next(&mut arrivals, "a's delivery").await;
    let delivery = id_of(&settled(&a, &id, 1, "succeeded").await[0]);

    assert!(items(&b.get_json("/api/v1/webhooks").await).is_empty());
    let name = json!({"name": "taken over"});
    let empty = json!({});
    for (method, path, body) in [
        ("GET", format!("/api/v1/webhooks/{id}"), None),
        ("PUT", format!("/api/v1/webhooks/{id}"), Some(&name)),
        ("DELETE", format!("/api/v1/webhooks/{id}"), None),
        ("GET", format!("/api/v1/webhooks/{id}/deliveries"), None),
        ("POST", format!("/api/v1/webhooks/{id}/test"), Some(&empty)),
        ("POST", format!("/api/v1/webhooks/{id}/rotate-secret"), None),
        (
            "POST",
            format!("/api/v1/webhooks/{id}/recover?since=1h"),
            None,
        ),
        ("GET", format!("/api/v1/deliveries/{delivery}"), None),
        (
            "POST",
            format!("/api/v1/deliveries/{delivery}/resend"),
            None,
        ),
    ] {
        let (status, answer) = call(&b, method, &path, body).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{method} {path}: {answer}");
        assert_eq!(answer["error"]["code"], "not_found", "{method} {path}");
    }
    let b_event = event(&b, json!({"type": "document.create", "data": {}})).await;
    assert_eq!(b_event["queued"], 0, "b's events never reach a's webhooks");

    // Nothing b did touched a's webhook or its delivery.
    let unchanged = a.get_json(&format!("/api/v1/webhooks/{id}")).await;
    assert_eq!(unchanged["name"], "a's");
    assert_eq!(unchanged["secret"], webhook["secret"]);
    assert!(unchanged["previous_secret_until"].is_null());
    let kept = a.get_json(&format!("/api/v1/deliveries/{delivery}")).await;
    assert_eq!(kept["attempts"], 1);
    assert_eq!(kept["state"], "succeeded");
    assert_eq!(items(&a.get_json("/api/v1/webhooks").await).len(), 1);
    assert!(arrivals.try_recv().is_err());

    // Each account's attempts are in its own activity log only.
    let a_log = poll(
        &a,
        "a's attempt in a's activity log",
        "/api/v1/requests?kind=dispatch",
        |page| items(page).len() == 1,
    )
    .await;
    assert_eq!(
        items(&a_log)[0]["dispatch"]["delivery_id"],
        delivery.as_str()
    );
    let entry = items(&a_log)[0]["id"].as_str().expect("an entry id");
    assert!(items(&b.get_json("/api/v1/requests?kind=dispatch").await).is_empty());
    let (status, _) = b.get(&format!("/api/v1/requests/{entry}")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // Event ids are per account: the same id from each is new to each.
    for api in [&a, &b] {
        let sent = event(
            api,
            json!({"type": "blueprint.delete", "data": {}, "id": "shared-id"}),
        )
        .await;
        assert_eq!(sent["duplicate"], false);
    }
    next(&mut arrivals, "a's event with the shared id").await;

    // Deleting takes the deliveries along.
    let (status, _) = call(&a, "DELETE", &format!("/api/v1/webhooks/{id}"), None).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = a.get(&format!("/api/v1/webhooks/{id}")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = a.get(&format!("/api/v1/deliveries/{delivery}")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    origin.stop().await;
    relay.stop().await;
}

#[tokio::test]
async fn an_accounts_event_types_are_its_own() {
    let relay = TestRelay::start(ferry_relay::Config {
        tokens: vec![ferry_relay::Token::new("a"), ferry_relay::Token::new("b")],
        ..config("0")
    })
    .await;
    let (a, b) = (Api::with_token(&relay, "a"), Api::with_token(&relay, "b"));
    let (status, added) = a
        .post_json(
            "/api/v1/event-types",
            &json!({"name": "invoice.paid", "description": "An invoice was paid."}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{added}");
    assert_eq!(added["source"], "account");
    let named = |list: &Value| items_named(&list["items"], "invoice.paid");
    assert!(named(&a.get_json("/api/v1/event-types").await));
    assert!(!named(&b.get_json("/api/v1/event-types").await));

    let (status, answer) = b
        .post_json(
            "/api/v1/events",
            &json!({"type": "invoice.paid", "data": {}}),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{answer}");
    assert_eq!(answer["error"]["code"], "unknown_event_type");
    let (code, _) = refused(
        &b,
        json!({"name": "b's", "url": "https://example.com/hooks", "actions": ["invoice.paid"]}),
    )
    .await;
    assert_eq!(code, "unknown_action");
    let sent = event(&a, json!({"type": "invoice.paid", "data": {}})).await;
    assert_eq!(sent["queued"], 0);

    let (status, answer) = a
        .post_json(
            "/api/v1/event-types",
            &json!({"name": "document.create", "description": "mine now"}),
        )
        .await;
    assert_eq!(
        status,
        StatusCode::CONFLICT,
        "the catalogue's stay: {answer}"
    );

    relay.stop().await;
}

/// Creates a webhook from `spec`, which must be refused with 422: the
/// error's code and message.
async fn refused(api: &Api, spec: Value) -> (String, String) {
    let (status, answer) = api.post_json("/api/v1/webhooks", &spec).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{spec}: {answer}");
    (
        answer["error"]["code"].as_str().expect("a code").to_owned(),
        answer["error"]["message"]
            .as_str()
            .expect("a message")
            .to_owned(),
    )
}

/// The built-in catalogue.
const CATALOGUE: &[&str] = &[
    "blueprint.create",
    "blueprint.delete",
    "blueprint.update",
    "document.create",
    "document.delete",
    "document.field.update",
    "document.update",
    "project.member.assign",
    "project.member.deassign",
];

#[tokio::test]
async fn invalid_webhooks_and_events_are_422_with_messages_that_say_what_to_send() {
    let relay = TestRelay::start(config("0")).await;
    let api = Api::of(&relay);
    let valid =
        json!({"name": "v", "url": "https://example.com/hooks", "actions": ["document.create"]});
    let with = |field: &str, value: Value| {
        let mut spec = valid.clone();
        spec[field] = value;
        spec
    };

    let (code, message) = refused(&api, with("name", json!("  "))).await;
    assert_eq!(code, "invalid_name");
    assert!(message.contains("`name`"), "{message}");
    let (code, message) = refused(&api, with("method", json!("TRACE"))).await;
    assert_eq!(code, "invalid_method");
    assert!(
        message.contains("POST, PUT, PATCH, GET, DELETE"),
        "{message}"
    );
    for url in ["/hooks", "example.com/hooks", "ftp://example.com/hooks"] {
        let (code, message) = refused(&api, with("url", json!(url))).await;
        assert_eq!(code, "invalid_url", "{url}");
        assert!(message.contains("absolute http or https"), "{message}");
    }
    let (code, message) = refused(&api, with("actions", json!(["document.explode"]))).await;
    assert_eq!(code, "unknown_action");
    assert!(message.contains("`document.explode`"), "{message}");
    for known in CATALOGUE {
        assert!(message.contains(known), "{known} in {message}");
    }
    for name in ["Webhook-Signature", "content-type", "connection"] {
        let (code, message) = refused(&api, with("headers", json!({name: "forged"}))).await;
        assert_eq!(code, "invalid_headers", "{name}");
        assert!(message.contains("reserved"), "{message}");
    }
    let (code, message) = refused(&api, with("secret", json!("s3cret"))).await;
    assert_eq!(code, "invalid_secret");
    assert!(message.contains("whsec_"), "{message}");
    let (code, message) = refused(&api, with("secret", json!("whsec_c2hvcnQ="))).await;
    assert_eq!(code, "invalid_secret");
    assert!(message.contains("24 to 64"), "{message}");
    let mut no_url = valid.clone();
    no_url
        .as_object_mut()
        .expect("an object")
        .remove("url")
        .expect("a url");
    let (code, message) = refused(&api, no_url).await;
    assert_eq!(code, "missing_field");
    assert!(message.contains("`url`"), "{message}");
    assert!(items(&api.get_json("/api/v1/webhooks").await).is_empty());

    let (status, answer) = api
        .post_json(
            "/api/v1/events",
            &json!({"type": "document.explode", "data": {}}),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{answer}");
    assert_eq!(answer["error"]["code"], "unknown_event_type");
    let message = answer["error"]["message"].as_str().expect("a message");
    for known in CATALOGUE {
        assert!(message.contains(known), "{known} in {message}");
    }

    the_catalogue_is_listed(&api).await;
    relay.stop().await;
}

/// `GET /api/v1/event-types` lists the catalogue; a bad name is refused.
async fn the_catalogue_is_listed(api: &Api) {
    let types = api.get_json("/api/v1/event-types").await;
    let names: Vec<&str> = items(&types)
        .iter()
        .map(|t| t["name"].as_str().expect("a name"))
        .collect();
    assert_eq!(names, CATALOGUE);
    for kind in items(&types) {
        assert!(
            !kind["description"]
                .as_str()
                .expect("a description")
                .is_empty(),
            "{kind}"
        );
        assert!(
            kind["example"].as_object().is_some_and(|e| !e.is_empty()),
            "{kind}"
        );
        assert_eq!(kind["source"], "builtin");
    }
    let (status, answer) = api
        .post_json(
            "/api/v1/event-types",
            &json!({"name": "Invoice Paid", "description": "x"}),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{answer}");
    assert_eq!(answer["error"]["code"], "invalid_event_type");
}

#[tokio::test]
async fn an_added_event_type_is_listed_and_delivered() {
    let relay = TestRelay::start(config("0")).await;
    let (origin, mut arrivals) = accepting_receiver().await;
    let api = Api::of(&relay);
    let (status, added) = api
        .post_json(
            "/api/v1/event-types",
            &json!({"name": "invoice.paid", "description": "An invoice was paid.", "example": {"invoice_id": "inv_1"}}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{added}");
    assert_eq!(added["name"], "invoice.paid");
    let types = api.get_json("/api/v1/event-types").await;
    let listed = items(&types)
        .iter()
        .find(|t| t["name"] == "invoice.paid")
        .expect("the new type is listed");
    assert_eq!(listed["description"], "An invoice was paid.");
    assert_eq!(listed["example"], json!({"invoice_id": "inv_1"}));

    create(
        &api,
        json!({"name": "billing", "url": url_of(&origin, "/billing"), "actions": ["invoice.*"]}),
    )
    .await;
    let accepted = event(
        &api,
        json!({"type": "invoice.paid", "data": {"invoice_id": "inv_7"}}),
    )
    .await;
    assert_eq!(accepted["queued"], 1);
    let arrival = next(&mut arrivals, "the invoice event").await;
    assert_eq!(arrival.header("ferry-event-type"), "invoice.paid");
    assert_eq!(arrival.json()["data"], json!({"invoice_id": "inv_7"}));

    origin.stop().await;
    relay.stop().await;
}

#[tokio::test]
async fn a_test_event_sends_the_types_example_to_that_webhook_only() {
    let relay = TestRelay::start(config("0")).await;
    let (origin, mut arrivals) = accepting_receiver().await;
    let api = Api::of(&relay);
    let tested = create(
        &api,
        json!({"name": "tested", "url": url_of(&origin, "/tested"), "actions": ["document.delete"]}),
    )
    .await;
    let bystander = create(
        &api,
        json!({"name": "bystander", "url": url_of(&origin, "/bystander"), "actions": ["*"]}),
    )
    .await;
    let types = api.get_json("/api/v1/event-types").await;
    let example = |name: &str| {
        items(&types)
            .iter()
            .find(|t| t["name"] == name)
            .map(|t| t["example"].clone())
            .expect("a catalogue type")
    };
    let test_path = format!("/api/v1/webhooks/{}/test", id_of(&tested));

    // Without a type: the webhook's first listened type.
    let (status, accepted) = call(&api, "POST", &test_path, None).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{accepted}");
    assert_eq!(accepted["queued"], 1);
    let arrival = next(&mut arrivals, "the test event").await;
    assert_eq!(arrival.path, "/tested");
    assert_eq!(arrival.header("ferry-event-type"), "document.delete");
    assert_eq!(arrival.json()["data"], example("document.delete"));
    assert!(arrival.verifies_with(tested["secret"].as_str().expect("a secret")));

    let (status, accepted) = call(
        &api,
        "POST",
        &test_path,
        Some(&json!({"type": "blueprint.create"})),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{accepted}");
    assert_eq!(accepted["queued"], 1);
    let arrival = next(&mut arrivals, "the chosen test event").await;
    assert_eq!(arrival.path, "/tested");
    assert_eq!(arrival.json()["type"], "blueprint.create");
    assert_eq!(arrival.json()["data"], example("blueprint.create"));

    let (status, answer) = call(
        &api,
        "POST",
        &test_path,
        Some(&json!({"type": "nothing.here"})),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{answer}");
    settled(&api, &id_of(&tested), 2, "succeeded").await;
    let others = api
        .get_json(&format!(
            "/api/v1/webhooks/{}/deliveries",
            id_of(&bystander)
        ))
        .await;
    assert!(items(&others).is_empty(), "{others}");
    assert!(arrivals.try_recv().is_err());

    origin.stop().await;
    relay.stop().await;
}

#[tokio::test]
async fn a_failed_delivery_is_resent_with_its_webhook_id_and_recover_requeues_failures() {
    // One attempt each; the receiver fails the 1st, 4th and 5th requests.
    let relay = TestRelay::start(config("0")).await;
    let (origin, mut arrivals) =
        receiver(|n| async move { reply(if matches!(n, 0 | 3 | 4) { 500 } else { 200 }) }).await;
    let api = Api::of(&relay);
    let webhook = create(
        &api,
        json!({"name": "flaky", "url": url_of(&origin, "/flaky"), "actions": ["*"]}),
    )
    .await;
    let id = id_of(&webhook);
    let secret = webhook["secret"].as_str().expect("a secret");
    event(&api, json!({"type": "document.create", "data": {"n": 1}})).await;
    let first = next(&mut arrivals, "the only attempt").await;
    let failed = settled(&api, &id, 1, "failed").await;
    assert_eq!(failed[0]["attempts"], 1);
    assert_eq!(failed[0]["last_status"], 500);
    let delivery = id_of(&failed[0]);
    assert_eq!(first.header("webhook-id"), delivery);

    let (status, resent) = call(
        &api,
        "POST",
        &format!("/api/v1/deliveries/{delivery}/resend"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{resent}");
    let again = next(&mut arrivals, "the resent attempt").await;
    assert_eq!(again.header("webhook-id"), delivery);
    assert_eq!(again.body, first.body);
    assert!(again.timestamp() >= first.timestamp());
    assert_eq!(
        again.header("webhook-signature"),
        again.signature_under(secret),
        "signed for its own timestamp"
    );
    assert!(again.verifies_with(secret));
    let done = settled(&api, &id, 1, "succeeded").await;
    assert_eq!(done[0]["attempts"], 2);
    let (status, answer) = call(
        &api,
        "POST",
        &format!("/api/v1/deliveries/{delivery}/resend"),
        None,
    )
    .await;
    assert_eq!(
        status,
        StatusCode::ACCEPTED,
        "a success may be resent too: {answer}"
    );
    next(&mut arrivals, "the resent success").await;
    let done = settled(&api, &id, 1, "succeeded").await;
    assert_eq!(done[0]["attempts"], 3);

    for n in [2, 3] {
        event(&api, json!({"type": "document.update", "data": {"n": n}})).await;
    }
    next(&mut arrivals, "a failing delivery").await;
    next(&mut arrivals, "another failing delivery").await;
    poll(
        &api,
        "two failed deliveries",
        &format!("/api/v1/webhooks/{id}/deliveries?state=failed"),
        |page| items(page).len() == 2,
    )
    .await;
    let (status, recovered) = call(
        &api,
        "POST",
        &format!("/api/v1/webhooks/{id}/recover?since=1h"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{recovered}");
    assert_eq!(recovered, json!({"queued": 2}));
    let mut recovered_ns = BTreeSet::new();
    for _ in 0..2 {
        let arrival = next(&mut arrivals, "a recovered delivery").await;
        recovered_ns.insert(arrival.json()["data"]["n"].as_i64().expect("n"));
    }
    assert_eq!(recovered_ns, BTreeSet::from([2, 3]));
    let all = settled(&api, &id, 3, "succeeded").await;
    let attempts: Vec<&Value> = all.iter().map(|d| &d["attempts"]).collect();
    assert_eq!(attempts, [&json!(2), &json!(2), &json!(3)], "newest first");

    origin.stop().await;
    relay.stop().await;
}

#[tokio::test]
async fn deliveries_into_an_offline_held_tunnel_wait_then_arrive_in_order() {
    // No egress allowance: a tunnel on this relay is reached without one.
    let relay = TestRelay::open().await;
    let (origin, mut arrivals) = accepting_receiver().await;
    let options = ClientOptions {
        subdomain: Some("hooks"),
        client_key: Some("5ca1ab1e5ca1ab1e5ca1ab1e5ca1ab1e".to_owned()),
        ..ClientOptions::default()
    };
    let client = TestClient::start(&relay, &origin.target(), options.clone()).await;
    let api = Api::of(&relay);
    let webhook = create(
        &api,
        json!({
            "name": "local",
            "url": format!("http://{}/hook", host_of(&client.public_url)),
            "actions": ["document.*"],
        }),
    )
    .await;
    let id = id_of(&webhook);
    let secret = webhook["secret"].as_str().expect("a secret");
    event(&api, json!({"type": "document.create", "data": {"n": 0}})).await;
    let live = next(&mut arrivals, "the delivery through the tunnel").await;
    assert_eq!(live.path, "/hook");
    assert_eq!(live.method, "POST");
    assert!(live.verifies_with(secret));
    settled(&api, &id, 1, "succeeded").await;

    client.stop().await.expect("client stops");
    poll(&api, "the name to be held", "/api/v1/tunnels", |t| {
        items_named(&t["offline"], "hooks") && !items_named(&t["tunnels"], "hooks")
    })
    .await;
    for n in 1..=3 {
        let accepted = event(&api, json!({"type": "document.update", "data": {"n": n}})).await;
        assert_eq!(accepted["queued"], 1);
    }
    let waiting = api
        .get_json(&format!("/api/v1/webhooks/{id}/deliveries?state=pending"))
        .await;
    assert_eq!(items(&waiting).len(), 3, "{waiting}");
    assert!(
        items(&waiting).iter().all(|d| d["attempts"] == 0),
        "{waiting}"
    );

    let client = TestClient::start(&relay, &origin.target(), options).await;
    assert_eq!(client.name, "hooks");
    for n in 1..=3 {
        let arrival = next(&mut arrivals, "a delivery that waited").await;
        assert_eq!(arrival.json()["data"]["n"], n, "in event order");
        assert!(arrival.verifies_with(secret));
    }
    let all = settled(&api, &id, 4, "succeeded").await;
    assert!(
        all.iter().all(|d| d["attempts"] == 1),
        "no attempt was spent while the tunnel was away: {all:?}"
    );

    client.stop().await.expect("client stops");
    origin.stop().await;
    relay.stop().await;
}

/// Whether the list `list` has an entry named `name`.
fn items_named(list: &Value, name: &str) -> bool {
    list.as_array()
        .is_some_and(|l| l.iter().any(|t| t["name"] == name))
}

#[tokio::test]
async fn only_a_tunnels_owner_may_point_a_webhook_at_it() {
    let relay = TestRelay::start(ferry_relay::Config {
        tokens: vec![ferry_relay::Token::new("a"), ferry_relay::Token::new("b")],
        ..ferry_relay::Config::default()
    })
    .await;
    let (origin, mut arrivals) = accepting_receiver().await;
    let client = TestClient::start(
        &relay,
        &origin.target(),
        ClientOptions {
            token: Some("a".to_owned()),
            subdomain: Some("mine"),
            ..ClientOptions::default()
        },
    )
    .await;
    let spec = json!({
        "name": "into a tunnel",
        "url": format!("http://{}/hook", host_of(&client.public_url)),
        "actions": ["*"],
    });
    let (code, message) = refused(&Api::with_token(&relay, "b"), spec.clone()).await;
    assert_eq!(code, "tunnel_not_yours");
    assert!(message.contains("mine"), "{message}");
    let b_hook = create(
        &Api::with_token(&relay, "b"),
        json!({"name": "b's", "url": "https://example.com/hooks", "actions": ["*"]}),
    )
    .await;
    let (status, answer) = call(
        &Api::with_token(&relay, "b"),
        "PUT",
        &format!("/api/v1/webhooks/{}", id_of(&b_hook)),
        Some(&json!({"url": spec["url"]})),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{answer}");
    assert_eq!(
        answer["error"]["code"], "tunnel_not_yours",
        "nor by an update"
    );
    let a = Api::with_token(&relay, "a");
    create(&a, spec).await;
    // And it delivers into its owner's tunnel.
    event(&a, json!({"type": "document.create", "data": {"n": 1}})).await;
    let arrival = next(&mut arrivals, "the delivery into a's tunnel").await;
    assert_eq!(arrival.path, "/hook");
    assert_eq!(arrival.json()["data"], json!({"n": 1}));

    client.stop().await.expect("client stops");
    origin.stop().await;
    relay.stop().await;
}

#[tokio::test]
async fn a_webhook_pointed_at_the_relays_own_api_is_refused_and_cannot_loop() {
    let relay = TestRelay::start(config("0")).await;
    let api = Api::of(&relay);
    // By the relay's domain, refused when the webhook is made.
    let (code, _) = refused(
        &api,
        json!({
            "name": "self", "actions": ["*"],
            "url": format!("http://localhost:{}/api/v1/events", relay.addr.port()),
        }),
    )
    .await;
    assert_eq!(code, "invalid_url");
    // By address, the relay's API refuses the delivery itself: a delivery
    // that resends or sends events would otherwise call the relay forever.
    let webhook = create(
        &api,
        json!({
            "name": "self by address", "actions": ["*"],
            "url": format!("http://{}/api/v1/events", relay.addr),
        }),
    )
    .await;
    event(&api, json!({"type": "document.create", "data": {}})).await;
    let failed = settled(&api, &id_of(&webhook), 1, "failed").await;
    assert_eq!(failed[0]["last_status"], 403, "{}", failed[0]);
    let attempt = &failed[0]["attempt_log"][0];
    let entry = api
        .get_json(&format!(
            "/api/v1/requests/{}",
            attempt["request_id"].as_str().expect("a request id")
        ))
        .await;
    let body = entry["response"]["body"]["text"]
        .as_str()
        .unwrap_or_default();
    assert!(body.contains("delivery_refused"), "{body}");
    // Nothing more was queued by the delivery.
    let page = api
        .get_json(&format!("/api/v1/webhooks/{}/deliveries", id_of(&webhook)))
        .await;
    assert_eq!(items(&page).len(), 1);
    relay.stop().await;
}

#[tokio::test]
async fn oversized_event_and_settings_bodies_are_refused_before_they_are_parsed() {
    let relay = TestRelay::start(config("0")).await;
    let api = Api::of(&relay);
    let big = "x".repeat(2 * 1024 * 1024);
    let (status, answer) = call(
        &api,
        "POST",
        "/api/v1/events",
        Some(&json!({"type": "document.create", "data": big})),
    )
    .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{answer}");
    let (status, answer) = call(
        &api,
        "POST",
        "/api/v1/webhooks",
        Some(
            &json!({"name": "x", "url": "https://example.com/", "actions": ["*"],
                      "headers": {"x-pad": "y".repeat(300 * 1024)}}),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{answer}");
    // An event just under the payload limit is taken.
    let fits = "x".repeat(1000 * 1024);
    event(&api, json!({"type": "document.create", "data": fits})).await;
    relay.stop().await;
}

#[tokio::test]
async fn a_trailing_dot_does_not_get_a_webhook_into_someone_elses_tunnel() {
    let relay = TestRelay::start(ferry_relay::Config {
        tokens: vec![ferry_relay::Token::new("a"), ferry_relay::Token::new("b")],
        ..ferry_relay::Config::default()
    })
    .await;
    let (origin, _arrivals) = accepting_receiver().await;
    let client = TestClient::start(
        &relay,
        &origin.target(),
        ClientOptions {
            token: Some("b".to_owned()),
            subdomain: Some("bobs"),
            ..ClientOptions::default()
        },
    )
    .await;
    let (code, _) = refused(
        &Api::with_token(&relay, "a"),
        json!({
            "name": "sneaky", "actions": ["*"],
            "url": format!("http://bobs.localhost.:{}/hook", relay.addr.port()),
        }),
    )
    .await;
    assert_eq!(code, "tunnel_not_yours");
    client.stop().await.expect("client stops");
    origin.stop().await;
    relay.stop().await;
}

#[tokio::test]
async fn concurrent_creates_cannot_pass_the_webhook_cap_together() {
    let relay = TestRelay::start(config("0")).await;
    let api = Arc::new(Api::of(&relay));
    let spec = |n: usize| json!({"name": format!("hook {n}"), "url": "https://example.com/", "actions": ["*"]});
    let cap = ferry_relay::api::webhooks::MAX_WEBHOOKS;
    for n in 0..cap - 5 {
        create(&api, spec(n)).await;
    }
    let racers: Vec<_> = (0..20)
        .map(|n| {
            let api = Arc::clone(&api);
            let body = spec(cap + n);
            tokio::spawn(async move { call(&api, "POST", "/api/v1/webhooks", Some(&body)).await.0 })
        })
        .collect();
    let mut created = 0;
    for racer in racers {
        match racer.await.expect("the call ran") {
            StatusCode::CREATED => created += 1,
            StatusCode::CONFLICT => {}
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!(created, 5);
    assert_eq!(items(&api.get_json("/api/v1/webhooks").await).len(), cap);
    relay.stop().await;
}

/// A receiver that reports each request and answers it only when the test
/// sends it a status through the returned channel.
async fn held_receiver() -> (Origin, mpsc::Receiver<Arrival>, mpsc::Sender<u16>) {
    let (answer_tx, answer_rx) = mpsc::channel::<u16>(64);
    let answers = Arc::new(tokio::sync::Mutex::new(answer_rx));
    let (origin, arrivals) = receiver(move |_| {
        let answers = Arc::clone(&answers);
        async move {
            let code = answers.lock().await.recv().await.unwrap_or(503);
            reply(code)
        }
    })
    .await;
    (origin, arrivals, answer_tx)
}

#[tokio::test]
async fn an_attempt_in_flight_when_its_webhook_is_disabled_does_not_revive_its_delivery() {
    // Two attempts, the second at once: a revived delivery would be sent
    // again straight away.
    let relay = TestRelay::start(config("0,0")).await;
    let api = Api::of(&relay);
    let (origin, mut arrivals, answers) = held_receiver().await;
    let webhook = create(
        &api,
        json!({"name": "held", "url": url_of(&origin, "/h"), "actions": ["*"]}),
    )
    .await;
    let path = format!("/api/v1/webhooks/{}", id_of(&webhook));
    event(&api, json!({"type": "document.create", "data": {"n": 1}})).await;
    let first = next(&mut arrivals, "the first attempt").await;
    let (status, _) = call(&api, "PUT", &path, Some(&json!({"enabled": false}))).await;
    assert_eq!(status, StatusCode::OK);
    // While the attempt is in flight the delivery cannot be sent beside it.
    let delivery = first.header("webhook-id").to_owned();
    let (status, answer) = call(
        &api,
        "POST",
        &format!("/api/v1/deliveries/{delivery}/resend"),
        Some(&json!({})),
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT, "{answer}");
    answers.send(500).await.expect("the receiver waits");
    poll(
        &api,
        "the attempt stored",
        &format!("/api/v1/deliveries/{delivery}"),
        |d| d["attempt_log"].as_array().is_some_and(|a| a.len() == 1),
    )
    .await;
    let stored = api
        .get_json(&format!("/api/v1/deliveries/{delivery}"))
        .await;
    assert_eq!(stored["state"], "failed", "{stored}");
    // A disabled webhook sends no test and no resend.
    let (status, answer) = call(
        &api,
        "POST",
        &format!("/api/v1/deliveries/{delivery}/resend"),
        Some(&json!({})),
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT, "{answer}");
    assert_eq!(answer["error"]["code"], "webhook_disabled");
    let (status, _) = call(&api, "POST", &format!("{path}/test"), Some(&json!({}))).await;
    assert_eq!(status, StatusCode::CONFLICT);
    // Enabled again, the next thing to arrive is a new event, not a retry.
    call(&api, "PUT", &path, Some(&json!({"enabled": true}))).await;
    event(&api, json!({"type": "document.create", "data": {"n": 2}})).await;
    let after = next(&mut arrivals, "the next delivery").await;
    assert_eq!(after.json()["data"], json!({"n": 2}));
    answers.send(200).await.expect("the receiver waits");
    origin.stop().await;
    relay.stop().await;
}

#[tokio::test]
async fn one_accounts_stalled_receivers_do_not_hold_back_anothers_deliveries() {
    let relay = TestRelay::start(ferry_relay::Config {
        tokens: vec![ferry_relay::Token::new("a"), ferry_relay::Token::new("b")],
        egress_allow: ferry_relay::egress::Allow::loopback(),
        dispatch: ferry_relay::dispatch::Settings {
            // Longer than the test's patience: only a free slot helps b.
            timeout: Duration::from_secs(600),
            ..ferry_relay::dispatch::Settings::default()
        },
        ..ferry_relay::Config::default()
    })
    .await;
    let (stalled, mut stalled_arrivals, _answers) = held_receiver().await;
    let a = Api::with_token(&relay, "a");
    for n in 0..4 {
        create(
            &a,
            json!({"name": format!("stalled {n}"), "url": url_of(&stalled, "/s"), "actions": ["*"]}),
        )
        .await;
    }
    for n in 0..50 {
        event(&a, json!({"type": "document.create", "data": {"n": n}})).await;
    }
    // a fills its share of the slots, and no more.
    let per_account = ferry_relay::dispatch::Settings::DEFAULT_PER_ACCOUNT;
    for _ in 0..per_account {
        next(&mut stalled_arrivals, "a's attempts to start").await;
    }
    let b = Api::with_token(&relay, "b");
    let (origin, mut arrivals) = accepting_receiver().await;
    create(
        &b,
        json!({"name": "b's", "url": url_of(&origin, "/b"), "actions": ["*"]}),
    )
    .await;
    event(&b, json!({"type": "document.create", "data": {"b": true}})).await;
    let arrival = next(&mut arrivals, "b's delivery beside a's stalled ones").await;
    assert_eq!(arrival.json()["data"], json!({"b": true}));
    assert!(
        stalled_arrivals.try_recv().is_err(),
        "a holds no more than its share"
    );
    origin.stop().await;
    stalled.stop().await;
    relay.stop().await;
}

#[tokio::test]
async fn an_account_with_a_full_queue_gets_429_until_it_drains() {
    let relay = TestRelay::start(ferry_relay::Config {
        egress_allow: ferry_relay::egress::Allow::loopback(),
        dispatch: ferry_relay::dispatch::Settings {
            max_pending: 3,
            ..ferry_relay::dispatch::Settings::default()
        },
        ..ferry_relay::Config::default()
    })
    .await;
    let api = Api::of(&relay);
    let (origin, mut arrivals, answers) = held_receiver().await;
    create(
        &api,
        json!({"name": "slow", "url": url_of(&origin, "/h"), "actions": ["*"], "ordered": true}),
    )
    .await;
    for n in 0..3 {
        event(&api, json!({"type": "document.create", "data": {"n": n}})).await;
    }
    let (status, answer) = api
        .post_json(
            "/api/v1/events",
            &json!({"type": "document.create", "data": {"n": 3}}),
        )
        .await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{answer}");
    assert!(
        answer["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("pending")),
        "{answer}"
    );
    // Drained, the account may send again.
    for _ in 0..3 {
        next(&mut arrivals, "a held delivery").await;
        answers.send(200).await.expect("the receiver waits");
    }
    within("the queue to take events again", async {
        loop {
            let (status, _) = api
                .post_json(
                    "/api/v1/events",
                    &json!({"type": "document.create", "data": {"n": 4}}),
                )
                .await;
            if status == StatusCode::ACCEPTED {
                break;
            }
            tokio::task::yield_now().await;
        }
    })
    .await;
    answers.send(200).await.expect("the receiver waits");
    origin.stop().await;
    relay.stop().await;
}

#[tokio::test]
async fn malformed_paging_and_recovery_parameters_get_400_with_a_message() {
    let relay = TestRelay::start(config("0")).await;
    let api = Api::of(&relay);
    let webhook = create(
        &api,
        json!({"name": "x", "url": "https://example.com/", "actions": ["*"]}),
    )
    .await;
    let base = format!("/api/v1/webhooks/{}", id_of(&webhook));
    for query in [
        "state=lost",
        "limit=0",
        "limit=100000",
        "before=abc",
        "color=blue",
    ] {
        let (status, body) = api.get(&format!("{base}/deliveries?{query}")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}");
        let answer: Value = serde_json::from_slice(&body).expect("a JSON error");
        assert!(answer["error"]["message"].is_string(), "{query}: {answer}");
    }
    for query in ["", "?since=yesterday-ish"] {
        let (status, answer) = call(
            &api,
            "POST",
            &format!("{base}/recover{query}"),
            Some(&json!({})),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}: {answer}");
    }
    relay.stop().await;
}
