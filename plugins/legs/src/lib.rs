//! hvm-legs: a stateless array (E2, [0055]-[0061]) made of storage that keeps no snapshot
//! state of its own: two legs per volume, each a file or block device, an NBD export or
//! an RBD image. hvm does everything an array would: the routing, the update-location
//! table, the resync. A driver implements [`Leg`] for its storage and hands its opened
//! legs to [`Mirrored`], which is the `hvm_core::Backend`.
//!
//! Each volume is one row of Fig. 9: its mirror LU `lu` writes both legs and reads the
//! first, its origin LU `lu + 1` is the first leg alone and its mate LU `lu + 2` the
//! second. A virtual LU names the mirror LU (`virtual_lus: [{ lu: 0, ... }]`).
//!
//! A driver's parameters hold the volumes as [`VolumeSpec`]s:
//!
//! ```yaml
//! volumes:
//!   - lu: 0
//!     legs: [/dev/vg0/db-a, /dev/vg0/db-b]   # origin leg, mate leg
//!     size: 10G                              # optional: use the first 10 GiB
//! ```

mod companion;
mod mirrored;
mod size;

pub use companion::Companion;
pub use mirrored::{Mirrored, Volume};
pub use size::Size;

use hvm_core::backend::BackendError;
use serde::Deserialize;

/// One leg of a volume: storage that reads and writes bytes at offsets. Every method may
/// be called from many threads at once.
pub trait Leg: Send + Sync + 'static {
    /// Size in bytes, a multiple of 512.
    fn size(&self) -> u64;

    /// Who the storage is, stable across restarts (device and inode, server and export,
    /// cluster and image id): hvm-core's `Backend::identity`.
    fn identity(&self) -> String;

    /// Where the leg is, as the operator wrote it (a path, a URI): for messages.
    fn name(&self) -> &str;

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), BackendError>;

    /// With `fua`, the data is on stable storage when this returns.
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), BackendError>;

    /// Make every completed write stable.
    fn flush(&self) -> Result<(), BackendError>;

    /// Zero `len` bytes at `offset` (both multiples of 512); with `unmap` the storage may
    /// deallocate them, as long as they read back as zeroes.
    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        unmap: bool,
        fua: bool,
    ) -> Result<(), BackendError>;

    /// Write `data` to this leg and to `other` at once, when the storage has a way to have
    /// both in flight without a second thread (io_uring, a multiplexed connection, AIO).
    /// `None` means it has none: [`Mirrored`] then writes `other` on a companion thread
    /// while the calling thread writes this leg.
    fn write_both(
        &self,
        other: &Self,
        offset: u64,
        data: &[u8],
        fua: bool,
    ) -> Option<Result<(), BackendError>> {
        let _ = (other, offset, data, fua);
        None
    }

    /// Copy `len` bytes at `offset` from this leg to the same place of `dst` without the
    /// data passing through hvm (copy_file_range, a server-side copy), when the storage
    /// can. `Ok(false)` means it cannot, and the caller reads and writes.
    fn copy_to(&self, dst: &Self, offset: u64, len: u64) -> Result<bool, BackendError> {
        let _ = (dst, offset, len);
        Ok(false)
    }
}

/// One volume in a driver's parameters.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VolumeSpec {
    /// The mirror LU; the legs are LUs `lu + 1` (origin) and `lu + 2` (mate).
    pub lu: u32,
    /// The two legs, origin first, as the driver names storage.
    pub legs: Vec<String>,
    /// How much of the legs the volume uses; all of them when left out.
    #[serde(default)]
    pub size: Option<Size>,
}

impl VolumeSpec {
    /// The two legs, or why there are not exactly two.
    pub fn leg_names(&self) -> Result<[&str; 2], String> {
        match self.legs.as_slice() {
            [a, b] => Ok([a, b]),
            other => Err(format!(
                "volume lu {}: legs: expected two (origin, mate), found {}",
                self.lu,
                other.len()
            )),
        }
    }
}
