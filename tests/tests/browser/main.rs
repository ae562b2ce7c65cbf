//! The dashboard in a real headless Chromium, against a real relay, tunnel
//! and origin. Each test saves screenshots under `target/tmp/browser/`;
//! `refresh_docs_screenshots` (run on demand, see the README) writes the
//! ones in `docs/screenshots/`.

mod driver;

use std::path::PathBuf;

use driver::Browser;
use ferry_tests::{
    full, host_of, read_body, send, within, Api, ClientOptions, Origin, TestClient, TestRelay,
};
use hyper::body::Incoming;
use hyper::{Request, Response};
use serde_json::{json, Value};
use tokio::sync::mpsc;

/// What an origin or a webhook receiver got.
#[derive(Debug)]
struct Received {
    method: String,
    path: String,
    headers: hyper::HeaderMap,
    body: String,
}

/// An origin that reports every request and answers a small JSON body.
async fn recording_origin() -> (Origin, mpsc::UnboundedReceiver<Received>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let origin = Origin::start(move |req: Request<Incoming>| {
        let tx = tx.clone();
        async move {
            let (parts, body) = req.into_parts();
            let body = String::from_utf8_lossy(&read_body(body).await).into_owned();
            let _ = tx.send(Received {
                method: parts.method.to_string(),
                path: parts.uri.to_string(),
                headers: parts.headers,
                body,
            });
            let mut response = Response::new(full(r#"{"received":true}"#));
            response.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("application/json"),
            );
            response
        }
    })
    .await;
    (origin, rx)
}

async fn next(rx: &mut mpsc::UnboundedReceiver<Received>) -> Received {
    within("the origin gets a request", rx.recv())
        .await
        .expect("the origin is running")
}

fn config() -> ferry_relay::Config {
    ferry_relay::Config {
        tokens: vec![
            ferry_relay::Token::new("alice-token"),
            ferry_relay::Token::new("bob-token"),
        ],
        egress_allow: ferry_relay::egress::Allow::loopback(),
        ..ferry_relay::Config::default()
    }
}

/// Sends `method path` with `body` through the tunnel at `public_url`.
async fn through(relay: &TestRelay, public_url: &str, method: &str, path: &str, body: &str) {
    let request = Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", "application/json")
        .body(full(body.to_owned()))
        .expect("request");
    let response = send(relay.addr, &host_of(public_url), request).await;
    assert_eq!(response.status(), 200);
    read_body(response.into_body()).await;
}

/// The newest entries of the account of `token`.
async fn entries(relay: &TestRelay, token: &str) -> Vec<Value> {
    Api::with_token(relay, token)
        .get_json("/api/v1/requests")
        .await["items"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

async fn sign_in(browser: &Browser, token: &str) {
    browser.fill("token", token).await;
    browser.click("sign-in").await;
    browser.id("sign-out").await;
}

#[tokio::test]
async fn a_request_arrives_live_shows_its_body_and_replays_as_is_and_edited() {
    let relay = TestRelay::start(config()).await;
    let (origin, mut received) = recording_origin().await;
    let client = TestClient::start(
        &relay,
        &origin.target(),
        ClientOptions {
            token: Some("alice-token".into()),
            ..Default::default()
        },
    )
    .await;
    let base = format!("http://{}", relay.addr);
    let browser = Browser::start("live-log", "light").await;

    browser.goto(&format!("{base}/")).await;
    browser.fill("token", "not-a-token").await;
    browser.click("sign-in").await;
    browser.id_with("sign-in-error", "not accepted").await;
    sign_in(&browser, "alice-token").await;

    browser.goto(&format!("{base}/#/log")).await;
    browser.ready().await;
    browser.screenshot("empty-log").await;
    let payload = r#"{"type":"invoice.paid","amount":4200,"currency":"eur"}"#;
    through(&relay, &client.public_url, "POST", "/hooks/stripe", payload).await;
    next(&mut received).await;
    // The row arrives through the live feed: the page is never reloaded.
    let row = browser
        .wait(
            "the request appears in the live log",
            "//*[@id='log']//tr[@data-id][contains(., '/hooks/stripe')]",
        )
        .await;
    let id = row.attr("data-id").await.expect("attr").expect("a data-id");
    assert_eq!(entries(&relay, "alice-token").await[0]["id"], id.as_str());
    browser.screenshot("live-row").await;

    row.click().await.expect("the row opens");
    let body = browser.id_with("request-body", "invoice.paid").await;
    let shown = body.text().await.expect("text");
    for part in ["\"amount\"", "4200", "\"eur\""] {
        assert!(shown.contains(part), "{shown}");
    }
    browser.id_with("response-body", "received").await;
    browser.screenshot("detail").await;

    let mut tail = Api::with_token(&relay, "alice-token").tail("").await;
    browser.click("replay").await;
    let again = next(&mut received).await;
    assert_eq!(
        (again.method.as_str(), again.body.as_str()),
        ("POST", payload)
    );
    let replay = loop {
        let (_, item) = tail.next_item().await;
        if item["replay_of"] == id.as_str() {
            break item["id"].as_str().unwrap_or_default().to_owned();
        }
    };
    browser.goto(&format!("{base}/#/requests/{replay}")).await;
    let link = browser.id("replay-of").await;
    let href = link.attr("href").await.expect("attr").unwrap_or_default();
    assert!(href.ends_with(&id), "the replay links its original: {href}");
    link.click().await.expect("the link opens");
    // The hash changes at the click, which clears data-ready until the
    // original's page has rendered.
    browser.ready().await;
    browser.id_with("request-body", "invoice.paid").await;
    assert!(
        browser.all("#replay-of").await.is_empty(),
        "the original's page"
    );

    browser.click("edit-replay").await;
    browser.fill("edit-path", "/hooks/edited").await;
    browser
        .fill("edit-body", r#"{"type":"invoice.voided"}"#)
        .await;
    browser.screenshot("edit").await;
    browser.click("edit-send").await;
    let edited = next(&mut received).await;
    assert_eq!(edited.path, "/hooks/edited");
    assert_eq!(edited.body, r#"{"type":"invoice.voided"}"#);

    // Another account signs in on the same browser and sees none of it.
    browser.click("sign-out").await;
    sign_in(&browser, "bob-token").await;
    browser.goto(&format!("{base}/#/log")).await;
    browser.ready().await;
    assert!(browser.all("#log tr[data-id]").await.is_empty());
    browser.goto(&format!("{base}/#/requests/{id}")).await;
    browser.id_with("error", "no request").await;
    browser.screenshot("other-account").await;

    browser.close().await;
    client.stop().await.expect("the client stops");
    origin.stop().await;
    relay.stop().await;
}

#[tokio::test]
async fn a_webhook_made_in_the_form_gets_a_test_event_and_shows_its_delivery() {
    let relay = TestRelay::start(config()).await;
    let (receiver, mut received) = recording_origin().await;
    let base = format!("http://{}", relay.addr);
    let browser = Browser::start("webhooks", "dark").await;
    browser.goto(&format!("{base}/")).await;
    sign_in(&browser, "alice-token").await;

    browser.goto(&format!("{base}/#/webhooks")).await;
    browser.click("webhook-create").await;
    browser.fill("wh-name", "Billing sync").await;
    browser
        .id("wh-method")
        .await
        .select_by_value("PUT")
        .await
        .expect("the method is chosen");
    browser
        .fill("wh-url", &format!("{}/hook", receiver.target()))
        .await;
    for action in ["document.create", "project.member.assign"] {
        browser
            .wait(
                action,
                &format!("//input[@name='action'][@value='{action}']"),
            )
            .await
            .click()
            .await
            .expect("the action is ticked");
    }
    browser.click("wh-add-header").await;
    let names = browser.all(".wh-header-name").await;
    let values = browser.all(".wh-header-value").await;
    let (name, value) = (
        names.last().expect("a header row"),
        values.last().expect("a row"),
    );
    name.send_keys("x-team").await.expect("keys");
    value.send_keys("payments").await.expect("keys");
    browser.screenshot("form").await;
    browser.click("wh-save").await;

    // Saved, the form becomes the webhook's page, with its test button.
    browser.id("wh-test").await;
    let list = Api::with_token(&relay, "alice-token")
        .get_json("/api/v1/webhooks")
        .await;
    let created = list["items"][0].clone();
    assert_eq!(created["name"], "Billing sync");
    assert_eq!(created["method"], "PUT");
    assert_eq!(
        created["actions"],
        json!(["document.create", "project.member.assign"])
    );

    browser.click("wh-test").await;
    let delivery = next(&mut received).await;
    assert_eq!(delivery.method, "PUT");
    assert_eq!(delivery.path, "/hook");
    assert_eq!(delivery.headers["x-team"], "payments");
    assert!(delivery.headers.contains_key("webhook-signature"));
    browser
        .wait(
            "the delivery shows with its status",
            "//*[@id='deliveries']//tr[@data-id]//*[contains(@class, 'status')][contains(., 'succeeded')]",
        )
        .await;
    browser.screenshot("delivery").await;

    // Another account does not see the webhook.
    browser.click("sign-out").await;
    sign_in(&browser, "bob-token").await;
    browser.goto(&format!("{base}/#/webhooks")).await;
    browser.ready().await;
    let text = browser.run("return document.body.innerText").await;
    assert!(!text.as_str().unwrap_or_default().contains("Billing sync"));

    browser.close().await;
    receiver.stop().await;
    relay.stop().await;
}

#[tokio::test]
async fn a_planted_second_session_cookie_signs_out_and_says_why() {
    let relay = TestRelay::start(config()).await;
    let base = format!("http://{}", relay.addr);
    let browser = Browser::start("planted-cookie", "light").await;
    browser.goto(&format!("{base}/")).await;
    sign_in(&browser, "alice-token").await;
    // What a page of a tunnel on the same domain could do over plain HTTP:
    // a second cookie of the same name, with a longer path.
    browser
        .run("document.cookie = 'ferry_session=planted; path=/api'; return null")
        .await;
    browser.goto(&format!("{base}/#/webhooks")).await;
    browser.reload().await;
    browser
        .id_with("sign-in-error", "two dashboard session cookies")
        .await;
    browser.screenshot("planted").await;
    browser.close().await;
    relay.stop().await;
}

#[tokio::test]
async fn edit_and_replay_keeps_crlf_line_endings() {
    let relay = TestRelay::start(ferry_relay::Config::default()).await;
    let (origin, mut received) = recording_origin().await;
    let client = TestClient::start(&relay, &origin.target(), ClientOptions::default()).await;
    let mut tail = Api::of(&relay).tail("").await;
    // A form post: its multipart boundaries need CRLF, which a textarea
    // reads back as LF.
    let form = "--b\r\ncontent-disposition: form-data; name=\"a\"\r\n\r\n1\r\n--b--\r\n";
    through(&relay, &client.public_url, "POST", "/form", form).await;
    next(&mut received).await;
    let (id, _) = tail.next_item().await;

    let browser = Browser::start("crlf", "light").await;
    browser
        .goto(&format!("http://{}/#/requests/{id}", relay.addr))
        .await;
    browser.click("edit-replay").await;
    browser.fill("edit-path", "/form-again").await;
    browser.click("edit-send").await;
    let same = next(&mut received).await;
    assert_eq!(same.path, "/form-again");
    assert_eq!(same.body, form, "the body is sent untouched");
    // The page moves on to the replay's entry, which links its original.
    browser.id("replay-of").await;

    browser.click("edit-replay").await;
    browser.fill("edit-body", "--b\n\n2\n--b--\n").await;
    browser.click("edit-send").await;
    let edited = next(&mut received).await;
    assert_eq!(
        edited.body, "--b\r\n\r\n2\r\n--b--\r\n",
        "an edit keeps CRLF"
    );
    browser.close().await;
    client.stop().await.expect("the client stops");
    origin.stop().await;
    relay.stop().await;
}

#[tokio::test]
async fn a_body_too_large_for_the_page_shows_its_size_and_a_download_link() {
    let relay = TestRelay::start(ferry_relay::Config::default()).await;
    let (origin, mut received) = recording_origin().await;
    let client = TestClient::start(&relay, &origin.target(), ClientOptions::default()).await;
    // Past the 1 MiB the relay keeps of a body by default.
    let big = "x".repeat(2 * 1024 * 1024 + 5);
    let mut tail = Api::of(&relay).tail("").await;
    through(&relay, &client.public_url, "POST", "/upload", &big).await;
    next(&mut received).await;
    // The entry is committed just after the answer.
    let (id, _) = tail.next_item().await;

    let browser = Browser::start("large-body", "light").await;
    let base = format!("http://{}", relay.addr);
    browser.goto(&format!("{base}/#/requests/{id}")).await;
    browser
        .wait(
            "the cut body says its size",
            "//*[contains(@class, 'note')][contains(., '2097157 bytes')]",
        )
        .await;
    let link = browser
        .wait(
            "the kept bytes can be downloaded",
            &format!("//a[@href='/api/v1/requests/{id}/body/request']"),
        )
        .await;
    assert!(link.text().await.expect("text").contains("Download"));
    browser.screenshot("cut").await;

    // JSON nested 10,000 deep is 20 KB; indented, it would be gigabytes:
    // it is shown as text, and the page stays usable.
    let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    through(&relay, &client.public_url, "POST", "/deep", &deep).await;
    next(&mut received).await;
    let (deep_id, _) = tail.next_item().await;
    browser.goto(&format!("{base}/#/requests/{deep_id}")).await;
    browser
        .wait(
            "the deep body is shown as text",
            "//pre[@id='request-body'][@data-mode='text']",
        )
        .await;
    browser.id("replay").await;
    browser.close().await;
    client.stop().await.expect("the client stops");
    origin.stop().await;
    relay.stop().await;
}

/// Refreshes `docs/screenshots/`, shown in the README: a relay with a
/// tunnel, a few requests, a webhook and its deliveries, each page shot in
/// the light scheme and the log also in the dark one. Run on demand:
/// `cargo test -p ferry-tests --test browser -- --ignored refresh_docs_screenshots`.
#[tokio::test]
#[ignore = "writes docs/screenshots/; run on demand"]
async fn refresh_docs_screenshots() {
    let relay = TestRelay::start(config()).await;
    let (origin, mut received) = recording_origin().await;
    let client = TestClient::start(
        &relay,
        &origin.target(),
        ClientOptions {
            token: Some("alice-token".into()),
            subdomain: Some("brave-otter"),
            ..Default::default()
        },
    )
    .await;
    let mut tail = Api::with_token(&relay, "alice-token").tail("").await;
    let requests = [
        (
            "POST",
            "/webhooks/stripe",
            r#"{"id":"evt_1QxZ","type":"invoice.paid","data":{"object":{"amount_paid":4200,"currency":"eur","customer":"cus_R2d2"}}}"#,
        ),
        (
            "POST",
            "/webhooks/github",
            r#"{"action":"opened","number":128,"pull_request":{"title":"Faster tunnel","user":{"login":"octo"}}}"#,
        ),
        ("GET", "/health", ""),
        (
            "POST",
            "/webhooks/stripe",
            r#"{"id":"evt_1QxY","type":"customer.created","data":{"object":{"email":"ada@example.com"}}}"#,
        ),
    ];
    for (method, path, body) in requests {
        through(&relay, &client.public_url, method, path, body).await;
        next(&mut received).await;
    }
    let api = Api::with_token(&relay, "alice-token");
    let (status, hook) = api
        .post_json(
            "/api/v1/webhooks",
            &json!({"name": "Document sync", "method": "POST",
                    "url": format!("{}/hook", origin.target()),
                    "actions": ["document.create", "document.update", "project.member.assign"],
                    "headers": {"x-team": "documents"}}),
        )
        .await;
    assert_eq!(status, 201, "{hook}");
    let hook_id = hook["id"].as_str().expect("an id").to_owned();
    let (status, _) = api
        .post_json(&format!("/api/v1/webhooks/{hook_id}/test"), &json!({}))
        .await;
    assert!(status.is_success());
    next(&mut received).await;

    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/screenshots");
    let base = format!("http://{}", relay.addr);
    // Four requests and the test event's attempt, once all are committed.
    for _ in 0..5 {
        tail.next_item().await;
    }
    let id = entries(&relay, "alice-token").await[1]["id"]
        .as_str()
        .expect("an entry")
        .to_owned();
    for scheme in ["light", "dark"] {
        let browser = Browser::start("docs", scheme).await;
        browser.goto(&format!("{base}/")).await;
        browser.id("token").await;
        if scheme == "light" {
            browser.save_screenshot(&dir.join("sign-in.png")).await;
        }
        sign_in(&browser, "alice-token").await;
        let pages = [
            ("tunnels", "#/tunnels".to_owned()),
            ("log", "#/log".to_owned()),
            ("detail", format!("#/requests/{id}")),
            ("webhooks", "#/webhooks".to_owned()),
            ("webhook", format!("#/webhooks/{hook_id}")),
        ];
        for (name, fragment) in pages {
            if scheme == "dark" && name != "log" {
                continue;
            }
            browser.goto(&format!("{base}/{fragment}")).await;
            browser.ready().await;
            let file = if scheme == "dark" {
                format!("{name}-dark.png")
            } else {
                format!("{name}.png")
            };
            browser.save_screenshot(&dir.join(file)).await;
        }
        browser.close().await;
    }
    client.stop().await.expect("the client stops");
    origin.stop().await;
    relay.stop().await;
}
