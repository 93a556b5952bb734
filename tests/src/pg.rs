//! A real PostgreSQL cluster on an hvm virtual LU: the export mounted as a file by
//! nbdfuse, a loop device on it, ext4 on that, the data directory in it (there is no nbd
//! kernel module here). PostgreSQL runs as the `postgres` user, as Debian's package sets
//! it up.
#![allow(clippy::unwrap_used)] // test support: a failed unwrap is a failed test

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::tool;

fn ok(c: &mut Command) -> String {
    let o = c.output().unwrap_or_else(|e| panic!("{c:?}: {e}"));
    assert!(
        o.status.success(),
        "{c:?}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// PostgreSQL's server binaries (Debian: /usr/lib/postgresql/<major>/bin, the newest).
pub fn bindir() -> PathBuf {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.path().join("bin"))
                .collect()
        })
        .unwrap_or_default();
    found.retain(|p| p.join("postgres").exists() && p.join("pgbench").exists());
    found.sort();
    found
        .pop()
        .expect("PostgreSQL is not installed (scripts/test.sh installs Debian's postgresql)")
}

/// A directory the postgres user owns (and every parent it can traverse).
pub fn postgres_dir(p: &Path) {
    std::fs::create_dir_all(p).unwrap();
    let mut a = p.to_path_buf();
    while let Some(parent) = a.parent() {
        if parent == Path::new("/") || parent.as_os_str().is_empty() {
            break;
        }
        if let Ok(md) = std::fs::metadata(parent) {
            let mode = md.permissions().mode();
            if mode & 0o001 == 0 {
                let _ =
                    std::fs::set_permissions(parent, std::fs::Permissions::from_mode(mode | 0o711));
            }
        }
        a = parent.to_path_buf();
    }
    ok(tool("chown").args(["postgres:postgres"]).arg(p));
}

/// An export as a mounted ext4 filesystem: nbdfuse, a loop device, mount.
pub struct Mounted {
    fuse_dir: PathBuf,
    fuse: Option<Child>,
    pub dev: String,
    pub dir: PathBuf,
}

impl Mounted {
    /// Mount export `export` of the NBD Unix socket `sock`; `mkfs` makes a new ext4 first.
    pub fn export(work: &Path, sock: &Path, export: &str, mkfs: bool) -> Mounted {
        let fuse_dir = work.join(format!("fuse-{export}"));
        std::fs::create_dir_all(&fuse_dir).unwrap();
        let uri = format!("nbd+unix:///{export}?socket={}", sock.display());
        let fuse = tool("nbdfuse")
            .arg(&fuse_dir)
            .arg(&uri)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let file = fuse_dir.join("nbd");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0) == 0 {
            assert!(Instant::now() < deadline, "nbdfuse never mounted {uri}");
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut m = Mounted::file(work, &file, export, mkfs);
        m.fuse_dir = fuse_dir;
        m.fuse = Some(fuse);
        m
    }

    /// Mount the filesystem in an image file.
    pub fn file(work: &Path, file: &Path, name: &str, mkfs: bool) -> Mounted {
        let dev = ok(tool("losetup").args(["--find", "--show"]).arg(file));
        if mkfs {
            ok(tool("mkfs.ext4")
                .args(["-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0"])
                .arg(&dev));
        }
        let dir = work.join(format!("mnt-{name}"));
        std::fs::create_dir_all(&dir).unwrap();
        ok(tool("mount").arg(&dev).arg(&dir));
        Mounted {
            fuse_dir: PathBuf::new(),
            fuse: None,
            dev,
            dir,
        }
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("fsfreeze").arg("-u").arg(&self.dir).output();
        let _ = Command::new("umount").arg(&self.dir).output();
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).output();
        if let Some(mut f) = self.fuse.take() {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(&self.fuse_dir)
                .output();
            let deadline = Instant::now() + Duration::from_secs(10);
            while f.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = f.kill();
            let _ = f.wait();
        }
    }
}

/// A PostgreSQL cluster in `data`, listening only on a Unix socket in `sock`.
pub struct Cluster {
    pub bin: PathBuf,
    pub data: PathBuf,
    pub sock: PathBuf,
    pub port: u16,
    pub log: PathBuf,
    running: bool,
}

impl Cluster {
    pub fn new(data: &Path, sock: &Path, port: u16, log: &Path) -> Cluster {
        postgres_dir(sock);
        std::fs::write(log, b"").unwrap();
        ok(tool("chown").args(["postgres:postgres"]).arg(log));
        Cluster {
            bin: bindir(),
            data: data.to_path_buf(),
            sock: sock.to_path_buf(),
            port,
            log: log.to_path_buf(),
            running: false,
        }
    }

    fn as_postgres(&self, prog: &str) -> Command {
        let mut c = tool("runuser");
        c.args(["-u", "postgres", "--"]).arg(self.bin.join(prog));
        c
    }

    pub fn initdb(&self) {
        postgres_dir(&self.data);
        ok(self
            .as_postgres("initdb")
            .args(["-A", "trust", "-U", "postgres", "--no-instructions", "-D"])
            .arg(&self.data));
    }

    pub fn start(&mut self) {
        let opts = format!(
            "-p {} -k {} -c listen_addresses='' -c shared_buffers=64MB -c max_wal_size=96MB -c min_wal_size=32MB",
            self.port,
            self.sock.display()
        );
        ok(self
            .as_postgres("pg_ctl")
            .args(["-w", "-t", "120", "-D"])
            .arg(&self.data)
            .args(["-l"])
            .arg(&self.log)
            .args(["-o", &opts, "start"]));
        self.running = true;
    }

    pub fn stop(&mut self) {
        if self.running {
            ok(self
                .as_postgres("pg_ctl")
                .args(["-w", "-m", "fast", "-D"])
                .arg(&self.data)
                .arg("stop"));
            self.running = false;
        }
    }

    /// libpq connection parameters (the PostgreSQL hook's `connect`).
    pub fn connect(&self) -> String {
        connect(&self.sock, self.port)
    }

    pub fn psql(&self, sql: &str) -> String {
        self.psql_session(&[sql])
    }

    /// `statements` one after the other in one session (what `pg_backup_start` and
    /// `pg_backup_stop` need); their output.
    pub fn psql_session(&self, statements: &[&str]) -> String {
        let mut c = tool("psql");
        c.args(["-X", "-At", "-v", "ON_ERROR_STOP=1", "-h"])
            .arg(&self.sock)
            .args(["-p", &self.port.to_string()])
            .args(["-U", "postgres", "-d", "postgres"]);
        for sql in statements {
            c.args(["-c", sql]);
        }
        ok(&mut c)
    }

    /// `pg_amcheck` of database postgres, heap and every index (installing the amcheck
    /// extension if missing); panics with its report when it finds corruption.
    pub fn amcheck(&self) -> String {
        ok(Command::new(self.bin.join("pg_amcheck"))
            .arg("-h")
            .arg(&self.sock)
            .args(["-p", &self.port.to_string(), "-U", "postgres"])
            .args([
                "--install-missing",
                "--heapallindexed",
                "--progress",
                "postgres",
            ]))
    }

    /// pgbench with these connection arguments and `args`.
    pub fn pgbench(&self, args: &[&str]) -> Command {
        let mut c = Command::new(self.bin.join("pgbench"));
        c.arg("-h")
            .arg(&self.sock)
            .args(["-p", &self.port.to_string(), "-U", "postgres"])
            .args(args)
            .arg("postgres");
        c
    }

    pub fn pgbench_init(&self, scale: u32) {
        ok(&mut self.pgbench(&["-i", "-q", "-s", &scale.to_string()]));
    }

    /// pgbench's invariants: the sums of balances in accounts, tellers and branches and
    /// of the history deltas are one number. Returns (that sum, history rows).
    pub fn pgbench_invariants(&self) -> (i64, i64) {
        let out = self.psql(
            "SELECT (SELECT coalesce(sum(abalance),0) FROM pgbench_accounts), \
                    (SELECT coalesce(sum(tbalance),0) FROM pgbench_tellers), \
                    (SELECT coalesce(sum(bbalance),0) FROM pgbench_branches), \
                    (SELECT coalesce(sum(delta),0) FROM pgbench_history), \
                    (SELECT count(*) FROM pgbench_history)",
        );
        let v: Vec<i64> = out.split('|').map(|x| x.trim().parse().unwrap()).collect();
        assert_eq!(v.len(), 5, "{out}");
        assert!(
            v[0] == v[1] && v[1] == v[2] && v[2] == v[3],
            "pgbench invariants broken: accounts {}, tellers {}, branches {}, history {}",
            v[0],
            v[1],
            v[2],
            v[3]
        );
        (v[0], v[4])
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.running {
            let _ = self
                .as_postgres("pg_ctl")
                .args(["-w", "-m", "immediate", "-D"])
                .arg(&self.data)
                .arg("stop")
                .output();
        }
    }
}

/// A pgbench run in the background; `finish` waits and returns its output, failing
/// the test if pgbench reported an error or aborted a client.
pub struct Bench(Child);

impl Bench {
    pub fn start(c: &Cluster, clients: u32, secs: u32) -> Bench {
        let child = c
            .pgbench(&[
                "-n",
                "-c",
                &clients.to_string(),
                "-j",
                "2",
                "-T",
                &secs.to_string(),
                "-P",
                "5",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        Bench(child)
    }

    /// pgbench's output and its TPS.
    pub fn finish(self) -> (String, f64) {
        let out = self.0.wait_with_output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "pgbench failed:\n{text}");
        assert!(
            !text.contains("error") && !text.contains("aborted"),
            "pgbench reported errors:\n{text}"
        );
        let tps = text
            .lines()
            .find(|l| l.starts_with("tps = "))
            .and_then(|l| l.split_whitespace().nth(2))
            .and_then(|x| x.parse().ok())
            .unwrap_or(0.0);
        (text, tps)
    }
}

/// The database host's freeze hooks in a [`Deployment`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hooks {
    /// PostgreSQL's backup mode alone (`pg_backup_start` / `pg_backup_stop`). The data
    /// directory, WAL included, is all on the virtual LU, and the write gate makes the
    /// snapshot one instant of it: a restore is a crash (ext4 replays its journal,
    /// PostgreSQL its WAL), with no filesystem freeze and no writes held.
    Postgres,
    /// PostgreSQL, then fsfreeze of the mount: the filesystem clean in the snapshot too,
    /// at the price of writes held from the freeze to the thaw.
    PostgresFsfreeze,
}

/// libpq connection parameters of the cluster listening on `sock` and `port`.
fn connect(sock: &Path, port: u16) -> String {
    format!(
        "host={} port={port} user=postgres dbname=postgres",
        sock.display()
    )
}

impl Hooks {
    /// The `freeze.hooks` list of the database host's config.
    fn yaml(self, sock: &Path, port: u16, mount: &Path) -> String {
        let pg = format!(
            "      - postgresql: {{ connect: \"{}\" }}\n",
            connect(sock, port)
        );
        match self {
            Hooks::Postgres => pg,
            Hooks::PostgresFsfreeze => format!("{pg}      - fsfreeze: {}\n", mount.display()),
        }
    }
}

/// The whole set-up of the PostgreSQL backup tests and benchmark: two hosts and an array
/// ([`crate::backup::Hosts`]), virtual LU `pg` mounted as ext4 on the database host, a
/// cluster on it with pgbench's tables, and the database host's freeze hooks ([`Hooks`]).
/// Fields drop in order: the cluster stops, the filesystem is unmounted, then the agents
/// and the array stop.
pub struct Deployment {
    pub cluster: Cluster,
    pub fs: Mounted,
    pub hosts: crate::backup::Hosts,
}

impl Deployment {
    /// On an array-sim daemon both hosts reach, with [`Hooks::PostgresFsfreeze`].
    pub fn start(work: &Path, lu_bytes: u64, scale: u32, deadline_ms: u64) -> Deployment {
        let storage = crate::backup::Storage::ArraySim;
        Deployment::start_on(work, lu_bytes, scale, deadline_ms, storage)
    }

    /// On `storage` (see [`crate::backup::Storage`]), with [`Hooks::PostgresFsfreeze`].
    pub fn start_on(
        work: &Path,
        lu_bytes: u64,
        scale: u32,
        deadline_ms: u64,
        storage: crate::backup::Storage<'_>,
    ) -> Deployment {
        let freeze = (deadline_ms, Hooks::PostgresFsfreeze);
        Deployment::start_with(work, lu_bytes, scale, freeze, storage)
    }

    /// With the freeze's deadline and `hooks`.
    pub fn start_with(
        work: &Path,
        lu_bytes: u64,
        scale: u32,
        (deadline_ms, hooks): (u64, Hooks),
        storage: crate::backup::Storage<'_>,
    ) -> Deployment {
        let sock = work.join("pg-sock");
        let port = 25432;
        let freeze = format!(
            "    deadline_ms: {deadline_ms}\n    hooks:\n{}",
            hooks.yaml(&sock, port, &work.join("mnt-pg"))
        );
        let hosts = crate::backup::Hosts::start_on(
            work,
            &crate::backup::Setup {
                lu_bytes,
                names: &["pg"],
                freeze: &freeze,
            },
            storage,
        );
        let fs = Mounted::export(work, &hosts.db.state.join("nbd.sock"), "pg", true);
        let mut cluster = Cluster::new(&fs.dir.join("data"), &sock, port, &work.join("live.log"));
        cluster.initdb();
        cluster.start();
        cluster.pgbench_init(scale);
        Deployment { cluster, fs, hosts }
    }
}

/// Restore backup `backup` (its id; virtual LU `pg`) into a new image in `work`, mount it and
/// start a cluster on it (on `port`): it must recover from the snapshot's WAL and satisfy
/// pgbench's invariants, with some but fewer history rows than the live cluster's
/// `live_rows` at the end of the run (an instant during it). Returns the restored
/// (sum of balances, history rows).
pub fn restore_and_recover(
    hosts: &crate::backup::Hosts,
    work: &Path,
    backup: &str,
    port: u16,
    live_rows: i64,
) -> (i64, i64) {
    let img = work.join(format!("restored-{backup}.img"));
    hosts.restore(backup, None, &img);
    let rfs = Mounted::file(work, &img, "restored", false);
    // The snapshot copied the live cluster's lock file; it names a live postmaster.
    let _ = std::fs::remove_file(rfs.dir.join("data/postmaster.pid"));
    let mut restored = Cluster::new(
        &rfs.dir.join("data"),
        &work.join("restored-sock"),
        port,
        &work.join(format!("restored-{backup}.log")),
    );
    restored.start();
    let (sum, rows) = restored.pgbench_invariants();
    let log = std::fs::read_to_string(&restored.log).unwrap_or_default();
    println!("restored: sum {sum}, {rows} history rows (live at the end: {live_rows})\n{log}");
    assert!(
        log.contains("redo") || log.contains("recovery"),
        "no recovery in the log:\n{log}"
    );
    assert!(rows > 0, "the backup holds no pgbench transaction");
    assert!(
        rows < live_rows,
        "the backup is not of an instant during the run"
    );
    restored.stop();
    drop(rfs);
    (sum, rows)
}

/// The online backup the legs tests run on their storage: PostgreSQL on virtual LU `pg`
/// of `lu_bytes` on `storage`, pgbench (4 clients, 20 s) throughout `hvmctl backup run
/// --via nbd --wait-resync` (the backup host cannot open the database host's storage, so
/// it pulls the snapshot over NBD), no pgbench error; then the live cluster's invariants,
/// the cluster stopped and its filesystem unmounted, the pair Synchronized;
/// `legs_identical` compares the legs outside hvm; last, the backup restores and
/// recovers ([`restore_and_recover`]).
pub fn backup_online_via_nbd(
    work: &Path,
    lu_bytes: u64,
    storage: crate::backup::Storage<'_>,
    legs_identical: impl FnOnce(),
) {
    let d = Deployment::start_on(work, lu_bytes, 5, 20_000, storage);
    let mut live = d.cluster;
    let bench = Bench::start(&live, 4, 20);
    std::thread::sleep(Duration::from_secs(4));
    let (out, v) = d
        .hosts
        .run(&["pg"], "pg-backup", &["--via", "nbd", "--wait-resync"]);
    assert!(
        out.status.success(),
        "backup run: {}\n{v}",
        String::from_utf8_lossy(&out.stderr)
    );
    println!(
        "backup run: {}",
        serde_json::to_string_pretty(&v["steps"]).unwrap()
    );
    let (_, tps) = bench.finish();
    println!("pgbench during the backup: {tps} tps");
    let (_, live_rows) = live.pgbench_invariants();
    live.stop();
    drop(d.fs);
    let rs = d.hosts.db.json(&["resync", "status"]);
    assert_eq!(rs["pairs"][0]["mode"], "Synchronized", "{rs}");
    legs_identical();
    let id = v["id"].as_str().unwrap();
    restore_and_recover(&d.hosts, work, id, live.port + 1, live_rows);
}
