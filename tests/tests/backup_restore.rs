//! Restores (issue 19): in place onto the live virtual LU, refused while an NBD client
//! has it open unless `--force` runs the database host's stop command; the fence that
//! keeps new clients out while it writes; onto a block device (a loop device); and
//! `backup run --rate`, whose copy cannot beat its rate. Last, PostgreSQL restored in
//! place: the cluster starts on it and holds the backup's data.
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use hvm_host_agent::coord::{tls, Op, Peer};
use hvm_host_agent::nbd::client::Client;
use hvm_host_agent::nbd::export::with_ticket;
use hvm_tests::backup::{Hosts, Setup};
use hvm_tests::pg::{Cluster, Mounted};
use hvm_tests::tool;
use serde_json::Value;

const LU: u64 = 16 << 20;

fn start(dir: &Path, freeze: &str) -> Hosts {
    Hosts::start(
        dir,
        &Setup {
            lu_bytes: LU,
            names: &["a"],
            freeze,
        },
    )
}

fn sock(hosts: &Hosts) -> PathBuf {
    hosts.db.state.join("nbd.sock")
}

/// Write `byte` over `len` bytes at `at` of virtual LU `vlu`, flushed.
fn fill(hosts: &Hosts, vlu: &str, at: u64, len: usize, byte: u8) {
    let mut c = Client::connect(&sock(hosts), vlu).unwrap();
    c.write(at, &vec![byte; len], true).unwrap();
    c.disconnect();
}

/// The whole live virtual LU, read over NBD.
fn live(hosts: &Hosts, vlu: &str, size: u64) -> Vec<u8> {
    let mut c = Client::connect(&sock(hosts), vlu).unwrap();
    let mut out = vec![0u8; size as usize];
    for (i, piece) in out.chunks_mut(1 << 20).enumerate() {
        c.read((i as u64) << 20, piece).unwrap();
    }
    c.disconnect();
    out
}

fn sha256(p: &Path) -> String {
    let out = tool("sha256sum").arg(p).output().unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

fn ok_json(out: &Output, what: &str) -> Value {
    assert!(
        out.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn backup(hosts: &Hosts, vlu: &str, target: &str, extra: &[&str]) -> Value {
    let (out, v) = hosts.run(&[vlu], target, extra);
    assert!(
        out.status.success(),
        "backup run: {}\n{v}",
        String::from_utf8_lossy(&out.stderr)
    );
    v
}

/// `hvmctl backup restore ID --vlu V --in-place [--force]`.
fn in_place(hosts: &Hosts, id: &str, vlu: &str, force: bool) -> Output {
    let mut a = vec![
        "backup",
        "restore",
        id,
        "--vlu",
        vlu,
        "--in-place",
        "--db",
        &hosts.db_addr,
        "--backup",
        &hosts.backup_addr,
    ];
    if force {
        a.push("--force");
    }
    hosts.hvmctl(&a)
}

/// The database host's view of virtual LU `vlu` (`GET /v1/lus`).
fn lu_view(hosts: &Hosts, vlu: &str) -> Value {
    let v = hosts.db.json(&["lu", "list"]);
    let all = v.as_array().or_else(|| v["lus"].as_array()).unwrap();
    all.iter().find(|l| l["name"] == vlu).unwrap().clone()
}

/// `GET /metrics` on the database host's control socket.
fn metrics(hosts: &Hosts) -> String {
    let mut s = std::os::unix::net::UnixStream::connect(hosts.db.control()).unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: hvm\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    text
}

/// Wait until the database host counts `n` NBD clients on `vlu`.
fn wait_clients(hosts: &Hosts, vlu: &str, n: u64) {
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        let v = lu_view(hosts, vlu);
        if v["nbd_clients"] == n {
            return;
        }
        assert!(Instant::now() < until, "never {n} clients: {v}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A qemu-io process holding one connection to `vlu` open (its stdin kept open), with
/// its PID in `pidfile` for the stop command. Killed when dropped, if still running.
struct Holder(Child);

impl Holder {
    fn start(hosts: &Hosts, vlu: &str, pidfile: &Path) -> Holder {
        let uri = format!("nbd+unix:///{vlu}?socket={}", sock(hosts).display());
        let child = tool("qemu-io")
            .args(["-f", "raw", &uri])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::fs::write(pidfile, child.id().to_string()).unwrap();
        Holder(child)
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The coordination peer of the database host, as the console reaches it.
fn db_peer(hosts: &Hosts) -> Peer {
    let console = (
        hosts.tls.join("console.pem"),
        hosts.tls.join("console-key.pem"),
    );
    let cfg = tls::client_config(
        &hosts.tls.join("ca.pem"),
        Some((console.0.as_path(), console.1.as_path())),
    )
    .unwrap();
    Peer {
        address: hosts.db_addr.clone(),
        tls: Arc::clone(&cfg),
        token: std::fs::read_to_string(hosts.tls.join("token"))
            .unwrap()
            .trim()
            .to_string(),
    }
}

#[test]
fn in_place_is_refused_while_a_client_is_connected_and_forced_by_the_stop_command() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("holder.pid");
    let freeze = format!(
        "    deadline_ms: 5000\n  restore:\n    stop: \"kill $(cat {})\"\n",
        pidfile.display()
    );
    let hosts = start(dir.path(), &freeze);
    fill(&hosts, "a", 0, LU as usize, 0x11);
    let id = backup(&hosts, "a", "t", &[])["id"]
        .as_str()
        .unwrap()
        .to_string();
    let image = dir.path().join("backup.img");
    hosts.restore(&id, Some("a"), &image);
    // After the backup: 1 MiB differs.
    fill(&hosts, "a", 3 << 20, 1 << 20, 0xee);

    // A client holds the export: the count shows it, and the restore is refused.
    let holder = Holder::start(&hosts, "a", &pidfile);
    wait_clients(&hosts, "a", 1);
    let m = metrics(&hosts);
    assert!(m.contains("hvm_nbd_clients{vlu=\"a\"} 1"), "{m}");
    let out = in_place(&hosts, &id, "a", false);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("virtual LU a has 1 NBD client(s) connected") && err.lines().count() == 1,
        "{err}"
    );
    // Nothing was written, and the fence came down again.
    assert_eq!(lu_view(&hosts, "a")["restore_fence"], false);
    let before = live(&hosts, "a", LU);
    assert!(before[3 << 20..4 << 20].iter().all(|&b| b == 0xee));

    // --force: the stop command ends the client, then the backup host writes.
    let v = ok_json(
        &in_place(&hosts, &id, "a", true),
        "restore --in-place --force",
    );
    drop(holder);
    assert_eq!(v["clients_stopped"], 1, "{v}");
    assert_eq!(v["fence"], "lifted", "{v}");
    assert_eq!(v["written_bytes"], 1 << 20, "{v}");
    let after = dir.path().join("after.img");
    std::fs::write(&after, live(&hosts, "a", LU)).unwrap();
    let sha = sha256(&after);
    assert_eq!(sha, sha256(&image));
    assert_eq!(v["sha256"], sha.as_str(), "{v}");
    let view = lu_view(&hosts, "a");
    assert_eq!(view["nbd_clients"], 0, "{view}");
    assert_eq!(view["restore_fence"], false, "{view}");
}

#[test]
fn the_fence_refuses_new_clients_but_its_ticket_and_is_lifted_once() {
    let dir = tempfile::tempdir().unwrap();
    let hosts = start(dir.path(), "    deadline_ms: 5000\n");
    let db = db_peer(&hosts);
    let call = |id: &str, op: &Op| db.call(id, op, 0, &mut |_, _| {});
    let fence = |id: &str, force: bool| {
        call(
            id,
            &Op::RestoreFence {
                vlu: "a".into(),
                force,
                backup: "b".into(),
            },
        )
    };
    // A client connected: refused without force, and --force without a stop command
    // says what is missing.
    let c = Client::connect(&sock(&hosts), "a").unwrap();
    let e = fence("f0", false).unwrap_err();
    assert!(e.message.contains("1 NBD client(s)"), "{e}");
    let e = fence("f1", true).unwrap_err();
    assert!(e.message.contains("coordination.restore.stop"), "{e}");
    c.disconnect();
    wait_clients(&hosts, "a", 0);

    let v = fence("f2", false).unwrap();
    let ticket = v["ticket"].as_str().unwrap().to_string();
    assert_eq!(lu_view(&hosts, "a")["restore_fence"], true);
    // A retry of the same request answers the same ticket.
    assert_eq!(fence("f2", false).unwrap()["ticket"], ticket.as_str());
    // New clients are refused with the protocol's error (qemu's client too); another
    // fence is refused; the ticket's holder gets in and is counted.
    let e = Client::connect(&sock(&hosts), "a")
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("restored in place"), "{e}");
    let out = tool("qemu-io")
        .args(["-f", "raw", "-c", "read 0 512"])
        .arg(format!("nbd+unix:///a?socket={}", sock(&hosts).display()))
        .output()
        .unwrap();
    assert!(!out.status.success(), "qemu-io got through the fence");
    assert!(fence("f3", false).is_err());
    let mut c = Client::connect(&sock(&hosts), &with_ticket("a", &ticket)).unwrap();
    let mut buf = [0u8; 512];
    c.read(0, &mut buf).unwrap();
    assert_eq!(lu_view(&hosts, "a")["nbd_clients"], 1);
    c.disconnect();
    let unfence = |id: &str| {
        call(
            id,
            &Op::RestoreUnfence {
                vlu: "a".into(),
                ticket: ticket.clone(),
            },
        )
        .unwrap()
    };
    assert_eq!(unfence("u1")["lifted"], true);
    assert_eq!(unfence("u2")["lifted"], false);
    Client::connect(&sock(&hosts), "a").unwrap().disconnect();
    assert_eq!(lu_view(&hosts, "a")["restore_fence"], false);
}

#[test]
fn backup_run_rate_bounds_the_copy() {
    let dir = tempfile::tempdir().unwrap();
    let hosts = start(dir.path(), "    deadline_ms: 5000\n");
    fill(&hosts, "a", 0, LU as usize, 0x5a);
    let rate: u64 = 4 << 20;
    let t = Instant::now();
    let v = backup(&hosts, "a", "r", &["--rate", &rate.to_string()]);
    let wall = t.elapsed().as_secs_f64();
    let l = &v["copy"]["lus"][0];
    assert_eq!(l["copied_bytes"], LU, "{v}");
    // The throttle lets one 4 MiB extent ahead and the last read is not waited for:
    // the copy cannot take less than (bytes - 2 x 4 MiB) / rate.
    let floor = (LU - (8 << 20)) as f64 / rate as f64;
    let secs = l["seconds"].as_f64().unwrap();
    println!(
        "--rate {rate}: {LU} bytes copied in {secs:.2} s (floor {floor:.2} s, wall {wall:.2} s)"
    );
    assert!(secs >= floor && wall >= floor, "{v}");
}

/// Held by the tests that make loop devices: the PostgreSQL test's stop command detaches
/// its own, and its mount's drop then detaches that name again, which must not be
/// another test's device by then.
static LOSETUP: Mutex<()> = Mutex::new(());

/// A loop device on a file, detached (by its own name) when dropped.
struct Loop(String);

impl Loop {
    fn on(file: &Path) -> Loop {
        let out = tool("losetup")
            .args(["--find", "--show"])
            .arg(file)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "losetup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Loop(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).output();
    }
}

#[test]
fn restore_to_a_loop_device() {
    let dir = tempfile::tempdir().unwrap();
    let hosts = start(dir.path(), "    deadline_ms: 5000\n");
    fill(&hosts, "a", 0, LU as usize, 0x33);
    fill(&hosts, "a", 5 << 20, 4096, 0x44);
    let id = backup(&hosts, "a", "d", &[])["id"]
        .as_str()
        .unwrap()
        .to_string();
    let file = dir.path().join("device-backing.img");
    let f = std::fs::File::create(&file).unwrap();
    f.set_len(LU).unwrap();
    // Not zeros: a restore onto a device must write its zeros too.
    std::os::unix::fs::FileExt::write_all_at(&f, &vec![0xffu8; 1 << 20], 8 << 20).unwrap();
    drop(f);
    let _one = LOSETUP.lock().unwrap_or_else(PoisonError::into_inner);
    let dev = Loop::on(&file);
    let image = dir.path().join("image.img");
    hosts.restore(&id, Some("a"), &image);
    let out = hosts.try_restore(&id, Some("a"), Path::new(&dev.0));
    let v = ok_json(&out, "restore --to /dev/loop");
    let sha = sha256(&image);
    assert_eq!(v["sha256"], sha.as_str(), "{v}");
    drop(dev);
    assert_eq!(sha256(&file), sha);
    assert_eq!(std::fs::read(&file).unwrap(), live(&hosts, "a", LU));
}

/// PostgreSQL on virtual LU `pg`: a backup, a row written after it, then a restore in
/// place with --force, whose stop command stops the cluster, unmounts it and ends the
/// NBD client; the cluster starts on the restored LU with the backup's rows only.
#[test]
fn postgresql_restored_in_place_starts_with_the_backups_data() {
    let _one = LOSETUP.lock().unwrap_or_else(PoisonError::into_inner);
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path();
    let lu: u64 = 128 << 20;
    let pgsock = work.join("pg-sock");
    let port = 25432;
    let mnt = work.join("mnt-pg");
    let stop = work.join("stop.sh");
    let freeze = format!(
        "    deadline_ms: 20000\n    hooks:\n      - postgresql: {{ connect: \"host={} port={port} user=postgres dbname=postgres\" }}\n      - fsfreeze: {}\n  restore:\n    stop: \"sh {}\"\n",
        pgsock.display(),
        mnt.display(),
        stop.display()
    );
    let hosts = Hosts::start(
        work,
        &Setup {
            lu_bytes: lu,
            names: &["pg"],
            freeze: &freeze,
        },
    );
    let fs = Mounted::export(work, &sock(&hosts), "pg", true);
    let mut cluster = Cluster::new(&fs.dir.join("data"), &pgsock, port, &work.join("pg.log"));
    cluster.initdb();
    cluster.start();
    std::fs::write(
        &stop,
        format!(
            "set -e\nrunuser -u postgres -- {} -w -m fast -D {} stop\numount {}\nlosetup -d {}\numount {}\n",
            cluster.bin.join("pg_ctl").display(),
            cluster.data.display(),
            fs.dir.display(),
            fs.dev,
            work.join("fuse-pg").display()
        ),
    )
    .unwrap();
    cluster.psql("CREATE TABLE t (x text); INSERT INTO t VALUES ('kept')");
    let id = backup(&hosts, "pg", "pg", &[])["id"]
        .as_str()
        .unwrap()
        .to_string();
    cluster.psql("INSERT INTO t VALUES ('lost'); CHECKPOINT");
    let image = work.join("backup.img");
    hosts.restore(&id, Some("pg"), &image);

    let out = in_place(&hosts, &id, "pg", false);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("NBD client(s) connected"), "{err}");
    assert_eq!(cluster.psql("SELECT count(*) FROM t"), "2");

    let v = ok_json(
        &in_place(&hosts, &id, "pg", true),
        "restore --in-place --force",
    );
    println!("restore in place: {v}");
    assert!(v["clients_stopped"].as_u64().unwrap() >= 1, "{v}");
    drop(fs); // already unmounted by the stop command: its drop finds nothing to undo
    let restored = work.join("restored.img");
    std::fs::write(&restored, live(&hosts, "pg", lu)).unwrap();
    assert_eq!(sha256(&restored), sha256(&image));
    assert_eq!(v["sha256"], sha256(&image).as_str(), "{v}");

    // What the DBA does next: mount, start; PostgreSQL recovers as after a crash at
    // the backup's instant (its lock file from then names a postmaster long gone).
    let fs = Mounted::export(work, &sock(&hosts), "pg", false);
    let _ = std::fs::remove_file(fs.dir.join("data/postmaster.pid"));
    cluster.start();
    assert_eq!(cluster.psql("SELECT string_agg(x, ',') FROM t"), "kept");
    cluster.stop();
    drop(fs);
}
