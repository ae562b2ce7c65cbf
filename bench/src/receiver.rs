//! The webhook receiver the dispatcher delivers to: a port-0 hyper
//! HTTP/1.1 server that answers 200 at once and pushes each delivery's
//! webhook and event number into a channel, stamped with its arrival.
//!
//! Webhook `K` points at `/hook/K`; each event carries its number as
//! `data.seq`, so an arrival names what it delivers without the receiver
//! keeping any state. While held, it reads each delivery but answers none,
//! so that a backlog builds up in the relay's queue.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

/// Arrivals the channel holds before deliveries wait for the reader.
const ARRIVALS_QUEUED: usize = 4096;

/// One delivery as it arrived.
#[derive(Debug, Clone, Copy)]
pub struct Arrival {
    /// The webhook it was for: `K` of `/hook/K`.
    pub webhook: usize,
    /// The event's number, `data.seq`.
    pub seq: usize,
    /// When its body had been read and the receiver was not held.
    pub at: Instant,
    /// Whether it carried the three Standard Webhooks headers.
    pub signed: bool,
}

/// The body every delivery carries, as far as the receiver reads it.
#[derive(Deserialize)]
struct Envelope {
    data: Data,
}

#[derive(Deserialize)]
struct Data {
    seq: usize,
}

/// A running receiver; dropping it stops the server and its connections.
pub struct Receiver {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Deliveries, in arrival order.
    pub arrivals: mpsc::Receiver<Arrival>,
    /// Whether deliveries are answered (true) or held.
    open: watch::Sender<bool>,
    /// The accept loop and every connection.
    _tasks: JoinSet<()>,
}

impl Receiver {
    /// Binds 127.0.0.1:0 and serves until dropped.
    pub async fn start() -> Result<Self, String> {
        let listener = TcpListener::bind(("127.0.0.1", 0))
            .await
            .map_err(|err| format!("cannot bind the webhook receiver: {err}"))?;
        let addr = listener
            .local_addr()
            .map_err(|err| format!("the webhook receiver has no address: {err}"))?;
        let (tx, arrivals) = mpsc::channel(ARRIVALS_QUEUED);
        let (open, opened) = watch::channel(true);
        let mut tasks = JoinSet::new();
        tasks.spawn(accept(listener, tx, opened));
        Ok(Self {
            addr,
            arrivals,
            open,
            _tasks: tasks,
        })
    }

    /// Holds every delivery from now on until [`Receiver::answer`].
    pub fn hold(&self) {
        self.open.send_replace(false);
    }

    /// Answers deliveries again, the held ones first.
    pub fn answer(&self) {
        self.open.send_replace(true);
    }

    /// The URL for webhook `k`.
    pub fn url(&self, k: usize) -> String {
        format!("http://{}/hook/{k}", self.addr)
    }
}

async fn accept(listener: TcpListener, tx: mpsc::Sender<Arrival>, open: watch::Receiver<bool>) {
    // Connections end when their peer closes them or when this loop is
    // aborted with the receiver, which drops the set.
    let mut connections = JoinSet::new();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let (tx, open) = (tx.clone(), open.clone());
        connections.spawn(async move {
            let service = service_fn(move |req| {
                let (tx, open) = (tx.clone(), open.clone());
                async move { Ok::<_, Infallible>(receive(req, &tx, open).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
        // Reap finished connections so that the set stays small.
        while connections.try_join_next().is_some() {}
    }
}

async fn receive(
    req: Request<Incoming>,
    tx: &mpsc::Sender<Arrival>,
    mut open: watch::Receiver<bool>,
) -> Response<Empty<Bytes>> {
    let status = |code| {
        let mut response = Response::new(Empty::new());
        *response.status_mut() = code;
        response
    };
    let webhook = req
        .uri()
        .path()
        .strip_prefix("/hook/")
        .and_then(|k| k.parse().ok());
    let signed = ["webhook-id", "webhook-timestamp", "webhook-signature"]
        .iter()
        .all(|name| req.headers().contains_key(*name));
    let Ok(body) = req.into_body().collect().await else {
        return status(StatusCode::BAD_REQUEST);
    };
    // The sender is the receiver's own: it outlives every connection.
    let _ = open.wait_for(|open| *open).await;
    let at = Instant::now();
    let envelope = serde_json::from_slice::<Envelope>(&body.to_bytes());
    let (Some(webhook), Ok(envelope)) = (webhook, envelope) else {
        // Not a bench delivery: the relay records a failed attempt, which
        // the bench's checks then report.
        return status(StatusCode::UNPROCESSABLE_ENTITY);
    };
    let arrival = Arrival {
        webhook,
        seq: envelope.data.seq,
        at,
        signed,
    };
    // With the bench gone nobody counts: the answer no longer matters.
    let _ = tx.send(arrival).await;
    status(StatusCode::OK)
}
