//! One public connection's life: how long it may stay open with nothing in
//! flight, counted from accept, and how long its writes may stall.
//!
//! hyper's own header timeout starts only once a request's first bytes
//! arrive, and HTTP/2 connections have no idle timeout at all, so silent
//! connections would stay open forever. [`GuardedIo`] wraps the socket and
//! reports end-of-stream to hyper once the connection has had no request in
//! flight for too long, which closes it whatever the protocol; pings and
//! other bytes do not count as activity. It also fails the connection when a
//! write stays blocked too long: a caller that stops reading would otherwise
//! keep its requests' slots, and leave their response data queued in the
//! tunnel, for as long as it liked.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::task::AtomicWaker;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::{Instant, Sleep};

use crate::limits::PerIpGuard;

/// What a connection is doing, shared by its socket and its requests.
#[derive(Debug)]
pub struct Activity {
    /// When the connection was accepted.
    opened: Instant,
    /// Milliseconds after `opened` of the last request's end.
    last: AtomicU64,
    /// Requests (and passed-through WebSockets) in flight.
    active: AtomicUsize,
    /// Requests begun so far, to tell a fresh connection from an idle one.
    begun: AtomicU64,
    /// Wakes the socket's reader when the last request ends, so that it
    /// re-arms its deadline, or when the connection is aborted.
    reader: AtomicWaker,
    /// Set to end the connection at its next read.
    aborted: AtomicBool,
    /// Set once the connection carries a tunnel, whose own pings judge
    /// whether it is alive, rather than the write timeout for callers.
    tunnel: AtomicBool,
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
            aborted: AtomicBool::new(false),
            tunnel: AtomicBool::new(false),
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

    /// Ends the connection, with every request on it: for a caller that
    /// stalls its responses where no write of ours ever blocks.
    pub fn abort(&self) {
        self.aborted.store(true, Ordering::Relaxed);
        self.reader.wake();
    }

    /// Marks the connection as a tunnel's for as long as the guard lives:
    /// never idle, and its writes wait on the tunnel's own flow control.
    pub fn carry_tunnel(self: &Arc<Self>) -> ActiveGuard {
        self.tunnel.store(true, Ordering::Relaxed);
        self.begin()
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
    /// How long a write to the caller may stay blocked.
    pub write: Duration,
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
    /// Fires when a blocked write has waited too long; armed while one is.
    write_stall: Option<Pin<Box<Sleep>>>,
    /// The connection's places under the relay's connection limits, given
    /// back when the socket closes, even after an upgrade handed it on.
    _places: Places,
}

/// A connection's places under the relay-wide and per-address caps (a
/// trusted proxy's connection without a PROXY header has no address's).
pub type Places = (OwnedSemaphorePermit, Option<PerIpGuard>);

impl<T> GuardedIo<T> {
    /// Wraps a socket accepted now, holding its `places`.
    pub fn new(inner: T, activity: Arc<Activity>, timeouts: Timeouts, places: Places) -> Self {
        let timer = Box::pin(tokio::time::sleep(timeouts.first_request));
        Self {
            inner,
            activity,
            timeouts,
            timer,
            expired: false,
            write_stall: None,
            _places: places,
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
        // The deadline moves later with every request; the timer is moved
        // only when it would fire late, or has fired early, rather than
        // on every request.
        let armed = self.timer.deadline();
        if armed > deadline || (armed < deadline && self.timer.is_elapsed()) {
            self.timer.as_mut().reset(deadline);
        }
        // Registers the waker for the deadline.
        if self.timer.as_mut().poll(cx).is_pending() {
            return false;
        }
        if self.timer.deadline() == deadline {
            return true;
        }
        // Fired at an earlier deadline: wait for the current one.
        self.timer.as_mut().reset(deadline);
        self.timer.as_mut().poll(cx).is_ready()
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for GuardedIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.activity.aborted.load(Ordering::Relaxed) {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "the caller stopped taking response data",
            )));
        }
        if self.expired {
            return Poll::Ready(Ok(()));
        }
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(result) => Poll::Ready(result),
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

impl<T> GuardedIo<T> {
    /// Passes a write's outcome on, failing it once the socket has refused
    /// bytes for longer than the write timeout.
    fn watch_write(
        &mut self,
        cx: &mut Context<'_>,
        written: Poll<io::Result<usize>>,
    ) -> Poll<io::Result<usize>> {
        if written.is_ready() || self.activity.tunnel.load(Ordering::Relaxed) {
            self.write_stall = None;
            return written;
        }
        let limit = self.timeouts.write;
        let stall = self
            .write_stall
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match stall.as_mut().poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the caller stopped reading",
            ))),
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
        self.watch_write(cx, written)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.watch_write(cx, written)
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
        write: Duration::from_secs(30),
    };

    fn places() -> super::Places {
        let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(1));
        let slot = slots.try_acquire_owned().expect("a free slot");
        let per_ip = crate::limits::PerIp::new(1)
            .acquire("192.0.2.1".parse().expect("address"))
            .expect("a free share");
        (slot, Some(per_ip))
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_connection_reads_as_closed_after_the_first_request_timeout() {
        let (_peer, socket) = tokio::io::duplex(64);
        let mut io = GuardedIo::new(socket, Activity::new(), TIMEOUTS, places());
        let started = tokio::time::Instant::now();
        let mut buf = [0u8; 8];
        assert_eq!(io.read(&mut buf).await.unwrap(), 0);
        assert_eq!(started.elapsed(), Duration::from_secs(30));
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_in_flight_holds_the_connection_open_and_idle_counts_from_its_end() {
        let (mut peer, socket) = tokio::io::duplex(64);
        let activity = Activity::new();
        let mut io = GuardedIo::new(socket, std::sync::Arc::clone(&activity), TIMEOUTS, places());
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
        // Bytes that are not requests (pings) do not keep it open.
        let chatter = tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(10)).await;
                if peer.write_all(b"p").await.is_err() {
                    return;
                }
            }
        });
        let mut read = 0;
        loop {
            match io.read(&mut buf).await.unwrap() {
                0 => break,
                n => read += n,
            }
        }
        assert!(read > 0, "the chatter was read meanwhile");
        let ended = ended.await.unwrap();
        assert_eq!(tokio::time::Instant::now() - ended, TIMEOUTS.idle);
        chatter.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn each_request_moves_the_idle_deadline_though_the_timer_fires_at_an_older_one() {
        let (mut peer, socket) = tokio::io::duplex(64);
        let activity = Activity::new();
        let mut io = GuardedIo::new(socket, std::sync::Arc::clone(&activity), TIMEOUTS, places());
        let requests = tokio::spawn(async move {
            // Each request ends before the deadline the one before it set,
            // and after the timer armed for an older deadline has fired.
            let mut ended = tokio::time::Instant::now();
            for pause in [5, 40, 100] {
                tokio::time::sleep(Duration::from_secs(pause)).await;
                let request = activity.begin();
                peer.write_all(b"GET").await.unwrap();
                tokio::time::sleep(Duration::from_secs(1)).await;
                drop(request);
                ended = tokio::time::Instant::now();
            }
            (peer, ended)
        });
        let mut buf = [0u8; 8];
        while io.read(&mut buf).await.unwrap() > 0 {}
        let (_peer, ended) = requests.await.unwrap();
        assert_eq!(tokio::time::Instant::now() - ended, TIMEOUTS.idle);
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_blocked_by_a_caller_that_stopped_reading_fails_in_time() {
        let (_peer, socket) = tokio::io::duplex(64);
        let mut io = GuardedIo::new(socket, Activity::new(), TIMEOUTS, places());
        let started = tokio::time::Instant::now();
        let err = io.write_all(&[0u8; 1024]).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), TIMEOUTS.write);
    }
}
