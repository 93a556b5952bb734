//! Ceph RBD as an array (issue 16), on a throwaway cluster per test (`hvm_tests::ceph`):
//! the rbd plugin's legs and its change tracking through the crate; a virtual LU with two
//! RBD images as legs through host-agent, NBD and hvmctl, its images compared outside hvm
//! with `rbd export`; a stalled OSD failing requests with EIO while host-agent stays up;
//! PostgreSQL backed up online from a virtual LU on RBD images and restored.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use hvm_core::backend::{Backend, BackendErrorKind};
use hvm_core::LuId;
use hvm_legs::Leg;
use hvm_plugin_rbd::ceph::DiffExtent;
use hvm_plugin_rbd::{open_legs, Params};
use hvm_tests::agent::Agent;
use hvm_tests::backup::Storage;
use hvm_tests::ceph::Ceph;
use hvm_tests::pg::backup_online_via_nbd;
use hvm_tests::{tool, workspace};
use nix::sys::signal::{kill, Signal};

const MIB: u64 = 1 << 20;

fn params(ceph: &Ceph, extra: &str, legs: [&str; 2], size: &str) -> Params {
    Params::parse(&format!(
        "conf: {}\n{extra}volumes:\n  - {{ lu: 0, legs: [{}, {}], size: {size} }}\n",
        ceph.conf().display(),
        legs[0],
        legs[1]
    ))
    .unwrap()
}

#[test]
fn plugin_legs_on_a_throwaway_cluster() {
    let ceph = Ceph::start();
    let p = params(
        &ceph,
        "create: true\ntimeout_ms: 2500\n",
        ["rbd/a", "rbd/b"],
        "16M",
    );
    let m = open_legs(&p).unwrap();
    // create: true made both images, of the volume's size.
    let listed = ceph.run("rbd ls", ceph.rbd().args(["ls", "rbd"]));
    assert_eq!(listed.split_whitespace().collect::<Vec<_>>(), ["a", "b"]);
    let v = &m.volumes()[0];
    assert_eq!((v.origin.size(), v.mate.size()), (16 * MIB, 16 * MIB));
    // Identity: the cluster's fsid, the pool id, the image id.
    let fsid = ceph.run("ceph fsid", ceph.ceph().arg("fsid"));
    let id = v.origin.identity();
    assert!(id.starts_with(&format!("rbd:{}/", fsid.trim())), "{id}");
    assert_ne!(id, v.mate.identity());
    assert_eq!(
        m.identity(LuId(0)).unwrap().unwrap(),
        format!("{id} + {}", v.mate.identity())
    );

    // The mirror LU writes both images (FUA too), a leg LU one.
    let data: Vec<u8> = (0..MIB as usize).map(|i| (i * 7 % 251) as u8).collect();
    m.write(LuId(0), 2048, &data, true).unwrap();
    m.write(LuId(2), 0, &[9u8; 4096], false).unwrap();
    m.flush(LuId(0)).unwrap();
    let mut back = vec![0u8; MIB as usize];
    for lu in [1, 2] {
        m.read(LuId(lu), 2048, &mut back).unwrap();
        assert!(back == data, "LU {lu} misses the mirrored write");
    }
    let mut head = [0u8; 4096];
    m.read(LuId(1), 0, &mut head).unwrap();
    assert_eq!(head, [0u8; 4096]);
    m.read(LuId(2), 0, &mut head).unwrap();
    assert_eq!(head, [9u8; 4096]);
    // Zeroes over an unaligned range inside written data read back as zeroes.
    m.write_zeroes(LuId(0), 2049, 7, true, false).unwrap();
    m.read(LuId(1), 2048, &mut back).unwrap();
    assert!(back[512..512 + 7 * 512].iter().all(|&b| b == 0));
    assert_eq!(back[..512], data[..512]);
    assert_eq!(back[8 * 512..], data[8 * 512..]);
    // Past the end is refused before librbd sees it.
    let e = m.read(LuId(1), 32768, &mut head).unwrap_err();
    assert_eq!(e.kind, BackendErrorKind::OutOfRange);

    // The same image twice is refused by identity.
    let p2 = params(&ceph, "", ["rbd/a", "rbd/a"], "16M");
    let e = open_legs(&p2).err().unwrap();
    assert!(e.contains("the same storage"), "{e}");
    // A missing image without create names it.
    let p3 = params(&ceph, "", ["rbd/a", "rbd/nope"], "16M");
    let e = open_legs(&p3).err().unwrap();
    assert!(e.contains("rbd/nope") && e.contains("No such file"), "{e}");
}

#[test]
fn timeouts_reach_librados_in_whole_seconds() {
    let ceph = Ceph::start();
    let p = params(&ceph, "timeout_ms: 1500\n", ["rbd/a", "rbd/b"], "4M");
    let c = hvm_plugin_rbd::ceph::Cluster::connect(&p.conf, &p.client, &p.ceph_options()).unwrap();
    for o in ["rados_osd_op_timeout", "rados_mon_op_timeout"] {
        assert_eq!(c.get(o).unwrap(), "2", "{o}");
    }
    assert_eq!(c.get("rbd_cache").unwrap(), "false");
}

#[test]
fn diff_iterate_reports_the_writes_since_a_snapshot() {
    let ceph = Ceph::start();
    ceph.create_image("rbd/d", 64 * MIB);
    let p = params(&ceph, "", ["rbd/d", "rbd/e"], "64M");
    let c = hvm_plugin_rbd::ceph::Cluster::connect(&p.conf, &p.client, &p.ceph_options()).unwrap();
    let pool = c.pool("rbd").unwrap();
    let img = pool.open_image("d").unwrap();
    // Objects are 4 MiB: writes in objects 0 and 2, a snapshot, then object 4.
    img.write(0, &[1u8; 4096]).unwrap();
    img.write(8 * MIB, &[2u8; 4096]).unwrap();
    img.snap_create("s1").unwrap();
    img.write(16 * MIB + 512, &[3u8; 8192]).unwrap();
    let all = |from: Option<&str>, whole: bool| {
        let mut v: Vec<DiffExtent> = Vec::new();
        img.diff_iterate(from, 0, 64 * MIB, whole, &mut |e| {
            v.push(e);
            ControlFlow::Continue(())
        })
        .unwrap();
        v
    };
    let since = all(Some("s1"), false);
    assert!(!since.is_empty(), "no change reported");
    for e in &since {
        assert!(e.exists, "{e:?}");
        assert!(
            e.offset >= 16 * MIB && e.offset + e.len <= 20 * MIB,
            "outside object 4: {e:?}"
        );
    }
    let covered =
        |v: &[DiffExtent], at: u64| v.iter().any(|e| e.offset <= at && at < e.offset + e.len);
    assert!(covered(&since, 16 * MIB + 512) && covered(&since, 16 * MIB + 8703));
    let everything = all(None, true);
    for at in [0, 8 * MIB, 16 * MIB + 512] {
        assert!(covered(&everything, at), "{at} not in {everything:?}");
    }
    assert!(!covered(&everything, 4 * MIB), "{everything:?}");
    // Breaking stops the walk after the first extent.
    let mut n = 0;
    img.diff_iterate(None, 0, 64 * MIB, true, &mut |_| {
        n += 1;
        ControlFlow::Break(())
    })
    .unwrap();
    assert_eq!(n, 1);
    // A discarded whole object reads back as zeroes and shows as a change.
    img.discard(8 * MIB, 4 * MIB).unwrap();
    let mut b = [7u8; 4096];
    img.read(8 * MIB, &mut b).unwrap();
    assert_eq!(b, [0u8; 4096]);
    assert!(covered(&all(Some("s1"), true), 8 * MIB));
    img.snap_remove("s1").unwrap();
    assert!(img
        .diff_iterate(Some("s1"), 0, MIB, true, &mut |_| ControlFlow::Continue(()))
        .is_err());
}

/// host-agent on the example config, pointed at `ceph`'s cluster.
fn start_agent(ceph: &Ceph, dir: &Path, extra: &[(&str, &str)]) -> Agent {
    let mut text =
        std::fs::read_to_string(workspace().join("host-agent/examples/rbd.yaml")).unwrap();
    text = text.replace("/etc/ceph/ceph.conf", &ceph.conf().display().to_string());
    for (from, to) in extra {
        assert!(text.contains(from), "{from} not in the example");
        text = text.replace(from, to);
    }
    let cfg = dir.join("agent.yaml");
    std::fs::write(&cfg, text).unwrap();
    Agent::start_config(&cfg, &dir.join("state"))
}

/// Copy an export to a file with qemu-img (a real NBD client).
fn copy_export(agent: &Agent, export: &str, to: &Path) {
    let out = tool("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw"])
        .arg(agent.uri(export))
        .arg(to)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn same(a: &Path, b: &Path) -> bool {
    tool("cmp")
        .arg("-s")
        .arg(a)
        .arg(b)
        .status()
        .unwrap()
        .success()
}

#[test]
fn a_virtual_lu_on_two_rbd_images_backs_up_and_resyncs() {
    let ceph = Ceph::start();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let agent = start_agent(&ceph, d, &[]);
    agent.qemu_io(
        "db",
        &[
            "write -P 0x11 0 8M",
            "write -P 0x22 12M 3M",
            "write -z 1M 64k",
            "flush",
        ],
    );
    let instant = d.join("instant.img");
    copy_export(&agent, "db", &instant);

    agent.json(&["snapshot", "acquire", "db"]);
    assert_eq!(agent.mode("db"), "Snapshot");
    // Writes after the instant go to the origin image only.
    agent.qemu_io("db", &["write -P 0x33 4M 6M", "write -P 0x44 60M 4M"]);
    let snap = d.join("snap.img");
    copy_export(&agent, "db-snap", &snap);
    assert!(
        same(&snap, &instant),
        "the snapshot differs from the instant"
    );
    let now = d.join("now.img");
    copy_export(&agent, "db", &now);
    assert!(!same(&now, &instant));

    let done = agent.json(&["snapshot", "delete", "db", "--wait"]);
    println!("resync: {done}");
    assert_eq!(agent.mode("db"), "Synchronized");
    // Outside hvm: both images hold what the virtual LU holds.
    let (a, b) = (d.join("a.img"), d.join("b.img"));
    ceph.export("rbd/hvm-db-a", &a);
    ceph.export("rbd/hvm-db-b", &b);
    assert!(same(&a, &b), "the images differ after resync");
    assert!(same(&a, &now), "the images miss writes");
}

/// Run `cmd`, killed after `limit` (a hang fails the test instead of stalling it).
fn output_within(cmd: &mut Command, limit: Duration) -> (Output, Duration) {
    let t = Instant::now();
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    while child.try_wait().unwrap().is_none() {
        if t.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    (child.wait_with_output().unwrap(), t.elapsed())
}

fn qemu_io(agent: &Agent, cmds: &[&str]) -> Command {
    let mut c = tool("qemu-io");
    c.args(["-f", "raw", &agent.uri("db")]);
    for x in cmds {
        c.args(["-c", x]);
    }
    c
}

#[test]
fn a_stalled_osd_gives_eio_and_host_agent_stays_up() {
    let ceph = Ceph::start();
    let dir = tempfile::tempdir().unwrap();
    let agent = start_agent(
        &ceph,
        dir.path(),
        &[("timeout_ms: 5000", "timeout_ms: 2000")],
    );
    agent.qemu_io("db", &["write -P 0x55 0 1M"]);

    let osd = ceph.osd_pid();
    kill(osd, Signal::SIGSTOP).unwrap();
    let (out, took) = output_within(
        &mut qemu_io(&agent, &["write -P 0x66 0 64k"]),
        Duration::from_secs(120),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    println!("write with the OSD stopped: {took:?}: {text}");
    assert!(text.contains("Input/output error"), "{text}");
    // host-agent answers while the OSD is still stopped.
    assert_eq!(agent.mode("db"), "Synchronized");

    kill(osd, Signal::SIGCONT).unwrap();
    let (out, took) = output_within(
        &mut qemu_io(&agent, &["write -P 0x77 0 64k", "read -P 0x77 0 64k"]),
        Duration::from_secs(120),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    println!("after SIGCONT: {took:?}: {text}");
    assert!(out.status.success() && !text.contains("failed"), "{text}");
}

#[test]
fn the_example_config_parses() {
    let text = std::fs::read_to_string(workspace().join("host-agent/examples/rbd.yaml")).unwrap();
    let cfg = hvm_host_agent::config::Config::parse(&text, "rbd.yaml").unwrap();
    let b = &cfg.backends[0];
    assert_eq!(b.plugin, "rbd");
    let p = Params::parse(&serde_yaml::to_string(&b.params).unwrap()).unwrap();
    assert_eq!(p.conf, PathBuf::from("/etc/ceph/ceph.conf"));
    assert!(p.create);
    assert_eq!(
        p.volumes[0].leg_names().unwrap(),
        ["rbd/hvm-db-a", "rbd/hvm-db-b"]
    );
}

#[test]
fn postgresql_on_rbd_legs_backed_up_online() {
    const LU: u64 = 512 * MIB;
    let ceph = Ceph::start();
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path();
    let backend = format!(
        "  - name: array0\n    plugin: rbd\n    params:\n      conf: {}\n      create: true\n      timeout_ms: 30000\n      volumes:\n        - {{ lu: 0, legs: [rbd/pg-a, rbd/pg-b], size: 512M }}\n",
        ceph.conf().display()
    );
    backup_online_via_nbd(work, LU, Storage::Backend(&backend), || {
        // Outside hvm: the two images are identical after the resync.
        let (a, b) = (work.join("pg-a.img"), work.join("pg-b.img"));
        ceph.export("rbd/pg-a", &a);
        ceph.export("rbd/pg-b", &b);
        assert!(same(&a, &b), "the images differ after resync");
    });
}
