//! The control API and hvmctl against a running host-agent on the quickstart config:
//! every operation, the strategies' precondition errors, idempotent repeats, the journal
//! across SIGKILL and SIGTERM.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::io::{Read, Write};
use std::path::Path;

use hvm_tests::agent::Agent;

fn http_get(sock: &Path, path: &str) -> String {
    let mut s = std::os::unix::net::UnixStream::connect(sock).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: hvm\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn every_operation_with_its_preconditions() {
    let state = tempfile::tempdir().unwrap();
    let a = Agent::start(state.path());
    let status = a.json(&["status"]);
    assert_eq!(status["virtual_lus"], 6);
    assert_eq!(a.mode("db"), "Synchronized");
    assert_eq!(a.mode("db-snap"), "Undefined");
    let table = String::from_utf8(a.hvmctl(&["lu", "list"]).stdout).unwrap();
    assert!(
        table.starts_with("NAME") && table.contains("db-snap"),
        "{table}"
    );

    // Precondition errors: delete needs Snapshot, acquire takes an origin.
    let e = a.refused(&["snapshot", "delete", "db"]);
    assert!(e.contains("Snapshot") && e.contains("Synchronized"), "{e}");
    let e = a.refused(&["snapshot", "acquire", "db-snap"]);
    assert!(e.contains("origin") || e.contains("not"), "{e}");
    let e = a.refused(&["snapshot", "acquire", "nope"]);
    assert!(e.contains("no virtual LU named \"nope\""), "{e}");

    // Acquire, and acquire again: the repeat changes nothing.
    a.qemu_io("db", &["write -P 0x11 0 1M"]);
    assert_eq!(a.json(&["snapshot", "acquire", "db"])["changed"], true);
    assert_eq!(a.json(&["snapshot", "acquire", "db"])["changed"], false);
    assert_eq!(a.mode("db"), "Snapshot");
    a.qemu_io("db", &["write -P 0x22 65536 8192"]);
    let ext = a.json(&["extents", "db"]);
    assert_eq!(ext["ranges"], serde_json::json!([[128, 143]]), "{ext}");
    a.qemu_io("db-snap", &["read -P 0x11 65536 8192"]);

    // Resync paused: the pair stays Re-synchronizing, and acquire is refused.
    a.json(&["resync", "pause"]);
    assert_eq!(a.json(&["snapshot", "delete", "db"])["changed"], true);
    assert_eq!(a.json(&["snapshot", "delete", "db"])["changed"], false);
    assert_eq!(a.mode("db"), "Re-synchronizing");
    let e = a.refused(&["snapshot", "acquire", "db"]);
    assert!(e.contains("Synchronized"), "{e}");
    let rs = a.json(&["resync", "status"]);
    let db = rs["pairs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "db")
        .unwrap()
        .clone();
    assert_eq!(db["remaining_lbas"], 16, "{rs}");
    assert_eq!(rs["paused"], true);
    let metrics = http_get(&a.control(), "/metrics");
    assert!(
        metrics.contains(
            "hvm_recorded_lbas{vlu=\"db\",backend=\"stateless0\",mode=\"Re-synchronizing\"} 16"
        ),
        "{metrics}"
    );
    assert!(metrics.contains("hvm_resync_paused 1"), "{metrics}");

    // Rate limit and resume; the resync finishes.
    assert_eq!(
        a.json(&["resync", "rate", "64M"])["bytes_per_second"],
        64 << 20
    );
    let out = a.hvmctl(&["resync", "rate", "fast"]);
    assert_eq!(out.status.code(), Some(2));
    a.json(&["resync", "resume"]);
    // A second cycle: delete --wait returns when the pair is Synchronized again.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while a.mode("db") != "Synchronized" {
        assert!(
            std::time::Instant::now() < deadline,
            "resync never finished"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    a.json(&["snapshot", "acquire", "db"]);
    a.qemu_io("db", &["write -P 0x23 0 4096"]);
    let done = a.json(&["snapshot", "delete", "db", "--wait"]);
    assert_eq!(done["resync"]["done"], true, "{done}");
    assert_eq!(done["resync"]["copied_lbas"], 8, "{done}");
    assert_eq!(a.mode("db"), "Synchronized");

    let b = a.json(&["backends"]);
    assert_eq!(b["backends"].as_array().unwrap().len(), 3);
    assert!(b["backends"]
        .as_array()
        .unwrap()
        .iter()
        .all(|x| x["health"] == "ok"));
    let nf = http_get(&a.control(), "/v1/nothing");
    assert!(nf.starts_with("HTTP/1.1 404"), "{nf}");

    // The control socket is 0660 in a 0700 directory.
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&a.control()), 0o660);
    assert_eq!(mode(a.control().parent().unwrap()), 0o700);
}

#[test]
fn tables_survive_sigkill_and_sigterm_exits_clean() {
    let state = tempfile::tempdir().unwrap();
    let a = Agent::start(state.path());
    a.json(&["snapshot", "acquire", "db"]);
    a.json(&["snapshot", "acquire", "files"]);
    a.qemu_io("db", &["write -P 0x33 1048576 4096"]);
    a.qemu_io("files", &["write -P 0x44 0 4096"]);
    a.signal(nix::sys::signal::Signal::SIGKILL);
    drop(a);

    // After a crash the recorded ranges are all there (at worst whole activity regions).
    let a = Agent::start(state.path());
    assert_eq!(a.mode("db"), "Snapshot");
    let ext = a.json(&["extents", "db"]);
    let ranges = ext["ranges"].as_array().unwrap().clone();
    assert!(
        ranges
            .iter()
            .any(|r| r[0].as_u64().unwrap() <= 2048 && r[1].as_u64().unwrap() >= 2055),
        "{ext}"
    );
    // E4: the saved pre-update data is still the snapshot's.
    a.qemu_io("files-snap", &["read -P 0 0 4096"]);
    a.qemu_io("files", &["read -P 0x44 0 4096"]);

    // SIGTERM: drain, checkpoint, exit 0; the restart finds exact tables.
    a.signal(nix::sys::signal::Signal::SIGTERM);
    let mut a = a;
    let st = a.proc.0.wait().unwrap();
    assert!(st.success(), "{st:?}");
    let a = Agent::start(state.path());
    assert_eq!(a.mode("db"), "Snapshot");
    let done = a.json(&["snapshot", "delete", "db", "--wait"]);
    assert_eq!(done["resync"]["done"], true, "{done}");
    assert_eq!(a.mode("db"), "Synchronized");
}

/// `hvmctl snapshot rollback` over real clients on each array kind of the quickstart:
/// writes after the acquire are undone, the snapshot is deleted and the pair ends
/// Synchronized; outside Snapshot mode it is refused.
#[test]
fn snapshot_rollback_undoes_the_writes_since_the_acquire() {
    let state = tempfile::tempdir().unwrap();
    let a = Agent::start(state.path());
    for vlu in ["db", "logs", "files"] {
        a.qemu_io(vlu, &["write -P 0x11 0 1M"]);
        let e = a.refused(&["snapshot", "rollback", vlu]);
        assert!(e.contains("expected Snapshot"), "{vlu}: {e}");
        a.json(&["snapshot", "acquire", vlu]);
        a.qemu_io(
            vlu,
            &["write -P 0x22 65536 131072", "write -P 0x33 900k 4k"],
        );
        let out = a.json(&["snapshot", "rollback", vlu, "--wait"]);
        assert!(
            out["rolled_back_lbas"].as_u64().unwrap() >= 264,
            "{vlu}: {out}"
        );
        assert_eq!(a.mode(vlu), "Synchronized", "{vlu}");
        a.qemu_io(vlu, &["read -P 0x11 0 1M"]);
    }
}
