//! host-agent as a system service: SIGHUP reloads what may change live and reports the
//! rest, a bad file changes nothing, sd_notify tells the service manager READY,
//! RELOADING and STOPPING, and SIGTERM exits 0.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::time::Duration;

use hvm_tests::agent::Agent;
use hvm_tests::{tool, workspace};
use nix::sys::signal::Signal;

/// The next sd_notify message, which must contain `want`.
fn expect(rx: &UnixDatagram, want: &str) -> String {
    let mut buf = [0u8; 4096];
    let n = rx
        .recv(&mut buf)
        .unwrap_or_else(|e| panic!("no {want} from host-agent: {e}"));
    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(
        msg.lines().any(|l| l == want),
        "expected {want}, got {msg:?}"
    );
    msg
}

fn exports(a: &Agent) -> Vec<String> {
    let out = tool("nbdinfo")
        .args(["--list", "--json"])
        .arg(format!(
            "nbd+unix:///?socket={}",
            a.state.join("nbd.sock").display()
        ))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["exports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["export-name"].as_str().unwrap().to_string())
        .collect()
}

fn strings(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap().to_string())
        .collect()
}

fn reload(a: &Agent, rx: &UnixDatagram) -> serde_json::Value {
    a.signal(Signal::SIGHUP);
    let msg = expect(rx, "RELOADING=1");
    assert!(msg.contains("MONOTONIC_USEC="), "{msg:?}");
    expect(rx, "READY=1");
    a.json(&["status"])["last_reload"].clone()
}

#[test]
fn sighup_reloads_live_changes_and_sd_notify_follows_the_service() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let config = dir.path().join("hvm.yaml");
    let original =
        std::fs::read_to_string(workspace().join("host-agent/examples/quickstart.yaml")).unwrap();
    std::fs::write(&config, &original).unwrap();
    let rx = UnixDatagram::bind(dir.path().join("notify")).unwrap();
    rx.set_read_timeout(Some(Duration::from_secs(30))).unwrap();

    let mut cmd = Agent::command(&config, &state);
    cmd.env("NOTIFY_SOCKET", dir.path().join("notify"));
    let mut a = Agent::spawn(&mut cmd, &state);
    let ready = expect(&rx, "READY=1");
    assert!(ready.contains("STATUS=serving 6 virtual LUs"), "{ready:?}");
    assert!(exports(&a).contains(&"logs".to_string()));

    // Live: log level, resync rate and chunk, who may open `logs`. Needs a restart: a
    // backend's parameters, a new virtual LU.
    let changed = format!(
        "log_level: debug\nresync: {{ rate_mib: 5, chunk_kib: 256 }}\n{}",
        original
            .replace(
                "{ name: logs, backend: modeselect0, lu: 1, snapshots: [logs-snap] }",
                "{ name: logs, backend: modeselect0, lu: 1, snapshots: [logs-snap], allow_uids: [4242424] }",
            )
            .replace("dir: stateless0", "dir: stateless9")
            + "  - { name: extra, backend: stateless0, lu: 0, snapshots: [] }\n"
    );
    std::fs::write(&config, &changed).unwrap();
    let r = reload(&a, &rx);
    assert_eq!(r["error"], serde_json::Value::Null, "{r}");
    let applied = strings(&r["applied"]);
    for p in [
        "log_level",
        "resync.rate_mib",
        "resync.chunk_kib",
        "virtual_lus[logs].access",
    ] {
        assert!(applied.contains(&p.to_string()), "{p} not in {r}");
    }
    assert_eq!(
        strings(&r["needs_restart"]),
        ["backends[stateless0]", "virtual_lus[extra] (added)"],
        "{r}"
    );
    let status = a.json(&["status"]);
    assert_eq!(status["resync"]["bytes_per_second"], 5 << 20, "{status}");
    assert_eq!(status["resync"]["chunk_bytes"], 256 << 10, "{status}");
    // Root is not uid 4242424: `logs` and its snapshot are no longer offered.
    let list = exports(&a);
    assert!(!list.contains(&"logs".to_string()), "{list:?}");
    assert!(list.contains(&"db".to_string()), "{list:?}");
    // The restart-only change was not made: db still serves from the same array files.
    a.qemu_io("db", &["write -P 0x5a 0 4096", "read -P 0x5a 0 4096"]);
    assert!(!state.join("stateless9").exists());

    // A file that does not parse changes nothing; the report says where.
    std::fs::write(&config, "listen: [\n").unwrap();
    let r = reload(&a, &rx);
    let err = r["error"].as_str().unwrap();
    assert!(err.contains("hvm.yaml") && err.contains("line"), "{r}");
    assert_eq!(a.json(&["status"])["resync"]["bytes_per_second"], 5 << 20);
    let e = a.refused(&["reload"]);
    assert!(e.contains("hvm.yaml"), "{e}");

    // Back to the original through hvmctl: the live settings return.
    std::fs::write(&config, &original).unwrap();
    let r = a.json(&["reload"]);
    assert!(
        strings(&r["applied"]).contains(&"virtual_lus[logs].access".to_string()),
        "{r}"
    );
    assert!(strings(&r["needs_restart"]).is_empty(), "{r}");
    assert_eq!(a.json(&["status"])["resync"]["bytes_per_second"], 0);
    assert!(exports(&a).contains(&"logs".to_string()));

    // SIGTERM: STOPPING, then a clean exit.
    a.signal(Signal::SIGTERM);
    expect(&rx, "STOPPING=1");
    let st = a.proc.0.wait().unwrap();
    assert!(st.success(), "{st:?}");
}

#[test]
fn the_systemd_unit_is_hardened_and_valid() {
    let unit = workspace().join("host-agent/packaging/hvm-host-agent.service");
    let text = std::fs::read_to_string(&unit).unwrap();
    for line in [
        "Type=notify",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "StateDirectory=hvm",
        "RuntimeDirectory=hvm",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "PrivateTmp=yes",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "{line} missing in {}",
            unit.display()
        );
    }
    verify_unit(&unit);
}

/// `systemd-analyze verify` checks the unit's syntax and that its ExecStart exists; the
/// unit names /usr/bin/host-agent, so it is checked from a copy that names this build's.
fn verify_unit(unit: &Path) {
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(unit).unwrap().replace(
        "/usr/bin/host-agent",
        &hvm_tests::binary("host-agent").display().to_string(),
    );
    let copy = dir.path().join("hvm-host-agent.service");
    std::fs::write(&copy, text).unwrap();
    let out = tool("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    let own: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("hvm-host-agent.service"))
        .collect();
    assert!(
        out.status.success() && own.is_empty(),
        "systemd-analyze verify: {err}"
    );
}
