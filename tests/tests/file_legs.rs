//! Files and block devices as legs (issue 14): a virtual LU on two loop devices and one on
//! two plain files go through the whole cycle with real clients (writes over NBD, acquire,
//! a copy of the snapshot export that must equal the instant, zeroes written in Snapshot
//! mode, delete, resync), and the legs are then compared outside hvm with `cmp`. A mounted
//! device and the same file named twice are refused at start with one line.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use hvm_tests::agent::Agent;
use hvm_tests::backup::Storage;
use hvm_tests::legs::{instant, MIB, SIZE};
use hvm_tests::pg::{backup_online_via_nbd, Mounted};
use hvm_tests::{binary, tool};

/// A loop device attached by this test, detached (by its name) when dropped.
struct LoopDevice {
    dev: String,
}

impl LoopDevice {
    fn attach(file: &Path) -> LoopDevice {
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
        LoopDevice {
            dev: String::from_utf8(out.stdout).unwrap().trim().to_string(),
        }
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).output();
    }
}

fn sparse_file(path: &Path, len: u64) {
    std::fs::File::create(path).unwrap().set_len(len).unwrap();
}

/// host-agent's config: one file backend with one volume on `legs`, virtual LU `db`.
fn config(dir: &Path, legs: [&str; 2], extra: &str) -> PathBuf {
    let cfg = dir.join("agent.yaml");
    std::fs::write(
        &cfg,
        format!(
            "listen:\n  unix: nbd.sock\nbackends:\n  - name: legs0\n    plugin: file\n    params:\n{extra}      volumes:\n        - {{ lu: 0, legs: [{}, {}] }}\nvirtual_lus:\n  - {{ name: db, backend: legs0, lu: 0, snapshots: [db-snap] }}\n",
            legs[0], legs[1]
        ),
    )
    .unwrap();
    cfg
}

/// The demo's cycle over real clients; returns once resync is done and host-agent has
/// stopped, so the legs can be compared.
fn cycle(a: Agent, dir: &Path) {
    a.qemu_io(
        "db",
        &["write -P 0x11 0 8M", "write -P 0x33 40M 1M", "flush"],
    );
    a.json(&["snapshot", "acquire", "db"]);
    // Snapshot mode: data, zeroes (unmap allowed) and a TRIM, all recorded.
    a.qemu_io(
        "db",
        &[
            "write -P 0x22 4M 2M",
            "write -z -u 40M 512k",
            "discard 7M 64k",
            "flush",
        ],
    );
    let ext = a.json(&["extents", "db"]);
    assert_eq!(
        ext["ranges"],
        serde_json::json!([[8192, 12287], [14336, 14463], [81920, 82943]]),
        "{ext}"
    );
    let copy = dir.join("snap.img");
    let out = tool("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw", &a.uri("db-snap")])
        .arg(&copy)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        std::fs::read(&copy).unwrap() == instant(),
        "the snapshot copy differs from the data at the instant"
    );
    let out = a.hvmctl(&["snapshot", "delete", "db", "--wait"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(a.mode("db"), "Synchronized");
    a.qemu_io(
        "db",
        &[
            "read -P 0x11 0 4M",
            "read -P 0x22 4M 2M",
            "read -P 0x11 6M 1M",
            "read -P 0 7M 64k",
            "read -P 0 40M 512k",
            "read -P 0x33 41472k 512k",
        ],
    );
    a.signal(nix::sys::signal::Signal::SIGTERM);
    let mut proc = a.proc;
    assert!(proc.0.wait().unwrap().success(), "host-agent exit status");
}

fn legs_identical(a: &str, b: &str) {
    let out = tool("cmp").arg(a).arg(b).output().unwrap();
    assert!(
        out.status.success(),
        "the legs differ after resync: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn a_virtual_lu_on_two_loop_devices() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    sparse_file(&d.join("a.img"), SIZE);
    sparse_file(&d.join("b.img"), SIZE);
    let (la, lb) = (
        LoopDevice::attach(&d.join("a.img")),
        LoopDevice::attach(&d.join("b.img")),
    );
    let cfg = config(d, [&la.dev, &lb.dev], "");
    let a = Agent::start_config(&cfg, &d.join("state"));
    let backends = a.json(&["backends"]);
    let ids = backends["backends"][0]["lus"].to_string();
    assert!(
        ids.contains("block 7:") && ids.contains(&format!("size {SIZE}")),
        "{backends}"
    );
    cycle(a, d);
    legs_identical(&la.dev, &lb.dev);
}

#[test]
fn a_virtual_lu_on_two_plain_files_created_by_the_plugin() {
    for io in ["uring", "threads"] {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let extra = format!("      io: {io}\n      create: true\n");
        let cfg = config(d, ["legs/a.img", "legs/b.img"], &extra);
        let text = std::fs::read_to_string(&cfg)
            .unwrap()
            .replace("legs/b.img] }", &format!("legs/b.img], size: {SIZE} }}"));
        std::fs::write(&cfg, text).unwrap();
        let state = d.join("state");
        std::fs::create_dir_all(state.join("legs")).unwrap();
        let a = Agent::start_config(&cfg, &state);
        cycle(a, d);
        let leg = |n: &str| state.join("legs").join(n).display().to_string();
        legs_identical(&leg("a.img"), &leg("b.img"));
    }
}

#[test]
fn a_mounted_device_and_a_file_named_twice_are_refused() {
    let _ = binary("host-agent");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    sparse_file(&d.join("fs.img"), SIZE);
    sparse_file(&d.join("b.img"), SIZE);
    let mounted = Mounted::file(d, &d.join("fs.img"), "fs", true);
    let lb = LoopDevice::attach(&d.join("b.img"));
    let err = Agent::refused_at_start(&config(d, [&mounted.dev, &lb.dev], ""), &d.join("s1"));
    assert!(
        err.contains(&format!("{}: in use: mounted", mounted.dev)),
        "{err}"
    );
    drop(mounted);

    let a = d.join("a.img").display().to_string();
    sparse_file(Path::new(&a), SIZE);
    std::os::unix::fs::symlink(&a, d.join("alias.img")).unwrap();
    let alias = d.join("alias.img").display().to_string();
    let err = Agent::refused_at_start(&config(d, [&a, &alias], ""), &d.join("s2"));
    assert!(
        err.contains(&format!("{alias}: the same storage as {a}")),
        "{err}"
    );
}

/// PostgreSQL with its data directory on ext4 on a virtual LU whose legs are two loop
/// devices; pgbench runs throughout `hvmctl backup run` (the backup host pulls the
/// snapshot over NBD, since it cannot open devices the database host holds); the legs
/// are identical after the resync, and the backup restores, recovers and satisfies
/// pgbench's invariants.
#[test]
fn postgresql_on_loop_device_legs_backed_up_online() {
    const LU: u64 = 512 * MIB;
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path();
    sparse_file(&work.join("a.img"), LU);
    sparse_file(&work.join("b.img"), LU);
    let (la, lb) = (
        LoopDevice::attach(&work.join("a.img")),
        LoopDevice::attach(&work.join("b.img")),
    );
    let backend = format!(
        "  - name: array0\n    plugin: file\n    params:\n      volumes:\n        - {{ lu: 0, legs: [{}, {}] }}\n",
        la.dev, lb.dev
    );
    backup_online_via_nbd(work, LU, Storage::Backend(&backend), || {
        legs_identical(&la.dev, &lb.dev)
    });
}

/// The example config parses, and each of its file backends opens once its paths are
/// replaced by files of this test.
#[test]
fn the_example_config_parses_and_its_backends_open() {
    let path = hvm_tests::workspace().join("host-agent/examples/file-legs.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    let cfg = hvm_host_agent::config::Config::parse(&text, "file-legs.yaml").unwrap();
    assert_eq!(cfg.virtual_lus.len(), 3);
    let dir = tempfile::tempdir().unwrap();
    for b in &cfg.backends {
        let mut params = serde_yaml::to_string(&b.params).unwrap();
        for (i, leg) in [
            "/dev/vg0/db-a",
            "/dev/vg0/db-b",
            "/dev/disk/by-id/wwn-0x5000c500a1b2c3d4",
            "/dev/disk/by-id/wwn-0x5000c500d4c3b2a1",
            "/srv/legs/logs-a.img",
            "/srv/legs/logs-b.img",
        ]
        .iter()
        .enumerate()
        {
            let file = dir.path().join(format!("{}-{i}.img", b.name));
            if i < 4 {
                sparse_file(&file, MIB);
            }
            params = params.replace(leg, &file.display().to_string());
        }
        let array = hvm_plugin_file::open_array(&params)
            .unwrap_or_else(|e| panic!("backend {}: {e}\n{params}", b.name));
        assert!(!array.volumes().is_empty());
    }
}
