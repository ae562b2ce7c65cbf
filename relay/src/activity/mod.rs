//! The activity log seen from outside the store: what a captured exchange
//! looks like to people and to other tools.
//!
//! - [`decode`]: the decoded view of a gzip, deflate or brotli body.
//! - [`export`]: an exchange as a `curl` command, and exchanges as HAR.

pub mod decode;
pub mod export;
