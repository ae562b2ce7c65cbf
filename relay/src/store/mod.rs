//! What the relay keeps on disk, behind one trait per concern so that the
//! embedded SQLite file and a shared database can both serve it:
//!
//! - [`ActivityLog`]: every captured exchange, searchable and pruned.
//! - [`NameRegistry`]: tunnel names, their owners and holds.
//! - [`Webhooks`]: the dispatcher's webhooks, event types, events and its
//!   durable delivery queue.
//!
//! [`sqlite::Sqlite`] (the embedded default) and [`postgres::Postgres`]
//! (for a fleet of relays on one database) implement them all: [`Store`].
//! Everything is keyed on the owner's account key ([`OwnerKey`]), never on
//! a token.

pub mod postgres;
pub mod sqlite;

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use ferry_common::ids::ExchangeId;

/// Microseconds since the Unix epoch: the store's clock.
pub type Micros = i64;

/// The current time in [`Micros`].
pub fn now_micros() -> Micros {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

/// Who owns a log entry or a name, as stored: an account id (`acct_…`),
/// a reconnect-key hash on an open relay (`key_…`), or empty for a client
/// that sent no key.
pub type OwnerKey = String;

/// How an exchange came to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A public request to a tunnel name.
    Tunnel,
    /// A captured request sent again.
    Replay,
    /// One attempt of a webhook delivery.
    Dispatch,
}

impl Kind {
    /// The name the API and the database use.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Tunnel => "tunnel",
            Kind::Replay => "replay",
            Kind::Dispatch => "dispatch",
        }
    }
}

impl FromStr for Kind {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "tunnel" => Ok(Kind::Tunnel),
            "replay" => Ok(Kind::Replay),
            "dispatch" => Ok(Kind::Dispatch),
            _ => Err(format!(
                "`{text}` is not a kind: use tunnel, replay or dispatch"
            )),
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How an exchange ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A response came back and was passed on whole.
    Answered,
    /// The name is held but its client was not connected: the relay
    /// answered 503 and kept the request for a later replay.
    ClientOffline,
    /// The client (or the replay's target) found nothing listening.
    TargetUnreachable,
    /// The target took too long to answer.
    TargetTimeout,
    /// The caller hung up before the response was complete.
    CallerHungUp,
    /// A relay limit refused the request (size, rate, slow body).
    RelayLimit,
    /// The egress guard refused the target of a replay.
    EgressRefused,
    /// Anything else went wrong on the way; the error says what.
    Failed,
}

impl Outcome {
    /// The name the API and the database use.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Answered => "answered",
            Outcome::ClientOffline => "client_offline",
            Outcome::TargetUnreachable => "target_unreachable",
            Outcome::TargetTimeout => "target_timeout",
            Outcome::CallerHungUp => "caller_hung_up",
            Outcome::RelayLimit => "relay_limit",
            Outcome::EgressRefused => "egress_refused",
            Outcome::Failed => "failed",
        }
    }

    /// Every outcome, for parsing.
    pub const ALL: [Outcome; 8] = [
        Outcome::Answered,
        Outcome::ClientOffline,
        Outcome::TargetUnreachable,
        Outcome::TargetTimeout,
        Outcome::CallerHungUp,
        Outcome::RelayLimit,
        Outcome::EgressRefused,
        Outcome::Failed,
    ];
}

impl FromStr for Outcome {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Outcome::ALL
            .into_iter()
            .find(|o| o.as_str() == text)
            .ok_or_else(|| format!("`{text}` is not an outcome"))
    }
}

/// One header field as it arrived: the name (lowercase, as HTTP/2 and
/// hyper keep it) and the value's exact bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// The field name.
    pub name: String,
    /// The field value.
    pub value: Vec<u8>,
}

/// A body as captured: the first bytes up to the capture limit, and how
/// many there were in all.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CapturedBody {
    /// The bytes kept.
    pub bytes: Bytes,
    /// How many bytes passed through in all.
    pub size: u64,
    /// Whether `bytes` stops short of `size`.
    pub truncated: bool,
}

/// The response half of an exchange.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CapturedResponse {
    /// The status code.
    pub status: u16,
    /// The header fields, in order.
    pub headers: Vec<Header>,
    /// The body.
    pub body: CapturedBody,
}

/// One exchange as the log keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exchange {
    /// Unique and sortable by time.
    pub id: ExchangeId,
    /// The tunnel name the request was for.
    pub tunnel: String,
    /// Who owns the tunnel name.
    pub owner: OwnerKey,
    /// How it came to be.
    pub kind: Kind,
    /// The exchange this one replays.
    pub replay_of: Option<ExchangeId>,
    /// When the request's headers arrived.
    pub received_at: Micros,
    /// The method.
    pub method: String,
    /// The URL as the caller used it: scheme, host, path and query.
    pub url: String,
    /// `HTTP/1.1`, `HTTP/2` …
    pub http_version: String,
    /// The caller's address and port (or `relay` for a replay).
    pub remote_addr: String,
    /// The request's header fields, in order, duplicates kept.
    pub request_headers: Vec<Header>,
    /// The request body.
    pub request_body: CapturedBody,
    /// The response, if one began.
    pub response: Option<CapturedResponse>,
    /// When the response's headers were sent.
    pub responded_at: Option<Micros>,
    /// When the exchange ended.
    pub done_at: Option<Micros>,
    /// How it ended.
    pub outcome: Outcome,
    /// What went wrong, for people.
    pub error: Option<String>,
    /// Part of the capture was lost (the writer fell behind, or a body
    /// could not be followed to its end); what is kept is still exact.
    pub incomplete: bool,
    /// When this entry was replayed by `ferry replay --missed`.
    pub replayed_at: Option<Micros>,
    /// For a [`Kind::Dispatch`] entry: which delivery attempt it was.
    pub dispatch: Option<DispatchRef>,
}

/// What a [`Kind::Dispatch`] entry was an attempt of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DispatchRef {
    /// The webhook (`wh_…`).
    pub webhook: String,
    /// The event's id.
    pub event: String,
    /// The delivery (`msg_…`, the `webhook-id` header).
    pub delivery: String,
    /// The attempt's number, from 1.
    pub attempt: u32,
}

impl Exchange {
    /// The path and query of [`Exchange::url`].
    pub fn path(&self) -> &str {
        path_of(&self.url)
    }

    /// Milliseconds from receipt to the end, if it ended.
    pub fn duration_ms(&self) -> Option<u64> {
        self.done_at
            .map(|done| u64::try_from((done - self.received_at) / 1000).unwrap_or(0))
    }

    /// Bytes the entry holds on disk, roughly: what retention counts. The
    /// search index holds the header values again and the first
    /// [`SEARCH_BODY_PREFIX`] bytes of each body.
    pub fn stored_size(&self) -> u64 {
        let headers = |h: &[Header]| {
            h.iter()
                .map(|h| (h.name.len() + 2 * h.value.len()) as u64)
                .sum::<u64>()
        };
        let body = |b: &CapturedBody| {
            let kept = b.bytes.len();
            (kept + kept.min(SEARCH_BODY_PREFIX)) as u64
        };
        let response = self
            .response
            .as_ref()
            .map_or(0, |r| headers(&r.headers) + body(&r.body));
        256 + 2 * self.url.len() as u64
            + headers(&self.request_headers)
            + body(&self.request_body)
            + response
    }
}

/// Body bytes of each direction that the search index reads: enough for
/// any webhook payload worth searching, without indexing uploads.
pub const SEARCH_BODY_PREFIX: usize = 4096;

/// Header bytes the search index reads of each message.
const SEARCH_HEADERS_MAX: usize = 8 * 1024;

/// The start of the error a query gets when it ran out of time.
pub const TOO_SLOW: &str = "the query took too long";

/// The path and query of a URL as the log keeps it.
pub fn path_of(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    rest.find('/').map_or("/", |at| &rest[at..])
}

/// Header fields as one blob: for each, the name's and the value's lengths
/// (u32, little-endian) and bytes. Exact for any bytes.
pub(crate) fn encode_headers(headers: &[Header]) -> Vec<u8> {
    let size = headers
        .iter()
        .map(|h| 8 + h.name.len() + h.value.len())
        .sum();
    let mut out = Vec::with_capacity(size);
    for header in headers {
        for part in [header.name.as_bytes(), &header.value] {
            out.extend_from_slice(&u32::try_from(part.len()).unwrap_or(u32::MAX).to_le_bytes());
            out.extend_from_slice(part);
        }
    }
    out
}

pub(crate) fn decode_headers(mut blob: &[u8]) -> Result<Vec<Header>, StoreError> {
    let corrupt = || StoreError("a stored header list is corrupt".to_owned());
    let take = |blob: &mut &[u8]| -> Result<Vec<u8>, StoreError> {
        let (len, rest) = blob.split_first_chunk::<4>().ok_or_else(corrupt)?;
        let len = u32::from_le_bytes(*len) as usize;
        if rest.len() < len {
            return Err(corrupt());
        }
        let (part, rest) = rest.split_at(len);
        *blob = rest;
        Ok(part.to_vec())
    };
    let mut headers = Vec::new();
    while !blob.is_empty() {
        let name = String::from_utf8(take(&mut blob)?).map_err(|_| corrupt())?;
        let value = take(&mut blob)?;
        headers.push(Header { name, value });
    }
    Ok(headers)
}

/// What the search index holds of an entry, folded to lowercase (the
/// query is folded the same way, so any case matches, beyond ASCII too).
/// It starts with the owner, so a search narrowed to one owner finds its
/// candidates among that owner's rows only, however large the log.
pub(crate) fn search_text_of(
    owner: &str,
    url: &str,
    request_headers: &[Header],
    request_body: &[u8],
    response_headers: &[Header],
    response_body: &[u8],
) -> String {
    let mut text = String::with_capacity(256);
    text.push_str(owner);
    text.push('\n');
    text.push_str(path_of(url));
    let add_headers = |text: &mut String, headers: &[Header]| {
        let start = text.len();
        for header in headers {
            if let Ok(value) = std::str::from_utf8(&header.value) {
                if text.len() - start + value.len() > SEARCH_HEADERS_MAX {
                    break;
                }
                text.push('\n');
                text.push_str(value);
            }
        }
    };
    add_headers(&mut text, request_headers);
    add_headers(&mut text, response_headers);
    let add_body = |text: &mut String, body: &[u8]| {
        let prefix = &body[..body.len().min(SEARCH_BODY_PREFIX)];
        let valid = match std::str::from_utf8(prefix) {
            Ok(valid) => valid,
            // A prefix may cut a character in two: keep what is whole.
            Err(err) if err.error_len().is_none() => {
                std::str::from_utf8(&prefix[..err.valid_up_to()]).unwrap_or_default()
            }
            Err(_) => "",
        };
        if !valid.is_empty() {
            text.push('\n');
            text.push_str(valid);
        }
    };
    add_body(&mut text, request_body);
    add_body(&mut text, response_body);
    fold(&text)
}

/// The case folding the index and the queries share: lowercase, and `ß`
/// as `ss` (as full Unicode case folding has it), so `STRASSE` finds
/// `Straße`. NUL becomes U+FFFD: SQLite's text functions stop at a NUL and
/// PostgreSQL's text cannot hold one, so text after it would never match.
pub(crate) fn fold(text: &str) -> String {
    text.to_lowercase()
        .replace('ß', "ss")
        .replace('\0', "\u{FFFD}")
}

/// The status filter: one code or a class (`4xx`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusFilter {
    /// Exactly this code.
    Code(u16),
    /// Any code of this class, 1 to 5.
    Class(u16),
}

impl FromStr for StatusFilter {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || {
            format!(
                "`{text}` is not a status filter: send a code such as 200, or a class such as 4xx"
            )
        };
        let lower = text.to_ascii_lowercase();
        if let Some(class) = lower.strip_suffix("xx") {
            let class: u16 = class.parse().map_err(|_| bad())?;
            return (1..=5)
                .contains(&class)
                .then_some(StatusFilter::Class(class))
                .ok_or_else(bad);
        }
        let code: u16 = lower.parse().map_err(|_| bad())?;
        (100..=599)
            .contains(&code)
            .then_some(StatusFilter::Code(code))
            .ok_or_else(bad)
    }
}

/// Which entries a query wants. Empty fields match everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    /// Only this owner's entries; `None` on a relay without tokens.
    pub owner: Option<OwnerKey>,
    /// Only this tunnel.
    pub tunnel: Option<String>,
    /// Only this kind.
    pub kind: Option<Kind>,
    /// Only this method (uppercase).
    pub method: Option<String>,
    /// Only this status or class.
    pub status: Option<StatusFilter>,
    /// Case-insensitive text in the path, query, header values or text
    /// bodies: at least [`MIN_SEARCH`] characters without `%` or `_`
    /// somewhere in it, so the search index can answer it.
    pub text: Option<String>,
    /// Received at or after.
    pub since: Option<Micros>,
    /// Received before.
    pub until: Option<Micros>,
    /// Only offline captures not yet replayed.
    pub missed: bool,
}

/// The shortest run of characters a text search needs: the trigram index
/// answers nothing shorter, and a full scan per query is not offered.
pub const MIN_SEARCH: usize = 3;

/// The longest run of `text` without the wildcards `%` and `_`.
pub fn search_run(text: &str) -> &str {
    text.split(['%', '_'])
        .max_by_key(|run| run.chars().count())
        .unwrap_or("")
}

/// A list entry with the position it was committed at, for live tails.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Logged {
    /// The commit order: later commits have larger numbers.
    pub seq: i64,
    /// The entry.
    pub exchange: Exchange,
}

/// What a prune removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    /// Entries removed.
    pub entries: u64,
    /// Their [`Exchange::stored_size`] in all.
    pub bytes: u64,
}

/// How much the log may keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Entries older than this go.
    pub max_age: Duration,
    /// The whole log's size; the oldest entries go beyond it.
    pub max_bytes: u64,
    /// One owner's share; that owner's oldest entries go beyond it.
    pub max_bytes_per_owner: u64,
}

/// A store failure: the database could not be read or written.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct StoreError(pub String);

/// The start of the error of a call the database could not serve for now:
/// it is unreachable or shutting down, or the call met a conflict that
/// clears by itself (a deadlock, a lock wait cut short, a read-only server
/// after a failover). The same call may work later.
pub const UNAVAILABLE: &str = "the database is unavailable";

impl StoreError {
    /// Whether the same call may work later: see [`UNAVAILABLE`].
    pub fn is_unavailable(&self) -> bool {
        self.0.starts_with(UNAVAILABLE)
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(err: rusqlite::Error) -> Self {
        Self(format!("the database failed: {err}"))
    }
}

/// Everything the relay keeps, in one store.
pub trait Store: ActivityLog + NameRegistry + Webhooks + Database {}

impl<T: ActivityLog + NameRegistry + Webhooks + Database> Store for T {}

/// What the relay asks of the database itself, beside its tables.
#[async_trait]
pub trait Database: Send + Sync {
    /// Succeeds while the store answers a trivial query: for `/healthz`.
    async fn check(&self) -> Result<(), StoreError>;

    /// Changes when another relay sharing the database has committed
    /// activity log entries, so that live tails here wake for them; `None`
    /// when no other relay can write it.
    fn commits(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        None
    }
}

/// The activity log.
#[async_trait]
pub trait ActivityLog: Send + Sync {
    /// Stores `entries` in one transaction. An entry whose id is already
    /// stored replaces it. Shared, so that a batch retried after an outage
    /// is not copied for each attempt.
    async fn append(&self, entries: Arc<[Exchange]>) -> Result<(), StoreError>;

    /// About how many stored entries wait for the search index, which a
    /// store may fill after the append (they are searched one by one
    /// meanwhile); 0 where the append indexes them.
    fn search_backlog(&self) -> u64 {
        0
    }

    /// Entries matching `filter`, newest first (by id), starting after
    /// `before` (an id from the previous page), at most `limit`. Without
    /// `bodies` the bodies' bytes are left empty (their sizes and flags
    /// kept), so a page of list items never loads megabytes.
    async fn list(
        &self,
        filter: &Filter,
        before: Option<ExchangeId>,
        limit: usize,
        bodies: bool,
    ) -> Result<Vec<Exchange>, StoreError>;

    /// Entries matching `filter` committed after `seq`, oldest commit
    /// first, at most `limit`, without their bodies' bytes: the feed of a
    /// live tail.
    async fn committed_after(
        &self,
        filter: &Filter,
        seq: i64,
        limit: usize,
    ) -> Result<Vec<Logged>, StoreError>;

    /// The commit position of entry `id`, if it is stored and `owner`
    /// (when given) owns it.
    async fn seq_of(&self, id: ExchangeId, owner: Option<&str>) -> Result<Option<i64>, StoreError>;

    /// The latest commit position (0 for an empty log).
    async fn last_seq(&self) -> Result<i64, StoreError>;

    /// One entry, if it exists and `owner` (when given) owns it.
    async fn get(
        &self,
        id: ExchangeId,
        owner: Option<&str>,
    ) -> Result<Option<Exchange>, StoreError>;

    /// Marks entry `id` as replayed at `at`; false if it was already.
    async fn mark_replayed(&self, id: ExchangeId, at: Micros) -> Result<bool, StoreError>;

    /// Removes what `retention` no longer allows, oldest first, as of `now`.
    async fn prune(&self, retention: Retention, now: Micros) -> Result<Pruned, StoreError>;
}

/// A tunnel name as the registry keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameRecord {
    /// The subdomain.
    pub name: String,
    /// Who holds it.
    pub owner: OwnerKey,
    /// When its client was last connected.
    pub last_seen: Micros,
    /// Until when it stays its owner's while no client serves it; `None`
    /// while a client is connected.
    pub hold_until: Option<Micros>,
    /// The local target the client last reported.
    pub target: Option<String>,
}

/// The persisted name registry.
#[async_trait]
pub trait NameRegistry: Send + Sync {
    /// Creates or updates `record`.
    async fn save_name(&self, record: NameRecord) -> Result<(), StoreError>;

    /// One name's record.
    async fn name(&self, name: &str) -> Result<Option<NameRecord>, StoreError>;

    /// Every name held at `now` (or served), the longest unseen first.
    async fn names(&self, now: Micros) -> Result<Vec<NameRecord>, StoreError>;

    /// Forgets names whose hold ended before `now`; returns how many.
    async fn forget_expired(&self, now: Micros) -> Result<u64, StoreError>;
}

/// A webhook as the store keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookRecord {
    /// `wh_…`.
    pub id: String,
    /// Who owns it.
    pub owner: OwnerKey,
    /// The owner's name for it.
    pub name: String,
    /// The method deliveries use.
    pub method: String,
    /// Where deliveries go.
    pub url: String,
    /// The event types it listens to, wildcards included.
    pub actions: Vec<String>,
    /// Headers added to every delivery, in order.
    pub headers: Vec<(String, String)>,
    /// Whether events queue deliveries for it.
    pub enabled: bool,
    /// One delivery in flight at a time, in event order.
    pub ordered: bool,
    /// The signing secret (`whsec_…`).
    pub secret: String,
    /// The secret before the last rotation, and until when it still signs.
    pub previous_secret: Option<(String, Micros)>,
    /// Why the dispatcher disabled it.
    pub disabled_reason: Option<String>,
    /// Since when its attempts have only failed.
    pub failing_since: Option<Micros>,
    /// When it was created.
    pub created_at: Micros,
    /// When it was last changed.
    pub updated_at: Micros,
}

/// Whether `actions` (names, `*`, or `group.*`) take events of type `kind`.
pub fn listens_to(actions: &[String], kind: &str) -> bool {
    actions.iter().any(|action| {
        action == "*"
            || action == kind
            || action.strip_suffix(".*").is_some_and(|group| {
                kind.strip_prefix(group)
                    .is_some_and(|rest| rest.starts_with('.'))
            })
    })
}

/// An event type added by the operator or an account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventTypeRecord {
    /// Who added it; empty for the whole relay.
    pub owner: OwnerKey,
    /// `invoice.paid`.
    pub name: String,
    /// What it means.
    pub description: String,
    /// An example payload, JSON.
    pub example: String,
}

/// An event to fan out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEvent {
    /// Who sent it.
    pub owner: OwnerKey,
    /// Its id: the sender's, or one the relay made.
    pub id: String,
    /// Its type.
    pub kind: String,
    /// The body every delivery carries, exactly.
    pub payload: Bytes,
    /// When it was accepted.
    pub at: Micros,
    /// Only this webhook, whatever it listens to (a test event); `None`
    /// queues one delivery per enabled webhook of the owner that listens.
    pub only: Option<String>,
    /// Attempts each delivery gets.
    pub max_attempts: u32,
}

/// What [`Webhooks::enqueue`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enqueued {
    /// Deliveries stored, ready to go.
    Queued(usize),
    /// The owner sent this event id within the last day: nothing queued.
    Duplicate,
}

/// Where a delivery stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryState {
    /// Waiting for its next attempt, or in flight.
    Pending,
    /// An attempt got a 2xx.
    Succeeded,
    /// Out of attempts, or given up.
    Failed,
}

impl DeliveryState {
    /// The name the API and the database use.
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryState::Pending => "pending",
            DeliveryState::Succeeded => "succeeded",
            DeliveryState::Failed => "failed",
        }
    }
}

impl FromStr for DeliveryState {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "pending" => Ok(DeliveryState::Pending),
            "succeeded" => Ok(DeliveryState::Succeeded),
            "failed" => Ok(DeliveryState::Failed),
            _ => Err(format!(
                "`{text}` is not a delivery state: use pending, succeeded or failed"
            )),
        }
    }
}

/// One delivery: an event for one webhook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryRecord {
    /// `msg_…`, sent as `webhook-id` on every attempt.
    pub id: String,
    /// The queue order: later events have larger numbers.
    pub seq: i64,
    /// The webhook.
    pub webhook: String,
    /// The webhook's owner.
    pub owner: OwnerKey,
    /// The event's id.
    pub event: String,
    /// The event's type.
    pub kind: String,
    /// The exact body.
    pub payload: Bytes,
    /// Where it stands.
    pub state: DeliveryState,
    /// Attempts made.
    pub attempts: u32,
    /// Attempts it may make in all.
    pub max_attempts: u32,
    /// When the next attempt is due.
    pub next_at: Micros,
    /// The last response status.
    pub last_status: Option<u16>,
    /// The last error, or why it failed.
    pub last_error: Option<String>,
    /// When it was queued.
    pub created_at: Micros,
}

/// One attempt, as the queue keeps it (the exact exchange is in the log).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptRecord {
    /// Its number, from 1.
    pub number: u32,
    /// When it started.
    pub at: Micros,
    /// The response status, if one came.
    pub status: Option<u16>,
    /// What went wrong.
    pub error: Option<String>,
    /// How long it took.
    pub duration_ms: u64,
    /// Its activity log entry.
    pub exchange: ExchangeId,
}

/// A delivery claimed for an attempt, with its webhook as it is now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claimed {
    /// The delivery.
    pub delivery: DeliveryRecord,
    /// Its webhook.
    pub webhook: WebhookRecord,
    /// The lease the claim wrote (its `lease_until`): the token that
    /// [`Webhooks::finish`] and [`Webhooks::release`] present, so that an
    /// attempt whose lease ran out and was claimed again cannot end the
    /// new holder's lease.
    pub lease: Micros,
}

/// What comes after an attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Delivered.
    Succeeded,
    /// Try again at this time.
    RetryAt(Micros),
    /// No more attempts.
    Failed,
    /// Disable the webhook (410 Gone); the delivery fails.
    DisableWebhook(String),
}

/// An attempt's result, stored in one transaction with what follows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finished {
    /// The delivery.
    pub delivery: String,
    /// The lease its claim handed out ([`Claimed::lease`]).
    pub lease: Micros,
    /// The attempt; the store numbers it after the delivery's last one.
    pub attempt: AttemptRecord,
    /// What comes next.
    pub next: Next,
    /// A webhook failing for this long (with this attempt failed) is
    /// disabled.
    pub disable_after: Micros,
}

/// The dispatcher's durable state: webhooks, event types, event ids seen,
/// and the delivery queue. Every call is one transaction, so a delivery
/// is never lost between queueing and its last attempt, whenever the
/// process dies.
#[async_trait]
pub trait Webhooks: Send + Sync {
    /// Stores a new webhook, or replaces the one with its id.
    async fn save_webhook(&self, webhook: WebhookRecord) -> Result<(), StoreError>;

    /// One webhook, if it exists and `owner` (when given) owns it.
    async fn webhook(
        &self,
        id: &str,
        owner: Option<&str>,
    ) -> Result<Option<WebhookRecord>, StoreError>;

    /// The webhooks `owner` owns (every one when `None`), oldest first,
    /// each with the state of its latest delivery.
    async fn webhooks(
        &self,
        owner: Option<&str>,
    ) -> Result<Vec<(WebhookRecord, Option<DeliveryState>)>, StoreError>;

    /// Deletes a webhook and its queue; false if there was none of
    /// `owner`'s.
    async fn delete_webhook(&self, id: &str, owner: Option<&str>) -> Result<bool, StoreError>;

    /// Adds (or redescribes) an event type.
    async fn save_event_type(&self, event_type: EventTypeRecord) -> Result<(), StoreError>;

    /// The event types added for `owner` and for the whole relay.
    async fn event_types(&self, owner: Option<&str>) -> Result<Vec<EventTypeRecord>, StoreError>;

    /// Records the event and queues its deliveries, all or nothing. An
    /// event id the owner sent at most `dedup` ago queues nothing.
    async fn enqueue(&self, event: NewEvent, dedup: Micros) -> Result<Enqueued, StoreError>;

    /// Takes up to `limit` due deliveries (oldest event first) for an
    /// attempt, leased until `lease_until`: an ordered webhook's only when
    /// it is the oldest pending one, none of the webhooks in `skip`.
    async fn claim(
        &self,
        now: Micros,
        limit: usize,
        lease_until: Micros,
        skip: Vec<String>,
    ) -> Result<Vec<Claimed>, StoreError>;

    /// Gives claimed deliveries back without an attempt, due at `due`
    /// (unchanged when `None`): each delivery id with its claim's lease
    /// ([`Claimed::lease`]). A delivery whose lease is no longer that one
    /// (it ran out and another claim took the delivery) is left alone.
    async fn release(
        &self,
        leases: Vec<(String, Micros)>,
        due: Option<Micros>,
    ) -> Result<(), StoreError>;

    /// Gives back every lease: at start, nothing is in flight.
    async fn release_all(&self) -> Result<u64, StoreError>;

    /// When the next delivery [`Webhooks::claim`] could take at `now` (or
    /// later) is due.
    async fn next_due(&self, now: Micros, skip: Vec<String>) -> Result<Option<Micros>, StoreError>;

    /// Stores attempts' results and what follows each. Every attempt is
    /// kept, numbered after the delivery's last one; what follows it
    /// (state, next attempt, the webhook's failing) is applied only if the
    /// delivery still holds the finish's lease: otherwise the lease ran
    /// out, another claim took the delivery, and that claim's attempt
    /// decides.
    async fn finish(&self, results: Vec<Finished>) -> Result<(), StoreError>;

    /// Fails every pending delivery of `webhook` with `reason`.
    async fn fail_pending(&self, webhook: &str, reason: &str) -> Result<u64, StoreError>;

    /// A webhook's deliveries, newest first, after `before` (a `seq`).
    async fn deliveries(
        &self,
        webhook: &str,
        state: Option<DeliveryState>,
        before: Option<i64>,
        limit: usize,
    ) -> Result<Vec<(DeliveryRecord, Vec<AttemptRecord>)>, StoreError>;

    /// One delivery and its attempts, if `owner` (when given) owns it.
    async fn delivery(
        &self,
        id: &str,
        owner: Option<&str>,
    ) -> Result<Option<(DeliveryRecord, Vec<AttemptRecord>)>, StoreError>;

    /// Queues a delivery again for one attempt at `now`; false if there
    /// is none of `owner`'s or it is pending already.
    async fn resend(&self, id: &str, owner: Option<&str>, now: Micros) -> Result<bool, StoreError>;

    /// Queues every failed delivery of `webhook` queued since `since`
    /// again, one attempt each; returns how many.
    async fn recover(&self, webhook: &str, since: Micros, now: Micros) -> Result<u64, StoreError>;

    /// How many of `owner`'s deliveries are pending.
    async fn pending(&self, owner: &str) -> Result<u64, StoreError>;

    /// Forgets finished deliveries, and events without deliveries, queued
    /// before `before`.
    async fn prune_deliveries(&self, before: Micros) -> Result<u64, StoreError>;
}
