//! The egress guard: everything the relay sends out (replays to a URL,
//! webhook deliveries) goes through [`Egress`], which refuses targets on
//! loopback, private, link-local and other non-public addresses unless the
//! operator allows them (`--egress-allow`). Without it, anyone who may
//! replay a request could make the relay reach what only its own network
//! can (SSRF).
//!
//! The host is resolved once, every address it resolves to is checked, and
//! the connection goes to a checked address, so DNS that answers
//! differently the second time (rebinding) cannot slip past. Redirects are
//! returned, never followed: a 3xx pointing at a private address would
//! otherwise be a way around the check.

use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use http::header::HOST;
use http::uri::PathAndQuery;
use http::{HeaderValue, Request, Response, Uri, Version};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, RootCertStore};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use host::{parse_host, Host};

pub use address::refusal;

mod address;
mod host;

/// How long one TCP connect may take, within the caller's own timeout: a
/// target address that drops packets should not use all of it when the
/// host has another address.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Resolves host names to addresses; injectable so that tests can answer
/// as hostile DNS would.
#[async_trait]
pub trait Resolve: Send + Sync {
    /// The addresses of `host`, for a connection to `port`.
    async fn resolve(&self, host: &str, port: u16) -> io::Result<Vec<IpAddr>>;
}

/// The operating system's resolver.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemResolver;

#[async_trait]
impl Resolve for SystemResolver {
    async fn resolve(&self, host: &str, port: u16) -> io::Result<Vec<IpAddr>> {
        Ok(tokio::net::lookup_host((host, port))
            .await?
            .map(|addr| addr.ip())
            .collect())
    }
}

/// An exception to the guard, from `--egress-allow`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Allow {
    /// Addresses inside this network pass.
    Net(IpNet),
    /// This host name (exact, case-insensitive) passes whatever it resolves
    /// to: the operator trusts the name.
    Host(String),
}

impl Allow {
    /// Loopback, IPv4 and IPv6: what the embedded relay on a developer's
    /// machine allows, so that replays reach `localhost`.
    pub fn loopback() -> Vec<Allow> {
        vec![
            Allow::Net(IpNet::V4(Ipv4Net::new_assert(
                Ipv4Addr::new(127, 0, 0, 0),
                8,
            ))),
            Allow::Net(IpNet::V6(Ipv6Net::new_assert(Ipv6Addr::LOCALHOST, 128))),
        ]
    }

    fn allows_addr(&self, ip: IpAddr) -> bool {
        matches!(self, Allow::Net(net) if net.contains(&ip))
    }

    /// `name` is lowercase without a trailing dot; the allowed name may have
    /// been built by hand rather than parsed.
    fn allows_host(&self, name: &str) -> bool {
        matches!(self, Allow::Host(host) if host.trim_end_matches('.').eq_ignore_ascii_case(name))
    }
}

impl FromStr for Allow {
    type Err = String;

    /// A CIDR (`10.0.0.0/8`, `fd00::/8`), an address (a /32 or /128) or a
    /// host name.
    fn from_str(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if let Ok(net) = text.parse::<IpNet>() {
            return Ok(Allow::Net(net.trunc()));
        }
        if let Ok(ip) = text.parse::<IpAddr>() {
            return Ok(Allow::Net(ip.into()));
        }
        let invalid = || {
            format!("`{text}` is neither a network such as 10.0.0.0/8, an address nor a host name")
        };
        if text.contains('/') {
            return Err(invalid());
        }
        match parse_host(text) {
            Ok(Host::Ip(ip)) => Ok(Allow::Net(ip.into())),
            Ok(Host::Name(name)) => Ok(Allow::Host(name)),
            Err(_) => Err(invalid()),
        }
    }
}

impl fmt::Display for Allow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Allow::Net(net) => net.fmt(f),
            Allow::Host(host) => f.write_str(host),
        }
    }
}

/// Why the relay did not send a request out.
#[derive(Debug, thiserror::Error)]
pub enum EgressError {
    /// The URL is not one the relay sends to; the message says why.
    #[error("{0}")]
    BadUrl(String),
    /// The target is, or resolves to, an address the guard refuses.
    #[error(
        "{}; the relay does not send requests to private, local or reserved addresses \
         unless its operator allows them with --egress-allow",
        refused_reason(host, *addr, why)
    )]
    Refused {
        /// The URL's host, lowercase.
        host: String,
        /// The refused address.
        addr: IpAddr,
        /// What kind of address it is: "a loopback address".
        why: &'static str,
    },
    /// The host name did not resolve.
    #[error("cannot resolve {0}: {1}; check the host name")]
    Resolve(String, #[source] io::Error),
    /// No checked address accepted a connection.
    #[error("cannot connect to {0}: {1}; is the target up and reachable from the relay?")]
    Connect(SocketAddr, #[source] io::Error),
    /// The TLS handshake failed: often a certificate that is expired,
    /// self-signed or for another name.
    #[error(
        "TLS with {0} failed: {1}; the target needs a valid certificate for its name from a \
         public authority"
    )]
    Tls(String, #[source] io::Error),
    /// No response head within the caller's timeout.
    #[error("no response from the target within {} s", .0.as_secs_f64())]
    Timeout(Duration),
    /// The HTTP exchange failed after connecting.
    #[error("the HTTP exchange failed: {0}")]
    Http(#[source] hyper::Error),
}

/// "10.0.0.1 is a private address" for an address written as itself,
/// "host resolves to 10.0.0.1, a private address" otherwise (including odd
/// spellings such as `0x7f.1`).
fn refused_reason(host: &str, addr: IpAddr, why: &str) -> String {
    if host.parse::<IpAddr>() == Ok(addr) {
        format!("{addr} is {why}")
    } else {
        format!("{host} resolves to {addr}, {why}")
    }
}

/// Sends requests out, through the guard.
#[derive(Clone)]
pub struct Egress {
    /// The operator's exceptions.
    allow: Vec<Allow>,
    /// Where host names are resolved.
    resolver: Arc<dyn Resolve>,
    /// TLS for https targets: the trusted roots, HTTP/1.1 by ALPN.
    tls: Arc<ClientConfig>,
}

impl fmt::Debug for Egress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Egress")
            .field("allow", &self.allow)
            .finish_non_exhaustive()
    }
}

/// What the guard reads from a URL.
struct Target {
    /// Whether the URL is https.
    https: bool,
    /// The host as written (lowercase, no brackets), for messages.
    written: String,
    /// The host as read: the name to resolve and to verify by TLS, or an
    /// address.
    host: Host,
    /// The explicit port, or the scheme's.
    port: u16,
}

/// A target that passed the guard.
struct Checked {
    /// The URL's target.
    target: Target,
    /// The checked addresses to connect to, never empty.
    addrs: Vec<SocketAddr>,
}

impl Egress {
    /// A guard with `allow`'s exceptions, trusting the public web PKI
    /// (Mozilla's roots) for https targets.
    pub fn new(allow: Vec<Allow>, resolver: Arc<dyn Resolve>) -> Self {
        let roots = RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        Self::with_roots(allow, resolver, roots)
    }

    /// A guard trusting `roots` for https targets, as tests trusting their
    /// own certificate authority need.
    pub fn with_roots(allow: Vec<Allow>, resolver: Arc<dyn Resolve>, roots: RootCertStore) -> Self {
        let mut tls = ClientConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()
            .expect("ring supports TLS 1.2 and 1.3")
            .with_root_certificates(roots)
            .with_no_client_auth();
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        Self {
            allow,
            resolver,
            tls: Arc::new(tls),
        }
    }

    /// Checks `url` as [`Egress::send`] would: its host (lowercase, an
    /// address without brackets), its port and the address a connection
    /// would go to.
    pub async fn check(&self, url: &Uri) -> Result<(String, u16, SocketAddr), EgressError> {
        let checked = self.checked(url).await?;
        let addr = *checked
            .addrs
            .first()
            .expect("a checked target has at least one address");
        let host = match checked.target.host {
            Host::Ip(ip) => ip.to_string(),
            Host::Name(name) => name,
        };
        Ok((host, addr.port(), addr))
    }

    /// Sends `request` to its absolute http or https URL if the guard lets
    /// it, over HTTP/1.1 on a new connection to a checked address, and
    /// returns the response head within `timeout`. A redirect is returned
    /// as it is. Host is set from the URL unless the request has one.
    pub async fn send<B>(
        &self,
        request: Request<B>,
        timeout: Duration,
    ) -> Result<Response<Incoming>, EgressError>
    where
        B: http_body::Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        tokio::time::timeout(timeout, self.exchange(request))
            .await
            .map_err(|_| EgressError::Timeout(timeout))?
    }

    async fn exchange<B>(&self, mut request: Request<B>) -> Result<Response<Incoming>, EgressError>
    where
        B: http_body::Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let Checked { target, addrs } = self.checked(request.uri()).await?;
        let authority = request
            .uri()
            .authority()
            .cloned()
            .expect("a checked URL has an authority");
        // An origin server takes the origin form; the absolute form is for
        // proxies.
        let path = request
            .uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        *request.uri_mut() = Uri::from(path);
        *request.version_mut() = Version::HTTP_11;
        if !request.headers().contains_key(HOST) {
            let host = HeaderValue::from_str(authority.as_str())
                .expect("an authority is visible ASCII, valid in a header");
            request.headers_mut().insert(HOST, host);
        }
        let tcp = connect(&addrs).await?;
        // Small requests go out at once rather than wait for an ACK.
        let _ = tcp.set_nodelay(true);
        if !target.https {
            return exchange_over(tcp, request).await;
        }
        let name = match &target.host {
            Host::Ip(ip) => ServerName::IpAddress((*ip).into()),
            Host::Name(name) => ServerName::try_from(name.clone()).map_err(|_| {
                EgressError::BadUrl(format!("`{name}` is not a host name TLS can verify"))
            })?,
        };
        let tls = TlsConnector::from(Arc::clone(&self.tls))
            .connect(name, tcp)
            .await
            .map_err(|err| EgressError::Tls(target.written.clone(), err))?;
        exchange_over(tls, request).await
    }

    /// Resolves `url`'s host and checks every address it resolves to.
    async fn checked(&self, url: &Uri) -> Result<Checked, EgressError> {
        let target = target(url)?;
        let port = target.port;
        let addrs = match &target.host {
            Host::Ip(ip) => vec![*ip],
            Host::Name(name) => {
                let addrs = self
                    .resolver
                    .resolve(name, port)
                    .await
                    .map_err(|err| EgressError::Resolve(name.clone(), err))?;
                if addrs.is_empty() {
                    let none = io::Error::new(io::ErrorKind::NotFound, "no addresses");
                    return Err(EgressError::Resolve(name.clone(), none));
                }
                addrs
            }
        };
        // An IPv4-mapped address reaches the IPv4 one: judge, allow and
        // connect to that.
        let addrs: Vec<IpAddr> = addrs.into_iter().map(|ip| ip.to_canonical()).collect();
        let trusted = matches!(&target.host, Host::Name(name) if self.allow.iter().any(|a| a.allows_host(name)));
        if !trusted {
            // One refused address refuses the host: DNS that answers with a
            // public and a private address must not get a chance.
            for &addr in &addrs {
                if self.allow.iter().any(|a| a.allows_addr(addr)) {
                    continue;
                }
                if let Some(why) = refusal(addr) {
                    return Err(EgressError::Refused {
                        host: target.written,
                        addr,
                        why,
                    });
                }
            }
        }
        let addrs = addrs
            .into_iter()
            .map(|ip| SocketAddr::new(ip, port))
            .collect();
        Ok(Checked { target, addrs })
    }
}

/// Connects to the first of `addrs` that answers.
async fn connect(addrs: &[SocketAddr]) -> Result<TcpStream, EgressError> {
    let mut failure = None;
    for &addr in addrs {
        let err = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => return Ok(stream),
            Ok(Err(err)) => err,
            Err(_) => io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no answer within {} s", CONNECT_TIMEOUT.as_secs()),
            ),
        };
        failure = Some(EgressError::Connect(addr, err));
    }
    Err(failure.expect("a checked target has at least one address"))
}

/// Sends `request` over `stream` with HTTP/1.1 and returns the response head.
async fn exchange_over<S, B>(
    stream: S,
    request: Request<B>,
) -> Result<Response<Incoming>, EgressError>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(EgressError::Http)?;
    // The connection carries the response body after this returns, so it
    // runs on its own. It cannot outlive the exchange: with `sender` gone it
    // closes once the response body is read or dropped, or at once when the
    // response future is dropped (the caller's timeout).
    tokio::spawn(async move {
        if let Err(err) = connection.await {
            tracing::debug!(%err, "egress connection failed");
        }
    });
    sender
        .send_request(request)
        .await
        .map_err(EgressError::Http)
}

/// Reads `url` as the guard needs it.
fn target(url: &Uri) -> Result<Target, EgressError> {
    let bad = |why: &str| EgressError::BadUrl(format!("`{url}` {why}"));
    let https = match url.scheme_str() {
        Some(scheme) if scheme.eq_ignore_ascii_case("http") => false,
        Some(scheme) if scheme.eq_ignore_ascii_case("https") => true,
        Some(scheme) => {
            return Err(bad(&format!(
                "is a {scheme} URL; the relay sends only http and https requests"
            )))
        }
        None => {
            return Err(bad(
                "is not an absolute URL; give one such as https://example.com/hook",
            ))
        }
    };
    let authority = url
        .authority()
        .ok_or_else(|| bad("has no host; give one such as https://example.com/hook"))?;
    if authority.as_str().contains('@') {
        return Err(bad(
            "carries a user name or password; send credentials in a header such as \
             Authorization instead",
        ));
    }
    let written = authority.host();
    let host = parse_host(written).map_err(|why| bad(&why))?;
    // `Authority::port` ignores a port it cannot read; a typo must not
    // quietly become port 80.
    let port = match authority.as_str().strip_prefix(written).unwrap_or_default() {
        "" | ":" => {
            if https {
                443
            } else {
                80
            }
        }
        port => match port.trim_start_matches(':').parse::<u16>() {
            Ok(port) if port != 0 => port,
            _ => return Err(bad("has an invalid port; give one from 1 to 65535")),
        },
    };
    let written = written
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_ascii_lowercase();
    Ok(Target {
        https,
        written,
        host,
        port,
    })
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::convert::Infallible;
    use std::io;
    use std::net::{IpAddr, SocketAddr};
    use std::sync::Arc;
    use std::time::Duration;

    use async_trait::async_trait;
    use bytes::Bytes;
    use http::{Request, Response, StatusCode, Uri};
    use http_body_util::{BodyExt, Empty, Full};
    use hyper::body::Incoming;
    use hyper_util::rt::TokioIo;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;
    use tokio::sync::mpsc;
    use tokio::task::JoinHandle;

    use super::{Allow, Egress, EgressError, Resolve, SystemResolver};

    const TIMEOUT: Duration = Duration::from_secs(10);

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn allow_rules_parse_networks_addresses_and_names() {
        assert_eq!(
            "10.0.0.0/8".parse::<Allow>().unwrap(),
            Allow::Net("10.0.0.0/8".parse().unwrap())
        );
        assert_eq!(
            "10.1.2.3/8".parse::<Allow>().unwrap(),
            Allow::Net("10.0.0.0/8".parse().unwrap()),
            "host bits are dropped"
        );
        assert_eq!(
            "192.168.1.5".parse::<Allow>().unwrap(),
            Allow::Net("192.168.1.5/32".parse().unwrap())
        );
        assert_eq!(
            "fd00::1".parse::<Allow>().unwrap(),
            Allow::Net("fd00::1/128".parse().unwrap())
        );
        assert_eq!(
            "[::1]".parse::<Allow>().unwrap(),
            Allow::Net("::1/128".parse().unwrap())
        );
        assert_eq!(
            "Intranet.Example.".parse::<Allow>().unwrap(),
            Allow::Host("intranet.example".to_owned())
        );
        for bad in ["", "10.0.0.0/33", "example.com/8", "*.example.com", "a b"] {
            assert!(bad.parse::<Allow>().is_err(), "{bad:?} was accepted");
        }
        assert_eq!(
            Allow::loopback()
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            ["127.0.0.0/8", "::1/128"]
        );
    }

    /// Answers as configured, as hostile DNS might; unknown names fail.
    struct FakeResolver(HashMap<&'static str, Vec<IpAddr>>);

    impl FakeResolver {
        fn new(entries: &[(&'static str, &[&str])]) -> Arc<Self> {
            Arc::new(Self(
                entries
                    .iter()
                    .map(|(name, addrs)| (*name, addrs.iter().map(|a| ip(a)).collect()))
                    .collect(),
            ))
        }
    }

    #[async_trait]
    impl Resolve for FakeResolver {
        async fn resolve(&self, host: &str, _port: u16) -> io::Result<Vec<IpAddr>> {
            self.0
                .get(host)
                .cloned()
                .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "unknown host"))
        }
    }

    fn uri(text: &str) -> Uri {
        text.parse().unwrap()
    }

    async fn refused(egress: &Egress, url: &str) -> (String, IpAddr, &'static str) {
        match egress.check(&uri(url)).await {
            Err(EgressError::Refused { host, addr, why }) => (host, addr, why),
            other => panic!("{url}: {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_name_with_any_private_address_is_refused() {
        let resolver = FakeResolver::new(&[
            ("evil.example", &["93.184.216.34", "10.0.0.1"]),
            ("rebind.example", &["127.0.0.1"]),
            ("mapped.example", &["::ffff:169.254.169.254"]),
            ("public.example", &["192.0.2.10"]),
        ]);
        let egress = Egress::new(Vec::new(), resolver);
        let (host, addr, why) = refused(&egress, "https://evil.example/hook").await;
        assert_eq!((host.as_str(), addr), ("evil.example", ip("10.0.0.1")));
        assert_eq!(why, "a private address");
        let (_, addr, _) = refused(&egress, "http://rebind.example/").await;
        assert_eq!(addr, ip("127.0.0.1"));
        let (_, addr, why) = refused(&egress, "http://mapped.example/").await;
        assert_eq!((addr, why), (ip("169.254.169.254"), "a link-local address"));

        // `send` refuses before it connects anywhere.
        let request = Request::post("http://public.example:9/hook")
            .body(Empty::<Bytes>::new())
            .unwrap();
        let err = egress.send(request, TIMEOUT).await.unwrap_err();
        assert!(
            matches!(err, EgressError::Refused { addr, .. } if addr == ip("192.0.2.10")),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            "public.example resolves to 192.0.2.10, a documentation address; the relay does \
             not send requests to private, local or reserved addresses unless its operator \
             allows them with --egress-allow"
        );
    }

    #[tokio::test]
    async fn odd_spellings_of_loopback_are_refused_without_a_lookup() {
        // No names: a lookup would fail with Resolve, not Refused.
        let egress = Egress::new(Vec::new(), FakeResolver::new(&[]));
        for url in [
            "http://2130706433/",
            "http://0177.0.0.1/",
            "http://0x7f.1/",
            "http://127.1/",
            "http://127.0.0.1./",
            "HTTP://0X7F.0.0.1:8080/",
            "http://[::ffff:7f00:1]/",
            "http://[::ffff:127.0.0.1]/",
            "http://[::1]:3000/",
            "http://0/",
        ] {
            let (_, addr, _) = refused(&egress, url).await;
            assert!(addr.is_loopback() || addr.is_unspecified(), "{url}: {addr}");
        }
        let err = egress.check(&uri("http://0x7f.1/")).await.unwrap_err();
        assert!(
            err.to_string()
                .starts_with("0x7f.1 resolves to 127.0.0.1, a loopback address;"),
            "{err}"
        );
        let err = egress.check(&uri("http://127.0.0.1/")).await.unwrap_err();
        assert!(
            err.to_string()
                .starts_with("127.0.0.1 is a loopback address;"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn allowed_networks_and_hosts_pass() {
        let resolver = FakeResolver::new(&[
            ("intranet.example", &["10.0.0.5", "192.168.0.5"]),
            ("app.test", &["127.0.0.1"]),
            ("public.example", &["93.184.216.34"]),
        ]);
        let allow = vec![
            "Intranet.Example".parse().unwrap(),
            "172.16.0.0/12".parse().unwrap(),
        ];
        let egress = Egress::new(allow, resolver.clone());
        assert_eq!(
            egress
                .check(&uri("https://INTRANET.example./x"))
                .await
                .unwrap(),
            (
                "intranet.example".to_owned(),
                443,
                "10.0.0.5:443".parse().unwrap()
            ),
            "an allowed name passes whatever it resolves to"
        );
        assert_eq!(
            egress.check(&uri("http://172.20.1.1:8080/")).await.unwrap(),
            (
                "172.20.1.1".to_owned(),
                8080,
                "172.20.1.1:8080".parse().unwrap()
            )
        );
        refused(&egress, "http://10.0.0.5/").await;
        let (_, addr, _) = refused(&egress, "http://app.test/").await;
        assert_eq!(addr, ip("127.0.0.1"));
        assert_eq!(
            egress
                .check(&uri("http://public.example/"))
                .await
                .unwrap()
                .2,
            "93.184.216.34:80".parse().unwrap()
        );

        let local = Egress::new(Allow::loopback(), resolver);
        for url in [
            "http://app.test/",
            "http://127.0.0.2/",
            "http://[::1]/",
            "http://[::ffff:127.0.0.1]/",
        ] {
            local.check(&uri(url)).await.unwrap();
        }
        refused(&local, "http://10.0.0.1/").await;
    }

    #[tokio::test]
    async fn urls_the_relay_does_not_send_to_are_bad() {
        let egress = Egress::new(Vec::new(), FakeResolver::new(&[]));
        for url in [
            "ftp://example.com/file",
            "file://localhost/etc/passwd",
            "http://:80/",
            "gopher://example.com/",
            "/relative/path",
            "example.com",
            "http://user:secret@example.com/",
            "http://user@example.com/",
            "http://example.com:0/",
            "http://example.com:99999/",
            "http://example.com:8x/",
            "http://exa_mple..com/",
            "http://1.2.3.4.5/",
        ] {
            let err = egress.check(&uri(url)).await.unwrap_err();
            assert!(matches!(err, EgressError::BadUrl(_)), "{url}: {err:?}");
        }
        let err = egress.check(&uri("ftp://example.com/")).await.unwrap_err();
        assert!(err.to_string().contains("only http and https"), "{err}");
        let err = egress
            .check(&uri("http://u:p@example.com/"))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("Authorization"), "{err}");
        let err = egress
            .check(&uri("http://unknown.example/"))
            .await
            .unwrap_err();
        assert!(matches!(err, EgressError::Resolve(..)), "{err:?}");
        assert_eq!(
            egress
                .check(&uri("http://[2606:4700::1111]:/"))
                .await
                .unwrap(),
            (
                "2606:4700::1111".to_owned(),
                80,
                "[2606:4700::1111]:80".parse().unwrap()
            ),
            "an empty port is the scheme's"
        );
    }

    #[tokio::test]
    async fn the_system_resolver_is_checked_too() {
        let egress = Egress::new(Vec::new(), Arc::new(SystemResolver));
        let (host, addr, _) = refused(&egress, "http://localhost:8080/").await;
        assert_eq!(host, "localhost");
        assert!(addr.is_loopback(), "{addr}");
    }

    /// What the test target saw of one request.
    #[derive(Debug)]
    struct Seen {
        host: Option<String>,
        target: String,
        body: Bytes,
    }

    /// Serves one connection on a port-0 listener on loopback, answering
    /// every request with `status` and a Location, and reporting it.
    async fn target(
        tls: Option<tokio_rustls::TlsAcceptor>,
        status: StatusCode,
    ) -> (SocketAddr, mpsc::Receiver<Seen>, JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (seen, receiver) = mpsc::channel(8);
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                let seen = seen.clone();
                async move {
                    let host = request
                        .headers()
                        .get(http::header::HOST)
                        .map(|h| h.to_str().unwrap().to_owned());
                    let target = request.uri().to_string();
                    let body = request.into_body().collect().await.unwrap().to_bytes();
                    seen.send(Seen { host, target, body }).await.unwrap();
                    let mut response = Response::new(Full::new(Bytes::from_static(b"done")));
                    *response.status_mut() = status;
                    response.headers_mut().insert(
                        http::header::LOCATION,
                        http::HeaderValue::from_static("http://127.0.0.1:1/elsewhere"),
                    );
                    Ok::<_, Infallible>(response)
                }
            });
            let http = hyper::server::conn::http1::Builder::new();
            match tls {
                Some(acceptor) => {
                    let stream = acceptor.accept(tcp).await.unwrap();
                    http.serve_connection(TokioIo::new(stream), service)
                        .await
                        .unwrap();
                }
                None => http
                    .serve_connection(TokioIo::new(tcp), service)
                    .await
                    .unwrap(),
            }
        });
        (addr, receiver, server)
    }

    #[tokio::test]
    async fn a_request_goes_to_the_checked_address_with_the_urls_host() {
        let (addr, mut seen, server) = target(None, StatusCode::OK).await;
        let egress = Egress::new(
            Allow::loopback(),
            FakeResolver::new(&[("app.test", &["127.0.0.1"])]),
        );
        let url = format!("http://App.Test:{}/hooks/1?x=y", addr.port());
        let request = Request::post(url.as_str())
            .version(http::Version::HTTP_2)
            .body(Full::new(Bytes::from_static(b"payload")))
            .unwrap();
        let response = egress.send(request, TIMEOUT).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"done");
        let seen = seen.recv().await.unwrap();
        assert_eq!(
            seen.host.as_deref(),
            Some(&*format!("App.Test:{}", addr.port()))
        );
        assert_eq!(seen.target, "/hooks/1?x=y", "origin form, not absolute");
        assert_eq!(&seen.body[..], b"payload");
        server.await.unwrap();
    }

    #[tokio::test]
    async fn a_redirect_is_returned_not_followed() {
        let (addr, mut seen, server) = target(None, StatusCode::FOUND).await;
        let egress = Egress::new(Allow::loopback(), FakeResolver::new(&[]));
        let request = Request::get(format!("http://127.0.0.1:{}/", addr.port()))
            .header(http::header::HOST, "kept.example")
            .body(Empty::<Bytes>::new())
            .unwrap();
        let response = egress.send(request, TIMEOUT).await.unwrap();
        assert_eq!(response.status(), StatusCode::FOUND);
        drop(response);
        let first = seen.recv().await.unwrap();
        assert_eq!(
            first.host.as_deref(),
            Some("kept.example"),
            "a Host given is kept"
        );
        server.await.unwrap();
        assert!(seen.recv().await.is_none(), "one request, no follow-up");
    }

    #[tokio::test]
    async fn a_target_that_never_answers_times_out() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let egress = Egress::new(Allow::loopback(), FakeResolver::new(&[]));
        let request = Request::get(format!("http://{addr}/"))
            .body(Empty::<Bytes>::new())
            .unwrap();
        let (result, accepted) = tokio::join!(
            egress.send(request, Duration::from_millis(300)),
            listener.accept()
        );
        assert!(matches!(result, Err(EgressError::Timeout(_))), "{result:?}");
        // The relay's side of the connection closes once the exchange is
        // given up: no task is left holding it.
        let (mut stream, _) = accepted.unwrap();
        let mut request = Vec::new();
        tokio::time::timeout(TIMEOUT, stream.read_to_end(&mut request))
            .await
            .expect("the connection closes")
            .unwrap();
        assert!(request.starts_with(b"GET / HTTP/1.1\r\n"));
    }

    #[tokio::test]
    async fn a_closed_port_is_a_connect_error() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let egress = Egress::new(Allow::loopback(), FakeResolver::new(&[]));
        let request = Request::get(format!("http://{addr}/"))
            .body(Empty::<Bytes>::new())
            .unwrap();
        let err = egress.send(request, TIMEOUT).await.unwrap_err();
        assert!(
            matches!(err, EgressError::Connect(a, _) if a == addr),
            "{err:?}"
        );
    }

    fn test_tls() -> (tokio_rustls::TlsAcceptor, CertificateDer<'static>) {
        let cert = rcgen::generate_simple_self_signed(vec!["app.test".to_owned()]).unwrap();
        let der = CertificateDer::from(cert.cert.der().to_vec());
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.signing_key.serialize_der()));
        let config = rustls::ServerConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![der.clone()], key)
            .unwrap();
        (tokio_rustls::TlsAcceptor::from(Arc::new(config)), der)
    }

    #[tokio::test]
    async fn https_names_the_host_and_verifies_its_certificate() {
        let (acceptor, ca) = test_tls();
        let resolver = FakeResolver::new(&[("app.test", &["127.0.0.1"])]);
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca).unwrap();
        let (addr, mut seen, server) = target(Some(acceptor.clone()), StatusCode::OK).await;
        let egress = Egress::with_roots(Allow::loopback(), resolver.clone(), roots);
        let request = Request::get(format!("https://app.test:{}/secure", addr.port()))
            .body(Empty::<Bytes>::new())
            .unwrap();
        let response = egress.send(request, TIMEOUT).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        drop(response);
        assert_eq!(seen.recv().await.unwrap().target, "/secure");
        server.await.unwrap();

        // The public roots do not trust the test certificate.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            assert!(acceptor.accept(tcp).await.is_err());
        });
        let egress = Egress::new(Allow::loopback(), resolver);
        let request = Request::get(format!("https://app.test:{port}/"))
            .body(Empty::<Bytes>::new())
            .unwrap();
        let err = egress.send(request, TIMEOUT).await.unwrap_err();
        assert!(
            matches!(err, EgressError::Tls(ref host, _) if host == "app.test"),
            "{err:?}"
        );
        server.await.unwrap();
    }
}
