//! hvm-core: the host-side snapshot model of EP 1 148 416.
//!
//! - [`update_location`]: the update-location table (Fig. 3).
//! - [`tables`]: the LU mode table (Fig. 10) and the mirroring definition table (Fig. 9,
//!   Fig. 14).
//! - [`mode`]: modes and the Mode Select/Mode Sense pages (Fig. 4, Fig. 11).
//! - [`backend`]: the `Backend` trait array drivers implement.
//! - [`router`]: the strategies (E1, E2, E4) and the routing of one I/O.
//! - [`manager`]: the snapshot manager: acquire, delete, I/O, resync (Fig. 5, Fig. 7).
//! - [`change_tracking`]: changed-block tracking across backups (issue 19).
//! - [`journal`]: the on-disk format that persists the tables.
//!
//! No sockets and no async runtime live here; the service builds on this.

pub mod array_backup;
pub mod backend;
pub mod change_tracking;
pub mod journal;
pub mod lba;
pub mod manager;
#[cfg(feature = "mem-array")]
pub mod mem_array;
pub mod mode;
pub mod range_lock;
pub mod router;
pub mod save_area;
pub mod tables;
pub mod update_location;

pub use backend::{Backend, BackendDescription, BackendError, BackendErrorKind, Capabilities};
pub use change_tracking::{BackupId, ChangedBlocks};
pub use lba::{Extent, SECTOR_SIZE};
pub use manager::{ManagerError, PairConfig, ResyncProgress, SnapshotManager};
pub use mode::Mode;
pub use router::Strategy;
pub use tables::{LuId, LuModeEntry, LuModeTable, MirrorDefinition, VirtualLuId};
pub use update_location::{TableBudget, UpdateLocationTable};
