//! A relay's `/metrics`, read over HTTP as any scraper would, and the
//! waits built on it: until no tunnel is left, until capture and the
//! search index have caught up.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

/// How often a wait reads `/metrics` again.
const POLL: Duration = Duration::from_millis(50);
/// How long the log may take to store what a load left queued.
const CATCH_UP_WAIT: Duration = Duration::from_secs(120);
/// How long the relay may take to notice that tunnels closed.
const NO_TUNNELS_WAIT: Duration = Duration::from_secs(60);

/// One reading of a relay's `/metrics`.
#[derive(Debug, Clone)]
pub struct Metrics(String);

impl Metrics {
    /// Reads `/metrics` from the relay at `relay`, asking its own address
    /// as the host so that the relay answers rather than a tunnel.
    pub async fn read(relay: SocketAddr) -> Result<Self, String> {
        let mut stream = tokio::net::TcpStream::connect(relay)
            .await
            .map_err(|err| format!("cannot reach the relay's /metrics: {err}"))?;
        let request =
            format!("GET /metrics HTTP/1.1\r\nhost: {relay}\r\nconnection: close\r\n\r\n");
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|err| format!("cannot ask the relay's /metrics: {err}"))?;
        let mut answer = String::new();
        stream
            .read_to_string(&mut answer)
            .await
            .map_err(|err| format!("cannot read the relay's /metrics: {err}"))?;
        if !answer.starts_with("HTTP/1.1 200") {
            let status = answer.lines().next().unwrap_or_default();
            return Err(format!("the relay's /metrics answered `{status}`"));
        }
        Ok(Self(answer))
    }

    /// The value of the sample named `name` (a metric without labels).
    pub fn value(&self, name: &str) -> Result<u64, String> {
        self.0
            .lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
            .and_then(|value| value.trim().parse().ok())
            .ok_or_else(|| format!("the relay's /metrics has no `{name}`"))
    }
}

/// What capture has done, as `/metrics` counts it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CaptureCounts {
    /// Requests the relay sent through a tunnel.
    pub forwarded: u64,
    /// Entries stored.
    pub written: u64,
    /// Entries stored without their bodies.
    pub shed: u64,
    /// Entries lost.
    pub dropped: u64,
}

impl CaptureCounts {
    /// Reads the counters.
    pub async fn read(relay: SocketAddr) -> Result<Self, String> {
        let metrics = Metrics::read(relay).await?;
        Ok(Self {
            forwarded: metrics.value("ferry_requests_total")?,
            written: metrics.value("ferry_capture_written_total")?,
            shed: metrics.value("ferry_capture_shed_total")?,
            dropped: metrics.value("ferry_capture_dropped_total")?,
        })
    }

    /// Every forwarded request has been stored or counted as lost.
    /// The counts of several relays added up.
    fn total(counts: &[Self]) -> Self {
        counts.iter().fold(Self::default(), |sum, c| Self {
            forwarded: sum.forwarded + c.forwarded,
            written: sum.written + c.written,
            shed: sum.shed + c.shed,
            dropped: sum.dropped + c.dropped,
        })
    }

    fn caught_up(&self) -> bool {
        self.written + self.dropped >= self.forwarded
    }
}

/// Waits until the relay's capture has stored (or lost) an entry for every
/// request it forwarded, so that a writer still busy with one run does not
/// take CPU from the next. Returns the counters and how long it took.
pub async fn capture_caught_up(relay: SocketAddr) -> Result<(CaptureCounts, Duration), String> {
    let started = Instant::now();
    loop {
        let capture = CaptureCounts::read(relay).await?;
        if capture.caught_up() {
            return Ok((capture, started.elapsed()));
        }
        if started.elapsed() > CATCH_UP_WAIT {
            return Err(format!(
                "the activity log had stored {} of {} requests {CATCH_UP_WAIT:?} after the load",
                capture.written + capture.dropped,
                capture.forwarded
            ));
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Waits until the relay's search index has taken every stored entry: on
/// SQLite it fills while the log is idle, so right after a load it works
/// for seconds, on CPU the next run would otherwise share. Returns how long
/// it took.
pub async fn search_index_caught_up(relay: SocketAddr) -> Result<Duration, String> {
    let started = Instant::now();
    loop {
        let backlog = Metrics::read(relay)
            .await?
            .value("ferry_search_index_backlog")?;
        if backlog == 0 {
            return Ok(started.elapsed());
        }
        if started.elapsed() > CATCH_UP_WAIT {
            return Err(format!(
                "the search index still lacked {backlog} entries {CATCH_UP_WAIT:?} after the load"
            ));
        }
        tokio::time::sleep(POLL).await;
    }
}

/// [`capture_caught_up`] for relays of one fleet: a request is counted as
/// forwarded by the relay holding its tunnel but stored by the relay its
/// caller reached, so only the fleet's sums match.
pub async fn fleet_caught_up(relays: &[SocketAddr]) -> Result<(), String> {
    let started = Instant::now();
    loop {
        let mut counts = Vec::with_capacity(relays.len());
        for &relay in relays {
            counts.push(CaptureCounts::read(relay).await?);
        }
        let fleet = CaptureCounts::total(&counts);
        if fleet.caught_up() {
            return Ok(());
        }
        if started.elapsed() > CATCH_UP_WAIT {
            return Err(format!(
                "the fleet's activity log had stored {} of {} requests {CATCH_UP_WAIT:?} after the load",
                fleet.written + fleet.dropped,
                fleet.forwarded
            ));
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Waits until the relay reports no tunnel (a bench, not a test: polling is
/// how it watches another process).
pub async fn no_tunnels(relay: SocketAddr) -> Result<(), String> {
    let started = Instant::now();
    loop {
        if Metrics::read(relay).await?.value("ferry_tunnels")? == 0 {
            return Ok(());
        }
        if started.elapsed() > NO_TUNNELS_WAIT {
            return Err(format!(
                "the relay still holds tunnels {NO_TUNNELS_WAIT:?} after they closed"
            ));
        }
        tokio::time::sleep(POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::{CaptureCounts, Metrics};

    #[test]
    fn a_fleet_has_caught_up_when_its_sums_match_though_no_relay_alone_does() {
        let counts = |forwarded, written| CaptureCounts {
            forwarded,
            written,
            shed: 0,
            dropped: 0,
        };
        // The holder forwarded all 10; the relay the callers reached stored them.
        let (holder, ingress) = (counts(10, 0), counts(0, 9));
        let dropped = CaptureCounts {
            dropped: 1,
            ..counts(0, 0)
        };
        assert!(!holder.caught_up());
        assert!(!CaptureCounts::total(&[holder, ingress]).caught_up());
        let fleet = CaptureCounts::total(&[holder, ingress, dropped]);
        assert_eq!((fleet.forwarded, fleet.written, fleet.dropped), (10, 9, 1));
        assert!(fleet.caught_up());
    }

    #[test]
    fn reads_a_sample_by_its_exact_name() {
        let metrics = Metrics(
            "HTTP/1.1 200 OK\r\n\r\n# HELP ferry_tunnels Connected tunnels.\n\
             ferry_tunnels 3\nferry_tunnels_total 9\nferry_capture_written_total 12\n"
                .to_owned(),
        );
        assert_eq!(metrics.value("ferry_tunnels"), Ok(3));
        assert_eq!(metrics.value("ferry_capture_written_total"), Ok(12));
        assert!(metrics.value("ferry_capture_shed_total").is_err());
    }
}
