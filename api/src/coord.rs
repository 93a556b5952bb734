//! The coordination service's wire types (agent to agent, TLS, one JSON request line per
//! connection): the [`Request`] and its [`Op`], the reply [`Line`]s, and the typed
//! replies of the operations, built by host-agent's `coord` roles and read by its
//! console and `hvmctl backup`.
//!
//! | op | reply |
//! |---|---|
//! | `delete` | [`Deleted`] |
//! | `restore_fence` | [`Fenced`] |
//! | `restore_unfence` | [`Unfenced`] |
//! | `backup_list` | [`BackupList`] |
//! | `backup_verify` | [`Verified`] |
//! | `backup_prune` | [`Pruned`] |
//! | `backup_restore` | [`Restored`] |
//! | `backup_restore_check` | [`RestoreCheck`] |
//! | `hello` | [`Hello`] |
//! | `counters` | [`Counters`] |
//! | `complete`, `abort` | [`TrackingBases`] |
//! | `resync` | [`ResyncProgress`] |
//! | `verify` | [`LegsCompared`] |
//! | `snapshot` | [`SnapshotTaken`] |
//! | `copy` | [`Copied`] |

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A retention policy (`keep: {last, daily, weekly}`); see host-agent's
/// `backups::retention`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Keep {
    pub last: u32,
    pub daily: u32,
    pub weekly: u32,
}

/// What a backup's snapshot is consistent with.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Consistency {
    /// The database host's freeze hooks run around the snapshot (PostgreSQL's backup
    /// mode, fsfreeze, commands): a restore starts from what the applications made clean.
    #[default]
    Application,
    /// No hook runs: the write gate alone makes the snapshot one instant of every
    /// virtual LU of the group, as a power cut would leave them. A restore is a crash
    /// recovery (the filesystem's journal, the database's WAL), which is only sound when
    /// everything the database needs, WAL included, is in the group.
    Crash,
}

impl Consistency {
    pub fn is_application(&self) -> bool {
        *self == Consistency::Application
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Consistency::Application => "application",
            Consistency::Crash => "crash",
        }
    }
}

impl std::str::FromStr for Consistency {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "application" => Ok(Consistency::Application),
            "crash" => Ok(Consistency::Crash),
            other => Err(format!("{other:?}: application or crash")),
        }
    }
}

/// One request: the first and only line a client sends.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    pub token: String,
    /// Chosen by the client; a retry carries the same id.
    pub id: String,
    pub op: Op,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Op {
    /// The agent's roles and version; checks the token.
    Hello,
    /// Database role: quiesce, snapshot the virtual LUs at one instant, resume.
    Snapshot {
        vlus: Vec<String>,
        /// Shorter than the configured deadline, if given; never longer.
        #[serde(default)]
        deadline_ms: Option<u64>,
        /// Extra `HVM_*` variables for command hooks.
        #[serde(default)]
        vars: BTreeMap<String, String>,
        /// The backup the console chose an id for: each virtual LU's changed-block record
        /// is cut at the snapshot instant and the reply's `changes` says what was written
        /// since the last completed backup.
        #[serde(default)]
        backup: Option<String>,
        /// Whether the database host's freeze hooks run (left out of the request when
        /// they do, so that an older agent reads it too).
        #[serde(default, skip_serializing_if = "Consistency::is_application")]
        consistency: Consistency,
    },
    /// Database role: delete the snapshots (resync starts). Deleting what is already
    /// deleted is not an error.
    Delete { vlus: Vec<String> },
    /// Database role: resync progress.
    Resync { vlus: Vec<String> },
    /// Database role: compare the legs of each (Synchronized) virtual LU.
    Verify { vlus: Vec<String> },
    /// Database role: counters (bytes read through snapshot exports).
    Counters,
    /// Database role: `backup` is stored; it becomes the virtual LUs' tracking base.
    /// Idempotent.
    Complete { vlus: Vec<String>, backup: String },
    /// Database role: `backup` failed; the ranges its snapshot's cut took count as
    /// written again. Idempotent.
    Abort { vlus: Vec<String>, backup: String },
    /// Database role: before a restore in place, put up the virtual LU's fence (new NBD
    /// connections refused unless they carry its ticket) and check that no client has
    /// it open; with `force`, run `coordination.restore.stop` first. Answers the ticket.
    RestoreFence {
        vlu: String,
        #[serde(default)]
        force: bool,
        /// The backup being restored, for the stop command's `HVM_BACKUP`.
        #[serde(default)]
        backup: String,
    },
    /// Database role: take down the fence `ticket` put up. Idempotent.
    RestoreUnfence { vlu: String, ticket: String },
    /// Backup role: store snapshots in a repository under `target_root`.
    Copy(CopyRequest),
    /// Backup role: the catalog's backups, synchronised with the repositories' manifests
    /// first (`rebuild`: from nothing).
    BackupList {
        #[serde(default)]
        target: Option<String>,
        #[serde(default)]
        vlu: Option<String>,
        #[serde(default)]
        rebuild: bool,
    },
    /// Backup role: read every chunk of a backup and check it against its name.
    BackupVerify { backup: String },
    /// Backup role: delete the backups of a repository that `keep` does not keep (none
    /// if `dry_run`), then the chunks no manifest names.
    BackupPrune {
        target: String,
        #[serde(default)]
        keep: Option<Keep>,
        #[serde(default)]
        dry_run: bool,
    },
    /// Backup role: write a virtual LU's image at a backup to a new file or a block
    /// device on the backup host, or onto the live virtual LU over NBD.
    BackupRestore(RestoreRequest),
    /// Backup role: would a restore of `backup`'s `vlu` (`in_place`: onto the live
    /// virtual LU) be accepted? Nothing is written; the console asks before the database
    /// host fences or stops anything. Answers [`RestoreCheck`].
    BackupRestoreCheck {
        backup: String,
        #[serde(default)]
        vlu: Option<String>,
        #[serde(default)]
        in_place: bool,
    },
}

impl Op {
    /// The operation's name on the wire.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Hello => "hello",
            Op::Snapshot { .. } => "snapshot",
            Op::Delete { .. } => "delete",
            Op::Resync { .. } => "resync",
            Op::Verify { .. } => "verify",
            Op::Counters => "counters",
            Op::Complete { .. } => "complete",
            Op::Abort { .. } => "abort",
            Op::RestoreFence { .. } => "restore_fence",
            Op::RestoreUnfence { .. } => "restore_unfence",
            Op::Copy(_) => "copy",
            Op::BackupList { .. } => "backup_list",
            Op::BackupVerify { .. } => "backup_verify",
            Op::BackupPrune { .. } => "backup_prune",
            Op::BackupRestore(_) => "backup_restore",
            Op::BackupRestoreCheck { .. } => "backup_restore_check",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CopyRequest {
    /// A directory relative to the backup host's `target_root`; it must not exist yet.
    pub target: String,
    pub lus: Vec<CopyLu>,
    /// Small files written beside the images (the PostgreSQL backup label).
    #[serde(default)]
    pub files: BTreeMap<String, String>,
    /// Recorded in the manifest as given (database host, freeze, instant).
    #[serde(default)]
    pub info: Value,
    /// Read at most this many bytes per second (absent or 0: no limit).
    #[serde(default)]
    pub rate: Option<u64>,
    /// The backup's id, as the console gave it to the database host's tracking; absent:
    /// the request id.
    #[serde(default)]
    pub backup: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CopyLu {
    pub vlu: String,
    pub size: u64,
    pub source: Source,
    /// The backup the database host's tracking counts `changes` from.
    #[serde(default)]
    pub base: Option<String>,
    /// `[offset, length]` byte ranges written since `base`: copied alone if the
    /// repository holds `base`, else the whole LU is.
    #[serde(default)]
    pub changes: Option<Vec<(u64, u64)>>,
    /// Bytes written since `base`, as the tracking counts them.
    #[serde(default)]
    pub written_bytes: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreRequest {
    pub backup: String,
    /// The virtual LU (may be left out when the backup has one).
    #[serde(default)]
    pub vlu: Option<String>,
    pub to: RestoreTo,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum RestoreTo {
    /// An absolute path on the backup host: a new file, or a block device nobody holds.
    Path(String),
    /// The live virtual LU: its export on the database host's NBD listener
    /// (`HOST:PORT`), written where it differs. `export` may carry the ticket of the
    /// fence the database host put up: `NAME#fence=TICKET`.
    Nbd { address: String, export: String },
}

/// Where the backup host reads a snapshot from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Source {
    /// The real LU on the array, through the backup host's own backend of that name (as
    /// over a SAN): the database host does no work for the copy.
    Array { backend: String, lu: u32 },
    /// The database host's snapshot export over NBD (`HOST:PORT`).
    Nbd { address: String, export: String },
    /// The array copies its real LU, a split pair secondary of EP 1 058 190, to one of its
    /// backup devices by itself (CCOPY, [0029]-[0030]), driven through the backup host's
    /// backend of that name: no host reads the LU.
    ArrayDevice { backend: String, lu: u32 },
}

/// One reply line.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Line {
    Progress { done: u64, total: u64 },
    Ok(Value),
    Error(Failure),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Code {
    /// No token or the wrong one; nothing was done.
    Unauthorized,
    /// The request was malformed or names something that does not exist.
    BadRequest,
    /// The operation is one of a role this agent does not have.
    NotMyRole,
    /// The freeze's deadline passed; everything was thawed and rolled back.
    Timeout,
    /// A step failed; the detail says which and what was undone.
    Failed,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Failure {
    pub code: Code,
    pub message: String,
    #[serde(default)]
    pub detail: FailureDetail,
}

/// What a failure carries beside its message (JSON `null` when nothing).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum FailureDetail {
    #[default]
    None,
    /// A snapshot that timed out or failed on the database host: its steps, the freeze,
    /// and what it thawed and rolled back (so nothing is left to clean up there).
    Snapshot(Box<SnapshotFailure>),
    /// `backup_verify` found bad chunks.
    BadChunks { bad_chunks: Vec<String> },
    /// A detail this version does not know (from a newer agent), kept as it came.
    Other(Value),
}

/// [`FailureDetail::Snapshot`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SnapshotFailure {
    pub steps: Vec<Step>,
    pub freeze_ms: f64,
    pub thawed: Vec<String>,
    pub rolled_back: Vec<String>,
}

impl Failure {
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        Failure {
            code,
            message: message.into(),
            detail: FailureDetail::None,
        }
    }

    pub fn with(mut self, detail: FailureDetail) -> Self {
        self.detail = detail;
        self
    }
}

impl std::fmt::Display for Code {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Code::Unauthorized => "unauthorized",
            Code::BadRequest => "bad request",
            Code::NotMyRole => "wrong role",
            Code::Timeout => "timeout",
            Code::Failed => "failed",
        })
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

/// One virtual LU of a [`Deleted`] reply.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeletedVlu {
    pub vlu: String,
    /// Its mode afterwards (Re-synchronizing once the snapshot is gone).
    pub mode: String,
    /// False when there was no snapshot to delete.
    pub changed: bool,
}

/// `delete`: each virtual LU's snapshot deleted, resync started.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deleted {
    pub vlus: Vec<DeletedVlu>,
}

/// `restore_fence`: the fence is up and no NBD client is left.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fenced {
    pub vlu: String,
    /// What an export name carries to get through the fence (`NAME#fence=TICKET`).
    pub ticket: String,
    /// Clients `coordination.restore.stop` ended (0 without `force`).
    pub clients_stopped: u64,
    /// The database host's NBD TCP listener, if it has one.
    pub nbd_tcp: Option<String>,
}

/// `restore_unfence`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unfenced {
    pub vlu: String,
    /// False if the ticket's fence was already down.
    pub lifted: bool,
    /// Whether a fence (another ticket's) is still up.
    pub fenced: bool,
}

/// A backup the array copied to one of its backup devices: the medium.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Medium {
    pub backend: String,
    pub array_lu_identity: Option<String>,
    pub device: String,
    pub path: String,
    pub job: u32,
    pub lu: u32,
    pub records: u64,
    pub blocks: u64,
    pub bytes: u64,
    pub sha256: String,
}

/// One backup in the backup host's catalog (a repository's, or the array's on a medium).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupRow {
    pub id: String,
    /// The repository, or the array's device for a backup on a medium.
    pub location: Option<String>,
    pub created_unix_ms: u64,
    pub created: String,
    /// `full`, `incremental` or `array-ccopy`.
    pub kind: String,
    pub parent: Option<String>,
    pub vlus: Vec<String>,
    pub stored_bytes: u64,
    pub logical_bytes: u64,
    pub copied_bytes: u64,
    pub verified_unix_ms: Option<u64>,
    pub verify_error: Option<String>,
    /// A backup on media: the target it was asked for, and its media.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media: Option<Vec<Medium>>,
}

/// `backup_list`: oldest first; `errors` names the repositories that could not be read.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupList {
    pub backups: Vec<BackupRow>,
    pub errors: Vec<String>,
}

/// `backup_verify`: every chunk (or every medium) checks out. A bad one is an error.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verified {
    pub id: String,
    pub created: String,
    pub ok: bool,
    /// Chunks checked (0 for a backup on media).
    pub chunks: u64,
    pub vlus: Vec<String>,
    /// The repository (a backup in one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
    /// `array-ccopy` and the media checked (a backup on media).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media: Option<Vec<Medium>>,
}

/// `backup_prune`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pruned {
    pub dry_run: bool,
    pub keep: Vec<String>,
    pub delete: Vec<String>,
    /// Chunks no manifest names any more, removed (absent on a dry run).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunks_deleted: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_freed: Option<u64>,
    pub location: String,
    pub policy: Keep,
}

/// `backup_restore`, and the console's restore in place (which adds `clients_stopped`
/// and `fence`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Restored {
    pub backup: String,
    pub created: String,
    pub vlu: String,
    pub size: u64,
    /// The image's SHA-256.
    pub sha256: String,
    /// The new file or block device (a restore to a path).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    /// A restore onto the live virtual LU: bytes read and compared, bytes written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compared_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub written_bytes: Option<u64>,
    /// The medium read (a backup on media).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub medium: Option<Medium>,
    /// In place: clients the database host's stop command ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clients_stopped: Option<u64>,
    /// In place: `lifted`, or why the fence is still up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fence: Option<String>,
}

/// `backup_restore_check`: the restore would be accepted; what it would read.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreCheck {
    pub backup: String,
    pub created: String,
    /// `full`, `incremental` or `array-ccopy`.
    pub kind: String,
    pub vlu: String,
    pub size: u64,
}

/// `hello`: the agent's roles and what it serves.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub roles: Vec<crate::status::Role>,
    pub version: String,
    pub virtual_lus: Vec<String>,
    pub backends: Vec<String>,
    /// The agent's NBD TCP listener, if it has one.
    pub nbd_tcp: Option<String>,
}

/// `counters`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// Bytes read through snapshot exports.
    pub snapshot_read_bytes: u64,
}

/// One virtual LU's changed-block tracking base after `complete` or `abort`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrackingBase {
    /// The last completed backup (null: none yet).
    pub base: Option<String>,
}

/// `complete` and `abort`: each virtual LU's tracking base, by name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrackingBases {
    pub vlus: BTreeMap<String, TrackingBase>,
}

/// One virtual LU of a [`ResyncProgress`] reply.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResyncVlu {
    pub vlu: String,
    pub mode: String,
    pub remaining_lbas: u64,
    pub copied_lbas: u64,
    /// Synchronized again.
    pub done: bool,
}

/// `resync`: each virtual LU's resync progress.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResyncProgress {
    pub vlus: Vec<ResyncVlu>,
}

/// `verify`: each virtual LU's legs compared (no repair).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LegsCompared {
    pub vlus: Vec<crate::lu::Verify>,
}

/// A step an agent timed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Step {
    pub step: String,
    pub ms: f64,
}

/// One virtual LU's snapshot in a [`SnapshotTaken`]: what the backup host reads.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotLu {
    pub vlu: String,
    /// The snapshot's export on the database host's NBD listener.
    pub export: String,
    pub backend: String,
    pub size: u64,
    /// The virtual LU's strategy (`ModeSelect`, `VirtualLuRouting`, ...).
    pub strategy: Option<String>,
    /// The snapshot as a real LU on the array (E1/E2), which a backup host can read.
    pub array_lu: Option<u32>,
    /// That real LU is a split pair secondary the array can copy to a backup device by
    /// itself (CCOPY).
    pub array_ccopy: bool,
}

/// One virtual LU's changed blocks in a [`SnapshotTaken`]: what was written since the
/// last completed backup `base` (null: none yet, copy everything).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Changes {
    pub base: Option<String>,
    /// `[offset, length]` byte ranges, sorted and disjoint.
    pub extents: Vec<(u64, u64)>,
    /// Bytes the ranges cover.
    pub bytes: u64,
    /// The tracking's granule in bytes: past 512 the ranges cover more than was written.
    pub granule: u64,
}

/// `snapshot`: the consistency group's snapshot was taken at `instant_unix_ms` and the
/// hooks resumed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SnapshotTaken {
    pub instant_unix_ms: u64,
    /// Quiesce to resume.
    pub freeze_ms: f64,
    pub deadline_ms: u64,
    pub steps: Vec<Step>,
    pub snapshots: Vec<SnapshotLu>,
    /// Small files the hooks left for the backup (the PostgreSQL backup label).
    pub files: BTreeMap<String, String>,
    /// The database host's NBD TCP listener, if it has one.
    pub nbd_tcp: Option<String>,
    /// Per virtual LU, with a `backup` id in the request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub changes: Option<BTreeMap<String, Changes>>,
}

/// One virtual LU of a [`Copied`] reply.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CopiedLu {
    pub vlu: String,
    pub size: u64,
    /// `full` or `incremental`.
    pub kind: String,
    /// The backup an incremental copy started from.
    pub base: Option<String>,
    /// Why the copy is full when an incremental one was asked for.
    pub reason: Option<String>,
    /// Where the data was read from.
    pub source: String,
    /// Bytes hosts read for this backup.
    pub copied_bytes: u64,
    pub seconds: f64,
    #[serde(flatten)]
    pub by: CopiedBy,
}

/// Who copied a [`CopiedLu`]: the backup host into a repository, or the array to one of
/// its backup devices.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum CopiedBy {
    Host {
        /// Bytes written since the base, as the database host's tracking counts them.
        written_bytes: Option<u64>,
        /// The image's extents in the repository (a count).
        extents: u64,
        mib_per_s: f64,
    },
    Array {
        array_copied_bytes: u64,
        medium: Medium,
    },
}

/// `copy`: the backup stored, without its extents.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Copied {
    /// The repository, or the array's device (a backup on media).
    pub location: Option<String>,
    pub id: String,
    pub created: String,
    /// `full`, `incremental` or `array-ccopy`.
    pub kind: String,
    pub parent: Option<String>,
    pub stored_bytes: u64,
    pub lus: Vec<CopiedLu>,
    /// The small files stored beside the images, by name.
    pub files: Vec<String>,
    /// A backup on media: the backups whose media the array's copy replaced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replaced: Option<Vec<String>>,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A failure's detail keeps the JSON it had as a map: null when nothing, the
    /// snapshot's steps, freeze and rollback, the bad chunks; what this version does not
    /// know is kept as it came.
    #[test]
    fn failure_details_keep_their_wire_shape() {
        let f: Failure = serde_json::from_str(r#"{"code":"failed","message":"m"}"#).unwrap();
        assert_eq!(f.detail, FailureDetail::None);
        assert!(serde_json::to_value(&f).unwrap()["detail"].is_null());
        let raw = r#"{"code":"timeout","message":"m","detail":{"steps":[{"step":"quiesce pg","ms":1.5}],"freeze_ms":2.0,"thawed":["pg"],"rolled_back":["a"]}}"#;
        let f: Failure = serde_json::from_str(raw).unwrap();
        let FailureDetail::Snapshot(d) = &f.detail else {
            panic!("{:?}", f.detail)
        };
        assert_eq!(
            (d.steps[0].ms, d.thawed.as_slice()),
            (1.5, &["pg".to_string()][..])
        );
        let v = serde_json::to_value(&f).unwrap();
        assert_eq!(v, serde_json::from_str::<Value>(raw).unwrap());
        let f = Failure::new(Code::Failed, "bad").with(FailureDetail::BadChunks {
            bad_chunks: vec!["c1: missing".into()],
        });
        let v = serde_json::to_value(&f).unwrap();
        assert_eq!(v["detail"]["bad_chunks"][0], "c1: missing");
        let back: Failure = serde_json::from_value(v).unwrap();
        assert_eq!(back.detail, f.detail);
        let f: Failure =
            serde_json::from_str(r#"{"code":"failed","message":"m","detail":{"new":1}}"#).unwrap();
        assert_eq!(
            f.detail,
            FailureDetail::Other(serde_json::json!({"new": 1}))
        );
    }

    #[test]
    fn replies_keep_their_wire_shape() {
        let r: Restored = serde_json::from_str(
            r#"{"backup":"b","created":"c","vlu":"a","size":8,"sha256":"s","to":"/x"}"#,
        )
        .unwrap();
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["to"], "/x");
        assert!(
            v.get("written_bytes").is_none() && v.get("fence").is_none(),
            "{v}"
        );
        let p = Pruned {
            dry_run: true,
            keep: vec!["a".into()],
            delete: vec![],
            chunks_deleted: None,
            bytes_freed: None,
            location: "l".into(),
            policy: Keep::default(),
        };
        let v = serde_json::to_value(&p).unwrap();
        assert!(v.get("chunks_deleted").is_none(), "{v}");
        assert_eq!(v["policy"]["last"], 0);
        let op: Op =
            serde_json::from_str(r#"{"type":"backup_restore_check","backup":"b","in_place":true}"#)
                .unwrap();
        assert_eq!(op.name(), "backup_restore_check");
        let h = Hello {
            roles: vec![crate::status::Role::Database],
            version: "1".into(),
            virtual_lus: vec![],
            backends: vec![],
            nbd_tcp: None,
        };
        let v = serde_json::to_value(&h).unwrap();
        assert!(v["nbd_tcp"].is_null() && v.get("nbd_tcp").is_some(), "{v}");
        assert_eq!(v["roles"][0], "database");
        let t: TrackingBases =
            serde_json::from_str(r#"{"vlus":{"a":{"base":null},"b":{"base":"b1"}}}"#).unwrap();
        assert_eq!(t.vlus["b"].base.as_deref(), Some("b1"));
        let v = serde_json::to_value(&t).unwrap();
        assert!(v["vlus"]["a"]["base"].is_null() && v["vlus"]["a"].get("base").is_some());
        let mut snap = SnapshotTaken {
            instant_unix_ms: 1,
            freeze_ms: 2.5,
            deadline_ms: 3,
            steps: vec![],
            snapshots: vec![],
            files: BTreeMap::new(),
            nbd_tcp: None,
            changes: None,
        };
        let v = serde_json::to_value(&snap).unwrap();
        assert!(v.get("changes").is_none() && v["nbd_tcp"].is_null(), "{v}");
        let c = Changes {
            base: None,
            extents: vec![(0, 512)],
            bytes: 512,
            granule: 512,
        };
        snap.changes = Some([("a".to_string(), c)].into_iter().collect());
        let v = serde_json::to_value(&snap).unwrap();
        assert_eq!(v["changes"]["a"]["extents"], serde_json::json!([[0, 512]]));
        assert!(v["changes"]["a"]["base"].is_null(), "{v}");
    }

    #[test]
    fn a_copy_reply_says_who_copied() {
        let host = r#"{"vlu":"a","size":8,"kind":"full","base":null,"reason":null,"source":"nbd",
            "copied_bytes":8,"written_bytes":null,"extents":1,"seconds":0.5,"mib_per_s":1.5}"#;
        let l: CopiedLu = serde_json::from_str(host).unwrap();
        assert!(matches!(l.by, CopiedBy::Host { extents: 1, .. }), "{l:?}");
        let v = serde_json::to_value(&l).unwrap();
        assert_eq!(v, serde_json::from_str::<Value>(host).unwrap());
        let array = r#"{"vlu":"a","size":8,"kind":"full","base":null,"reason":null,"source":"x",
            "copied_bytes":0,"array_copied_bytes":8,"seconds":0.5,"medium":{"backend":"b",
            "array_lu_identity":null,"device":"d","path":"/p","job":1,"lu":11,"records":1,
            "blocks":1,"bytes":9,"sha256":"s"}}"#;
        let l: CopiedLu = serde_json::from_str(array).unwrap();
        assert!(
            matches!(&l.by, CopiedBy::Array { medium, .. } if medium.lu == 11),
            "{l:?}"
        );
        let v = serde_json::to_value(&l).unwrap();
        assert_eq!(v, serde_json::from_str::<Value>(array).unwrap());
        assert!(v.get("written_bytes").is_none(), "{v}");
    }
}
