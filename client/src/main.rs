//! `ferry`: parses the command line, starts the embedded relay when no relay
//! is configured, and prints the tunnel's events.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime};

use clap::{Args, Parser, Subcommand, ValueEnum};
use ferry::embedded::Embedded;
use ferry::terminal::{Format, Options, View};
use ferry::{Config, Event, HostHeader, InFlight, Target};
use ferry_common::subdomain::Subdomain;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

mod commands;
mod webhook_commands;

/// Expose a local server through a Ferry relay, so webhooks and browsers
/// reach localhost.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Forward a public subdomain to a local HTTP server.
    Http(HttpArgs),
    /// List the activity log, newest first: a line per request.
    Log(LogArgs),
    /// Show one captured request and its response: headers and bodies.
    Show(ShowArgs),
    /// Send a captured request again: to the local server by default.
    Replay(ReplayArgs),
    /// Export captured requests as curl commands or HAR.
    Export(ExportArgs),
    /// Manage the webhooks the relay delivers events to, and their
    /// deliveries.
    Webhooks(webhook_commands::WebhooksArgs),
    /// Send events to the webhooks that listen to their type.
    Events(webhook_commands::EventsArgs),
    /// List the event types that may be sent.
    EventTypes(webhook_commands::EventTypesArgs),
}

/// Which relay a command asks.
#[derive(Args, Debug)]
struct SourceArgs {
    /// The relay to ask, such as https://relay.example.com. Without one,
    /// the embedded relay: through the running `ferry http`, or for the log
    /// commands from its data directory when none runs.
    #[arg(long, env = "FERRY_RELAY")]
    relay: Option<String>,
    /// The token the relay asks for.
    #[arg(long, env = "FERRY_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// The embedded relay's data directory (unused with --relay). Default:
    /// the user's data directory (~/.local/share/ferry on Linux).
    #[arg(long, env = "FERRY_DATA_DIR", value_name = "DIR")]
    data_dir: Option<std::path::PathBuf>,
}

impl SourceArgs {
    /// The log: through --relay, the relay running on the data directory,
    /// or the data directory's database.
    fn open(&self, writable: bool) -> Result<ferry::activity::Source, String> {
        if let Some(relay) = &self.relay {
            return Ok(ferry::activity::Source::api(relay, self.token.as_deref()));
        }
        ferry::activity::Source::data_dir(&self.dir()?, writable).map_err(|err| err.to_string())
    }

    /// A running relay's API: --relay, or the relay running on the data
    /// directory.
    fn api(&self) -> Result<ferry::activity::Source, String> {
        if let Some(relay) = &self.relay {
            return Ok(ferry::activity::Source::api(relay, self.token.as_deref()));
        }
        ferry::activity::Source::running(&self.dir()?).map_err(|err| err.to_string())
    }

    fn dir(&self) -> Result<std::path::PathBuf, String> {
        self.data_dir
            .clone()
            .or_else(ferry::embedded::default_data_dir)
            .ok_or_else(|| "no data directory: pass --data-dir or --relay".to_owned())
    }
}

#[derive(Args, Debug)]
struct LogArgs {
    #[command(flatten)]
    source: SourceArgs,
    /// Only this tunnel's requests.
    #[arg(long)]
    tunnel: Option<String>,
    /// Only `tunnel` requests or `replay`s.
    #[arg(long)]
    kind: Option<String>,
    /// Only this method.
    #[arg(long)]
    method: Option<String>,
    /// Only this status (200) or class (4xx).
    #[arg(long)]
    status: Option<String>,
    /// Only requests whose path, query, header values or text bodies hold
    /// this text (any case).
    #[arg(long, short = 'q')]
    search: Option<String>,
    /// Only requests received since (an RFC 3339 time, or 1h for an hour ago).
    #[arg(long)]
    since: Option<String>,
    /// Only requests received before.
    #[arg(long)]
    until: Option<String>,
    /// How many lines.
    #[arg(long, default_value_t = 50)]
    limit: usize,
    /// Keep printing new requests as they arrive.
    #[arg(long, short = 'f')]
    follow: bool,
    /// A JSON object per line instead of text.
    #[arg(long)]
    json: bool,
}

impl LogArgs {
    fn query(&self) -> String {
        let pairs = [
            ("tunnel", &self.tunnel),
            ("kind", &self.kind),
            ("method", &self.method),
            ("status", &self.status),
            ("q", &self.search),
            ("since", &self.since),
            ("until", &self.until),
        ];
        pairs
            .iter()
            .filter_map(|(key, value)| value.as_ref().map(|v| format!("{key}={}", encode(v))))
            .collect::<Vec<_>>()
            .join("&")
    }
}

#[derive(Args, Debug)]
struct ShowArgs {
    #[command(flatten)]
    source: SourceArgs,
    /// The request's id, as `ferry log` prints it.
    id: String,
    /// The whole entry as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct ReplayArgs {
    #[command(flatten)]
    source: SourceArgs,
    /// The request's id, as `ferry log` prints it.
    #[arg(required_unless_present = "missed")]
    id: Option<String>,
    /// Replay, oldest first, every request captured while the client was
    /// offline and not replayed yet.
    #[arg(long, conflicts_with_all = ["id", "via_relay"])]
    missed: bool,
    /// With --missed: only this tunnel's.
    #[arg(long, requires = "missed")]
    tunnel: Option<String>,
    /// Where to send it: a port, host:port or URL. Default: the target the
    /// tunnel's client last reported, else http://localhost:3000.
    #[arg(long, value_name = "TARGET")]
    to: Option<String>,
    /// Send it through the tunnel from the relay instead (logged there as a
    /// replay).
    #[arg(long)]
    via_relay: bool,
    /// Another method.
    #[arg(long)]
    method: Option<String>,
    /// Another path, with its query.
    #[arg(long)]
    path: Option<String>,
    /// A header to set, `Name: value` (repeatable).
    #[arg(long = "header", value_name = "NAME: VALUE")]
    headers: Vec<String>,
    /// A header to remove (repeatable).
    #[arg(long = "remove-header", value_name = "NAME")]
    remove_headers: Vec<String>,
    /// Another body: text, or @FILE for a file's bytes.
    #[arg(long)]
    body: Option<String>,
}

#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("format").required(true).args(["curl", "har"])))]
struct ExportArgs {
    #[command(flatten)]
    source: SourceArgs,
    /// The requests' ids.
    #[arg(required = true)]
    ids: Vec<String>,
    /// A curl command per request.
    #[arg(long)]
    curl: bool,
    /// One HAR 1.2 document.
    #[arg(long)]
    har: bool,
    /// With --curl: send to this base URL instead (http://localhost:3000).
    #[arg(long, requires = "curl")]
    to: Option<String>,
}

#[derive(Args, Debug)]
struct HttpArgs {
    /// The local server: a port (3000), host:port (localhost:3000) or URL
    /// (http://127.0.0.1:3000, https://localhost:8443).
    #[arg(default_value = "http://localhost:3000", value_parser = Target::parse)]
    target: Target,
    /// The relay to use, such as wss://relay.example.com. Without one, ferry
    /// starts a relay inside this process on 127.0.0.1.
    #[arg(long, env = "FERRY_RELAY")]
    relay: Option<String>,
    /// The port of the relay started inside this process when there is no
    /// --relay; 0 picks any free port. By default 8080, or the next free one.
    #[arg(long, value_name = "PORT", conflicts_with = "relay")]
    embedded_port: Option<u16>,
    /// The token the relay asks for.
    #[arg(long, env = "FERRY_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// A PEM file of certificate authorities to trust for a wss:// relay, for
    /// relays whose certificate no public authority signed.
    #[arg(long, env = "FERRY_RELAY_CA", value_name = "FILE")]
    relay_ca: Option<std::path::PathBuf>,
    /// Where ferry keeps its reconnect keys (one per relay, so a restarted
    /// ferry gets its subdomain back). Default: the user's config directory.
    #[arg(long, env = "FERRY_CONFIG_DIR", value_name = "DIR")]
    config_dir: Option<std::path::PathBuf>,
    /// Where the relay started inside this process keeps its activity log
    /// (unused with --relay). Default: the user's data directory
    /// (~/.local/share/ferry on Linux).
    #[arg(long, env = "FERRY_DATA_DIR", value_name = "DIR")]
    data_dir: Option<std::path::PathBuf>,
    /// The subdomain to ask for; a random one otherwise.
    #[arg(long, value_parser = Subdomain::parse)]
    subdomain: Option<Subdomain>,
    /// The Host header the local server sees: `preserve` (the public host),
    /// `rewrite` (the target's host, for dev servers that check it) or a
    /// fixed value.
    #[arg(long, default_value = "preserve")]
    host_header: HostHeader,
    /// How long the local server may take to answer before the caller gets
    /// 504 (60s, 2m; a bare number is seconds).
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = local_timeout)]
    timeout: Duration,
    /// How to print: `text`, a status block and a line per request (with
    /// colours on a terminal unless NO_COLOR is set), or `json`, a JSON
    /// object per line and event, for machines.
    #[arg(long, value_name = "FORMAT", default_value = "text")]
    log_format: LogFormat,
}

/// `--log-format`.
#[derive(ValueEnum, Clone, Copy, Debug)]
enum LogFormat {
    /// A status block, then a line per request.
    Text,
    /// A JSON object per line and event.
    Json,
}

/// `--timeout`: a duration with units, from a millisecond up to a day.
fn local_timeout(text: &str) -> Result<Duration, String> {
    let timeout = ferry_common::units::parse_duration(text)?;
    if timeout < Duration::from_millis(1) || timeout > Duration::from_secs(86_400) {
        return Err("must be between 1ms and 1d".to_owned());
    }
    Ok(timeout)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = match Cli::parse().command {
        Command::Http(args) => args,
        Command::Log(args) => return report(commands::log(args).await),
        Command::Show(args) => return report(commands::show(args).await),
        Command::Replay(args) => return report(commands::replay(args).await),
        Command::Export(args) => return report(commands::export(args).await),
        Command::Webhooks(args) => return report(webhook_commands::webhooks(args).await),
        Command::Events(args) => return report(webhook_commands::events(args).await),
        Command::EventTypes(args) => return report(webhook_commands::event_types(args).await),
    };
    let (writer, lines) = match Writer::start() {
        Ok(started) => started,
        Err(err) => {
            eprintln!("error: cannot start writing to stdout: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = http(args, lines).await;
    writer.finish(EXIT_FLUSH);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}

/// The exit status of a command other than `http`, its error printed.
fn report(result: Result<(), String>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}

/// Percent-encodes a query value.
fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

async fn http(args: HttpArgs, lines: Lines) -> Result<(), ferry::Error> {
    let data_dir = args
        .data_dir
        .clone()
        .or_else(ferry::embedded::default_data_dir);
    // A relay already running on this data directory (another `ferry
    // http`) serves this tunnel too.
    let running = data_dir
        .as_deref()
        .filter(|_| args.relay.is_none())
        .and_then(ferry_relay::data_dir::running_relay);
    let joined = running.is_some();
    let (relay, key_name, embedded) = match (&args.relay, running, data_dir) {
        (Some(relay), _, _) => {
            let relay = ferry::relay_url(relay)?;
            (relay.clone(), relay, None)
        }
        (None, Some(running), Some(dir)) => {
            (ferry::relay_url(&running)?, embedded_key_name(&dir), None)
        }
        (None, None, Some(dir)) => {
            let embedded = Embedded::start(args.embedded_port, dir.clone())
                .await
                .map_err(ferry::Error::Embedded)?;
            (
                embedded.relay_url(),
                embedded_key_name(&dir),
                Some(embedded),
            )
        }
        (None, _, None) => {
            return Err(ferry::Error::Embedded(std::io::Error::other(
                "no data directory for the embedded relay: pass --data-dir",
            )))
        }
    };
    // The embedded relay keeps its log and name holds in its data
    // directory, so its key is per directory, not per port.
    let client_key = match args.config_dir.clone().or_else(default_config_dir) {
        Some(dir) => match ferry::keys::client_key(&dir, &key_name) {
            Ok(key) => Some(key),
            Err(err) => {
                eprintln!(
                    "warning: cannot keep a reconnect key in {}: {err}; a restarted ferry will get a new subdomain",
                    dir.display()
                );
                None
            }
        },
        None => None,
    };
    let config = Config {
        relay,
        client_key,
        token: args.token,
        subdomain: args.subdomain,
        target: args.target,
        host_header: args.host_header,
        local_timeout: args.timeout,
        keepalive: ferry_common::handshake::Keepalive::default(),
        relay_ca: match &args.relay_ca {
            Some(path) => read_certificates(path)?,
            None => Vec::new(),
        },
    };
    let relay_note = match (&args.relay, joined) {
        (Some(_), _) => None,
        (None, false) => Some("embedded: reachable from this machine only; use --relay for a public one"),
        (None, true) => Some("embedded, run by another ferry http on this data directory; reachable from this machine only"),
    };
    let options = view_options(
        args.log_format,
        &config.relay,
        relay_note.map(str::to_owned),
    );
    let in_flight = InFlight::default();
    let view = View::new(options, in_flight.clone(), Instant::now());
    let (events, receiver) = broadcast::channel(1024);
    let mut printing = tokio::spawn(print(receiver, lines, view));
    let shutdown = CancellationToken::new();
    let on_signal = shutdown.clone();
    tokio::spawn(async move {
        ferry_relay::shutdown::signal().await;
        on_signal.cancel();
    });
    let result = ferry::run_counting(config, events, in_flight, shutdown).await;
    if let Some(embedded) = embedded {
        embedded.stop().await;
    }
    // The events end once the tunnel's last request has, which a local
    // server that never answers could delay: printing gets a bounded time.
    if tokio::time::timeout(EXIT_FLUSH, &mut printing)
        .await
        .is_err()
    {
        printing.abort();
        let _ = printing.await;
    }
    result
}

/// How `ferry http` prints: colours and the redrawn bottom line only when
/// stdout is a terminal (not a `dumb` one), and colours only without
/// NO_COLOR (https://no-color.org: set to anything but empty).
fn view_options(format: LogFormat, relay: &str, relay_note: Option<String>) -> Options {
    let terminal = std::io::stdout().is_terminal()
        && std::env::var_os("TERM").is_none_or(|term| term != "dumb");
    let no_color = std::env::var_os("NO_COLOR").is_some_and(|value| !value.is_empty());
    let dashboard = ferry::dashboard_url(relay);
    Options {
        format: match format {
            LogFormat::Text => Format::Text,
            LogFormat::Json => Format::Json,
        },
        color: terminal && !no_color,
        live: terminal,
        // The relay's address as a user would type it: its dashboard's
        // host, with the tunnel's scheme.
        relay: dashboard
            .as_deref()
            .and_then(|d| d.split_once("://"))
            .map_or_else(
                || relay.to_owned(),
                |(scheme, rest)| {
                    let scheme = if scheme == "https" { "wss" } else { "ws" };
                    format!("{scheme}://{}", rest.trim_end_matches('/'))
                },
            ),
        relay_note,
        dashboard,
    }
}

/// What the reconnect key of an embedded relay is filed under.
fn embedded_key_name(data_dir: &std::path::Path) -> String {
    format!("embedded relay in {}", data_dir.display())
}

/// `ferry` in the user's config directory (`~/.config/ferry` on Linux).
fn default_config_dir() -> Option<std::path::PathBuf> {
    dirs::config_dir().map(|dir| dir.join("ferry"))
}

/// Reads every certificate in a PEM file.
fn read_certificates(path: &std::path::Path) -> Result<Vec<CertificateDer<'static>>, ferry::Error> {
    let fail = |why: String| ferry::Error::RelayCa(format!("{}: {why}", path.display()));
    let certificates = CertificateDer::pem_file_iter(path)
        .map_err(|err| fail(err.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| fail(err.to_string()))?;
    if certificates.is_empty() {
        return Err(fail("no CERTIFICATE block in it".to_owned()));
    }
    Ok(certificates)
}

/// Texts (each the lines of the events printed in one go) that may wait for
/// the writer; beyond this they are dropped and counted.
const QUEUED_LINES: usize = 1024;
/// The most texts written in one go once the first has arrived.
const WRITE_BATCH: usize = 512;
/// The most events turned into one text; under load the events of many
/// requests share one hand-over to the writer.
const EVENT_BATCH: usize = 256;
/// The shortest time between two writes to stdout. Waking the writer
/// thread for each request's line cost more CPU than forwarding the
/// request did; a terminal need not change more often than this.
const WRITE_PACE: Duration = Duration::from_millis(10);
/// How long exit waits for the last events to be printed, and again for
/// them to be written, so that a stdout nobody reads cannot hold it.
const EXIT_FLUSH: Duration = Duration::from_secs(1);

/// The thread that writes to stdout. Writes block when stdout is a full
/// pipe; on the runtime's only thread they would stop all forwarding.
struct Writer {
    thread: std::thread::JoinHandle<()>,
    /// Disconnects when the thread ends.
    ended: mpsc::Receiver<()>,
}

/// Hands text to the [`Writer`] without ever waiting for it.
struct Lines {
    queue: mpsc::SyncSender<String>,
    /// Lines dropped since the queue last took one.
    dropped: u64,
}

impl Writer {
    fn start() -> std::io::Result<(Self, Lines)> {
        let (queue, queued) = mpsc::sync_channel::<String>(QUEUED_LINES);
        let (end, ended) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("stdout".into())
            .spawn(move || {
                // Dropped when the thread ends, which `finish` waits for.
                let _end = end;
                write_lines(&queued);
            })?;
        let lines = Lines { queue, dropped: 0 };
        Ok((Self { thread, ended }, lines))
    }

    /// Waits up to `within` for the thread to write what is queued; called
    /// once every [`Lines`] is gone.
    fn finish(self, within: Duration) {
        if let Err(mpsc::RecvTimeoutError::Disconnected) = self.ended.recv_timeout(within) {
            let _ = self.thread.join();
        }
    }
}

fn write_lines(queued: &mpsc::Receiver<String>) {
    let stdout = std::io::stdout();
    while let Ok(first) = queued.recv() {
        let mut out = std::io::BufWriter::new(stdout.lock());
        // Stdout closed (a pipe whose reader left) is no reason to stop the
        // tunnel, so errors are ignored here and below.
        let _ = out.write_all(first.as_bytes());
        for text in queued.try_iter().take(WRITE_BATCH) {
            let _ = out.write_all(text.as_bytes());
        }
        let _ = out.flush();
        drop(out);
        // What arrives meanwhile waits in the queue, where sending it wakes
        // no one.
        std::thread::sleep(WRITE_PACE);
    }
}

impl Lines {
    /// Queues `text` (whole lines), or counts its lines as dropped when the
    /// writer is behind; the next text queued starts with `view`'s note of
    /// how many.
    fn send(&mut self, view: &View, text: String) {
        if text.is_empty() && self.dropped == 0 {
            return;
        }
        let lines = text.matches('\n').count() as u64;
        let text = if self.dropped > 0 {
            format!("{}{text}", view.dropped_note(self.dropped))
        } else {
            text
        };
        match self.queue.try_send(text) {
            Ok(()) => self.dropped = 0,
            Err(mpsc::TrySendError::Full(_)) => self.dropped += lines,
            // The writer panicked: there is no terminal output any more.
            Err(mpsc::TrySendError::Disconnected(_)) => {}
        }
    }
}

/// How often the terminal's bottom line (session status and counters) is
/// redrawn while nothing happens, for the rate to decay.
const REFRESH_EVERY: Duration = Duration::from_secs(1);

/// Prints the status block and a line per event until the tunnel has
/// stopped.
async fn print(mut events: broadcast::Receiver<Event>, mut lines: Lines, mut view: View) {
    let mut refresh = tokio::time::interval(REFRESH_EVERY);
    refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // Both arms are cancel-safe: a broadcast receive and a tick.
        let event = tokio::select! {
            received = events.recv() => match received {
                Ok(event) => Ok(event),
                Err(broadcast::error::RecvError::Lagged(missed)) => Err(missed),
                Err(broadcast::error::RecvError::Closed) => break,
            },
            _ = refresh.tick(), if view.is_live() => {
                if let Some(text) = view.refresh(Instant::now()) {
                    lines.send(&view, text);
                }
                continue;
            }
        };
        let (now, wall) = (Instant::now(), SystemTime::now());
        let mut text = view.event(event, now, wall);
        // The events already waiting go out with this one.
        for _ in 1..EVENT_BATCH {
            let event = match events.try_recv() {
                Ok(event) => Ok(event),
                Err(broadcast::error::TryRecvError::Lagged(missed)) => Err(missed),
                Err(_) => break,
            };
            text.push_str(&view.event(event, now, wall));
        }
        lines.send(&view, text);
    }
    let last = view.finish(Instant::now());
    // Also writes the note of lines dropped, if any.
    lines.send(&view, last);
}
