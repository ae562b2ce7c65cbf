//! The log commands against the real `ferry`: `log`, `show`, `export` and
//! `replay` read the embedded relay's log through its API while `ferry
//! http` runs, and straight from its database once it has stopped, even
//! after a kill -9.

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Instant;

use serde_json::Value;

use crate::harness::{header, lines_of, send, Home, Origin, Running, Tail, Tunnel, PATIENCE};

/// The entries `ferry log --json ARGS` prints, a JSON object a line.
fn logged(home: &Home, args: &[&str]) -> Vec<Value> {
    let mut all = vec!["log", "--json"];
    all.extend_from_slice(args);
    home.run(&all)
        .ok()
        .lines()
        .map(|line| {
            serde_json::from_str(line).unwrap_or_else(|err| panic!("{err}: a JSON line: {line}"))
        })
        .collect()
}

fn ids_of(entries: &[Value]) -> Vec<&str> {
    entries
        .iter()
        .map(|e| e["id"].as_str().expect("an id"))
        .collect()
}

/// A body that is neither JSON nor UTF-8.
const BINARY: [u8; 20] = [
    0x00, 0x01, 0x02, 0xff, 0xfe, 0x80, b'F', b'e', b'r', b'r', b'y', 0x7f, 0x10, 0x20, 0x30, 0x40,
    0xc3, 0x28, 0x0a, 0x99,
];

#[test]
fn log_show_export_and_replay_read_the_running_relay_and_then_its_database() {
    let home = Home::new();
    let origin = Origin::start();
    let tunnel = Tunnel::start(&home, origin.addr, &[]);
    let tail = Tail::open(tunnel.relay, "");

    let json = br#"{"type":"paid","amount":42}"#;
    let sent: [(&str, &str, &str, &[u8]); 3] = [
        ("POST", "/hooks/json?x=1", "application/json", json),
        ("PUT", "/hooks/bin", "application/octet-stream", &BINARY),
        ("GET", "/hooks/plain", "text/plain", b""),
    ];
    for (method, path, content_type, body) in sent {
        let response = tunnel.send(method, path, &[("content-type", content_type)], body);
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        let got = origin.next();
        assert_eq!(got.request_line(), format!("{method} {path}"));
        assert_eq!(got.body, body);
    }
    let mut committed = tail.ids(3);
    committed.sort();

    // Through the running relay's API: oldest first, newest printed last.
    let entries = logged(&home, &[]);
    let paths: Vec<&str> = entries
        .iter()
        .map(|e| e["path"].as_str().expect("a path"))
        .collect();
    assert_eq!(paths, ["/hooks/json?x=1", "/hooks/bin", "/hooks/plain"]);
    let times: Vec<&str> = entries
        .iter()
        .map(|e| e["received_at"].as_str().expect("a time"))
        .collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "{times:?}");
    let mut ids: Vec<String> = ids_of(&entries).into_iter().map(str::to_owned).collect();
    let (json_id, bin_id) = (ids[0].clone(), ids[1].clone());
    ids.sort();
    assert_eq!(ids, committed);
    for entry in &entries {
        assert_eq!(entry["status"], 200, "{entry}");
        assert_eq!(entry["outcome"], "answered", "{entry}");
    }

    // A JSON body pretty-printed, a binary one as a hex dump.
    let shown = home.run(&["show", &json_id]).ok();
    assert!(
        shown.starts_with(&format!("POST http://{}/hooks/json?x=1 ", tunnel.host)),
        "{shown}"
    );
    assert!(
        shown.contains("{\n  \"type\": \"paid\",\n  \"amount\": 42\n}\n"),
        "{shown}"
    );
    assert!(shown.contains("\n← 200"), "{shown}");
    assert!(shown.contains("\nhello\n"), "the response body: {shown}");
    let shown = home.run(&["show", &bin_id]).ok();
    let dump = format!(
        "\n00000000  {}  ......Ferry.. 0@\n00000010  {:<47}  .(..\n",
        "00 01 02 ff fe 80 46 65 72 72 79 7f 10 20 30 40", "c3 28 0a 99"
    );
    assert!(shown.contains(&dump), "{shown}");
    let shown: Value = serde_json::from_str(&home.run(&["show", &bin_id, "--json"]).ok())
        .expect("show --json prints JSON");
    assert_eq!(shown["request"]["body"]["size"], BINARY.len());

    // The exported curl commands, run by the shell, resend the requests:
    // both of them, the binary body byte for byte.
    let to = format!("http://{}", origin.addr);
    let curl = home
        .run(&["export", &json_id, &bin_id, "--curl", "--to", &to])
        .ok();
    assert!(curl.starts_with("curl "), "{curl}");
    let mut shell = std::process::Command::new("sh");
    shell.arg("-c").arg(&curl);
    let ran = Running::start(shell, Stdio::piped(), Stdio::piped()).finish();
    assert_eq!(ran.code, 0, "{ran:#?}");
    assert_eq!(ran.stdout, "hellohello");
    for (method, path, content_type, body) in &sent[..2] {
        let got = origin.next();
        assert_eq!(got.request_line(), format!("{method} {path}"));
        assert_eq!(got.body, *body);
        assert_eq!(header(&got.head, "content-type"), Some(*content_type));
    }

    let har: Value =
        serde_json::from_str(&home.run(&["export", &json_id, "--har"]).ok()).expect("HAR is JSON");
    let har_entries = har["log"]["entries"].as_array().expect("log.entries");
    assert_eq!(har_entries.len(), 1, "{har}");
    assert_eq!(har_entries[0]["request"]["method"], "POST");
    assert_eq!(har_entries[0]["response"]["status"], 200);

    // A replay goes from this command straight to the local server.
    let replayed = home.run(&["replay", &bin_id, "--to", &to]).ok();
    assert!(
        replayed.starts_with("PUT /hooks/bin → 200 in "),
        "{replayed}"
    );
    assert!(replayed.contains(&bin_id), "{replayed}");
    let got = origin.next();
    assert_eq!(got.request_line(), "PUT /hooks/bin");
    assert_eq!(got.body, BINARY);
    assert_eq!(
        header(&got.head, "content-type"),
        Some("application/octet-stream")
    );
    // Without --to, to the target the tunnel's client reported.
    let replayed = home.run(&["replay", &json_id]).ok();
    assert!(
        replayed.starts_with("POST /hooks/json?x=1 → 200 in "),
        "{replayed}"
    );
    assert_eq!(origin.next().body, json);
    assert!(origin.unclaimed().is_empty());

    // With the relay stopped, the same entries come from the database.
    drop(tail);
    tunnel.stop();
    assert!(ferry_is_gone(&home), "no relay holds the data directory");
    let again = logged(&home, &[]);
    assert_eq!(again, entries);
    let shown = home.run(&["show", &json_id]).ok();
    assert!(shown.contains("\"type\": \"paid\""), "{shown}");
    let curl_again = home
        .run(&["export", &json_id, &bin_id, "--curl", "--to", &to])
        .ok();
    assert_eq!(curl_again, curl);
    let replayed = home.run(&["replay", &json_id]).ok();
    assert!(
        replayed.starts_with("POST /hooks/json?x=1 → 200 in "),
        "{replayed}"
    );
    assert_eq!(origin.next().body, json);
    assert!(origin.unclaimed().is_empty());
}

/// Whether a `ferry log` would find no relay running in `home`: the lock
/// file may stay, but nobody holds its lock.
fn ferry_is_gone(home: &Home) -> bool {
    let lock = std::fs::File::open(home.data_dir().join("relay.lock")).expect("the lock file");
    lock.try_lock_shared().is_ok()
}

#[test]
fn a_second_ferry_http_joins_the_first_relay_and_replay_missed_delivers_its_offline_captures() {
    let home = Home::new();
    let (origin, origin2) = (Origin::start(), Origin::start());
    let first = Tunnel::start(&home, origin.addr, &["--subdomain", "some-name"]);
    assert!(
        first.host.starts_with("some-name.localhost:"),
        "{}",
        first.host
    );
    let second = Tunnel::start(&home, origin2.addr, &["--subdomain", "other"]);
    assert_eq!(
        second.host,
        format!("other.localhost:{}", first.relay.port()),
        "the second ferry uses the first one's relay"
    );
    let response = second.get("/live");
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert_eq!(origin2.next().request_line(), "GET /live");

    // Its client gone, the name stays held for its key.
    let relay = second.relay;
    let host = second.host.clone();
    second.stop();
    wait_until_offline(relay, "other");
    capture_offline(relay, &host, &["one", "two", "three"]);
    let offline = logged(&home, &["--tunnel", "other"]);
    assert_eq!(offline.len(), 4, "{offline:?}");
    for entry in &offline[1..] {
        assert_eq!(entry["outcome"], "client_offline", "{entry}");
    }
    assert!(origin2.unclaimed().is_empty());

    // Through the running relay's API, which marks them replayed.
    let to = origin2.addr.to_string();
    let missed = ["replay", "--missed", "--tunnel", "other"];
    let replayed = home.run(&[&missed[..], &["--to", &to]].concat()).ok();
    assert_replayed(&replayed, &origin2, &["one", "two", "three"]);
    let again = home.run(&[&missed[..], &["--to", &to]].concat()).ok();
    assert!(again.starts_with("nothing missed"), "{again}");
    assert!(origin2.unclaimed().is_empty());

    // From the database, written to mark them, once no relay runs; without
    // --to, to the target the tunnel's client last reported.
    capture_offline(relay, &host, &["four", "five"]);
    first.stop();
    assert!(ferry_is_gone(&home));
    let replayed = home.run(&missed).ok();
    assert_replayed(&replayed, &origin2, &["four", "five"]);
    let again = home.run(&missed).ok();
    assert!(again.starts_with("nothing missed"), "{again}");
    assert!(origin2.unclaimed().is_empty());
    assert!(origin.unclaimed().is_empty());
}

/// POSTs each of `bodies` to the held name `host`, checks that each is
/// answered 503 with Retry-After, and returns once all are committed.
fn capture_offline(relay: SocketAddr, host: &str, bodies: &[&str]) {
    let name = host.split('.').next().expect("a name");
    let tail = Tail::open(relay, &format!("tunnel={name}"));
    for body in bodies {
        let response = send(
            relay,
            host,
            "POST",
            &format!("/hooks/{body}"),
            &[("content-type", "text/plain")],
            body.as_bytes(),
        );
        assert!(response.starts_with("HTTP/1.1 503"), "{response}");
        let (head, _) = response.split_once("\r\n\r\n").expect("a head");
        assert_eq!(header(head, "retry-after"), Some("30"), "{response}");
    }
    tail.ids(bodies.len());
}

/// Checks that `ferry replay --missed` printed a line per body, in order,
/// and that `origin` got them in that order.
fn assert_replayed(printed: &str, origin: &Origin, bodies: &[&str]) {
    let lines: Vec<&str> = printed.lines().filter(|l| l.contains(" → ")).collect();
    assert_eq!(lines.len(), bodies.len(), "{printed}");
    for (line, body) in lines.iter().zip(bodies) {
        assert!(
            line.starts_with(&format!("POST /hooks/{body} → 200 ")),
            "{printed}"
        );
        let got = origin.next();
        assert_eq!(got.request_line(), format!("POST /hooks/{body}"));
        assert_eq!(got.body, body.as_bytes());
    }
}

/// Waits until the relay lists `name` among the names held offline. Each
/// round waits for the API's answer; the relay notices the client's
/// close a moment after the client has exited.
fn wait_until_offline(relay: SocketAddr, name: &str) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let response = send(
            relay,
            &relay.to_string(),
            "GET",
            "/api/v1/tunnels",
            &[],
            b"",
        );
        let (_, body) = response.split_once("\r\n\r\n").expect("a head");
        let tunnels: Value = serde_json::from_str(body).expect("the tunnels as JSON");
        let offline = tunnels["offline"].as_array().expect("offline names");
        if offline.iter().any(|t| t["name"] == name) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name} never held offline: {tunnels}"
        );
    }
}

#[test]
fn entries_committed_before_a_kill_9_are_all_in_the_log_afterwards() {
    // What is guaranteed: an entry the capture writer has committed (the
    // live tail sends an entry only once it is) survives the process
    // dying at any moment, as SQLite's WAL keeps committed transactions.
    // What is not: entries still queued in the writer, or in the batch it
    // is writing, when the process is killed are lost, so a kill -9 may
    // take the last requests' entries; this test kills only after all 20
    // are committed.
    const REQUESTS: usize = 20;
    let home = Home::new();
    let origin = Origin::start();
    let mut tunnel = Tunnel::start(&home, origin.addr, &[]);
    let tail = Tail::open(tunnel.relay, "");
    for i in 0..REQUESTS {
        let response = tunnel.get(&format!("/hook/{i}"));
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    }
    let mut committed = tail.ids(REQUESTS);
    drop(tail);

    tunnel.ferry.kill_hard();
    // The operating system released the lock: the log is read from the
    // database, which the relay never closed.
    assert!(ferry_is_gone(&home));
    let entries = logged(&home, &["--limit", "100"]);
    let mut ids: Vec<String> = ids_of(&entries).into_iter().map(str::to_owned).collect();
    ids.sort();
    committed.sort();
    assert_eq!(ids, committed);
    let paths: Vec<&str> = entries
        .iter()
        .map(|e| e["path"].as_str().expect("a path"))
        .collect();
    let expected: Vec<String> = (0..REQUESTS).map(|i| format!("/hook/{i}")).collect();
    assert_eq!(paths, expected);
}

#[test]
fn bad_input_is_refused_with_a_message() {
    let empty = Home::new();
    let output = empty.run(&["log"]);
    assert_eq!(output.code, 1, "{output:#?}");
    assert!(
        output.stderr.contains("no activity log in")
            && output.stderr.contains("run `ferry http` first"),
        "{output:#?}"
    );

    let output = empty.run(&["replay"]);
    assert_eq!(output.code, 2, "{output:#?}");
    assert!(output.stderr.contains("<ID>"), "{output:#?}");

    // Through the running relay's API, then from its database.
    let home = Home::new();
    let origin = Origin::start();
    let tunnel = Tunnel::start(&home, origin.addr, &[]);
    let through_api = check_refusals(&home);
    tunnel.stop();
    assert!(ferry_is_gone(&home));
    let from_database = check_refusals(&home);
    assert!(
        through_api.contains("the relay answered 400"),
        "{through_api}"
    );
    assert!(!from_database.contains("the relay"), "{from_database}");
}

/// Runs the refused commands in `home` and returns what `ferry log --status
/// abc` said.
fn check_refusals(home: &Home) -> String {
    let output = home.run(&["show", "not-an-id"]);
    assert_eq!(output.code, 1, "{output:#?}");
    assert!(output.stderr.contains("`not-an-id`"), "{output:#?}");
    assert!(output.stdout.is_empty(), "{output:#?}");

    let output = home.run(&["log", "--status", "abc"]);
    assert_eq!(output.code, 1, "{output:#?}");
    assert!(
        output.stderr.contains(
            "`abc` is not a status filter: send a code such as 200, or a class such as 4xx"
        ),
        "{output:#?}"
    );
    output.stderr
}

#[test]
fn log_follow_prints_every_entry_once_even_those_committed_while_it_starts() {
    // Requests arrive all the time while `ferry log --follow` reads the
    // newest page and opens its live tail: none may fall between the two,
    // and none may be printed by both. (When the tail was opened after the
    // page was read, this failed in 6 of 10 runs.)
    const REQUESTS: usize = 300;
    let home = Home::new();
    let origin = Origin::start();
    let tunnel = Tunnel::start(&home, origin.addr, &[]);
    let tail = Tail::open(tunnel.relay, "");
    let mut follow = Running::start(
        home.ferry(&["log", "--follow", "--json", "--limit", "500"]),
        Stdio::piped(),
        Stdio::inherit(),
    );
    let printed = lines_of(follow.stdout());
    for i in 0..REQUESTS {
        let response = tunnel.get(&format!("/busy/{i}"));
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    }
    let committed = tail.ids(REQUESTS);

    let deadline = Instant::now() + PATIENCE;
    let mut seen: Vec<String> = Vec::new();
    while !committed.iter().all(|id| seen.contains(id)) {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = printed.recv_timeout(left).unwrap_or_else(|_| {
            let missing: Vec<_> = committed.iter().filter(|id| !seen.contains(id)).collect();
            panic!("ferry log --follow never printed {missing:?}")
        });
        let entry: Value = serde_json::from_str(&line).expect("a JSON line");
        let id = entry["id"].as_str().expect("an id").to_owned();
        assert!(!seen.contains(&id), "{id} printed twice");
        seen.push(id);
    }
    drop(follow);
    tunnel.stop();
}

#[test]
fn log_follow_without_a_relay_reads_the_database_as_a_later_relay_writes_it() {
    let home = Home::new();
    let origin = Origin::start();
    let tunnel = Tunnel::start(&home, origin.addr, &[]);
    let tail = Tail::open(tunnel.relay, "");
    assert!(tunnel.get("/before").starts_with("HTTP/1.1 200"));
    tail.ids(1);
    drop(tail);
    tunnel.stop();

    // No relay runs: the follow reads the database, and goes on reading it
    // once a new `ferry http` writes there.
    let mut follow = Running::start(
        home.ferry(&["log", "--follow", "--json"]),
        Stdio::piped(),
        Stdio::inherit(),
    );
    let printed = lines_of(follow.stdout());
    let path_of = |line: String| {
        let entry: Value = serde_json::from_str(&line).expect("a JSON line");
        entry["path"].as_str().expect("a path").to_owned()
    };
    let first = printed.recv_timeout(PATIENCE).expect("the page");
    assert_eq!(path_of(first), "/before");
    let tunnel = Tunnel::start(&home, origin.addr, &[]);
    for i in 0..5 {
        assert!(tunnel
            .get(&format!("/after/{i}"))
            .starts_with("HTTP/1.1 200"));
    }
    for i in 0..5 {
        let line = printed.recv_timeout(PATIENCE).expect("a new entry");
        assert_eq!(path_of(line), format!("/after/{i}"));
    }
    drop(follow);
    tunnel.stop();
}

#[test]
fn show_prints_at_most_64_kib_of_a_body_and_says_how_much_it_left_out() {
    let home = Home::new();
    let origin = Origin::start();
    let tunnel = Tunnel::start(&home, origin.addr, &[]);
    let tail = Tail::open(tunnel.relay, "");
    // 3-byte characters: 64 KiB ends inside one.
    let text = "€".repeat(34_000);
    let items: Vec<String> = (0..12_000).map(|i| format!("{{\"n\":{i}}}")).collect();
    let json = format!("[{}]", items.join(","));
    assert!(json.len() > 100_000);
    for (path, content_type, body) in [
        ("/text", "text/plain; charset=utf-8", &text),
        ("/json", "application/json", &json),
    ] {
        let response = tunnel.send(
            "POST",
            path,
            &[("content-type", content_type)],
            body.as_bytes(),
        );
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    }
    tail.ids(2);
    let entries = logged(&home, &[]);
    let ids = ids_of(&entries);

    let shown = home.run(&["show", ids[0]]).ok();
    let cut = 65_536 / 3 * 3;
    assert!(
        shown.contains(&format!(
            "\n\n{}\n… {} more bytes",
            &text[..cut],
            text.len() - cut
        )),
        "the text up to the last whole character: {}",
        ending(&shown)
    );
    let shown = home.run(&["show", ids[1]]).ok();
    assert!(
        shown.contains(&format!(
            "\n\n{}\n… {} more bytes",
            &json[..65_536],
            json.len() - 65_536
        )),
        "{}",
        ending(&shown)
    );
    tunnel.stop();
}

/// The last few hundred bytes of `text`, for a failure message.
fn ending(text: &str) -> &str {
    let mut at = text.len().saturating_sub(800);
    while !text.is_char_boundary(at) {
        at += 1;
    }
    &text[at..]
}
