//! The contract between the Ferry relay and the `ferry` client.
//!
//! - [`handshake`]: the WebSocket connect handshake — header and query names,
//!   [`handshake::PROTOCOL_VERSION`], the typed request and answer, and the
//!   tunnel's framing limits.
//! - [`byte_stream`]: the adapter that turns the tunnel WebSocket into the byte
//!   stream HTTP/2 runs over, and the signal that closes it with a reason.
//! - [`subdomain`]: tunnel names — validation and random generation.
//! - [`headers`]: the metadata headers the relay adds for the client, and the
//!   hop-by-hop headers that a proxy must not forward.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod byte_stream;
pub mod handshake;
pub mod headers;
pub mod subdomain;
