//! The dispatcher's tables on SQLite. The queue is `deliveries`: a row is
//! written in the transaction that accepts its event and changed only in
//! transactions that store an attempt, so a kill at any moment leaves each
//! delivery either pending (and attempted again after the restart, under
//! the same id) or finished.

use std::collections::BTreeMap;

use async_trait::async_trait;
use bytes::Bytes;
use rusqlite::{params, Connection, OptionalExtension, Row};

use super::{immediate, Sqlite};
use crate::store::{
    listens_to, AttemptRecord, Claimed, DeliveryRecord, DeliveryState, Enqueued, EventTypeRecord,
    Finished, Micros, NewEvent, Next, StoreError, WebhookRecord, Webhooks,
};

/// The columns a webhook is read from, in [`webhook_of`]'s order.
const WEBHOOK_COLUMNS: &str = "w.id, w.owner, w.name, w.method, w.url, w.actions, w.headers, \
     w.enabled, w.ordered, w.secret, w.previous_secret, w.previous_until, w.disabled_reason, \
     w.failing_since, w.created_at, w.updated_at";

// Which pending deliveries may be claimed: unleased (or leased by an
// attempt that died), of a webhook not in the skip list, and for an
// ordered webhook only its oldest. The queries start from the webhooks,
// so that a skipped webhook's backlog, or an ordered one's beyond its
// oldest, is never read: a claim costs what it may take, not the length
// of the queue (draining 4,000 deliveries of an ordered webhook was
// quadratic: about 9 s in the store alone).

/// The oldest pending delivery of each ordered webhook not skipped (`?2`,
/// a JSON list), if unleased at `?1`: its `seq` and `next_at`.
const ORDERED_HEADS: &str = "SELECT d.seq, d.next_at, w.owner FROM webhooks w
     JOIN deliveries d ON d.seq = (SELECT MIN(p.seq) FROM deliveries p
          WHERE p.webhook_id = w.id AND p.state = 'pending')
     WHERE w.ordered = 1 AND w.enabled = 1 AND w.id NOT IN (SELECT value FROM json_each(?2))
       AND (d.leased_until IS NULL OR d.leased_until < ?1)";

/// The unordered webhooks not skipped (`?1`, a JSON list).
const UNORDERED: &str = "SELECT w.id, w.owner FROM webhooks w
     WHERE w.ordered = 0 AND w.enabled = 1 AND w.id NOT IN (SELECT value FROM json_each(?1))";

/// The deliveries of unordered webhook `?1` due and unleased at `?2`,
/// oldest first, read along its pending index; the caller stops reading
/// at its limit. (A bound `LIMIT` would make SQLite plan the statement
/// again at every use.)
const UNORDERED_DUE: &str = "SELECT seq FROM deliveries
     WHERE webhook_id = ?1 AND state = 'pending'
       AND (leased_until IS NULL OR leased_until < ?2) AND next_at <= ?2
     ORDER BY seq";

/// When the next delivery of an unordered webhook not skipped (`?2`) that
/// is unleased at `?1` is due; one webhook at a time, so that the planner
/// cannot choose to read the whole queue instead.
const UNORDERED_NEXT: &str = "SELECT MIN((SELECT MIN(d.next_at) FROM deliveries d
          WHERE d.webhook_id = w.id AND d.state = 'pending'
            AND (d.leased_until IS NULL OR d.leased_until < ?1)))
     FROM webhooks w
     WHERE w.ordered = 0 AND w.enabled = 1 AND w.id NOT IN (SELECT value FROM json_each(?2))";

/// The columns a delivery is read from, in [`delivery_of`]'s order.
const DELIVERY_COLUMNS: &str = "d.id, d.seq, d.webhook_id, e.owner, e.id, e.type, e.payload, \
     d.state, d.attempts, d.max_attempts, d.next_at, d.last_status, d.last_error, d.created_at";

fn corrupt(what: &str) -> StoreError {
    StoreError(format!("a stored {what} is corrupt"))
}

fn webhook_of(row: &Row<'_>, at: usize) -> Result<WebhookRecord, StoreError> {
    let actions: String = row.get(at + 5)?;
    let headers: String = row.get(at + 6)?;
    let previous: Option<String> = row.get(at + 10)?;
    let previous_until: Option<Micros> = row.get(at + 11)?;
    Ok(WebhookRecord {
        id: row.get(at)?,
        owner: row.get(at + 1)?,
        name: row.get(at + 2)?,
        method: row.get(at + 3)?,
        url: row.get(at + 4)?,
        actions: serde_json::from_str(&actions).map_err(|_| corrupt("action list"))?,
        headers: serde_json::from_str(&headers).map_err(|_| corrupt("header list"))?,
        enabled: row.get(at + 7)?,
        ordered: row.get(at + 8)?,
        secret: row.get(at + 9)?,
        previous_secret: previous.zip(previous_until),
        disabled_reason: row.get(at + 12)?,
        failing_since: row.get(at + 13)?,
        created_at: row.get(at + 14)?,
        updated_at: row.get(at + 15)?,
    })
}

fn delivery_of(row: &Row<'_>) -> Result<DeliveryRecord, StoreError> {
    let state: String = row.get(7)?;
    Ok(DeliveryRecord {
        id: row.get(0)?,
        seq: row.get(1)?,
        webhook: row.get(2)?,
        owner: row.get(3)?,
        event: row.get(4)?,
        kind: row.get(5)?,
        payload: Bytes::from(row.get::<_, Vec<u8>>(6)?),
        state: state.parse().map_err(StoreError)?,
        attempts: row.get(8)?,
        max_attempts: row.get(9)?,
        next_at: row.get(10)?,
        last_status: row.get(11)?,
        last_error: row.get(12)?,
        created_at: row.get(13)?,
    })
}

fn attempts_of(conn: &Connection, delivery: i64) -> Result<Vec<AttemptRecord>, StoreError> {
    let mut statement = conn.prepare_cached(
        "SELECT number, at, status, error, duration_ms, exchange_id FROM delivery_attempts
         WHERE delivery = ?1 ORDER BY number",
    )?;
    let mut rows = statement.query([delivery])?;
    let mut attempts = Vec::new();
    while let Some(row) = rows.next()? {
        let exchange: String = row.get(5)?;
        attempts.push(AttemptRecord {
            number: row.get(0)?,
            at: row.get(1)?,
            status: row.get(2)?,
            error: row.get(3)?,
            duration_ms: row.get::<_, i64>(4)?.try_into().unwrap_or(0),
            exchange: exchange.parse().map_err(|_| corrupt("exchange id"))?,
        });
    }
    Ok(attempts)
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

fn json_list_of(seqs: &[i64]) -> String {
    serde_json::to_string(seqs).unwrap_or_else(|_| "[]".to_owned())
}

fn json_list(items: &[String]) -> String {
    serde_json::to_string(items).unwrap_or_else(|_| "[]".to_owned())
}

/// Fails `webhook`'s pending deliveries with `reason`. An attempt in
/// flight keeps its lease until its result is stored, so a resend cannot
/// send the same delivery twice at once.
fn fail_all(conn: &Connection, webhook: &str, reason: &str) -> Result<u64, StoreError> {
    let failed = conn
        .prepare_cached(
            "UPDATE deliveries SET state = 'failed', last_error = ?2
             WHERE webhook_id = ?1 AND state = 'pending'",
        )?
        .execute(params![webhook, reason])?;
    Ok(u64::try_from(failed).unwrap_or(0))
}

fn disable(conn: &Connection, webhook: &str, reason: &str, now: Micros) -> Result<(), StoreError> {
    conn.prepare_cached(
        "UPDATE webhooks SET enabled = 0, disabled_reason = ?2, updated_at = ?3 WHERE id = ?1",
    )?
    .execute(params![webhook, reason, now])?;
    fail_all(
        conn,
        webhook,
        &format!("not sent: the webhook was disabled ({reason})"),
    )?;
    Ok(())
}

/// Stores one attempt and what follows it. The attempt is numbered after
/// the delivery's last one, so a late attempt and the one that claimed the
/// delivery after it both keep their row. What follows is applied only
/// while the delivery holds the finish's lease: one relay can outlive a
/// lease too (a long pause), and then a new claim's attempt is in flight.
fn finish_one(conn: &Connection, done: &Finished) -> Result<(), StoreError> {
    let found: Option<(i64, String, i64, bool)> = conn
        .prepare_cached(
            "UPDATE deliveries SET attempts = attempts + 1 WHERE id = ?1
             RETURNING seq, webhook_id, attempts, COALESCE(leased_until = ?2, 0)",
        )?
        .query_row(params![done.delivery, done.lease], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
        })
        .optional()?;
    // The webhook was deleted while the attempt ran.
    let Some((seq, webhook, number, mine)) = found else {
        return Ok(());
    };
    let attempt = &done.attempt;
    conn.prepare_cached(
        "INSERT INTO delivery_attempts
            (delivery, number, at, status, error, duration_ms, exchange_id)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?
    .execute(params![
        seq,
        number,
        attempt.at,
        attempt.status,
        attempt.error,
        i64::try_from(attempt.duration_ms).unwrap_or(i64::MAX),
        attempt.exchange.to_string(),
    ])?;
    if !mine {
        return Ok(());
    }
    let (state, next_at) = match &done.next {
        Next::Succeeded => (DeliveryState::Succeeded, None),
        Next::RetryAt(at) => (DeliveryState::Pending, Some(*at)),
        Next::Failed | Next::DisableWebhook(_) => (DeliveryState::Failed, None),
    };
    conn.prepare_cached(
        // A delivery failed while its attempt ran (its webhook was disabled)
        // stays failed, unless the attempt delivered it.
        "UPDATE deliveries SET
            state = CASE WHEN state = 'pending' OR ?2 = 'succeeded' THEN ?2 ELSE state END,
            leased_until = NULL, next_at = COALESCE(?3, next_at), last_status = ?4,
            last_error = ?5
         WHERE seq = ?1",
    )?
    .execute(params![
        seq,
        state.as_str(),
        next_at,
        attempt.status,
        attempt.error,
    ])?;
    match &done.next {
        Next::Succeeded => {
            conn.prepare_cached("UPDATE webhooks SET failing_since = NULL WHERE id = ?1")?
                .execute([&webhook])?;
        }
        Next::DisableWebhook(reason) => disable(conn, &webhook, reason, attempt.at)?,
        Next::RetryAt(_) | Next::Failed => {
            conn.prepare_cached(
                "UPDATE webhooks SET failing_since = COALESCE(failing_since, ?2) WHERE id = ?1",
            )?
            .execute(params![webhook, attempt.at])?;
            let since: Option<Micros> = conn
                .prepare_cached("SELECT failing_since FROM webhooks WHERE id = ?1 AND enabled = 1")?
                .query_row([&webhook], |r| r.get(0))
                .optional()?
                .flatten();
            if let Some(since) = since {
                if attempt.at - since >= done.disable_after {
                    let days = done.disable_after as f64 / 86_400_000_000.0;
                    disable(
                        conn,
                        &webhook,
                        &format!("its deliveries failed for {days:.1} days without a success"),
                        attempt.at,
                    )?;
                }
            }
        }
    }
    Ok(())
}

#[async_trait]
impl Webhooks for Sqlite {
    async fn save_webhook(&self, webhook: WebhookRecord) -> Result<(), StoreError> {
        self.write(move |conn| {
            let (previous, previous_until) = webhook.previous_secret.clone().unzip();
            let headers = serde_json::to_string(&webhook.headers)
                .map_err(|err| StoreError(err.to_string()))?;
            conn.prepare_cached(
                "INSERT OR REPLACE INTO webhooks (id, owner, name, method, url, actions, headers,
                    enabled, ordered, secret, previous_secret, previous_until, disabled_reason,
                    failing_since, created_at, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)",
            )?
            .execute(params![
                webhook.id,
                webhook.owner,
                webhook.name,
                webhook.method,
                webhook.url,
                json_list(&webhook.actions),
                headers,
                webhook.enabled,
                webhook.ordered,
                webhook.secret,
                previous,
                previous_until,
                webhook.disabled_reason,
                webhook.failing_since,
                webhook.created_at,
                webhook.updated_at,
            ])?;
            Ok(())
        })
        .await
    }

    async fn webhook(
        &self,
        id: &str,
        owner: Option<&str>,
    ) -> Result<Option<WebhookRecord>, StoreError> {
        let (id, owner) = (id.to_owned(), owner.map(str::to_owned));
        self.read(move |conn| {
            let mut statement = conn.prepare_cached(&format!(
                "SELECT {WEBHOOK_COLUMNS} FROM webhooks w WHERE w.id = ?1 AND (?2 IS NULL OR w.owner = ?2)"
            ))?;
            let mut rows = statement.query(params![id, owner])?;
            rows.next()?.map(|row| webhook_of(row, 0)).transpose()
        })
        .await
    }

    async fn webhooks(
        &self,
        owner: Option<&str>,
    ) -> Result<Vec<(WebhookRecord, Option<DeliveryState>)>, StoreError> {
        let owner = owner.map(str::to_owned);
        self.read(move |conn| {
            let mut statement = conn.prepare_cached(&format!(
                "SELECT {WEBHOOK_COLUMNS},
                    (SELECT state FROM deliveries d WHERE d.webhook_id = w.id ORDER BY seq DESC LIMIT 1)
                 FROM webhooks w WHERE ?1 IS NULL OR w.owner = ?1 ORDER BY w.created_at, w.id"
            ))?;
            let mut rows = statement.query([owner])?;
            let mut found = Vec::new();
            while let Some(row) = rows.next()? {
                let last: Option<String> = row.get(16)?;
                found.push((
                    webhook_of(row, 0)?,
                    last.map(|s| s.parse()).transpose().map_err(StoreError)?,
                ));
            }
            Ok(found)
        })
        .await
    }

    async fn delete_webhook(&self, id: &str, owner: Option<&str>) -> Result<bool, StoreError> {
        let (id, owner) = (id.to_owned(), owner.map(str::to_owned));
        self.write(move |conn| {
            let tx = immediate(conn)?;
            let deleted = tx
                .prepare_cached(
                    "DELETE FROM webhooks WHERE id = ?1 AND (?2 IS NULL OR owner = ?2)",
                )?
                .execute(params![id, owner])?;
            if deleted > 0 {
                tx.prepare_cached(
                    "DELETE FROM delivery_attempts WHERE delivery IN
                        (SELECT seq FROM deliveries WHERE webhook_id = ?1)",
                )?
                .execute([&id])?;
                tx.prepare_cached("DELETE FROM deliveries WHERE webhook_id = ?1")?
                    .execute([&id])?;
            }
            tx.commit()?;
            Ok(deleted > 0)
        })
        .await
    }

    async fn save_event_type(&self, event_type: EventTypeRecord) -> Result<(), StoreError> {
        self.write(move |conn| {
            conn.prepare_cached(
                "INSERT OR REPLACE INTO event_types (owner, name, description, example)
                 VALUES (?1, ?2, ?3, ?4)",
            )?
            .execute(params![
                event_type.owner,
                event_type.name,
                event_type.description,
                event_type.example
            ])?;
            Ok(())
        })
        .await
    }

    async fn event_types(&self, owner: Option<&str>) -> Result<Vec<EventTypeRecord>, StoreError> {
        let owner = owner.map(str::to_owned);
        self.read(move |conn| {
            let mut statement = conn.prepare_cached(
                "SELECT owner, name, description, example FROM event_types
                 WHERE ?1 IS NULL OR owner = ?1 OR owner = '' ORDER BY name, owner",
            )?;
            let found = statement
                .query_map([owner], |r| {
                    Ok(EventTypeRecord {
                        owner: r.get(0)?,
                        name: r.get(1)?,
                        description: r.get(2)?,
                        example: r.get(3)?,
                    })
                })?
                .collect::<Result<_, _>>()?;
            Ok(found)
        })
        .await
    }

    async fn enqueue(&self, event: NewEvent, dedup: Micros) -> Result<Enqueued, StoreError> {
        self.write(move |conn| {
            let tx = immediate(conn)?;
            let seen: bool = tx
                .prepare_cached(
                    "SELECT EXISTS (SELECT 1 FROM events WHERE owner = ?1 AND id = ?2 AND created_at >= ?3)",
                )?
                .query_row(params![event.owner, event.id, event.at - dedup], |r| {
                    r.get(0)
                })?;
            if seen {
                return Ok(Enqueued::Duplicate);
            }
            let targets: Vec<String> = {
                let mut targets = Vec::new();
                let mut statement = tx.prepare_cached(&format!(
                    "SELECT {WEBHOOK_COLUMNS} FROM webhooks w
                     WHERE w.owner = ?1 AND (?2 IS NULL OR w.id = ?2)"
                ))?;
                let mut rows = statement.query(params![event.owner, event.only])?;
                while let Some(row) = rows.next()? {
                    let webhook = webhook_of(row, 0)?;
                    let wanted = event.only.is_some()
                        || (webhook.enabled && listens_to(&webhook.actions, &event.kind));
                    if wanted {
                        targets.push((webhook.created_at, webhook.id));
                    }
                }
                // In creation order, sorted here: an ORDER BY beside a bound
                // owner is planned again at every use.
                targets.sort_unstable();
                targets.into_iter().map(|(_, id)| id).collect()
            };
            tx.prepare_cached(
                "INSERT INTO events (owner, id, type, payload, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?
            .execute(params![
                event.owner,
                event.id,
                event.kind,
                // An event no webhook takes is kept for its id only.
                if targets.is_empty() { &[][..] } else { &event.payload[..] },
                event.at
            ])?;
            let key = tx.last_insert_rowid();
            for webhook in &targets {
                tx.prepare_cached(
                    "INSERT INTO deliveries (id, webhook_id, event, state, attempts, max_attempts,
                        next_at, created_at)
                     VALUES (?1, ?2, ?3, 'pending', 0, ?4, ?5, ?5)",
                )?
                .execute(params![
                    delivery_id(),
                    webhook,
                    key,
                    event.max_attempts,
                    event.at
                ])?;
            }
            tx.commit()?;
            Ok(Enqueued::Queued(targets.len()))
        })
        .await
    }

    async fn claim(
        &self,
        now: Micros,
        limit: usize,
        lease_until: Micros,
        skip: Vec<String>,
    ) -> Result<Vec<Claimed>, StoreError> {
        self.write(move |conn| {
            let tx = immediate(conn)?;
            let skip = json_list(&skip);
            // Candidates per owner, oldest first.
            let mut candidates: BTreeMap<String, Vec<i64>> = BTreeMap::new();
            {
                let mut heads = tx.prepare_cached(ORDERED_HEADS)?;
                let mut rows = heads.query(params![now, skip])?;
                while let Some(row) = rows.next()? {
                    let (seq, next_at): (i64, Micros) = (row.get(0)?, row.get(1)?);
                    if next_at <= now {
                        candidates.entry(row.get(2)?).or_default().push(seq);
                    }
                }
            }
            let unordered: Vec<(String, String)> = tx
                .prepare_cached(UNORDERED)?
                .query_map([&skip], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<Result<_, _>>()?;
            for (webhook, owner) in &unordered {
                let mut due = tx.prepare_cached(UNORDERED_DUE)?;
                let mine = candidates.entry(owner.clone()).or_default();
                for seq in due
                    .query_map(params![webhook, now], |r| r.get(0))?
                    .take(limit)
                {
                    mine.push(seq?);
                }
            }
            let seqs = json_list_of(&take_in_turns(candidates, limit));
            // One statement each for all the claimed: a statement per
            // delivery (`seq = ?`) was planned again at every use.
            tx.prepare_cached(
                "UPDATE deliveries SET leased_until = ?2
                 WHERE seq IN (SELECT value FROM json_each(?1))",
            )?
            .execute(params![seqs, lease_until])?;
            let mut claimed = Vec::new();
            {
                let mut statement = tx.prepare_cached(&format!(
                    "SELECT {DELIVERY_COLUMNS}, {WEBHOOK_COLUMNS} FROM deliveries d
                     JOIN events e ON e.key = d.event JOIN webhooks w ON w.id = d.webhook_id
                     WHERE d.seq IN (SELECT value FROM json_each(?1)) ORDER BY d.seq"
                ))?;
                let mut rows = statement.query([&seqs])?;
                while let Some(row) = rows.next()? {
                    claimed.push(Claimed {
                        delivery: delivery_of(row)?,
                        webhook: webhook_of(row, 14)?,
                        lease: lease_until,
                    });
                }
            }
            tx.commit()?;
            Ok(claimed)
        })
        .await
    }

    async fn release(
        &self,
        leases: Vec<(String, Micros)>,
        due: Option<Micros>,
    ) -> Result<(), StoreError> {
        self.write(move |conn| {
            let tx = immediate(conn)?;
            for (id, lease) in &leases {
                tx.prepare_cached(
                    "UPDATE deliveries SET leased_until = NULL, next_at = COALESCE(?2, next_at)
                     WHERE id = ?1 AND leased_until = ?3",
                )?
                .execute(params![id, due, lease])?;
            }
            tx.commit()?;
            Ok(())
        })
        .await
    }

    async fn release_all(&self) -> Result<u64, StoreError> {
        self.write(|conn| {
            let released = conn
                .prepare_cached(
                    "UPDATE deliveries SET leased_until = NULL WHERE leased_until IS NOT NULL",
                )?
                .execute([])?;
            Ok(u64::try_from(released).unwrap_or(0))
        })
        .await
    }

    async fn next_due(&self, now: Micros, skip: Vec<String>) -> Result<Option<Micros>, StoreError> {
        self.read(move |conn| {
            let skip = json_list(&skip);
            let mut next: Option<Micros> = conn
                .prepare_cached(UNORDERED_NEXT)?
                .query_row(params![now, skip], |r| r.get(0))?;
            let mut heads = conn.prepare_cached(ORDERED_HEADS)?;
            let mut rows = heads.query(params![now, skip])?;
            while let Some(row) = rows.next()? {
                let at: Micros = row.get(1)?;
                next = Some(next.map_or(at, |next| next.min(at)));
            }
            Ok(next)
        })
        .await
    }

    async fn finish(&self, results: Vec<Finished>) -> Result<(), StoreError> {
        self.write(move |conn| {
            let tx = immediate(conn)?;
            for done in &results {
                finish_one(&tx, done)?;
            }
            tx.commit()?;
            Ok(())
        })
        .await
    }

    async fn fail_pending(&self, webhook: &str, reason: &str) -> Result<u64, StoreError> {
        let (webhook, reason) = (webhook.to_owned(), reason.to_owned());
        self.write(move |conn| fail_all(conn, &webhook, &reason))
            .await
    }

    async fn deliveries(
        &self,
        webhook: &str,
        state: Option<DeliveryState>,
        before: Option<i64>,
        limit: usize,
    ) -> Result<Vec<(DeliveryRecord, Vec<AttemptRecord>)>, StoreError> {
        let webhook = webhook.to_owned();
        self.read(move |conn| {
            let mut statement = conn.prepare_cached(&format!(
                "SELECT {DELIVERY_COLUMNS} FROM deliveries d JOIN events e ON e.key = d.event
                 WHERE d.webhook_id = ?1 AND (?2 IS NULL OR d.state = ?2)
                   AND (?3 IS NULL OR d.seq < ?3)
                 ORDER BY d.seq DESC LIMIT ?4"
            ))?;
            let mut rows = statement.query(params![
                webhook,
                state.map(DeliveryState::as_str),
                before,
                i64::try_from(limit).unwrap_or(i64::MAX)
            ])?;
            let mut found = Vec::new();
            while let Some(row) = rows.next()? {
                let delivery = delivery_of(row)?;
                let attempts = attempts_of(conn, delivery.seq)?;
                found.push((delivery, attempts));
            }
            Ok(found)
        })
        .await
    }

    async fn delivery(
        &self,
        id: &str,
        owner: Option<&str>,
    ) -> Result<Option<(DeliveryRecord, Vec<AttemptRecord>)>, StoreError> {
        let (id, owner) = (id.to_owned(), owner.map(str::to_owned));
        self.read(move |conn| {
            let mut statement = conn.prepare_cached(&format!(
                "SELECT {DELIVERY_COLUMNS} FROM deliveries d JOIN events e ON e.key = d.event
                 WHERE d.id = ?1 AND (?2 IS NULL OR e.owner = ?2)"
            ))?;
            let mut rows = statement.query(params![id, owner])?;
            let Some(row) = rows.next()? else {
                return Ok(None);
            };
            let delivery = delivery_of(row)?;
            let attempts = attempts_of(conn, delivery.seq)?;
            Ok(Some((delivery, attempts)))
        })
        .await
    }

    async fn resend(&self, id: &str, owner: Option<&str>, now: Micros) -> Result<bool, StoreError> {
        let (id, owner) = (id.to_owned(), owner.map(str::to_owned));
        self.write(move |conn| {
            let changed = conn
                .prepare_cached(
                    "UPDATE deliveries SET state = 'pending', next_at = ?3, max_attempts = attempts + 1,
                        leased_until = NULL
                     WHERE id = ?1 AND state != 'pending' AND (leased_until IS NULL OR leased_until < ?3)
                       AND (?2 IS NULL OR event IN (SELECT key FROM events WHERE owner = ?2))",
                )?
                .execute(params![id, owner, now])?;
            Ok(changed > 0)
        })
        .await
    }

    async fn recover(&self, webhook: &str, since: Micros, now: Micros) -> Result<u64, StoreError> {
        let webhook = webhook.to_owned();
        self.write(move |conn| {
            let changed = conn
                .prepare_cached(
                    "UPDATE deliveries SET state = 'pending', next_at = ?3, max_attempts = attempts + 1,
                        leased_until = NULL
                     WHERE webhook_id = ?1 AND state = 'failed' AND created_at >= ?2
                       AND (leased_until IS NULL OR leased_until < ?3)",
                )?
                .execute(params![webhook, since, now])?;
            Ok(u64::try_from(changed).unwrap_or(0))
        })
        .await
    }

    async fn pending(&self, owner: &str) -> Result<u64, StoreError> {
        let owner = owner.to_owned();
        self.read(move |conn| {
            let count: i64 = conn
                .prepare_cached(
                    "SELECT COALESCE(SUM((SELECT COUNT(*) FROM deliveries d
                        WHERE d.webhook_id = w.id AND d.state = 'pending')), 0)
                     FROM webhooks w WHERE w.owner = ?1",
                )?
                .query_row([owner], |r| r.get(0))?;
            Ok(u64::try_from(count).unwrap_or(0))
        })
        .await
    }

    async fn prune_deliveries(&self, before: Micros) -> Result<u64, StoreError> {
        self.write(move |conn| {
            let tx = immediate(conn)?;
            tx.prepare_cached(
                "DELETE FROM delivery_attempts WHERE delivery IN (SELECT seq FROM deliveries
                    WHERE created_at < ?1 AND state != 'pending')",
            )?
            .execute([before])?;
            let deleted = tx
                .prepare_cached(
                    "DELETE FROM deliveries WHERE created_at < ?1 AND state != 'pending'",
                )?
                .execute([before])?;
            tx.prepare_cached(
                "DELETE FROM events WHERE created_at < ?1
                    AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.event = events.key)",
            )?
            .execute([before])?;
            tx.commit()?;
            Ok(u64::try_from(deleted).unwrap_or(0))
        })
        .await
    }
}

/// A new delivery id: `msg_` and a UUIDv7, so ids sort by queueing time.
fn delivery_id() -> String {
    format!("msg_{}", uuid::Uuid::now_v7().simple())
}

#[cfg(test)]
mod tests {
    use rusqlite::Connection;

    use super::{ORDERED_HEADS, UNORDERED, UNORDERED_DUE, UNORDERED_NEXT};
    use crate::store::sqlite::Sqlite;

    /// What SQLite plans for `sql`, one step a line.
    fn plan(conn: &Connection, sql: &str, params: impl rusqlite::Params) -> Vec<String> {
        let mut statement = conn
            .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
            .expect("the query compiles");
        statement
            .query_map(params, |r| r.get::<_, String>(3))
            .expect("the plan")
            .collect::<Result<_, _>>()
            .expect("plan rows")
    }

    /// A claim must cost what it may take, not the queue's length: the
    /// queries walk the webhooks and read deliveries only through one
    /// webhook's pending index or by key, never along the whole queue
    /// (which made draining an ordered webhook's backlog quadratic).
    #[test]
    fn claims_read_deliveries_one_webhook_at_a_time() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let path = dir.path().join("ferry.sqlite");
        drop(Sqlite::open(&path).expect("the store opens"));
        let conn = Connection::open(&path).expect("open the file");
        let plans = [
            plan(&conn, ORDERED_HEADS, rusqlite::params![1, "[]"]),
            plan(&conn, UNORDERED, rusqlite::params!["[]"]),
            plan(&conn, UNORDERED_DUE, rusqlite::params!["wh_a", 1]),
            plan(&conn, UNORDERED_NEXT, rusqlite::params![1, "[]"]),
        ];
        for steps in &plans {
            for step in steps {
                let reads_deliveries = step.starts_with("SEARCH d ")
                    || step.starts_with("SEARCH p ")
                    || step.starts_with("SEARCH deliveries ");
                if reads_deliveries {
                    assert!(
                        step.contains("deliveries_pending_by_webhook (webhook_id=?)")
                            || step.contains("INTEGER PRIMARY KEY (rowid=?)"),
                        "{step} in {steps:?}"
                    );
                } else if let Some(scanned) = step.strip_prefix("SCAN ") {
                    assert!(
                        scanned == "w" || scanned.starts_with("json_each"),
                        "{step} in {steps:?}"
                    );
                }
            }
        }
    }
}
