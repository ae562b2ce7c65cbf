//! Relays as processes of their own, and Debian's HAProxy in front of them:
//! for the fleet tests that kill a relay with SIGKILL, as a crash would.
//!
//! The relay is the `ferry-relay` binary Cargo built beside this test
//! binary (`cargo test --workspace` builds it before any test runs).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

use crate::within;

/// The `ferry-relay` binary of this build.
pub fn relay_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    // target/<profile>/deps/it-… → target/<profile>/ferry-relay
    let binary = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(|profile| profile.join("ferry-relay"))
        .expect("the test binary sits in target/<profile>/deps");
    assert!(
        binary.exists(),
        "{} is missing: build it first (`cargo test --workspace` does)",
        binary.display()
    );
    binary
}

/// A `ferry-relay` process, killed when dropped.
pub struct RelayProcess {
    child: Child,
    /// Where its public listener is.
    pub addr: SocketAddr,
    /// Where its HTTPS listener is, when it has one.
    pub tls_addr: Option<SocketAddr>,
    /// Its data directory.
    _data_dir: tempfile::TempDir,
}

impl RelayProcess {
    /// Starts `ferry-relay` with `args` on a free port and a data directory
    /// of its own; returns once its banner names the bound address.
    pub async fn start(args: &[String]) -> Self {
        let data_dir = tempfile::tempdir().expect("a data directory");
        let mut child = Command::new(relay_binary())
            .args(["--listen", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(data_dir.path())
            .args(args)
            .env_remove("RUST_LOG")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("ferry-relay starts");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut lines = BufReader::new(stdout).lines();
        let bound = |line: &str, rest: &str| {
            rest.split(' ')
                .next()
                .and_then(|addr| addr.parse::<SocketAddr>().ok())
                .unwrap_or_else(|| panic!("no bound address in `{line}`"))
        };
        // The HTTPS line, when there is one, comes next, before the line
        // that names the tunnels' URLs.
        let (addr, tls_addr) = within("the relay's banner", async {
            let mut addr = None;
            loop {
                let line = lines
                    .next_line()
                    .await
                    .expect("stdout reads")
                    .expect("the relay printed its banner before it ended");
                if let Some(rest) = line.strip_prefix("ferry-relay listening on http://") {
                    addr = Some(bound(&line, rest));
                } else if let Some(rest) = line.strip_prefix("ferry-relay listening on https://") {
                    break (addr, Some(bound(&line, rest)));
                } else if addr.is_some() {
                    break (addr, None);
                }
            }
        })
        .await;
        let addr = addr.expect("the plain listener's line comes first");
        // The rest of its output is read and dropped, so it never blocks on
        // a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Self {
            child,
            addr,
            tls_addr,
            _data_dir: data_dir,
        }
    }

    /// Kills the process with SIGKILL and waits for it to end.
    pub async fn kill(mut self) {
        self.child.start_kill().expect("the relay can be killed");
        within("the relay's end", self.child.wait())
            .await
            .expect("the relay's status");
    }
}

/// HAProxy in TCP mode in front of relays, sending each connection's
/// caller in a PROXY protocol v2 header; killed when dropped.
pub struct HaProxy {
    _child: Child,
    /// Where it listens.
    pub addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl HaProxy {
    /// Starts HAProxy in front of `relays`: every connection goes to the
    /// first relay that is up, and one whose port refuses connections is
    /// passed over for the next. Returns once it accepts connections.
    pub async fn start(relays: &[SocketAddr]) -> Self {
        let dir = tempfile::tempdir().expect("a directory for the config");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .expect("a free port")
            .port();
        let servers: String = relays
            .iter()
            .enumerate()
            .map(|(n, addr)| {
                format!("    server relay{n} {addr} send-proxy-v2 check check-send-proxy inter 200ms fall 1 rise 1\n")
            })
            .collect();
        let config = format!(
            "global\n    maxconn 4096\n\
             defaults\n    mode tcp\n    timeout connect 2s\n    timeout client 1h\n    timeout server 1h\n    retries 3\n    option redispatch\n\
             frontend ferry\n    bind 127.0.0.1:{port}\n    default_backend relays\n\
             backend relays\n    balance first\n{servers}"
        );
        let path = dir.path().join("haproxy.cfg");
        std::fs::write(&path, config).expect("the config is written");
        let child = Command::new("haproxy")
            .arg("-db")
            .arg("-f")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|err| {
                panic!("HAProxy does not start ({err}): the tests need Debian's `haproxy` (scripts/test installs it)")
            });
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        within("HAProxy to accept", async {
            while TcpStream::connect(addr).await.is_err() {
                tokio::task::yield_now().await;
            }
        })
        .await;
        Self {
            _child: child,
            addr,
            _dir: dir,
        }
    }
}
