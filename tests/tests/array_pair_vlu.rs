//! Issue 22: the two patents joined. A virtual LU of hvm defined on a pair of EP 1 058
//! 190 (user volume LU 10, secondary LU 11 of an array-sim daemon): the agent starts
//! with it (before, it refused: "no mirroring definition whose primary LU is 10"), a
//! snapshot of it is the array's pair split, the array copies the snapshot to its
//! backup device by CCOPY with no host reading it, and deleting the snapshot is the
//! array's resync of the marked units.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::process::Command;

use array_sim::client::{ArrayClient, SocketClient};
use hvm_core::array_backup::{BackupOp, BackupReply, PairState, PairStatus};
use hvm_core::{Backend, LuId};
use hvm_tests::agent::Agent;
use hvm_tests::{binary, spawn_ready, workspace};

const BS: usize = 512;
const MIB_BLOCKS: u64 = 2048;

fn pair(c: &ArrayClient<SocketClient>) -> PairStatus {
    match c.backup(&BackupOp::PairStatus { lu: 10 }).unwrap() {
        BackupReply::Pair(p) => p,
        r => panic!("{r:?}"),
    }
}

fn read(c: &ArrayClient<SocketClient>, lu: u32) -> Vec<u8> {
    let mut b = vec![0u8; MIB_BLOCKS as usize * BS];
    c.read(LuId(lu), 0, &mut b).unwrap();
    b
}

#[test]
fn a_virtual_lu_on_an_array_pair_snapshots_by_split_and_backs_up_by_ccopy() {
    let dir = tempfile::tempdir().unwrap();
    let (data, sock) = (dir.path().join("array"), dir.path().join("array.sock"));
    let (_array, line) = spawn_ready(
        Command::new(binary("array-sim"))
            .args(["serve", "--config"])
            .arg(workspace().join("array-sim/examples/ep1058190-backup.yaml"))
            .arg("--listen")
            .arg(format!("unix:{}", sock.display()))
            .arg("--dir")
            .arg(&data),
    );
    assert!(line.contains("listening"), "{line}");
    let arr = ArrayClient::new(
        SocketClient::connect(&format!("unix:{}", sock.display()).parse().unwrap()).unwrap(),
    );
    arr.backup(&BackupOp::PairCreate {
        primary: 10,
        secondary: 11,
    })
    .unwrap();
    while pair(&arr).state != PairState::Duplex {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let example =
        std::fs::read_to_string(workspace().join("host-agent/examples/array-backup.yaml")).unwrap();
    let cfg = dir.path().join("agent.yaml");
    let text = example.replace("/tmp/hvm-array/array.sock", &sock.display().to_string())
        + "  - { name: db, backend: array0, lu: 10, snapshots: [db-snap] }\n";
    std::fs::write(&cfg, text).unwrap();
    let a = Agent::start_config(&cfg, &dir.path().join("state"));
    assert_eq!(a.mode("db"), "Synchronized");
    a.qemu_io("db", &["write -P 0x11 0 1M"]);
    a.json(&["snapshot", "acquire", "db"]);
    assert_eq!(
        pair(&arr).state,
        PairState::Split,
        "the snapshot is the array's split"
    );
    a.qemu_io("db", &["write -P 0x22 0 64k"]);
    a.qemu_io("db-snap", &["read -P 0x11 0 1M"]);
    let before = a.json(&["array", "counters"]);
    let j = a.json(&[
        "backup", "ccopy", "11", "--device", "tape0", "--range", "0+2048", "--wait",
    ]);
    assert_eq!(j["state"], "done", "{j}");
    let after = a.json(&["array", "counters"]);
    let delta = |k: &str| after[k].as_u64().unwrap() - before[k].as_u64().unwrap();
    assert_eq!(delta("host_read_bytes"), 0, "no host read the snapshot");
    assert_eq!(delta("device_bytes"), MIB_BLOCKS * BS as u64);
    let to = dir.path().join("restored");
    a.json(&[
        "device",
        "restore",
        data.join("tape0.rec").to_str().unwrap(),
        "--to",
        to.to_str().unwrap(),
    ]);
    let restored = std::fs::read(&to).unwrap();
    assert!(
        restored[..MIB_BLOCKS as usize * BS]
            .iter()
            .all(|b| *b == 0x11),
        "the medium is the snapshot"
    );
    assert_eq!(
        pair(&arr).diff_units,
        16,
        "64 KiB written since the split: 16 units of 4 KiB"
    );
    a.json(&["snapshot", "delete", "db", "--wait"]);
    assert_eq!(a.mode("db"), "Synchronized");
    let p = pair(&arr);
    assert_eq!((p.state, p.diff_units), (PairState::Duplex, 0));
    assert!(
        read(&arr, 11) == read(&arr, 10),
        "the array resynced the secondary"
    );
}
