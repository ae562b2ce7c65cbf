//! Relays sharing one PostgreSQL database (`--database-url`): what one
//! relay stores every other reads, the delivery queue is shared by every
//! relay's workers, and a database outage stops neither the tunnels nor
//! what capture holds.

use std::collections::HashMap;

use ferry_tests::postgres::{fresh_database, PgServer};
use ferry_tests::{
    empty, full, host_of, read_body, send, within, Api, ClientOptions, Origin, TestClient,
    TestRelay,
};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde_json::{json, Value};
use tokio::sync::mpsc;

/// A relay on the database at `url` that may deliver to loopback.
async fn relay_on(url: &str) -> TestRelay {
    TestRelay::start(ferry_relay::Config {
        database_url: Some(url.to_owned()),
        egress_allow: ferry_relay::egress::Allow::loopback(),
        dispatch: ferry_relay::dispatch::Settings {
            schedule: "0".parse().expect("a valid schedule"),
            ..ferry_relay::dispatch::Settings::default()
        },
        ..ferry_relay::Config::default()
    })
    .await
}

/// An origin answering every request 200 with `hello`.
async fn hello_origin() -> Origin {
    Origin::start(|_req: Request<Incoming>| async { Response::new(full("hello")) }).await
}

/// A GET through `relay` to tunnel `client`: the status.
async fn get_through(relay: &TestRelay, client: &TestClient, path: &str) -> StatusCode {
    let request = Request::get(path).body(empty()).expect("valid request");
    let response = send(relay.addr, &host_of(&client.public_url), request).await;
    let status = response.status();
    read_body(response.into_body()).await;
    status
}

/// Polls `GET path` on `api` until `done` holds for its answer.
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

fn items(list: &Value) -> &Vec<Value> {
    list["items"].as_array().expect("items")
}

#[tokio::test]
async fn what_one_relay_captures_every_relay_lists_and_tails() {
    let url = fresh_database().await;
    let relays = [
        relay_on(&url).await,
        relay_on(&url).await,
        relay_on(&url).await,
    ];
    let origin = hello_origin().await;
    let client = TestClient::start(&relays[0], &origin.target(), ClientOptions::default()).await;
    // A live feed on another relay than the one that captures.
    let mut tail = Api::of(&relays[2]).tail("").await;

    assert_eq!(
        get_through(&relays[0], &client, "/shared?n=1").await,
        StatusCode::OK
    );
    let (id, item) = tail.next_item().await;
    assert_eq!(item["path"], "/shared?n=1");
    for relay in &relays {
        let api = Api::of(relay);
        let list = api.get_json("/api/v1/requests").await;
        let ids: Vec<&str> = items(&list)
            .iter()
            .filter_map(|item| item["id"].as_str())
            .collect();
        assert_eq!(ids, vec![id.as_str()], "logged once, listed by every relay");
        let detail = api.get_json(&format!("/api/v1/requests/{id}")).await;
        assert_eq!(detail["response"]["status"], 200);
    }

    client.stop().await.expect("client stops");
    origin.stop().await;
    for relay in relays {
        relay.stop().await;
    }
}

#[tokio::test]
async fn events_posted_to_any_of_three_relays_are_delivered_exactly_once() {
    const EVENTS: usize = 60;
    let url = fresh_database().await;
    let relays = [
        relay_on(&url).await,
        relay_on(&url).await,
        relay_on(&url).await,
    ];
    let (arrived, mut arrivals) = mpsc::unbounded_channel();
    let receiver = Origin::start(move |req: Request<Incoming>| {
        let arrived = arrived.clone();
        async move {
            let id = req
                .headers()
                .get("webhook-id")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let body = read_body(req.into_body()).await;
            let _ = arrived.send((id, body));
            Response::new(empty())
        }
    })
    .await;
    let apis: Vec<Api> = relays.iter().map(Api::of).collect();
    let (status, webhook) = apis[0]
        .post_json(
            "/api/v1/webhooks",
            &json!({"name": "fleet", "url": format!("{}/hooks", receiver.target()), "actions": ["*"]}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{webhook}");
    let webhook = webhook["id"].as_str().expect("an id").to_owned();

    for n in 0..EVENTS {
        let event = json!({"type": "document.create", "id": format!("ev-{n}"), "data": {"n": n}});
        let (status, accepted) = apis[n % 3].post_json("/api/v1/events", &event).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{accepted}");
        assert_eq!(accepted["duplicate"], false);
        // The same id at another relay is the same event.
        let (status, again) = apis[(n + 1) % 3].post_json("/api/v1/events", &event).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{again}");
        assert_eq!(again["duplicate"], true, "{again}");
    }

    let mut seen: HashMap<String, usize> = HashMap::new();
    while seen.values().sum::<usize>() < EVENTS {
        let (id, _body) = within("a delivery", arrivals.recv())
            .await
            .expect("the receiver runs");
        *seen.entry(id.expect("a webhook-id")).or_default() += 1;
    }
    // Every delivery recorded as succeeded with one attempt, seen alike from
    // every relay; then nothing more arrives.
    for api in &apis {
        let page = poll(
            api,
            "every delivery succeeded",
            &format!("/api/v1/webhooks/{webhook}/deliveries?limit=100"),
            |page| {
                let items = items(page);
                items.len() == EVENTS && items.iter().all(|d| d["state"] == "succeeded")
            },
        )
        .await;
        for delivery in items(&page) {
            assert_eq!(delivery["attempts"], 1, "{delivery}");
        }
    }
    assert_eq!(seen.len(), EVENTS, "one webhook-id per event");
    assert!(seen.values().all(|n| *n == 1), "none twice: {seen:?}");
    assert!(arrivals.try_recv().is_err(), "nothing after the last");

    receiver.stop().await;
    for relay in relays {
        relay.stop().await;
    }
}

#[tokio::test]
async fn a_database_outage_fails_health_refuses_events_and_loses_no_capture() {
    let (server, url) = PgServer::own().await;
    let relay = relay_on(&url).await;
    let origin = hello_origin().await;
    let client = TestClient::start(&relay, &origin.target(), ClientOptions::default()).await;
    let api = Api::of(&relay);
    let mut tail = api.tail("").await;
    assert_eq!(api.get("/healthz").await.0, StatusCode::OK);
    assert_eq!(
        get_through(&relay, &client, "/before").await,
        StatusCode::OK
    );
    assert_eq!(tail.next_item().await.1["path"], "/before");

    server.pause().await;
    let (status, text) = api.get("/healthz").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    let text = String::from_utf8_lossy(&text).into_owned();
    assert!(text.contains("database is unavailable"), "{text}");
    // The tunnel forwards on.
    assert_eq!(
        get_through(&relay, &client, "/during").await,
        StatusCode::OK
    );
    // An event is accepted only once it is durable.
    let (status, refused) = api
        .post_json(
            "/api/v1/events",
            &json!({"type": "document.create", "id": "in-the-outage", "data": {}}),
        )
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{refused}");
    assert!(
        refused["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("try again")),
        "{refused}"
    );

    server.resume().await;
    // What capture held in memory is stored once the database is back.
    assert_eq!(tail.next_item().await.1["path"], "/during");
    assert_eq!(api.get("/healthz").await.0, StatusCode::OK);
    let list = api.get_json("/api/v1/requests").await;
    let paths: Vec<&str> = items(&list)
        .iter()
        .filter_map(|item| item["path"].as_str())
        .collect();
    assert_eq!(paths, vec!["/during", "/before"]);

    client.stop().await.expect("client stops");
    origin.stop().await;
    relay.stop().await;
    drop(server);
}
