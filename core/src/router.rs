//! Snapshot strategies and the router: for one I/O to a virtual LU, which real LU it goes
//! to and what the update-location table must do (Fig. 5, Fig. 10, [0057], [0076]).
//!
//! The router is a pure function of the virtual LU's LU mode table row; the snapshot
//! manager does the bookkeeping and issues the I/O.

use std::fmt;

use crate::backend::Capabilities;
use crate::mode::Mode;
use crate::tables::{LuId, LuModeEntry, MirrorDefinition, VirtualLuId};

/// How a pair of virtual LUs is split into original data and snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Strategy {
    /// E1: the array keeps the mode, set by Mode Select ([0016]-[0049]).
    ModeSelect,
    /// E2: the array is stateless; the host re-routes virtual LUs ([0050]-[0062]).
    VirtualLuRouting,
    /// E4: the host saves pre-update data; snapshot reads of unchanged data go to the
    /// read-only mate ([0072]-[0078]).
    CopyOnWrite,
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Strategy::ModeSelect => "E1 (Mode Select)",
            Strategy::VirtualLuRouting => "E2 (virtual-LU routing)",
            Strategy::CopyOnWrite => "E4 (copy-on-write with read distribution)",
        })
    }
}

/// The array cannot run the strategy its mirroring definition needs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("\"{definition}\" needs {strategy}, but the array does not offer {missing}")]
pub struct StrategyError {
    pub definition: MirrorDefinition,
    pub strategy: Strategy,
    pub missing: &'static str,
}

impl Strategy {
    /// The strategy a mirroring definition row needs, checked against the array's
    /// capabilities.
    pub fn for_definition(
        def: &MirrorDefinition,
        caps: &Capabilities,
    ) -> Result<Strategy, StrategyError> {
        let (strategy, ok, missing) = match def {
            MirrorDefinition::Managed { .. } => {
                (Strategy::ModeSelect, caps.mode_select, "Mode Select")
            }
            MirrorDefinition::Triple { .. } => (
                Strategy::VirtualLuRouting,
                caps.virtual_lu_forming,
                "virtual LU forming (Fig. 9 triples)",
            ),
            MirrorDefinition::Pair { .. } => (
                Strategy::CopyOnWrite,
                caps.read_only_mate,
                "a read-only mate (Fig. 14 pairs)",
            ),
        };
        if ok {
            Ok(strategy)
        } else {
            Err(StrategyError {
                definition: def.clone(),
                strategy,
                missing,
            })
        }
    }
}

/// Which virtual LU of a pair an I/O names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// The original data (the database's virtual LU).
    Origin,
    /// The snapshot seen through mate number `n` (0 unless the array has several mates).
    Snapshot(usize),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Read,
    Write,
}

/// What the update-location table must do for the I/O.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bookkeeping {
    None,
    /// Snapshot mode: record the range before the write (Fig. 5 steps 802-803).
    Record,
    /// Re-synchronizing mode: delete the range, the array mirrors the write
    /// (Fig. 5 steps 805-806, [0042]).
    Delete,
    /// E4 Snapshot mode: save the pre-update data of unsaved blocks first ([0072]).
    CopyOnWrite,
    /// E4 snapshot read: saved blocks from the save area, the rest from the mate ([0076]).
    SnapshotRead,
}

/// Where one I/O goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Route {
    pub lu: LuId,
    pub bookkeeping: Bookkeeping,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// [0057]: access to an Undefined virtual LU is rejected.
    #[error("{0} is Undefined: no access until a snapshot makes it accessible")]
    Undefined(VirtualLuId),
    #[error("{0} is read-only in mode {1}")]
    ReadOnly(VirtualLuId, Mode),
    #[error("{0} has no READ destination in mode {1}")]
    NoReadDestination(VirtualLuId, Mode),
}

/// Route one I/O of `vlu` by its LU mode table row.
pub fn route(
    strategy: Strategy,
    vlu: VirtualLuId,
    role: Role,
    entry: Option<LuModeEntry>,
    op: Op,
) -> Result<Route, RouteError> {
    let entry = match entry {
        Some(e) if e.mode != Mode::Undefined => e,
        _ => return Err(RouteError::Undefined(vlu)),
    };
    match op {
        Op::Read => {
            let lu = entry
                .read
                .ok_or(RouteError::NoReadDestination(vlu, entry.mode))?;
            let bookkeeping = match (strategy, role, entry.mode) {
                (Strategy::CopyOnWrite, Role::Snapshot(_), Mode::Snapshot) => {
                    Bookkeeping::SnapshotRead
                }
                _ => Bookkeeping::None,
            };
            Ok(Route { lu, bookkeeping })
        }
        Op::Write => {
            let lu = entry.write.ok_or(RouteError::ReadOnly(vlu, entry.mode))?;
            let bookkeeping = match (entry.mode, strategy) {
                (Mode::Snapshot, Strategy::CopyOnWrite) => Bookkeeping::CopyOnWrite,
                // Writes to a writable snapshot are recorded too: they make the mate
                // differ from the origin, and resync must undo that.
                (Mode::Snapshot, _) => Bookkeeping::Record,
                (Mode::Resynchronizing, _) => Bookkeeping::Delete,
                _ => Bookkeeping::None,
            };
            Ok(Route { lu, bookkeeping })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(read: Option<u32>, write: Option<u32>, mode: Mode) -> Option<LuModeEntry> {
        Some(LuModeEntry {
            read: read.map(LuId),
            write: write.map(LuId),
            mode,
        })
    }

    /// [0057] with Fig. 10: virtual LU 0 reads and writes LU 0; virtual LU 4 reads LU 7
    /// and writes LU 6; the Undefined virtual LUs 1 and 5 are rejected.
    #[test]
    fn fig10_routing() {
        let s = Strategy::VirtualLuRouting;
        let v0 = row(Some(0), Some(0), Mode::Synchronized);
        let v4 = row(Some(7), Some(6), Mode::Resynchronizing);
        let r = |vlu, entry, op| route(s, VirtualLuId(vlu), Role::Origin, entry, op);
        assert_eq!(r(0, v0, Op::Read).unwrap().lu, LuId(0));
        assert_eq!(r(0, v0, Op::Write).unwrap().lu, LuId(0));
        assert_eq!(r(4, v4, Op::Read).unwrap().lu, LuId(7));
        let w = r(4, v4, Op::Write).unwrap();
        assert_eq!((w.lu, w.bookkeeping), (LuId(6), Bookkeeping::Delete));
        assert_eq!(
            r(1, Some(LuModeEntry::UNDEFINED), Op::Read),
            Err(RouteError::Undefined(VirtualLuId(1)))
        );
        assert_eq!(
            r(5, None, Op::Write),
            Err(RouteError::Undefined(VirtualLuId(5)))
        );
    }

    /// Fig. 5: record in Snapshot, delete in Re-synchronizing, nothing in Synchronized.
    #[test]
    fn fig5_bookkeeping() {
        let s = Strategy::ModeSelect;
        let b = |mode| {
            route(
                s,
                VirtualLuId(0),
                Role::Origin,
                row(Some(1), Some(1), mode),
                Op::Write,
            )
            .unwrap()
            .bookkeeping
        };
        assert_eq!(b(Mode::Snapshot), Bookkeeping::Record);
        assert_eq!(b(Mode::Resynchronizing), Bookkeeping::Delete);
        assert_eq!(b(Mode::Synchronized), Bookkeeping::None);
    }

    /// E4: snapshot reads are split, origin writes copy on write, the snapshot is
    /// read-only ([0005]: "the snapshot is exclusive to reading").
    #[test]
    fn e4_routes() {
        let s = Strategy::CopyOnWrite;
        let snap = row(Some(1), None, Mode::Snapshot);
        let orig = row(Some(0), Some(0), Mode::Snapshot);
        let snap_vlu = VirtualLuId(1);
        assert_eq!(
            route(s, snap_vlu, Role::Snapshot(0), snap, Op::Read).unwrap(),
            Route {
                lu: LuId(1),
                bookkeeping: Bookkeeping::SnapshotRead
            }
        );
        assert_eq!(
            route(s, snap_vlu, Role::Snapshot(0), snap, Op::Write),
            Err(RouteError::ReadOnly(snap_vlu, Mode::Snapshot))
        );
        assert_eq!(
            route(s, VirtualLuId(0), Role::Origin, orig, Op::Write)
                .unwrap()
                .bookkeeping,
            Bookkeeping::CopyOnWrite
        );
        assert_eq!(
            route(s, VirtualLuId(0), Role::Origin, orig, Op::Read)
                .unwrap()
                .bookkeeping,
            Bookkeeping::None
        );
    }

    #[test]
    fn strategy_from_definition_and_capabilities() {
        let caps = Capabilities {
            virtual_lu_forming: true,
            ..Capabilities::default()
        };
        let triple = MirrorDefinition::Triple {
            mirror: LuId(0),
            origin: LuId(1),
            mate: LuId(2),
        };
        assert_eq!(
            Strategy::for_definition(&triple, &caps),
            Ok(Strategy::VirtualLuRouting)
        );
        let managed = MirrorDefinition::Managed {
            lu: LuId(0),
            mates: vec![LuId(1)],
        };
        let err = Strategy::for_definition(&managed, &caps).unwrap_err();
        assert_eq!(err.strategy, Strategy::ModeSelect);
        assert!(err.to_string().contains("Mode Select"), "{err}");
    }
}
