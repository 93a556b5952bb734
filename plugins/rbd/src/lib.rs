//! Driver plugin whose legs are Ceph RBD images: the stateless array of `hvm-legs` over
//! librbd, so hvm's snapshots, backups and resync work on volumes kept in Ceph.
//!
//! ```yaml
//! backends:
//!   - name: ceph0
//!     plugin: rbd
//!     params:
//!       conf: /etc/ceph/ceph.conf   # the cluster (mon addresses, auth settings)
//!       client: admin               # cephx id (client.admin); default admin
//!       keyring: /etc/ceph/ceph.client.admin.keyring   # optional; else ceph.conf's
//!       timeout_ms: 5000            # optional: a stalled OSD or mon gives EIO after this
//!       create: true                # optional: create missing images of the volume's size
//!       cache: false                # optional: librbd's writeback cache; default off
//!       volumes:
//!         - { lu: 0, legs: [rbd/db-a, rbd/db-b], size: 10G }
//! ```
//!
//! I/O goes through librbd's asynchronous API (one completion per request, so many
//! requests are in flight from host-agent's threads, and a mirrored write has both
//! images' writes in flight from one thread). FUA is a write followed by a flush.
//!
//! No array-side copy: librbd copies only whole images (`rbd_copy*`, `rbd_deep_copy`),
//! and copying the RADOS objects beneath it would bypass the object map and the exclusive
//! lock of the image being written. So resync reads and writes through hvm.
//!
//! `rbd_diff_iterate2` is available as [`ceph::Image::diff_iterate`] for the array's own
//! change tracking, through [`RbdLeg::image`].

pub mod ceph;
mod leg;

use std::path::PathBuf;

use hvm_legs::{Mirrored, VolumeSpec};
use hvm_plugin_abi::{Capabilities, ErrorKind, PluginError, ThreadModel};
use serde::Deserialize;

pub use leg::{Pools, RbdLeg};

/// The plugin's parameters (the backend's `params` in host-agent's config).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Params {
    /// ceph.conf of the cluster.
    pub conf: PathBuf,
    /// The cephx id, without `client.`.
    #[serde(default = "admin")]
    pub client: String,
    /// A keyring file, when ceph.conf does not name one.
    #[serde(default)]
    pub keyring: Option<PathBuf>,
    /// Per-request timeout of the OSD and mon operations (and of connecting), so a stalled
    /// cluster fails requests with EIO instead of hanging them. Ceph counts whole seconds:
    /// rounded up. None: Ceph's default, wait forever.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// Create each missing image with its volume's `size`.
    #[serde(default)]
    pub create: bool,
    /// librbd's cache (`rbd_cache`). Off by default: a completed write is then on the
    /// OSDs, and a stalled OSD shows on the write that meets it.
    #[serde(default)]
    pub cache: bool,
    pub volumes: Vec<VolumeSpec>,
    /// host-agent adds it to every plugin's parameters; this plugin keeps no state.
    #[serde(default)]
    pub state_dir: Option<PathBuf>,
}

fn admin() -> String {
    "admin".into()
}

impl Params {
    pub fn parse(text: &str) -> Result<Params, String> {
        serde_yaml::from_str(text).map_err(|e| format!("rbd plugin parameters: {e}"))
    }

    /// The Ceph options these parameters set on top of ceph.conf.
    pub fn ceph_options(&self) -> Vec<(&'static str, String)> {
        let mut o = vec![("rbd_cache", self.cache.to_string())];
        if let Some(k) = &self.keyring {
            o.push(("keyring", k.display().to_string()));
        }
        if let Some(ms) = self.timeout_ms {
            let secs = ms.div_ceil(1000).max(1).to_string();
            for name in [
                "rados_osd_op_timeout",
                "rados_mon_op_timeout",
                "client_mount_timeout",
            ] {
                o.push((name, secs.clone()));
            }
        }
        o
    }
}

/// Connect to the cluster and open (or create) every volume's images.
pub fn open_legs(params: &Params) -> Result<Mirrored<RbdLeg>, String> {
    let cluster = ceph::Cluster::connect(&params.conf, &params.client, &params.ceph_options())
        .map_err(|e| e.to_string())?;
    let mut pools = Pools::new(cluster).map_err(|e| e.to_string())?;
    let mut volumes = Vec::with_capacity(params.volumes.len());
    for v in &params.volumes {
        let [a, b] = v.leg_names()?;
        let size = v.size.map(|s| s.0);
        let create = match (params.create, size) {
            (true, None) => {
                return Err(format!(
                    "volume lu {}: create: true needs the volume's size",
                    v.lu
                ))
            }
            (true, s) => s,
            (false, _) => None,
        };
        let origin = RbdLeg::open(&mut pools, a, create)?;
        let mate = RbdLeg::open(&mut pools, b, create)?;
        volumes.push((v.lu, origin, mate, size));
    }
    Mirrored::new(volumes)
}

fn open(params: &str) -> Result<Mirrored<RbdLeg>, PluginError> {
    let p = Params::parse(params).map_err(|e| PluginError::new(ErrorKind::Config, e))?;
    open_legs(&p).map_err(|e| PluginError::new(ErrorKind::Config, e))
}

hvm_plugin_abi::export_plugin! {
    name: "rbd",
    capabilities: Capabilities { virtual_lu_forming: true, array_copy: true, fua: true, ..Capabilities::default() },
    // librbd handles are thread-safe; every request has its own completion.
    thread_model: ThreadModel::Parallel,
    open: open,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_with_defaults_and_timeouts_in_whole_seconds() {
        let p = Params::parse(
            "conf: /c/ceph.conf\ntimeout_ms: 1500\nstate_dir: /s\nvolumes:\n  - { lu: 0, legs: [rbd/a, rbd/b], size: 64M }\n",
        )
        .expect("valid parameters");
        assert_eq!(p.client, "admin");
        assert!(!p.create && !p.cache);
        assert_eq!(p.volumes[0].size.map(|s| s.0), Some(64 << 20));
        let o = p.ceph_options();
        assert!(o.contains(&("rados_osd_op_timeout", "2".into())), "{o:?}");
        assert!(o.contains(&("rbd_cache", "false".into())), "{o:?}");
        let e = Params::parse("conf: /c\nvolumes: []\nbogus: 1\n").expect_err("unknown key");
        assert!(e.contains("bogus"), "{e}");
    }

    #[test]
    fn a_missing_ceph_conf_is_named() {
        let p =
            Params::parse("conf: /nonexistent/ceph.conf\nvolumes:\n  - { lu: 0, legs: [rbd/a] }\n")
                .expect("valid parameters");
        let e = open_legs(&p).err().expect("no cluster");
        assert!(e.contains("/nonexistent/ceph.conf"), "{e}");
    }
}
