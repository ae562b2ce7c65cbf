//! The connect handshake: how a client asks the relay for a tunnel.
//!
//! The client opens `GET /api/v1/tunnels/connect` as a WebSocket upgrade and
//! sends [`ConnectRequest`] as headers (each also accepted as a query
//! parameter, for tools that cannot set headers). The relay answers `101
//! Switching Protocols` carrying [`ConnectAnswer`], or an error status whose
//! body is a sentence saying what to do. After the upgrade the WebSocket's
//! binary messages form one byte stream (see [`crate::byte_stream`]) carrying
//! HTTP/2: the relay is the HTTP/2 client, `ferry` the HTTP/2 server.
//!
//! Fields are added, or the version bumped; a field's meaning never changes.

use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue};

use crate::subdomain::{InvalidSubdomain, Subdomain};

/// The tunnel protocol this build speaks. Relay and client must agree.
pub const PROTOCOL_VERSION: u32 = 1;

/// The path a client opens the tunnel WebSocket on.
pub const CONNECT_PATH: &str = "/api/v1/tunnels/connect";

/// The tunnel endpoint of a relay reached without TLS at `authority`
/// (`127.0.0.1:8080`).
pub fn connect_url(authority: impl std::fmt::Display) -> String {
    format!("ws://{authority}{CONNECT_PATH}")
}

/// Request header: the client's [`PROTOCOL_VERSION`].
pub const VERSION_HEADER: &str = "ferry-protocol-version";
/// Query parameter with the same meaning as [`VERSION_HEADER`].
pub const VERSION_QUERY: &str = "version";
/// Request header: the subdomain the client wants; absent for a random one.
pub const SUBDOMAIN_HEADER: &str = "ferry-subdomain";
/// Query parameter with the same meaning as [`SUBDOMAIN_HEADER`].
pub const SUBDOMAIN_QUERY: &str = "subdomain";
/// Request header: a random key a client keeps per relay (on disk, across
/// restarts), so that on a relay without tokens it can take its own name back.
pub const CLIENT_KEY_HEADER: &str = "ferry-client-key";
/// Query parameter with the same meaning as [`CLIENT_KEY_HEADER`].
pub const CLIENT_KEY_QUERY: &str = "client_key";
/// Request header: the client's program and version, such as `ferry/0.1.0`,
/// shown in the API and dashboard.
pub const CLIENT_VERSION_HEADER: &str = "ferry-client-version";
/// Request header: the local target the client forwards to, shown in the
/// API and dashboard.
pub const TARGET_HEADER: &str = "ferry-target";
/// Response header on `101`: the tunnel's public URL.
pub const PUBLIC_URL_HEADER: &str = "ferry-public-url";
/// Response header on `101`: the subdomain the relay assigned.
pub const ASSIGNED_SUBDOMAIN_HEADER: &str = "ferry-subdomain";
/// Longest free-text field (client version, target) the relay keeps.
pub const MAX_TEXT_FIELD: usize = 256;

/// Largest WebSocket message a side writes: one chunk of the byte stream,
/// room for a whole HTTP/2 frame of [`MAX_FRAME_SIZE`] with its header.
pub const WRITE_CHUNK: usize = 128 * 1024;
/// Largest WebSocket message or frame a side accepts; above [`WRITE_CHUNK`]
/// so that a peer may raise its chunk within the same protocol version.
pub const MAX_MESSAGE: usize = 1024 * 1024;
/// HTTP/2 per-stream flow-control window: how much of one request or response
/// body may be in flight before the receiver reads it. Bounds memory per
/// stream and is how a slow local server back-pressures the public caller.
pub const STREAM_WINDOW: u32 = 1024 * 1024;
/// HTTP/2 connection flow-control window, shared by all streams of a tunnel.
/// Data the relay has not yet passed on to a slow caller holds it, so it is
/// sized for many stalled streams: one caller address's share of a tunnel's
/// slots, each holding a full [`STREAM_WINDOW`], fills at most half of it
/// (the relay checks its default against this), and the other callers'
/// responses keep flowing.
pub const CONNECTION_WINDOW: u32 = 64 * 1024 * 1024;
/// HTTP/2 maximum frame payload; larger than the 16 KiB default to cut
/// per-frame overhead on bulk bodies.
pub const MAX_FRAME_SIZE: u32 = 64 * 1024;
/// HTTP/2 streams the client accepts at once: public requests in flight on
/// one tunnel.
pub const MAX_CONCURRENT_STREAMS: u32 = 1024;
/// Largest header list of a public request the relay forwards, counted as
/// HTTP/2 counts it (name + value + 32 per field, pseudo-headers included);
/// larger requests get 431 from the relay itself.
pub const MAX_REQUEST_HEADER_LIST: usize = 32 * 1024;
/// The header list size the client advertises (`SETTINGS_MAX_HEADER_LIST_SIZE`):
/// twice what the relay forwards, so that nothing a public caller sends
/// reaches HTTP/2's connection-level abuse limits, which end the session.
pub const ADVERTISED_REQUEST_HEADER_LIST: u32 = 2 * MAX_REQUEST_HEADER_LIST as u32;
/// Largest header list of a local server's response the client sends back;
/// larger responses become a 502 that says so.
pub const MAX_RESPONSE_HEADER_LIST: usize = 64 * 1024;
/// The header list size the relay advertises, with the same room to spare.
pub const ADVERTISED_RESPONSE_HEADER_LIST: u32 = 2 * MAX_RESPONSE_HEADER_LIST as u32;
/// How often each side pings the other over HTTP/2.
pub const PING_INTERVAL: Duration = Duration::from_secs(10);
/// How long a ping may go unanswered before the link is declared dead; with
/// [`PING_INTERVAL`] a dead link is noticed within about 30 s.
pub const PING_TIMEOUT: Duration = Duration::from_secs(20);

/// How a side pings its peer over HTTP/2 to notice a dead link: a ping every
/// `interval`, and the link declared dead when one goes unanswered for
/// `timeout`. Each side pings on its own, so each notices by itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keepalive {
    /// Time between pings.
    pub interval: Duration,
    /// How long a ping may go unanswered.
    pub timeout: Duration,
}

impl Default for Keepalive {
    fn default() -> Self {
        Self {
            interval: PING_INTERVAL,
            timeout: PING_TIMEOUT,
        }
    }
}

// The limits must fit together: a peer's largest write is a message the
// other side accepts, an HTTP/2 frame (with its 9-byte header) fits in one
// message, and a dead link is noticed within about 30 s.
const _: () = {
    assert!(WRITE_CHUNK <= MAX_MESSAGE);
    assert!(MAX_FRAME_SIZE as usize + 9 <= WRITE_CHUNK);
    assert!(MAX_FRAME_SIZE as usize + 9 <= MAX_MESSAGE);
    assert!(STREAM_WINDOW <= CONNECTION_WINDOW);
    assert!(PING_INTERVAL.as_secs() + PING_TIMEOUT.as_secs() <= 30);
    assert!(ADVERTISED_REQUEST_HEADER_LIST as usize >= 2 * MAX_REQUEST_HEADER_LIST);
    assert!(ADVERTISED_RESPONSE_HEADER_LIST as usize >= 2 * MAX_RESPONSE_HEADER_LIST);
};

/// Request headers the relay adds to each public request for the client; the
/// relay strips any a public caller sent.
pub mod meta {
    use std::net::IpAddr;

    use http::{HeaderMap, HeaderName, HeaderValue};

    use crate::ids::ExchangeId;

    /// The relay's id for this exchange.
    pub const EXCHANGE_ID: &str = "ferry-exchange-id";
    /// The public caller's IP address.
    pub const CLIENT_IP: &str = "ferry-client-ip";
    /// `http` or `https`: how the public caller reached the relay.
    pub const SCHEME: &str = "ferry-scheme";
    /// Prefix shared by all of Ferry's own headers.
    pub const PREFIX: &str = "ferry-";
    /// On a response the client made up itself (a 502 or 504): why, as the
    /// activity log names it (`target_unreachable`, `target_timeout`,
    /// `failed`). The relay removes it before the caller sees the response.
    pub const OUTCOME: &str = "ferry-outcome";

    /// What the relay tells the client about one public request.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct RequestMeta {
        /// The relay's id for the exchange.
        pub exchange: ExchangeId,
        /// The public caller's IP address.
        pub client_ip: IpAddr,
        /// `true` when the caller came over HTTPS.
        pub https: bool,
    }

    impl RequestMeta {
        /// The scheme the public caller used.
        pub fn scheme(&self) -> &'static str {
            if self.https {
                "https"
            } else {
                "http"
            }
        }

        /// Writes the metadata headers, replacing any of the same names.
        pub fn insert(&self, headers: &mut HeaderMap) {
            // Values that are valid header text by construction, taken as
            // they are rather than checked and copied again.
            if let Ok(value) = HeaderValue::try_from(self.exchange.to_string()) {
                headers.insert(HeaderName::from_static(EXCHANGE_ID), value);
            }
            if let Ok(value) = HeaderValue::try_from(self.client_ip.to_string()) {
                headers.insert(HeaderName::from_static(CLIENT_IP), value);
            }
            headers.insert(
                HeaderName::from_static(SCHEME),
                HeaderValue::from_static(self.scheme()),
            );
        }

        /// Reads and removes the metadata headers; `None` when any is
        /// missing or malformed (a request that did not come from a relay).
        pub fn take(headers: &mut HeaderMap) -> Option<Self> {
            fn text(value: &Option<HeaderValue>) -> Option<&str> {
                value.as_ref()?.to_str().ok()
            }
            let exchange = headers.remove(EXCHANGE_ID);
            let client_ip = headers.remove(CLIENT_IP);
            let scheme = headers.remove(SCHEME);
            let https = match text(&scheme) {
                Some("https") => Some(true),
                Some("http") => Some(false),
                _ => None,
            };
            Some(Self {
                exchange: text(&exchange)?.parse().ok()?,
                client_ip: text(&client_ip)?.parse().ok()?,
                https: https?,
            })
        }
    }
}

/// What a client asks for when it connects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectRequest {
    /// The client's protocol version.
    pub version: u32,
    /// The subdomain asked for; `None` lets the relay choose one.
    pub subdomain: Option<Subdomain>,
    /// The client's reconnect key for this relay, if it sent one.
    pub client_key: Option<String>,
    /// The client's program and version, such as `ferry/0.1.0`.
    pub client_version: Option<String>,
    /// The local target the client forwards to, such as `http://localhost:3000`.
    pub target: Option<String>,
}

/// What the relay answers on a successful connect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectAnswer {
    /// The subdomain the tunnel was given.
    pub subdomain: Subdomain,
    /// The URL public callers use, such as `http://brave-otter.localhost:8080`.
    pub public_url: String,
}

/// Why a connect request or answer could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    /// No protocol version was sent.
    #[error(
        "missing `{VERSION_HEADER}` header: this endpoint is for `ferry http`, which sends it"
    )]
    MissingVersion,
    /// The version was not a number.
    #[error("`{VERSION_HEADER}` must be a whole number, got `{0}`")]
    MalformedVersion(String),
    /// The client speaks an older protocol than the relay.
    #[error("this relay speaks Ferry protocol {relay} but the client speaks {client}: upgrade the ferry client")]
    ClientTooOld {
        /// The relay's version.
        relay: u32,
        /// The client's version.
        client: u32,
    },
    /// The client speaks a newer protocol than the relay.
    #[error("this relay speaks Ferry protocol {relay} but the client speaks {client}: upgrade the relay (ferry-relay), or use an older ferry client")]
    RelayTooOld {
        /// The relay's version.
        relay: u32,
        /// The client's version.
        client: u32,
    },
    /// The requested subdomain is not a valid name.
    #[error(transparent)]
    Subdomain(#[from] InvalidSubdomain),
    /// A header value was not visible ASCII.
    #[error("header `{0}` is not valid text")]
    NotText(&'static str),
    /// A free-text field is longer than [`MAX_TEXT_FIELD`].
    #[error("header `{0}` is longer than {MAX_TEXT_FIELD} bytes")]
    TooLong(&'static str),
    /// An answer lacks a field every relay sends.
    #[error("the answer has no `{0}` header: is this a Ferry relay?")]
    MissingAnswer(&'static str),
}

impl ConnectRequest {
    /// A request for this build's protocol version.
    pub fn new(subdomain: Option<Subdomain>) -> Self {
        Self {
            version: PROTOCOL_VERSION,
            subdomain,
            client_key: None,
            client_version: None,
            target: None,
        }
    }

    /// Writes the request as the upgrade request's headers (the client side).
    pub fn write(&self, headers: &mut HeaderMap) {
        let fields = [
            (VERSION_HEADER, Some(self.version.to_string())),
            (
                SUBDOMAIN_HEADER,
                self.subdomain.as_ref().map(|s| s.to_string()),
            ),
            (CLIENT_KEY_HEADER, self.client_key.clone()),
            (CLIENT_VERSION_HEADER, self.client_version.clone()),
            (TARGET_HEADER, self.target.clone()),
        ];
        for (name, value) in fields {
            if let Some(value) = value.and_then(|v| HeaderValue::from_str(&v).ok()) {
                headers.insert(HeaderName::from_static(name), value);
            }
        }
    }

    /// Reads a connect request from the upgrade request's headers and query
    /// string (headers win), and checks the protocol version (the relay side).
    pub fn from_parts(headers: &HeaderMap, query: Option<&str>) -> Result<Self, HandshakeError> {
        let field = |header: &'static str,
                     query_name: Option<&str>|
         -> Result<Option<String>, HandshakeError> {
            let value = match headers.get(header) {
                Some(value) => Some(
                    value
                        .to_str()
                        .map_err(|_| HandshakeError::NotText(header))?
                        .trim()
                        .to_owned(),
                ),
                None => query_name.and_then(|name| query.and_then(|q| query_value(q, name))),
            };
            match value {
                Some(v) if v.len() > MAX_TEXT_FIELD => Err(HandshakeError::TooLong(header)),
                Some(v) if v.is_empty() => Ok(None),
                other => Ok(other),
            }
        };
        let version =
            field(VERSION_HEADER, Some(VERSION_QUERY))?.ok_or(HandshakeError::MissingVersion)?;
        let version: u32 = version
            .parse()
            .map_err(|_| HandshakeError::MalformedVersion(version.clone()))?;
        match version.cmp(&PROTOCOL_VERSION) {
            std::cmp::Ordering::Less => {
                return Err(HandshakeError::ClientTooOld {
                    relay: PROTOCOL_VERSION,
                    client: version,
                })
            }
            std::cmp::Ordering::Greater => {
                return Err(HandshakeError::RelayTooOld {
                    relay: PROTOCOL_VERSION,
                    client: version,
                })
            }
            std::cmp::Ordering::Equal => {}
        }
        let subdomain = field(SUBDOMAIN_HEADER, Some(SUBDOMAIN_QUERY))?
            .map(|name| Subdomain::parse(&name))
            .transpose()?;
        Ok(Self {
            version,
            subdomain,
            client_key: field(CLIENT_KEY_HEADER, Some(CLIENT_KEY_QUERY))?,
            client_version: field(CLIENT_VERSION_HEADER, None)?,
            target: field(TARGET_HEADER, None)?,
        })
    }
}

impl ConnectAnswer {
    /// Writes the answer as headers of the `101` response (the relay side).
    pub fn write(&self, headers: &mut HeaderMap) {
        let fields = [
            (PUBLIC_URL_HEADER, self.public_url.as_str()),
            (ASSIGNED_SUBDOMAIN_HEADER, self.subdomain.as_str()),
        ];
        for (name, value) in fields {
            if let Ok(value) = HeaderValue::from_str(value) {
                headers.insert(HeaderName::from_static(name), value);
            }
        }
    }

    /// Reads the answer from the `101` response's headers (the client side).
    pub fn read(headers: &HeaderMap) -> Result<Self, HandshakeError> {
        let text = |name: &'static str| {
            headers
                .get(name)
                .ok_or(HandshakeError::MissingAnswer(name))?
                .to_str()
                .map_err(|_| HandshakeError::NotText(name))
        };
        Ok(Self {
            subdomain: Subdomain::parse(text(ASSIGNED_SUBDOMAIN_HEADER)?)?,
            public_url: text(PUBLIC_URL_HEADER)?.to_owned(),
        })
    }
}

/// The raw value of `name` in a query string. The fields it carries (numbers,
/// DNS labels, hex keys) hold nothing that needs percent-decoding.
fn query_value(query: &str, name: &str) -> Option<String> {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('=').or(Some((pair, ""))))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value.to_owned())
}

#[cfg(test)]
mod tests {
    use http::{HeaderMap, HeaderValue};

    use super::meta::RequestMeta;
    use super::{
        ConnectAnswer, ConnectRequest, HandshakeError, PROTOCOL_VERSION, SUBDOMAIN_HEADER,
        TARGET_HEADER, VERSION_HEADER,
    };
    use crate::ids::ExchangeId;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, HeaderValue::from_str(value).unwrap());
        }
        map
    }

    #[test]
    fn reads_headers_then_query() {
        let version = PROTOCOL_VERSION.to_string();
        let req = ConnectRequest::from_parts(
            &headers(&[(VERSION_HEADER, &version)]),
            Some("subdomain=Demo"),
        )
        .unwrap();
        assert_eq!(req.subdomain.unwrap().as_str(), "demo");
        let req = ConnectRequest::from_parts(
            &headers(&[(VERSION_HEADER, &version), (SUBDOMAIN_HEADER, "hdr")]),
            Some("subdomain=query"),
        )
        .unwrap();
        assert_eq!(req.subdomain.unwrap().as_str(), "hdr");
        let req =
            ConnectRequest::from_parts(&HeaderMap::new(), Some(&format!("version={version}")))
                .unwrap();
        assert_eq!(req.subdomain, None);
    }

    #[test]
    fn version_mismatch_names_the_side_to_upgrade() {
        let newer = (PROTOCOL_VERSION + 1).to_string();
        let err =
            ConnectRequest::from_parts(&headers(&[(VERSION_HEADER, &newer)]), None).unwrap_err();
        assert!(matches!(err, HandshakeError::RelayTooOld { .. }));
        assert!(err.to_string().contains("upgrade the relay"));
        let err = ConnectRequest::from_parts(&headers(&[(VERSION_HEADER, "0")]), None).unwrap_err();
        assert!(err.to_string().contains("upgrade the ferry client"));
        let err =
            ConnectRequest::from_parts(&headers(&[(VERSION_HEADER, "one")]), None).unwrap_err();
        assert_eq!(err, HandshakeError::MalformedVersion("one".into()));
        assert_eq!(
            ConnectRequest::from_parts(&HeaderMap::new(), None),
            Err(HandshakeError::MissingVersion)
        );
    }

    #[test]
    fn invalid_subdomain_is_refused() {
        let version = PROTOCOL_VERSION.to_string();
        let err = ConnectRequest::from_parts(
            &headers(&[(VERSION_HEADER, &version), (SUBDOMAIN_HEADER, "no_way")]),
            None,
        )
        .unwrap_err();
        assert!(matches!(err, HandshakeError::Subdomain(_)));
    }

    #[test]
    fn request_answer_and_metadata_round_trip() {
        let request = ConnectRequest {
            client_key: Some("00ff".into()),
            client_version: Some("ferry/0.1.0".into()),
            target: Some("http://localhost:3000".into()),
            ..ConnectRequest::new(Some("demo".parse().unwrap()))
        };
        let mut map = HeaderMap::new();
        request.write(&mut map);
        assert_eq!(ConnectRequest::from_parts(&map, None), Ok(request));

        let answer = ConnectAnswer {
            subdomain: "demo".parse().unwrap(),
            public_url: "https://demo.relay.test".into(),
        };
        let mut map = HeaderMap::new();
        answer.write(&mut map);
        assert_eq!(ConnectAnswer::read(&map), Ok(answer));
        assert!(ConnectAnswer::read(&HeaderMap::new()).is_err());

        let meta = RequestMeta {
            exchange: ExchangeId::new(),
            client_ip: "203.0.113.9".parse().unwrap(),
            https: true,
        };
        let mut map = headers(&[("x-other", "kept")]);
        meta.insert(&mut map);
        assert_eq!(RequestMeta::take(&mut map), Some(meta));
        assert_eq!(map.len(), 1, "the metadata headers are taken out");
    }

    #[test]
    fn oversized_text_fields_are_refused() {
        let version = PROTOCOL_VERSION.to_string();
        let long = "x".repeat(300);
        let err = ConnectRequest::from_parts(
            &headers(&[(VERSION_HEADER, &version), (TARGET_HEADER, &long)]),
            None,
        )
        .unwrap_err();
        assert_eq!(err, HandshakeError::TooLong(TARGET_HEADER));
    }
}
