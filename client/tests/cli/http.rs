//! `ferry http`: it refuses bad arguments with a message that says what to
//! type instead, and serves through its embedded relay.

use std::net::TcpListener;

use crate::harness::{ferry, Home, Origin, Tunnel};

#[test]
fn absurd_targets_are_refused_with_usage() {
    for target in [
        "0",
        "99999",
        "ftp://host:21",
        "localhost:",
        "http://x:3000/path",
        "not a host",
    ] {
        let (code, stderr) = ferry(&["http", target]);
        assert_eq!(code, 2, "{target}: {stderr}");
        assert!(stderr.contains("Use a port (3000)"), "{target}: {stderr}");
    }
}

#[test]
fn bad_subdomains_and_relays_are_refused() {
    let (code, stderr) = ferry(&["http", "3000", "--subdomain", "No_Way"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("may only contain a-z, 0-9 and `-`"),
        "{stderr}"
    );
    let (code, stderr) = ferry(&["http", "3000", "--relay", "ftp://relay"]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("not a usable relay address"), "{stderr}");
    let (code, stderr) = ferry(&["http", "3000", "--host-header", "two words"]);
    assert_eq!(code, 2, "{stderr}");
    let (code, stderr) = ferry(&["http", "3000", "--relay", "ws://x", "--embedded-port", "0"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("cannot be used with"), "{stderr}");
}

#[test]
fn an_unreachable_relay_is_reported_not_retried_forever() {
    let unused = TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr");
    let (code, stderr) = ferry(&["http", "3000", "--relay", &format!("ws://{unused}")]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("cannot reach the relay"), "{stderr}");
}

#[test]
fn ferry_http_with_no_relay_serves_through_an_embedded_one_and_stops_on_sigterm() {
    let home = Home::new();
    let origin = Origin::start();
    let tunnel = Tunnel::start(&home, origin.addr, &[]);

    let response = tunnel.get("/hook?x=1");
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.ends_with("hello"), "{response}");
    let seen = origin.next_head();
    assert!(seen.starts_with("GET /hook?x=1 HTTP/1.1\r\n"), "{seen}");

    let rest = tunnel.stop();
    // The last lines are written before ferry exits.
    assert!(rest.contains("  GET     /hook?x=1 "), "{rest}");
    assert!(
        rest.ends_with("stopping: letting requests in flight finish\n"),
        "{rest}"
    );
}

#[test]
fn a_stdout_nobody_reads_never_stalls_forwarding() {
    // A line per request fills a pipe's 64 KiB in about a thousand
    // requests; ferry queues about as many more, then drops lines.
    const REQUESTS: usize = 4000;
    let origin = Origin::start();
    // The banner is read; the rest of stdout is not, as with
    // `ferry http 3000 > fifo` and nobody reading the FIFO.
    let home = Home::new();
    let mut tunnel = Tunnel::start(&home, origin.addr, &[]);
    for i in 0..REQUESTS {
        let response = tunnel.get(&format!("/hook/{i}"));
        assert!(
            response.starts_with("HTTP/1.1 200"),
            "request {i}: {response}"
        );
    }

    // Once stdout is read again, the next line shown says how many were not.
    let lines = tunnel.lines();
    let note = (0..REQUESTS).find_map(|i| {
        let response = tunnel.get(&format!("/after/{i}"));
        assert!(
            response.starts_with("HTTP/1.1 200"),
            "request {i}: {response}"
        );
        lines
            .try_iter()
            .find(|line| line.contains(" lines not shown"))
    });
    let note = note.expect("a note of the lines not shown");
    let dropped: u64 = note
        .trim_start_matches("… ")
        .split(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("a count in {note:?}"));
    assert!(dropped > 0, "{note}");
    drop(tunnel);
}
