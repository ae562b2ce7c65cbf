//! The store on PostgreSQL, for several relays sharing one database
//! (`--database-url`). Every call takes a connection from a small pool;
//! the relay's tasks never block on the network to the database.
//!
//! The schema is applied in numbered migrations like SQLite's, recorded in
//! `ferry_schema`, under an advisory lock so that relays starting together
//! apply each migration once.
//!
//! Every connection (the pool's, the followers of channels, the session
//! listeners) honours the URL's `sslmode` with the same TLS connector
//! ([`tls`]).

mod acme;
mod activity;
mod dispatch;
mod sessions;
mod tls;

pub use acme::{AcmeOrderLock, ACME_CHANNEL};
pub use tls::private_link;

pub use sessions::{
    channel, parse_takeover, Listener, SessionClaim, SessionClaimed, SessionHolder,
};

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use futures_util::StreamExt;
use std::sync::Arc;

use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio_postgres::AsyncMessage;
use tokio_postgres_rustls::MakeRustlsConnect;

use async_trait::async_trait;

use super::{Database, StoreError, UNAVAILABLE};

/// The schema, one migration per version, applied in order. Never edit a
/// migration that shipped: add the next one.
const MIGRATIONS: &[&str] = &[
    include_str!("postgres/001_activity.sql"),
    include_str!("postgres/002_dispatch.sql"),
    include_str!("postgres/003_sessions.sql"),
    include_str!("postgres/004_acme.sql"),
];

/// The advisory lock key migrations run under ("ferry" in ASCII).
const MIGRATION_LOCK: i64 = 0x0066_6572_7279;

/// Connections a relay keeps open at most.
const POOL_SIZE: usize = 16;

/// Connections of the pool that the API's reads (lists, searches, live
/// feeds, deliveries) may hold at once: the rest stay free for capture, the
/// dispatcher and health checks, so a flood of slow searches cannot stall
/// them.
const READ_SLOTS: usize = POOL_SIZE - 6;

/// How long a call waits for a connection of the pool, or for a new one.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The longest a statement waits for a lock another relay holds.
const LOCK_TIMEOUT: Duration = Duration::from_secs(5);

/// The longest any statement runs (lists and searches have a shorter
/// limit of their own).
const STATEMENT_TIMEOUT: Duration = Duration::from_secs(30);

/// How long the server keeps a transaction whose relay went silent.
const IDLE_IN_TRANSACTION: Duration = Duration::from_secs(30);

/// How long a silent connection is kept before TCP probes it, and how long
/// unacknowledged data may wait before the connection counts as lost.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(30);

/// An error and its causes: the driver's own text ("db error", "error
/// connecting to server") leaves out what the server or the socket said.
fn with_causes(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut cause = err.source();
    while let Some(next) = cause {
        // A pool error already shows the error it wraps.
        let said = next.to_string();
        if !text.ends_with(&said) {
            text.push_str(&format!(": {said}"));
        }
        cause = next.source();
    }
    if let Some(hint) = tls::hint(err) {
        text.push_str(&format!("; {hint}"));
    }
    text
}

/// Whether the same call may work later ([`UNAVAILABLE`]): the server could
/// not be reached, is shutting down, or refused for a reason that clears
/// by itself. Any other error (a constraint, a bad value) would fail again.
fn transient(err: &tokio_postgres::Error) -> bool {
    match err.code() {
        Some(code) => {
            let code = code.code();
            // 08: connection; 40: deadlock, serialization; 53: resources.
            ["08", "40", "53"]
                .iter()
                .any(|class| code.starts_with(class))
                || matches!(
                    code,
                    // A lock wait cut short, a statement that ran out of
                    // time, a server shutting down or starting, a
                    // read-only server after a failover.
                    "55P03" | "57014" | "57P01" | "57P02" | "57P03" | "25006"
                )
        }
        // No answer: the driver's own errors about the connection.
        None => {
            let text = err.to_string();
            err.is_closed()
                || [
                    "error connecting to server",
                    "error communicating with the server",
                    "timeout waiting for server",
                ]
                .iter()
                .any(|prefix| text.starts_with(prefix))
        }
    }
}

impl From<tokio_postgres::Error> for StoreError {
    fn from(err: tokio_postgres::Error) -> Self {
        if transient(&err) {
            Self(format!("{UNAVAILABLE}: {}", with_causes(&err)))
        } else {
            Self(format!("the database failed: {}", with_causes(&err)))
        }
    }
}

impl From<deadpool_postgres::PoolError> for StoreError {
    fn from(err: deadpool_postgres::PoolError) -> Self {
        Self(format!("{UNAVAILABLE}: {}", with_causes(&err)))
    }
}

/// The channel each activity log append notifies, so that every relay's
/// live tails wake for entries another relay stored.
pub(super) const LOG_CHANNEL: &str = "ferry_log";

/// How long a follower of a channel waits before connecting again.
const LISTEN_RETRY: Duration = Duration::from_secs(1);

/// A pool connection held for one of the API's reads, with its slot.
struct Reader {
    client: deadpool_postgres::Object,
    _slot: OwnedSemaphorePermit,
}

impl std::ops::Deref for Reader {
    type Target = deadpool_postgres::Object;

    fn deref(&self) -> &Self::Target {
        &self.client
    }
}

impl std::ops::DerefMut for Reader {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.client
    }
}

/// The store on a PostgreSQL database shared by every relay of a fleet.
#[derive(Clone)]
pub struct Postgres {
    pool: Pool,
    /// [`READ_SLOTS`] permits.
    reads: Arc<Semaphore>,
    /// Bumped on each notification of [`LOG_CHANNEL`].
    commits: watch::Receiver<u64>,
    /// How to connect, for the followers of channels and the listeners.
    config: tokio_postgres::Config,
    /// The TLS every connection uses, per the URL's `sslmode`.
    tls: MakeRustlsConnect,
}

impl std::fmt::Debug for Postgres {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Postgres").finish_non_exhaustive()
    }
}

impl Postgres {
    /// Connects to the database at `url` (`postgres://user:password@host:port/db`)
    /// and brings its schema up to date. Fails when the database cannot be
    /// reached or holds a schema from a newer Ferry. TLS, when used, trusts
    /// the public roots only: see [`Postgres::connect_trusting`].
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Self::connect_trusting(url, None).await
    }

    /// [`Postgres::connect`], trusting the CA certificates in the PEM file
    /// `ca_file` (`--database-ca`) besides the public roots for TLS. TLS is
    /// used as the URL's `sslmode` says: `disable` never, `prefer` (the
    /// default) when the server offers it, `require` (and `verify-ca`,
    /// `verify-full`) always; the certificate's chain and name are always
    /// verified.
    pub async fn connect_trusting(url: &str, ca_file: Option<&Path>) -> Result<Self, StoreError> {
        let tls = tls::connector(ca_file)?;
        let mut config = tokio_postgres::Config::from_str(&tls::libpq_modes(url)).map_err(|err| {
            StoreError(format!(
                "`--database-url` is not a PostgreSQL URL ({err}): use postgres://USER:PASSWORD@HOST:PORT/DATABASE, \
                 with sslmode=disable, prefer, require, verify-ca or verify-full if any"
            ))
        })?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        config.application_name("ferry-relay");
        // The server's notices ("already exists, skipping" on every start)
        // would reach the relay's log as noise; warnings still do. No wait
        // is unbounded: a relay that froze holding a lock, or a transaction
        // left open by a lost connection, stalls the others for seconds,
        // not until TCP gives up on it (hours).
        let settings = format!(
            "-c client_min_messages=warning -c lock_timeout={} \
             -c statement_timeout={} -c idle_in_transaction_session_timeout={}",
            LOCK_TIMEOUT.as_millis(),
            STATEMENT_TIMEOUT.as_millis(),
            IDLE_IN_TRANSACTION.as_millis()
        );
        let options = match config.get_options() {
            Some(given) => format!("{given} {settings}"),
            None => settings,
        };
        config.options(options);
        config.keepalives_idle(KEEPALIVE_IDLE);
        config.tcp_user_timeout(KEEPALIVE_IDLE);
        let (commits, following) = watch::channel(0);
        tokio::spawn(follow_channel(
            config.clone(),
            tls.clone(),
            LOG_CHANNEL,
            commits,
        ));
        let manager = Manager::from_config(
            config.clone(),
            tls.clone(),
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .wait_timeout(Some(CONNECT_TIMEOUT))
            .create_timeout(Some(CONNECT_TIMEOUT))
            .recycle_timeout(Some(CONNECT_TIMEOUT))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .build()
            .map_err(|err| StoreError(format!("cannot build the database pool: {err}")))?;
        let store = Self {
            pool,
            reads: Arc::new(Semaphore::new(READ_SLOTS)),
            commits: following,
            config,
            tls,
        };
        store.migrate().await?;
        Ok(store)
    }

    /// Bumps the returned counter on each notification of `channel`, and
    /// once each time the connection listening to it is made again, until
    /// no one follows the counter.
    fn follow(&self, channel: &'static str) -> watch::Receiver<u64> {
        let (sender, receiver) = watch::channel(0);
        tokio::spawn(follow_channel(
            self.config.clone(),
            self.tls.clone(),
            channel,
            sender,
        ));
        receiver
    }

    /// Listens on `channel` on a connection of its own.
    pub async fn listen(&self, channel: &str) -> Result<Listener, StoreError> {
        Listener::start(&self.config, self.tls.clone(), channel).await
    }

    /// A connection of the pool.
    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        Ok(self.pool.get().await?)
    }

    /// A connection of the pool for one of the API's reads, within
    /// [`READ_SLOTS`].
    async fn reader(&self) -> Result<Reader, StoreError> {
        let slot = tokio::time::timeout(CONNECT_TIMEOUT, Arc::clone(&self.reads).acquire_owned())
            .await
            .ok()
            .and_then(Result::ok)
            .ok_or_else(|| {
                StoreError(format!(
                    "{UNAVAILABLE}: {READ_SLOTS} reads are running; try again shortly"
                ))
            })?;
        Ok(Reader {
            client: self.client().await?,
            _slot: slot,
        })
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        // Relays starting together wait for the first one's migrations,
        // however long they take.
        tx.batch_execute("SET LOCAL lock_timeout = 0; SET LOCAL statement_timeout = 0")
            .await?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .await?;
        tx.batch_execute("CREATE TABLE IF NOT EXISTS ferry_schema (version INTEGER NOT NULL)")
            .await?;
        let version: i32 = match tx
            .query_opt("SELECT version FROM ferry_schema", &[])
            .await?
        {
            Some(row) => row.try_get(0)?,
            None => {
                tx.execute("INSERT INTO ferry_schema VALUES (0)", &[])
                    .await?;
                0
            }
        };
        let known = MIGRATIONS.len();
        let applied = usize::try_from(version).unwrap_or(usize::MAX);
        if applied > known {
            return Err(StoreError(format!(
                "the database has schema version {version}, newer than this Ferry knows ({known}): \
                 run the Ferry that wrote it, or a newer one"
            )));
        }
        for migration in &MIGRATIONS[applied..] {
            tx.batch_execute(migration).await?;
        }
        let known = i32::try_from(known).unwrap_or(i32::MAX);
        tx.execute("UPDATE ferry_schema SET version = $1", &[&known])
            .await?;
        tx.commit().await?;
        Ok(())
    }
}

#[async_trait]
impl Database for Postgres {
    async fn check(&self) -> Result<(), StoreError> {
        self.client().await?.simple_query("SELECT 1").await?;
        Ok(())
    }

    fn commits(&self) -> Option<watch::Receiver<u64>> {
        Some(self.commits.clone())
    }
}

/// Follows `channel` on a connection of its own, bumping `commits` on each
/// notification, until no one follows `commits`. A lost connection is made
/// again, with one bump: notifications may have been missed meanwhile.
async fn follow_channel(
    config: tokio_postgres::Config,
    tls: MakeRustlsConnect,
    channel: &str,
    commits: watch::Sender<u64>,
) {
    loop {
        if let Ok((client, mut connection)) = config.connect(tls.clone()).await {
            // The connection is driven by its own task, which passes
            // notifications on; one waiting is enough, since a bump covers
            // every commit before it.
            let (notified, mut notifications) = mpsc::channel(1);
            let driver = tokio::spawn(async move {
                let mut messages =
                    futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
                while let Some(Ok(message)) = messages.next().await {
                    if let AsyncMessage::Notification(_) = message {
                        let _ = notified.try_send(());
                    }
                }
            });
            if client
                .batch_execute(&format!("LISTEN {channel}"))
                .await
                .is_ok()
            {
                commits.send_modify(|n| *n += 1);
                loop {
                    tokio::select! {
                        got = notifications.recv() => match got {
                            Some(()) => commits.send_modify(|n| *n += 1),
                            None => break,
                        },
                        () = commits.closed() => {
                            driver.abort();
                            return;
                        }
                    }
                }
            }
            driver.abort();
        }
        // Cancel-safe: a sleep.
        tokio::select! {
            () = tokio::time::sleep(LISTEN_RETRY) => {}
            () = commits.closed() => return,
        }
    }
}
