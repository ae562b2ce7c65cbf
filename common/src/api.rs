//! The JSON shapes of the relay's API that both ends read.

use serde::{Deserialize, Serialize};

/// The body of every error the API answers: `{"error": {"code", "message"}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What went wrong.
    pub error: ErrorDetail,
}

/// One API error.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// A stable, machine-readable code such as `name_taken`.
    pub code: String,
    /// A sentence for people that says what to do.
    pub message: String,
}

/// One entry of `GET /api/v1/tunnels`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TunnelInfo {
    /// The subdomain.
    pub name: String,
    /// The URL public callers use.
    pub public_url: String,
    /// Seconds since the Unix epoch when the client connected.
    pub connected_at: u64,
    /// The client's program and version, as it said.
    pub client_version: Option<String>,
    /// The local target the client forwards to, as it said.
    pub target: Option<String>,
    /// Public requests sent to it since the client connected.
    #[serde(default)]
    pub requests: u64,
    /// When the last of them arrived, in seconds since the Unix epoch.
    #[serde(default)]
    pub last_request_at: Option<u64>,
}

/// The answer of `GET /api/v1/tunnels`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TunnelList {
    /// The caller's live tunnels, by name.
    pub tunnels: Vec<TunnelInfo>,
    /// The caller's names held while their client is offline, by name.
    #[serde(default)]
    pub offline: Vec<OfflineTunnel>,
}

/// One entry of `GET /api/v1/requests` and of its live stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestItem {
    /// The exchange id.
    pub id: String,
    /// When the request arrived, RFC 3339 with microseconds.
    pub received_at: String,
    /// The tunnel name.
    pub tunnel: String,
    /// `tunnel` or `replay`.
    pub kind: String,
    /// The request method.
    pub method: String,
    /// The path and query.
    pub path: String,
    /// The response status, if a response began.
    pub status: Option<u16>,
    /// Milliseconds from arrival to the end.
    pub duration_ms: Option<u64>,
    /// Request body bytes, in all.
    pub request_size: u64,
    /// Response body bytes, in all.
    pub response_size: u64,
    /// How it ended: `answered`, `client_offline`, `target_unreachable`,
    /// `target_timeout`, `caller_hung_up`, `relay_limit`,
    /// `egress_refused` or `failed`.
    pub outcome: String,
    /// The exchange this one replays.
    pub replay_of: Option<String>,
    /// For a `dispatch` entry: the delivery attempt it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dispatch: Option<DispatchInfo>,
}

/// What a `dispatch` entry of the activity log was an attempt of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DispatchInfo {
    /// The webhook.
    pub webhook_id: String,
    /// The event.
    pub event_id: String,
    /// The delivery (`msg_…`).
    pub delivery_id: String,
    /// The attempt's number, from 1.
    pub attempt: u32,
}

/// A page of `GET /api/v1/requests`, newest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestPage {
    /// The entries.
    pub items: Vec<RequestItem>,
    /// Pass as `cursor` for the next (older) page; `None` on the last.
    pub next_cursor: Option<String>,
}

/// One header field of a captured message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeaderField {
    /// The name, lowercase.
    pub name: String,
    /// The value as text (invalid UTF-8 replaced).
    pub value: String,
    /// The value's exact bytes, base64, when they are not UTF-8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_base64: Option<String>,
}

/// A body of a captured message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BodyView {
    /// Bytes that passed through, in all.
    pub size: u64,
    /// Bytes kept.
    pub captured: u64,
    /// Whether the kept bytes stop short of `size`.
    pub truncated: bool,
    /// The kept bytes, base64.
    pub base64: String,
    /// The kept bytes as text, when they are UTF-8.
    pub text: Option<String>,
    /// The body decoded from its `content-encoding` (gzip, deflate, br).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decoded: Option<DecodedView>,
}

/// A compressed body, decoded (up to a cap).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DecodedView {
    /// Decoded bytes kept.
    pub size: u64,
    /// The decoded bytes, base64, when they are not UTF-8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base64: Option<String>,
    /// The decoded bytes as text, when they are UTF-8.
    pub text: Option<String>,
    /// The cap was reached (a decompression bomb, or a large body).
    pub truncated: bool,
    /// Why decoding stopped early, if it did.
    pub error: Option<String>,
}

/// The request half of `GET /api/v1/requests/{id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestView {
    /// The method.
    pub method: String,
    /// The full URL as the caller used it.
    pub url: String,
    /// `HTTP/1.1`, `HTTP/2.0` …
    pub http_version: String,
    /// The header fields in order, duplicates kept.
    pub headers: Vec<HeaderField>,
    /// The body.
    pub body: BodyView,
}

/// The response half of `GET /api/v1/requests/{id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResponseView {
    /// The status code.
    pub status: u16,
    /// The header fields in order.
    pub headers: Vec<HeaderField>,
    /// The body.
    pub body: BodyView,
}

/// When the exchange's steps happened, RFC 3339 with microseconds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timings {
    /// The request's headers arrived.
    pub received_at: String,
    /// The response's headers were sent.
    pub responded_at: Option<String>,
    /// The exchange ended.
    pub done_at: Option<String>,
}

/// `GET /api/v1/requests/{id}`: everything captured.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestDetail {
    /// The list fields.
    #[serde(flatten)]
    pub item: RequestItem,
    /// The caller's address (`replay` for a replay).
    pub remote_addr: String,
    /// The request.
    pub request: RequestView,
    /// The response, if one began.
    pub response: Option<ResponseView>,
    /// The timings.
    pub timings: Timings,
    /// What went wrong, if anything.
    pub error: Option<String>,
    /// Part of the capture was lost; what is kept is exact.
    pub incomplete: bool,
    /// When the entry was replayed by `ferry replay --missed`.
    pub replayed_at: Option<String>,
}

/// `POST /api/v1/requests/{id}/replay`: optional edits and target.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplayRequest {
    /// Send to this absolute http(s) base URL instead of through the
    /// tunnel; the captured path and query are kept unless `path` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// Another method.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// Another path, with its query.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Headers to set (a string) or remove (`null`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headers: Option<std::collections::BTreeMap<String, Option<String>>>,
    /// Another body, as text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    /// Another body, as base64 (for binary bodies).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body_base64: Option<String>,
}

/// The answer of `POST /api/v1/requests/{id}/replay`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplayAnswer {
    /// The new entry's id.
    pub id: String,
    /// The entry it replays.
    pub replay_of: String,
    /// The response status, if a response came.
    pub status: Option<u16>,
    /// How the replay ended.
    pub outcome: String,
    /// What went wrong, if anything.
    pub error: Option<String>,
}

/// A tunnel name held for its owner while no client serves it, in
/// `GET /api/v1/tunnels`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OfflineTunnel {
    /// The subdomain.
    pub name: String,
    /// Seconds since the Unix epoch when its client was last connected.
    pub last_seen: u64,
    /// Seconds since the Unix epoch when the hold ends.
    pub held_until: Option<u64>,
    /// The local target its client last reported.
    pub target: Option<String>,
}

/// A webhook as `GET /api/v1/webhooks/{id}` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WebhookView {
    /// `wh_…`.
    pub id: String,
    /// A name its owner picked.
    pub name: String,
    /// The method deliveries use: POST, PUT, PATCH, GET or DELETE.
    pub method: String,
    /// Where deliveries go: an absolute http(s) URL, possibly a tunnel on
    /// this relay.
    pub url: String,
    /// The event types it listens to, with `*` and `group.*` wildcards.
    pub actions: Vec<String>,
    /// Headers added to every delivery.
    pub headers: std::collections::BTreeMap<String, String>,
    /// Whether events queue deliveries for it.
    pub enabled: bool,
    /// One delivery in flight at a time, in event order.
    pub ordered: bool,
    /// The signing secret, `whsec_…`.
    pub secret: String,
    /// Until when the secret before the last rotation still signs too.
    pub previous_secret_until: Option<String>,
    /// Why the relay disabled it, if it did.
    pub disabled_reason: Option<String>,
    /// Since when its deliveries have only failed.
    pub failing_since: Option<String>,
    /// The state of its latest delivery: `pending`, `succeeded` or `failed`.
    pub last_delivery: Option<String>,
    /// When it was created, RFC 3339.
    pub created_at: String,
    /// When it was last changed, RFC 3339.
    pub updated_at: String,
}

/// `GET /api/v1/webhooks`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WebhookList {
    /// The caller's webhooks, oldest first.
    pub items: Vec<WebhookView>,
}

/// The body of `POST /api/v1/webhooks` (`name`, `url` and `actions`
/// needed) and of `PUT /api/v1/webhooks/{id}` (fields left out keep their
/// value).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookInput {
    /// A name of the owner's choosing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// POST (the default), PUT, PATCH, GET or DELETE.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// An absolute http(s) URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Event types, or wildcards (`*`, `document.*`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actions: Option<Vec<String>>,
    /// Headers added to every delivery, such as `x-auth`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headers: Option<std::collections::BTreeMap<String, String>>,
    /// Whether events queue deliveries for it (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// One delivery in flight at a time, in event order (default false).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ordered: Option<bool>,
    /// `whsec_` and the base64 of 24 to 64 bytes; generated when left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
}

/// One event type of `GET /api/v1/event-types`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventTypeView {
    /// `document.create` …
    pub name: String,
    /// What happened, for people.
    pub description: String,
    /// A payload such an event carries, sent by the test delivery.
    pub example: serde_json::Value,
    /// `builtin`, `operator` (`--event-type`) or `account` (added through
    /// the API by the caller's account).
    pub source: String,
}

/// `GET /api/v1/event-types`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventTypeList {
    /// Every type the caller may send, by name.
    pub items: Vec<EventTypeView>,
}

/// The body of `POST /api/v1/event-types`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventTypeInput {
    /// Dot-separated lowercase words: `invoice.paid`.
    pub name: String,
    /// What happened, for people.
    pub description: String,
    /// An example payload; `{}` when left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub example: Option<serde_json::Value>,
}

/// The body of `POST /api/v1/events`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventInput {
    /// The event type.
    #[serde(rename = "type")]
    pub kind: String,
    /// The payload, any JSON value.
    #[serde(default)]
    pub data: serde_json::Value,
    /// The sender's id for the event: the same id again within a day
    /// queues nothing new.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

/// The answer of `POST /api/v1/events` and of a webhook's test event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventAccepted {
    /// The event's id.
    pub id: String,
    /// Deliveries queued, durably stored.
    pub queued: usize,
    /// The id was sent before within a day, so nothing new was queued.
    pub duplicate: bool,
}

/// The body of `POST /api/v1/webhooks/{id}/test`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TestEventInput {
    /// The type whose example is sent; the webhook's first listened type
    /// when left out.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
}

/// One attempt of a delivery.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttemptView {
    /// 1 for the first.
    pub number: u32,
    /// When it started, RFC 3339.
    pub at: String,
    /// The response status, if one came.
    pub status: Option<u16>,
    /// What went wrong, if anything.
    pub error: Option<String>,
    /// Milliseconds it took.
    pub duration_ms: u64,
    /// Its activity log entry, with the exact request and response.
    pub request_id: String,
}

/// One delivery: an event for one webhook, with its attempts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveryView {
    /// `msg_…`: the `webhook-id` every attempt carries.
    pub id: String,
    /// The webhook.
    pub webhook_id: String,
    /// The event.
    pub event_id: String,
    /// The event type.
    pub event_type: String,
    /// `pending`, `succeeded` or `failed`.
    pub state: String,
    /// Attempts made.
    pub attempts: u32,
    /// When the next attempt is due, while pending.
    pub next_attempt_at: Option<String>,
    /// Why it failed, or what the last attempt met.
    pub last_error: Option<String>,
    /// The last response status.
    pub last_status: Option<u16>,
    /// When it was queued, RFC 3339.
    pub created_at: String,
    /// Its attempts, first first.
    pub attempt_log: Vec<AttemptView>,
}

/// `GET /api/v1/webhooks/{id}/deliveries`, newest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveryPage {
    /// The deliveries.
    pub items: Vec<DeliveryView>,
    /// Pass as `before` for the next page.
    pub next_cursor: Option<String>,
}

/// The answer of `POST /api/v1/webhooks/{id}/recover`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recovered {
    /// Failed deliveries queued again.
    pub queued: usize,
}
