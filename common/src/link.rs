//! How both ends set up the tunnel link: the WebSocket under it and the
//! HTTP/2 connection over it. One place, so the two ends cannot drift apart.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::handshake::{
    Keepalive, ADVERTISED_REQUEST_HEADER_LIST, ADVERTISED_RESPONSE_HEADER_LIST, CONNECTION_WINDOW,
    MAX_CONCURRENT_STREAMS, MAX_FRAME_SIZE, MAX_MESSAGE, STREAM_WINDOW, WRITE_CHUNK,
};

/// Bytes read from the socket at once. tungstenite zero-fills this much per
/// connection up front, so it is most of an idle tunnel's memory; larger
/// messages still arrive whole, as the buffer grows for them.
const READ_BUFFER: usize = 4 * 1024;

/// The WebSocket settings both sides use for the tunnel.
pub fn websocket_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .max_message_size(Some(MAX_MESSAGE))
        .max_frame_size(Some(MAX_MESSAGE))
        .write_buffer_size(WRITE_CHUNK * 2)
}

/// The relay's side of the tunnel's HTTP/2: it sends public requests.
pub fn http2_client(keepalive: Keepalive) -> hyper::client::conn::http2::Builder<TokioExecutor> {
    let mut builder = hyper::client::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME_SIZE)
        .max_header_list_size(ADVERTISED_RESPONSE_HEADER_LIST)
        .keep_alive_interval(keepalive.interval)
        .keep_alive_timeout(keepalive.timeout)
        .keep_alive_while_idle(true);
    builder
}

/// The client's side of the tunnel's HTTP/2: it serves public requests.
///
/// The relay filters what public callers send before it reaches this
/// connection, and a connection-level error here drops every request of the
/// tunnel. So the header list limit has room above what the relay forwards,
/// and h2's reset-flood counters, which guard against a hostile peer, are
/// sized to the stream limit (streams the relay resets because their caller
/// hung up) or lifted (streams h2 itself refuses, counted for a connection's
/// whole life).
pub fn http2_server(keepalive: Keepalive) -> hyper::server::conn::http2::Builder<TokioExecutor> {
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME_SIZE)
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .max_header_list_size(ADVERTISED_REQUEST_HEADER_LIST)
        .max_pending_accept_reset_streams(MAX_CONCURRENT_STREAMS as usize)
        .max_local_error_reset_streams(None)
        .keep_alive_interval(keepalive.interval)
        .keep_alive_timeout(keepalive.timeout)
        .enable_connect_protocol();
    builder
}

/// How long each side waits for the other's first HTTP/2 bytes once the
/// WebSocket is up. HTTP/2 has no timeout of its own before its handshake
/// is done, and pings start only after it.
pub const FIRST_BYTES_WAIT: Duration = Duration::from_secs(10);

/// A stream that tells, once, when the peer's first bytes have been read:
/// how each side knows the other is really there, not just upgraded.
pub struct Heard<T> {
    /// The stream.
    inner: T,
    /// Fired on the first bytes read.
    first: Option<oneshot::Sender<()>>,
}

impl<T> Heard<T> {
    /// Wraps `inner`; the receiver resolves when its first bytes arrive,
    /// and fails if the stream is dropped before.
    pub fn new(inner: T) -> (Self, oneshot::Receiver<()>) {
        let (sender, receiver) = oneshot::channel();
        (
            Self {
                inner,
                first: Some(sender),
            },
            receiver,
        )
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Heard<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let read = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            if let Some(first) = self.first.take() {
                let _ = first.send(());
            }
        }
        read
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Heard<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
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
