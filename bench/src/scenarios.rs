//! The scenarios: each alternates direct and tunnel runs and reports
//! medians and the tunnel/direct ratio against its target.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::dispatch::{self, Stored, Throughput};
use crate::load::{self, Outcome, Spec, Transfer};
use crate::log_writes::WriteRate;
use crate::metrics;
use crate::procs::Proc;
use crate::receiver::Receiver;

/// How a run is sized.
#[derive(Debug, Clone, Serialize)]
pub struct Settings {
    /// Direct/tunnel pairs per scenario.
    pub rounds: usize,
    /// Length of each load run.
    pub load_duration: Duration,
    /// Bytes per upload and download.
    pub transfer_bytes: u64,
    /// Idle tunnels opened on one relay.
    pub idle_tunnels: usize,
    /// Relay restarts timed.
    pub restarts: usize,
    /// Entries appended to the activity log for its write rate.
    pub log_entries: usize,
    /// Deliveries per dispatcher throughput run, spread over its webhooks.
    pub dispatch_deliveries: usize,
    /// Length of the dispatcher's steady-rate run.
    pub dispatch_steady: Duration,
    /// Whether wrk drives the plain HTTP load.
    pub wrk: bool,
    /// The origin the tunnels forward to.
    pub origin: OriginKind,
}

/// Which server answers as the origin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum OriginKind {
    /// This binary's `origin` subcommand (hyper).
    Builtin,
    /// Debian's nginx, in front of the builtin origin for uploads.
    Nginx,
}

impl Settings {
    /// The full run, for BENCHMARKS.md.
    pub fn full(wrk: bool) -> Self {
        Self {
            rounds: 3,
            load_duration: Duration::from_secs(10),
            transfer_bytes: 512 << 20,
            idle_tunnels: 10_000,
            restarts: 10,
            log_entries: 200_000,
            dispatch_deliveries: 20_000,
            dispatch_steady: Duration::from_secs(20),
            wrk,
            origin: OriginKind::Builtin,
        }
    }

    /// About a second per scenario, so CI keeps the harness working.
    pub fn quick() -> Self {
        Self {
            rounds: 3,
            load_duration: Duration::from_millis(150),
            transfer_bytes: 16 << 20,
            idle_tunnels: 100,
            restarts: 2,
            log_entries: 5_000,
            dispatch_deliveries: 200,
            dispatch_steady: Duration::from_secs(1),
            wrk: false,
            origin: OriginKind::Builtin,
        }
    }
}

/// One line of the report.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// The scenario.
    pub scenario: String,
    /// What is measured, with its unit.
    pub metric: String,
    /// The direct figure, where there is one.
    pub direct: Option<f64>,
    /// The tunnel figure.
    pub tunnel: Option<f64>,
    /// Tunnel / direct, where both exist.
    pub ratio: Option<f64>,
    /// The target, as text.
    pub target: String,
    /// Whether the target was met, where there is one.
    pub met: Option<bool>,
}

impl Row {
    pub(crate) fn new(scenario: &str, metric: &str) -> Self {
        Self {
            scenario: scenario.to_owned(),
            metric: metric.to_owned(),
            direct: None,
            tunnel: None,
            ratio: None,
            target: String::new(),
            met: None,
        }
    }

    /// Direct and tunnel figures with their ratio.
    pub(crate) fn pair(mut self, direct: f64, tunnel: f64) -> Self {
        self.direct = Some(direct);
        self.tunnel = Some(tunnel);
        self.ratio = (direct > 0.0).then(|| tunnel / direct);
        self
    }

    pub(crate) fn only(mut self, tunnel: f64) -> Self {
        self.tunnel = Some(tunnel);
        self
    }

    /// Target: the ratio is at least `min`.
    pub(crate) fn ratio_at_least(self, min: f64) -> Self {
        self.ratio_at_least_of(min, "direct")
    }

    /// Target: the ratio is at least `min` of `baseline`, the figure in the
    /// direct column.
    pub(crate) fn ratio_at_least_of(mut self, min: f64, baseline: &str) -> Self {
        self.target = format!(">= {min:.2}x {baseline}");
        self.met = self.ratio.map(|r| r >= min);
        self
    }

    /// Target: the tunnel figure is at least `min`.
    pub(crate) fn at_least(mut self, min: f64, unit: &str) -> Self {
        self.target = format!(">= {min} {unit}");
        self.met = self.tunnel.map(|t| t >= min);
        self
    }

    /// Target: the tunnel figure is at most `max`.
    pub(crate) fn at_most(mut self, max: f64, unit: &str) -> Self {
        self.target = format!("<= {max} {unit}");
        self.met = self.tunnel.map(|t| t <= max);
        self
    }

    pub(crate) fn note(mut self, note: &str) -> Self {
        self.target = note.to_owned();
        self
    }
}

/// The median of `values`.
pub fn median(values: &mut [f64]) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Whether a relay records exchanges in its activity log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Capture {
    /// The default: every exchange is stored.
    On,
    /// `--capture off`: nothing is.
    Off,
}

/// The processes of one measured setup: origin, relay, client.
struct Stack {
    bin: PathBuf,
    origin: Origin,
    origin_addr: SocketAddr,
    relay: Proc,
    relay_addr: SocketAddr,
    /// Whether the relay records what passes.
    capture: Capture,
    client: Proc,
    tunnel_host: String,
}

/// The origin everything is measured against: the builtin one alone, or
/// nginx in front of it.
pub struct Origin {
    /// The builtin origin; nginx passes uploads to it.
    builtin: Proc,
    /// nginx, with `--origin nginx`.
    nginx: Option<Proc>,
    /// Where requests go.
    pub addr: SocketAddr,
}

impl Origin {
    /// Starts the origin `settings` ask for.
    pub async fn start(bin: &Path, settings: &Settings) -> Result<Self, String> {
        let (builtin, builtin_addr) = start_origin(bin).await?;
        match settings.origin {
            OriginKind::Builtin => Ok(Self {
                builtin,
                nginx: None,
                addr: builtin_addr,
            }),
            OriginKind::Nginx => {
                let (nginx, addr) =
                    crate::nginx::start(builtin_addr, settings.transfer_bytes).await?;
                Ok(Self {
                    builtin,
                    nginx: Some(nginx),
                    addr,
                })
            }
        }
    }

    /// Stops its processes.
    pub async fn stop(self) -> Result<(), String> {
        if let Some(nginx) = self.nginx {
            nginx.terminate().await?;
        }
        self.builtin.terminate().await
    }
}

async fn start_origin(bin: &Path) -> Result<(Proc, SocketAddr), String> {
    let mut origin = Proc::spawn(&bin.join("ferry-bench"), &["origin".into()])?;
    let addr = origin
        .wait_line("the origin", |line| {
            line.strip_prefix("listening ")?.parse().ok()
        })
        .await?;
    Ok((origin, addr))
}

/// Starts a relay on `listen` with a fresh data directory of its own, so
/// that relays running together or one after another never share a log
/// (nor leave one in the working directory), with `extra` flags.
pub(crate) async fn start_relay(
    bin: &Path,
    listen: SocketAddr,
    capture: Capture,
    extra: &[&str],
) -> Result<(Proc, SocketAddr), String> {
    // Every connection of the benchmark comes from this one machine, which
    // the relay's per-address connect rate, connection cap and share of a
    // tunnel's requests would otherwise (rightly) refuse; the load and
    // transfer scenarios go far beyond a tunnel's request rate and body size.
    let mut args: Vec<String> = extra.iter().map(|&arg| arg.to_owned()).collect();
    args.extend([
        "--listen".into(),
        listen.to_string(),
        "--capture".into(),
        match capture {
            Capture::On => "on",
            Capture::Off => "off",
        }
        .into(),
        "--connects-per-minute".into(),
        "1000000".into(),
        "--max-tunnels".into(),
        "100000".into(),
        "--max-connections-per-ip".into(),
        "100000".into(),
        "--max-requests-per-ip".into(),
        "100000".into(),
        "--max-requests-per-second".into(),
        "1000000".into(),
        "--max-body-size".into(),
        "1024GiB".into(),
    ]);
    let mut relay = Proc::spawn_with_dir(&bin.join("ferry-relay"), &args, "--data-dir")?;
    let port: u16 = relay
        .wait_line("the relay", |line| {
            line.strip_prefix("ferry-relay listening on http://127.0.0.1:")?
                .split(' ')
                .next()?
                .parse()
                .ok()
        })
        .await?;
    Ok((relay, SocketAddr::from(([127, 0, 0, 1], port))))
}

pub(crate) async fn start_client(
    bin: &Path,
    relay: SocketAddr,
    origin: SocketAddr,
) -> Result<(Proc, String), String> {
    let args = [
        "http".into(),
        format!("http://{origin}"),
        "--relay".into(),
        format!("ws://{relay}"),
    ];
    // Its reconnect key goes to a directory of its own, not the user's.
    let mut client = Proc::spawn_with_dir(&bin.join("ferry"), &args, "--config-dir")?;
    let host = client
        .wait_line("the tunnel", |line| {
            // `Forwarding  http://NAME.localhost:PORT -> TARGET`
            let (label_and_url, _) = line.split_once(" -> ")?;
            let url = label_and_url.split_whitespace().last()?;
            Some(url.strip_prefix("http://")?.to_owned())
        })
        .await?;
    Ok((client, host))
}

impl Stack {
    async fn start(bin: &Path, settings: &Settings, capture: Capture) -> Result<Self, String> {
        let origin = Origin::start(bin, settings).await?;
        let origin_addr = origin.addr;
        let (relay, relay_addr) =
            start_relay(bin, SocketAddr::from(([127, 0, 0, 1], 0)), capture, &[]).await?;
        let (client, tunnel_host) = start_client(bin, relay_addr, origin_addr).await?;
        Ok(Self {
            bin: bin.to_path_buf(),
            origin,
            origin_addr,
            relay,
            relay_addr,
            capture,
            client,
            tunnel_host,
        })
    }

    /// Waits until the relay has stored and indexed what the last run left
    /// queued, so that its writer and search index take no CPU from the
    /// next run.
    async fn settle(&self) -> Result<(), String> {
        if self.capture == Capture::On {
            metrics::capture_caught_up(self.relay_addr).await?;
            metrics::search_index_caught_up(self.relay_addr).await?;
        }
        Ok(())
    }

    fn direct(&self, path: &str, connections: usize, duration: Duration, close: bool) -> Spec {
        Spec {
            addr: self.origin_addr,
            host: self.origin_addr.to_string(),
            path: path.to_owned(),
            connections,
            duration,
            close,
        }
    }

    fn tunnel(&self, path: &str, connections: usize, duration: Duration, close: bool) -> Spec {
        Spec {
            addr: self.relay_addr,
            host: self.tunnel_host.clone(),
            ..self.direct(path, connections, duration, close)
        }
    }

    async fn stop(self) -> Result<(), String> {
        self.client.terminate().await?;
        self.relay.terminate().await?;
        self.origin.stop().await
    }
}

/// Runs a load from a separate process: wrk where asked and installed,
/// else this binary's `load` subcommand.
pub(crate) async fn run_load(bin: &Path, spec: &Spec, wrk: bool) -> Result<Outcome, String> {
    run_load_on(bin, spec, wrk, None).await
}

/// [`run_load`] with the load generator pinned to `cpu` (`taskset`), where
/// given.
pub(crate) async fn run_load_on(
    bin: &Path,
    spec: &Spec,
    wrk: bool,
    cpu: Option<usize>,
) -> Result<Outcome, String> {
    if wrk {
        let spec = spec.clone();
        if let Ok(Some(outcome)) = tokio::task::spawn_blocking(move || load::wrk(&spec, cpu)).await
        {
            return Ok(outcome);
        }
    }
    let mut args = vec![
        "load".to_owned(),
        "--addr".into(),
        spec.addr.to_string(),
        "--host".into(),
        spec.host.clone(),
        "--path".into(),
        spec.path.clone(),
        "--connections".into(),
        spec.connections.to_string(),
        "--millis".into(),
        spec.duration.as_millis().to_string(),
    ];
    if spec.close {
        args.push("--close".into());
    }
    match cpu {
        Some(cpu) => {
            let mut pinned = vec![
                "-c".to_owned(),
                cpu.to_string(),
                bin.join("ferry-bench").display().to_string(),
            ];
            pinned.extend(args);
            json_output_of(Path::new("taskset"), &pinned).await
        }
        None => json_output(bin, &args).await,
    }
}

pub(crate) async fn json_output<T: serde::de::DeserializeOwned>(
    bin: &Path,
    args: &[String],
) -> Result<T, String> {
    json_output_of(&bin.join("ferry-bench"), args).await
}

/// Runs `program` and reads the JSON it prints.
async fn json_output_of<T: serde::de::DeserializeOwned>(
    program: &Path,
    args: &[String],
) -> Result<T, String> {
    let output = tokio::process::Command::new(program)
        .args(args)
        .output()
        .await
        .map_err(|e| format!("cannot run {args:?}: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "{args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    serde_json::from_slice(&output.stdout).map_err(|e| format!("{args:?} printed no result: {e}"))
}

/// Direct and tunnel outcomes of `rounds` alternating runs.
async fn alternate(
    stack: &Stack,
    settings: &Settings,
    path: &str,
    connections: usize,
    close: bool,
) -> Result<(Vec<Outcome>, Vec<Outcome>), String> {
    let (mut direct, mut tunnel) = (Vec::new(), Vec::new());
    for _ in 0..settings.rounds {
        let d = run_load(
            &stack.bin,
            &stack.direct(path, connections, settings.load_duration, close),
            settings.wrk,
        )
        .await?;
        let t = run_load(
            &stack.bin,
            &stack.tunnel(path, connections, settings.load_duration, close),
            settings.wrk,
        )
        .await?;
        stack.settle().await?;
        for (outcome, side) in [(&d, "direct"), (&t, "tunnel")] {
            if outcome.requests == 0 {
                return Err(format!(
                    "the {side} run of {path} completed no request ({} errors)",
                    outcome.errors
                ));
            }
        }
        direct.push(d);
        tunnel.push(t);
    }
    Ok((direct, tunnel))
}

pub(crate) fn medians(outcomes: &[Outcome], field: fn(&Outcome) -> f64) -> f64 {
    median(&mut outcomes.iter().map(field).collect::<Vec<_>>())
}

/// Runs every scenario and returns the report's rows.
pub async fn run(bin: &Path, settings: &Settings) -> Result<Vec<Row>, String> {
    let mut rows = Vec::new();
    // The relay as it ships: capture on.
    let stack = Stack::start(bin, settings, Capture::On).await?;

    let name = "1 KiB GET, 64 connections";
    let (d, t) = alternate(&stack, settings, "/1k", 64, false).await?;
    rows.push(
        Row::new(name, "requests/s")
            .pair(medians(&d, |o| o.rps), medians(&t, |o| o.rps))
            .ratio_at_least(0.55),
    );
    rows.push(Row::new(name, "p50 µs").pair(medians(&d, |o| o.p50_us), medians(&t, |o| o.p50_us)));
    rows.push(Row::new(name, "p99 µs").pair(medians(&d, |o| o.p99_us), medians(&t, |o| o.p99_us)));

    let name = "1 KiB GET, one connection";
    let (d, t) = alternate(&stack, settings, "/1k", 1, false).await?;
    let (d50, t50) = (medians(&d, |o| o.p50_us), medians(&t, |o| o.p50_us));
    rows.push(Row::new(name, "p50 µs").pair(d50, t50));
    rows.push(Row::new(name, "p99 µs").pair(medians(&d, |o| o.p99_us), medians(&t, |o| o.p99_us)));
    rows.push(
        Row::new(name, "µs added at p50")
            .only(t50 - d50)
            .at_most(40.0, "µs"),
    );

    let name = "new connection per request, 64 concurrent";
    let (d, t) = alternate(&stack, settings, "/1k", 64, true).await?;
    rows.push(
        Row::new(name, "requests/s")
            .pair(medians(&d, |o| o.rps), medians(&t, |o| o.rps))
            .ratio_at_least(0.35),
    );

    rows.extend(transfers(&stack, settings).await?);
    rows.extend(capture_cost(bin, settings).await?);
    rows.extend(log_writes(bin, settings).await?);
    rows.extend(reconnects(stack, settings).await?);
    rows.extend(idle_tunnels(bin, settings).await?);
    rows.extend(dispatcher(bin, settings).await?);
    Ok(rows)
}

/// Capture on against capture off: the same 64-connection load through two
/// stacks that differ only in `--capture`, alternating, and what the log
/// kept of the load it took.
async fn capture_cost(bin: &Path, settings: &Settings) -> Result<Vec<Row>, String> {
    let on = Stack::start(bin, settings, Capture::On).await?;
    let off = Stack::start(bin, settings, Capture::Off).await?;
    let (mut with, mut without, mut catch_up, mut indexing) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..settings.rounds {
        let without_run = run_load(
            bin,
            &off.tunnel("/1k", 64, settings.load_duration, false),
            settings.wrk,
        )
        .await?;
        let with_run = run_load(
            bin,
            &on.tunnel("/1k", 64, settings.load_duration, false),
            settings.wrk,
        )
        .await?;
        // What the writer still holds when the load ends, in seconds of
        // writing; the next run waits for it.
        let (_, took) = metrics::capture_caught_up(on.relay_addr).await?;
        // Nor does its search index run into the next capture-off run.
        indexing.push(
            metrics::search_index_caught_up(on.relay_addr)
                .await?
                .as_secs_f64(),
        );
        for (outcome, side) in [(&without_run, "off"), (&with_run, "on")] {
            if outcome.requests == 0 {
                return Err(format!(
                    "the capture-{side} run completed no request ({} errors)",
                    outcome.errors
                ));
            }
        }
        without.push(without_run);
        with.push(with_run);
        catch_up.push(took.as_secs_f64());
    }
    let counts = metrics::CaptureCounts::read(on.relay_addr).await?;
    on.stop().await?;
    off.stop().await?;
    let served: u64 = with.iter().map(|o| o.requests).sum();
    let name = "activity log capture on vs off, 1 KiB GET, 64 connections";
    Ok(vec![
        Row::new(name, "requests/s (off, on)")
            .pair(medians(&without, |o| o.rps), medians(&with, |o| o.rps))
            .ratio_at_least_of(0.9, "off"),
        Row::new(name, "p99 µs (off, on)").pair(
            medians(&without, |o| o.p99_us),
            medians(&with, |o| o.p99_us),
        ),
        Row::new(name, "entries written (on) of requests served (on)")
            .pair(served as f64, counts.written as f64)
            .note(&format!("relay forwarded {}", counts.forwarded)),
        Row::new(name, "captures dropped")
            .only(counts.dropped as f64)
            .at_most(0.0, "dropped"),
        Row::new(name, "captures shed (stored without bodies)").only(counts.shed as f64),
        Row::new(name, "s until all was stored after a run").only(median(&mut catch_up)),
        Row::new(name, "s more until the search index had every entry").only(median(&mut indexing)),
    ])
}

/// The activity log's sustained write rate, measured in a process of its
/// own on the relay's store.
async fn log_writes(bin: &Path, settings: &Settings) -> Result<Vec<Row>, String> {
    let args = [
        "log-writes".to_owned(),
        "--entries".into(),
        settings.log_entries.to_string(),
    ];
    let rate: WriteRate = json_output(bin, &args).await?;
    let name = format!(
        "activity log writes, {} webhooks (1 KiB JSON each way), {} per transaction",
        settings.log_entries,
        crate::log_writes::BATCH
    );
    Ok(vec![
        Row::new(&name, "entries/s")
            .only(rate.entries_per_sec)
            .at_least(100_000.0, "entries/s"),
        Row::new(&name, "KiB on disk per entry").only(rate.bytes_per_entry / 1024.0),
    ])
}

async fn transfers(stack: &Stack, settings: &Settings) -> Result<Vec<Row>, String> {
    let mib = settings.transfer_bytes as f64 / f64::from(1 << 20);
    let name = format!("{mib:.0} MiB transfer");
    let mut rows = Vec::new();
    let (mut relay_peak, mut client_peak) = (0u64, 0u64);
    for upload in [true, false] {
        let (mut direct, mut tunnel) = (Vec::new(), Vec::new());
        for _ in 0..settings.rounds {
            direct.push(transfer(stack, false, settings.transfer_bytes, upload).await?);
            stack.relay.reset_peak();
            stack.client.reset_peak();
            tunnel.push(transfer(stack, true, settings.transfer_bytes, upload).await?);
            relay_peak = relay_peak.max(stack.relay.peak_kib().unwrap_or(0));
            client_peak = client_peak.max(stack.client.peak_kib().unwrap_or(0));
        }
        let speed =
            |runs: &[Transfer]| median(&mut runs.iter().map(|t| mib / t.secs).collect::<Vec<_>>());
        let metric = match (upload, settings.origin) {
            (true, OriginKind::Nginx) => "upload MiB/s (nginx passes it on to the builtin origin)",
            (true, OriginKind::Builtin) => "upload MiB/s",
            (false, _) => "download MiB/s",
        };
        rows.push(
            Row::new(&name, metric)
                .pair(speed(&direct), speed(&tunnel))
                .ratio_at_least(0.55),
        );
    }
    rows.push(
        Row::new(&name, "relay peak RSS MiB")
            .only(relay_peak as f64 / 1024.0)
            .at_most(32.0, "MiB"),
    );
    rows.push(
        Row::new(&name, "client peak RSS MiB")
            .only(client_peak as f64 / 1024.0)
            .at_most(32.0, "MiB"),
    );
    Ok(rows)
}

async fn transfer(
    stack: &Stack,
    through_tunnel: bool,
    bytes: u64,
    upload: bool,
) -> Result<Transfer, String> {
    let (addr, host) = if through_tunnel {
        (stack.relay_addr, stack.tunnel_host.clone())
    } else {
        (stack.origin_addr, stack.origin_addr.to_string())
    };
    transfer_to(&stack.bin, addr, host, bytes, upload).await
}

/// One upload or download through `addr` with the Host header `host`, from
/// a process of its own.
pub(crate) async fn transfer_to(
    bin: &Path,
    addr: SocketAddr,
    host: String,
    bytes: u64,
    upload: bool,
) -> Result<Transfer, String> {
    let args = [
        "transfer".to_owned(),
        "--addr".into(),
        addr.to_string(),
        "--host".into(),
        host,
        "--bytes".into(),
        bytes.to_string(),
        if upload { "--upload" } else { "--download" }.into(),
    ];
    json_output(bin, &args).await
}

/// Restarts the relay in place and times how long until a request through
/// the tunnel succeeds again, measured from the new relay being ready.
async fn reconnects(mut stack: Stack, settings: &Settings) -> Result<Vec<Row>, String> {
    let mut times = Vec::new();
    for _ in 0..settings.restarts {
        stack.relay.terminate().await?;
        let (relay, addr) = start_relay(&stack.bin, stack.relay_addr, Capture::On, &[]).await?;
        let ready = Instant::now();
        stack.relay = relay;
        let spec = stack.tunnel("/1k", 1, Duration::ZERO, true);
        loop {
            if ready.elapsed() > Duration::from_secs(30) {
                return Err("the client did not come back within 30 s of a relay restart".into());
            }
            if probe(addr, &spec.host).await {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        times.push(ready.elapsed().as_secs_f64() * 1000.0);
    }
    stack.stop().await?;
    let name = format!(
        "reconnect after relay restart (median of {})",
        settings.restarts
    );
    Ok(vec![Row::new(&name, "ms until a request succeeds")
        .only(median(&mut times))
        .at_most(1000.0, "ms")])
}

/// Whether one GET through the tunnel answers 200.
pub(crate) async fn probe(addr: SocketAddr, host: &str) -> bool {
    let spec = Spec {
        addr,
        host: host.to_owned(),
        path: "/1k".into(),
        connections: 1,
        duration: Duration::from_millis(1),
        close: true,
    };
    load::builtin(&spec).await.requests > 0
}

/// Opens many idle tunnels on a fresh relay and measures its memory per
/// tunnel and the time to connect them.
async fn idle_tunnels(bin: &Path, settings: &Settings) -> Result<Vec<Row>, String> {
    let (origin, origin_addr) = start_origin(bin).await?;
    let (relay, relay_addr) =
        start_relay(bin, SocketAddr::from(([127, 0, 0, 1], 0)), Capture::On, &[]).await?;
    let before = relay.rss_kib().unwrap_or(0);
    let args = [
        "idle-tunnels".to_owned(),
        "--relay".into(),
        format!("ws://{relay_addr}"),
        "--target".into(),
        format!("http://{origin_addr}"),
        "--count".into(),
        settings.idle_tunnels.to_string(),
    ];
    let mut tunnels = Proc::spawn(&bin.join("ferry-bench"), &args)?;
    let secs: f64 = tunnels
        .wait_line("the idle tunnels", |line| {
            line.strip_prefix("connected in ")?.parse().ok()
        })
        .await?;
    let after = relay.rss_kib().unwrap_or(0);
    tunnels.terminate().await?;
    metrics::no_tunnels(relay_addr).await?;
    // What the allocator gives back takes a moment after the last free.
    tokio::time::sleep(RELEASE_SETTLE).await;
    let closed = relay.rss_kib().unwrap_or(0);
    relay.terminate().await?;
    origin.terminate().await?;
    let count = settings.idle_tunnels;
    let name = format!("{count} idle tunnels on one relay");
    let per_tunnel = |rss: u64| rss.saturating_sub(before) as f64 / count as f64;
    Ok(vec![
        Row::new(&name, "relay KiB per tunnel")
            .only(per_tunnel(after))
            .at_most(16.0, "KiB"),
        Row::new(&name, "seconds to connect all").only(secs),
        Row::new(&name, "relay KiB per tunnel still held after all closed")
            .only(per_tunnel(closed)),
    ])
}

/// How long the relay gets to return memory once the last tunnel is gone:
/// it looks every 5 s.
const RELEASE_SETTLE: Duration = Duration::from_secs(6);

/// Events per second of the dispatcher's steady-rate run.
const STEADY_RATE: u32 = 100;
/// Producers posting events in a throughput run.
pub(crate) const PRODUCERS: usize = 4;
/// What a dispatching relay needs beyond [`start_relay`]'s flags: the
/// receiver is on loopback, which the egress guard refuses by default, and
/// while it holds deliveries for a backlog, their attempts must not time
/// out.
pub(crate) const DISPATCH_FLAGS: &[&str] = &[
    "--egress-allow",
    "127.0.0.0/8",
    "--dispatch-timeout",
    "180s",
];

/// The webhook dispatcher: deliveries per second to a loopback receiver
/// with one webhook and with four, end to end and draining a backlog, and
/// the queue delay at a steady rate, each on a fresh relay (capture on, so
/// every attempt is also logged).
pub async fn dispatcher(bin: &Path, settings: &Settings) -> Result<Vec<Row>, String> {
    let mut rows = Vec::new();
    for (webhooks, backlog) in [(1, false), (4, false), (1, true), (4, true)] {
        let events = settings.dispatch_deliveries / webhooks;
        let (mut runs, mut cpu, mut catch_up, mut retries) =
            (Vec::new(), Vec::new(), Vec::new(), 0);
        for _ in 0..settings.rounds {
            let (throughput, cpu_secs, stored) =
                dispatch_round(bin, webhooks, events, backlog).await?;
            let deliveries = events * webhooks;
            cpu.push(cpu_secs * 1e6 / deliveries as f64);
            catch_up.push(stored.catch_up_secs);
            // Every extra attempt the relay counted, or, should its count
            // miss one, every delivery that arrived twice.
            retries += stored
                .attempts
                .saturating_sub(deliveries as u64)
                .max(throughput.duplicates as u64);
            runs.push(throughput);
        }
        let name = format!(
            "dispatcher{}, {webhooks} webhook{}, {events} events by {PRODUCERS} producers",
            if backlog { " draining a backlog" } else { "" },
            if webhooks == 1 { "" } else { "s" }
        );
        let of =
            |field: fn(&Throughput) -> f64| median(&mut runs.iter().map(field).collect::<Vec<_>>());
        let (events_per_sec, deliveries_per_sec) =
            (of(|t| t.events_per_sec), of(|t| t.deliveries_per_sec));
        rows.extend(if backlog {
            [
                Row::new(&name, "events/s accepted, receiver holding").only(events_per_sec),
                Row::new(&name, "deliveries/s from the receiver's first answer")
                    .only(deliveries_per_sec),
            ]
        } else {
            [
                Row::new(&name, "events/s accepted").only(events_per_sec),
                Row::new(&name, "deliveries/s delivered")
                    .only(deliveries_per_sec)
                    .at_least(5000.0, "deliveries/s"),
            ]
        });
        rows.extend([
            Row::new(&name, "relay CPU µs per delivery, intake included").only(median(&mut cpu)),
            Row::new(&name, "s after the last arrival until all were stored")
                .only(median(&mut catch_up)),
            Row::new(&name, "attempts beyond one per delivery (all rounds)")
                .only(retries as f64)
                .at_most(0.0, "attempts"),
        ]);
    }
    let (relay, addr) = start_relay(
        bin,
        SocketAddr::from(([127, 0, 0, 1], 0)),
        Capture::On,
        DISPATCH_FLAGS,
    )
    .await?;
    let mut receiver = Receiver::start().await?;
    dispatch::create_webhooks(addr, &receiver, 1).await?;
    let delay =
        dispatch::queue_delay(addr, &mut receiver, STEADY_RATE, settings.dispatch_steady).await?;
    relay.terminate().await?;
    let name = format!(
        "dispatcher queue delay, {STEADY_RATE} events/s for {} s, 1 webhook",
        settings.dispatch_steady.as_secs_f64()
    );
    rows.extend([
        Row::new(&name, "ms from 202 to arrival, p50").only(delay.accepted_p50_ms),
        Row::new(&name, "ms from 202 to arrival, p99").only(delay.accepted_p99_ms),
        Row::new(&name, "ms from POST to arrival, p50").only(delay.sent_p50_ms),
        Row::new(&name, "ms from POST to arrival, p99").only(delay.sent_p99_ms),
        Row::new(&name, "slowest 202, ms").only(delay.post_max_ms),
    ]);
    Ok(rows)
}

/// One throughput run on a fresh relay: what it measured, the relay's CPU
/// seconds from the first POST to the last arrival, and what it stored.
async fn dispatch_round(
    bin: &Path,
    webhooks: usize,
    events: usize,
    backlog: bool,
) -> Result<(Throughput, f64, Stored), String> {
    let (relay, addr) = start_relay(
        bin,
        SocketAddr::from(([127, 0, 0, 1], 0)),
        Capture::On,
        DISPATCH_FLAGS,
    )
    .await?;
    let mut receiver = Receiver::start().await?;
    let ids = dispatch::create_webhooks(addr, &receiver, webhooks).await?;
    let before = relay.cpu_secs().unwrap_or(0.0);
    let throughput =
        dispatch::throughput(&[addr], &mut receiver, webhooks, events, PRODUCERS, backlog).await?;
    let cpu = relay.cpu_secs().unwrap_or(0.0) - before;
    let stored = dispatch::stored(&[addr], &ids, events * webhooks).await?;
    relay.terminate().await?;
    Ok((throughput, cpu, stored))
}
