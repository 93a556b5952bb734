//! A throwaway iSCSI target for the tests: `tgtd` (Debian `tgt`, userspace) in the
//! foreground as this process's child, on 127.0.0.1 and a free port, with file-backed
//! LUNs in a temporary directory. It installs nothing: a missing tgtd, tgtadm or ss fails
//! the test loudly (scripts/test.sh installs tgt and iproute2).
//!
//! What the care is for (see ../shared/iscsi/README.md):
//! - tgtd stays up without a listener when its port is taken, so the start checks that
//!   the port is held by our PID, and tries another port if not;
//! - each instance needs its own management socket (`-C N`); a clash makes tgtd exit at
//!   once, and the start tries another N;
//! - tgtd ignores SIGTERM: [`Tgt`]'s drop takes the target offline, drops its
//!   connections, deletes it and the system, and SIGKILLs our PID only if it is still
//!   there; it never signals any other process;
//! - the default login limits (8 KiB PDUs, 256 KiB bursts, InitialR2T) halve 1 MiB write
//!   speed, so they are raised.
//!
//! [`read_lun`] reads a LUN with the test's own libiscsi client (its synchronous API),
//! not through hvm, so a test can compare what reached the target.
#![allow(clippy::unwrap_used)] // test support: a failed unwrap is a failed test

use std::ffi::CString;
use std::net::TcpListener;
use std::os::raw::{c_char, c_int, c_uchar, c_void};
use std::path::{Path, PathBuf};
use std::process::{Child, Output, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::tool;

/// A running tgtd with one target; dropped, it stops exactly that tgtd.
pub struct Tgt {
    dir: PathBuf,
    /// Whether dropping removes `dir` (the started target owns it).
    owns_dir: bool,
    child: Option<Child>,
    ctl: u32,
    port: u16,
    iqn: String,
    luns: u8,
}

/// A port nobody listens on now (the kernel's pick for a socket bound to port 0).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Does `pid` listen on TCP `port`? (`ss -ltnp`)
fn port_held_by(port: u16, pid: u32) -> bool {
    let out = tool("ss")
        .args(["-Hltnp", &format!("sport = :{port}")])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).contains(&format!("pid={pid},"))
}

fn running(child: &mut Child) -> bool {
    matches!(child.try_wait(), Ok(None))
}

impl Tgt {
    /// Start tgtd with `luns` LUNs (1..=luns) of `size` bytes each, sparse files.
    pub fn start(luns: u8, size: u64) -> Tgt {
        drop(tool("tgtd"));
        drop(tool("tgtadm"));
        let dir = nix::unistd::mkdtemp(&std::env::temp_dir().join("hvm-tgt-XXXXXX"))
            .expect("make the target's directory");
        for k in 1..=luns {
            let f = std::fs::File::create(dir.join(format!("lun{k}.img"))).unwrap();
            f.set_len(size).unwrap();
        }
        std::fs::create_dir_all("/var/run/tgtd").expect("tgtd needs /var/run/tgtd (root)");
        for attempt in 0..20 {
            if let Some(mut t) = Tgt::try_start(&dir, luns, attempt) {
                t.owns_dir = true;
                t.configure();
                return t;
            }
        }
        panic!(
            "could not start tgtd; see {}",
            dir.join("tgtd.log").display()
        );
    }

    /// One attempt with a fresh port and control number; `None` if tgtd exited (control
    /// clash) or did not get the port.
    fn try_start(dir: &Path, luns: u8, attempt: u32) -> Option<Tgt> {
        let port = free_port();
        let ctl = 1000 + (std::process::id() * 7 + attempt * 101 + u32::from(port)) % 31000;
        if Path::new(&format!("/var/run/tgtd/socket.{ctl}.lock")).exists() {
            return None;
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("tgtd.log"))
            .unwrap();
        let child = tool("tgtd")
            .args(["-f", "-C", &ctl.to_string(), "--iscsi"])
            .arg(format!("portal=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut t = Tgt {
            dir: dir.to_path_buf(),
            owns_dir: false,
            child: Some(child),
            ctl,
            port,
            iqn: format!("iqn.2026-12.invalid.hvm-test:tgt-{port}"),
            luns,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        let child = t.child.as_mut().unwrap();
        let pid = child.id();
        while Instant::now() < deadline {
            if !running(child) {
                t.child = None;
                return None;
            }
            if port_held_by(port, pid) {
                return Some(t);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None // dropped: stops this tgtd
    }

    /// `tgtadm -C CTL ARGS...`
    pub fn adm(&self, args: &[&str]) -> Output {
        tool("tgtadm")
            .args(["-C", &self.ctl.to_string()])
            .args(args)
            .output()
            .unwrap()
    }

    fn adm_ok(&self, args: &[&str]) {
        let out = self.adm(args);
        assert!(
            out.status.success(),
            "tgtadm {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The target, its LUNs, binding to 127.0.0.1, and raised login limits.
    fn configure(&mut self) {
        let iqn = self.iqn.clone();
        self.adm_ok(&[
            "--lld", "iscsi", "--op", "new", "--mode", "target", "--tid", "1", "-T", &iqn,
        ]);
        for k in 1..=self.luns {
            let img = self.dir.join(format!("lun{k}.img"));
            let img = img.to_str().unwrap();
            let lun = k.to_string();
            self.adm_ok(&[
                "--lld",
                "iscsi",
                "--op",
                "new",
                "--mode",
                "logicalunit",
                "--tid",
                "1",
                "--lun",
                &lun,
                "-b",
                img,
            ]);
        }
        self.adm_ok(&[
            "--lld",
            "iscsi",
            "--op",
            "bind",
            "--mode",
            "target",
            "--tid",
            "1",
            "-I",
            "127.0.0.1",
        ]);
        for (k, v) in [
            ("MaxRecvDataSegmentLength", "262144"),
            ("MaxXmitDataSegmentLength", "262144"),
            ("MaxBurstLength", "1048576"),
            ("FirstBurstLength", "262144"),
            ("InitialR2T", "No"),
        ] {
            self.adm_ok(&[
                "--lld", "iscsi", "--op", "update", "--mode", "target", "--tid", "1", "--name", k,
                "--value", v,
            ]);
        }
    }

    /// `iscsi://127.0.0.1:PORT/IQN/LUN`
    pub fn url(&self, lun: u8) -> String {
        format!("iscsi://127.0.0.1:{}/{}/{lun}", self.port, self.iqn)
    }

    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.child.as_ref().unwrap().id() as i32)
    }

    /// The backing file of LUN `lun`.
    pub fn image(&self, lun: u8) -> PathBuf {
        self.dir.join(format!("lun{lun}.img"))
    }

    /// SIGSTOP (`false`) or SIGCONT (`true`) our tgtd.
    pub fn run(&self, go: bool) {
        let sig = if go { Signal::SIGCONT } else { Signal::SIGSTOP };
        kill(self.pid(), sig).unwrap();
    }

    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if running(&mut child) {
            // A stopped tgtd would not answer tgtadm.
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGCONT);
            let _ = self.adm(&[
                "--op", "update", "--mode", "sys", "--name", "State", "-v", "offline",
            ]);
            let conns = String::from_utf8_lossy(
                &self
                    .adm(&[
                        "--lld", "iscsi", "--op", "show", "--mode", "conn", "--tid", "1",
                    ])
                    .stdout,
            )
            .into_owned();
            let mut sid = String::new();
            for line in conns.lines() {
                let words: Vec<&str> = line.split_whitespace().collect();
                match words.as_slice() {
                    ["Session:", s, ..] => sid = (*s).to_string(),
                    ["Connection:", c, ..] => {
                        let _ = self.adm(&[
                            "--lld", "iscsi", "--op", "delete", "--mode", "conn", "--tid", "1",
                            "--sid", &sid, "--cid", c,
                        ]);
                    }
                    _ => {}
                }
            }
            let _ = self.adm(&[
                "--lld", "iscsi", "--op", "delete", "--force", "--mode", "target", "--tid", "1",
            ]);
            let _ = self.adm(&["--op", "delete", "--mode", "system"]);
            let deadline = Instant::now() + Duration::from_secs(5);
            while running(&mut child) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            if running(&mut child) {
                let _ = child.kill(); // SIGKILL to our own child's PID
            }
        }
        let _ = child.wait();
        for f in [
            format!("/var/run/tgtd/socket.{}", self.ctl),
            format!("/var/run/tgtd/socket.{}.lock", self.ctl),
        ] {
            let _ = std::fs::remove_file(f);
        }
    }
}

impl Drop for Tgt {
    fn drop(&mut self) {
        self.stop();
        if self.owns_dir {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

#[repr(C)]
struct IscsiContext {
    _private: [u8; 0],
}

/// The leading field of libiscsi's `struct scsi_task`.
#[repr(C)]
struct ScsiTask {
    status: c_int,
}

#[link(name = "iscsi")]
extern "C" {
    fn iscsi_create_context(initiator: *const c_char) -> *mut IscsiContext;
    fn iscsi_destroy_context(iscsi: *mut IscsiContext) -> c_int;
    fn iscsi_set_targetname(iscsi: *mut IscsiContext, name: *const c_char) -> c_int;
    fn iscsi_set_session_type(iscsi: *mut IscsiContext, kind: c_int) -> c_int;
    fn iscsi_full_connect_sync(
        iscsi: *mut IscsiContext,
        portal: *const c_char,
        lun: c_int,
    ) -> c_int;
    fn iscsi_logout_sync(iscsi: *mut IscsiContext) -> c_int;
    fn scsi_cdb_read16(
        lba: u64,
        xferlen: u32,
        blocksize: c_int,
        rdprotect: c_int,
        dpo: c_int,
        fua: c_int,
        fua_nv: c_int,
        group: c_int,
    ) -> *mut ScsiTask;
    fn scsi_task_add_data_in_buffer(task: *mut ScsiTask, len: c_int, buf: *mut c_uchar) -> c_int;
    fn iscsi_scsi_command_sync(
        iscsi: *mut IscsiContext,
        lun: c_int,
        task: *mut ScsiTask,
        data: *mut c_void,
    ) -> *mut ScsiTask;
    fn scsi_free_scsi_task(task: *mut ScsiTask);
}

/// The first `bytes` bytes of LUN `lun` of `tgt`, read in 1 MiB READ(16)s with libiscsi's
/// synchronous API (a session of its own, initiator `iqn.2026-12.invalid.hvm-test:reader`).
pub fn read_lun(tgt: &Tgt, lun: u8, bytes: u64) -> Vec<u8> {
    const CHUNK: usize = 1 << 20;
    let initiator = CString::new("iqn.2026-12.invalid.hvm-test:reader").unwrap();
    let target = CString::new(tgt.iqn.clone()).unwrap();
    let portal = CString::new(format!("127.0.0.1:{}", tgt.port)).unwrap();
    let mut out = vec![0u8; bytes as usize];
    // SAFETY: a context created, used and destroyed on this thread; each task's data-in
    // buffer is a slice of `out` that outlives the synchronous command.
    unsafe {
        let ctx = iscsi_create_context(initiator.as_ptr());
        assert!(!ctx.is_null(), "iscsi_create_context");
        iscsi_set_targetname(ctx, target.as_ptr());
        iscsi_set_session_type(ctx, 2);
        assert_eq!(
            iscsi_full_connect_sync(ctx, portal.as_ptr(), c_int::from(lun)),
            0,
            "login to {}",
            tgt.url(lun)
        );
        for (i, chunk) in out.chunks_mut(CHUNK).enumerate() {
            let lba = (i * CHUNK / 512) as u64;
            let task = scsi_cdb_read16(lba, chunk.len() as u32, 512, 0, 0, 0, 0, 0);
            assert!(!task.is_null());
            scsi_task_add_data_in_buffer(task, chunk.len() as c_int, chunk.as_mut_ptr());
            let done = iscsi_scsi_command_sync(ctx, c_int::from(lun), task, std::ptr::null_mut());
            assert!(
                !done.is_null() && (*task).status == 0,
                "READ(16) of LUN {lun} at LBA {lba} failed"
            );
            scsi_free_scsi_task(task);
        }
        iscsi_logout_sync(ctx);
        iscsi_destroy_context(ctx);
    }
    out
}
