//! The tunnel WebSocket as a byte stream.
//!
//! HTTP/2 wants an `AsyncRead + AsyncWrite`; the tunnel is a WebSocket. Each
//! write becomes one binary message of at most [`WRITE_CHUNK`] bytes, and
//! reads return the binary messages' bytes in order. Pings and pongs are
//! answered by tungstenite; a text message is a protocol error.
//!
//! A [`CloseSignal`] lets the owner of a session close the WebSocket with a
//! code and reason even though HTTP/2 owns the stream, and tells it the
//! reason the peer gave when the peer closed.
//!
//! Flushes wait for the end of the turn. HTTP/2 flushes after every DATA
//! frame of more than a few hundred bytes, so with many streams answering at
//! once each frame cost a system call (and a wake-up of the peer). A flush
//! asked for is instead left to an [`EndOfTurn`] task, which runs once the
//! task polling the stream has let go: whatever one poll of the connection
//! wrote (every stream's frames then ready) leaves in one write, at the
//! connection's next poll. The flush itself is done by the stream's own
//! task when that task polls the stream again, which HTTP/2 does for as
//! long as the connection lives, reading; a stream that is closing or
//! closed flushes at once.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use futures_util::task::AtomicWaker;
use futures_util::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::WebSocketStream;

use crate::handshake::WRITE_CHUNK;

/// Why a tunnel WebSocket was closed, as carried in its close frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseReason {
    /// The WebSocket close code (1000 normal, 1001 going away, …).
    pub code: u16,
    /// A sentence for the person at the other end.
    pub reason: String,
}

impl CloseReason {
    /// A close because this side is going away (shutdown).
    pub fn going_away(reason: impl Into<String>) -> Self {
        Self {
            code: 1001,
            reason: reason.into(),
        }
    }

    /// A close because a policy ended the session (such as a takeover).
    pub fn policy(reason: impl Into<String>) -> Self {
        Self {
            code: 1008,
            reason: reason.into(),
        }
    }

    fn to_frame(&self) -> CloseFrame {
        // A close frame's payload is at most 125 bytes: 2 for the code and
        // the rest for the reason, cut at a character boundary.
        let mut end = self.reason.len().min(123);
        while !self.reason.is_char_boundary(end) {
            end -= 1;
        }
        CloseFrame {
            code: CloseCode::from(self.code),
            reason: self.reason[..end].to_owned().into(),
        }
    }
}

#[derive(Debug, Default)]
struct CloseState {
    /// The reason this side will give when it closes.
    local: Mutex<Option<CloseReason>>,
    /// Set once the owner asks to close now rather than at shutdown.
    now: AtomicBool,
    /// The reason the peer gave in its close frame.
    remote: Mutex<Option<CloseReason>>,
    /// Wakes the stream's reader so that it notices `now`.
    waker: AtomicWaker,
}

/// A handle to close a [`ByteStream`] from outside and to learn why the peer
/// closed it. Clones share the same stream.
#[derive(Debug, Clone, Default)]
pub struct CloseSignal(Arc<CloseState>);

impl CloseSignal {
    /// Sets the reason sent when the stream closes, without closing it yet;
    /// used before a graceful HTTP/2 shutdown that ends with a close.
    pub fn set_reason(&self, reason: CloseReason) {
        *self.0.local.lock().unwrap_or_else(PoisonError::into_inner) = Some(reason);
    }

    /// Closes the stream now with `reason`: the close frame is sent and
    /// HTTP/2 reads the end of the stream, failing what is in flight.
    pub fn close(&self, reason: CloseReason) {
        self.set_reason(reason);
        self.0.now.store(true, Ordering::Release);
        self.0.waker.wake();
    }

    /// The reason the peer gave when it closed, if it has.
    pub fn remote_reason(&self) -> Option<CloseReason> {
        self.0
            .remote
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn local_frame(&self) -> Option<CloseFrame> {
        self.0
            .local
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .map(CloseReason::to_frame)
    }
}

/// Where the stream is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Open,
    /// A close was asked for; the close frame is being sent.
    Closing,
    /// No more bytes will be read.
    Ended,
}

/// A WebSocket read and written as a stream of bytes.
///
/// Inside a Tokio runtime a flush returns before the bytes leave: they leave
/// when the owner next reads or flushes, which HTTP/2 always does. An owner
/// that flushes and then stops polling the stream, yet keeps it open, would
/// hold them back.
pub struct ByteStream<S> {
    /// The WebSocket underneath.
    ws: WebSocketStream<S>,
    /// What is left of the binary message being read.
    pending: Bytes,
    /// Open, closing or ended.
    phase: Phase,
    /// Shared with whoever may close the stream from outside.
    signal: CloseSignal,
    /// Whether messages were written since the last flush.
    unflushed: bool,
    /// Where deferred flushes are arranged; `None` outside a Tokio runtime,
    /// where every flush is done at once.
    turn: Option<Arc<EndOfTurn>>,
}

impl<S> ByteStream<S> {
    /// Wraps a WebSocket; `signal` closes it from outside.
    pub fn new(ws: WebSocketStream<S>, signal: CloseSignal) -> Self {
        let turn = tokio::runtime::Handle::try_current().ok().map(|runtime| {
            let turn = Arc::new(EndOfTurn::default());
            runtime.spawn(Arc::clone(&turn).run());
            turn
        });
        Self {
            ws,
            pending: Bytes::new(),
            phase: Phase::Open,
            signal,
            unflushed: false,
            turn,
        }
    }
}

impl<S> Drop for ByteStream<S> {
    fn drop(&mut self) {
        if let Some(turn) = &self.turn {
            turn.closed.store(true, Ordering::Release);
            turn.helper.wake();
        }
    }
}

/// The task that ends a turn: woken when a flush is deferred, it runs after
/// the deferring poll has returned and marks the flush due.
#[derive(Debug, Default)]
struct EndOfTurn {
    /// A flush waits for this task to run.
    requested: AtomicBool,
    /// This task has run since: the next chance to flush takes it.
    due: AtomicBool,
    /// The stream's task (HTTP/2's connection), polled again once due.
    stream: AtomicWaker,
    /// This task.
    helper: AtomicWaker,
    /// The stream is gone: the task ends.
    closed: AtomicBool,
}

impl EndOfTurn {
    async fn run(self: Arc<Self>) {
        std::future::poll_fn(|cx| {
            self.helper.register(cx.waker());
            if self.closed.load(Ordering::Acquire) {
                return Poll::Ready(());
            }
            if self.requested.swap(false, Ordering::AcqRel) {
                self.due.store(true, Ordering::Release);
                self.stream.wake();
            }
            Poll::Pending
        })
        .await;
    }
}

fn io_error(err: tungstenite::Error) -> io::Error {
    match err {
        tungstenite::Error::Io(err) => err,
        tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed => {
            io::Error::new(io::ErrorKind::BrokenPipe, "tunnel websocket is closed")
        }
        other => io::Error::other(other),
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> ByteStream<S> {
    /// Flushes what was written, unless the flush can wait for the end of
    /// the turn (then `Ready` at once: the stream's task is polled again to
    /// do it).
    fn poll_flush_turn(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.unflushed && self.phase == Phase::Open {
            if let Some(turn) = &self.turn {
                if !turn.due.load(Ordering::Acquire) {
                    turn.stream.register(cx.waker());
                    if !turn.requested.swap(true, Ordering::AcqRel) {
                        turn.helper.wake();
                    }
                    return Poll::Ready(Ok(()));
                }
            }
        }
        ready!(Pin::new(&mut self.ws).poll_flush(cx)).map_err(io_error)?;
        self.unflushed = false;
        if let Some(turn) = &self.turn {
            turn.due.store(false, Ordering::Release);
        }
        Poll::Ready(Ok(()))
    }

    /// Sends this side's close frame and flushes it.
    fn poll_send_close(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.phase == Phase::Open {
            ready!(Pin::new(&mut self.ws).poll_ready(cx)).map_err(io_error)?;
            let frame = self.signal.local_frame();
            Pin::new(&mut self.ws)
                .start_send(Message::Close(frame))
                .map_err(io_error)?;
            self.phase = Phase::Closing;
        }
        match ready!(Pin::new(&mut self.ws).poll_flush(cx)) {
            Ok(()) | Err(tungstenite::Error::ConnectionClosed) => Poll::Ready(Ok(())),
            Err(err) => Poll::Ready(Err(io_error(err))),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> ByteStream<S> {
    /// Reads the next message: binary data becomes `pending`, a close or
    /// the end of the connection ends the stream.
    fn poll_message(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match ready!(Pin::new(&mut self.ws).poll_next(cx)) {
            Some(Ok(Message::Binary(data))) => self.pending = data,
            Some(Ok(Message::Close(frame))) => {
                let reason = frame.map(|f| CloseReason {
                    code: f.code.into(),
                    reason: f.reason.to_string(),
                });
                *self
                    .signal
                    .0
                    .remote
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) = reason;
                self.phase = Phase::Ended;
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
            Some(Ok(Message::Text(_))) => {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "text message on the tunnel websocket, which carries only binary",
                )))
            }
            Some(Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed))
            | None => {
                self.phase = Phase::Ended;
            }
            Some(Err(tungstenite::Error::Capacity(err))) => {
                // The peer broke the size limits both ends agreed on: the
                // close frame says so, where a dropped connection would not.
                self.signal.close(CloseReason {
                    code: 1009,
                    reason: format!(
                        "{err}: tunnel messages are at most {} bytes",
                        crate::handshake::MAX_MESSAGE
                    ),
                });
            }
            Some(Err(err)) => return Poll::Ready(Err(io_error(err))),
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for ByteStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.unflushed
            && this
                .turn
                .as_ref()
                .is_some_and(|t| t.due.load(Ordering::Acquire))
        {
            // A flush came due while the stream's task was busy reading; if
            // the socket is full, its readiness polls the task again.
            if let Poll::Ready(Err(err)) = this.poll_flush_turn(cx) {
                return Poll::Ready(Err(err));
            }
        }
        loop {
            if !this.pending.is_empty() {
                let n = this.pending.len().min(buf.remaining());
                buf.put_slice(&this.pending[..n]);
                this.pending.advance(n);
                return Poll::Ready(Ok(()));
            }
            if this.phase != Phase::Open && this.phase != Phase::Closing {
                return Poll::Ready(Ok(()));
            }
            this.signal.0.waker.register(cx.waker());
            if this.signal.0.now.load(Ordering::Acquire) {
                // Best effort: the peer may already be gone.
                let _ = ready!(this.poll_send_close(cx));
                this.phase = Phase::Ended;
                return Poll::Ready(Ok(()));
            }
            ready!(this.poll_message(cx))?;
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for ByteStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(Pin::new(&mut this.ws).poll_ready(cx)).map_err(io_error)?;
        let n = buf.len().min(WRITE_CHUNK);
        Pin::new(&mut this.ws)
            .start_send(Message::Binary(Bytes::copy_from_slice(&buf[..n])))
            .map_err(io_error)?;
        this.unflushed = true;
        Poll::Ready(Ok(n))
    }

    /// HTTP/2 hands over a frame's header and payload as separate slices;
    /// gathering them makes one message of both instead of two.
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(Pin::new(&mut this.ws).poll_ready(cx)).map_err(io_error)?;
        let total = bufs.iter().map(|b| b.len()).sum::<usize>().min(WRITE_CHUNK);
        let mut message = BytesMut::with_capacity(total);
        for buf in bufs {
            let take = buf.len().min(total - message.len());
            message.extend_from_slice(&buf[..take]);
            if message.len() == total {
                break;
            }
        }
        Pin::new(&mut this.ws)
            .start_send(Message::Binary(message.freeze()))
            .map_err(io_error)?;
        this.unflushed = true;
        Poll::Ready(Ok(total))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().poll_flush_turn(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.phase == Phase::Ended {
            return Poll::Ready(Ok(()));
        }
        ready!(this.poll_send_close(cx))?;
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
    use tokio_tungstenite::tungstenite::protocol::Role;
    use tokio_tungstenite::WebSocketStream;

    use super::{ByteStream, CloseReason, CloseSignal};
    use crate::handshake::WRITE_CHUNK;
    use crate::link::websocket_config;

    async fn pair() -> (
        ByteStream<tokio::io::DuplexStream>,
        CloseSignal,
        ByteStream<tokio::io::DuplexStream>,
        CloseSignal,
    ) {
        let (a, b) = tokio::io::duplex(8);
        let client =
            WebSocketStream::from_raw_socket(a, Role::Client, Some(websocket_config())).await;
        let server =
            WebSocketStream::from_raw_socket(b, Role::Server, Some(websocket_config())).await;
        let (cs, ss) = (CloseSignal::default(), CloseSignal::default());
        (
            ByteStream::new(client, cs.clone()),
            cs,
            ByteStream::new(server, ss.clone()),
            ss,
        )
    }

    #[tokio::test]
    async fn bytes_cross_in_order_in_bounded_chunks() {
        let (mut client, _, mut server, _) = pair().await;
        let data: Vec<u8> = (0..WRITE_CHUNK * 3 + 17).map(|i| (i % 251) as u8).collect();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&sent).await.unwrap();
            client.shutdown().await.unwrap();
            client
        });
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, data);
        writer.await.unwrap();
    }

    #[tokio::test]
    async fn vectored_writes_gather_slices_into_one_message() {
        let (mut client, _, mut server, _) = pair().await;
        let (report, written) = tokio::sync::oneshot::channel();
        let writer = tokio::spawn(async move {
            let head = [1u8; 9];
            let payload = vec![2u8; WRITE_CHUNK];
            let slices = [
                std::io::IoSlice::new(&head),
                std::io::IoSlice::new(&payload),
            ];
            let _ = report.send(client.write_vectored(&slices).await.unwrap());
            client.flush().await.unwrap();
            // Polled on, as HTTP/2 polls its stream, for the flush to leave.
            let mut buf = [0u8; 1];
            let _ = client.read(&mut buf).await;
        });
        let mut got = vec![0u8; WRITE_CHUNK];
        server.read_exact(&mut got).await.unwrap();
        writer.abort();
        assert_eq!(
            written.await.unwrap(),
            WRITE_CHUNK,
            "one message holds at most WRITE_CHUNK bytes"
        );
        assert_eq!(&got[..9], &[1u8; 9]);
        assert!(got[9..].iter().all(|b| *b == 2));
    }

    #[tokio::test]
    async fn close_signal_ends_both_sides_with_a_reason() {
        let (mut client, client_signal, mut server, server_signal) = pair().await;
        let reader = tokio::spawn(async move {
            let mut buf = Vec::new();
            client.read_to_end(&mut buf).await.map(|_| buf)
        });
        server_signal.close(CloseReason::policy("taken over by another session"));
        let mut buf = [0u8; 16];
        assert_eq!(server.read(&mut buf).await.unwrap(), 0);
        assert_eq!(reader.await.unwrap().unwrap(), Vec::<u8>::new());
        let remote = client_signal.remote_reason().unwrap();
        assert_eq!(remote, CloseReason::policy("taken over by another session"));
    }

    /// A socket that counts the writes that reach it.
    struct Counted {
        inner: tokio::io::DuplexStream,
        writes: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    }

    impl tokio::io::AsyncRead for Counted {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
        }
    }

    impl tokio::io::AsyncWrite for Counted {
        fn poll_write(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            let written = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
            if let std::task::Poll::Ready(Ok(n)) = written {
                if n > 0 {
                    self.writes
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
            written
        }

        fn poll_flush(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::pin::Pin::new(&mut self.inner).poll_flush(cx)
        }

        fn poll_shutdown(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
        }
    }

    /// HTTP/2 writes and flushes frame by frame; what one poll wrote leaves
    /// in one write to the socket, and a lone write still leaves.
    #[tokio::test]
    async fn flushes_in_one_turn_make_one_socket_write() {
        let (a, b) = tokio::io::duplex(1 << 20);
        let writes = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = Counted {
            inner: a,
            writes: writes.clone(),
        };
        let client =
            WebSocketStream::from_raw_socket(counted, Role::Client, Some(websocket_config())).await;
        let server =
            WebSocketStream::from_raw_socket(b, Role::Server, Some(websocket_config())).await;
        let mut client = ByteStream::new(client, CloseSignal::default());
        let mut server = ByteStream::new(server, CloseSignal::default());

        let frames = [vec![1u8; 1033], vec![2u8; 1033], vec![3u8; 1033]];
        let sent = frames.clone();
        let (go, mut next) = tokio::sync::oneshot::channel::<()>();
        // The stream's own task, as HTTP/2's connection: it writes and
        // flushes frame by frame in one poll, then waits reading, which is
        // how it is polled again once the turn has ended.
        let writer = tokio::spawn(async move {
            std::future::poll_fn(|cx| {
                for frame in &sent {
                    let written = std::pin::Pin::new(&mut client).poll_write(cx, frame);
                    assert!(matches!(written, std::task::Poll::Ready(Ok(1033))));
                    let flushed = std::pin::Pin::new(&mut client).poll_flush(cx);
                    assert!(matches!(flushed, std::task::Poll::Ready(Ok(()))));
                }
                std::task::Poll::Ready(())
            })
            .await;
            let mut buf = [0u8; 1];
            tokio::select! {
                _ = client.read(&mut buf) => panic!("nothing is sent back"),
                _ = &mut next => {}
            }
            // A lone write and flush leaves too: nothing waits for more.
            client.write_all(&[4u8; 10]).await.unwrap();
            client.flush().await.unwrap();
            let _ = client.read(&mut buf).await;
        });
        let mut got = vec![0u8; 3 * 1033];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(got, frames.concat());
        assert_eq!(writes.load(std::sync::atomic::Ordering::Relaxed), 1);

        go.send(()).unwrap();
        let mut got = [0u8; 10];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(got, [4u8; 10]);
        assert_eq!(writes.load(std::sync::atomic::Ordering::Relaxed), 2);
        writer.abort();
    }

    #[test]
    fn long_reasons_fit_a_close_frame() {
        let frame = CloseReason::going_away("é".repeat(100)).to_frame();
        assert!(frame.reason.len() <= 123);
    }
}
