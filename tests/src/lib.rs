//! Helpers for the end-to-end tests in `tests/tests/`: build the workspace's artifacts
//! (plugin shared libraries, daemons) once, find them, and start processes.

pub mod agent;
pub mod backup;
pub mod bench;
pub mod ceph;
pub mod legs;
pub mod pg;
pub mod rgw;
pub mod tgt;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

fn profile() -> &'static str {
    if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    }
}

/// Where cargo puts this profile's artifacts.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target"))
        .join(profile())
}

/// Every package whose artifacts the end-to-end tests use.
const PACKAGES: &[&str] = &[
    "hvm-plugin-stateless",
    "hvm-plugin-mode-select",
    "hvm-plugin-pre-update",
    "hvm-plugin-file",
    "hvm-plugin-nbd",
    "hvm-plugin-rbd",
    "hvm-plugin-test-not-a-plugin",
    "hvm-plugin-test-incompatible",
    "hvm-plugin-test-panicking",
    "array-sim",
    "hvm-host-agent",
    "hvmctl",
];

/// Build the artifacts once per test process (cargo does nothing if they are fresh).
/// A failed build fails the test loudly.
pub fn build_artifacts() {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.arg("build").current_dir(workspace());
        if profile() == "release" {
            cmd.arg("--release");
        }
        for p in PACKAGES {
            cmd.args(["-p", p]);
        }
        let status = cmd
            .status()
            .expect("run cargo build for the test artifacts");
        assert!(status.success(), "cargo build of the test artifacts failed");
    });
}

/// The shared library of plugin package `hvm-plugin-<name>`.
pub fn plugin_path(name: &str) -> PathBuf {
    build_artifacts();
    target_dir().join(format!("libhvm_plugin_{}.so", name.replace('-', "_")))
}

/// The plugin built against the interface before the array-side backup functions
/// (`plugins/test-fixtures/old-plugin`, its own workspace), built once per process.
pub fn old_plugin_path() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let fixture = workspace().join("plugins/test-fixtures/old-plugin");
            let target = target_dir().join("old-plugin");
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let status = Command::new(cargo)
                .arg("build")
                .arg("--manifest-path")
                .arg(fixture.join("Cargo.toml"))
                .env("CARGO_TARGET_DIR", &target)
                .status()
                .expect("run cargo build for the old plugin");
            assert!(status.success(), "cargo build of the old plugin failed");
            target.join("debug/libhvm_plugin_test_old.so")
        })
        .clone()
}

/// A binary of the workspace (`array-sim`, `host-agent`).
pub fn binary(name: &str) -> PathBuf {
    build_artifacts();
    target_dir().join(name)
}

/// A child process, killed and reaped when dropped (a failed test leaves no daemon).
pub struct Running(pub std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Start `cmd` with its stdout piped and wait for its first line, the line daemons here
/// print once their sockets are bound. A daemon that exits first gives an empty line.
pub fn spawn_ready(cmd: &mut Command) -> (Running, String) {
    use std::io::{BufRead, BufReader};
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("start {cmd:?}: {e}"));
    let mut line = String::new();
    if let Some(out) = child.stdout.take() {
        let _ = BufReader::new(out).read_line(&mut line);
    }
    (Running(child), line)
}

/// A command for an external tool the tests need; a missing tool fails the test loudly
/// (scripts/test.sh installs them).
pub fn tool(name: &str) -> Command {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {name}"))
        .stdout(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        found,
        "{name} is not installed (scripts/test.sh installs it)"
    );
    Command::new(name)
}

/// fio's nbd engine on `uri` for `secs` seconds (benchmarks): IOPS for 4k blocks, MB/s
/// otherwise.
pub fn fio_nbd(uri: &str, rw: &str, bs: &str, qd: u32, size: u64, secs: f64) -> f64 {
    let out = tool("fio")
        .args([
            "--name=b",
            "--ioengine=nbd",
            "--time_based",
            "--output-format=json",
        ])
        .arg(format!("--uri={uri}"))
        .arg(format!("--rw={rw}"))
        .arg(format!("--bs={bs}"))
        .arg(format!("--iodepth={qd}"))
        .arg(format!("--size={size}"))
        .arg(format!("--runtime={secs}"))
        .output()
        .unwrap_or_else(|e| panic!("run fio: {e}"));
    assert!(
        out.status.success(),
        "fio: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The nbd engine may print a line before the JSON document.
    let start = out.stdout.iter().position(|b| *b == b'{').unwrap_or(0);
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout[start..]).unwrap_or_else(|e| panic!("fio JSON: {e}"));
    let j = &v["jobs"][0][if rw.contains("read") { "read" } else { "write" }];
    if bs == "4k" {
        j["iops"].as_f64().unwrap_or(0.0)
    } else {
        j["bw_bytes"].as_f64().unwrap_or(0.0) / 1e6
    }
}

/// Write all `size` bytes of `uri` once (benchmarks: no timed run pays for allocation).
pub fn fio_fill(uri: &str, size: u64) {
    let out = tool("fio")
        .args([
            "--name=fill",
            "--ioengine=nbd",
            "--rw=write",
            "--bs=1m",
            "--iodepth=4",
        ])
        .arg(format!("--uri={uri}"))
        .arg(format!("--size={size}"))
        .output()
        .unwrap_or_else(|e| panic!("run fio: {e}"));
    assert!(
        out.status.success(),
        "fill: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
