//! [`Mirrored`]: volumes of two legs as the LUs of a stateless array (Fig. 9).

use std::collections::BTreeMap;

use hvm_core::backend::{
    Backend, BackendDescription, BackendError, BackendErrorKind, Capabilities, LuInfo,
};
use hvm_core::{Extent, LuId, MirrorDefinition, SECTOR_SIZE};

use crate::{Companion, Leg};

/// The largest piece a host-side copy moves at once.
const COPY_CHUNK: u64 = 1 << 20;

/// One volume: its mirror LU and its two opened legs.
pub struct Volume<L> {
    pub lu: u32,
    pub origin: L,
    pub mate: L,
    /// Bytes used of each leg.
    pub size: u64,
}

/// Which part of a volume an LU number is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Part {
    Mirror,
    Origin,
    Mate,
}

/// The stateless array over [`Leg`]s.
pub struct Mirrored<L> {
    volumes: Vec<Volume<L>>,
    /// LU number → (volume index, part).
    lus: BTreeMap<u32, (usize, Part)>,
    companion: Companion,
}

fn err(kind: BackendErrorKind, message: String) -> BackendError {
    BackendError::new(kind, message)
}

impl<L: Leg> Mirrored<L> {
    /// Check the volumes and build the array. Refused, with one line naming the leg: legs
    /// of different sizes, a leg smaller than the volume's `size`, a size that is not
    /// whole 512-byte blocks, the same storage twice (by identity), LU numbers that
    /// overlap.
    pub fn new(volumes: Vec<(u32, L, L, Option<u64>)>) -> Result<Mirrored<L>, String> {
        let mut lus = BTreeMap::new();
        let mut seen: BTreeMap<String, String> = BTreeMap::new();
        let mut out = Vec::with_capacity(volumes.len());
        for (i, (lu, origin, mate, size)) in volumes.into_iter().enumerate() {
            let size = volume_size(lu, &origin, &mate, size)?;
            for leg in [&origin, &mate] {
                if let Some(first) = seen.insert(leg.identity(), leg.name().to_string()) {
                    return Err(format!(
                        "{}: the same storage as {first} ({}); each leg must be its own",
                        leg.name(),
                        leg.identity()
                    ));
                }
            }
            let last = lu
                .checked_add(2)
                .ok_or_else(|| format!("volume lu {lu}: LU numbers lu..lu+2 overflow"))?;
            for (n, part) in (lu..=last).zip([Part::Mirror, Part::Origin, Part::Mate]) {
                if lus.insert(n, (i, part)).is_some() {
                    return Err(format!(
                        "volume lu {lu}: LU {n} is already used by another volume (a volume takes lu, lu+1 and lu+2)"
                    ));
                }
            }
            out.push(Volume {
                lu,
                origin,
                mate,
                size,
            });
        }
        Ok(Mirrored {
            volumes: out,
            lus,
            companion: Companion::new(64),
        })
    }

    pub fn volumes(&self) -> &[Volume<L>] {
        &self.volumes
    }

    fn find(&self, lu: LuId) -> Result<(&Volume<L>, Part), BackendError> {
        self.lus
            .get(&lu.0)
            .map(|&(i, part)| (&self.volumes[i], part))
            .ok_or_else(|| {
                err(
                    BackendErrorKind::InvalidRequest,
                    format!("no LU {} in this array", lu.0),
                )
            })
    }

    /// The byte range of `blocks` blocks at `lba`, checked against the volume.
    fn range(&self, v: &Volume<L>, lba: u64, bytes: u64) -> Result<u64, BackendError> {
        let offset = lba.checked_mul(SECTOR_SIZE);
        match offset.and_then(|o| o.checked_add(bytes)) {
            Some(end) if end <= v.size => Ok(lba * SECTOR_SIZE),
            _ => Err(err(
                BackendErrorKind::OutOfRange,
                format!(
                    "{bytes} bytes at block {lba} are past the end of volume lu {} ({} bytes)",
                    v.lu, v.size
                ),
            )),
        }
    }

    fn leg(v: &Volume<L>, part: Part) -> &L {
        match part {
            Part::Mirror | Part::Origin => &v.origin,
            Part::Mate => &v.mate,
        }
    }

    fn write_mirrored(
        &self,
        v: &Volume<L>,
        offset: u64,
        data: &[u8],
        fua: bool,
    ) -> Result<(), BackendError> {
        if let Some(r) = v.origin.write_both(&v.mate, offset, data, fua) {
            return r;
        }
        let (a, b) = self.companion.join(
            || v.origin.write(offset, data, fua),
            || v.mate.write(offset, data, fua),
        );
        a.and(b)
    }

    fn copy_by_host(&self, src: &L, dst: &L, offset: u64, len: u64) -> Result<(), BackendError> {
        let mut buf = vec![0u8; len.min(COPY_CHUNK) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(COPY_CHUNK) as usize;
            src.read(offset + done, &mut buf[..n])?;
            dst.write(offset + done, &buf[..n], false)?;
            done += n as u64;
        }
        Ok(())
    }
}

fn volume_size<L: Leg>(lu: u32, a: &L, b: &L, size: Option<u64>) -> Result<u64, String> {
    if a.size() != b.size() {
        return Err(format!(
            "{}: legs of different sizes: {} is {} bytes, {} is {} bytes",
            b.name(),
            a.name(),
            a.size(),
            b.name(),
            b.size()
        ));
    }
    let size = match size {
        None => a.size(),
        Some(s) if s <= a.size() => s,
        Some(s) => {
            return Err(format!(
                "{}: {} bytes, smaller than volume lu {lu} asks ({s} bytes)",
                a.name(),
                a.size()
            ))
        }
    };
    if size == 0 || size % SECTOR_SIZE != 0 {
        return Err(format!(
            "{}: volume lu {lu} would be {size} bytes; it must be a non-zero multiple of 512",
            a.name()
        ));
    }
    Ok(size)
}

impl<L: Leg> Backend for Mirrored<L> {
    fn describe(&self) -> Result<BackendDescription, BackendError> {
        let mut lus = Vec::new();
        let mut mirroring = Vec::new();
        for v in &self.volumes {
            for n in v.lu..=v.lu + 2 {
                lus.push(LuInfo {
                    id: LuId(n),
                    capacity_lbas: v.size / SECTOR_SIZE,
                });
            }
            mirroring.push(MirrorDefinition::Triple {
                mirror: LuId(v.lu),
                origin: LuId(v.lu + 1),
                mate: LuId(v.lu + 2),
            });
        }
        Ok(BackendDescription {
            lus,
            mirroring,
            capabilities: Capabilities {
                virtual_lu_forming: true,
                array_copy: true,
                fua: true,
                ..Capabilities::default()
            },
        })
    }

    fn read(&self, lu: LuId, lba: u64, buf: &mut [u8]) -> Result<(), BackendError> {
        let (v, part) = self.find(lu)?;
        let offset = self.range(v, lba, buf.len() as u64)?;
        Self::leg(v, part).read(offset, buf)
    }

    fn write(&self, lu: LuId, lba: u64, data: &[u8], fua: bool) -> Result<(), BackendError> {
        let (v, part) = self.find(lu)?;
        let offset = self.range(v, lba, data.len() as u64)?;
        match part {
            Part::Mirror => self.write_mirrored(v, offset, data, fua),
            _ => Self::leg(v, part).write(offset, data, fua),
        }
    }

    fn flush(&self, lu: LuId) -> Result<(), BackendError> {
        let (v, part) = self.find(lu)?;
        match part {
            Part::Mirror => {
                let (a, b) = self.companion.join(|| v.origin.flush(), || v.mate.flush());
                a.and(b)
            }
            _ => Self::leg(v, part).flush(),
        }
    }

    fn mode_sense(&self, lu: LuId) -> Result<Vec<u8>, BackendError> {
        Err(err(
            BackendErrorKind::Unsupported,
            format!("LU {}: legs keep no mode (a stateless array)", lu.0),
        ))
    }

    fn mode_select(&self, lu: LuId, _page: &[u8]) -> Result<(), BackendError> {
        self.mode_sense(lu).map(|_| ())
    }

    fn copy(&self, src: LuId, dst: LuId, extent: Extent) -> Result<(), BackendError> {
        let (sv, sp) = self.find(src)?;
        let (dv, dp) = self.find(dst)?;
        let len = extent.byte_len();
        let offset = self.range(sv, extent.first(), len)?;
        self.range(dv, extent.first(), len)?;
        let (from, to) = (Self::leg(sv, sp), Self::leg(dv, dp));
        if dp == Part::Mirror {
            return Err(err(
                BackendErrorKind::InvalidRequest,
                format!("copy into mirror LU {}: copy into a leg", dst.0),
            ));
        }
        if std::ptr::eq(from, to) {
            return Ok(());
        }
        if from.copy_to(to, offset, len)? {
            return Ok(());
        }
        self.copy_by_host(from, to, offset, len)
    }

    fn write_zeroes(
        &self,
        lu: LuId,
        lba: u64,
        blocks: u64,
        unmap: bool,
        fua: bool,
    ) -> Result<(), BackendError> {
        let (v, part) = self.find(lu)?;
        let len = blocks.saturating_mul(SECTOR_SIZE);
        let offset = self.range(v, lba, len)?;
        match part {
            Part::Mirror => {
                let (a, b) = self.companion.join(
                    || v.origin.write_zeroes(offset, len, unmap, fua),
                    || v.mate.write_zeroes(offset, len, unmap, fua),
                );
                a.and(b)
            }
            _ => Self::leg(v, part).write_zeroes(offset, len, unmap, fua),
        }
    }

    fn identity(&self, lu: LuId) -> Result<Option<String>, BackendError> {
        let (v, part) = self.find(lu)?;
        Ok(Some(match part {
            Part::Mirror => format!("{} + {}", v.origin.identity(), v.mate.identity()),
            _ => Self::leg(v, part).identity(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A leg in memory.
    struct MemLeg {
        name: String,
        id: String,
        data: Mutex<Vec<u8>>,
    }

    fn leg(name: &str, size: usize) -> MemLeg {
        MemLeg {
            name: name.into(),
            id: format!("mem:{name}"),
            data: Mutex::new(vec![0; size]),
        }
    }

    impl Leg for MemLeg {
        fn size(&self) -> u64 {
            self.data.lock().unwrap().len() as u64
        }
        fn identity(&self) -> String {
            self.id.clone()
        }
        fn name(&self) -> &str {
            &self.name
        }
        fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), BackendError> {
            let d = self.data.lock().unwrap();
            buf.copy_from_slice(&d[offset as usize..offset as usize + buf.len()]);
            Ok(())
        }
        fn write(&self, offset: u64, data: &[u8], _fua: bool) -> Result<(), BackendError> {
            let mut d = self.data.lock().unwrap();
            d[offset as usize..offset as usize + data.len()].copy_from_slice(data);
            Ok(())
        }
        fn flush(&self) -> Result<(), BackendError> {
            Ok(())
        }
        fn write_zeroes(&self, o: u64, l: u64, _u: bool, _f: bool) -> Result<(), BackendError> {
            self.data.lock().unwrap()[o as usize..(o + l) as usize].fill(0);
            Ok(())
        }
    }

    fn array() -> Mirrored<MemLeg> {
        Mirrored::new(vec![(0, leg("a", 8192), leg("b", 8192), None)]).unwrap()
    }

    #[test]
    fn the_mirror_lu_writes_both_legs_and_the_others_one() {
        let m = array();
        m.write(LuId(0), 1, &[1; 512], false).unwrap();
        m.write(LuId(1), 2, &[2; 512], false).unwrap();
        m.write(LuId(2), 3, &[3; 512], false).unwrap();
        let mut b = [0u8; 512];
        for (lu, lba, want) in [
            (1, 1, 1),
            (2, 1, 1),
            (1, 2, 2),
            (2, 2, 0),
            (1, 3, 0),
            (2, 3, 3),
        ] {
            m.read(LuId(lu), lba, &mut b).unwrap();
            assert!(b.iter().all(|&x| x == want), "LU {lu} block {lba}");
        }
        m.copy(LuId(1), LuId(2), Extent::new(2, 3).unwrap())
            .unwrap();
        m.read(LuId(2), 3, &mut b).unwrap();
        assert!(b.iter().all(|&x| x == 0));
        m.write_zeroes(LuId(0), 1, 1, true, false).unwrap();
        m.read(LuId(2), 1, &mut b).unwrap();
        assert!(b.iter().all(|&x| x == 0));
        let d = m.describe().unwrap();
        assert_eq!(d.lus.len(), 3);
        assert_eq!(d.capacity(LuId(2)), Some(16));
        assert!(d.capabilities.virtual_lu_forming);
        assert_eq!(m.identity(LuId(0)).unwrap().unwrap(), "mem:a + mem:b");
    }

    #[test]
    fn bad_volumes_are_refused_naming_the_leg() {
        let e = |v| Mirrored::new(v).err().unwrap();
        let msg = e(vec![(0, leg("a", 8192), leg("b", 4096), None)]);
        assert!(msg.starts_with("b: legs of different sizes"), "{msg}");
        let msg = e(vec![(0, leg("a", 4096), leg("b", 4096), Some(8192))]);
        assert!(msg.contains("smaller than volume lu 0 asks"), "{msg}");
        let same = leg("a2", 4096);
        let mut twin = leg("b", 4096);
        twin.id = same.id.clone();
        let msg = e(vec![(0, same, twin, None)]);
        assert!(msg.starts_with("b: the same storage as a2"), "{msg}");
        let msg = e(vec![
            (0, leg("a", 4096), leg("b", 4096), None),
            (2, leg("c", 4096), leg("d", 4096), None),
        ]);
        assert!(msg.contains("LU 2 is already used"), "{msg}");
        let msg = e(vec![(0, leg("a", 1000), leg("b", 1000), None)]);
        assert!(msg.contains("multiple of 512"), "{msg}");
    }

    #[test]
    fn io_past_the_end_is_out_of_range() {
        let m = array();
        let mut b = [0u8; 1024];
        let e = m.read(LuId(1), 15, &mut b).unwrap_err();
        assert_eq!(e.kind, BackendErrorKind::OutOfRange);
        let e = m.write(LuId(7), 0, &b, false).unwrap_err();
        assert_eq!(e.kind, BackendErrorKind::InvalidRequest);
        let e = m
            .write_zeroes(LuId(0), u64::MAX / 2, 4, false, false)
            .unwrap_err();
        assert_eq!(e.kind, BackendErrorKind::OutOfRange);
    }
}
