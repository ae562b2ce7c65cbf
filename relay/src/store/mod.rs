//! What the relay keeps on disk, behind one trait per concern so that the
//! embedded SQLite file and a shared database can both serve it:
//!
//! - [`ActivityLog`]: every captured exchange, searchable and pruned.
//! - [`NameRegistry`]: tunnel names, their owners and holds.
//!
//! [`sqlite::Sqlite`] implements both. Everything is keyed on the owner's
//! account key ([`OwnerKey`]), never on a token.

pub mod sqlite;

use std::fmt;
use std::str::FromStr;
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
}

impl Kind {
    /// The name the API and the database use.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Tunnel => "tunnel",
            Kind::Replay => "replay",
        }
    }
}

impl FromStr for Kind {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "tunnel" => Ok(Kind::Tunnel),
            "replay" => Ok(Kind::Replay),
            _ => Err(format!("`{text}` is not a kind: use tunnel or replay")),
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

/// The start of the error a query gets when it ran out of time.
pub const TOO_SLOW: &str = "the query took too long";

/// The path and query of a URL as the log keeps it.
pub fn path_of(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    rest.find('/').map_or("/", |at| &rest[at..])
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

impl From<rusqlite::Error> for StoreError {
    fn from(err: rusqlite::Error) -> Self {
        Self(format!("the database failed: {err}"))
    }
}

/// The activity log.
#[async_trait]
pub trait ActivityLog: Send + Sync {
    /// Stores `entries` in one transaction. An entry whose id is already
    /// stored replaces it.
    async fn append(&self, entries: Vec<Exchange>) -> Result<(), StoreError>;

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
