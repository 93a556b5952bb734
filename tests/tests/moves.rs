//! Moving a virtual LU between backends while it serves (issue 17): an embedded array to
//! file legs and back under a writer that checks every acknowledged write; a snapshot
//! refused during a move; cancel; a restart after a move; SIGKILL at random moments of
//! a move (it completes or rolls back, and no acknowledged write is lost); and the
//! restart guard refusing a config that points a virtual LU at other LUs.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hvm_host_agent::nbd::client::Client;
use hvm_tests::agent::Agent;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 64 * MIB;
const BLOCK: usize = 64 << 10;

/// host-agent's config: `db` on an embedded stateless array (`array0`), and a file
/// backend (`legs0`) with a free volume of the same size.
fn config(dir: &Path, db_backend: &str) -> PathBuf {
    let blocks = SIZE / 512;
    let cfg = dir.join("agent.yaml");
    std::fs::write(
        &cfg,
        format!(
            "listen:\n  unix: nbd.sock\nbackends:\n  - name: array0\n    plugin: stateless\n    params:\n      array:\n        embedded:\n          kind: stateless\n          dir: array0\n          disks: [{{ name: d0 }}, {{ name: d1 }}]\n          lus:\n            - {{ lun: 1, blocks: {blocks}, disk: d0 }}\n            - {{ lun: 2, blocks: {blocks}, disk: d1 }}\n          mirroring:\n            - {{ mirror: 0, origin: 1, mate: 2 }}\n  - name: legs0\n    plugin: file\n    params:\n      create: true\n      volumes:\n        - {{ lu: 0, legs: [legs/a.img, legs/b.img], size: {SIZE} }}\nvirtual_lus:\n  - {{ name: db, backend: {db_backend}, lu: 0, snapshots: [db-snap] }}\n"
        ),
    )
    .unwrap();
    std::fs::create_dir_all(dir.join("state/legs")).unwrap();
    cfg
}

/// What the virtual LU must hold: every acknowledged write, and for a write that was in
/// flight when host-agent died, either its old or its new bytes.
#[derive(Clone)]
struct Model {
    data: Vec<u8>,
    in_flight: Option<(usize, Vec<u8>)>,
}

impl Model {
    fn check(&self, got: &[u8]) {
        let mut want = self.data.clone();
        if let Some((at, new)) = &self.in_flight {
            let n = new.len();
            if got[*at..at + n] == new[..] {
                want[*at..at + n].copy_from_slice(new);
            }
        }
        if let Some(i) = (0..want.len()).find(|&i| want[i] != got[i]) {
            panic!("byte {i} differs: {} expected, {} read", want[i], got[i]);
        }
    }
}

/// A writer of 64 KiB blocks at pseudo-random places, each with its own pattern, over
/// hvm's NBD client; it stops at `stop` or at the first failed write (host-agent died).
struct Writer {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<Model>,
    writes: Arc<Mutex<u64>>,
}

impl Writer {
    fn start(sock: PathBuf, model: Model, seed: u64) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let writes = Arc::new(Mutex::new(0));
        let (s, w) = (stop.clone(), writes.clone());
        let handle = std::thread::spawn(move || {
            let mut m = model;
            let mut c = Client::connect(&sock, "db").unwrap();
            let mut x = seed | 1;
            let blocks = (SIZE as usize) / BLOCK;
            while !s.load(Ordering::SeqCst) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let at = (x as usize % blocks) * BLOCK;
                let buf = vec![(x >> 32) as u8 | 1; BLOCK];
                match c.write(at as u64, &buf, false) {
                    Ok(()) => {
                        m.data[at..at + BLOCK].copy_from_slice(&buf);
                        *w.lock().unwrap() += 1;
                    }
                    Err(_) => {
                        m.in_flight = Some((at, buf));
                        break;
                    }
                }
            }
            m
        });
        Writer {
            stop,
            handle,
            writes,
        }
    }

    fn writes(&self) -> u64 {
        *self.writes.lock().unwrap()
    }

    fn finish(self) -> Model {
        self.stop.store(true, Ordering::SeqCst);
        self.handle.join().unwrap()
    }
}

fn read_all(sock: &Path) -> Vec<u8> {
    let mut c = Client::connect(sock, "db").unwrap();
    let mut out = vec![0u8; SIZE as usize];
    for (i, chunk) in out.chunks_mut(MIB as usize).enumerate() {
        c.read(i as u64 * MIB, chunk).unwrap();
    }
    out
}

fn fill(sock: &Path) -> Model {
    let mut c = Client::connect(sock, "db").unwrap();
    let mut data = vec![0u8; SIZE as usize];
    for (i, chunk) in data.chunks_mut(MIB as usize).enumerate() {
        chunk.fill(i as u8 ^ 0x5a);
        c.write(i as u64 * MIB, chunk, false).unwrap();
    }
    c.flush().unwrap();
    Model {
        data,
        in_flight: None,
    }
}

fn lu(a: &Agent) -> serde_json::Value {
    let all = a.json(&["lu", "list"]);
    all.as_array()
        .unwrap()
        .iter()
        .find(|l| l["name"] == "db")
        .unwrap()
        .clone()
}

fn wait_moving(a: &Agent) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while lu(a)["move"]["copied_bytes"].as_u64().unwrap_or(0) == 0 {
        assert!(Instant::now() < deadline, "the move never started copying");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn file_legs_identical(state: &Path) {
    let (a, b) = (state.join("legs/a.img"), state.join("legs/b.img"));
    assert!(
        std::fs::read(a).unwrap() == std::fs::read(b).unwrap(),
        "the file legs differ"
    );
}

#[test]
fn a_virtual_lu_moves_to_file_legs_and_back_under_a_writer() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let state = d.join("state");
    let cfg = config(d, "array0");
    let a = Agent::start_config(&cfg, &state);
    let sock = state.join("nbd.sock");
    let model = fill(&sock);
    let w = Writer::start(sock.clone(), model, 7);

    // A throttled move: a snapshot is refused meanwhile, and the rate can change.
    let out = a.json(&["lu", "move", "db", "--to", "legs0", "--rate", "16M"]);
    assert_eq!(out["phase"], "copying", "{out}");
    wait_moving(&a);
    let e = a.refused(&["snapshot", "acquire", "db"]);
    assert!(e.contains("db is moving to legs0:0"), "{e}");
    let table = String::from_utf8(a.hvmctl(&["lu", "list"]).stdout).unwrap();
    assert!(
        table.contains("MOVING ") && table.contains("% to legs0:0"),
        "{table}"
    );
    a.json(&["lu", "move", "db", "--to", "legs0", "--rate", "0"]);
    let done = a.json(&["lu", "move", "db", "--to", "legs0", "--wait"]);
    assert_eq!(done["phase"], "done", "{done}");
    assert_eq!(lu(&a)["placement"], "legs0:0");
    assert!(w.writes() > 0);
    let model = w.finish();
    model.check(&read_all(&sock));

    // The placement survives a restart; the data is served from the file legs.
    a.signal(nix::sys::signal::Signal::SIGTERM);
    let mut proc = a.proc;
    assert!(proc.0.wait().unwrap().success());
    let a = Agent::start_config(&cfg, &state);
    assert_eq!(lu(&a)["placement"], "legs0:0");
    model.check(&read_all(&sock));
    file_legs_identical(&state);
    // A snapshot and its resync on the moved virtual LU work on its new legs.
    let mut model = model;
    a.json(&["snapshot", "acquire", "db"]);
    let mut c = Client::connect(&sock, "db").unwrap();
    let block = vec![0x77u8; BLOCK];
    c.write(3 * BLOCK as u64, &block, false).unwrap();
    model.data[3 * BLOCK..4 * BLOCK].copy_from_slice(&block);
    drop(c);
    let out = a.hvmctl(&["snapshot", "delete", "db", "--wait"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    file_legs_identical(&state);

    // Cancel leaves it where it is; then back home, under a writer again.
    let w = Writer::start(sock.clone(), model, 11);
    a.json(&["lu", "move", "db", "--to", "array0", "--rate", "8M"]);
    wait_moving(&a);
    assert_eq!(
        a.json(&["lu", "move", "db", "--cancel"])["phase"],
        "cancelled"
    );
    assert!(lu(&a)["placement"] == "legs0:0", "{}", lu(&a));
    let e = a.hvmctl(&["lu", "move", "db", "--to", "array0", "--wait"]);
    assert!(e.status.success(), "{}", String::from_utf8_lossy(&e.stderr));
    assert!(lu(&a)["placement"].is_null(), "{}", lu(&a));
    let model = w.finish();
    model.check(&read_all(&sock));
    a.json(&["snapshot", "acquire", "db"]);
}

#[test]
fn moves_refuse_what_they_cannot_do() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let a = Agent::start_config(&config(d, "array0"), &d.join("state"));
    let e = a.refused(&["lu", "move", "db", "--to", "nowhere"]);
    assert!(e.contains("no backend named \"nowhere\""), "{e}");
    let e = a.refused(&["lu", "move", "db-snap", "--to", "legs0"]);
    assert!(e.contains("db-snap is the snapshot of db"), "{e}");
    let e = a.refused(&["lu", "move", "db", "--to", "array0"]);
    assert!(
        e.contains("no free mirroring definition") && e.contains("its data is on array0:0"),
        "{e}"
    );
    a.json(&["snapshot", "acquire", "db"]);
    let e = a.refused(&["lu", "move", "db", "--to", "legs0"]);
    assert!(e.contains("needs the virtual LU Synchronized"), "{e}");
    let e = a.refused(&["lu", "move", "db", "--cancel"]);
    assert!(e.contains("no move of db is under way"), "{e}");
}

#[test]
fn a_config_pointing_a_virtual_lu_at_other_lus_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let state = d.join("state");
    let a = Agent::start_config(&config(d, "array0"), &state);
    a.qemu_io("db", &["write -P 0x42 0 1M"]);
    a.signal(nix::sys::signal::Signal::SIGTERM);
    let mut proc = a.proc;
    assert!(proc.0.wait().unwrap().success());
    // The config edited by hand to put db on the file legs: refused, nothing served.
    let err = Agent::refused_at_start(&config(d, "legs0"), &state);
    assert!(
        err.contains("virtual LU db: its data was written to [")
            && err.contains("but the config now puts it on [file dev "),
        "{err}"
    );
    let said: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("host-agent:"))
        .collect();
    assert_eq!(said.len(), 1, "one line: {err}");
    // Put back, it serves the data again.
    let a = Agent::start_config(&config(d, "array0"), &state);
    a.qemu_io("db", &["read -P 0x42 0 1M"]);
}

/// SIGKILL at a random moment of a move, under a writer: after the restart the move has
/// completed or rolled back, and every acknowledged write reads back.
#[test]
fn sigkill_during_moves_loses_no_acknowledged_write() {
    let rounds: u64 = std::env::var("HVM_MOVE_CRASH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let seed: u64 = std::env::var("HVM_MOVE_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    println!("HVM_MOVE_CRASH_SEED={seed}");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let state = d.join("state");
    let cfg = config(d, "array0");
    let a = Agent::start_config(&cfg, &state);
    let sock = state.join("nbd.sock");
    let mut model = fill(&sock);
    let mut a = Some(a);
    let (mut completed, mut rolled_back) = (0, 0);
    for round in 0..rounds {
        let agent = a.take().unwrap();
        let to = if lu(&agent)["placement"].is_null() {
            "legs0"
        } else {
            "array0"
        };
        let w = Writer::start(sock.clone(), model.clone(), seed ^ round);
        agent.json(&["lu", "move", "db", "--to", to, "--rate", "32M"]);
        // 64 MiB at 32 MiB/s: about 2 s; kill somewhere in 0..2.4 s.
        let mut x = seed ^ (round + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        x ^= x >> 31;
        x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x ^= x >> 29;
        let at = x % 2400;
        std::thread::sleep(Duration::from_millis(at));
        agent.signal(nix::sys::signal::Signal::SIGKILL);
        let mut proc = agent.proc;
        let _ = proc.0.wait();
        model = w.finish();
        let agent = Agent::start_config(&cfg, &state);
        let l = lu(&agent);
        assert!(
            l["move"].is_null(),
            "round {round}: a move after restart: {l}"
        );
        let moved = if to == "legs0" {
            l["placement"] == "legs0:0"
        } else {
            l["placement"].is_null()
        };
        if moved {
            completed += 1;
        } else {
            rolled_back += 1;
        }
        model.check(&read_all(&sock));
        // Everything read back as it is now is the model from here on.
        model = Model {
            data: read_all(&sock),
            in_flight: None,
        };
        println!(
            "round {round}: kill at {at} ms moving to {to}: {}",
            if moved { "completed" } else { "rolled back" }
        );
        a = Some(agent);
    }
    println!("{completed} completed, {rolled_back} rolled back");
    let agent = a.take().unwrap();
    if lu(&agent)["placement"].is_null() {
        agent.json(&["lu", "move", "db", "--to", "legs0", "--wait"]);
    }
    model.check(&read_all(&sock));
    agent.signal(nix::sys::signal::Signal::SIGTERM);
    let mut proc = agent.proc;
    assert!(proc.0.wait().unwrap().success());
    file_legs_identical(&state);
}

/// An nbdkit `file` export on a Unix socket, stopped (by PID) when dropped.
fn nbdkit_file(dir: &Path, name: &str, size: u64) -> (hvm_tests::Running, PathBuf) {
    let img = dir.join(format!("{name}.img"));
    std::fs::File::create(&img).unwrap().set_len(size).unwrap();
    let sock = dir.join(format!("{name}.sock"));
    let child = hvm_tests::tool("nbdkit")
        .args(["-f", "--unix"])
        .arg(&sock)
        .arg("file")
        .arg(&img)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !sock.exists() {
        assert!(Instant::now() < deadline, "nbdkit did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    (hvm_tests::Running(child), sock)
}

/// PostgreSQL on a virtual LU with pgbench running throughout while the virtual LU moves
/// from an embedded array to file legs, to NBD legs (two nbdkit servers), and back: no
/// pgbench error, pgbench's invariants hold, pg_amcheck finds no corruption, and the
/// final place's legs are identical.
#[test]
fn postgresql_keeps_running_while_its_volume_moves_across_three_backends() {
    use hvm_tests::backup::Storage;
    use hvm_tests::pg::{Bench, Deployment};
    const LU: u64 = 512 * MIB;
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path();
    let (_ka, a_sock) = nbdkit_file(work, "nbd-a", LU);
    let (_kb, b_sock) = nbdkit_file(work, "nbd-b", LU);
    let blocks = LU / 512;
    let legs = work.join("legs");
    std::fs::create_dir_all(&legs).unwrap();
    let backends = format!(
        "  - name: array0\n    plugin: stateless\n    params:\n      array:\n        embedded:\n          kind: stateless\n          dir: array0\n          disks: [{{ name: d0 }}, {{ name: d1 }}]\n          lus:\n            - {{ lun: 1, blocks: {blocks}, disk: d0 }}\n            - {{ lun: 2, blocks: {blocks}, disk: d1 }}\n          mirroring:\n            - {{ mirror: 0, origin: 1, mate: 2 }}\n  - name: legs0\n    plugin: file\n    params:\n      create: true\n      volumes:\n        - {{ lu: 0, legs: [{}, {}], size: {LU} }}\n  - name: nbd0\n    plugin: nbd\n    params:\n      volumes:\n        - {{ lu: 0, legs: [\"nbd+unix:///?socket={}\", \"nbd+unix:///?socket={}\"] }}\n",
        legs.join("a.img").display(),
        legs.join("b.img").display(),
        a_sock.display(),
        b_sock.display()
    );
    let d = Deployment::start_on(work, LU, 5, 20_000, Storage::Backend(&backends));
    let mut live = d.cluster;
    let bench = Bench::start(&live, 4, 45);
    std::thread::sleep(Duration::from_secs(3));
    for to in ["legs0", "nbd0", "array0"] {
        let out = d
            .hosts
            .db
            .hvmctl(&["lu", "move", "pg", "--to", to, "--wait"]);
        assert!(
            out.status.success(),
            "move to {to}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let l = d.hosts.db.json(&["lu", "list"]);
        let pg = l
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["name"] == "pg")
            .unwrap();
        println!("moved to {to}: {}", pg["move"]);
        assert_eq!(pg["move"]["phase"], "done", "{pg}");
    }
    let (text, tps) = bench.finish();
    println!("pgbench while moving: {tps} tps\n{text}");
    let (sum, rows) = live.pgbench_invariants();
    println!("invariants hold: sum {sum}, {rows} history rows");
    println!("{}", live.amcheck());
    live.stop();
    drop(d.fs);
    let state = d.hosts.db.state.clone();
    assert!(
        std::fs::read(state.join("array0/lu1.img")).unwrap()
            == std::fs::read(state.join("array0/lu2.img")).unwrap(),
        "the array's legs differ after the moves"
    );
}
