//! The backup device: a sequential medium (a tape) emulated by a file of records, written
//! in exactly the order a copy request lists its blocks ([0097], claim 14), so the data
//! needs no location map on the medium beyond each record's own header.
//!
//! Layout (little-endian):
//!
//! - header, 16 bytes: `HVMTAPE1`, the source LUN, 7 reserved bytes;
//! - records: `REC1`, blocks (4 bytes), LBA (8), CRC32C of the data (4), 4 reserved, then
//!   the data (`blocks` × 512 bytes);
//! - trailer, 24 bytes: `END1`, 4 reserved, the number of records (8) and of blocks (8).
//!
//! A medium without its trailer is an unfinished backup: reading it says so and restores
//! nothing.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::geometry::BLOCK_SIZE;

const MAGIC: &[u8; 8] = b"HVMTAPE1";
const REC: &[u8; 4] = b"REC1";
const END: &[u8; 4] = b"END1";
const RECORD_HEADER: usize = 24;

#[derive(Debug, thiserror::Error)]
pub enum TapeError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: at byte {offset}: {message}", path.display())]
    Format {
        path: PathBuf,
        offset: u64,
        message: String,
    },
}

/// Writes one backup, record after record.
pub struct TapeWriter {
    out: BufWriter<File>,
    path: PathBuf,
    records: u64,
    blocks: u64,
}

impl TapeWriter {
    /// Load a new medium: the file is replaced.
    pub fn create(path: &Path, source_lun: u8) -> Result<TapeWriter, TapeError> {
        let io = |source| TapeError::Io {
            path: path.to_path_buf(),
            source,
        };
        let f = std::os::unix::fs::OpenOptionsExt::mode(
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true),
            0o600,
        )
        .open(path)
        .map_err(io)?;
        let mut out = BufWriter::with_capacity(1 << 20, f);
        let mut h = [0u8; 16];
        h[..8].copy_from_slice(MAGIC);
        h[8] = source_lun;
        out.write_all(&h).map_err(io)?;
        Ok(TapeWriter {
            out,
            path: path.to_path_buf(),
            records: 0,
            blocks: 0,
        })
    }

    fn io(&self) -> impl FnOnce(std::io::Error) -> TapeError + '_ {
        move |source| TapeError::Io {
            path: self.path.clone(),
            source,
        }
    }

    /// Append the blocks from `lba`.
    pub fn record(&mut self, lba: u64, data: &[u8]) -> Result<(), TapeError> {
        let blocks = (data.len() / BLOCK_SIZE as usize) as u32;
        let mut h = [0u8; RECORD_HEADER];
        h[..4].copy_from_slice(REC);
        h[4..8].copy_from_slice(&blocks.to_le_bytes());
        h[8..16].copy_from_slice(&lba.to_le_bytes());
        h[16..20].copy_from_slice(&crc32c::crc32c(data).to_le_bytes());
        let r = self
            .out
            .write_all(&h)
            .and_then(|()| self.out.write_all(data));
        r.map_err(self.io())?;
        self.records += 1;
        self.blocks += u64::from(blocks);
        Ok(())
    }

    /// Write the trailer and make the medium stable.
    pub fn finish(mut self) -> Result<u64, TapeError> {
        let mut t = [0u8; RECORD_HEADER];
        t[..4].copy_from_slice(END);
        t[8..16].copy_from_slice(&self.records.to_le_bytes());
        t[16..24].copy_from_slice(&self.blocks.to_le_bytes());
        let r = self.out.write_all(&t).and_then(|()| self.out.flush());
        r.map_err(self.io())?;
        self.out.get_ref().sync_all().map_err(self.io())?;
        Ok(self.blocks)
    }
}

/// One record of a medium.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub lba: u64,
    pub blocks: u32,
    /// Where its data starts in the file.
    pub offset: u64,
}

/// A finished medium's records, checked (headers, CRCs, trailer).
#[derive(Debug)]
pub struct Tape {
    pub path: PathBuf,
    pub source_lun: u8,
    pub records: Vec<Record>,
}

impl Tape {
    /// Read and check the whole medium.
    pub fn open(path: &Path) -> Result<Tape, TapeError> {
        let io = |source| TapeError::Io {
            path: path.to_path_buf(),
            source,
        };
        let bad = |offset: u64, message: String| TapeError::Format {
            path: path.to_path_buf(),
            offset,
            message,
        };
        let f = File::open(path).map_err(io)?;
        let len = f.metadata().map_err(io)?.len();
        let mut r = BufReader::with_capacity(1 << 20, f);
        let mut h = [0u8; 16];
        r.read_exact(&mut h)
            .map_err(|_| bad(0, "shorter than a medium header".into()))?;
        if &h[..8] != MAGIC {
            return Err(bad(0, "not a backup medium (no HVMTAPE1 header)".into()));
        }
        let mut at = 16u64;
        let mut records = Vec::new();
        let mut data = Vec::new();
        loop {
            let mut rh = [0u8; RECORD_HEADER];
            if r.read_exact(&mut rh).is_err() {
                return Err(bad(
                    at,
                    "the medium ends without a trailer: the backup did not finish".into(),
                ));
            }
            let word = |i: usize| u64::from_le_bytes(rh[i..i + 8].try_into().unwrap_or([0; 8]));
            if &rh[..4] == END {
                let (n, blocks) = (word(8), word(16));
                let have: u64 = records.iter().map(|x: &Record| u64::from(x.blocks)).sum();
                if n != records.len() as u64 || blocks != have {
                    return Err(bad(at, format!("the trailer counts {n} records of {blocks} blocks, the medium holds {} of {have}", records.len())));
                }
                if at + RECORD_HEADER as u64 != len {
                    return Err(bad(at, "bytes follow the trailer".into()));
                }
                break;
            }
            if &rh[..4] != REC {
                return Err(bad(at, "expected a record or the trailer".into()));
            }
            let blocks = u32::from_le_bytes([rh[4], rh[5], rh[6], rh[7]]);
            let lba = word(8);
            let crc = u32::from_le_bytes([rh[16], rh[17], rh[18], rh[19]]);
            let n = u64::from(blocks) * u64::from(BLOCK_SIZE);
            if blocks == 0 || at + RECORD_HEADER as u64 + n > len {
                return Err(bad(at, format!("a record of {blocks} blocks does not fit")));
            }
            data.resize(n as usize, 0);
            r.read_exact(&mut data).map_err(io)?;
            if crc32c::crc32c(&data) != crc {
                return Err(bad(
                    at,
                    format!("the record of blocks {lba}+{blocks} fails its CRC"),
                ));
            }
            records.push(Record {
                lba,
                blocks,
                offset: at + RECORD_HEADER as u64,
            });
            at += RECORD_HEADER as u64 + n;
        }
        Ok(Tape {
            path: path.to_path_buf(),
            source_lun: h[8],
            records,
        })
    }

    /// Write every record at its own place in `to` (a file or block device), in the
    /// medium's order; returns the blocks written.
    pub fn restore(&self, to: &mut File) -> Result<u64, TapeError> {
        let io = |source| TapeError::Io {
            path: self.path.clone(),
            source,
        };
        let mut f = File::open(&self.path).map_err(io)?;
        let mut buf = Vec::new();
        let mut total = 0;
        for rec in &self.records {
            buf.resize(rec.blocks as usize * BLOCK_SIZE as usize, 0);
            f.seek(SeekFrom::Start(rec.offset)).map_err(io)?;
            f.read_exact(&mut buf).map_err(io)?;
            to.seek(SeekFrom::Start(rec.lba * u64::from(BLOCK_SIZE)))
                .map_err(io)?;
            to.write_all(&buf).map_err(io)?;
            total += u64::from(rec.blocks);
        }
        to.sync_all().map_err(io)?;
        Ok(total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_keep_the_request_order_and_damage_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.rec");
        let mut w = TapeWriter::create(&p, 7).unwrap();
        w.record(100, &[1u8; 1024]).unwrap();
        w.record(3, &[2u8; 512]).unwrap();
        w.finish().unwrap();
        let t = Tape::open(&p).unwrap();
        assert_eq!(t.source_lun, 7);
        let order: Vec<(u64, u32)> = t.records.iter().map(|r| (r.lba, r.blocks)).collect();
        assert_eq!(order, vec![(100, 2), (3, 1)]);
        let out = dir.path().join("img");
        let mut f = File::create(&out).unwrap();
        assert_eq!(t.restore(&mut f).unwrap(), 3);
        let img = std::fs::read(&out).unwrap();
        assert_eq!(&img[3 * 512..4 * 512], &[2u8; 512][..]);
        assert_eq!(&img[100 * 512..102 * 512], &[1u8; 1024][..]);
        // Unfinished: no trailer.
        let mut bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() - RECORD_HEADER]).unwrap();
        let e = Tape::open(&p).unwrap_err().to_string();
        assert!(e.contains("without a trailer"), "{e}");
        // One flipped data byte.
        bytes[16 + RECORD_HEADER + 5] ^= 1;
        std::fs::write(&p, &bytes).unwrap();
        let e = Tape::open(&p).unwrap_err().to_string();
        assert!(e.contains("fails its CRC"), "{e}");
        std::fs::write(&p, b"garbage").unwrap();
        assert!(Tape::open(&p).is_err());
    }
}
