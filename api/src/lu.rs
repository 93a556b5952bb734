//! Virtual LUs: the list, the update-location table, snapshots, verify and moves.

use serde::{Deserialize, Serialize};

/// One virtual LU, as `GET /v1/lus` lists it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Lu {
    pub name: String,
    pub backend: String,
    pub vlu: u32,
    /// Synchronized, Snapshot, Re-synchronizing or Undefined (the LU mode table's).
    pub mode: String,
    /// The LU READ requests go to.
    pub read: Option<u32>,
    /// The LU WRITE requests go to.
    pub write: Option<u32>,
    /// The export this is the snapshot of, for snapshot LUs.
    pub snapshot_of: Option<String>,
    pub size_bytes: u64,
    /// LBAs in the update-location table.
    pub recorded_lbas: u64,
    /// Where the data is now, when a move took it off the backend the config names.
    pub placement: Option<String>,
    /// The move under way or last ended, if any.
    #[serde(rename = "move")]
    pub moving: Option<Move>,
    /// Changed-block tracking across backups (origin virtual LUs only).
    pub tracking: Option<Tracking>,
    /// NBD connections open on its export (every listener).
    pub nbd_clients: u64,
    /// True while a restore in place holds its fence: new NBD connections are refused.
    pub restore_fence: bool,
}

/// What was written to an origin since its last completed backup.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tracking {
    /// The last completed backup; none yet: the next backup copies everything.
    pub base: Option<String>,
    /// Bytes recorded as written since the last backup's snapshot: exact while `granule`
    /// is 512, rounded out to granules (so more than was written) once coarsened.
    pub current_bytes: u64,
    /// The backup being copied, and the bytes it copies.
    pub pending: Option<Pending>,
    /// Bytes the ranges are rounded out to: 512 while exact, more once the sets
    /// coarsened past their memory budget.
    pub granule: u64,
}

/// The backup being copied.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pending {
    pub backup: String,
    pub bytes: u64,
}

/// `GET /v1/lus/{name}/extents`: the update-location table of the LU's pair.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Extents {
    pub name: String,
    pub mode: String,
    pub total_lbas: u64,
    /// First and last LBA of each recorded range.
    pub ranges: Vec<[u64; 2]>,
}

/// The reply of a snapshot acquire or delete; `changed` is false for a repeat that had
/// already taken effect.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotChange {
    pub name: String,
    pub mode: String,
    pub changed: bool,
}

/// The reply of `POST /v1/lus/{name}/rollback`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rollback {
    pub name: String,
    pub mode: String,
    pub rolled_back_lbas: u64,
}

/// `POST /v1/lus/{name}/verify`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerifyRequest {
    /// Bytes compared per second; 0 or missing: as fast as the legs read.
    #[serde(default)]
    pub rate: u64,
    /// Write the differing ranges again from the origin.
    #[serde(default)]
    pub repair: bool,
}

/// A verify's result: the legs identical, or the ranges that differ.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Verify {
    pub name: String,
    pub compared_bytes: u64,
    pub seconds: f64,
    pub identical: bool,
    pub differing_lbas: u64,
    /// First and last LBA of each differing range (at most the first 1000).
    pub differing: Vec<[u64; 2]>,
    pub repaired: bool,
}

/// `POST /v1/lus/{name}/move`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MoveRequest {
    /// The backend to move to.
    pub to: String,
    /// The target's mirror LU (its mirroring definition's primary); default: the first
    /// definition of the same kind that no virtual LU uses.
    #[serde(default)]
    pub lus: Option<u32>,
    /// Bytes per second; 0 or none: unlimited.
    #[serde(default)]
    pub rate: Option<u64>,
}

/// An LU of a backend, by the backend's name in the config.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Place {
    pub backend: String,
    pub lu: u32,
}

impl std::fmt::Display for Place {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.backend, self.lu)
    }
}

/// How far a move is: `{"phase": "copying"}`, or `"failed"` with a `"reason"`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "phase", content = "reason")]
pub enum Phase {
    Copying,
    Done,
    Cancelled,
    Failed(String),
}

/// A move under way or ended: `GET /v1/lus/{name}/move` and the `move` of [`Lu`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Move {
    pub vlu: String,
    pub from: Vec<Place>,
    pub to: Vec<Place>,
    #[serde(flatten)]
    pub phase: Phase,
    pub copied_bytes: u64,
    pub total_bytes: u64,
    pub rate_bytes: u64,
    pub elapsed_ms: f64,
    /// Milliseconds the pair was quiesced for the switch.
    pub switch_ms: Option<f64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a_move(phase: Phase) -> Move {
        Move {
            vlu: "db".into(),
            from: vec![Place {
                backend: "a".into(),
                lu: 0,
            }],
            to: vec![Place {
                backend: "b".into(),
                lu: 2,
            }],
            phase,
            copied_bytes: 1,
            total_bytes: 2,
            rate_bytes: 0,
            elapsed_ms: 1.5,
            switch_ms: None,
        }
    }

    /// The phase is flattened into the move: `"phase"` and, for a failure, `"reason"`.
    #[test]
    fn moves_carry_their_phase_flat_and_read_back() {
        let m = a_move(Phase::Failed("leg gone".into()));
        let v = serde_json::to_value(&m).unwrap();
        assert_eq!(v["phase"], "failed");
        assert_eq!(v["reason"], "leg gone");
        assert_eq!(v["to"][0]["lu"], 2);
        assert_eq!(serde_json::from_value::<Move>(v).unwrap(), m);
        let done = serde_json::to_value(a_move(Phase::Done)).unwrap();
        assert_eq!(done["phase"], "done");
        assert!(done.get("reason").is_none(), "{done}");
        assert_eq!(
            serde_json::from_value::<Move>(done).unwrap().phase,
            Phase::Done
        );
    }

    #[test]
    fn verify_requests_refuse_unknown_fields_and_default_the_rest() {
        let r: VerifyRequest = serde_json::from_str("{}").unwrap();
        assert_eq!(r, VerifyRequest::default());
        assert!(serde_json::from_str::<VerifyRequest>(r#"{"rat": 1}"#).is_err());
    }

    /// A reply with a field this client does not know still reads.
    #[test]
    fn unknown_reply_fields_are_ignored() {
        let v = serde_json::json!({
            "name": "db", "mode": "Snapshot", "changed": true, "later": [1]
        });
        let c: SnapshotChange = serde_json::from_value(v).unwrap();
        assert!(c.changed);
    }
}
