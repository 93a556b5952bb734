//! The LU mode table (Fig. 10) and the mirroring definition table (Fig. 9, Fig. 14), and
//! the mirroring management rows of the Mode Select array (Fig. 2) as the host sees them.

use std::collections::BTreeMap;
use std::fmt;

use crate::mode::Mode;

/// A real LU of an array.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LuId(pub u32);

/// A virtual LU served by hvm to the host's programs ([0052]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VirtualLuId(pub u32);

impl fmt::Display for LuId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LU {}", self.0)
    }
}

impl fmt::Display for VirtualLuId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "virtual LU {}", self.0)
    }
}

/// One row of the LU mode table (Fig. 10): where reads and writes of a virtual LU go.
/// `None` is Fig. 10's "—": reads (or writes) are refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LuModeEntry {
    pub read: Option<LuId>,
    pub write: Option<LuId>,
    pub mode: Mode,
}

impl LuModeEntry {
    /// Reads and writes both go to `lu`.
    pub fn both(lu: LuId, mode: Mode) -> Self {
        LuModeEntry {
            read: Some(lu),
            write: Some(lu),
            mode,
        }
    }

    /// Undefined: no access at all ([0052]).
    pub const UNDEFINED: LuModeEntry = LuModeEntry {
        read: None,
        write: None,
        mode: Mode::Undefined,
    };
}

/// The LU mode table (Fig. 10; in the 1st embodiment, Fig. 2 without the mate column,
/// [0022]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LuModeTable {
    rows: BTreeMap<VirtualLuId, LuModeEntry>,
}

impl LuModeTable {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn get(&self, vlu: VirtualLuId) -> Option<LuModeEntry> {
        self.rows.get(&vlu).copied()
    }

    /// The mode of `vlu`; a virtual LU with no row is Undefined.
    pub fn mode(&self, vlu: VirtualLuId) -> Mode {
        self.get(vlu).map_or(Mode::Undefined, |e| e.mode)
    }

    pub fn set(&mut self, vlu: VirtualLuId, entry: LuModeEntry) {
        self.rows.insert(vlu, entry);
    }

    pub fn iter(&self) -> impl Iterator<Item = (VirtualLuId, LuModeEntry)> + '_ {
        self.rows.iter().map(|(k, v)| (*k, *v))
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }
}

/// One row of a mirroring definition table. The variant fixes the array kind and so the
/// snapshot strategy.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum MirrorDefinition {
    /// Mode Select array (Fig. 2): `lu` is mirrored by the array to each of `mates`
    /// (two or more mates give a triple mirror, [0020]); the array keeps the mode.
    Managed { lu: LuId, mates: Vec<LuId> },
    /// Stateless array (Fig. 9): the mirroring LU writes both the origin and the mate;
    /// all three are accessible ([0051]).
    Triple {
        mirror: LuId,
        origin: LuId,
        mate: LuId,
    },
    /// Pre-update array (Fig. 14): the mirroring LU has two legs, `mate` is a read-only
    /// view of one of them ([0073]).
    Pair { mirror: LuId, mate: LuId },
}

impl MirrorDefinition {
    /// Every real LU the row names.
    pub fn lus(&self) -> Vec<LuId> {
        match self {
            MirrorDefinition::Managed { lu, mates } => {
                std::iter::once(*lu).chain(mates.iter().copied()).collect()
            }
            MirrorDefinition::Triple {
                mirror,
                origin,
                mate,
            } => vec![*mirror, *origin, *mate],
            MirrorDefinition::Pair { mirror, mate } => vec![*mirror, *mate],
        }
    }

    /// The LU that holds the original data (the database's LU).
    pub fn primary(&self) -> LuId {
        match self {
            MirrorDefinition::Managed { lu, .. } => *lu,
            MirrorDefinition::Triple { mirror, .. } | MirrorDefinition::Pair { mirror, .. } => {
                *mirror
            }
        }
    }
}

impl fmt::Display for MirrorDefinition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MirrorDefinition::Managed { lu, mates } => {
                write!(f, "{lu} mirrored to")?;
                for m in mates {
                    write!(f, " {m}")?;
                }
                Ok(())
            }
            MirrorDefinition::Triple {
                mirror,
                origin,
                mate,
            } => write!(f, "mirroring {mirror} = origin {origin} + mate {mate}"),
            MirrorDefinition::Pair { mirror, mate } => {
                write!(f, "mirroring {mirror} with read-only mate {mate}")
            }
        }
    }
}

/// A mirroring definition that cannot be accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DefinitionError {
    #[error("{lu} is named twice in one mirroring definition ({def})")]
    Repeated { lu: LuId, def: MirrorDefinition },
    #[error(
        "{lu} is already part of the mirroring definition \"{existing}\"; cannot add \"{new}\""
    )]
    Overlap {
        lu: LuId,
        existing: MirrorDefinition,
        new: MirrorDefinition,
    },
    #[error("the mirroring definition of {0} has no mate LU")]
    NoMate(LuId),
}

/// The mirroring definition table (Fig. 9, Fig. 14; for the Mode Select array, Fig. 2's
/// LU and mate columns). Every real LU is in at most one row.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MirroringDefinitionTable {
    rows: Vec<MirrorDefinition>,
}

impl MirroringDefinitionTable {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(&mut self, def: MirrorDefinition) -> Result<(), DefinitionError> {
        let lus = def.lus();
        if let MirrorDefinition::Managed { lu, mates } = &def {
            if mates.is_empty() {
                return Err(DefinitionError::NoMate(*lu));
            }
        }
        for (i, lu) in lus.iter().enumerate() {
            if lus[..i].contains(lu) {
                return Err(DefinitionError::Repeated {
                    lu: *lu,
                    def: def.clone(),
                });
            }
            if let Some(existing) = self.containing(*lu) {
                return Err(DefinitionError::Overlap {
                    lu: *lu,
                    existing: existing.clone(),
                    new: def.clone(),
                });
            }
        }
        self.rows.push(def);
        Ok(())
    }

    /// The row that names `lu` in any column.
    pub fn containing(&self, lu: LuId) -> Option<&MirrorDefinition> {
        self.rows.iter().find(|d| d.lus().contains(&lu))
    }

    /// The row whose mirroring LU (or, for the Mode Select array, whose LU) is `lu`.
    pub fn by_primary(&self, lu: LuId) -> Option<&MirrorDefinition> {
        self.rows.iter().find(|d| d.primary() == lu)
    }

    pub fn iter(&self) -> impl Iterator<Item = &MirrorDefinition> {
        self.rows.iter()
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }
}

impl TryFrom<Vec<MirrorDefinition>> for MirroringDefinitionTable {
    type Error = DefinitionError;

    fn try_from(rows: Vec<MirrorDefinition>) -> Result<Self, Self::Error> {
        let mut t = MirroringDefinitionTable::new();
        for r in rows {
            t.insert(r)?;
        }
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn triple(m: u32, o: u32, t: u32) -> MirrorDefinition {
        MirrorDefinition::Triple {
            mirror: LuId(m),
            origin: LuId(o),
            mate: LuId(t),
        }
    }

    /// Fig. 9's three rows; [0060]: the origin of mirroring LU 0 is LU 1; [0061]: the
    /// mirroring LU of LU 4 is LU 3.
    #[test]
    fn fig9_rows() {
        let t = MirroringDefinitionTable::try_from(vec![
            triple(0, 1, 2),
            triple(3, 4, 5),
            triple(6, 7, 8),
        ])
        .unwrap();
        assert_eq!(t.len(), 3);
        assert_eq!(t.by_primary(LuId(0)), Some(&triple(0, 1, 2)));
        assert_eq!(t.containing(LuId(4)).map(|d| d.primary()), Some(LuId(3)));
        assert_eq!(t.containing(LuId(7)).map(|d| d.primary()), Some(LuId(6)));
        assert_eq!(t.containing(LuId(9)), None);
    }

    /// Fig. 14's rows: LU 0 duplicated to LU 1, 2 to 3, 4 to 5.
    #[test]
    fn fig14_rows() {
        let rows: Vec<_> = [(0, 1), (2, 3), (4, 5)]
            .iter()
            .map(|&(m, t)| MirrorDefinition::Pair {
                mirror: LuId(m),
                mate: LuId(t),
            })
            .collect();
        let t = MirroringDefinitionTable::try_from(rows).unwrap();
        assert_eq!(t.containing(LuId(3)).map(|d| d.primary()), Some(LuId(2)));
        assert_eq!(t.by_primary(LuId(1)), None);
    }

    /// Fig. 2's LU and mate columns: 1-4, 2-5, 3-6; a triple mirror has two mates.
    #[test]
    fn fig2_rows_and_triple_mirror() {
        let mut t = MirroringDefinitionTable::new();
        for (lu, mate) in [(1, 4), (2, 5), (3, 6)] {
            t.insert(MirrorDefinition::Managed {
                lu: LuId(lu),
                mates: vec![LuId(mate)],
            })
            .unwrap();
        }
        t.insert(MirrorDefinition::Managed {
            lu: LuId(7),
            mates: vec![LuId(8), LuId(9)],
        })
        .unwrap();
        assert_eq!(t.containing(LuId(9)).map(|d| d.primary()), Some(LuId(7)));
    }

    #[test]
    fn bad_definitions_are_refused() {
        let mut t = MirroringDefinitionTable::new();
        t.insert(triple(0, 1, 2)).unwrap();
        let err = t.insert(triple(3, 2, 4)).unwrap_err();
        assert!(
            matches!(err, DefinitionError::Overlap { lu: LuId(2), .. }),
            "{err}"
        );
        let err = t.insert(triple(5, 5, 6)).unwrap_err();
        assert!(
            matches!(err, DefinitionError::Repeated { lu: LuId(5), .. }),
            "{err}"
        );
        let err = t
            .insert(MirrorDefinition::Managed {
                lu: LuId(9),
                mates: vec![],
            })
            .unwrap_err();
        assert_eq!(err, DefinitionError::NoMate(LuId(9)));
    }

    /// Fig. 10's rows as data; the routing tests drive a manager into exactly this table.
    #[test]
    fn fig10_rows() {
        let mut t = LuModeTable::new();
        t.set(
            VirtualLuId(0),
            LuModeEntry::both(LuId(0), Mode::Synchronized),
        );
        t.set(VirtualLuId(1), LuModeEntry::UNDEFINED);
        t.set(
            VirtualLuId(4),
            LuModeEntry {
                read: Some(LuId(7)),
                write: Some(LuId(6)),
                mode: Mode::Resynchronizing,
            },
        );
        assert_eq!(t.mode(VirtualLuId(1)), Mode::Undefined);
        assert_eq!(t.mode(VirtualLuId(99)), Mode::Undefined);
        assert_eq!(t.get(VirtualLuId(4)).unwrap().read, Some(LuId(7)));
        assert_eq!(t.len(), 3);
    }
}
