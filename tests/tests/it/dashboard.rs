//! The dashboard's serving side: its embedded page and assets, and the
//! sign-in that turns a token into a session cookie. What the page does
//! in a browser is tested in `tests/tests/browser`.

use ferry_tests::{
    empty, full, host_of, read_body, send, within, Api, ClientOptions, Origin, TestClient,
    TestRelay,
};
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, COOKIE, SET_COOKIE};
use hyper::{Request, Response, StatusCode};
use serde_json::{json, Value};

fn two_accounts() -> ferry_relay::Config {
    ferry_relay::Config {
        tokens: vec![
            ferry_relay::Token::new("alice-token"),
            ferry_relay::Token::new("bob-token"),
        ],
        ..Default::default()
    }
}

/// A call to the relay's host with `cookie` and extra headers.
fn call(
    method: &str,
    path: &str,
    cookie: Option<&str>,
    extra: &[(&str, &str)],
) -> Request<ferry_tests::Body> {
    let body = if method == "POST" {
        full("{}")
    } else {
        empty()
    };
    let mut request = Request::builder()
        .method(method)
        .uri(path)
        .body(body)
        .expect("request");
    let headers = request.headers_mut();
    if method == "POST" {
        headers.insert(CONTENT_TYPE, "application/json".parse().expect("header"));
    }
    if let Some(cookie) = cookie {
        headers.insert(
            COOKIE,
            format!("ferry_session={cookie}").parse().expect("header"),
        );
    }
    for (name, value) in extra {
        headers.insert(
            hyper::header::HeaderName::from_bytes(name.as_bytes()).expect("header name"),
            value.parse().expect("header"),
        );
    }
    request
}

async fn json_of(response: Response<Incoming>) -> (StatusCode, Value) {
    let status = response.status();
    let body = read_body(response.into_body()).await;
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

/// Signs in with `token`: the `Set-Cookie` header and the cookie's value.
async fn sign_in(relay: &TestRelay, token: &str) -> (String, String) {
    let mut request = call("POST", "/api/v1/session", None, &[]);
    *request.body_mut() = full(json!({ "token": token }).to_string());
    let response = Api::of(relay).send(request).await;
    assert_eq!(response.status(), StatusCode::OK);
    let set = response
        .headers()
        .get(SET_COOKIE)
        .and_then(|v| v.to_str().ok())
        .expect("a sign-in sets the session cookie")
        .to_owned();
    let value = set
        .split(';')
        .next()
        .and_then(|pair| pair.strip_prefix("ferry_session="))
        .expect("the cookie is ferry_session")
        .to_owned();
    (set, value)
}

#[tokio::test]
async fn a_token_signs_in_to_a_session_cookie_the_api_takes_until_sign_out() {
    let relay = TestRelay::start(two_accounts()).await;
    let api = Api::of(&relay);

    let (status, body) = json_of(api.send(call("GET", "/api/v1/session", None, &[])).await).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        body,
        json!({"signed_in": false, "open": false, "account": null, "admin": false})
    );

    let mut wrong = call("POST", "/api/v1/session", None, &[]);
    *wrong.body_mut() = full(json!({"token": "guess"}).to_string());
    let response = api.send(wrong).await;
    assert!(!response.headers().contains_key(SET_COOKIE));
    let (status, body) = json_of(response).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("not accepted"),
        "{body}"
    );

    let (set, cookie) = sign_in(&relay, "alice-token").await;
    for attribute in ["HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(set.contains(attribute), "{set}");
    }
    assert!(
        !set.contains("Domain"),
        "host-only, never sent to tunnels: {set}"
    );
    assert!(
        !set.contains("Secure"),
        "plain HTTP cannot keep a Secure cookie: {set}"
    );
    assert_eq!(cookie.len(), 64, "256 random bits");
    assert!(!set.contains("alice-token"));

    let (status, body) = json_of(
        api.send(call("GET", "/api/v1/session", Some(&cookie), &[]))
            .await,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["signed_in"], true);
    assert_eq!(
        body["account"],
        ferry_relay::AccountId::of_token("alice-token").to_string()
    );
    for path in ["/api/v1/tunnels", "/api/v1/requests", "/api/v1/webhooks"] {
        let response = api.send(call("GET", path, Some(&cookie), &[])).await;
        assert_eq!(response.status(), StatusCode::OK, "{path}");
    }
    // The live feed, which a browser's EventSource opens with the cookie.
    let response = api
        .send(call(
            "GET",
            "/api/v1/requests/stream",
            Some(&cookie),
            &[("sec-fetch-site", "same-origin")],
        ))
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    drop(response);

    let response = api
        .send(call("DELETE", "/api/v1/session", Some(&cookie), &[]))
        .await;
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    let cleared = response
        .headers()
        .get(SET_COOKIE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    assert!(cleared.contains("Max-Age=0"), "{cleared}");
    let (status, body) = json_of(
        api.send(call("GET", "/api/v1/tunnels", Some(&cookie), &[]))
            .await,
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body["error"]["code"], "session_ended");
    let (_, body) = json_of(
        api.send(call("GET", "/api/v1/session", Some(&cookie), &[]))
            .await,
    )
    .await;
    assert_eq!(body["signed_in"], false);
    relay.stop().await;
}

#[tokio::test]
async fn a_session_sees_only_its_own_account() {
    let relay = TestRelay::start(two_accounts()).await;
    let origin = Origin::start(|_req| async { Response::new(full("hi")) }).await;
    let client = TestClient::start(
        &relay,
        &origin.target(),
        ClientOptions {
            token: Some("alice-token".into()),
            ..Default::default()
        },
    )
    .await;
    let response = send(
        relay.addr,
        &host_of(&client.public_url),
        call("GET", "/x", None, &[]),
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);

    let (_, alice) = sign_in(&relay, "alice-token").await;
    let (_, bob) = sign_in(&relay, "bob-token").await;
    let api = Api::of(&relay);
    let (_, mine) = json_of(
        api.send(call("GET", "/api/v1/tunnels", Some(&alice), &[]))
            .await,
    )
    .await;
    assert_eq!(mine["tunnels"].as_array().map(Vec::len), Some(1), "{mine}");
    assert_eq!(mine["tunnels"][0]["requests"], 1, "{mine}");
    assert!(
        mine["tunnels"][0]["last_request_at"].as_u64().is_some(),
        "{mine}"
    );
    let (_, theirs) = json_of(
        api.send(call("GET", "/api/v1/tunnels", Some(&bob), &[]))
            .await,
    )
    .await;
    assert_eq!(theirs["tunnels"], json!([]), "{theirs}");
    let (_, log) = json_of(
        api.send(call("GET", "/api/v1/requests", Some(&bob), &[]))
            .await,
    )
    .await;
    assert_eq!(log["items"], json!([]), "{log}");
    client.stop().await.expect("client stops");
    origin.stop().await;
    relay.stop().await;
}

#[tokio::test]
async fn a_tunnel_page_cannot_use_the_dashboard_session() {
    let relay = TestRelay::start(two_accounts()).await;
    let (_, cookie) = sign_in(&relay, "alice-token").await;
    let api = Api::of(&relay);
    // A tunnel is a subdomain of the relay's domain, so a page it serves
    // is same-site: its browser would send the Strict cookie along.
    for site in ["same-site", "cross-site"] {
        let (status, body) = json_of(
            api.send(call(
                "GET",
                "/api/v1/requests",
                Some(&cookie),
                &[("sec-fetch-site", site)],
            ))
            .await,
        )
        .await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{site}");
        assert_eq!(body["error"]["code"], "foreign_page");
    }
    // Nor can it sign a visitor in or out.
    let foreign = [
        ("origin", "http://evil.localhost"),
        ("sec-fetch-site", "same-site"),
    ];
    let mut post = call("POST", "/api/v1/session", None, &foreign);
    *post.body_mut() = full(json!({"token": "alice-token"}).to_string());
    let (status, _) = json_of(api.send(post).await).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = json_of(
        api.send(call("DELETE", "/api/v1/session", Some(&cookie), &foreign))
            .await,
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let response = api
        .send(call("GET", "/api/v1/requests", Some(&cookie), &[]))
        .await;
    assert_eq!(
        response.status(),
        StatusCode::OK,
        "the session outlived both"
    );
    relay.stop().await;
}

#[tokio::test]
async fn sign_in_refuses_guessing_oversized_and_empty_bodies_and_caps_sessions() {
    let relay = TestRelay::start(ferry_relay::Config {
        failed_auths_per_minute: 3,
        ..two_accounts()
    })
    .await;
    let api = Api::of(&relay);
    let post = |body: String| {
        let mut request = call("POST", "/api/v1/session", None, &[]);
        *request.body_mut() = full(body);
        request
    };
    let (status, body) = json_of(api.send(post(json!({"token": ""}).to_string())).await).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    let (status, _) = json_of(api.send(post("x".repeat(64 * 1024))).await).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    let (status, _) = json_of(api.send(post("{\"token\": 5}".into())).await).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    // Sessions per account are capped: the oldest ends.
    let (_, first) = sign_in(&relay, "bob-token").await;
    for _ in 0..16 {
        sign_in(&relay, "bob-token").await;
    }
    let response = api
        .send(call("GET", "/api/v1/requests", Some(&first), &[]))
        .await;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);

    let mut throttled = false;
    for _ in 0..5 {
        let (status, _) =
            json_of(api.send(post(json!({"token": "guess"}).to_string())).await).await;
        throttled |= status == StatusCode::TOO_MANY_REQUESTS;
    }
    assert!(throttled, "guessing tokens through sign-in is throttled");
    relay.stop().await;
}

#[tokio::test]
async fn an_open_relay_has_no_sign_in() {
    let relay = TestRelay::open().await;
    let api = Api::of(&relay);
    let (_, body) = json_of(api.send(call("GET", "/api/v1/session", None, &[])).await).await;
    assert_eq!(
        body,
        json!({"signed_in": true, "open": true, "account": null, "admin": false})
    );
    let mut post = call("POST", "/api/v1/session", None, &[]);
    *post.body_mut() = full(json!({"token": "anything"}).to_string());
    let (status, body) = json_of(api.send(post).await).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(body["error"]["code"], "no_sign_in");
    relay.stop().await;
}

#[tokio::test]
async fn the_page_and_its_assets_are_embedded_with_a_strict_policy() {
    let relay = TestRelay::open().await;
    let api = Api::of(&relay);
    let response = api.send(call("GET", "/", None, &[])).await;
    assert_eq!(response.status(), StatusCode::OK);
    let headers = response.headers().clone();
    let csp = headers
        .get("content-security-policy")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    assert!(csp.contains("default-src 'none'"), "{csp}");
    assert!(csp.contains("script-src 'self'"), "{csp}");
    assert!(!csp.contains("unsafe"), "{csp}");
    assert_eq!(headers["x-content-type-options"], "nosniff");
    assert_eq!(headers["x-frame-options"], "DENY");
    assert!(headers[CONTENT_TYPE]
        .to_str()
        .unwrap_or("")
        .starts_with("text/html"));
    let page = String::from_utf8(read_body(response.into_body()).await).expect("UTF-8 page");
    assert!(page.contains("/assets/app.js"), "the page loads its module");
    assert!(
        !page.contains("http://") && !page.contains("https://"),
        "nothing from elsewhere"
    );

    let response = api.send(call("GET", "/assets/app.js", None, &[])).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert!(response.headers()[CONTENT_TYPE]
        .to_str()
        .unwrap_or("")
        .starts_with("text/javascript"));
    let etag = response.headers()["etag"]
        .to_str()
        .expect("etag")
        .to_owned();
    let again = api
        .send(call(
            "GET",
            "/assets/app.js",
            None,
            &[("if-none-match", &etag)],
        ))
        .await;
    assert_eq!(again.status(), StatusCode::NOT_MODIFIED);

    for missing in [
        "/assets/nothing.js",
        "/assets/../Cargo.toml",
        "/assets/%2e%2e/Cargo.toml",
        "/assets/",
    ] {
        let response = api.send(call("GET", missing, None, &[])).await;
        assert_eq!(response.status(), StatusCode::NOT_FOUND, "{missing}");
    }
    relay.stop().await;
}

/// A browser's WebSocket handshake to the connect path: `Origin`, the
/// cookies it holds, and no `Authorization`.
fn browser_handshake(subdomain: &str, cookie: Option<&str>) -> Request<ferry_tests::Body> {
    let path = format!("/api/v1/tunnels/connect?version=1&subdomain={subdomain}");
    call(
        "GET",
        &path,
        cookie,
        &[
            ("origin", "http://bob-site.localhost"),
            ("connection", "Upgrade"),
            ("upgrade", "websocket"),
            ("sec-websocket-version", "13"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ],
    )
}

#[tokio::test]
async fn a_web_page_cannot_open_a_tunnel_with_the_dashboard_session() {
    let relay = TestRelay::start(two_accounts()).await;
    let origin = Origin::start(|_req| async { Response::new(full("hi")) }).await;
    let client = TestClient::start(
        &relay,
        &origin.target(),
        ClientOptions {
            token: Some("alice-token".into()),
            subdomain: Some("alice-app"),
            ..Default::default()
        },
    )
    .await;
    client.stop().await.expect("client stops");
    // alice-app is held for alice while her client is away. Her browser is
    // signed in to the dashboard; a page of a tunnel opens a WebSocket to
    // the connect path, and the browser adds her cookie.
    let (_, cookie) = sign_in(&relay, "alice-token").await;
    let api = Api::of(&relay);
    let response = api
        .send(browser_handshake("alice-app", Some(&cookie)))
        .await;
    assert_ne!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
    let (status, body) = json_of(response).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(body["error"]["code"], "browser_refused");
    // Without the Origin the cookie alone does not open one either: only a
    // bearer token does.
    let mut handshake = browser_handshake("stolen-by-bob", Some(&cookie));
    handshake.headers_mut().remove("origin");
    let (status, _) = json_of(api.send(handshake).await).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // The relay notices the stopped client on its own time: wait for the
    // hold, then check that neither handshake added a tunnel.
    let alice = Api::with_token(&relay, "alice-token");
    let tunnels = within("alice-app to be held", async {
        loop {
            let tunnels = alice.get_json("/api/v1/tunnels").await;
            if tunnels["offline"][0]["name"] == "alice-app" {
                return tunnels;
            }
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert_eq!(tunnels["tunnels"], json!([]), "{tunnels}");
    assert_eq!(
        tunnels["offline"].as_array().map(Vec::len),
        Some(1),
        "{tunnels}"
    );

    // Nor on a relay without tokens: a page anywhere could open tunnels on
    // a developer's embedded relay.
    let open = TestRelay::open().await;
    let (status, body) = json_of(
        Api::of(&open)
            .send(browser_handshake("drive-by", None))
            .await,
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    open.stop().await;
    origin.stop().await;
    relay.stop().await;
}

#[tokio::test]
async fn a_second_session_cookie_planted_beside_the_dashboards_signs_nobody_in() {
    let relay = TestRelay::start(two_accounts()).await;
    let (_, alice) = sign_in(&relay, "alice-token").await;
    let (_, bob) = sign_in(&relay, "bob-token").await;
    // A tunnel's page (a subdomain) can set a cookie for the whole domain
    // with a longer path, which the browser then sends first.
    let planted = format!("ferry_session={bob}; ferry_session={alice}");
    let api = Api::of(&relay);
    let (status, body) = json_of(
        api.send(call(
            "GET",
            "/api/v1/webhooks",
            None,
            &[("cookie", planted.as_str())],
        ))
        .await,
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(body["error"]["code"], "ambiguous_session");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("clear"),
        "{body}"
    );
    relay.stop().await;
}

#[tokio::test]
async fn api_answers_are_never_cached_and_bodies_never_run_as_scripts() {
    let relay = TestRelay::open().await;
    let origin = Origin::start(|_req| async { Response::new(full("ok")) }).await;
    let client = TestClient::start(&relay, &origin.target(), ClientOptions::default()).await;
    let api = Api::of(&relay);
    let mut tail = api.tail("").await;
    let request = Request::builder()
        .method("POST")
        .uri("/x.js")
        .header("content-type", "text/javascript")
        .body(full("document.title = 'PWNED'"))
        .expect("request");
    let response = send(relay.addr, &host_of(&client.public_url), request).await;
    assert_eq!(response.status(), StatusCode::OK);
    let (id, _) = tail.next_item().await;
    let response = api.send(call("GET", "/api/v1/requests", None, &[])).await;
    assert_eq!(response.headers()["cache-control"], "no-store");
    let vary = response.headers()["vary"].to_str().unwrap_or("").to_owned();
    assert!(
        vary.contains("cookie") && vary.contains("authorization"),
        "{vary}"
    );
    // Served as a script from the dashboard's own origin, a captured body
    // would pass `script-src 'self'`: it is only ever bytes.
    let path = format!("/api/v1/requests/{id}/body/request");
    let response = api.send(call("GET", &path, None, &[])).await;
    assert_eq!(response.headers()["cache-control"], "no-store");
    assert_eq!(response.headers()[CONTENT_TYPE], "application/octet-stream");
    assert_eq!(response.headers()["ferry-content-type"], "text/javascript");
    client.stop().await.expect("client stops");
    origin.stop().await;
    relay.stop().await;
}
