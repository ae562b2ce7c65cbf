//! Requests through a fleet of relays on one PostgreSQL database (part of
//! `--fleet`): a 1 KiB GET straight to the origin, through the relay
//! holding the tunnel, through another relay of the fleet (which hands
//! each request to the holder over the cluster link), and spread over all
//! of them; with every relay's CPU per request, so that the extra hop's
//! cost shows.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::fleet::FLEET;
use crate::load::{Outcome, Spec};
use crate::metrics;
use crate::peers::free_port;
use crate::pg::PgServer;
use crate::procs::Proc;
use crate::scenarios::{
    median, medians, probe, run_load, start_client, start_relay, Capture, Origin, Row, Settings,
};

/// The secret the fleet's relays share on their cluster links.
const CLUSTER_SECRET: &str = "ferry-bench-cluster-secret";
/// Concurrent connections of the request runs, as in the single relay's
/// 1 KiB GET scenario.
const CONNECTIONS: usize = 64;
/// How long a relay of the fleet may take to route the tunnel's name to
/// its holder once the client is connected.
const ROUTED_WAIT: Duration = Duration::from_secs(30);
/// How long to wait between two probes while the name is not yet routed.
const ROUTED_POLL: Duration = Duration::from_millis(5);

/// The flags that make a relay on `database` a member of the fleet, its
/// cluster link listening on `cluster`.
fn cluster_flags(database: &str, cluster: SocketAddr) -> Vec<String> {
    [
        "--database-url",
        database,
        "--cluster-listen",
        &cluster.to_string(),
        "--advertise-url",
        &format!("http://{cluster}"),
        "--cluster-secret",
        CLUSTER_SECRET,
    ]
    .map(str::to_owned)
    .to_vec()
}

/// The Host of tunnel `name` at the relay listening on `relay`.
fn host_at(name: &str, relay: SocketAddr) -> String {
    format!("{name}.localhost:{}", relay.port())
}

/// The running fleet: its relays, the tunnel the first one holds, and the
/// origin behind it.
struct Fleet {
    relays: Vec<Proc>,
    addrs: Vec<SocketAddr>,
    /// The tunnel's name.
    name: String,
    origin: SocketAddr,
}

/// Where a request run sends its load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Entry {
    /// Straight to the origin.
    Direct,
    /// To the relay holding the tunnel.
    Holder,
    /// To another relay, which forwards to the holder.
    Forwarded,
    /// A third of the connections to each relay.
    Spread,
}

/// One request run: the load's outcome (summed over the relays when
/// spread), and the CPU seconds the relays and the database used.
struct Served {
    outcome: Outcome,
    relay_cpu: f64,
    database_cpu: f64,
}

impl Served {
    fn relay_us(&self) -> f64 {
        self.relay_cpu * 1e6 / self.outcome.requests.max(1) as f64
    }

    fn database_us(&self) -> f64 {
        self.database_cpu * 1e6 / self.outcome.requests.max(1) as f64
    }
}

/// Requests/s of a 1 KiB GET at [`CONNECTIONS`] connections: direct, at
/// the holder, at another relay of the fleet, and spread over the fleet.
pub(crate) async fn requests(
    bin: &Path,
    settings: &Settings,
    server: &PgServer,
) -> Result<Vec<Row>, String> {
    let origin = Origin::start(bin, settings).await?;
    let database = server.create("ferry_requests").await?;
    let mut relays = Vec::with_capacity(FLEET);
    let mut addrs = Vec::with_capacity(FLEET);
    for _ in 0..FLEET {
        let flags = cluster_flags(&database, free_port()?);
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        let (relay, addr) = start_relay(
            bin,
            SocketAddr::from(([127, 0, 0, 1], 0)),
            Capture::On,
            &flags,
        )
        .await?;
        relays.push(relay);
        addrs.push(addr);
    }
    let (client, holder_host) = start_client(bin, addrs[0], origin.addr).await?;
    let name = holder_host
        .split_once('.')
        .map(|(name, _)| name.to_owned())
        .ok_or_else(|| format!("the client printed a host without a name: {holder_host}"))?;
    routed(&addrs, &name).await?;
    let fleet = Fleet {
        relays,
        addrs,
        name,
        origin: origin.addr,
    };
    let mut runs: [Vec<Served>; 4] = Default::default();
    let entries = [
        Entry::Direct,
        Entry::Holder,
        Entry::Forwarded,
        Entry::Spread,
    ];
    for _ in 0..settings.rounds {
        for (entry, runs) in entries.into_iter().zip(&mut runs) {
            let served = serve(bin, settings, entry, &fleet, server).await?;
            // The activity log's writes of one run stay out of the next.
            metrics::fleet_caught_up(&fleet.addrs).await?;
            if served.outcome.requests == 0 || served.outcome.errors > 0 {
                return Err(format!(
                    "the {entry:?} run of the fleet served {} requests with {} errors",
                    served.outcome.requests, served.outcome.errors
                ));
            }
            runs.push(served);
        }
    }
    client.terminate().await?;
    for relay in fleet.relays {
        relay.terminate().await?;
    }
    origin.stop().await?;
    Ok(request_rows(&runs))
}

/// Waits until every relay of the fleet answers for tunnel `name`.
async fn routed(addrs: &[SocketAddr], name: &str) -> Result<(), String> {
    let started = Instant::now();
    for &addr in addrs {
        while !probe(addr, &host_at(name, addr)).await {
            if started.elapsed() > ROUTED_WAIT {
                return Err(format!(
                    "the relay on {addr} did not route tunnel {name} within {ROUTED_WAIT:?}"
                ));
            }
            tokio::time::sleep(ROUTED_POLL).await;
        }
    }
    Ok(())
}

/// One request run entering at `entry`.
async fn serve(
    bin: &Path,
    settings: &Settings,
    entry: Entry,
    fleet: &Fleet,
    server: &PgServer,
) -> Result<Served, String> {
    let (origin, addrs, name) = (fleet.origin, &fleet.addrs, fleet.name.as_str());
    let spec = |addr: SocketAddr, host: String, connections: usize| Spec {
        addr,
        host,
        path: "/1k".to_owned(),
        connections,
        duration: settings.load_duration,
        close: false,
    };
    let specs = match entry {
        Entry::Direct => vec![spec(origin, origin.to_string(), CONNECTIONS)],
        Entry::Holder => vec![spec(addrs[0], host_at(name, addrs[0]), CONNECTIONS)],
        Entry::Forwarded => vec![spec(addrs[1], host_at(name, addrs[1]), CONNECTIONS)],
        Entry::Spread => split(CONNECTIONS, addrs.len())
            .into_iter()
            .zip(addrs)
            .map(|(connections, &addr)| spec(addr, host_at(name, addr), connections))
            .collect(),
    };
    let cpu = |relays: &[Proc]| relays.iter().filter_map(Proc::cpu_secs).sum::<f64>();
    let (relays_before, database_before) = (cpu(&fleet.relays), server.cpu_secs());
    let outcomes =
        futures_util::future::try_join_all(specs.iter().map(|s| run_load(bin, s, settings.wrk)))
            .await?;
    let (relay_cpu, database_cpu) = (
        cpu(&fleet.relays) - relays_before,
        server.cpu_secs() - database_before,
    );
    Ok(Served {
        outcome: sum(&outcomes),
        relay_cpu,
        database_cpu,
    })
}

/// `total` connections over `parts` loads, as even as can be.
fn split(total: usize, parts: usize) -> Vec<usize> {
    let parts = parts.max(1);
    (0..parts)
        .map(|i| total / parts + usize::from(i < total % parts))
        .collect()
}

/// Loads that ran side by side as one: requests, errors and rates add up;
/// the latencies are the worst of them.
fn sum(outcomes: &[Outcome]) -> Outcome {
    Outcome {
        requests: outcomes.iter().map(|o| o.requests).sum(),
        errors: outcomes.iter().map(|o| o.errors).sum(),
        rps: outcomes.iter().map(|o| o.rps).sum(),
        p50_us: outcomes.iter().map(|o| o.p50_us).fold(0.0, f64::max),
        p99_us: outcomes.iter().map(|o| o.p99_us).fold(0.0, f64::max),
    }
}

fn request_rows(runs: &[Vec<Served>; 4]) -> Vec<Row> {
    let [direct, holder, forwarded, spread] = runs;
    let outcomes = |runs: &[Served]| runs.iter().map(|s| s.outcome.clone()).collect::<Vec<_>>();
    let rps = |runs: &[Served]| medians(&outcomes(runs), |o| o.rps);
    let p99 = |runs: &[Served]| medians(&outcomes(runs), |o| o.p99_us);
    let cpu = |runs: &[Served], field: fn(&Served) -> f64| {
        median(&mut runs.iter().map(field).collect::<Vec<_>>())
    };
    let name = format!("fleet: 1 KiB GET, {CONNECTIONS} connections, {FLEET} relays on PostgreSQL");
    vec![
        Row::new(&name, "requests/s (direct, at the holding relay)")
            .pair(rps(direct), rps(holder))
            .note("(b)/(a)"),
        Row::new(&name, "requests/s (at the holder, at another relay)")
            .pair(rps(holder), rps(forwarded))
            .note("(c)/(b): the extra hop"),
        Row::new(
            &name,
            &format!("requests/s (at the holder, spread over {FLEET})"),
        )
        .pair(rps(holder), rps(spread))
        .note("(d)/(b)"),
        Row::new(&name, "p99 µs (at the holder, at another relay)")
            .pair(p99(holder), p99(forwarded)),
        Row::new(
            &name,
            "relays' CPU µs per request (at the holder, at another relay)",
        )
        .pair(
            cpu(holder, Served::relay_us),
            cpu(forwarded, Served::relay_us),
        )
        .note("all relays; the difference is the hop's cost"),
        Row::new(
            &name,
            &format!("relays' CPU µs per request (at the holder, spread over {FLEET})"),
        )
        .pair(cpu(holder, Served::relay_us), cpu(spread, Served::relay_us)),
        Row::new(
            &name,
            "PostgreSQL CPU µs per request (at the holder, at another relay)",
        )
        .pair(
            cpu(holder, Served::database_us),
            cpu(forwarded, Served::database_us),
        )
        .note("log writes; at another relay also a holder lookup per request"),
    ]
}

#[cfg(test)]
mod tests {
    use super::{cluster_flags, host_at, split, sum};
    use crate::load::Outcome;

    #[test]
    fn a_fleet_member_advertises_its_own_cluster_link() {
        let cluster = std::net::SocketAddr::from(([127, 0, 0, 1], 7070));
        let flags = cluster_flags("postgres://ferry@127.0.0.1:1/ferry_requests", cluster);
        let value = |flag: &str| {
            let at = flags.iter().position(|f| f == flag)?;
            flags.get(at + 1).map(String::as_str)
        };
        assert_eq!(
            value("--database-url"),
            Some("postgres://ferry@127.0.0.1:1/ferry_requests")
        );
        assert_eq!(value("--cluster-listen"), Some("127.0.0.1:7070"));
        assert_eq!(value("--advertise-url"), Some("http://127.0.0.1:7070"));
        // The relay refuses a secret shorter than 16 characters.
        assert!(value("--cluster-secret").is_some_and(|s| s.len() >= 16));
        assert_eq!(
            host_at(
                "brave-otter",
                std::net::SocketAddr::from(([127, 0, 0, 1], 8080))
            ),
            "brave-otter.localhost:8080"
        );
    }

    #[test]
    fn connections_spread_evenly_and_loads_add_up() {
        assert_eq!(split(64, 3), [22, 21, 21]);
        assert_eq!(split(64, 1), [64]);
        assert_eq!(split(2, 3), [1, 1, 0]);
        let outcome = |requests, rps, p99_us| Outcome {
            requests,
            errors: 1,
            rps,
            p50_us: 10.0,
            p99_us,
        };
        let total = sum(&[outcome(100, 10.0, 50.0), outcome(200, 20.0, 90.0)]);
        assert_eq!((total.requests, total.errors), (300, 2));
        assert_eq!(total.rps, 30.0);
        assert_eq!((total.p50_us, total.p99_us), (10.0, 90.0));
    }
}
