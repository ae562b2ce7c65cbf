//! The store on SQLite: one file in the data directory, in WAL mode, with
//! one writer connection and a few readers, each call run on a blocking
//! thread so no async task waits on the disk.
//!
//! Tables: `exchanges` (one row per log entry; `seq` is the commit order),
//! `exchange_search` (FTS5 with the trigram tokenizer over each entry's
//! path, header values and text bodies), `names` (the name registry), and
//! the dispatcher's `webhooks`, `event_types`, `events`, `deliveries` (the
//! durable queue) and `delivery_attempts`.

use std::path::Path;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use async_trait::async_trait;
use bytes::Bytes;
use ferry_common::ids::ExchangeId;
use rusqlite::{params, params_from_iter, Connection, OpenFlags, OptionalExtension, Row};

mod dispatch;

use super::{
    decode_headers, encode_headers, fold, search_text_of, ActivityLog, CapturedBody,
    CapturedResponse, Database, DispatchRef, Exchange, Filter, Logged, Micros, NameRecord,
    NameRegistry, Pruned, Retention, StatusFilter, StoreError, TOO_SLOW,
};

/// The schema, one migration per version, applied in order. Never edit a
/// migration that shipped: add the next one.
const MIGRATIONS: &[&str] = &[
    // 1: the activity log, its search index and the name registry.
    "CREATE TABLE exchanges (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE,
        tunnel TEXT NOT NULL,
        owner TEXT NOT NULL,
        kind TEXT NOT NULL,
        replay_of TEXT,
        received_at INTEGER NOT NULL,
        method TEXT NOT NULL,
        url TEXT NOT NULL,
        http_version TEXT NOT NULL,
        remote_addr TEXT NOT NULL,
        request_headers BLOB NOT NULL,
        request_body BLOB NOT NULL,
        request_size INTEGER NOT NULL,
        request_truncated INTEGER NOT NULL,
        status INTEGER,
        response_headers BLOB,
        response_body BLOB,
        response_size INTEGER,
        response_truncated INTEGER,
        responded_at INTEGER,
        done_at INTEGER,
        outcome TEXT NOT NULL,
        error TEXT,
        incomplete INTEGER NOT NULL,
        replayed_at INTEGER,
        stored_size INTEGER NOT NULL
     );
     CREATE INDEX exchanges_by_owner ON exchanges (owner, id);
     CREATE INDEX exchanges_by_tunnel ON exchanges (tunnel, id);
     CREATE INDEX exchanges_by_received ON exchanges (received_at);
     CREATE INDEX exchanges_missed ON exchanges (outcome, replayed_at);
     CREATE VIRTUAL TABLE exchange_search USING fts5 (text, tokenize = 'trigram', detail = 'none');
     CREATE TABLE exchange_search_progress (indexed_through INTEGER NOT NULL);
     INSERT INTO exchange_search_progress VALUES (0);
     CREATE TABLE names (
        name TEXT PRIMARY KEY,
        owner TEXT NOT NULL,
        last_seen INTEGER NOT NULL,
        hold_until INTEGER,
        target TEXT
     );",
    // 2: the dispatcher: webhooks, event types, events, the delivery queue
    // and its attempts; log entries that are delivery attempts.
    "ALTER TABLE exchanges ADD COLUMN dispatch_webhook TEXT;
     ALTER TABLE exchanges ADD COLUMN dispatch_event TEXT;
     ALTER TABLE exchanges ADD COLUMN dispatch_delivery TEXT;
     ALTER TABLE exchanges ADD COLUMN dispatch_attempt INTEGER;
     CREATE TABLE webhooks (
        id TEXT PRIMARY KEY,
        owner TEXT NOT NULL,
        name TEXT NOT NULL,
        method TEXT NOT NULL,
        url TEXT NOT NULL,
        actions TEXT NOT NULL,
        headers TEXT NOT NULL,
        enabled INTEGER NOT NULL,
        ordered INTEGER NOT NULL,
        secret TEXT NOT NULL,
        previous_secret TEXT,
        previous_until INTEGER,
        disabled_reason TEXT,
        failing_since INTEGER,
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL
     );
     CREATE INDEX webhooks_by_owner ON webhooks (owner, created_at);
     CREATE TABLE event_types (
        owner TEXT NOT NULL,
        name TEXT NOT NULL,
        description TEXT NOT NULL,
        example TEXT NOT NULL,
        PRIMARY KEY (owner, name)
     );
     CREATE TABLE events (
        key INTEGER PRIMARY KEY,
        owner TEXT NOT NULL,
        id TEXT NOT NULL,
        type TEXT NOT NULL,
        payload BLOB NOT NULL,
        created_at INTEGER NOT NULL
     );
     CREATE INDEX events_by_id ON events (owner, id, created_at);
     CREATE INDEX events_by_age ON events (created_at);
     CREATE TABLE deliveries (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE,
        webhook_id TEXT NOT NULL,
        event INTEGER NOT NULL,
        state TEXT NOT NULL,
        attempts INTEGER NOT NULL,
        max_attempts INTEGER NOT NULL,
        next_at INTEGER NOT NULL,
        leased_until INTEGER,
        last_status INTEGER,
        last_error TEXT,
        created_at INTEGER NOT NULL
     );
     CREATE INDEX deliveries_pending ON deliveries (seq) WHERE state = 'pending';
     CREATE INDEX deliveries_pending_by_webhook ON deliveries (webhook_id, seq)
        WHERE state = 'pending';
     CREATE INDEX deliveries_by_webhook ON deliveries (webhook_id, seq);
     CREATE INDEX deliveries_by_event ON deliveries (event);
     CREATE INDEX deliveries_by_age ON deliveries (created_at);
     CREATE TABLE delivery_attempts (
        delivery INTEGER NOT NULL,
        number INTEGER NOT NULL,
        at INTEGER NOT NULL,
        status INTEGER,
        error TEXT,
        duration_ms INTEGER NOT NULL,
        exchange_id TEXT NOT NULL,
        PRIMARY KEY (delivery, number)
     );",
];

/// Reader connections: reads run beside the writer in WAL mode.
const READERS: usize = 3;
/// How long a connection waits for another's lock before failing.
const BUSY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// How long one read may run before it is interrupted: a search over a
/// large log must not hold a reader (there are few) for long.
const READ_TIME_LIMIT: std::time::Duration = std::time::Duration::from_secs(2);
/// SQLite virtual machine steps between checks of the time limit.
const STEPS_PER_CHECK: i32 = 10_000;
/// Rows one prune statement removes, so the writer is never held long.
const PRUNE_CHUNK: i64 = 2000;
/// The columns a log entry is read from, in [`entry_of`]'s order.
const COLUMNS: &str = "seq, id, tunnel, owner, kind, replay_of, received_at, method, url, \
     http_version, remote_addr, request_headers, request_body, request_size, request_truncated, \
     status, response_headers, response_body, response_size, response_truncated, responded_at, \
     done_at, outcome, error, incomplete, replayed_at, dispatch_webhook, dispatch_event, \
     dispatch_delivery, dispatch_attempt";
/// [`COLUMNS`] with empty bodies, for lists.
const COLUMNS_WITHOUT_BODIES: &str = "seq, id, tunnel, owner, kind, replay_of, received_at, \
     method, url, http_version, remote_addr, request_headers, x'', request_size, \
     request_truncated, status, response_headers, x'', response_size, response_truncated, \
     responded_at, done_at, outcome, error, incomplete, replayed_at, dispatch_webhook, \
     dispatch_event, dispatch_delivery, dispatch_attempt";

/// The SQLite store.
pub struct Sqlite {
    /// The one connection that writes.
    writer: Option<Arc<Mutex<Connection>>>,
    /// Connections that read.
    readers: Arc<Vec<Mutex<Connection>>>,
    /// The next reader to try.
    next_reader: AtomicUsize,
    /// The thread that fills the search index, if this store writes.
    indexer: Option<Indexer>,
}

/// The search index's own thread: indexing a 1 KiB webhook costs about 25
/// times storing it, so entries are stored at once and indexed while the
/// writer is idle. Until then a search checks them one by one
/// ([`ferry_matches`]), so results never depend on how far it got.
struct Indexer {
    /// Set to stop the thread.
    stop: Arc<std::sync::atomic::AtomicBool>,
    /// Wakes the thread after an append.
    wake: std::sync::mpsc::SyncSender<()>,
    /// When the writer last appended.
    last_append: Arc<Mutex<std::time::Instant>>,
    /// Appends waiting for the writer: the index steps aside for them.
    appending: Arc<AtomicUsize>,
    /// How far the log and its index have come, for the backlog gauge.
    progress: Arc<Progress>,
    /// The thread, joined when the store is dropped.
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Sqlite {
    fn drop(&mut self) {
        if let Some(mut indexer) = self.indexer.take() {
            indexer.stop.store(true, Ordering::Relaxed);
            let _ = indexer.wake.try_send(());
            if let Some(thread) = indexer.thread.take() {
                let _ = thread.join();
            }
        }
    }
}

/// Entries one index step takes: about 8 ms of the writer's time, which an
/// append waits at most; FTS5 writes a segment per commit, so larger steps
/// cost less per entry.
const INDEX_STEP: i64 = 256;
/// How long the writer must have been idle before the index takes a step:
/// under a steady flow of captures the index waits for a lull.
const INDEX_WHEN_IDLE_FOR: std::time::Duration = std::time::Duration::from_millis(50);
/// How often the indexer looks for work without being woken.
const INDEX_CHECK_EVERY: std::time::Duration = std::time::Duration::from_millis(200);

/// The last sequence number stored, and the last one indexed.
#[derive(Debug, Default)]
struct Progress {
    appended: AtomicI64,
    indexed: AtomicI64,
}

/// The last sequence number the log ever gave, removed entries included.
fn last_seq_given(conn: &Connection) -> rusqlite::Result<i64> {
    conn.prepare_cached(
        "SELECT coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'exchanges'), 0)",
    )?
    .query_row([], |r| r.get(0))
}

impl Progress {
    fn read(conn: &Connection) -> Result<Self, StoreError> {
        let appended = last_seq_given(conn)?;
        let indexed = conn.query_row(
            "SELECT indexed_through FROM exchange_search_progress",
            [],
            |r| r.get(0),
        )?;
        Ok(Self {
            appended: AtomicI64::new(appended),
            indexed: AtomicI64::new(indexed),
        })
    }
}

fn run_indexer(
    writer: Arc<Mutex<Connection>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    wake: std::sync::mpsc::Receiver<()>,
    (last_append, appending, progress): (
        Arc<Mutex<std::time::Instant>>,
        Arc<AtomicUsize>,
        Arc<Progress>,
    ),
) {
    while !stop.load(Ordering::Relaxed) {
        let _ = wake.recv_timeout(INDEX_CHECK_EVERY);
        while !stop.load(Ordering::Relaxed) {
            let idle = last_append
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .elapsed();
            if idle < INDEX_WHEN_IDLE_FOR || appending.load(Ordering::Relaxed) > 0 {
                std::thread::sleep(
                    INDEX_WHEN_IDLE_FOR
                        .saturating_sub(idle)
                        .max(INDEX_WHEN_IDLE_FOR / 10),
                );
                continue;
            }
            let mut conn = writer.lock().unwrap_or_else(PoisonError::into_inner);
            match index_step(&mut conn, &progress) {
                Ok(done) if done < INDEX_STEP => break,
                Ok(_) => {}
                Err(err) => {
                    tracing::warn!(%err, "search index step failed; retried later");
                    break;
                }
            }
        }
    }
}

/// Indexes up to [`INDEX_STEP`] entries past the index's watermark and
/// records the new one in `progress`; returns how many it took.
fn index_step(conn: &mut Connection, progress: &Progress) -> Result<i64, StoreError> {
    let tx = immediate(conn)?;
    let through: i64 = tx
        .prepare_cached("SELECT indexed_through FROM exchange_search_progress")?
        .query_row([], |r| r.get(0))?;
    // Only the prefix of each body that the search text keeps: a step
    // never loads whole captured bodies.
    let rows: Vec<(i64, String)> = {
        let mut statement = tx.prepare_cached(
            "SELECT seq, owner, url, request_headers, substr(request_body, 1, ?3),
                 response_headers, substr(response_body, 1, ?3)
             FROM exchanges WHERE seq > ?1 ORDER BY seq LIMIT ?2",
        )?;
        let prefix = i64::try_from(super::SEARCH_BODY_PREFIX).unwrap_or(i64::MAX);
        let rows = statement.query_map(params![through, INDEX_STEP, prefix], |row| {
            Ok((row.get::<_, i64>(0)?, searchable_row(row)?))
        })?;
        rows.collect::<Result<_, _>>()?
    };
    for (seq, text) in &rows {
        tx.prepare_cached("INSERT INTO exchange_search (rowid, text) VALUES (?1, ?2)")?
            .execute(params![seq, text])?;
    }
    let taken = i64::try_from(rows.len()).unwrap_or(0);
    let mut now_through = rows.last().map_or(through, |(last, _)| *last);
    if taken < INDEX_STEP {
        // Every entry there is has been taken (the write lock is held), so
        // the watermark moves past entries removed before their turn too,
        // up to the last sequence number ever given.
        now_through = now_through.max(last_seq_given(&tx)?);
    }
    if now_through != through {
        tx.prepare_cached("UPDATE exchange_search_progress SET indexed_through = ?1")?
            .execute([now_through])?;
    }
    tx.commit()?;
    progress.indexed.store(now_through, Ordering::Relaxed);
    Ok(taken)
}

/// The search text of a row read as owner, url, request headers and body,
/// response headers and body (columns 1 to 6).
fn searchable_row(row: &Row<'_>) -> rusqlite::Result<String> {
    let owner: String = row.get(1)?;
    let url: String = row.get(2)?;
    let request_headers: Vec<u8> = row.get(3)?;
    // Read through `substr`, which makes an empty body NULL.
    let request_body: Option<Vec<u8>> = row.get(4)?;
    let response_headers: Option<Vec<u8>> = row.get(5)?;
    let response_body: Option<Vec<u8>> = row.get(6)?;
    Ok(search_text_of(
        &owner,
        &url,
        &decode_headers(&request_headers).unwrap_or_default(),
        &request_body.unwrap_or_default(),
        &decode_headers(&response_headers.unwrap_or_default()).unwrap_or_default(),
        &response_body.unwrap_or_default(),
    ))
}

/// `ferry_matches(text, owner, url, request_headers, request_body,
/// response_headers, response_body)`: whether an entry not indexed yet
/// holds `text` (folded), judged on the very text the index would hold.
fn register_matches(conn: &Connection) -> rusqlite::Result<()> {
    use rusqlite::functions::FunctionFlags;
    conn.create_scalar_function(
        "ferry_matches",
        7,
        FunctionFlags::SQLITE_UTF8 | FunctionFlags::SQLITE_DETERMINISTIC,
        |ctx| {
            let text: String = ctx.get(0)?;
            let owner: String = ctx.get(1)?;
            let url: String = ctx.get(2)?;
            let request_headers: Vec<u8> = ctx.get(3)?;
            let request_body: Vec<u8> = ctx.get(4)?;
            let response_headers: Option<Vec<u8>> = ctx.get(5)?;
            let response_body: Option<Vec<u8>> = ctx.get(6)?;
            let searchable = search_text_of(
                &owner,
                &url,
                &decode_headers(&request_headers).unwrap_or_default(),
                &request_body,
                &decode_headers(&response_headers.unwrap_or_default()).unwrap_or_default(),
                &response_body.unwrap_or_default(),
            );
            // The owner that leads the text is not searched.
            let searched = searchable.split_once('\n').map_or("", |(_, rest)| rest);
            Ok(searched.contains(&text))
        },
    )
}

fn failed(err: impl std::fmt::Display) -> StoreError {
    StoreError(format!("the database failed: {err}"))
}

fn configure(conn: &Connection) -> Result<(), StoreError> {
    conn.busy_timeout(BUSY_TIMEOUT)?;
    Ok(())
}

impl Sqlite {
    /// Opens (or creates) the database at `path` and brings its schema up
    /// to date.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let mut writer = Connection::open(path)?;
        configure(&writer)?;
        writer.pragma_update(None, "journal_mode", "WAL")?;
        // Committed transactions survive a crash of the process (WAL);
        // only a power loss may take the last few.
        writer.pragma_update(None, "synchronous", "NORMAL")?;
        migrate(&mut writer)?;
        register_matches(&writer)?;
        let progress = Arc::new(Progress::read(&writer)?);
        let readers = (0..READERS)
            .map(|_| {
                let reader = Connection::open_with_flags(
                    path,
                    OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
                )?;
                configure(&reader)?;
                register_matches(&reader)?;
                Ok(Mutex::new(reader))
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        let writer = Arc::new(Mutex::new(writer));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (wake, woken) = std::sync::mpsc::sync_channel(1);
        let last_append = Arc::new(Mutex::new(std::time::Instant::now()));
        let appending = Arc::new(AtomicUsize::new(0));
        let thread = std::thread::Builder::new()
            .name("ferry-search-index".to_owned())
            .spawn({
                let (writer, stop, shared) = (
                    Arc::clone(&writer),
                    Arc::clone(&stop),
                    (
                        Arc::clone(&last_append),
                        Arc::clone(&appending),
                        Arc::clone(&progress),
                    ),
                );
                move || run_indexer(writer, stop, woken, shared)
            })
            .map_err(failed)?;
        Ok(Self {
            writer: Some(writer),
            readers: Arc::new(readers),
            next_reader: AtomicUsize::new(0),
            indexer: Some(Indexer {
                stop,
                wake,
                last_append,
                appending,
                progress,
                thread: Some(thread),
            }),
        })
    }

    /// Opens an existing database read-only, as `ferry log` does when no
    /// relay runs: every write fails.
    pub fn open_read_only(path: &Path) -> Result<Self, StoreError> {
        let reader = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        configure(&reader)?;
        register_matches(&reader)?;
        let version: i64 = reader.pragma_query_value(None, "user_version", |r| r.get(0))?;
        if version != schema_version() {
            return Err(StoreError(format!(
                "the database {} has schema version {version}, this ferry reads {}: run the relay of this version once, or use a matching ferry",
                path.display(),
                MIGRATIONS.len()
            )));
        }
        Ok(Self {
            writer: None,
            readers: Arc::new(vec![Mutex::new(reader)]),
            next_reader: AtomicUsize::new(0),
            indexer: None,
        })
    }

    /// Runs `work` on the writer connection on a blocking thread.
    async fn write<T: Send + 'static>(
        &self,
        work: impl FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let writer = self
            .writer
            .clone()
            .ok_or_else(|| StoreError("the database is open read-only".to_owned()))?;
        tokio::task::spawn_blocking(move || {
            let mut conn = writer.lock().unwrap_or_else(PoisonError::into_inner);
            work(&mut conn)
        })
        .await
        .map_err(failed)?
    }

    /// Runs `work` on a reader connection on a blocking thread.
    async fn read<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let readers = Arc::clone(&self.readers);
        let start = self.next_reader.fetch_add(1, Ordering::Relaxed);
        tokio::task::spawn_blocking(move || {
            // A free reader if there is one, else wait for the next in turn.
            let count = readers.len();
            let mut conn = (0..count)
                .find_map(|i| readers[(start + i) % count].try_lock().ok())
                .unwrap_or_else(|| {
                    readers[start % count]
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                });
            let deadline = std::time::Instant::now() + READ_TIME_LIMIT;
            conn.progress_handler(
                STEPS_PER_CHECK,
                Some(move || std::time::Instant::now() > deadline),
            )?;
            let result = work(&conn);
            conn.progress_handler(STEPS_PER_CHECK, None::<fn() -> bool>)?;
            result.map_err(|err| {
                if err.0.contains("interrupted") {
                    StoreError(format!(
                        "{TOO_SLOW}: narrow it with a tunnel, a time range or a longer search"
                    ))
                } else {
                    err
                }
            })
        })
        .await
        .map_err(failed)?
    }
}

/// The version the migrations bring a database to.
fn schema_version() -> i64 {
    i64::try_from(MIGRATIONS.len()).unwrap_or(i64::MAX)
}

fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let tx = conn.transaction()?;
    let version: i64 = tx.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if version > schema_version() {
        return Err(StoreError(format!(
            "the database has schema version {version}, newer than this Ferry knows ({}): a newer Ferry wrote it; run that version, or use another --data-dir",
            MIGRATIONS.len()
        )));
    }
    for migration in MIGRATIONS
        .iter()
        .skip(usize::try_from(version).unwrap_or(0))
    {
        tx.execute_batch(migration)?;
    }
    tx.pragma_update(None, "user_version", schema_version())?;
    tx.commit()?;
    Ok(())
}

/// A write transaction that takes the write lock at once, so a busy
/// database is waited for (up to [`BUSY_TIMEOUT`]) rather than failing
/// when a read inside the transaction would have to become a write.
fn immediate(conn: &mut Connection) -> rusqlite::Result<rusqlite::Transaction<'_>> {
    conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
}

fn insert(tx: &rusqlite::Transaction<'_>, entry: &Exchange) -> Result<(), StoreError> {
    let id = entry.id.to_string();
    let old: Option<i64> = tx
        .prepare_cached("SELECT seq FROM exchanges WHERE id = ?1")?
        .query_row([&id], |r| r.get(0))
        .optional()?;
    if let Some(seq) = old {
        tx.prepare_cached("DELETE FROM exchanges WHERE seq = ?1")?
            .execute([seq])?;
        tx.prepare_cached("DELETE FROM exchange_search WHERE rowid = ?1")?
            .execute([seq])?;
    }
    let response = entry.response.as_ref();
    let dispatch = entry.dispatch.as_ref();
    tx.prepare_cached(
        "INSERT INTO exchanges (id, tunnel, owner, kind, replay_of, received_at, method, url,
            http_version, remote_addr, request_headers, request_body, request_size,
            request_truncated, status, response_headers, response_body, response_size,
            response_truncated, responded_at, done_at, outcome, error, incomplete, replayed_at,
            stored_size, dispatch_webhook, dispatch_event, dispatch_delivery, dispatch_attempt)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17,
            ?18, ?19, ?20, ?21, ?22, ?23, ?24, ?25, ?26, ?27, ?28, ?29, ?30)",
    )?
    .execute(params![
        id,
        entry.tunnel,
        entry.owner,
        entry.kind.as_str(),
        entry.replay_of.map(|r| r.to_string()),
        entry.received_at,
        entry.method,
        entry.url,
        entry.http_version,
        entry.remote_addr,
        encode_headers(&entry.request_headers),
        &entry.request_body.bytes[..],
        i64::try_from(entry.request_body.size).unwrap_or(i64::MAX),
        entry.request_body.truncated,
        response.map(|r| r.status),
        response.map(|r| encode_headers(&r.headers)),
        response.map(|r| &r.body.bytes[..]),
        response.map(|r| i64::try_from(r.body.size).unwrap_or(i64::MAX)),
        response.map(|r| r.body.truncated),
        entry.responded_at,
        entry.done_at,
        entry.outcome.as_str(),
        entry.error,
        entry.incomplete,
        entry.replayed_at,
        i64::try_from(entry.stored_size()).unwrap_or(i64::MAX),
        dispatch.map(|d| &d.webhook),
        dispatch.map(|d| &d.event),
        dispatch.map(|d| &d.delivery),
        dispatch.map(|d| d.attempt),
    ])?;
    Ok(())
}

fn entry_of(row: &Row<'_>) -> Result<Logged, StoreError> {
    let id: String = row.get(1)?;
    let parse_id = |text: &str| {
        text.parse::<ExchangeId>()
            .map_err(|_| StoreError(format!("a stored id `{text}` is corrupt")))
    };
    let kind: String = row.get(4)?;
    let replay_of: Option<String> = row.get(5)?;
    let outcome: String = row.get(22)?;
    let status: Option<u16> = row.get(15)?;
    let response = match status {
        Some(status) => Some(CapturedResponse {
            status,
            headers: decode_headers(&row.get::<_, Option<Vec<u8>>>(16)?.unwrap_or_default())?,
            body: CapturedBody {
                bytes: Bytes::from(row.get::<_, Option<Vec<u8>>>(17)?.unwrap_or_default()),
                size: u64::try_from(row.get::<_, Option<i64>>(18)?.unwrap_or(0)).unwrap_or(0),
                truncated: row.get::<_, Option<bool>>(19)?.unwrap_or(false),
            },
        }),
        None => None,
    };
    Ok(Logged {
        seq: row.get(0)?,
        exchange: Exchange {
            id: parse_id(&id)?,
            tunnel: row.get(2)?,
            owner: row.get(3)?,
            kind: kind.parse().map_err(StoreError)?,
            replay_of: replay_of.as_deref().map(parse_id).transpose()?,
            received_at: row.get(6)?,
            method: row.get(7)?,
            url: row.get(8)?,
            http_version: row.get(9)?,
            remote_addr: row.get(10)?,
            request_headers: decode_headers(&row.get::<_, Vec<u8>>(11)?)?,
            request_body: CapturedBody {
                bytes: Bytes::from(row.get::<_, Vec<u8>>(12)?),
                size: u64::try_from(row.get::<_, i64>(13)?).unwrap_or(0),
                truncated: row.get(14)?,
            },
            response,
            responded_at: row.get(20)?,
            done_at: row.get(21)?,
            outcome: outcome.parse().map_err(StoreError)?,
            error: row.get(23)?,
            incomplete: row.get(24)?,
            replayed_at: row.get(25)?,
            dispatch: match row.get::<_, Option<String>>(26)? {
                Some(webhook) => Some(DispatchRef {
                    webhook,
                    event: row.get::<_, Option<String>>(27)?.unwrap_or_default(),
                    delivery: row.get::<_, Option<String>>(28)?.unwrap_or_default(),
                    attempt: row.get::<_, Option<u32>>(29)?.unwrap_or(0),
                }),
                None => None,
            },
        },
    })
}

/// A filter as SQL conditions over `exchanges` and their parameters.
/// A live tail passes `after`, its position: the search then looks only at
/// newer rows of the index, not the whole log at every commit.
fn conditions(filter: &Filter, after: Option<i64>) -> (String, Vec<rusqlite::types::Value>) {
    use rusqlite::types::Value;
    let mut sql = String::from("1");
    let mut values: Vec<Value> = Vec::new();
    let mut add = |clause: &str, value: Value, values: &mut Vec<Value>| {
        values.push(value);
        sql.push_str(&format!(" AND {clause} ?{}", values.len()));
    };
    if let Some(owner) = &filter.owner {
        add("owner =", Value::Text(owner.clone()), &mut values);
    }
    if let Some(tunnel) = &filter.tunnel {
        add("tunnel =", Value::Text(tunnel.clone()), &mut values);
    }
    if let Some(kind) = filter.kind {
        add("kind =", Value::Text(kind.as_str().to_owned()), &mut values);
    }
    if let Some(method) = &filter.method {
        add("method =", Value::Text(method.clone()), &mut values);
    }
    match filter.status {
        Some(StatusFilter::Code(code)) => add("status =", Value::Integer(code.into()), &mut values),
        Some(StatusFilter::Class(class)) => {
            add("status / 100 =", Value::Integer(class.into()), &mut values)
        }
        None => {}
    }
    if let Some(since) = filter.since {
        add("received_at >=", Value::Integer(since), &mut values);
    }
    if let Some(until) = filter.until {
        add("received_at <", Value::Integer(until), &mut values);
    }
    if filter.missed {
        sql.push_str(" AND outcome = 'client_offline' AND replayed_at IS NULL");
    }
    if let Some(text) = &filter.text {
        // Indexed entries: the trigram index finds the candidates (`LIKE`
        // over the longest run without LIKE's own wildcards, from the
        // owner's rows when there is an owner), and `instr` keeps those
        // holding the whole text. Entries not indexed yet are checked one
        // by one on the same text. Both sides are folded to lowercase.
        let text = fold(text);
        let owner = filter
            .owner
            .as_deref()
            .map_or(String::new(), |owner| format!("{}\n%", fold(owner)));
        values.push(Value::Text(format!(
            "{owner}%{}%",
            super::search_run(&text)
        )));
        values.push(Value::Text(text));
        values.push(Value::Integer(after.unwrap_or(0)));
        let (pattern, text, after) = (values.len() - 2, values.len() - 1, values.len());
        sql.push_str(&format!(
            " AND (CASE WHEN seq <= (SELECT indexed_through FROM exchange_search_progress)
                 THEN seq IN (SELECT rowid FROM exchange_search WHERE text LIKE ?{pattern} AND instr(substr(text, instr(text, char(10)) + 1), ?{text}) > 0 AND rowid > ?{after})
                 ELSE ferry_matches(?{text}, owner, url, request_headers, request_body, response_headers, response_body) END)"
        ));
    }
    (sql, values)
}

fn query(
    conn: &Connection,
    sql: &str,
    values: Vec<rusqlite::types::Value>,
) -> Result<Vec<Logged>, StoreError> {
    let mut statement = conn.prepare_cached(sql)?;
    let mut rows = statement.query(params_from_iter(values))?;
    let mut found = Vec::new();
    while let Some(row) = rows.next()? {
        found.push(entry_of(row)?);
    }
    Ok(found)
}

/// The file is local: when it cannot be written, capture's own health says
/// so.
#[async_trait]
impl Database for Sqlite {
    async fn check(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

#[async_trait]
impl ActivityLog for Sqlite {
    fn search_backlog(&self) -> u64 {
        self.indexer.as_ref().map_or(0, |indexer| {
            let progress = &indexer.progress;
            let appended = progress.appended.load(Ordering::Relaxed);
            u64::try_from(appended.saturating_sub(progress.indexed.load(Ordering::Relaxed)))
                .unwrap_or(0)
        })
    }

    async fn append(&self, entries: Arc<[Exchange]>) -> Result<(), StoreError> {
        let last_append = self
            .indexer
            .as_ref()
            .map(|i| (Arc::clone(&i.last_append), Arc::clone(&i.progress)));
        if let Some(indexer) = &self.indexer {
            indexer.appending.fetch_add(1, Ordering::Relaxed);
        }
        let written = self
            .write(move |conn| {
                let tx = immediate(conn)?;
                for entry in entries.iter() {
                    insert(&tx, entry)?;
                }
                tx.commit()?;
                if let Some((last_append, progress)) = last_append {
                    *last_append.lock().unwrap_or_else(PoisonError::into_inner) =
                        std::time::Instant::now();
                    progress
                        .appended
                        .fetch_max(conn.last_insert_rowid(), Ordering::Relaxed);
                }
                Ok(())
            })
            .await;
        if let Some(indexer) = &self.indexer {
            indexer.appending.fetch_sub(1, Ordering::Relaxed);
            let _ = indexer.wake.try_send(());
        }
        written
    }

    async fn list(
        &self,
        filter: &Filter,
        before: Option<ExchangeId>,
        limit: usize,
        bodies: bool,
    ) -> Result<Vec<Exchange>, StoreError> {
        let (mut sql, mut values) = conditions(filter, None);
        let columns = if bodies {
            COLUMNS
        } else {
            COLUMNS_WITHOUT_BODIES
        };
        if let Some(before) = before {
            values.push(rusqlite::types::Value::Text(before.to_string()));
            sql.push_str(&format!(" AND id < ?{}", values.len()));
        }
        let sql = format!(
            "SELECT {columns} FROM exchanges WHERE {sql} ORDER BY id DESC LIMIT {}",
            limit.min(10_000)
        );
        let found = self.read(move |conn| query(conn, &sql, values)).await?;
        Ok(found.into_iter().map(|l| l.exchange).collect())
    }

    async fn committed_after(
        &self,
        filter: &Filter,
        seq: i64,
        limit: usize,
    ) -> Result<Vec<Logged>, StoreError> {
        let (sql, mut values) = conditions(filter, Some(seq));
        values.push(rusqlite::types::Value::Integer(seq));
        let sql = format!(
            "SELECT {COLUMNS_WITHOUT_BODIES} FROM exchanges WHERE {sql} AND seq > ?{} ORDER BY seq LIMIT {}",
            values.len(),
            limit.min(10_000)
        );
        self.read(move |conn| query(conn, &sql, values)).await
    }

    async fn seq_of(&self, id: ExchangeId, owner: Option<&str>) -> Result<Option<i64>, StoreError> {
        let owner = owner.map(str::to_owned);
        self.read(move |conn| {
            Ok(conn
                .prepare_cached(
                    "SELECT seq FROM exchanges WHERE id = ?1 AND (?2 IS NULL OR owner = ?2)",
                )?
                .query_row(params![id.to_string(), owner], |r| r.get(0))
                .optional()?)
        })
        .await
    }

    async fn last_seq(&self) -> Result<i64, StoreError> {
        self.read(|conn| {
            Ok(conn
                .prepare_cached("SELECT COALESCE(MAX(seq), 0) FROM exchanges")?
                .query_row([], |r| r.get(0))?)
        })
        .await
    }

    async fn get(
        &self,
        id: ExchangeId,
        owner: Option<&str>,
    ) -> Result<Option<Exchange>, StoreError> {
        let owner = owner.map(str::to_owned);
        let found = self
            .read(move |conn| {
                let sql = format!(
                    "SELECT {COLUMNS} FROM exchanges WHERE id = ?1 AND (?2 IS NULL OR owner = ?2)"
                );
                query(
                    conn,
                    &sql,
                    vec![
                        rusqlite::types::Value::Text(id.to_string()),
                        owner.map_or(rusqlite::types::Value::Null, rusqlite::types::Value::Text),
                    ],
                )
            })
            .await?;
        Ok(found.into_iter().next().map(|l| l.exchange))
    }

    async fn mark_replayed(&self, id: ExchangeId, at: Micros) -> Result<bool, StoreError> {
        self.write(move |conn| {
            let changed = conn
                .prepare_cached(
                    "UPDATE exchanges SET replayed_at = ?2 WHERE id = ?1 AND replayed_at IS NULL",
                )?
                .execute(params![id.to_string(), at])?;
            Ok(changed > 0)
        })
        .await
    }

    async fn prune(&self, retention: Retention, now: Micros) -> Result<Pruned, StoreError> {
        self.write(move |conn| {
            let mut pruned = Pruned::default();
            let oldest_allowed =
                now.saturating_sub(i64::try_from(retention.max_age.as_micros()).unwrap_or(i64::MAX));
            // By age.
            loop {
                let chunk = delete_where(
                    conn,
                    "seq IN (SELECT seq FROM exchanges WHERE received_at < ?1 ORDER BY seq LIMIT ?2)",
                    params![oldest_allowed, PRUNE_CHUNK],
                )?;
                pruned.entries += chunk.entries;
                pruned.bytes += chunk.bytes;
                if chunk.entries == 0 {
                    break;
                }
            }
            // Each owner's share, then the whole log: oldest first.
            let max_owner = i64::try_from(retention.max_bytes_per_owner).unwrap_or(i64::MAX);
            let owners: Vec<(String, i64)> = conn
                .prepare_cached(
                    "SELECT owner, SUM(stored_size) FROM exchanges GROUP BY owner HAVING SUM(stored_size) > ?1",
                )?
                .query_map([max_owner], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<Result<_, _>>()?;
            for (owner, total) in owners {
                let chunk = delete_oldest(conn, Some(&owner), total - max_owner)?;
                pruned.entries += chunk.entries;
                pruned.bytes += chunk.bytes;
            }
            let total: i64 = conn
                .prepare_cached("SELECT COALESCE(SUM(stored_size), 0) FROM exchanges")?
                .query_row([], |r| r.get(0))?;
            let max_total = i64::try_from(retention.max_bytes).unwrap_or(i64::MAX);
            if total > max_total {
                let chunk = delete_oldest(conn, None, total - max_total)?;
                pruned.entries += chunk.entries;
                pruned.bytes += chunk.bytes;
            }
            Ok(pruned)
        })
        .await
    }
}

/// Deletes the rows matching `condition` (and their search rows) in one
/// transaction.
fn delete_where(
    conn: &mut Connection,
    condition: &str,
    values: impl rusqlite::Params + Clone,
) -> Result<Pruned, StoreError> {
    let tx = immediate(conn)?;
    let (entries, bytes): (i64, i64) = tx
        .prepare_cached(&format!(
            "SELECT COUNT(*), COALESCE(SUM(stored_size), 0) FROM exchanges WHERE {condition}"
        ))?
        .query_row(values.clone(), |r| Ok((r.get(0)?, r.get(1)?)))?;
    tx.prepare_cached(&format!(
        "DELETE FROM exchange_search WHERE rowid IN (SELECT seq FROM exchanges WHERE {condition})"
    ))?
    .execute(values.clone())?;
    tx.prepare_cached(&format!("DELETE FROM exchanges WHERE {condition}"))?
        .execute(values)?;
    tx.commit()?;
    Ok(Pruned {
        entries: u64::try_from(entries).unwrap_or(0),
        bytes: u64::try_from(bytes).unwrap_or(0),
    })
}

/// Deletes the oldest entries (of `owner`, when given) until at least
/// `excess` bytes are gone.
fn delete_oldest(
    conn: &mut Connection,
    owner: Option<&str>,
    excess: i64,
) -> Result<Pruned, StoreError> {
    let mut pruned = Pruned::default();
    while i64::try_from(pruned.bytes).unwrap_or(i64::MAX) < excess {
        // The oldest chunk whose running total covers what is left.
        let left = excess - i64::try_from(pruned.bytes).unwrap_or(0);
        let cutoff: Option<i64> = conn
            .prepare_cached(
                "SELECT seq FROM (
                    SELECT seq, SUM(stored_size) OVER (ORDER BY id, seq) AS running
                    FROM exchanges WHERE (?1 IS NULL OR owner = ?1) ORDER BY id, seq LIMIT ?3
                 ) WHERE running >= ?2 LIMIT 1",
            )?
            .query_row(params![owner, left, PRUNE_CHUNK], |r| r.get(0))
            .optional()?;
        let chunk = match cutoff {
            Some(seq) => {
                let id: String = conn
                    .prepare_cached("SELECT id FROM exchanges WHERE seq = ?1")?
                    .query_row([seq], |r| r.get(0))?;
                delete_where(
                    conn,
                    "(?1 IS NULL OR owner = ?1) AND (id < ?2 OR (id = ?2 AND seq <= ?3))",
                    params![owner, id, seq],
                )?
            }
            None => delete_where(
                conn,
                "seq IN (SELECT seq FROM exchanges WHERE (?1 IS NULL OR owner = ?1) ORDER BY id, seq LIMIT ?2)",
                params![owner, PRUNE_CHUNK],
            )?,
        };
        pruned.entries += chunk.entries;
        pruned.bytes += chunk.bytes;
        if chunk.entries == 0 {
            break;
        }
    }
    Ok(pruned)
}

#[async_trait]
impl NameRegistry for Sqlite {
    async fn save_name(&self, record: NameRecord) -> Result<(), StoreError> {
        self.write(move |conn| {
            conn.prepare_cached(
                "INSERT INTO names (name, owner, last_seen, hold_until, target)
                 VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (name) DO UPDATE SET owner = ?2, last_seen = ?3, hold_until = ?4,
                    target = ?5",
            )?
            .execute(params![
                record.name,
                record.owner,
                record.last_seen,
                record.hold_until,
                record.target
            ])?;
            Ok(())
        })
        .await
    }

    async fn name(&self, name: &str) -> Result<Option<NameRecord>, StoreError> {
        let name = name.to_owned();
        self.read(move |conn| {
            Ok(conn
                .prepare_cached(
                    "SELECT name, owner, last_seen, hold_until, target FROM names WHERE name = ?1",
                )?
                .query_row([name], name_of)
                .optional()?)
        })
        .await
    }

    async fn names(&self, now: Micros) -> Result<Vec<NameRecord>, StoreError> {
        self.read(move |conn| {
            Ok(conn
                .prepare_cached(
                    "SELECT name, owner, last_seen, hold_until, target FROM names
                     WHERE hold_until IS NULL OR hold_until > ?1
                     ORDER BY last_seen, name",
                )?
                .query_map([now], name_of)?
                .collect::<Result<_, _>>()?)
        })
        .await
    }

    async fn forget_expired(&self, now: Micros) -> Result<u64, StoreError> {
        self.write(move |conn| {
            let removed = conn
                .prepare_cached("DELETE FROM names WHERE hold_until <= ?1")?
                .execute([now])?;
            Ok(removed as u64)
        })
        .await
    }
}

fn name_of(row: &Row<'_>) -> rusqlite::Result<NameRecord> {
    Ok(NameRecord {
        name: row.get(0)?,
        owner: row.get(1)?,
        last_seen: row.get(2)?,
        hold_until: row.get(3)?,
        target: row.get(4)?,
    })
}

#[cfg(test)]
mod tests {
    use std::sync::PoisonError;

    use std::sync::atomic::Ordering;
    use std::sync::Arc;

    use bytes::Bytes;
    use ferry_common::ids::ExchangeId;

    use super::{index_step, Sqlite, INDEX_STEP};
    use crate::store::{ActivityLog, CapturedBody, Exchange, Filter, Kind, Outcome};

    fn entry(owner: &str, body: &str) -> Exchange {
        Exchange {
            id: ExchangeId::new(),
            tunnel: "demo".to_owned(),
            owner: owner.to_owned(),
            kind: Kind::Tunnel,
            replay_of: None,
            received_at: 1,
            method: "POST".to_owned(),
            url: "http://demo.localhost/hook".to_owned(),
            http_version: "HTTP/1.1".to_owned(),
            remote_addr: "127.0.0.1:1".to_owned(),
            request_headers: Vec::new(),
            request_body: CapturedBody {
                size: body.len() as u64,
                bytes: Bytes::from(body.to_owned()),
                truncated: false,
            },
            response: None,
            responded_at: None,
            done_at: Some(2),
            outcome: Outcome::Answered,
            error: None,
            incomplete: false,
            replayed_at: None,
            dispatch: None,
        }
    }

    #[tokio::test]
    async fn searches_find_the_same_entries_before_and_after_indexing() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Sqlite::open(&dir.path().join("ferry.db")).expect("store");
        let entries: Vec<Exchange> = (0..100)
            .map(|i| {
                let owner = if i % 2 == 0 { "acct_a" } else { "acct_b" };
                let body = if i % 10 == 0 {
                    "Invoice PAID straße"
                } else {
                    "other"
                };
                entry(owner, body)
            })
            .collect();
        store.append(entries.into()).await.expect("append");
        let search = |owner: Option<&str>, text: &str| Filter {
            owner: owner.map(str::to_owned),
            text: Some(text.to_owned()),
            ..Filter::default()
        };
        let queries = [
            search(Some("acct_a"), "invoice paid"),
            search(None, "STRASSE"),
            search(Some("acct_b"), "acct"),
        ];
        let mut before = Vec::new();
        for query in &queries {
            before.push(
                store
                    .list(query, None, 1000, false)
                    .await
                    .expect("list")
                    .len(),
            );
        }
        assert_eq!(before, [10, 10, 0], "found one by one before indexing");
        index_all(&store);
        for (query, expected) in queries.iter().zip(before) {
            let found = store.list(query, None, 1000, false).await.expect("list");
            assert_eq!(found.len(), expected, "{query:?} through the index");
        }
    }

    /// Runs index steps until the index has every entry.
    fn index_all(store: &Sqlite) {
        let writer = store.writer.clone().expect("writable");
        let progress = Arc::clone(&store.indexer.as_ref().expect("indexer").progress);
        let mut conn = writer.lock().unwrap_or_else(PoisonError::into_inner);
        while index_step(&mut conn, &progress).expect("index step") == INDEX_STEP {}
    }

    /// Stops the index's own thread, so that the test alone moves it.
    fn stop_index_thread(store: &mut Sqlite) {
        let indexer = store.indexer.as_mut().expect("indexer");
        indexer.stop.store(true, Ordering::Relaxed);
        let _ = indexer.wake.try_send(());
        if let Some(thread) = indexer.thread.take() {
            thread.join().expect("the index thread");
        }
    }

    #[tokio::test]
    async fn the_search_backlog_counts_what_the_index_lacks_and_ends_at_zero() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("ferry.db");
        let mut store = Sqlite::open(&path).expect("store");
        stop_index_thread(&mut store);
        // Half with no body, as a GET has.
        let batch = |n: usize| -> Arc<[Exchange]> {
            (0..n)
                .map(|i| entry("acct_a", if i % 2 == 0 { "" } else { "x" }))
                .collect()
        };
        store.append(batch(300)).await.expect("append");
        assert_eq!(store.search_backlog(), 300);
        index_all(&store);
        assert_eq!(store.search_backlog(), 0);
        // Entries removed before the index reached them (a prune) still
        // let the backlog end.
        store.append(batch(5)).await.expect("append");
        assert_eq!(store.search_backlog(), 5);
        store
            .writer
            .as_ref()
            .expect("writable")
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .execute("DELETE FROM exchanges WHERE seq > 302", [])
            .expect("delete");
        index_all(&store);
        assert_eq!(store.search_backlog(), 0, "past the removed entries");
        // Read back from the file; the thread takes new entries by itself.
        store.append(batch(2)).await.expect("append");
        drop(store);
        let store = Sqlite::open(&path).expect("reopen");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while store.search_backlog() > 0 {
            assert!(std::time::Instant::now() < deadline, "never indexed");
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let found = store
            .list(&Filter::default(), None, 1000, false)
            .await
            .expect("list");
        assert_eq!(found.len(), 304);
    }
}
