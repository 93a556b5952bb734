//! Driver plugin whose legs are NBD exports on any NBD server: nbdkit (with its plugins
//! for files, S3, curl, VMware, ssh, ...), qemu-nbd (qcow2), nbd-server. A stateless
//! array (E2, [0055]-[0061]): hvm does the routing, the update-location table and the
//! resync; the servers only store bytes.
//!
//! Parameters (host-agent adds `state_dir`, unused here):
//!
//! ```yaml
//! timeout_ms: 30000          # per request; then EIO, and the connection is dropped
//! volumes:
//!   - lu: 0
//!     legs: ["nbd+unix:///db-a?socket=/run/nbd-a.sock", "nbd://10.0.0.2:10809/db-b"]
//!     size: 10G              # optional: use the first 10 GiB
//! ```
//!
//! Each leg is one connection of hvm's own client ([`conn`]): fixed newstyle handshake,
//! `NBD_OPT_GO`, structured replies when the server offers them, many requests in
//! flight, FUA/FLUSH/WRITE_ZEROES passed through when the export offers them (emulated
//! otherwise), a timeout per request, and reconnection with backoff ([`leg`]).

pub mod conn;
pub mod handshake;
pub mod leg;
pub mod proto;
pub mod uri;

use std::time::Duration;

use hvm_legs::{Mirrored, VolumeSpec};
use hvm_plugin_abi::{Capabilities, ErrorKind, PluginError, ThreadModel};
use serde::Deserialize;

pub use leg::NbdLeg;

/// The per-request timeout when `timeout_ms` is not given.
pub const DEFAULT_TIMEOUT_MS: u64 = 30_000;

/// The plugin's parameters.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Params {
    /// Milliseconds a request may wait for its reply (and a connect for its handshake).
    #[serde(default = "default_timeout")]
    pub timeout_ms: u64,
    pub volumes: Vec<VolumeSpec>,
    /// Added by host-agent to every plugin's parameters; this plugin keeps no state.
    #[serde(default)]
    pub state_dir: Option<String>,
}

fn default_timeout() -> u64 {
    DEFAULT_TIMEOUT_MS
}

/// Parse the parameters and connect to every leg. Refused with one line naming the leg:
/// a bad URI, a server that cannot be reached or refuses the export, a read-only
/// export, and everything [`Mirrored::new`] refuses.
pub fn open_volumes(params: &str) -> Result<Mirrored<NbdLeg>, String> {
    let p: Params = serde_yaml::from_str(params).map_err(|e| format!("nbd parameters: {e}"))?;
    if p.timeout_ms == 0 {
        return Err("nbd parameters: timeout_ms must be at least 1".into());
    }
    let timeout = Duration::from_millis(p.timeout_ms);
    let mut volumes = Vec::with_capacity(p.volumes.len());
    for v in &p.volumes {
        let [a, b] = v.leg_names()?;
        let origin = NbdLeg::open(a, timeout)?;
        let mate = NbdLeg::open(b, timeout)?;
        volumes.push((v.lu, origin, mate, v.size.map(|s| s.0)));
    }
    Mirrored::new(volumes)
}

fn open(params: &str) -> Result<Mirrored<NbdLeg>, PluginError> {
    open_volumes(params).map_err(|e| PluginError::new(ErrorKind::Config, e))
}

hvm_plugin_abi::export_plugin! {
    name: "nbd",
    capabilities: Capabilities { virtual_lu_forming: true, array_copy: true, fua: true, ..Capabilities::default() },
    // Every leg's connection takes requests from many threads at once.
    thread_model: ThreadModel::Parallel,
    open: open,
}

#[cfg(test)]
mod fake;
#[cfg(test)]
mod tests;
