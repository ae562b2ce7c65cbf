//! The relay `ferry http` starts in-process when no relay is configured.

use std::net::{Ipv4Addr, SocketAddr};

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::{CancellationToken, DropGuard};

/// The embedded relay's data directory: `ferry` in the user's data
/// directory (`~/.local/share/ferry` on Linux), so the log outlives
/// `ferry http`.
pub fn default_data_dir() -> Option<std::path::PathBuf> {
    dirs::data_dir().map(|dir| dir.join("ferry"))
}

/// The port tried first, then the ones after it.
pub const PREFERRED_PORT: u16 = 8080;
/// How many ports after [`PREFERRED_PORT`] are tried before any free one.
const PORTS_TO_TRY: u16 = 20;

/// A relay running inside this process. Dropping it starts the relay's
/// shutdown; [`Embedded::stop`] also waits for it.
pub struct Embedded {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Stops it, when cancelled or dropped.
    shutdown: DropGuard,
    /// Its task.
    task: JoinHandle<std::io::Result<()>>,
}

impl Embedded {
    /// Starts a relay on 127.0.0.1 keeping its activity log in `data_dir`:
    /// on `port` when given (0 for any free one), else on port 8080 or the
    /// next free one. Replays from it may reach loopback: the target is
    /// this machine's own server.
    pub async fn start(port: Option<u16>, data_dir: std::path::PathBuf) -> std::io::Result<Self> {
        let listener = match port {
            Some(port) => TcpListener::bind((Ipv4Addr::LOCALHOST, port))
                .await
                .map_err(|err| std::io::Error::new(err.kind(), format!("port {port}: {err}")))?,
            None => bind_preferred().await?,
        };
        let addr = listener.local_addr()?;
        let shutdown = CancellationToken::new();
        let config = ferry_relay::Config {
            data_dir,
            egress_allow: ferry_relay::egress::Allow::loopback(),
            // Only this machine reaches it: its developer's load tests and
            // large uploads are theirs to run, not a flood to stop.
            max_requests_per_second: u32::MAX,
            max_body_size: u64::MAX,
            ..ferry_relay::Config::default()
        };
        // Opened before serving, so that a data directory another relay
        // holds is an error here rather than a failed task later.
        let relay = ferry_relay::Relay::open(config).await?;
        let task =
            tokio::spawn(relay.run(ferry_relay::Listeners::plain(listener), shutdown.clone()));
        Ok(Self {
            addr,
            shutdown: shutdown.drop_guard(),
            task,
        })
    }

    /// The URL the client connects to.
    pub fn relay_url(&self) -> String {
        ferry_common::handshake::connect_url(self.addr)
    }

    /// Shuts the relay down and waits for it.
    pub async fn stop(self) {
        drop(self.shutdown);
        match self.task.await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => tracing::warn!(%err, "embedded relay failed"),
            Err(err) => tracing::warn!(%err, "embedded relay task failed"),
        }
    }
}

async fn bind_preferred() -> std::io::Result<TcpListener> {
    for port in PREFERRED_PORT..PREFERRED_PORT + PORTS_TO_TRY {
        if let Ok(listener) = TcpListener::bind((Ipv4Addr::LOCALHOST, port)).await {
            return Ok(listener);
        }
    }
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await
}
