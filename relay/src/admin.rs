//! The relay's own endpoints on its API host: `/healthz`, `/metrics` and the
//! JSON API under `/api/v1/`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::UNIX_EPOCH;

use hyper::body::Incoming;
use hyper::{header, Method, Request, Response, StatusCode};
use serde::Serialize;

use crate::{full, session, text, Body, State};

/// Counters served at `/metrics`.
#[derive(Default)]
pub struct Metrics {
    /// Public requests forwarded to a tunnel.
    pub requests: AtomicU64,
    /// Public requests that failed before the client answered.
    pub request_errors: AtomicU64,
    /// Tunnel sessions accepted.
    pub sessions: AtomicU64,
}

/// One entry of `GET /api/v1/tunnels`.
#[derive(Serialize)]
struct TunnelInfo<'a> {
    /// The subdomain.
    name: &'a str,
    /// The public URL.
    public_url: &'a str,
    /// Seconds since the Unix epoch when the client connected.
    connected_at: u64,
}

/// Serves a request to the relay's own host.
pub(crate) async fn handle(state: &Arc<State>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path();
    match (req.method(), path) {
        (&Method::GET, "/healthz") => text(StatusCode::OK, "ok"),
        (&Method::GET, "/metrics") => metrics(state),
        (_, ferry_common::handshake::CONNECT_PATH) => session::connect(state, req).await,
        (&Method::GET, "/api/v1/tunnels") => match session::authorize(state, req.headers()) {
            Ok(owner) => tunnels(state, owner.as_ref()),
            Err(response) => *response,
        },
        (_, "/healthz" | "/metrics" | "/api/v1/tunnels") => text(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{path} only answers GET"),
        ),
        _ => text(
            StatusCode::NOT_FOUND,
            format!("nothing at {path} on this relay: the API lives under /api/v1/"),
        ),
    }
}

fn tunnels(state: &State, token: Option<&crate::Token>) -> Response<Body> {
    let all = state.tunnels.list();
    let visible: Vec<TunnelInfo<'_>> = all
        .iter()
        .filter(|t| match (token, &t.owner) {
            (None, _) => true,
            (Some(token), crate::tunnels::Owner::Token(held)) => token.matches(held),
            (Some(_), _) => false,
        })
        .map(|t| TunnelInfo {
            name: t.name.as_str(),
            public_url: &t.public_url,
            connected_at: t
                .connected_at
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        })
        .collect();
    json(&serde_json::json!({ "tunnels": visible }))
}

fn metrics(state: &State) -> Response<Body> {
    let m = &state.metrics;
    let body = format!(
        "# HELP ferry_tunnels Connected tunnels.\n# TYPE ferry_tunnels gauge\nferry_tunnels {}\n\
         # HELP ferry_sessions_total Tunnel sessions accepted.\n# TYPE ferry_sessions_total counter\nferry_sessions_total {}\n\
         # HELP ferry_requests_total Public requests forwarded to a tunnel.\n# TYPE ferry_requests_total counter\nferry_requests_total {}\n\
         # HELP ferry_request_errors_total Public requests that failed before the client answered.\n# TYPE ferry_request_errors_total counter\nferry_request_errors_total {}\n",
        state.tunnels.list().len(),
        m.sessions.load(Ordering::Relaxed),
        m.requests.load(Ordering::Relaxed),
        m.request_errors.load(Ordering::Relaxed),
    );
    let mut response = Response::new(full(body));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    response
}

fn json(value: &serde_json::Value) -> Response<Body> {
    let mut response = Response::new(full(value.to_string()));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    response
}
