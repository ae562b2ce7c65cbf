//! The contract between the Ferry relay and the `ferry` client.
//!
//! - [`api`]: the JSON shapes of the relay API both ends read.
//! - [`handshake`]: the WebSocket connect handshake — header and query names,
//!   [`handshake::PROTOCOL_VERSION`], the typed request and answer, and the
//!   tunnel's framing limits.
//! - [`byte_stream`]: the adapter that turns the tunnel WebSocket into the byte
//!   stream HTTP/2 runs over, and the signal that closes it with a reason.
//! - [`coalesce`]: merging ready body chunks so tiny writes do not become tiny frames.
//! - [`link`]: the WebSocket and HTTP/2 settings both ends of a tunnel use.
//! - [`ids`]: ids that leave the process, unique across restarts.
//! - [`units`]: durations and sizes with units, as flags take them.
//! - [`subdomain`]: tunnel names — validation and random generation.
//! - [`headers`]: the metadata headers the relay adds for the client, and the
//!   hop-by-hop headers that a proxy must not forward.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod api;
pub mod byte_stream;
pub mod coalesce;
pub mod handshake;
pub mod headers;
pub mod ids;
pub mod link;
pub mod subdomain;
pub mod units;
