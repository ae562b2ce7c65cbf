//! One public connection's life: how long it may stay open with nothing in
//! flight, counted from accept.
//!
//! hyper's own header timeout starts only once a request's first bytes
//! arrive, and HTTP/2 connections have no idle timeout at all, so silent
//! connections would stay open forever. [`GuardedIo`] wraps the socket and
//! reports end-of-stream to hyper once the connection has had no request in
//! flight for too long, which closes it whatever the protocol.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::task::AtomicWaker;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// What a connection is doing, shared by its socket and its requests.
#[derive(Debug)]
pub struct Activity {
    /// When the connection was accepted.
    opened: Instant,
    /// Milliseconds after `opened` of the last request end or byte moved.
    last: AtomicU64,
    /// Requests (and passed-through WebSockets) in flight.
    active: AtomicUsize,
    /// Requests begun so far, to tell a fresh connection from an idle one.
    begun: AtomicU64,
    /// Wakes the socket's reader when the last request ends, so that it
    /// re-arms its deadline.
    reader: AtomicWaker,
}

/// One request in flight on a connection; the connection cannot time out
/// while it lives.
#[derive(Debug)]
pub struct ActiveGuard(Arc<Activity>);

impl Activity {
    /// A connection accepted now.
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            opened: Instant::now(),
            last: AtomicU64::new(0),
            active: AtomicUsize::new(0),
            begun: AtomicU64::new(0),
            reader: AtomicWaker::new(),
        })
    }

    fn touch(&self) {
        let millis = self.opened.elapsed().as_millis();
        self.last
            .store(u64::try_from(millis).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.opened + Duration::from_millis(self.last.load(Ordering::Relaxed))
    }

    /// Marks a request in flight until the guard drops.
    pub fn begin(self: &Arc<Self>) -> ActiveGuard {
        self.active.fetch_add(1, Ordering::Relaxed);
        self.begun.fetch_add(1, Ordering::Relaxed);
        ActiveGuard(Arc::clone(self))
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.touch();
        if self.0.active.fetch_sub(1, Ordering::Relaxed) == 1 {
            self.0.reader.wake();
        }
    }
}

/// The limits a [`GuardedIo`] enforces.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// How long a fresh connection may wait before its first request.
    pub first_request: Duration,
    /// How long a connection may sit with no request in flight afterwards.
    pub idle: Duration,
}

/// A socket that reads as closed once its connection has been idle too long.
pub struct GuardedIo<T> {
    /// The socket.
    inner: T,
    /// The connection's activity.
    activity: Arc<Activity>,
    /// The limits.
    timeouts: Timeouts,
    /// Fires when the connection may next be idle for too long.
    timer: Pin<Box<Sleep>>,
    /// Set once the deadline passed: every read from now on is the end.
    expired: bool,
}

impl<T> GuardedIo<T> {
    /// Wraps a socket accepted now.
    pub fn new(inner: T, activity: Arc<Activity>, timeouts: Timeouts) -> Self {
        let timer = Box::pin(tokio::time::sleep(timeouts.first_request));
        Self {
            inner,
            activity,
            timeouts,
            timer,
            expired: false,
        }
    }

    /// Whether the connection has been idle too long. When it returns
    /// `false` the reader is woken again when that may change: at the
    /// deadline, or when the last request in flight ends.
    fn idle_too_long(&mut self, cx: &mut Context<'_>) -> bool {
        self.activity.reader.register(cx.waker());
        if self.activity.active.load(Ordering::Relaxed) > 0 {
            return false;
        }
        let deadline = if self.activity.begun.load(Ordering::Relaxed) == 0 {
            self.activity.opened + self.timeouts.first_request
        } else {
            self.activity.last() + self.timeouts.idle
        };
        if deadline <= Instant::now() {
            return true;
        }
        if self.timer.deadline() != deadline {
            self.timer.as_mut().reset(deadline);
        }
        // Registers the waker for the deadline; a fire means time is up.
        self.timer.as_mut().poll(cx).is_ready()
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for GuardedIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.expired {
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(result) => {
                if buf.filled().len() > before {
                    self.activity.touch();
                }
                Poll::Ready(result)
            }
            Poll::Pending => {
                if self.idle_too_long(cx) {
                    self.expired = true;
                    return Poll::Ready(Ok(()));
                }
                Poll::Pending
            }
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for GuardedIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(written, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        written
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(written, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        written
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::{Activity, GuardedIo, Timeouts};

    const TIMEOUTS: Timeouts = Timeouts {
        first_request: Duration::from_secs(30),
        idle: Duration::from_secs(120),
    };

    #[tokio::test(start_paused = true)]
    async fn a_silent_connection_reads_as_closed_after_the_first_request_timeout() {
        let (_peer, socket) = tokio::io::duplex(64);
        let mut io = GuardedIo::new(socket, Activity::new(), TIMEOUTS);
        let started = tokio::time::Instant::now();
        let mut buf = [0u8; 8];
        assert_eq!(io.read(&mut buf).await.unwrap(), 0);
        assert_eq!(started.elapsed(), Duration::from_secs(30));
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_in_flight_holds_the_connection_open_and_idle_counts_from_its_end() {
        let (mut peer, socket) = tokio::io::duplex(64);
        let activity = Activity::new();
        let mut io = GuardedIo::new(socket, std::sync::Arc::clone(&activity), TIMEOUTS);
        peer.write_all(b"GET").await.unwrap();
        let mut buf = [0u8; 8];
        assert_eq!(io.read(&mut buf).await.unwrap(), 3);
        let request = activity.begin();
        let ended = tokio::spawn(async move {
            // A slow origin: the request stays in flight for ten minutes.
            tokio::time::sleep(Duration::from_secs(600)).await;
            drop(request);
            tokio::time::Instant::now()
        });
        assert_eq!(io.read(&mut buf).await.unwrap(), 0);
        let ended = ended.await.unwrap();
        assert_eq!(tokio::time::Instant::now() - ended, TIMEOUTS.idle);
    }
}
