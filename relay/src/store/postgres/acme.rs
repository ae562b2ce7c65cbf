//! The fleet's ACME state on PostgreSQL: the account, the certificate and
//! its key, and the DNS-01 challenges open now, so that every relay serves
//! one certificate, only one relay orders at a time (under an advisory
//! lock), and whichever relay the CA's DNS query reaches answers it.
//!
//! Each relay that runs a DNS server loads the open challenges into its
//! own table whenever [`ACME_CHANNEL`] is notified, and records in
//! `ferry_acme_mirrors` the last one it loaded: the ordering relay tells
//! the CA to look only once every running DNS server has its values.

use std::time::Duration;

use tokio::sync::watch;

use super::Postgres;
use crate::store::StoreError;

/// The channel notified when the certificate or the open challenges
/// change.
pub const ACME_CHANNEL: &str = "ferry_acme";

/// The advisory lock class an order takes, with a hash of the domain.
const ORDER_LOCK: i32 = 0x6665_0003;

/// A session-level advisory lock on a connection of its own, held while
/// one relay orders a certificate. Dropping it closes the connection,
/// which releases the lock, however the order ended (done, failed, the
/// relay stopped mid-way); a relay that dies releases it the same way.
pub struct AcmeOrderLock {
    _client: deadpool_postgres::ClientWrapper,
}

impl std::fmt::Debug for AcmeOrderLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AcmeOrderLock").finish_non_exhaustive()
    }
}

impl Postgres {
    /// Bumps the returned counter each time [`ACME_CHANNEL`] is notified,
    /// and once each time the connection listening to it is made again.
    pub fn follow_acme(&self) -> watch::Receiver<u64> {
        self.follow(ACME_CHANNEL)
    }

    /// Waits until no other relay orders a certificate for `domain`, and
    /// holds that turn until the returned lock is dropped.
    pub async fn acme_order_lock(&self, domain: &str) -> Result<AcmeOrderLock, StoreError> {
        // Out of the pool for good: a pooled connection would go back with
        // the lock still held.
        let client = deadpool_postgres::Object::take(self.client().await?);
        // Another relay's order takes minutes at most (its own timeout),
        // and ends with its connection if it dies: the server's keepalives
        // find a lost host in about 25 s rather than the system's 2 hours,
        // and, from PostgreSQL 14, a waiter that left is noticed too.
        client
            .batch_execute(
                "SET lock_timeout = 0; SET statement_timeout = 0; \
                 SET tcp_keepalives_idle = 10; SET tcp_keepalives_interval = 5; \
                 SET tcp_keepalives_count = 3",
            )
            .await?;
        if let Err(err) = client
            .batch_execute("SET client_connection_check_interval = 5000")
            .await
        {
            tracing::debug!(%err, "the database cannot check for lost clients (before PostgreSQL 14)");
        }
        client
            .execute(
                "SELECT pg_advisory_lock($1, hashtext($2))",
                &[&ORDER_LOCK, &domain],
            )
            .await?;
        Ok(AcmeOrderLock { _client: client })
    }

    /// The account's credentials (JSON) registered with `directory`.
    pub async fn acme_account(&self, directory: &str) -> Result<Option<String>, StoreError> {
        let row = self
            .client()
            .await?
            .query_opt(
                "SELECT credentials FROM ferry_acme_accounts WHERE directory = $1",
                &[&directory],
            )
            .await?;
        Ok(row.map(|row| row.try_get(0)).transpose()?)
    }

    /// Keeps the account registered with `directory`.
    pub async fn save_acme_account(
        &self,
        directory: &str,
        credentials: &str,
    ) -> Result<(), StoreError> {
        self.client()
            .await?
            .execute(
                "INSERT INTO ferry_acme_accounts (directory, credentials) VALUES ($1, $2) \
                 ON CONFLICT (directory) DO UPDATE SET credentials = EXCLUDED.credentials",
                &[&directory, &credentials],
            )
            .await?;
        Ok(())
    }

    /// The certificate chain and key (PEM) last issued for `domain`.
    pub async fn acme_certificate(
        &self,
        domain: &str,
    ) -> Result<Option<(String, String)>, StoreError> {
        let row = self
            .client()
            .await?
            .query_opt(
                "SELECT cert, key FROM ferry_acme_certificates WHERE domain = $1",
                &[&domain],
            )
            .await?;
        Ok(row
            .map(|row| Ok::<_, tokio_postgres::Error>((row.try_get(0)?, row.try_get(1)?)))
            .transpose()?)
    }

    /// Keeps a newly issued certificate for `domain` and tells every relay.
    pub async fn save_acme_certificate(
        &self,
        domain: &str,
        cert: &str,
        key: &str,
    ) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        tx.execute(
            "INSERT INTO ferry_acme_certificates (domain, cert, key) VALUES ($1, $2, $3) \
             ON CONFLICT (domain) DO UPDATE \
             SET cert = EXCLUDED.cert, key = EXCLUDED.key, issued_at = now()",
            &[&domain, &cert, &key],
        )
        .await?;
        tx.execute("SELECT pg_notify($1, '')", &[&ACME_CHANNEL])
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Opens a challenge: `value` is answered at `_acme-challenge.DOMAIN`
    /// by every relay's DNS server for `ttl` at most. Returns its id, which
    /// [`Self::acme_mirrors_behind`] compares with what each has loaded.
    pub async fn publish_acme_challenge(
        &self,
        domain: &str,
        value: &str,
        ttl: Duration,
    ) -> Result<i64, StoreError> {
        let seconds = ttl.as_secs_f64();
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        // Rows a dead relay left behind go with the next order.
        tx.execute(
            "DELETE FROM ferry_acme_challenges WHERE expires_at < now()",
            &[],
        )
        .await?;
        let id: i64 = tx
            .query_one(
                "INSERT INTO ferry_acme_challenges (domain, value, expires_at) \
                 VALUES ($1, $2, now() + make_interval(secs => $3)) RETURNING id",
                &[&domain, &value, &seconds],
            )
            .await?
            .try_get(0)?;
        tx.execute("SELECT pg_notify($1, '')", &[&ACME_CHANNEL])
            .await?;
        tx.commit().await?;
        Ok(id)
    }

    /// Closes the challenges `values` for `domain`.
    pub async fn withdraw_acme_challenges(
        &self,
        domain: &str,
        values: &[String],
    ) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        tx.execute(
            "DELETE FROM ferry_acme_challenges WHERE domain = $1 AND value = ANY($2)",
            &[&domain, &values],
        )
        .await?;
        tx.execute("SELECT pg_notify($1, '')", &[&ACME_CHANNEL])
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// The values of `domain`'s open challenges, and the last id among
    /// them, for [`Self::record_acme_mirror`].
    pub async fn acme_challenges(&self, domain: &str) -> Result<(Vec<String>, i64), StoreError> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT id, value FROM ferry_acme_challenges \
                 WHERE domain = $1 AND expires_at > now() ORDER BY id",
                &[&domain],
            )
            .await?;
        let mut seen = 0_i64;
        let mut values = Vec::with_capacity(rows.len());
        for row in rows {
            seen = seen.max(row.try_get(0)?);
            values.push(row.try_get(1)?);
        }
        Ok((values, seen))
    }

    /// Records that the DNS server of `relay` answers `domain`'s challenges
    /// up to id `seen`, and runs for `alive_for` more.
    pub async fn record_acme_mirror(
        &self,
        relay: &str,
        domain: &str,
        seen: i64,
        alive_for: Duration,
    ) -> Result<(), StoreError> {
        self.client()
            .await?
            .execute(
                "INSERT INTO ferry_acme_mirrors (relay, domain, seen, alive_until) \
                 VALUES ($1, $2, $3, now() + make_interval(secs => $4)) \
                 ON CONFLICT (relay) DO UPDATE SET domain = EXCLUDED.domain, \
                 seen = GREATEST(ferry_acme_mirrors.seen, EXCLUDED.seen), \
                 alive_until = EXCLUDED.alive_until",
                &[&relay, &domain, &seen, &alive_for.as_secs_f64()],
            )
            .await?;
        Ok(())
    }

    /// How many orders for `domain` failed in a row, and how long until the
    /// fleet may order again (zero when it may now).
    pub async fn acme_order_backoff(&self, domain: &str) -> Result<(u32, Duration), StoreError> {
        let row = self
            .client()
            .await?
            .query_opt(
                "SELECT failures, GREATEST(extract(epoch FROM next_at - now()), 0)::float8 \
                 FROM ferry_acme_orders WHERE domain = $1",
                &[&domain],
            )
            .await?;
        let Some(row) = row else {
            return Ok((0, Duration::ZERO));
        };
        let (failures, wait): (i32, f64) = (row.try_get(0)?, row.try_get(1)?);
        Ok((
            u32::try_from(failures).unwrap_or(0),
            Duration::try_from_secs_f64(wait).unwrap_or_default(),
        ))
    }

    /// Records an order for `domain` that failed, the `failures`th in a
    /// row: the fleet orders again after `wait`.
    pub async fn acme_order_failed(
        &self,
        domain: &str,
        failures: u32,
        wait: Duration,
    ) -> Result<(), StoreError> {
        let failures = i32::try_from(failures).unwrap_or(i32::MAX);
        self.client()
            .await?
            .execute(
                "INSERT INTO ferry_acme_orders (domain, failures, next_at) \
                 VALUES ($1, $2, now() + make_interval(secs => $3)) \
                 ON CONFLICT (domain) DO UPDATE \
                 SET failures = EXCLUDED.failures, next_at = EXCLUDED.next_at",
                &[&domain, &failures, &wait.as_secs_f64()],
            )
            .await?;
        Ok(())
    }

    /// Forgets `domain`'s failed orders once one succeeded.
    pub async fn acme_order_succeeded(&self, domain: &str) -> Result<(), StoreError> {
        self.client()
            .await?
            .execute(
                "DELETE FROM ferry_acme_orders WHERE domain = $1",
                &[&domain],
            )
            .await?;
        Ok(())
    }

    /// Forgets `relay`'s DNS server, which stops: orders no longer wait
    /// for it.
    pub async fn forget_acme_mirror(&self, relay: &str) -> Result<(), StoreError> {
        self.client()
            .await?
            .execute("DELETE FROM ferry_acme_mirrors WHERE relay = $1", &[&relay])
            .await?;
        Ok(())
    }

    /// The running DNS servers of `domain` that have not loaded challenge
    /// `id` yet.
    pub async fn acme_mirrors_behind(
        &self,
        domain: &str,
        id: i64,
    ) -> Result<Vec<String>, StoreError> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT relay FROM ferry_acme_mirrors \
                 WHERE domain = $1 AND seen < $2 AND alive_until > now() ORDER BY relay",
                &[&domain, &id],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|row| row.try_get(0))
            .collect::<Result<_, _>>()?)
    }
}
