//! The whole online backup of a real PostgreSQL (issue 8): its data directory on ext4 on
//! an hvm virtual LU (nbdfuse + a loop device), pgbench writing throughout, `hvmctl
//! backup run` with the PostgreSQL hook alone (no fsfreeze: the snapshot is one instant
//! of the whole cluster, so the restore is a crash that ext4 and PostgreSQL recover
//! from; backup_restore.rs and array_ccopy_backup.rs restore backups taken with fsfreeze
//! too), the backup host copying the snapshot straight from the array; then the backup
//! restored into a new directory starts as a cluster, recovers, and satisfies pgbench's
//! invariants. A second backup in the same pgbench run is crash-consistent (`--consistency
//! crash`: no hook, no backup mode, no label), the method PostgreSQL's manual gives for a
//! frozen snapshot of the whole cluster, and it restores and recovers too.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use hvm_tests::backup::{steps, Storage};
use hvm_tests::pg::{restore_and_recover, Bench, Cluster, Deployment, Hooks};

const LU: u64 = 512 << 20;

#[test]
fn postgresql_backed_up_online_and_restored() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path();
    let d = Deployment::start_with(work, LU, 5, (20_000, Hooks::Postgres), Storage::ArraySim);
    let hosts = &d.hosts;
    let mut live = d.cluster;
    let bench = Bench::start(&live, 4, 30);
    std::thread::sleep(Duration::from_secs(4));
    let (out, v) = hosts.run(&["pg"], "pg-backup", &["--wait-resync"]);
    assert!(
        out.status.success(),
        "backup run: {}\n{v}",
        String::from_utf8_lossy(&out.stderr)
    );
    println!(
        "backup run: {}",
        serde_json::to_string_pretty(&v["steps"]).unwrap()
    );
    let (text, tps) = bench.finish();
    println!("pgbench during the backup: {tps} tps\n{text}");
    let crash = crash_consistent_backup(hosts, &live);
    // The snapshot came from the array; the database host read none of it [0071].
    assert_eq!(hosts.db_snapshot_reads(), 0);
    assert!(
        v["copy"]["lus"][0]["source"]
            .as_str()
            .unwrap()
            .starts_with("array:"),
        "{v}"
    );
    let steps: Vec<&str> = steps(&v).into_iter().map(|(n, _)| n).collect();
    assert!(
        steps.contains(&"quiesce postgresql") && steps.contains(&"resume postgresql"),
        "{steps:?}"
    );
    assert!(!steps.iter().any(|s| s.contains("fsfreeze")), "{steps:?}");

    // The live database: its invariants hold, then stop it and check the legs.
    let (_, live_rows) = live.pgbench_invariants();
    live.stop();
    drop(d.fs);
    let out = hosts.db.json(&["resync", "status"]);
    assert!(
        out["pairs"][0]["mode"] == "Synchronized" || out["pairs"][0]["done"] == true,
        "{out}"
    );
    assert!(
        std::fs::read(hosts.lu_file(1)).unwrap() == std::fs::read(hosts.lu_file(2)).unwrap(),
        "the legs differ after resync"
    );

    // The backup: a label from pg_backup_stop stored with the image, verified.
    let id = v["id"].as_str().unwrap();
    let label = String::from_utf8(hosts.backup_file("pg-backup", id, "backup_label")).unwrap();
    assert!(
        label.contains("START WAL LOCATION") && label.contains("LABEL: hvm "),
        "{label}"
    );
    let out = hosts.verify(id);
    assert!(
        out.status.success(),
        "verify: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Restore into a new image, mount it, start a cluster on it: it recovers.
    restore_and_recover(hosts, work, id, live.port + 1, live_rows);
    // The crash-consistent one: no label, and it recovers from its WAL alone.
    let m = hosts.manifest("pg-crash", &crash);
    assert_eq!(m["files"].as_array().map(Vec::len), Some(0), "{m}");
    assert_eq!(m["info"]["consistency"], "crash", "{m}");
    restore_and_recover(hosts, work, &crash, live.port + 2, live_rows);
}

/// A `--consistency crash` backup of `pg` into its own repository, while pgbench runs:
/// the database host runs no hook. Returns its id. It has a pgbench run of its own,
/// started 2 s before it and lasting 20 s, so that transactions commit after its
/// snapshot (taken within the backup's first moments) and the restore can tell the
/// snapshot's instant from the end of the run; sharing the first run, it came after that
/// run's end when the backup before it took long under load.
fn crash_consistent_backup(hosts: &hvm_tests::backup::Hosts, live: &Cluster) -> String {
    let bench = Bench::start(live, 4, 20);
    std::thread::sleep(Duration::from_secs(2));
    let args = ["--wait-resync", "--consistency", "crash"];
    let (out, v) = hosts.run(&["pg"], "pg-crash", &args);
    let (text, tps) = bench.finish();
    println!("pgbench during the crash-consistent backup: {tps} tps\n{text}");
    assert!(
        out.status.success(),
        "backup run --consistency crash: {}\n{v}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(v["consistency"], "crash", "{v}");
    let steps: Vec<&str> = steps(&v).into_iter().map(|(n, _)| n).collect();
    assert!(
        !steps
            .iter()
            .any(|s| s.starts_with("quiesce") || s.starts_with("resume")),
        "a hook ran: {steps:?}"
    );
    v["id"].as_str().unwrap().to_string()
}
