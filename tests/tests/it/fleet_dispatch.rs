//! The delivery queue of a fleet survives a relay killed with SIGKILL in
//! the middle of its deliveries: every event is delivered at least once,
//! and what the dead relay had in flight arrives again from another relay
//! under the same `webhook-id`, once its lease has run out.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ferry_tests::fleet::RelayProcess;
use ferry_tests::postgres::fresh_database;
use ferry_tests::{empty, read_body, within, Api, Origin};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde_json::{json, Value};
use tokio::sync::{mpsc, Notify};

/// Events queued before the kill.
const EVENTS: usize = 40;
/// An attempt's time limit: the dead relay's leases end this long plus the
/// dispatcher's fixed margin (60 s) after they were taken.
const ATTEMPT_TIMEOUT: &str = "5s";
/// How long the leases of the dead relay may take to run out, and the
/// deliveries to follow: longer than [`within`]'s patience.
const LEASE_PATIENCE: Duration = Duration::from_secs(180);

/// `ferry-relay` on the database at `url`, delivering to loopback.
async fn relay(url: &str) -> RelayProcess {
    RelayProcess::start(&[
        "--database-url".to_owned(),
        url.to_owned(),
        "--egress-allow".to_owned(),
        "127.0.0.0/8".to_owned(),
        "--dispatch-timeout".to_owned(),
        ATTEMPT_TIMEOUT.to_owned(),
    ])
    .await
}

#[tokio::test]
async fn a_relay_killed_mid_delivery_loses_nothing_and_its_attempts_return_under_their_ids() {
    let url = fresh_database().await;
    // Until `answering` is set, the receiver holds every request open, so
    // the first relay's attempts are in flight when it is killed.
    let answering = Arc::new(AtomicBool::new(false));
    let answer_now = Arc::new(Notify::new());
    let (arrived, mut arrivals) = mpsc::unbounded_channel();
    let receiver = {
        let (answering, answer_now) = (Arc::clone(&answering), Arc::clone(&answer_now));
        Origin::start(move |req: Request<Incoming>| {
            let (answering, answer_now, arrived) = (
                Arc::clone(&answering),
                Arc::clone(&answer_now),
                arrived.clone(),
            );
            async move {
                let id = req
                    .headers()
                    .get("webhook-id")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_owned();
                read_body(req.into_body()).await;
                let _ = arrived.send(id);
                while !answering.load(Ordering::SeqCst) {
                    answer_now.notified().await;
                }
                Response::new(empty())
            }
        })
        .await
    };

    let first = relay(&url).await;
    let api = Api::at(first.addr);
    let (status, webhook) = api
        .post_json(
            "/api/v1/webhooks",
            &json!({"name": "fleet", "url": format!("{}/hooks", receiver.target()), "actions": ["*"]}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{webhook}");
    let webhook = webhook["id"].as_str().expect("an id").to_owned();
    for n in 0..EVENTS {
        let (status, accepted) = api
            .post_json(
                "/api/v1/events",
                &json!({"type": "document.create", "id": format!("ev-{n}"), "data": {"n": n}}),
            )
            .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{accepted}");
    }
    let in_flight = within("an attempt in flight", arrivals.recv())
        .await
        .expect("the receiver runs");

    let others = [relay(&url).await, relay(&url).await];
    first.kill().await;
    answering.store(true, Ordering::SeqCst);
    answer_now.notify_waiters();

    // Every delivery ends succeeded, as the surviving relays see it.
    let deliveries = tokio::time::timeout(LEASE_PATIENCE, async {
        let api = Api::at(others[0].addr);
        loop {
            let page = api
                .get_json(&format!("/api/v1/webhooks/{webhook}/deliveries?limit=100"))
                .await;
            let items = page["items"].as_array().cloned().unwrap_or_default();
            if items.len() == EVENTS && items.iter().all(|d| d["state"] == "succeeded") {
                return items;
            }
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("every delivery succeeded once the dead relay's leases ran out");
    let ids: HashSet<String> = deliveries
        .iter()
        .map(|d: &Value| d["id"].as_str().expect("a delivery id").to_owned())
        .collect();
    assert_eq!(ids.len(), EVENTS);

    let mut seen: HashMap<String, usize> = HashMap::new();
    *seen.entry(in_flight.clone()).or_default() += 1;
    while let Ok(id) = arrivals.try_recv() {
        *seen.entry(id).or_default() += 1;
    }
    assert!(
        ids.iter().all(|id| seen.contains_key(id)),
        "every delivery arrived at least once"
    );
    assert!(
        seen.keys().all(|id| ids.contains(id)),
        "every arrival carried a delivery's id: {seen:?}"
    );
    assert!(
        seen[&in_flight] >= 2,
        "the attempt in flight at the kill arrived again under its id"
    );

    receiver.stop().await;
    for relay in others {
        relay.kill().await;
    }
}
