//! The activity log: what passes through the relay, recorded, shown and
//! sent again.
//!
//! - [`capture`]: records each exchange while it streams, and the writer
//!   that stores entries in batches.
//! - [`replay`]: sends a captured request again, through its tunnel or to
//!   a URL.
//! - [`retention`]: prunes the log by age and size in the background.
//! - [`decode`]: the decoded view of a gzip, deflate or brotli body.
//! - [`export`]: an exchange as a `curl` command, and exchanges as HAR.

pub mod capture;
pub mod decode;
pub mod export;
pub mod replay;
pub mod retention;
