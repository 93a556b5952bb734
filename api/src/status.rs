//! The agent as a whole: `GET /v1/status` and `POST /v1/reload`.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// `GET /v1/status`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    /// "ok", or "failing: " and the problems.
    pub health: String,
    pub problems: Vec<String>,
    /// How many backends.
    pub backends: u64,
    /// How many virtual LUs.
    pub virtual_lus: u64,
    pub nbd_socket: PathBuf,
    pub resync: ResyncSettings,
    pub config_file: Option<PathBuf>,
    /// Bytes read from snapshot LUs since the start.
    pub snapshot_read_bytes: u64,
    /// The coordination service, when configured.
    pub coordination: Option<Coordination>,
    /// The last reload, if any since the start.
    pub last_reload: Option<Reload>,
}

/// The resync service's settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResyncSettings {
    pub paused: bool,
    pub bytes_per_second: u64,
    pub chunk_bytes: u64,
}

/// Where the coordination service listens and which roles this host takes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Coordination {
    pub listen: String,
    pub roles: Vec<Role>,
}

/// A host's part in online backups.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Database,
    Backup,
}

/// `POST /v1/reload`, and the last one in [`Status`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reload {
    /// The config file read.
    pub file: String,
    /// Seconds since the Unix epoch.
    pub at: u64,
    /// Config paths applied live.
    pub applied: Vec<String>,
    /// Changed config paths that take effect only after a restart.
    pub needs_restart: Vec<String>,
    /// Changes that could not be applied, and why.
    pub not_applied: Vec<String>,
    /// The file could not be read or is not a valid config: nothing was changed.
    pub error: Option<String>,
}
