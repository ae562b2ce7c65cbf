//! The relay's body type and its error, and the pacing of public request
//! bodies.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use ferry_common::headers::{remove_ferry_headers, remove_hop_by_hop};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

/// The body type of every request and response the relay handles.
pub type Body = UnsyncBoxBody<Bytes, BodyError>;

/// Why a body could not be read to its end.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// The public caller's connection failed while sending the body, or
    /// its framing was malformed.
    #[error("the caller's request body failed: {0}")]
    Caller(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The tunnel failed while carrying a body.
    #[error("the tunnel failed while carrying the body: {0}")]
    Tunnel(#[source] hyper::Error),
    /// The caller paused longer than the relay allows between parts of a body.
    #[error("the request body paused for more than {} s", .0.as_secs_f64())]
    Stalled(Duration),
    /// The caller sent the body slower than the relay's minimum rate.
    #[error("the request body arrived slower than {0} bytes per second")]
    TooSlow(u64),
    /// The body grew past the relay's size limit.
    #[error("the request body is larger than {0} bytes, this relay's limit")]
    TooLarge(u64),
}

/// A public request body that must keep moving (and whose trailers lose
/// their hop-by-hop fields, as its headers do): each part within `pause`
/// of the last, and, once `pause` has passed since the start, at an average
/// of `min_rate` bytes per second. A caller trickling a byte at a time
/// would otherwise hold one of its tunnel's request slots for as long as it
/// likes.
pub struct PacedBody<B = Incoming> {
    /// The body as it arrives.
    inner: B,
    /// When the body started.
    started: Instant,
    /// When the last part arrived.
    last: Instant,
    /// Bytes received so far.
    received: u64,
    /// The longest pause, and the grace before the rate counts.
    pause: Duration,
    /// The slowest average rate, bytes per second.
    min_rate: u64,
    /// The most bytes the body may hold.
    max_size: u64,
    /// Fires at the next deadline.
    timer: Pin<Box<Sleep>>,
    /// Where a failure is recorded.
    watch: BodyWatch,
}

impl<B> PacedBody<B> {
    /// Paces `inner` from now, failing it once it passes `max_size` bytes.
    pub fn new(inner: B, pause: Duration, min_rate: u64, max_size: u64) -> (Self, BodyWatch) {
        let now = Instant::now();
        let watch = BodyWatch::default();
        let body = Self {
            inner,
            started: now,
            last: now,
            received: 0,
            pause,
            min_rate: min_rate.max(1),
            max_size,
            timer: Box::pin(tokio::time::sleep_until(now + pause)),
            watch: watch.clone(),
        };
        (body, watch)
    }

    /// When the rate check next fails if nothing more arrives.
    fn rate_deadline(&self) -> Instant {
        self.started
            + self.pause
            + Duration::from_secs_f64(self.received as f64 / self.min_rate as f64)
    }

    fn deadline(&self) -> Instant {
        (self.last + self.pause).min(self.rate_deadline())
    }
}

impl<B> HttpBody for PacedBody<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(mut frame))) => {
                this.last = Instant::now();
                if let Some(trailers) = frame.trailers_mut() {
                    // HTTP/2 refuses connection-specific fields, and a
                    // refused trailer would leave the stream hanging; the
                    // relay's own fields are not the caller's to send.
                    remove_hop_by_hop(trailers);
                    remove_ferry_headers(trailers);
                }
                if let Some(data) = frame.data_ref() {
                    this.received += data.len() as u64;
                    if this.received > this.max_size {
                        // Counted as it streams: a body without a length
                        // is never buffered to find out how large it is.
                        this.watch.record(BodyFailure::TooLarge(this.max_size));
                        return Poll::Ready(Some(Err(BodyError::TooLarge(this.max_size))));
                    }
                }
                let deadline = this.deadline();
                this.timer.as_mut().reset(deadline);
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(err))) => {
                this.watch.record(BodyFailure::Caller);
                Poll::Ready(Some(Err(BodyError::Caller(err.into()))))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                if this.timer.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                let (failure, err) = if Instant::now() >= this.last + this.pause {
                    (
                        BodyFailure::Stalled(this.pause),
                        BodyError::Stalled(this.pause),
                    )
                } else {
                    (
                        BodyFailure::TooSlow(this.min_rate),
                        BodyError::TooSlow(this.min_rate),
                    )
                };
                this.watch.record(failure);
                Poll::Ready(Some(Err(err)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A body that holds `G` until it is dropped: a request's slot, or its
/// connection's mark of a request in flight. Unlike a mapped body it keeps
/// the size hint, so a response of known length keeps its Content-Length.
pub struct Holding<B, G> {
    /// The body.
    inner: B,
    /// Held while the body lives.
    _guard: G,
}

impl<B, G> Holding<B, G> {
    /// `inner`, holding `guard`.
    pub fn new(inner: B, guard: G) -> Self {
        Self {
            inner,
            _guard: guard,
        }
    }
}

impl<B: HttpBody + Unpin, G: Unpin> HttpBody for Holding<B, G> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// How a paced body failed, for the code that sent it on: once a body
/// fails, the tunnel only sees a reset stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFailure {
    /// The caller's connection failed or its framing was malformed.
    Caller,
    /// The caller paused too long.
    Stalled(Duration),
    /// The caller was too slow.
    TooSlow(u64),
    /// The body passed the size limit.
    TooLarge(u64),
}

/// Reads how a [`PacedBody`] failed, after it has been handed on.
#[derive(Debug, Clone, Default)]
pub struct BodyWatch(Arc<Mutex<Option<BodyFailure>>>);

impl BodyWatch {
    /// How the body failed, if it did.
    pub fn failure(&self) -> Option<BodyFailure> {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn record(&self, failure: BodyFailure) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = Some(failure);
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::time::Duration;

    use bytes::Bytes;
    use http_body::Frame;
    use http_body_util::{BodyExt, StreamBody};
    use tokio::sync::mpsc;
    use tokio_stream::wrappers::ReceiverStream;

    use super::{BodyError, BodyFailure, PacedBody};

    type Chunks = mpsc::Sender<Result<Frame<Bytes>, Infallible>>;
    type Stream = StreamBody<ReceiverStream<Result<Frame<Bytes>, Infallible>>>;

    fn paced(pause: Duration, min_rate: u64) -> (Chunks, PacedBody<Stream>, super::BodyWatch) {
        let (sender, receiver) = mpsc::channel(4);
        let (body, watch) = PacedBody::new(
            StreamBody::new(ReceiverStream::new(receiver)),
            pause,
            min_rate,
            u64::MAX,
        );
        (sender, body, watch)
    }

    async fn chunk(sender: &Chunks, size: usize) {
        sender
            .send(Ok(Frame::data(Bytes::from(vec![7u8; size]))))
            .await
            .unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_pauses_too_long_fails_as_stalled() {
        let (sender, mut body, watch) = paced(Duration::from_secs(30), 1);
        chunk(&sender, 10_000).await;
        assert!(body.frame().await.unwrap().is_ok());
        tokio::time::sleep(Duration::from_secs(29)).await;
        chunk(&sender, 10_000).await;
        assert!(
            body.frame().await.unwrap().is_ok(),
            "a pause within the limit is fine"
        );
        let err = body.frame().await.unwrap().unwrap_err();
        assert!(matches!(err, BodyError::Stalled(_)), "{err}");
        assert_eq!(
            watch.failure(),
            Some(BodyFailure::Stalled(Duration::from_secs(30)))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_trickling_body_fails_once_below_the_minimum_rate() {
        let (sender, mut body, watch) = paced(Duration::from_secs(30), 1024);
        tokio::spawn(async move {
            for _ in 0..100 {
                tokio::time::sleep(Duration::from_secs(5)).await;
                if sender
                    .send(Ok(Frame::data(Bytes::from_static(b"x"))))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        });
        let started = tokio::time::Instant::now();
        let failure = loop {
            match body.frame().await {
                Some(Ok(_)) => {}
                Some(Err(err)) => break err,
                None => panic!("the trickle was never cut"),
            }
        };
        assert!(matches!(failure, BodyError::TooSlow(1024)), "{failure}");
        assert!(
            started.elapsed() < Duration::from_secs(31),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(watch.failure(), Some(BodyFailure::TooSlow(1024)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_steady_body_above_the_rate_is_never_cut() {
        let (sender, mut body, watch) = paced(Duration::from_secs(30), 1024);
        tokio::spawn(async move {
            for _ in 0..120 {
                tokio::time::sleep(Duration::from_secs(1)).await;
                chunk(&sender, 2048).await;
            }
        });
        let mut total = 0;
        while let Some(frame) = body.frame().await {
            total += frame.unwrap().into_data().map_or(0, |d| d.len());
        }
        assert_eq!(total, 120 * 2048);
        assert_eq!(watch.failure(), None);
    }

    #[tokio::test]
    async fn a_body_past_the_size_limit_fails_as_too_large() {
        let (sender, receiver) = mpsc::channel(4);
        let (mut body, watch) = PacedBody::new(
            StreamBody::new(ReceiverStream::new(receiver)),
            Duration::from_secs(30),
            1,
            15_000,
        );
        chunk(&sender, 10_000).await;
        assert!(body.frame().await.unwrap().is_ok());
        chunk(&sender, 10_000).await;
        let err = body.frame().await.unwrap().unwrap_err();
        assert!(matches!(err, BodyError::TooLarge(15_000)), "{err}");
        assert_eq!(watch.failure(), Some(BodyFailure::TooLarge(15_000)));
    }
}
