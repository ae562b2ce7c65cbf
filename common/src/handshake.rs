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

use http::HeaderMap;

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
/// Request header: a random key a client process keeps across reconnects, so
/// that on a relay without tokens it can take its own name back.
pub const CLIENT_KEY_HEADER: &str = "ferry-client-key";
/// Response header on `101`: the tunnel's public URL.
pub const PUBLIC_URL_HEADER: &str = "ferry-public-url";
/// Response header on `101`: the subdomain the relay assigned.
pub const ASSIGNED_SUBDOMAIN_HEADER: &str = "ferry-subdomain";

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
pub const CONNECTION_WINDOW: u32 = 8 * 1024 * 1024;
/// HTTP/2 maximum frame payload; larger than the 16 KiB default to cut
/// per-frame overhead on bulk bodies.
pub const MAX_FRAME_SIZE: u32 = 64 * 1024;
/// HTTP/2 streams the client accepts at once: public requests in flight on
/// one tunnel.
pub const MAX_CONCURRENT_STREAMS: u32 = 1024;
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
};

/// Request headers the relay adds to each public request for the client; the
/// relay strips any a public caller sent.
pub mod meta {
    /// The relay's id for this exchange.
    pub const EXCHANGE_ID: &str = "ferry-exchange-id";
    /// The public caller's IP address.
    pub const CLIENT_IP: &str = "ferry-client-ip";
    /// `http` or `https`: how the public caller reached the relay.
    pub const SCHEME: &str = "ferry-scheme";
    /// Prefix shared by all of Ferry's own headers.
    pub const PREFIX: &str = "ferry-";
}

/// What a client asks for when it connects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectRequest {
    /// The client's protocol version.
    pub version: u32,
    /// The subdomain asked for; `None` lets the relay choose one.
    pub subdomain: Option<Subdomain>,
    /// The client process's reconnect key, if it sent one.
    pub client_key: Option<String>,
}

/// What the relay answers on a successful connect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectAnswer {
    /// The subdomain the tunnel was given.
    pub subdomain: Subdomain,
    /// The URL public callers use, such as `http://brave-otter.localhost:8080`.
    pub public_url: String,
}

/// Why a connect request could not be read.
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
}

impl ConnectRequest {
    /// Reads a connect request from the upgrade request's headers and query
    /// string (headers win), and checks the protocol version.
    pub fn from_parts(headers: &HeaderMap, query: Option<&str>) -> Result<Self, HandshakeError> {
        let field =
            |header: &'static str, query_name: &str| -> Result<Option<String>, HandshakeError> {
                if let Some(value) = headers.get(header) {
                    let text = value
                        .to_str()
                        .map_err(|_| HandshakeError::NotText(header))?;
                    return Ok(Some(text.trim().to_owned()));
                }
                Ok(query.and_then(|q| query_value(q, query_name)))
            };
        let version =
            field(VERSION_HEADER, VERSION_QUERY)?.ok_or(HandshakeError::MissingVersion)?;
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
        let subdomain = field(SUBDOMAIN_HEADER, SUBDOMAIN_QUERY)?
            .filter(|name| !name.is_empty())
            .map(|name| Subdomain::parse(&name))
            .transpose()?;
        let client_key = field(CLIENT_KEY_HEADER, "client_key")?.filter(|key| !key.is_empty());
        Ok(Self {
            version,
            subdomain,
            client_key,
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

    use super::{
        ConnectRequest, HandshakeError, PROTOCOL_VERSION, SUBDOMAIN_HEADER, VERSION_HEADER,
    };

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
}
