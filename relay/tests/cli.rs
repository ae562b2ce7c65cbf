//! The `ferry-relay` command line: limits are checked, units are taken, and
//! the banner names the address actually bound.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

fn relay(args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_ferry-relay"));
    command.args(args).env_remove("RUST_LOG");
    command
}

/// Kills the relay when the test ends, however it ends.
struct Running(Child);

/// Starts the relay with `args` and reads its stdout up to the first line
/// starting with `prefix`: the running relay and that line.
fn start_until(args: &[&str], prefix: &str) -> (Running, String) {
    let child = relay(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("ferry-relay starts");
    let mut running = Running(child);
    let stdout = running.0.stdout.take().expect("piped stdout");
    let said = BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .find(|line| line.starts_with(prefix))
        .unwrap_or_else(|| panic!("ferry-relay never said `{prefix}…`"));
    (running, said)
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn limits_beyond_what_a_tunnel_carries_are_refused() {
    let output = relay(&["--max-requests-per-tunnel", "5000"])
        .output()
        .expect("ferry-relay runs");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--max-requests-per-tunnel"), "{stderr}");
    assert!(stderr.contains("1..=1024"), "{stderr}");

    let output = relay(&["--name-hold", "soon"])
        .output()
        .expect("ferry-relay runs");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("like 30s, 5m or 7d"), "{stderr}");

    let output = relay(&["--body-min-rate", "0"])
        .output()
        .expect("ferry-relay runs");
    assert_eq!(output.status.code(), Some(2));

    let output = relay(&["--egress-allow", "10.0.0.0/8,10.0.0.0/40"])
        .output()
        .expect("ferry-relay runs");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--egress-allow"), "{stderr}");
    assert!(stderr.contains("10.0.0.0/40"), "{stderr}");
}

#[test]
fn bad_trusted_proxies_rates_and_body_sizes_are_clap_errors() {
    for (flag, value, says) in [
        (
            "--trusted-proxy",
            "10.0.0.0/8,proxy.internal",
            "write it like 10.0.0.0/8",
        ),
        ("--max-requests-per-second", "0", "0"),
        ("--proxy-protocol", "sometimes", "`optional` or `required`"),
        ("--max-body-size", "0", "more than zero"),
    ] {
        let output = relay(&[flag, value]).output().expect("ferry-relay runs");
        assert_eq!(output.status.code(), Some(2), "{flag} {value}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(flag) && stderr.contains(says), "{stderr}");
    }

    // Requiring PROXY headers from no trusted proxy would do nothing.
    let output = relay(&["--proxy-protocol", "required"])
        .output()
        .expect("ferry-relay runs");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--trusted-proxy"), "{stderr}");
}

#[test]
fn the_banner_names_the_bound_address_and_units_are_taken() {
    let data = tempfile::tempdir().expect("data dir");
    let data_dir = data.path().to_str().expect("UTF-8 temp path");
    let child = relay(&[
        "--data-dir",
        data_dir,
        "--listen",
        "127.0.0.1:0",
        "--name-hold",
        "12h",
        "--body-min-rate",
        "4KiB",
        "--request-timeout",
        "90s",
        "--egress-allow",
        "10.0.0.0/8,fd00::/8,intranet.example",
    ])
    .stdout(Stdio::piped())
    .stderr(Stdio::null())
    .spawn()
    .expect("ferry-relay starts");
    let mut running = Running(child);
    let stdout = running.0.stdout.take().expect("piped stdout");
    let (lines, received) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines.send(line).is_err() {
                return;
            }
        }
    });
    let first = received
        .recv_timeout(Duration::from_secs(60))
        .expect("the banner within a minute");
    let bound = first
        .strip_prefix("ferry-relay listening on http://127.0.0.1:")
        .and_then(|rest| rest.split(' ').next())
        .and_then(|port| port.parse::<u16>().ok())
        .unwrap_or_else(|| panic!("no bound address in `{first}`"));
    assert_ne!(bound, 0, "{first}");
    let health = std::net::TcpStream::connect(("127.0.0.1", bound));
    assert!(health.is_ok(), "the relay listens where it says");
}

#[test]
fn a_data_directory_that_cannot_be_written_or_is_taken_is_a_clear_error_at_start() {
    let output = relay(&["--listen", "127.0.0.1:0", "--data-dir", "/proc/ferry-data"])
        .output()
        .expect("ferry-relay runs");
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("not writable"), "{stderr}");
    assert!(stderr.contains("--data-dir"), "{stderr}");

    let data = tempfile::tempdir().expect("data dir");
    let data_dir = data.path().to_str().expect("UTF-8 temp path");
    let (_first, said) = start_until(
        &["--listen", "127.0.0.1:0", "--data-dir", data_dir],
        "activity log in",
    );
    assert!(said.contains(data_dir), "{said}");
    let output = relay(&["--listen", "127.0.0.1:0", "--data-dir", data_dir])
        .output()
        .expect("ferry-relay runs");
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("another relay already uses"), "{stderr}");
}

#[test]
fn database_ca_needs_a_database_url_and_a_file_of_certificates() {
    let dir = tempfile::tempdir().expect("a directory");
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, "not a certificate\n").expect("the file is written");
    let ca = ca.to_str().expect("UTF-8 temp path");
    let output = relay(&["--listen", "127.0.0.1:0", "--database-ca", ca])
        .output()
        .expect("ferry-relay runs");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--database-url"), "{stderr}");

    // The file is read before the database is reached (nothing listens on
    // port 1).
    let data = dir.path().join("data");
    let data_dir = data.to_str().expect("UTF-8 temp path");
    let output = relay(&[
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        data_dir,
        "--database-url",
        "postgres://ferry@127.0.0.1:1/ferry?sslmode=require",
        "--database-ca",
        ca,
    ])
    .output()
    .expect("ferry-relay runs");
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!("--database-ca {ca}: no CERTIFICATE block")),
        "{stderr}"
    );
}

#[test]
fn acme_in_a_fleet_needs_a_database_link_no_one_can_read() {
    let data = tempfile::tempdir().expect("data dir");
    let data_dir = data.path().to_str().expect("UTF-8 temp path");
    let output = relay(&[
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        data_dir,
        "--tls-listen",
        "127.0.0.1:0",
        "--dns-listen",
        "127.0.0.1:0",
        "--public-ip",
        "192.0.2.1",
        "--acme-email",
        "ops@example.com",
        "--database-url",
        "postgres://ferry@db.example/ferry",
    ])
    .output()
    .expect("ferry-relay runs");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("sslmode=require"), "{stderr}");
}

#[test]
fn a_relay_whose_stdout_reader_left_keeps_running() {
    let data = tempfile::tempdir().expect("data dir");
    let data_dir = data.path().to_str().expect("UTF-8 temp path");
    let child = relay(&["--listen", "127.0.0.1:0", "--data-dir", data_dir])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("ferry-relay starts");
    let mut running = Running(child);
    // Gone before the banner: every line the relay prints meets a closed
    // pipe.
    drop(running.0.stdout.take());

    // It announces its API in the data directory once it serves.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let url = loop {
        if let Some(status) = running.0.try_wait().expect("the relay's status") {
            panic!("the relay stopped with {status} when its stdout closed");
        }
        if let Some(url) = ferry_relay::data_dir::running_relay(data.path()) {
            break url;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the relay never announced its API"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let addr = url.trim_start_matches("http://");
    let mut stream = std::net::TcpStream::connect(addr).expect("the relay accepts");
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .expect("a read timeout");
    std::io::Write::write_all(
        &mut stream,
        format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .expect("send a request");
    let mut answer = String::new();
    std::io::Read::read_to_string(&mut stream, &mut answer).expect("read the answer");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        running.0.try_wait().expect("the relay's status").is_none(),
        "the relay still runs"
    );
}

#[test]
fn dev_tls_prints_where_its_ca_is_and_needs_no_certificate_flags() {
    let data = tempfile::tempdir().expect("data dir");
    let data_dir = data.path().to_str().expect("UTF-8 temp path");
    let (_running, said) = start_until(
        &[
            "--dev-tls",
            "--listen",
            "127.0.0.1:0",
            "--tls-listen",
            "127.0.0.1:0",
            "--data-dir",
            data_dir,
        ],
        "development CA in",
    );
    let ca = data.path().join("dev-tls").join("ca.pem");
    assert!(said.contains(&ca.display().to_string()), "{said}");
    assert!(ca.exists(), "{said}");

    let output = relay(&[
        "--dev-tls",
        "--tls-cert",
        "cert.pem",
        "--tls-key",
        "key.pem",
    ])
    .output()
    .expect("ferry-relay runs");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--dev-tls"), "{stderr}");

    let output = relay(&["--tls-listen", "127.0.0.1:0"])
        .output()
        .expect("ferry-relay runs");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--dev-tls"), "{stderr}");
}

#[test]
fn a_relay_without_tokens_listens_beyond_loopback_only_when_told_to() {
    let data = tempfile::tempdir().expect("data dir");
    let data_dir = data.path().to_str().expect("UTF-8 temp path");
    let output = relay(&["--listen", "0.0.0.0:0", "--data-dir", data_dir])
        .output()
        .expect("ferry-relay runs");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("0.0.0.0:0"), "{stderr}");
    assert!(stderr.contains("--token"), "{stderr}");
    assert!(stderr.contains("--allow-anonymous"), "{stderr}");

    let (_running, said) = start_until(
        &[
            "--listen",
            "0.0.0.0:0",
            "--data-dir",
            data_dir,
            "--allow-anonymous",
        ],
        "warning:",
    );
    assert!(said.contains("anonymous"), "{said}");
}

#[test]
fn hash_token_reads_stdin_and_a_bad_tokens_file_is_named_at_start() {
    use std::io::Write as _;
    let mut child = relay(&["hash-token"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("ferry-relay runs");
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(b"s3cret\n")
        .expect("the token is written");
    let output = child.wait_with_output().expect("ferry-relay ends");
    assert!(output.status.success());
    // As `printf s3cret | sha256sum` prints it.
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        "sha256:1ec1c26b50d5d3c58d9583181af8076655fe00756bf7285940ba3670f99fcba0"
    );

    let output = relay(&["new-token"]).output().expect("ferry-relay runs");
    let said = String::from_utf8_lossy(&output.stdout);
    let lines: Vec<&str> = said.lines().collect();
    assert_eq!(lines.len(), 2, "{said}");
    assert!(lines[0].len() >= 64, "{said}");
    assert_eq!(
        lines[1],
        ferry_relay::accounts::TokenHash::of(lines[0]).to_string()
    );

    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("tokens.toml");
    std::fs::write(
        &path,
        "[[account]]\nname = \"alice\"\ntokens = [\"plain\"]\n",
    )
    .expect("written");
    let output = relay(&["--tokens-file", path.to_str().expect("UTF-8 path")])
        .output()
        .expect("ferry-relay runs");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("account `alice`"), "{stderr}");
    assert!(stderr.contains("ferry-relay hash-token"), "{stderr}");
}

#[test]
fn a_token_listed_twice_is_a_warning_not_a_stop() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("tokens");
    std::fs::write(&path, "s3cret\nother\ns3cret\n").expect("written");
    let data = dir.path().join("data");
    let child = relay(&[
        "--data-dir",
        data.to_str().expect("UTF-8 temp path"),
        "--listen",
        "127.0.0.1:0",
        "--token",
        "s3cret",
        "--token",
        "s3cret",
        "--tokens-file",
        path.to_str().expect("UTF-8 temp path"),
    ])
    .stdout(Stdio::piped())
    .stderr(Stdio::null())
    .spawn()
    .expect("ferry-relay starts");
    let mut running = Running(child);
    let stdout = running.0.stdout.take().expect("piped stdout");
    let (lines, received) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines.send(line).is_err() {
                return;
            }
        }
    });
    // The relay starts and says so, and warns of each repeat on the way.
    let mut warnings = vec![
        "line 3 repeats the token of line 1",
        "the same --token is given twice",
        "also given with --token",
    ];
    let mut said = String::new();
    while !warnings.is_empty() {
        let line = received
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("no warning {warnings:?} within a minute: {said}"));
        warnings.retain(|warning| !line.contains(warning));
        said.push_str(&line);
        said.push('\n');
    }
    assert!(said.contains("ferry-relay listening on"), "{said}");
}

#[test]
fn fleet_flags_go_together_and_only_with_a_database() {
    let fails_with = |args: &[&str], says: &[&str]| {
        let output = relay(args).output().expect("ferry-relay runs");
        assert_eq!(output.status.code(), Some(2), "{args:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        for part in says {
            assert!(stderr.contains(part), "{args:?}: {stderr}");
        }
    };
    fails_with(
        &["--unknown-names-per-minute", "0"],
        &["--unknown-names-per-minute"],
    );
    fails_with(
        &["--cluster-connections-per-ip", "0"],
        &["--cluster-connections-per-ip"],
    );
    fails_with(
        &["--cluster-first-request-timeout", "0s"],
        &["--cluster-first-request-timeout"],
    );
    let db = "postgres://ferry@127.0.0.1:1/ferry";
    let secret = "0123456789abcdef0123";
    fails_with(
        &["--cluster-listen", "127.0.0.1:0"],
        &["--cluster-listen, --advertise-url and --cluster-secret go together"],
    );
    fails_with(
        &[
            "--cluster-listen",
            "127.0.0.1:0",
            "--advertise-url",
            "http://127.0.0.1:7070",
            "--cluster-secret",
            secret,
        ],
        &["needs --database-url"],
    );
    let cases = [
        (
            "https://10.0.0.2:7070",
            secret,
            "10s",
            "must be http://HOST:PORT",
        ),
        ("http://10.0.0.2", secret, "10s", "must be http://HOST:PORT"),
        (
            "http://10.0.0.2:7070/x",
            secret,
            "10s",
            "must be http://HOST:PORT",
        ),
        (
            "http://10.0.0.2:7070",
            "short",
            "10s",
            "at least 16 printable characters",
        ),
        (
            "http://10.0.0.2:7070",
            secret,
            "100ms",
            "--cluster-lease must be at least",
        ),
    ];
    for (url, secret, lease, says) in cases {
        fails_with(
            &[
                "--database-url",
                db,
                "--cluster-listen",
                "127.0.0.1:0",
                "--advertise-url",
                url,
                "--cluster-secret",
                secret,
                "--cluster-lease",
                lease,
            ],
            &[says],
        );
    }
}
