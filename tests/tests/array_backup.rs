//! EP 1 058 190's array-side backup driven end to end as an administrator does it: hvmctl
//! against host-agent, whose mode-select plugin drives an array-sim daemon
//! (`array-sim/examples/ep1058190-backup.yaml`). Another host writes to the user volume
//! over its own connection to the array (as over a SAN) throughout.
//!
//! Each backup is restored from its medium with `hvmctl device restore` and compared
//! with the frozen secondary; the array's counters show the data reached the device
//! without any host reading it.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use array_sim::client::{ArrayClient, SocketClient};
use hvm_core::{Backend, LuId};
use hvm_tests::agent::Agent;
use hvm_tests::{binary, spawn_ready, workspace, Running};
use serde_json::Value;

const BLOCKS: u64 = 32768; // LUs 10, 11, 12, 20, 21 of the example: 16 MiB each
const BS: usize = 512;

struct Setup {
    dir: tempfile::TempDir,
    data: std::path::PathBuf,
    _array: Running,
    sock: std::path::PathBuf,
    agent: Agent,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("array");
    let sock = dir.path().join("array.sock");
    let (array, line) = spawn_ready(
        Command::new(binary("array-sim"))
            .args(["serve", "--config"])
            .arg(workspace().join("array-sim/examples/ep1058190-backup.yaml"))
            .arg("--listen")
            .arg(format!("unix:{}", sock.display()))
            .arg("--dir")
            .arg(&data),
    );
    assert!(line.contains("listening"), "{line}");
    // The example's config with this run's socket.
    let example =
        std::fs::read_to_string(workspace().join("host-agent/examples/array-backup.yaml")).unwrap();
    let cfg = dir.path().join("agent.yaml");
    std::fs::write(
        &cfg,
        example.replace("/tmp/hvm-array/array.sock", &sock.display().to_string()),
    )
    .unwrap();
    let agent = Agent::start_config(&cfg, &dir.path().join("state"));
    Setup {
        dir,
        data,
        _array: array,
        sock,
        agent,
    }
}

fn client(sock: &Path) -> ArrayClient<SocketClient> {
    let addr = format!("unix:{}", sock.display()).parse().unwrap();
    ArrayClient::new(SocketClient::connect(&addr).unwrap())
}

/// hvmctl that must fail with exit status `code`; returns its message.
fn fails(a: &Agent, args: &[&str], code: i32) -> String {
    let out = a.hvmctl(args);
    let msg = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(code), "hvmctl {args:?}: {msg}");
    msg
}

fn read_lu(c: &ArrayClient<SocketClient>, lu: u32, blocks: u64) -> Vec<u8> {
    let mut buf = vec![0u8; blocks as usize * BS];
    for (i, chunk) in buf.chunks_mut(256 * BS).enumerate() {
        c.read(LuId(lu), i as u64 * 256, chunk).unwrap();
    }
    buf
}

/// Another host writing 4 KiB stamps over the user volume until stopped.
struct Writer {
    stop: Arc<AtomicBool>,
    writes: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Writer {
    fn start(sock: &Path, lu: u32) -> Writer {
        let c = client(sock);
        let stop = Arc::new(AtomicBool::new(false));
        let writes = Arc::new(AtomicU64::new(0));
        let (s, w) = (stop.clone(), writes.clone());
        let thread = std::thread::spawn(move || {
            let mut x = 0x9e37_79b9_7f4a_7c15u64;
            while !s.load(Ordering::Relaxed) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let lba = (x % (BLOCKS / 8)) * 8;
                let n = w.fetch_add(1, Ordering::Relaxed) + 1;
                let mut data = vec![0u8; 8 * BS];
                for (i, b) in data.iter_mut().enumerate() {
                    *b = (n as u8).wrapping_add(i as u8);
                }
                c.write(LuId(lu), lba, &data, false).unwrap();
            }
        });
        Writer {
            stop,
            writes,
            thread: Some(thread),
        }
    }

    fn wait_for(&self, n: u64) {
        let start = self.writes.load(Ordering::Relaxed);
        while self.writes.load(Ordering::Relaxed) < start + n {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    fn stop(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap();
        self.writes.load(Ordering::Relaxed)
    }
}

/// `hvmctl device restore` of the array's medium file `medium` into a new file; its
/// report and the restored bytes.
fn restore(s: &Setup, medium: &str) -> (Value, Vec<u8>) {
    let to = s.dir.path().join(format!("{medium}.restored"));
    let _ = std::fs::remove_file(&to);
    let r = s.agent.json(&[
        "device",
        "restore",
        s.data.join(medium).to_str().unwrap(),
        "--to",
        to.to_str().unwrap(),
    ]);
    (r, std::fs::read(&to).unwrap())
}

fn counters(a: &Agent) -> Value {
    a.json(&["array", "counters"])
}

fn delta(before: &Value, after: &Value, k: &str) -> u64 {
    after[k].as_u64().unwrap() - before[k].as_u64().unwrap()
}

#[test]
fn pair_split_ccopy_restore_resync_through_hvmctl() {
    let s = setup();
    let a = &s.agent;
    let arr = client(&s.sock);
    // The backend says what it offers; hvmctl finds it without --backend.
    let b = a.json(&["backends"]);
    assert_eq!(b["backends"][0]["backup"]["ccopy"], true, "{b}");

    // Data on the user volume before the pair exists.
    let writer = Writer::start(&s.sock, 10);
    writer.wait_for(200);

    // Step 40: form the pair; --wait returns once the initial copy is done.
    let p = a.json(&["pair", "create", "10", "11", "--wait"]);
    assert_eq!(p["state"], "duplex", "{p}");
    assert_eq!(p["secondary"], 11);

    // Fig. 5: split the first half only, while the writer goes on.
    writer.wait_for(100);
    let p = a.json(&["pair", "split", "10", "--area", "0+16384"]);
    assert_eq!(p["state"], "split", "{p}");
    assert_eq!(p["split_areas"][0]["blocks"], 16384, "{p}");
    let frozen = read_lu(&arr, 11, 16384);
    writer.wait_for(200);
    // The split area of the secondary stays as it was while the user volume changes.
    assert_eq!(read_lu(&arr, 11, 16384), frozen);
    assert_ne!(
        read_lu(&arr, 10, 16384),
        frozen,
        "the writer changed nothing"
    );

    // [0029]-[0030]: copy the split area to tape0 inside the array. A range outside the
    // split area, and a volume that is not a split secondary, are refused.
    let m = fails(
        a,
        &[
            "backup", "ccopy", "11", "--device", "tape0", "--range", "20000+8",
        ],
        1,
    );
    assert!(m.contains("split"), "{m}");
    let m = fails(
        a,
        &[
            "backup", "ccopy", "10", "--device", "tape0", "--range", "0+8",
        ],
        1,
    );
    assert!(m.contains("secondary"), "{m}");
    let before = counters(a);
    let j = a.json(&[
        "backup", "ccopy", "11", "--device", "tape0", "--range", "0+16384", "--wait",
    ]);
    assert_eq!(j["state"], "done", "{j}");
    assert_eq!(j["done_blocks"], 16384, "{j}");
    let after = counters(a);
    // The data went from the secondary to the device; no host read a byte of it.
    assert_eq!(delta(&before, &after, "device_bytes"), 16384 * BS as u64);
    assert_eq!(delta(&before, &after, "host_read_bytes"), 0);
    let job = a.json(&["backup", "job", &j["id"].to_string()]);
    assert_eq!(job["state"], "done");

    // The medium restores to exactly the frozen image.
    let (r, restored) = restore(&s, "tape0.rec");
    assert_eq!(r["blocks"], 16384, "{r}");
    assert!(restored == frozen);

    // pairevtwait's timeout: exit status 4.
    let m = fails(
        a,
        &["pair", "wait", "10", "--state", "duplex", "--timeout", "1"],
        4,
    );
    assert!(m.contains("split"), "{m}");

    // [0031]: resync copies only what the difference bitmap marks; then duplex.
    let p = a.json(&["pair", "resync", "10", "--wait"]);
    assert_eq!(p["state"], "duplex", "{p}");
    let writes = writer.stop();
    assert!(writes > 500);
    // Duplex: every write reached both volumes.
    assert!(read_lu(&arr, 10, BLOCKS) == read_lu(&arr, 11, BLOCKS));
    let st = a.json(&["pair", "status", "11"]);
    assert_eq!(st["primary"], 10, "{st}");

    a.json(&["pair", "delete", "10"]);
    let m = fails(a, &["pair", "status", "10"], 1);
    assert!(m.contains("pair"), "{m}");
}

#[test]
fn auto_and_cow_backups_through_hvmctl() {
    let s = setup();
    let a = &s.agent;
    let arr = client(&s.sock);
    let writer = Writer::start(&s.sock, 10);
    writer.wait_for(100);

    // AUTO on an unpaired volume is an error ([0040]).
    let m = fails(a, &["backup", "auto", "10", "--device", "tape0"], 1);
    assert!(m.contains("pair"), "{m}");

    // [0037]-[0040]: one command splits, copies the whole secondary and resyncs. The
    // writer stops first, so the medium must hold the user volume as it is.
    a.json(&["pair", "create", "10", "11", "--wait"]);
    writer.stop();
    let before = counters(a);
    let j = a.json(&["backup", "auto", "10", "--device", "tape0", "--wait"]);
    assert_eq!(j["state"], "done", "{j}");
    assert_eq!(j["done_blocks"], BLOCKS, "{j}");
    let after = counters(a);
    assert_eq!(delta(&before, &after, "device_bytes"), BLOCKS * BS as u64);
    assert_eq!(delta(&before, &after, "host_read_bytes"), 0);
    let p = a.json(&["pair", "wait", "10", "--state", "duplex", "--timeout", "60"]);
    assert_eq!(p["state"], "duplex");
    let (r, restored) = restore(&s, "tape0.rec");
    assert_eq!(r["blocks"], BLOCKS, "{r}");
    assert!(restored == read_lu(&arr, 10, BLOCKS));
    a.json(&["pair", "delete", "10"]);

    // [0103]: LU 21 joins the pool; LU 20 is already a working volume. A working volume
    // is not for hosts ([0123]).
    let v = a.json(&["volume", "attribute", "21", "work"]);
    assert_eq!(v["attribute"], "work");
    let mut buf = vec![0u8; BS];
    assert!(arr.read(LuId(20), 0, &mut buf).is_err());

    // [0062]-[0097]: a COW backup of the live user volume; the writer's writes to blocks
    // not yet copied save the old data first.
    let writer = Writer::start(&s.sock, 10);
    writer.wait_for(50);
    let before = counters(a);
    let j = a.json(&["backup", "cow", "10", "--device", "tape1", "--wait"]);
    assert_eq!(j["state"], "done", "{j}");
    assert!(j["working_volume"].is_u64(), "{j}");
    let after = counters(a);
    assert_eq!(delta(&before, &after, "host_read_bytes"), 0);
    assert_eq!(delta(&before, &after, "device_bytes"), BLOCKS * BS as u64);
    writer.stop();

    let d = a.json(&["device", "list"]);
    assert_eq!(d.as_array().unwrap().len(), 2, "{d}");
    assert!(
        d.as_array().unwrap().iter().all(|x| x["busy"] == false),
        "{d}"
    );

    // The attribute of a volume under copying cannot change; after, it can.
    let v = a.json(&["volume", "attribute", "21", "user"]);
    assert_eq!(v["attribute"], "user");
}

/// An unknown backend, and a backend whose array has no backup functions, are refused
/// with the reason.
#[test]
fn refusals_say_why() {
    let s = setup();
    let a = &s.agent;
    let m = fails(a, &["pair", "status", "10", "--backend", "nope"], 1);
    assert!(m.contains("no backend named"), "{m}");
    let m = fails(a, &["pair", "split", "10", "--area", "5"], 2);
    assert!(m.contains("START+BLOCKS"), "{m}");
    let m = fails(a, &["pair", "create", "10", "1"], 1);
    assert!(m.contains("plain LU"), "{m}");

    // The quickstart's arrays have no `backup` section.
    let dir = tempfile::tempdir().unwrap();
    let q = Agent::start(dir.path());
    let m = fails(&q, &["pair", "status", "1"], 1);
    assert!(m.contains("no backend offers"), "{m}");
    let m = fails(&q, &["pair", "status", "1", "--backend", "stateless0"], 1);
    assert!(m.contains("no array-side backup"), "{m}");
}
