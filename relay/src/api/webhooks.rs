//! `/api/v1/webhooks…`, `/api/v1/deliveries…`, `/api/v1/event-types` and
//! `/api/v1/events`: the dispatcher's API. Each webhook belongs to the
//! account that created it; another account's ids are 404s.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::time::Duration;

use ferry_common::api::{
    AttemptView, DeliveryPage, DeliveryView, EventAccepted, EventInput, EventTypeInput,
    EventTypeList, EventTypeView, Recovered, TestEventInput, WebhookInput, WebhookList,
    WebhookView,
};
use hyper::header::{HeaderName, HeaderValue};
use hyper::{Response, StatusCode, Uri};

use super::requests::{form_urlencoded, rfc3339, time_filter};
use super::{json, ApiError};
use crate::dispatch::{catalogue, may_use, sign, Dispatcher, Target, RESERVED_HEADERS};
use crate::store::{
    AttemptRecord, DeliveryRecord, DeliveryState, Enqueued, EventTypeRecord, NewEvent, StoreError,
    WebhookRecord,
};
use crate::{full, Body};

/// Webhooks one account may have.
pub const MAX_WEBHOOKS: usize = 200;
/// Event types one account may add.
pub const MAX_EVENT_TYPES: usize = 200;
/// The largest event payload, as sent (`data` inside the envelope).
pub const MAX_EVENT_BODY: usize = 1024 * 1024;
/// The largest `POST /api/v1/events` body: the payload and room for the
/// rest of the call.
pub const MAX_EVENT_REQUEST: usize = MAX_EVENT_BODY + 64 * 1024;
/// The largest body of the calls that change settings (webhooks, event
/// types, test events).
pub const MAX_SETTINGS_BODY: usize = 256 * 1024;
/// The longest webhook name.
const MAX_NAME: usize = 200;
/// The longest webhook URL.
const MAX_URL: usize = 2048;
/// Custom headers one webhook may add.
const MAX_HEADERS: usize = 32;
/// Bytes a webhook's custom headers may total, names and values: well
/// inside what a tunnel carries with the dispatcher's own.
const MAX_HEADER_BYTES: usize = 16 * 1024;
/// Event types or wildcards one webhook may list.
const MAX_ACTIONS: usize = 100;
/// The longest sender-chosen event id.
const MAX_EVENT_ID: usize = 256;
/// The longest event type description.
const MAX_DESCRIPTION: usize = 1000;
/// The largest example payload of an added event type.
const MAX_EXAMPLE: usize = 64 * 1024;
/// Deliveries per page unless the caller asks for fewer.
const DEFAULT_PAGE: usize = 50;
/// The most deliveries a page holds.
const MAX_PAGE: usize = 200;

/// The methods a webhook may deliver with.
const METHODS: &[&str] = &["POST", "PUT", "PATCH", "GET", "DELETE"];

fn store_failed(err: StoreError) -> ApiError {
    tracing::warn!(%err, "dispatcher store failed");
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "store_unavailable",
        "the webhook store cannot be used right now; nothing was changed; try again shortly",
    )
}

fn invalid(code: &'static str, message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, code, message)
}

/// A 404 for a `what` (webhook, delivery) that is not the caller's, or not
/// at all, saying where the caller's are listed.
fn not_found(what: &str, id: &str, listed: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!(
            "no {what} `{}` of yours: {listed}",
            id.chars().take(64).collect::<String>()
        ),
    )
}

fn webhook_not_found(id: &str) -> ApiError {
    not_found("webhook", id, "list them with GET /api/v1/webhooks")
}

fn delivery_not_found(id: &str) -> ApiError {
    not_found(
        "delivery",
        id,
        "a webhook's deliveries are at GET /api/v1/webhooks/ID/deliveries",
    )
}

/// A 409 for sending through a disabled webhook.
fn disabled(webhook: &WebhookRecord) -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "webhook_disabled",
        format!(
            "the webhook {} is disabled{}: enable it first with PUT {{\"enabled\": true}}",
            webhook.id,
            webhook
                .disabled_reason
                .as_deref()
                .map(|r| format!(" ({r})"))
                .unwrap_or_default()
        ),
    )
}

fn with_status(mut response: Response<Body>, status: StatusCode) -> Response<Body> {
    *response.status_mut() = status;
    response
}

/// A webhook as the API shows it.
pub fn view(webhook: &WebhookRecord, last: Option<DeliveryState>, now: i64) -> WebhookView {
    WebhookView {
        id: webhook.id.clone(),
        name: webhook.name.clone(),
        method: webhook.method.clone(),
        url: webhook.url.clone(),
        actions: webhook.actions.clone(),
        headers: webhook.headers.iter().cloned().collect(),
        enabled: webhook.enabled,
        ordered: webhook.ordered,
        secret: webhook.secret.clone(),
        previous_secret_until: webhook
            .previous_secret
            .as_ref()
            .filter(|(_, until)| *until > now)
            .map(|(_, until)| rfc3339(*until)),
        disabled_reason: webhook.disabled_reason.clone(),
        failing_since: webhook.failing_since.map(rfc3339),
        last_delivery: last.map(|s| s.as_str().to_owned()),
        created_at: rfc3339(webhook.created_at),
        updated_at: rfc3339(webhook.updated_at),
    }
}

fn attempt_view(attempt: &AttemptRecord) -> AttemptView {
    AttemptView {
        number: attempt.number,
        at: rfc3339(attempt.at),
        status: attempt.status,
        error: attempt.error.clone(),
        duration_ms: attempt.duration_ms,
        request_id: attempt.exchange.to_string(),
    }
}

fn delivery_view(delivery: &DeliveryRecord, attempts: &[AttemptRecord]) -> DeliveryView {
    DeliveryView {
        id: delivery.id.clone(),
        webhook_id: delivery.webhook.clone(),
        event_id: delivery.event.clone(),
        event_type: delivery.kind.clone(),
        state: delivery.state.as_str().to_owned(),
        attempts: delivery.attempts,
        next_attempt_at: (delivery.state == DeliveryState::Pending)
            .then(|| rfc3339(delivery.next_at)),
        last_error: delivery.last_error.clone(),
        last_status: delivery.last_status,
        created_at: rfc3339(delivery.created_at),
        attempt_log: attempts.iter().map(attempt_view).collect(),
    }
}

/// The event types `owner` may use: the catalogue and its own.
async fn event_types(
    dispatcher: &Dispatcher,
    owner: Option<&str>,
) -> Result<Vec<EventTypeView>, ApiError> {
    let added = dispatcher
        .store()
        .event_types(owner)
        .await
        .map_err(store_failed)?;
    Ok(dispatcher.catalogue().all(&added))
}

/// Checks a webhook's fields after `input` was applied to `webhook`.
async fn apply(
    dispatcher: &Dispatcher,
    owner: Option<&str>,
    webhook: &mut WebhookRecord,
    input: WebhookInput,
) -> Result<(), ApiError> {
    if let Some(name) = input.name {
        let name = name.trim().to_owned();
        if name.is_empty() || name.chars().count() > MAX_NAME || name.chars().any(char::is_control)
        {
            return Err(invalid(
                "invalid_name",
                format!("`name` must be 1 to {MAX_NAME} characters without control characters"),
            ));
        }
        webhook.name = name;
    }
    if let Some(method) = input.method {
        let upper = method.to_ascii_uppercase();
        if !METHODS.contains(&upper.as_str()) {
            return Err(invalid(
                "invalid_method",
                format!(
                    "`{}` is not a method webhooks use: use one of {}",
                    method.chars().take(32).collect::<String>(),
                    METHODS.join(", ")
                ),
            ));
        }
        webhook.method = upper;
    }
    if let Some(url) = input.url {
        webhook.url = check_url(dispatcher, owner, &url)?;
    }
    if let Some(actions) = input.actions {
        if actions.len() > MAX_ACTIONS {
            return Err(invalid(
                "unknown_action",
                format!("a webhook may list at most {MAX_ACTIONS} actions; use a wildcard such as `document.*` or `*`"),
            ));
        }
        let mut unique: Vec<String> = Vec::new();
        for action in actions {
            let action = action.trim().to_owned();
            if !unique.contains(&action) {
                unique.push(action);
            }
        }
        let types = event_types(dispatcher, owner).await?;
        catalogue::check_actions(&unique, &types).map_err(|m| invalid("unknown_action", m))?;
        webhook.actions = unique;
    }
    if let Some(headers) = input.headers {
        webhook.headers = check_headers(headers)?;
    }
    if let Some(enabled) = input.enabled {
        if enabled && !webhook.enabled {
            webhook.disabled_reason = None;
            webhook.failing_since = None;
        }
        webhook.enabled = enabled;
    }
    if let Some(ordered) = input.ordered {
        webhook.ordered = ordered;
    }
    if let Some(secret) = input.secret {
        sign::key_of(&secret).map_err(|m| invalid("invalid_secret", m))?;
        webhook.secret = secret;
    }
    Ok(())
}

fn check_url(dispatcher: &Dispatcher, owner: Option<&str>, url: &str) -> Result<String, ApiError> {
    let bad = || {
        invalid(
            "invalid_url",
            format!(
                "`url` must be an absolute http or https URL such as https://example.com/hooks, at most {MAX_URL} characters, not `{}`",
                url.chars().take(200).collect::<String>()
            ),
        )
    };
    if url.len() > MAX_URL {
        return Err(bad());
    }
    let uri = Uri::from_str(url).map_err(|_| bad())?;
    let authority = uri.authority().ok_or_else(bad)?;
    if !matches!(uri.scheme_str(), Some("http" | "https"))
        || authority.as_str().contains('@')
        || uri.host().is_none_or(str::is_empty)
    {
        return Err(bad());
    }
    let host = uri.host().unwrap_or_default().trim_end_matches('.');
    if host.eq_ignore_ascii_case(dispatcher.domain()) {
        return Err(invalid(
            "invalid_url",
            "`url` points at this relay's own API: point it at your receiver, or at a tunnel (NAME.DOMAIN)",
        ));
    }
    if let Target::Tunnel(name) = dispatcher.target_of(&uri) {
        let mine = dispatcher
            .tunnel_owner(&name)
            .is_some_and(|holder| may_use(owner.unwrap_or_default(), &holder));
        if !mine {
            return Err(invalid(
                "tunnel_not_yours",
                format!("the tunnel {name} is not yours: a webhook may point at a tunnel on this relay only while its owner's client serves or holds it; start `ferry http --subdomain {name}` with your token first"),
            ));
        }
    }
    Ok(url.to_owned())
}

fn check_headers(headers: BTreeMap<String, String>) -> Result<Vec<(String, String)>, ApiError> {
    let bytes: usize = headers.iter().map(|(n, v)| n.len() + v.len()).sum();
    if headers.len() > MAX_HEADERS || bytes > MAX_HEADER_BYTES {
        return Err(invalid(
            "invalid_headers",
            format!(
                "a webhook may add at most {MAX_HEADERS} headers of {} KiB in all",
                MAX_HEADER_BYTES >> 10
            ),
        ));
    }
    let mut checked = Vec::with_capacity(headers.len());
    for (name, value) in headers {
        let shown = name.chars().take(64).collect::<String>();
        let parsed = HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
            invalid(
                "invalid_headers",
                format!("`{shown}` is not a valid header name: use letters, digits and -"),
            )
        })?;
        if RESERVED_HEADERS.contains(&parsed.as_str()) {
            return Err(invalid(
                "invalid_headers",
                format!(
                    "`{shown}` is set by the dispatcher itself and may not be replaced; reserved: {}",
                    RESERVED_HEADERS.join(", ")
                ),
            ));
        }
        HeaderValue::from_str(&value).map_err(|_| {
            invalid(
                "invalid_headers",
                format!("the value of `{shown}` is not a valid header value (no line breaks or control characters)"),
            )
        })?;
        if checked.iter().any(|(n, _)| n == parsed.as_str()) {
            return Err(invalid(
                "invalid_headers",
                format!("`{shown}` is given twice (header names are case-insensitive)"),
            ));
        }
        checked.push((parsed.as_str().to_owned(), value));
    }
    Ok(checked)
}

/// `GET /api/v1/webhooks`.
pub(crate) async fn list(
    dispatcher: &Dispatcher,
    owner: Option<&str>,
) -> Result<Response<Body>, ApiError> {
    let now = dispatcher.now();
    let webhooks = dispatcher
        .store()
        .webhooks(owner)
        .await
        .map_err(store_failed)?;
    Ok(json(&WebhookList {
        items: webhooks
            .iter()
            .map(|(w, last)| view(w, *last, now))
            .collect(),
    }))
}

/// `POST /api/v1/webhooks`.
pub(crate) async fn create(
    dispatcher: &Dispatcher,
    owner: Option<&str>,
    input: WebhookInput,
) -> Result<Response<Body>, ApiError> {
    for (field, missing) in [
        ("name", input.name.is_none()),
        ("url", input.url.is_none()),
        ("actions", input.actions.is_none()),
    ] {
        if missing {
            return Err(invalid(
                "missing_field",
                format!("a new webhook needs `{field}`: send name, url and actions (method, headers, enabled, ordered and secret are optional)"),
            ));
        }
    }
    let _adding = dispatcher.adding().await;
    let existing = dispatcher
        .store()
        .webhooks(Some(owner.unwrap_or_default()))
        .await
        .map_err(store_failed)?;
    if existing.len() >= MAX_WEBHOOKS {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "too_many_webhooks",
            format!("an account may have at most {MAX_WEBHOOKS} webhooks: delete one first"),
        ));
    }
    let now = dispatcher.now();
    let secret = match &input.secret {
        Some(_) => String::new(),
        None => sign::generate()
            .map_err(|m| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "no_randomness", m))?,
    };
    let mut webhook = WebhookRecord {
        id: format!("wh_{}", uuid::Uuid::now_v7().simple()),
        owner: owner.unwrap_or_default().to_owned(),
        name: String::new(),
        method: "POST".to_owned(),
        url: String::new(),
        actions: Vec::new(),
        headers: Vec::new(),
        enabled: true,
        ordered: false,
        secret,
        previous_secret: None,
        disabled_reason: None,
        failing_since: None,
        created_at: now,
        updated_at: now,
    };
    apply(dispatcher, owner, &mut webhook, input).await?;
    dispatcher
        .store()
        .save_webhook(webhook.clone())
        .await
        .map_err(store_failed)?;
    Ok(with_status(
        json(&view(&webhook, None, now)),
        StatusCode::CREATED,
    ))
}

/// The webhook `id` that `owner` may see.
async fn webhook(
    dispatcher: &Dispatcher,
    id: &str,
    owner: Option<&str>,
) -> Result<WebhookRecord, ApiError> {
    dispatcher
        .store()
        .webhook(id, owner)
        .await
        .map_err(store_failed)?
        .ok_or_else(|| webhook_not_found(id))
}

/// The state of `webhook`'s latest delivery, which its view shows alone as
/// in the list.
async fn last_state(
    dispatcher: &Dispatcher,
    webhook: &str,
) -> Result<Option<DeliveryState>, ApiError> {
    let latest = dispatcher
        .store()
        .deliveries(webhook, None, None, 1)
        .await
        .map_err(store_failed)?;
    Ok(latest.first().map(|(delivery, _)| delivery.state))
}

/// `GET /api/v1/webhooks/{id}`.
pub(crate) async fn get(
    dispatcher: &Dispatcher,
    id: &str,
    owner: Option<&str>,
) -> Result<Response<Body>, ApiError> {
    let found = webhook(dispatcher, id, owner).await?;
    let last = last_state(dispatcher, &found.id).await?;
    Ok(json(&view(&found, last, dispatcher.now())))
}

/// `PUT /api/v1/webhooks/{id}`: fields left out keep their value.
pub(crate) async fn update(
    dispatcher: &Dispatcher,
    id: &str,
    owner: Option<&str>,
    input: WebhookInput,
) -> Result<Response<Body>, ApiError> {
    let mut found = webhook(dispatcher, id, owner).await?;
    let was_enabled = found.enabled;
    // Read before the write, so that a failed read leaves nothing changed.
    let last = last_state(dispatcher, &found.id).await?;
    apply(dispatcher, owner, &mut found, input).await?;
    found.updated_at = dispatcher.now();
    dispatcher
        .store()
        .save_webhook(found.clone())
        .await
        .map_err(store_failed)?;
    // A webhook its owner turned off sends nothing more, queued or not.
    if was_enabled && !found.enabled {
        dispatcher
            .store()
            .fail_pending(&found.id, "not sent: the webhook was disabled by its owner")
            .await
            .map_err(store_failed)?;
    }
    dispatcher.poke();
    Ok(json(&view(&found, last, found.updated_at)))
}

/// `DELETE /api/v1/webhooks/{id}`: the webhook and its queue.
pub(crate) async fn delete(
    dispatcher: &Dispatcher,
    id: &str,
    owner: Option<&str>,
) -> Result<Response<Body>, ApiError> {
    let deleted = dispatcher
        .store()
        .delete_webhook(id, owner)
        .await
        .map_err(store_failed)?;
    if !deleted {
        return Err(webhook_not_found(id));
    }
    Ok(with_status(Response::new(full("")), StatusCode::NO_CONTENT))
}

/// `POST /api/v1/webhooks/{id}/rotate-secret`: a new secret; the old one
/// signs too for a day, so receivers can switch without losing a delivery.
pub(crate) async fn rotate(
    dispatcher: &Dispatcher,
    id: &str,
    owner: Option<&str>,
) -> Result<Response<Body>, ApiError> {
    let mut found = webhook(dispatcher, id, owner).await?;
    let last = last_state(dispatcher, &found.id).await?;
    let now = dispatcher.now();
    let secret = sign::generate()
        .map_err(|m| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "no_randomness", m))?;
    let overlap = i64::try_from(crate::dispatch::ROTATION_OVERLAP.as_micros()).unwrap_or(0);
    found.previous_secret = Some((std::mem::replace(&mut found.secret, secret), now + overlap));
    found.updated_at = now;
    dispatcher
        .store()
        .save_webhook(found.clone())
        .await
        .map_err(store_failed)?;
    Ok(json(&view(&found, last, now)))
}

/// The body every delivery of an event carries.
fn envelope(kind: &str, at: i64, data: &serde_json::Value) -> Result<bytes::Bytes, ApiError> {
    let timestamp = humantime::format_rfc3339_millis(
        std::time::UNIX_EPOCH + Duration::from_micros(u64::try_from(at).unwrap_or(0)),
    )
    .to_string();
    let body = serde_json::to_vec(&serde_json::json!({
        "type": kind,
        "timestamp": timestamp,
        "data": data,
    }))
    .map_err(|err| ApiError::bad_request(format!("the event cannot be encoded: {err}")))?;
    if body.len() > MAX_EVENT_BODY {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "event_too_large",
            format!(
                "an event's delivery body may hold at most {} KiB; this one holds {} KiB: send an id and let the receiver fetch the rest",
                MAX_EVENT_BODY >> 10,
                body.len() >> 10
            ),
        ));
    }
    Ok(bytes::Bytes::from(body))
}

async fn queue(dispatcher: &Dispatcher, event: NewEvent) -> Result<Response<Body>, ApiError> {
    let (id, owner) = (event.id.clone(), event.owner.clone());
    let dedup = i64::try_from(crate::dispatch::DEDUP_WINDOW.as_micros()).unwrap_or(0);
    let enqueued = dispatcher
        .store()
        .enqueue(event, dedup)
        .await
        .map_err(store_failed)?;
    let (queued, duplicate) = match enqueued {
        Enqueued::Queued(n) => (n, false),
        Enqueued::Duplicate => (0, true),
    };
    dispatcher.queued(&owner, u64::try_from(queued).unwrap_or(u64::MAX));
    if queued > 0 {
        dispatcher.poke();
    }
    Ok(with_status(
        json(&EventAccepted {
            id,
            queued,
            duplicate,
        }),
        StatusCode::ACCEPTED,
    ))
}

/// A 429 while `owner` has as many pending deliveries as it may.
async fn full_queue(dispatcher: &Dispatcher, owner: Option<&str>) -> Result<(), ApiError> {
    dispatcher
        .pending_room(owner.unwrap_or_default())
        .await
        .map_err(|count| {
            ApiError::too_many(
                format!(
                    "{count} deliveries of yours are pending, as many as this relay queues per account: they drain as your receivers answer (see GET /api/v1/webhooks/ID/deliveries?state=pending)"
                ),
                Duration::from_secs(30),
            )
        })
}

/// A 422 for an event type that is not in `types`, listing them.
fn unknown_type(kind: &str, types: &[EventTypeView]) -> ApiError {
    invalid(
        "unknown_event_type",
        catalogue::known(
            &format!(
                "`{}` is not a known event type",
                kind.chars().take(128).collect::<String>()
            ),
            types,
        ),
    )
}

/// `POST /api/v1/events`: answers once every delivery is stored.
pub(crate) async fn send_event(
    dispatcher: &Dispatcher,
    owner: Option<&str>,
    input: EventInput,
) -> Result<Response<Body>, ApiError> {
    let types = event_types(dispatcher, owner).await?;
    if !types.iter().any(|t| t.name == input.kind) {
        return Err(unknown_type(&input.kind, &types));
    }
    let id = match input.id {
        Some(id) => {
            if id.is_empty() || id.len() > MAX_EVENT_ID || !id.bytes().all(|b| b.is_ascii_graphic())
            {
                return Err(invalid(
                    "invalid_event_id",
                    format!("an event `id` is 1 to {MAX_EVENT_ID} visible ASCII characters without spaces; leave it out to have one made"),
                ));
            }
            id
        }
        None => format!("evt_{}", uuid::Uuid::now_v7().simple()),
    };
    full_queue(dispatcher, owner).await?;
    let at = dispatcher.now();
    let payload = envelope(&input.kind, at, &input.data)?;
    queue(
        dispatcher,
        NewEvent {
            owner: owner.unwrap_or_default().to_owned(),
            id,
            kind: input.kind,
            payload,
            at,
            only: None,
            max_attempts: dispatcher.settings().schedule.attempts(),
        },
    )
    .await
}

/// `POST /api/v1/webhooks/{id}/test`: the type's example, to this webhook
/// only.
pub(crate) async fn test(
    dispatcher: &Dispatcher,
    id: &str,
    owner: Option<&str>,
    input: TestEventInput,
) -> Result<Response<Body>, ApiError> {
    let found = webhook(dispatcher, id, owner).await?;
    if !found.enabled {
        return Err(disabled(&found));
    }
    let types = event_types(dispatcher, owner).await?;
    let chosen = match &input.kind {
        Some(kind) => types
            .iter()
            .find(|t| &t.name == kind)
            .ok_or_else(|| unknown_type(kind, &types))?,
        None => types
            .iter()
            .find(|t| crate::store::listens_to(&found.actions, &t.name))
            .ok_or_else(|| {
                invalid(
                    "unknown_event_type",
                    "none of the webhook's actions is a known event type: pass {\"type\": …}",
                )
            })?,
    };
    let at = dispatcher.now();
    let payload = envelope(&chosen.name, at, &chosen.example)?;
    queue(
        dispatcher,
        NewEvent {
            owner: found.owner.clone(),
            id: format!("evt_test_{}", uuid::Uuid::now_v7().simple()),
            kind: chosen.name.clone(),
            payload,
            at,
            only: Some(found.id),
            max_attempts: dispatcher.settings().schedule.attempts(),
        },
    )
    .await
}

/// `GET /api/v1/webhooks/{id}/deliveries`: `state`, `before`, `limit`.
pub(crate) async fn deliveries(
    dispatcher: &Dispatcher,
    id: &str,
    owner: Option<&str>,
    query: Option<&str>,
) -> Result<Response<Body>, ApiError> {
    let found = webhook(dispatcher, id, owner).await?;
    let (mut state, mut before, mut limit) = (None, None, DEFAULT_PAGE);
    for (key, value) in form_urlencoded(query.unwrap_or_default()) {
        match key.as_str() {
            "state" => state = Some(value.parse().map_err(ApiError::bad_request)?),
            "before" => {
                before = Some(value.parse::<i64>().map_err(|_| {
                    ApiError::bad_request("`before` is the `next_cursor` of the previous page")
                })?)
            }
            "limit" => {
                limit = value
                    .parse::<usize>()
                    .ok()
                    .filter(|n| (1..=MAX_PAGE).contains(n))
                    .ok_or_else(|| {
                        ApiError::bad_request(format!("`limit` is a number from 1 to {MAX_PAGE}"))
                    })?
            }
            _ => {
                return Err(ApiError::bad_request(format!(
                    "unknown parameter `{key}`: use state, before or limit"
                )))
            }
        }
    }
    let page = dispatcher
        .store()
        .deliveries(&found.id, state, before, limit)
        .await
        .map_err(store_failed)?;
    let next_cursor = (page.len() == limit)
        .then(|| page.last().map(|(d, _)| d.seq.to_string()))
        .flatten();
    Ok(json(&DeliveryPage {
        items: page.iter().map(|(d, a)| delivery_view(d, a)).collect(),
        next_cursor,
    }))
}

/// `POST /api/v1/webhooks/{id}/recover?since=…`.
pub(crate) async fn recover(
    dispatcher: &Dispatcher,
    id: &str,
    owner: Option<&str>,
    query: Option<&str>,
) -> Result<Response<Body>, ApiError> {
    let found = webhook(dispatcher, id, owner).await?;
    if !found.enabled {
        return Err(disabled(&found));
    }
    full_queue(dispatcher, owner).await?;
    let since = form_urlencoded(query.unwrap_or_default())
        .into_iter()
        .find(|(key, _)| key == "since")
        .ok_or_else(|| {
            ApiError::bad_request(
                "say from when with `since`: an RFC 3339 time, or a duration ago such as 6h",
            )
        })?;
    let since = time_filter("since", &since.1)?;
    let queued = dispatcher
        .store()
        .recover(&found.id, since, dispatcher.now())
        .await
        .map_err(store_failed)?;
    if queued > 0 {
        dispatcher.poke();
    }
    Ok(with_status(
        json(&Recovered {
            queued: usize::try_from(queued).unwrap_or(usize::MAX),
        }),
        StatusCode::ACCEPTED,
    ))
}

/// `GET /api/v1/deliveries/{id}`.
pub(crate) async fn delivery(
    dispatcher: &Dispatcher,
    id: &str,
    owner: Option<&str>,
) -> Result<Response<Body>, ApiError> {
    let (found, attempts) = dispatcher
        .store()
        .delivery(id, owner)
        .await
        .map_err(store_failed)?
        .ok_or_else(|| delivery_not_found(id))?;
    Ok(json(&delivery_view(&found, &attempts)))
}

/// `POST /api/v1/deliveries/{id}/resend`: one more attempt, with a fresh
/// timestamp and signature and the same `webhook-id`.
pub(crate) async fn resend(
    dispatcher: &Dispatcher,
    id: &str,
    owner: Option<&str>,
) -> Result<Response<Body>, ApiError> {
    let (before, _) = dispatcher
        .store()
        .delivery(id, owner)
        .await
        .map_err(store_failed)?
        .ok_or_else(|| delivery_not_found(id))?;
    if let Some(hook) = dispatcher
        .store()
        .webhook(&before.webhook, owner)
        .await
        .map_err(store_failed)?
        .filter(|w| !w.enabled)
    {
        return Err(disabled(&hook));
    }
    let queued = dispatcher
        .store()
        .resend(id, owner, dispatcher.now())
        .await
        .map_err(store_failed)?;
    let (found, attempts) = dispatcher
        .store()
        .delivery(id, owner)
        .await
        .map_err(store_failed)?
        .ok_or_else(|| delivery_not_found(id))?;
    if !queued {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "delivery_pending",
            "the delivery is still pending or in flight: its next attempt comes on its own",
        ));
    }
    dispatcher.poke();
    Ok(with_status(
        json(&delivery_view(&found, &attempts)),
        StatusCode::ACCEPTED,
    ))
}

/// `GET /api/v1/event-types`.
pub(crate) async fn list_event_types(
    dispatcher: &Dispatcher,
    owner: Option<&str>,
) -> Result<Response<Body>, ApiError> {
    Ok(json(&EventTypeList {
        items: event_types(dispatcher, owner).await?,
    }))
}

/// `POST /api/v1/event-types`: a type for the caller's account (for the
/// whole relay on a relay without tokens).
pub(crate) async fn add_event_type(
    dispatcher: &Dispatcher,
    owner: Option<&str>,
    input: EventTypeInput,
) -> Result<Response<Body>, ApiError> {
    catalogue::check_name(&input.name).map_err(|m| invalid("invalid_event_type", m))?;
    let description = input.description.trim().to_owned();
    if description.is_empty()
        || description.chars().count() > MAX_DESCRIPTION
        || description.chars().any(char::is_control)
    {
        return Err(invalid(
            "invalid_event_type",
            format!("`description` must be 1 to {MAX_DESCRIPTION} characters without control characters"),
        ));
    }
    let example = input.example.unwrap_or_else(|| serde_json::json!({}));
    let example_text = example.to_string();
    if example_text.len() > MAX_EXAMPLE {
        return Err(invalid(
            "invalid_event_type",
            format!("`example` may hold at most {} KiB", MAX_EXAMPLE >> 10),
        ));
    }
    // The built-in and operator types are the relay's; an account (or an
    // open relay's API caller) may not redefine them.
    if dispatcher
        .catalogue()
        .all(&[])
        .iter()
        .any(|t| t.name == input.name)
    {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "event_type_exists",
            format!("`{}` is already in the relay's catalogue", input.name),
        ));
    }
    let _adding = dispatcher.adding().await;
    let added = dispatcher
        .store()
        .event_types(Some(owner.unwrap_or_default()))
        .await
        .map_err(store_failed)?
        .iter()
        .filter(|t| t.owner == owner.unwrap_or_default())
        .count();
    if added >= MAX_EVENT_TYPES {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "too_many_event_types",
            format!("an account may add at most {MAX_EVENT_TYPES} event types"),
        ));
    }
    dispatcher
        .store()
        .save_event_type(EventTypeRecord {
            owner: owner.unwrap_or_default().to_owned(),
            name: input.name.clone(),
            description: description.clone(),
            example: example_text,
        })
        .await
        .map_err(store_failed)?;
    Ok(with_status(
        json(&EventTypeView {
            name: input.name,
            description,
            example,
            source: if owner.is_some() {
                "account"
            } else {
                "operator"
            }
            .to_owned(),
        }),
        StatusCode::CREATED,
    ))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::check_headers;

    #[test]
    fn custom_headers_may_not_replace_the_signature_or_carry_line_breaks() {
        let one = |name: &str, value: &str| {
            check_headers(BTreeMap::from([(name.to_owned(), value.to_owned())]))
        };
        assert_eq!(
            one("X-Auth", "s3cret").expect("valid"),
            vec![("x-auth".to_owned(), "s3cret".to_owned())]
        );
        assert!(one("webhook-signature", "v1,forged").is_err());
        assert!(one("Webhook-Id", "x").is_err());
        assert!(one("x-auth", "a\r\nb").is_err());
        assert!(one("bad name", "x").is_err());
        assert!(one("x-big", &"a".repeat(17 * 1024)).is_err());
    }
}
