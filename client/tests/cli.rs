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

/// Serves one HTTP/1.1 request on a thread with a fixed answer.
fn one_shot_origin() -> (std::net::SocketAddr, std::thread::JoinHandle<String>) {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let handle = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().expect("accept");
        let mut request = Vec::new();
        let mut buf = [0u8; 4096];
        while !request.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = stream.read(&mut buf).expect("read");
            assert!(n > 0, "request ended early");
            request.extend_from_slice(&buf[..n]);
        }
        stream
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nconnection: close\r\n\r\nhello")
            .expect("write");
        String::from_utf8_lossy(&request).into_owned()
    });
    (addr, handle)
}

/// Sends a GET with `Host: host` to `addr` and returns the raw response.
fn get(addr: &str, host: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).expect("connect");
    write!(
        stream,
        "GET /hook?x=1 HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .expect("write");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read");
    response
}

#[test]
fn ferry_http_with_no_relay_serves_through_an_embedded_one_and_stops_on_sigterm() {
    use std::io::BufRead;
    let (origin, origin_thread) = one_shot_origin();
    let mut child = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["http", &origin.to_string()])
        .env_remove("FERRY_RELAY")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .expect("ferry starts");
    let mut stdout = std::io::BufReader::new(child.stdout.take().expect("piped stdout"));
    let mut banner = String::new();
    stdout.read_line(&mut banner).expect("banner line");
    let (public_url, target) = banner.trim().split_once(" -> ").expect("URL -> TARGET");
    assert_eq!(target, format!("http://{origin}"));
    let host = public_url.strip_prefix("http://").expect("http URL");
    let port = host.rsplit(':').next().expect("port");
    assert!(
        host.ends_with(&format!(".localhost:{port}")),
        "{public_url}"
    );

    let response = get(&format!("127.0.0.1:{port}"), host);
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.ends_with("hello"), "{response}");
    let seen = origin_thread.join().expect("origin thread");
    assert!(seen.starts_with("GET /hook?x=1 HTTP/1.1\r\n"), "{seen}");

    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(killed.success());
    let (done, exited) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(child.wait());
    });
    let status = exited
        .recv_timeout(std::time::Duration::from_secs(30))
        .expect("ferry exits after SIGTERM")
        .expect("wait");
    assert!(status.success(), "{status}");
}
