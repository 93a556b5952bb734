//! Driver plugin for files and block devices as legs: disks, partitions, LVM logical
//! volumes, SAN LUs already visible as `/dev/sdX`, image files. They keep no snapshot
//! state, so this is a stateless array (E2, [0055]-[0061]) and hvm does the routing, the
//! update-location table and the resync ([`hvm_legs`]).
//!
//! Parameters (the `params` of a backend in host-agent's config):
//!
//! ```yaml
//! direct: true          # O_DIRECT (default), no page cache; false: buffered
//! io: uring             # uring (default) or threads; see the README's benchmark
//! create: false         # true: create a missing regular file of the volume's `size`
//! volumes:
//!   - { lu: 0, legs: [/dev/vg0/db-a, /dev/vg0/db-b] }
//!   - { lu: 3, legs: [legs/a.img, legs/b.img], size: 10G }   # relative: to state_dir
//! ```
//!
//! Refused at open, in one line naming the path: a path that is not a file or block
//! device, a block device that is mounted or held (O_EXCL), a file another program
//! locks, the same file or device twice, legs of different sizes, a file smaller than the
//! volume's `size`.

mod aligned;
mod leg;
mod uring;

use std::path::{Path, PathBuf};

use hvm_legs::{Mirrored, VolumeSpec};
use hvm_plugin_abi::{Capabilities, ErrorKind, PluginError, ThreadModel};
use serde::Deserialize;

pub use leg::{FileLeg, IoEngine, OpenOptionsLeg};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    #[serde(default = "yes")]
    direct: bool,
    #[serde(default)]
    io: IoEngine,
    #[serde(default)]
    create: bool,
    volumes: Vec<VolumeSpec>,
    #[serde(default)]
    state_dir: Option<PathBuf>,
}

fn yes() -> bool {
    true
}

/// The legs of a parsed configuration, opened and checked.
pub type FileArray = Mirrored<FileLeg>;

/// Open the array `params` (YAML) describe.
pub fn open_array(params: &str) -> Result<FileArray, String> {
    let p: Params =
        serde_yaml::from_str(params).map_err(|e| format!("file driver parameters: {e}"))?;
    if p.io == IoEngine::Uring {
        uring::available().map_err(|e| {
            format!("file driver: io_uring is not available here ({e}); set `io: threads`")
        })?;
    }
    refuse_twins(&p)?;
    let mut volumes = Vec::with_capacity(p.volumes.len());
    for v in &p.volumes {
        let [a, b] = v.leg_names()?;
        let size = v.size.map(|s| s.0);
        let create = match (p.create, size) {
            (true, None) => {
                return Err(format!(
                    "volume lu {}: `create: true` needs the volume's `size`",
                    v.lu
                ))
            }
            (c, s) => s.filter(|_| c),
        };
        let opts = OpenOptionsLeg {
            direct: p.direct,
            engine: p.io,
            create,
        };
        let base = p.state_dir.as_deref();
        let a = FileLeg::open(&resolve(base, a), opts)?;
        let b = FileLeg::open(&resolve(base, b), opts)?;
        volumes.push((v.lu, a, b, size));
    }
    Mirrored::new(volumes)
}

/// Refuse the same file or device named twice (by another path, a symlink, a device
/// node alias), before opening: the second open would otherwise fail on our own lock.
fn refuse_twins(p: &Params) -> Result<(), String> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let mut seen: std::collections::HashMap<(u64, u64), PathBuf> = Default::default();
    for v in &p.volumes {
        for leg in v.leg_names()? {
            let path = resolve(p.state_dir.as_deref(), leg);
            let Ok(m) = std::fs::metadata(&path) else {
                continue;
            };
            let key = if m.file_type().is_block_device() {
                (u64::MAX, m.rdev())
            } else {
                (m.dev(), m.ino())
            };
            if let Some(first) = seen.insert(key, path.clone()) {
                return Err(format!(
                    "{}: the same storage as {} (same {}); each leg must be its own",
                    path.display(),
                    first.display(),
                    if key.0 == u64::MAX {
                        "device number"
                    } else {
                        "device and inode"
                    }
                ));
            }
        }
    }
    Ok(())
}

/// A relative leg path is taken relative to host-agent's state directory.
fn resolve(base: Option<&Path>, leg: &str) -> PathBuf {
    match base {
        Some(dir) if Path::new(leg).is_relative() => dir.join(leg),
        _ => PathBuf::from(leg),
    }
}

fn open(params: &str) -> Result<FileArray, PluginError> {
    open_array(params).map_err(|e| PluginError::new(ErrorKind::Config, e))
}

hvm_plugin_abi::export_plugin! {
    name: "file",
    capabilities: Capabilities { virtual_lu_forming: true, array_copy: true, fua: true, ..Capabilities::default() },
    // Many threads read and write the legs at once; each leg is a plain descriptor.
    thread_model: ThreadModel::Parallel,
    open: open,
}

#[cfg(test)]
mod tests;
