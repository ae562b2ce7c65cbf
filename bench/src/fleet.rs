//! A fleet on PostgreSQL (`--fleet`), on a PostgreSQL server of the
//! bench's own ([`crate::pg`]):
//!
//! - requests/s of a 1 KiB GET straight to the origin, through the relay
//!   holding the tunnel, through another relay of the fleet (which hands
//!   each request to the holder over the cluster link), and spread over
//!   all three; with every relay's CPU per request;
//! - the dispatcher's durable deliveries per second with one relay on
//!   SQLite (the baseline), one relay on PostgreSQL, and three relays
//!   whose workers drain one PostgreSQL database's queue.
//!
//! Each round runs every setup once, so that what else the machine does
//! falls on all of them alike.

use std::net::SocketAddr;
use std::path::Path;

use crate::dispatch::{self, Throughput};
use crate::pg::PgServer;
use crate::procs::Proc;
use crate::receiver::Receiver;
use crate::scenarios::{median, start_relay, Capture, Row, Settings, DISPATCH_FLAGS, PRODUCERS};

/// Relays in the fleet.
pub(crate) const FLEET: usize = 3;

/// The dispatcher runs measured on each setup: (webhooks, backlog), as in
/// [`crate::scenarios::dispatcher`]: four webhooks end to end (intake and
/// delivery at once), and one webhook draining a backlog (the workers
/// alone).
const RUNS: [(usize, bool); 2] = [(4, false), (1, true)];

/// Where a setup keeps its delivery queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Setup {
    /// One relay on its SQLite file.
    Sqlite,
    /// One relay on a PostgreSQL database.
    Postgres,
    /// [`FLEET`] relays on one PostgreSQL database.
    Fleet,
}

impl Setup {
    const ALL: [Setup; 3] = [Setup::Sqlite, Setup::Postgres, Setup::Fleet];

    /// How many relays it runs.
    fn relays(self) -> usize {
        match self {
            Setup::Sqlite | Setup::Postgres => 1,
            Setup::Fleet => FLEET,
        }
    }
}

/// The flags of a dispatching relay on `database`, if any.
fn relay_flags(database: Option<&str>) -> Vec<&str> {
    let mut flags = DISPATCH_FLAGS.to_vec();
    if let Some(url) = database {
        flags.extend(["--database-url", url]);
    }
    flags
}

/// What one round of one setup measured.
struct Round {
    throughput: Throughput,
    /// Every relay's CPU seconds from the first POST to the last arrival.
    relay_cpu: f64,
    /// The PostgreSQL server's, over the same time.
    database_cpu: f64,
    /// Attempts beyond one per delivery.
    retries: u64,
}

/// Runs the fleet's scenarios on a PostgreSQL server of its own, which is
/// stopped and removed afterwards whatever the outcome.
pub async fn run(bin: &Path, settings: &Settings) -> Result<Vec<Row>, String> {
    let server = tokio::task::spawn_blocking(PgServer::start)
        .await
        .map_err(|err| format!("starting PostgreSQL: {err}"))??;
    let rows = async {
        let mut rows = crate::routing::requests(bin, settings, &server).await?;
        rows.extend(deliveries(bin, settings, &server).await?);
        Ok::<_, String>(rows)
    }
    .await;
    let stopped = tokio::task::spawn_blocking(move || server.stop())
        .await
        .map_err(|err| format!("stopping PostgreSQL: {err}"))?;
    let rows = rows?;
    stopped?;
    Ok(rows)
}

/// Durable deliveries/s of the dispatcher on each [`Setup`].
async fn deliveries(
    bin: &Path,
    settings: &Settings,
    server: &PgServer,
) -> Result<Vec<Row>, String> {
    let mut rows = Vec::new();
    let mut databases = 0;
    for (webhooks, backlog) in RUNS {
        let events = settings.dispatch_deliveries / webhooks;
        let mut rounds: [Vec<Round>; 3] = Default::default();
        for _ in 0..settings.rounds {
            for (setup, runs) in Setup::ALL.into_iter().zip(&mut rounds) {
                let database = match setup {
                    Setup::Sqlite => None,
                    Setup::Postgres | Setup::Fleet => {
                        databases += 1;
                        Some(server.create(&format!("ferry_{databases}")).await?)
                    }
                };
                runs.push(
                    round(
                        bin,
                        setup,
                        database.as_deref(),
                        server,
                        webhooks,
                        events,
                        backlog,
                    )
                    .await?,
                );
            }
        }
        rows.extend(dispatch_rows(webhooks, events, backlog, &rounds));
    }
    Ok(rows)
}

/// One throughput run on fresh relays of `setup`.
async fn round(
    bin: &Path,
    setup: Setup,
    database: Option<&str>,
    server: &PgServer,
    webhooks: usize,
    events: usize,
    backlog: bool,
) -> Result<Round, String> {
    let mut relays: Vec<Proc> = Vec::with_capacity(setup.relays());
    let mut addrs = Vec::with_capacity(setup.relays());
    for _ in 0..setup.relays() {
        let (relay, addr) = start_relay(
            bin,
            SocketAddr::from(([127, 0, 0, 1], 0)),
            Capture::On,
            &relay_flags(database),
        )
        .await?;
        relays.push(relay);
        addrs.push(addr);
    }
    let mut receiver = Receiver::start().await?;
    // On one database, a webhook made on one relay is every relay's.
    let ids = dispatch::create_webhooks(addrs[0], &receiver, webhooks).await?;
    let cpu = |relays: &[Proc]| relays.iter().filter_map(Proc::cpu_secs).sum::<f64>();
    let (relays_before, database_before) = (cpu(&relays), server.cpu_secs());
    let throughput =
        dispatch::throughput(&addrs, &mut receiver, webhooks, events, PRODUCERS, backlog).await?;
    let relay_cpu = cpu(&relays) - relays_before;
    let database_cpu = match setup {
        Setup::Sqlite => 0.0,
        Setup::Postgres | Setup::Fleet => server.cpu_secs() - database_before,
    };
    let deliveries = events * webhooks;
    let stored = dispatch::stored(&addrs, &ids, deliveries).await?;
    for relay in relays {
        relay.terminate().await?;
    }
    // Every extra attempt the relays counted, or, should their count miss
    // one, every delivery that arrived twice.
    let retries = stored
        .attempts
        .saturating_sub(deliveries as u64)
        .max(throughput.duplicates as u64);
    Ok(Round {
        throughput,
        relay_cpu,
        database_cpu,
        retries,
    })
}

/// The rows of one dispatcher run: each pair of setups side by side, the
/// baseline in the left column.
fn dispatch_rows(
    webhooks: usize,
    events: usize,
    backlog: bool,
    rounds: &[Vec<Round>; 3],
) -> Vec<Row> {
    let deliveries = (events * webhooks) as f64;
    let of = |setup: usize, field: &dyn Fn(&Round) -> f64| {
        median(&mut rounds[setup].iter().map(field).collect::<Vec<_>>())
    };
    let rate = |r: &Round| r.throughput.deliveries_per_sec;
    let accepted = |r: &Round| r.throughput.events_per_sec;
    let relay_us = |r: &Round| r.relay_cpu * 1e6 / deliveries;
    let database_us = |r: &Round| r.database_cpu * 1e6 / deliveries;
    let (sqlite, one, fleet) = (0, 1, 2);
    let name = format!(
        "fleet: dispatcher{}, {webhooks} webhook{}, {events} events by {PRODUCERS} producers \
         round-robin",
        if backlog { " draining a backlog" } else { "" },
        if webhooks == 1 { "" } else { "s" }
    );
    let delivered = if backlog {
        "deliveries/s from the receiver's first answer"
    } else {
        "deliveries/s delivered"
    };
    let retries: u64 = rounds.iter().flatten().map(|r| r.retries).sum();
    vec![
        Row::new(&name, &format!("{delivered} (SQLite, PostgreSQL)"))
            .pair(of(sqlite, &rate), of(one, &rate))
            .note("(b)/(a): 1 relay on PostgreSQL / on SQLite"),
        Row::new(
            &name,
            &format!("{delivered} (1 relay, {FLEET} relays on PostgreSQL)"),
        )
        .pair(of(one, &rate), of(fleet, &rate))
        .note(&format!("(c)/(b): {FLEET} relays / 1, one database")),
        Row::new(&name, "events/s accepted (SQLite, PostgreSQL)")
            .pair(of(sqlite, &accepted), of(one, &accepted)),
        Row::new(
            &name,
            &format!("events/s accepted (1 relay, {FLEET} relays on PostgreSQL)"),
        )
        .pair(of(one, &accepted), of(fleet, &accepted)),
        Row::new(&name, "relay CPU µs per delivery (SQLite, PostgreSQL)")
            .pair(of(sqlite, &relay_us), of(one, &relay_us)),
        Row::new(
            &name,
            &format!("relays' CPU µs per delivery (1 relay, {FLEET} relays on PostgreSQL)"),
        )
        .pair(of(one, &relay_us), of(fleet, &relay_us)),
        Row::new(
            &name,
            &format!("PostgreSQL CPU µs per delivery (1 relay, {FLEET} relays)"),
        )
        .pair(of(one, &database_us), of(fleet, &database_us)),
        Row::new(
            &name,
            "attempts beyond one per delivery (all rounds, all setups)",
        )
        .only(retries as f64)
        .at_most(0.0, "attempts"),
    ]
}

#[cfg(test)]
mod tests {
    use super::{relay_flags, Setup, FLEET};

    #[test]
    fn a_relay_on_postgresql_gets_the_url_after_the_dispatch_flags() {
        let sqlite = relay_flags(None);
        assert!(!sqlite.contains(&"--database-url"));
        assert!(sqlite.contains(&"--egress-allow"));
        let shared = relay_flags(Some("postgres://ferry@127.0.0.1:1/ferry_1"));
        assert_eq!(
            shared[shared.len() - 2..],
            ["--database-url", "postgres://ferry@127.0.0.1:1/ferry_1"]
        );
        assert_eq!(&shared[..sqlite.len()], &sqlite[..]);
    }

    #[test]
    fn only_the_fleet_runs_several_relays() {
        let relays: Vec<usize> = Setup::ALL.iter().map(|s| s.relays()).collect();
        assert_eq!(relays, [1, 1, FLEET]);
    }
}
