//! `ferry`: parses the command line, starts the embedded relay when no relay
//! is configured, and prints the tunnel's events.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use ferry::embedded::Embedded;
use ferry::{Config, Event, HostHeader, Target};
use ferry_common::subdomain::Subdomain;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

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
    /// The subdomain to ask for; a random one otherwise.
    #[arg(long, value_parser = Subdomain::parse)]
    subdomain: Option<Subdomain>,
    /// The Host header the local server sees: `preserve` (the public host),
    /// `rewrite` (the target's host, for dev servers that check it) or a
    /// fixed value.
    #[arg(long, default_value = "preserve")]
    host_header: HostHeader,
    /// Seconds the local server may take to answer before the caller gets 504.
    #[arg(long, value_name = "SECONDS", default_value_t = ferry::DEFAULT_LOCAL_TIMEOUT.as_secs(),
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    timeout: u64,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let Command::Http(args) = Cli::parse().command;
    match http(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}

async fn http(args: HttpArgs) -> Result<(), ferry::Error> {
    let (relay, embedded) = match &args.relay {
        Some(relay) => (ferry::relay_url(relay)?, None),
        None => {
            let embedded = Embedded::start(args.embedded_port)
                .await
                .map_err(ferry::Error::Embedded)?;
            (embedded.relay_url(), Some(embedded))
        }
    };
    let config = Config {
        relay,
        token: args.token,
        subdomain: args.subdomain,
        target: args.target,
        host_header: args.host_header,
        local_timeout: Duration::from_secs(args.timeout),
        keepalive: ferry_common::handshake::Keepalive::default(),
        relay_ca: match &args.relay_ca {
            Some(path) => read_certificates(path)?,
            None => Vec::new(),
        },
    };
    let (events, receiver) = broadcast::channel(1024);
    let embedded_addr = embedded.as_ref().map(|e| e.addr);
    tokio::spawn(print(receiver, embedded_addr));
    let shutdown = CancellationToken::new();
    let on_signal = shutdown.clone();
    tokio::spawn(async move {
        ferry_relay::shutdown::signal().await;
        on_signal.cancel();
    });
    let result = ferry::run(config, events, shutdown).await;
    if let Some(embedded) = embedded {
        embedded.stop().await;
    }
    result
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

/// The most events written in one go once the first has arrived.
const PRINT_BATCH: usize = 512;

/// Prints the banner and a line per request. Under load the lines that
/// have queued up are written together, in one system call rather than one
/// per line.
async fn print(mut events: broadcast::Receiver<Event>, embedded: Option<std::net::SocketAddr>) {
    loop {
        let first = match events.recv().await {
            Ok(event) => Ok(event),
            Err(broadcast::error::RecvError::Lagged(missed)) => Err(missed),
            Err(broadcast::error::RecvError::Closed) => return,
        };
        let stdout = std::io::stdout();
        let mut out = std::io::BufWriter::new(stdout.lock());
        write_event(&mut out, first, embedded);
        for _ in 0..PRINT_BATCH {
            match events.try_recv() {
                Ok(event) => write_event(&mut out, Ok(event), embedded),
                Err(broadcast::error::TryRecvError::Lagged(missed)) => {
                    write_event(&mut out, Err(missed), embedded)
                }
                Err(_) => break,
            }
        }
        // Stdout closed (a pipe whose reader left) is no reason to stop the tunnel.
        let _ = out.flush();
    }
}

/// Writes one event, or a note of `Err(missed)` events dropped under load.
fn write_event(
    out: &mut impl Write,
    event: Result<Event, u64>,
    embedded: Option<std::net::SocketAddr>,
) {
    let _ = match event {
        Err(missed) => writeln!(out, "… {missed} requests not shown"),
        Ok(Event::Connected {
            public_url,
            target,
            reconnected: false,
        }) => {
            let _ = writeln!(out, "{public_url} -> {target}");
            if let Some(addr) = embedded {
                let _ = writeln!(
                    out,
                    "embedded relay on http://localhost:{} (reachable from this machine only; use --relay for a public one)",
                    addr.port()
                );
            }
            writeln!(out, "Ctrl-C to stop\n")
        }
        Ok(Event::Connected {
            public_url,
            reconnected: true,
            ..
        }) => writeln!(out, "reconnected: {public_url}"),
        Ok(Event::Disconnected { reason }) => writeln!(out, "disconnected: {reason}"),
        Ok(Event::Stopping) => writeln!(out, "stopping: letting requests in flight finish"),
        Ok(Event::Reconnecting { delay }) => {
            writeln!(out, "reconnecting in {:.1} s", delay.as_secs_f64())
        }
        Ok(Event::Request(exchange)) => {
            let millis = exchange.elapsed.as_secs_f64() * 1000.0;
            let note = exchange.error.map(|e| format!("  {e}")).unwrap_or_default();
            writeln!(
                out,
                "{:<7} {:<40} {} {:>8.1} ms{note}",
                exchange.method, exchange.path, exchange.status, millis
            )
        }
    };
}
