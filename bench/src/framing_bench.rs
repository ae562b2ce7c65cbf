//! `ferry-bench framing`: the light framing against HTTP/2, each as a
//! proto-relay and proto-client pair in front of the same origin, with the
//! same load sent direct, through `h2` and through `light` in turn.
//!
//! Reports requests per second, latency, and the CPU time the two
//! prototype processes spent per request (per MiB for the upload).

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use crate::load::{Outcome, Spec, Transfer};
use crate::procs::Proc;
use crate::proto::Framing;
use crate::scenarios::{json_output, median, run_load};

/// How a run is sized.
struct Sizing {
    /// Rounds of direct, h2, light.
    rounds: usize,
    /// Each load run.
    duration: Duration,
    /// The upload's size.
    upload: u64,
    /// Whether wrk drives the load.
    wrk: bool,
}

/// One prototype tunnel: its two processes and its public address.
struct Tunnel {
    relay: Proc,
    client: Proc,
    public: SocketAddr,
}

impl Tunnel {
    async fn start(bin: &Path, framing: Framing, origin: SocketAddr) -> Result<Self, String> {
        let name = match framing {
            Framing::H2 => "h2",
            Framing::Light => "light",
        };
        let exe = bin.join("ferry-bench");
        let mut relay = Proc::spawn(
            &exe,
            &["proto-relay".into(), "--framing".into(), name.into()],
        )?;
        let (tunnel, public) = relay
            .wait_line("the proto-relay", |line| {
                let mut parts = line.strip_prefix("listening ")?.split(' ');
                let tunnel: SocketAddr = parts.next()?.parse().ok()?;
                Some((tunnel, parts.next()?.parse::<SocketAddr>().ok()?))
            })
            .await?;
        let args = [
            "proto-client".into(),
            "--framing".into(),
            name.into(),
            "--relay".into(),
            tunnel.to_string(),
            "--origin".into(),
            origin.to_string(),
        ];
        let mut client = Proc::spawn(&exe, &args)?;
        client
            .wait_line("the proto-client", |line| {
                (line == "connected").then_some(())
            })
            .await?;
        Ok(Self {
            relay,
            client,
            public,
        })
    }

    /// CPU seconds both processes have used so far.
    fn cpu(&self) -> Result<f64, String> {
        match (self.relay.cpu_secs(), self.client.cpu_secs()) {
            (Some(relay), Some(client)) => Ok(relay + client),
            _ => Err("cannot read the prototypes' CPU time".into()),
        }
    }

    async fn stop(self) -> Result<(), String> {
        self.client.terminate().await?;
        self.relay.terminate().await
    }
}

/// The figures of one load run through one path.
#[derive(Default)]
struct Runs {
    outcomes: Vec<Outcome>,
    /// Prototype CPU µs per request, per run (none for direct).
    cpu_us: Vec<f64>,
}

impl Runs {
    fn median(&self, field: fn(&Outcome) -> f64) -> f64 {
        median(&mut self.outcomes.iter().map(field).collect::<Vec<_>>())
    }
}

/// Runs the comparison and prints its table.
pub async fn run(quick: bool, wrk: bool) -> Result<(), String> {
    let bin = crate::procs::bin_dir()?;
    let wrk = wrk
        && !quick
        && std::process::Command::new("wrk")
            .arg("--version")
            .output()
            .is_ok();
    let sizing = if quick {
        Sizing {
            rounds: 3,
            duration: Duration::from_millis(300),
            upload: 16 << 20,
            wrk,
        }
    } else {
        Sizing {
            rounds: 3,
            duration: Duration::from_secs(10),
            upload: 512 << 20,
            wrk,
        }
    };
    let mut origin = Proc::spawn(&bin.join("ferry-bench"), &["origin".into()])?;
    let origin_addr: SocketAddr = origin
        .wait_line("the origin", |line| {
            line.strip_prefix("listening ")?.parse().ok()
        })
        .await?;
    let h2 = Tunnel::start(&bin, Framing::H2, origin_addr).await?;
    let light = Tunnel::start(&bin, Framing::Light, origin_addr).await?;
    println!(
        "load by {}; {} rounds of {:?}; direct, h2, light in turn\n",
        if sizing.wrk {
            "wrk"
        } else {
            "the built-in generator"
        },
        sizing.rounds,
        sizing.duration
    );
    println!("| load | metric | direct | h2 | light | light/h2 |");
    println!("|---|---|---:|---:|---:|---:|");
    for connections in [64, 1] {
        let mut runs: [Runs; 3] = Default::default();
        for _ in 0..sizing.rounds {
            let paths = [
                (origin_addr, None),
                (h2.public, Some(&h2)),
                (light.public, Some(&light)),
            ];
            for (i, (addr, tunnel)) in paths.into_iter().enumerate() {
                let spec = Spec {
                    addr,
                    host: addr.to_string(),
                    path: "/1k".into(),
                    connections,
                    duration: sizing.duration,
                    close: false,
                };
                let before = tunnel.map(Tunnel::cpu).transpose()?;
                let outcome = run_load(&bin, &spec, sizing.wrk).await?;
                if outcome.requests == 0 || outcome.errors > 0 {
                    return Err(format!(
                        "{connections}-connection run {i} of {addr}: {} requests, {} errors",
                        outcome.requests, outcome.errors
                    ));
                }
                if let (Some(before), Some(tunnel)) = (before, tunnel) {
                    let spent = tunnel.cpu()? - before;
                    runs[i].cpu_us.push(spent * 1e6 / outcome.requests as f64);
                }
                runs[i].outcomes.push(outcome);
            }
        }
        let load = format!("1 KiB GET, {connections} conn");
        let rps: Vec<f64> = runs.iter().map(|r| r.median(|o| o.rps)).collect();
        row(&load, "requests/s", Some(rps[0]), rps[1], rps[2]);
        row(
            &load,
            "ratio vs direct",
            None,
            rps[1] / rps[0],
            rps[2] / rps[0],
        );
        let p50: Vec<f64> = runs.iter().map(|r| r.median(|o| o.p50_us)).collect();
        row(&load, "p50 µs", Some(p50[0]), p50[1], p50[2]);
        if connections == 1 {
            row(
                &load,
                "p50 µs added",
                None,
                p50[1] - p50[0],
                p50[2] - p50[0],
            );
        }
        let p99: Vec<f64> = runs.iter().map(|r| r.median(|o| o.p99_us)).collect();
        row(&load, "p99 µs", Some(p99[0]), p99[1], p99[2]);
        row(
            &load,
            "CPU µs/request (relay+client)",
            None,
            median(&mut runs[1].cpu_us.clone()),
            median(&mut runs[2].cpu_us.clone()),
        );
    }
    upload(&bin, &sizing, origin_addr, [&h2, &light]).await?;
    h2.stop().await?;
    light.stop().await?;
    origin.terminate().await
}

fn row(load: &str, metric: &str, direct: Option<f64>, h2: f64, light: f64) {
    let number = |v: f64| {
        if v.abs() >= 100.0 {
            format!("{v:.0}")
        } else {
            format!("{v:.2}")
        }
    };
    println!(
        "| {load} | {metric} | {} | {} | {} | {:.2} |",
        direct.map_or_else(String::new, number),
        number(h2),
        number(light),
        light / h2
    );
}

/// One upload through each path, in turn, `rounds` times.
async fn upload(
    bin: &Path,
    sizing: &Sizing,
    origin: SocketAddr,
    tunnels: [&Tunnel; 2],
) -> Result<(), String> {
    let (mut speed, mut cpu) = (
        [Vec::new(), Vec::new(), Vec::new()],
        [Vec::new(), Vec::new()],
    );
    let mib = sizing.upload as f64 / f64::from(1 << 20);
    for _ in 0..sizing.rounds {
        let paths = [
            (origin, None),
            (tunnels[0].public, Some(tunnels[0])),
            (tunnels[1].public, Some(tunnels[1])),
        ];
        for (i, (addr, tunnel)) in paths.into_iter().enumerate() {
            let before = tunnel.map(Tunnel::cpu).transpose()?;
            let args = [
                "transfer".to_owned(),
                "--addr".into(),
                addr.to_string(),
                "--host".into(),
                addr.to_string(),
                "--bytes".into(),
                sizing.upload.to_string(),
                "--upload".into(),
            ];
            let done: Transfer = json_output(bin, &args).await?;
            speed[i].push(mib / done.secs);
            if let (Some(before), Some(tunnel)) = (before, tunnel) {
                cpu[i - 1].push((tunnel.cpu()? - before) * 1e3 / mib);
            }
        }
    }
    let load = format!("{} MiB upload", sizing.upload >> 20);
    let speeds = speed.map(|mut s| median(&mut s));
    row(&load, "MiB/s", Some(speeds[0]), speeds[1], speeds[2]);
    let [mut h2, mut light] = cpu;
    row(
        &load,
        "CPU ms/MiB (relay+client)",
        None,
        median(&mut h2),
        median(&mut light),
    );
    Ok(())
}
