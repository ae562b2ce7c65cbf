//! What `ferry http` prints: on a pseudo-terminal (the status block,
//! coloured request lines, a bottom line of status and counters redrawn in
//! place), with NO_COLOR, on a pipe (no escape sequences at all), as JSON,
//! with a hostile path, and across a relay restart.

use std::fs::File;
use std::io::Read;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Instant;

use rustix::fs::{Mode, OFlags};
use rustix::pty::{grantpt, openpt, ptsname, unlockpt, OpenptFlags};
use tokio_util::sync::CancellationToken;

use crate::harness::{forwarding, lines_of, send, Home, Origin, Running, PATIENCE};

/// What a child wrote to its terminal, read on a thread from the
/// pseudo-terminal's controller side.
struct Screen {
    /// Chunks as they are read; disconnected once the child has exited.
    chunks: mpsc::Receiver<Vec<u8>>,
    /// Everything read so far.
    seen: Vec<u8>,
}

impl Screen {
    /// Runs `command` with its stdout on a new pseudo-terminal.
    fn run(command: Command) -> (Running, Screen) {
        let controller = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC)
            .expect("open a pseudo-terminal");
        grantpt(&controller).expect("grantpt");
        unlockpt(&controller).expect("unlockpt");
        let name = ptsname(&controller, Vec::new()).expect("ptsname");
        // NOCTTY: the test process must not take it as its own terminal.
        let terminal = rustix::fs::open(
            name.as_c_str(),
            OFlags::RDWR | OFlags::NOCTTY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .expect("open the terminal side");
        // The child's copy is the only one left once it has started, so
        // reading ends (EIO) when the child exits.
        let running = Running::start(command, Stdio::from(terminal), Stdio::inherit());
        let mut controller = File::from(controller);
        let (chunk, chunks) = mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = controller.read(&mut buf) {
                if n == 0 || chunk.send(buf[..n].to_vec()).is_err() {
                    return;
                }
            }
        });
        let screen = Screen {
            chunks,
            seen: Vec::new(),
        };
        (running, screen)
    }

    /// Everything read so far, as text, without the auto-wrap switches
    /// around the bottom line (checked apart, on the raw bytes).
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.seen)
            .replace("\x1b[?7l", "")
            .replace("\x1b[?7h", "")
    }

    /// Everything read so far, exactly.
    fn raw(&self) -> String {
        String::from_utf8_lossy(&self.seen).into_owned()
    }

    /// Reads until what was written satisfies `done`, and returns it all.
    fn wait_for(&mut self, what: &str, done: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + PATIENCE;
        while !done(&self.text()) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.chunks.recv_timeout(left) {
                Ok(chunk) => self.seen.extend(chunk),
                Err(_) => panic!("{what}: not seen in {:?}", self.text()),
            }
        }
        self.text()
    }

    /// Reads to the end, once the child has exited.
    fn rest(&mut self) -> String {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.chunks.recv_timeout(left) {
                Ok(chunk) => self.seen.extend(chunk),
                Err(mpsc::RecvTimeoutError::Disconnected) => return self.text(),
                Err(mpsc::RecvTimeoutError::Timeout) => panic!("ferry did not exit"),
            }
        }
    }
}

/// `ferry http ORIGIN --embedded-port 0 EXTRA…` as a terminal would run
/// it: TERM set, NO_COLOR not.
fn ferry_http(home: &Home, origin: SocketAddr, extra: &[&str]) -> Command {
    let target = origin.to_string();
    let mut args = vec!["http", &target, "--embedded-port", "0"];
    args.extend_from_slice(extra);
    let mut command = home.ferry(&args);
    command.env("TERM", "xterm-256color").env_remove("NO_COLOR");
    command
}

/// The public host (`NAME.localhost:PORT`) and the relay's address, from
/// the status block's forwarding line.
fn tunnel_of(printed: &str) -> (String, SocketAddr) {
    let line = printed
        .lines()
        .find(|line| line.starts_with("Forwarding") && line.contains(" -> "))
        .unwrap_or_else(|| panic!("a forwarding line in {printed:?}"));
    let (url, _) = forwarding(line);
    let host = url.strip_prefix("http://").expect("an http URL").to_owned();
    let port: u16 = host
        .rsplit_once(':')
        .and_then(|(_, port)| port.parse().ok())
        .expect("a port");
    (host, SocketAddr::from(([127, 0, 0, 1], port)))
}

/// The bottom line a terminal shows now: what follows the last line
/// printed after the last "erase line".
fn bottom_line(printed: &str) -> &str {
    let last = printed.rsplit("\r\x1b[2K").next().unwrap_or_default();
    let last = last.strip_suffix("\r\n").unwrap_or(last);
    last.rsplit("\r\n").next().unwrap_or_default()
}

/// Whether `text` holds a Select Graphic Rendition sequence (a colour):
/// ESC [ digits and semicolons, then `m`.
fn has_colour(text: &str) -> bool {
    text.split("\x1b[").skip(1).any(|after| {
        let params = after.trim_start_matches(|c: char| c.is_ascii_digit() || c == ';');
        params.starts_with('m')
    })
}

#[test]
fn on_a_terminal_the_status_block_is_followed_by_coloured_request_lines_and_live_counters() {
    let home = Home::new();
    let origin = Origin::start();
    let (ferry, mut screen) = Screen::run(ferry_http(&home, origin.addr, &[]));
    let printed = screen.wait_for("the status block and bottom line", |text| {
        text.contains("Dashboard") && text.contains("open 0  rate 0.00/s  p50 -  p90 -")
    });
    let (host, relay) = tunnel_of(&printed);
    let port = relay.port();
    assert!(
        printed.contains(&format!(
            "Relay             ws://127.0.0.1:{port} (embedded: reachable from this machine only"
        )),
        "{printed:?}"
    );
    assert!(
        printed.contains(&format!(
            "Forwarding        http://{host} -> http://{}\r\n",
            origin.addr
        )),
        "{printed:?}"
    );
    assert!(
        printed.contains(&format!("Dashboard         http://127.0.0.1:{port}/\r\n")),
        "{printed:?}"
    );
    // The session status and counters are the bottom line, not the block.
    assert!(!printed.contains("Session Status"), "{printed:?}");
    assert!(
        printed.contains("\x1b[32monline\x1b[0m  total 0  open 0  rate 0.00/s  p50 -  p90 -"),
        "{printed:?}"
    );

    let response = send(relay, &host, "POST", "/hooks/stripe?live=1", &[], b"{}");
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    let printed = screen.wait_for("the request line and counters", |text| {
        let bottom = bottom_line(text);
        bottom.contains("online\x1b[0m  total 1  open 0") && bottom.matches(" ms").count() == 2
    });
    // Erase the bottom line, then the request line.
    let line = printed
        .split("\r\x1b[2K")
        .flat_map(|drawn| drawn.split("\r\n"))
        .find(|line| line.contains("/hooks/stripe"))
        .unwrap_or_else(|| panic!("a request line in {printed:?}"));
    let (time, rest) = line.split_once("  ").expect("a time first");
    assert_eq!(time.len(), "12:34:56.789".len(), "{line:?}");
    assert!(
        rest.starts_with("POST    /hooks/stripe?live=1 "),
        "{line:?}"
    );
    assert!(rest.contains(" \x1b[32m200\x1b[0m "), "{line:?}");
    let raw = screen.raw();
    assert!(
        raw.contains("\x1b[?7l\x1b[32monline") && raw.contains("p90 -\x1b[?7h"),
        "the bottom line is clipped, not wrapped: {raw:?}"
    );
    assert!(rest.ends_with(" ms"), "{line:?}");
    // The bottom line now counts it: a duration for both percentiles.
    let bottom = bottom_line(&printed);
    assert!(
        bottom.starts_with("\x1b[32monline\x1b[0m  total 1  open 0  rate ")
            && bottom.matches(" ms").count() == 2,
        "{bottom:?}"
    );

    ferry.terminate();
    let printed = screen.rest();
    assert!(
        printed.contains("stopping: letting requests in flight finish"),
        "{printed:?}"
    );
    // The last bottom line stays, ended, for the shell's prompt.
    assert!(printed.ends_with(" ms\r\n"), "{printed:?}");
    let last = bottom_line(&printed);
    assert!(
        last.starts_with("\x1b[31moffline\x1b[0m  total 1  open 0"),
        "{last:?}"
    );
    drop(ferry);
}

#[test]
fn no_color_on_a_terminal_keeps_the_live_bottom_line_without_colours() {
    let home = Home::new();
    let origin = Origin::start();
    let mut command = ferry_http(&home, origin.addr, &[]);
    command.env("NO_COLOR", "1");
    let (mut ferry, mut screen) = Screen::run(command);
    let printed = screen.wait_for("the bottom line", |text| text.contains("online  total 0"));
    let (host, relay) = tunnel_of(&printed);
    let response = send(relay, &host, "GET", "/plain", &[], b"");
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    screen.wait_for("the request counted", |text| {
        text.contains("online  total 1  open 0")
    });
    ferry.terminate();
    let printed = screen.rest();
    assert!(
        printed.contains("  GET     /plain ") && printed.contains(" 200 "),
        "{printed:?}"
    );
    assert!(!has_colour(&printed), "{printed:?}");
    assert!(printed.contains("\r\x1b[2K"), "still redrawn: {printed:?}");
    assert!(ferry.exited().success());
}

#[test]
fn a_piped_stdout_gets_the_block_once_and_plain_lines_without_escapes() {
    let home = Home::new();
    let origin = Origin::start();
    let mut command = ferry_http(&home, origin.addr, &[]);
    command.env("TERM", "xterm-256color");
    let mut ferry = Running::start(command, Stdio::piped(), Stdio::inherit());
    let lines = lines_of(ferry.stdout());
    let next = || {
        lines
            .recv_timeout(PATIENCE)
            .expect("ferry goes on printing")
    };
    let mut block = Vec::new();
    while !block
        .last()
        .is_some_and(|line: &String| line.starts_with("Requests"))
    {
        block.push(next());
    }
    let block = block.join("\n");
    assert!(block.contains("\nSession Status    online\n"), "{block}");
    assert!(
        block.ends_with("\nRequests          total 0  open 0  rate 0.00/s  p50 -  p90 -"),
        "{block}"
    );
    let (host, relay) = tunnel_of(&block);
    assert!(
        block.contains(&format!("\nDashboard         http://{relay}/\n")),
        "{block}"
    );
    let response = send(relay, &host, "DELETE", "/items/7", &[], b"");
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    let line = std::iter::repeat_with(next)
        .find(|line| line.contains("/items/7"))
        .expect("a request line");
    let (_time, rest) = line.split_once("  ").expect("a time first");
    assert!(rest.starts_with("DELETE  /items/7 "), "{line:?}");
    assert!(rest.contains(" 200 "), "{line:?}");
    ferry.terminate();
    let rest: Vec<String> = lines.iter().collect();
    assert!(ferry.exited().success());
    let all = format!("{block}\n{line}\n{}", rest.join("\n"));
    assert!(!all.contains('\x1b'), "{all:?}");
}

#[test]
fn log_format_json_prints_an_object_per_line_and_event() {
    let home = Home::new();
    let origin = Origin::start();
    let mut ferry = Running::start(
        ferry_http(&home, origin.addr, &["--log-format", "json"]),
        Stdio::piped(),
        Stdio::inherit(),
    );
    let lines = lines_of(ferry.stdout());
    let next = || -> serde_json::Value {
        let line = lines
            .recv_timeout(PATIENCE)
            .expect("ferry goes on printing");
        serde_json::from_str(&line).unwrap_or_else(|err| panic!("{line:?}: {err}"))
    };
    let online = next();
    assert_eq!(online["event"], "online", "{online}");
    assert_eq!(online["reconnected"], false, "{online}");
    assert_eq!(online["target"], format!("http://{}", origin.addr));
    let public_url = online["public_url"].as_str().expect("a public URL");
    let host = public_url.strip_prefix("http://").expect("an http URL");
    let port: u16 = host
        .rsplit_once(':')
        .and_then(|(_, port)| port.parse().ok())
        .expect("a port");
    let relay = SocketAddr::from(([127, 0, 0, 1], port));
    assert_eq!(online["dashboard_url"], format!("http://{relay}/"));

    let response = send(relay, host, "PUT", "/orders/9?v=2", &[], b"{}");
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    let request = next();
    assert_eq!(request["event"], "request", "{request}");
    assert_eq!(request["method"], "PUT");
    assert_eq!(request["path"], "/orders/9?v=2");
    assert_eq!(request["status"], 200);
    assert!(request["duration_ms"].as_f64().is_some(), "{request}");
    assert!(request["time"].as_str().is_some_and(|t| t.ends_with('Z')));

    ferry.terminate();
    let mut last = serde_json::Value::Null;
    for line in lines.iter() {
        last = serde_json::from_str(&line).unwrap_or_else(|err| panic!("{line:?}: {err}"));
    }
    assert_eq!(last["event"], "stopping", "{last}");
    assert!(ferry.exited().success());
}

#[test]
fn a_hostile_path_cannot_drive_the_terminal() {
    let home = Home::new();
    let origin = Origin::start();
    let (ferry, mut screen) = Screen::run(ferry_http(&home, origin.addr, &[]));
    let printed = screen.wait_for("the bottom line", |text| text.contains("total 0"));
    let (host, relay) = tunnel_of(&printed);
    // The relay refuses a raw ESC in a request line ...
    let response = send(relay, &host, "GET", "/e\x1b]0;owned\x07\x1b[2J", &[], b"");
    assert!(response.starts_with("HTTP/1.1 400"), "{response}");
    // ... but lets UTF-8 through, and U+009B is CSI, ESC [ in one
    // character, to terminals that honour C1 controls.
    let response = send(relay, &host, "GET", "/c1\u{9b}2J\u{9b}31m", &[], b"");
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    let printed = screen.wait_for("the request line", |text| text.contains("\\x9b31m "));
    assert!(
        printed.contains("GET     /c1\\x9b2J\\x9b31m "),
        "{printed:?}"
    );
    assert!(!printed.contains('\u{9b}'), "{printed:?}");
    assert!(!printed.contains("owned"), "{printed:?}");
    drop(ferry);
}

/// A relay in this process on `listen`, keeping its log in `data_dir`.
struct Relay {
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Relay {
    fn start(runtime: &tokio::runtime::Runtime, listen: SocketAddr, data_dir: &Home) -> Self {
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind(listen))
            .expect("bind the relay");
        let config = ferry_relay::Config {
            data_dir: data_dir.data_dir(),
            ..ferry_relay::Config::default()
        };
        let shutdown = CancellationToken::new();
        let task = runtime.spawn(ferry_relay::run(
            config,
            ferry_relay::Listeners::plain(listener),
            shutdown.clone(),
        ));
        Self { shutdown, task }
    }

    /// Stops it and waits until it has: its port is free again.
    fn stop(self, runtime: &tokio::runtime::Runtime) {
        self.shutdown.cancel();
        runtime
            .block_on(self.task)
            .expect("the relay task")
            .expect("the relay stops cleanly");
    }
}

#[test]
fn a_relay_restart_is_shown_as_it_happens() {
    let runtime = tokio::runtime::Runtime::new().expect("a runtime");
    let (first_home, second_home, home) = (Home::new(), Home::new(), Home::new());
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port");
    let relay = Relay::start(&runtime, addr, &first_home);
    let origin = Origin::start();
    let target = origin.addr.to_string();
    let relay_url = format!("ws://{addr}");
    let mut command = home.ferry(&["http", &target, "--relay", &relay_url]);
    command.env("TERM", "xterm-256color");
    let (ferry, mut screen) = Screen::run(command);
    let printed = screen.wait_for("online", |text| text.contains("online\x1b[0m  total 0"));
    assert!(
        printed.contains(&format!("Relay             ws://{addr}\r\n")),
        "{printed:?}"
    );
    assert!(
        printed.contains(&format!("Dashboard         http://{addr}/\r\n")),
        "{printed:?}"
    );

    relay.stop(&runtime);
    let printed = screen.wait_for("the drop, the retry and the bottom line", |text| {
        text.contains("\x1b[33mreconnecting\x1b[0m  total 0")
    });
    assert!(
        printed.contains("  \x1b[31mtunnel dropped\x1b[0m: the relay is shutting down\r\n"),
        "{printed:?}"
    );
    assert!(
        printed.contains("  \x1b[33mreconnecting\x1b[0m in "),
        "{printed:?}"
    );
    // The same port again, as a restarted relay would take.
    let relay = Relay::start(&runtime, addr, &second_home);
    // The whole line, however the reads split it.
    let printed = screen.wait_for("the reconnect", |text| {
        text.split("reconnected\x1b[0m: http://")
            .nth(1)
            .is_some_and(|after| after.contains("\r\n"))
    });
    let back = printed
        .split("\r\n")
        .find(|line| line.contains("reconnected"))
        .expect("a reconnected line");
    assert!(
        back.ends_with(&format!(" -> http://{}", origin.addr)),
        "{back:?}"
    );
    screen.wait_for("online again", |text| {
        bottom_line(text).starts_with("\x1b[32monline\x1b[0m")
    });

    ferry.terminate();
    screen.rest();
    drop(ferry);
    relay.stop(&runtime);
}
