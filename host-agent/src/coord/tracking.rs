//! Changed-block tracking over the coordination protocol (issue 19): the database role's
//! `complete` and `abort` operations, the [`Changes`] of a snapshot reply, and the
//! console's calls.
//!
//! A `snapshot` with a `backup` id cuts each virtual LU's record at the snapshot instant
//! ([`super::freeze`]); its reply carries, per virtual LU, `{"base": ID | null, "extents":
//! [[offset, length], ...], "bytes": N}`: the byte ranges written since the last
//! completed backup `base` (sorted, disjoint; `base` null: no backup completed yet, copy
//! everything). Once the copy is stored the console sends `complete` (the backup becomes
//! the base); if it fails, `abort` (the ranges count as written again). Both are
//! idempotent and answer `{"vlus": {NAME: {"base": ID | null}}}` ([`super::TrackingBases`]).

use super::{new_id, Changes, Failure, Op, Peer, TrackingBases};
use crate::exports::Manager;
use hvm_core::{BackupId, VirtualLuId, SECTOR_SIZE};

/// Tell the database host that `backup` of `vlus` is stored: it becomes their base.
pub fn complete(db: &Peer, vlus: &[String], backup: &str) -> Result<TrackingBases, Failure> {
    let op = Op::Complete {
        vlus: vlus.to_vec(),
        backup: backup.to_string(),
    };
    db.ask(&new_id(), &op, 3, &mut |_, _| {})
}

/// Tell the database host that `backup` of `vlus` failed: what it would have copied
/// counts as written again.
pub fn abort(db: &Peer, vlus: &[String], backup: &str) -> Result<TrackingBases, Failure> {
    let op = Op::Abort {
        vlus: vlus.to_vec(),
        backup: backup.to_string(),
    };
    db.ask(&new_id(), &op, 3, &mut |_, _| {})
}

/// One virtual LU's entry of a snapshot reply's `changes`: `backup`'s pending ranges in
/// bytes, clipped to the LU (a coarsened set may round past its end).
pub fn changes(
    mgr: &Manager,
    vlu: VirtualLuId,
    backup: &BackupId,
    base: Option<BackupId>,
) -> Result<Changes, String> {
    let capacity = mgr.capacity_bytes(vlu).map_err(|e| e.to_string())?;
    let extents = mgr
        .pending_extents(vlu, backup)
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("backup {backup} is not pending (cut by another run?)"))?;
    let mut bytes = 0u64;
    let extents: Vec<(u64, u64)> = extents
        .into_iter()
        .filter_map(|e| {
            let off = e.first().checked_mul(SECTOR_SIZE)?;
            let end = e
                .last()
                .checked_add(1)?
                .saturating_mul(SECTOR_SIZE)
                .min(capacity);
            (off < end).then(|| {
                bytes += end - off;
                (off, end - off)
            })
        })
        .collect();
    // Past the memory budget the sets are rounded out to granules: the ranges then cover
    // more than was written, and `bytes` is what they cover.
    let granule = mgr
        .tracking(vlu)
        .map(|t| t.granularity * SECTOR_SIZE)
        .map_err(|e| e.to_string())?;
    Ok(Changes {
        base: base.map(|b| b.to_string()),
        extents,
        bytes,
        granule,
    })
}
