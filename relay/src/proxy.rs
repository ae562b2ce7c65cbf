//! Trusted proxies: the load balancers and HTTP proxies an operator puts in
//! front of the relay, which alone may say who the caller is.
//!
//! A peer inside `--trusted-proxy` may (or with `--proxy-protocol required`
//! must) open its connection with a PROXY protocol header (v1 or v2, as TCP
//! load balancers send); its source
//! address is then the caller for everything on that connection. Without
//! one, the caller of each request is the rightmost `X-Forwarded-For` hop
//! that is not itself a trusted proxy (as an HTTP proxy appends it; what
//! the caller wrote left of it is ignored), and
//! its `X-Forwarded-Proto` says whether the caller used HTTPS. Any
//! other peer is the caller itself: its PROXY header is just a malformed
//! request, and its forwarding headers are dropped.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use ipnet::IpNet;
use ppp::{HeaderResult, PartialResult};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// A PROXY v1 header's opening bytes.
const V1_SIGNATURE: &[u8] = b"PROXY ";
/// A PROXY v2 header's opening bytes.
const V2_SIGNATURE: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";
/// The longest PROXY header read: v1 is at most 107 bytes; v2 carries
/// optional TLVs (a cloud load balancer's endpoint id), a few hundred
/// bytes at most in practice.
const MAX_HEADER: usize = 4096;

/// Whether a trusted proxy must open each connection with a PROXY header.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ProxyProtocol {
    /// It may: an HTTP proxy sends none, and names callers with
    /// `X-Forwarded-For` instead.
    #[default]
    Optional,
    /// It must; a connection without one is refused. For a TCP load
    /// balancer, so that a connection reaching the relay some other way, or
    /// the balancer losing the setting, cannot pass a caller's own
    /// forwarding headers off as the balancer's.
    Required,
}

/// What a trusted peer's connection opened with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opening {
    /// No PROXY header.
    Plain,
    /// A PROXY header naming the caller, or `None` for a health check's
    /// LOCAL or UNKNOWN one.
    Header(Option<SocketAddr>),
}

/// The networks whose peers are trusted proxies.
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies(Vec<IpNet>);

impl TrustedProxies {
    /// Trusts peers in `networks`.
    pub fn new(networks: Vec<IpNet>) -> Self {
        Self(networks)
    }

    /// Whether `ip` is a trusted proxy.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.0.iter().any(|net| net.contains(&ip))
    }

    /// The caller of a request that a trusted proxy forwarded with
    /// `headers`: walking `X-Forwarded-For` from the right, the first hop
    /// that is not a trusted proxy, or the leftmost hop when all are.
    /// Hops left of the caller are the caller's own to write and are not
    /// read. `None` when the header is missing or a hop at or right of the
    /// caller is not an address (the chain the proxies wrote cannot be
    /// read, so nothing in it is believed).
    pub fn forwarded_for(&self, headers: &hyper::HeaderMap) -> Option<IpAddr> {
        let mut caller = None;
        for value in headers.get_all("x-forwarded-for").iter().rev() {
            for hop in value.to_str().ok()?.rsplit(',') {
                let hop = parse_hop(hop.trim())?;
                if !self.contains(hop) {
                    return Some(hop);
                }
                caller = Some(hop);
            }
        }
        caller
    }
}

/// One `X-Forwarded-For` hop: an address, `ip:port` or `[ipv6]:port`.
fn parse_hop(hop: &str) -> Option<IpAddr> {
    hop.parse::<IpAddr>()
        .ok()
        .or_else(|| hop.parse::<SocketAddr>().ok().map(|a| a.ip()))
}

/// Whether a trusted HTTP proxy says the caller came over HTTPS: the last
/// `X-Forwarded-Proto` value, the one the proxy nearest the relay set (a
/// proxy that ends TLS itself connects to the relay in plain HTTP). `None`
/// without a value it can read.
pub fn forwarded_https(headers: &hyper::HeaderMap) -> Option<bool> {
    let value = headers.get_all("x-forwarded-proto").iter().next_back()?;
    match value.to_str().ok()?.rsplit(',').next()?.trim() {
        proto if proto.eq_ignore_ascii_case("https") => Some(true),
        proto if proto.eq_ignore_ascii_case("http") => Some(false),
        _ => None,
    }
}

/// An IPv4-mapped IPv6 address as the IPv4 address it is.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    }
}

/// Why a trusted peer's PROXY header was refused.
#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    /// It was not a valid v1 or v2 header.
    #[error("malformed PROXY protocol header")]
    Malformed,
    /// It went on past [`MAX_HEADER`] bytes.
    #[error("PROXY protocol header longer than {MAX_HEADER} bytes")]
    TooLong,
    /// The connection failed or ended first.
    #[error("connection ended before its PROXY protocol header: {0}")]
    Io(#[from] io::Error),
}

/// Reads the PROXY header a trusted peer opens `stream` with, if it sends
/// one: returns what it opened with and the bytes read past it, which
/// belong to the connection.
pub async fn read_header<S: AsyncRead + Unpin>(
    stream: &mut S,
) -> Result<(Opening, Bytes), HeaderError> {
    let mut buf = BytesMut::with_capacity(512);
    loop {
        if stream.read_buf(&mut buf).await? == 0 {
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
        }
        let opens = |signature: &[u8]| {
            let n = buf.len().min(signature.len());
            buf[..n] == signature[..n]
        };
        if !opens(V1_SIGNATURE) && !opens(V2_SIGNATURE) {
            return Ok((Opening::Plain, buf.freeze()));
        }
        let parsed = HeaderResult::parse(&buf);
        if parsed.is_incomplete() {
            if buf.len() >= MAX_HEADER {
                return Err(HeaderError::TooLong);
            }
            continue;
        }
        let (len, caller) = match parsed {
            HeaderResult::V1(Ok(header)) => (
                header.header.len(),
                match header.addresses {
                    ppp::v1::Addresses::Tcp4(a) => {
                        Some(SocketAddr::new(a.source_address.into(), a.source_port))
                    }
                    ppp::v1::Addresses::Tcp6(a) => {
                        Some(SocketAddr::new(a.source_address.into(), a.source_port))
                    }
                    ppp::v1::Addresses::Unknown => None,
                },
            ),
            HeaderResult::V2(Ok(header)) => (
                header.len(),
                match (header.command, header.addresses) {
                    (ppp::v2::Command::Proxy, ppp::v2::Addresses::IPv4(a)) => {
                        Some(SocketAddr::new(a.source_address.into(), a.source_port))
                    }
                    (ppp::v2::Command::Proxy, ppp::v2::Addresses::IPv6(a)) => {
                        Some(SocketAddr::new(a.source_address.into(), a.source_port))
                    }
                    _ => None,
                },
            ),
            HeaderResult::V1(Err(_)) | HeaderResult::V2(Err(_)) => {
                return Err(HeaderError::Malformed)
            }
        };
        buf.advance(len);
        return Ok((Opening::Header(caller), buf.freeze()));
    }
}

/// A socket with bytes already read from it put back in front.
pub struct Prefixed<S> {
    /// Bytes read before the socket was handed on.
    prefix: Bytes,
    /// The socket.
    inner: S,
}

impl<S> Prefixed<S> {
    /// `inner`, read as `prefix` followed by what it still holds.
    pub fn new(prefix: Bytes, inner: S) -> Self {
        Self { prefix, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.prefix.is_empty() {
            return Pin::new(&mut self.inner).poll_read(cx, buf);
        }
        let n = self.prefix.len().min(buf.remaining());
        buf.put_slice(&self.prefix[..n]);
        self.prefix.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::{read_header, HeaderError, Opening, Prefixed, TrustedProxies};

    async fn parse(bytes: &'static [u8]) -> Result<(Opening, Vec<u8>), HeaderError> {
        let (mut peer, mut socket) = tokio::io::duplex(64);
        let writer = tokio::spawn(async move {
            // In small pieces, as a slow network delivers it.
            for piece in bytes.chunks(5) {
                peer.write_all(piece).await.unwrap();
            }
            peer
        });
        let (caller, rest) = read_header(&mut socket).await?;
        drop(writer.await.unwrap());
        let mut all = Vec::new();
        Prefixed::new(rest, socket)
            .read_to_end(&mut all)
            .await
            .unwrap();
        Ok((caller, all))
    }

    fn header(caller: &str) -> Opening {
        Opening::Header(Some(caller.parse::<SocketAddr>().unwrap()))
    }

    #[tokio::test]
    async fn v1_and_v2_headers_name_the_caller_and_the_rest_is_kept() {
        let (caller, rest) =
            parse(b"PROXY TCP4 203.0.113.9 192.0.2.1 5555 80\r\nGET / HTTP/1.1\r\n")
                .await
                .unwrap();
        assert_eq!(caller, header("203.0.113.9:5555"));
        assert_eq!(rest, b"GET / HTTP/1.1\r\n");

        let v2: &'static [u8] = b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c\xcb\x00\x71\x0a\xc0\x00\x02\x01\x15\xb3\x00\x50PRI";
        let (caller, rest) = parse(v2).await.unwrap();
        assert_eq!(caller, header("203.0.113.10:5555"));
        assert_eq!(rest, b"PRI");

        let (caller, rest) = parse(b"PROXY UNKNOWN\r\nGET").await.unwrap();
        assert_eq!(
            (caller, rest.as_slice()),
            (Opening::Header(None), &b"GET"[..])
        );
    }

    #[tokio::test]
    async fn a_connection_without_a_header_reads_as_sent() {
        for request in [
            &b"POST / HTTP/1.1\r\n"[..],
            b"PRI * HTTP/2.0\r\n",
            b"\x16\x03\x01",
        ] {
            let bytes: &'static [u8] = Box::leak(request.to_vec().into_boxed_slice());
            let (caller, rest) = parse(bytes).await.unwrap();
            assert_eq!((caller, rest.as_slice()), (Opening::Plain, request));
        }
    }

    #[tokio::test]
    async fn malformed_and_endless_headers_are_refused() {
        assert!(matches!(
            parse(b"PROXY TCP4 not-an-address 192.0.2.1 1 2\r\n").await,
            Err(HeaderError::Malformed)
        ));
        let endless: &'static [u8] = Box::leak(
            [&b"\r\n\r\n\0\r\nQUIT\n\x21\x11\xff\xff"[..], &[0u8; 5000]]
                .concat()
                .into_boxed_slice(),
        );
        assert!(matches!(parse(endless).await, Err(HeaderError::TooLong)));
    }

    #[test]
    fn the_caller_is_the_rightmost_untrusted_forwarded_hop() {
        let trusted = TrustedProxies::new(vec![
            "10.0.0.0/8".parse().unwrap(),
            "2001:db8::/32".parse().unwrap(),
        ]);
        let headers = |values: &[&str]| {
            let mut headers = hyper::HeaderMap::new();
            for value in values {
                headers.append("x-forwarded-for", value.parse().unwrap());
            }
            headers
        };
        let ip = |text: &str| Some(text.parse().unwrap());
        assert_eq!(
            trusted.forwarded_for(&headers(&["198.51.100.1, 203.0.113.9", "10.1.2.3"])),
            ip("203.0.113.9")
        );
        assert_eq!(
            trusted.forwarded_for(&headers(&["10.0.0.1"])),
            ip("10.0.0.1")
        );
        assert_eq!(trusted.forwarded_for(&headers(&[])), None);
        assert_eq!(
            trusted.forwarded_for(&headers(&["203.0.113.9, junk"])),
            None
        );
        // Anything left of the caller is the caller's own to write.
        assert_eq!(
            trusted.forwarded_for(&headers(&["junk, 203.0.113.9"])),
            ip("203.0.113.9")
        );
        assert_eq!(
            trusted.forwarded_for(&headers(&["junk", "203.0.113.9:4444, 10.0.0.1"])),
            ip("203.0.113.9")
        );
        assert_eq!(
            trusted.forwarded_for(&headers(&["[2001:db9::1]:80, [2001:db8::1]:443"])),
            ip("2001:db9::1")
        );
        assert_eq!(
            trusted.forwarded_for(&headers(&["203.0.113.9, junk, 10.0.0.1"])),
            None
        );
        assert!(trusted.contains("::ffff:10.0.0.1".parse().unwrap()));
        let proto = |values: &[&str]| {
            let mut headers = hyper::HeaderMap::new();
            for value in values {
                headers.append("x-forwarded-proto", value.parse().unwrap());
            }
            super::forwarded_https(&headers)
        };
        assert_eq!(proto(&["http", "https"]), Some(true));
        assert_eq!(proto(&["https, http"]), Some(false));
        assert_eq!(proto(&["gopher"]), None);
        assert_eq!(proto(&[]), None);
        assert!(!trusted.contains("192.0.2.1".parse().unwrap()));
    }
}
