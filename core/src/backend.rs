//! The `Backend` trait: what hvm-core needs from an array driver.
//!
//! Plugins implement it behind the stable ABI; the core only sees this trait. I/O is in
//! whole 512-byte logical blocks, as SCSI's READ(16)/WRITE(16) are; the snapshot manager
//! turns byte ranges from clients into block I/O.

use std::fmt;
use std::sync::Arc;

use crate::array_backup::{BackupCapabilities, BackupOp, BackupReply};
use crate::lba::Extent;
use crate::tables::{LuId, MirrorDefinition};

/// What an array can do. The core picks the snapshot strategy from these (DESIGN.md §2).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// Mode Select/Mode Sense of the Fig. 4 page: the array keeps a mode per LU (E1).
    pub mode_select: bool,
    /// Fig. 9 triples with all three LUs accessible: the host routes virtual LUs (E2).
    pub virtual_lu_forming: bool,
    /// Fig. 14 pairs with a read-only mate: the host does copy-on-write (E4).
    pub read_only_mate: bool,
    /// Array-side copy of LBA ranges between LUs ([0049]).
    pub array_copy: bool,
    /// WRITE with Force Unit Access.
    pub fua: bool,
}

/// One real LU of the array.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LuInfo {
    pub id: LuId,
    /// Capacity in 512-byte blocks.
    pub capacity_lbas: u64,
}

/// What `describe` reports.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BackendDescription {
    pub lus: Vec<LuInfo>,
    /// Mirroring definitions the driver discovered (INQUIRY's pairing page or its config).
    /// May be empty: the core then asks Mode Sense ([0054]) or uses the host config.
    pub mirroring: Vec<MirrorDefinition>,
    pub capabilities: Capabilities,
}

impl BackendDescription {
    pub fn capacity(&self, lu: LuId) -> Option<u64> {
        self.lus
            .iter()
            .find(|l| l.id == lu)
            .map(|l| l.capacity_lbas)
    }
}

/// The kind of a backend failure; fixes the errno a client sees.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum BackendErrorKind {
    /// Medium or transport error (SCSI MEDIUM/HARDWARE ERROR, lost connection).
    Io,
    /// LBA range past the end of the LU (ILLEGAL REQUEST 21h/00h).
    OutOfRange,
    /// Write to a protected LU, such as a mate (DATA PROTECT 27h/00h).
    DataProtect,
    /// The LU is not accessible in its current mode (NOT READY 04h).
    NotReady,
    /// A malformed request (ILLEGAL REQUEST, other ASC).
    InvalidRequest,
    /// The array does not offer this operation.
    Unsupported,
    /// The driver itself failed (panicked, or was marked failed) and is out of service.
    Failed,
}

impl fmt::Display for BackendErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackendErrorKind::Io => "I/O error",
            BackendErrorKind::OutOfRange => "LBA out of range",
            BackendErrorKind::DataProtect => "data protected",
            BackendErrorKind::NotReady => "LU not ready",
            BackendErrorKind::InvalidRequest => "invalid request",
            BackendErrorKind::Unsupported => "not supported",
            BackendErrorKind::Failed => "backend failed",
        })
    }
}

/// Errno values used by NBD replies (Linux numbering, as the NBD protocol uses).
pub mod errno {
    pub const EPERM: i32 = 1;
    pub const EIO: i32 = 5;
    pub const ENOMEM: i32 = 12;
    pub const EINVAL: i32 = 22;
    pub const ENOSPC: i32 = 28;
    pub const EOVERFLOW: i32 = 75;
    pub const ENOTSUP: i32 = 95;
    pub const ESHUTDOWN: i32 = 108;
}

/// A failed backend operation.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{kind}: {message}")]
pub struct BackendError {
    pub kind: BackendErrorKind,
    pub message: String,
}

impl BackendError {
    pub fn new(kind: BackendErrorKind, message: impl Into<String>) -> Self {
        BackendError {
            kind,
            message: message.into(),
        }
    }

    /// The errno a block client should see.
    pub fn errno(&self) -> i32 {
        match self.kind {
            BackendErrorKind::OutOfRange | BackendErrorKind::InvalidRequest => errno::EINVAL,
            BackendErrorKind::DataProtect => errno::EPERM,
            BackendErrorKind::Unsupported => errno::ENOTSUP,
            BackendErrorKind::Io | BackendErrorKind::NotReady | BackendErrorKind::Failed => {
                errno::EIO
            }
        }
    }
}

/// An array driver. Every method may be called from many threads at once; a driver that
/// cannot run commands in parallel serialises inside.
#[cfg_attr(any(test, feature = "mockall"), mockall::automock)]
pub trait Backend: Send + Sync {
    /// LUs, capacities, mirroring definitions and capabilities. Called at start-up.
    fn describe(&self) -> Result<BackendDescription, BackendError>;

    /// Read `buf.len()` bytes (a multiple of 512) from `lu` starting at block `lba`.
    fn read(&self, lu: LuId, lba: u64, buf: &mut [u8]) -> Result<(), BackendError>;

    /// Write `data` (a multiple of 512 bytes) to `lu` at block `lba`; with `fua` the data
    /// is on stable storage when this returns.
    fn write(&self, lu: LuId, lba: u64, data: &[u8], fua: bool) -> Result<(), BackendError>;

    /// Make every completed write to `lu` stable (SYNCHRONIZE CACHE).
    fn flush(&self, lu: LuId) -> Result<(), BackendError>;

    /// The raw Mode Sense parameter page of `lu` (Fig. 4 or Fig. 11, by array kind).
    fn mode_sense(&self, lu: LuId) -> Result<Vec<u8>, BackendError>;

    /// Send a Mode Select parameter page (Fig. 4) for `lu`.
    fn mode_select(&self, lu: LuId, page: &[u8]) -> Result<(), BackendError>;

    /// Copy the blocks of `extent` from `src` to `dst` inside the array ([0049]).
    /// Only called when `Capabilities::array_copy` is set.
    fn copy(&self, src: LuId, dst: LuId, extent: Extent) -> Result<(), BackendError>;

    /// Write zeroes to `blocks` blocks of `lu` from block `lba` (NBD WRITE_ZEROES and
    /// TRIM, SCSI WRITE SAME). With `unmap` the storage may deallocate the blocks instead
    /// (a punched hole, a discard); they read back as zeroes either way, so mirrored legs
    /// stay identical. The default writes zero-filled buffers.
    fn write_zeroes(
        &self,
        lu: LuId,
        lba: u64,
        blocks: u64,
        unmap: bool,
        fua: bool,
    ) -> Result<(), BackendError> {
        let _ = unmap;
        write_zeroes_by_writing(self, lu, lba, blocks, fua)
    }

    /// Who the storage behind `lu` is, as a stable text (a VPD 83h designator, a file's
    /// device, inode and size, an NBD export, an RBD image id): the same storage gives the
    /// same text after a restart, other storage a different one. `None` when the driver
    /// cannot tell.
    fn identity(&self, lu: LuId) -> Result<Option<String>, BackendError> {
        let _ = lu;
        Ok(None)
    }

    /// Which array-side backup functions of EP 1 058 190 the array offers (none unless a
    /// driver says so).
    fn backup_capabilities(&self) -> BackupCapabilities {
        BackupCapabilities::default()
    }

    /// Run one array-side backup operation.
    fn backup(&self, op: &BackupOp) -> Result<BackupReply, BackendError> {
        let _ = op;
        Err(BackendError::new(
            BackendErrorKind::Unsupported,
            "this array offers no array-side backup functions",
        ))
    }
}

/// Zero `blocks` blocks of `lu` from `lba` by writing zero-filled buffers of at most
/// 1 MiB: [`Backend::write_zeroes`] for storage that has no faster way.
pub fn write_zeroes_by_writing<B: Backend + ?Sized>(
    backend: &B,
    lu: LuId,
    lba: u64,
    blocks: u64,
    fua: bool,
) -> Result<(), BackendError> {
    const CHUNK_BLOCKS: u64 = 2048;
    let zero = vec![0u8; (blocks.min(CHUNK_BLOCKS) * crate::SECTOR_SIZE) as usize];
    let mut done = 0;
    while done < blocks {
        let n = (blocks - done).min(CHUNK_BLOCKS);
        backend.write(
            lu,
            lba + done,
            &zero[..(n * crate::SECTOR_SIZE) as usize],
            fua,
        )?;
        done += n;
    }
    Ok(())
}

macro_rules! forward_backend {
    ($($ty:ty),*) => {$(
        impl<B: Backend + ?Sized> Backend for $ty {
            fn describe(&self) -> Result<BackendDescription, BackendError> {
                (**self).describe()
            }
            fn read(&self, lu: LuId, lba: u64, buf: &mut [u8]) -> Result<(), BackendError> {
                (**self).read(lu, lba, buf)
            }
            fn write(&self, lu: LuId, lba: u64, data: &[u8], fua: bool) -> Result<(), BackendError> {
                (**self).write(lu, lba, data, fua)
            }
            fn flush(&self, lu: LuId) -> Result<(), BackendError> {
                (**self).flush(lu)
            }
            fn mode_sense(&self, lu: LuId) -> Result<Vec<u8>, BackendError> {
                (**self).mode_sense(lu)
            }
            fn mode_select(&self, lu: LuId, page: &[u8]) -> Result<(), BackendError> {
                (**self).mode_select(lu, page)
            }
            fn copy(&self, src: LuId, dst: LuId, extent: Extent) -> Result<(), BackendError> {
                (**self).copy(src, dst, extent)
            }
            fn write_zeroes(&self, lu: LuId, lba: u64, blocks: u64, unmap: bool, fua: bool) -> Result<(), BackendError> {
                (**self).write_zeroes(lu, lba, blocks, unmap, fua)
            }
            fn identity(&self, lu: LuId) -> Result<Option<String>, BackendError> {
                (**self).identity(lu)
            }
            fn backup_capabilities(&self) -> BackupCapabilities {
                (**self).backup_capabilities()
            }
            fn backup(&self, op: &BackupOp) -> Result<BackupReply, BackendError> {
                (**self).backup(op)
            }
        }
    )*};
}

forward_backend!(Arc<B>, Box<B>, &B);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_zeroes_by_default_writes_zero_buffers_in_chunks() {
        let mut mock = MockBackend::new();
        let mut seq = mockall::Sequence::new();
        for (lba, blocks) in [(7u64, 2048u64), (2055, 2048), (4103, 4)] {
            mock.expect_write()
                .withf(move |lu, at, data, fua| {
                    *lu == LuId(3)
                        && *at == lba
                        && data.len() as u64 == blocks * 512
                        && data.iter().all(|b| *b == 0)
                        && *fua
                })
                .times(1)
                .in_sequence(&mut seq)
                .returning(|_, _, _, _| Ok(()));
        }
        write_zeroes_by_writing(&mock, LuId(3), 7, 4100, true).unwrap();
    }

    #[test]
    fn errno_mapping() {
        let e = |k| BackendError::new(k, "x").errno();
        assert_eq!(e(BackendErrorKind::OutOfRange), errno::EINVAL);
        assert_eq!(e(BackendErrorKind::DataProtect), errno::EPERM);
        assert_eq!(e(BackendErrorKind::Io), errno::EIO);
        assert_eq!(e(BackendErrorKind::Unsupported), errno::ENOTSUP);
    }
}
