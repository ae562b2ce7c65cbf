//! The origin the benchmark measures against: as fast as hyper allows, so
//! that what is measured is the tunnel.
//!
//! - `GET /1k`: a fixed 1 KiB body.
//! - `POST /upload`: reads the whole body and answers with the number of
//!   bytes received, or 400 if the body broke off.
//! - `GET /download?bytes=N`: streams N bytes.

use std::convert::Infallible;

use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

type Body = UnsyncBoxBody<Bytes, hyper::Error>;

/// Size of each chunk of a download.
const CHUNK: usize = 64 * 1024;

/// Serves until the process ends.
pub async fn serve(listener: TcpListener) {
    let one_k = Bytes::from(vec![b'x'; 1024]);
    let chunk = Bytes::from(vec![0x5Au8; CHUNK]);
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let (one_k, chunk) = (one_k.clone(), chunk.clone());
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let (one_k, chunk) = (one_k.clone(), chunk.clone());
                async move { Ok::<_, Infallible>(handle(req, one_k, chunk).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn full(data: Bytes) -> Body {
    Full::new(data)
        .map_err(|never| match never {})
        .boxed_unsync()
}

async fn handle(req: Request<Incoming>, one_k: Bytes, chunk: Bytes) -> Response<Body> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/1k") => Response::new(full(one_k)),
        (&Method::POST, "/upload") => {
            let mut body = req.into_body();
            let mut total = 0u64;
            while let Some(frame) = body.frame().await {
                match frame {
                    Ok(frame) => total += frame.data_ref().map_or(0, |d| d.len() as u64),
                    Err(err) => {
                        let text = format!("the upload broke off after {total} bytes: {err}\n");
                        let mut response = Response::new(full(Bytes::from(text)));
                        *response.status_mut() = StatusCode::BAD_REQUEST;
                        return response;
                    }
                }
            }
            Response::new(full(Bytes::from(total.to_string())))
        }
        (&Method::GET, "/download") => {
            let bytes: u64 = req
                .uri()
                .query()
                .and_then(|q| q.strip_prefix("bytes="))
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            let chunks = bytes.div_ceil(CHUNK as u64);
            let stream = futures_util::stream::iter(0..chunks).map(move |i| {
                let len = (bytes - i * CHUNK as u64).min(CHUNK as u64) as usize;
                Ok::<_, hyper::Error>(Frame::data(chunk.slice(..len)))
            });
            Response::new(StreamBody::new(stream).boxed_unsync())
        }
        _ => {
            let mut response = Response::new(full(Bytes::from_static(b"not found\n")));
            *response.status_mut() = StatusCode::NOT_FOUND;
            response
        }
    }
}
