//! `ferry-relay --acme-email … --dns-listen …`, the real binary, against
//! Debian's `pebble` ACME server on loopback: from a fresh data directory to
//! HTTPS with the issued wildcard, then a restart that reuses it.

use std::io::{BufRead, BufReader};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long pebble and the relay get to come up and issue.
const PATIENCE: Duration = Duration::from_secs(60);

/// Kills the process when the test ends, however it ends.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Reads `child`'s stdout until a line containing `marker`, returning the
/// lines read; the rest is drained in the background.
fn read_until(child: &mut Child, marker: &str) -> Vec<String> {
    let stdout = child.stdout.take().expect("piped stdout");
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = sender.send(line);
        }
    });
    let deadline = Instant::now() + PATIENCE;
    let mut lines = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match receiver.recv_timeout(left) {
            Ok(line) => {
                let found = line.contains(marker);
                lines.push(line);
                if found {
                    return lines;
                }
            }
            Err(_) => panic!("never saw `{marker}`; saw {lines:#?}"),
        }
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port()
}

/// A port free over both UDP and TCP, for `--dns-listen`.
fn free_dns_port() -> u16 {
    (0..20)
        .find_map(|_| {
            let udp = UdpSocket::bind("127.0.0.1:0").ok()?;
            let port = udp.local_addr().ok()?.port();
            TcpListener::bind(("127.0.0.1", port)).ok().map(|_| port)
        })
        .expect("a port free over UDP and TCP")
}

/// Starts pebble validating through the DNS server at `dns_port`: its
/// directory URL and management port, and its HTTPS CA's file.
fn start_pebble(dir: &Path, dns_port: u16) -> (Running, String, u16, PathBuf) {
    let binary = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .map(|dir| dir.join("pebble"))
        .find(|path| path.is_file())
        .unwrap_or_else(|| {
            panic!("this test needs Debian's pebble ACME test server: `apt-get install pebble` (scripts/test installs it)")
        });
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    // OpenSSL (curl) finds a leaf's issuer by name: the CA needs one.
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "pebble https test CA");
    let ca_key = rcgen::KeyPair::generate().expect("a key");
    let ca_cert = ca_params.self_signed(&ca_key).expect("the CA certificate");
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let mut params =
        rcgen::CertificateParams::new(vec!["localhost".to_owned()]).expect("parameters");
    params
        .subject_alt_names
        .push(rcgen::SanType::IpAddress([127, 0, 0, 1].into()));
    let key = rcgen::KeyPair::generate().expect("a key");
    let cert = params
        .signed_by(&key, &issuer)
        .expect("pebble's certificate");
    let ca_path = dir.join("pebble-https-ca.pem");
    std::fs::write(&ca_path, ca_cert.pem()).expect("pebble's files written");
    std::fs::write(dir.join("pebble-cert.pem"), cert.pem()).expect("pebble's files written");
    std::fs::write(dir.join("pebble-key.pem"), key.serialize_pem())
        .expect("pebble's files written");
    let (listen, management) = (free_port(), free_port());
    let config = serde_json::json!({ "pebble": {
        "listenAddress": format!("127.0.0.1:{listen}"),
        "managementListenAddress": format!("127.0.0.1:{management}"),
        "certificate": dir.join("pebble-cert.pem"),
        "privateKey": dir.join("pebble-key.pem"),
        "httpPort": free_port(),
        "tlsPort": free_port(),
        "ocspResponderURL": "",
        "externalAccountBindingRequired": false,
    }});
    let config_path = dir.join("pebble.json");
    std::fs::write(&config_path, config.to_string()).expect("pebble's files written");
    let mut child = Command::new(binary)
        .arg("-config")
        .arg(&config_path)
        .arg("-dnsserver")
        .arg(format!("127.0.0.1:{dns_port}"))
        .env("PEBBLE_VA_NOSLEEP", "1")
        .env("PEBBLE_WFE_NONCEREJECT", "0")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("pebble starts");
    read_until(&mut child, "ACME directory available");
    // Pebble prints its addresses just before it binds them.
    let deadline = Instant::now() + PATIENCE;
    for port in [listen, management] {
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "pebble never listened on {port}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    (
        Running(child),
        format!("https://127.0.0.1:{listen}/dir"),
        management,
        ca_path,
    )
}

/// Runs curl with `args`, returning its stdout.
fn curl(args: &[&str]) -> String {
    let output = Command::new("curl")
        .args(["-sS"])
        .args(args)
        .output()
        .expect("curl runs (apt-get install curl)");
    assert!(
        output.status.success(),
        "curl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("text")
}

fn start_relay(args: &[&str]) -> (Running, Vec<String>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ferry-relay"))
        .args(args)
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("ferry-relay starts");
    let lines = read_until(&mut child, "listening on https://");
    (Running(child), lines)
}

#[test]
fn ferry_relay_gets_a_wildcard_from_pebble_at_first_start_and_keeps_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = tempfile::tempdir().expect("data dir");
    let dns_port = free_dns_port();
    let (_pebble, directory, management, pebble_ca) = start_pebble(dir.path(), dns_port);
    let dns_listen = format!("127.0.0.1:{dns_port}");
    let args = [
        "--domain",
        "relay.test",
        "--listen",
        "127.0.0.1:0",
        "--tls-listen",
        "127.0.0.1:0",
        "--data-dir",
        data.path().to_str().expect("UTF-8 path"),
        "--acme-email",
        "ops@example.com",
        "--acme-directory",
        &directory,
        "--acme-ca",
        pebble_ca.to_str().expect("UTF-8 path"),
        "--dns-listen",
        &dns_listen,
        "--public-ip",
        "127.0.0.1",
    ];

    let started = Instant::now();
    let (relay, said) = start_relay(&args);
    assert!(
        said.iter()
            .any(|line| line.contains("obtaining a certificate")),
        "{said:#?}"
    );
    for record in [
        "relay.test. NS ns.relay.test.",
        "ns.relay.test. A 127.0.0.1",
    ] {
        assert!(
            said.iter().any(|line| line.contains(record)),
            "the banner shows `{record}`: {said:#?}"
        );
    }
    let https = said.last().expect("the https line");
    let port = https
        .rsplit(':')
        .next()
        .and_then(|tail| tail.split_whitespace().next())
        .expect("a port")
        .to_owned();
    let root = dir.path().join("pebble-root.pem");
    curl(&[
        "--fail",
        "--cacert",
        pebble_ca.to_str().unwrap(),
        &format!("https://127.0.0.1:{management}/roots/0"),
        "-o",
        root.to_str().unwrap(),
    ]);
    // Any NAME.relay.test is covered by the wildcard: an unknown tunnel
    // answers 404 over a verified TLS connection.
    let status = curl(&[
        "--cacert",
        root.to_str().unwrap(),
        "--resolve",
        &format!("any-name.relay.test:{port}:127.0.0.1"),
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        &format!("https://any-name.relay.test:{port}/"),
    ]);
    assert_eq!(status, "404");
    println!(
        "acme: ferry-relay start to a served wildcard certificate from pebble: {:?}",
        started.elapsed()
    );
    let health = curl(&[
        "--fail",
        "--cacert",
        root.to_str().unwrap(),
        "--resolve",
        &format!("relay.test:{port}:127.0.0.1"),
        &format!("https://relay.test:{port}/healthz"),
    ]);
    assert!(!health.is_empty());
    for file in ["account.json", "cert.pem", "key.pem"] {
        assert!(data.path().join("acme").join(file).is_file(), "{file}");
    }
    drop(relay);

    // A restart serves the kept certificate at once, asking nothing.
    let (_relay, said) = start_relay(&args);
    assert!(
        !said.iter().any(|line| line.contains("obtaining")),
        "{said:#?}"
    );
}

#[test]
fn acme_needs_dns_and_https_listeners_and_dns_needs_a_public_ip() {
    let run = |args: &[&str]| {
        let output = Command::new(env!("CARGO_BIN_EXE_ferry-relay"))
            .args(args)
            .output()
            .expect("ferry-relay runs");
        assert_eq!(output.status.code(), Some(2), "{args:?}");
        String::from_utf8_lossy(&output.stderr).into_owned()
    };
    let stderr = run(&[
        "--acme-email",
        "ops@example.com",
        "--tls-listen",
        "127.0.0.1:0",
    ]);
    assert!(stderr.contains("--dns-listen"), "{stderr}");
    let stderr = run(&[
        "--acme-email",
        "ops@example.com",
        "--dns-listen",
        "127.0.0.1:0",
        "--public-ip",
        "192.0.2.1",
    ]);
    assert!(stderr.contains("--tls-listen"), "{stderr}");
    let stderr = run(&["--dns-listen", "127.0.0.1:0"]);
    assert!(stderr.contains("--public-ip"), "{stderr}");
    let stderr = run(&[
        "--acme-email",
        "ops@example.com",
        "--acme-staging",
        "--acme-directory",
        "https://ca.example/dir",
    ]);
    assert!(stderr.contains("--acme-directory"), "{stderr}");
    let stderr = run(&[
        "--acme-email",
        "ops@example.com",
        "--tls-cert",
        "cert.pem",
        "--tls-key",
        "key.pem",
        "--tls-listen",
        "127.0.0.1:0",
    ]);
    assert!(stderr.contains("--acme-email"), "{stderr}");
}

/// Writes a certificate for relay.test and *.relay.test, valid from 80 days
/// ago for 90 days (due for renewal, good for 10 more days), where the ACME
/// client keeps its own; returns the certificate's PEM.
fn write_due_certificate(data: &Path) -> String {
    let mut params =
        rcgen::CertificateParams::new(vec!["relay.test".to_owned(), "*.relay.test".to_owned()])
            .expect("parameters");
    let day = Duration::from_secs(86_400);
    let now = std::time::SystemTime::now();
    params.not_before = (now - 80 * day).into();
    params.not_after = (now + 10 * day).into();
    let key = rcgen::KeyPair::generate().expect("a key");
    let cert = params.self_signed(&key).expect("the certificate");
    let dir = data.join("acme");
    std::fs::create_dir_all(&dir).expect("the acme folder");
    std::fs::write(dir.join("cert.pem"), cert.pem()).expect("cert.pem written");
    std::fs::write(dir.join("key.pem"), key.serialize_pem()).expect("key.pem written");
    cert.pem()
}

#[test]
fn a_due_but_valid_certificate_is_served_at_once_while_the_ca_is_unreachable() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = tempfile::tempdir().expect("data dir");
    let served = write_due_certificate(data.path());
    let cert_path = dir.path().join("served.pem");
    std::fs::write(&cert_path, &served).expect("written");
    // Nothing listens on this port: every ACME request fails.
    let directory = format!("https://127.0.0.1:{}/dir", free_port());
    let dns_listen = format!("127.0.0.1:{}", free_dns_port());
    let (_relay, said) = start_relay(&[
        "--domain",
        "relay.test",
        "--listen",
        "127.0.0.1:0",
        "--tls-listen",
        "127.0.0.1:0",
        "--data-dir",
        data.path().to_str().expect("UTF-8 path"),
        "--acme-email",
        "ops@example.com",
        "--acme-directory",
        &directory,
        "--dns-listen",
        &dns_listen,
        "--public-ip",
        "127.0.0.1",
    ]);
    assert!(
        !said.iter().any(|line| line.contains("obtaining")),
        "{said:#?}"
    );
    let https = said.last().expect("the https line");
    let port = https
        .rsplit(':')
        .next()
        .and_then(|tail| tail.split_whitespace().next())
        .expect("a port")
        .to_owned();
    // Verified against the stored certificate itself: it is the one served.
    let health = curl(&[
        "--fail",
        "--cacert",
        cert_path.to_str().expect("UTF-8 path"),
        "--resolve",
        &format!("relay.test:{port}:127.0.0.1"),
        &format!("https://relay.test:{port}/healthz"),
    ]);
    assert!(!health.is_empty());
}

#[test]
fn a_dns_port_already_taken_says_to_bind_the_public_address_or_free_the_stub() {
    // Another DNS server (say systemd-resolved's stub) holds the port.
    let taken = UdpSocket::bind("127.0.0.1:0").expect("bind udp");
    let dns_listen = taken.local_addr().expect("its address").to_string();
    let data = tempfile::tempdir().expect("data dir");
    let output = Command::new(env!("CARGO_BIN_EXE_ferry-relay"))
        .args([
            "--domain",
            "relay.test",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            data.path().to_str().expect("UTF-8 path"),
            "--dns-listen",
            &dns_listen,
            "--public-ip",
            "127.0.0.1",
        ])
        .output()
        .expect("ferry-relay runs");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains(&dns_listen), "{stderr}");
    assert!(stderr.contains("public address"), "{stderr}");
    assert!(stderr.contains("DNSStubListener=no"), "{stderr}");
}

/// Runs the relay with `--dns-listen dns_listen --public-ip public_ip`,
/// which must fail; returns its stderr.
fn dns_bind_failure(dns_listen: &str, public_ip: &str) -> String {
    let data = tempfile::tempdir().expect("data dir");
    let output = Command::new(env!("CARGO_BIN_EXE_ferry-relay"))
        .args([
            "--domain",
            "relay.test",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            data.path().to_str().expect("UTF-8 path"),
            "--dns-listen",
            dns_listen,
            "--public-ip",
            public_ip,
        ])
        .output()
        .expect("ferry-relay runs");
    assert!(!output.status.success());
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn the_taken_port_hint_writes_an_ipv6_public_address_in_brackets() {
    let taken = UdpSocket::bind("127.0.0.1:0").expect("bind udp");
    let dns_listen = taken.local_addr().expect("its address");
    let stderr = dns_bind_failure(&dns_listen.to_string(), "2001:db8::7");
    let hint = format!("--dns-listen [2001:db8::7]:{}", dns_listen.port());
    assert!(stderr.contains(&hint), "{stderr}");
}

#[test]
fn a_public_address_on_no_interface_says_to_bind_the_private_one() {
    // Behind 1:1 NAT (EC2, GCE, Azure) the public address is on no
    // interface; 192.0.2.1 (TEST-NET-1) is on none here either.
    let stderr = dns_bind_failure("192.0.2.1:53", "192.0.2.1");
    assert!(stderr.contains("192.0.2.1:53"), "{stderr}");
    assert!(stderr.contains("private address"), "{stderr}");
}
