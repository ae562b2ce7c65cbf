//! The store on PostgreSQL, for several relays sharing one database
//! (`--database-url`). Every call takes a connection from a small pool;
//! the relay's tasks never block on the network to the database.
//!
//! The schema is applied in numbered migrations like SQLite's, recorded in
//! `ferry_schema`, under an advisory lock so that relays starting together
//! apply each migration once.

mod activity;
mod dispatch;

use std::str::FromStr;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::NoTls;

use super::StoreError;

/// The schema, one migration per version, applied in order. Never edit a
/// migration that shipped: add the next one.
const MIGRATIONS: &[&str] = &[
    include_str!("postgres/001_activity.sql"),
    include_str!("postgres/002_dispatch.sql"),
];

/// The advisory lock key migrations run under ("ferry" in ASCII).
const MIGRATION_LOCK: i64 = 0x0066_6572_7279;

/// Connections a relay keeps open at most.
const POOL_SIZE: usize = 16;

/// How long a call waits for a connection of the pool, or for a new one.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

impl From<tokio_postgres::Error> for StoreError {
    fn from(err: tokio_postgres::Error) -> Self {
        Self(format!("the database failed: {err}"))
    }
}

impl From<deadpool_postgres::PoolError> for StoreError {
    fn from(err: deadpool_postgres::PoolError) -> Self {
        Self(format!("the database is unreachable: {err}"))
    }
}

/// The store on a PostgreSQL database shared by every relay of a fleet.
#[derive(Clone)]
pub struct Postgres {
    pool: Pool,
}

impl std::fmt::Debug for Postgres {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Postgres").finish_non_exhaustive()
    }
}

impl Postgres {
    /// Connects to the database at `url` (`postgres://user:password@host:port/db`)
    /// and brings its schema up to date. Fails when the database cannot be
    /// reached or holds a schema from a newer Ferry.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let mut config = tokio_postgres::Config::from_str(url).map_err(|err| {
            StoreError(format!(
                "`--database-url` is not a PostgreSQL URL ({err}): use postgres://USER:PASSWORD@HOST:PORT/DATABASE"
            ))
        })?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        config.application_name("ferry-relay");
        let manager = Manager::from_config(
            config,
            NoTls,
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
        let store = Self { pool };
        store.migrate().await?;
        Ok(store)
    }

    /// A connection of the pool.
    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        Ok(self.pool.get().await?)
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
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
