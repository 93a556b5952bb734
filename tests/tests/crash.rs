//! Crash test of host-agent's durable tables: SIGKILL at random moments while fio writes
//! with verification, in Snapshot mode and during resync, rounds over all three array
//! kinds. After each restart:
//! - every range fio saw acknowledged is still recorded (Snapshot rounds);
//! - every write fio saw acknowledged reads back (fio replays exactly the acknowledged
//!   writes from its own completion log, with `verify=pattern`);
//! - the snapshot is deleted, resync finishes, and the two legs are byte-identical
//!   (compared as files of the embedded array);
//! - resync copied only the tracked ranges: the bytes copied are reported against the
//!   LU's size.
//!
//! `HVM_CRASH_SEED=N` repeats a run; `HVM_CRASH_ROUNDS=N` changes the number of rounds.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hvm_tests::agent::Agent;
use hvm_tests::tool;
use nix::sys::signal::Signal;

/// Bytes per LU (32 MiB).
const LU_BYTES: u64 = 32 << 20;
/// fio writes an 8 MiB window per round, so what a round dirties is a part of the LU.
const WINDOW: u64 = 8 << 20;

fn config(dir: &Path) -> PathBuf {
    // hvmctl demo's arrays, with 1 MiB activity regions so a crash's tracked ranges
    // stay close to what was written.
    let text = hvm_host_agent::demo::config(LU_BYTES >> 20, &hvm_tests::target_dir())
        + "journal: { durable: true, region_kib: 1024 }\n";
    let path = dir.join("crash.yaml");
    std::fs::write(&path, text).unwrap();
    path
}

/// A virtual LU of the test and the files of its two legs in the state directory.
struct Target {
    vlu: &'static str,
    legs: [&'static str; 2],
}

const TARGETS: [Target; 3] = [
    Target {
        vlu: "db",
        legs: ["stateless0/lu1.img", "stateless0/lu2.img"],
    },
    Target {
        vlu: "logs",
        legs: ["modeselect0/lu1.img", "modeselect0/lu4.img"],
    },
    Target {
        vlu: "files",
        legs: ["preupdate0/lu0.img", "preupdate0/lu1.img"],
    },
];

/// xorshift64*: enough randomness for kill moments, reproducible from the seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.next() % (hi - lo))
    }
}

/// An export mounted as a file by nbdfuse, unmounted (lazily, as a dead server leaves
/// it) when dropped.
struct Fuse {
    dir: PathBuf,
    child: Child,
}

impl Fuse {
    fn mount(dir: &Path, uri: &str) -> Fuse {
        std::fs::create_dir_all(dir).unwrap();
        let child = tool("nbdfuse")
            .arg(dir)
            .arg(uri)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let file = dir.join("nbd");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0) != LU_BYTES {
            assert!(Instant::now() < deadline, "nbdfuse never mounted {uri}");
            std::thread::sleep(Duration::from_millis(20));
        }
        Fuse {
            dir: dir.to_path_buf(),
            child,
        }
    }

    fn file(&self) -> PathBuf {
        self.dir.join("nbd")
    }
}

impl Drop for Fuse {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// fio's verify pattern for a round: a round's marker and the block's offset.
fn pattern(round: u32) -> String {
    format!("\"hvm-crash-{round:03}\"%o")
}

fn fio_write(file: &Path, offset: u64, round: u32, out: &Path) -> Child {
    tool("fio")
        .current_dir(out)
        .args([
            "--name=w",
            "--ioengine=libaio",
            "--direct=1",
            "--iodepth=16",
            "--rw=randwrite",
            "--bs=4k",
            "--rate_iops=1000",
            "--verify=pattern",
            "--do_verify=0",
            "--write_lat_log=acked",
            "--log_avg_msec=0",
            "--log_offset=1",
        ])
        .arg(format!("--filename={}", file.display()))
        .arg(format!("--offset={offset}"))
        .arg(format!("--size={WINDOW}"))
        .arg(format!("--verify_pattern={}", pattern(round)))
        .arg("--output=fio.txt")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// Whether a 4 KiB block of the fio window at `offset` of the leg file `leg` starts with
/// `marker` (fio's pattern starts every block it writes).
fn window_has(leg: &Path, offset: u64, marker: &str) -> bool {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(leg).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    let mut buf = vec![0; WINDOW as usize];
    f.read_exact(&mut buf).unwrap();
    buf.chunks(4096).any(|b| b.starts_with(marker.as_bytes()))
}

/// The offsets of the writes fio saw complete, from its completion-latency log (a write
/// that failed is not logged).
fn acked(out: &Path) -> Vec<u64> {
    let log = std::fs::read_to_string(out.join("acked_clat.1.log")).unwrap_or_default();
    log.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(',').map(str::trim).collect();
            (f.len() >= 5 && f[2] == "1").then(|| f[4].parse().unwrap())
        })
        .collect()
}

/// fio reads back exactly the acknowledged writes and checks the round's pattern.
fn fio_verify(file: &Path, offsets: &[u64], round: u32, out: &Path) {
    let f = file.display();
    let mut log = format!("fio version 2 iolog\n{f} add\n{f} open\n");
    for o in offsets {
        log.push_str(&format!("{f} read {o} 4096\n"));
    }
    log.push_str(&format!("{f} close\n"));
    let iolog = out.join("acked.iolog");
    std::fs::write(&iolog, log).unwrap();
    let o = tool("fio")
        .current_dir(out)
        .args([
            "--name=v",
            "--ioengine=psync",
            "--direct=1",
            "--rw=read",
            "--bs=4k",
            "--verify=pattern",
        ])
        .arg(format!("--read_iolog={}", iolog.display()))
        .arg(format!("--verify_pattern={}", pattern(round)))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success() && text.contains("err= 0"),
        "round {round}: an acknowledged write is missing or wrong:\n{text}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let issued = format!("total={},0,0,0", offsets.len());
    assert!(
        text.contains(&issued),
        "round {round}: fio did not read every acknowledged write:\n{text}"
    );
}

fn wait_exit(child: &mut Child, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{what} did not exit after the agent was killed");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wait_mode(a: &Agent, vlu: &str, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while a.mode(vlu) != want {
        assert!(Instant::now() < deadline, "{vlu} never became {want}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Recorded LBA ranges of `vlu`'s pair.
fn recorded(a: &Agent, vlu: &str) -> (u64, Vec<(u64, u64)>) {
    let e = a.json(&["extents", vlu]);
    let ranges = e["ranges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r[0].as_u64().unwrap(), r[1].as_u64().unwrap()))
        .collect();
    (e["total_lbas"].as_u64().unwrap(), ranges)
}

fn copied_lbas(a: &Agent, vlu: &str) -> u64 {
    let r = a.json(&["resync", "status"]);
    r["pairs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == vlu)
        .map(|p| p["copied_lbas"].as_u64().unwrap())
        .unwrap()
}

#[test]
fn sigkill_during_writes_and_resync_loses_nothing() {
    let seed = std::env::var("HVM_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    let rounds: u32 = std::env::var("HVM_CRASH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(24);
    println!("crash test: seed {seed} (HVM_CRASH_SEED={seed} repeats it), {rounds} rounds");
    let mut rng = Rng(seed);
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let cfg = config(dir.path());
    let mut agent = Some(Agent::start_config(&cfg, &state));
    let mut mid_resync = 0;
    println!(
        "{:>5}  {:<6} {:<9} {:>6}  {:>13}  {:>12}  {:>10}",
        "round", "vlu", "killed in", "acked", "tracked after", "resync copied", "LU size"
    );
    for round in 0..rounds {
        let a = agent.take().unwrap();
        let t = &TARGETS[round as usize % 3];
        let in_resync = (round / 3) % 2 == 1;
        let uri = format!(
            "nbd+unix:///{}?socket={}",
            t.vlu,
            state.join("nbd.sock").display()
        );
        let out = dir.path().join(format!("round{round}"));
        std::fs::create_dir_all(&out).unwrap();
        let offset = (u64::from(round) * (3 << 20)) % (LU_BYTES - WINDOW);

        assert_eq!(a.mode(t.vlu), "Synchronized", "round {round}");
        a.json(&["snapshot", "acquire", t.vlu]);
        let fuse = Fuse::mount(&out.join("mnt"), &uri);
        let mut fio = fio_write(&fuse.file(), offset, round, &out);
        // The random moment is counted from fio's first recorded write, so a slow start
        // (a debug build, a busy machine) cannot leave a round with nothing written.
        // Recording comes before the write is issued, and the first write to each region
        // waits for its journal record to be synced, so a write is known to have reached
        // the array only when the round's pattern is in the leg's file.
        let deadline = Instant::now() + Duration::from_secs(60);
        let marker = format!("hvm-crash-{round:03}");
        while recorded(&a, t.vlu).0 == 0 || !window_has(&state.join(t.legs[0]), offset, &marker) {
            assert!(
                Instant::now() < deadline,
                "round {round}: no write of fio reached the array in 60 s"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let phase = if in_resync {
            std::thread::sleep(rng.millis(200, 700));
            a.json(&["resync", "rate", "1M"]);
            a.json(&["snapshot", "delete", t.vlu]);
            std::thread::sleep(rng.millis(50, 500));
            let m = a.mode(t.vlu);
            if m == "Re-synchronizing" {
                mid_resync += 1;
            }
            m
        } else {
            std::thread::sleep(rng.millis(100, 1400));
            "Snapshot".to_string()
        };
        a.signal(Signal::SIGKILL);
        drop(a);
        wait_exit(&mut fio, "fio");
        drop(fuse);
        let offsets = acked(&out);
        assert!(
            !offsets.is_empty(),
            "round {round}: fio completed no write before the kill; its output:\n{}",
            std::fs::read_to_string(out.join("fio.txt")).unwrap_or_default()
        );

        let a = Agent::start_config(&cfg, &state);
        let (tracked, ranges) = recorded(&a, t.vlu);
        if phase == "Snapshot" {
            assert_eq!(a.mode(t.vlu), "Snapshot", "round {round}");
            // Every acknowledged write is still recorded: no changed range was lost.
            for o in &offsets {
                let (first, last) = (o / 512, (o + 4095) / 512);
                assert!(
                    ranges.iter().any(|&(f, l)| f <= first && last <= l),
                    "round {round}: write at {o} acknowledged but not recorded after the crash"
                );
            }
        }
        let fuse = Fuse::mount(&out.join("mnt"), &uri);
        fio_verify(&fuse.file(), &offsets, round, &out);
        drop(fuse);

        if a.mode(t.vlu) == "Snapshot" {
            a.json(&["snapshot", "delete", t.vlu]);
        }
        wait_mode(&a, t.vlu, "Synchronized");
        let copied = copied_lbas(&a, t.vlu) * 512;
        // In Snapshot rounds nothing ran between the restart and the count; a resync
        // round's resync goes on at once, so its count is only reported.
        assert!(
            phase != "Snapshot" || copied <= tracked * 512,
            "round {round}: resync copied {copied} bytes, more than the {} tracked",
            tracked * 512
        );
        let legs: Vec<Vec<u8>> = t
            .legs
            .iter()
            .map(|l| std::fs::read(state.join(l)).unwrap())
            .collect();
        assert_eq!(legs[0].len() as u64, LU_BYTES);
        assert!(
            legs[0] == legs[1],
            "round {round}: the legs of {} differ after resync",
            t.vlu
        );
        println!(
            "{round:>5}  {:<6} {:<9} {:>6}  {:>9} KiB  {:>8} KiB  {:>6} KiB",
            t.vlu,
            if phase == "Snapshot" {
                "Snapshot"
            } else if phase == "Re-synchronizing" {
                "resync"
            } else {
                "after resync"
            },
            offsets.len(),
            tracked / 2,
            copied >> 10,
            LU_BYTES >> 10
        );
        std::fs::remove_dir_all(&out).unwrap();
        agent = Some(a);
    }
    println!("killed mid-resync in {mid_resync} of the resync rounds");
    assert!(
        rounds < 6 || mid_resync > 0,
        "no kill landed during a resync: the test did not test that case"
    );
}
