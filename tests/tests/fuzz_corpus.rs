//! The fuzz targets' committed corpora (fuzz/corpus/TARGET/*), replayed through the same
//! functions cargo-fuzz runs (crate hvm-fuzz, fuzz/common), so the ordinary test run on
//! stable keeps every input a fuzzer ever kept, crashes it found included, green.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::path::PathBuf;

fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = hvm_tests::workspace().join("fuzz/corpus").join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{}: no corpus", dir.display());
    files
        .into_iter()
        .map(|p| {
            let data = std::fs::read(&p).unwrap();
            (p, data)
        })
        .collect()
}

fn replay(target: &str, run: fn(&[u8])) {
    for (path, data) in corpus(target) {
        let caught = std::panic::catch_unwind(|| run(&data));
        assert!(caught.is_ok(), "{target}: {} fails", path.display());
    }
}

#[test]
fn nbd_handshake_corpus() {
    replay("nbd_handshake", hvm_fuzz::nbd_handshake);
}

#[test]
fn nbd_proto_corpus() {
    replay("nbd_proto", hvm_fuzz::nbd_proto);
}

#[test]
fn scsi_corpus() {
    replay("scsi", hvm_fuzz::scsi);
}

#[test]
fn array_frames_corpus() {
    replay("array_frames", hvm_fuzz::array_frames);
}

#[test]
fn journal_replay_corpus() {
    replay("journal_replay", hvm_fuzz::journal_replay);
}

#[test]
fn config_yaml_corpus() {
    replay("config_yaml", hvm_fuzz::config_yaml);
}
