//! EP 1 058 190's fourth embodiment and after (issue 22): two `array-sim serve` daemons
//! joined by a channel path (Fig. 8, [0053]-[0057]), the triplex across them ([0058]),
//! the copy by the switch ([0059]) and by the backup device ([0060]), and remote
//! difference bitmaps across a restart. Each backup medium is restored and compared
//! with the data of its split instant while a writer kept writing the user volume.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command as Process, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use array_sim::channel::json_command;
use array_sim::channel::{ChannelClient, ChannelOp, ChannelReply, PortCounters};
use array_sim::client::{ArrayClient, SocketClient};
use array_sim::remote::{RemotePairStatus, RemoteState};
use array_sim::server::Address;
use array_sim::switch::{AgentCounters, AgentOp, AgentReply};
use array_sim::tape::Tape;
use hvm_core::array_backup::{Area, ArrayCounters, BackupOp, BackupReply, JobState, PairState};
use hvm_core::backend::Backend;
use hvm_core::LuId;

const BLOCKS: u64 = 4096; // 2 MiB volumes
const BS: usize = 512;
const N: u64 = 8; // blocks per bit

type Client = ArrayClient<SocketClient>;

/// A daemon of this test: an array (host port and channel port) or a copy agent.
struct Daemon {
    child: Child,
    addr: Address,
    channel: Option<String>,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Daemon {
    /// Start `array-sim` with `args`; wait for its `lines` address lines.
    fn spawn(args: &[&str], lines: usize) -> Daemon {
        let mut child = Process::new(env!("CARGO_BIN_EXE_array-sim"))
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .expect("start array-sim");
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut addrs = Vec::new();
        for _ in 0..lines {
            let mut line = String::new();
            out.read_line(&mut line).unwrap();
            let addr = line.trim().rsplit(' ').next().unwrap().to_string();
            assert!(addr.starts_with("unix:"), "{line:?}");
            addrs.push(addr);
        }
        Daemon {
            child,
            addr: addrs[0].parse().unwrap(),
            channel: addrs.get(1).cloned(),
        }
    }

    /// The array `name` in `root/name` (config `root/name.yaml`), data kept across
    /// restarts.
    fn array(root: &Path, name: &str) -> Daemon {
        let dir = root.join(name);
        let (config, host, chan) = (
            root.join(format!("{name}.yaml")),
            dir.join("host.sock"),
            dir.join("chan.sock"),
        );
        std::fs::create_dir_all(&dir).unwrap();
        let data = dir.join("data");
        let args = [
            "serve",
            "--config",
            config.to_str().unwrap(),
            "--listen",
            &format!("unix:{}", host.display()),
            "--dir",
            data.to_str().unwrap(),
            "--channel-listen",
            &format!("unix:{}", chan.display()),
        ];
        Daemon::spawn(&args, 2)
    }

    fn client(&self) -> Client {
        ArrayClient::new(SocketClient::connect(&self.addr).unwrap())
    }

    /// An orderly stop (SIGTERM), waiting for the process to end.
    fn stop(mut self) {
        let pid = self.child.id().to_string();
        let ok = Process::new("kill").args(["-TERM", &pid]).status().unwrap();
        assert!(ok.success());
        assert!(self.child.wait().unwrap().success());
    }
}

/// Arrays `a` and `b` joined by a path configured on both; `a` has LUs 10 and 11, `b`
/// LUs 20-22; each has two backup devices.
fn configs(root: &Path) {
    let cfg = |me: &str, peer: &str, lus: &[u8]| {
        let lus: String = lus
            .iter()
            .map(|l| format!("  - {{lun: {l}, blocks: {BLOCKS}, disk: d{}}}\n", l % 2))
            .collect();
        let chan = root.join(peer).join("chan.sock");
        format!(
            "kind: mode-select
disks: [{{name: d0}}, {{name: d1}}]
lus:
{lus}backup:
  blocks_per_bit: {N}
  devices: [{{name: tape0, file: tape0.rec}}, {{name: tape1, file: tape1.rec}}]
channel:
  name: {me}
  paths:
    - {{ name: to-{peer}, peer: {peer}, address: 'unix:{}' }}
",
            chan.display()
        )
    };
    std::fs::write(root.join("a.yaml"), cfg("a", "b", &[10, 11])).unwrap();
    std::fs::write(root.join("b.yaml"), cfg("b", "a", &[20, 21, 22])).unwrap();
}

fn chan(c: &Client, o: ChannelOp) -> ChannelReply {
    c.channel(&o)
        .unwrap_or_else(|e| panic!("{o:?} failed: {e}"))
}

fn op(c: &Client, o: BackupOp) -> BackupReply {
    c.backup(&o).unwrap_or_else(|e| panic!("{o:?} failed: {e}"))
}

fn remote(c: &Client, lu: u32) -> RemotePairStatus {
    match chan(c, ChannelOp::RemotePairStatus { lu }) {
        ChannelReply::RemotePair(p) => p,
        r => panic!("{r:?}"),
    }
}

fn wait_remote(c: &Client, lu: u32, want: RemoteState) -> RemotePairStatus {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let p = remote(c, lu);
        if p.state == Some(want) {
            return p;
        }
        assert!(
            Instant::now() < deadline,
            "remote pair of LU {lu}: {p:?}, never {want:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn wait_local(c: &Client, lu: u32, want: PairState) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match op(c, BackupOp::PairStatus { lu }) {
            BackupReply::Pair(p) if p.state == want => return,
            r => assert!(
                Instant::now() < deadline,
                "pair of LU {lu}: {r:?}, never {want}"
            ),
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn wait_job(c: &Client, id: u32) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match op(c, BackupOp::Job { id }) {
            BackupReply::Job(j) if j.state == JobState::Done => return,
            BackupReply::Job(j) if j.state == JobState::Failed => {
                panic!("job {id}: {:?}", j.message)
            }
            _ => assert!(Instant::now() < deadline, "job {id} never ended"),
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn started(r: BackupReply) -> u32 {
    match r {
        BackupReply::Started { job } => job,
        r => panic!("{r:?}"),
    }
}

fn array_counters(c: &Client) -> ArrayCounters {
    match op(c, BackupOp::Counters) {
        BackupReply::Counters(x) => x,
        r => panic!("{r:?}"),
    }
}

fn port_counters(c: &Client) -> PortCounters {
    match chan(c, ChannelOp::PortCounters) {
        ChannelReply::Counters(x) => x,
        r => panic!("{r:?}"),
    }
}

fn read_lu(c: &Client, lu: u32) -> Vec<u8> {
    let mut b = vec![0u8; BLOCKS as usize * BS];
    c.read(LuId(lu), 0, &mut b).unwrap();
    b
}

fn whole() -> Vec<Area> {
    vec![Area {
        start: 0,
        blocks: BLOCKS,
    }]
}

/// Acknowledged writes, in order: LBA and data.
type Log = Arc<Mutex<Vec<(u64, Vec<u8>)>>>;

/// Writes 4 KiB blocks with their sequence number to one volume, one at a time, keeping
/// the log of acknowledged writes so that the image after any count can be rebuilt.
struct Writer {
    issued: Arc<AtomicU64>,
    log: Log,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    base: Vec<u8>,
}

impl Writer {
    fn start(d: &Daemon, lu: u32) -> Writer {
        let c = d.client();
        let base = read_lu(&c, lu);
        let issued = Arc::new(AtomicU64::new(0));
        let log: Log = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (i, l, s) = (issued.clone(), log.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ u64::from(lu);
            while !s.load(Ordering::Relaxed) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let lba = (x % (BLOCKS / 8)) * 8;
                let seq = i.fetch_add(1, Ordering::SeqCst) + 1;
                let mut data = vec![0u8; 8 * BS];
                for (k, ch) in data.chunks_mut(8).enumerate() {
                    ch.copy_from_slice(&(seq << 16 | k as u64).to_le_bytes());
                }
                c.write(LuId(lu), lba, &data, false).unwrap();
                l.lock().unwrap().push((lba, data));
            }
        });
        Writer {
            issued,
            log,
            stop,
            thread: Some(thread),
            base,
        }
    }

    fn acked(&self) -> usize {
        self.log.lock().unwrap().len()
    }

    fn issued(&self) -> usize {
        self.issued.load(Ordering::SeqCst) as usize
    }

    fn image(&self, k: usize) -> Vec<u8> {
        let mut img = self.base.clone();
        for (lba, d) in self.log.lock().unwrap().iter().take(k) {
            img[*lba as usize * BS..][..d.len()].copy_from_slice(d);
        }
        img
    }

    fn more(&self, n: usize) {
        let want = self.acked() + n;
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.acked() < want {
            assert!(Instant::now() < deadline, "the writer stalled");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The count of writes within `lo..=hi` whose image equals `got`.
fn matches_instant(w: &Writer, lo: usize, hi: usize, got: &[u8]) -> usize {
    let hi = hi.min(w.acked());
    (lo..=hi)
        .find(|k| w.image(*k) == got)
        .unwrap_or_else(|| panic!("no instant among writes {lo}..={hi} matches the backup"))
}

/// Restore a medium into a zeroed image of a volume.
fn restore(medium: &Path) -> Vec<u8> {
    let tape = Tape::open(medium).unwrap();
    let out = medium.with_extension("restored");
    let mut f = std::fs::File::create(&out).unwrap();
    f.set_len(BLOCKS * BS as u64).unwrap();
    tape.restore(&mut f).unwrap();
    std::fs::read(&out).unwrap()
}

/// Two arrays joined by a path; the remote pair A:10 → B:20 formed and duplex.
fn joined(root: &Path) -> (Daemon, Daemon) {
    configs(root);
    let b = Daemon::array(root, "b");
    let a = Daemon::array(root, "a");
    let ca = a.client();
    chan(
        &ca,
        ChannelOp::RemotePairCreate {
            primary: 10,
            path: "to-b".into(),
            secondary: 20,
        },
    );
    wait_remote(&ca, 10, RemoteState::Duplex);
    (a, b)
}

fn medium(root: &Path, array: &str, device: &str) -> PathBuf {
    root.join(array).join("data").join(format!("{device}.rec"))
}

/// [0053]-[0057]: the secondary is in the other array; hosts cannot write it; a split
/// freezes it and the other array copies it to its backup device ([0029]-[0030]) while
/// the host writes the user volume; the resync copies only the marked units ([0031]);
/// then the same backup in one command ([0037]-[0040] across the path).
#[test]
fn remote_pair_split_ccopy_and_resync_with_a_writer_on_the_primary() {
    let root = tempfile::tempdir().unwrap();
    let (a, b) = joined(root.path());
    let (ca, cb) = (a.client(), b.client());
    let e = cb.write(LuId(20), 0, &[1u8; BS], false).unwrap_err();
    assert!(
        e.message.contains("secondary volume of LU 10 of array a"),
        "{e}"
    );
    let ccopy = |lu: u32, device: &str| BackupOp::Ccopy {
        lu,
        device: device.into(),
        ranges: whole(),
        auto: false,
    };
    let e = cb.backup(&ccopy(20, "tape0")).unwrap_err();
    assert!(e.message.contains("not split"), "{e}");
    let mut w = Writer::start(&a, 10);
    w.more(100);
    let lo = w.acked();
    chan(&ca, ChannelOp::RemotePairSplit { lu: 10 });
    let hi = w.issued();
    wait_job(&cb, started(op(&cb, ccopy(20, "tape0"))));
    w.more(100);
    w.stop();
    let at = matches_instant(&w, lo, hi, &restore(&medium(root.path(), "b", "tape0")));
    assert!(at >= lo);
    let p = remote(&ca, 10);
    assert_eq!(p.state, Some(RemoteState::Split));
    assert!(p.diff_units > 0 && p.diff_units < p.units, "{p:?}");
    chan(&ca, ChannelOp::RemotePairResync { lu: 10 });
    let q = wait_remote(&ca, 10, RemoteState::Duplex);
    assert_eq!(
        q.copied_bytes - p.copied_bytes,
        p.diff_units * N * BS as u64,
        "[0031]"
    );
    assert_eq!(read_lu(&cb, 20), read_lu(&ca, 10));
    // [0037]-[0040] over the path: one command to array a.
    let mut w = Writer::start(&a, 10);
    w.more(50);
    let lo = w.acked();
    let job = match chan(
        &ca,
        ChannelOp::RemoteAuto {
            lu: 10,
            device: "tape1".into(),
            ranges: whole(),
        },
    ) {
        ChannelReply::Started { job } => job,
        r => panic!("{r:?}"),
    };
    let hi = w.issued();
    wait_job(&cb, job);
    wait_remote(&ca, 10, RemoteState::Duplex);
    w.more(50);
    w.stop();
    matches_instant(&w, lo, hi, &restore(&medium(root.path(), "b", "tape1")));
    assert_eq!(read_lu(&cb, 20), read_lu(&ca, 10));
}

/// The path drops, by an administrator's command or by the death of the other array:
/// the pair suspends, the host goes on writing the user volume, and when the path is
/// back the resync copies only the units marked meanwhile ([0031]).
#[test]
fn the_path_drops_and_comes_back() {
    let root = tempfile::tempdir().unwrap();
    let (a, b) = joined(root.path());
    let mut b = Some(b);
    let ca = a.client();
    for kill in [false, true] {
        let mut w = Writer::start(&a, 10);
        w.more(20);
        if kill {
            drop(b.take());
        } else {
            chan(
                &ca,
                ChannelOp::PathDisable {
                    path: "to-b".into(),
                },
            );
        }
        w.more(20);
        let p = wait_remote(&ca, 10, RemoteState::Suspended);
        assert!(p.reason.is_some(), "{p:?}");
        w.more(200);
        w.stop();
        let e = ca
            .channel(&ChannelOp::RemotePairResync { lu: 10 })
            .unwrap_err();
        assert!(e.message.contains("cannot start"), "{e}");
        if kill {
            b = Some(Daemon::array(root.path(), "b"));
        } else {
            chan(
                &ca,
                ChannelOp::PathEnable {
                    path: "to-b".into(),
                },
            );
        }
        let p = remote(&ca, 10);
        assert!(
            p.diff_units > 0 && p.diff_units < p.units,
            "kill {kill}: {p:?}"
        );
        chan(&ca, ChannelOp::RemotePairResync { lu: 10 });
        let q = wait_remote(&ca, 10, RemoteState::Duplex);
        assert_eq!(
            q.copied_bytes - p.copied_bytes,
            p.diff_units * N * BS as u64,
            "kill {kill}"
        );
        let cb = b.as_ref().unwrap().client();
        assert_eq!(read_lu(&cb, 20), read_lu(&ca, 10), "kill {kill}");
    }
}

/// [0058]: A:10 → B:20 → B:21, a triplex across the two arrays; the backup is taken
/// from the third copy on array b while the remote pair stays duplex.
#[test]
fn triplex_backup_from_the_remote_third_copy() {
    let root = tempfile::tempdir().unwrap();
    let (a, b) = joined(root.path());
    let (ca, cb) = (a.client(), b.client());
    op(
        &cb,
        BackupOp::PairCreate {
            primary: 20,
            secondary: 21,
        },
    );
    wait_local(&cb, 21, PairState::Duplex);
    let e = cb
        .backup(&BackupOp::PairCreate {
            primary: 22,
            secondary: 20,
        })
        .unwrap_err();
    assert!(
        e.message.contains("secondary volume of LU 10 of array a"),
        "{e}"
    );
    let mut w = Writer::start(&a, 10);
    w.more(100);
    let lo = w.acked();
    op(
        &cb,
        BackupOp::PairSplit {
            lu: 21,
            areas: vec![],
        },
    );
    let hi = w.issued();
    let job = started(op(
        &cb,
        BackupOp::Ccopy {
            lu: 21,
            device: "tape0".into(),
            ranges: whole(),
            auto: false,
        },
    ));
    wait_job(&cb, job);
    w.more(100);
    assert_eq!(
        remote(&ca, 10).state,
        Some(RemoteState::Duplex),
        "the remote pair stays duplex"
    );
    w.stop();
    assert_eq!(
        read_lu(&cb, 20),
        read_lu(&ca, 10),
        "the second copy kept every update"
    );
    matches_instant(&w, lo, hi, &restore(&medium(root.path(), "b", "tape0")));
    op(
        &cb,
        BackupOp::PairResync {
            lu: 21,
            areas: vec![],
        },
    );
    wait_local(&cb, 21, PairState::Duplex);
    assert_eq!(read_lu(&cb, 21), read_lu(&ca, 10));
}

fn agent(c: &Client, o: &AgentOp) -> AgentReply {
    json_command(c, o).unwrap_or_else(|e| panic!("{o:?}: {e}"))
}

fn agent_counters(c: &Client) -> AgentCounters {
    match agent(c, &AgentOp::Counters) {
        AgentReply::Counters(x) => x,
        r => panic!("{r:?}"),
    }
}

/// [0059]: one command to the switch splits the pair, copies the secondary from the
/// array's channel port to the backup device and resyncs; [0060]: after a split, the
/// backup device copies by itself. The counters show the bytes went array → switch →
/// device, or array → device: no host read them and the array's controller wrote none
/// to a device.
#[test]
fn the_switch_and_the_device_copy_without_host_or_array_controller() {
    let root = tempfile::tempdir().unwrap();
    configs(root.path());
    let a = Daemon::array(root.path(), "a");
    let sw = Daemon::spawn(
        &[
            "switch",
            "--listen",
            &format!("unix:{}", root.path().join("sw.sock").display()),
        ],
        1,
    );
    let media = root.path().join("media");
    let dev = Daemon::spawn(
        &[
            "device",
            "--listen",
            &format!("unix:{}", root.path().join("dev.sock").display()),
            "--dir",
            media.to_str().unwrap(),
        ],
        1,
    );
    let (ca, csw, cdev) = (a.client(), sw.client(), dev.client());
    op(
        &ca,
        BackupOp::PairCreate {
            primary: 10,
            secondary: 11,
        },
    );
    wait_local(&ca, 10, PairState::Duplex);
    let source = a.channel.clone().unwrap();
    let target = format!("unix:{}", root.path().join("dev.sock").display());
    let bytes = BLOCKS * BS as u64;
    let ccopy = |medium: &str| AgentOp::Ccopy {
        source: source.clone(),
        lu: 11,
        ranges: whole(),
        medium: medium.into(),
    };
    let e = json_command::<_, _, AgentReply>(&cdev, &ccopy("early.rec")).unwrap_err();
    assert!(e.message.contains("copy a split secondary"), "{e}");
    let mut w = Writer::start(&a, 10);
    w.more(100);
    let (arr0, port0) = (array_counters(&ca), port_counters(&ca));
    let lo = w.acked();
    let xcopy = AgentOp::Xcopy {
        source: source.clone(),
        lu: 11,
        ranges: whole(),
        target,
        medium: "switch.rec".into(),
        pair: Some(10),
    };
    assert_eq!(agent(&csw, &xcopy), AgentReply::Done { blocks: BLOCKS });
    let hi = w.issued();
    wait_local(&ca, 10, PairState::Duplex);
    let (sw1, dev1) = (agent_counters(&csw), agent_counters(&cdev));
    assert_eq!(
        (sw1.moved_bytes, dev1.received_bytes),
        (bytes, bytes),
        "{sw1:?} {dev1:?}"
    );
    assert!(sw1.command_bytes < 1024, "all the host sent: {sw1:?}");
    // [0060]: split by the host, then one CCOPY to the device.
    w.more(100);
    let lo2 = w.acked();
    op(
        &ca,
        BackupOp::PairSplit {
            lu: 10,
            areas: vec![],
        },
    );
    let hi2 = w.issued();
    assert_eq!(
        agent(&cdev, &ccopy("device.rec")),
        AgentReply::Done { blocks: BLOCKS }
    );
    op(
        &ca,
        BackupOp::PairResync {
            lu: 10,
            areas: vec![],
        },
    );
    wait_local(&ca, 10, PairState::Duplex);
    w.more(50);
    w.stop();
    let (arr1, port1) = (array_counters(&ca), port_counters(&ca));
    let dev2 = agent_counters(&cdev);
    assert_eq!(dev2.pulled_bytes, bytes, "{dev2:?}");
    assert_eq!(
        agent_counters(&csw).moved_bytes,
        bytes,
        "the switch took no part in [0060]"
    );
    assert_eq!(
        arr1.host_read_bytes, arr0.host_read_bytes,
        "no host read the data"
    );
    assert_eq!(
        arr1.device_bytes, arr0.device_bytes,
        "the array's controller wrote no device"
    );
    assert_eq!(
        port1.port_read_bytes - port0.port_read_bytes,
        2 * bytes,
        "read at the channel port"
    );
    matches_instant(&w, lo, hi, &restore(&media.join("switch.rec")));
    matches_instant(&w, lo2, hi2, &restore(&media.join("device.rec")));
}

/// Issue 22 item 4 for remote pairs: the bitmap on the user volume's side survives an
/// orderly restart of that array, and the resync copies only the marked units; after a
/// death of the array a split pair's marks are still exact.
#[test]
fn remote_bitmaps_survive_a_restart() {
    let root = tempfile::tempdir().unwrap();
    let (a, b) = joined(root.path());
    let ca = a.client();
    chan(&ca, ChannelOp::RemotePairSplit { lu: 10 });
    for lba in [0u64, 8, 800, 4088] {
        ca.write(LuId(10), lba, &[7u8; BS], false).unwrap();
    }
    let before = remote(&ca, 10);
    assert_eq!(before.diff_units, 4);
    drop(ca);
    a.stop();
    let a = Daemon::array(root.path(), "a");
    let ca = a.client();
    let after = remote(&ca, 10);
    assert_eq!(
        (after.state, after.diff_units),
        (Some(RemoteState::Split), 4),
        "{after:?}"
    );
    chan(&ca, ChannelOp::RemotePairResync { lu: 10 });
    let q = wait_remote(&ca, 10, RemoteState::Duplex);
    assert_eq!(q.copied_bytes, 4 * N * BS as u64);
    assert_eq!(read_lu(&b.client(), 20), read_lu(&ca, 10));
    // A death of the array (SIGKILL): the split pair's marks were on disk before their
    // writes, so they are exact; a duplex pair may have lost an update between the
    // arrays, so it comes back suspended with every unit marked.
    chan(&ca, ChannelOp::RemotePairSplit { lu: 10 });
    for lba in [16u64, 2000, 2008] {
        ca.write(LuId(10), lba, &[8u8; BS], false).unwrap();
    }
    drop(ca);
    drop(a);
    let a = Daemon::array(root.path(), "a");
    let ca = a.client();
    let p = remote(&ca, 10);
    assert_eq!(
        (p.state, p.diff_units),
        (Some(RemoteState::Split), 3),
        "{p:?}"
    );
    chan(&ca, ChannelOp::RemotePairResync { lu: 10 });
    wait_remote(&ca, 10, RemoteState::Duplex);
    drop(ca);
    drop(a);
    let a = Daemon::array(root.path(), "a");
    let ca = a.client();
    let p = remote(&ca, 10);
    assert_eq!(
        (p.state, p.diff_units),
        (Some(RemoteState::Suspended), p.units),
        "{p:?}"
    );
    chan(&ca, ChannelOp::RemotePairResync { lu: 10 });
    wait_remote(&ca, 10, RemoteState::Duplex);
    assert_eq!(read_lu(&b.client(), 20), read_lu(&ca, 10));
}
