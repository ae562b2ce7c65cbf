//! Two minimal tunnels that differ only in their framing, for measuring
//! the framing's cost: `h2` is Ferry's (HTTP/2 over the WebSocket byte
//! stream, with Ferry's settings), `light` is [`crate::light`].
//!
//! The proto-relay takes one WebSocket from the proto-client and forwards
//! every public HTTP/1.1 request over it; the proto-client sends each to
//! the origin with a pooled HTTP/1.1 client. No capture, limits or auth.
//! Each runs on a single-threaded runtime, as Ferry does.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, StreamBody};
use hyper::body::{Body as _, Frame, Incoming};
use hyper::header::HOST;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode, Uri, Version};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use ferry_common::byte_stream::{ByteStream, CloseSignal};
use ferry_common::handshake::Keepalive;
use ferry_common::link::{http2_client, http2_server, websocket_config};

use crate::framing::{decode_request, decode_response, encode_request, encode_response};
use crate::light::{Gone, Inbound, Link, Opened, Stream};

/// Which framing a prototype speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Framing {
    /// HTTP/2 over the WebSocket byte stream, as Ferry.
    H2,
    /// The light framing.
    Light,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Body = UnsyncBoxBody<Bytes, BoxError>;

/// Runs `make()` on a single-threaded runtime of its own thread.
pub async fn current_thread<F, Fut>(make: F) -> Result<(), String>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = Result<(), String>>,
{
    tokio::task::spawn_blocking(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start a runtime: {e}"))?
            .block_on(make())
    })
    .await
    .map_err(|e| format!("the runtime's thread failed: {e}"))?
}

fn status(code: StatusCode, text: &'static str) -> Response<Body> {
    let body = http_body_util::Full::new(Bytes::from_static(text.as_bytes()))
        .map_err(|never| match never {})
        .boxed_unsync();
    let mut response = Response::new(body);
    *response.status_mut() = code;
    response
}

/// The proto-relay: prints `listening TUNNEL PUBLIC`, takes one WebSocket
/// on `tunnel`, then serves `public` over it until the link ends.
pub async fn relay(framing: Framing, tunnel: SocketAddr, public: SocketAddr) -> Result<(), String> {
    let tunnel = TcpListener::bind(tunnel)
        .await
        .map_err(|e| format!("cannot listen on {tunnel}: {e}"))?;
    let public = TcpListener::bind(public)
        .await
        .map_err(|e| format!("cannot listen on {public}: {e}"))?;
    let address = |l: &TcpListener| l.local_addr().map_err(|e| e.to_string());
    println!("listening {} {}", address(&tunnel)?, address(&public)?);
    let (socket, _) = tunnel.accept().await.map_err(|e| e.to_string())?;
    let _ = socket.set_nodelay(true);
    let ws = tokio_tungstenite::accept_async_with_config(socket, Some(websocket_config()))
        .await
        .map_err(|e| format!("websocket handshake: {e}"))?;
    let mut tasks = JoinSet::new();
    match framing {
        Framing::H2 => {
            let io = TokioIo::new(ByteStream::new(ws, CloseSignal::default()));
            let (sender, connection) = http2_client(Keepalive::default())
                .handshake::<_, Incoming>(io)
                .await
                .map_err(|e| format!("http/2 handshake: {e}"))?;
            tasks.spawn(async move {
                let _ = connection.await;
            });
            serve_public(public, &mut tasks, move |req| {
                let mut sender = sender.clone();
                async move {
                    match sender.send_request(req).await {
                        Ok(response) => response.map(|b| b.map_err(BoxError::from).boxed_unsync()),
                        Err(_) => status(StatusCode::BAD_GATEWAY, "tunnel failed\n"),
                    }
                }
            })
            .await
        }
        Framing::Light => {
            let link = Link::start(ws, &mut tasks, 1, None);
            serve_public(public, &mut tasks, move |req| {
                relay_light(link.clone(), req)
            })
            .await
        }
    }
}

/// Serves public HTTP/1.1 with `forward` until the link ends.
async fn serve_public<F, Fut>(
    public: TcpListener,
    tasks: &mut JoinSet<()>,
    forward: F,
) -> Result<(), String>
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = public.accept() => {
                let Ok((socket, _)) = accepted else { continue };
                let _ = socket.set_nodelay(true);
                let forward = forward.clone();
                connections.spawn(async move {
                    let service = service_fn(move |mut req: Request<Incoming>| {
                        let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
                        // HTTP/2 wants an absolute URI; the light framing
                        // reads only its path.
                        if let Ok(uri) = Uri::builder().scheme("http").authority("tunnel").path_and_query(path).build() {
                            *req.uri_mut() = uri;
                        }
                        req.headers_mut().remove(HOST);
                        let forward = forward.clone();
                        async move { Ok::<_, Infallible>(forward(req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(socket), service)
                        .await;
                });
            }
            Some(_) = connections.join_next() => {}
            // The proto-client leaving is how a run ends.
            _ = tasks.join_next() => return Ok(()),
        }
    }
}

/// Sends `body` on `stream` as DATA and END.
async fn send_body(
    stream: &Stream,
    mut body: impl hyper::body::Body<Data = Bytes> + Unpin,
) -> Result<(), Gone> {
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|_| Gone)?;
        if let Ok(data) = frame.into_data() {
            stream.data(data).await?;
        }
    }
    stream.end().await
}

/// A body read from a stream's inbox, crediting each frame back; the
/// `guard` lives as long as the body (the stream, a pump to abort).
fn inbox_body<G: Send + 'static>(
    stream: Arc<Stream>,
    inbox: mpsc::Receiver<Inbound>,
    guard: G,
) -> Body {
    let frames = futures_util::stream::unfold(Some((stream, inbox, guard)), |state| async move {
        let (stream, mut inbox, guard) = state?;
        match inbox.recv().await {
            Some(Inbound::Data(data)) => {
                let credited = stream.consumed(data.len()).await;
                let next = credited.is_ok().then_some((stream, inbox, guard));
                let item = credited
                    .map(|()| Frame::data(data))
                    .map_err(|_| BoxError::from("link gone"));
                Some((item, next))
            }
            Some(Inbound::End) => {
                stream.ended();
                None
            }
            Some(Inbound::Head(_) | Inbound::Reset) | None => {
                Some((Err(BoxError::from("stream reset")), None))
            }
        }
    });
    StreamBody::new(frames).boxed_unsync()
}

/// Aborts a task when dropped.
struct AbortOnDrop(Option<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(task) = &self.0 {
            task.abort();
        }
    }
}

async fn relay_light(link: Link, req: Request<Incoming>) -> Response<Body> {
    let (stream, mut inbox) = link.open();
    let (parts, body) = req.into_parts();
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let last = body.is_end_stream();
    let head = encode_request(last, &parts.method, path, &parts.headers);
    if stream.head(head, last).await.is_err() {
        return status(StatusCode::BAD_GATEWAY, "tunnel failed\n");
    }
    // The request body flows while the response head is awaited.
    let pump = AbortOnDrop((!last).then(|| {
        let stream = stream.clone();
        tokio::spawn(async move {
            let _ = send_body(&stream, body).await;
        })
    }));
    let Some(Inbound::Head(head)) = inbox.recv().await else {
        return status(StatusCode::BAD_GATEWAY, "the client reset the request\n");
    };
    let Ok(head) = decode_response(head) else {
        return status(StatusCode::BAD_GATEWAY, "the client sent a bad head\n");
    };
    let body = if head.last {
        stream.ended();
        Empty::new().map_err(|never| match never {}).boxed_unsync()
    } else {
        inbox_body(stream, inbox, pump)
    };
    let mut response = Response::new(body);
    *response.status_mut() = head.line;
    *response.headers_mut() = head.headers;
    response
}

type Origin = Client<HttpConnector, Body>;

/// The proto-client: connects to the proto-relay at `relay`, prints
/// `connected`, and sends what comes through to `origin` until the link
/// ends.
pub async fn client(framing: Framing, relay: SocketAddr, origin: SocketAddr) -> Result<(), String> {
    let socket = TcpStream::connect(relay)
        .await
        .map_err(|e| format!("cannot reach {relay}: {e}"))?;
    let _ = socket.set_nodelay(true);
    let (ws, _) = tokio_tungstenite::client_async_with_config(
        format!("ws://{relay}/"),
        socket,
        Some(websocket_config()),
    )
    .await
    .map_err(|e| format!("websocket handshake: {e}"))?;
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let pool: Origin = Client::builder(TokioExecutor::new()).build(connector);
    let authority = origin.to_string();
    println!("connected");
    match framing {
        Framing::H2 => {
            let io = TokioIo::new(ByteStream::new(ws, CloseSignal::default()));
            let service = service_fn(move |req: Request<Incoming>| {
                let (pool, authority) = (pool.clone(), authority.clone());
                async move {
                    let (mut parts, body) = req.into_parts();
                    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
                    let Some(uri) = origin_uri(&authority, path) else {
                        return Ok::<_, Infallible>(status(StatusCode::BAD_REQUEST, "bad path\n"));
                    };
                    parts.uri = uri;
                    parts.version = Version::HTTP_11;
                    let req =
                        Request::from_parts(parts, body.map_err(BoxError::from).boxed_unsync());
                    Ok(match pool.request(req).await {
                        Ok(response) => response.map(|b| b.map_err(BoxError::from).boxed_unsync()),
                        Err(_) => status(StatusCode::BAD_GATEWAY, "origin failed\n"),
                    })
                }
            });
            http2_server(Keepalive::default())
                .serve_connection(io, service)
                .await
                .map_err(|e| format!("the link ended: {e}"))
        }
        Framing::Light => {
            let mut tasks = JoinSet::new();
            let accept = Box::new(move |opened: Opened| {
                tokio::spawn(client_light(pool.clone(), authority.clone(), opened)).abort_handle()
            });
            Link::start(ws, &mut tasks, 2, Some(accept));
            tasks.join_next().await;
            Ok(())
        }
    }
}

/// The origin's URI for `path`.
fn origin_uri(authority: &str, path: &str) -> Option<Uri> {
    Uri::builder()
        .scheme("http")
        .authority(authority)
        .path_and_query(path)
        .build()
        .ok()
}

/// Serves one stream: the request to the origin, the answer back. Any
/// failure drops the stream, which resets it.
async fn client_light(pool: Origin, authority: String, opened: Opened) {
    let Opened {
        stream,
        inbox,
        head,
    } = opened;
    let Ok(head) = decode_request(head) else {
        return;
    };
    let (method, path) = head.line;
    let Some(uri) = origin_uri(&authority, &path) else {
        return;
    };
    let body = if head.last {
        stream.ended();
        Empty::new().map_err(|never| match never {}).boxed_unsync()
    } else {
        inbox_body(stream.clone(), inbox, ())
    };
    let mut req = Request::new(body);
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    *req.headers_mut() = head.headers;
    let Ok(response) = pool.request(req).await else {
        return;
    };
    let (parts, body) = response.into_parts();
    let last = body.is_end_stream();
    if stream
        .head(encode_response(last, parts.status, &parts.headers), last)
        .await
        .is_err()
        || last
    {
        return;
    }
    let _ = send_body(&stream, body).await;
}
