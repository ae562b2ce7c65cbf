//! Users kept apart: every route of the relay's API, called by bob on
//! alice's objects. Alice's objects answer 404 (as ids that do not exist,
//! so names and ids do not leak), lists hold none of them, and the public
//! routes say why they are not per-user. An admin account reads alice's
//! objects (200 where bob gets 404, her items in its lists) but changes
//! them no more than bob can. The table is checked against
//! [`ferry_relay::api::ROUTES`], so a new endpoint without a case here
//! fails the test.

use std::collections::HashMap;

use ferry_relay::api::{Endpoint, ROUTES};
use ferry_tests::{
    empty, full, host_of, read_body, send, within, Api, ClientOptions, Origin, TestClient,
    TestRelay,
};
use hyper::header::{HeaderValue, CONTENT_TYPE, COOKIE, SET_COOKIE};
use hyper::{Request, Response, StatusCode};
use serde_json::{json, Value};

/// What bob must get from a route.
enum Expect {
    /// Alice's object: 404 `not_found`, as for an id that does not exist.
    NotFound,
    /// A list or collection of bob's own: a 2xx holding none of alice's
    /// names or ids.
    Own,
    /// The live tail: only bob's new entries, never alice's.
    Stream,
    /// Not per-user, for the reason given; the answer holds none of
    /// alice's names or ids either.
    NotPerUser(&'static str),
}

/// The case for `endpoint` called with `method`: the body bob sends (for
/// POST, PUT and DELETE) and what he must get.
fn case(endpoint: Endpoint, method: &str) -> Option<(Option<Value>, Expect)> {
    use Endpoint as E;
    use Expect::{NotFound, NotPerUser, Own, Stream};
    let none = || None;
    let object = || Some(json!({}));
    Some(match (endpoint, method) {
        (E::Dashboard, "GET") => (
            none(),
            NotPerUser("the dashboard's page is the same for all"),
        ),
        (E::Asset, "GET") => (
            none(),
            NotPerUser("scripts and styles are the same for all"),
        ),
        (E::Session, "GET") => (none(), NotPerUser("says who the caller is, nothing else")),
        (E::Session, "POST") => (
            Some(json!({"token": "bob"})),
            NotPerUser("signs the caller in with its own token"),
        ),
        (E::Session, "DELETE") => (object(), NotPerUser("signs the caller out")),
        (E::Health, "GET") => (none(), NotPerUser("the relay is up, for anyone")),
        (E::Metrics, "GET") => (none(), NotPerUser("counters across the relay, no names")),
        (E::Connect, "GET") => (
            none(),
            NotPerUser("opens the caller's own tunnel; taking a held name is handshake.rs's"),
        ),
        (E::Tunnels, "GET") => (none(), Own),
        (E::Requests, "GET") => (none(), Own),
        (E::RequestStream, "GET") => (none(), Stream),
        (E::RequestsHar, "GET") => (none(), Own),
        (E::Request | E::RequestBody | E::RequestCurl | E::RequestHar, "GET") => (none(), NotFound),
        (E::Replay | E::MarkReplayed, "POST") => (object(), NotFound),
        (E::Webhooks, "GET") => (none(), Own),
        (E::Webhooks, "POST") => (
            Some(json!({"name": "bob's", "url": "http://127.0.0.1:9/bob", "actions": ["*"]})),
            Own,
        ),
        (E::Webhook, "GET") => (none(), NotFound),
        (E::Webhook, "PUT") => (Some(json!({"name": "taken over"})), NotFound),
        (E::Webhook, "DELETE") => (object(), NotFound),
        (E::RotateSecret | E::TestWebhook | E::Recover | E::Resend, "POST") => (object(), NotFound),
        (E::Deliveries | E::Delivery, "GET") => (none(), NotFound),
        (E::EventTypes, "GET") => (none(), Own),
        (E::EventTypes, "POST") => (
            Some(json!({"name": "bob.thing", "description": "Bob's own type."})),
            Own,
        ),
        (E::Events, "POST") => (Some(json!({"type": "document.create", "data": {}})), Own),
        _ => return None,
    })
}

/// Calls `path` as `api` with `method` and, for a body, JSON: the status
/// and the body as text.
async fn call(api: &Api, method: &str, path: &str, body: Option<&Value>) -> (StatusCode, String) {
    call_with(api, None, method, path, body).await
}

/// Like [`call`], with the dashboard's session `cookie` when given.
async fn call_with(
    api: &Api,
    cookie: Option<&str>,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> (StatusCode, String) {
    let mut request = match body {
        Some(body) => {
            let mut request = api.request(method, path, full(body.to_string()));
            request
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            request
        }
        None => api.request(method, path, empty()),
    };
    if let Some(cookie) = cookie {
        request
            .headers_mut()
            .insert(COOKIE, cookie.parse().expect("a valid cookie"));
    }
    let response = api.send(request).await;
    let status = response.status();
    let body = read_body(response.into_body()).await;
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// Polls `GET path` as `api` until `done` holds for its JSON answer.
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

/// An id of the same shape as `id` that the relay never gave out: its
/// last character changed.
fn never_issued(id: &str) -> String {
    let (head, last) = id.split_at(id.len() - 1);
    format!("{head}{}", if last == "0" { "1" } else { "0" })
}

fn items(list: &Value) -> &Vec<Value> {
    list["items"].as_array().expect("items")
}

fn with_token(token: &str, subdomain: &'static str) -> ClientOptions {
    ClientOptions {
        token: Some(token.to_owned()),
        subdomain: Some(subdomain),
        ..ClientOptions::default()
    }
}

#[tokio::test]
async fn every_route_keeps_alices_objects_from_bob() {
    // Root is an admin account of a tokens file: it reads everyone's
    // objects, and changes only its own.
    let dir = tempfile::tempdir().expect("a temporary directory");
    let tokens_file = dir.path().join("tokens.toml");
    std::fs::write(
        &tokens_file,
        format!(
            "[[account]]\nname = \"root\"\ntokens = [\"{}\"]\nadmin = true\n",
            ferry_relay::accounts::TokenHash::of("root")
        ),
    )
    .expect("the tokens file is written");
    let relay = TestRelay::start(ferry_relay::Config {
        tokens: vec![
            ferry_relay::Token::new("alice"),
            ferry_relay::Token::new("bob"),
        ],
        tokens_file: Some(tokens_file),
        egress_allow: ferry_relay::egress::Allow::loopback(),
        ..ferry_relay::Config::default()
    })
    .await;
    let origin = Origin::start(|_req| async { Response::new(full("hello")) }).await;
    let alice = TestClient::start(&relay, &origin.target(), with_token("alice", "alice-app")).await;
    let bob = TestClient::start(&relay, &origin.target(), with_token("bob", "bob-app")).await;
    let (a, b, root) = (
        Api::with_token(&relay, "alice"),
        Api::with_token(&relay, "bob"),
        Api::with_token(&relay, "root"),
    );

    // Alice's request, in her log.
    let mut tail = a.tail("tunnel=alice-app").await;
    let response = send(
        relay.addr,
        &host_of(&alice.public_url),
        Request::new(empty()),
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    read_body(response.into_body()).await;
    let (exchange, _) = tail.next_item().await;

    // Alice's webhook and a delivery to it.
    let receiver = Origin::start(|_req| async { Response::new(full("")) }).await;
    let (status, webhook) = a
        .post_json(
            "/api/v1/webhooks",
            &json!({"name": "alices-hook", "url": format!("{}/alice", receiver.target()), "actions": ["*"]}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{webhook}");
    let hook = webhook["id"].as_str().expect("an id").to_owned();
    let (status, sent) = a
        .post_json(
            "/api/v1/events",
            &json!({"type": "document.create", "data": {}}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{sent}");
    let deliveries = poll(
        &a,
        "alice's delivery to succeed",
        &format!("/api/v1/webhooks/{hook}/deliveries"),
        |page| items(page).len() == 1 && items(page)[0]["state"] == "succeeded",
    )
    .await;
    let delivery = items(&deliveries)[0]["id"]
        .as_str()
        .expect("an id")
        .to_owned();
    let before = a.get_json(&format!("/api/v1/deliveries/{delivery}")).await;
    let log_before = a.get_json("/api/v1/requests?tunnel=alice-app").await;
    let secrets = [
        "alice-app",
        exchange.as_str(),
        hook.as_str(),
        delivery.as_str(),
        "alices-hook",
    ];
    let leaks = |what: &str, body: &str| {
        for secret in secrets {
            assert!(
                !body.contains(secret),
                "{what} shows bob alice's `{secret}`: {body}"
            );
        }
    };

    let ids: HashMap<&str, &str> = [
        ("id", exchange.as_str()),
        ("side", "request"),
        ("path", "app.js"),
    ]
    .into();
    // The calls to repeat through the dashboard's session: (method, path,
    // body, the bearer's 404 answer or `None` for bob's own lists).
    let mut replayable = Vec::new();
    for route in ROUTES {
        for &method in route.methods {
            let (body, expect) = case(route.endpoint, method).unwrap_or_else(|| {
                panic!(
                    "route {} {method} has no other-user case: add one",
                    route.path
                )
            });
            let id = match route.endpoint {
                Endpoint::Webhook
                | Endpoint::RotateSecret
                | Endpoint::TestWebhook
                | Endpoint::Deliveries
                | Endpoint::Recover => hook.as_str(),
                Endpoint::Delivery | Endpoint::Resend => delivery.as_str(),
                _ => ids["id"],
            };
            let mut path = route
                .path
                .replace("{id}", id)
                .replace("{side}", ids["side"])
                .replace("{*path}", ids["path"]);
            if route.endpoint == Endpoint::Recover {
                path.push_str("?since=1h");
            }
            let what = format!("{method} {path}");
            match expect {
                Expect::NotFound => {
                    let (status, answer) = call(&b, method, &path, body.as_ref()).await;
                    assert_eq!(status, StatusCode::NOT_FOUND, "{what}: {answer}");
                    let error: Value = serde_json::from_str(&answer).expect("a JSON error");
                    assert_eq!(error["error"]["code"], "not_found", "{what}");
                    // The same answer as for an id that does not exist: the
                    // message names only the id bob sent.
                    let unknown = never_issued(id);
                    let (status, other) =
                        call(&b, method, &path.replace(id, &unknown), body.as_ref()).await;
                    assert_eq!(status, StatusCode::NOT_FOUND, "{what}, unknown id: {other}");
                    assert_eq!(answer.replace(id, &unknown), other, "{what}");
                    leaks(&what, &answer.replace(id, ""));
                    // The admin reads alice's object, and changes it no
                    // more than bob does.
                    let (status, admins) = call(&root, method, &path, body.as_ref()).await;
                    if method == "GET" {
                        assert_eq!(status, StatusCode::OK, "{what} as the admin: {admins}");
                    } else {
                        assert_eq!(admins, answer, "{what} as the admin");
                    }
                    replayable.push((method, path, body, Some(answer)));
                }
                Expect::Own => {
                    let (status, answer) = call(&b, method, &path, body.as_ref()).await;
                    assert!(status.is_success(), "{what}: {status} {answer}");
                    leaks(&what, &answer);
                    // The admin's lists hold alice's objects too.
                    let (status, admins) = call(&root, method, &path, body.as_ref()).await;
                    assert!(
                        status.is_success(),
                        "{what} as the admin: {status} {admins}"
                    );
                    let alices = match route.endpoint {
                        Endpoint::Tunnels | Endpoint::RequestsHar => Some("alice-app"),
                        Endpoint::Requests => Some(exchange.as_str()),
                        Endpoint::Webhooks if method == "GET" => Some(hook.as_str()),
                        _ => None,
                    };
                    if let Some(alices) = alices {
                        assert!(admins.contains(alices), "{what} as the admin: {admins}");
                    }
                    if method == "GET" {
                        replayable.push((method, path, body, None));
                    }
                }
                Expect::NotPerUser(reason) => {
                    let (status, answer) = call(&b, method, &path, body.as_ref()).await;
                    assert!(
                        !status.is_server_error(),
                        "{what} ({reason}): {status} {answer}"
                    );
                    leaks(&what, &answer);
                }
                Expect::Stream => {
                    let mut bobs = b.tail("").await;
                    let mut admins = root.tail("").await;
                    for client in [&alice, &bob] {
                        let response = send(
                            relay.addr,
                            &host_of(&client.public_url),
                            Request::new(empty()),
                        )
                        .await;
                        read_body(response.into_body()).await;
                    }
                    // Entries come in commit order: bob's arriving first
                    // means alice's, committed before it, was skipped.
                    let (_, item) = bobs.next_item().await;
                    assert_eq!(item["tunnel"], "bob-app", "{what}: {item}");
                    leaks(&what, &item.to_string());
                    let (_, item) = admins.next_item().await;
                    assert_eq!(item["tunnel"], "alice-app", "{what} as the admin: {item}");
                }
            }
        }
    }

    // The dashboard's session cookie gets the same answers as the token.
    let mut request = Api::of(&relay).request(
        "POST",
        "/api/v1/session",
        full(json!({"token": "bob"}).to_string()),
    );
    request
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    let response = Api::of(&relay).send(request).await;
    assert!(response.status().is_success(), "bob signs in");
    let cookie = response
        .headers()
        .get(SET_COOKIE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .expect("a session cookie")
        .to_owned();
    assert!(cookie.starts_with("ferry_session="), "{cookie}");
    let browser = Api::of(&relay);
    for (method, path, body, bearer) in &replayable {
        let what = format!("{method} {path} with the session cookie");
        let (status, answer) =
            call_with(&browser, Some(&cookie), method, path, body.as_ref()).await;
        match bearer {
            Some(bearer) => {
                assert_eq!(status, StatusCode::NOT_FOUND, "{what}: {answer}");
                assert_eq!(&answer, bearer, "{what}");
            }
            None => {
                assert_eq!(status, StatusCode::OK, "{what}: {answer}");
                leaks(&what, &answer);
            }
        }
    }

    // Nothing bob did touched alice's objects.
    let kept = a.get_json(&format!("/api/v1/webhooks/{hook}")).await;
    assert_eq!(kept["name"], "alices-hook");
    assert_eq!(kept["secret"], webhook["secret"], "not rotated");
    assert!(kept["previous_secret_until"].is_null());
    let after = a.get_json(&format!("/api/v1/deliveries/{delivery}")).await;
    assert_eq!(after["attempts"], before["attempts"]);
    assert_eq!(after["state"], before["state"]);
    let deliveries = a
        .get_json(&format!("/api/v1/webhooks/{hook}/deliveries"))
        .await;
    assert_eq!(items(&deliveries).len(), 1, "no test event, no resend");
    // The log has alice's request and the one the stream check sent, and
    // no replay of bob's making.
    let log_after = a.get_json("/api/v1/requests?tunnel=alice-app").await;
    assert_eq!(
        items(&log_after).len(),
        items(&log_before).len() + 1,
        "{log_after}"
    );
    let first = items(&log_after)
        .iter()
        .find(|entry| entry["id"] == exchange.as_str())
        .expect("alice's request is still there");
    assert!(first["replay_of"].is_null(), "{first}");
    let detail = a.get_json(&format!("/api/v1/requests/{exchange}")).await;
    assert!(
        detail["replayed_at"].is_null(),
        "not marked replayed: {detail}"
    );
    assert!(
        !items(&log_after)
            .iter()
            .any(|entry| entry["replay_of"] == exchange.as_str()),
        "no replay of alice's request: {log_after}"
    );

    alice.stop().await.expect("alice stops");
    bob.stop().await.expect("bob stops");
    receiver.stop().await;
    origin.stop().await;
    relay.stop().await;
}
