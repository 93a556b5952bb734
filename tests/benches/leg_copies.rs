//! The kernel's floor under a mirrored write, without hvm: what it costs to take 1 MiB
//! writes off a Unix socket (as an NBD server gets them from fio) and put them in the page
//! cache of one file (nbdkit's file plugin: one receive copy, one copy into the file), of
//! one file in 64 KiB pieces (as array-sim writes a Snapshot-mode write), of two files in
//! 64 KiB pieces (a Synchronized write: one receive copy, one copy per leg), of two files
//! in one `pwrite` each, and of two files with no receive copy (`splice` from the socket
//! into a pipe, `tee` to a second pipe, `splice` of each into its leg: the least copying a
//! mirrored write through a socket can have).
//!
//! CPU time per MiB is what decides a CPU-bound run: on this project's two-core machine
//! fio, the server and the page cache share the cores. The routes take turns; the table
//! prints medians and the ratio of each route's CPU per MiB to the first route's.
//!
//! Run: `cargo bench -p hvm-tests --bench leg_copies`. `HVM_BENCH_ROUNDS` (default 5) sets
//! the rounds, `HVM_BENCH_MIB` (default 4096) the MiB sent per route and round.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use hvm_tests::bench::{env_or, loadavg, median, thread_cpu};
use nix::fcntl::{fcntl, splice, tee, FcntlArg, SpliceFFlags};

const CHUNK: usize = 1 << 20;
const FILE_SIZE: u64 = 512 << 20;

/// A way to take a write off the socket and into the legs.
struct Route {
    name: &'static str,
    /// How many legs get each chunk.
    legs: usize,
    /// The size of each `pwrite` into a leg (array-sim writes its LU files in 64 KiB
    /// pieces, so that the page cache keeps them in 64 KiB folios).
    piece: usize,
    /// `splice` + `tee` instead of a read into a buffer.
    spliced: bool,
}

const PIECE: usize = 64 << 10;

const ROUTES: [Route; 5] = [
    Route {
        name: "one leg, 1 MiB pwrite (nbdkit file)",
        legs: 1,
        piece: CHUNK,
        spliced: false,
    },
    Route {
        name: "one leg, 64 KiB pwrites (hvm Snapshot)",
        legs: 1,
        piece: PIECE,
        spliced: false,
    },
    Route {
        name: "two legs, 64 KiB pwrites (hvm Sync)",
        legs: 2,
        piece: PIECE,
        spliced: false,
    },
    Route {
        name: "two legs, 1 MiB pwrite each",
        legs: 2,
        piece: CHUNK,
        spliced: false,
    },
    Route {
        name: "two legs, splice + tee (no recv copy)",
        legs: 2,
        piece: CHUNK,
        spliced: true,
    },
];

/// The whole machine's busy time (every CPU, `/proc/stat`), so the sender's copy and the
/// kernel's writeback of the legs count too.
fn machine_cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/stat").expect("/proc/stat");
    let line = stat.lines().next().expect("cpu line");
    // user nice system idle iowait irq softirq steal: all but idle and iowait are busy
    let busy: u64 = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, v)| v.parse::<u64>().expect("a /proc/stat field"))
        .sum();
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as u64;
    Duration::from_secs_f64(busy as f64 / hz as f64)
}

/// A leg file filled with 64 KiB writes, as array-sim writes its LU files (the page
/// cache then holds it in 64 KiB folios).
fn leg(path: &Path) -> File {
    let mut f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(path)
        .expect("create leg");
    let piece = vec![1u8; PIECE];
    for _ in 0..FILE_SIZE / piece.len() as u64 {
        f.write_all(&piece).expect("fill leg");
    }
    f
}

fn pipe_of(size: usize) -> (OwnedFd, OwnedFd) {
    let (r, w) = nix::unistd::pipe().expect("pipe");
    fcntl(&w, FcntlArg::F_SETPIPE_SZ(size as i32)).expect("F_SETPIPE_SZ");
    (r, w)
}

/// Moves exactly `len` bytes from `from` to `to` (at `off` when `to` is a file).
fn splice_all(from: impl AsFd, to: impl AsFd, mut off: Option<i64>, len: usize) {
    let mut left = len;
    while left > 0 {
        let n = splice(
            &from,
            None,
            &to,
            off.as_mut(),
            left,
            SpliceFFlags::SPLICE_F_MOVE,
        )
        .expect("splice");
        assert!(n > 0, "splice moved nothing with {left} bytes left");
        left -= n;
    }
}

struct Receiver {
    legs: [File; 2],
    buf: Vec<u8>,
    pipes: [(OwnedFd, OwnedFd); 2],
}

impl Receiver {
    fn chunk(&mut self, route: &Route, sock: &mut UnixStream, off: u64) {
        if route.spliced {
            return self.chunk_spliced(sock, off);
        }
        sock.read_exact(&mut self.buf).expect("receive");
        for leg in &self.legs[..route.legs] {
            for (i, piece) in self.buf.chunks(route.piece).enumerate() {
                let at = off + (i * route.piece) as u64;
                leg.write_all_at(piece, at).expect("write a leg");
            }
        }
    }

    fn chunk_spliced(&mut self, sock: &mut UnixStream, off: u64) {
        let [(r0, w0), (r1, w1)] = &self.pipes;
        splice_all(&*sock, w0, None, CHUNK);
        let teed = tee(r0, w1, CHUNK, SpliceFFlags::empty()).expect("tee");
        assert_eq!(teed, CHUNK, "tee copied part of a chunk");
        splice_all(r0, &self.legs[0], Some(off as i64), CHUNK);
        splice_all(r1, &self.legs[1], Some(off as i64), CHUNK);
    }
}

/// One route's round.
#[derive(Clone, Copy)]
struct Sample {
    /// MB/s until the last chunk is in the legs' page cache.
    mb_per_s: f64,
    /// The receiving thread's CPU time per MiB, in ms.
    receiver_ms: f64,
    /// The machine's busy time per MiB, in ms, the legs' sync included.
    machine_ms: f64,
}

/// The data the sender sends: every 64 KiB piece starts with the chunk's index, and the
/// rest is 7s.
fn stamp(data: &mut [u8], index: u64) {
    for piece in data.chunks_mut(PIECE) {
        piece[..8].copy_from_slice(&index.to_le_bytes());
    }
}

/// One route, one round, sending chunks numbered from `first` (each round's numbers are
/// new, so what an earlier route left in a leg never passes the check). The legs are
/// synced after the timed part, and their writeback counts in the machine's time.
fn round(rx: &mut Receiver, route: &Route, mib: usize, first: u64) -> Sample {
    let (mut tx, mut sock) = UnixStream::pair().expect("socketpair");
    let sender = std::thread::spawn(move || {
        let mut data = vec![7u8; CHUNK];
        for i in 0..mib as u64 {
            stamp(&mut data, first + i);
            tx.write_all(&data).expect("send");
        }
    });
    let (start, cpu, all) = (Instant::now(), thread_cpu(), machine_cpu());
    for i in 0..mib as u64 {
        rx.chunk(route, &mut sock, i * CHUNK as u64 % FILE_SIZE);
    }
    let (secs, cpu) = (start.elapsed().as_secs_f64(), thread_cpu() - cpu);
    sender.join().expect("sender");
    for leg in &rx.legs {
        leg.sync_data().expect("sync leg");
    }
    let all = machine_cpu() - all;
    check_legs(rx, route, mib as u64, first);
    let per_mib = |d: Duration| d.as_secs_f64() * 1e3 / mib as f64;
    Sample {
        mb_per_s: (mib * CHUNK) as f64 / 1e6 / secs,
        receiver_ms: per_mib(cpu),
        machine_ms: per_mib(all),
    }
}

/// Every 64 KiB piece of every 1 MiB slot of each leg the route wrote starts with the
/// index of the last chunk sent to that slot, followed by 7s, so a route that loses,
/// misplaces or truncates a piece fails the bench.
fn check_legs(rx: &Receiver, route: &Route, mib: u64, first: u64) {
    let slots = FILE_SIZE / CHUNK as u64;
    for slot in 0..slots.min(mib) {
        let last = first + slot + (mib - 1 - slot) / slots * slots;
        for (n, leg) in rx.legs[..route.legs].iter().enumerate() {
            for piece in 0..(CHUNK / PIECE) as u64 {
                let at = slot * CHUNK as u64 + piece * PIECE as u64;
                let mut head = [0u8; 16];
                leg.read_exact_at(&mut head, at).expect("read leg");
                let index = u64::from_le_bytes(head[..8].try_into().expect("8 bytes"));
                assert_eq!(
                    index, last,
                    "leg {n}, slot {slot}, piece {piece}: wrong chunk"
                );
                assert_eq!(head[8..], [7u8; 8], "leg {n} at {at}: other data");
            }
        }
    }
}

fn main() {
    let rounds: usize = env_or("HVM_BENCH_ROUNDS", 5);
    let mib: usize = env_or("HVM_BENCH_MIB", 4096);
    let dir = tempfile::tempdir().expect("tempdir");
    let mut rx = Receiver {
        legs: [leg(&dir.path().join("leg0")), leg(&dir.path().join("leg1"))],
        buf: vec![0u8; CHUNK],
        pipes: [pipe_of(CHUNK), pipe_of(CHUNK)],
    };
    for leg in &rx.legs {
        leg.sync_data().expect("sync leg");
    }
    let load = loadavg();
    let mut results: Vec<Vec<Sample>> = vec![Vec::new(); ROUTES.len()];
    let mut first = 0;
    for _ in 0..rounds {
        for (i, route) in ROUTES.iter().enumerate() {
            results[i].push(round(&mut rx, route, mib, first));
            first += mib as u64;
        }
    }
    println!(
        "1 MiB writes off a Unix socket into 512 MiB files in 64 KiB folios, {mib} MiB per route and round, medians of {rounds} rounds (routes in turns); load average {load}"
    );
    report(&results);
    println!("load average after: {}", loadavg());
}

fn report(results: &[Vec<Sample>]) {
    println!(
        "{:<42} {:>6} {:>11} {:>7} {:>11} {:>7}",
        "route", "MB/s", "receiver ms", "vs 1", "machine ms", "vs 1"
    );
    let med = |rs: &[Sample], f: fn(&Sample) -> f64| median(&rs.iter().map(f).collect::<Vec<_>>());
    let rx1 = med(&results[0], |s| s.receiver_ms);
    let all1 = med(&results[0], |s| s.machine_ms);
    for (route, rs) in ROUTES.iter().zip(results) {
        let name = route.name;
        let mbs = med(rs, |s| s.mb_per_s);
        let (rx, all) = (med(rs, |s| s.receiver_ms), med(rs, |s| s.machine_ms));
        println!(
            "{name:<42} {mbs:>6.0} {rx:>11.3} {:>6.2}x {all:>11.3} {:>6.2}x",
            rx / rx1,
            all / all1
        );
    }
    println!("ms: CPU time per MiB, of the receiving thread and of everything on the machine (the sender, the receiver and the legs' writeback among it)");
}
