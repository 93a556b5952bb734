//! The LU files on their disk units and the range locks over them, shared by the firmware
//! and the array's background copies (backup, channel); and how the array opens and
//! replaces its own files.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Arc;

use crate::disk::Disk;
use crate::geometry::BLOCK_SIZE;
use crate::mirror::RangeLocks;
use crate::scsi::Sense;

pub(crate) struct Lu {
    pub(crate) blocks: u64,
    pub(crate) file: File,
    pub(crate) disk: Arc<Disk>,
}

/// The LU files and the locks over them; shared with the array's background copies.
pub(crate) struct Store {
    pub(crate) lus: BTreeMap<u8, Lu>,
    /// Overlapping mirrored writes and copies between legs, one at a time.
    pub(crate) locks: RangeLocks,
}

impl Store {
    /// One I/O on the file of `leg`, counted on its disk.
    fn leg_io(
        &self,
        leg: u8,
        lba: u64,
        f: impl FnOnce(&File, u64) -> std::io::Result<()>,
        write: bool,
        bytes: usize,
    ) -> Result<(), Sense> {
        let lu = self.lus.get(&leg).ok_or(Sense::INTERNAL_FAILURE)?;
        let _busy = lu.disk.begin(write, bytes as u64);
        f(&lu.file, lba * u64::from(BLOCK_SIZE)).map_err(|_| Sense::INTERNAL_FAILURE)
    }

    pub(crate) fn read(&self, lun: u8, lba: u64, buf: &mut [u8]) -> Result<(), Sense> {
        let len = buf.len();
        self.leg_io(lun, lba, |f, off| f.read_exact_at(buf, off), false, len)
            .map_err(|_| Sense::UNRECOVERED_READ_ERROR)
    }

    /// Make `lun`'s written blocks stable.
    pub(crate) fn sync(&self, lun: u8) -> Result<(), Sense> {
        let lu = self.lus.get(&lun).ok_or(Sense::INTERNAL_FAILURE)?;
        lu.file.sync_data().map_err(|_| Sense::INTERNAL_FAILURE)
    }

    pub(crate) fn write(&self, lun: u8, lba: u64, data: &[u8]) -> Result<(), Sense> {
        self.leg_io(
            lun,
            lba,
            |f, off| write_in_pieces(f, data, off),
            true,
            data.len(),
        )
        .map_err(|_| Sense::WRITE_ERROR)
    }
}

/// One of the array's own files (an LU, a difference bitmap): opened for reading and
/// writing, created readable by its owner only, never truncated.
pub(crate) fn open_private(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
}

/// Replace the file at `path` by `bytes` so that a crash leaves the old file or the new
/// one whole: a temporary file beside it, fsync, rename, fsync of the directory.
pub(crate) fn replace_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    File::open(dir.unwrap_or(Path::new(".")))?.sync_all()
}

/// Most bytes one `pwrite` of an LU file carries; pieces end at multiples of it.
///
/// The page cache keeps a file's pages in folios as large as the writes that brought
/// them in, and ext4 walks every block of a folio on each write into it: on the 2-core
/// VM (Linux 6.18) a 4 KiB write into a file written in 1 MiB writes took 13 us, into one
/// written in 64 KiB pieces 5 us, while sequential 64 KiB writes ran as fast as 1 MiB ones.
const WRITE_PIECE: u64 = 64 << 10;

fn write_in_pieces(f: &File, mut data: &[u8], mut off: u64) -> std::io::Result<()> {
    while !data.is_empty() {
        let n = (WRITE_PIECE - off % WRITE_PIECE).min(data.len() as u64) as usize;
        f.write_all_at(&data[..n], off)?;
        (data, off) = (&data[n..], off + n as u64);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_in_pieces_lands_whole_across_piece_boundaries() {
        let f = tempfile::tempfile().unwrap();
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let off = WRITE_PIECE - 1000; // starts 1000 bytes before a boundary
        write_in_pieces(&f, &data, off).unwrap();
        let mut back = vec![0u8; data.len()];
        f.read_exact_at(&mut back, off).unwrap();
        assert_eq!(back, data);
        assert_eq!(f.metadata().unwrap().len(), off + data.len() as u64);
    }
}
