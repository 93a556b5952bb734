//! The leg tests' common cycle data (`tests/tests/{file_legs,nbd_legs,iscsi}.rs`): a
//! 64 MiB virtual LU written before an acquire, then in Snapshot mode, and the bytes it
//! holds at each point; and how an NBD export's bytes are read from outside.

use std::path::Path;

use crate::tool;

pub const MIB: u64 = 1 << 20;
/// The virtual LU's size in the leg tests.
pub const SIZE: u64 = 64 * MIB;

/// The virtual LU at the snapshot instant: `write -P 0x11 0 8M`, `write -P 0x33 40M 1M`.
pub fn instant() -> Vec<u8> {
    let mut v = vec![0u8; SIZE as usize];
    v[..(8 * MIB) as usize].fill(0x11);
    v[(40 * MIB) as usize..(41 * MIB) as usize].fill(0x33);
    v
}

/// The virtual LU after the Snapshot-mode writes `write -P 0x22 4M 2M` and
/// `write -z -u 40M 512k`.
pub fn after() -> Vec<u8> {
    let mut v = instant();
    v[(4 * MIB) as usize..(6 * MIB) as usize].fill(0x22);
    v[(40 * MIB) as usize..(40 * MIB + MIB / 2) as usize].fill(0);
    v
}

/// The bytes of an NBD export, read with qemu-img (through the file `dir/name`, removed
/// again).
pub fn read_export(uri: &str, dir: &Path, name: &str) -> Vec<u8> {
    let out_file = dir.join(name);
    let out = tool("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw", uri])
        .arg(&out_file)
        .output()
        .expect("qemu-img runs");
    assert!(
        out.status.success(),
        "qemu-img convert {uri}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let data = std::fs::read(&out_file).expect("qemu-img's output file");
    std::fs::remove_file(&out_file).expect("qemu-img's output file is removed");
    data
}
