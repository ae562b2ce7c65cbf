//! Exported curl commands, run by the real curl, send the captured request
//! again byte for byte; exported HAR is JSON with the fields HAR requires.

use std::path::PathBuf;

use bytes::Bytes;
use ferry_common::ids::ExchangeId;
use ferry_relay::activity::export;
use ferry_relay::store::{CapturedBody, CapturedResponse, Exchange, Header, Kind, Outcome};
use ferry_tests::{empty, read_body, within, Origin};
use hyper::{Request, Response};
use tokio::sync::mpsc;

/// What the origin saw of one request.
#[derive(Debug)]
struct Seen {
    method: String,
    /// The request target exactly as sent: path and query.
    target: String,
    /// Every field, in the order hyper keeps: by name, each name's values
    /// in the order they came.
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
}

/// An origin that reports each request it gets.
async fn recording_origin() -> (Origin, mpsc::Receiver<Seen>) {
    let (tx, rx) = mpsc::channel(16);
    let origin = Origin::start(move |req: Request<hyper::body::Incoming>| {
        let tx = tx.clone();
        async move {
            let (parts, body) = req.into_parts();
            let seen = Seen {
                method: parts.method.to_string(),
                target: parts
                    .uri
                    .path_and_query()
                    .map(|p| p.as_str().to_owned())
                    .unwrap_or_default(),
                headers: parts
                    .headers
                    .iter()
                    .map(|(name, value)| (name.as_str().to_owned(), value.as_bytes().to_vec()))
                    .collect(),
                body: read_body(body).await,
            };
            tx.send(seen).await.expect("the test awaits every request");
            Response::new(empty())
        }
    })
    .await;
    (origin, rx)
}

fn header(name: &str, value: impl AsRef<[u8]>) -> Header {
    Header {
        name: name.into(),
        value: value.as_ref().to_vec(),
    }
}

/// A captured exchange as the relay would log it for a public request.
fn captured(method: &str, target: &str, headers: Vec<Header>, body: &[u8]) -> Exchange {
    Exchange {
        id: ExchangeId::new(),
        tunnel: "brave-otter".into(),
        owner: String::new(),
        kind: Kind::Tunnel,
        replay_of: None,
        received_at: 1_700_000_000_000_000,
        method: method.into(),
        url: format!("https://brave-otter.ferry.test{target}"),
        http_version: "HTTP/1.1".into(),
        remote_addr: "203.0.113.9:51234".into(),
        request_headers: headers,
        request_body: CapturedBody {
            bytes: Bytes::copy_from_slice(body),
            size: body.len() as u64,
            truncated: false,
        },
        response: None,
        responded_at: None,
        done_at: None,
        outcome: Outcome::Answered,
        error: None,
        incomplete: false,
        replayed_at: None,
        dispatch: None,
    }
}

/// The longest command passed to `sh -c`: Linux caps one exec argument at
/// 128 KiB.
const ARGUMENT_MAX: usize = 96 * 1024;

/// Runs `command` with `sh -c`, or from a script file when it is too long
/// for one argument, and fails the test if it fails.
async fn run(command: &str) {
    let mut sh = tokio::process::Command::new("sh");
    let script = std::env::temp_dir().join(format!("ferry-export-{}.sh", ExchangeId::new()));
    if command.len() <= ARGUMENT_MAX {
        sh.arg("-c").arg(command);
    } else {
        std::fs::write(&script, command).expect("the script is written");
        sh.arg(&script);
    }
    let output = within("curl to finish", sh.output())
        .await
        .expect("sh runs");
    let _ = std::fs::remove_file(&script);
    assert!(
        output.status.success(),
        "the command failed: {}\n{command:.2000}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Fields curl writes itself, whatever the capture said.
const WRITTEN_BY_CURL: [&str; 2] = ["host", "content-length"];
/// Captured fields the command leaves to curl (with a target, the host is
/// the target's).
const LEFT_TO_CURL: [&str; 3] = ["host", "content-length", "transfer-encoding"];

/// Checks that `seen` is `exchange`'s request: same method, target, body,
/// and for each field name the same values in the same order.
fn assert_same_request(exchange: &Exchange, seen: &Seen) {
    let what = &exchange.url;
    assert_eq!(seen.method, exchange.method, "{what}");
    assert_eq!(seen.target, exchange.path(), "{what}");
    assert_eq!(seen.body, exchange.request_body.bytes, "{what}");

    let values = |headers: &mut dyn Iterator<Item = (&str, &[u8])>, name: &str| -> Vec<Vec<u8>> {
        headers
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.to_vec())
            .collect()
    };
    let mut names: Vec<&str> = exchange
        .request_headers
        .iter()
        .map(|h| h.name.as_str())
        .chain(seen.headers.iter().map(|(n, _)| n.as_str()))
        .filter(|n| !LEFT_TO_CURL.contains(n) && !WRITTEN_BY_CURL.contains(n))
        .collect();
    names.sort_unstable();
    names.dedup();
    for name in names {
        let sent = values(
            &mut exchange
                .request_headers
                .iter()
                .map(|h| (h.name.as_str(), h.value.as_slice())),
            name,
        );
        let got = values(
            &mut seen.headers.iter().map(|(n, v)| (n.as_str(), v.as_slice())),
            name,
        );
        assert_eq!(got, sent, "{what}: the `{name}` fields");
    }
    if let Some((_, length)) = seen.headers.iter().find(|(n, _)| n == "content-length") {
        assert_eq!(
            length,
            exchange.request_body.bytes.len().to_string().as_bytes(),
            "{what}"
        );
    }
}

/// A file that exists only if an injected command ran.
fn marker() -> PathBuf {
    std::env::temp_dir().join(format!("ferry-pwned-{}", ExchangeId::new()))
}

#[tokio::test]
async fn curl_commands_resend_captured_requests_byte_for_byte() {
    let (origin, mut seen) = recording_origin().await;
    let marker_path = marker();
    let marker = marker_path.display();
    let inject = format!("$(touch {marker}) `touch {marker}` ';touch {marker};'");

    let text =
        format!("it's \"quoted\" {inject} back\\slash \\n\n\tindented\nand a trailing newline\n");
    let binary = {
        let mut body = text.clone().into_bytes();
        body.extend_from_slice(b"\0NUL\xff\xfe\r\n");
        body
    };
    // Not UTF-8, so spelled with printf inside double quotes.
    let mut latin1 = b"caf\xe9 \xff '%s %%' !! ".to_vec();
    latin1.extend_from_slice(inject.as_bytes());
    let exchanges = vec![
        captured(
            "POST",
            "/hooks/text",
            vec![
                header("host", "brave-otter.ferry.test"),
                header("content-type", "text/plain; charset=utf-8"),
                header("content-length", text.len().to_string()),
            ],
            text.as_bytes(),
        ),
        captured(
            "POST",
            "/hooks/binary",
            vec![
                header("content-type", "application/octet-stream"),
                header("transfer-encoding", "chunked"),
            ],
            &binary,
        ),
        captured(
            "POST",
            "/hooks/json",
            vec![
                header("content-type", "application/json"),
                header("accept", "application/json"),
                header(
                    "user-agent",
                    "Stripe/1.0 (+https://stripe.com/docs/webhooks)",
                ),
            ],
            br#"{"id":"evt_1","note":"it's \"fine\" $(x) `y`","amount":4200}"#,
        ),
        captured(
            "POST",
            "/hooks/at-file",
            vec![header("content-type", "text/plain")],
            b"@/etc/passwd",
        ),
        captured(
            "GET",
            "/a/../b/./c//d?filter[]=x%20y&a=1&a=2&set={1,2}&q=%2F+plus&empty=",
            vec![
                header("x-quote", r#"it's "double" and 'single'"#),
                header("x-command", format!("{inject} $HOME ${{PATH}}")),
                header("x-backslash", r"C:\dir\n\t\\"),
                header("x-dup", "first"),
                header("x-other", "between"),
                header("x-dup", "second, with a comma"),
                header("x-dup", "third"),
                header("x-dup", "fourth"),
                header("x-empty", ""),
                header("x-latin1", latin1),
                header("cookie", "a=1; b=2"),
                header("authorization", "Bearer abc.def"),
            ],
            b"",
        ),
        captured("HEAD", "/status?x=1", vec![header("accept", "*/*")], b""),
        captured("PUT", "/empty", vec![header("content-length", "0")], b""),
        captured("DELETE", "/things/1", vec![], b""),
        captured(
            "PATCH",
            "/long-text",
            vec![header("content-type", "text/plain")],
            "it's long: $(x) `y`\n".repeat(10_000).as_bytes(),
        ),
        captured(
            "POST",
            "/long-binary",
            vec![],
            &(0..300_000u32)
                .map(|i| (i * 7 % 256) as u8)
                .collect::<Vec<_>>(),
        ),
    ];

    let to = origin.target();
    for exchange in &exchanges {
        let command = export::curl(exchange, Some(&to)).expect("exportable");
        run(&command).await;
        let request = within("the origin to get the request", seen.recv())
            .await
            .expect("the origin is running");
        assert_same_request(exchange, &request);
    }

    // Without a target the command goes to the captured URL, with the
    // captured Host.
    let mut exchange = captured(
        "POST",
        "/direct?x=1",
        vec![header("host", "brave-otter.ferry.test"), header("x-y", "z")],
        b"direct",
    );
    exchange.url = format!("http://{}/direct?x=1", origin.addr);
    let command = export::curl(&exchange, None).expect("exportable");
    run(&command).await;
    let request = within("the origin to get the request", seen.recv())
        .await
        .expect("the origin is running");
    assert_same_request(&exchange, &request);
    let hosts: Vec<_> = request
        .headers
        .iter()
        .filter(|(n, _)| n == "host")
        .collect();
    assert_eq!(hosts.len(), 1);
    assert_eq!(hosts[0].1, b"brave-otter.ferry.test");

    assert!(!marker_path.exists(), "an injected command ran");
    origin.stop().await;
}

#[tokio::test]
async fn har_exports_parse_as_json_with_the_required_fields() {
    let mut answered = captured(
        "POST",
        "/hooks?a=1&a=2",
        vec![header("content-type", "application/json")],
        br#"{"ok":true}"#,
    );
    answered.responded_at = Some(answered.received_at + 1_500);
    answered.done_at = Some(answered.received_at + 2_000);
    answered.response = Some(CapturedResponse {
        status: 200,
        headers: vec![header("content-type", "text/plain")],
        body: CapturedBody {
            bytes: Bytes::from_static(b"\xffthanks"),
            size: 7,
            truncated: false,
        },
    });
    let mut offline = captured("GET", "/", vec![], b"");
    offline.outcome = Outcome::ClientOffline;
    offline.error = Some("the client is not connected".into());

    let text =
        serde_json::to_string_pretty(&export::har(&[answered, offline])).expect("HAR serializes");
    let har: serde_json::Value = serde_json::from_str(&text).expect("HAR parses");
    let log = &har["log"];
    assert_eq!(log["version"], "1.2");
    assert!(log["creator"]["name"].is_string() && log["creator"]["version"].is_string());
    let entries = log["entries"].as_array().expect("entries");
    assert_eq!(entries.len(), 2);
    for entry in entries {
        for field in [
            "startedDateTime",
            "time",
            "request",
            "response",
            "cache",
            "timings",
        ] {
            assert!(entry.get(field).is_some(), "entry.{field}: {entry}");
        }
        for field in [
            "method",
            "url",
            "httpVersion",
            "cookies",
            "headers",
            "queryString",
            "headersSize",
            "bodySize",
        ] {
            assert!(entry["request"].get(field).is_some(), "request.{field}");
        }
        for field in [
            "status",
            "statusText",
            "httpVersion",
            "cookies",
            "headers",
            "content",
            "redirectURL",
            "headersSize",
            "bodySize",
        ] {
            assert!(entry["response"].get(field).is_some(), "response.{field}");
        }
        for field in ["size", "mimeType"] {
            assert!(
                entry["response"]["content"].get(field).is_some(),
                "content.{field}"
            );
        }
        for field in ["send", "wait", "receive"] {
            let ms = entry["timings"][field].as_f64().expect("a number");
            assert!(ms >= -1.0, "timings.{field}");
        }
        assert!(entry["time"].as_f64().is_some_and(|ms| ms >= 0.0));
        let started = entry["startedDateTime"].as_str().expect("a string");
        assert!(started.starts_with("2023-11-14T22:13:20.") && started.ends_with('Z'));
    }
    let answered = &entries[0];
    assert_eq!(answered["time"], 2.0);
    assert_eq!(answered["request"]["postData"]["text"], r#"{"ok":true}"#);
    assert_eq!(answered["response"]["statusText"], "OK");
    assert_eq!(answered["response"]["content"]["encoding"], "base64");
    assert_eq!(entries[1]["response"]["status"], 0);
}
