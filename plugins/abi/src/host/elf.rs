//! A check of a plugin file's ELF structure before the dynamic loader maps it.
//!
//! The loader maps the segments that the program headers name; a segment that lies past
//! the end of a truncated file is mapped anyway, and the first touch of it kills the
//! process with SIGBUS. So the header, the program header table, every segment and the
//! section header table must lie within the file, and the file must be a shared object
//! for this machine, before it is handed to `dlopen`.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;

/// Why a file is not a complete shared object for this host; said in one line.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ElfError {
    #[error("not an ELF file (it starts with {0:02x?}, not 7f 45 4c 46)")]
    NotElf(Vec<u8>),
    #[error("truncated: {what} ends at byte {end}, but the file has {size} bytes")]
    Truncated { what: String, end: u128, size: u64 },
    #[error("not a shared object for this host: {0}")]
    Foreign(String),
    #[error("corrupt ELF structure: {0}")]
    Corrupt(String),
    #[error("cannot read it: {0}")]
    Read(String),
}

const EHDR_LEN: usize = 64;
const PHDR_LEN: u64 = 56;
const SHDR_LEN: u64 = 64;
const PT_LOAD: u32 = 1;
const PT_DYNAMIC: u32 = 2;
const SHT_NOBITS: u32 = 8;
const SHT_DYNSYM: u32 = 11;
const SYM_LEN: u64 = 24;
const ET_DYN: u16 = 3;

/// The ELF machine number of the host (`e_machine`).
const fn host_machine() -> u16 {
    if cfg!(target_arch = "x86_64") {
        62
    } else if cfg!(target_arch = "aarch64") {
        183
    } else if cfg!(target_arch = "riscv64") {
        243
    } else if cfg!(target_arch = "powerpc64") {
        21
    } else if cfg!(target_arch = "s390x") {
        22
    } else {
        0
    }
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

/// The file's bytes `[off, off + len)`, after checking they lie within `size`.
fn read_within(f: &File, size: u64, off: u64, len: u64, what: &str) -> Result<Vec<u8>, ElfError> {
    within(size, off, len, what)?;
    let len = usize::try_from(len).map_err(|_| ElfError::Corrupt(format!("{what} too large")))?;
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, off)
        .map_err(|e| ElfError::Read(e.to_string()))?;
    Ok(buf)
}

/// `[off, off + len)` lies within a file of `size` bytes (u128: no wrap on hostile offsets).
fn within(size: u64, off: u64, len: u64, what: &str) -> Result<(), ElfError> {
    let end = u128::from(off) + u128::from(len);
    if end > u128::from(size) {
        return Err(ElfError::Truncated {
            what: what.into(),
            end,
            size,
        });
    }
    Ok(())
}

/// The header fields the checks use.
struct Header {
    phoff: u64,
    shoff: u64,
    phentsize: u16,
    phnum: u16,
    shentsize: u16,
    shnum: u16,
}

fn header(h: &[u8]) -> Result<Header, ElfError> {
    if h.len() < 4 || h[..4] != *b"\x7fELF" {
        return Err(ElfError::NotElf(h[..h.len().min(4)].to_vec()));
    }
    if h.len() < EHDR_LEN {
        return Err(ElfError::Truncated {
            what: "the ELF header".into(),
            end: EHDR_LEN as u128,
            size: h.len() as u64,
        });
    }
    if h[4] != 2 || !cfg!(target_pointer_width = "64") {
        return Err(ElfError::Foreign(format!(
            "ELF class {} (want 2, 64-bit)",
            h[4]
        )));
    }
    if h[5] != 1 || !cfg!(target_endian = "little") {
        return Err(ElfError::Foreign(format!(
            "data encoding {} (want 1, little-endian)",
            h[5]
        )));
    }
    if h[6] != 1 || u32_at(h, 20) != 1 {
        return Err(ElfError::Corrupt(format!("ELF version {}", h[6])));
    }
    let (kind, machine) = (u16_at(h, 16), u16_at(h, 18));
    if kind != ET_DYN {
        return Err(ElfError::Foreign(format!(
            "object type {kind} (want 3, a shared object)"
        )));
    }
    if machine != host_machine() {
        return Err(ElfError::Foreign(format!(
            "machine {machine} (this host is {})",
            host_machine()
        )));
    }
    Ok(Header {
        phoff: u64_at(h, 32),
        shoff: u64_at(h, 40),
        phentsize: u16_at(h, 54),
        phnum: u16_at(h, 56),
        shentsize: u16_at(h, 58),
        shnum: u16_at(h, 60),
    })
}

/// A loadable segment: where it lies in memory and in the file.
#[derive(Clone, Copy, Debug)]
struct Load {
    vaddr: u64,
    memsz: u64,
    offset: u64,
    filesz: u64,
}

impl Load {
    /// The file offset of `[addr, addr + len)` when it lies in this segment's file part.
    fn file_range(&self, addr: u64, len: u64) -> Option<u64> {
        let rel = addr.checked_sub(self.vaddr)?;
        (u128::from(rel) + u128::from(len) <= u128::from(self.filesz)).then_some(self.offset + rel)
    }

    /// True when `[addr, addr + len)` lies in this segment in memory.
    fn holds(&self, addr: u64, len: u64) -> bool {
        addr.checked_sub(self.vaddr)
            .is_some_and(|rel| u128::from(rel) + u128::from(len) <= u128::from(self.memsz))
    }
}

/// The segments the dynamic loader uses: the loadable ones and the dynamic section's.
struct Segments {
    loads: Vec<Load>,
    dynamic: (u64, u64),
}

fn check_segments(f: &File, size: u64, h: &Header) -> Result<Segments, ElfError> {
    if u64::from(h.phentsize) != PHDR_LEN || h.phnum == 0 {
        return Err(ElfError::Corrupt(format!(
            "{} program headers of {} bytes (want at least one of {PHDR_LEN})",
            h.phnum, h.phentsize
        )));
    }
    let table = read_within(
        f,
        size,
        h.phoff,
        u64::from(h.phnum) * PHDR_LEN,
        "the program header table",
    )?;
    let (mut loads, mut dynamic) = (Vec::new(), None);
    for (i, p) in table.chunks_exact(PHDR_LEN as usize).enumerate() {
        let (kind, offset, filesz) = (u32_at(p, 0), u64_at(p, 8), u64_at(p, 32));
        let (vaddr, memsz) = (u64_at(p, 16), u64_at(p, 40));
        within(size, offset, filesz, &format!("segment {i} (type {kind})"))?;
        if kind == PT_LOAD {
            if filesz > memsz || vaddr.checked_add(memsz).is_none() {
                return Err(ElfError::Corrupt(format!(
                    "segment {i} has {filesz} bytes in the file but {memsz} in memory at {vaddr:#x}"
                )));
            }
            loads.push(Load {
                vaddr,
                memsz,
                offset,
                filesz,
            });
        }
        if kind == PT_DYNAMIC {
            dynamic = Some((offset, filesz));
        }
    }
    match dynamic {
        Some(dynamic) if !loads.is_empty() => Ok(Segments { loads, dynamic }),
        _ => Err(ElfError::Foreign(
            "no loadable segment or no dynamic section".into(),
        )),
    }
}

const DT_NULL: u64 = 0;
/// Dynamic tags whose value is an address in the image.
const ADDRESS_TAGS: [u64; 14] = [
    3,
    4,
    5,
    6,
    7,
    12,
    13,
    17,
    23,
    25,
    26,
    36,
    0x6fff_fef5,
    0x6fff_fff0,
];
/// (address tag, size tag) of the tables the loader walks; 0: a size not in the tags.
const TABLES: [(u64, u64); 7] = [
    (4, 0),
    (5, 10),
    (7, 8),
    (17, 18),
    (23, 2),
    (25, 27),
    (26, 28),
];
const DT_RELA: u64 = 7;
const DT_RELASZ: u64 = 8;
const DT_RELAENT: u64 = 9;
const DT_JMPREL: u64 = 23;
const DT_PLTRELSZ: u64 = 2;
const RELA_LEN: u64 = 24;

/// Tags of the generic range, the OS-specific range and the processor range.
fn known_tag(tag: u64) -> bool {
    tag <= 37 || (0x6000_000d..=0x7fff_ffff).contains(&tag)
}

/// The dynamic section's entries up to DT_NULL, each tag known and each address inside
/// a loadable segment: the dynamic loader follows them without checking.
fn dynamic_entries(f: &File, size: u64, seg: &Segments) -> Result<BTreeMap<u64, u64>, ElfError> {
    let (offset, len) = seg.dynamic;
    let bytes = read_within(f, size, offset, len, "the dynamic section")?;
    let mut tags = BTreeMap::new();
    for e in bytes.chunks_exact(16) {
        let (tag, value) = (u64_at(e, 0), u64_at(e, 8));
        if tag == DT_NULL {
            return Ok(tags);
        }
        if !known_tag(tag) {
            return Err(ElfError::Corrupt(format!("unknown dynamic tag {tag:#x}")));
        }
        if ADDRESS_TAGS.contains(&tag) && !seg.loads.iter().any(|l| l.holds(value, 1)) {
            return Err(ElfError::Corrupt(format!(
                "dynamic tag {tag:#x} points to {value:#x}, outside every loadable segment"
            )));
        }
        tags.entry(tag).or_insert(value);
    }
    Err(ElfError::Corrupt(
        "the dynamic section has no end marker".into(),
    ))
}

/// The file offset of the table at `addr`, `len` bytes, inside one segment's file part.
fn table_offset(seg: &Segments, addr: u64, len: u64, what: &str) -> Result<u64, ElfError> {
    seg.loads
        .iter()
        .find_map(|l| l.file_range(addr, len))
        .ok_or_else(|| {
            ElfError::Corrupt(format!(
                "{what} at {addr:#x} ({len} bytes) lies outside the loadable segments"
            ))
        })
}

/// Every table the dynamic section names lies in the file, and every relocation writes
/// inside a loadable segment.
fn check_dynamic(
    f: &File,
    size: u64,
    seg: &Segments,
    symbols: Option<u64>,
) -> Result<(), ElfError> {
    let tags = dynamic_entries(f, size, seg)?;
    for (at, len) in TABLES {
        if let Some(&addr) = tags.get(&at) {
            let bytes = match len {
                0 => 1,
                _ => tags.get(&len).copied().unwrap_or(0),
            };
            table_offset(seg, addr, bytes, &format!("the table of dynamic tag {at}"))?;
        }
    }
    if tags.get(&DT_RELAENT).is_some_and(|&n| n != RELA_LEN) {
        return Err(ElfError::Foreign(
            "relocation entries not of 24 bytes".into(),
        ));
    }
    for (at, len) in [(DT_RELA, DT_RELASZ), (DT_JMPREL, DT_PLTRELSZ)] {
        let (Some(&addr), Some(&bytes)) = (tags.get(&at), tags.get(&len)) else {
            continue;
        };
        let offset = table_offset(seg, addr, bytes, "a relocation table")?;
        let table = read_within(f, size, offset, bytes, "a relocation table")?;
        for (i, r) in table.chunks_exact(RELA_LEN as usize).enumerate() {
            let (target, symbol) = (u64_at(r, 0), u64_at(r, 8) >> 32);
            if !seg.loads.iter().any(|l| l.holds(target, 8)) {
                return Err(ElfError::Corrupt(format!(
                    "relocation {i} writes at {target:#x}, outside every loadable segment"
                )));
            }
            if symbols.is_some_and(|n| symbol >= n) {
                return Err(ElfError::Corrupt(format!(
                    "relocation {i} names symbol {symbol}, past the dynamic symbol table"
                )));
            }
        }
    }
    Ok(())
}

/// Every section lies in the file. Returns the number of dynamic symbols when a
/// section header table says it (the dynamic loader takes relocations' symbol indexes
/// on trust).
fn check_sections(f: &File, size: u64, h: &Header) -> Result<Option<u64>, ElfError> {
    if h.shoff == 0 {
        return Ok(None); // no section header table: the loader needs none
    }
    if u64::from(h.shentsize) != SHDR_LEN {
        return Err(ElfError::Corrupt(format!(
            "section headers of {} bytes (want {SHDR_LEN})",
            h.shentsize
        )));
    }
    // With 0xff00 or more sections, e_shnum is 0 and section 0's sh_size holds the count.
    let count = match h.shnum {
        0 => u64_at(
            &read_within(f, size, h.shoff, SHDR_LEN, "section header 0")?,
            32,
        ),
        n => u64::from(n),
    };
    let len = count
        .checked_mul(SHDR_LEN)
        .ok_or_else(|| ElfError::Corrupt(format!("{count} section headers")))?;
    let table = read_within(f, size, h.shoff, len, "the section header table")?;
    let mut symbols = None;
    for (i, s) in table.chunks_exact(SHDR_LEN as usize).enumerate() {
        let (kind, offset, bytes) = (u32_at(s, 4), u64_at(s, 24), u64_at(s, 32));
        if kind != SHT_NOBITS {
            within(size, offset, bytes, &format!("section {i}"))?;
        }
        if kind == SHT_DYNSYM {
            symbols = Some(bytes / SYM_LEN);
        }
    }
    Ok(symbols)
}

/// Check that `f`, `size` bytes long, is a complete ELF shared object for this host.
pub fn check(f: &File, size: u64) -> Result<(), ElfError> {
    let mut h = vec![0u8; EHDR_LEN.min(usize::try_from(size).unwrap_or(EHDR_LEN))];
    f.read_exact_at(&mut h, 0)
        .map_err(|e| ElfError::Read(e.to_string()))?;
    let h = header(&h)?;
    let segments = check_segments(f, size, &h)?;
    let symbols = check_sections(f, size, &h)?;
    check_dynamic(f, size, &segments, symbols)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// A file holding `bytes`, already unlinked, with its length.
    fn file(bytes: &[u8]) -> (File, u64) {
        static N: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "hvm-elf-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::write(&path, bytes).expect("write the test file");
        let f = File::open(&path).expect("open the test file");
        std::fs::remove_file(&path).expect("unlink the test file");
        (f, bytes.len() as u64)
    }

    /// A minimal shared object header for this host with one LOAD and one DYNAMIC segment.
    fn minimal() -> Vec<u8> {
        let mut b = vec![0u8; 64 + 2 * 56 + 16];
        b[..4].copy_from_slice(b"\x7fELF");
        (b[4], b[5], b[6]) = (2, 1, 1);
        b[16..18].copy_from_slice(&ET_DYN.to_le_bytes());
        b[18..20].copy_from_slice(&host_machine().to_le_bytes());
        b[20..24].copy_from_slice(&1u32.to_le_bytes());
        b[32..40].copy_from_slice(&64u64.to_le_bytes());
        b[54..56].copy_from_slice(&56u16.to_le_bytes());
        b[56..58].copy_from_slice(&2u16.to_le_bytes());
        for (i, kind) in [PT_LOAD, PT_DYNAMIC].into_iter().enumerate() {
            let p = 64 + i * 56;
            b[p..p + 4].copy_from_slice(&kind.to_le_bytes());
            b[p + 32..p + 40].copy_from_slice(&16u64.to_le_bytes());
            b[p + 40..p + 48].copy_from_slice(&16u64.to_le_bytes());
        }
        // The DYNAMIC segment is the last 16 bytes: one DT_NULL entry, not the header.
        let dynamic = 64 + 56 + 8;
        b[dynamic..dynamic + 8].copy_from_slice(&(64u64 + 2 * 56).to_le_bytes());
        b
    }

    #[test]
    fn accepts_a_complete_object_and_refuses_damaged_ones() {
        let good = minimal();
        let (f, n) = file(&good);
        assert_eq!(check(&f, n), Ok(()));

        let mut seg = good.clone();
        seg[64 + 8..64 + 16].copy_from_slice(&u64::MAX.to_le_bytes()); // offset wraps u64
        let (f, n) = file(&seg);
        assert!(matches!(check(&f, n), Err(ElfError::Truncated { .. })));

        let (f, n) = file(&good[..100]);
        let e = check(&f, n).expect_err("cut in the program headers");
        assert!(e.to_string().contains("program header table"), "{e}");

        let (f, n) = file(b"#!/bin/sh\n");
        assert!(matches!(check(&f, n), Err(ElfError::NotElf(_))));

        let mut exe = good.clone();
        exe[16] = 2;
        let (f, n) = file(&exe);
        assert!(matches!(check(&f, n), Err(ElfError::Foreign(_))));

        let mut sh = good;
        sh[40..48].copy_from_slice(&1000u64.to_le_bytes());
        sh[58..60].copy_from_slice(&64u16.to_le_bytes());
        sh[60..62].copy_from_slice(&3u16.to_le_bytes());
        let (f, n) = file(&sh);
        let e = check(&f, n).expect_err("sections past the end");
        assert!(e.to_string().contains("section header table"), "{e}");
    }
}
