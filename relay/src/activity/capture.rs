//! Capture: each exchange is recorded while it streams, and handed to one
//! writer that stores entries in batches.
//!
//! A [`Capture`] is shared by the request's and the response's [`Tap`]s;
//! when the last of them is dropped the entry is complete and goes to the
//! [`Recorder`]'s queue. The queue is bounded in bytes: an entry that does
//! not fit goes in without its bodies (flagged incomplete), and one that
//! does not fit even so is dropped and counted. Forwarding never waits on
//! the queue or the disk.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::HeaderMap;
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::store::{
    now_micros, ActivityLog, CapturedBody, CapturedResponse, Exchange, Header, Outcome,
};

/// Bytes of entries the queue may hold before it sheds bodies.
pub const QUEUE_BYTES: usize = 64 * 1024 * 1024;
/// The most entries one transaction takes.
const BATCH_ENTRIES: usize = 2048;
/// The most body bytes one transaction takes.
const BATCH_BYTES: usize = 16 * 1024 * 1024;
/// The least time between the starts of two transactions while entries
/// keep coming: each commit rewrites the pages its entries touched (the
/// table's, its indexes'), so entries gathered for a few milliseconds share
/// those writes. An entry after a quiet spell is written at once.
const BATCH_GATHER: Duration = Duration::from_millis(10);

/// How long a batch waits before it is written again while the database
/// is unreachable.
const RETRY_UNAVAILABLE: Duration = Duration::from_secs(1);

/// What capture has done, for `/metrics` and `/healthz`.
#[derive(Debug, Default)]
pub struct CaptureStats {
    /// Entries stored.
    pub written: AtomicU64,
    /// Their [`Exchange::stored_size`] in all.
    pub written_bytes: AtomicU64,
    /// Entries queued without their bodies because the queue was full.
    pub shed: AtomicU64,
    /// Entries lost: the queue had no room even without bodies, or the
    /// database refused the write.
    pub dropped: AtomicU64,
}

/// Hands finished entries to the writer. Cheap to clone.
#[derive(Clone)]
pub struct Recorder {
    /// The writer's queue; each entry carries its share of the byte budget.
    queue: mpsc::Sender<(Exchange, OwnedSemaphorePermit)>,
    /// The queue's byte budget.
    budget: Arc<Semaphore>,
    /// The most body bytes kept per direction.
    body_limit: usize,
    /// Counters.
    stats: Arc<CaptureStats>,
    /// Bumped after every committed batch, for live tails.
    committed: watch::Sender<u64>,
    /// The last write's error while writes fail, `None` while they work.
    health: watch::Sender<Option<String>>,
}

impl Recorder {
    /// A recorder keeping `body_limit` bytes of each body, and the writer
    /// that drains it into `log` until `stop` (it then stores what is
    /// queued and returns).
    pub fn new(
        log: Arc<dyn ActivityLog>,
        body_limit: usize,
        queue_bytes: usize,
        stop: CancellationToken,
    ) -> (Self, impl std::future::Future<Output = ()> + Send) {
        let (queue, receiver) = mpsc::channel(queue_bytes / 256 + 1);
        let recorder = Self {
            queue,
            budget: Arc::new(Semaphore::new(queue_bytes)),
            body_limit,
            stats: Arc::default(),
            committed: watch::Sender::new(0),
            health: watch::Sender::new(None),
        };
        let writer = write(
            log,
            receiver,
            Arc::clone(&recorder.stats),
            (recorder.committed.clone(), recorder.health.clone()),
            stop,
        );
        (recorder, writer)
    }

    /// The counters.
    pub fn stats(&self) -> &CaptureStats {
        &self.stats
    }

    /// Wakes live tails for entries another relay committed to a shared
    /// store.
    pub fn note_foreign_commit(&self) {
        self.committed.send_modify(|n| *n += 1);
    }

    /// Changes after each committed batch.
    pub fn committed(&self) -> watch::Receiver<u64> {
        self.committed.subscribe()
    }

    /// Whether writes fail: the last error while they do.
    pub fn health(&self) -> watch::Receiver<Option<String>> {
        self.health.subscribe()
    }

    /// The most body bytes kept per direction.
    pub fn body_limit(&self) -> usize {
        self.body_limit
    }

    /// Queues `entry`, shedding its bodies or dropping it when the queue is
    /// full. Never waits.
    pub fn submit(&self, mut entry: Exchange) {
        let size = entry.stored_size();
        let permit = match self.reserve(size) {
            Some(permit) => permit,
            None => {
                entry.request_body.bytes = Bytes::new();
                entry.request_body.truncated |= entry.request_body.size > 0;
                if let Some(response) = &mut entry.response {
                    response.body.truncated |= response.body.size > 0;
                    response.body.bytes = Bytes::new();
                }
                entry.incomplete = true;
                match self.reserve(entry.stored_size()) {
                    Some(permit) => {
                        self.stats.shed.fetch_add(1, Ordering::Relaxed);
                        permit
                    }
                    None => {
                        self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                }
            }
        };
        if self.queue.try_send((entry, permit)).is_err() {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn reserve(&self, size: u64) -> Option<OwnedSemaphorePermit> {
        let size = u32::try_from(size).ok()?;
        Arc::clone(&self.budget).try_acquire_many_owned(size).ok()
    }
}

/// The writer: takes what is queued, up to a batch, and stores it in one
/// transaction; a failed write is counted and reported, and retried only
/// while the database is unavailable and the relay is not stopping.
async fn write(
    log: Arc<dyn ActivityLog>,
    mut receiver: mpsc::Receiver<(Exchange, OwnedSemaphorePermit)>,
    stats: Arc<CaptureStats>,
    (committed, health): (watch::Sender<u64>, watch::Sender<Option<String>>),
    stop: CancellationToken,
) {
    let mut last_batch: Option<Instant> = None;
    let mut last_full = false;
    loop {
        // Cancel-safe: `recv` loses nothing when `stop` wins.
        let first = tokio::select! {
            first = receiver.recv() => first,
            () = stop.cancelled() => {
                receiver.close();
                receiver.recv().await
            }
        };
        let Some(first) = first else { return };
        let waited = last_batch.map_or(BATCH_GATHER, |at| at.elapsed());
        // A full batch means the writer is behind: no reason to wait.
        if waited < BATCH_GATHER && !last_full && !stop.is_cancelled() {
            // Cancel-safe: a sleep.
            tokio::select! {
                () = tokio::time::sleep(BATCH_GATHER - waited) => {}
                () = stop.cancelled() => {}
            }
        }
        last_batch = Some(Instant::now());
        let mut batch = vec![first];
        let mut bytes = 0;
        while batch.len() < BATCH_ENTRIES && bytes < BATCH_BYTES {
            match receiver.try_recv() {
                Ok(next) => {
                    bytes += next.1.num_permits();
                    batch.push(next);
                }
                Err(_) => break,
            }
        }
        last_full = batch.len() >= BATCH_ENTRIES || bytes >= BATCH_BYTES;
        let count = batch.len() as u64;
        let size: u64 = batch.iter().map(|(entry, _)| entry.stored_size()).sum();
        // The permits go back only once the entries are stored, so the
        // budget bounds what the writer holds too.
        let (entries, permits): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
        let entries: Arc<[Exchange]> = entries.into();
        loop {
            match log.append(Arc::clone(&entries)).await {
                Ok(()) => {
                    stats.written.fetch_add(count, Ordering::Relaxed);
                    stats.written_bytes.fetch_add(size, Ordering::Relaxed);
                    health.send_if_modified(|h| h.take().is_some());
                    committed.send_modify(|n| *n += 1);
                }
                // A database unavailable for now may come back: the batch waits,
                // holding its share of the queue's budget, so what arrives
                // meanwhile queues until the budget is spent and is shed
                // and dropped (counted) beyond it.
                Err(err) if err.is_unavailable() && !stop.is_cancelled() => {
                    tracing::warn!(%err, entries = count, "activity log unavailable; entries wait in memory, forwarding goes on");
                    health.send_replace(Some(err.to_string()));
                    // Cancel-safe: a sleep.
                    tokio::select! {
                        () = tokio::time::sleep(RETRY_UNAVAILABLE) => {}
                        () = stop.cancelled() => {}
                    }
                    continue;
                }
                Err(err) => {
                    tracing::warn!(%err, entries = count, "activity log write failed; forwarding goes on");
                    stats.dropped.fetch_add(count, Ordering::Relaxed);
                    health.send_replace(Some(err.to_string()));
                }
            }
            break;
        }
        drop(permits);
    }
}

/// Header fields as the log keeps them, in the map's order.
pub fn headers_of(map: &HeaderMap) -> Vec<Header> {
    map.iter()
        .map(|(name, value)| Header {
            name: name.as_str().to_owned(),
            value: value.as_bytes().to_vec(),
        })
        .collect()
}

/// One exchange being captured; stored when the last handle to it drops.
pub struct Capture {
    /// The entry so far.
    entry: Mutex<Option<Exchange>>,
    /// Where it goes.
    recorder: Recorder,
}

impl Capture {
    /// Starts capturing `entry`.
    pub fn new(recorder: &Recorder, entry: Exchange) -> Arc<Self> {
        Arc::new(Self {
            entry: Mutex::new(Some(entry)),
            recorder: recorder.clone(),
        })
    }

    fn update(&self, change: impl FnOnce(&mut Exchange)) {
        if let Some(entry) = self
            .entry
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_mut()
        {
            change(entry);
        }
    }

    /// The response's head was sent on.
    pub fn responded(&self, status: u16, headers: &HeaderMap, outcome: Outcome) {
        let headers = headers_of(headers);
        let at = now_micros();
        self.update(|entry| {
            entry.response = Some(CapturedResponse {
                status,
                headers,
                body: CapturedBody::default(),
            });
            entry.responded_at = Some(at);
            entry.outcome = outcome;
        });
    }

    /// The exchange ended with `outcome` and `error`; the relay's own
    /// answer, if it gave one, is `answer`.
    pub fn failed(
        &self,
        outcome: Outcome,
        error: String,
        answer: Option<(u16, &HeaderMap, Bytes)>,
    ) {
        let at = now_micros();
        let answer = answer.map(|(status, headers, body)| CapturedResponse {
            status,
            headers: headers_of(headers),
            body: CapturedBody {
                size: body.len() as u64,
                bytes: body,
                truncated: false,
            },
        });
        self.update(|entry| {
            entry.outcome = outcome;
            entry.error = Some(error);
            if answer.is_some() {
                entry.response = answer;
                entry.responded_at = Some(at);
            }
            entry.done_at = Some(at);
        });
    }

    /// Drops the exchange: it is not recorded.
    pub fn discard(&self) {
        self.entry
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
    }

    /// Wraps a body so that what passes through is captured as `side`.
    pub fn tap<B: HttpBody + Unpin>(self: &Arc<Self>, body: B, side: Side) -> Tap<B> {
        Tap {
            inner: body,
            capture: Arc::clone(self),
            side,
            kept: BytesMut::new(),
            size: 0,
            limit: self.recorder.body_limit,
            ended: false,
            declared: None,
            error: None,
        }
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        let entry = self
            .entry
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(mut entry) = entry {
            entry.done_at.get_or_insert_with(now_micros);
            self.recorder.submit(entry);
        }
    }
}

/// Which body a [`Tap`] captures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The request's.
    Request,
    /// The response's.
    Response,
}

/// A body that keeps the first bytes of what passes through (up to the
/// capture limit) and counts all of them, without holding anything up.
pub struct Tap<B: HttpBody + Unpin> {
    /// The body being carried.
    inner: B,
    /// The exchange it belongs to.
    capture: Arc<Capture>,
    /// Which body it is.
    side: Side,
    /// The bytes kept, copied: a reference to each frame would pin its
    /// whole read buffer, so a body sent in tiny chunks would cost many
    /// times the limit.
    kept: BytesMut,
    /// Bytes that passed through.
    size: u64,
    /// The most bytes kept.
    limit: usize,
    /// Whether the body reached its end.
    ended: bool,
    /// The size the request said its body has (`content-length`).
    declared: Option<u64>,
    /// What went wrong while reading it.
    error: Option<String>,
}

impl<B: HttpBody + Unpin> Tap<B> {
    /// Notes the size the body is declared to have, so that a body cut
    /// short is recorded with it.
    pub fn declared(mut self, size: Option<u64>) -> Self {
        self.declared = size;
        self
    }
}

impl<B: HttpBody + Unpin> Drop for Tap<B> {
    fn drop(&mut self) {
        let ended = self.ended || self.inner.is_end_stream();
        let kept = std::mem::take(&mut self.kept).freeze();
        let body = CapturedBody {
            // A body not read to its end is cut, however much was kept.
            truncated: !ended || self.size > kept.len() as u64,
            bytes: kept,
            size: self.size.max(self.declared.unwrap_or(0)),
        };
        let (side, error) = (self.side, self.error.take());
        self.capture.update(|entry| {
            match side {
                Side::Request => {
                    entry.request_body = body;
                    // The rest never passed: what is kept is exact, but
                    // not all of it.
                    entry.incomplete |= !ended;
                }
                Side::Response => {
                    if let Some(response) = &mut entry.response {
                        response.body = body;
                    }
                    entry.done_at = Some(now_micros());
                    if !ended && entry.outcome == Outcome::Answered {
                        entry.outcome = Outcome::CallerHungUp;
                    }
                }
            }
            if let Some(error) = error {
                if matches!(entry.outcome, Outcome::Answered | Outcome::CallerHungUp) {
                    entry.outcome = Outcome::Failed;
                }
                entry.error.get_or_insert(error);
            }
        });
    }
}

impl<B> HttpBody for Tap<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.size += data.len() as u64;
                    let room = this.limit - this.kept.len();
                    if room > 0 && !data.is_empty() {
                        this.kept.extend_from_slice(&data[..room.min(data.len())]);
                    }
                }
            }
            Poll::Ready(Some(Err(err))) => this.error = Some(err.to_string()),
            Poll::Ready(None) => this.ended = true,
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;
    use std::sync::Arc;

    use bytes::Bytes;
    use ferry_common::ids::ExchangeId;
    use tokio_util::sync::CancellationToken;

    use super::Recorder;
    use crate::store::sqlite::Sqlite;
    use crate::store::{
        ActivityLog, CapturedBody, CapturedResponse, Exchange, Filter, Header, Kind, Outcome,
    };

    fn entry(body: usize) -> Exchange {
        let bytes = Bytes::from(vec![b'x'; body]);
        Exchange {
            id: ExchangeId::new(),
            tunnel: "demo".to_owned(),
            owner: "acct_1".to_owned(),
            kind: Kind::Tunnel,
            replay_of: None,
            received_at: 1,
            method: "POST".to_owned(),
            url: "http://demo.localhost/hook".to_owned(),
            http_version: "HTTP/1.1".to_owned(),
            remote_addr: "127.0.0.1:1".to_owned(),
            request_headers: vec![Header {
                name: "content-type".to_owned(),
                value: b"application/json".to_vec(),
            }],
            request_body: CapturedBody {
                size: body as u64,
                bytes: bytes.clone(),
                truncated: false,
            },
            response: Some(CapturedResponse {
                status: 200,
                headers: Vec::new(),
                body: CapturedBody {
                    size: body as u64,
                    bytes,
                    truncated: false,
                },
            }),
            responded_at: Some(2),
            done_at: Some(3),
            outcome: Outcome::Answered,
            error: None,
            incomplete: false,
            replayed_at: None,
            dispatch: None,
        }
    }

    #[tokio::test]
    async fn a_flood_the_writer_cannot_keep_up_with_stays_within_the_queue_budget_and_is_counted() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Arc::new(Sqlite::open(&dir.path().join("ferry.db")).expect("store"));
        let budget = 64 * 1024;
        let stop = CancellationToken::new();
        let (recorder, writer) = Recorder::new(store.clone(), 1024, budget, stop.clone());
        // The writer is not running yet: as far as the queue can tell, the
        // disk has stalled while the flood goes on.
        let flood = 2000;
        for _ in 0..flood {
            recorder.submit(entry(1024));
        }
        let stats = recorder.stats();
        let (shed, dropped) = (
            stats.shed.load(Ordering::Relaxed),
            stats.dropped.load(Ordering::Relaxed),
        );
        assert!(
            shed > 0,
            "entries beyond the budget lose their bodies first"
        );
        assert!(dropped > 0, "and beyond that are dropped");
        stop.cancel();
        writer.await;
        let stored = store
            .list(&Filter::default(), None, 10_000, true)
            .await
            .expect("list");
        assert_eq!(
            stored.len() as u64,
            flood - dropped,
            "every kept entry is stored"
        );
        assert_eq!(stats.written.load(Ordering::Relaxed), flood - dropped);
        let held: u64 = stored.iter().map(Exchange::stored_size).sum();
        assert!(
            held <= budget as u64,
            "everything queued at once fit the budget: {held} bytes"
        );
        let incomplete: Vec<_> = stored.iter().filter(|e| e.incomplete).collect();
        assert_eq!(incomplete.len() as u64, shed, "shed entries are flagged");
        assert!(incomplete.iter().all(|e| e.request_body.truncated
            && e.request_body.size == 1024
            && e.request_body.bytes.is_empty()));
    }

    #[tokio::test]
    async fn a_database_that_refuses_writes_is_reported_until_writes_work_again() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("ferry.db");
        let store = Arc::new(Sqlite::open(&path).expect("store"));
        let stop = CancellationToken::new();
        let (recorder, writer) =
            Recorder::new(store.clone(), 1024, super::QUEUE_BYTES, stop.clone());
        let writer = tokio::spawn(writer);
        let mut health = recorder.health();
        // Another program holds the database's write lock.
        let blocker = rusqlite::Connection::open(&path).expect("second connection");
        blocker
            .execute_batch("BEGIN EXCLUSIVE")
            .expect("exclusive lock");
        recorder.submit(entry(10));
        let failing = health
            .wait_for(Option::is_some)
            .await
            .expect("health reported")
            .clone();
        assert!(failing.is_some_and(|e| e.contains("locked")));
        assert_eq!(recorder.stats().dropped.load(Ordering::Relaxed), 1);
        blocker.execute_batch("ROLLBACK").expect("release");
        recorder.submit(entry(10));
        health
            .wait_for(Option::is_none)
            .await
            .expect("health reported");
        assert_eq!(recorder.stats().written.load(Ordering::Relaxed), 1);
        stop.cancel();
        writer.await.expect("writer ends");
    }

    #[tokio::test]
    async fn kept_bytes_are_copied_not_pinned_from_the_frames() {
        use http_body_util::BodyExt;
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Arc::new(Sqlite::open(&dir.path().join("ferry.db")).expect("store"));
        let (recorder, writer) =
            Recorder::new(store.clone(), 64, 1 << 20, CancellationToken::new());
        let capture = super::Capture::new(&recorder, entry(0));
        // One large read buffer, sent as one-byte frames: keeping a
        // reference per frame would pin the whole buffer per byte kept.
        let buffer = Bytes::from(vec![7u8; 4096]);
        let frames: Vec<Result<_, std::convert::Infallible>> = (0..4096)
            .map(|i| Ok(hyper::body::Frame::data(buffer.slice(i..i + 1))))
            .collect();
        let body = http_body_util::StreamBody::new(futures_util::stream::iter(frames));
        let mut tap = capture.tap(body, super::Side::Request);
        while tap.frame().await.is_some() {}
        assert_eq!(tap.kept.len(), 64);
        let range = buffer.as_ptr_range();
        assert!(!range.contains(&tap.kept.as_ptr()), "kept bytes are a copy");
        drop((tap, capture, recorder, writer));
    }
}
