//! The NBD server against raw protocol bytes and real clients, over an in-memory export.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};

use hvm_host_agent::nbd::export::{self, Export, ExportError, Exports, HVM_DIRTY};
use hvm_host_agent::nbd::proto as p;
use hvm_host_agent::nbd::server::{self, Limits};

/// A RAM disk that records which 512-byte sectors were written (its "hvm:dirty").
struct MemExport {
    data: Mutex<Vec<u8>>,
    dirty: Mutex<BTreeSet<u64>>,
    read_only: bool,
}

impl MemExport {
    fn new(size: usize, read_only: bool) -> Arc<MemExport> {
        Arc::new(MemExport {
            data: Mutex::new(vec![0; size]),
            dirty: Mutex::default(),
            read_only,
        })
    }
}

impl Export for MemExport {
    fn size(&self) -> u64 {
        self.data.lock().unwrap().len() as u64
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn multi_conn(&self) -> bool {
        true
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), ExportError> {
        let d = self.data.lock().unwrap();
        buf.copy_from_slice(&d[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
    fn write(&self, offset: u64, data: &[u8], _fua: bool) -> Result<(), ExportError> {
        self.data.lock().unwrap()[offset as usize..offset as usize + data.len()]
            .copy_from_slice(data);
        let mut dirty = self.dirty.lock().unwrap();
        for s in offset / 512..(offset + data.len() as u64).div_ceil(512) {
            dirty.insert(s);
        }
        Ok(())
    }
    fn flush(&self) -> Result<(), ExportError> {
        Ok(())
    }
    fn meta_contexts(&self) -> Vec<&'static str> {
        vec![export::BASE_ALLOCATION, HVM_DIRTY]
    }
    fn block_status(
        &self,
        context: &str,
        offset: u64,
        len: u32,
    ) -> Result<Vec<(u32, u32)>, ExportError> {
        if context != HVM_DIRTY {
            return Ok(vec![(len, 0)]);
        }
        let dirty = self.dirty.lock().unwrap();
        let mut out: Vec<(u32, u32)> = Vec::new();
        for s in offset / 512..(offset + u64::from(len)).div_ceil(512) {
            let f = u32::from(dirty.contains(&s)) * p::STATE_DIRTY;
            match out.last_mut() {
                Some((l, lf)) if *lf == f => *l += 512,
                _ => out.push((512, f)),
            }
        }
        Ok(out)
    }
}

/// An export whose reads at offset 0 wait until the test opens the gate: a slow backend.
#[derive(Default)]
struct GatedExport {
    open: Mutex<bool>,
    opened: std::sync::Condvar,
}

impl GatedExport {
    fn open(&self) {
        *self.open.lock().unwrap() = true;
        self.opened.notify_all();
    }
}

impl Export for GatedExport {
    fn size(&self) -> u64 {
        1 << 20
    }
    fn read_only(&self) -> bool {
        true
    }
    fn multi_conn(&self) -> bool {
        true
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), ExportError> {
        if offset == 0 {
            let mut open = self.open.lock().unwrap();
            while !*open {
                open = self.opened.wait(open).unwrap();
            }
        }
        buf.fill(0x6b);
        Ok(())
    }
    fn write(&self, _offset: u64, _data: &[u8], _fua: bool) -> Result<(), ExportError> {
        Err(ExportError::new(export::errno::EPERM, "read-only"))
    }
    fn flush(&self) -> Result<(), ExportError> {
        Ok(())
    }
}

struct Server {
    sock: PathBuf,
    dir: tempfile::TempDir,
    _rt: tokio::runtime::Runtime,
}

const SIZE: usize = 4 << 20;

fn start() -> (Server, Arc<MemExport>) {
    start_with(Limits::default())
}

fn start_with(limits: Limits) -> (Server, Arc<MemExport>) {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("nbd.sock");
    let disk = MemExport::new(SIZE, false);
    let mut map: BTreeMap<String, Arc<dyn Export>> = BTreeMap::new();
    map.insert("disk".into(), disk.clone());
    map.insert("ro".into(), MemExport::new(SIZE, true));
    map.insert("gated".into(), gated());
    let exports: Arc<dyn Exports> = Arc::new(map);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let listener = rt
        .block_on(async { tokio::net::UnixListener::bind(&sock) })
        .unwrap();
    rt.spawn(server::run_unix(
        listener,
        exports,
        limits,
        std::future::pending(),
    ));
    (Server { sock, dir, _rt: rt }, disk)
}

/// The one gated export of every test server.
fn gated() -> Arc<GatedExport> {
    static GATED: std::sync::OnceLock<Arc<GatedExport>> = std::sync::OnceLock::new();
    GATED.get_or_init(Arc::default).clone()
}

/// A raw client in transmission on `export`, with simple replies; reads time out so a
/// stalled server fails the test instead of hanging it.
fn raw_client(s: &Server, export: &str) -> UnixStream {
    let mut c = UnixStream::connect(&s.sock).unwrap();
    c.set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    let mut g = [0u8; 18];
    c.read_exact(&mut g).unwrap();
    c.write_all(&3u32.to_be_bytes()).unwrap();
    let mut d = (export.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(export.as_bytes());
    d.extend_from_slice(&0u16.to_be_bytes());
    let mut h = p::IHAVEOPT.to_be_bytes().to_vec();
    h.extend_from_slice(&p::OPT_GO.to_be_bytes());
    h.extend_from_slice(&(d.len() as u32).to_be_bytes());
    h.extend_from_slice(&d);
    c.write_all(&h).unwrap();
    loop {
        let mut h = [0u8; 20];
        c.read_exact(&mut h).unwrap();
        let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
        c.read_exact(&mut vec![0u8; len]).unwrap();
        assert!(
            kind == p::REP_ACK || kind == p::REP_INFO,
            "GO {export}: reply {kind:#x}"
        );
        if kind == p::REP_ACK {
            return c;
        }
    }
}

fn send_read(c: &mut UnixStream, cookie: u64, offset: u64, len: u32) {
    let r = p::Request {
        flags: 0,
        kind: p::CMD_READ,
        cookie,
        offset,
        len,
    };
    c.write_all(&r.encode()).unwrap();
}

/// The next simple reply: (cookie, error), with `len` bytes of data read when it is 0.
fn read_reply(c: &mut UnixStream, len: usize) -> (u64, u32, Vec<u8>) {
    let mut h = [0u8; 16];
    c.read_exact(&mut h).unwrap();
    assert_eq!(&h[..4], &p::SIMPLE_REPLY_MAGIC.to_be_bytes());
    let error = u32::from_be_bytes(h[4..8].try_into().unwrap());
    let cookie = u64::from_be_bytes(h[8..16].try_into().unwrap());
    let mut data = Vec::new();
    if error == 0 {
        data = vec![0u8; len];
        c.read_exact(&mut data).unwrap();
    }
    (cookie, error, data)
}

/// A request held up in a slow export stalls neither the requests behind it on its own
/// connection (replies go out in completion order) nor other exports.
#[test]
fn slow_export_stalls_nobody_else() {
    let (s, disk) = start();
    disk.write(8192, &[0x42; 512], false).unwrap();
    let mut a = raw_client(&s, "gated");
    send_read(&mut a, 1, 0, 4096); // held at the gate
    send_read(&mut a, 2, 4096, 4096);
    let (cookie, error, data) = read_reply(&mut a, 4096);
    assert_eq!(
        (cookie, error),
        (2, 0),
        "the later request is answered first"
    );
    assert!(data.iter().all(|b| *b == 0x6b));
    let mut b = raw_client(&s, "disk");
    send_read(&mut b, 7, 8192, 512);
    let (cookie, error, data) = read_reply(&mut b, 512);
    assert_eq!((cookie, error), (7, 0));
    assert!(data.iter().all(|b| *b == 0x42));
    gated().open();
    let (cookie, error, _) = read_reply(&mut a, 4096);
    assert_eq!((cookie, error), (1, 0));
}

fn uri(s: &Server, export: &str) -> String {
    format!("nbd+unix:///{export}?socket={}", s.sock.display())
}

fn tool(name: &str) -> Command {
    // A missing tool is a loud failure: scripts/test.sh installs them.
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {name}"))
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap()
        .success();
    assert!(
        found,
        "{name} is not installed (scripts/test.sh installs it)"
    );
    Command::new(name)
}

#[test]
fn qemu_io_writes_and_reads_back() {
    let (s, disk) = start();
    let out = tool("qemu-io")
        .args(["-f", "raw", &uri(&s, "disk")])
        .args(["-c", "write -P 0xab 0 1M", "-c", "read -P 0xab 0 1M"])
        .args([
            "-c",
            "write -P 0xcd 1000 3000",
            "-c",
            "read -P 0xcd 1000 3000",
        ])
        .args(["-c", "flush"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !text.contains("Pattern verification failed"),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let d = disk.data.lock().unwrap();
    assert!(d[..1000].iter().all(|b| *b == 0xab));
    assert!(d[1000..4000].iter().all(|b| *b == 0xcd));
}

#[test]
fn qemu_img_convert_copies_the_export() {
    let (s, disk) = start();
    disk.write(512 * 100, &[7u8; 8192], false).unwrap();
    let out_file = s.dir.path().join("copy.img");
    let st = tool("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw", &uri(&s, "disk")])
        .arg(&out_file)
        .status()
        .unwrap();
    assert!(st.success());
    assert!(std::fs::read(&out_file).unwrap() == *disk.data.lock().unwrap());
}

#[test]
fn nbdinfo_lists_and_maps_dirty_ranges() {
    let (s, disk) = start();
    let out = tool("nbdinfo")
        .args(["--list", "--json", &uri(&s, "")])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("\"disk\"") && text.contains("\"ro\""),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    disk.write(4096, &[1; 1024], false).unwrap();
    disk.write(1 << 20, &[1; 512], false).unwrap();
    let out = tool("nbdinfo")
        .args(["--map=hvm:dirty", &uri(&s, "disk")])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    // Lines: offset, length, type; dirty ranges have type 1.
    let dirty: Vec<(u64, u64)> = text
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 3 && f[2] == "1").then(|| (f[0].parse().unwrap(), f[1].parse().unwrap()))
        })
        .collect();
    assert_eq!(dirty, vec![(4096, 1024), (1 << 20, 512)], "{text}");
}

/// Raw bytes: bad options are answered and negotiation continues; bad requests get the
/// errno the spec says and transmission continues.
#[test]
fn raw_protocol_errors() {
    let (s, _disk) = start();
    let mut c = UnixStream::connect(&s.sock).unwrap();
    let mut g = [0u8; 18];
    c.read_exact(&mut g).unwrap();
    assert_eq!(g, p::greeting());
    c.write_all(&3u32.to_be_bytes()).unwrap();
    let opt = |c: &mut UnixStream, option: u32, data: &[u8]| {
        let mut h = p::IHAVEOPT.to_be_bytes().to_vec();
        h.extend_from_slice(&option.to_be_bytes());
        h.extend_from_slice(&(data.len() as u32).to_be_bytes());
        h.extend_from_slice(data);
        c.write_all(&h).unwrap();
    };
    let reply = |c: &mut UnixStream| -> u32 {
        let mut h = [0u8; 20];
        c.read_exact(&mut h).unwrap();
        assert_eq!(&h[..8], &p::REPLY_MAGIC.to_be_bytes());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
        let mut d = vec![0u8; len];
        c.read_exact(&mut d).unwrap();
        u32::from_be_bytes(h[12..16].try_into().unwrap())
    };
    opt(&mut c, 99, &[]);
    assert_eq!(reply(&mut c), p::REP_ERR_UNSUP);
    opt(
        &mut c,
        p::OPT_LIST,
        &vec![0u8; (p::MAX_OPTION_LEN + 10) as usize],
    );
    assert_eq!(reply(&mut c), p::REP_ERR_TOO_BIG);
    let go = |name: &str| {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&0u16.to_be_bytes());
        d
    };
    opt(&mut c, p::OPT_GO, &go("nope"));
    assert_eq!(reply(&mut c), p::REP_ERR_UNKNOWN);
    opt(&mut c, p::OPT_GO, &[0, 0]);
    assert_eq!(reply(&mut c), p::REP_ERR_INVALID);
    opt(&mut c, p::OPT_GO, &go("disk"));
    while reply(&mut c) != p::REP_ACK {}
    let req = |c: &mut UnixStream, kind: u16, flags: u16, offset: u64, len: u32, cookie: u64| {
        c.write_all(
            &p::Request {
                flags,
                kind,
                cookie,
                offset,
                len,
            }
            .encode(),
        )
        .unwrap();
    };
    let simple = |c: &mut UnixStream| -> (u32, u64) {
        let mut h = [0u8; 16];
        c.read_exact(&mut h).unwrap();
        assert_eq!(&h[..4], &p::SIMPLE_REPLY_MAGIC.to_be_bytes());
        (
            u32::from_be_bytes(h[4..8].try_into().unwrap()),
            u64::from_be_bytes(h[8..].try_into().unwrap()),
        )
    };
    req(&mut c, p::CMD_READ, 0, SIZE as u64 - 100, 512, 1);
    assert_eq!(simple(&mut c), (22, 1), "read past the end is EINVAL");
    req(&mut c, p::CMD_WRITE, 0, SIZE as u64 - 100, 512, 2);
    c.write_all(&[0; 512]).unwrap();
    assert_eq!(simple(&mut c), (28, 2), "write past the end is ENOSPC");
    req(&mut c, 77, 0, 0, 0, 3);
    assert_eq!(simple(&mut c), (22, 3), "unknown command is EINVAL");
    req(&mut c, p::CMD_READ, p::CMD_FLAG_FUA, 0, 512, 4);
    assert_eq!(simple(&mut c), (22, 4), "FUA on READ is EINVAL");
    req(&mut c, p::CMD_BLOCK_STATUS, 0, 0, 512, 5);
    assert_eq!(
        simple(&mut c),
        (22, 5),
        "BLOCK_STATUS without a context is EINVAL"
    );
    req(&mut c, p::CMD_READ, 0, 0, 512, 6);
    assert_eq!(simple(&mut c), (0, 6));
    let mut data = [1u8; 512];
    c.read_exact(&mut data).unwrap();
    req(&mut c, p::CMD_DISC, 0, 0, 0, 7);
    assert_eq!(c.read(&mut data).unwrap(), 0, "closed after DISC");

    // A read-only export refuses writes with EPERM; a bad request magic is a hard
    // disconnect; the next client is served.
    let mut c = UnixStream::connect(&s.sock).unwrap();
    c.read_exact(&mut g).unwrap();
    c.write_all(&3u32.to_be_bytes()).unwrap();
    opt(&mut c, p::OPT_GO, &go("ro"));
    while reply(&mut c) != p::REP_ACK {}
    req(&mut c, p::CMD_WRITE, 0, 0, 512, 8);
    c.write_all(&[0; 512]).unwrap();
    assert_eq!(
        simple(&mut c),
        (1, 8),
        "write to a read-only export is EPERM"
    );
    c.write_all(&[0xde; 28]).unwrap();
    let mut b = [0u8; 1];
    assert_eq!(c.read(&mut b).unwrap(), 0);
    let st = tool("qemu-io")
        .args(["-f", "raw", "-r", &uri(&s, "ro"), "-c", "read 0 4k"])
        .status()
        .unwrap();
    assert!(st.success());
}

/// fio's nbd engine, queue depth 16, random writes verified with crc32c.
#[test]
fn fio_nbd_engine_verifies_clean() {
    let (s, _disk) = start();
    let out = tool("fio")
        .args([
            "--name=verify",
            "--ioengine=nbd",
            "--rw=randwrite",
            "--bs=4k",
            "--size=2M",
            "--iodepth=16",
            "--verify=crc32c",
            "--do_verify=1",
            "--output-format=terse",
        ])
        .arg(format!("--uri={}", uri(&s, "disk")))
        // fio leaves its verify state file in its working directory.
        .current_dir(s.dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!String::from_utf8_lossy(&out.stderr).contains("verify: bad"));
}

/// Past the connection cap a client is closed at once; when one leaves, a new one is
/// served. A client that never finishes the handshake is closed at the deadline.
#[test]
fn connection_cap_and_handshake_deadline() {
    let limits = Limits {
        connections: 2,
        handshake: std::time::Duration::from_millis(300),
        ..Limits::default()
    };
    let (s, _disk) = start_with(limits);
    let mut g = [0u8; 18];
    let mut a = UnixStream::connect(&s.sock).unwrap();
    a.read_exact(&mut g).unwrap();
    let mut b = UnixStream::connect(&s.sock).unwrap();
    b.read_exact(&mut g).unwrap();
    let mut c = UnixStream::connect(&s.sock).unwrap();
    assert_eq!(
        c.read(&mut g).unwrap_or(0),
        0,
        "the third connection is closed"
    );
    // a and b idle past the handshake deadline and are closed; slots free up.
    std::thread::sleep(std::time::Duration::from_millis(500));
    let mut one = [0u8; 1];
    assert_eq!(
        a.read(&mut one).unwrap_or(0),
        0,
        "closed at the handshake deadline"
    );
    drop((a, b));
    std::thread::sleep(std::time::Duration::from_millis(50));
    let mut d = UnixStream::connect(&s.sock).unwrap();
    d.read_exact(&mut g).unwrap();
    assert_eq!(g, p::greeting());
}

#[test]
fn own_client_writes_reads_flushes_and_is_refused_cleanly() {
    use hvm_host_agent::nbd::client::{Client, ClientError};
    let (s, disk) = start();
    let mut c = Client::connect(&s.sock, "disk").unwrap();
    assert_eq!(c.size(), SIZE as u64);
    assert!(!c.read_only());
    c.write(8192, &[0x5a; 65536], true).unwrap();
    c.flush().unwrap();
    let mut back = vec![0u8; 65536];
    c.read(8192, &mut back).unwrap();
    assert!(back.iter().all(|b| *b == 0x5a));
    assert_eq!(disk.data.lock().unwrap()[8192], 0x5a);
    // Past the end: the server's error reply, not a broken connection.
    let e = c.read(SIZE as u64, &mut back).unwrap_err();
    assert!(matches!(e, ClientError::Command { op: "read", .. }), "{e}");
    c.read(0, &mut back[..512]).unwrap();
    c.disconnect();

    let ro = Client::connect(&s.sock, "ro").unwrap();
    assert!(ro.read_only());
    let e = Client::connect(&s.sock, "nope").err().unwrap();
    assert!(e.to_string().contains("refused"), "{e}");
}
