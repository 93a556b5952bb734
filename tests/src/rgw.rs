//! A throwaway S3 endpoint for the backup tests: Ceph's radosgw (beast frontend) on the
//! project's own throwaway cluster ([`Ceph`]), on 127.0.0.1 with a free port, an S3 user
//! with random keys and the buckets a test asks for. It installs nothing: a missing
//! `radosgw`, `radosgw-admin` or `curl` fails the test loudly (scripts/test.sh installs
//! them).
//!
//! radosgw runs in the foreground (`-f`) as this process's child, so dropping the [`Rgw`]
//! stops exactly it (SIGTERM, SIGKILL after 15 s), then the cluster's own daemons. What
//! the setup knows from /work/shared/ceph/README.md: only path-style requests work (no
//! `rgw_dns_name`); `tcp_nodelay=1` or a small GET takes 44 ms (Nagle plus delayed ACK);
//! deleted data stays for `rgw_gc_obj_min_wait` (2 h by default; memstore keeps it in the
//! OSD's RAM), set to 10 s here; object_store cannot create buckets, so curl's SigV4 does
//! (with `x-amz-content-sha256`, which Ceph wants and curl 7.88 does not add); the S3 user
//! is created only once radosgw answers, so the two never both create the default zone.
#![allow(clippy::unwrap_used)] // test support: a failed unwrap is a failed test

use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::ceph::Ceph;
use crate::tool;

const NAME: &str = "client.rgw.test";
const USER: &str = "test";
/// Seconds before deleted data is freed (Ceph's default is 2 h).
const GC_SECS: &str = "10";
/// PGs of each pool radosgw creates (six of them): few, for a fast start on two cores.
const PG_NUM: &str = "8";
const START_SECS: u64 = 60;

/// radosgw on a throwaway cluster; dropped, it stops radosgw, then the cluster.
pub struct Rgw {
    /// Declared before `ceph`: radosgw stops first (fields drop in order).
    child: Option<Child>,
    pub ceph: Ceph,
    pub endpoint: String,
    pub access_key: String,
    pub secret_key: String,
    dir: PathBuf,
}

impl Rgw {
    /// A cluster, radosgw answering on a free port, user `test` and `buckets`.
    pub fn start(buckets: &[&str]) -> Rgw {
        for t in ["radosgw", "radosgw-admin", "curl"] {
            drop(tool(t));
        }
        let ceph = Ceph::start();
        let t0 = Instant::now();
        let dir = ceph.dir().join("rgw");
        fs::create_dir_all(&dir).unwrap();
        // Pools radosgw creates take the cluster's default pg_num (32 each otherwise).
        for opt in ["osd_pool_default_pg_num", "osd_pool_default_pgp_num"] {
            ceph.run(
                "ceph config set",
                ceph.ceph().args(["config", "set", "global", opt, PG_NUM]),
            );
        }
        let keyring = dir.join("keyring");
        ceph.run(
            "ceph auth get-or-create",
            ceph.ceph()
                .args([
                    "auth",
                    "get-or-create",
                    NAME,
                    "mon",
                    "allow rw",
                    "osd",
                    "allow rwx",
                ])
                .arg("-o")
                .arg(&keyring),
        );
        let mut rgw = Rgw {
            child: None,
            ceph,
            endpoint: String::new(),
            access_key: random_hex(10).to_uppercase(),
            secret_key: random_hex(20),
            dir,
        };
        rgw.start_radosgw(&keyring);
        rgw.create_user();
        for b in buckets {
            rgw.create_bucket(b);
        }
        eprintln!(
            "rgw: {} ready in {:.2?} after the cluster",
            rgw.endpoint,
            t0.elapsed()
        );
        rgw
    }

    /// radosgw on a free port; another try on a new port if it exits (port taken).
    fn start_radosgw(&mut self, keyring: &std::path::Path) {
        for attempt in 0..3 {
            let port = free_port();
            let log = fs::File::create(self.dir.join(format!("radosgw.{attempt}.out"))).unwrap();
            let d = self.ceph.dir().to_path_buf();
            let child = tool("radosgw")
                .arg("-f")
                .arg("--conf")
                .arg(self.ceph.conf())
                .args(["-n", NAME, "--keyring"])
                .arg(keyring)
                .arg("--rgw-frontends")
                .arg(format!("beast endpoint=127.0.0.1:{port} tcp_nodelay=1"))
                .arg("--log-file")
                .arg(d.join("log/rgw.log"))
                .arg("--admin-socket")
                .arg(d.join("run/rgw.asok"))
                .arg("--pid-file")
                .arg(d.join("run/rgw.pid"))
                .arg("--rgw-data")
                .arg(&self.dir)
                .args(["--rgw-thread-pool-size", "16"])
                .args(["--rgw-gc-obj-min-wait", GC_SECS])
                .args(["--rgw-gc-processor-period", GC_SECS])
                .args(["--debug-rgw", "1"])
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap_or_else(|e| panic!("start radosgw: {e}"));
            self.child = Some(child);
            if self.wait_http(port) {
                self.endpoint = format!("http://127.0.0.1:{port}");
                return;
            }
            if let Some(mut c) = self.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
            eprintln!("rgw: radosgw exited on port {port}; another port");
        }
        panic!("radosgw did not start\n{}", self.ceph.log_tails());
    }

    /// Until radosgw answers `GET /` with 200 (true) or exits (false).
    fn wait_http(&mut self, port: u16) -> bool {
        let deadline = Instant::now() + Duration::from_secs(START_SECS);
        while Instant::now() < deadline {
            let child = self.child.as_mut().unwrap();
            if !matches!(child.try_wait(), Ok(None)) {
                return false;
            }
            if http_status(port) == Some(200) {
                // Another server on that port would answer too: ours must be alive still.
                return matches!(child.try_wait(), Ok(None));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "radosgw not answering on port {port} after {START_SECS} s\n{}",
            self.ceph.log_tails()
        );
    }

    /// `radosgw-admin` against this cluster.
    pub fn admin(&self) -> Command {
        let mut c = tool("radosgw-admin");
        c.arg("--conf").arg(self.ceph.conf());
        c
    }

    fn create_user(&self) {
        self.ceph.run(
            "radosgw-admin user create",
            self.admin()
                .args(["user", "create", "--uid", USER, "--display-name", USER])
                .args(["--access-key", &self.access_key])
                .args(["--secret-key", &self.secret_key]),
        );
    }

    /// Create `bucket` (3-63 characters) with a SigV4-signed PUT.
    pub fn create_bucket(&self, bucket: &str) {
        let out = tool("curl")
            .args([
                "-sS",
                "-m",
                "30",
                "-o",
                "-",
                "-w",
                "\n%{http_code}",
                "-X",
                "PUT",
            ])
            .args(["--aws-sigv4", "aws:amz:us-east-1:s3"])
            .arg("--user")
            .arg(format!("{}:{}", self.access_key, self.secret_key))
            .args(["-H", "x-amz-content-sha256: UNSIGNED-PAYLOAD"])
            .arg(format!("{}/{bucket}", self.endpoint))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.ends_with("200"),
            "create bucket {bucket}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The environment an S3 client of this endpoint needs (the standard AWS names;
    /// `AWS_ALLOW_HTTP`: the endpoint is plain HTTP).
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL", self.endpoint.clone()),
            ("AWS_ENDPOINT", self.endpoint.clone()),
            ("AWS_REGION", "us-east-1".into()),
            ("AWS_ACCESS_KEY_ID", self.access_key.clone()),
            ("AWS_SECRET_ACCESS_KEY", self.secret_key.clone()),
            ("AWS_ALLOW_HTTP", "true".into()),
        ]
    }

    /// Free the data of deleted objects now, not after the GC period.
    pub fn gc(&self) {
        self.ceph.run(
            "radosgw-admin gc process",
            self.admin().args(["gc", "process", "--include-all"]),
        );
    }

    /// radosgw's PID (for SIGSTOP in a test of transient errors).
    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.child.as_ref().unwrap().id() as i32)
    }
}

impl Drop for Rgw {
    fn drop(&mut self) {
        let Some(mut c) = self.child.take() else {
            return;
        };
        let pid = Pid::from_raw(c.id() as i32);
        let _ = kill(pid, Signal::SIGCONT);
        let _ = kill(pid, Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(15);
        while matches!(c.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if matches!(c.try_wait(), Ok(None)) {
            eprintln!("radosgw ({pid}) ignored SIGTERM for 15 s: SIGKILL");
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The status code of `GET /` on 127.0.0.1:`port`, if anything answers.
fn http_status(port: u16) -> Option<u16> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).ok()?;
    let line = String::from_utf8_lossy(&buf[..n]);
    line.split_whitespace().nth(1)?.parse().ok()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn random_hex(bytes: usize) -> String {
    let mut raw = vec![0u8; bytes];
    fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut raw)
        .unwrap();
    raw.iter().map(|b| format!("{b:02x}")).collect()
}
