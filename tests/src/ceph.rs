//! A throwaway Ceph cluster for the RBD tests: one mon and one OSD (memstore: the data
//! lives in the OSD's memory) on 127.0.0.1, cephx on, pool `rbd` created and initialised,
//! everything in a temporary directory. It installs nothing: a missing binary fails the
//! test loudly (scripts/test.sh installs ceph-mon, ceph-osd, ceph-common).
//!
//! The daemons run in the foreground (`-f`) as this process's children, so dropping the
//! [`Ceph`] stops exactly them, by PID (OSD first, then mon), reaps them and removes the
//! directory. What makes the start fast and quiet on a small machine: `paxos_propose_interval`
//! at 50 ms (the default 1 s delays every map change), pool size 1 allowed and its warning
//! off, no mgr and no MGR_DOWN warning for it, low disk-space warnings off.
#![allow(clippy::unwrap_used)] // test support: a failed unwrap is a failed test

use std::fmt::Write as _;
use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::tool;

/// The cap of the OSD's memstore (data it holds, in RAM).
const OSD_BYTES: u64 = 3 << 30;
/// PGs of the `rbd` pool: few, for a fast start on two cores.
const PG_NUM: u32 = 8;
/// How long the set-up commands may wait for the cluster.
const SETUP_SECS: u32 = 90;

/// A daemon started by the fixture.
struct Daemon {
    name: &'static str,
    child: Child,
}

/// A running throwaway cluster; dropped, it stops its daemons and removes its directory.
pub struct Ceph {
    dir: PathBuf,
    conf: PathBuf,
    /// In start order (mon, OSD); stopped in reverse.
    daemons: Vec<Daemon>,
}

impl Ceph {
    /// Start a cluster in a fresh temporary directory and wait until pool `rbd` takes I/O.
    pub fn start() -> Ceph {
        for t in [
            "ceph-mon",
            "ceph-osd",
            "ceph",
            "ceph-authtool",
            "monmaptool",
            "rbd",
        ] {
            drop(tool(t));
        }
        let t0 = Instant::now();
        let dir = nix::unistd::mkdtemp(&std::env::temp_dir().join("hvm-ceph-XXXXXX"))
            .expect("make the cluster directory");
        let mut c = Ceph {
            conf: dir.join("ceph.conf"),
            dir,
            daemons: Vec::new(),
        };
        for d in ["mon/a", "osd/0", "run", "log", "crash"] {
            fs::create_dir_all(c.dir.join(d)).unwrap();
        }
        let fsid = uuid();
        let port = free_port();
        fs::write(&c.conf, conf(&c.dir, &fsid, port)).unwrap();
        c.make_keys();
        c.start_mon(&fsid, port);
        c.start_osd();
        c.make_pool();
        eprintln!(
            "ceph: cluster in {} ready in {:.2?}",
            c.dir.display(),
            t0.elapsed()
        );
        c
    }

    pub fn conf(&self) -> &Path {
        &self.conf
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The client.admin keyring (ceph.conf names it too).
    pub fn keyring(&self) -> PathBuf {
        self.dir.join("ceph.client.admin.keyring")
    }

    /// `rbd` against this cluster.
    pub fn rbd(&self) -> Command {
        let mut c = tool("rbd");
        c.arg("--conf").arg(&self.conf);
        c
    }

    /// `ceph` against this cluster.
    pub fn ceph(&self) -> Command {
        let mut c = tool("ceph");
        c.arg("--conf")
            .arg(&self.conf)
            .args(["--connect-timeout", &SETUP_SECS.to_string()]);
        c
    }

    /// Create image `spec` (`pool/name`) of `bytes` bytes.
    pub fn create_image(&self, spec: &str, bytes: u64) {
        self.run(
            "rbd create",
            self.rbd()
                .args(["create", "--size", &format!("{}K", bytes / 1024), spec]),
        );
    }

    /// The whole content of image `spec`, through `rbd export` (outside hvm).
    pub fn export(&self, spec: &str, to: &Path) {
        self.run(
            "rbd export",
            self.rbd().args(["export", "--no-progress", spec]).arg(to),
        );
    }

    /// The OSD's PID (for SIGSTOP/SIGCONT).
    pub fn osd_pid(&self) -> Pid {
        let osd = self.daemons.iter().find(|d| d.name == "osd.0").unwrap();
        Pid::from_raw(osd.child.id() as i32)
    }

    /// Run `cmd` to completion; a failure panics with its output and the daemon logs.
    pub fn run(&self, what: &str, cmd: &mut Command) -> String {
        let out = cmd
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert!(
            out.status.success(),
            "{what} failed: {}{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log_tails()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn make_keys(&self) {
        let d = &self.dir;
        let mon = d.join("mon/keyring");
        let admin = self.keyring();
        let osd = d.join("osd/0/keyring");
        let authtool = |args: &[&str], file: &Path| {
            self.run("ceph-authtool", tool("ceph-authtool").arg(file).args(args));
        };
        authtool(
            &[
                "--create-keyring",
                "--gen-key",
                "-n",
                "mon.",
                "--cap",
                "mon",
                "allow *",
            ],
            &mon,
        );
        authtool(
            &[
                "--create-keyring",
                "--gen-key",
                "-n",
                "client.admin",
                "--cap",
                "mon",
                "allow *",
                "--cap",
                "osd",
                "allow *",
                "--cap",
                "mgr",
                "allow *",
            ],
            &admin,
        );
        authtool(
            &[
                "--create-keyring",
                "--gen-key",
                "-n",
                "osd.0",
                "--cap",
                "mon",
                "allow profile osd",
                "--cap",
                "osd",
                "allow *",
            ],
            &osd,
        );
        for k in [&admin, &osd] {
            authtool(&["--import-keyring", k.to_str().unwrap()], &mon);
        }
    }

    fn start_mon(&mut self, fsid: &str, port: u16) {
        let monmap = self.dir.join("mon/monmap");
        self.run(
            "monmaptool",
            tool("monmaptool")
                .args(["--create", "--fsid", fsid, "--addv", "a"])
                .arg(format!("[v2:127.0.0.1:{port}]"))
                .arg(&monmap),
        );
        let keyring = self.dir.join("mon/keyring");
        self.run(
            "ceph-mon --mkfs",
            tool("ceph-mon")
                .arg("--conf")
                .arg(&self.conf)
                .args(["-i", "a", "--mkfs", "--monmap"])
                .arg(&monmap)
                .arg("--keyring")
                .arg(&keyring),
        );
        self.spawn("mon.a", tool("ceph-mon").args(["-i", "a"]));
    }

    fn start_osd(&mut self) {
        let uuid = uuid();
        self.run(
            "ceph-osd --mkfs",
            tool("ceph-osd").arg("--conf").arg(&self.conf).args([
                "-i",
                "0",
                "--mkfs",
                "--no-mon-config",
                "--osd-uuid",
                &uuid,
            ]),
        );
        self.run("ceph osd new", self.ceph().args(["osd", "new", &uuid, "0"]));
        self.spawn("osd.0", tool("ceph-osd").args(["-i", "0"]));
    }

    fn make_pool(&self) {
        let pg = PG_NUM.to_string();
        self.run(
            "ceph osd pool create",
            self.ceph()
                .args(["osd", "pool", "create", "rbd", &pg, &pg, "replicated"]),
        );
        // pool init writes to the pool: it returns once the PGs are active, i.e. the
        // cluster takes I/O.
        let t = SETUP_SECS.to_string();
        self.run(
            "rbd pool init",
            self.rbd().args([
                "--rados-osd-op-timeout",
                &t,
                "--rados-mon-op-timeout",
                &t,
                "pool",
                "init",
                "rbd",
            ]),
        );
    }

    /// Start a daemon in the foreground as our child, its output in `log/<name>.out`.
    fn spawn(&mut self, name: &'static str, cmd: &mut Command) {
        let out = fs::File::create(self.dir.join(format!("log/{name}.out"))).unwrap();
        let child = cmd
            .arg("-f")
            .arg("--conf")
            .arg(&self.conf)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("start {name}: {e}"));
        self.daemons.push(Daemon { name, child });
    }

    /// The last lines of every log, for a failure message.
    pub fn log_tails(&self) -> String {
        let mut s = String::new();
        let Ok(entries) = fs::read_dir(self.dir.join("log")) else {
            return s;
        };
        for e in entries.flatten() {
            let text = fs::read_to_string(e.path()).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let _ = writeln!(s, "----- {}", e.path().display());
            for l in &lines[lines.len().saturating_sub(20)..] {
                let _ = writeln!(s, "{l}");
            }
        }
        s
    }
}

impl Drop for Ceph {
    fn drop(&mut self) {
        while let Some(mut d) = self.daemons.pop() {
            let pid = Pid::from_raw(d.child.id() as i32);
            // A daemon a test stopped with SIGSTOP must run to handle SIGTERM.
            let _ = kill(pid, Signal::SIGCONT);
            let _ = kill(pid, Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(15);
            while matches!(d.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if matches!(d.child.try_wait(), Ok(None)) {
                eprintln!("{} ({pid}) ignored SIGTERM for 15 s: SIGKILL", d.name);
                let _ = d.child.kill();
                let _ = d.child.wait();
            }
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn uuid() -> String {
    fs::read_to_string("/proc/sys/kernel/random/uuid")
        .unwrap()
        .trim()
        .to_string()
}

/// A TCP port free on 127.0.0.1 now (the mon binds it a moment later).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// ceph.conf of a cluster in `dir`. Log, socket and PID files are set for the daemons
/// only: in [global], every client would share one log file and one admin socket.
fn conf(dir: &Path, fsid: &str, port: u16) -> String {
    let d = dir.display();
    format!(
        "\
[global]
fsid = {fsid}
mon_host = [v2:127.0.0.1:{port}]
ms_bind_msgr1 = false
public_addr = 127.0.0.1
cluster_addr = 127.0.0.1
ms_bind_ipv6 = false
auth_cluster_required = cephx
auth_service_required = cephx
auth_client_required = cephx
auth_allow_insecure_global_id_reclaim = false
run_dir = {d}/run
crash_dir = {d}/crash
mon_cluster_log_file = {d}/log/cluster.$channel.log
osd_pool_default_size = 1
osd_pool_default_min_size = 1
osd_pool_default_pg_autoscale_mode = off
osd_crush_chooseleaf_type = 0
mon_allow_pool_size_one = true
mon_warn_on_pool_no_redundancy = false
mon_data_avail_warn = 1
mon_data_avail_crit = 0
mon_mgr_mkfs_grace = 315360000
paxos_propose_interval = 0.05
paxos_min_wait = 0.01

[client]
keyring = {d}/ceph.client.admin.keyring

[mon]
mon_data = {d}/mon/$id
log_file = {d}/log/$name.log
admin_socket = {d}/run/$name.asok

[osd]
osd_data = {d}/osd/$id
keyring = {d}/osd/$id/keyring
log_file = {d}/log/$name.log
admin_socket = {d}/run/$name.asok
osd_objectstore = memstore
memstore_device_bytes = {OSD_BYTES}
osd_op_num_shards = 2
osd_op_num_threads_per_shard = 1
"
    )
}
