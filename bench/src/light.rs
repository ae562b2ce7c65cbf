//! The light framing's multiplexer: many streams over one WebSocket, each
//! with a bounded, credit-based send window, and cancellation both ways.
//!
//! A reader task takes frames off the WebSocket and hands them to their
//! stream; a writer task takes every frame that is ready and sends them as
//! one message with one flush (write coalescing). Streams are dropped
//! handles: a stream whose handle goes before both bodies ended sends
//! RESET, so a caller that hangs up or an origin that fails stops the
//! other side's work.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use bytes::{Bytes, BytesMut};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::{AbortHandle, JoinSet};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::framing::{next_frame, Frame, Kind};

/// Per-stream window: body bytes a sender may have unacknowledged. The same
/// as Ferry's HTTP/2 stream window, so the two are compared like for like.
pub const WINDOW: u32 = ferry_common::handshake::STREAM_WINDOW;
/// Largest DATA payload, as Ferry's HTTP/2 frame size.
pub const MAX_DATA: usize = ferry_common::handshake::MAX_FRAME_SIZE as usize;
/// A message is sent once it holds this much, even if more frames wait.
const MESSAGE_TARGET: usize = ferry_common::handshake::WRITE_CHUNK;
/// Frames queued for the writer before senders wait.
const OUTBOX: usize = 1024;
/// Frames queued for one stream's reader. A sender within its window sends
/// at most `WINDOW` bytes; more frames than this means tiny frames, which
/// the stream refuses with RESET rather than buffer without bound.
const INBOX: usize = 4096;

/// What a stream's reader receives.
#[derive(Debug)]
pub enum Inbound {
    /// The peer's head.
    Head(Bytes),
    /// Body bytes; hand them to [`Stream::consumed`] once passed on.
    Data(Bytes),
    /// The peer's body is complete.
    End,
    /// The peer or the link gave up on the stream.
    Reset,
}

/// What the reader keeps per open stream.
struct Entry {
    /// Where its frames go.
    inbox: mpsc::Sender<Inbound>,
    /// Send credit; closed on RESET so a waiting sender stops.
    credit: Arc<Semaphore>,
    /// The task serving it (on the client), aborted on RESET.
    task: Option<AbortHandle>,
}

type Streams = Arc<Mutex<HashMap<u32, Entry>>>;

/// One end of the link, cloned by whatever opens streams.
#[derive(Clone)]
pub struct Link {
    /// Frames for the writer.
    outbox: mpsc::Sender<Frame>,
    /// Open streams by id.
    streams: Streams,
    /// The next id this end opens.
    next_id: Arc<AtomicU32>,
}

/// One stream's sending side; dropping the last clone ends the stream.
pub struct Stream {
    /// Its id.
    pub id: u32,
    /// The link it is on.
    link: Link,
    /// Send credit the peer gave.
    credit: Arc<Semaphore>,
    /// Received bytes not yet credited back.
    unacked: AtomicU32,
    /// Whether this side sent END.
    sent_end: AtomicBool,
    /// Whether the peer's END was read.
    got_end: AtomicBool,
}

/// A stream the peer opened: its handle, inbox and head.
pub struct Opened {
    /// The sending side.
    pub stream: Arc<Stream>,
    /// What the peer sends on it.
    pub inbox: mpsc::Receiver<Inbound>,
    /// The peer's head.
    pub head: Bytes,
}

/// The link is gone or the stream was reset.
#[derive(Debug)]
pub struct Gone;

impl Link {
    /// Runs the link over `ws` in `tasks`. `accept` is called for each
    /// stream the peer opens and returns the task serving it; `None` means
    /// this end refuses peer-opened streams.
    pub fn start<S>(
        ws: WebSocketStream<S>,
        tasks: &mut JoinSet<()>,
        first_id: u32,
        accept: Option<Box<dyn Fn(Opened) -> AbortHandle + Send>>,
    ) -> Self
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (sink, source) = ws.split();
        let (outbox, frames) = mpsc::channel(OUTBOX);
        let link = Self {
            outbox,
            streams: Arc::default(),
            next_id: Arc::new(AtomicU32::new(first_id)),
        };
        tasks.spawn(write(sink, frames));
        tasks.spawn(read(source, link.clone(), accept));
        link
    }

    /// Opens a stream from this end.
    pub fn open(&self) -> (Arc<Stream>, mpsc::Receiver<Inbound>) {
        let id = self.next_id.fetch_add(2, Ordering::Relaxed);
        self.register(id, None)
    }

    fn register(
        &self,
        id: u32,
        task: Option<AbortHandle>,
    ) -> (Arc<Stream>, mpsc::Receiver<Inbound>) {
        let (inbox, receiver) = mpsc::channel(INBOX);
        let credit = Arc::new(Semaphore::new(WINDOW as usize));
        self.lock().insert(
            id,
            Entry {
                inbox,
                credit: credit.clone(),
                task,
            },
        );
        let stream = Stream {
            id,
            link: self.clone(),
            credit,
            unacked: AtomicU32::new(0),
            sent_end: AtomicBool::new(false),
            got_end: AtomicBool::new(false),
        };
        (Arc::new(stream), receiver)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u32, Entry>> {
        self.streams.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Ends a stream here, and with RESET there when asked.
    fn remove(&self, id: u32) -> Option<Entry> {
        let entry = self.lock().remove(&id)?;
        entry.credit.close();
        if let Some(task) = &entry.task {
            task.abort();
        }
        Some(entry)
    }

    fn reset_peer(&self, id: u32) {
        let frame = Frame {
            stream: id,
            kind: Kind::Reset,
            payload: Bytes::new(),
        };
        if let Err(mpsc::error::TrySendError::Full(frame)) = self.outbox.try_send(frame) {
            // Dropping happens outside async code: the wait goes to a task.
            let outbox = self.outbox.clone();
            tokio::spawn(async move {
                let _ = outbox.send(frame).await;
            });
        }
    }
}

impl Stream {
    async fn send(&self, kind: Kind, payload: Bytes) -> Result<(), Gone> {
        let frame = Frame {
            stream: self.id,
            kind,
            payload,
        };
        self.link.outbox.send(frame).await.map_err(|_| Gone)
    }

    /// Sends this side's head.
    pub async fn head(&self, head: Bytes, last: bool) -> Result<(), Gone> {
        self.send(Kind::Headers, head).await?;
        if last {
            self.sent_end.store(true, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Sends body bytes, waiting for the peer's credit.
    pub async fn data(&self, mut data: Bytes) -> Result<(), Gone> {
        while !data.is_empty() {
            let chunk = data.split_to(data.len().min(MAX_DATA));
            // MAX_DATA fits in a u32.
            let permits = self
                .credit
                .acquire_many(chunk.len() as u32)
                .await
                .map_err(|_| Gone)?;
            permits.forget();
            self.send(Kind::Data, chunk).await?;
        }
        Ok(())
    }

    /// Ends this side's body.
    pub async fn end(&self) -> Result<(), Gone> {
        self.send(Kind::End, Bytes::new()).await?;
        self.sent_end.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// Notes `len` received bytes as passed on, giving the credit back in
    /// batches of half a window so that updates stay rare.
    pub async fn consumed(&self, len: usize) -> Result<(), Gone> {
        // A frame is at most a message, far below 4 GiB.
        let total = self.unacked.fetch_add(len as u32, Ordering::Relaxed) + len as u32;
        if total >= WINDOW / 2 {
            self.unacked.store(0, Ordering::Relaxed);
            self.send(
                Kind::WindowUpdate,
                Bytes::copy_from_slice(&total.to_be_bytes()),
            )
            .await?;
        }
        Ok(())
    }

    /// Notes that the peer's body is complete (or there was none).
    pub fn ended(&self) {
        self.got_end.store(true, Ordering::Relaxed);
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        let clean = self.sent_end.load(Ordering::Relaxed) && self.got_end.load(Ordering::Relaxed);
        if self.link.remove(self.id).is_some() && !clean {
            self.link.reset_peer(self.id);
        }
    }
}

/// Sends every frame that is ready as one message, then flushes.
async fn write<S>(
    mut sink: SplitSink<WebSocketStream<S>, Message>,
    mut frames: mpsc::Receiver<Frame>,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut message = BytesMut::new();
    while let Some(frame) = frames.recv().await {
        frame.encode(&mut message);
        while message.len() < MESSAGE_TARGET {
            match frames.try_recv() {
                Ok(frame) => frame.encode(&mut message),
                Err(_) => break,
            }
        }
        if sink
            .send(Message::Binary(message.split().freeze()))
            .await
            .is_err()
        {
            break;
        }
    }
}

/// Hands each frame to its stream until the WebSocket ends, then resets
/// every stream still open.
async fn read<S>(
    mut source: SplitStream<WebSocketStream<S>>,
    link: Link,
    accept: Option<Box<dyn Fn(Opened) -> AbortHandle + Send>>,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    'link: while let Some(Ok(message)) = source.next().await {
        let Message::Binary(mut message) = message else {
            continue;
        };
        loop {
            match next_frame(&mut message) {
                Ok(Some(frame)) => dispatch(&link, accept.as_deref(), frame),
                Ok(None) => break,
                Err(err) => {
                    eprintln!("error: bad message on the link: {err:?}");
                    break 'link;
                }
            }
        }
    }
    let open: Vec<u32> = link.lock().keys().copied().collect();
    for id in open {
        if let Some(entry) = link.remove(id) {
            let _ = entry.inbox.try_send(Inbound::Reset);
        }
    }
}

fn dispatch(link: &Link, accept: Option<&(dyn Fn(Opened) -> AbortHandle + Send)>, frame: Frame) {
    let inbound = match frame.kind {
        Kind::WindowUpdate => {
            let credit = <[u8; 4]>::try_from(&frame.payload[..]).map(u32::from_be_bytes);
            if let (Some(entry), Ok(credit)) = (link.lock().get(&frame.stream), credit) {
                entry.credit.add_permits(credit as usize);
            }
            return;
        }
        Kind::Reset => {
            if let Some(entry) = link.remove(frame.stream) {
                let _ = entry.inbox.try_send(Inbound::Reset);
            }
            return;
        }
        Kind::Headers => Inbound::Head(frame.payload),
        Kind::Data => Inbound::Data(frame.payload),
        Kind::End => Inbound::End,
    };
    let full = {
        let streams = link.lock();
        match streams.get(&frame.stream) {
            Some(entry) => entry.inbox.try_send(inbound).is_err(),
            None => {
                drop(streams);
                if let (Some(accept), Inbound::Head(head)) = (accept, inbound) {
                    open_from_peer(link, accept, frame.stream, head);
                }
                // Frames for a stream this end already ended are dropped.
                false
            }
        }
    };
    if full {
        link.remove(frame.stream);
        link.reset_peer(frame.stream);
    }
}

fn open_from_peer(
    link: &Link,
    accept: &(dyn Fn(Opened) -> AbortHandle + Send),
    id: u32,
    head: Bytes,
) {
    let (stream, inbox) = link.register(id, None);
    let task = accept(Opened {
        stream,
        inbox,
        head,
    });
    // Absent when the task already ended the stream.
    if let Some(entry) = link.lock().get_mut(&id) {
        entry.task = Some(task);
    }
}

#[cfg(test)]
mod tests {
    use bytes::{Bytes, BytesMut};
    use futures_util::{SinkExt, StreamExt};
    use tokio::io::DuplexStream;
    use tokio::sync::mpsc;
    use tokio::task::JoinSet;
    use tokio_tungstenite::tungstenite::protocol::Role;
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::WebSocketStream;

    use super::{Inbound, Link, Opened, INBOX, WINDOW};
    use crate::framing::{next_frame, Frame, Kind};

    async fn sockets() -> (WebSocketStream<DuplexStream>, WebSocketStream<DuplexStream>) {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let config = Some(ferry_common::link::websocket_config());
        (
            WebSocketStream::from_raw_socket(a, Role::Client, config).await,
            WebSocketStream::from_raw_socket(b, Role::Server, config).await,
        )
    }

    /// A link that accepts streams, and where the accepted ones go.
    fn accepting(
        ws: WebSocketStream<DuplexStream>,
        tasks: &mut JoinSet<()>,
    ) -> (Link, mpsc::Receiver<Opened>) {
        let (opened, accepted) = mpsc::channel(16);
        let accept = Box::new(move |stream: Opened| {
            let opened = opened.clone();
            tokio::spawn(async move {
                let _ = opened.send(stream).await;
            })
            .abort_handle()
        });
        (Link::start(ws, tasks, 2, Some(accept)), accepted)
    }

    #[tokio::test]
    async fn a_sender_stops_at_the_window_until_the_reader_gives_credit() {
        let (a, b) = sockets().await;
        let mut tasks = JoinSet::new();
        let opener = Link::start(a, &mut tasks, 1, None);
        let (_acceptor, mut accepted) = accepting(b, &mut tasks);
        let (stream, _inbox) = opener.open();
        stream
            .head(Bytes::from_static(b"head"), false)
            .await
            .unwrap();
        let sender = stream.clone();
        let sending = tokio::spawn(async move {
            sender
                .data(Bytes::from(vec![1u8; WINDOW as usize + 1]))
                .await
        });
        let Opened {
            stream: peer,
            mut inbox,
            ..
        } = accepted.recv().await.unwrap();
        let mut got = 0;
        while got < WINDOW as usize {
            match inbox.recv().await {
                Some(Inbound::Data(data)) => got += data.len(),
                other => panic!("expected data, got {other:?}"),
            }
        }
        assert_eq!(got, WINDOW as usize, "exactly one window arrives");
        assert_eq!(stream.credit.available_permits(), 0);
        assert!(!sending.is_finished(), "the last byte waits for credit");
        peer.consumed(got).await.unwrap();
        match inbox.recv().await {
            Some(Inbound::Data(data)) => assert_eq!(data.len(), 1),
            other => panic!("expected the last byte, got {other:?}"),
        }
        sending.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn dropping_a_stream_before_its_end_resets_it_at_the_peer() {
        let (a, b) = sockets().await;
        let mut tasks = JoinSet::new();
        let opener = Link::start(a, &mut tasks, 1, None);
        let (acceptor, mut accepted) = accepting(b, &mut tasks);
        let (stream, _inbox) = opener.open();
        stream
            .head(Bytes::from_static(b"head"), false)
            .await
            .unwrap();
        let Opened {
            stream: peer,
            mut inbox,
            ..
        } = accepted.recv().await.unwrap();
        drop(stream);
        assert!(matches!(inbox.recv().await, Some(Inbound::Reset)));
        assert!(acceptor.lock().is_empty(), "the peer forgot the stream");
        assert!(peer.data(Bytes::from_static(b"late")).await.is_err());
    }

    #[tokio::test]
    async fn frames_ready_together_leave_in_one_message() {
        let (a, mut raw) = sockets().await;
        let mut tasks = JoinSet::new();
        let link = Link::start(a, &mut tasks, 1, None);
        let (first, _) = link.open();
        let (second, _) = link.open();
        // On this single-threaded runtime the writer runs only once the
        // test awaits the peer: all four frames are queued by then.
        first.head(Bytes::from_static(b"one"), true).await.unwrap();
        second
            .head(Bytes::from_static(b"two"), false)
            .await
            .unwrap();
        second.data(Bytes::from_static(b"body")).await.unwrap();
        second.end().await.unwrap();
        let Some(Ok(Message::Binary(mut message))) = raw.next().await else {
            panic!("expected one binary message");
        };
        let mut kinds = Vec::new();
        while let Some(frame) = next_frame(&mut message).unwrap() {
            kinds.push((frame.stream, frame.kind));
        }
        assert_eq!(
            kinds,
            [
                (1, Kind::Headers),
                (3, Kind::Headers),
                (3, Kind::Data),
                (3, Kind::End)
            ]
        );
    }

    #[tokio::test]
    async fn a_flood_of_tiny_frames_resets_the_stream_instead_of_queueing() {
        let (mut raw, b) = sockets().await;
        let mut tasks = JoinSet::new();
        // The accepting side never reads what it is sent.
        let (_link, _accepted) = accepting(b, &mut tasks);
        let mut message = BytesMut::new();
        let frame = |kind, payload: &'static [u8]| Frame {
            stream: 1,
            kind,
            payload: Bytes::from_static(payload),
        };
        frame(Kind::Headers, b"head").encode(&mut message);
        for _ in 0..=INBOX {
            frame(Kind::Data, b"x").encode(&mut message);
        }
        raw.send(Message::Binary(message.freeze())).await.unwrap();
        let Some(Ok(Message::Binary(mut answer))) = raw.next().await else {
            panic!("expected an answer");
        };
        let reset = next_frame(&mut answer).unwrap().unwrap();
        assert_eq!((reset.stream, reset.kind), (1, Kind::Reset));
    }
}
