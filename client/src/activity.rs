//! The activity log from the command line: read it through a relay's API,
//! or straight from the embedded relay's data directory when no relay is
//! running there; replay captured requests to the local server.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use ferry_common::api::{
    ErrorBody, ReplayAnswer, ReplayRequest, RequestDetail, RequestItem, RequestPage, TunnelList,
};
use ferry_relay::api::requests as views;
use ferry_relay::store::sqlite::Sqlite;
use ferry_relay::store::{ActivityLog, Filter};
use http_body_util::{BodyExt, Full};
use hyper::header::{self, HeaderName, HeaderValue};
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::Target;

/// How long one API call or one local replay may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(120);
/// Entries fetched per page when walking the whole log.
const PAGE: usize = 500;

type HttpClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// Why a command that reads the log or calls the relay's API failed.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// The relay answered with an error.
    #[error("the relay answered {status}: {message}")]
    Relay {
        /// The HTTP status.
        status: u16,
        /// The relay's message.
        message: String,
    },
    /// The relay could not be reached.
    #[error("cannot reach the relay's API at {0}: {1}")]
    Unreachable(String, String),
    /// The data directory holds no log.
    #[error("no activity log in {0}: run `ferry http` first, or pass --relay and --token")]
    NoLog(String),
    /// The command needs a relay's API and none runs on the data directory.
    #[error("no relay is running for {0}: start `ferry http` (or pass --relay URL)")]
    NoRelay(String),
    /// The database failed.
    #[error("{0}")]
    Store(String),
    /// The request is not valid.
    #[error("{0}")]
    Invalid(String),
    /// The local server could not be reached.
    #[error("the local server at {0} did not answer: {1}")]
    Local(String, String),
}

/// Where the log is read.
pub enum Source {
    /// A relay's API.
    Api {
        /// `http://host:port` or `https://host`.
        base: String,
        /// The bearer token.
        token: Option<String>,
        /// The HTTP client.
        client: Box<HttpClient>,
    },
    /// The database file, opened directly.
    Local(Arc<Sqlite>),
}

fn http_client() -> HttpClient {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_provider_and_webpki_roots(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .expect("ring supports TLS 1.2 and 1.3")
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Client::builder(TokioExecutor::new()).build(connector)
}

impl Source {
    /// A relay's API at `base` (`http://…`, `https://…`, `ws://…` or
    /// `wss://…`; any path is ignored).
    pub fn api(base: &str, token: Option<&str>) -> Self {
        let base = base.trim();
        let (scheme, rest) = base.split_once("://").unwrap_or(("https", base));
        let scheme = match scheme.to_ascii_lowercase().as_str() {
            "ws" | "http" => "http",
            _ => "https",
        };
        let authority = rest.split('/').next().unwrap_or(rest);
        Source::Api {
            base: format!("{scheme}://{authority}"),
            token: token.map(str::to_owned),
            client: Box::new(http_client()),
        }
    }

    /// The log of the relay whose data directory is `dir`: through its API
    /// while it runs, else the database itself (read-only unless
    /// `writable`).
    pub fn data_dir(dir: &Path, writable: bool) -> Result<Self, LogError> {
        if let Some(url) = ferry_relay::data_dir::running_relay(dir) {
            return Ok(Self::api(&url, None));
        }
        let file = dir.join(ferry_relay::data_dir::DATABASE_FILE);
        if !file.exists() {
            return Err(LogError::NoLog(dir.display().to_string()));
        }
        let store = if writable {
            Sqlite::open(&file)
        } else {
            Sqlite::open_read_only(&file)
        }
        .map_err(|err| LogError::Store(err.to_string()))?;
        Ok(Source::Local(Arc::new(store)))
    }

    /// The API of the relay running on data directory `dir`, for commands
    /// that only a running relay can answer (the dispatcher runs there).
    pub fn running(dir: &Path) -> Result<Self, LogError> {
        ferry_relay::data_dir::running_relay(dir)
            .map(|url| Self::api(&url, None))
            .ok_or_else(|| LogError::NoRelay(dir.display().to_string()))
    }

    pub(crate) async fn call(
        &self,
        method: Method,
        path: &str,
        json: Option<String>,
    ) -> Result<Bytes, LogError> {
        let Source::Api {
            base,
            token,
            client,
        } = self
        else {
            return Err(LogError::Invalid(
                "this needs a running relay: start `ferry http`, or pass --relay and --token"
                    .to_owned(),
            ));
        };
        let mut request = Request::builder()
            .method(method)
            .uri(format!("{base}{path}"))
            .body(Full::new(Bytes::from(json.clone().unwrap_or_default())))
            .map_err(|err| LogError::Invalid(err.to_string()))?;
        if json.is_some() {
            request.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
        }
        if let Some(token) = token {
            let value = HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| {
                LogError::Invalid("the token holds characters a header cannot".to_owned())
            })?;
            request.headers_mut().insert(header::AUTHORIZATION, value);
        }
        let unreachable = |why: String| LogError::Unreachable(base.clone(), why);
        let response = tokio::time::timeout(CALL_TIMEOUT, client.request(request))
            .await
            .map_err(|_| unreachable("no answer in time".to_owned()))?
            .map_err(|err| unreachable(err.to_string()))?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|err| unreachable(err.to_string()))?
            .to_bytes();
        if !status.is_success() {
            let message = serde_json::from_slice::<ErrorBody>(&body)
                .map(|e| e.error.message)
                .unwrap_or_else(|_| String::from_utf8_lossy(&body).trim().to_owned());
            return Err(LogError::Relay {
                status: status.as_u16(),
                message,
            });
        }
        Ok(body)
    }

    pub(crate) async fn call_json<T: serde::de::DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        json: Option<String>,
    ) -> Result<T, LogError> {
        let body = self.call(method, path, json).await?;
        serde_json::from_slice(&body).map_err(|err| {
            LogError::Invalid(format!(
                "the relay's answer is not what ferry expects: {err}"
            ))
        })
    }

    fn local_filter(
        query: &str,
    ) -> Result<(Filter, Option<ferry_common::ids::ExchangeId>, usize), LogError> {
        let parsed = views::parse_query(Some(query), None)
            .map_err(|err| LogError::Invalid(err.to_string()))?;
        Ok((parsed.filter, parsed.cursor, parsed.limit))
    }

    /// A page of entries for a list query string (`tunnel=…&status=4xx`).
    pub async fn list(&self, query: &str) -> Result<RequestPage, LogError> {
        match self {
            Source::Api { .. } => {
                self.call_json(Method::GET, &format!("/api/v1/requests?{query}"), None)
                    .await
            }
            Source::Local(store) => {
                let (filter, cursor, limit) = Self::local_filter(query)?;
                let entries = store
                    .list(&filter, cursor, limit, false)
                    .await
                    .map_err(|err| LogError::Store(err.to_string()))?;
                let next_cursor = (entries.len() == limit)
                    .then(|| entries.last().map(|e| e.id.to_string()))
                    .flatten();
                Ok(RequestPage {
                    items: entries.iter().map(views::item).collect(),
                    next_cursor,
                })
            }
        }
    }

    async fn exchange(&self, id: &str) -> Result<ferry_relay::store::Exchange, LogError> {
        let Source::Local(store) = self else {
            return Err(LogError::Invalid("not a local log".to_owned()));
        };
        let parsed = id
            .parse()
            .map_err(|_| LogError::Invalid(format!("`{id}` is not a request id")))?;
        store
            .get(parsed, None)
            .await
            .map_err(|err| LogError::Store(err.to_string()))?
            .ok_or_else(|| LogError::Invalid(format!("no request `{id}` in the activity log")))
    }

    /// Everything about entry `id`.
    pub async fn detail(&self, id: &str) -> Result<RequestDetail, LogError> {
        match self {
            Source::Api { .. } => {
                self.call_json(
                    Method::GET,
                    &format!("/api/v1/requests/{}", encode(id)),
                    None,
                )
                .await
            }
            Source::Local(_) => Ok(views::detail(&self.exchange(id).await?)),
        }
    }

    /// A curl command reproducing entry `id`, sent to `to` when given.
    pub async fn curl(&self, id: &str, to: Option<&str>) -> Result<String, LogError> {
        match self {
            Source::Api { .. } => {
                let query = to
                    .map(|to| format!("?to={}", encode(to)))
                    .unwrap_or_default();
                let body = self
                    .call(
                        Method::GET,
                        &format!("/api/v1/requests/{}/curl{query}", encode(id)),
                        None,
                    )
                    .await?;
                Ok(String::from_utf8_lossy(&body).into_owned())
            }
            Source::Local(_) => ferry_relay::activity::export::curl(&self.exchange(id).await?, to)
                .map_err(|err| LogError::Invalid(err.to_string())),
        }
    }

    /// A HAR 1.2 document of the entries `ids`.
    pub async fn har(&self, ids: &[String]) -> Result<serde_json::Value, LogError> {
        let mut entries = Vec::new();
        for id in ids {
            let har: serde_json::Value = match self {
                Source::Api { .. } => {
                    self.call_json(
                        Method::GET,
                        &format!("/api/v1/requests/{}/har", encode(id)),
                        None,
                    )
                    .await?
                }
                Source::Local(_) => {
                    ferry_relay::activity::export::har(&[self.exchange(id).await?])
                }
            };
            if let Some(list) = har["log"]["entries"].as_array() {
                entries.extend(list.iter().cloned());
            }
        }
        let mut document = ferry_relay::activity::export::har(&[]);
        document["log"]["entries"] = serde_json::Value::Array(entries);
        Ok(document)
    }

    /// Replays entry `id` through the relay, with `edits`.
    pub async fn replay_via_relay(
        &self,
        id: &str,
        edits: &ReplayRequest,
    ) -> Result<ReplayAnswer, LogError> {
        let json =
            serde_json::to_string(edits).map_err(|err| LogError::Invalid(err.to_string()))?;
        self.call_json(
            Method::POST,
            &format!("/api/v1/requests/{}/replay", encode(id)),
            Some(json),
        )
        .await
    }

    /// The local target the client of tunnel `name` last reported.
    pub async fn tunnel_target(&self, name: &str) -> Option<String> {
        match self {
            Source::Api { .. } => {
                let list: TunnelList = self
                    .call_json(Method::GET, "/api/v1/tunnels", None)
                    .await
                    .ok()?;
                let live = list
                    .tunnels
                    .into_iter()
                    .find(|t| t.name == name)
                    .and_then(|t| t.target);
                live.or_else(|| {
                    list.offline
                        .into_iter()
                        .find(|t| t.name == name)
                        .and_then(|t| t.target)
                })
            }
            Source::Local(store) => {
                use ferry_relay::store::NameRegistry;
                store.name(name).await.ok().flatten().and_then(|r| r.target)
            }
        }
    }

    /// Marks entry `id` as replayed.
    pub async fn mark_replayed(&self, id: &str) -> Result<(), LogError> {
        match self {
            Source::Api { .. } => {
                self.call(
                    Method::POST,
                    &format!("/api/v1/requests/{}/replayed", encode(id)),
                    Some("{}".to_owned()),
                )
                .await?;
                Ok(())
            }
            Source::Local(store) => {
                let entry = self.exchange(id).await?;
                store
                    .mark_replayed(entry.id, ferry_relay::store::now_micros())
                    .await
                    .map_err(|err| LogError::Store(err.to_string()))?;
                Ok(())
            }
        }
    }

    /// The commit position of the newest entry, where a local `--follow`
    /// starts.
    pub async fn local_last_seq(&self) -> Result<i64, LogError> {
        let Source::Local(store) = self else {
            return Err(LogError::Invalid("not a local log".to_owned()));
        };
        store
            .last_seq()
            .await
            .map_err(|err| LogError::Store(err.to_string()))
    }

    /// Entries committed after position `seq`, for a local `--follow`;
    /// returns them with the new position.
    pub async fn local_after(
        &self,
        query: &str,
        seq: i64,
    ) -> Result<(Vec<RequestItem>, i64), LogError> {
        let Source::Local(store) = self else {
            return Err(LogError::Invalid("not a local log".to_owned()));
        };
        let (filter, _, _) = Self::local_filter(query)?;
        let found = store
            .committed_after(&filter, seq, PAGE)
            .await
            .map_err(|err| LogError::Store(err.to_string()))?;
        let next = found.last().map_or(seq, |l| l.seq);
        Ok((
            found.iter().map(|l| views::item(&l.exchange)).collect(),
            next,
        ))
    }

    /// Opens the API's live tail (`--follow` through a relay).
    pub async fn stream(&self, query: &str) -> Result<hyper::body::Incoming, LogError> {
        let Source::Api {
            base,
            token,
            client,
        } = self
        else {
            return Err(LogError::Invalid("not an API".to_owned()));
        };
        let mut request = Request::get(format!("{base}/api/v1/requests/stream?{query}"))
            .body(Full::new(Bytes::new()))
            .map_err(|err| LogError::Invalid(err.to_string()))?;
        if let Some(token) = token {
            if let Ok(value) = HeaderValue::from_str(&format!("Bearer {token}")) {
                request.headers_mut().insert(header::AUTHORIZATION, value);
            }
        }
        let response = client
            .request(request)
            .await
            .map_err(|err| LogError::Unreachable(base.clone(), err.to_string()))?;
        if response.status() != StatusCode::OK {
            return Err(LogError::Relay {
                status: response.status().as_u16(),
                message: "the live tail was refused".to_owned(),
            });
        }
        Ok(response.into_body())
    }
}

/// Percent-encodes a query or path value.
pub(crate) fn encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// What a replay to the local server got back.
#[derive(Debug, Clone)]
pub struct LocalReplay {
    /// The entry replayed.
    pub id: String,
    /// The method and path sent.
    pub request_line: String,
    /// The status the local server answered.
    pub status: u16,
    /// How long it took.
    pub elapsed: Duration,
    /// The response body.
    pub body: Bytes,
}

/// The captured request of `detail`, with `edits`, as a request to
/// `target`.
pub fn local_request(
    detail: &RequestDetail,
    edits: &ReplayRequest,
    target: &Target,
) -> Result<Request<Full<Bytes>>, LogError> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let method = edits
        .method
        .clone()
        .unwrap_or_else(|| detail.request.method.clone());
    let method = Method::from_bytes(method.to_ascii_uppercase().as_bytes())
        .map_err(|_| LogError::Invalid(format!("`{method}` is not a method")))?;
    let path = edits
        .path
        .clone()
        .unwrap_or_else(|| detail.item.path.clone());
    if !path.starts_with('/') {
        return Err(LogError::Invalid(format!(
            "the path must start with /, not `{path}`"
        )));
    }
    let body = match (&edits.body, &edits.body_base64) {
        (Some(text), _) => Bytes::from(text.clone()),
        (None, Some(encoded)) => Bytes::from(
            b64.decode(encoded)
                .map_err(|err| LogError::Invalid(format!("the body is not base64: {err}")))?,
        ),
        (None, None) if detail.request.body.truncated => {
            return Err(LogError::Invalid(format!(
                "the captured body of {} was cut at {} of {} bytes: replay it with --body @FILE",
                detail.item.id, detail.request.body.captured, detail.request.body.size
            )))
        }
        (None, None) => Bytes::from(
            b64.decode(&detail.request.body.base64)
                .map_err(|err| LogError::Invalid(err.to_string()))?,
        ),
    };
    let mut request = Request::builder()
        .method(method)
        .uri(format!(
            "{}://{}{path}",
            target.scheme(),
            target.authority()
        ))
        .body(Full::new(body))
        .map_err(|err| LogError::Invalid(format!("cannot build the request: {err}")))?;
    let headers = request.headers_mut();
    for field in &detail.request.headers {
        let value = match &field.value_base64 {
            Some(encoded) => b64.decode(encoded).unwrap_or_default(),
            None => field.value.clone().into_bytes(),
        };
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(field.name.as_bytes()),
            HeaderValue::from_bytes(&value),
        ) {
            headers.append(name, value);
        }
    }
    for (name, value) in edits.headers.iter().flatten() {
        let name = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| LogError::Invalid(format!("`{name}` is not a header name")))?;
        headers.remove(&name);
        if let Some(value) = value {
            let value = HeaderValue::from_str(value).map_err(|_| {
                LogError::Invalid(format!(
                    "the value for `{name}` is not a valid header value"
                ))
            })?;
            headers.insert(name, value);
        }
    }
    ferry_common::headers::remove_hop_by_hop(headers);
    for name in [
        header::CONTENT_LENGTH,
        header::TRANSFER_ENCODING,
        header::HOST,
    ] {
        headers.remove(name);
    }
    Ok(request)
}

/// Sends entry `id` (with `edits`) straight to the local `target`.
pub async fn replay_local(
    source: &Source,
    id: &str,
    edits: &ReplayRequest,
    target: &Target,
) -> Result<LocalReplay, LogError> {
    let detail = source.detail(id).await?;
    send_local(&detail, edits, target).await
}

async fn send_local(
    detail: &RequestDetail,
    edits: &ReplayRequest,
    target: &Target,
) -> Result<LocalReplay, LogError> {
    let request = local_request(detail, edits, target)?;
    let request_line = format!(
        "{} {}",
        request.method(),
        request.uri().path_and_query().map_or("/", |p| p.as_str())
    );
    let local =
        |why: String| LogError::Local(format!("{}://{}", target.scheme(), target.authority()), why);
    let started = Instant::now();
    let response = tokio::time::timeout(CALL_TIMEOUT, http_client().request(request))
        .await
        .map_err(|_| local("no answer in time".to_owned()))?
        .map_err(|err| local(err.to_string()))?;
    let status = response.status().as_u16();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|err| local(err.to_string()))?
        .to_bytes();
    Ok(LocalReplay {
        id: detail.item.id.clone(),
        request_line,
        status,
        elapsed: started.elapsed(),
        body,
    })
}

/// Replays to the local `target`, oldest first, every request captured
/// while the client was offline and not replayed yet (of `tunnel`, when
/// given), marking each as replayed once the local server answered.
pub async fn replay_missed(
    source: &Source,
    tunnel: Option<&str>,
    target: &Target,
) -> Result<Vec<LocalReplay>, LogError> {
    let mut query = format!("missed=true&limit={PAGE}");
    if let Some(tunnel) = tunnel {
        query.push_str(&format!("&tunnel={}", encode(tunnel)));
    }
    let mut missed = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let page_query = match &cursor {
            Some(cursor) => format!("{query}&cursor={cursor}"),
            None => query.clone(),
        };
        let page = source.list(&page_query).await?;
        missed.extend(page.items);
        match page.next_cursor {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    missed.reverse();
    let mut replayed = Vec::new();
    for item in missed {
        let detail = source.detail(&item.id).await?;
        let result = send_local(&detail, &ReplayRequest::default(), target).await?;
        source.mark_replayed(&item.id).await?;
        replayed.push(result);
    }
    Ok(replayed)
}
