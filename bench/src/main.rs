//! `ferry-bench`: measures Ferry against sending the same load straight to
//! the origin, on the same machine, in the same run.
//!
//! - [`scenarios`]: what is measured, direct and through the tunnel.
//! - [`procs`]: the relay, client and origin as separate release processes.
//! - [`load`]: `wrk` where installed, and the built-in load generator.
//! - [`origin`]: the fast origin everything is measured against.
//! - [`nginx`]: Debian's nginx as the origin instead (`--origin nginx`).
//! - [`peers`]: bore and rathole, installed once and run as tunnels.
//! - [`side_by_side`]: Ferry, bore and rathole in the same rounds
//!   (`--peers`).
//! - [`metrics`]: a relay's `/metrics`, and the waits that read it.
//! - [`dispatch`]: the webhook dispatcher's throughput and queue delay,
//!   driven through the relay's API.
//! - [`receiver`]: the loopback webhook receiver deliveries go to.
//! - [`log_writes`]: the activity log's write rate, on the relay's store
//!   in this process.
//! - [`fleet`]: a fleet of relays on one PostgreSQL database
//!   (`--fleet`), on a server of its own from [`pg`]: requests through
//!   another relay than the tunnel's ([`routing`]), and the dispatcher on
//!   one relay on SQLite, one on PostgreSQL and three sharing a database.
//! - [`framing_bench`]: a lighter tunnel framing against HTTP/2, through
//!   the prototypes in [`proto`] ([`light`] over the wire format in
//!   [`framing`]).
//!
//! Without a subcommand it runs every scenario and prints a table; the
//! subcommands are the pieces it starts as separate processes, and the
//! dispatcher's scenario alone.

mod dispatch;
mod fleet;
mod framing;
mod framing_bench;
mod light;
mod load;
mod log_writes;
mod metrics;
mod nginx;
mod origin;
mod peers;
mod pg;
mod procs;
mod proto;
mod receiver;
mod routing;
mod scenarios;
mod side_by_side;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use tokio::io::AsyncReadExt;
use tokio_util::sync::CancellationToken;

use crate::scenarios::{OriginKind, Row, Settings};

/// Measures Ferry against a direct origin, side by side.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    /// About a second per scenario: checks the harness works, not the numbers.
    #[arg(long)]
    quick: bool,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Use the built-in load generator even where wrk is installed.
    #[arg(long)]
    no_wrk: bool,
    /// Run the plain HTTP scenarios with bore and rathole side by side
    /// instead (installed once with cargo into $FERRY_BENCH_CACHE, else
    /// $XDG_CACHE_HOME/ferry-bench/peers, else ~/.cache/ferry-bench/peers),
    /// and the relay at --threads 1 and 2.
    #[arg(long, conflicts_with = "fleet")]
    peers: bool,
    /// Run the fleet's scenarios instead: a 1 KiB GET at the relay holding
    /// the tunnel and at another of three relays sharing one PostgreSQL
    /// database, and the dispatcher with one relay on SQLite, one on
    /// PostgreSQL and three on one database; on a PostgreSQL server of the
    /// bench's own in a temporary folder (Debian's `postgresql` must be
    /// installed).
    #[arg(long)]
    fleet: bool,
    /// The origin every tunnel forwards to: the builtin one, or Debian's
    /// nginx (`apt-get install nginx-light`).
    #[arg(long, value_enum, default_value = "builtin")]
    origin: OriginKind,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve the benchmark origin and print `listening ADDR`.
    Origin {
        /// Where to listen.
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
    },
    /// Drive HTTP/1.1 load and print the outcome as JSON.
    Load {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long)]
        host: String,
        #[arg(long, default_value = "/1k")]
        path: String,
        #[arg(long, default_value_t = 64)]
        connections: usize,
        #[arg(long, default_value_t = 1000)]
        millis: u64,
        /// A new connection per request.
        #[arg(long)]
        close: bool,
    },
    /// Upload or download once and print the time as JSON.
    Transfer {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long)]
        host: String,
        #[arg(long)]
        bytes: u64,
        #[arg(
            long,
            conflicts_with = "download",
            required_unless_present = "download"
        )]
        upload: bool,
        #[arg(long)]
        download: bool,
    },
    /// Append ENTRIES webhook exchanges to a fresh activity log in a
    /// temporary directory and print the write rate as JSON.
    LogWrites {
        #[arg(long)]
        entries: usize,
    },
    /// Run only the webhook dispatcher's scenario and print its rows.
    Dispatch,
    /// Open COUNT tunnels, print `connected in SECONDS`, and hold them until
    /// standard input closes.
    IdleTunnels {
        #[arg(long)]
        relay: String,
        #[arg(long)]
        target: String,
        #[arg(long)]
        count: usize,
    },
    /// Measure the light framing prototype against HTTP/2 and print a table.
    Framing,
    /// A prototype tunnel's relay: prints `listening TUNNEL PUBLIC`.
    ProtoRelay {
        #[arg(long, value_enum)]
        framing: proto::Framing,
        /// Where the proto-client connects.
        #[arg(long, default_value = "127.0.0.1:0")]
        tunnel: SocketAddr,
        /// Where public HTTP/1.1 comes in.
        #[arg(long, default_value = "127.0.0.1:0")]
        public: SocketAddr,
    },
    /// A prototype tunnel's client: prints `connected`.
    ProtoClient {
        #[arg(long, value_enum)]
        framing: proto::Framing,
        /// The proto-relay's tunnel address.
        #[arg(long)]
        relay: SocketAddr,
        /// The origin requests go to.
        #[arg(long)]
        origin: SocketAddr,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        None => {
            let only = if cli.peers {
                Only::Peers
            } else if cli.fleet {
                Only::Fleet
            } else {
                Only::All
            };
            bench(cli.quick, cli.json, !cli.no_wrk, cli.origin, only).await
        }
        Some(Command::Dispatch) => {
            bench(cli.quick, cli.json, false, cli.origin, Only::Dispatcher).await
        }
        Some(Command::Origin { listen }) => match tokio::net::TcpListener::bind(listen).await {
            Ok(listener) => {
                match listener.local_addr() {
                    Ok(addr) => println!("listening {addr}"),
                    Err(err) => return fail(&err.to_string()),
                }
                origin::serve(listener).await;
                Ok(())
            }
            Err(err) => Err(format!("cannot listen on {listen}: {err}")),
        },
        Some(Command::Load {
            addr,
            host,
            path,
            connections,
            millis,
            close,
        }) => {
            let spec = load::Spec {
                addr,
                host,
                path,
                connections,
                duration: Duration::from_millis(millis),
                close,
            };
            print_json(&load::builtin(&spec).await)
        }
        Some(Command::Transfer {
            addr,
            host,
            bytes,
            upload,
            ..
        }) => match load::transfer(addr, &host, bytes, upload).await {
            Ok(transfer) => print_json(&transfer),
            Err(err) => Err(err),
        },
        Some(Command::LogWrites { entries }) => match log_writes::measure(entries).await {
            Ok(rate) => print_json(&rate),
            Err(err) => Err(err),
        },
        Some(Command::IdleTunnels {
            relay,
            target,
            count,
        }) => idle_tunnels(&relay, &target, count).await,
        Some(Command::Framing) => framing_bench::run(cli.quick, !cli.no_wrk).await,
        Some(Command::ProtoRelay {
            framing,
            tunnel,
            public,
        }) => proto::current_thread(move || proto::relay(framing, tunnel, public)).await,
        Some(Command::ProtoClient {
            framing,
            relay,
            origin,
        }) => proto::current_thread(move || proto::client(framing, relay, origin)).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => fail(&err),
    }
}

fn fail(message: &str) -> ExitCode {
    eprintln!("error: {message}");
    ExitCode::FAILURE
}

fn print_json(value: &impl serde::Serialize) -> Result<(), String> {
    println!(
        "{}",
        serde_json::to_string(value).map_err(|e| e.to_string())?
    );
    Ok(())
}

/// Which scenarios a run takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Only {
    /// Every scenario.
    All,
    /// The webhook dispatcher's.
    Dispatcher,
    /// The plain HTTP ones with bore and rathole.
    Peers,
    /// The fleet's, on PostgreSQL.
    Fleet,
}

async fn bench(
    quick: bool,
    json: bool,
    wrk: bool,
    origin: OriginKind,
    only: Only,
) -> Result<(), String> {
    let bin = procs::bin_dir()?;
    let wrk = wrk
        && std::process::Command::new("wrk")
            .arg("--version")
            .output()
            .is_ok();
    let mut settings = if quick {
        Settings::quick()
    } else {
        Settings::full(wrk)
    };
    settings.origin = origin;
    let started = Instant::now();
    let rows = match only {
        Only::All => scenarios::run(&bin, &settings).await?,
        Only::Dispatcher => scenarios::dispatcher(&bin, &settings).await?,
        Only::Peers => side_by_side::run(&bin, &settings).await?,
        Only::Fleet => fleet::run(&bin, &settings).await?,
    };
    let machine = machine();
    if json {
        return print_json(&serde_json::json!({
            "machine": machine,
            "settings": settings,
            "seconds": started.elapsed().as_secs_f64(),
            "rows": rows,
        }));
    }
    println!(
        "{machine}; load by {}; origin {}; {} rounds; {:.0} s\n",
        if settings.wrk {
            "wrk"
        } else {
            "the built-in generator"
        },
        match settings.origin {
            OriginKind::Builtin => "builtin",
            OriginKind::Nginx => "nginx",
        },
        settings.rounds,
        started.elapsed().as_secs_f64()
    );
    print_table(&rows);
    Ok(())
}

fn print_table(rows: &[Row]) {
    let number = |v: Option<f64>| {
        v.map_or_else(String::new, |v| {
            // Counts and large figures are whole; small ones keep two places.
            if v.abs() >= 100.0 || v.fract() == 0.0 {
                format!("{v:.0}")
            } else {
                format!("{v:.2}")
            }
        })
    };
    println!("| scenario | metric | direct | tunnel | tunnel/direct | target | met |");
    println!("|---|---|---:|---:|---:|---|---|");
    for row in rows {
        let met = match row.met {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "",
        };
        println!(
            "| {} | {} | {} | {} | {} | {} | {} |",
            row.scenario,
            row.metric,
            number(row.direct),
            number(row.tunnel),
            row.ratio.map_or_else(String::new, |r| format!("{r:.2}")),
            row.target,
            met
        );
    }
}

/// The machine the run is on: CPU model, cores, kernel.
fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cpu}, {cores} cores, Linux {}", kernel.trim())
}

/// How many tunnels connect at once.
const CONNECT_BATCH: usize = 256;

async fn idle_tunnels(relay: &str, target: &str, count: usize) -> Result<(), String> {
    let target = ferry::Target::parse(target).map_err(|e| e.to_string())?;
    let relay = ferry::relay_url(relay).map_err(|e| e.to_string())?;
    let shutdown = CancellationToken::new();
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(count);
    let mut opened = 0;
    while opened < count {
        let batch = CONNECT_BATCH.min(count - opened);
        let mut waiting = Vec::with_capacity(batch);
        for _ in 0..batch {
            let config = ferry::Config {
                relay: relay.clone(),
                token: None,
                subdomain: None,
                target: target.clone(),
                host_header: ferry::HostHeader::Preserve,
                local_timeout: ferry::DEFAULT_LOCAL_TIMEOUT,
                keepalive: ferry_common::handshake::Keepalive::default(),
                relay_ca: Vec::new(),
                client_key: None,
            };
            let (events, receiver) = tokio::sync::broadcast::channel(4);
            tasks.push(tokio::spawn(ferry::run(config, events, shutdown.clone())));
            waiting.push(receiver);
        }
        for mut receiver in waiting {
            match receiver.recv().await {
                Ok(ferry::Event::Connected { .. }) => {}
                other => return Err(format!("a tunnel did not connect: {other:?}")),
            }
        }
        opened += batch;
    }
    println!("connected in {:.3}", started.elapsed().as_secs_f64());
    // Hold the tunnels until the driver closes standard input or signals.
    let (mut stdin, mut sink) = (tokio::io::stdin(), Vec::new());
    tokio::select! {
        _ = stdin.read_to_end(&mut sink) => {}
        () = wait_for_term() => {}
    }
    shutdown.cancel();
    Ok(())
}

async fn wait_for_term() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut term) => {
            term.recv().await;
        }
        Err(_) => std::future::pending().await,
    }
}
