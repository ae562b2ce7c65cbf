//! The dispatcher's tables on PostgreSQL, shared by every relay of a fleet:
//! each relay's dispatcher claims from the one queue.
//!
//! What SQLite gets from its single writer is here made explicit:
//! - a claim locks the deliveries it reads `FOR UPDATE SKIP LOCKED`, so
//!   concurrent claims take disjoint deliveries without waiting, and leases
//!   only those still pending and unleased when it writes;
//! - an ordered webhook is claimed under a transaction-scoped advisory lock
//!   on its id ([`ORDERED_LOCK`]), and only while none of its deliveries
//!   holds a live lease, so one of its deliveries is in flight across the
//!   fleet, the oldest;
//! - an event is accepted under an advisory lock on its (owner, id)
//!   ([`EVENT_LOCK`]), so two relays given one event id at once accept it
//!   once.
//!
//! Writers that change a webhook's deliveries in bulk or store attempts
//! lock the webhook's row first (sorted by id), so that they take turns
//! rather than wait on each other in a cycle. A claim locks no webhook
//! row; should it still meet another transaction in a cycle (a webhook
//! disabled while a claim holds its deliveries), PostgreSQL fails one of
//! the two: a claim is tried again at the next round, and a finish's
//! deliveries stay leased and are attempted again once the lease ends.

use std::collections::BTreeMap;

use async_trait::async_trait;
use bytes::Bytes;
use deadpool_postgres::{Client, Transaction};
use tokio_postgres::Row;

use super::Postgres;
use crate::store::{
    listens_to, now_micros, AttemptRecord, Claimed, DeliveryRecord, DeliveryState, Enqueued,
    EventTypeRecord, Finished, Micros, NewEvent, Next, StoreError, WebhookRecord, Webhooks,
};

/// The advisory lock class (first key) a claim of an ordered webhook takes,
/// with a hash of the webhook's id as second key. Two keys of 32 bits are a
/// key space apart from the migrations' single 64-bit key. A hash shared by
/// two webhooks only makes their claims take turns.
const ORDERED_LOCK: i32 = 0x6665_0001;

/// The advisory lock class an event's acceptance takes, with a hash of its
/// owner and id. The dedup window is a time, not a key: a unique index
/// cannot say "this id, within the last day", so acceptances of one id
/// take turns and each looks at what the previous one committed.
const EVENT_LOCK: i32 = 0x6665_0002;

/// The columns a webhook is read from, in [`webhook_of`]'s order.
const WEBHOOK_COLUMNS: &str = "w.id, w.owner, w.name, w.method, w.url, w.actions::text, \
     w.headers::text, w.enabled, w.ordered, w.secret, w.previous_secret, w.previous_until, \
     w.disabled_reason, w.failing_since, w.created_at, w.updated_at";

/// The columns a delivery is read from, in [`delivery_of`]'s order.
const DELIVERY_COLUMNS: &str = "d.id, d.seq, d.webhook_id, e.owner, e.id, e.type, e.payload, \
     d.state, d.attempts, d.max_attempts, d.next_at, d.last_status, d.last_error, d.created_at";

/// Takes the advisory locks of the ordered webhooks not skipped (`$1`)
/// that have pending deliveries, each if no other claim holds it; returns
/// those taken. Whether a webhook may be claimed is read by a later
/// statement: one that began before a concurrent claim committed would
/// not see its lease.
const LOCK_ORDERED: &str = "SELECT id FROM (
        SELECT w.id FROM webhooks w
        WHERE w.ordered AND w.enabled AND NOT (w.id = ANY($1::text[]))
          AND EXISTS (SELECT 1 FROM deliveries p WHERE p.webhook_id = w.id AND p.state = 'pending')
        OFFSET 0) o
     WHERE pg_try_advisory_xact_lock($2, hashtext(o.id))";

/// The oldest pending delivery of each ordered webhook of `$2`, if none of
/// its pending deliveries holds a lease live at `$1`: its `seq`, `next_at`
/// and owner. Looking for any live lease, not only the oldest's, keeps one
/// in flight even when an older delivery becomes pending again (a resend)
/// or commits late (two events accepted at once by two relays).
const ORDERED_HEADS: &str = "SELECT h.seq, h.next_at, w.owner FROM webhooks w
     CROSS JOIN LATERAL (SELECT d.seq, d.next_at FROM deliveries d
          WHERE d.webhook_id = w.id AND d.state = 'pending' ORDER BY d.seq LIMIT 1) h
     WHERE w.id = ANY($2::text[]) AND w.ordered AND w.enabled
       AND NOT EXISTS (SELECT 1 FROM deliveries l
          WHERE l.webhook_id = w.id AND l.state = 'pending' AND l.leased_until >= $1)";

/// Up to `$3` deliveries of each unordered webhook not skipped (`$2`), due
/// and unleased at `$1`, oldest first, locked; rows another claim has
/// locked are passed over, not waited for.
const UNORDERED_DUE: &str = "SELECT d.seq, w.owner FROM webhooks w
     CROSS JOIN LATERAL (SELECT seq FROM deliveries
          WHERE webhook_id = w.id AND state = 'pending'
            AND (leased_until IS NULL OR leased_until < $1) AND next_at <= $1
          ORDER BY seq LIMIT $3 FOR UPDATE SKIP LOCKED) d
     WHERE NOT w.ordered AND w.enabled AND NOT (w.id = ANY($2::text[]))";

/// Leases deliveries `$1` until `$2` if they are still pending and
/// unleased at `$3` (a concurrent change since they were read is seen
/// here), and reads them with their event and webhook.
fn lease_sql() -> String {
    format!(
        "WITH taken AS (
            UPDATE deliveries d SET leased_until = $2
            WHERE d.seq = ANY($1::bigint[]) AND d.state = 'pending'
              AND (d.leased_until IS NULL OR d.leased_until < $3)
            RETURNING d.*)
         SELECT {DELIVERY_COLUMNS}, {WEBHOOK_COLUMNS} FROM taken d
         JOIN events e ON e.key = d.event JOIN webhooks w ON w.id = d.webhook_id
         ORDER BY d.seq"
    )
}

/// When the next delivery a claim could take at `$1` (or later) is due,
/// of the webhooks not skipped (`$2`).
const NEXT_DUE: &str = "SELECT MIN(at) FROM (
        SELECT (SELECT MIN(d.next_at) FROM deliveries d
            WHERE d.webhook_id = w.id AND d.state = 'pending'
              AND (d.leased_until IS NULL OR d.leased_until < $1)) AS at
        FROM webhooks w
        WHERE NOT w.ordered AND w.enabled AND NOT (w.id = ANY($2::text[]))
        UNION ALL
        SELECT h.next_at FROM webhooks w
        CROSS JOIN LATERAL (SELECT d.seq, d.next_at FROM deliveries d
            WHERE d.webhook_id = w.id AND d.state = 'pending' ORDER BY d.seq LIMIT 1) h
        WHERE w.ordered AND w.enabled AND NOT (w.id = ANY($2::text[]))
          AND NOT EXISTS (SELECT 1 FROM deliveries l
              WHERE l.webhook_id = w.id AND l.state = 'pending' AND l.leased_until >= $1)
     ) due";

fn corrupt(what: &str) -> StoreError {
    StoreError(format!("a stored {what} is corrupt"))
}

/// A stored count as a `u32`.
fn count_of(row: &Row, at: usize) -> Result<u32, StoreError> {
    u32::try_from(row.try_get::<_, i64>(at)?).map_err(|_| corrupt("count"))
}

/// A stored status code.
fn status_of(row: &Row, at: usize) -> Result<Option<u16>, StoreError> {
    row.try_get::<_, Option<i32>>(at)?
        .map(|s| u16::try_from(s).map_err(|_| corrupt("status code")))
        .transpose()
}

fn webhook_of(row: &Row, at: usize) -> Result<WebhookRecord, StoreError> {
    let actions: String = row.try_get(at + 5)?;
    let headers: String = row.try_get(at + 6)?;
    let previous: Option<String> = row.try_get(at + 10)?;
    let previous_until: Option<Micros> = row.try_get(at + 11)?;
    Ok(WebhookRecord {
        id: row.try_get(at)?,
        owner: row.try_get(at + 1)?,
        name: row.try_get(at + 2)?,
        method: row.try_get(at + 3)?,
        url: row.try_get(at + 4)?,
        actions: serde_json::from_str(&actions).map_err(|_| corrupt("action list"))?,
        headers: serde_json::from_str(&headers).map_err(|_| corrupt("header list"))?,
        enabled: row.try_get(at + 7)?,
        ordered: row.try_get(at + 8)?,
        secret: row.try_get(at + 9)?,
        previous_secret: previous.zip(previous_until),
        disabled_reason: row.try_get(at + 12)?,
        failing_since: row.try_get(at + 13)?,
        created_at: row.try_get(at + 14)?,
        updated_at: row.try_get(at + 15)?,
    })
}

fn delivery_of(row: &Row) -> Result<DeliveryRecord, StoreError> {
    let state: String = row.try_get(7)?;
    Ok(DeliveryRecord {
        id: row.try_get(0)?,
        seq: row.try_get(1)?,
        webhook: row.try_get(2)?,
        owner: row.try_get(3)?,
        event: row.try_get(4)?,
        kind: row.try_get(5)?,
        payload: Bytes::from(row.try_get::<_, Vec<u8>>(6)?),
        state: state.parse().map_err(StoreError)?,
        attempts: count_of(row, 8)?,
        max_attempts: count_of(row, 9)?,
        next_at: row.try_get(10)?,
        last_status: status_of(row, 11)?,
        last_error: row.try_get(12)?,
        created_at: row.try_get(13)?,
    })
}

/// The attempts of the deliveries `seqs`, each's in order of number.
async fn attempts_of(
    client: &Client,
    seqs: &[i64],
) -> Result<BTreeMap<i64, Vec<AttemptRecord>>, StoreError> {
    let statement = client
        .prepare_cached(
            "SELECT delivery, number, at, status, error, duration_ms, exchange_id
             FROM delivery_attempts WHERE delivery = ANY($1::bigint[]) ORDER BY delivery, number",
        )
        .await?;
    let mut attempts: BTreeMap<i64, Vec<AttemptRecord>> = BTreeMap::new();
    for row in client.query(&statement, &[&seqs]).await? {
        let exchange: String = row.try_get(6)?;
        attempts
            .entry(row.try_get(0)?)
            .or_default()
            .push(AttemptRecord {
                number: count_of(&row, 1)?,
                at: row.try_get(2)?,
                status: status_of(&row, 3)?,
                error: row.try_get(4)?,
                duration_ms: row.try_get::<_, i64>(5)?.try_into().unwrap_or(0),
                exchange: exchange.parse().map_err(|_| corrupt("exchange id"))?,
            });
    }
    Ok(attempts)
}

/// Deliveries read by a query of [`DELIVERY_COLUMNS`], with their attempts.
async fn with_attempts(
    client: &Client,
    rows: Vec<Row>,
) -> Result<Vec<(DeliveryRecord, Vec<AttemptRecord>)>, StoreError> {
    let deliveries = rows
        .iter()
        .map(delivery_of)
        .collect::<Result<Vec<_>, _>>()?;
    let seqs: Vec<i64> = deliveries.iter().map(|d| d.seq).collect();
    let mut attempts = attempts_of(client, &seqs).await?;
    Ok(deliveries
        .into_iter()
        .map(|d| {
            let mine = attempts.remove(&d.seq).unwrap_or_default();
            (d, mine)
        })
        .collect())
}

/// Up to `limit` of `candidates`, taking each owner's oldest in turn
/// (owners with older deliveries first), so that one account's backlog
/// does not hold back another's deliveries.
fn take_in_turns(candidates: BTreeMap<String, Vec<i64>>, limit: usize) -> Vec<i64> {
    let mut queues: Vec<std::vec::IntoIter<i64>> = candidates
        .into_values()
        .filter(|seqs| !seqs.is_empty())
        .map(|mut seqs| {
            seqs.sort_unstable();
            seqs.into_iter()
        })
        .collect();
    queues.sort_by_key(|q| q.as_slice().first().copied());
    let mut taken = Vec::new();
    while taken.len() < limit && !queues.is_empty() {
        queues.retain_mut(|queue| match queue.next() {
            Some(seq) if taken.len() < limit => {
                taken.push(seq);
                true
            }
            _ => false,
        });
    }
    taken
}

fn json_of<T: serde::Serialize>(value: &T) -> Result<String, StoreError> {
    serde_json::to_string(value).map_err(|err| StoreError(err.to_string()))
}

/// Locks the rows of `webhooks` (sorted), before any of their deliveries
/// is changed: the one order every writer follows.
async fn lock_webhooks(tx: &Transaction<'_>, webhooks: &[String]) -> Result<(), StoreError> {
    let statement = tx
        .prepare_cached("SELECT id FROM webhooks WHERE id = ANY($1::text[]) ORDER BY id FOR UPDATE")
        .await?;
    tx.query(&statement, &[&webhooks]).await?;
    Ok(())
}

/// Fails `webhook`'s pending deliveries with `reason`. An attempt in
/// flight keeps its lease until its result is stored, so a resend cannot
/// send the same delivery twice at once.
async fn fail_all(tx: &Transaction<'_>, webhook: &str, reason: &str) -> Result<u64, StoreError> {
    let statement = tx
        .prepare_cached(
            "UPDATE deliveries SET state = 'failed', last_error = $2
             WHERE webhook_id = $1 AND state = 'pending'",
        )
        .await?;
    Ok(tx.execute(&statement, &[&webhook, &reason]).await?)
}

async fn disable(
    tx: &Transaction<'_>,
    webhook: &str,
    reason: &str,
    now: Micros,
) -> Result<(), StoreError> {
    let statement = tx
        .prepare_cached(
            "UPDATE webhooks SET enabled = FALSE, disabled_reason = $2, updated_at = $3 WHERE id = $1",
        )
        .await?;
    tx.execute(&statement, &[&webhook, &reason, &now]).await?;
    fail_all(
        tx,
        webhook,
        &format!("not sent: the webhook was disabled ({reason})"),
    )
    .await?;
    Ok(())
}

/// Stores one attempt and what follows it; the webhook's row is locked.
async fn finish_one(tx: &Transaction<'_>, done: &Finished) -> Result<(), StoreError> {
    let attempt = &done.attempt;
    let (state, next_at) = match &done.next {
        Next::Succeeded => (DeliveryState::Succeeded, None),
        Next::RetryAt(at) => (DeliveryState::Pending, Some(*at)),
        Next::Failed | Next::DisableWebhook(_) => (DeliveryState::Failed, None),
    };
    let statement = tx
        .prepare_cached(
            // A delivery failed while its attempt ran (its webhook was
            // disabled) stays failed, unless the attempt delivered it.
            "WITH d AS (SELECT seq FROM deliveries WHERE id = $1),
             attempt AS (
                INSERT INTO delivery_attempts
                    (delivery, number, at, status, error, duration_ms, exchange_id)
                SELECT seq, $2::bigint, $3::bigint, $4::integer, $5::text, $6::bigint, $7::text FROM d
                ON CONFLICT (delivery, number) DO UPDATE SET at = EXCLUDED.at,
                    status = EXCLUDED.status, error = EXCLUDED.error,
                    duration_ms = EXCLUDED.duration_ms, exchange_id = EXCLUDED.exchange_id)
             UPDATE deliveries SET
                state = CASE WHEN state = 'pending' OR $8::text = 'succeeded' THEN $8::text ELSE state END,
                attempts = GREATEST(attempts, $2), leased_until = NULL,
                next_at = COALESCE($9, next_at), last_status = $4, last_error = $5
             FROM d WHERE deliveries.seq = d.seq
             RETURNING deliveries.webhook_id",
        )
        .await?;
    let found = tx
        .query_opt(
            &statement,
            &[
                &done.delivery,
                &i64::from(attempt.number),
                &attempt.at,
                &attempt.status.map(i32::from),
                &attempt.error,
                &i64::try_from(attempt.duration_ms).unwrap_or(i64::MAX),
                &attempt.exchange.to_string(),
                &state.as_str(),
                &next_at,
            ],
        )
        .await?;
    // The webhook was deleted while the attempt ran.
    let Some(found) = found else {
        return Ok(());
    };
    let webhook: String = found.try_get(0)?;
    match &done.next {
        Next::Succeeded => {
            let statement = tx
                .prepare_cached(
                    // Written only when it changes: a row version per
                    // success would leave the webhook's row thousands of
                    // dead versions for every claim to step over.
                    "UPDATE webhooks SET failing_since = NULL
                     WHERE id = $1 AND failing_since IS NOT NULL",
                )
                .await?;
            tx.execute(&statement, &[&webhook]).await?;
        }
        Next::DisableWebhook(reason) => disable(tx, &webhook, reason, attempt.at).await?,
        Next::RetryAt(_) | Next::Failed => {
            let statement = tx
                .prepare_cached(
                    "UPDATE webhooks SET failing_since = COALESCE(failing_since, $2) WHERE id = $1
                     RETURNING enabled, failing_since",
                )
                .await?;
            let row = tx.query_opt(&statement, &[&webhook, &attempt.at]).await?;
            let since = match row {
                Some(row) if row.try_get::<_, bool>(0)? => row.try_get::<_, Option<Micros>>(1)?,
                _ => None,
            };
            if let Some(since) = since {
                if attempt.at - since >= done.disable_after {
                    let days = done.disable_after as f64 / 86_400_000_000.0;
                    disable(
                        tx,
                        &webhook,
                        &format!("its deliveries failed for {days:.1} days without a success"),
                        attempt.at,
                    )
                    .await?;
                }
            }
        }
    }
    Ok(())
}

/// The number of rows a count or `limit` stands for, for SQL.
fn sql_count(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

#[async_trait]
impl Webhooks for Postgres {
    async fn save_webhook(&self, webhook: WebhookRecord) -> Result<(), StoreError> {
        let (previous, previous_until) = webhook.previous_secret.clone().unzip();
        let actions = json_of(&webhook.actions)?;
        let headers = json_of(&webhook.headers)?;
        let client = self.client().await?;
        let statement = client
            .prepare_cached(
                "INSERT INTO webhooks (id, owner, name, method, url, actions, headers, enabled,
                    ordered, secret, previous_secret, previous_until, disabled_reason,
                    failing_since, created_at, updated_at)
                 VALUES ($1, $2, $3, $4, $5, $6::text::jsonb, $7::text::jsonb, $8, $9, $10, $11,
                    $12, $13, $14, $15, $16)
                 ON CONFLICT (id) DO UPDATE SET owner = EXCLUDED.owner, name = EXCLUDED.name,
                    method = EXCLUDED.method, url = EXCLUDED.url, actions = EXCLUDED.actions,
                    headers = EXCLUDED.headers, enabled = EXCLUDED.enabled,
                    ordered = EXCLUDED.ordered, secret = EXCLUDED.secret,
                    previous_secret = EXCLUDED.previous_secret,
                    previous_until = EXCLUDED.previous_until,
                    disabled_reason = EXCLUDED.disabled_reason,
                    failing_since = EXCLUDED.failing_since, created_at = EXCLUDED.created_at,
                    updated_at = EXCLUDED.updated_at",
            )
            .await?;
        client
            .execute(
                &statement,
                &[
                    &webhook.id,
                    &webhook.owner,
                    &webhook.name,
                    &webhook.method,
                    &webhook.url,
                    &actions,
                    &headers,
                    &webhook.enabled,
                    &webhook.ordered,
                    &webhook.secret,
                    &previous,
                    &previous_until,
                    &webhook.disabled_reason,
                    &webhook.failing_since,
                    &webhook.created_at,
                    &webhook.updated_at,
                ],
            )
            .await?;
        Ok(())
    }

    async fn webhook(
        &self,
        id: &str,
        owner: Option<&str>,
    ) -> Result<Option<WebhookRecord>, StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(&format!(
                "SELECT {WEBHOOK_COLUMNS} FROM webhooks w
                 WHERE w.id = $1 AND ($2::text IS NULL OR w.owner = $2)"
            ))
            .await?;
        client
            .query_opt(&statement, &[&id, &owner])
            .await?
            .map(|row| webhook_of(&row, 0))
            .transpose()
    }

    async fn webhooks(
        &self,
        owner: Option<&str>,
    ) -> Result<Vec<(WebhookRecord, Option<DeliveryState>)>, StoreError> {
        let client = self.reader().await?;
        let statement = client
            .prepare_cached(&format!(
                "SELECT {WEBHOOK_COLUMNS},
                    (SELECT state FROM deliveries d WHERE d.webhook_id = w.id
                     ORDER BY seq DESC LIMIT 1)
                 FROM webhooks w WHERE $1::text IS NULL OR w.owner = $1
                 ORDER BY w.created_at, w.id"
            ))
            .await?;
        let mut found = Vec::new();
        for row in client.query(&statement, &[&owner]).await? {
            let last: Option<String> = row.try_get(16)?;
            found.push((
                webhook_of(&row, 0)?,
                last.map(|s| s.parse()).transpose().map_err(StoreError)?,
            ));
        }
        Ok(found)
    }

    async fn delete_webhook(&self, id: &str, owner: Option<&str>) -> Result<bool, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let deleted = tx
            .execute(
                "DELETE FROM webhooks WHERE id = $1 AND ($2::text IS NULL OR owner = $2)",
                &[&id, &owner],
            )
            .await?;
        if deleted > 0 {
            tx.execute(
                "DELETE FROM delivery_attempts WHERE delivery IN
                    (SELECT seq FROM deliveries WHERE webhook_id = $1)",
                &[&id],
            )
            .await?;
            tx.execute("DELETE FROM deliveries WHERE webhook_id = $1", &[&id])
                .await?;
        }
        tx.commit().await?;
        Ok(deleted > 0)
    }

    async fn save_event_type(&self, event_type: EventTypeRecord) -> Result<(), StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(
                "INSERT INTO event_types (owner, name, description, example)
                 VALUES ($1, $2, $3, $4)
                 ON CONFLICT (owner, name) DO UPDATE SET description = EXCLUDED.description,
                    example = EXCLUDED.example",
            )
            .await?;
        client
            .execute(
                &statement,
                &[
                    &event_type.owner,
                    &event_type.name,
                    &event_type.description,
                    &event_type.example,
                ],
            )
            .await?;
        Ok(())
    }

    async fn event_types(&self, owner: Option<&str>) -> Result<Vec<EventTypeRecord>, StoreError> {
        let client = self.reader().await?;
        let statement = client
            .prepare_cached(
                "SELECT owner, name, description, example FROM event_types
                 WHERE $1::text IS NULL OR owner = $1 OR owner = '' ORDER BY name, owner",
            )
            .await?;
        client
            .query(&statement, &[&owner])
            .await?
            .iter()
            .map(|r| {
                Ok(EventTypeRecord {
                    owner: r.try_get(0)?,
                    name: r.try_get(1)?,
                    description: r.try_get(2)?,
                    example: r.try_get(3)?,
                })
            })
            .collect()
    }

    async fn enqueue(&self, event: NewEvent, dedup: Micros) -> Result<Enqueued, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let lock = tx
            .prepare_cached(
                "SELECT pg_advisory_xact_lock($1, hashtext($2::text || ' ' || $3::text))",
            )
            .await?;
        tx.execute(&lock, &[&EVENT_LOCK, &event.owner, &event.id])
            .await?;
        // A statement of its own, after the lock: it sees what an
        // acceptance of the same id that held the lock committed.
        let seen = tx
            .prepare_cached(
                "SELECT EXISTS (SELECT 1 FROM events WHERE owner = $1 AND id = $2 AND created_at >= $3)",
            )
            .await?;
        let seen: bool = tx
            .query_one(&seen, &[&event.owner, &event.id, &(event.at - dedup)])
            .await?
            .try_get(0)?;
        if seen {
            return Ok(Enqueued::Duplicate);
        }
        let webhooks = tx
            .prepare_cached(&format!(
                "SELECT {WEBHOOK_COLUMNS} FROM webhooks w
                 WHERE w.owner = $1 AND ($2::text IS NULL OR w.id = $2)
                 ORDER BY w.created_at, w.id"
            ))
            .await?;
        let mut targets = Vec::new();
        for row in tx.query(&webhooks, &[&event.owner, &event.only]).await? {
            let webhook = webhook_of(&row, 0)?;
            let wanted = event.only.is_some()
                || (webhook.enabled && listens_to(&webhook.actions, &event.kind));
            if wanted {
                targets.push(webhook.id);
            }
        }
        let insert = tx
            .prepare_cached(
                "INSERT INTO events (owner, id, type, payload, created_at)
                 VALUES ($1, $2, $3, $4, $5) RETURNING key",
            )
            .await?;
        // An event no webhook takes is kept for its id only.
        let payload: &[u8] = if targets.is_empty() {
            &[]
        } else {
            &event.payload
        };
        let key: i64 = tx
            .query_one(
                &insert,
                &[&event.owner, &event.id, &event.kind, &payload, &event.at],
            )
            .await?
            .try_get(0)?;
        if !targets.is_empty() {
            let ids: Vec<String> = targets.iter().map(|_| delivery_id()).collect();
            // In the targets' order, so that `seq` follows webhook creation.
            let queue = tx
                .prepare_cached(
                    "INSERT INTO deliveries (id, webhook_id, event, state, attempts, max_attempts,
                        next_at, created_at)
                     SELECT t.id, t.webhook, $3::bigint, 'pending', 0, $4::bigint, $5::bigint, $5::bigint
                     FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS t (id, webhook, n)
                     ORDER BY t.n",
                )
                .await?;
            tx.execute(
                &queue,
                &[
                    &ids,
                    &targets,
                    &key,
                    &i64::from(event.max_attempts),
                    &event.at,
                ],
            )
            .await?;
        }
        tx.commit().await?;
        Ok(Enqueued::Queued(targets.len()))
    }

    async fn claim(
        &self,
        now: Micros,
        limit: usize,
        lease_until: Micros,
        skip: Vec<String>,
    ) -> Result<Vec<Claimed>, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        // Candidates per owner, oldest first.
        let mut candidates: BTreeMap<String, Vec<i64>> = BTreeMap::new();
        let lock = tx.prepare_cached(LOCK_ORDERED).await?;
        let locked: Vec<String> = tx
            .query(&lock, &[&skip, &ORDERED_LOCK])
            .await?
            .iter()
            .map(|r| r.try_get(0))
            .collect::<Result<_, _>>()?;
        if !locked.is_empty() {
            let heads = tx.prepare_cached(ORDERED_HEADS).await?;
            for row in tx.query(&heads, &[&now, &locked]).await? {
                let (seq, next_at): (i64, Micros) = (row.try_get(0)?, row.try_get(1)?);
                if next_at <= now {
                    candidates.entry(row.try_get(2)?).or_default().push(seq);
                }
            }
        }
        let due = tx.prepare_cached(UNORDERED_DUE).await?;
        for row in tx.query(&due, &[&now, &skip, &sql_count(limit)]).await? {
            candidates
                .entry(row.try_get(1)?)
                .or_default()
                .push(row.try_get(0)?);
        }
        let seqs = take_in_turns(candidates, limit);
        let mut claimed = Vec::new();
        if !seqs.is_empty() {
            let lease = tx.prepare_cached(&lease_sql()).await?;
            for row in tx.query(&lease, &[&seqs, &lease_until, &now]).await? {
                claimed.push(Claimed {
                    delivery: delivery_of(&row)?,
                    webhook: webhook_of(&row, 14)?,
                });
            }
        }
        tx.commit().await?;
        Ok(claimed)
    }

    async fn release(&self, ids: Vec<String>, due: Option<Micros>) -> Result<(), StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(
                "UPDATE deliveries SET leased_until = NULL, next_at = COALESCE($2, next_at)
                 WHERE id = ANY($1::text[])",
            )
            .await?;
        client.execute(&statement, &[&ids, &due]).await?;
        Ok(())
    }

    /// Gives back only the leases that have run out. SQLite's store has
    /// one relay, so at its start nothing is in flight; here other relays
    /// of the fleet may be attempting deliveries while this one starts,
    /// and giving their leases back would let a second attempt of the same
    /// delivery start beside theirs. A relay that died leaves its leases to
    /// run out (the attempt's timeout and a margin): then any relay's claim
    /// takes those deliveries again, under the same ids, as it would have
    /// without this call; releasing them only tidies the queue.
    async fn release_all(&self) -> Result<u64, StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(
                "UPDATE deliveries SET leased_until = NULL
                 WHERE leased_until IS NOT NULL AND leased_until < $1",
            )
            .await?;
        Ok(client.execute(&statement, &[&now_micros()]).await?)
    }

    async fn next_due(&self, now: Micros, skip: Vec<String>) -> Result<Option<Micros>, StoreError> {
        let client = self.client().await?;
        let statement = client.prepare_cached(NEXT_DUE).await?;
        Ok(client
            .query_one(&statement, &[&now, &skip])
            .await?
            .try_get(0)?)
    }

    async fn finish(&self, results: Vec<Finished>) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let ids: Vec<&str> = results.iter().map(|r| r.delivery.as_str()).collect();
        let webhooks = tx
            .prepare_cached("SELECT DISTINCT webhook_id FROM deliveries WHERE id = ANY($1::text[])")
            .await?;
        let webhooks: Vec<String> = tx
            .query(&webhooks, &[&ids])
            .await?
            .iter()
            .map(|r| r.try_get(0))
            .collect::<Result<_, _>>()?;
        lock_webhooks(&tx, &webhooks).await?;
        for done in &results {
            finish_one(&tx, done).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn fail_pending(&self, webhook: &str, reason: &str) -> Result<u64, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        lock_webhooks(&tx, &[webhook.to_owned()]).await?;
        let failed = fail_all(&tx, webhook, reason).await?;
        tx.commit().await?;
        Ok(failed)
    }

    async fn deliveries(
        &self,
        webhook: &str,
        state: Option<DeliveryState>,
        before: Option<i64>,
        limit: usize,
    ) -> Result<Vec<(DeliveryRecord, Vec<AttemptRecord>)>, StoreError> {
        let client = self.reader().await?;
        let statement = client
            .prepare_cached(&format!(
                "SELECT {DELIVERY_COLUMNS} FROM deliveries d JOIN events e ON e.key = d.event
                 WHERE d.webhook_id = $1 AND ($2::text IS NULL OR d.state = $2)
                   AND ($3::bigint IS NULL OR d.seq < $3)
                 ORDER BY d.seq DESC LIMIT $4"
            ))
            .await?;
        let rows = client
            .query(
                &statement,
                &[
                    &webhook,
                    &state.map(DeliveryState::as_str),
                    &before,
                    &sql_count(limit),
                ],
            )
            .await?;
        with_attempts(&client, rows).await
    }

    async fn delivery(
        &self,
        id: &str,
        owner: Option<&str>,
    ) -> Result<Option<(DeliveryRecord, Vec<AttemptRecord>)>, StoreError> {
        let client = self.reader().await?;
        let statement = client
            .prepare_cached(&format!(
                "SELECT {DELIVERY_COLUMNS} FROM deliveries d JOIN events e ON e.key = d.event
                 WHERE d.id = $1 AND ($2::text IS NULL OR e.owner = $2)"
            ))
            .await?;
        let rows = client.query(&statement, &[&id, &owner]).await?;
        Ok(with_attempts(&client, rows).await?.pop())
    }

    async fn resend(&self, id: &str, owner: Option<&str>, now: Micros) -> Result<bool, StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(
                "UPDATE deliveries SET state = 'pending', next_at = $3,
                    max_attempts = attempts + 1, leased_until = NULL
                 WHERE id = $1 AND state != 'pending'
                   AND (leased_until IS NULL OR leased_until < $3)
                   AND ($2::text IS NULL OR event IN (SELECT key FROM events WHERE owner = $2))",
            )
            .await?;
        Ok(client.execute(&statement, &[&id, &owner, &now]).await? > 0)
    }

    async fn recover(&self, webhook: &str, since: Micros, now: Micros) -> Result<u64, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        lock_webhooks(&tx, &[webhook.to_owned()]).await?;
        let changed = tx
            .execute(
                "UPDATE deliveries SET state = 'pending', next_at = $3,
                    max_attempts = attempts + 1, leased_until = NULL
                 WHERE webhook_id = $1 AND state = 'failed' AND created_at >= $2
                   AND (leased_until IS NULL OR leased_until < $3)",
                &[&webhook, &since, &now],
            )
            .await?;
        tx.commit().await?;
        Ok(changed)
    }

    async fn pending(&self, owner: &str) -> Result<u64, StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(
                "SELECT COUNT(*) FROM webhooks w JOIN deliveries d ON d.webhook_id = w.id
                 WHERE w.owner = $1 AND d.state = 'pending'",
            )
            .await?;
        let count: i64 = client.query_one(&statement, &[&owner]).await?.try_get(0)?;
        Ok(u64::try_from(count).unwrap_or(0))
    }

    async fn prune_deliveries(&self, before: Micros) -> Result<u64, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        // The attempts go with the deliveries this statement removes, not
        // with those it read: one queued again meanwhile keeps them.
        let deleted: i64 = tx
            .query_one(
                "WITH gone AS (DELETE FROM deliveries WHERE created_at < $1 AND state != 'pending'
                    RETURNING seq),
                 attempts AS (DELETE FROM delivery_attempts
                    WHERE delivery IN (SELECT seq FROM gone))
                 SELECT COUNT(*) FROM gone",
                &[&before],
            )
            .await?
            .try_get(0)?;
        tx.execute(
            "DELETE FROM events WHERE created_at < $1
                AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.event = events.key)",
            &[&before],
        )
        .await?;
        tx.commit().await?;
        Ok(u64::try_from(deleted).unwrap_or(0))
    }
}

/// A new delivery id: `msg_` and a UUIDv7, so ids sort by queueing time.
fn delivery_id() -> String {
    format!("msg_{}", uuid::Uuid::now_v7().simple())
}
