//! What the scenarios share: the real `ferry` binary run in a home of its
//! own, a thread-based HTTP origin that reports what it gets, requests
//! through the embedded relay and its live tail. Every wait is bounded by
//! [`PATIENCE`], and every process started is killed if the test fails.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, ChildStderr, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long any one wait on a child or on a request may take before the
/// test fails rather than hangs.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// Runs `work` on a thread and returns its result, failing the test if it
/// takes longer than [`PATIENCE`]. A blocked read left behind ends when the
/// failing test's [`Running`] guard kills the child.
pub fn within<T: Send + 'static>(what: &str, work: impl FnOnce() -> T + Send + 'static) -> T {
    let (done, result) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(work());
    });
    match result.recv_timeout(PATIENCE) {
        Ok(value) => value,
        Err(_) => panic!("timed out waiting for {what}"),
    }
}

/// Ferry's data and config directories (`FERRY_DATA_DIR`,
/// `FERRY_CONFIG_DIR`), shared by every `ferry` a test runs in it and
/// removed with it. Declared before the processes that use it, so that it
/// outlives them.
pub struct Home {
    dir: tempfile::TempDir,
}

impl Home {
    pub fn new() -> Self {
        Self {
            dir: tempfile::tempdir().expect("a home for ferry's files"),
        }
    }

    /// The data directory: the embedded relay's lock file and database.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// `ferry ARGS` in this home, reading neither a relay nor a token from
    /// the test's own environment.
    pub fn ferry(&self, args: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_ferry"));
        command
            .args(args)
            .env_remove("FERRY_RELAY")
            .env_remove("FERRY_TOKEN")
            .env("FERRY_DATA_DIR", self.data_dir())
            .env("FERRY_CONFIG_DIR", self.dir.path().join("config"));
        command
    }

    /// Runs `ferry ARGS` to its end.
    pub fn run(&self, args: &[&str]) -> Output {
        Running::start(self.ferry(args), Stdio::piped(), Stdio::piped()).finish()
    }
}

/// What a finished process printed and how it exited.
#[derive(Debug)]
pub struct Output {
    /// The exit code; -1 when a signal ended it.
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    /// Asserts that the process succeeded and returns its stdout.
    pub fn ok(self) -> String {
        assert_eq!(self.code, 0, "{self:#?}");
        self.stdout
    }
}

/// A running process, killed and reaped when dropped, so that a failing
/// test leaves no process behind.
pub struct Running {
    /// The process.
    child: Child,
}

impl Running {
    pub fn start(mut command: Command, stdout: Stdio, stderr: Stdio) -> Self {
        let child = command
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|err| panic!("{command:?} starts: {err}"));
        Self { child }
    }

    pub fn stdout(&mut self) -> ChildStdout {
        self.child.stdout.take().expect("piped stdout")
    }

    pub fn stderr(&mut self) -> ChildStderr {
        self.child.stderr.take().expect("piped stderr")
    }

    /// The exit status. Called once one of the child's pipes has been read
    /// to its end, which happens only when the child exits, so it does not
    /// block.
    pub fn exited(&mut self) -> ExitStatus {
        self.child.wait().expect("wait for the process")
    }

    /// Reads both pipes to their end, then returns the exit status.
    pub fn finish(mut self) -> Output {
        let (mut stdout, mut stderr) = (self.stdout(), self.stderr());
        let (stdout, stderr) = within("the process to exit", move || {
            let errors = std::thread::spawn(move || {
                let mut text = String::new();
                stderr.read_to_string(&mut text).map(|_| text)
            });
            let mut text = String::new();
            let stdout = stdout.read_to_string(&mut text).map(|_| text);
            let stderr = errors.join().expect("the stderr reader");
            (stdout, stderr)
        });
        Output {
            code: self.exited().code().unwrap_or(-1),
            stdout: stdout.expect("read stdout"),
            stderr: stderr.expect("read stderr"),
        }
    }

    /// Sends SIGTERM, as a service manager stopping the process would.
    pub fn terminate(&self) {
        self.signal("-TERM");
    }

    /// Sends SIGKILL: the process ends at once, nothing flushed.
    pub fn kill_hard(&mut self) {
        self.signal("-KILL");
        let status = self.exited();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(9),
            "{status}"
        );
    }

    fn signal(&self, signal: &str) {
        let sent = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(sent.success());
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `ferry ARGS` in a home of its own to its end and returns its exit
/// code and stderr.
pub fn ferry(args: &[&str]) -> (i32, String) {
    let output = Home::new().run(args);
    (output.code, output.stderr)
}

/// A request the origin got.
#[derive(Debug)]
pub struct Received {
    /// The request line and headers, up to the blank line.
    pub head: String,
    /// The body, de-chunked.
    pub body: Vec<u8>,
}

impl Received {
    /// `METHOD TARGET`, from the request line.
    pub fn request_line(&self) -> String {
        let line = self.head.lines().next().unwrap_or_default();
        line.rsplit_once(' ')
            .map_or(line, |(start, _version)| start)
            .to_owned()
    }
}

/// An HTTP/1.1 origin on threads: answers every request with `hello` over
/// keep-alive connections and reports each request it got. Stops when
/// dropped.
pub struct Origin {
    pub addr: SocketAddr,
    received: mpsc::Receiver<Received>,
    stop: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
}

impl Origin {
    pub fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (report, received) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = Arc::clone(&stop);
        let acceptor = std::thread::spawn(move || {
            for stream in listener.incoming() {
                if stopping.load(Ordering::SeqCst) {
                    return;
                }
                if let Ok(stream) = stream {
                    let report = report.clone();
                    // Ends when its client closes the connection, at the
                    // latest when the test's guard kills it.
                    std::thread::spawn(move || serve_connection(stream, &report));
                }
            }
        });
        Self {
            addr,
            received,
            stop,
            acceptor: Some(acceptor),
        }
    }

    /// The next request the origin got.
    pub fn next(&self) -> Received {
        self.received
            .recv_timeout(PATIENCE)
            .expect("the origin gets the request")
    }

    /// The head of the next request the origin got.
    pub fn next_head(&self) -> String {
        self.next().head
    }

    /// Requests that arrived and were not taken yet. Whatever a finished
    /// command sent has arrived: the origin reports a request before it
    /// answers.
    pub fn unclaimed(&self) -> Vec<Received> {
        self.received.try_iter().collect()
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

/// Answers requests on one connection until it closes.
fn serve_connection(mut stream: TcpStream, report: &mpsc::Sender<Received>) {
    let mut pending = Vec::new();
    while let Some(received) = read_request(&mut stream, &mut pending) {
        let _ = report.send(received);
        if stream
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello")
            .is_err()
        {
            return;
        }
    }
}

/// Reads one request (a body by content-length or chunked); `None` once
/// the connection ends.
fn read_request(stream: &mut TcpStream, pending: &mut Vec<u8>) -> Option<Received> {
    let end = read_until(stream, pending, b"\r\n\r\n")?;
    let head: Vec<u8> = pending.drain(..end + 4).collect();
    let head = String::from_utf8_lossy(&head).into_owned();
    let chunked = header(&head, "transfer-encoding")
        .is_some_and(|value| value.to_ascii_lowercase().contains("chunked"));
    let mut body = Vec::new();
    if chunked {
        loop {
            let end = read_until(stream, pending, b"\r\n")?;
            let line: Vec<u8> = pending.drain(..end + 2).collect();
            let line = String::from_utf8_lossy(&line);
            let size = line.trim().split(';').next().unwrap_or_default();
            let size = usize::from_str_radix(size, 16).ok()?;
            if size == 0 {
                // Trailers, if any, up to the blank line.
                loop {
                    let end = read_until(stream, pending, b"\r\n")?;
                    pending.drain(..end + 2);
                    if end == 0 {
                        break;
                    }
                }
                break;
            }
            fill(stream, pending, size + 2)?;
            body.extend(pending.drain(..size));
            pending.drain(..2);
        }
    } else {
        let length = header(&head, "content-length").map_or(Some(0), |v| v.parse().ok())?;
        fill(stream, pending, length)?;
        body.extend(pending.drain(..length));
    }
    Some(Received { head, body })
}

/// Reads until `pending` holds `needle`, and returns where it starts.
fn read_until(stream: &mut TcpStream, pending: &mut Vec<u8>, needle: &[u8]) -> Option<usize> {
    loop {
        if let Some(at) = pending.windows(needle.len()).position(|w| w == needle) {
            return Some(at);
        }
        read_more(stream, pending)?;
    }
}

/// Reads until `pending` holds at least `len` bytes.
fn fill(stream: &mut TcpStream, pending: &mut Vec<u8>, len: usize) -> Option<()> {
    while pending.len() < len {
        read_more(stream, pending)?;
    }
    Some(())
}

fn read_more(stream: &mut TcpStream, pending: &mut Vec<u8>) -> Option<()> {
    let mut buf = [0u8; 4096];
    match stream.read(&mut buf) {
        Ok(0) | Err(_) => None,
        Ok(n) => {
            pending.extend_from_slice(&buf[..n]);
            Some(())
        }
    }
}

/// The value of header `name` in an HTTP head, if it has one.
pub fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().skip(1).find_map(|line| {
        let (field, value) = line.split_once(':')?;
        field
            .trim()
            .eq_ignore_ascii_case(name)
            .then_some(value.trim())
    })
}

/// Sends one HTTP/1.1 request to `addr` with `Host: host` and returns the
/// raw response, read until the server closes the connection.
pub fn send(
    addr: SocketAddr,
    host: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> String {
    let mut stream = TcpStream::connect(addr).expect("connect to the relay");
    stream.set_read_timeout(Some(PATIENCE)).expect("timeout");
    stream.set_write_timeout(Some(PATIENCE)).expect("timeout");
    let mut request =
        format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n").into_bytes();
    for (name, value) in headers {
        request.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
    }
    if !body.is_empty() || method != "GET" {
        request.extend_from_slice(format!("content-length: {}\r\n", body.len()).as_bytes());
    }
    request.extend_from_slice(b"\r\n");
    request.extend_from_slice(body);
    stream.write_all(&request).expect("write");
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .unwrap_or_else(|err| panic!("{method} {path}: {err}"));
    String::from_utf8_lossy(&response).into_owned()
}

/// A `ferry http` through an embedded relay on a free port: its own, or
/// the one another `ferry http` on the same data directory runs.
pub struct Tunnel {
    pub ferry: Running,
    /// The public host with its port: `NAME.localhost:PORT`.
    pub host: String,
    /// The relay it connected to.
    pub relay: SocketAddr,
    /// The rest of ferry's stdout after the banner line, until taken.
    pub stdout: Option<BufReader<ChildStdout>>,
}

impl Tunnel {
    /// Starts `ferry http ORIGIN --embedded-port 0 EXTRA…` in `home` and
    /// reads its status block up to the forwarding line,
    /// `Forwarding  http://NAME.localhost:PORT -> TARGET`.
    pub fn start(home: &Home, origin: SocketAddr, extra: &[&str]) -> Self {
        let target = origin.to_string();
        let mut args = vec!["http", &target, "--embedded-port", "0"];
        args.extend_from_slice(extra);
        let mut ferry = Running::start(home.ferry(&args), Stdio::piped(), Stdio::inherit());
        let mut stdout = BufReader::new(ferry.stdout());
        let (banner, stdout) = within("the status block", move || {
            let mut line = String::new();
            while !line.contains(" -> ") {
                line.clear();
                if stdout.read_line(&mut line)? == 0 {
                    break;
                }
            }
            Ok::<_, std::io::Error>((line, stdout))
        })
        .expect("read the status block");
        let (public_url, target) = forwarding(&banner);
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
    pub fn lines(&mut self) -> mpsc::Receiver<String> {
        lines_of(self.stdout.take().expect("stdout not taken yet"))
    }

    /// Sends `GET path` through the tunnel and returns the raw response.
    pub fn get(&self, path: &str) -> String {
        self.send("GET", path, &[], b"")
    }

    /// Sends a request through the tunnel and returns the raw response.
    pub fn send(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> String {
        send(self.relay, &self.host, method, path, headers, body)
    }

    /// Stops ferry with SIGTERM and returns the rest of its stdout once it
    /// has exited, successfully.
    pub fn stop(mut self) -> String {
        let mut stdout = self.stdout.take().expect("stdout not taken yet");
        self.ferry.terminate();
        let rest = within("ferry to exit after SIGTERM", move || {
            let mut rest = String::new();
            stdout.read_to_string(&mut rest).map(|_| rest)
        })
        .expect("read stdout");
        let status = self.ferry.exited();
        assert!(status.success(), "{status}");
        rest
    }
}

/// The public URL and target of the status block's line
/// `Forwarding  URL -> TARGET`.
pub fn forwarding(line: &str) -> (&str, &str) {
    let (label_and_url, target) = line
        .trim()
        .split_once(" -> ")
        .unwrap_or_else(|| panic!("a URL -> TARGET line: {line:?}"));
    let url = label_and_url.split_whitespace().last().unwrap_or_default();
    (url, target)
}

/// The lines `reader` yields, without their ends, read on a thread until
/// it ends or the receiver is dropped.
pub fn lines_of(reader: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (line, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for text in BufReader::new(reader).lines() {
            let Ok(text) = text else { return };
            if line.send(text).is_err() {
                return;
            }
        }
    });
    lines
}

/// The relay's live tail (`GET /api/v1/requests/stream`): the id of each
/// entry as it is committed to the database. Closed when dropped.
pub struct Tail {
    /// The event stream's lines.
    lines: mpsc::Receiver<String>,
    /// The connection, shut down on drop to end the reader.
    stream: TcpStream,
}

impl Tail {
    /// Opens the tail with the list filters `query` and returns once the
    /// relay has sent its opening comment: every entry committed after that
    /// is sent.
    pub fn open(relay: SocketAddr, query: &str) -> Self {
        let mut stream = TcpStream::connect(relay).expect("connect to the relay");
        stream.set_write_timeout(Some(PATIENCE)).expect("timeout");
        // HTTP/1.0: the event stream comes unchunked, ended by the close.
        write!(
            stream,
            "GET /api/v1/requests/stream?{query} HTTP/1.0\r\nHost: {relay}\r\n\r\n"
        )
        .expect("write");
        let lines = lines_of(stream.try_clone().expect("clone the socket"));
        let tail = Self { lines, stream };
        let status = tail.next_line();
        assert_eq!(status.split(' ').nth(1), Some("200"), "{status}");
        while tail.next_line() != ": ferry activity log" {}
        tail
    }

    fn next_line(&self) -> String {
        self.lines
            .recv_timeout(PATIENCE)
            .expect("the live tail goes on")
    }

    /// The ids of the next `count` entries committed, in commit order.
    pub fn ids(&self, count: usize) -> Vec<String> {
        let deadline = Instant::now() + PATIENCE;
        let mut ids = Vec::new();
        while ids.len() < count {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self
                .lines
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("{count} entries committed; got {ids:?}"));
            if let Some(id) = line.strip_prefix("id: ") {
                ids.push(id.trim().to_owned());
            }
        }
        ids
    }
}

impl Drop for Tail {
    fn drop(&mut self) {
        let _ = self.stream.shutdown(Shutdown::Both);
    }
}
