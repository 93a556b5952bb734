//! Changed-block tracking across backups (issue 19), on the database host: writes over
//! NBD, the coordination `snapshot` with a backup id, `complete` and `abort`, and SIGKILLs
//! of host-agent between backups.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hvm_host_agent::coord::{tls, tracking, Code, Consistency, Op, Peer, TrackingBases};
use hvm_tests::agent::Agent;
use hvm_tests::backup::{Hosts, Setup};
use hvm_tests::spawn_ready;
use serde_json::Value;

const LU: u64 = 16 << 20;
const BLOCK: u64 = 4096;
/// The database host's journal activity region in this test: after a crash the record
/// may cover the whole regions written since the last cut, never less.
const REGION: u64 = 64 << 10;

/// A database host with the journal's regions at [`REGION`], and a console's view of it.
struct Db {
    hosts: Hosts,
    peer: Peer,
}

fn coordination_address(line: &str) -> String {
    line.rsplit_once("coordination on tls:")
        .map(|(_, a)| a.trim().to_string())
        .unwrap_or_else(|| panic!("no coordination address in {line:?}"))
}

impl Db {
    fn start(dir: &Path) -> Db {
        let hosts = Hosts::start(
            dir,
            &Setup {
                lu_bytes: LU,
                names: &["a"],
                freeze: "    hooks: []\n",
            },
        );
        let cfg = dir.join("db.yaml");
        let text = std::fs::read_to_string(&cfg).unwrap();
        std::fs::write(
            &cfg,
            format!("journal: {{ region_kib: {} }}\n{text}", REGION >> 10),
        )
        .unwrap();
        let tls_cfg = tls::client_config(
            &hosts.tls.join("ca.pem"),
            Some((
                &hosts.tls.join("console.pem"),
                &hosts.tls.join("console-key.pem"),
            )),
        )
        .unwrap();
        let peer = Peer {
            address: hosts.db_addr.clone(),
            tls: Arc::clone(&tls_cfg),
            token: tls::read_token(&hosts.tls.join("token")).unwrap(),
        };
        let mut db = Db { hosts, peer };
        db.kill_and_restart(); // on the config with the small regions
        db
    }

    /// SIGKILL the database host's agent and start it again on the same state.
    fn kill_and_restart(&mut self) {
        self.hosts.db.signal(nix::sys::signal::Signal::SIGKILL);
        let _ = self.hosts.db.proc.0.wait();
        let dir = &self.hosts.dir;
        let (proc, line) = spawn_ready(&mut Agent::command(&dir.join("db.yaml"), &dir.join("db")));
        assert!(line.starts_with("host-agent: serving"), "{line:?}");
        self.peer.address = coordination_address(&line);
        self.hosts.db = Agent {
            proc,
            state: dir.join("db"),
        };
    }

    fn call(&self, op: Op) -> Result<Value, hvm_host_agent::coord::Failure> {
        self.peer
            .call(&hvm_host_agent::coord::new_id(), &op, 0, &mut |_, _| {})
    }

    /// Take the snapshot for `backup`; returns the reply's `changes` of `a`.
    fn snapshot(&self, backup: &str) -> Value {
        let reply = self
            .call(Op::Snapshot {
                vlus: vec!["a".into()],
                deadline_ms: None,
                vars: Default::default(),
                backup: Some(backup.into()),
                consistency: Consistency::Application,
            })
            .unwrap();
        assert!(reply["snapshots"].is_array(), "{reply}");
        let c = reply["changes"]["a"].clone();
        assert!(c.is_object(), "no changes in {reply}");
        c
    }

    /// Delete the snapshot and wait for the resync to end.
    fn delete(&self) {
        self.call(Op::Delete {
            vlus: vec!["a".into()],
        })
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let r = self
                .call(Op::Resync {
                    vlus: vec!["a".into()],
                })
                .unwrap();
            if r["vlus"][0]["done"] == true {
                return;
            }
            assert!(Instant::now() < deadline, "resync did not end: {r}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Write `blocks` (4 KiB each) over NBD, some as write-zeroes.
    fn write(&self, blocks: &BTreeSet<u64>, pattern: u8) {
        let cmds: Vec<String> = blocks
            .iter()
            .map(|b| {
                if b % 5 == 0 {
                    format!("write -z {} {BLOCK}", b * BLOCK)
                } else {
                    format!("write -P {pattern} {} {BLOCK}", b * BLOCK)
                }
            })
            .collect();
        let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
        for chunk in cmds.chunks(64) {
            self.hosts.db.qemu_io("a", chunk);
        }
    }

    fn tracking(&self) -> Value {
        let lus = self.hosts.db.json(&["lu", "list"]);
        let a = lus
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["name"] == "a")
            .unwrap();
        a["tracking"].clone()
    }
}

/// The 512-byte sectors of a `changes` entry's extents, after checking their form:
/// sorted, disjoint, `bytes` their sum, inside the LU.
fn sectors(c: &Value) -> BTreeSet<u64> {
    let mut out = BTreeSet::new();
    let mut end = 0;
    let mut sum = 0;
    for e in c["extents"].as_array().unwrap() {
        let (off, len) = (e[0].as_u64().unwrap(), e[1].as_u64().unwrap());
        assert!(off >= end && len > 0 && off + len <= LU, "{c}");
        assert!(off % 512 == 0 && len % 512 == 0, "{c}");
        end = off + len;
        sum += len;
        out.extend(off / 512..(off + len) / 512);
    }
    assert_eq!(c["bytes"].as_u64(), Some(sum), "{c}");
    out
}

fn sectors_of(blocks: &BTreeSet<u64>) -> BTreeSet<u64> {
    let per = BLOCK / 512;
    blocks.iter().flat_map(|b| b * per..(b + 1) * per).collect()
}

/// The sectors of the [`REGION`]s that hold `blocks`.
fn regions_of(blocks: &BTreeSet<u64>) -> BTreeSet<u64> {
    let per = REGION / 512;
    blocks
        .iter()
        .map(|b| b * BLOCK / REGION)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .flat_map(|r| r * per..(r + 1) * per)
        .collect()
}

/// Random 4 KiB blocks of the LU (xorshift, seeded).
fn random_blocks(rng: &mut u64, n: usize) -> BTreeSet<u64> {
    let mut out = BTreeSet::new();
    while out.len() < n {
        *rng ^= *rng << 13;
        *rng ^= *rng >> 7;
        *rng ^= *rng << 17;
        let b = *rng % (LU / BLOCK);
        // Runs of one to three blocks, as a database's writes come.
        for k in 0..(*rng >> 40) % 3 + 1 {
            out.insert((b + k).min(LU / BLOCK - 1));
        }
    }
    out
}

fn complete(db: &Db, backup: &str) -> TrackingBases {
    let r = tracking::complete(&db.peer, &["a".to_string()], backup).unwrap();
    assert_eq!(r.vlus["a"].base.as_deref(), Some(backup), "{r:?}");
    r
}

#[test]
fn a_cut_holds_exactly_the_writes_since_the_last_completed_backup() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::start(dir.path());
    let mut rng = 0x2545_f491_4f6c_dd1du64;

    // No backup yet: base null, the first cut has what was written.
    let w0 = random_blocks(&mut rng, 20);
    db.write(&w0, 1);
    let c = db.snapshot("b0");
    assert!(c["base"].is_null(), "{c}");
    assert_eq!(sectors(&c), sectors_of(&w0));
    db.delete();
    complete(&db, "b0");
    complete(&db, "b0"); // idempotent

    // The resync's write-back is not a client write: the next cut has only W1.
    let w1 = random_blocks(&mut rng, 20);
    db.write(&w1, 2);
    let c = db.snapshot("b1");
    assert_eq!(c["base"], "b0");
    assert_eq!(sectors(&c), sectors_of(&w1));
    let t = db.tracking();
    assert_eq!(t["pending"]["backup"], "b1", "{t}");
    assert_eq!(t["pending"]["bytes"], c["bytes"], "{t}");
    assert_eq!(t["base"], "b0");
    assert_eq!(t["granule"], 512);
    db.delete();

    // Abort: W1 counts as written again; the base stays.
    let r = tracking::abort(&db.peer, &["a".to_string()], "b1").unwrap();
    assert_eq!(r.vlus["a"].base.as_deref(), Some("b0"), "{r:?}");
    tracking::abort(&db.peer, &["a".to_string()], "b1").unwrap(); // idempotent
    let w2 = random_blocks(&mut rng, 20);
    db.write(&w2, 3);
    let c = db.snapshot("b2");
    assert_eq!(c["base"], "b0");
    let both: BTreeSet<u64> = w1.union(&w2).copied().collect();
    assert_eq!(sectors(&c), sectors_of(&both));
    db.delete();
    // A backup that never completed nor aborted: the next cut merges it.
    let w3 = random_blocks(&mut rng, 10);
    db.write(&w3, 4);
    let c = db.snapshot("b3");
    let all: BTreeSet<u64> = both.union(&w3).copied().collect();
    assert_eq!(sectors(&c), sectors_of(&all));
    db.delete();
    assert!(
        tracking::complete(&db.peer, &["a".to_string()], "b2")
            .unwrap()
            .vlus["a"]
            .base
            .as_deref()
            == Some("b0"),
        "b2 was merged into b3: completing it changes nothing"
    );
    complete(&db, "b3");
    let t = db.tracking();
    assert!(t["pending"].is_null() && t["current_bytes"] == 0, "{t}");

    // Bad requests change nothing.
    let e = db
        .call(Op::Snapshot {
            vlus: vec!["a".into()],
            deadline_ms: None,
            vars: Default::default(),
            backup: Some("not an id".into()),
            consistency: Consistency::Application,
        })
        .unwrap_err();
    assert_eq!(e.code, Code::BadRequest, "{e}");
    assert!(e.message.contains("not a backup id"), "{e}");
    let e = db
        .call(Op::Complete {
            vlus: vec!["a-snap".into()],
            backup: "b3".into(),
        })
        .unwrap_err();
    assert_eq!(e.code, Code::BadRequest, "{e}");
    assert_eq!(db.hosts.db.mode("a"), "Synchronized");
}

#[test]
fn sigkill_between_backups_never_loses_a_written_block() {
    let dir = tempfile::tempdir().unwrap();
    let mut db = Db::start(dir.path());
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let w = random_blocks(&mut rng, 10);
    db.write(&w, 1);
    db.snapshot("r0");
    db.delete();
    complete(&db, "r0");
    let mut base = "r0".to_string();
    for round in 1..=6u8 {
        // Written since the last completed backup: before a crash, after it.
        let before = random_blocks(&mut rng, 15);
        db.write(&before, round);
        db.kill_and_restart();
        let after = random_blocks(&mut rng, 15);
        db.write(&after, round + 100);
        let since: BTreeSet<u64> = before.union(&after).copied().collect();
        let id = format!("r{round}");
        let c = db.snapshot(&id);
        assert_eq!(c["base"], base.as_str(), "round {round}: {c}");
        let got = sectors(&c);
        let missing: Vec<u64> = sectors_of(&since).difference(&got).copied().collect();
        assert!(
            missing.is_empty(),
            "round {round}: sectors {missing:?} lost"
        );
        // Covering more is allowed, within the regions written since the base.
        assert!(
            got.is_subset(&regions_of(&since)),
            "round {round}: the cut covers sectors never written since {base}"
        );
        if round % 2 == 1 {
            // A crash between the snapshot and the complete: the pending set survives.
            db.kill_and_restart();
            assert_eq!(db.hosts.db.mode("a"), "Snapshot");
            let t = db.tracking();
            assert_eq!(t["pending"]["backup"], id.as_str(), "{t}");
        }
        db.delete();
        complete(&db, &id);
        base = id;
    }
}
