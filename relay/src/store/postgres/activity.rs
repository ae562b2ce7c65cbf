//! The activity log and the name registry on PostgreSQL.
//!
//! The semantics are SQLite's (see `sqlite.rs` and the traits): the same
//! rows, the same search text, the same commit order, the same pruning.
//! What differs is how several relays writing one database keep them:
//! appends take a lock so that `seq` is the commit order, and a prune
//! recomputes what is over the limit under a lock at every step.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use ferry_common::ids::ExchangeId;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::Row;

use super::{Postgres, LOG_CHANNEL};
use crate::store::{
    decode_headers, encode_headers, fold, search_text_of, ActivityLog, CapturedBody,
    CapturedResponse, DispatchRef, Exchange, Filter, Logged, Micros, NameRecord, NameRegistry,
    Pruned, Retention, StatusFilter, StoreError, TOO_SLOW,
};

/// The advisory lock every append transaction takes before it inserts
/// ("ferry-log"). A sequence value is taken at INSERT but a row becomes
/// visible at COMMIT: without the lock, a relay could commit seq 11 while
/// another still holds seq 10 uncommitted, and a live tail that read 11
/// would never look below it again. Under the lock a batch takes its
/// values only after the previous batch committed, so seq order is commit
/// order. Appends are batched, so this serialises batches, not entries.
const APPEND_LOCK: i64 = 0x6665_7272_792d_6c6f;

/// The advisory lock a prune step takes ("ferry-pr"), so relays pruning at
/// once each see what the other already removed and never both remove the
/// same excess.
const PRUNE_LOCK: i64 = 0x6665_7272_792d_7072;

/// How long one list or search may run before it is cancelled, as on
/// SQLite: a search over a large log must not hold a connection for long.
const READ_TIME_LIMIT: Duration = Duration::from_secs(2);

/// Rows one prune statement removes, so no transaction is ever large.
const PRUNE_CHUNK: i64 = 2000;

/// The most entries one list or tail returns.
const MAX_LIMIT: usize = 10_000;

/// The columns a log entry is read from, in [`entry_of`]'s order.
const COLUMNS: &str = "seq, id, tunnel, owner, kind, replay_of, received_at, method, url, \
     http_version, remote_addr, request_headers, request_body, request_size, request_truncated, \
     status, response_headers, response_body, response_size, response_truncated, responded_at, \
     done_at, outcome, error, incomplete, replayed_at, dispatch_webhook, dispatch_event, \
     dispatch_delivery, dispatch_attempt";

/// [`COLUMNS`] with empty bodies, for lists.
const COLUMNS_WITHOUT_BODIES: &str = "seq, id, tunnel, owner, kind, replay_of, received_at, \
     method, url, http_version, remote_addr, request_headers, ''::bytea, request_size, \
     request_truncated, status, response_headers, ''::bytea, response_size, response_truncated, \
     responded_at, done_at, outcome, error, incomplete, replayed_at, dispatch_webhook, \
     dispatch_event, dispatch_delivery, dispatch_attempt";

const INSERT: &str = "INSERT INTO exchanges (id, tunnel, owner, kind, replay_of, received_at, \
     method, url, http_version, remote_addr, request_headers, request_body, request_size, \
     request_truncated, status, response_headers, response_body, response_size, \
     response_truncated, responded_at, done_at, outcome, error, incomplete, replayed_at, \
     stored_size, dispatch_webhook, dispatch_event, dispatch_delivery, dispatch_attempt, \
     search_text) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, \
     $19, $20, $21, $22, $23, $24, $25, $26, $27, $28, $29, $30, $31)";

/// A query parameter owned by the query being built.
type Value = Box<dyn ToSql + Sync + Send>;

/// The parameters as the driver takes them.
fn refs(values: &[Value]) -> Vec<&(dyn ToSql + Sync)> {
    values
        .iter()
        .map(|v| v.as_ref() as &(dyn ToSql + Sync))
        .collect()
}

/// PostgreSQL's text cannot hold NUL, which bodies and header values may:
/// the search text holds U+FFFD in its place, and so does the query. So do
/// the text columns a caller or a client could put one in (method, URL,
/// error, a name's target): one NUL would fail a whole batch.
fn without_nul(text: &str) -> String {
    text.replace('\0', "\u{FFFD}")
}

/// What a search looks in: SQLite's index text (folded) without the owner
/// that leads it there.
fn search_text(entry: &Exchange) -> String {
    let response = entry.response.as_ref();
    let text = search_text_of(
        "",
        &entry.url,
        &entry.request_headers,
        &entry.request_body.bytes,
        response.map_or(&[][..], |r| &r.headers),
        response.map_or(&[][..], |r| &r.body.bytes),
    );
    without_nul(text.strip_prefix('\n').unwrap_or(&text))
}

/// `text` as a `LIKE` pattern that matches it literally anywhere.
fn like_anywhere(text: &str) -> String {
    let mut pattern = String::with_capacity(text.len() + 2);
    pattern.push('%');
    for c in text.chars() {
        if matches!(c, '%' | '_' | '\\') {
            pattern.push('\\');
        }
        pattern.push(c);
    }
    pattern.push('%');
    pattern
}

/// A query that ran out of time says so, as SQLite's does.
fn read_failed(err: tokio_postgres::Error) -> StoreError {
    if err.code() == Some(&SqlState::QUERY_CANCELED) {
        StoreError(format!(
            "{TOO_SLOW}: narrow it with a tunnel, a time range or a longer search"
        ))
    } else {
        err.into()
    }
}

/// A filter as SQL conditions over `exchanges`, appending its parameters
/// to `values`.
fn conditions(filter: &Filter, values: &mut Vec<Value>) -> String {
    let mut sql = String::from("TRUE");
    let mut add = |clause: &str, value: Value, values: &mut Vec<Value>| {
        values.push(value);
        sql.push_str(&format!(" AND {clause} ${}", values.len()));
    };
    if let Some(owner) = &filter.owner {
        add("owner =", Box::new(owner.clone()), values);
    }
    if let Some(tunnel) = &filter.tunnel {
        add("tunnel =", Box::new(tunnel.clone()), values);
    }
    if let Some(kind) = filter.kind {
        add("kind =", Box::new(kind.as_str()), values);
    }
    if let Some(method) = &filter.method {
        add("method =", Box::new(method.clone()), values);
    }
    match filter.status {
        Some(StatusFilter::Code(code)) => add("status =", Box::new(i32::from(code)), values),
        Some(StatusFilter::Class(class)) => {
            add("status / 100 =", Box::new(i32::from(class)), values)
        }
        None => {}
    }
    if let Some(since) = filter.since {
        add("received_at >=", Box::new(since), values);
    }
    if let Some(until) = filter.until {
        add("received_at <", Box::new(until), values);
    }
    if let Some(text) = &filter.text {
        // The trigram index finds the candidates; LIKE (with the text's own
        // `%`, `_` and `\` escaped) keeps those holding the whole text.
        let pattern = like_anywhere(&without_nul(&fold(text)));
        add("search_text LIKE", Box::new(pattern), values);
    }
    if filter.missed {
        sql.push_str(" AND outcome = 'client_offline' AND replayed_at IS NULL");
    }
    sql
}

fn corrupt(what: &str) -> impl Fn(std::num::TryFromIntError) -> StoreError + '_ {
    move |_| StoreError(format!("a stored {what} is out of range"))
}

fn entry_of(row: &Row) -> Result<Logged, StoreError> {
    let parse_id = |text: &str| {
        text.parse::<ExchangeId>()
            .map_err(|_| StoreError(format!("a stored id `{text}` is corrupt")))
    };
    let id: String = row.try_get(1)?;
    let kind: String = row.try_get(4)?;
    let replay_of: Option<String> = row.try_get(5)?;
    let outcome: String = row.try_get(22)?;
    let status: Option<i32> = row.try_get(15)?;
    let response = match status {
        Some(status) => Some(CapturedResponse {
            status: u16::try_from(status).map_err(corrupt("status"))?,
            headers: decode_headers(&row.try_get::<_, Option<Vec<u8>>>(16)?.unwrap_or_default())?,
            body: CapturedBody {
                bytes: Bytes::from(row.try_get::<_, Option<Vec<u8>>>(17)?.unwrap_or_default()),
                size: u64::try_from(row.try_get::<_, Option<i64>>(18)?.unwrap_or(0))
                    .map_err(corrupt("size"))?,
                truncated: row.try_get::<_, Option<bool>>(19)?.unwrap_or(false),
            },
        }),
        None => None,
    };
    let dispatch = match row.try_get::<_, Option<String>>(26)? {
        Some(webhook) => Some(DispatchRef {
            webhook,
            event: row.try_get::<_, Option<String>>(27)?.unwrap_or_default(),
            delivery: row.try_get::<_, Option<String>>(28)?.unwrap_or_default(),
            attempt: u32::try_from(row.try_get::<_, Option<i32>>(29)?.unwrap_or(0))
                .map_err(corrupt("attempt"))?,
        }),
        None => None,
    };
    Ok(Logged {
        seq: row.try_get(0)?,
        exchange: Exchange {
            id: parse_id(&id)?,
            tunnel: row.try_get(2)?,
            owner: row.try_get(3)?,
            kind: kind.parse().map_err(StoreError)?,
            replay_of: replay_of.as_deref().map(parse_id).transpose()?,
            received_at: row.try_get(6)?,
            method: row.try_get(7)?,
            url: row.try_get(8)?,
            http_version: row.try_get(9)?,
            remote_addr: row.try_get(10)?,
            request_headers: decode_headers(&row.try_get::<_, Vec<u8>>(11)?)?,
            request_body: CapturedBody {
                bytes: Bytes::from(row.try_get::<_, Vec<u8>>(12)?),
                size: u64::try_from(row.try_get::<_, i64>(13)?).map_err(corrupt("size"))?,
                truncated: row.try_get(14)?,
            },
            response,
            responded_at: row.try_get(20)?,
            done_at: row.try_get(21)?,
            outcome: outcome.parse().map_err(StoreError)?,
            error: row.try_get(23)?,
            incomplete: row.try_get(24)?,
            replayed_at: row.try_get(25)?,
            dispatch,
        },
    })
}

/// One entry as [`INSERT`]'s parameters.
fn insert_values(entry: &Exchange) -> Vec<Value> {
    let response = entry.response.as_ref();
    let dispatch = entry.dispatch.as_ref();
    let clamp = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    vec![
        Box::new(entry.id.to_string()),
        Box::new(entry.tunnel.clone()),
        Box::new(entry.owner.clone()),
        Box::new(entry.kind.as_str()),
        Box::new(entry.replay_of.map(|r| r.to_string())),
        Box::new(entry.received_at),
        Box::new(without_nul(&entry.method)),
        Box::new(without_nul(&entry.url)),
        Box::new(entry.http_version.clone()),
        Box::new(entry.remote_addr.clone()),
        Box::new(encode_headers(&entry.request_headers)),
        Box::new(entry.request_body.bytes.to_vec()),
        Box::new(clamp(entry.request_body.size)),
        Box::new(entry.request_body.truncated),
        Box::new(response.map(|r| i32::from(r.status))),
        Box::new(response.map(|r| encode_headers(&r.headers))),
        Box::new(response.map(|r| r.body.bytes.to_vec())),
        Box::new(response.map(|r| clamp(r.body.size))),
        Box::new(response.map(|r| r.body.truncated)),
        Box::new(entry.responded_at),
        Box::new(entry.done_at),
        Box::new(entry.outcome.as_str()),
        Box::new(entry.error.as_deref().map(without_nul)),
        Box::new(entry.incomplete),
        Box::new(entry.replayed_at),
        Box::new(clamp(entry.stored_size())),
        Box::new(dispatch.map(|d| d.webhook.clone())),
        Box::new(dispatch.map(|d| d.event.clone())),
        Box::new(dispatch.map(|d| d.delivery.clone())),
        Box::new(dispatch.map(|d| i32::try_from(d.attempt).unwrap_or(i32::MAX))),
        Box::new(search_text(entry)),
    ]
}

/// Counts what a `DELETE … RETURNING stored_size` (named `gone`) removed.
fn pruned_of(row: &Row) -> Result<Pruned, StoreError> {
    let entries: i64 = row.try_get(0)?;
    let bytes: i64 = row.try_get(1)?;
    Ok(Pruned {
        entries: u64::try_from(entries).unwrap_or(0),
        bytes: u64::try_from(bytes).unwrap_or(0),
    })
}

impl Postgres {
    /// Runs a list or search query in a read-only transaction that cancels
    /// it past [`READ_TIME_LIMIT`].
    async fn read_timed(&self, sql: &str, values: &[Value]) -> Result<Vec<Logged>, StoreError> {
        let mut client = self.reader().await?;
        let tx = client.build_transaction().read_only(true).start().await?;
        tx.batch_execute(&format!(
            "SET LOCAL statement_timeout = {}",
            READ_TIME_LIMIT.as_millis()
        ))
        .await?;
        // Parsing waits for the table's lock too: it is timed as well.
        let statement = tx.prepare_cached(sql).await.map_err(read_failed)?;
        let rows = tx
            .query(&statement, &refs(values))
            .await
            .map_err(read_failed)?;
        tx.commit().await?;
        rows.iter().map(entry_of).collect()
    }

    /// Removes the oldest entries (of `owner`, when given) while they hold
    /// more than `max` bytes, at most [`PRUNE_CHUNK`] per transaction. Each
    /// step measures the excess anew under [`PRUNE_LOCK`].
    async fn prune_oldest(&self, owner: Option<&str>, max: i64) -> Result<Pruned, StoreError> {
        let mine = if owner.is_some() {
            "owner = $1"
        } else {
            "$1::text IS NULL"
        };
        let total_sql =
            format!("SELECT COALESCE(SUM(stored_size), 0)::BIGINT FROM exchanges WHERE {mine}");
        // The oldest chunk's running total reaches the excess at the cutoff.
        let cutoff_sql = format!(
            "SELECT id FROM (
                SELECT id, (SUM(stored_size) OVER (ORDER BY id))::BIGINT AS running
                FROM exchanges WHERE {mine} ORDER BY id LIMIT $3
             ) oldest WHERE running >= $2 ORDER BY id LIMIT 1"
        );
        let through_sql = format!(
            "WITH gone AS (DELETE FROM exchanges WHERE {mine} AND id <= $2 RETURNING stored_size)
             SELECT COUNT(*), COALESCE(SUM(stored_size), 0)::BIGINT FROM gone"
        );
        let chunk_sql = format!(
            "WITH gone AS (DELETE FROM exchanges WHERE id IN (
                SELECT id FROM exchanges WHERE {mine} ORDER BY id LIMIT $2
             ) RETURNING stored_size)
             SELECT COUNT(*), COALESCE(SUM(stored_size), 0)::BIGINT FROM gone"
        );
        let mut client = self.client().await?;
        let mut pruned = Pruned::default();
        loop {
            let tx = client.transaction().await?;
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&PRUNE_LOCK])
                .await?;
            let total: i64 = tx
                .query_one(&tx.prepare_cached(&total_sql).await?, &[&owner])
                .await?
                .try_get(0)?;
            let excess = total.saturating_sub(max);
            if excess <= 0 {
                tx.commit().await?;
                break;
            }
            let cutoff = tx
                .query_opt(
                    &tx.prepare_cached(&cutoff_sql).await?,
                    &[&owner, &excess, &PRUNE_CHUNK],
                )
                .await?;
            let row = match cutoff {
                Some(row) => {
                    let id: String = row.try_get(0)?;
                    tx.query_one(&tx.prepare_cached(&through_sql).await?, &[&owner, &id])
                        .await?
                }
                None => {
                    tx.query_one(
                        &tx.prepare_cached(&chunk_sql).await?,
                        &[&owner, &PRUNE_CHUNK],
                    )
                    .await?
                }
            };
            let chunk = pruned_of(&row)?;
            tx.commit().await?;
            pruned.entries += chunk.entries;
            pruned.bytes += chunk.bytes;
            if chunk.entries == 0 {
                break;
            }
        }
        Ok(pruned)
    }
}

#[async_trait]
impl ActivityLog for Postgres {
    async fn append(&self, entries: Arc<[Exchange]>) -> Result<(), StoreError> {
        if entries.is_empty() {
            return Ok(());
        }
        // Of several entries with one id in a batch, the last is kept.
        let last_of: HashMap<ExchangeId, usize> = entries
            .iter()
            .enumerate()
            .map(|(at, e)| (e.id, at))
            .collect();
        let rows: Vec<Vec<Value>> = entries
            .iter()
            .enumerate()
            .filter(|(at, e)| last_of.get(&e.id) == Some(at))
            .map(|(_, e)| insert_values(e))
            .collect();
        let ids: Vec<String> = last_of.keys().map(ExchangeId::to_string).collect();
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&APPEND_LOCK])
            .await?;
        // A stored id is replaced by a new row: a new commit, a new seq.
        tx.execute(
            &tx.prepare_cached("DELETE FROM exchanges WHERE id = ANY($1)")
                .await?,
            &[&ids],
        )
        .await?;
        let insert = tx.prepare_cached(INSERT).await?;
        // Sent at once and run in order: one round trip for the batch.
        futures_util::future::try_join_all(rows.iter().map(|values| {
            let (tx, insert) = (&tx, &insert);
            async move { tx.execute(insert, &refs(values)).await }
        }))
        .await?;
        // Delivered at commit, to every relay's follower of the channel:
        // their live tails wake for these entries.
        tx.execute("SELECT pg_notify($1, '')", &[&LOG_CHANNEL])
            .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn list(
        &self,
        filter: &Filter,
        before: Option<ExchangeId>,
        limit: usize,
        bodies: bool,
    ) -> Result<Vec<Exchange>, StoreError> {
        let mut values = Vec::new();
        let mut sql = conditions(filter, &mut values);
        if let Some(before) = before {
            values.push(Box::new(before.to_string()));
            sql.push_str(&format!(" AND id < ${}", values.len()));
        }
        values.push(Box::new(i64::try_from(limit.min(MAX_LIMIT)).unwrap_or(0)));
        let columns = if bodies {
            COLUMNS
        } else {
            COLUMNS_WITHOUT_BODIES
        };
        let sql = format!(
            "SELECT {columns} FROM exchanges WHERE {sql} ORDER BY id DESC LIMIT ${}",
            values.len()
        );
        let found = self.read_timed(&sql, &values).await?;
        Ok(found.into_iter().map(|l| l.exchange).collect())
    }

    async fn committed_after(
        &self,
        filter: &Filter,
        seq: i64,
        limit: usize,
    ) -> Result<Vec<Logged>, StoreError> {
        let mut values = Vec::new();
        let sql = conditions(filter, &mut values);
        values.push(Box::new(seq));
        values.push(Box::new(i64::try_from(limit.min(MAX_LIMIT)).unwrap_or(0)));
        let sql = format!(
            "SELECT {COLUMNS_WITHOUT_BODIES} FROM exchanges WHERE {sql} AND seq > ${} \
             ORDER BY seq LIMIT ${}",
            values.len() - 1,
            values.len()
        );
        self.read_timed(&sql, &values).await
    }

    async fn seq_of(&self, id: ExchangeId, owner: Option<&str>) -> Result<Option<i64>, StoreError> {
        let client = self.reader().await?;
        let statement = client
            .prepare_cached(
                "SELECT seq FROM exchanges WHERE id = $1 AND ($2::text IS NULL OR owner = $2)",
            )
            .await?;
        let row = client
            .query_opt(&statement, &[&id.to_string(), &owner])
            .await?;
        Ok(row.map(|r| r.try_get(0)).transpose()?)
    }

    async fn last_seq(&self) -> Result<i64, StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached("SELECT COALESCE(MAX(seq), 0) FROM exchanges")
            .await?;
        Ok(client.query_one(&statement, &[]).await?.try_get(0)?)
    }

    async fn get(
        &self,
        id: ExchangeId,
        owner: Option<&str>,
    ) -> Result<Option<Exchange>, StoreError> {
        let client = self.reader().await?;
        let statement = client
            .prepare_cached(&format!(
                "SELECT {COLUMNS} FROM exchanges WHERE id = $1 AND ($2::text IS NULL OR owner = $2)"
            ))
            .await?;
        let row = client
            .query_opt(&statement, &[&id.to_string(), &owner])
            .await?;
        Ok(row.as_ref().map(entry_of).transpose()?.map(|l| l.exchange))
    }

    async fn mark_replayed(&self, id: ExchangeId, at: Micros) -> Result<bool, StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(
                "UPDATE exchanges SET replayed_at = $2 WHERE id = $1 AND replayed_at IS NULL",
            )
            .await?;
        let changed = client.execute(&statement, &[&id.to_string(), &at]).await?;
        Ok(changed > 0)
    }

    async fn prune(&self, retention: Retention, now: Micros) -> Result<Pruned, StoreError> {
        let mut pruned = Pruned::default();
        let oldest_allowed =
            now.saturating_sub(i64::try_from(retention.max_age.as_micros()).unwrap_or(i64::MAX));
        // By age: whoever deletes a row first counts it.
        {
            let client = self.client().await?;
            let statement = client
                .prepare_cached(
                    "WITH gone AS (DELETE FROM exchanges WHERE seq IN (
                        SELECT seq FROM exchanges WHERE received_at < $1
                        ORDER BY received_at LIMIT $2
                     ) RETURNING stored_size)
                     SELECT COUNT(*), COALESCE(SUM(stored_size), 0)::BIGINT FROM gone",
                )
                .await?;
            loop {
                let row = client
                    .query_one(&statement, &[&oldest_allowed, &PRUNE_CHUNK])
                    .await?;
                let chunk = pruned_of(&row)?;
                pruned.entries += chunk.entries;
                pruned.bytes += chunk.bytes;
                if chunk.entries == 0 {
                    break;
                }
            }
        }
        // Each owner's share, then the whole log: oldest first.
        let max_owner = i64::try_from(retention.max_bytes_per_owner).unwrap_or(i64::MAX);
        let owners: Vec<String> = {
            let client = self.client().await?;
            let statement = client
                .prepare_cached(
                    "SELECT owner FROM exchanges GROUP BY owner HAVING SUM(stored_size) > $1::BIGINT",
                )
                .await?;
            client
                .query(&statement, &[&max_owner])
                .await?
                .iter()
                .map(|r| r.try_get(0))
                .collect::<Result<_, _>>()?
        };
        for owner in owners {
            let chunk = self.prune_oldest(Some(&owner), max_owner).await?;
            pruned.entries += chunk.entries;
            pruned.bytes += chunk.bytes;
        }
        let max_total = i64::try_from(retention.max_bytes).unwrap_or(i64::MAX);
        let chunk = self.prune_oldest(None, max_total).await?;
        pruned.entries += chunk.entries;
        pruned.bytes += chunk.bytes;
        Ok(pruned)
    }
}

fn name_of(row: &Row) -> Result<NameRecord, StoreError> {
    Ok(NameRecord {
        name: row.try_get(0)?,
        owner: row.try_get(1)?,
        last_seen: row.try_get(2)?,
        hold_until: row.try_get(3)?,
        target: row.try_get(4)?,
    })
}

#[async_trait]
impl NameRegistry for Postgres {
    async fn save_name(&self, record: NameRecord) -> Result<(), StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(
                "INSERT INTO names (name, owner, last_seen, hold_until, target)
                 VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (name) DO UPDATE SET owner = $2, last_seen = $3, hold_until = $4,
                    target = $5",
            )
            .await?;
        client
            .execute(
                &statement,
                &[
                    &record.name,
                    &record.owner,
                    &record.last_seen,
                    &record.hold_until,
                    &record.target.as_deref().map(without_nul),
                ],
            )
            .await?;
        Ok(())
    }

    async fn name(&self, name: &str) -> Result<Option<NameRecord>, StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(
                "SELECT name, owner, last_seen, hold_until, target FROM names WHERE name = $1",
            )
            .await?;
        let row = client.query_opt(&statement, &[&name]).await?;
        row.as_ref().map(name_of).transpose()
    }

    async fn names(&self, now: Micros) -> Result<Vec<NameRecord>, StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(
                "SELECT name, owner, last_seen, hold_until, target FROM names
                 WHERE hold_until IS NULL OR hold_until > $1
                 ORDER BY last_seen, name",
            )
            .await?;
        client
            .query(&statement, &[&now])
            .await?
            .iter()
            .map(name_of)
            .collect()
    }

    async fn forget_expired(&self, now: Micros) -> Result<u64, StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached("DELETE FROM names WHERE hold_until <= $1")
            .await?;
        Ok(client.execute(&statement, &[&now]).await?)
    }
}
