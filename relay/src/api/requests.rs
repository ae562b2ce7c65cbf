//! `/api/v1/requests…`: the activity log's entries, their bodies, exports,
//! a live tail and replays. An account sees only entries of names it owns;
//! anything else is a 404, so ids reveal nothing.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use base64::Engine;
use bytes::Bytes;
use ferry_common::api::{
    BodyView, DecodedView, HeaderField, RequestDetail, RequestItem, RequestPage, RequestView,
    ResponseView, Timings,
};
use ferry_common::ids::ExchangeId;
use futures_util::StreamExt;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper::header::{self, HeaderValue};
use hyper::{Response, StatusCode};

use super::{json, ApiError};
use crate::accounts::Proof;
use crate::activity::{decode, export};
use crate::store::{CapturedBody, Exchange, Filter, Header, Micros, StatusFilter, MIN_SEARCH};
use crate::{full, Body, State};

/// Entries per page unless the caller asks for fewer.
const DEFAULT_PAGE: usize = 50;
/// The most entries a page or an export holds.
const MAX_PAGE: usize = 500;
/// The most decoded bytes the detail view shows of a compressed body.
const DECODED_CAP: usize = 1024 * 1024;
/// Entries the live tail reads from the store at a time.
const TAIL_BATCH: usize = 200;
/// Live feeds one address may hold open at once.
pub const LIVE_FEEDS_PER_IP: usize = 8;
/// How often the live tail sends a comment, so proxies keep it open.
const TAIL_KEEPALIVE: Duration = Duration::from_secs(15);
/// How long an answer that names a new entry (a replay's) waits for the
/// entry to be stored, so that the caller can read it at once.
const STORED_WAIT: Duration = Duration::from_secs(5);

/// The filters, cursor and page size of a list query.
pub struct ListQuery {
    /// Which entries.
    pub filter: Filter,
    /// Entries older than this id.
    pub cursor: Option<ExchangeId>,
    /// At most this many.
    pub limit: usize,
}

/// Reads `tunnel`, `kind`, `method`, `status`, `q`, `since`, `until`,
/// `missed`, `cursor` and `limit` from a query string.
pub fn parse_query(query: Option<&str>, owner: Option<String>) -> Result<ListQuery, ApiError> {
    let mut list = ListQuery {
        filter: Filter {
            owner,
            ..Filter::default()
        },
        cursor: None,
        limit: DEFAULT_PAGE,
    };
    let pairs = form_urlencoded(query.unwrap_or(""));
    for (key, value) in pairs {
        let filter = &mut list.filter;
        match key.as_str() {
            "tunnel" => filter.tunnel = Some(value.to_ascii_lowercase()),
            "kind" => filter.kind = Some(value.parse().map_err(ApiError::bad_request)?),
            "method" => filter.method = Some(value.to_ascii_uppercase()),
            "status" => {
                filter.status = Some(value.parse::<StatusFilter>().map_err(ApiError::bad_request)?)
            }
            "q" if value.is_empty() => {}
            "q" => {
                if crate::store::search_run(&value).chars().count() < MIN_SEARCH {
                    return Err(ApiError::bad_request(format!(
                        "`q` needs at least {MIN_SEARCH} characters in a row other than % and _"
                    )));
                }
                filter.text = Some(value)
            }
            "since" => filter.since = Some(time_filter(&key, &value)?),
            "until" => filter.until = Some(time_filter(&key, &value)?),
            "missed" => filter.missed = matches!(value.as_str(), "true" | "1" | ""),
            "cursor" => {
                list.cursor = Some(value.parse().map_err(|_| {
                    ApiError::bad_request(format!(
                        "`cursor` must be the next_cursor of a previous page, not `{value}`"
                    ))
                })?)
            }
            "limit" => {
                list.limit = value
                    .parse::<usize>()
                    .ok()
                    .filter(|n| (1..=MAX_PAGE).contains(n))
                    .ok_or_else(|| {
                        ApiError::bad_request(format!(
                            "`limit` must be a number from 1 to {MAX_PAGE}, not `{value}`"
                        ))
                    })?
            }
            _ => {
                return Err(ApiError::bad_request(format!(
                    "unknown filter `{key}`: use tunnel, kind, method, status, q, since, until, missed, cursor or limit"
                )))
            }
        }
    }
    Ok(list)
}

/// `since`/`until`: an RFC 3339 time, or a duration meaning that long ago.
pub(crate) fn time_filter(key: &str, value: &str) -> Result<Micros, ApiError> {
    if let Ok(at) = humantime::parse_rfc3339_weak(value) {
        return Ok(micros_of(at));
    }
    if let Ok(ago) = ferry_common::units::parse_duration(value) {
        let now = crate::store::now_micros();
        return Ok(now.saturating_sub(i64::try_from(ago.as_micros()).unwrap_or(i64::MAX)));
    }
    Err(ApiError::bad_request(format!(
        "`{key}` must be an RFC 3339 time such as 2026-01-31T12:00:00Z, or a duration ago such as 1h, not `{value}`"
    )))
}

fn micros_of(at: std::time::SystemTime) -> Micros {
    at.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

/// The pairs of an `application/x-www-form-urlencoded` query, decoded.
pub fn form_urlencoded(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(key), percent_decode(value))
        })
        .collect()
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                match std::str::from_utf8(&bytes[i + 1..i + 3])
                    .ok()
                    .and_then(|hex| u8::from_str_radix(hex, 16).ok())
                {
                    Some(byte) => {
                        out.push(byte);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            other => out.push(other),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// RFC 3339 with microseconds.
pub fn rfc3339(at: Micros) -> String {
    let at = UNIX_EPOCH + Duration::from_micros(u64::try_from(at).unwrap_or(0));
    humantime::format_rfc3339_micros(at).to_string()
}

/// An entry as a list item.
pub fn item(entry: &Exchange) -> RequestItem {
    RequestItem {
        id: entry.id.to_string(),
        received_at: rfc3339(entry.received_at),
        tunnel: entry.tunnel.clone(),
        kind: entry.kind.to_string(),
        method: entry.method.clone(),
        path: entry.path().to_owned(),
        status: entry.response.as_ref().map(|r| r.status),
        duration_ms: entry.duration_ms(),
        request_size: entry.request_body.size,
        response_size: entry.response.as_ref().map_or(0, |r| r.body.size),
        outcome: entry.outcome.as_str().to_owned(),
        replay_of: entry.replay_of.map(|id| id.to_string()),
        dispatch: entry
            .dispatch
            .as_ref()
            .map(|d| ferry_common::api::DispatchInfo {
                webhook_id: d.webhook.clone(),
                event_id: d.event.clone(),
                delivery_id: d.delivery.clone(),
                attempt: d.attempt,
            }),
    }
}

fn header_fields(headers: &[Header]) -> Vec<HeaderField> {
    headers
        .iter()
        .map(|h| {
            let text = std::str::from_utf8(&h.value);
            HeaderField {
                name: h.name.clone(),
                value: String::from_utf8_lossy(&h.value).into_owned(),
                value_base64: text
                    .is_err()
                    .then(|| base64::engine::general_purpose::STANDARD.encode(&h.value)),
            }
        })
        .collect()
}

fn body_view(headers: &[Header], body: &CapturedBody) -> BodyView {
    let b64 = base64::engine::general_purpose::STANDARD;
    BodyView {
        size: body.size,
        captured: body.bytes.len() as u64,
        truncated: body.truncated,
        base64: b64.encode(&body.bytes),
        text: decode::readable(&body.bytes).map(str::to_owned),
        decoded: decode::decoded(headers, &body.bytes, DECODED_CAP).map(|d| {
            let text = decode::readable(&d.bytes).map(str::to_owned);
            DecodedView {
                size: d.bytes.len() as u64,
                base64: text.is_none().then(|| b64.encode(&d.bytes)),
                text,
                truncated: d.truncated,
                error: d.error,
            }
        }),
    }
}

/// Everything about an entry.
pub fn detail(entry: &Exchange) -> RequestDetail {
    RequestDetail {
        item: item(entry),
        remote_addr: entry.remote_addr.clone(),
        request: RequestView {
            method: entry.method.clone(),
            url: entry.url.clone(),
            http_version: entry.http_version.clone(),
            headers: header_fields(&entry.request_headers),
            body: body_view(&entry.request_headers, &entry.request_body),
        },
        response: entry.response.as_ref().map(|r| ResponseView {
            status: r.status,
            headers: header_fields(&r.headers),
            body: body_view(&r.headers, &r.body),
        }),
        timings: Timings {
            received_at: rfc3339(entry.received_at),
            responded_at: entry.responded_at.map(rfc3339),
            done_at: entry.done_at.map(rfc3339),
        },
        error: entry.error.clone(),
        incomplete: entry.incomplete,
        replayed_at: entry.replayed_at.map(rfc3339),
    }
}

fn store_failed(err: crate::store::StoreError) -> ApiError {
    if err.0.starts_with(crate::store::TOO_SLOW) {
        return ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "query_too_slow", err.0);
    }
    tracing::warn!(%err, "activity log read failed");
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "store_unavailable",
        "the activity log cannot be read right now; try again shortly",
    )
}

/// A 404 for an id that is not the caller's, or not at all.
pub fn not_found(id: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("no request `{id}` in your activity log: list them with GET /api/v1/requests"),
    )
}

/// Waits until entry `id` is stored, re-reading after each commit, for at
/// most [`STORED_WAIT`]: the writer gathers entries for a few milliseconds
/// before each commit, and a caller told an id expects to read it. Gives up
/// at once when capture has dropped an entry since `dropped_before` (its
/// queue was full, or a write failed): it may have been this one.
pub(crate) async fn until_stored(state: &State, id: ExchangeId, dropped_before: u64) {
    let mut committed = state.recorder.committed();
    let mut health = state.recorder.health();
    let dropped = || {
        state
            .recorder
            .stats()
            .dropped
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    let _ = tokio::time::timeout(STORED_WAIT, async {
        loop {
            committed.borrow_and_update();
            health.borrow_and_update();
            // A store that fails to answer is reported by the next read.
            if !matches!(state.log.seq_of(id, None).await, Ok(None)) || dropped() > dropped_before {
                return;
            }
            // Cancel-safe: two watch receivers.
            let changed = tokio::select! {
                changed = committed.changed() => changed,
                changed = health.changed() => changed,
            };
            if changed.is_err() {
                return;
            }
        }
    })
    .await;
}

/// Reads the entry `id` that `owner` may see.
pub(crate) async fn entry(
    state: &State,
    id: &str,
    owner: Option<&str>,
) -> Result<Exchange, ApiError> {
    let Ok(parsed) = id.parse::<ExchangeId>() else {
        return Err(ApiError::bad_request(format!(
            "`{}` is not a request id: ids look like 0192f0c4-8e4b-7d3a-9f1e-2b6c8d4e5f60",
            id.chars().take(64).collect::<String>()
        )));
    };
    state
        .log
        .get(parsed, owner)
        .await
        .map_err(store_failed)?
        .ok_or_else(|| not_found(id))
}

/// `GET /api/v1/requests`.
pub(crate) async fn list(state: &State, query: ListQuery) -> Result<Response<Body>, ApiError> {
    let entries = state
        .log
        .list(&query.filter, query.cursor, query.limit, false)
        .await
        .map_err(store_failed)?;
    let next_cursor = (entries.len() == query.limit)
        .then(|| entries.last().map(|e| e.id.to_string()))
        .flatten();
    Ok(json(&RequestPage {
        items: entries.iter().map(item).collect(),
        next_cursor,
    }))
}

/// `GET /api/v1/requests/{id}/body/{side}`: the raw bytes kept.
pub fn body(entry: &Exchange, side: &str) -> Result<Response<Body>, ApiError> {
    let (headers, body) = match side {
        "request" => (&entry.request_headers, &entry.request_body),
        "response" => match &entry.response {
            Some(response) => (&response.headers, &response.body),
            None => {
                return Err(ApiError::new(
                    StatusCode::NOT_FOUND,
                    "no_response",
                    "this request got no response, so there is no response body",
                ))
            }
        },
        other => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("`{other}` is not a body: use /body/request or /body/response"),
            ))
        }
    };
    let content_type = headers
        .iter()
        .find(|h| h.name == "content-type")
        .and_then(|h| HeaderValue::from_bytes(&h.value).ok());
    let mut response = Response::new(full(body.bytes.clone()));
    let headers = response.headers_mut();
    // Whatever type the caller claimed, the bytes are served as bytes: a
    // body claiming to be JavaScript, loaded by a `<script>` on the
    // dashboard's origin, would pass its `script-src 'self'`. The claimed
    // type is said beside.
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    if let Some(claimed) = content_type {
        headers.insert("ferry-content-type", claimed);
    }
    headers.insert(
        header::CONTENT_DISPOSITION,
        HeaderValue::from_str(&format!("attachment; filename=\"{}-{side}.bin\"", entry.id))
            .unwrap_or(HeaderValue::from_static("attachment")),
    );
    // The bytes are the caller's, whatever they claim to be: never sniffed
    // or rendered as a page of the relay.
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("sandbox"),
    );
    headers.insert(
        "cross-origin-resource-policy",
        HeaderValue::from_static("same-origin"),
    );
    if body.truncated {
        if let Ok(size) = HeaderValue::from_str(&body.size.to_string()) {
            headers.insert("ferry-body-size", size);
        }
    }
    Ok(response)
}

/// `GET /api/v1/requests/{id}/curl`.
pub fn curl(entry: &Exchange, query: Option<&str>) -> Result<Response<Body>, ApiError> {
    let to = form_urlencoded(query.unwrap_or(""))
        .into_iter()
        .find(|(k, _)| k == "to")
        .map(|(_, v)| v);
    let command = export::curl(entry, to.as_deref()).map_err(|err| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "not_exportable",
            err.to_string(),
        )
    })?;
    let mut response = Response::new(full(command));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    Ok(response)
}

/// A HAR 1.2 document of `entries`.
pub fn har(entries: &[Exchange]) -> Response<Body> {
    let mut response = json(&export::har(entries));
    response.headers_mut().insert(
        header::CONTENT_DISPOSITION,
        HeaderValue::from_static("attachment; filename=\"ferry.har\""),
    );
    response
}

/// `GET /api/v1/requests/har?…`: the entries a list query finds, as HAR.
/// Written one entry at a time, so a page of large bodies never sits in
/// memory whole.
pub(crate) async fn har_list(
    state: &Arc<State>,
    query: ListQuery,
) -> Result<Response<Body>, ApiError> {
    let found = state
        .log
        .list(&query.filter, query.cursor, query.limit, false)
        .await
        .map_err(store_failed)?;
    // HAR lists entries oldest first.
    let mut ids: std::collections::VecDeque<ExchangeId> =
        found.iter().rev().map(|e| e.id).collect();
    let mut head = export::har(&[]);
    head["log"]["entries"] = serde_json::Value::Array(Vec::new());
    let head = serde_json::to_string(&head).unwrap_or_default();
    // `{"log":{…,"entries":[]}}` split around the empty list.
    let Some(at) = head.find("[]") else {
        return Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "export_failed",
            "the HAR document could not be built",
        ));
    };
    let (opening, closing) = (head[..at + 1].to_owned(), head[at + 1..].to_owned());
    let log = Arc::clone(&state.log);
    let owner = query.filter.owner;
    let parts = futures_util::stream::unfold((0usize, false), move |(sent, done)| {
        let log = Arc::clone(&log);
        let owner = owner.clone();
        // The opening takes no entry.
        let next = if sent > 0 && !done {
            ids.pop_front()
        } else {
            None
        };
        let (opening, closing) = (opening.clone(), closing.clone());
        async move {
            if done {
                return None;
            }
            if sent == 0 {
                return Some((Bytes::from(opening), (1, false)));
            }
            let Some(id) = next else {
                return Some((Bytes::from(closing), (sent, true)));
            };
            let entry = match log.get(id, owner.as_deref()).await {
                Ok(Some(entry)) => entry,
                // Pruned since the list, or the store failed: the document
                // stays valid without it.
                _ => return Some((Bytes::new(), (sent, false))),
            };
            let json = export::har(std::slice::from_ref(&entry))["log"]["entries"][0].to_string();
            let separator = if sent > 1 { "," } else { "" };
            Some((Bytes::from(format!("{separator}{json}")), (sent + 1, false)))
        }
    });
    let body = StreamBody::new(
        parts
            .map(|chunk| Ok::<_, Infallible>(Frame::data(chunk)))
            .boxed(),
    )
    .map_err(|never: Infallible| match never {})
    .boxed_unsync();
    let mut response = Response::new(body);
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response.headers_mut().insert(
        header::CONTENT_DISPOSITION,
        HeaderValue::from_static("attachment; filename=\"ferry.har\""),
    );
    Ok(response)
}

/// `GET /api/v1/requests/stream`: every new entry that matches, as a
/// server-sent event carrying its list item, with the entry id as the
/// event id. Entries are sent only once committed, in commit order; a
/// reconnect with `Last-Event-ID` resumes right after that entry. The
/// stream ends once `proof` no longer lets its caller in as it did (its
/// token removed, its admin flag taken, its dashboard session ended).
pub(crate) async fn stream(
    state: &Arc<State>,
    peer: std::net::IpAddr,
    filter: Filter,
    last_event_id: Option<&str>,
    proof: Option<Proof>,
) -> Result<Response<Body>, ApiError> {
    // Every commit wakes every feed, which then reads the store: feeds per
    // address are few, so opening many cannot multiply the relay's work.
    let feed = state.live_feeds.acquire(peer).ok_or_else(|| {
        ApiError::too_many(
            format!(
                "this address already has {LIVE_FEEDS_PER_IP} live feeds open: close one first"
            ),
            TAIL_KEEPALIVE,
        )
    })?;
    let start = match last_event_id {
        Some(id) => {
            let id = id.trim().parse::<ExchangeId>().map_err(|_| {
                ApiError::bad_request("Last-Event-ID must be the id of an entry this stream sent")
            })?;
            match state
                .log
                .seq_of(id, filter.owner.as_deref())
                .await
                .map_err(store_failed)?
            {
                Some(seq) => seq,
                None => return Err(not_found(&id.to_string())),
            }
        }
        None => state.log.last_seq().await.map_err(store_failed)?,
    };
    let tail = Tail {
        state: Arc::clone(state),
        filter,
        seq: start,
        committed: state.recorder.committed(),
        pending: std::collections::VecDeque::new(),
        opened: false,
        accounts: state.accounts.changes(),
        proof,
        _feed: feed,
    };
    let events = futures_util::stream::unfold(tail, |mut tail| async move {
        let chunk = tail.next().await?;
        Some((Ok::<_, Infallible>(Frame::data(chunk)), tail))
    });
    let body = StreamBody::new(events.boxed())
        .map_err(|never: Infallible| match never {})
        .boxed_unsync();
    let mut response = Response::new(body);
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(response)
}

/// The state of one live tail.
struct Tail {
    /// The relay, for its log and its shutdown.
    state: Arc<State>,
    /// Which entries.
    filter: Filter,
    /// The last commit position sent or skipped.
    seq: i64,
    /// Changes after each committed batch.
    committed: tokio::sync::watch::Receiver<u64>,
    /// Events read but not yet sent.
    pending: std::collections::VecDeque<Bytes>,
    /// Whether the opening comment went out.
    opened: bool,
    /// Changes when the accounts or the dashboard sessions do.
    accounts: tokio::sync::watch::Receiver<()>,
    /// How the caller proved itself (`None` on an open relay).
    proof: Option<Proof>,
    /// The feed's place among its address's.
    _feed: crate::limits::PerIpGuard,
}

impl Tail {
    /// The next piece of the event stream; `None` ends it (at shutdown,
    /// when the store fails, or once the caller is no longer let in as it
    /// was).
    async fn next(&mut self) -> Option<Bytes> {
        if !self.opened {
            self.opened = true;
            // Sent at once, so the caller knows the stream is live.
            return Some(Bytes::from_static(b": ferry activity log\n\n"));
        }
        loop {
            if self
                .proof
                .as_ref()
                .is_some_and(|proof| !self.state.accounts.holds(proof))
            {
                return None;
            }
            if let Some(event) = self.pending.pop_front() {
                return Some(event);
            }
            // Marks what is committed now before reading, so a commit
            // during the read wakes the wait below.
            self.committed.borrow_and_update();
            let found = match self
                .state
                .log
                .committed_after(&self.filter, self.seq, TAIL_BATCH)
                .await
            {
                Ok(found) => found,
                // A shared database that is down comes back with a commit
                // (the follower of other relays' commits signals one when
                // it reconnects): the feed waits for it below.
                Err(err) if err.is_unavailable() => Vec::new(),
                Err(err) => {
                    tracing::warn!(%err, "live tail ended: the log could not be read");
                    return None;
                }
            };
            if let Some(last) = found.last() {
                self.seq = last.seq;
                for logged in &found {
                    let data = serde_json::to_string(&item(&logged.exchange)).ok()?;
                    self.pending.push_back(Bytes::from(format!(
                        "id: {}\nevent: request\ndata: {data}\n\n",
                        logged.exchange.id
                    )));
                }
                if found.len() == TAIL_BATCH || !self.pending.is_empty() {
                    continue;
                }
            }
            // Only a commit reads the store again; a change in the
            // accounts only re-checks the caller, so waking feeds costs no
            // query.
            let keepalive = tokio::time::Instant::now() + TAIL_KEEPALIVE;
            loop {
                tokio::select! {
                    changed = self.committed.changed() => {
                        changed.ok()?;
                        break;
                    }
                    changed = self.accounts.changed() => {
                        changed.ok()?;
                        if self
                            .proof
                            .as_ref()
                            .is_some_and(|proof| !self.state.accounts.holds(proof))
                        {
                            return None;
                        }
                    }
                    () = tokio::time::sleep_until(keepalive) => return Some(Bytes::from_static(b": keepalive\n\n")),
                    () = self.state.shutdown.cancelled() => return None,
                }
            }
        }
    }
}
