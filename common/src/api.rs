//! The JSON shapes of the relay's API that both ends read.

use serde::{Deserialize, Serialize};

/// The body of every error the API answers: `{"error": {"code", "message"}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What went wrong.
    pub error: ErrorDetail,
}

/// One API error.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// A stable, machine-readable code such as `name_taken`.
    pub code: String,
    /// A sentence for people that says what to do.
    pub message: String,
}

/// One entry of `GET /api/v1/tunnels`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TunnelInfo {
    /// The subdomain.
    pub name: String,
    /// The URL public callers use.
    pub public_url: String,
    /// Seconds since the Unix epoch when the client connected.
    pub connected_at: u64,
    /// The client's program and version, as it said.
    pub client_version: Option<String>,
    /// The local target the client forwards to, as it said.
    pub target: Option<String>,
}

/// The answer of `GET /api/v1/tunnels`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TunnelList {
    /// The caller's live tunnels, by name.
    pub tunnels: Vec<TunnelInfo>,
}
