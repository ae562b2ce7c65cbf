//! The relay's own host: `/healthz`, `/metrics` and the JSON API under
//! `/api/v1/`, routed by one table ([`ROUTES`]) that tests can enumerate.
//! Errors share one JSON shape, `{"error": {"code", "message"}}`.

pub mod dashboard;
pub mod requests;
pub mod webhooks;

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use ferry_common::api::{
    ErrorBody, ErrorDetail, OfflineTunnel, ReplayRequest, TunnelInfo, TunnelList,
};
use http_body_util::BodyExt;
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
    /// `GET /api/v1/tunnels`: the caller's live tunnels and held names.
    Tunnels,
    /// `GET /api/v1/requests`: the activity log, filtered, newest first.
    Requests,
    /// `GET /api/v1/requests/stream`: new entries as server-sent events.
    RequestStream,
    /// `GET /api/v1/requests/har`: the entries a list query finds, as HAR.
    RequestsHar,
    /// `GET /api/v1/requests/{id}`: everything about one entry.
    Request,
    /// `GET /api/v1/requests/{id}/body/{side}`: a body's raw bytes.
    RequestBody,
    /// `GET /api/v1/requests/{id}/curl`: a curl command for the request.
    RequestCurl,
    /// `GET /api/v1/requests/{id}/har`: one entry as HAR.
    RequestHar,
    /// `POST /api/v1/requests/{id}/replay`: sends the request again.
    Replay,
    /// `POST /api/v1/requests/{id}/replayed`: marks an offline capture as
    /// replayed by the client itself.
    MarkReplayed,
    /// `GET|POST /api/v1/webhooks`: the caller's webhooks; a new one.
    Webhooks,
    /// `GET|PUT|DELETE /api/v1/webhooks/{id}`: one webhook.
    Webhook,
    /// `POST /api/v1/webhooks/{id}/rotate-secret`: a new signing secret.
    RotateSecret,
    /// `POST /api/v1/webhooks/{id}/test`: the example event, to it alone.
    TestWebhook,
    /// `GET /api/v1/webhooks/{id}/deliveries`: its deliveries, newest first.
    Deliveries,
    /// `POST /api/v1/webhooks/{id}/recover`: failed deliveries again.
    Recover,
    /// `GET /api/v1/deliveries/{id}`: one delivery and its attempts.
    Delivery,
    /// `POST /api/v1/deliveries/{id}/resend`: one more attempt.
    Resend,
    /// `GET|POST /api/v1/event-types`: the types events may have.
    EventTypes,
    /// `POST /api/v1/events`: an event, fanned out to its webhooks.
    Events,
    /// `GET|POST|DELETE /api/v1/session`: the dashboard's sign-in.
    Session,
    /// `GET /`: the dashboard's page.
    Dashboard,
    /// `GET /assets/{*path}`: the dashboard's scripts and styles.
    Asset,
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
        path: "/",
        methods: &["GET"],
        endpoint: Endpoint::Dashboard,
    },
    Route {
        path: "/assets/{*path}",
        methods: &["GET"],
        endpoint: Endpoint::Asset,
    },
    Route {
        path: "/api/v1/session",
        methods: &["GET", "POST", "DELETE"],
        endpoint: Endpoint::Session,
    },
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
    Route {
        path: "/api/v1/requests",
        methods: &["GET"],
        endpoint: Endpoint::Requests,
    },
    Route {
        path: "/api/v1/requests/stream",
        methods: &["GET"],
        endpoint: Endpoint::RequestStream,
    },
    Route {
        path: "/api/v1/requests/har",
        methods: &["GET"],
        endpoint: Endpoint::RequestsHar,
    },
    Route {
        path: "/api/v1/requests/{id}",
        methods: &["GET"],
        endpoint: Endpoint::Request,
    },
    Route {
        path: "/api/v1/requests/{id}/body/{side}",
        methods: &["GET"],
        endpoint: Endpoint::RequestBody,
    },
    Route {
        path: "/api/v1/requests/{id}/curl",
        methods: &["GET"],
        endpoint: Endpoint::RequestCurl,
    },
    Route {
        path: "/api/v1/requests/{id}/har",
        methods: &["GET"],
        endpoint: Endpoint::RequestHar,
    },
    Route {
        path: "/api/v1/requests/{id}/replay",
        methods: &["POST"],
        endpoint: Endpoint::Replay,
    },
    Route {
        path: "/api/v1/requests/{id}/replayed",
        methods: &["POST"],
        endpoint: Endpoint::MarkReplayed,
    },
    Route {
        path: "/api/v1/webhooks",
        methods: &["GET", "POST"],
        endpoint: Endpoint::Webhooks,
    },
    Route {
        path: "/api/v1/webhooks/{id}",
        methods: &["GET", "PUT", "DELETE"],
        endpoint: Endpoint::Webhook,
    },
    Route {
        path: "/api/v1/webhooks/{id}/rotate-secret",
        methods: &["POST"],
        endpoint: Endpoint::RotateSecret,
    },
    Route {
        path: "/api/v1/webhooks/{id}/test",
        methods: &["POST"],
        endpoint: Endpoint::TestWebhook,
    },
    Route {
        path: "/api/v1/webhooks/{id}/deliveries",
        methods: &["GET"],
        endpoint: Endpoint::Deliveries,
    },
    Route {
        path: "/api/v1/webhooks/{id}/recover",
        methods: &["POST"],
        endpoint: Endpoint::Recover,
    },
    Route {
        path: "/api/v1/deliveries/{id}",
        methods: &["GET"],
        endpoint: Endpoint::Delivery,
    },
    Route {
        path: "/api/v1/deliveries/{id}/resend",
        methods: &["POST"],
        endpoint: Endpoint::Resend,
    },
    Route {
        path: "/api/v1/event-types",
        methods: &["GET", "POST"],
        endpoint: Endpoint::EventTypes,
    },
    Route {
        path: "/api/v1/events",
        methods: &["POST"],
        endpoint: Endpoint::Events,
    },
];

/// Requests for bodies, exports or replays one address may have running.
pub const HEAVY_CALLS_PER_IP: usize = 4;

/// The largest JSON body an API call may send.
const MAX_JSON_BODY: usize = 16 * 1024 * 1024;

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
    /// Changes to the tokens file that were not applied: it did not read
    /// or was not valid.
    pub tokens_file_errors: AtomicU64,
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

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
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
            AuthError::SessionEnded => {
                Self::new(StatusCode::UNAUTHORIZED, "session_ended", err.to_string())
            }
            AuthError::AmbiguousSession => Self::new(
                StatusCode::UNAUTHORIZED,
                "ambiguous_session",
                err.to_string(),
            ),
            AuthError::ForeignPage => {
                Self::new(StatusCode::FORBIDDEN, "foreign_page", err.to_string())
            }
            AuthError::NoRandomness => Self::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "no_randomness",
                err.to_string(),
            ),
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
    caller: Caller,
    connection: &Arc<Activity>,
    req: Request<Incoming>,
) -> Response<Body> {
    let mut response = match route(state, caller, connection, req).await {
        Ok(response) => response,
        Err(err) => error_response(err),
    };
    // Answers are per account, proved by a header or a cookie (bodies and
    // exports hold callers' secrets): no cache may keep one for someone
    // else. The dashboard's own files say how they may be cached.
    let headers = response.headers_mut();
    if !headers.contains_key(header::CACHE_CONTROL) {
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    headers.insert(
        header::VARY,
        HeaderValue::from_static("authorization, cookie"),
    );
    response
}

/// Who called the relay's own host, and how.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Caller {
    /// The caller's address.
    pub peer: IpAddr,
    /// Whether the call came over TLS (session cookies are `Secure` then).
    pub https: bool,
}

async fn route(
    state: &Arc<State>,
    caller: Caller,
    connection: &Arc<Activity>,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let peer = caller.peer;
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
    // The dispatcher's own deliveries never reach the API: a webhook
    // pointed at it (resend, recover …) would make the relay call itself in
    // a loop.
    if req.headers().contains_key("webhook-signature") {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "delivery_refused",
            "the relay's API does not take webhook deliveries: point the webhook at your own receiver",
        ));
    }
    if req.method() != hyper::Method::GET {
        same_site(&req)?;
    }
    if matches!(*req.method(), hyper::Method::POST | hyper::Method::PUT) {
        json_body(&req)?;
    }
    let param = |name: &str| found.params.get(name).unwrap_or_default().to_owned();
    match route.endpoint {
        Endpoint::Dashboard => return Ok(dashboard::page(&req)),
        Endpoint::Asset => return Ok(dashboard::asset(&param("path"), &req)),
        Endpoint::Session => return dashboard::session(state, caller, req).await,
        _ => {}
    }
    let (id, side) = (param("id"), param("side"));
    // Views that build or stream megabytes (bodies, decoded views, HAR,
    // replays) run a few at a time per address, each until its answer
    // has been sent.
    let heavy = match route.endpoint {
        Endpoint::Request
        | Endpoint::RequestBody
        | Endpoint::RequestCurl
        | Endpoint::RequestHar
        | Endpoint::RequestsHar
        | Endpoint::Replay => Some(state.heavy_calls.acquire(peer).ok_or_else(|| {
            ApiError::too_many(
                format!(
                    "this address already has {HEAVY_CALLS_PER_IP} requests for bodies, exports or replays running: wait for one to finish"
                ),
                Duration::from_secs(1),
            )
        })?),
        _ => None,
    };
    let response = endpoint(state, caller, connection, route, &id, &side, req).await?;
    Ok(match heavy {
        Some(guard) => {
            let (parts, body) = response.into_parts();
            Response::from_parts(parts, crate::body::Holding::new(body, guard).boxed_unsync())
        }
        None => response,
    })
}

/// Answers `route` (already checked for its method and its site).
async fn endpoint(
    state: &Arc<State>,
    Caller { peer, https }: Caller,
    connection: &Arc<Activity>,
    route: &Route,
    id: &str,
    side: &str,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let (id, side) = (id.to_owned(), side.to_owned());
    // An admin's reads see every account's objects; what it creates or
    // changes is its own account's, like anybody's.
    let reads = req.method() == hyper::Method::GET;
    let account = || -> Result<Option<AccountId>, ApiError> {
        Ok(state
            .accounts
            .authorize_api(req.headers(), peer, https)?
            .filter(|principal| !(principal.admin && reads))
            .map(|principal| principal.account))
    };
    if is_dispatch(route.endpoint) {
        let owner = account()?.map(|account| account.to_string());
        return dispatch_endpoint(state, route.endpoint, &id, owner.as_deref(), req).await;
    }
    let owner = || -> Result<Option<String>, ApiError> {
        Ok(account()?.map(|account| account.to_string()))
    };
    match route.endpoint {
        Endpoint::Health => Ok(health(state).await),
        Endpoint::Metrics => Ok(metrics(state)),
        Endpoint::Connect => session::connect(state, peer, connection.carry_tunnel(), req).await,
        Endpoint::Tunnels => tunnels(state, account()?.as_ref()).await,
        Endpoint::Requests => {
            let query = requests::parse_query(req.uri().query(), owner()?)?;
            requests::list(state, query).await
        }
        Endpoint::RequestsHar => {
            let query = requests::parse_query(req.uri().query(), owner()?)?;
            requests::har_list(state, query).await
        }
        Endpoint::RequestStream => {
            // Checked again while the feed lasts.
            let proof = state
                .accounts
                .authorize_lasting(req.headers(), peer, https)?;
            let owner = proof
                .as_ref()
                .filter(|proof| !(proof.principal.admin && reads))
                .map(|proof| proof.principal.account.to_string());
            let query = requests::parse_query(req.uri().query(), owner)?;
            let last = req
                .headers()
                .get("last-event-id")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            requests::stream(state, peer, query.filter, last.as_deref(), proof).await
        }
        Endpoint::Request => {
            let entry = requests::entry(state, &id, owner()?.as_deref()).await?;
            Ok(json(&requests::detail(&entry)))
        }
        Endpoint::RequestBody => {
            let entry = requests::entry(state, &id, owner()?.as_deref()).await?;
            requests::body(&entry, &side)
        }
        Endpoint::RequestCurl => {
            let entry = requests::entry(state, &id, owner()?.as_deref()).await?;
            requests::curl(&entry, req.uri().query())
        }
        Endpoint::RequestHar => {
            let entry = requests::entry(state, &id, owner()?.as_deref()).await?;
            Ok(requests::har(std::slice::from_ref(&entry)))
        }
        Endpoint::Replay => {
            let entry = requests::entry(state, &id, owner()?.as_deref()).await?;
            let edits: ReplayRequest = read_json(req, true).await?;
            let dropped = state.recorder.stats().dropped.load(Ordering::Relaxed);
            let answer = crate::activity::replay::replay(state, &entry, &edits).await?;
            if let Ok(id) = answer.id.parse() {
                requests::until_stored(state, id, dropped).await;
            }
            Ok(json(&answer))
        }
        Endpoint::MarkReplayed => {
            let entry = requests::entry(state, &id, owner()?.as_deref()).await?;
            let marked = state
                .log
                .mark_replayed(entry.id, crate::store::now_micros())
                .await
                .map_err(|err| {
                    ApiError::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "store_unavailable",
                        err.to_string(),
                    )
                })?;
            Ok(json(
                &serde_json::json!({ "id": entry.id.to_string(), "marked": marked }),
            ))
        }
        _ => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "unrouted",
            "this route has no handler",
        )),
    }
}

fn is_dispatch(endpoint: Endpoint) -> bool {
    matches!(
        endpoint,
        Endpoint::Webhooks
            | Endpoint::Webhook
            | Endpoint::RotateSecret
            | Endpoint::TestWebhook
            | Endpoint::Deliveries
            | Endpoint::Recover
            | Endpoint::Delivery
            | Endpoint::Resend
            | Endpoint::EventTypes
            | Endpoint::Events
    )
}

/// Answers the dispatcher's routes for `owner` (`None` on a relay without
/// tokens).
async fn dispatch_endpoint(
    state: &Arc<State>,
    endpoint: Endpoint,
    id: &str,
    owner: Option<&str>,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    use hyper::Method;
    let dispatcher = &state.dispatcher;
    let query = req.uri().query().map(str::to_owned);
    let query = query.as_deref();
    match (endpoint, req.method().clone()) {
        (Endpoint::Webhooks, Method::GET) => webhooks::list(dispatcher, owner).await,
        (Endpoint::Webhooks, _) => {
            let input = read_json_within(req, false, webhooks::MAX_SETTINGS_BODY).await?;
            webhooks::create(dispatcher, owner, input).await
        }
        (Endpoint::Webhook, Method::GET) => webhooks::get(dispatcher, id, owner).await,
        (Endpoint::Webhook, Method::PUT) => {
            let input = read_json_within(req, false, webhooks::MAX_SETTINGS_BODY).await?;
            webhooks::update(dispatcher, id, owner, input).await
        }
        (Endpoint::Webhook, _) => webhooks::delete(dispatcher, id, owner).await,
        (Endpoint::RotateSecret, _) => webhooks::rotate(dispatcher, id, owner).await,
        (Endpoint::TestWebhook, _) => {
            let input = read_json_within(req, true, webhooks::MAX_SETTINGS_BODY).await?;
            webhooks::test(dispatcher, id, owner, input).await
        }
        (Endpoint::Deliveries, _) => webhooks::deliveries(dispatcher, id, owner, query).await,
        (Endpoint::Recover, _) => webhooks::recover(dispatcher, id, owner, query).await,
        (Endpoint::Delivery, _) => webhooks::delivery(dispatcher, id, owner).await,
        (Endpoint::Resend, _) => webhooks::resend(dispatcher, id, owner).await,
        (Endpoint::EventTypes, Method::GET) => webhooks::list_event_types(dispatcher, owner).await,
        (Endpoint::EventTypes, _) => {
            let input = read_json_within(req, false, webhooks::MAX_SETTINGS_BODY).await?;
            webhooks::add_event_type(dispatcher, owner, input).await
        }
        _ => {
            let input = read_json_within(req, false, webhooks::MAX_EVENT_REQUEST).await?;
            webhooks::send_event(dispatcher, owner, input).await
        }
    }
}

/// Refuses a state-changing call a web page elsewhere could make: the API
/// may listen on loopback without a token, so a browser's cross-site form
/// post must not reach it. Only calls from no origin or this origin are
/// taken.
fn same_site(req: &Request<Incoming>) -> Result<(), ApiError> {
    let headers = req.headers();
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()))
        .unwrap_or_default();
    if let Some(origin) = headers.get(header::ORIGIN) {
        let origin = origin.to_str().unwrap_or("?");
        let origin_host = origin.split_once("://").map_or("", |(_, h)| h);
        if origin == "null" || !origin_host.eq_ignore_ascii_case(host) {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "cross_site",
                format!("requests from the web page at {origin} may not change anything on this relay: call the API from the dashboard, the ferry CLI or curl"),
            ));
        }
    }
    if headers
        .get("sec-fetch-site")
        .is_some_and(|v| v.as_bytes() == b"cross-site")
    {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "cross_site",
            "cross-site requests may not change anything on this relay",
        ));
    }
    Ok(())
}

/// Takes only JSON bodies, which a cross-site page cannot send without a
/// CORS preflight the relay never grants.
fn json_body(req: &Request<Incoming>) -> Result<(), ApiError> {
    let json = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
    if !json {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "json_required",
            "send this call with Content-Type: application/json (an empty body is {})",
        ));
    }
    Ok(())
}

/// Reads a JSON body of at most [`MAX_JSON_BODY`] bytes; an empty body is
/// the default value when `empty_ok`.
async fn read_json<T: serde::de::DeserializeOwned + Default>(
    req: Request<Incoming>,
    empty_ok: bool,
) -> Result<T, ApiError> {
    read_json_within(req, empty_ok, MAX_JSON_BODY).await
}

/// [`read_json`] with a tighter limit, for calls whose bodies are small:
/// the whole body is parsed in memory, so the limit bounds what one call
/// costs.
async fn read_json_within<T: serde::de::DeserializeOwned + Default>(
    req: Request<Incoming>,
    empty_ok: bool,
    limit: usize,
) -> Result<T, ApiError> {
    let limited = http_body_util::Limited::new(req.into_body(), limit);
    let bytes = match limited.collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(err) if err.is::<http_body_util::LengthLimitError>() => {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!("this call's body may hold at most {limit} bytes"),
            ))
        }
        Err(_) => return Err(ApiError::bad_request("the request body could not be read")),
    };
    if bytes.iter().all(u8::is_ascii_whitespace) && empty_ok {
        return Ok(T::default());
    }
    serde_json::from_slice(&bytes).map_err(|err| {
        ApiError::bad_request(format!("the JSON body is not what this call takes: {err}"))
    })
}

/// `/healthz`: 200 while the relay serves, its store answers and capture
/// works; 503 with the reason otherwise (forwarding goes on).
async fn health(state: &State) -> Response<Body> {
    if let Err(error) = state.store_health.check().await {
        return crate::text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("store failing: {error}; tunnels still forward, captures wait in memory"),
        );
    }
    match state.recorder.health().borrow().as_deref() {
        Some(error) => crate::text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("capture failing: the activity log cannot be written ({error}); tunnels still forward"),
        ),
        None => crate::text(StatusCode::OK, "ok"),
    }
}

/// The store's reachability for `/healthz`. Checks run one at a time, and a
/// caller takes the result of a check that began after it arrived: a flood
/// of health probes costs the database one trivial query at a time, and
/// every probe still sees the store as it is now.
pub struct StoreHealth {
    store: Arc<dyn crate::store::Database>,
    last: tokio::sync::Mutex<Option<(tokio::time::Instant, Result<(), String>)>>,
}

/// How long one reachability check may take before it counts as failed.
const HEALTH_CHECK_TIMEOUT: Duration = Duration::from_secs(2);

impl StoreHealth {
    /// Checks `store`.
    pub fn new(store: Arc<dyn crate::store::Database>) -> Self {
        Self {
            store,
            last: tokio::sync::Mutex::new(None),
        }
    }

    async fn check(&self) -> Result<(), String> {
        let arrived = tokio::time::Instant::now();
        let mut last = self.last.lock().await;
        if let Some((began, result)) = last.as_ref() {
            if *began >= arrived {
                return result.clone();
            }
        }
        let began = tokio::time::Instant::now();
        let result = match tokio::time::timeout(HEALTH_CHECK_TIMEOUT, self.store.check()).await {
            Ok(checked) => checked.map_err(|err| err.to_string()),
            Err(_) => Err(format!(
                "the database did not answer within {} s",
                HEALTH_CHECK_TIMEOUT.as_secs()
            )),
        };
        *last = Some((began, result.clone()));
        result
    }
}

async fn tunnels(state: &State, account: Option<&AccountId>) -> Result<Response<Body>, ApiError> {
    let mine = |owner: &Owner| match account {
        None => true,
        Some(account) => matches!(owner, Owner::Account(o) if o == account),
    };
    let live = state.tunnels.list();
    let tunnels = live
        .iter()
        .filter(|t| mine(&t.owner))
        .map(|t| {
            let (requests, last_request_at) = t.request_counts();
            TunnelInfo {
                name: t.name.to_string(),
                public_url: t.public_url.clone(),
                connected_at: t
                    .connected_at
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs()),
                client_version: t.client.version.clone(),
                target: t.client.target.clone(),
                requests,
                last_request_at,
            }
        })
        .collect();
    let seconds = |micros: i64| u64::try_from(micros / 1_000_000).unwrap_or(0);
    let names = state
        .names
        .names(crate::store::now_micros())
        .await
        .map_err(|err| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "store_unavailable",
                err.to_string(),
            )
        })?;
    let mut offline: Vec<OfflineTunnel> = names
        .into_iter()
        .filter(|record| record.hold_until.is_some())
        .filter(|record| mine(&Owner::from_key(&record.owner)))
        .filter(|record| !live.iter().any(|t| t.name.as_str() == record.name))
        .map(|record| OfflineTunnel {
            name: record.name,
            last_seen: seconds(record.last_seen),
            held_until: record.hold_until.map(seconds),
            target: record.target,
        })
        .collect();
    offline.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(json(&TunnelList { tunnels, offline }))
}

fn metrics(state: &State) -> Response<Body> {
    let m = &state.metrics;
    let mut body = format!(
        "# HELP ferry_tunnels Connected tunnels.\n# TYPE ferry_tunnels gauge\nferry_tunnels {}\n\
         # HELP ferry_sessions_total Tunnel sessions accepted.\n# TYPE ferry_sessions_total counter\nferry_sessions_total {}\n\
         # HELP ferry_requests_total Public requests sent through a tunnel.\n# TYPE ferry_requests_total counter\nferry_requests_total {}\n\
         # HELP ferry_request_errors_total Public requests to a tunnel that the relay answered with an error itself.\n# TYPE ferry_request_errors_total counter\nferry_request_errors_total {}\n\
         # HELP ferry_connections_refused_total Connections closed at accept: their address held its limit.\n# TYPE ferry_connections_refused_total counter\nferry_connections_refused_total {}\n\
         # HELP ferry_capture_written_total Exchanges stored in the activity log.\n# TYPE ferry_capture_written_total counter\nferry_capture_written_total {}\n\
         # HELP ferry_capture_shed_total Exchanges stored without their bodies because the capture queue was full.\n# TYPE ferry_capture_shed_total counter\nferry_capture_shed_total {}\n\
         # HELP ferry_capture_dropped_total Exchanges lost: the capture queue was full, or the write failed.\n# TYPE ferry_capture_dropped_total counter\nferry_capture_dropped_total {}\n\
         # HELP ferry_capture_failing Whether the last activity log write failed.\n# TYPE ferry_capture_failing gauge\nferry_capture_failing {}\n\
         # HELP ferry_search_index_backlog Stored exchanges not yet in the search index, which fills it while the log is idle (searches check them one by one meanwhile).\n# TYPE ferry_search_index_backlog gauge\nferry_search_index_backlog {}\n\
         # HELP ferry_dispatch_attempts_total Webhook delivery attempts made.\n# TYPE ferry_dispatch_attempts_total counter\nferry_dispatch_attempts_total {}\n\
         # HELP ferry_dispatch_succeeded_total Webhook deliveries that succeeded.\n# TYPE ferry_dispatch_succeeded_total counter\nferry_dispatch_succeeded_total {}\n\
         # HELP ferry_dispatch_failed_total Webhook deliveries that failed for good.\n# TYPE ferry_dispatch_failed_total counter\nferry_dispatch_failed_total {}\n\
         # HELP ferry_dispatch_store_errors_total Delivery queue reads or writes that failed.\n# TYPE ferry_dispatch_store_errors_total counter\nferry_dispatch_store_errors_total {}\n\
         # HELP ferry_tokens_file_errors_total Changes to the tokens file not applied: it was not readable or not valid.\n# TYPE ferry_tokens_file_errors_total counter\nferry_tokens_file_errors_total {}\n",
        state.tunnels.len(),
        m.sessions.load(Ordering::Relaxed),
        m.requests.load(Ordering::Relaxed),
        m.request_errors.load(Ordering::Relaxed),
        m.connections_refused.load(Ordering::Relaxed),
        state.recorder.stats().written.load(Ordering::Relaxed),
        state.recorder.stats().shed.load(Ordering::Relaxed),
        state.recorder.stats().dropped.load(Ordering::Relaxed),
        u8::from(state.recorder.health().borrow().is_some()),
        state.log.search_backlog(),
        state.dispatcher.stats().attempts.load(Ordering::Relaxed),
        state.dispatcher.stats().succeeded.load(Ordering::Relaxed),
        state.dispatcher.stats().failed.load(Ordering::Relaxed),
        state.dispatcher.stats().store_errors.load(Ordering::Relaxed),
        m.tokens_file_errors.load(Ordering::Relaxed),
    );
    if let Some(cluster) = &state.cluster {
        body.push_str(&cluster_metrics(cluster.stats()));
    }
    let mut response = Response::new(full(body));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    response
}

/// The counters of the link between the relays of a fleet.
fn cluster_metrics(stats: &crate::cluster::LinkStats) -> String {
    format!(
        "# HELP ferry_cluster_forwarded_total Requests sent to the relay of the fleet that holds their tunnel.\n# TYPE ferry_cluster_forwarded_total counter\nferry_cluster_forwarded_total {}\n\
         # HELP ferry_cluster_served_total Requests from other relays of the fleet taken for this relay's tunnels.\n# TYPE ferry_cluster_served_total counter\nferry_cluster_served_total {}\n\
         # HELP ferry_cluster_refused_total Connections and requests the cluster listener refused, by reason.\n# TYPE ferry_cluster_refused_total counter\n\
         ferry_cluster_refused_total{{reason=\"secret\"}} {}\n\
         ferry_cluster_refused_total{{reason=\"connections_per_ip\"}} {}\n\
         ferry_cluster_refused_total{{reason=\"first_request_timeout\"}} {}\n\
         ferry_cluster_refused_total{{reason=\"tunnel_moved\"}} {}\n",
        stats.forwarded.load(Ordering::Relaxed),
        stats.served.load(Ordering::Relaxed),
        stats.refused_secret.load(Ordering::Relaxed),
        stats.refused_connections.load(Ordering::Relaxed),
        stats.refused_silent.load(Ordering::Relaxed),
        stats.refused_moved.load(Ordering::Relaxed),
    )
}

/// A JSON answer.
pub(crate) fn json(value: &impl serde::Serialize) -> Response<Body> {
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
