//! The last result of each entry, in a small JSON file (default
//! `/var/lib/hvm/backup-policy.json`; `state:` in the policy file, `$HVM_POLICY_STATE` or
//! `--state` choose another). It is rewritten whole (temporary file, fsync, rename) after
//! each entry ends, so a crash loses at most the entries still running. A run holds an
//! exclusive lock on `<state>.lock`: a second `policy run` on the same state refuses to
//! start rather than back up the same hosts twice.

use std::collections::BTreeMap;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub const DEFAULT: &str = "/var/lib/hvm/backup-policy.json";

/// The last run of one entry.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Last {
    pub start_unix_ms: u64,
    pub end_unix_ms: u64,
    pub ok: bool,
    /// Why it failed, one line.
    pub reason: Option<String>,
    pub backup: Option<String>,
    /// `full` or `incremental`.
    pub kind: Option<String>,
    pub attempts: u32,
    pub copied_bytes: u64,
    /// When the last successful run started (what the schedule counts from).
    pub last_ok_start_unix_ms: Option<u64>,
    /// Incrementals since the last full backup (the full cadence).
    pub incrementals_since_full: u32,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct State {
    #[serde(default)]
    pub entries: BTreeMap<String, Last>,
}

/// The state file to use: `--state`, else `$HVM_POLICY_STATE`, else the policy file's
/// `state:`, else [`DEFAULT`].
pub fn path(flag: Option<&Path>, from_file: Option<&Path>) -> PathBuf {
    flag.map(Path::to_path_buf)
        .or_else(|| std::env::var_os("HVM_POLICY_STATE").map(PathBuf::from))
        .or_else(|| from_file.map(Path::to_path_buf))
        .unwrap_or_else(|| PathBuf::from(DEFAULT))
}

impl State {
    /// The state in `path`; a missing file is an empty state, a damaged one an error
    /// (never silently replaced).
    pub fn load(path: &Path) -> Result<State, String> {
        match std::fs::read(path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| {
                format!(
                    "{}: not a policy state file ({e}); move it away to start afresh",
                    path.display()
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(State::default()),
            Err(e) => Err(format!("{}: {e}", path.display())),
        }
    }

    /// Write the whole state to `path`, atomically.
    pub fn save(&self, path: &Path) -> Result<(), String> {
        let text = serde_json::to_vec_pretty(self).map_err(|e| e.to_string())?;
        crate::files::replace_file(path, &text).map_err(|e| format!("{}: {e}", path.display()))
    }
}

/// The run's exclusive lock on `<state>.lock`, released when dropped.
pub struct RunLock(#[allow(dead_code)] nix::fcntl::Flock<std::fs::File>);

impl RunLock {
    pub fn take(state: &Path) -> Result<RunLock, String> {
        let mut p = state.as_os_str().to_owned();
        p.push(".lock");
        let p = PathBuf::from(p);
        if let Some(d) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
        }
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&p)
            .map_err(|e| format!("{}: {e}", p.display()))?;
        nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock)
            .map(RunLock)
            .map_err(|(_, e)| {
                format!(
                    "another `hvmctl backup policy run` holds {} ({e})",
                    p.display()
                )
            })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn round_trip_lock_and_damage() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("sub/state.json");
        assert!(State::load(&p).unwrap().entries.is_empty());
        let mut s = State::default();
        s.entries.insert(
            "a".into(),
            Last {
                ok: true,
                attempts: 1,
                ..Last::default()
            },
        );
        s.save(&p).unwrap();
        assert_eq!(State::load(&p).unwrap().entries["a"].attempts, 1);
        let l = RunLock::take(&p).unwrap();
        assert!(RunLock::take(&p).err().unwrap().contains("another"));
        drop(l);
        RunLock::take(&p).unwrap();
        std::fs::write(&p, b"{nope").unwrap();
        assert!(State::load(&p)
            .unwrap_err()
            .contains("not a policy state file"));
    }
}
