//! The fleet's live-session registry on PostgreSQL: one row per tunnel name
//! served by some relay, with that relay's id, the URL its cluster listener
//! is reached at, the name's owner and a lease. A relay renews its leases by
//! heartbeat; a relay that dies stops renewing, and its names are free once
//! the leases end. A relay that takes a name over from another tells the
//! old holder with a NOTIFY on the holder's own channel.

use std::time::Duration;

use tokio::sync::mpsc;
use tokio_postgres::AsyncMessage;
use tokio_postgres_rustls::MakeRustlsConnect;
use tokio_util::task::AbortOnDropHandle;

use super::Postgres;
use crate::store::{now_micros, OwnerKey, StoreError};

/// Notifications a listener keeps before it stops reading the connection:
/// takeovers are rare, and the heartbeat catches any that were missed.
const NOTIFICATIONS_QUEUED: usize = 256;

/// A relay's claim on a tunnel name.
#[derive(Debug, Clone)]
pub struct SessionClaim<'a> {
    /// The tunnel name.
    pub name: &'a str,
    /// The claiming relay's id.
    pub relay: &'a str,
    /// Where the claiming relay's cluster listener is reached.
    pub url: &'a str,
    /// Who owns the tunnel.
    pub owner: &'a str,
    /// The claiming relay's id for the session.
    pub session: i64,
    /// How long the claim lasts unless renewed.
    pub lease: Duration,
    /// How many names the owner's live sessions may hold in the whole
    /// fleet, a takeover aside; `None` for no limit.
    pub max_per_owner: Option<usize>,
    /// How long a name stays held for its owner after its session ended,
    /// when a hold for another owner refuses the claim; `None` for a name
    /// reserved for the claiming owner. A hold is saved in the name
    /// registry when a session ends; a session whose relay died saved none,
    /// and its lease's end starts the hold.
    pub hold: Option<Duration>,
}

/// How a claim went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionClaimed {
    /// The name is this relay's now; the relay that held it before, and its
    /// session, when that was another relay with a live lease.
    Yes(Option<(String, i64)>),
    /// Another relay's live session holds the name for another owner (or an
    /// anonymous one, whom nobody can take over).
    InUse,
    /// The owner's live sessions hold as many names in the fleet as it may.
    TooMany(usize),
    /// The name is held for another owner since its session ended.
    Held,
}

/// The relay serving a name, as another relay sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionHolder {
    /// Its id.
    pub relay: String,
    /// Where its cluster listener is reached.
    pub url: String,
    /// Who owns the tunnel.
    pub owner: OwnerKey,
    /// Its id for the session.
    pub session: i64,
}

/// The channel on which relay `relay` hears that its sessions were taken
/// over. Relay ids are hex, so the name is a valid identifier as it is.
pub fn channel(relay: &str) -> String {
    format!("ferry_relay_{relay}")
}

/// What a notification carries: the name taken over and the old holder's
/// session.
pub fn takeover_payload(name: &str, session: i64) -> String {
    format!("{session} {name}")
}

/// Reads a notification's payload back; `None` for one this relay did not
/// write.
pub fn parse_takeover(payload: &str) -> Option<(String, i64)> {
    let (session, name) = payload.split_once(' ')?;
    Some((name.to_owned(), session.parse().ok()?))
}

fn seconds(lease: Duration) -> f64 {
    lease.as_secs_f64()
}

impl Postgres {
    /// Claims `claim.name` for `claim.relay`: granted when no relay holds
    /// it, when its lease ended, when this relay holds it already (its own
    /// registry has decided), or when the holder's owner is the claim's and
    /// not anonymous (a takeover, as on one relay). A takeover from another
    /// relay notifies it in the same transaction.
    pub async fn claim_session(
        &self,
        claim: &SessionClaim<'_>,
    ) -> Result<SessionClaimed, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        if claim.max_per_owner.is_some() {
            // One claim of an owner at a time in the whole fleet, so that
            // relays claiming at once cannot both pass the count below.
            tx.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended('ferry_owner:' || $1, 0))",
                &[&claim.owner],
            )
            .await?;
        }
        let hold = claim.hold.unwrap_or_default();
        let before = tx
            .query_opt(
                "SELECT relay, session, lease_until > clock_timestamp(), owner,
                        lease_until + make_interval(secs => $2) > clock_timestamp()
                 FROM ferry_sessions WHERE name = $1 FOR UPDATE",
                &[&claim.name, &seconds(hold)],
            )
            .await?;
        let (live, takeover) = match &before {
            Some(row) => {
                let (live, owner): (bool, String) = (row.try_get(2)?, row.try_get(3)?);
                // A session that ended cleanly removed its row: this one's
                // relay died, so its owner's hold runs from the lease's end,
                // as a relay restarted after a crash holds what it served.
                let held_since_crash: bool = row.try_get(4)?;
                if claim.hold.is_some()
                    && !live
                    && held_since_crash
                    && owner != claim.owner
                    && !owner.is_empty()
                {
                    return Ok(SessionClaimed::Held);
                }
                (live, live && owner == claim.owner)
            }
            None => (false, false),
        };
        // Read after the session row: the relay whose session ended saved
        // the hold before it removed that row, so either the row or the
        // hold is seen.
        if claim.hold.is_some() && !live {
            let held = tx
                .query_opt(
                    "SELECT 1 FROM names WHERE name = $1 AND owner <> $2 AND hold_until > $3",
                    &[&claim.name, &claim.owner, &now_micros()],
                )
                .await?;
            if held.is_some() {
                return Ok(SessionClaimed::Held);
            }
        }
        if let (Some(max), false) = (claim.max_per_owner, takeover) {
            let held: i64 = tx
                .query_one(
                    "SELECT count(*) FROM ferry_sessions
                     WHERE owner = $1 AND name <> $2 AND lease_until > clock_timestamp()",
                    &[&claim.owner, &claim.name],
                )
                .await?
                .try_get(0)?;
            if usize::try_from(held).unwrap_or(usize::MAX) >= max {
                return Ok(SessionClaimed::TooMany(max));
            }
        }
        // The update's own condition decides, so that two relays inserting
        // the same new name at once cannot both win.
        let granted = tx
            .execute(
                "INSERT INTO ferry_sessions (name, relay, url, owner, session, lease_until)
                 VALUES ($1, $2, $3, $4, $5, clock_timestamp() + make_interval(secs => $6))
                 ON CONFLICT (name) DO UPDATE SET relay = EXCLUDED.relay, url = EXCLUDED.url,
                     owner = EXCLUDED.owner, session = EXCLUDED.session,
                     lease_until = EXCLUDED.lease_until
                 WHERE ferry_sessions.lease_until <= clock_timestamp()
                    OR ferry_sessions.relay = EXCLUDED.relay
                    OR (ferry_sessions.owner = EXCLUDED.owner AND EXCLUDED.owner <> '')",
                &[
                    &claim.name,
                    &claim.relay,
                    &claim.url,
                    &claim.owner,
                    &claim.session,
                    &seconds(claim.lease),
                ],
            )
            .await?;
        if granted == 0 {
            return Ok(SessionClaimed::InUse);
        }
        let mut replaced = None;
        if let Some(row) = before {
            let (relay, session, live): (String, i64, bool) =
                (row.try_get(0)?, row.try_get(1)?, row.try_get(2)?);
            if live && relay != claim.relay {
                tx.execute(
                    "SELECT pg_notify($1, $2)",
                    &[&channel(&relay), &takeover_payload(claim.name, session)],
                )
                .await?;
                replaced = Some((relay, session));
            }
        }
        tx.commit().await?;
        Ok(SessionClaimed::Yes(replaced))
    }

    /// Renews `relay`'s leases on `names`; returns the names renewed. A name
    /// missing from the answer is no longer this relay's.
    pub async fn renew_sessions(
        &self,
        relay: &str,
        names: &[String],
        lease: Duration,
    ) -> Result<Vec<String>, StoreError> {
        if names.is_empty() {
            return Ok(Vec::new());
        }
        let rows = self
            .client()
            .await?
            .query(
                "UPDATE ferry_sessions SET lease_until = clock_timestamp() + make_interval(secs => $3)
                 WHERE relay = $1 AND name = ANY($2) RETURNING name",
                &[&relay, &names, &seconds(lease)],
            )
            .await?;
        rows.iter()
            .map(|row| row.try_get(0).map_err(StoreError::from))
            .collect()
    }

    /// Ends `relay`'s session `session` on `name`; `false` when the row was
    /// no longer that session's (another relay or session took it over).
    pub async fn end_session(
        &self,
        name: &str,
        relay: &str,
        session: i64,
    ) -> Result<bool, StoreError> {
        let ended = self
            .client()
            .await?
            .execute(
                "DELETE FROM ferry_sessions WHERE name = $1 AND relay = $2 AND session = $3",
                &[&name, &relay, &session],
            )
            .await?;
        Ok(ended > 0)
    }

    /// Ends every session of `relay`, as it shuts down.
    pub async fn end_relay_sessions(&self, relay: &str) -> Result<u64, StoreError> {
        Ok(self
            .client()
            .await?
            .execute("DELETE FROM ferry_sessions WHERE relay = $1", &[&relay])
            .await?)
    }

    /// The relay other than `except` whose live lease holds `name`.
    pub async fn session_holder(
        &self,
        name: &str,
        except: &str,
    ) -> Result<Option<SessionHolder>, StoreError> {
        let row = self
            .client()
            .await?
            .query_opt(
                "SELECT relay, url, owner, session FROM ferry_sessions
                 WHERE name = $1 AND relay <> $2 AND lease_until > clock_timestamp()",
                &[&name, &except],
            )
            .await?;
        row.map(|row| {
            Ok(SessionHolder {
                relay: row.try_get(0)?,
                url: row.try_get(1)?,
                owner: row.try_get(2)?,
                session: row.try_get(3)?,
            })
        })
        .transpose()
    }

    /// The owner of `name`'s last session when its relay died less than
    /// `hold` ago and nobody has claimed the name since: the name is held
    /// for them ([`SessionClaim::hold`]). Anonymous sessions hold nothing.
    pub async fn held_after_crash(
        &self,
        name: &str,
        hold: Duration,
    ) -> Result<Option<String>, StoreError> {
        let row = self
            .client()
            .await?
            .query_opt(
                "SELECT owner FROM ferry_sessions
                 WHERE name = $1 AND owner <> '' AND lease_until <= clock_timestamp()
                   AND lease_until + make_interval(secs => $2) > clock_timestamp()",
                &[&name, &seconds(hold)],
            )
            .await?;
        Ok(row.map(|row| row.try_get(0)).transpose()?)
    }
}

/// A connection of its own that listens on one channel: a pooled
/// connection would drop notifications between calls.
pub struct Listener {
    /// Keeps the session open.
    _client: tokio_postgres::Client,
    /// The payloads, as they arrive.
    payloads: mpsc::Receiver<String>,
    /// Drives the connection; ends with it.
    _connection: AbortOnDropHandle<()>,
}

impl Listener {
    /// Connects to the database as `config` and `tls` say, and listens on
    /// `channel`.
    pub(super) async fn start(
        config: &tokio_postgres::Config,
        tls: MakeRustlsConnect,
        channel: &str,
    ) -> Result<Self, StoreError> {
        let (client, mut connection) = config.connect(tls).await?;
        let (sender, payloads) = mpsc::channel(NOTIFICATIONS_QUEUED);
        let driver = tokio::spawn(async move {
            let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(message) = futures_util::StreamExt::next(&mut messages).await {
                match message {
                    Ok(AsyncMessage::Notification(note)) => {
                        if sender.send(note.payload().to_owned()).await.is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(err) => {
                        tracing::debug!(%err, "session listener's connection failed");
                        return;
                    }
                }
            }
        });
        // The channel is built from hex only (see `channel`).
        client.batch_execute(&format!("LISTEN {channel}")).await?;
        Ok(Self {
            _client: client,
            payloads,
            _connection: AbortOnDropHandle::new(driver),
        })
    }

    /// The next notification's payload; `None` once the connection ended.
    pub async fn next(&mut self) -> Option<String> {
        self.payloads.recv().await
    }
}

#[cfg(test)]
mod tests {
    use super::{channel, parse_takeover, takeover_payload};

    #[test]
    fn takeover_notifications_read_back() {
        let payload = takeover_payload("brave-otter", 42);
        assert_eq!(
            parse_takeover(&payload),
            Some(("brave-otter".to_owned(), 42))
        );
        assert_eq!(parse_takeover("junk"), None);
        assert_eq!(parse_takeover("x demo"), None);
        assert_eq!(channel("0a1b"), "ferry_relay_0a1b");
    }
}
