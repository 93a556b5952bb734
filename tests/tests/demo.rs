//! The README's main job, `hvmctl demo`: the whole online backup against a real
//! host-agent on embedded arrays of all three kinds, each step verified by the demo
//! itself (backup equals the snapshot instant, legs identical, no write lost); here it
//! runs on small LUs and its report is checked.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::process::Command;

use hvm_tests::binary;

#[test]
fn hvmctl_demo_backs_up_online_on_every_array_kind() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(binary("hvmctl"))
        .args(["demo", "--size-mib", "32", "--warmup", "0.3", "--dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "hvmctl demo failed:\n{stdout}\n{stderr}"
    );
    for kind in ["ModeSelect", "Stateless", "PreUpdate"] {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(kind))
            .unwrap_or_else(|| panic!("no {kind} line in:\n{stdout}"));
        for part in ["equals snapshot instant", "legs identical", "data intact"] {
            assert!(line.contains(part), "{kind}: {part} missing: {line}");
        }
    }
    assert!(
        stdout.contains("all three backups verified; host-agent stopped cleanly"),
        "{stdout}"
    );
    // The backups and host-agent's log stay in --dir.
    assert_eq!(
        std::fs::metadata(dir.path().join("backup-db.img"))
            .unwrap()
            .len(),
        32 << 20
    );
    assert!(dir.path().join("host-agent.log").exists());
}

#[test]
fn hvmctl_demo_without_its_binaries_says_how_to_build_them() {
    // A copy of hvmctl alone in a directory: no host-agent, no plugins beside it.
    let dir = tempfile::tempdir().unwrap();
    let lone = dir.path().join("hvmctl");
    std::fs::copy(binary("hvmctl"), &lone).unwrap();
    let out = Command::new(&lone).arg("demo").output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("missing") && stderr.contains("cargo build --release --workspace"),
        "{stderr}"
    );
}
