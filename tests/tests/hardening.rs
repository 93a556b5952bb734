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

/// The open descriptors of process `pid`.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// Limit process `pid` to `n` open descriptors (soft and hard).
fn limit_fds(pid: u32, n: usize) {
    let out = hvm_tests::tool("prlimit")
        .arg(format!("--pid={pid}"))
        .arg(format!("--nofile={n}:{n}"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Connect to `socket` until the server (process `pid`) is out of descriptors, plus
/// `extra` connections that wait in the listen backlog: each one it accepts holds a
/// descriptor there. Returns the connections, to close later.
fn exhaust(pid: u32, socket: &Path, extra: usize) -> Vec<std::os::unix::net::UnixStream> {
    let mut held = Vec::new();
    for _ in 0..500 {
        held.push(std::os::unix::net::UnixStream::connect(socket).unwrap());
        std::thread::sleep(std::time::Duration::from_millis(5));
        if held.len() > 4 && open_fds(pid) >= limit_of(pid) {
            break;
        }
    }
    assert!(
        open_fds(pid) >= limit_of(pid),
        "never ran out of descriptors"
    );
    for _ in 0..extra {
        held.push(std::os::unix::net::UnixStream::connect(socket).unwrap());
    }
    held
}

fn limit_of(pid: u32) -> usize {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    line.split_whitespace().nth(3).unwrap().parse().unwrap()
}

fn count(path: &Path, needle: &str) -> usize {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter(|l| l.contains(needle))
        .count()
}

/// host-agent out of descriptors: the NBD and control API accept loops pause and log
/// once per interval instead of spinning (before: a warning per failed accept, tens of
/// thousands a second), and both serve again once the connections close.
#[test]
fn accept_loops_back_off_when_descriptors_run_out() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("agent.log");
    let mut cmd = hvm_tests::agent::Agent::command(
        &hvm_tests::workspace().join("host-agent/examples/quickstart.yaml"),
        dir.path(),
    );
    cmd.stderr(std::fs::File::create(&log).unwrap());
    let agent = hvm_tests::agent::Agent::spawn(&mut cmd, dir.path());
    let pid = agent.proc.0.id();
    limit_fds(pid, open_fds(pid) + 8);
    let nbd = exhaust(pid, &dir.path().join("nbd.sock"), 20);
    let control: Vec<_> = (0..5)
        .map(|_| std::os::unix::net::UnixStream::connect(agent.control()).unwrap())
        .collect();
    std::thread::sleep(std::time::Duration::from_secs(3));
    let failures = count(&log, "accept failed");
    assert!(
        (1..=4).contains(&failures),
        "{failures} lines of failed accepts in 3 s: {}",
        std::fs::read_to_string(&log).unwrap()
    );
    drop(nbd);
    drop(control);
    // Recovered: the control API answers and an NBD client reads and writes.
    let status = agent.json(&["status"]);
    assert!(status.get("version").is_some(), "{status}");
    agent.qemu_io("db", &["write -P 7 0 4k", "read -P 7 0 4k"]);
}

/// The array-sim daemon out of descriptors: the same, for its accept loop.
#[test]
fn array_sim_accept_loop_backs_off_when_descriptors_run_out() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("array.log");
    let sock = dir.path().join("array.sock");
    let (daemon, line) = hvm_tests::spawn_ready(
        Command::new(binary("array-sim"))
            .args(["serve", "--config"])
            .arg(hvm_tests::workspace().join("array-sim/examples/fig9-stateless.yaml"))
            .arg("--listen")
            .arg(format!("unix:{}", sock.display()))
            .arg("--dir")
            .arg(dir.path().join("data"))
            .stderr(std::fs::File::create(&log).unwrap()),
    );
    assert!(line.contains("listening"), "{line}");
    let pid = daemon.0.id();
    limit_fds(pid, open_fds(pid) + 8);
    let held = exhaust(pid, &sock, 20);
    std::thread::sleep(std::time::Duration::from_secs(3));
    let failures = count(&log, "accept failed");
    assert!(
        (1..=4).contains(&failures),
        "{failures} lines of failed accepts in 3 s"
    );
    drop(held);
    std::thread::sleep(std::time::Duration::from_millis(1500));
    // Serves again: a driver connects and reads.
    let params = format!("array:\n  connect: \"unix:{}\"\n", sock.display());
    let plugin = hvm_plugin_abi::host::Plugin::load(&plugin_path("stateless")).unwrap();
    let backend = plugin.open(&params).unwrap();
    use hvm_core::backend::Backend;
    backend.read(hvm_core::LuId(0), 0, &mut [0u8; 512]).unwrap();
}

/// True when the peer closes `s` within `wait` (EOF or reset), false when it is still
/// open then. What was sent before the close does not matter.
fn closed_within(s: &mut impl std::io::Read, wait: std::time::Duration) -> bool {
    let start = std::time::Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => return true,
        }
        if start.elapsed() > wait {
            return false;
        }
    }
}

/// A control API client that sends half a header and waits is disconnected (before:
/// held for ever); a whole request on another connection is answered meanwhile.
#[test]
fn control_api_closes_a_connection_that_never_finishes_its_header() {
    let dir = tempfile::tempdir().unwrap();
    let agent = hvm_tests::agent::Agent::start(dir.path());
    let mut slow = std::os::unix::net::UnixStream::connect(agent.control()).unwrap();
    use std::io::Write;
    slow.write_all(b"GET /v1/status HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    slow.set_read_timeout(Some(std::time::Duration::from_millis(200)))
        .unwrap();
    let silent = std::os::unix::net::UnixStream::connect(agent.control()).unwrap();
    assert!(agent.json(&["status"]).get("version").is_some());
    assert!(
        closed_within(&mut slow, std::time::Duration::from_secs(30)),
        "the half-sent request still holds its connection after 30 s"
    );
    let mut silent = silent;
    silent
        .set_read_timeout(Some(std::time::Duration::from_millis(200)))
        .unwrap();
    assert!(
        closed_within(&mut silent, std::time::Duration::from_secs(30)),
        "a connection that sent nothing is still open after 30 s"
    );
}

/// The coordination service takes at most a few dozen connections that have not
/// authenticated; past that a new connection is closed at once (before: each got a task
/// and a 10 s handshake wait, without limit), and it serves again when they go.
#[test]
fn coordination_caps_connections_before_authentication() {
    let dir = tempfile::tempdir().unwrap();
    let hosts = hvm_tests::backup::Hosts::start(
        dir.path(),
        &hvm_tests::backup::Setup {
            lu_bytes: 1 << 20,
            names: &["a"],
            freeze: "    deadline_ms: 5000\n",
        },
    );
    let idle: Vec<_> = (0..100)
        .map(|_| std::net::TcpStream::connect(&hosts.db_addr).unwrap())
        .collect();
    // The first ones wait for a TLS handshake; the last are closed at once.
    let mut last = std::net::TcpStream::connect(&hosts.db_addr).unwrap();
    last.set_read_timeout(Some(std::time::Duration::from_millis(200)))
        .unwrap();
    assert!(
        closed_within(&mut last, std::time::Duration::from_secs(3)),
        "connection 101 without a handshake was not closed at once"
    );
    drop(idle);
    std::thread::sleep(std::time::Duration::from_millis(500));
    // Authenticated requests get through again: a whole backup runs.
    let (out, _) = hosts.run(&["a"], "after-the-flood", &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Resident memory of process `pid`, in MiB.
fn rss_mib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap()
        .parse()
        .unwrap();
    kib / 1024
}

/// The highest resident memory of `pid` over `secs` seconds, in MiB.
fn peak_rss_mib(pid: u32, secs: u64) -> u64 {
    (0..secs * 10)
        .map(|_| {
            std::thread::sleep(std::time::Duration::from_millis(100));
            rss_mib(pid)
        })
        .max()
        .unwrap()
}

/// An NBD connection through the fixed newstyle handshake (NBD_OPT_EXPORT_NAME, no
/// zeroes), ready for requests.
fn nbd_raw(socket: &Path, export: &str) -> std::os::unix::net::UnixStream {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(socket).unwrap();
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).unwrap();
    assert_eq!(&greeting[..8], b"NBDMAGIC");
    s.write_all(&3u32.to_be_bytes()).unwrap(); // FIXED_NEWSTYLE | NO_ZEROES
    s.write_all(b"IHAVEOPT").unwrap();
    s.write_all(&1u32.to_be_bytes()).unwrap(); // NBD_OPT_EXPORT_NAME
    s.write_all(&(export.len() as u32).to_be_bytes()).unwrap();
    s.write_all(export.as_bytes()).unwrap();
    let mut info = [0u8; 10];
    s.read_exact(&mut info).unwrap();
    s
}

/// A client that sends many large READs and never reads a reply: host-agent stops
/// taking its requests once the unsent replies reach the connection's budget (before:
/// every worker held a 32 MiB reply, about 512 MiB for one connection).
#[test]
fn nbd_memory_per_connection_is_bounded() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let agent = hvm_tests::agent::Agent::start(dir.path());
    let pid = agent.proc.0.id();
    let before = rss_mib(pid);
    let mut s = nbd_raw(&dir.path().join("nbd.sock"), "db");
    let len: u32 = 32 << 20;
    for cookie in 0..40u64 {
        let mut r = Vec::with_capacity(28);
        r.extend_from_slice(&0x2560_9513u32.to_be_bytes());
        r.extend_from_slice(&0u16.to_be_bytes()); // flags
        r.extend_from_slice(&0u16.to_be_bytes()); // NBD_CMD_READ
        r.extend_from_slice(&cookie.to_be_bytes());
        r.extend_from_slice(&0u64.to_be_bytes());
        r.extend_from_slice(&len.to_be_bytes());
        s.write_all(&r).unwrap();
    }
    let peak = peak_rss_mib(pid, 4);
    eprintln!("host-agent RSS {before} MiB, peak {peak} MiB with 40 unread 32 MiB READs");
    assert!(
        peak < before + 200,
        "host-agent grew from {before} MiB to {peak} MiB for one connection"
    );
    drop(s);
    agent.qemu_io("db", &["write -P 9 0 4k", "read -P 9 0 4k"]);
}

/// The same against the array-sim daemon: READ(16) commands of 16 MiB sent and their
/// replies never read (before: every reply waited in memory, 640 MiB here and without
/// limit for more commands).
#[test]
fn array_sim_memory_per_connection_is_bounded() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("array.sock");
    let (daemon, line) = hvm_tests::spawn_ready(
        Command::new(binary("array-sim"))
            .args(["serve", "--config"])
            .arg(hvm_tests::workspace().join("array-sim/examples/fig9-stateless.yaml"))
            .arg("--listen")
            .arg(format!("unix:{}", sock.display()))
            .arg("--dir")
            .arg(dir.path().join("data")),
    );
    assert!(line.contains("listening"), "{line}");
    let pid = daemon.0.id();
    let before = rss_mib(pid);
    let mut s = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    for tag in 0..40u64 {
        let mut cdb = vec![0x88, 0];
        cdb.extend_from_slice(&0u64.to_be_bytes());
        cdb.extend_from_slice(&32768u32.to_be_bytes()); // 16 MiB
        cdb.extend_from_slice(&[0, 0]);
        let frame = array_sim::proto::Request {
            tag,
            lun: 1,
            cdb: &cdb,
            data: &[],
        }
        .encode();
        s.write_all(&frame).unwrap();
    }
    let peak = peak_rss_mib(pid, 4);
    eprintln!("array-sim RSS {before} MiB, peak {peak} MiB with 40 unread 16 MiB READs");
    assert!(
        peak < before + 200,
        "array-sim grew from {before} MiB to {peak} MiB for one connection"
    );
}

/// A tmpfs mounted for a test, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(at).unwrap();
        let out = hvm_tests::tool("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mount a tmpfs (the test needs root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(at.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Fill the file system of `dir` with `filler` until it has no room left.
fn fill(filler: &Path) {
    use std::io::Write;
    let mut f = std::fs::File::create(filler).unwrap();
    let block = vec![0xeeu8; 4096];
    while f.write_all(&block).is_ok() {}
    let _ = f.sync_all();
}

/// qemu-io writes of 4 KiB to `count` distinct journal regions from `first`; true if all
/// succeeded.
fn writes_succeed(agent: &hvm_tests::agent::Agent, first: u64, count: u64) -> bool {
    let mut c = hvm_tests::tool("qemu-io");
    c.args(["-f", "raw", &agent.uri("db")]);
    for i in first..first + count {
        c.args(["-c", &format!("write -P 5 {} 4k", i * 8192)]);
    }
    let out = c.output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    out.status.success() && !text.contains("failed")
}

fn health(agent: &hvm_tests::agent::Agent) -> String {
    agent.json(&["status"])["health"]
        .as_str()
        .unwrap_or("(no health field)")
        .to_string()
}

/// The journal's file system fills up: status says `failing` with the reason, writes
/// fail; room comes back: the agent writes the journal again by itself and writes work;
/// a SIGTERM whose final checkpoint cannot be written exits non-zero. Before: health
/// had no such field, writes failed until a restart, and SIGTERM exited 0.
#[test]
fn a_full_journal_disk_is_reported_and_recovered_from() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let _fs = Tmpfs::mount(&state, "512k");
    let config = dir.path().join("agent.yaml");
    std::fs::write(
        &config,
        format!(
            "listen: {{ unix: nbd.sock }}\njournal: {{ region_kib: 4 }}\nbackends:\n  - name: a\n    plugin: stateless\n    params:\n      array:\n        embedded:\n          kind: stateless\n          dir: {}\n          disks: [{{ name: d0 }}, {{ name: d1 }}]\n          lus:\n            - {{ lun: 1, blocks: 131072, disk: d0 }}\n            - {{ lun: 2, blocks: 131072, disk: d1 }}\n          mirroring:\n            - {{ mirror: 0, origin: 1, mate: 2 }}\nvirtual_lus:\n  - {{ name: db, backend: a, lu: 0, snapshots: [db-snap] }}\n",
            dir.path().join("array").display()
        ),
    )
    .unwrap();
    let mut cmd = hvm_tests::agent::Agent::command(&config, &state);
    let agent = hvm_tests::agent::Agent::spawn(&mut cmd, &state);
    assert_eq!(health(&agent), "ok");
    // In Snapshot mode every write to a new range is journaled.
    assert_eq!(agent.json(&["snapshot", "acquire", "db"])["changed"], true);
    assert!(writes_succeed(&agent, 0, 4));
    let filler = state.join("filler");
    fill(&filler);
    // Each write to a new region appends to the journal; a page of them fills it.
    let mut failed = false;
    for round in 0..20 {
        if !writes_succeed(&agent, 100 + round * 200, 200) {
            failed = true;
            break;
        }
    }
    assert!(failed, "writes never failed on a full journal disk");
    let h = health(&agent);
    assert!(
        h.starts_with("failing: backend a: journal") && h.contains("No space left"),
        "{h}"
    );
    std::fs::remove_file(&filler).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while health(&agent) != "ok" {
        assert!(
            std::time::Instant::now() < deadline,
            "never recovered: {}",
            health(&agent)
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert!(
        writes_succeed(&agent, 5000, 50),
        "writes fail after recovery"
    );

    // A full disk at shutdown: the final checkpoint fails and the exit status says so.
    fill(&filler);
    let mut agent = agent;
    agent.signal(nix::sys::signal::Signal::SIGTERM);
    let status = agent.proc.0.wait().unwrap();
    assert!(
        !status.success(),
        "SIGTERM with a failed checkpoint exited {status}"
    );
}

/// A backup copy that fails half-way (the backup host's disk fills up) leaves no
/// backup (no manifest: the chunks it wrote are garbage for the next prune), so the
/// retry, once there is room, succeeds and is the repository's only backup.
#[test]
fn a_failed_backup_copy_leaves_no_backup_behind() {
    let dir = tempfile::tempdir().unwrap();
    let hosts = hvm_tests::backup::Hosts::start(
        dir.path(),
        &hvm_tests::backup::Setup {
            lu_bytes: 4 << 20,
            names: &["a"],
            freeze: "    deadline_ms: 5000\n",
        },
    );
    // Data that does not compress, so the copy cannot fit.
    let mut c = hvm_host_agent::nbd::client::Client::connect(&hosts.db.state.join("nbd.sock"), "a")
        .unwrap();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let noise: Vec<u8> = (0..4 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    c.write(0, &noise, true).unwrap();
    c.disconnect();
    let fs = Tmpfs::mount(&hosts.target_root, "1m");
    let (out, _) = hosts.run(&["a"], "nightly", &[]);
    assert!(!out.status.success(), "a 4 MiB copy fit in 1 MiB");
    let manifests = |p: &std::path::Path| {
        std::fs::read_dir(p.join("backups"))
            .map(|d| d.count())
            .unwrap_or(0)
    };
    let repo = hosts.target_root.join("nightly");
    assert_eq!(manifests(&repo), 0, "the failed copy left a backup");
    let grown = Command::new("mount")
        .args(["-o", "remount,size=64m"])
        .arg(&fs.0)
        .status()
        .unwrap();
    assert!(grown.success());
    // The failed run deleted its snapshot; a new one needs the resync to be over.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while hosts.db.mode("a") != "Synchronized" {
        assert!(std::time::Instant::now() < deadline, "never resynchronized");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let (out, v) = hosts.run(&["a"], "nightly", &[]);
    assert!(
        out.status.success(),
        "the retry: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(manifests(&repo), 1);
    let id = v["id"].as_str().unwrap();
    // A backup holds the database's data: only its owner reads it, whatever the umask.
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: PathBuf| std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
    let m = hosts.manifest("nightly", id);
    let chunk = m["lus"][0]["extents"][0]["chunk"].as_str().unwrap();
    assert_eq!(mode(repo.clone()), 0o700);
    assert_eq!(mode(hosts.chunk_path("nightly", chunk)), 0o600);
    assert_eq!(
        mode(repo.join(format!("backups/{id}/manifest.json"))),
        0o600
    );
}

/// Journals and the embedded arrays' LU images are 0600, and the arrays' directories
/// 0700, even under umask 0 (before: 0666 and 0777 less the umask).
#[test]
fn journals_and_lu_images_are_private_whatever_the_umask() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = hvm_tests::agent::Agent::command(
        &hvm_tests::workspace().join("host-agent/examples/quickstart.yaml"),
        dir.path(),
    );
    // SAFETY: umask is async-signal-safe and touches nothing of the parent.
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::stat::umask(nix::sys::stat::Mode::empty());
            Ok(())
        });
    }
    let _agent = hvm_tests::agent::Agent::spawn(&mut cmd, dir.path());
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    for backend in ["stateless0", "modeselect0", "preupdate0"] {
        let p = dir.path().join(format!("{backend}.journal"));
        assert_eq!(mode(&p), 0o600, "{}", p.display());
        let array = dir.path().join(backend);
        assert_eq!(mode(&array), 0o700, "{}", array.display());
        let images: Vec<PathBuf> = std::fs::read_dir(&array)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "img"))
            .collect();
        assert!(!images.is_empty(), "{}", array.display());
        for img in images {
            assert_eq!(mode(&img), 0o600, "{}", img.display());
        }
    }
}

/// A SET FAULT rule that drops every command on an LU (`op: any`) does not drop the SET
/// FAULT that clears it: after the clear, the LU serves again. Before, the clearing
/// command was dropped too and the LU stayed broken until the array restarted.
#[test]
fn a_fault_rule_cannot_block_the_command_that_clears_it() {
    use array_sim::engine::{Engine, Outcome};
    use array_sim::fault::{FaultAction, FaultOp, FaultRule};
    use array_sim::scsi::Command;
    let dir = tempfile::tempdir().unwrap();
    let cfg = array_sim::config::ArrayConfig::load(
        &hvm_tests::workspace().join("array-sim/examples/fig9-stateless.yaml"),
    )
    .unwrap();
    let e = Engine::open(&cfg, Some(dir.path())).unwrap();
    let set_fault = |rule: Option<&FaultRule>| {
        let data = FaultRule::encode(rule);
        let cdb = Command::SetFault {
            param_len: data.len() as u32,
        }
        .encode();
        e.execute(1, &cdb, &data)
    };
    let read = || {
        let cdb = Command::Read16 {
            lba: 0,
            blocks: 1,
            fua: false,
        }
        .encode();
        e.execute(1, &cdb, &[])
    };
    let drop_all = FaultRule {
        lun: Some(1),
        op: FaultOp::Any,
        action: FaultAction::Drop,
        sense: None,
        count: None,
        rate: None,
        delay_ms: None,
    };
    assert!(matches!(set_fault(Some(&drop_all)), Outcome::Reply(_)));
    assert_eq!(read(), Outcome::Drop, "the rule drops reads");
    match set_fault(None) {
        Outcome::Reply(r) => assert_eq!(r.status, 0, "clear refused: {r:?}"),
        Outcome::Drop => panic!("the rule dropped the SET FAULT that clears it"),
    }
    assert!(
        matches!(read(), Outcome::Reply(r) if r.status == 0),
        "the LU still fails after the clear"
    );
}

/// `hvmctl verify` on a Synchronized virtual LU of an embedded stateless array: clean at
/// first; a difference planted in the mate leg's file is found with its LBA range (exit
/// status 5), `--repair` writes it again from the origin, and a verify run while fio
/// writes over NBD finds the legs identical, as do the files themselves.
#[test]
fn verify_finds_a_planted_difference_and_repairs_it() {
    let dir = tempfile::tempdir().unwrap();
    let agent = hvm_tests::agent::Agent::start(dir.path());
    agent.qemu_io("db", &["write -P 3 0 4M"]);
    let out = agent.hvmctl(&["verify", "db"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() && text.contains("db: legs identical"),
        "{text}"
    );

    // The stateless array of the quickstart: LU 1 the origin leg, LU 2 the mate.
    let mate = dir.path().join("stateless0/lu2.img");
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::OpenOptions::new().write(true).open(&mate).unwrap();
        f.seek(SeekFrom::Start(1 << 20)).unwrap();
        f.write_all(&[0xba; 4096]).unwrap();
        f.sync_all().unwrap();
    }
    let out = agent.hvmctl(&["verify", "db"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(5), "{text}");
    assert!(
        text.contains("legs differ in 8 LBAs (LBA ranges 2048-2055)"),
        "{text}"
    );
    let v = agent.json(&["verify", "db", "--repair"]);
    assert_eq!(v["repaired"], true, "{v}");
    assert_eq!(v["differing"], serde_json::json!([[2048, 2055]]), "{v}");

    let uri = agent.uri("db");
    let writer =
        std::thread::spawn(move || hvm_tests::fio_nbd(&uri, "randwrite", "4k", 4, 64 << 20, 3.0));
    let v = agent.json(&["verify", "db", "--rate", "64M"]);
    assert_eq!(v["identical"], true, "{v}");
    assert!(writer.join().unwrap() > 0.0, "fio wrote nothing");
    let origin = std::fs::read(dir.path().join("stateless0/lu1.img")).unwrap();
    assert!(
        origin == std::fs::read(&mate).unwrap(),
        "the leg files differ"
    );
}

/// `backup run --wait-resync` compares the legs after the resync instead of printing
/// "legs identical again" unchecked: a difference planted in the mate leg (outside any
/// write, so the resync does not touch it) fails the run with the virtual LU and the
/// count; after `hvmctl verify a --repair` on the database host a run reports identical.
#[test]
fn backup_run_wait_resync_reports_a_real_verify() {
    let dir = tempfile::tempdir().unwrap();
    let hosts = hvm_tests::backup::Hosts::start(
        dir.path(),
        &hvm_tests::backup::Setup {
            lu_bytes: 4 << 20,
            names: &["a"],
            freeze: "    deadline_ms: 5000\n",
        },
    );
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(hosts.lu_file(2))
            .unwrap();
        f.seek(SeekFrom::Start(1 << 20)).unwrap();
        f.write_all(&[0x5c; 4096]).unwrap();
    }
    let (out, v) = hosts.run(&["a"], "first", &["--wait-resync"]);
    assert!(!out.status.success(), "{v}");
    assert_eq!(v["error"]["step"], "verify", "{v}");
    assert_eq!(
        v["verify"]["vlus"][0]["differing"],
        serde_json::json!([[2048, 2055]]),
        "{v}"
    );
    let fixed = hosts.db.json(&["verify", "a", "--repair"]);
    assert_eq!(fixed["repaired"], true, "{fixed}");
    let (out, v) = hosts.run(&["a"], "second", &["--wait-resync"]);
    assert!(out.status.success(), "{v}");
    assert_eq!(v["verify"]["vlus"][0]["identical"], true, "{v}");
}

/// NBD over TLS on `listen.tcp`: nbdinfo (`nbds://`) and qemu-img/qemu-io (tls-creds)
/// with a client certificate read and write; a client without a certificate and a
/// plain-text client are refused; and a config with `listen.tcp` but neither `tls` nor
/// `insecure: true` does not start. Before, TCP was plain only (STARTTLS refused) and
/// such a config served every export in clear text to anyone.
#[test]
fn nbd_tls_with_client_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let tls = dir.path().join("tls");
    let out = Command::new(binary("hvmctl"))
        .args(["tls", "init"])
        .arg(&tls)
        .args(["--host", "127.0.0.1", "--host", "client"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The file names libnbd and qemu look for in a certificate directory.
    let (certs, no_cert) = (dir.path().join("client"), dir.path().join("no-cert"));
    for (d, files) in [
        (
            &certs,
            &[
                ("ca.pem", "ca-cert.pem"),
                ("client.pem", "client-cert.pem"),
                ("client-key.pem", "client-key.pem"),
            ][..],
        ),
        (&no_cert, &[("ca.pem", "ca-cert.pem")][..]),
    ] {
        std::fs::create_dir_all(d).unwrap();
        for (from, to) in files {
            std::fs::copy(tls.join(from), d.join(to)).unwrap();
        }
    }
    let quickstart =
        std::fs::read_to_string(hvm_tests::workspace().join("host-agent/examples/quickstart.yaml"))
            .unwrap();
    let with_listen = |listen: &str| {
        let text = quickstart.replace("listen:\n  unix: nbd.sock\n", listen);
        assert_ne!(text, quickstart);
        let path = dir.path().join("agent.yaml");
        std::fs::write(&path, text).unwrap();
        path
    };

    // listen.tcp without tls or insecure: refused at start, naming the field and line.
    let plain = with_listen("listen:\n  unix: nbd.sock\n  tcp: 127.0.0.1:0\n");
    let out = hvm_tests::agent::Agent::command(&plain, &dir.path().join("state"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("listen.tcp: plain TCP") && err.contains("at line"),
        "{err}"
    );

    let cfg = with_listen(&format!(
        "listen:\n  unix: nbd.sock\n  tcp: 127.0.0.1:0\n  tls: {{ cert: {t}/127.0.0.1.pem, key: {t}/127.0.0.1-key.pem, ca: {t}/ca.pem }}\n",
        t = tls.display()
    ));
    let state = dir.path().join("state");
    let (proc, line) = hvm_tests::spawn_ready(&mut hvm_tests::agent::Agent::command(&cfg, &state));
    let _agent = hvm_tests::agent::Agent { proc, state };
    let addr = line
        .trim()
        .rsplit_once("and tcp:")
        .map(|(_, a)| a.to_string())
        .unwrap_or_else(|| panic!("no tcp address in {line:?}"));
    let (host, port) = addr.rsplit_once(':').unwrap();

    let info = |certs: &Path| {
        hvm_tests::tool("nbdinfo")
            .arg(format!(
                "nbds://{addr}/db?tls-certificates={}",
                certs.display()
            ))
            .output()
            .unwrap()
    };
    let out = info(&certs);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("with TLS"), "{text}");
    assert!(text.contains("export-size: 67108864"), "{text}");
    let out = info(&no_cert);
    assert!(
        !out.status.success(),
        "a client without a certificate was served"
    );
    let out = hvm_tests::tool("nbdinfo")
        .arg(format!("nbd://{addr}/db"))
        .output()
        .unwrap();
    assert!(!out.status.success(), "a plain-text client was served");

    let creds = format!(
        "tls-creds-x509,id=tls0,dir={},endpoint=client",
        certs.display()
    );
    let image = format!("driver=nbd,host={host},port={port},export=db,tls-creds=tls0");
    let out = hvm_tests::tool("qemu-io")
        .args(["--object", &creds, "--image-opts", &image])
        .args(["-c", "write -P 0x42 1M 2M", "-c", "read -P 0x42 1M 2M"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && !text.contains("fail"), "{text}");
    let copy = dir.path().join("copy.raw");
    let out = hvm_tests::tool("qemu-img")
        .args([
            "convert",
            "--object",
            &creds,
            "--image-opts",
            &image,
            "-O",
            "raw",
        ])
        .arg(&copy)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let data = std::fs::read(&copy).unwrap();
    assert_eq!(data.len(), 64 << 20);
    assert!(data[1 << 20..3 << 20].iter().all(|b| *b == 0x42));
}

/// The array-sim daemon serves at most `MAX_CONNECTIONS` connections: the next one is
/// closed at once (before: every connection got a task and its buffers, without limit),
/// and one is served again when the others close.
#[test]
fn array_sim_caps_connections() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("array.sock");
    let (_daemon, line) = hvm_tests::spawn_ready(
        Command::new(binary("array-sim"))
            .args(["serve", "--config"])
            .arg(hvm_tests::workspace().join("array-sim/examples/fig9-stateless.yaml"))
            .arg("--listen")
            .arg(format!("unix:{}", sock.display()))
            .arg("--dir")
            .arg(dir.path().join("data")),
    );
    assert!(line.contains("listening"), "{line}");
    let cap = array_sim::server::MAX_CONNECTIONS;
    let held: Vec<_> = (0..cap)
        .map(|_| std::os::unix::net::UnixStream::connect(&sock).unwrap())
        .collect();
    let mut over = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    over.set_read_timeout(Some(std::time::Duration::from_millis(200)))
        .unwrap();
    assert!(
        closed_within(&mut over, std::time::Duration::from_secs(5)),
        "connection {} was not closed",
        cap + 1
    );
    drop(held);
    std::thread::sleep(std::time::Duration::from_millis(500));
    let params = format!("array:\n  connect: \"unix:{}\"\n", sock.display());
    let plugin = hvm_plugin_abi::host::Plugin::load(&plugin_path("stateless")).unwrap();
    use hvm_core::backend::Backend;
    plugin
        .open(&params)
        .unwrap()
        .read(hvm_core::LuId(0), 0, &mut [0u8; 512])
        .unwrap();
}
