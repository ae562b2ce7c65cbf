//! Replay: a captured request sent again, as is or edited, through its
//! tunnel or to a URL (through the egress guard), and logged as a new
//! entry that points back at the original.

use std::net::{IpAddr, Ipv4Addr};
use std::str::FromStr;
use std::sync::Arc;

use base64::Engine;
use bytes::Bytes;
use ferry_common::api::{ReplayAnswer, ReplayRequest};
use ferry_common::handshake::meta::{self, RequestMeta};
use ferry_common::headers::{remove_ferry_headers, remove_hop_by_hop};
use ferry_common::ids::ExchangeId;
use http_body_util::BodyExt;
use hyper::header::{self, HeaderName, HeaderValue};
use hyper::{HeaderMap, Method, Request, StatusCode, Uri};

use crate::activity::capture::{headers_of, Capture, Side};
use crate::api::ApiError;
use crate::body::BodyError;
use crate::egress::EgressError;
use crate::store::{now_micros, CapturedBody, Exchange, Kind, Outcome};
use crate::tunnels::SendError;
use crate::{full, State};

/// The largest body an edit may carry.
pub const MAX_EDIT_BODY: usize = 10 * 1024 * 1024;

/// What the edits make of the captured request.
struct Prepared {
    /// The method.
    method: Method,
    /// The path and query.
    path: String,
    /// The header fields, without hop-by-hop and length fields.
    headers: HeaderMap,
    /// The body.
    body: Bytes,
}

fn prepare(original: &Exchange, edits: &ReplayRequest) -> Result<Prepared, ApiError> {
    let method = match &edits.method {
        Some(method) => Method::from_str(&method.to_ascii_uppercase())
            .ok()
            .filter(|m| m != Method::CONNECT)
            .ok_or_else(|| {
                ApiError::bad_request(format!(
                    "`{method}` is not a method to replay with: use GET, POST, PUT, PATCH, DELETE …"
                ))
            })?,
        None => Method::from_str(&original.method)
            .map_err(|_| ApiError::bad_request("the captured method cannot be sent again"))?,
    };
    let path = edits
        .path
        .clone()
        .unwrap_or_else(|| original.path().to_owned());
    if !path.starts_with('/') || path.parse::<http::uri::PathAndQuery>().is_err() {
        return Err(ApiError::bad_request(format!(
            "`path` must start with / and be a valid path and query, such as /hooks?id=1, not `{path}`"
        )));
    }
    let mut headers = HeaderMap::new();
    for field in &original.request_headers {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(field.name.as_bytes()),
            HeaderValue::from_bytes(&field.value),
        ) {
            headers.append(name, value);
        }
    }
    // What the caller claimed about its origin was dropped on the way in;
    // the log keeps it as sent, and a replay must not send it on as if a
    // proxy had vouched for it. An edit may still set such a field.
    crate::ingress::remove_forwarding_headers(&mut headers);
    for (name, value) in edits.headers.iter().flatten() {
        let name = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| ApiError::bad_request(format!("`{name}` is not a valid header name")))?;
        headers.remove(&name);
        if let Some(value) = value {
            let value = HeaderValue::from_str(value).map_err(|_| {
                ApiError::bad_request(format!(
                    "the value for `{name}` is not a valid header value (no line breaks or control characters)"
                ))
            })?;
            headers.insert(name, value);
        }
    }
    remove_hop_by_hop(&mut headers);
    remove_ferry_headers(&mut headers);
    for name in [
        header::HOST,
        header::CONTENT_LENGTH,
        header::TRANSFER_ENCODING,
    ] {
        headers.remove(name);
    }
    let body = match (&edits.body, &edits.body_base64) {
        (Some(_), Some(_)) => {
            return Err(ApiError::bad_request(
                "send `body` or `body_base64`, not both",
            ))
        }
        (Some(text), None) => Bytes::from(text.clone()),
        (None, Some(encoded)) => Bytes::from(
            base64::engine::general_purpose::STANDARD
                .decode(encoded)
                .map_err(|err| ApiError::bad_request(format!("`body_base64` is not base64: {err}")))?,
        ),
        (None, None) if original.request_body.truncated => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "body_truncated",
                format!(
                    "the captured body was cut at {} of {} bytes, so it cannot be sent again exactly: send the body with `body` or `body_base64`",
                    original.request_body.bytes.len(),
                    original.request_body.size
                ),
            ))
        }
        (None, None) => original.request_body.bytes.clone(),
    };
    if body.len() > MAX_EDIT_BODY {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("a replayed body may hold at most {MAX_EDIT_BODY} bytes"),
        ));
    }
    Ok(Prepared {
        method,
        path,
        headers,
        body,
    })
}

/// Where a replay goes.
enum Destination {
    /// Through the tunnel that serves the original's name.
    Tunnel(Arc<crate::tunnels::Tunnel>),
    /// To this base URL, through the egress guard.
    Url(Uri),
}

fn destination(
    state: &State,
    original: &Exchange,
    target: Option<&str>,
) -> Result<Destination, ApiError> {
    if let Some(target) = target {
        let uri = Uri::from_str(target).ok().filter(|uri| {
            matches!(uri.scheme_str(), Some("http" | "https")) && uri.authority().is_some()
        });
        return uri.map(Destination::Url).ok_or_else(|| {
            ApiError::bad_request(format!(
                "`target` must be an absolute http(s) URL such as http://localhost:3000, not `{}`",
                target.chars().take(200).collect::<String>()
            ))
        });
    }
    // A delivery attempt to a URL is sent to that URL again, through the
    // egress guard.
    if original.kind == Kind::Dispatch && original.tunnel.is_empty() {
        return Uri::from_str(&original.url)
            .map(Destination::Url)
            .map_err(|_| ApiError::bad_request("the delivery's URL cannot be sent to again"));
    }
    let offline = || {
        ApiError::new(
            StatusCode::CONFLICT,
            "tunnel_offline",
            format!(
                "the tunnel {} is not connected under your account now: start `ferry http` with --subdomain {}, or replay to a URL with {{\"target\": URL}}",
                original.tunnel, original.tunnel
            ),
        )
    };
    let name = original.tunnel.parse().map_err(|_| offline())?;
    let tunnel = state.tunnels.get(&name).ok_or_else(offline)?;
    if tunnel.owner.key() != original.owner {
        return Err(offline());
    }
    Ok(Destination::Tunnel(tunnel))
}

/// Sends `original` again with `edits` and waits for the whole response,
/// which the new entry records.
pub(crate) async fn replay(
    state: &Arc<State>,
    original: &Exchange,
    edits: &ReplayRequest,
) -> Result<ReplayAnswer, ApiError> {
    let prepared = prepare(original, edits)?;
    let destination = destination(state, original, edits.target.as_deref())?;
    let (base, http_version) = match &destination {
        Destination::Tunnel(_) => {
            let rest = original.url.split_once("://").map_or("", |(_, r)| r);
            let scheme = original.url.split_once("://").map_or("http", |(s, _)| s);
            let host = rest.split('/').next().unwrap_or_default();
            (format!("{scheme}://{host}"), "HTTP/2.0")
        }
        Destination::Url(uri) => (
            format!(
                "{}://{}",
                uri.scheme_str().unwrap_or("http"),
                uri.authority().map_or("", |a| a.as_str())
            ),
            "HTTP/1.1",
        ),
    };
    let url = format!("{base}{}", prepared.path);
    let uri = Uri::from_str(&url).map_err(|_| {
        ApiError::bad_request(format!("`{url}` is not a URL the relay can send to"))
    })?;
    let id = ExchangeId::new();
    let capture = Capture::new(
        &state.recorder,
        Exchange {
            id,
            tunnel: original.tunnel.clone(),
            owner: original.owner.clone(),
            kind: Kind::Replay,
            replay_of: Some(original.id),
            received_at: now_micros(),
            method: prepared.method.to_string(),
            url,
            http_version: http_version.to_owned(),
            remote_addr: "replay".to_owned(),
            request_headers: headers_of(&prepared.headers),
            request_body: CapturedBody::default(),
            response: None,
            responded_at: None,
            done_at: None,
            // Until an answer is recorded, the API caller is the one who
            // left.
            outcome: Outcome::CallerHungUp,
            error: None,
            incomplete: false,
            replayed_at: None,
            dispatch: None,
        },
    );
    let mut request = Request::new(
        capture
            .tap(full(prepared.body), Side::Request)
            .boxed_unsync(),
    );
    *request.method_mut() = prepared.method;
    *request.uri_mut() = uri;
    *request.headers_mut() = prepared.headers;
    let timeout = state.config.request_timeout;
    let via_tunnel = matches!(destination, Destination::Tunnel(_));
    let sent = match destination {
        Destination::Tunnel(tunnel) => match tunnel.admit(IpAddr::V4(Ipv4Addr::UNSPECIFIED)) {
            Ok(admission) => {
                let meta = RequestMeta {
                    exchange: id,
                    client_ip: original
                        .remote_addr
                        .parse::<std::net::SocketAddr>()
                        .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |a| a.ip()),
                    https: original.url.starts_with("https:"),
                };
                tunnel
                    .send(request, &meta, timeout)
                    .await
                    .map(|response| (response, Some(admission)))
                    .map_err(|err| failure_of_send(&err))
            }
            Err(err) => Err(failure_of_send(&err)),
        },
        Destination::Url(_) => state
            .egress
            .send(request, timeout)
            .await
            .map(|response| (response, None))
            .map_err(|err| failure_of_egress(&err)),
    };
    let (response, _admission) = match sent {
        Ok(sent) => sent,
        Err((outcome, status, message)) => {
            capture.failed(outcome, message.clone(), None);
            return Err(ApiError::new(
                status,
                outcome.as_str(),
                format!("{message} (logged as {id})"),
            ));
        }
    };
    let deadline = tokio::time::Instant::now() + timeout;
    let (parts, outcome, error) = record_response(&capture, response, deadline, via_tunnel).await;
    Ok(ReplayAnswer {
        id: id.to_string(),
        replay_of: original.id.to_string(),
        status: Some(parts.status.as_u16()),
        outcome: if error.is_some() && outcome == Outcome::Answered {
            Outcome::Failed.as_str().to_owned()
        } else {
            outcome.as_str().to_owned()
        },
        error,
    })
}

/// Records `response`'s head on `capture` and reads its body to the end
/// (captured as it passes) by `deadline`. Returns the head, the outcome
/// (which a Ferry client reports in a header the relay strips; any other
/// server's header of that name is its own, kept and not believed), and
/// what went wrong reading.
pub(crate) async fn record_response(
    capture: &Arc<Capture>,
    response: hyper::Response<hyper::body::Incoming>,
    deadline: tokio::time::Instant,
    from_client: bool,
) -> (http::response::Parts, Outcome, Option<String>) {
    let (mut parts, body) = response.into_parts();
    let reported = if from_client {
        parts.headers.remove(meta::OUTCOME)
    } else {
        None
    };
    let outcome = reported
        .and_then(|v| v.to_str().ok().and_then(|v| v.parse().ok()))
        .unwrap_or(Outcome::Answered);
    capture.responded(parts.status.as_u16(), &parts.headers, outcome);
    let mut body = capture.tap(body.map_err(BodyError::Tunnel), Side::Response);
    let read = tokio::time::timeout_at(deadline, async {
        while let Some(frame) = body.frame().await {
            frame?;
        }
        Ok::<(), BodyError>(())
    })
    .await;
    drop(body);
    let error = match read {
        Ok(Ok(())) => None,
        Ok(Err(err)) => Some(format!("the response body failed: {err}")),
        Err(_) => {
            let message = "the response body did not end in time".to_owned();
            capture.failed(Outcome::TargetTimeout, message.clone(), None);
            Some(message)
        }
    };
    (parts, outcome, error)
}

/// The outcome, API status and message of a failed send into a tunnel.
pub(crate) fn failure_of_send(err: &SendError) -> (Outcome, StatusCode, String) {
    let (outcome, status) = match err {
        SendError::Busy(..)
        | SendError::CallerBusy(..)
        | SendError::RateLimited(..)
        | SendError::HeadersTooLarge(_) => (Outcome::RelayLimit, StatusCode::SERVICE_UNAVAILABLE),
        SendError::Timeout(..) => (Outcome::TargetTimeout, StatusCode::GATEWAY_TIMEOUT),
        SendError::NotConnected(_) => (Outcome::ClientOffline, StatusCode::CONFLICT),
        SendError::Gone(..) | SendError::Refused(..) => (Outcome::Failed, StatusCode::BAD_GATEWAY),
    };
    (outcome, status, err.to_string())
}

/// The outcome, API status and message of a failed send to a URL.
pub(crate) fn failure_of_egress(err: &EgressError) -> (Outcome, StatusCode, String) {
    let (outcome, status) = match err {
        EgressError::Refused { .. } | EgressError::BadUrl(_) => {
            (Outcome::EgressRefused, StatusCode::FORBIDDEN)
        }
        EgressError::Timeout(..) => (Outcome::TargetTimeout, StatusCode::GATEWAY_TIMEOUT),
        EgressError::Connect(..) => (Outcome::TargetUnreachable, StatusCode::BAD_GATEWAY),
        _ => (Outcome::Failed, StatusCode::BAD_GATEWAY),
    };
    (outcome, status, err.to_string())
}
