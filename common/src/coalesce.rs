//! Merging the small body chunks that are ready at once into one.
//!
//! Each chunk of a body becomes one HTTP/2 DATA frame on the tunnel, and h2
//! charges every small frame that waits unread against a per-connection
//! budget; past it, the whole session is closed. A local server or a public
//! caller that writes a burst of tiny chunks (server-sent events, NDJSON, a
//! caller sending one byte per write) would otherwise send a frame for each.
//! [`Coalesce`] merges what is already there, and lets only a run smaller
//! than [`SMALL_FRAME`] wait, for [`LINGER`] at most: a lone event still
//! goes out within milliseconds, and a stream that dribbles tiny chunks
//! sends at most one small frame per [`LINGER`].

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use hyper::body::{Body, Frame, SizeHint};
use tokio::time::Sleep;

/// Chunks at least this large go out as they are, uncopied.
pub const COALESCE_UP_TO: usize = 16 * 1024;
/// Below this size a DATA frame costs h2 more in bookkeeping than it
/// carries, and counts against the budget that ends a session.
pub const SMALL_FRAME: usize = 256;
/// How long a run smaller than [`SMALL_FRAME`] waits for more data before
/// it goes out anyway: at most this much delay on a lone small chunk, and
/// at most one small frame per this time on a stream.
pub const LINGER: Duration = Duration::from_millis(5);

/// A body whose ready data chunks are merged, up to [`COALESCE_UP_TO`];
/// small runs linger up to [`LINGER`] for more.
pub struct Coalesce<B: Body> {
    /// The body.
    inner: B,
    /// Data read but not yet passed on: one chunk as it came, uncopied...
    first: Option<Bytes>,
    /// ...or several, merged.
    merged: Option<BytesMut>,
    /// A frame read past a merged run (trailers or an error), sent next.
    held: Option<Result<Frame<Bytes>, B::Error>>,
    /// Set once the body ended behind a merged run.
    ended: bool,
    /// Fires when a small run has waited long enough.
    linger: Option<Pin<Box<Sleep>>>,
}

impl<B: Body> Coalesce<B> {
    /// Wraps `inner`.
    pub fn new(inner: B) -> Self {
        Self {
            inner,
            first: None,
            merged: None,
            held: None,
            ended: false,
            linger: None,
        }
    }

    fn buffered(&self) -> usize {
        self.merged
            .as_ref()
            .map_or_else(|| self.first.as_ref().map_or(0, Bytes::len), BytesMut::len)
    }

    fn push(&mut self, data: Bytes) {
        match (&self.first, &mut self.merged) {
            (None, _) => self.first = Some(data),
            (Some(head), None) => {
                let mut buffer = BytesMut::with_capacity(COALESCE_UP_TO);
                buffer.extend_from_slice(head);
                buffer.extend_from_slice(&data);
                self.merged = Some(buffer);
            }
            (Some(_), Some(buffer)) => buffer.extend_from_slice(&data),
        }
    }

    /// The buffered run as one frame, leaving the buffer empty.
    fn take(&mut self) -> Option<Result<Frame<Bytes>, B::Error>> {
        self.linger = None;
        let first = self.first.take();
        self.merged
            .take()
            .map(BytesMut::freeze)
            .or(first)
            .map(|data| Ok(Frame::data(data)))
    }
}

impl<B> Body for Coalesce<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        if let Some(frame) = this.held.take() {
            return Poll::Ready(Some(frame));
        }
        loop {
            if this.ended {
                return Poll::Ready(this.take());
            }
            let frame = match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Ready(Some(frame)) => frame,
                Poll::Ready(None) => {
                    this.ended = true;
                    continue;
                }
                Poll::Pending => {
                    let buffered = this.buffered();
                    if buffered == 0 {
                        return Poll::Pending;
                    }
                    if buffered >= SMALL_FRAME {
                        return Poll::Ready(this.take());
                    }
                    let linger = this
                        .linger
                        .get_or_insert_with(|| Box::pin(tokio::time::sleep(LINGER)));
                    if linger.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                    return Poll::Ready(this.take());
                }
            };
            let data = match frame.map(Frame::into_data) {
                Ok(Ok(data)) => data,
                Ok(Err(other)) => {
                    if this.buffered() == 0 {
                        return Poll::Ready(Some(Ok(other)));
                    }
                    this.held = Some(Ok(other));
                    return Poll::Ready(this.take());
                }
                Err(err) => {
                    if this.buffered() == 0 {
                        return Poll::Ready(Some(Err(err)));
                    }
                    this.held = Some(Err(err));
                    return Poll::Ready(this.take());
                }
            };
            if data.is_empty() {
                continue;
            }
            this.push(data);
            if this.buffered() >= COALESCE_UP_TO {
                return Poll::Ready(this.take());
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.held.is_none() && self.buffered() == 0 && (self.ended || self.inner.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use bytes::Bytes;
    use http_body_util::{BodyExt, StreamBody};
    use hyper::body::Frame;

    use super::{Coalesce, COALESCE_UP_TO};

    type Ready = StreamBody<
        futures_util::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>,
    >;

    fn frames(parts: Vec<Frame<Bytes>>) -> Coalesce<Ready> {
        let ready: Vec<Result<Frame<Bytes>, Infallible>> = parts.into_iter().map(Ok).collect();
        Coalesce::new(StreamBody::new(futures_util::stream::iter(ready)))
    }

    #[tokio::test]
    async fn ready_chunks_merge_and_trailers_follow() {
        let mut trailers = http::HeaderMap::new();
        trailers.insert("x-sum", http::HeaderValue::from_static("1"));
        let mut parts: Vec<Frame<Bytes>> = (0..1000)
            .map(|i| Frame::data(Bytes::from(format!("data: {i}\n\n"))))
            .collect();
        parts.push(Frame::trailers(trailers));
        let mut body = frames(parts);
        let mut data = Vec::new();
        let mut count = 0;
        let mut saw_trailers = false;
        while let Some(frame) = body.frame().await {
            let frame = frame.unwrap();
            match frame.into_data() {
                Ok(chunk) => {
                    assert!(chunk.len() <= COALESCE_UP_TO + 16);
                    data.extend_from_slice(&chunk);
                    count += 1;
                }
                Err(frame) => saw_trailers = frame.is_trailers(),
            }
        }
        let expected: String = (0..1000).map(|i| format!("data: {i}\n\n")).collect();
        assert_eq!(data, expected.as_bytes());
        assert!(count < 5, "{count} frames for 1000 chunks");
        assert!(saw_trailers);
    }

    #[tokio::test(start_paused = true)]
    async fn a_lone_small_chunk_lingers_briefly_and_big_ones_go_uncopied() {
        let (sender, receiver) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(4);
        let mut body = Coalesce::new(StreamBody::new(
            tokio_stream::wrappers::ReceiverStream::new(receiver),
        ));
        sender
            .send(Ok(Frame::data(Bytes::from_static(b"tick"))))
            .await
            .unwrap();
        let frame = body.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), Bytes::from_static(b"tick"));
        let big = Bytes::from(vec![7u8; COALESCE_UP_TO * 2]);
        sender.send(Ok(Frame::data(big.clone()))).await.unwrap();
        let frame = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(frame.as_ptr(), big.as_ptr(), "passed on without a copy");
        drop(sender);
        assert!(body.frame().await.is_none());
    }
}
