//! NBD exports as legs (issue 14): a virtual LU on two `nbdkit memory` servers (the
//! config of `host-agent/examples/nbd-legs.yaml`) and one on a `qemu-nbd` qcow2 plus an
//! nbdkit `file` export go through the whole cycle with real clients (writes over NBD,
//! acquire, a copy of the snapshot export that must equal the instant, delete, resync);
//! the legs are then read straight from their servers and compared. A leg's server
//! killed with SIGKILL makes writes fail with EIO while host-agent stays up; restarted on
//! the same socket, it serves again without a restart of host-agent.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use hvm_tests::agent::Agent;
use hvm_tests::legs::{after, instant, read_export, MIB, SIZE};
use hvm_tests::{tool, workspace, Running};

/// Wait for a server's socket to appear; a server that exits first fails the test.
fn wait_for_socket(server: &mut Running, sock: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !sock.exists() {
        if let Some(st) = server.0.try_wait().unwrap() {
            panic!("the server of {} exited: {st}", sock.display());
        }
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            sock.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `nbdkit -f -U SOCK PLUGIN ARGS...`, in the foreground so the test holds its PID.
fn nbdkit(sock: &Path, plugin_args: &[&str]) -> Running {
    // A socket left by a killed server would look like a ready one.
    let _ = std::fs::remove_file(sock);
    let mut cmd = tool("nbdkit");
    cmd.arg("-f").arg("-U").arg(sock).args(plugin_args);
    let mut s = Running(cmd.spawn().unwrap());
    wait_for_socket(&mut s, sock);
    s
}

fn uri(sock: &Path, export: &str) -> String {
    format!("nbd+unix:///{export}?socket={}", sock.display())
}

/// host-agent's config: one nbd backend with one volume on `legs`, virtual LU `db`.
fn config(dir: &Path, legs: [&str; 2], timeout_ms: u64) -> PathBuf {
    let cfg = dir.join("agent.yaml");
    std::fs::write(
        &cfg,
        format!(
            "listen:\n  unix: nbd.sock\nbackends:\n  - name: nbd0\n    plugin: nbd\n    params:\n      timeout_ms: {timeout_ms}\n      volumes:\n        - {{ lu: 0, legs: [\"{}\", \"{}\"] }}\nvirtual_lus:\n  - {{ name: db, backend: nbd0, lu: 0, snapshots: [db-snap] }}\n",
            legs[0], legs[1]
        ),
    )
    .unwrap();
    cfg
}

/// Writes, acquire, writes and zeroes in Snapshot mode, the snapshot copied and compared
/// with the instant, delete --wait (resync); host-agent is stopped at the end so the legs
/// can be read from their servers.
fn cycle(a: Agent, dir: &Path) {
    a.qemu_io(
        "db",
        &["write -P 0x11 0 8M", "write -P 0x33 40M 1M", "flush"],
    );
    a.json(&["snapshot", "acquire", "db"]);
    a.qemu_io(
        "db",
        &["write -P 0x22 4M 2M", "write -z -u 40M 512k", "flush"],
    );
    let ext = a.json(&["extents", "db"]);
    assert_eq!(
        ext["ranges"],
        serde_json::json!([[8192, 12287], [81920, 82943]]),
        "{ext}"
    );
    let snap = read_export(&a.uri("db-snap"), dir, "snap.img");
    assert!(
        snap == instant(),
        "the snapshot copy differs from the data at the instant"
    );
    let done = a.json(&["snapshot", "delete", "db", "--wait"]);
    assert_eq!(done["resync"]["done"], true, "{done}");
    assert_eq!(a.mode("db"), "Synchronized");
    a.qemu_io(
        "db",
        &[
            "read -P 0x11 0 4M",
            "read -P 0x22 4M 2M",
            "read -P 0x11 6M 2M",
            "read -P 0 40M 512k",
            "read -P 0x33 41472k 512k",
        ],
    );
    a.signal(nix::sys::signal::Signal::SIGTERM);
    let mut proc = a.proc;
    assert!(proc.0.wait().unwrap().success(), "host-agent exit status");
}

/// Both legs, read from their servers, hold the virtual LU's data.
fn legs_hold_the_data(legs: [&str; 2], dir: &Path) {
    let a = read_export(legs[0], dir, "leg-a.img");
    let b = read_export(legs[1], dir, "leg-b.img");
    assert!(a == b, "the legs differ after resync");
    assert!(a == after(), "the legs do not hold the virtual LU's data");
}

/// The identities `hvmctl backends` reports for the volume's LUs.
fn identities(a: &Agent) -> String {
    a.json(&["backends"])["backends"][0]["lus"].to_string()
}

/// The example config, with its sockets in `dir`, on two `nbdkit memory` servers.
#[test]
fn a_virtual_lu_on_two_nbdkit_memory_servers_from_the_example() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (sa, sb) = (d.join("a.sock"), d.join("b.sock"));
    let _ka = nbdkit(&sa, &["memory", "64M"]);
    let _kb = nbdkit(&sb, &["memory", "64M"]);
    let example =
        std::fs::read_to_string(workspace().join("host-agent/examples/nbd-legs.yaml")).unwrap();
    assert!(example.contains("/tmp/hvm-nbd/a.sock"), "{example}");
    let cfg = d.join("agent.yaml");
    std::fs::write(
        &cfg,
        example.replace("/tmp/hvm-nbd", &d.display().to_string()),
    )
    .unwrap();
    let a = Agent::start_config(&cfg, &d.join("state"));
    let ids = identities(&a);
    for (sock, name) in [(&sa, "db-a"), (&sb, "db-b")] {
        let id = format!("nbd unix:{} export {name} size {SIZE}", sock.display());
        assert!(ids.contains(&id), "{id} not in {ids}");
    }
    cycle(a, d);
    legs_hold_the_data([&uri(&sa, "db-a"), &uri(&sb, "db-b")], d);
}

/// qemu-nbd serving a qcow2 image as one leg, an nbdkit file export as the other.
#[test]
fn a_virtual_lu_on_a_qemu_nbd_qcow2_and_an_nbdkit_file() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let qcow = d.join("a.qcow2");
    let out = tool("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&qcow)
        .arg(SIZE.to_string())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (sa, sb) = (d.join("qemu.sock"), d.join("kit.sock"));
    let mut qemu = Running(
        tool("qemu-nbd")
            .args([
                "-f",
                "qcow2",
                "-x",
                "qcow",
                "--persistent",
                "--shared=4",
                "-k",
            ])
            .arg(&sa)
            .arg(&qcow)
            .spawn()
            .unwrap(),
    );
    wait_for_socket(&mut qemu, &sa);
    let file = d.join("b.img");
    std::fs::File::create(&file).unwrap().set_len(SIZE).unwrap();
    let _kit = nbdkit(&sb, &["file", &file.display().to_string()]);
    let legs = [uri(&sa, "qcow"), uri(&sb, "b")];
    let a = Agent::start_config(&config(d, [&legs[0], &legs[1]], 30_000), &d.join("state"));
    let ids = identities(&a);
    assert!(
        ids.contains(&format!(
            "nbd unix:{} export qcow size {SIZE}",
            sa.display()
        )),
        "{ids}"
    );
    cycle(a, d);
    legs_hold_the_data([&legs[0], &legs[1]], d);
}

/// qemu-io on the virtual LU: (success, output).
fn qemu_io(a: &Agent, cmds: &[&str]) -> (bool, String) {
    let mut c = tool("qemu-io");
    c.args(["-f", "raw", &a.uri("db")]);
    for x in cmds {
        c.args(["-c", x]);
    }
    let out = c.output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success() && !text.contains("failed"), text)
}

/// SIGKILL of one leg's nbdkit: writes fail with EIO within the timeout, host-agent stays
/// up; nbdkit restarted on the same socket (a file export, so the data survived): writes
/// and reads work again. Stopped with SIGSTOP, a write fails with EIO after the timeout;
/// continued, it serves again. The legs end up identical.
#[test]
fn a_killed_leg_server_gives_eio_and_a_restarted_one_serves_again() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (fa, fb) = (d.join("a.img"), d.join("b.img"));
    for f in [&fa, &fb] {
        std::fs::File::create(f).unwrap().set_len(SIZE).unwrap();
    }
    let (sa, sb) = (d.join("a.sock"), d.join("b.sock"));
    let _ka = nbdkit(&sa, &["file", &fa.display().to_string()]);
    let kb = nbdkit(&sb, &["file", &fb.display().to_string()]);
    let legs = [uri(&sa, "a"), uri(&sb, "b")];
    let a = Agent::start_config(&config(d, [&legs[0], &legs[1]], 2000), &d.join("state"));
    a.qemu_io("db", &["write -P 0x44 0 1M"]);

    // SIGKILL by PID, and reap it.
    let pid = nix::unistd::Pid::from_raw(kb.0.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).unwrap();
    drop(kb);
    let start = Instant::now();
    let (ok, text) = qemu_io(&a, &["write -P 0x55 1M 64k"]);
    let took = start.elapsed();
    assert!(!ok && text.contains("Input/output error"), "{text}");
    println!("qemu-io (one write, its flush at close) with the mate's server killed: EIO, done after {took:?} (timeout 2 s)");
    // Reads of the origin leg go on; host-agent still answers.
    a.qemu_io("db", &["read -P 0x44 0 1M"]);
    assert_eq!(a.json(&["status"])["virtual_lus"], 2);
    let (ok, text) = qemu_io(&a, &["write -P 0x55 1M 64k"]);
    assert!(!ok && text.contains("Input/output error"), "{text}");

    // Back on the same socket: the leg reconnects on a later request (after its backoff).
    let kb = nbdkit(&sb, &["file", &fb.display().to_string()]);
    write_until_served(&a, "write -P 0x66 1M 64k");
    a.qemu_io("db", &["read -P 0x44 0 1M", "read -P 0x66 1M 64k"]);

    // A server that stops answering (SIGSTOP): the write fails with EIO once the 2 s
    // timeout has passed, and the connection is dropped; after SIGCONT it serves again.
    let pid = nix::unistd::Pid::from_raw(kb.0.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    let start = Instant::now();
    let (ok, text) = qemu_io(&a, &["write -P 0x77 1M 64k"]);
    let took = start.elapsed();
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
    assert!(!ok && text.contains("Input/output error"), "{text}");
    println!("qemu-io (one write, its flush at close) with the mate's server stopped: EIO, done after {took:?} (timeout 2 s)");
    assert_eq!(a.json(&["status"])["virtual_lus"], 2);
    write_until_served(&a, "write -P 0x66 1M 64k");
    a.signal(nix::sys::signal::Signal::SIGTERM);
    let mut proc = a.proc;
    assert!(proc.0.wait().unwrap().success(), "host-agent exit status");
    let (la, lb) = (
        read_export(&legs[0], d, "leg-a.img"),
        read_export(&legs[1], d, "leg-b.img"),
    );
    assert!(la == lb, "the legs differ");
    assert!(la[..MIB as usize].iter().all(|&b| b == 0x44));
    assert!(la[MIB as usize..(MIB + 65536) as usize]
        .iter()
        .all(|&b| b == 0x66));
}

/// Retry a write on the virtual LU until it succeeds (the leg reconnects after its
/// backoff), for at most 30 s.
fn write_until_served(a: &Agent, cmd: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (ok, text) = qemu_io(a, &[cmd]);
        if ok {
            return;
        }
        assert!(Instant::now() < deadline, "never served again: {text}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A server that is not there, or refuses the export, stops host-agent at start with a
/// line naming the leg.
#[test]
fn an_unreachable_leg_is_refused_at_start_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let sa = d.join("a.sock");
    let _ka = nbdkit(&sa, &["memory", "64M"]);
    let missing = uri(&d.join("missing.sock"), "b");
    let cfg = config(d, [&uri(&sa, "a"), &missing], 2000);
    let mut child = Agent::command(&cfg, &d.join("state"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("host-agent started without its leg");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!status.success());
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(
        err.contains(&format!("{missing}: connect to unix:")),
        "{err}"
    );
}
