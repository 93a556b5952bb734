//! Backup coordination across hosts (issue 8, EP 1 148 416 [0063]-[0071]): a console
//! (`hvmctl backup run`), a database host's agent and a backup host's agent, TLS with a
//! shared token, an array-sim daemon both hosts reach.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hvm_host_agent::coord::{tls, Code, Consistency, Op, Peer};
use hvm_host_agent::nbd::client::Client;
use hvm_tests::backup::{steps, Hosts, Setup};
use hvm_tests::binary;
use hvm_tests::pg::Mounted;

const LU: u64 = 16 << 20;
const BLOCK: usize = 4096;
const BLOCKS: u64 = LU / BLOCK as u64;

/// Writes generation n to block n % BLOCKS of `a`, then to the same block of `b`, for
/// n = 1, 2, ...: each write to b depends on the write to a before it, and the next write
/// to a on it. Returns the last generation written to both.
fn writer(
    hosts: &Hosts,
    stop: Arc<AtomicBool>,
    last: Arc<AtomicU64>,
) -> std::thread::JoinHandle<()> {
    let sock = hosts.db.state.join("nbd.sock");
    std::thread::spawn(move || {
        let mut a = Client::connect(&sock, "a").unwrap();
        let mut b = Client::connect(&sock, "b").unwrap();
        let mut n = 0u64;
        while !stop.load(Ordering::SeqCst) {
            n += 1;
            let block = n.to_le_bytes().repeat(BLOCK / 8);
            let at = (n % BLOCKS) * BLOCK as u64;
            a.write(at, &block, false).unwrap();
            b.write(at, &block, false).unwrap();
            last.store(n, Ordering::SeqCst);
        }
        a.flush().unwrap();
        b.flush().unwrap();
    })
}

/// The generation in each block of an image (every block must be one generation).
fn generations(image: &Path) -> Vec<u64> {
    let data = std::fs::read(image).unwrap();
    assert_eq!(data.len() as u64, LU);
    data.chunks(BLOCK)
        .enumerate()
        .map(|(i, b)| {
            let g = u64::from_le_bytes(b[..8].try_into().unwrap());
            assert!(b.chunks(8).all(|w| w == &b[..8]), "block {i} is torn");
            g
        })
        .collect()
}

/// Every write up to the image's newest generation is in it, and none after it.
fn assert_prefix(name: &str, gens: &[u64]) -> u64 {
    let max = *gens.iter().max().unwrap();
    for (k, g) in gens.iter().enumerate() {
        let k = k as u64;
        // The largest n <= max with n % BLOCKS == k, or 0.
        let expect = if max >= k && (k != 0 || max >= BLOCKS) {
            let n = max - (max + BLOCKS - k) % BLOCKS;
            if n == 0 {
                0
            } else {
                n
            }
        } else {
            0
        };
        assert_eq!(
            *g, expect,
            "{name}: block {k} holds generation {g}, expected {expect} (newest {max})"
        );
    }
    max
}

fn start(dir: &Path, freeze: &str) -> Hosts {
    Hosts::start(
        dir,
        &Setup {
            lu_bytes: LU,
            names: &["a", "b"],
            freeze,
        },
    )
}

fn restore(hosts: &Hosts, id: &str, vlu: &str) -> std::path::PathBuf {
    let to = hosts.dir.join(format!("restored-{id}-{vlu}.img"));
    hosts.restore(id, Some(vlu), &to);
    to
}

#[test]
fn consistency_group_backup_from_the_array_while_writes_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let log_file = dir.path().join("hooks.log");
    let hosts = start(
        dir.path(),
        &format!(
            "    deadline_ms: 5000\n    hooks:\n      - command: {{ pre: \"echo pre $HVM_BACKUP_ID $HVM_VLUS $HVM_TARGET >> {l}\", post: \"echo post $HVM_OUTCOME >> {l}\" }}\n",
            l = log_file.display()
        ),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let last = Arc::new(AtomicU64::new(0));
    let w = writer(&hosts, stop.clone(), last.clone());
    while last.load(Ordering::SeqCst) < 2000 {
        std::thread::sleep(Duration::from_millis(20));
    }
    let before = hosts.db_snapshot_reads();
    let (out, v) = hosts.run(&["a", "b"], "monday", &["--wait-resync"]);
    assert!(
        out.status.success(),
        "backup run: {}\n{v}",
        String::from_utf8_lossy(&out.stderr)
    );
    let written_during = last.load(Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::SeqCst);
    w.join().unwrap();
    let final_gen = last.load(Ordering::SeqCst);

    // Each step was reported with its duration; the copy came from the array.
    let steps: Vec<&str> = steps(&v).into_iter().map(|(n, _)| n).collect();
    assert!(
        steps.iter().any(|s| s.starts_with("quiesce command")),
        "{steps:?}"
    );
    assert!(
        steps.contains(&"snapshot of a, b")
            && steps.contains(&"copy")
            && steps.contains(&"delete snapshot")
            && steps.contains(&"resync"),
        "{steps:?}"
    );
    for l in v["copy"]["lus"].as_array().unwrap() {
        assert!(
            l["source"]
                .as_str()
                .unwrap()
                .starts_with("array: backend array0"),
            "{l}"
        );
    }
    // [0071]: the database host read none of the copied bytes.
    assert_eq!(
        hosts.db_snapshot_reads(),
        before,
        "the database host served snapshot reads"
    );
    let log = std::fs::read_to_string(&log_file).unwrap();
    assert!(
        log.contains("pre ") && log.contains(" a b monday") && log.contains("post ok"),
        "{log:?}"
    );

    // The backup holds one instant of both virtual LUs: every write acknowledged before
    // it and none after, with b's writes depending on a's.
    let id = v["id"].as_str().unwrap();
    let ga = generations(&restore(&hosts, id, "a"));
    let gb = generations(&restore(&hosts, id, "b"));
    let (ma, mb) = (assert_prefix("a", &ga), assert_prefix("b", &gb));
    assert!(
        ma == mb || ma == mb + 1,
        "not one instant: a up to {ma}, b up to {mb}"
    );
    assert!(
        mb >= 2000,
        "the snapshot missed writes acknowledged before it ({mb})"
    );
    assert!(
        final_gen > ma && written_during > ma,
        "no writes went on after the snapshot"
    );
    println!("snapshot at generation a={ma} b={mb}; writer reached {final_gen}");

    // verify passes, and fails on a changed byte, naming the chunk.
    let out = hosts.verify(id);
    assert!(
        out.status.success(),
        "verify: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let m = hosts.manifest("monday", id);
    let chunk = m["lus"][0]["extents"][0]["chunk"].as_str().unwrap();
    let path = hosts.chunk_path("monday", chunk);
    let key = format!("chunks/{}/{chunk}", &chunk[..2]);
    let good = std::fs::read(&path).unwrap();
    let mut data = good.clone();
    let at = data.len() / 2;
    data[at] ^= 1;
    std::fs::write(&path, &data).unwrap();
    let out = hosts.verify(id);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&key),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let x = dir.path().join("x.img");
    let out = hosts.try_restore(id, Some("a"), &x);
    assert_eq!(out.status.code(), Some(1), "a corrupt image was restored");
    assert!(!x.exists());
    std::fs::write(&path, &good).unwrap();

    // After the resync the legs are identical again.
    for (o, m) in [(1, 2), (4, 5)] {
        assert!(
            std::fs::read(hosts.lu_file(o)).unwrap() == std::fs::read(hosts.lu_file(m)).unwrap(),
            "LU {o} and LU {m} differ after resync"
        );
    }
    // A second run into the same repository adds a backup; the catalog lists both.
    let (out, v2) = hosts.run(&["a"], "monday", &[]);
    assert!(
        out.status.success(),
        "second run: {}\n{v2}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed = hosts.list(Some("monday"));
    let ids: Vec<&str> = listed["backups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec![id, v2["id"].as_str().unwrap()], "{listed}");
    assert!(hosts.db.mode("a") != "Snapshot");
}

#[test]
fn backup_over_nbd_and_the_read_counter() {
    let dir = tempfile::tempdir().unwrap();
    let hosts = start(dir.path(), "    deadline_ms: 5000\n");
    let stop = Arc::new(AtomicBool::new(false));
    let last = Arc::new(AtomicU64::new(0));
    let w = writer(&hosts, stop.clone(), last.clone());
    while last.load(Ordering::SeqCst) < 500 {
        std::thread::sleep(Duration::from_millis(20));
    }
    let before = hosts.db_snapshot_reads();
    let (out, v) = hosts.run(&["a"], "nbd", &["--via", "nbd"]);
    stop.store(true, Ordering::SeqCst);
    w.join().unwrap();
    assert!(
        out.status.success(),
        "backup run: {}\n{v}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        v["copy"]["lus"][0]["source"]
            .as_str()
            .unwrap()
            .starts_with("nbd: "),
        "{v}"
    );
    // Pulling over NBD is the database host's work: the counter sees every byte.
    assert_eq!(hosts.db_snapshot_reads() - before, LU);
    let id = v["id"].as_str().unwrap();
    let g = generations(&restore(&hosts, id, "a"));
    assert!(assert_prefix("a", &g) >= 500);
    // The manifest names the instant.
    let m: serde_json::Value = serde_json::from_slice(
        &std::fs::read(
            hosts
                .target_root
                .join(format!("nbd/backups/{id}/manifest.json")),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(m["format"], "hvm-backup/3");
    assert!(m["info"]["instant_unix_ms"].as_u64().unwrap() > 0, "{m}");
    assert_eq!(m["lus"][0]["size"], LU);

    // Restore in place: 1 MiB of the live virtual LU is overwritten; the backup host
    // compares the whole LU over NBD and writes back only the blocks that differ.
    let image = std::fs::read(hosts.dir.join(format!("restored-{id}-a.img"))).unwrap();
    let mut c = Client::connect(&hosts.db.state.join("nbd.sock"), "a").unwrap();
    c.write(1 << 20, &vec![0xab; 1 << 20], true).unwrap();
    // The 64 KiB blocks that differ from the backup now: that MiB, and those the writer
    // wrote after the snapshot (all of them, on a slow enough run).
    let mut before = vec![0u8; LU as usize];
    for (i, piece) in before.chunks_mut(1 << 20).enumerate() {
        c.read((i as u64) << 20, piece).unwrap();
    }
    let differ = before
        .chunks(64 << 10)
        .zip(image.chunks(64 << 10))
        .filter(|(l, b)| l != b)
        .count() as u64;
    // A restore in place is refused while a client has the export open.
    c.disconnect();
    let out = hosts.hvmctl(&[
        "backup",
        "restore",
        id,
        "--vlu",
        "a",
        "--in-place",
        "--db",
        &hosts.db_addr,
        "--backup",
        &hosts.backup_addr,
    ]);
    assert!(
        out.status.success(),
        "restore --in-place: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // Exactly the blocks that differed.
    assert!(differ >= 16, "{differ}");
    assert_eq!(r["written_bytes"], differ * (64 << 10), "{r}");
    let mut c = Client::connect(&hosts.db.state.join("nbd.sock"), "a").unwrap();
    let mut live = vec![0u8; LU as usize];
    for (i, piece) in live.chunks_mut(1 << 20).enumerate() {
        c.read((i as u64) << 20, piece).unwrap();
    }
    assert!(live == image, "the live virtual LU differs from the backup");
    c.disconnect();
}

/// The console's client certificate, as `hvmctl tls init` wrote it.
fn console(hosts: &Hosts) -> Option<(std::path::PathBuf, std::path::PathBuf)> {
    Some((
        hosts.tls.join("console.pem"),
        hosts.tls.join("console-key.pem"),
    ))
}

fn client_config(
    hosts: &Hosts,
    identity: Option<(std::path::PathBuf, std::path::PathBuf)>,
) -> Arc<hvm_host_agent::coord::tls::ClientConfig> {
    let id = identity.as_ref().map(|(c, k)| (c.as_path(), k.as_path()));
    tls::client_config(&hosts.tls.join("ca.pem"), id).unwrap()
}

/// One raw request line over TLS; the reply's last line.
fn raw(hosts: &Hosts, addr: &str, line: &str) -> serde_json::Value {
    let cfg = client_config(hosts, console(hosts));
    let conn = rustls_connection(cfg);
    let tcp = std::net::TcpStream::connect(addr).unwrap();
    let mut s = hvm_host_agent::coord::tls::stream(conn, tcp);
    s.write_all(line.as_bytes()).unwrap();
    s.flush().unwrap();
    let mut last = String::new();
    for l in BufReader::new(s).lines() {
        match l {
            Ok(l) => last = l,
            Err(_) => break,
        }
    }
    serde_json::from_str(&last).unwrap()
}

fn rustls_connection(
    cfg: Arc<hvm_host_agent::coord::tls::ClientConfig>,
) -> hvm_host_agent::coord::tls::ClientConnection {
    hvm_host_agent::coord::tls::ClientConnection::new(cfg, tls::server_name("127.0.0.1").unwrap())
        .unwrap()
}

#[test]
fn unauthenticated_requests_are_refused_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let hosts = start(dir.path(), "    deadline_ms: 5000\n");
    let snap = r#""op":{"type":"snapshot","vlus":["a"]}"#;
    for line in [
        format!("{{\"id\":\"1\",{snap}}}\n"),
        format!("{{\"token\":\"not-the-token-at-all\",\"id\":\"1\",{snap}}}\n"),
        format!("{{\"token\":\"\",\"id\":\"1\",{snap}}}\n"),
        "this is not JSON\n".to_string(),
    ] {
        let v = raw(&hosts, &hosts.db_addr, &line);
        assert_eq!(v["error"]["code"], "unauthorized", "{line}: {v}");
    }
    // The copy operation on the backup host likewise.
    let v = raw(
        &hosts,
        &hosts.backup_addr,
        r#"{"token":"wrong-token-wrong-token","id":"2","op":{"type":"copy","target":"x","lus":[]}}
"#,
    );
    assert_eq!(v["error"]["code"], "unauthorized");
    assert!(!hosts.target_root.join("x").exists());
    // A TLS client without a certificate does not get as far as a request.
    let conn = rustls_connection(client_config(&hosts, None));
    let tcp = std::net::TcpStream::connect(&hosts.db_addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let mut s = hvm_host_agent::coord::tls::stream(conn, tcp);
    let sent = s
        .write_all(format!("{{\"token\":\"x\",\"id\":\"1\",{snap}}}\n").as_bytes())
        .and_then(|()| s.flush());
    let mut buf = Vec::new();
    let read = std::io::Read::read_to_end(&mut s, &mut buf);
    assert!(
        (sent.is_err() || read.is_err()) && buf.is_empty(),
        "a client without a certificate got {:?}",
        String::from_utf8_lossy(&buf)
    );
    // Plain TCP without TLS gets nothing.
    let mut plain = std::net::TcpStream::connect(&hosts.db_addr).unwrap();
    plain
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let _ = plain.write_all(format!("{{\"token\":\"x\",\"id\":\"1\",{snap}}}\n").as_bytes());
    let mut buf = Vec::new();
    let _ = std::io::Read::read_to_end(&mut plain, &mut buf);
    assert!(!String::from_utf8_lossy(&buf).contains("\"ok\""));
    // hvmctl with a wrong token: refused, exit 1.
    let wrong = dir.path().join("wrong-token");
    std::fs::write(&wrong, "0123456789abcdef0123456789abcdef\n").unwrap();
    let out = Command::new(binary("hvmctl"))
        .args([
            "backup",
            "run",
            "--db",
            &hosts.db_addr,
            "--backup",
            &hosts.backup_addr,
            "--vlu",
            "a",
            "--target",
            "t",
        ])
        .arg("--ca")
        .arg(hosts.tls.join("ca.pem"))
        .arg("--token-file")
        .arg(&wrong)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("unauthorized"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A client that does not trust the CA does not talk to the agent at all.
    let other = dir.path().join("other");
    assert!(Command::new(binary("hvmctl"))
        .args(["tls", "init"])
        .arg(&other)
        .args(["--host", "127.0.0.1"])
        .status()
        .unwrap()
        .success());
    let out = Command::new(binary("hvmctl"))
        .args([
            "backup",
            "delete",
            "--db",
            &hosts.db_addr,
            "--vlu",
            "a",
            "--ca",
        ])
        .arg(other.join("ca.pem"))
        .arg("--token-file")
        .arg(hosts.tls.join("token"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    // Nothing changed: both virtual LUs are Synchronized, no backup directory.
    assert_eq!(hosts.db.mode("a"), "Synchronized");
    assert_eq!(hosts.db.mode("b"), "Synchronized");
    assert!(!hosts.target_root.join("t").exists());

    // With the token: a request retried with the same id is done once.
    let peer = Peer {
        address: hosts.db_addr.clone(),
        tls: client_config(&hosts, console(&hosts)),
        token: tls::read_token(&hosts.tls.join("token")).unwrap(),
    };
    let op = Op::Snapshot {
        vlus: vec!["a".into()],
        deadline_ms: None,
        vars: Default::default(),
        backup: None,
        consistency: Consistency::Application,
    };
    let first = peer.call("same-id", &op, 0, &mut |_, _| {}).unwrap();
    let again = peer.call("same-id", &op, 0, &mut |_, _| {}).unwrap();
    assert_eq!(
        first["instant_unix_ms"], again["instant_unix_ms"],
        "a retry took a second snapshot"
    );
    // A new id while the snapshot exists is refused by the precondition ([0027]).
    let e = peer.call("other-id", &op, 0, &mut |_, _| {}).unwrap_err();
    assert_eq!(e.code, Code::Failed);
    assert!(e.message.contains("Synchronized"), "{e}");
    // The same id for a different operation is refused.
    let delete = Op::Delete {
        vlus: vec!["a".into()],
    };
    let e = peer
        .call("same-id", &delete, 0, &mut |_, _| {})
        .unwrap_err();
    assert_eq!(e.code, Code::BadRequest);
    let d = peer.call("del-1", &delete, 0, &mut |_, _| {}).unwrap();
    assert_eq!(d["vlus"][0]["changed"], true);
    let d = peer.call("del-1", &delete, 0, &mut |_, _| {}).unwrap();
    assert_eq!(
        d["vlus"][0]["changed"], true,
        "the retry got the first answer"
    );
    // A database operation on the backup host is refused by role.
    let bpeer = Peer {
        address: hosts.backup_addr.clone(),
        ..peer
    };
    let e = bpeer.call("x", &op, 0, &mut |_, _| {}).unwrap_err();
    assert_eq!(e.code, Code::NotMyRole);
}

#[test]
fn a_hanging_hook_ends_at_the_deadline_thawed_and_rolled_back() {
    let dir = tempfile::tempdir().unwrap();
    // A filesystem of its own to freeze: ext4 on a loop device.
    let img = dir.path().join("fs.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let fs = Mounted::file(dir.path(), &img, "frozen", true);
    let marker = dir.path().join("post-ran");
    let freeze = format!(
        "    deadline_ms: 1500\n    hooks:\n      - fsfreeze: {}\n      - command: {{ pre: \"sleep 600\", post: \"echo $HVM_OUTCOME > {}\" }}\n",
        fs.dir.display(),
        marker.display()
    );
    let hosts = start(dir.path(), &freeze);
    let t = Instant::now();
    let (out, v) = hosts.run(&["a", "b"], "hang", &[]);
    let took = t.elapsed();
    assert_eq!(
        out.status.code(),
        Some(4),
        "expected the timeout status: {}\n{v}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(v["error"]["code"], "timeout", "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("sleep 600"),
        "{v}"
    );
    assert!(
        took < Duration::from_secs(10),
        "the run took {took:?} for a 1.5 s deadline"
    );
    // Thawed: a write to the filesystem completes (a frozen one would block).
    let (tx, rx) = std::sync::mpsc::channel();
    let probe = fs.dir.join("probe");
    std::thread::spawn(move || {
        let r = std::fs::write(&probe, b"x").and_then(|()| std::fs::File::open(&probe)?.sync_all());
        let _ = tx.send(r.is_ok());
    });
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(10)),
        Ok(true),
        "the filesystem is still frozen"
    );
    assert_eq!(std::fs::read_to_string(&marker).unwrap().trim(), "timeout");
    // The hanging hook was killed, and no snapshot remains.
    let sleeping = Command::new("pgrep")
        .args(["-f", "^sleep 600$"])
        .output()
        .unwrap();
    assert!(
        sleeping.stdout.is_empty(),
        "the hook's process is still running"
    );
    assert_eq!(hosts.db.mode("a"), "Synchronized");
    assert_eq!(hosts.db.mode("b"), "Synchronized");
    assert!(!hosts.target_root.join("hang").exists());
    assert!(
        v["error"]["detail"]["thawed"].as_array().unwrap().len() == 2,
        "{v}"
    );
    drop(fs);
}
