//! The relay's own host: `/healthz`, `/metrics` and the JSON API under
//! `/api/v1/`, routed by one table ([`ROUTES`]) that tests can enumerate.
//! Errors share one JSON shape, `{"error": {"code", "message"}}`.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use ferry_common::api::{ErrorBody, ErrorDetail, TunnelInfo, TunnelList};
use hyper::body::Incoming;
use hyper::header::{self, HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode};

use crate::accounts::{AccountId, AuthError};
use crate::connection::Activity;
use crate::tunnels::Owner;
use crate::{full, session, Body, State};

/// What a route leads to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `GET /healthz`: the relay is up.
    Health,
    /// `GET /metrics`: Prometheus counters.
    Metrics,
    /// `GET /api/v1/tunnels/connect`: the WebSocket a client opens.
    Connect,
    /// `GET /api/v1/tunnels`: the caller's live tunnels.
    Tunnels,
}

/// One route: a path pattern, the methods it answers and where it leads.
#[derive(Debug)]
pub struct Route {
    /// The path, in `matchit` syntax (`/api/v1/requests/{id}`).
    pub path: &'static str,
    /// The methods it answers.
    pub methods: &'static [&'static str],
    /// What answers it.
    pub endpoint: Endpoint,
}

/// Every route of the relay's own host.
pub const ROUTES: &[Route] = &[
    Route {
        path: "/healthz",
        methods: &["GET"],
        endpoint: Endpoint::Health,
    },
    Route {
        path: "/metrics",
        methods: &["GET"],
        endpoint: Endpoint::Metrics,
    },
    Route {
        path: ferry_common::handshake::CONNECT_PATH,
        methods: &["GET"],
        endpoint: Endpoint::Connect,
    },
    Route {
        path: "/api/v1/tunnels",
        methods: &["GET"],
        endpoint: Endpoint::Tunnels,
    },
];

/// The path router over [`ROUTES`].
pub struct Router(matchit::Router<&'static Route>);

impl Router {
    /// Builds the router; the table is fixed, so a bad pattern is a bug.
    pub fn new() -> Self {
        let mut router = matchit::Router::new();
        for route in ROUTES {
            router
                .insert(route.path, route)
                .expect("the route table holds valid, distinct patterns");
        }
        Self(router)
    }
}

impl Default for Router {
    fn default() -> Self {
        Self::new()
    }
}

/// Counters served at `/metrics`.
#[derive(Default)]
pub struct Metrics {
    /// Public requests sent through a tunnel.
    pub requests: AtomicU64,
    /// Public requests to a tunnel name that the relay answered itself with
    /// an error (no tunnel, busy, too large, timeout, client gone).
    pub request_errors: AtomicU64,
    /// Tunnel sessions accepted.
    pub sessions: AtomicU64,
    /// Connections closed at accept because their address held its limit.
    pub connections_refused: AtomicU64,
}

/// An API error: a status, a stable code and a sentence.
#[derive(Debug)]
pub struct ApiError {
    /// The HTTP status.
    status: StatusCode,
    /// The machine-readable code.
    code: &'static str,
    /// What to do, for people.
    message: String,
    /// Extra headers (`Retry-After`, `WWW-Authenticate`, `Allow`).
    headers: Vec<(HeaderName, HeaderValue)>,
}

impl ApiError {
    /// An error with `status`, `code` and `message`.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            headers: Vec::new(),
        }
    }

    /// A 400.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    /// A 429 saying when to come back.
    pub fn too_many(message: impl Into<String>, wait: Duration) -> Self {
        let seconds = wait.as_secs().max(1).to_string();
        let error = Self::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", message);
        match HeaderValue::from_str(&seconds) {
            Ok(value) => error.with_header(header::RETRY_AFTER, value),
            Err(_) => error,
        }
    }

    /// Adds a header to the answer.
    pub fn with_header(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.headers.push((name, value));
        self
    }
}

impl From<AuthError> for ApiError {
    fn from(err: AuthError) -> Self {
        match err {
            AuthError::Throttled(wait) => Self::too_many(err.to_string(), wait),
            AuthError::Missing | AuthError::Wrong => {
                Self::new(StatusCode::UNAUTHORIZED, "unauthorized", err.to_string())
                    .with_header(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"))
            }
        }
    }
}

/// The JSON answer for `err`.
pub fn error_response(err: ApiError) -> Response<Body> {
    let body = ErrorBody {
        error: ErrorDetail {
            code: err.code.to_owned(),
            message: err.message,
        },
    };
    let mut response = json(&body);
    *response.status_mut() = err.status;
    response.headers_mut().extend(err.headers);
    response
}

/// Serves a request to the relay's own host.
pub(crate) async fn handle(
    state: &Arc<State>,
    peer: IpAddr,
    connection: &Arc<Activity>,
    req: Request<Incoming>,
) -> Response<Body> {
    match route(state, peer, connection, req).await {
        Ok(response) => response,
        Err(err) => error_response(err),
    }
}

async fn route(
    state: &Arc<State>,
    peer: IpAddr,
    connection: &Arc<Activity>,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let path = req.uri().path();
    let Ok(found) = state.router.0.at(path) else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("nothing at {path} on this relay: the API lives under /api/v1/"),
        ));
    };
    let route = *found.value;
    if !route.methods.contains(&req.method().as_str()) {
        let allow = route.methods.join(", ");
        let error = ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            format!("{} answers {allow}, not {}", route.path, req.method()),
        );
        return Err(match HeaderValue::from_str(&allow) {
            Ok(allow) => error.with_header(header::ALLOW, allow),
            Err(_) => error,
        });
    }
    match route.endpoint {
        Endpoint::Health => Ok(crate::text(StatusCode::OK, "ok")),
        Endpoint::Metrics => Ok(metrics(state)),
        Endpoint::Connect => session::connect(state, peer, connection.carry_tunnel(), req).await,
        Endpoint::Tunnels => {
            let account = state.accounts.authorize(req.headers(), peer)?;
            Ok(tunnels(state, account.as_ref()))
        }
    }
}

fn tunnels(state: &State, account: Option<&AccountId>) -> Response<Body> {
    let tunnels = state
        .tunnels
        .list()
        .iter()
        .filter(|t| match (account, &t.owner) {
            (None, _) => true,
            (Some(account), Owner::Account(owner)) => account == owner,
            (Some(_), _) => false,
        })
        .map(|t| TunnelInfo {
            name: t.name.to_string(),
            public_url: t.public_url.clone(),
            connected_at: t
                .connected_at
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            client_version: t.client.version.clone(),
            target: t.client.target.clone(),
        })
        .collect();
    json(&TunnelList { tunnels })
}

fn metrics(state: &State) -> Response<Body> {
    let m = &state.metrics;
    let body = format!(
        "# HELP ferry_tunnels Connected tunnels.\n# TYPE ferry_tunnels gauge\nferry_tunnels {}\n\
         # HELP ferry_sessions_total Tunnel sessions accepted.\n# TYPE ferry_sessions_total counter\nferry_sessions_total {}\n\
         # HELP ferry_requests_total Public requests sent through a tunnel.\n# TYPE ferry_requests_total counter\nferry_requests_total {}\n\
         # HELP ferry_request_errors_total Public requests to a tunnel that the relay answered with an error itself.\n# TYPE ferry_request_errors_total counter\nferry_request_errors_total {}\n\
         # HELP ferry_connections_refused_total Connections closed at accept: their address held its limit.\n# TYPE ferry_connections_refused_total counter\nferry_connections_refused_total {}\n",
        state.tunnels.len(),
        m.sessions.load(Ordering::Relaxed),
        m.requests.load(Ordering::Relaxed),
        m.request_errors.load(Ordering::Relaxed),
        m.connections_refused.load(Ordering::Relaxed),
    );
    let mut response = Response::new(full(body));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    response
}

fn json(value: &impl serde::Serialize) -> Response<Body> {
    let text = serde_json::to_string(value).unwrap_or_else(|_| String::from("{}"));
    let mut response = Response::new(full(text));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::{Router, ROUTES};

    #[test]
    fn every_route_is_reachable_through_the_router() {
        let router = Router::new();
        for route in ROUTES {
            let found = router.0.at(route.path).expect("route matches its own path");
            assert_eq!(found.value.endpoint, route.endpoint);
            assert!(!route.methods.is_empty());
        }
    }
}
