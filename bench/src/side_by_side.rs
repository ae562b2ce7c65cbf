//! `--peers`: Ferry's plain HTTP scenarios with bore and rathole side by
//! side: the same origin, the same rounds, each round running direct, Ferry,
//! bore and rathole one after another, and medians of the rounds.

use std::net::SocketAddr;
use std::path::Path;

use crate::load::{Outcome, Spec, Transfer};
use crate::metrics;
use crate::peers::{self, Peer, Tunnel};
use crate::scenarios::{
    median, medians, run_load_on, start_client, start_relay, transfer_to, Origin, OriginKind, Row,
    Settings,
};

/// Ferry's goals against direct and its peers (issue 11).
const FERRY_CPU_US_PER_REQUEST: f64 = 20.0;
const FERRY_GET_RATIO: f64 = 0.48;
const FERRY_ADDED_P50_US: f64 = 35.0;
const FERRY_NEW_CONNECTION_RATIO: f64 = 0.35;
const FERRY_TRANSFER_VS_BORE: f64 = 1.2;
const FERRY_RSS_MIB: f64 = 32.0;
/// The CPU the `--threads` rows pin the load generator to, leaving the
/// other for the relay.
const LOAD_CPU: usize = 1;

/// One tunnel in the comparison.
struct Contender {
    /// Its name in the rows.
    name: &'static str,
    /// Its processes and public address.
    tunnel: Tunnel,
    /// The Host header requests carry: Ferry routes on it, TCP tunnels
    /// pass it to the origin.
    host: String,
    /// Ferry's relay, whose activity log each run waits for.
    relay: Option<SocketAddr>,
}

impl Contender {
    async fn ferry(
        bin: &Path,
        name: &'static str,
        origin: SocketAddr,
        extra: &[&str],
    ) -> Result<Self, String> {
        // As it ships: capture on.
        let (relay, relay_addr) = start_relay(
            bin,
            SocketAddr::from(([127, 0, 0, 1], 0)),
            crate::scenarios::Capture::On,
            extra,
        )
        .await?;
        let (client, host) = start_client(bin, relay_addr, origin).await?;
        Ok(Self {
            name,
            tunnel: Tunnel {
                server: relay,
                client,
                addr: relay_addr,
            },
            host,
            relay: Some(relay_addr),
        })
    }

    async fn peer(peer: Peer, binary: &Path, origin: SocketAddr) -> Result<Self, String> {
        Ok(Self {
            name: peer.name(),
            tunnel: peers::start(peer, binary, origin).await?,
            host: origin.to_string(),
            relay: None,
        })
    }

    /// Waits until Ferry's relay has stored and indexed what the run left
    /// queued: that work is part of what the run cost, and would otherwise
    /// take CPU from the next contender's run.
    async fn settle(&self) -> Result<(), String> {
        if let Some(relay) = self.relay {
            metrics::capture_caught_up(relay).await?;
            metrics::search_index_caught_up(relay).await?;
        }
        Ok(())
    }
}

/// What one load run measured, and the CPU the tunnel used for it.
struct Run {
    outcome: Outcome,
    /// CPU seconds of the tunnel's two processes, until Ferry's relay had
    /// also stored and indexed the run's exchanges; 0 for direct runs.
    cpu_secs: f64,
    /// Of which after the load ended: Ferry's log catching up.
    settling_secs: f64,
}

/// Installs the peers, then runs every scenario with them.
pub async fn run(bin: &Path, settings: &Settings) -> Result<Vec<Row>, String> {
    let cache = peers::cache_dir()?;
    let mut binaries = Vec::new();
    for peer in Peer::ALL {
        binaries.push((peer, peers::install(peer, &cache).await?));
    }
    let origin = Origin::start(bin, settings).await?;
    let mut contenders = vec![Contender::ferry(bin, "ferry", origin.addr, &[]).await?];
    for (peer, binary) in &binaries {
        contenders.push(Contender::peer(*peer, binary, origin.addr).await?);
    }
    let mut rows = Vec::new();
    rows.extend(get_64(bin, settings, origin.addr, &contenders).await?);
    rows.extend(one_connection(bin, settings, origin.addr, &contenders).await?);
    rows.extend(new_connections(bin, settings, origin.addr, &contenders).await?);
    rows.extend(transfers(bin, settings, origin.addr, &contenders).await?);
    for contender in contenders {
        contender.tunnel.stop().await?;
    }
    rows.extend(threads(bin, settings, origin.addr).await?);
    origin.stop().await?;
    Ok(rows)
}

/// `rounds` rounds of direct then each contender in turn; per round, the
/// direct run first and then one run per contender.
async fn rounds(
    bin: &Path,
    settings: &Settings,
    origin: SocketAddr,
    contenders: &[Contender],
    (path, connections, close): (&str, usize, bool),
    cpu: Option<usize>,
) -> Result<Vec<Vec<Run>>, String> {
    let spec = |addr: SocketAddr, host: String| Spec {
        addr,
        host,
        path: path.to_owned(),
        connections,
        duration: settings.load_duration,
        close,
    };
    let mut runs: Vec<Vec<Run>> = (0..=contenders.len()).map(|_| Vec::new()).collect();
    for _ in 0..settings.rounds {
        let direct = run_load_on(bin, &spec(origin, origin.to_string()), settings.wrk, cpu).await?;
        check(&direct, "direct", path)?;
        runs[0].push(Run {
            outcome: direct,
            cpu_secs: 0.0,
            settling_secs: 0.0,
        });
        for (i, contender) in contenders.iter().enumerate() {
            let before = contender.tunnel.cpu_secs();
            let outcome = run_load_on(
                bin,
                &spec(contender.tunnel.addr, contender.host.clone()),
                settings.wrk,
                cpu,
            )
            .await?;
            let at_end = contender.tunnel.cpu_secs();
            contender.settle().await?;
            let cpu_secs = contender.tunnel.cpu_secs() - before;
            check(&outcome, contender.name, path)?;
            runs[i + 1].push(Run {
                outcome,
                cpu_secs,
                settling_secs: cpu_secs - (at_end - before),
            });
        }
    }
    Ok(runs)
}

fn check(outcome: &Outcome, side: &str, path: &str) -> Result<(), String> {
    if outcome.requests == 0 {
        return Err(format!(
            "the {side} run of {path} completed no request ({} errors)",
            outcome.errors
        ));
    }
    Ok(())
}

fn outcomes(runs: &[Run]) -> Vec<Outcome> {
    runs.iter().map(|run| run.outcome.clone()).collect()
}

async fn get_64(
    bin: &Path,
    settings: &Settings,
    origin: SocketAddr,
    contenders: &[Contender],
) -> Result<Vec<Row>, String> {
    let name = "1 KiB GET, 64 connections";
    let runs = rounds(bin, settings, origin, contenders, ("/1k", 64, false), None).await?;
    let direct = medians(&outcomes(&runs[0]), |o| o.rps);
    let mut rate_rows: Vec<Row> = contenders
        .iter()
        .zip(&runs[1..])
        .map(|(c, runs)| {
            Row::new(name, &format!("requests/s, {}", c.name))
                .pair(direct, medians(&outcomes(runs), |o| o.rps))
        })
        .collect();
    // Ferry (the first) above both peers as well as at its ratio.
    let peer_ratios: Vec<f64> = rate_rows[1..].iter().filter_map(|r| r.ratio).collect();
    if let Some(ferry) = rate_rows.first_mut() {
        ferry.target = format!(
            ">= {FERRY_GET_RATIO:.2}x direct, above {}",
            contenders[1..]
                .iter()
                .map(|c| c.name)
                .collect::<Vec<_>>()
                .join(" and ")
        );
        ferry.met = ferry
            .ratio
            .map(|r| r >= FERRY_GET_RATIO && peer_ratios.iter().all(|&p| r > p));
    }
    let mut rows = rate_rows;
    for (c, runs) in contenders.iter().zip(&runs[1..]) {
        let mut per_request: Vec<f64> = runs
            .iter()
            .map(|run| run.cpu_secs * 1e6 / run.outcome.requests as f64)
            .collect();
        let row = Row::new(
            name,
            &format!("CPU µs per request, {} (server + client)", c.name),
        )
        .only(median(&mut per_request));
        rows.push(if c.relay.is_some() {
            row.at_most(FERRY_CPU_US_PER_REQUEST, "µs")
        } else {
            row
        });
        if c.relay.is_some() {
            let mut settling: Vec<f64> = runs
                .iter()
                .map(|run| run.settling_secs * 1e6 / run.outcome.requests as f64)
                .collect();
            rows.push(
                Row::new(
                    name,
                    &format!(
                        "of which after the load, {}'s log storing and indexing",
                        c.name
                    ),
                )
                .only(median(&mut settling)),
            );
        }
    }
    Ok(rows)
}

async fn one_connection(
    bin: &Path,
    settings: &Settings,
    origin: SocketAddr,
    contenders: &[Contender],
) -> Result<Vec<Row>, String> {
    let name = "1 KiB GET, one connection";
    let runs = rounds(bin, settings, origin, contenders, ("/1k", 1, false), None).await?;
    let direct = medians(&outcomes(&runs[0]), |o| o.p50_us);
    let mut rows = Vec::new();
    for (c, runs) in contenders.iter().zip(&runs[1..]) {
        let p50 = medians(&outcomes(runs), |o| o.p50_us);
        rows.push(Row::new(name, &format!("p50 µs, {}", c.name)).pair(direct, p50));
        let added = Row::new(name, &format!("µs added at p50, {}", c.name)).only(p50 - direct);
        rows.push(if c.relay.is_some() {
            added.at_most(FERRY_ADDED_P50_US, "µs")
        } else {
            added
        });
    }
    Ok(rows)
}

async fn new_connections(
    bin: &Path,
    settings: &Settings,
    origin: SocketAddr,
    contenders: &[Contender],
) -> Result<Vec<Row>, String> {
    let name = "new connection per request, 64 concurrent";
    let runs = rounds(bin, settings, origin, contenders, ("/1k", 64, true), None).await?;
    let direct = medians(&outcomes(&runs[0]), |o| o.rps);
    Ok(contenders
        .iter()
        .zip(&runs[1..])
        .map(|(c, runs)| {
            let row = Row::new(name, &format!("requests/s, {}", c.name))
                .pair(direct, medians(&outcomes(runs), |o| o.rps));
            if c.relay.is_some() {
                row.ratio_at_least(FERRY_NEW_CONNECTION_RATIO)
            } else {
                row
            }
        })
        .collect())
}

async fn transfers(
    bin: &Path,
    settings: &Settings,
    origin: SocketAddr,
    contenders: &[Contender],
) -> Result<Vec<Row>, String> {
    let mib = settings.transfer_bytes as f64 / f64::from(1 << 20);
    let name = format!("{mib:.0} MiB transfer");
    let speed =
        |runs: &[Transfer]| median(&mut runs.iter().map(|t| mib / t.secs).collect::<Vec<_>>());
    let mut rows = Vec::new();
    let (mut relay_peak, mut client_peak) = (0u64, 0u64);
    for upload in [true, false] {
        let way = if upload { "upload" } else { "download" };
        let via = if upload && settings.origin == OriginKind::Nginx {
            " (nginx passes it on to the builtin origin)"
        } else {
            ""
        };
        let mut runs: Vec<Vec<Transfer>> = (0..=contenders.len()).map(|_| Vec::new()).collect();
        for _ in 0..settings.rounds {
            runs[0].push(
                transfer_to(
                    bin,
                    origin,
                    origin.to_string(),
                    settings.transfer_bytes,
                    upload,
                )
                .await?,
            );
            for (i, c) in contenders.iter().enumerate() {
                let ferry = c.relay.is_some();
                if ferry {
                    c.tunnel.server.reset_peak();
                    c.tunnel.client.reset_peak();
                }
                runs[i + 1].push(
                    transfer_to(
                        bin,
                        c.tunnel.addr,
                        c.host.clone(),
                        settings.transfer_bytes,
                        upload,
                    )
                    .await
                    .map_err(|e| format!("{way} through {}: {e}", c.name))?,
                );
                if ferry {
                    relay_peak = relay_peak.max(c.tunnel.server.peak_kib().unwrap_or(0));
                    client_peak = client_peak.max(c.tunnel.client.peak_kib().unwrap_or(0));
                    c.settle().await?;
                }
            }
        }
        let direct = speed(&runs[0]);
        let speeds: Vec<f64> = runs[1..].iter().map(|r| speed(r)).collect();
        for (c, &tunnel) in contenders.iter().zip(&speeds) {
            rows.push(
                Row::new(&name, &format!("{way} MiB/s, {}{via}", c.name)).pair(direct, tunnel),
            );
        }
        // Ferry against bore's figure of the same run.
        let bore = contenders.iter().position(|c| c.name == Peer::Bore.name());
        if let (Some(&ferry), Some(bore)) = (speeds.first(), bore) {
            rows.push(
                Row::new(&name, &format!("{way} MiB/s (bore, ferry){via}"))
                    .pair(speeds[bore], ferry)
                    .ratio_at_least_of(FERRY_TRANSFER_VS_BORE, "bore"),
            );
        }
    }
    rows.push(
        Row::new(&name, "ferry relay peak RSS MiB")
            .only(relay_peak as f64 / 1024.0)
            .at_most(FERRY_RSS_MIB, "MiB"),
    );
    rows.push(
        Row::new(&name, "ferry client peak RSS MiB")
            .only(client_peak as f64 / 1024.0)
            .at_most(FERRY_RSS_MIB, "MiB"),
    );
    Ok(rows)
}

/// Ferry's relay at `--threads 1` and `--threads 2`, the load pinned to one
/// CPU where `taskset` and a second CPU are there.
async fn threads(bin: &Path, settings: &Settings, origin: SocketAddr) -> Result<Vec<Row>, String> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let taskset = std::process::Command::new("taskset")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    let cpu = (cores > LOAD_CPU && taskset).then_some(LOAD_CPU);
    let contenders = vec![
        Contender::ferry(bin, "ferry", origin, &["--threads", "1"]).await?,
        Contender::ferry(bin, "ferry", origin, &["--threads", "2"]).await?,
    ];
    let runs = rounds(bin, settings, origin, &contenders, ("/1k", 64, false), cpu).await?;
    for contender in contenders {
        contender.tunnel.stop().await?;
    }
    let direct = medians(&outcomes(&runs[0]), |o| o.rps);
    let note = match cpu {
        Some(cpu) => format!(
            "load pinned to cpu {cpu} (taskset), direct runs too; relay, client and origin unpinned on {cores} cores"
        ),
        None => format!("nothing pinned (taskset or a second core missing); {cores} cores"),
    };
    Ok([1, 2]
        .iter()
        .zip(&runs[1..])
        .map(|(threads, runs)| {
            Row::new(
                &format!("1 KiB GET, 64 connections, relay --threads {threads}"),
                "requests/s, ferry",
            )
            .pair(direct, medians(&outcomes(runs), |o| o.rps))
            .note(&note)
        })
        .collect())
}
