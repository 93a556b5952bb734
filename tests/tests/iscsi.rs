//! A real iSCSI target (issue 15): tgtd, started by the test's own fixture
//! (`hvm_tests::tgt`), drives through libiscsi.
//!
//! - The demo's cycle on a virtual LU whose two legs are LUNs of tgtd (the config of
//!   `host-agent/examples/iscsi.yaml`): writes over NBD, acquire, the snapshot export
//!   copied and compared with the instant, delete, resync; then the two LUNs, read with
//!   the test's own libiscsi client (not through hvm), are identical and hold the data.
//! - The Mode Select and pre-update drivers refuse tgtd at open with one line.
//! - tgtd stopped (SIGSTOP): a write fails with EIO within the timeout, host-agent stays
//!   up and `hvmctl backends` shows the backend failing; SIGCONT: it serves again and
//!   shows ok, without a restart of host-agent.
//! - The same for an `array-sim serve` daemon killed and started again.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use hvm_plugin_abi::host::Plugin;
use hvm_tests::agent::Agent;
use hvm_tests::legs::{after, instant, read_export, MIB, SIZE};
use hvm_tests::tgt::{read_lun, Tgt};
use hvm_tests::{binary, plugin_path, spawn_ready, tool, workspace, Running};

/// The example config with its two legs on `tgt`'s LUNs 1 and 2 and `timeout` seconds.
fn example_config(dir: &Path, tgt: &Tgt, timeout: u32) -> PathBuf {
    let example =
        std::fs::read_to_string(workspace().join("host-agent/examples/iscsi.yaml")).unwrap();
    let placeholder = "iscsi://127.0.0.1:3260/iqn.2026-12.invalid.hvm:array0/";
    assert!(example.contains(placeholder), "{example}");
    let text = example
        .replace(&format!("{placeholder}1"), &tgt.url(1))
        .replace(&format!("{placeholder}2"), &tgt.url(2))
        .replace("timeout: 30", &format!("timeout: {timeout}"));
    let cfg = dir.join("agent.yaml");
    std::fs::write(&cfg, text).unwrap();
    cfg
}

#[test]
fn demo_cycle_on_two_tgtd_luns_and_the_luns_read_back_identical() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let tgt = Tgt::start(2, SIZE);
    let a = Agent::start_config(&example_config(d, &tgt, 30), &d.join("state"));
    let backends = a.json(&["backends"]);
    assert_eq!(backends["backends"][0]["health"], "ok", "{backends}");
    let ids = backends["backends"][0]["lus"].to_string();
    assert!(ids.contains("naa."), "LU identities from VPD 83h: {ids}");

    a.qemu_io(
        "db",
        &["write -P 0x11 0 8M", "write -P 0x33 40M 1M", "flush"],
    );
    a.json(&["snapshot", "acquire", "db"]);
    a.qemu_io(
        "db",
        &["write -P 0x22 4M 2M", "write -z -u 40M 512k", "flush"],
    );
    let snap = read_export(&a.uri("db-snap"), d, "snap.img");
    assert!(
        snap == instant(),
        "the snapshot copy differs from the data at the instant"
    );
    let done = a.json(&["snapshot", "delete", "db", "--wait"]);
    assert_eq!(done["resync"]["done"], true, "{done}");
    assert_eq!(a.mode("db"), "Synchronized");
    a.qemu_io(
        "db",
        &[
            "read -P 0x11 0 4M",
            "read -P 0x22 4M 2M",
            "read -P 0x11 6M 2M",
            "read -P 0 40M 512k",
            "read -P 0x33 41472k 512k",
        ],
    );
    a.signal(nix::sys::signal::Signal::SIGTERM);
    let mut proc = a.proc;
    assert!(proc.0.wait().unwrap().success(), "host-agent exit status");

    let (la, lb) = (read_lun(&tgt, 1, SIZE), read_lun(&tgt, 2, SIZE));
    assert!(la == lb, "the LUNs differ after resync");
    assert!(la == after(), "the LUNs do not hold the virtual LU's data");
}

/// The error a plugin's open answers for `params`.
fn refusal(plugin: &str, params: &str) -> String {
    match Plugin::load(&plugin_path(plugin)).unwrap().open(params) {
        Ok(_) => panic!("the {plugin} driver opened {params}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn mode_select_and_pre_update_drivers_refuse_tgtd_in_one_line() {
    let tgt = Tgt::start(1, 16 * MIB);
    let url = tgt.url(1);
    let params = format!("array:\n  iscsi: \"{url}\"\ntimeout: 10\n");
    let e = refusal("mode-select", &params);
    println!("mode-select: {e}");
    assert!(
        e.contains(&format!(
            "{url}: MODE SELECT of page 0x00 refused (ILLEGAL REQUEST "
        )) && e.contains("): this array cannot keep the LU mode; use the stateless driver"),
        "{e}"
    );
    assert_eq!(e.lines().count(), 1, "{e}");
    let e = refusal("pre-update", &params);
    println!("pre-update: {e}");
    assert!(
        e.contains(&format!(
            "{url}: INQUIRY of VPD page 0xc0 refused (ILLEGAL REQUEST "
        )) && e.contains("use the stateless driver"),
        "{e}"
    );
    // The stateless driver drives volumes of LUNs, not one LUN as an array.
    let e = refusal("stateless", &params);
    assert!(e.contains("give `volumes:`"), "{e}");
}

/// qemu-io on the virtual LU: (success, output).
fn qemu_io(a: &Agent, cmds: &[&str]) -> (bool, String) {
    let mut c = tool("qemu-io");
    c.args(["-f", "raw", &a.uri("db")]);
    for x in cmds {
        c.args(["-c", x]);
    }
    let out = c.output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success() && !text.contains("failed"), text)
}

fn health(a: &Agent) -> String {
    a.json(&["backends"])["backends"][0]["health"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Writes fail with EIO, within about `timeout`; host-agent answers; the backend shows
/// failing.
fn writes_fail_with_eio(a: &Agent, timeout: Duration) {
    let start = Instant::now();
    let (ok, text) = qemu_io(a, &["write -P 0x55 1M 64k"]);
    let took = start.elapsed();
    assert!(!ok && text.contains("Input/output error"), "{text}");
    println!("write with the array gone: EIO after {took:?} (timeout {timeout:?})");
    assert_eq!(a.json(&["status"])["virtual_lus"], 2);
    let h = health(a);
    assert!(h.starts_with("failing: "), "{h}");
    println!("hvmctl backends: {h}");
}

/// Writes work again within 60 s, without a restart of host-agent, and the backend shows
/// ok.
fn serves_again(a: &Agent) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (ok, text) = qemu_io(a, &["write -P 0x66 1M 64k"]);
        if ok {
            break;
        }
        assert!(Instant::now() < deadline, "never served again: {text}");
        std::thread::sleep(Duration::from_millis(200));
    }
    a.qemu_io("db", &["read -P 0x44 0 1M", "read -P 0x66 1M 64k"]);
    assert_eq!(health(a), "ok");
}

#[test]
fn a_stopped_tgtd_gives_eio_within_the_timeout_and_comes_back() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let tgt = Tgt::start(2, 16 * MIB);
    let a = Agent::start_config(&example_config(d, &tgt, 2), &d.join("state"));
    a.qemu_io("db", &["write -P 0x44 0 1M", "flush"]);
    tgt.run(false);
    writes_fail_with_eio(&a, Duration::from_secs(2));
    tgt.run(true);
    serves_again(&a);
}

/// `array-sim serve` of Fig. 9 on a Unix socket in `dir`.
fn array_sim(dir: &Path) -> Running {
    let (daemon, line) = spawn_ready(
        Command::new(binary("array-sim"))
            .args(["serve", "--config"])
            .arg(workspace().join("array-sim/examples/fig9-stateless.yaml"))
            .arg("--listen")
            .arg(format!("unix:{}", dir.join("array.sock").display()))
            .arg("--dir")
            .arg(dir.join("data")),
    );
    assert!(line.contains("listening"), "{line}");
    daemon
}

#[test]
fn a_killed_and_restarted_array_sim_daemon_is_reconnected() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let daemon = array_sim(d);
    let cfg = d.join("agent.yaml");
    std::fs::write(
        &cfg,
        format!(
            "listen:\n  unix: nbd.sock\nbackends:\n  - name: sim0\n    plugin: stateless\n    params:\n      timeout: 2\n      array: {{ connect: \"unix:{}\" }}\nvirtual_lus:\n  - {{ name: db, backend: sim0, lu: 0, snapshots: [db-snap] }}\n",
            d.join("array.sock").display()
        ),
    )
    .unwrap();
    let a = Agent::start_config(&cfg, &d.join("state"));
    a.qemu_io("db", &["write -P 0x44 0 1M", "flush"]);
    let pid = nix::unistd::Pid::from_raw(daemon.0.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).unwrap();
    drop(daemon);
    writes_fail_with_eio(&a, Duration::from_secs(2));
    let _daemon = array_sim(d);
    serves_again(&a);
}
