//! Issue 22 end to end: PostgreSQL on a virtual LU over a pair of EP 1 058 190 (user
//! volume LU 10, secondary LU 11 of an array-sim daemon both hosts reach), and
//! `hvmctl backup run` choosing what the array offers: the snapshot is the pair split
//! and the copy is the array's CCOPY of the split secondary to its backup device
//! ([0029]-[0030]), so no host reads the LU (the array's host-read counter does not move,
//! its device counter grows by the LU). The backup is in the backup host's catalog as a
//! medium on the array's device; verify checks the medium; a restore reads it into a new
//! image, where the cluster starts, recovers and satisfies pgbench's invariants with the
//! history of the backup instant. A second backup, taken while pgbench writes, goes to
//! the array's other device and restores to a cluster between the two instants.
//! `--via array` on the same pair is the host-side copy (the backup host reads the LU),
//! and the backups are listed together.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::path::Path;
use std::process::Command;

use array_sim::client::{ArrayClient, SocketClient};
use hvm_core::array_backup::{ArrayCounters, BackupOp, BackupReply, PairState};
use hvm_core::Backend;
use hvm_tests::agent::Agent;
use hvm_tests::backup::{coordination_address, coordination_config, tls_init, Hosts};
use hvm_tests::pg::{Bench, Cluster, Mounted};
use hvm_tests::{binary, spawn_ready, target_dir};
use serde_json::Value;

const LU: u64 = 160 << 20;
const PORT: u16 = 25432;

fn counters(c: &ArrayClient<SocketClient>) -> ArrayCounters {
    match c.backup(&BackupOp::Counters).unwrap() {
        BackupReply::Counters(k) => k,
        r => panic!("{r:?}"),
    }
}

fn pair_state(c: &ArrayClient<SocketClient>) -> PairState {
    match c.backup(&BackupOp::PairStatus { lu: 10 }).unwrap() {
        BackupReply::Pair(p) => p.state,
        r => panic!("{r:?}"),
    }
}

/// The array (LUs 10 and 11 paired, tapes 0 and 1) and its client.
fn start_array(dir: &Path) -> (hvm_tests::Running, ArrayClient<SocketClient>, String) {
    let blocks = LU / 512;
    let cfg = dir.join("array.yaml");
    std::fs::write(
        &cfg,
        format!(
            "kind: mode-select\ndir: array\ndisks: [{{name: d0}}, {{name: d1}}]\nlus:\n  - {{ lun: 10, blocks: {blocks}, disk: d0 }}\n  - {{ lun: 11, blocks: {blocks}, disk: d1 }}\nbackup:\n  blocks_per_bit: 8\n  devices:\n    - {{ name: tape0, file: tape0.rec }}\n    - {{ name: tape1, file: tape1.rec }}\n"
        ),
    )
    .unwrap();
    let sock = dir.join("array.sock");
    let (array, line) = spawn_ready(
        Command::new(binary("array-sim"))
            .args(["serve", "--config"])
            .arg(&cfg)
            .arg("--listen")
            .arg(format!("unix:{}", sock.display()))
            .arg("--dir")
            .arg(dir.join("array")),
    );
    assert!(line.contains("listening"), "{line}");
    let c = ArrayClient::new(
        SocketClient::connect(&format!("unix:{}", sock.display()).parse().unwrap()).unwrap(),
    );
    c.backup(&BackupOp::PairCreate {
        primary: 10,
        secondary: 11,
    })
    .unwrap();
    while pair_state(&c) != PairState::Duplex {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let backend = format!(
        "  - name: array0\n    plugin: mode-select\n    params: {{ array: {{ connect: \"unix:{}\" }} }}\n",
        sock.display()
    );
    (array, c, backend)
}

/// A host-agent with `config`, serving; its coordination address.
fn agent(dir: &Path, name: &str, config: String) -> (Agent, String) {
    let cfg = dir.join(format!("{name}.yaml"));
    std::fs::write(&cfg, config).unwrap();
    let state = dir.join(name);
    let (proc, line) = spawn_ready(&mut Agent::command(&cfg, &state));
    assert!(line.starts_with("host-agent: serving"), "{name}: {line:?}");
    (Agent { proc, state }, line)
}

/// The database host (virtual LU `pg` on the pair's user volume, PostgreSQL and
/// fsfreeze hooks) and the backup host, both with a backend on the array.
fn start_hosts(dir: &Path, array: hvm_tests::Running, backend: &str) -> Hosts {
    let tls = tls_init(dir);
    // The stop command only leaves a mark: an in-place restore of an array-ccopy backup
    // is refused before it could run.
    let freeze = format!(
        "  freeze:\n    deadline_ms: 20000\n    hooks:\n      - postgresql: {{ connect: \"host={} port={PORT} user=postgres dbname=postgres\" }}\n      - fsfreeze: {}\n  restore:\n    stop: \"touch {}\"\n",
        dir.join("pg-sock").display(),
        dir.join("mnt-pg").display(),
        dir.join("stopped").display()
    );
    let (db, line) = agent(
        dir,
        "db",
        format!(
            "plugin_dir: {}\nlisten:\n  unix: nbd.sock\n  tcp: 127.0.0.1:0\n  tls: {{ cert: {t}/127.0.0.1.pem, key: {t}/127.0.0.1-key.pem, ca: {t}/ca.pem }}\nbackends:\n{backend}virtual_lus:\n  - {{ name: pg, backend: array0, lu: 10, snapshots: [pg-snap] }}\n{}",
            target_dir().display(),
            coordination_config(&tls, "database", &freeze),
            t = tls.display()
        ),
    );
    let db_addr = coordination_address(&line);
    let db_nbd = line
        .split(" and tcp:")
        .nth(1)
        .and_then(|r| r.split(',').next())
        .unwrap()
        .to_string();
    let target_root = dir.join("backups");
    let (backup, line) = agent(
        dir,
        "bk",
        format!(
            "plugin_dir: {}\nlisten:\n  unix: nbd.sock\nbackends:\n{backend}{}",
            target_dir().display(),
            coordination_config(
                &tls,
                "backup",
                &format!("  backup:\n    target_root: {}\n", target_root.display())
            )
        ),
    );
    Hosts {
        dir: dir.to_path_buf(),
        array: Some(array),
        db,
        backup,
        db_addr,
        backup_addr: coordination_address(&line),
        db_nbd,
        tls,
        target_root,
    }
}

/// Until the pair's resync after the backup ended (the manager's mode follows the pair).
fn wait_synchronized(hosts: &Hosts) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while hosts.db.mode("pg") != "Synchronized" {
        assert!(std::time::Instant::now() < deadline, "no resync");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Backup `id` restored into a new image (the backup host reads the array's medium),
/// mounted, a cluster started on it (`port`): it recovers and pgbench's invariants hold.
/// Returns (sum of balances, history rows).
fn restored(hosts: &Hosts, work: &Path, id: &str, port: u16) -> (i64, i64) {
    let img = work.join(format!("restored-{port}.img"));
    hosts.restore(id, None, &img);
    let rfs = Mounted::file(work, &img, &format!("restored-{port}"), false);
    // The snapshot holds the live cluster's lock file; it names a live postmaster.
    let _ = std::fs::remove_file(rfs.dir.join("data/postmaster.pid"));
    let mut c = Cluster::new(
        &rfs.dir.join("data"),
        &work.join(format!("restored-sock-{port}")),
        port,
        &work.join(format!("restored-{port}.log")),
    );
    c.start();
    let got = c.pgbench_invariants();
    let log = std::fs::read_to_string(&c.log).unwrap_or_default();
    assert!(
        log.contains("redo") || log.contains("recovery"),
        "no recovery in the log:\n{log}"
    );
    c.stop();
    got
}

fn run(hosts: &Hosts, extra: &[&str]) -> Value {
    let (out, v) = hosts.run(&["pg"], "pg", extra);
    assert!(
        out.status.success(),
        "backup run: {}\n{v}",
        String::from_utf8_lossy(&out.stderr)
    );
    v
}

#[test]
fn postgres_on_an_array_pair_is_backed_up_by_the_arrays_split_and_ccopy() {
    let work = tempfile::tempdir().unwrap();
    let work = work.path();
    let (array, arr, backend) = start_array(work);
    let hosts = start_hosts(work, array, &backend);
    let fs = Mounted::export(work, &hosts.db.state.join("nbd.sock"), "pg", true);
    let sock = work.join("pg-sock");
    let mut live = Cluster::new(&fs.dir.join("data"), &sock, PORT, &work.join("live.log"));
    live.initdb();
    live.start();
    live.pgbench_init(1);
    Bench::start(&live, 2, 3).finish();
    let (sum, rows) = live.pgbench_invariants();
    assert!(rows > 0, "pgbench wrote no history");

    // The database is live and idle: every host read of the array during the backup
    // would be the backup's.
    let before = counters(&arr);
    let v = run(&hosts, &[]);
    let after = counters(&arr);
    println!(
        "backup run (auto): {}",
        serde_json::to_string_pretty(&v["steps"]).unwrap()
    );
    let copy = &v["copy"];
    assert_eq!(copy["kind"], "array-ccopy", "{copy}");
    let medium = &copy["lus"][0]["medium"];
    assert_eq!(
        (medium["lu"].as_u64(), medium["blocks"].as_u64()),
        (Some(11), Some(LU / 512)),
        "the array copied the split secondary, whole: {medium}"
    );
    assert_eq!(copy["lus"][0]["copied_bytes"], 0, "{copy}");
    assert_eq!(
        after.host_read_bytes - before.host_read_bytes,
        0,
        "a host read the array during the backup"
    );
    assert_eq!(
        after.device_bytes - before.device_bytes,
        LU,
        "the array wrote the LU to its device"
    );
    assert_eq!(
        hosts.db_snapshot_reads(),
        0,
        "nobody read the snapshot export"
    );
    let id = v["id"].as_str().unwrap().to_string();
    wait_synchronized(&hosts);

    // In place, --force, while the database runs: refused by the backup host before the
    // database host fences the LU or runs its stop command.
    let out = hosts.hvmctl(&[
        "backup",
        "restore",
        &id,
        "--vlu",
        "pg",
        "--in-place",
        "--force",
        "--db",
        &hosts.db_addr,
        "--backup",
        &hosts.backup_addr,
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("on the array's backup device"), "{err}");
    assert!(!work.join("stopped").exists(), "the stop command ran");
    assert_eq!(
        live.pgbench_invariants(),
        (sum, rows),
        "the database still runs"
    );

    // The host-side copy of the same pair, asked for: the backup host reads the LU.
    let before = counters(&arr);
    let host_side = run(&hosts, &["--via", "array"]);
    let read = counters(&arr).host_read_bytes - before.host_read_bytes;
    assert_eq!(host_side["copy"]["kind"], "full", "{host_side}");
    assert!(read >= LU, "the host-side copy read {read} bytes");
    wait_synchronized(&hosts);

    // Online: the array's split and CCOPY while pgbench writes; the other device, since
    // tape0 holds the first backup.
    let bench = Bench::start(&live, 2, 6);
    std::thread::sleep(std::time::Duration::from_secs(2));
    let before = counters(&arr);
    let online = run(&hosts, &["--via", "array-device"]);
    let after = counters(&arr);
    bench.finish();
    let online_medium = &online["copy"]["lus"][0]["medium"];
    assert_eq!(online["copy"]["kind"], "array-ccopy", "{online}");
    assert_ne!(online_medium["device"], medium["device"], "devices rotate");
    assert_eq!(after.device_bytes - before.device_bytes, LU);
    let online_id = online["id"].as_str().unwrap().to_string();
    let (_, live_rows) = live.pgbench_invariants();
    live.stop();
    drop(fs);
    wait_synchronized(&hosts);
    assert_eq!(pair_state(&arr), PairState::Duplex);

    let list = hosts.list(None);
    let kinds: Vec<(&str, &str)> = list["backups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| (b["id"].as_str().unwrap(), b["kind"].as_str().unwrap()))
        .collect();
    assert!(kinds.contains(&(id.as_str(), "array-ccopy")), "{list}");
    assert!(kinds.iter().any(|k| k.1 == "full"), "{list}");
    let row = list["backups"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["id"] == id.as_str())
        .unwrap();
    assert_eq!(row["media"][0]["device"], medium["device"], "{row}");
    assert!(hosts.verify(&id).status.success(), "verify of the medium");

    // Restored from the array's medium into a new image: PostgreSQL recovers there with
    // the backup instant's history.
    let got = restored(&hosts, work, &id, PORT + 1);
    println!(
        "restored: {got:?}; at the backup {:?}; live at the end {live_rows}",
        (sum, rows)
    );
    assert_eq!(got, (sum, rows), "the restore is the backup instant");
    let (_, online_rows) = restored(&hosts, work, &online_id, PORT + 2);
    println!("restored online backup: {online_rows} history rows");
    assert!(
        rows < online_rows && online_rows < live_rows,
        "the online backup is of an instant during the run"
    );

    // A medium replaced behind the catalog's back is refused, not restored.
    let device_file = medium["path"].as_str().unwrap();
    let mut bytes = std::fs::read(device_file).unwrap();
    let n = bytes.len();
    bytes[n / 2] ^= 1;
    std::fs::write(device_file, &bytes).unwrap();
    let out = hosts.try_restore(&id, None, &work.join("again.img"));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("CRC") || err.contains("SHA-256"), "{err}");
    assert!(!work.join("again.img").exists());
}
