//! The plugin issue's acceptance: the three driver plugins built as shared libraries and
//! loaded through the loader, driving embedded and daemon arrays; bad plugins refused
//! with the file and the reason while the host goes on.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use hvm_core::backend::{Backend, BackendErrorKind};
use hvm_core::journal::NoLog;
use hvm_core::{Extent, LuId, MirrorDefinition, Mode, PairConfig, SnapshotManager, VirtualLuId};
use hvm_plugin_abi::host::{LoadError, Plugin, PluginBackend};
use hvm_plugin_abi::ThreadModel;
use hvm_tests::{binary, plugin_path, spawn_ready, workspace, Running};

const KINDS: [&str; 3] = ["stateless", "mode-select", "pre-update"];

fn example(kind: &str) -> std::path::PathBuf {
    let file = match kind {
        "stateless" => "fig9-stateless.yaml",
        "mode-select" => "fig2-mode-select.yaml",
        _ => "fig14-pre-update.yaml",
    };
    workspace().join("array-sim/examples").join(file)
}

/// Driver parameters for an embedded array: the example config, its `dir` replaced.
fn embedded_params(kind: &str, dir: &Path) -> String {
    let cfg = std::fs::read_to_string(example(kind)).unwrap();
    let body: String = cfg
        .lines()
        .filter(|l| !l.starts_with('#') && !l.starts_with("dir:"))
        .map(|l| format!("    {l}\n"))
        .collect();
    format!("array:\n  embedded:\n    dir: {}\n{body}", dir.display())
}

fn start_daemon(kind: &str, dir: &Path) -> (Running, String) {
    let sock = dir.join("array.sock");
    let (daemon, line) = spawn_ready(
        Command::new(binary("array-sim"))
            .args(["serve", "--config"])
            .arg(example(kind))
            .arg("--listen")
            .arg(format!("unix:{}", sock.display()))
            .arg("--dir")
            .arg(dir.join("data")),
    );
    assert!(line.contains("listening"), "{line}");
    (
        daemon,
        format!("array:\n  connect: \"unix:{}\"\n", sock.display()),
    )
}

fn open(kind: &str, params: &str) -> PluginBackend {
    Plugin::load(&plugin_path(kind))
        .unwrap()
        .open(params)
        .unwrap_or_else(|e| panic!("{kind}: {e}"))
}

fn read1(b: &PluginBackend, lu: u32, lba: u64) -> u8 {
    let mut buf = [0u8; 512];
    b.read(LuId(lu), lba, &mut buf).unwrap();
    buf[0]
}

/// Reads, writes, mode changes and copies through a loaded plugin, by array kind.
fn exercise(kind: &str, b: &PluginBackend) {
    let d = b.describe().unwrap();
    match kind {
        "stateless" => {
            assert!(d.capabilities.virtual_lu_forming && d.capabilities.array_copy);
            assert_eq!(d.mirroring.len(), 3);
            b.write(LuId(0), 10, &[0x11; 1024], true).unwrap();
            assert_eq!((read1(b, 1, 10), read1(b, 2, 11)), (0x11, 0x11));
            b.write(LuId(1), 10, &[0x22; 512], false).unwrap();
            assert_eq!(read1(b, 2, 10), 0x11);
            b.copy(LuId(1), LuId(2), Extent::new(10, 10).unwrap())
                .unwrap();
            assert_eq!(read1(b, 2, 10), 0x22);
            assert_eq!(b.mode_sense(LuId(0)).unwrap(), vec![0, 0, 1, 2]);
        }
        "mode-select" => {
            assert!(d.capabilities.mode_select);
            assert_eq!(
                d.mirroring[0],
                MirrorDefinition::Managed {
                    lu: LuId(1),
                    mates: vec![LuId(4)]
                }
            );
            b.write(LuId(1), 5, &[0x33; 512], false).unwrap();
            b.mode_select(LuId(1), &[0, 1]).unwrap();
            assert_eq!(b.mode_sense(LuId(1)).unwrap(), vec![0, 1]);
            b.write(LuId(1), 5, &[0x44; 512], false).unwrap();
            assert_eq!(
                read1(b, 4, 5),
                0x33,
                "Snapshot: the mate keeps the old data"
            );
            b.mode_select(LuId(1), &[0, 2]).unwrap();
            let err = b.read(LuId(4), 5, &mut [0; 512]).unwrap_err();
            assert_eq!(err.kind, BackendErrorKind::NotReady, "{err}");
            b.copy(LuId(1), LuId(4), Extent::new(5, 5).unwrap())
                .unwrap();
            b.mode_select(LuId(1), &[0, 1]).unwrap();
            assert_eq!(read1(b, 4, 5), 0x44);
            b.mode_select(LuId(1), &[0, 0]).unwrap();
        }
        _ => {
            assert!(d.capabilities.read_only_mate && !d.capabilities.array_copy);
            b.write(LuId(0), 3, &[0x55; 512], true).unwrap();
            assert_eq!(read1(b, 1, 3), 0x55);
            let err = b.write(LuId(1), 3, &[0; 512], false).unwrap_err();
            assert_eq!(err.kind, BackendErrorKind::DataProtect, "{err}");
            assert_eq!(err.errno(), hvm_core::backend::errno::EPERM);
            b.flush(LuId(0)).unwrap();
        }
    }
}

#[test]
fn loads_the_three_plugins() {
    for kind in KINDS {
        let p = Plugin::load(&plugin_path(kind)).unwrap();
        assert_eq!(p.name, kind);
        assert_eq!(p.version, env!("CARGO_PKG_VERSION"));
        assert_eq!(p.thread_model, ThreadModel::Parallel);
        assert!(p.capabilities.fua);
    }
}

#[test]
fn each_plugin_drives_an_embedded_array() {
    for kind in KINDS {
        let dir = tempfile::tempdir().unwrap();
        let b = open(kind, &embedded_params(kind, dir.path()));
        exercise(kind, &b);
    }
}

#[test]
fn each_plugin_drives_a_daemon() {
    for kind in KINDS {
        let dir = tempfile::tempdir().unwrap();
        let (_daemon, params) = start_daemon(kind, dir.path());
        let b = open(kind, &params);
        exercise(kind, &b);
    }
}

/// hvm-core's snapshot manager on a loaded plugin: acquire, write, delete, resync.
#[test]
fn snapshot_manager_over_a_loaded_plugin() {
    let dir = tempfile::tempdir().unwrap();
    let b = open("stateless", &embedded_params("stateless", dir.path()));
    let pair = PairConfig {
        origin: VirtualLuId(0),
        snapshots: vec![VirtualLuId(1)],
        definition: MirrorDefinition::Triple {
            mirror: LuId(3),
            origin: LuId(4),
            mate: LuId(5),
        },
        save_area: None,
    };
    let mgr = SnapshotManager::open(b, vec![pair], Arc::new(NoLog), None).unwrap();
    let o = VirtualLuId(0);
    mgr.write(o, 0, &[1; 8192], false).unwrap();
    mgr.acquire(o).unwrap();
    mgr.write(o, 1024, &[2; 2048], false).unwrap();
    let mut snap = [0u8; 2048];
    mgr.read(VirtualLuId(1), 1024, &mut snap).unwrap();
    assert!(snap.iter().all(|x| *x == 1));
    mgr.delete(o).unwrap();
    assert!(
        mgr.resync(o, 16, &AtomicBool::new(false), |_| {})
            .unwrap()
            .done
    );
    assert_eq!(mgr.mode(o), Mode::Synchronized);
    let (mut a, mut m) = ([0u8; 8192], [0u8; 8192]);
    mgr.backend().read(LuId(4), 0, &mut a).unwrap();
    mgr.backend().read(LuId(5), 0, &mut m).unwrap();
    assert_eq!(a, m);
}

fn refused(path: &Path) -> String {
    let err = Plugin::load(path).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.starts_with(&path.display().to_string()),
        "no file in: {msg}"
    );
    msg
}

#[test]
fn refuses_bad_plugins_with_the_file_and_the_reason() {
    let msg = refused(&plugin_path("test-not-a-plugin"));
    assert!(msg.contains("not an hvm plugin"), "{msg}");
    let msg = refused(&plugin_path("test-incompatible"));
    assert!(msg.contains("another layout"), "{msg}");
    let err = Plugin::load(&plugin_path("test-incompatible")).unwrap_err();
    assert!(matches!(err, LoadError::Library { .. }));

    let dir = tempfile::tempdir().unwrap();
    let msg = refused(&dir.path().join("libhvm_plugin_missing.so"));
    assert!(msg.contains("No such file"), "{msg}");
    let msg = refused(dir.path());
    assert!(msg.contains("not a regular file"), "{msg}");

    let copy = dir.path().join("libhvm_plugin_stateless.so");
    std::fs::copy(plugin_path("stateless"), &copy).unwrap();
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o664)).unwrap();
    let msg = refused(&copy);
    assert!(
        msg.contains("writable by group or others (mode 0664)"),
        "{msg}"
    );
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).unwrap();
    Plugin::load(&copy).unwrap();

    // Owned by another user who is not root (needs root to arrange, as CI runs).
    assert!(
        nix::unistd::getuid().is_root(),
        "this test must run as root to chown"
    );
    nix::unistd::chown(&copy, Some(nix::unistd::Uid::from_raw(4242)), None).unwrap();
    let msg = refused(&copy);
    assert!(msg.contains("owned by uid 4242"), "{msg}");
}

#[test]
fn open_errors_are_reported() {
    let p = Plugin::load(&plugin_path("stateless")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    for (params, want) in [
        ("array: [unclosed", "driver parameters"),
        ("arry: {connect: unix:/x}", "unknown field `arry`"),
        (
            "array:\n  connect: \"unix:/nonexistent/array.sock\"\n",
            "cannot connect",
        ),
        (
            &*embedded_params("pre-update", dir.path()),
            "but the embedded array is of kind pre-update",
        ),
    ] {
        let err = p.open(params).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("libhvm_plugin_stateless.so") && msg.contains(want),
            "{msg}"
        );
    }
    let err = Plugin::load(&plugin_path("test-panicking"))
        .unwrap()
        .open("fail")
        .unwrap_err();
    assert!(err.to_string().contains("asked to fail"), "{err}");
}

/// The parameters cross the boundary as one text that the plugin parses once, the
/// embedded array's config with them: a bad field deep in it is named by its path, and
/// host-agent's one-line refusal names the config file, the backend's `params` and their
/// line.
#[test]
fn bad_parameters_name_the_config_file_field_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let p = Plugin::load(&plugin_path("stateless")).unwrap();
    let params = embedded_params("stateless", dir.path());
    for (bad, want) in [
        (
            params.replace("    kind:", "    colour: red\n    kind:"),
            "array.embedded: unknown field `colour`",
        ),
        (
            params.replace(
                "    kind:",
                "    faults: [{ action: delay, delay_ms: 1e300 }]\n    kind:",
            ),
            "array.embedded: faults[0]: a delay fault needs delay_ms",
        ),
    ] {
        let msg = p.open(&bad).unwrap_err().to_string();
        assert!(msg.contains(want), "{msg}");
    }
    let indented: String = params
        .replace("    kind:", "    colour: red\n    kind:")
        .lines()
        .map(|l| format!("      {l}\n"))
        .collect();
    let config = dir.path().join("agent.yaml");
    std::fs::write(
        &config,
        format!(
            "listen: {{ unix: nbd.sock }}\nbackends:\n  - name: a\n    plugin: {}\n    params:\n{indented}",
            plugin_path("stateless").display()
        ),
    )
    .unwrap();
    let out = Command::new(binary("host-agent"))
        .arg("--config")
        .arg(&config)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    let err = err.trim_end();
    assert!(!err.contains('\n'), "one line: {err}");
    assert!(
        err.starts_with(&format!(
            "host-agent: {}: backends[0].params (line 5): backend a: ",
            config.display()
        )) && err.contains("unknown field `colour`"),
        "{err}"
    );
}

/// A plugin method that panics: the caller gets an error, the backend is out of service
/// from then on, and the host and its other backends go on.
#[test]
fn panicking_method_fails_the_backend_not_the_host() {
    let bad = Plugin::load(&plugin_path("test-panicking")).unwrap();
    assert_eq!(bad.thread_model, ThreadModel::SerializeAll);
    let bad = bad.open("").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let good = open("stateless", &embedded_params("stateless", dir.path()));
    bad.write(LuId(0), 0, &[0; 512], false).unwrap();
    let err = bad.read(LuId(0), 0, &mut [0; 512]).unwrap_err();
    assert_eq!(err.kind, BackendErrorKind::Failed);
    assert!(err.message.contains("read always panics"), "{err}");
    assert!(bad.is_failed());
    let err = bad.write(LuId(0), 0, &[0; 512], false).unwrap_err();
    assert!(err.message.contains("out of service"), "{err}");
    good.write(LuId(0), 0, &[9; 512], false).unwrap();
    assert_eq!(read1(&good, 1, 0), 9);
}

#[test]
fn plugin_check_cli() {
    let out = Command::new(binary("host-agent"))
        .args(["plugin", "check"])
        .arg(plugin_path("mode-select"))
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("plugin:       mode-select"), "{text}");
    assert!(
        text.contains("capabilities: mode-select, array-copy, fua"),
        "{text}"
    );
    assert!(text.contains("thread model: parallel"), "{text}");
    for bad in ["test-not-a-plugin", "test-incompatible"] {
        let out = Command::new(binary("host-agent"))
            .args(["plugin", "check"])
            .arg(plugin_path(bad))
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(&*plugin_path(bad).display().to_string()),
            "{err}"
        );
    }
}

/// Loading by name from a plugin directory finds `libhvm_plugin_<name>.so`.
#[test]
fn loads_by_name_from_a_plugin_directory() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        plugin_path("pre-update"),
        dir.path().join("libhvm_plugin_pre_update.so"),
    )
    .unwrap();
    let path = hvm_plugin_abi::host::path_in(dir.path(), "pre-update");
    let p = Plugin::load(&path).unwrap();
    assert_eq!(p.name, "pre-update");
    let msg = refused(&hvm_plugin_abi::host::path_in(dir.path(), "stateless"));
    assert!(
        msg.contains("libhvm_plugin_stateless.so") && msg.contains("No such file"),
        "{msg}"
    );
}

/// Interface 0.1.1's addition: the array-side backup functions cross the boundary, and
/// a plugin of 0.1.0 loads beside plugins of today in one process, in either order.
#[test]
fn backup_functions_cross_the_plugin_boundary_beside_an_old_plugin() {
    use hvm_core::array_backup::{BackupCapabilities, BackupOp, BackupReply, PairState};
    let old = Plugin::load(&hvm_tests::old_plugin_path()).unwrap();
    assert_eq!(old.interface, "0.1.0");
    let dir = tempfile::tempdir().unwrap();
    let cfg = std::fs::read_to_string(
        hvm_tests::workspace().join("array-sim/examples/ep1058190-backup.yaml"),
    )
    .unwrap();
    let body: String = cfg
        .lines()
        .filter(|l| !l.starts_with('#') && !l.starts_with("dir:"))
        .map(|l| format!("    {l}\n"))
        .collect();
    let params = format!(
        "array:\n  embedded:\n    dir: {}\n{body}",
        dir.path().display()
    );
    let p = Plugin::load(&plugin_path("mode-select")).unwrap();
    assert_eq!(
        p.interface,
        hvm_plugin_abi::host::Plugin::interface_version()
    );
    assert_ne!(p.interface, old.interface);
    let b = p.open(&params).unwrap();
    assert_eq!(b.backup_capabilities(), BackupCapabilities::ALL);
    b.write(LuId(10), 0, &[7; 4096], false).unwrap();
    assert_eq!(
        b.backup(&BackupOp::PairCreate {
            primary: 10,
            secondary: 11
        })
        .unwrap(),
        BackupReply::Done
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        match b.backup(&BackupOp::PairStatus { lu: 10 }).unwrap() {
            BackupReply::Pair(s) if s.state == PairState::Duplex => break,
            BackupReply::Pair(_) => {}
            r => panic!("{r:?}"),
        }
        assert!(std::time::Instant::now() < deadline, "never duplex");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(read1(&b, 11, 0), 7);
    // The array's refusal comes back as the error's message, with the kind it maps to.
    let e = b
        .backup(&BackupOp::PairCreate {
            primary: 10,
            secondary: 1,
        })
        .unwrap_err();
    assert!(e.message.contains("plain LU"), "{e}");
    // And the old plugin, loaded again after today's, still works.
    let again = Plugin::load(&hvm_tests::old_plugin_path()).unwrap();
    let ob = again.open("").unwrap();
    ob.write(LuId(0), 1, &[3; 512], false).unwrap();
    assert_eq!(read1(&ob, 0, 1), 3);
}

/// A plugin built against a frozen copy of the plugin interface (its own workspace, so
/// its copy is the package `hvm-plugin-abi` as abi_stable requires) loads into today's
/// host and works: the guard for the next change of the interface. Without a driver for
/// them it offers no array-side backup functions.
#[test]
fn a_plugin_built_against_the_frozen_interface_still_loads() {
    let p = Plugin::load(&hvm_tests::old_plugin_path()).unwrap();
    let b = p.open("").unwrap();
    let d = b.describe().unwrap();
    assert_eq!(d.lus.len(), 1);
    b.write(LuId(0), 7, &[0x5a; 512], false).unwrap();
    assert_eq!(read1(&b, 0, 7), 0x5a);
    assert_eq!(
        b.backup_capabilities(),
        hvm_core::array_backup::BackupCapabilities::default()
    );
    let e = b
        .backup(&hvm_core::array_backup::BackupOp::Counters)
        .unwrap_err();
    assert_eq!(e.kind, BackendErrorKind::Unsupported, "{e}");
}
