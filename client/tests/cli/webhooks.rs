//! The webhook commands against the real `ferry`: `webhooks`, `events send`
//! and `event-types` talk to the embedded relay that `ferry http` runs
//! (found through the data directory), whose dispatcher delivers events to
//! a loopback receiver; without a running relay they say how to start one.

use std::time::Instant;

use ferry_common::api::{DeliveryView, EventAccepted, EventTypeView, WebhookView};
use serde::de::DeserializeOwned;

use crate::harness::{ferry, header, Home, Origin, Tunnel, PATIENCE};

/// `text` as one JSON value, or the test fails saying what it was.
fn parsed<T: DeserializeOwned>(text: &str) -> T {
    serde_json::from_str(text).unwrap_or_else(|err| panic!("{err}: JSON: {text}"))
}

/// `text` as a JSON value a line.
fn parsed_lines<T: DeserializeOwned>(text: &str) -> Vec<T> {
    text.lines().map(parsed).collect()
}

/// Runs `attempt` until it gives a value, failing the test after
/// [`PATIENCE`]. Each attempt runs a `ferry` command, so this waits on the
/// relay's answers, not on time.
fn until<T>(what: &str, mut attempt: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(value) = attempt() {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
    }
}

/// `ferry webhooks deliveries ID --json`, oldest first.
fn deliveries(home: &Home, id: &str) -> Vec<DeliveryView> {
    parsed_lines(&home.run(&["webhooks", "deliveries", id, "--json"]).ok())
}

#[test]
fn webhook_commands_without_a_running_relay_say_how_to_start_one() {
    let home = Home::new();
    for args in [
        &["webhooks", "list"][..],
        &["webhooks", "delete", "wh_1"],
        &["events", "send", "document.create"],
        &["event-types"],
    ] {
        let output = home.run(args);
        assert_eq!(output.code, 1, "{args:?}: {output:#?}");
        assert!(
            output.stderr.contains("no relay is running for ")
                && output
                    .stderr
                    .contains("start `ferry http` (or pass --relay URL)"),
            "{args:?}: {output:#?}"
        );
        assert!(
            output
                .stderr
                .contains(&home.data_dir().display().to_string()),
            "{output:#?}"
        );
    }
}

#[test]
fn bad_input_is_refused_before_any_relay_is_asked() {
    let (code, stderr) = ferry(&["events", "send", "document.create", "--data", "{title: x"]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("error: --data is not JSON: "), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");

    let (code, stderr) = ferry(&[
        "events",
        "send",
        "document.create",
        "--data",
        "@/nonexistent/ferry-event.json",
    ]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("error: cannot read --data @/nonexistent/ferry-event.json: "),
        "{stderr}"
    );

    let create = ["webhooks", "create", "--name", "n", "--url", "http://x/"];
    let mut args = create.to_vec();
    args.extend(["--action", "document.create", "--header", "no colon here"]);
    let (code, stderr) = ferry(&args);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("is not `name: value`"), "{stderr}");

    // An action is needed; so is a change for `update`.
    let (code, stderr) = ferry(&create);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("--action"), "{stderr}");
    let (code, stderr) = ferry(&["webhooks", "update", "wh_1"]);
    assert_eq!(code, 2, "{stderr}");
    let (code, stderr) = ferry(&["webhooks", "update", "wh_1", "--enable", "--disable"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("cannot be used with"), "{stderr}");
}

#[test]
fn an_event_sent_reaches_the_webhook_listening_to_its_type_and_its_delivery_succeeds() {
    let home = Home::new();
    let origin = Origin::start();
    let tunnel = Tunnel::start(&home, origin.addr, &[]);
    let receiver = Origin::start();
    let url = format!("http://{}/hooks/docs", receiver.addr);

    let created: WebhookView = parsed(
        &home
            .run(&[
                "webhooks",
                "create",
                "--name",
                "docs",
                "--url",
                &url,
                "--action",
                "document.create,document.update",
                "--header",
                "X-Team: docs",
                "--json",
            ])
            .ok(),
    );
    assert!(created.id.starts_with("wh_"), "{created:?}");
    assert!(created.secret.starts_with("whsec_"), "{created:?}");
    assert_eq!(created.actions, ["document.create", "document.update"]);
    assert_eq!(created.method, "POST");
    assert!(created.enabled);

    // Listed, in the table and as JSON.
    let table = home.run(&["webhooks", "list"]).ok();
    let row = table
        .lines()
        .find(|line| line.starts_with(&created.id))
        .unwrap_or_else(|| panic!("a row for {}: {table}", created.id));
    for column in [
        "docs",
        "POST",
        &url,
        "document.create,document.update",
        "yes",
    ] {
        assert!(row.contains(column), "{column}: {row}");
    }
    let listed: Vec<WebhookView> = parsed_lines(&home.run(&["webhooks", "list", "--json"]).ok());
    assert_eq!(listed, std::slice::from_ref(&created));

    // The built-in event types include document.create.
    let types = home.run(&["event-types"]).ok();
    assert!(
        types
            .lines()
            .any(|line| line.starts_with("document.create ")),
        "{types}"
    );
    let types: Vec<EventTypeView> = parsed_lines(&home.run(&["event-types", "--json"]).ok());
    assert!(
        types.iter().any(|t| t.name == "document.create"),
        "{types:?}"
    );

    // The event is delivered to the receiver, with the webhook's header.
    let marker = "ferry-cli-event-7f3a";
    let data = format!(r#"{{"title": "{marker}"}}"#);
    let sent = home
        .run(&[
            "events",
            "send",
            "document.create",
            "--data",
            &data,
            "--id",
            "cli-1",
        ])
        .ok();
    assert!(sent.starts_with("event "), "{sent}");
    assert!(sent.trim_end().ends_with(": 1 delivery queued"), "{sent}");
    let delivered = receiver.next();
    assert_eq!(delivered.request_line(), "POST /hooks/docs");
    assert_eq!(header(&delivered.head, "x-team"), Some("docs"));
    let message = header(&delivered.head, "webhook-id")
        .expect("a webhook-id header")
        .to_owned();
    assert!(message.starts_with("msg_"), "{message}");
    assert!(
        String::from_utf8_lossy(&delivered.body).contains(marker),
        "{:?}",
        String::from_utf8_lossy(&delivered.body)
    );

    // The receiver answered 200: the delivery succeeds, once the relay has
    // recorded the answer.
    let delivery = until("the delivery to succeed", || {
        deliveries(&home, &created.id)
            .into_iter()
            .find(|d| d.id == message && d.state == "succeeded")
    });
    assert_eq!(delivery.event_type, "document.create");
    assert_eq!(delivery.attempts, 1);
    assert_eq!(delivery.last_status, Some(200));
    let shown = home.run(&["webhooks", "deliveries", &created.id]).ok();
    let line = shown
        .lines()
        .find(|line| line.contains(&message))
        .unwrap_or_else(|| panic!("a line for {message}: {shown}"));
    for column in ["document.create", "succeeded", "200"] {
        assert!(line.contains(column), "{column}: {line}");
    }

    // The same id again is a duplicate: nothing new is queued.
    let again: EventAccepted = parsed(
        &home
            .run(&[
                "events",
                "send",
                "document.create",
                "--data",
                &data,
                "--id",
                "cli-1",
                "--json",
            ])
            .ok(),
    );
    assert!(again.duplicate, "{again:?}");
    assert_eq!(again.queued, 0);
    let text = home
        .run(&["events", "send", "document.create", "--id", "cli-1"])
        .ok();
    assert!(text.contains("duplicate"), "{text}");
    assert_eq!(deliveries(&home, &created.id).len(), 1);

    // A resend goes out again under the same message id; a test event is a
    // new delivery.
    let resent = home.run(&["webhooks", "resend", &message]).ok();
    assert!(
        resent.starts_with(&format!("resending {message} ")),
        "{resent}"
    );
    let delivered = receiver.next();
    assert_eq!(
        header(&delivered.head, "webhook-id"),
        Some(message.as_str())
    );
    let tested = home
        .run(&["webhooks", "test", &created.id, "--type", "document.create"])
        .ok();
    assert!(tested.contains(": 1 delivery queued"), "{tested}");
    let delivered = receiver.next();
    assert_eq!(delivered.request_line(), "POST /hooks/docs");
    assert_ne!(
        header(&delivered.head, "webhook-id"),
        Some(message.as_str())
    );

    tunnel.stop();
}

#[test]
fn a_webhook_is_updated_rotated_recovered_and_deleted() {
    let home = Home::new();
    let origin = Origin::start();
    let tunnel = Tunnel::start(&home, origin.addr, &[]);
    let receiver = Origin::start();
    let url = format!("http://{}/hooks", receiver.addr);

    let created = home
        .run(&[
            "webhooks",
            "create",
            "--name",
            "before",
            "--url",
            &url,
            "--action",
            "document.*",
            "--disabled",
            "--ordered",
        ])
        .ok();
    let field = |text: &str, key: &str| -> String {
        text.lines()
            .find_map(|line| line.strip_prefix(key))
            .unwrap_or_else(|| panic!("a `{key}` line: {text}"))
            .trim()
            .to_owned()
    };
    let id = field(&created, "id:");
    let secret = field(&created, "secret:");
    assert!(id.starts_with("wh_"), "{created}");
    assert!(secret.starts_with("whsec_"), "{created}");
    assert_eq!(field(&created, "enabled:"), "no");
    assert_eq!(field(&created, "ordered:"), "yes");

    // A disabled webhook gets nothing.
    let sent: EventAccepted = parsed(
        &home
            .run(&["events", "send", "document.create", "--json"])
            .ok(),
    );
    assert_eq!(sent.queued, 0, "{sent:?}");

    let updated: WebhookView = parsed(
        &home
            .run(&[
                "webhooks", "update", &id, "--name", "after", "--enable", "--header", "x-one: 1",
                "--json",
            ])
            .ok(),
    );
    assert_eq!(updated.name, "after");
    assert!(updated.enabled);
    assert!(updated.ordered, "left out, so kept");
    assert_eq!(updated.url, url, "left out, so kept");
    assert_eq!(updated.headers.get("x-one").map(String::as_str), Some("1"));
    let cleared: WebhookView = parsed(
        &home
            .run(&["webhooks", "update", &id, "--clear-headers", "--json"])
            .ok(),
    );
    assert!(cleared.headers.is_empty(), "{cleared:?}");
    assert_eq!(cleared.name, "after");

    let rotated = home.run(&["webhooks", "rotate-secret", &id]).ok();
    let new_secret = field(&rotated, "secret:");
    assert!(new_secret.starts_with("whsec_"), "{rotated}");
    assert_ne!(new_secret, secret);

    let recovered = home
        .run(&["webhooks", "recover", &id, "--since", "1h"])
        .ok();
    assert_eq!(
        recovered.trim_end(),
        "0 deliveries that failed queued again"
    );

    let deleted = home.run(&["webhooks", "delete", &id]).ok();
    assert_eq!(deleted.trim_end(), format!("deleted {id}"));
    let listed = home.run(&["webhooks", "list", "--json"]).ok();
    assert!(!listed.contains(&id), "{listed}");
    let again = home.run(&["webhooks", "delete", &id]);
    assert_eq!(again.code, 1, "{again:#?}");
    assert!(
        again.stderr.starts_with("error: the relay answered 404"),
        "{again:#?}"
    );

    assert!(receiver.unclaimed().is_empty());
    tunnel.stop();
}
