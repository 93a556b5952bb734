//! `GET /v1/backends`: backends, their health, LUs and journals.

use std::path::PathBuf;

use hvm_core::array_backup::BackupCapabilities;
use serde::{Deserialize, Serialize};

/// `GET /v1/backends`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Backends {
    pub backends: Vec<BackendView>,
}

/// One backend.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendView {
    pub name: String,
    /// Its LUs; empty while it fails.
    pub lus: Vec<BackendLu>,
    pub strategy_capabilities: String,
    /// The array-side backup functions (EP 1 058 190) it offers.
    pub backup: BackupCapabilities,
    /// "ok", or "failing: " and why.
    pub health: String,
    /// The durable journal of its tables, if it has one.
    pub journal: Option<Journal>,
}

impl BackendView {
    /// The names of the array-side backup functions it offers, in the order of
    /// [`BackupCapabilities`].
    pub fn backup_functions(&self) -> Vec<&'static str> {
        let b = &self.backup;
        [
            (b.pairs, "pairs"),
            (b.ccopy, "ccopy"),
            (b.auto, "auto"),
            (b.area_split, "area_split"),
            (b.cow, "cow"),
            (b.pool, "pool"),
        ]
        .into_iter()
        .filter_map(|(on, name)| on.then_some(name))
        .collect()
    }
}

/// An LU of a backend: number, capacity and identity (VPD 83h, device and inode, export,
/// image id) as the driver reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendLu {
    pub lu: u32,
    pub capacity_lbas: u64,
    pub identity: Option<String>,
}

/// A backend's journal.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Journal {
    pub path: PathBuf,
    pub stats: JournalStats,
}

/// Counters of a journal.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalStats {
    pub file_bytes: u64,
    pub flushes: u64,
    pub compactions: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backup_functions_are_named_as_on_the_wire() {
        let b = BackendView {
            name: "a".into(),
            lus: vec![],
            strategy_capabilities: String::new(),
            backup: BackupCapabilities::ALL,
            health: "ok".into(),
            journal: None,
        };
        let wire = serde_json::to_value(b.backup).unwrap();
        for f in b.backup_functions() {
            assert_eq!(wire[f], true, "{f} in {wire}");
        }
        assert_eq!(b.backup_functions().len(), wire.as_object().unwrap().len());
    }
}
