#![allow(clippy::unwrap_used)]

use super::*;
use hvm_core::backend::Backend;
use hvm_core::{Extent, LuId};
use std::io::Read;
use std::os::unix::fs::MetadataExt;

fn params(dir: &Path, extra: &str, legs: [&str; 2], size: Option<&str>) -> String {
    let size = size.map(|s| format!(", size: {s}")).unwrap_or_default();
    format!(
        "state_dir: {}\n{extra}\nvolumes:\n  - {{ lu: 0, legs: [{}, {}]{size} }}\n",
        dir.display(),
        legs[0],
        legs[1]
    )
}

fn file(dir: &Path, name: &str, len: u64) -> PathBuf {
    let p = dir.join(name);
    std::fs::File::create(&p).unwrap().set_len(len).unwrap();
    p
}

fn contents(p: &Path) -> Vec<u8> {
    let mut v = Vec::new();
    std::fs::File::open(p).unwrap().read_to_end(&mut v).unwrap();
    v
}

/// Every engine and caching mode does the same I/O.
#[test]
fn reads_writes_zeroes_and_copies_reach_the_right_legs() {
    for extra in [
        "direct: true\nio: uring",
        "direct: true\nio: threads",
        "direct: false\nio: uring",
        "direct: false\nio: threads",
    ] {
        let dir = tempfile::tempdir().unwrap();
        file(dir.path(), "a", 1 << 20);
        file(dir.path(), "b", 1 << 20);
        let m = open_array(&params(dir.path(), extra, ["a", "b"], None)).unwrap();
        // A buffer that is not page-aligned goes through the bounce buffer.
        let mut data = vec![0u8; 8193];
        data[1..]
            .iter_mut()
            .enumerate()
            .for_each(|(i, b)| *b = i as u8);
        m.write(LuId(0), 8, &data[1..], true).unwrap();
        m.write(LuId(1), 64, &[1; 4096], false).unwrap();
        m.write(LuId(2), 128, &[2; 512], false).unwrap();
        m.flush(LuId(0)).unwrap();
        let (a, b) = (
            contents(&dir.path().join("a")),
            contents(&dir.path().join("b")),
        );
        assert_eq!(&a[4096..12288], &data[1..], "{extra}");
        assert_eq!(&b[4096..12288], &data[1..], "{extra}");
        assert!(a[32768..36864].iter().all(|&x| x == 1) && b[32768..36864].iter().all(|&x| x == 0));
        assert!(b[65536..66048].iter().all(|&x| x == 2) && a[65536..66048].iter().all(|&x| x == 0));
        let mut back = vec![0u8; 8193];
        m.read(LuId(2), 8, &mut back[1..]).unwrap();
        assert_eq!(&back[1..], &data[1..]);
        m.copy(LuId(1), LuId(2), Extent::new(64, 71).unwrap())
            .unwrap();
        m.write_zeroes(LuId(0), 8, 4, true, true).unwrap();
        m.write_zeroes(LuId(2), 128, 1, false, false).unwrap();
        let (a, b) = (
            contents(&dir.path().join("a")),
            contents(&dir.path().join("b")),
        );
        assert_eq!(&b[32768..36864], &a[32768..36864], "{extra}: copy");
        assert!(a[4096..6144].iter().all(|&x| x == 0) && b[4096..6144].iter().all(|&x| x == 0));
        assert_eq!(&a[6144..12288], &data[2049..]);
        assert!(b[65536..66048].iter().all(|&x| x == 0));
    }
}

#[test]
fn identity_names_device_inode_and_size() {
    let dir = tempfile::tempdir().unwrap();
    file(dir.path(), "a", 4096);
    file(dir.path(), "b", 4096);
    let m = open_array(&params(dir.path(), "", ["a", "b"], None)).unwrap();
    let ino = std::fs::metadata(dir.path().join("a")).unwrap().ino();
    let id = m.identity(LuId(1)).unwrap().unwrap();
    assert!(
        id.starts_with("file dev ") && id.ends_with(&format!("ino {ino} size 4096")),
        "{id}"
    );
    assert!(m.identity(LuId(0)).unwrap().unwrap().contains(" + "));
}

fn refused(dir: &Path, extra: &str, legs: [&str; 2], size: Option<&str>) -> String {
    match open_array(&params(dir, extra, legs, size)) {
        Ok(_) => panic!("opened {legs:?}"),
        Err(e) => e,
    }
}

#[test]
fn what_cannot_be_a_leg_is_refused_naming_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    file(d, "a", 8192);
    file(d, "b", 8192);
    file(d, "small", 4096);
    std::os::unix::fs::symlink(d.join("a"), d.join("a-link")).unwrap();
    std::fs::create_dir(d.join("dir")).unwrap();
    let a = d.join("a").display().to_string();
    let cases: &[([&str; 2], Option<&str>, &str, String)] = &[
        (
            ["a", "a-link"],
            None,
            "the same storage as",
            format!("{}/a-link: ", d.display()),
        ),
        (
            ["a", "small"],
            None,
            "legs of different sizes",
            format!("{}/small: ", d.display()),
        ),
        (
            ["a", "b"],
            Some("16K"),
            "smaller than volume lu 0 asks",
            format!("{a}: "),
        ),
        (
            ["a", "dir"],
            None,
            "not a regular file or block device (a directory)",
            format!("{}/dir: ", d.display()),
        ),
        (
            ["a", "/dev/null"],
            None,
            "(a character device)",
            "/dev/null: ".into(),
        ),
        (
            ["a", "missing"],
            None,
            "no such file or block device",
            format!("{}/missing: ", d.display()),
        ),
    ];
    for (legs, size, reason, starts) in cases {
        let e = refused(d, "", *legs, *size);
        assert!(
            e.starts_with(starts.as_str()) && e.contains(reason),
            "{legs:?}: {e}"
        );
        assert!(!e.contains('\n'), "one line: {e}");
    }
}

#[test]
fn a_file_held_by_another_opener_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    file(dir.path(), "a", 4096);
    file(dir.path(), "b", 4096);
    let _first = open_array(&params(dir.path(), "", ["a", "b"], None)).unwrap();
    let e = refused(dir.path(), "", ["a", "b"], None);
    assert!(e.contains("in use: another program holds a lock"), "{e}");
}

#[test]
fn create_makes_sparse_files_of_the_size() {
    let dir = tempfile::tempdir().unwrap();
    let e = refused(dir.path(), "create: true", ["a", "b"], None);
    assert!(e.contains("needs the volume's `size`"), "{e}");
    let m = open_array(&params(dir.path(), "create: true", ["a", "b"], Some("1M"))).unwrap();
    assert_eq!(m.describe().unwrap().capacity(LuId(0)), Some(2048));
    let meta = std::fs::metadata(dir.path().join("b")).unwrap();
    assert_eq!(meta.len(), 1 << 20);
    assert_eq!(meta.mode() & 0o777, 0o600);
    assert!(meta.blocks() < 64, "sparse: {} blocks", meta.blocks());
}
