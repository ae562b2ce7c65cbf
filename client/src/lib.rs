//! `ferry`, the client: exposes a local server through a Ferry relay.
//!
//! - [`tunnel`]: connects to the relay, serves its HTTP/2 streams over the
//!   WebSocket, reconnects with backoff.
//! - [`forward`]: turns each stream into a request to the local target.
//! - [`terminal`]: what `ferry http` prints: the status block and a line
//!   per request, or a JSON object per event; [`counters`] keeps its
//!   request counters (rate, percentiles).
//! - [`target`]: the local target and the Host header it sees.
//! - [`activity`]: the activity log from the command line: list, show,
//!   export and replay, through a relay's API or the data directory.
//! - [`webhooks`]: webhooks, event types, events and deliveries, through a
//!   relay's API.
//! - [`embedded`]: the in-process relay `ferry http` starts when no relay is
//!   configured.
//! - [`keys`]: the reconnect key kept per relay in the config directory.
//! - [`local_tls`]: TLS towards `https://` targets with self-signed certificates.
//!
//! [`run`] drives one tunnel until its shutdown token is cancelled and
//! reports what happens as [`Event`]s, which `main` prints and tests await.

pub mod activity;
pub mod counters;
pub mod embedded;
pub mod forward;
pub mod keys;
pub mod local_tls;
pub mod target;
pub mod terminal;
pub mod tunnel;
pub mod webhooks;

use std::fmt;
use std::time::Duration;

use ferry_common::handshake::{Keepalive, CONNECT_PATH};
use ferry_common::subdomain::Subdomain;

pub use forward::InFlight;
pub use target::{HostHeader, Target};
pub use tunnel::{run, run_counting};

/// How long the local target may take to answer with headers by default.
pub const DEFAULT_LOCAL_TIMEOUT: Duration = Duration::from_secs(60);

/// What `ferry http` was asked to do, already validated.
#[derive(Clone)]
pub struct Config {
    /// The relay's tunnel endpoint, `ws://…/api/v1/tunnels/connect` or `wss://…`.
    pub relay: String,
    /// The token the relay wants, if any.
    pub token: Option<String>,
    /// The subdomain to ask for; `None` lets the relay choose.
    pub subdomain: Option<Subdomain>,
    /// The local server.
    pub target: Target,
    /// What Host header the local server sees.
    pub host_header: HostHeader,
    /// How long the local server may take to answer with headers.
    pub local_timeout: Duration,
    /// How the client pings the relay to notice a dead link.
    pub keepalive: Keepalive,
    /// Certificate authorities trusted for a `wss://` relay besides the
    /// public ones, for relays with a private CA.
    pub relay_ca: Vec<rustls::pki_types::CertificateDer<'static>>,
    /// The reconnect key this client keeps for the relay (see
    /// [`keys::client_key`]); a new random one per process when `None`.
    pub client_key: Option<String>,
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("relay", &self.relay)
            .field("token", &self.token.as_ref().map(|_| "MASKED"))
            .field("subdomain", &self.subdomain)
            .field("target", &self.target)
            .field("host_header", &self.host_header)
            .field("local_timeout", &self.local_timeout)
            .field("keepalive", &self.keepalive)
            .field("relay_ca", &self.relay_ca.len())
            .field("client_key", &self.client_key.as_ref().map(|_| "MASKED"))
            .finish()
    }
}

/// Turns what a user may type for a relay (`relay.example.com`,
/// `https://relay.example.com`, `ws://127.0.0.1:8080`) into the WebSocket
/// URL of its tunnel endpoint.
pub fn relay_url(input: &str) -> Result<String, Error> {
    let text = input.trim();
    let bad = |why: &str| Error::BadRelay(input.to_owned(), why.to_owned());
    let (scheme, rest) = match text.split_once("://") {
        Some((scheme, rest)) => match scheme.to_ascii_lowercase().as_str() {
            "ws" | "http" => ("ws", rest),
            "wss" | "https" => ("wss", rest),
            _ => return Err(bad("use a ws://, wss://, http:// or https:// address")),
        },
        None => ("wss", text),
    };
    let (authority, path) = rest.split_once('/').map_or((rest, ""), |(a, p)| (a, p));
    if authority.is_empty() || authority.contains(['@', ' ']) {
        return Err(bad("the host is missing or malformed"));
    }
    let path = if path.is_empty() {
        CONNECT_PATH.trim_start_matches('/')
    } else {
        path
    };
    let url = format!("{scheme}://{authority}/{path}");
    url.parse::<hyper::Uri>()
        .map_err(|_| bad("the host is malformed"))?;
    Ok(url)
}

/// The dashboard of the relay whose tunnel endpoint is `relay` (as
/// [`relay_url`] makes it): `/` on the relay's own host, where its API is.
pub fn dashboard_url(relay: &str) -> Option<String> {
    let uri: hyper::Uri = relay.parse().ok()?;
    let scheme = match uri.scheme_str()? {
        "ws" | "http" => "http",
        "wss" | "https" => "https",
        _ => return None,
    };
    Some(format!("{scheme}://{}/", uri.authority()?))
}

/// What happens to a tunnel, for the terminal and for tests.
#[derive(Debug, Clone)]
pub enum Event {
    /// The tunnel is up.
    Connected {
        /// The URL public callers use.
        public_url: String,
        /// The local target requests go to.
        target: String,
        /// Whether this follows a drop.
        reconnected: bool,
    },
    /// The link to the relay dropped.
    Disconnected {
        /// Why, as the relay said or as far as is known.
        reason: String,
    },
    /// The next connect attempt is in `delay`.
    Reconnecting {
        /// How long until the attempt.
        delay: Duration,
    },
    /// The client is shutting down and waits for requests in flight.
    Stopping,
    /// A request was forwarded (or failed to be).
    Request(Exchange),
    /// Something the user should know that does not stop the tunnel.
    Warning(String),
}

/// One forwarded request, as the terminal shows it.
#[derive(Debug, Clone)]
pub struct Exchange {
    /// When the request reached the client.
    pub received: std::time::SystemTime,
    /// The relay's id for the exchange, when the relay sent one.
    pub id: Option<ferry_common::ids::ExchangeId>,
    /// The HTTP method.
    pub method: String,
    /// The path and query.
    pub path: String,
    /// The status sent back to the public caller.
    pub status: u16,
    /// Time until the response headers.
    pub elapsed: Duration,
    /// Why the request did not reach the target, if it did not.
    pub error: Option<String>,
}

/// Why the tunnel stopped for good.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The relay address cannot be used.
    #[error("`{0}` is not a usable relay address: {1}")]
    BadRelay(String, String),
    /// The relay could not be reached.
    #[error("cannot reach the relay at {0}: {1}")]
    Unreachable(String, String),
    /// The relay refused the tunnel, saying why.
    #[error("the relay refused the tunnel ({status}): {message}")]
    Refused {
        /// The HTTP status of the refusal.
        status: u16,
        /// The relay's explanation.
        message: String,
    },
    /// The relay ended the session by policy (such as a takeover).
    #[error("the relay closed the tunnel: {0}")]
    Closed(String),
    /// A `--relay-ca` certificate cannot be used.
    #[error("the relay CA certificate cannot be used: {0}")]
    RelayCa(String),
    /// The embedded relay could not start.
    #[error("cannot start the embedded relay: {0}")]
    Embedded(#[source] std::io::Error),
}

impl Error {
    /// Whether retrying cannot help: the relay said no for a reason that
    /// will not change by itself.
    pub fn is_final(&self) -> bool {
        match self {
            Error::Refused { status, .. } => (400..500).contains(status),
            Error::BadRelay(..) | Error::Closed(_) | Error::Embedded(_) | Error::RelayCa(_) => true,
            Error::Unreachable(..) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{dashboard_url, relay_url};

    #[test]
    fn the_dashboard_is_at_the_root_of_the_relays_host() {
        let url = |s| dashboard_url(&relay_url(s).unwrap());
        assert_eq!(
            url("ws://127.0.0.1:8080").as_deref(),
            Some("http://127.0.0.1:8080/")
        );
        assert_eq!(
            url("relay.example.com").as_deref(),
            Some("https://relay.example.com/")
        );
        assert_eq!(
            url("http://r:1/custom/path").as_deref(),
            Some("http://r:1/")
        );
    }

    #[test]
    fn relay_addresses_become_tunnel_urls() {
        let url = |s| relay_url(s).unwrap();
        assert_eq!(
            url("ws://127.0.0.1:8080"),
            "ws://127.0.0.1:8080/api/v1/tunnels/connect"
        );
        assert_eq!(
            url("https://relay.example.com/"),
            "wss://relay.example.com/api/v1/tunnels/connect"
        );
        assert_eq!(
            url("relay.example.com"),
            "wss://relay.example.com/api/v1/tunnels/connect"
        );
        assert_eq!(url("http://r:1/custom/path"), "ws://r:1/custom/path");
        for bad in ["ftp://x", "ws://", "ws://a b", "ws://u@x"] {
            assert!(relay_url(bad).is_err(), "{bad}");
        }
    }
}
