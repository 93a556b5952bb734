//! The resync service: progress of every pair, pause, rate.

use serde::{Deserialize, Serialize};

/// `GET /v1/resync`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resync {
    pub paused: bool,
    /// Rate limit per backend; 0: none.
    pub bytes_per_second: u64,
    pub pairs: Vec<ResyncPair>,
}

/// The resync progress of one origin virtual LU's pair.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResyncPair {
    pub name: String,
    pub backend: String,
    pub mode: String,
    pub remaining_lbas: u64,
    pub copied_lbas: u64,
    pub skipped_lbas: u64,
    /// The pair is Synchronized again.
    pub done: bool,
}

/// The reply of `POST /v1/resync/pause` and `/resume`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Paused {
    pub paused: bool,
}

/// `PUT /v1/resync/rate`, and its reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rate {
    /// Bytes per second per backend; 0: unlimited.
    pub bytes_per_second: u64,
}
