//! The array-sim daemon, started as a process: raw frames, bad frames, many commands in
//! flight, the example configs, and hvm-core's snapshot manager driving it over a socket.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command as Process, Stdio};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use array_sim::client::{ArrayClient, SetFault, SocketClient};
use array_sim::fault::{FaultAction, FaultOp, FaultRule};
use array_sim::proto::{self, Request};
use array_sim::scsi::{Command, Sense, CHECK_CONDITION, GOOD};
use array_sim::server::Address;
use hvm_core::backend::{Backend, BackendErrorKind};
use hvm_core::journal::NoLog;
use hvm_core::{LuId, MirrorDefinition, Mode, PairConfig, SnapshotManager, VirtualLuId};

struct Daemon {
    child: Child,
    addr: Address,
    _dir: tempfile::TempDir,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples")
}

/// Start `array-sim serve` on a Unix socket in a fresh directory (or `data`, to reuse
/// one) and wait until it listens.
fn start(config: &Path, data: Option<&Path>) -> Daemon {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("array.sock");
    let data = data.map_or_else(|| dir.path().join("data"), Path::to_path_buf);
    let mut child = Process::new(env!("CARGO_BIN_EXE_array-sim"))
        .args(["serve", "--config"])
        .arg(config)
        .arg("--listen")
        .arg(format!("unix:{}", sock.display()))
        .arg("--dir")
        .arg(&data)
        .stdout(Stdio::piped())
        .spawn()
        .expect("start array-sim");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(
        line.starts_with("array-sim: listening on unix:"),
        "{line:?}"
    );
    Daemon {
        child,
        addr: Address::Unix(sock),
        _dir: dir,
    }
}

fn client(d: &Daemon) -> ArrayClient<SocketClient> {
    ArrayClient::new(SocketClient::connect(&d.addr).unwrap())
}

/// Send one raw frame and read one reply: (status, sense), or `None` if the daemon closed
/// the connection.
fn raw(s: &mut UnixStream, frame: &[u8]) -> Option<(u8, Option<Sense>)> {
    s.write_all(frame).ok()?;
    let mut prefix = [0u8; 4];
    s.read_exact(&mut prefix).ok()?;
    let mut body = vec![0u8; proto::body_len(prefix).unwrap()];
    s.read_exact(&mut body).ok()?;
    let r = proto::Response::parse(&body).unwrap();
    let sense = (!r.sense.is_empty()).then(|| Sense::parse(r.sense).unwrap());
    Some((r.status, sense))
}

fn frame(lun: u8, cdb: &[u8], data: &[u8]) -> Vec<u8> {
    Request {
        tag: 1,
        lun,
        cdb,
        data,
    }
    .encode()
}

#[test]
fn example_configs_describe_their_figures() {
    let d = start(&examples().join("fig2-mode-select.yaml"), None);
    let desc = client(&d).describe().unwrap();
    assert!(desc.capabilities.mode_select && desc.capabilities.array_copy);
    assert_eq!(desc.lus.len(), 6);
    assert_eq!(
        desc.mirroring[0],
        MirrorDefinition::Managed {
            lu: LuId(1),
            mates: vec![LuId(4)]
        }
    );
    let d = start(&examples().join("fig9-stateless.yaml"), None);
    let desc = client(&d).describe().unwrap();
    assert!(desc.capabilities.virtual_lu_forming);
    assert_eq!(
        desc.lus.len(),
        9,
        "six LUs with storage and three mirroring LUs"
    );
    assert_eq!(
        desc.mirroring[2],
        MirrorDefinition::Triple {
            mirror: LuId(6),
            origin: LuId(7),
            mate: LuId(8)
        }
    );
    let d = start(&examples().join("fig14-pre-update.yaml"), None);
    let desc = client(&d).describe().unwrap();
    assert!(desc.capabilities.read_only_mate && !desc.capabilities.array_copy);
    assert_eq!(
        desc.mirroring,
        vec![MirrorDefinition::Pair {
            mirror: LuId(0),
            mate: LuId(1)
        }]
    );
    assert_eq!(desc.capacity(LuId(9)), Some(65536));
}

/// Bad commands are CHECK CONDITION on a connection that stays usable; bad frames close
/// the connection; either way the next good command on a new connection works.
#[test]
fn raw_frames_good_and_bad() {
    let d = start(&examples().join("fig9-stateless.yaml"), None);
    let sock = match &d.addr {
        Address::Unix(p) => p.clone(),
        Address::Tcp(_) => unreachable!(),
    };
    let mut s = UnixStream::connect(&sock).unwrap();
    let tur = Command::TestUnitReady.encode();
    assert_eq!(raw(&mut s, &frame(1, &tur, &[])), Some((GOOD, None)));
    let cases: Vec<(u8, Vec<u8>, Sense)> = vec![
        (
            1,
            vec![0x28, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            Sense::INVALID_OPCODE,
        ),
        (1, vec![0x88, 0, 0, 0], Sense::INVALID_FIELD_IN_CDB),
        (
            1,
            Command::Read16 {
                lba: 131_071,
                blocks: 2,
                fua: false,
            }
            .encode(),
            Sense::LBA_OUT_OF_RANGE,
        ),
        // A READ far over the transfer cap (and the LU) is refused, and no buffer is
        // made for it first.
        (
            1,
            Command::Read16 {
                lba: 0,
                blocks: u32::MAX,
                fua: false,
            }
            .encode(),
            Sense::LBA_OUT_OF_RANGE,
        ),
        (200, tur.clone(), Sense::LUN_NOT_SUPPORTED),
    ];
    for (lun, cdb, sense) in cases {
        assert_eq!(
            raw(&mut s, &frame(lun, &cdb, &[])),
            Some((CHECK_CONDITION, Some(sense)))
        );
    }
    // A WRITE whose data-out does not match its transfer length.
    let w = Command::Write16 {
        lba: 0,
        blocks: 2,
        fua: false,
    }
    .encode();
    assert_eq!(
        raw(&mut s, &frame(1, &w, &[0; 512])),
        Some((CHECK_CONDITION, Some(Sense::PARAMETER_LIST_LENGTH)))
    );

    let bad_frames: Vec<Vec<u8>> = vec![
        // Length beyond the frame cap.
        (proto::MAX_FRAME + 1).to_le_bytes().to_vec(),
        // Shorter than the request header.
        [3u32.to_le_bytes().to_vec(), vec![1, 2, 3]].concat(),
        // A CDB length past the end of the frame.
        [10u32.to_le_bytes().to_vec(), vec![0; 9], vec![16]].concat(),
    ];
    for bad in bad_frames {
        let mut s = UnixStream::connect(&sock).unwrap();
        assert_eq!(raw(&mut s, &bad), None, "bad frame {bad:?} was answered");
        let mut s = UnixStream::connect(&sock).unwrap();
        assert_eq!(raw(&mut s, &frame(1, &tur, &[])), Some((GOOD, None)));
    }
}

/// Many threads share one connection; each command carries its own tag and every reply
/// finds its caller. Four connections do the same at once.
#[test]
fn many_commands_in_flight() {
    let d = start(&examples().join("fig9-stateless.yaml"), None);
    let clients: Vec<_> = (0..4).map(|_| Arc::new(client(&d))).collect();
    let threads: Vec<_> = (0..16u8)
        .map(|t| {
            let c = clients[usize::from(t) % clients.len()].clone();
            std::thread::spawn(move || {
                for i in 0..100u64 {
                    let lba = u64::from(t) * 1000 + i;
                    let data = vec![t ^ (i as u8); 4096];
                    c.write(LuId(0), lba * 8, &data, false).unwrap();
                    let mut back = vec![0u8; 4096];
                    c.read(LuId(1), lba * 8, &mut back).unwrap();
                    assert_eq!(back, data);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

/// READ replies reuse the daemon's buffers: reads of changing sizes, a failed read among
/// them and one too large to keep each return exactly the blocks asked for, never what
/// an earlier reply held.
#[test]
fn reads_of_changing_sizes_return_their_own_blocks() {
    let d = start(&examples().join("fig9-stateless.yaml"), None);
    let c = client(&d);
    let pattern = |at: u64, n: usize| -> Vec<u8> {
        (0..n as u64)
            .map(|i| ((at + i) / 512 % 251) as u8)
            .collect()
    };
    let region = 16u64 << 20;
    c.write(LuId(0), 0, &pattern(0, region as usize), false)
        .unwrap();
    let reads: [(u64, usize); 7] = [
        (0, 4 << 20),
        (8 << 20, 64 << 10),
        (1 << 20, 4 << 20),
        (5 << 20, 1 << 20),
        (2 << 20, (4 << 20) + 512),
        (12 << 20, 128 << 10),
        (9 << 20, 4 << 20),
    ];
    for (i, &(at, n)) in reads.iter().enumerate() {
        let mut back = vec![0xee; n];
        c.read(LuId(1), at / 512, &mut back).unwrap();
        assert!(back == pattern(at, n), "read {i} at {at} of {n} bytes");
        // A read past the end fails and leaves nothing behind for the next one.
        let mut past = vec![0u8; 1 << 20];
        assert!(c.read(LuId(1), 131_072 - 8, &mut past).is_err());
    }
}

/// SET FAULT at runtime: the next write drops the connection; the caller gets an I/O
/// error, and the client connects again for the next command.
#[test]
fn dropped_connection_is_an_error_not_a_hang() {
    let d = start(&examples().join("fig9-stateless.yaml"), None);
    let c = client(&d);
    let rule = FaultRule {
        lun: Some(1),
        op: FaultOp::Write,
        action: FaultAction::Drop,
        sense: None,
        count: Some(1),
        rate: None,
        delay_ms: None,
    };
    c.set_fault(1, Some(&rule)).unwrap();
    let err = c.write(LuId(1), 0, &[1; 512], false).unwrap_err();
    assert_eq!(err.kind, BackendErrorKind::Io, "{err}");
    c.write(LuId(1), 0, &[1; 512], false).unwrap();
    let mut back = [0; 512];
    c.read(LuId(1), 0, &mut back).unwrap();
    assert_eq!(back, [1; 512]);
}

/// The Mode Select array's mode table survives a daemon restart ([0025], Fig. 2).
#[test]
fn mode_table_survives_restart() {
    let data = tempfile::tempdir().unwrap();
    let cfg = examples().join("fig2-mode-select.yaml");
    let d = start(&cfg, Some(data.path()));
    client(&d).mode_select(LuId(2), &[0, 1]).unwrap();
    drop(d);
    let d = start(&cfg, Some(data.path()));
    assert_eq!(client(&d).mode_sense(LuId(2)).unwrap(), vec![0, 1]);
    assert_eq!(client(&d).mode_sense(LuId(5)).unwrap(), vec![0, 4]);
}

/// hvm-core's snapshot manager over a daemon: E2 on Fig. 9 with the array-side copy,
/// E1 on Fig. 2; after resync the legs are identical.
#[test]
fn snapshot_manager_over_the_socket() {
    for (cfg, definition, legs) in [
        (
            "fig9-stateless.yaml",
            MirrorDefinition::Triple {
                mirror: LuId(0),
                origin: LuId(1),
                mate: LuId(2),
            },
            (LuId(1), LuId(2)),
        ),
        (
            "fig2-mode-select.yaml",
            MirrorDefinition::Managed {
                lu: LuId(1),
                mates: vec![LuId(4)],
            },
            (LuId(1), LuId(4)),
        ),
    ] {
        let d = start(&examples().join(cfg), None);
        let pair = PairConfig {
            origin: VirtualLuId(0),
            snapshots: vec![VirtualLuId(1)],
            definition,
            save_area: None,
        };
        let mgr = SnapshotManager::open(client(&d), vec![pair], Arc::new(NoLog), None).unwrap();
        let (o, s) = (VirtualLuId(0), VirtualLuId(1));
        mgr.write(o, 0, &[1; 65536], false).unwrap();
        mgr.acquire(o).unwrap();
        mgr.write(o, 4096, &[2; 8192], true).unwrap();
        let mut buf = vec![0u8; 8192];
        mgr.read(s, 4096, &mut buf).unwrap();
        assert!(buf.iter().all(|b| *b == 1), "{cfg}: the snapshot changed");
        mgr.delete(o).unwrap();
        let p = mgr.resync(o, 64, &AtomicBool::new(false), |_| {}).unwrap();
        assert!(p.done && p.copied == 16, "{cfg}: {p:?}");
        assert_eq!(mgr.mode(o), Mode::Synchronized);
        let c = client(&d);
        let (mut a, mut b) = (vec![0u8; 65536], vec![0u8; 65536]);
        if let MirrorDefinition::Managed { .. } = mgr.definitions().iter().next().unwrap() {
            // The mate of a Mode Select array is readable only in Snapshot.
            c.mode_select(legs.0, &[0, 1]).unwrap();
        }
        c.read(legs.0, 0, &mut a).unwrap();
        c.read(legs.1, 0, &mut b).unwrap();
        assert!(a == b, "{cfg}: legs differ after resync");
        assert!(a[4096..12288].iter().all(|x| *x == 2));
    }
}

/// `--listen tcp:127.0.0.1:0` picks a free port and prints it; the client connects there.
#[test]
fn serves_over_tcp() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Process::new(env!("CARGO_BIN_EXE_array-sim"))
        .args(["serve", "--config"])
        .arg(examples().join("fig14-pre-update.yaml"))
        .args(["--listen", "tcp:127.0.0.1:0", "--dir"])
        .arg(dir.path())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr: Address = line
        .trim()
        .strip_prefix("array-sim: listening on ")
        .unwrap()
        .parse()
        .unwrap();
    let d = Daemon {
        child,
        addr,
        _dir: dir,
    };
    let c = client(&d);
    c.write(LuId(0), 8, &[7; 1024], true).unwrap();
    let mut back = [0u8; 1024];
    c.read(LuId(1), 8, &mut back).unwrap();
    assert_eq!(back, [7; 1024]);
    let err = c.write(LuId(1), 8, &[7; 512], false).unwrap_err();
    assert_eq!(err.kind, BackendErrorKind::DataProtect, "{err}");
}

/// A config with a mistake is refused with the file, the line and what was expected.
#[test]
fn bad_config_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.yaml");
    std::fs::write(
        &cfg,
        "kind: stateless\ndisks: [{name: d0}]\nlus:\n  - {lun: 1, blocks: 8, disk: d9}\n",
    )
    .unwrap();
    let out = Process::new(env!("CARGO_BIN_EXE_array-sim"))
        .args(["serve", "--config"])
        .arg(&cfg)
        .args(["--listen", "unix:/nonexistent/x.sock"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.yaml") && err.contains("no disk named \"d9\""),
        "{err}"
    );
    std::fs::write(&cfg, "kind: stateless\ndisks: [{name: d0}]\nlus: 5\n").unwrap();
    let out = Process::new(env!("CARGO_BIN_EXE_array-sim"))
        .args(["serve", "--config"])
        .arg(&cfg)
        .args(["--listen", "unix:/nonexistent/x.sock"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.yaml") && err.contains("line 3"), "{err}");
}
