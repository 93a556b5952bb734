//! host-agent's data path end to end: the quickstart config on embedded arrays, served
//! over NBD to real clients; `hvm:dirty` in Snapshot mode; config errors.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::path::Path;
use std::process::Command;

use hvm_host_agent::config::Config;
use hvm_host_agent::{agent, service};
use hvm_tests::{binary, build_artifacts, spawn_ready, target_dir, tool, workspace};

fn uri(sock: &Path, export: &str) -> String {
    format!("nbd+unix:///{export}?socket={}", sock.display())
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{cmd:?}: {text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

#[test]
fn quickstart_serves_real_clients() {
    let state = tempfile::tempdir().unwrap();
    let (_agent, line) = spawn_ready(
        Command::new(binary("host-agent"))
            .arg("--config")
            .arg(workspace().join("host-agent/examples/quickstart.yaml"))
            .arg("--state-dir")
            .arg(state.path()),
    );
    assert!(
        line.starts_with("host-agent: serving 6 virtual LUs"),
        "{line}"
    );
    let sock = state.path().join("nbd.sock");

    let list = run_ok(tool("nbdinfo").args(["--list", "--json", &uri(&sock, "")]));
    for name in ["\"db\"", "\"logs\"", "\"files\""] {
        assert!(list.contains(name), "{list}");
    }
    assert!(
        !list.contains("db-snap"),
        "Undefined snapshot exports are not listed: {list}"
    );

    for export in ["db", "logs", "files"] {
        let text = run_ok(
            tool("qemu-io")
                .args(["-f", "raw", &uri(&sock, export)])
                .args(["-c", "write -P 0xab 0 1M", "-c", "read -P 0xab 0 1M"])
                .args(["-c", "write -P 0x5c 4095 3", "-c", "read -P 0x5c 4095 3"]),
        );
        assert!(!text.contains("verification failed"), "{export}: {text}");
    }
    let copy = state.path().join("db.img");
    run_ok(
        tool("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw", &uri(&sock, "db")])
            .arg(&copy),
    );
    let img = std::fs::read(&copy).unwrap();
    assert_eq!(img.len(), 131_072 * 512);
    assert!(img[..4095].iter().all(|b| *b == 0xab));
    assert!(img[4095..4098].iter().all(|b| *b == 0x5c));
    assert!(img[1 << 20..].iter().all(|b| *b == 0));
    // fio's nbd engine through the manager on every array kind, verified with crc32c.
    for export in ["db", "logs", "files"] {
        let out = tool("fio")
            .args([
                "--name=verify",
                "--ioengine=nbd",
                "--rw=randwrite",
                "--bs=4k",
                "--offset=4M",
                "--size=8M",
                "--iodepth=16",
                "--verify=crc32c",
                "--do_verify=1",
                "--output-format=terse",
            ])
            .arg(format!("--uri={}", uri(&sock, export)))
            .current_dir(state.path())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && !err.contains("verify: bad"),
            "fio on {export}: {err}"
        );
    }
}

/// In Snapshot mode, `nbdinfo --map=hvm:dirty` lists exactly the written ranges, and the
/// snapshot export is listed and keeps the data of the snapshot instant.
#[test]
fn dirty_map_in_snapshot_mode() {
    build_artifacts();
    let state = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(workspace().join("host-agent/examples/quickstart.yaml"))
        .unwrap()
        + &format!("plugin_dir: {}\n", target_dir().display());
    let cfg = Config::parse(&text, "quickstart.yaml").unwrap();
    let agent = std::sync::Arc::new(agent::build(&cfg, &workspace(), Some(state.path())).unwrap());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let listeners = rt.block_on(service::listen(&agent)).unwrap();
    let sock = agent.socket.clone();
    let (mgr, db) = agent.virtual_lu("db").unwrap();
    mgr.write(db, 0, &vec![0x11; 1 << 20], false).unwrap();
    mgr.acquire(db).unwrap();
    std::thread::scope(|s| {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let agent = &agent;
        let rt = &rt;
        s.spawn(move || {
            rt.block_on(service::serve(agent, listeners, async {
                let _ = rx.await;
            }))
        });
        run_ok(
            tool("qemu-io")
                .args(["-f", "raw", &uri(&sock, "db")])
                .args([
                    "-c",
                    "write -P 0x22 8192 4096",
                    "-c",
                    "write -P 0x22 100000 10",
                ]),
        );
        let map = run_ok(tool("nbdinfo").args(["--map=hvm:dirty", &uri(&sock, "db")]));
        let dirty: Vec<(u64, u64)> = map
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.len() >= 3 && f[2] == "1")
                    .then(|| (f[0].parse().unwrap(), f[1].parse().unwrap()))
            })
            .collect();
        // 100000..100010 lies in sector 195 (99840..100352): whole sectors are marked.
        assert_eq!(dirty, vec![(8192, 4096), (99_840, 512)], "{map}");
        let list = run_ok(tool("nbdinfo").args(["--list", "--json", &uri(&sock, "")]));
        assert!(list.contains("\"db-snap\""), "{list}");
        let text = run_ok(
            tool("qemu-io")
                .args(["-f", "raw", "-r", &uri(&sock, "db-snap")])
                .args(["-c", "read -P 0x11 8192 4096"]),
        );
        assert!(!text.contains("verification failed"), "{text}");
        let _ = tx.send(());
    });
}

/// TCP offers only unrestricted exports (no peer credentials), serves them to real
/// clients, and the service logs JSON lines at the configured level.
#[test]
fn tcp_listener_and_json_logs() {
    let state = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(workspace().join("host-agent/examples/quickstart.yaml"))
        .unwrap()
        .replace(
            "listen:\n  unix: nbd.sock\n",
            "log_level: debug\nlisten:\n  unix: nbd.sock\n  tcp: 127.0.0.1:0\n  insecure: true\n",
        )
        .replace(
            "snapshots: [files-snap], save_area: 9",
            "snapshots: [files-snap], save_area: 9, allow_uids: [0]",
        );
    assert!(text.contains("tcp: 127.0.0.1:0") && text.contains("allow_uids"));
    let cfg = state.path().join("tcp.yaml");
    std::fs::write(&cfg, text).unwrap();
    let log = state.path().join("agent.log");
    let (_agent, line) = spawn_ready(
        Command::new(binary("host-agent"))
            .arg("--config")
            .arg(&cfg)
            .arg("--state-dir")
            .arg(state.path())
            .args(["--log-format", "json"])
            .env_remove("RUST_LOG")
            .stderr(std::fs::File::create(&log).unwrap()),
    );
    let addr = line
        .trim()
        .rsplit_once(" and tcp:")
        .map(|(_, a)| a.to_string())
        .unwrap_or_else(|| panic!("no TCP address in {line:?}"));
    let tcp_list = run_ok(tool("nbdinfo").args(["--list", "--json", &format!("nbd://{addr}")]));
    assert!(tcp_list.contains("\"db\""), "{tcp_list}");
    assert!(
        !tcp_list.contains("\"files\""),
        "an export restricted to uids is not offered on TCP: {tcp_list}"
    );
    let unix_list = run_ok(tool("nbdinfo").args([
        "--list",
        "--json",
        &uri(&state.path().join("nbd.sock"), ""),
    ]));
    if nix::unistd::getuid().is_root() {
        assert!(unix_list.contains("\"files\""), "{unix_list}");
    }
    let text = run_ok(
        tool("qemu-io")
            .args(["-f", "raw", &format!("nbd://{addr}/logs")])
            .args([
                "-c",
                "write -P 0x3c 65536 128k",
                "-c",
                "read -P 0x3c 65536 128k",
            ]),
    );
    assert!(!text.contains("verification failed"), "{text}");
    // Opening a refused export is logged at debug level, as JSON.
    let _ = tool("nbdinfo").arg(format!("nbd://{addr}/files")).output();
    let logged = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<serde_json::Value> = logged
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let has = |msg: &str| lines.iter().any(|v| v["fields"]["message"] == msg);
    assert!(has("backend opened") && has("serving"), "{logged}");
    assert!(has("transmission"), "debug lines are logged: {logged}");
}

/// A mirroring definition listed in the config [0054] is used, and checked against the
/// array: an LU the array lacks or a row of the wrong kind is refused with the reason.
#[test]
fn listed_mirroring_definitions() {
    build_artifacts();
    let base = std::fs::read_to_string(workspace().join("host-agent/examples/quickstart.yaml"))
        .unwrap()
        + &format!("plugin_dir: {}\n", target_dir().display());
    let build = |text: &str| {
        let state = tempfile::tempdir().unwrap();
        let cfg = Config::parse(text, "q.yaml").unwrap();
        agent::build(&cfg, &workspace(), Some(state.path())).map(|a| (a, state))
    };
    let listed = base.replace(
        "{ name: db, backend: stateless0, lu: 0,",
        "{ name: db, backend: stateless0, lu: 0, mirroring: { origin: 1, mate: 2 },",
    );
    assert_ne!(listed, base);
    let (agent, _state) = build(&listed).unwrap();
    let (mgr, db) = agent.virtual_lu("db").unwrap();
    mgr.write(db, 0, &[7u8; 4096], false).unwrap();
    mgr.acquire(db).unwrap();

    let missing = base.replace(
        "{ name: db, backend: stateless0, lu: 0,",
        "{ name: db, backend: stateless0, lu: 0, mirroring: { origin: 1, mate: 7 },",
    );
    let e = build(&missing).err().unwrap().to_string();
    assert!(e.contains("the array has no LU 7"), "{e}");
    let wrong_kind = base.replace(
        "{ name: db, backend: stateless0, lu: 0,",
        "{ name: db, backend: stateless0, lu: 0, mirroring: { mates: [2] },",
    );
    let e = build(&wrong_kind).err().unwrap().to_string();
    assert!(
        e.contains("stateless0") && e.contains("does not offer Mode Select"),
        "{e}"
    );
}

#[test]
fn bad_config_is_refused_with_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.yaml");
    std::fs::write(&cfg, "listen: {unix: s}\nbackends: []\nvirtual_lus:\n  - {name: db, backend: a, lu: x, snapshots: []}\n").unwrap();
    let out = Command::new(binary("host-agent"))
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.yaml") && err.contains("line 4"), "{err}");
}
