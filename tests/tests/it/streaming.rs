//! Bodies stream through the tunnel: bounded memory both ways, early
//! flushes, and cancellation when the caller leaves.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ferry_tests::{
    full, host_of, send, stop_all, within, Body, ClientOptions, Origin, TestClient, TestRelay,
};
use futures_util::StreamExt;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper::{Method, Request, Response, StatusCode};
use tokio::sync::{mpsc, oneshot};

const TOTAL: u64 = 256 * 1024 * 1024;
const CHUNK: usize = 64 * 1024;
/// The slow side consumes one MiB, then pauses this long: about 100 MiB/s,
/// slower than the tunnel moves bytes, so pressure builds up behind it.
const SLOW_PAUSE: Duration = Duration::from_millis(10);
/// The most that may be between producer and consumer at any moment: the
/// HTTP/2 windows and the kernel's socket buffers on the way, far below the
/// 256 MiB a buffering tunnel would hold.
const MAX_IN_FLIGHT: u64 = 48 * 1024 * 1024;

/// The `len` bytes of a streamed body from `offset` on. Each 8-byte word
/// holds its own index in the body, little-endian, so bytes that arrive
/// reordered, lost or repeated do not match.
fn pattern(offset: u64, len: usize) -> Vec<u8> {
    let skip = (offset % 8) as usize;
    let mut bytes = vec![0u8; (skip + len).div_ceil(8) * 8];
    for (word, out) in (offset / 8..).zip(bytes.chunks_exact_mut(8)) {
        out.copy_from_slice(&word.to_le_bytes());
    }
    bytes.drain(..skip);
    bytes.truncate(len);
    bytes
}

/// A body of `TOTAL` [`pattern`] bytes that counts what has been pulled
/// from it, so the test knows how far ahead of the consumer the producer got.
fn counted_body(produced: Arc<AtomicU64>) -> Body {
    let stream = futures_util::stream::iter(0..TOTAL / CHUNK as u64).map(move |i| {
        produced.fetch_add(CHUNK as u64, Ordering::Relaxed);
        let chunk = Bytes::from(pattern(i * CHUNK as u64, CHUNK));
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(Frame::data(chunk))
    });
    StreamBody::new(stream).boxed_unsync()
}

/// Reads `body` slowly, checking every frame how far the producer is ahead;
/// returns the bytes read and the largest lead seen.
async fn read_slowly(mut body: hyper::body::Incoming, produced: &AtomicU64) -> (u64, u64) {
    let (mut consumed, mut lead, mut since_pause) = (0u64, 0u64, 0u64);
    while let Some(frame) = body.frame().await {
        let frame = frame.expect("body frame");
        if let Some(data) = frame.data_ref() {
            assert!(
                data[..] == pattern(consumed, data.len())[..],
                "the {} bytes at offset {consumed} are not the ones sent there",
                data.len()
            );
            consumed += data.len() as u64;
            since_pause += data.len() as u64;
            lead = lead.max(produced.load(Ordering::Relaxed).saturating_sub(consumed));
            if since_pause >= 1024 * 1024 {
                since_pause = 0;
                tokio::time::sleep(SLOW_PAUSE).await;
            }
        }
    }
    (consumed, lead)
}

#[tokio::test]
async fn upload_of_256_mib_is_back_pressured_by_a_slow_origin() {
    // Above the default body size limit (100 MiB), as an operator who
    // expects large uploads sets it.
    let relay = TestRelay::start(ferry_relay::Config {
        max_body_size: 1024 * 1024 * 1024,
        ..ferry_relay::Config::default()
    })
    .await;
    let produced = Arc::new(AtomicU64::new(0));
    let (report, mut reports) = mpsc::unbounded_channel();
    let origin_produced = Arc::clone(&produced);
    let origin = Origin::start(move |req: Request<hyper::body::Incoming>| {
        let (produced, report) = (Arc::clone(&origin_produced), report.clone());
        async move {
            let outcome = read_slowly(req.into_body(), &produced).await;
            let _ = report.send(outcome);
            Response::new(full("stored"))
        }
    })
    .await;
    let client = TestClient::start(&relay, &origin.target(), ClientOptions::default()).await;

    let request = Request::builder()
        .method(Method::POST)
        .uri("/upload")
        .body(counted_body(Arc::clone(&produced)))
        .expect("valid request");
    let response = send(relay.addr, &host_of(&client.public_url), request).await;
    assert_eq!(response.status(), StatusCode::OK);
    let (consumed, lead) = within("the origin's report", reports.recv())
        .await
        .expect("report");
    assert_eq!(consumed, TOTAL);
    assert!(
        lead < MAX_IN_FLIGHT,
        "the caller got {} MiB ahead of the origin",
        lead >> 20
    );

    stop_all(client, origin, relay).await;
}

#[tokio::test]
async fn download_of_256_mib_is_back_pressured_by_a_slow_caller() {
    let relay = TestRelay::open().await;
    let produced = Arc::new(AtomicU64::new(0));
    let origin_produced = Arc::clone(&produced);
    let origin = Origin::start(move |_req| {
        let produced = Arc::clone(&origin_produced);
        async move { Response::new(counted_body(produced)) }
    })
    .await;
    let client = TestClient::start(&relay, &origin.target(), ClientOptions::default()).await;

    let request = Request::builder()
        .uri("/download")
        .body(full(""))
        .expect("valid request");
    let response = send(relay.addr, &host_of(&client.public_url), request).await;
    assert_eq!(response.status(), StatusCode::OK);
    let (consumed, lead) =
        within("the download", read_slowly(response.into_body(), &produced)).await;
    assert_eq!(consumed, TOTAL);
    assert!(
        lead < MAX_IN_FLIGHT,
        "the origin got {} MiB ahead of the caller",
        lead >> 20
    );

    stop_all(client, origin, relay).await;
}

#[tokio::test]
async fn server_sent_events_arrive_before_the_stream_ends() {
    let relay = TestRelay::open().await;
    let (finish, finished) = oneshot::channel::<()>();
    let finished = Arc::new(std::sync::Mutex::new(Some(finished)));
    let origin = Origin::start(move |_req| {
        let finished = finished.lock().expect("lock").take();
        async move {
            let first = futures_util::stream::once(async {
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(Frame::data(Bytes::from_static(
                    b"data: first\n\n",
                )))
            });
            // The stream stays open until the test has seen the first event.
            let last = futures_util::stream::once(async move {
                if let Some(finished) = finished {
                    let _ = finished.await;
                }
                Ok(Frame::data(Bytes::from_static(b"data: last\n\n")))
            });
            Response::builder()
                .header("content-type", "text/event-stream")
                .header("cache-control", "no-cache")
                .body(StreamBody::new(first.chain(last)).boxed_unsync())
                .expect("valid response")
        }
    })
    .await;
    let client = TestClient::start(&relay, &origin.target(), ClientOptions::default()).await;

    let request = Request::builder()
        .uri("/events")
        .body(full(""))
        .expect("valid request");
    let response = send(relay.addr, &host_of(&client.public_url), request).await;
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut body = response.into_body();
    let first = within("the first event", body.frame())
        .await
        .expect("a frame")
        .expect("frame");
    assert_eq!(first.into_data().expect("data"), "data: first\n\n");
    finish.send(()).expect("origin still streaming");
    let rest = within("the rest", body.collect())
        .await
        .expect("rest")
        .to_bytes();
    assert_eq!(rest, "data: last\n\n");

    stop_all(client, origin, relay).await;
}

/// Sends a message when dropped: tells the test the origin's handler was
/// cancelled.
struct DropSignal(Option<oneshot::Sender<()>>);

impl Drop for DropSignal {
    fn drop(&mut self) {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(());
        }
    }
}

#[tokio::test]
async fn a_caller_hanging_up_cancels_the_local_request() {
    let relay = TestRelay::open().await;
    let (started_tx, mut started) = mpsc::unbounded_channel();
    let (cancelled_tx, cancelled) = oneshot::channel();
    let cancelled_tx = Arc::new(std::sync::Mutex::new(Some(cancelled_tx)));
    let origin = Origin::start(move |_req| {
        let guard = DropSignal(cancelled_tx.lock().expect("lock").take());
        let started_tx = started_tx.clone();
        async move {
            let _guard = guard;
            let _ = started_tx.send(());
            // Never answers: only cancellation ends this handler.
            std::future::pending::<Response<Body>>().await
        }
    })
    .await;
    let client = TestClient::start(&relay, &origin.target(), ClientOptions::default()).await;

    let host = host_of(&client.public_url);
    let relay_addr = relay.addr;
    let caller = tokio::spawn(async move {
        let request = Request::builder()
            .uri("/slow")
            .body(full(""))
            .expect("valid request");
        send(relay_addr, &host, request).await
    });
    within("the origin to get the request", started.recv())
        .await
        .expect("started");
    caller.abort();
    let _ = caller.await;
    within("the local request to be cancelled", cancelled)
        .await
        .expect("cancelled");

    stop_all(client, origin, relay).await;
}
