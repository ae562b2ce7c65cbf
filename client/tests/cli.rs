//! The `ferry` command line refuses bad arguments with a message that says
//! what to type instead.

use std::process::Command;

fn ferry(args: &[&str]) -> (i32, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(args)
        .output()
        .expect("ferry runs");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

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
}

#[test]
fn an_unreachable_relay_is_reported_not_retried_forever() {
    let unused = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr");
    let (code, stderr) = ferry(&["http", "3000", "--relay", &format!("ws://{unused}")]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("cannot reach the relay"), "{stderr}");
}
