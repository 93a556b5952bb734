//! Issue 18: hostile input and resource exhaustion. Each test here failed on the code
//! before its fix: a damaged plugin killed the host with SIGBUS or SIGSEGV, a bare plugin
//! name was searched on the library path, ...
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use hvm_tests::{binary, plugin_path};

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// (file offset of the dynamic section, file offset of the first RELA relocation, file
/// offset of the first JMPREL relocation) of a 64-bit little-endian shared object.
fn landmarks(elf: &[u8]) -> (usize, usize, usize) {
    let phoff = u64_at(elf, 32) as usize;
    let phnum = u16::from_le_bytes([elf[56], elf[57]]) as usize;
    let phdrs: Vec<&[u8]> = (0..phnum)
        .map(|i| &elf[phoff + i * 56..phoff + (i + 1) * 56])
        .collect();
    let kind = |p: &[u8]| u32::from_le_bytes(p[..4].try_into().unwrap());
    let dynamic = phdrs.iter().find(|p| kind(p) == 2).unwrap();
    let dyn_off = u64_at(dynamic, 8) as usize;
    // Virtual address to file offset through the PT_LOAD that holds it.
    let file_of = |addr: u64| {
        phdrs
            .iter()
            .filter(|p| kind(p) == 1)
            .find(|p| addr >= u64_at(p, 16) && addr < u64_at(p, 16) + u64_at(p, 32))
            .map(|p| (addr - u64_at(p, 16) + u64_at(p, 8)) as usize)
            .unwrap()
    };
    let tag = |want: u64| {
        (0..)
            .map(|i| dyn_off + i * 16)
            .take_while(|&at| u64_at(elf, at) != 0)
            .find(|&at| u64_at(elf, at) == want)
            .map(|at| u64_at(elf, at + 8))
            .unwrap()
    };
    (dyn_off, file_of(tag(7)), file_of(tag(23)))
}

/// `host-agent plugin check PATH` in a child: the host must refuse with exit status 1
/// (not die of a signal) and one line naming the file; returns that line.
fn check_refuses(path: &Path) -> String {
    let out = Command::new(binary("host-agent"))
        .args(["plugin", "check"])
        .arg(path)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}: {:?}, stderr {err:?}",
        path.display(),
        out.status
    );
    assert_eq!(err.lines().count(), 1, "one line per refusal: {err:?}");
    let head = format!("host-agent: {}: ", path.display());
    assert!(err.starts_with(&head), "{err:?}");
    err
}

fn write_copy(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// Truncated and corrupted copies of a real plugin are refused, each with its reason,
/// in one line; on the loader before the fix the truncated ones died of SIGBUS and the
/// bad relocations of SIGSEGV.
#[test]
fn damaged_plugin_files_are_refused_not_crashed_on() {
    let good = std::fs::read(plugin_path("stateless")).unwrap();
    let (dynamic, rela, jmprel) = landmarks(&good);
    let dir = tempfile::tempdir().unwrap();
    let len = good.len();
    let strtab_entry = (0..)
        .map(|i| dynamic + i * 16)
        .find(|&at| u64_at(&good, at) == 5)
        .unwrap();
    let mut cases: Vec<(String, Vec<u8>, &str)> = Vec::new();
    for cut in [40, 64 + 56, len / 2, dynamic + 8, len - 1] {
        cases.push((format!("cut-{cut}"), good[..cut].to_vec(), "truncated"));
    }
    let mut corrupt = |name: &str, at: usize, value: u64, want: &'static str| {
        let mut b = good.clone();
        put_u64(&mut b, at, value);
        cases.push((name.into(), b, want));
    };
    corrupt("phoff", 32, u64::MAX - 8, "truncated");
    corrupt(
        "dyn-tag",
        dynamic,
        0x4242_4242_4242_4242,
        "unknown dynamic tag",
    );
    corrupt(
        "dyn-addr",
        strtab_entry + 8,
        1 << 46,
        "outside every loadable",
    );
    corrupt("rela-offset", rela, 0x7fff_0000_0000, "relocation 0 writes");
    corrupt(
        "plt-symbol",
        jmprel + 8,
        (0xff_ffff << 32) | 7,
        "past the dynamic symbol",
    );
    let mut machine = good.clone();
    machine[18] = 40; // ARM
    cases.push((
        "machine".into(),
        machine,
        "not a shared object for this host",
    ));
    cases.push((
        "text".into(),
        b"#!/bin/sh\necho hi\n".to_vec(),
        "not an ELF file",
    ));
    for (name, bytes, want) in cases {
        let path = write_copy(dir.path(), &format!("libhvm_plugin_{name}.so"), &bytes);
        let line = check_refuses(&path);
        assert!(line.contains(want), "{name}: want {want:?} in {line:?}");
    }
}

/// A bare file name is the file in the working directory, the one checked, never a
/// library of that name found on LD_LIBRARY_PATH; a symbolic link is refused.
#[test]
fn a_bare_name_is_not_searched_on_the_library_path() {
    let cwd = tempfile::tempdir().unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    let name = "libhvm_plugin_bare.so";
    write_copy(
        cwd.path(),
        name,
        &std::fs::read(plugin_path("test-not-a-plugin")).unwrap(),
    );
    write_copy(
        elsewhere.path(),
        name,
        &std::fs::read(plugin_path("stateless")).unwrap(),
    );
    let out = Command::new(binary("host-agent"))
        .args(["plugin", "check", name])
        .current_dir(cwd.path())
        .env("LD_LIBRARY_PATH", elsewhere.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "loaded the other file: {err}");
    assert!(err.contains("not an hvm plugin"), "{err}");

    let link = cwd.path().join("libhvm_plugin_link.so");
    std::os::unix::fs::symlink(elsewhere.path().join(name), &link).unwrap();
    let line = check_refuses(&link);
    assert!(line.contains("symbolic link"), "{line}");
}
