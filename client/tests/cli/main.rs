//! The `ferry` command line: it refuses bad arguments with a message that
//! says what to type instead, and `ferry http` serves through its embedded
//! relay. Every read of the child's output and every request is bounded, and
//! a failing test kills the child it started.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, ChildStderr, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Duration;

/// How long any one wait on the child or on a request may take before the
/// test fails rather than hangs.
const PATIENCE: Duration = Duration::from_secs(30);

/// Runs `work` on a thread and returns its result, failing the test if it
/// takes longer than [`PATIENCE`]. A blocked read left behind ends when the
/// failing test's [`Running`] guard kills the child.
fn within<T: Send + 'static>(what: &str, work: impl FnOnce() -> T + Send + 'static) -> T {
    let (done, result) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(work());
    });
    match result.recv_timeout(PATIENCE) {
        Ok(value) => value,
        Err(_) => panic!("timed out waiting for {what}"),
    }
}

/// A running `ferry`, killed and reaped when dropped, so that a failing
/// test leaves no process behind; its data and config directories are its
/// own, removed with it.
struct Running {
    /// The process.
    child: Child,
    /// Its data and config directories.
    _home: tempfile::TempDir,
}

impl Running {
    fn spawn(args: &[&str], stdout: Stdio, stderr: Stdio) -> Self {
        let home = tempfile::tempdir().expect("a home for ferry's files");
        let child = Command::new(env!("CARGO_BIN_EXE_ferry"))
            .args(args)
            .env_remove("FERRY_RELAY")
            .env_remove("FERRY_TOKEN")
            .env("FERRY_DATA_DIR", home.path().join("data"))
            .env("FERRY_CONFIG_DIR", home.path().join("config"))
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .expect("ferry starts");
        Self { child, _home: home }
    }

    fn stdout(&mut self) -> ChildStdout {
        self.child.stdout.take().expect("piped stdout")
    }

    fn stderr(&mut self) -> ChildStderr {
        self.child.stderr.take().expect("piped stderr")
    }

    /// The exit status. Called once one of the child's pipes has been read
    /// to its end, which happens only when the child exits, so it does not
    /// block.
    fn exited(&mut self) -> ExitStatus {
        self.child.wait().expect("wait for ferry")
    }

    /// Sends SIGTERM, as a service manager stopping ferry would.
    fn terminate(&self) {
        let killed = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(killed.success());
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `ferry ARGS` to its end and returns its exit code and stderr.
fn ferry(args: &[&str]) -> (i32, String) {
    let mut ferry = Running::spawn(args, Stdio::null(), Stdio::piped());
    let mut stderr = ferry.stderr();
    let stderr = within("ferry to exit", move || {
        let mut text = String::new();
        stderr.read_to_string(&mut text).map(|_| text)
    })
    .expect("read stderr");
    (ferry.exited().code().unwrap_or(-1), stderr)
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

/// An HTTP/1.1 origin on threads: answers every GET with `hello` over
/// keep-alive connections and reports each request's head. Stops when
/// dropped.
struct Origin {
    addr: SocketAddr,
    heads: mpsc::Receiver<String>,
    stop: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
}

impl Origin {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (report, heads) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = Arc::clone(&stop);
        let acceptor = std::thread::spawn(move || {
            for stream in listener.incoming() {
                if stopping.load(Ordering::SeqCst) {
                    return;
                }
                if let Ok(stream) = stream {
                    let report = report.clone();
                    // Ends when ferry closes the connection, at the latest
                    // when the test's guard kills it.
                    std::thread::spawn(move || serve_connection(stream, &report));
                }
            }
        });
        Self {
            addr,
            heads,
            stop,
            acceptor: Some(acceptor),
        }
    }

    /// The head of the next request the origin got.
    fn next_head(&self) -> String {
        self.heads
            .recv_timeout(PATIENCE)
            .expect("the origin gets the request")
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the acceptor so that it sees the flag.
        let _ = TcpStream::connect(self.addr);
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
    }
}

/// Answers requests without bodies on one connection until it closes.
fn serve_connection(mut stream: TcpStream, report: &mpsc::Sender<String>) {
    let (mut pending, mut buf) = (Vec::new(), [0u8; 4096]);
    loop {
        while let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
            let head: Vec<u8> = pending.drain(..end + 4).collect();
            let _ = report.send(String::from_utf8_lossy(&head).into_owned());
            if stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello")
                .is_err()
            {
                return;
            }
        }
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => pending.extend_from_slice(&buf[..n]),
        }
    }
}

/// A `ferry http` through its embedded relay on a free port.
struct Tunnel {
    ferry: Running,
    /// The public host with its port: `NAME.localhost:PORT`.
    host: String,
    /// The embedded relay.
    relay: SocketAddr,
    /// The rest of ferry's stdout after the banner line, until taken.
    stdout: Option<BufReader<ChildStdout>>,
}

impl Tunnel {
    /// Starts `ferry http ORIGIN --embedded-port 0` and reads its banner
    /// line, `http://NAME.localhost:PORT -> TARGET`.
    fn start(origin: SocketAddr) -> Self {
        let target = origin.to_string();
        let mut ferry = Running::spawn(
            &["http", &target, "--embedded-port", "0"],
            Stdio::piped(),
            Stdio::inherit(),
        );
        let mut stdout = BufReader::new(ferry.stdout());
        let (banner, stdout) = within("the banner", move || {
            let mut banner = String::new();
            stdout.read_line(&mut banner).map(|_| (banner, stdout))
        })
        .expect("read the banner");
        let (public_url, target) = banner
            .trim()
            .split_once(" -> ")
            .unwrap_or_else(|| panic!("a URL -> TARGET line: {banner:?}"));
        assert_eq!(target, format!("http://{origin}"));
        let host = public_url.strip_prefix("http://").expect("an http URL");
        let (name, port) = host.rsplit_once(':').expect("a port in the URL");
        assert!(name.ends_with(".localhost"), "{public_url}");
        let port: u16 = port.parse().expect("a numeric port");
        Self {
            ferry,
            host: host.to_owned(),
            relay: SocketAddr::from(([127, 0, 0, 1], port)),
            stdout: Some(stdout),
        }
    }

    /// Reads the rest of stdout on a thread, a line per message.
    fn lines(&mut self) -> mpsc::Receiver<String> {
        let mut stdout = self.stdout.take().expect("stdout not taken yet");
        let (line, lines) = mpsc::channel();
        std::thread::spawn(move || {
            let mut text = String::new();
            while matches!(stdout.read_line(&mut text), Ok(n) if n > 0) {
                if line.send(std::mem::take(&mut text)).is_err() {
                    return;
                }
            }
        });
        lines
    }

    /// Sends `GET path` through the tunnel and returns the raw response.
    fn get(&self, path: &str) -> String {
        let mut stream = TcpStream::connect(self.relay).expect("connect to the relay");
        stream.set_read_timeout(Some(PATIENCE)).expect("timeout");
        stream.set_write_timeout(Some(PATIENCE)).expect("timeout");
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            self.host
        )
        .expect("write");
        let mut response = String::new();
        stream
            .read_to_string(&mut response)
            .unwrap_or_else(|err| panic!("GET {path}: {err}"));
        response
    }
}

#[test]
fn ferry_http_with_no_relay_serves_through_an_embedded_one_and_stops_on_sigterm() {
    let origin = Origin::start();
    let mut tunnel = Tunnel::start(origin.addr);

    let response = tunnel.get("/hook?x=1");
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.ends_with("hello"), "{response}");
    let seen = origin.next_head();
    assert!(seen.starts_with("GET /hook?x=1 HTTP/1.1\r\n"), "{seen}");

    let mut stdout = tunnel.stdout.take().expect("stdout");
    tunnel.ferry.terminate();
    let rest = within("ferry to exit after SIGTERM", move || {
        let mut rest = String::new();
        stdout.read_to_string(&mut rest).map(|_| rest)
    })
    .expect("read stdout");
    let status = tunnel.ferry.exited();
    assert!(status.success(), "{status}");
    // The last lines are written before ferry exits.
    assert!(rest.contains("\nGET     /hook?x=1 "), "{rest}");
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
    let mut tunnel = Tunnel::start(origin.addr);
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
