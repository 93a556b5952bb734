//! The control API and hvmctl against a running host-agent on the quickstart config:
//! every operation, the strategies' precondition errors, idempotent repeats, the journal
//! across SIGKILL and SIGTERM.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::io::{Read, Write};
use std::path::Path;

use hvm_tests::agent::Agent;

fn http_get(sock: &Path, path: &str) -> String {
    let mut s = std::os::unix::net::UnixStream::connect(sock).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: hvm\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn every_operation_with_its_preconditions() {
    let state = tempfile::tempdir().unwrap();
    let a = Agent::start(state.path());
    let status = a.json(&["status"]);
    assert_eq!(status["virtual_lus"], 6);
    assert_eq!(a.mode("db"), "Synchronized");
    assert_eq!(a.mode("db-snap"), "Undefined");
    let table = String::from_utf8(a.hvmctl(&["lu", "list"]).stdout).unwrap();
    assert!(
        table.starts_with("NAME") && table.contains("db-snap"),
        "{table}"
    );

    // Precondition errors: delete needs Snapshot, acquire takes an origin.
    let e = a.refused(&["snapshot", "delete", "db"]);
    assert!(e.contains("Snapshot") && e.contains("Synchronized"), "{e}");
    let e = a.refused(&["snapshot", "acquire", "db-snap"]);
    assert!(e.contains("origin") || e.contains("not"), "{e}");
    let e = a.refused(&["snapshot", "acquire", "nope"]);
    assert!(e.contains("no virtual LU named \"nope\""), "{e}");

    // Acquire, and acquire again: the repeat changes nothing.
    a.qemu_io("db", &["write -P 0x11 0 1M"]);
    assert_eq!(a.json(&["snapshot", "acquire", "db"])["changed"], true);
    assert_eq!(a.json(&["snapshot", "acquire", "db"])["changed"], false);
    assert_eq!(a.mode("db"), "Snapshot");
    a.qemu_io("db", &["write -P 0x22 65536 8192"]);
    let ext = a.json(&["extents", "db"]);
    assert_eq!(ext["ranges"], serde_json::json!([[128, 143]]), "{ext}");
    a.qemu_io("db-snap", &["read -P 0x11 65536 8192"]);

    // Resync paused: the pair stays Re-synchronizing, and acquire is refused.
    a.json(&["resync", "pause"]);
    assert_eq!(a.json(&["snapshot", "delete", "db"])["changed"], true);
    assert_eq!(a.json(&["snapshot", "delete", "db"])["changed"], false);
    assert_eq!(a.mode("db"), "Re-synchronizing");
    let e = a.refused(&["snapshot", "acquire", "db"]);
    assert!(e.contains("Synchronized"), "{e}");
    let rs = a.json(&["resync", "status"]);
    let db = rs["pairs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "db")
        .unwrap()
        .clone();
    assert_eq!(db["remaining_lbas"], 16, "{rs}");
    assert_eq!(rs["paused"], true);
    let metrics = http_get(&a.control(), "/metrics");
    assert!(
        metrics.contains(
            "hvm_recorded_lbas{vlu=\"db\",backend=\"stateless0\",mode=\"Re-synchronizing\"} 16"
        ),
        "{metrics}"
    );
    assert!(metrics.contains("hvm_resync_paused 1"), "{metrics}");

    // Rate limit and resume; the resync finishes.
    assert_eq!(
        a.json(&["resync", "rate", "64M"])["bytes_per_second"],
        64 << 20
    );
    let out = a.hvmctl(&["resync", "rate", "fast"]);
    assert_eq!(out.status.code(), Some(2));
    a.json(&["resync", "resume"]);
    // A second cycle: delete --wait returns when the pair is Synchronized again.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while a.mode("db") != "Synchronized" {
        assert!(
            std::time::Instant::now() < deadline,
            "resync never finished"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    a.json(&["snapshot", "acquire", "db"]);
    a.qemu_io("db", &["write -P 0x23 0 4096"]);
    let done = a.json(&["snapshot", "delete", "db", "--wait"]);
    assert_eq!(done["resync"]["done"], true, "{done}");
    assert_eq!(done["resync"]["copied_lbas"], 8, "{done}");
    assert_eq!(a.mode("db"), "Synchronized");

    let b = a.json(&["backends"]);
    assert_eq!(b["backends"].as_array().unwrap().len(), 3);
    assert!(b["backends"]
        .as_array()
        .unwrap()
        .iter()
        .all(|x| x["health"] == "ok"));
    let nf = http_get(&a.control(), "/v1/nothing");
    assert!(nf.starts_with("HTTP/1.1 404"), "{nf}");

    // The control socket is 0660 in a 0700 directory.
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&a.control()), 0o660);
    assert_eq!(mode(a.control().parent().unwrap()), 0o700);
}

#[test]
fn tables_survive_sigkill_and_sigterm_exits_clean() {
    let state = tempfile::tempdir().unwrap();
    let a = Agent::start(state.path());
    a.json(&["snapshot", "acquire", "db"]);
    a.json(&["snapshot", "acquire", "files"]);
    a.qemu_io("db", &["write -P 0x33 1048576 4096"]);
    a.qemu_io("files", &["write -P 0x44 0 4096"]);
    a.signal(nix::sys::signal::Signal::SIGKILL);
    drop(a);

    // After a crash the recorded ranges are all there (at worst whole activity regions).
    let a = Agent::start(state.path());
    assert_eq!(a.mode("db"), "Snapshot");
    let ext = a.json(&["extents", "db"]);
    let ranges = ext["ranges"].as_array().unwrap().clone();
    assert!(
        ranges
            .iter()
            .any(|r| r[0].as_u64().unwrap() <= 2048 && r[1].as_u64().unwrap() >= 2055),
        "{ext}"
    );
    // E4: the saved pre-update data is still the snapshot's.
    a.qemu_io("files-snap", &["read -P 0 0 4096"]);
    a.qemu_io("files", &["read -P 0x44 0 4096"]);

    // SIGTERM: drain, checkpoint, exit 0; the restart finds exact tables.
    a.signal(nix::sys::signal::Signal::SIGTERM);
    let mut a = a;
    let st = a.proc.0.wait().unwrap();
    assert!(st.success(), "{st:?}");
    let a = Agent::start(state.path());
    assert_eq!(a.mode("db"), "Snapshot");
    let done = a.json(&["snapshot", "delete", "db", "--wait"]);
    assert_eq!(done["resync"]["done"], true, "{done}");
    assert_eq!(a.mode("db"), "Synchronized");
}

/// `hvmctl snapshot rollback` over real clients on each array kind of the quickstart:
/// writes after the acquire are undone, the snapshot is deleted and the pair ends
/// Synchronized; outside Snapshot mode it is refused.
#[test]
fn snapshot_rollback_undoes_the_writes_since_the_acquire() {
    let state = tempfile::tempdir().unwrap();
    let a = Agent::start(state.path());
    for vlu in ["db", "logs", "files"] {
        a.qemu_io(vlu, &["write -P 0x11 0 1M"]);
        let e = a.refused(&["snapshot", "rollback", vlu]);
        assert!(e.contains("expected Snapshot"), "{vlu}: {e}");
        a.json(&["snapshot", "acquire", vlu]);
        a.qemu_io(
            vlu,
            &["write -P 0x22 65536 131072", "write -P 0x33 900k 4k"],
        );
        let out = a.json(&["snapshot", "rollback", vlu, "--wait"]);
        assert!(
            out["rolled_back_lbas"].as_u64().unwrap() >= 264,
            "{vlu}: {out}"
        );
        assert_eq!(a.mode(vlu), "Synchronized", "{vlu}");
        a.qemu_io(vlu, &["read -P 0x11 0 1M"]);
    }
}

/// One request on a fresh TCP connection: the status line and headers, and the body.
fn tcp_request(addr: &str, request_line: &str) -> (String, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "{request_line} HTTP/1.1\r\nHost: hvm\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    assert!(!head.to_ascii_lowercase().contains("chunked"), "{head}");
    (head.to_string(), body.to_string())
}

/// A sample's labels, unescaped.
type Labels = Vec<(String, String)>;

/// A sample of the Prometheus text format: name, labels, value.
type Sample = (String, Labels, f64);

fn metric_name(s: &str) -> bool {
    let mut c = s.chars();
    c.next()
        .is_some_and(|f| f.is_ascii_alphabetic() || f == '_' || f == ':')
        && c.all(|x| x.is_ascii_alphanumeric() || x == '_' || x == ':')
}

/// `k="v",...}` after the `{`: the labels, unescaping `\\`, `\"` and `\n` (any other
/// escape or a raw quote or newline is an error), and the rest after the `}`.
fn parse_labels(mut rest: &str) -> Result<(Labels, &str), String> {
    let mut labels = Vec::new();
    loop {
        if let Some(r) = rest.strip_prefix('}') {
            return Ok((labels, r));
        }
        let (key, r) = rest.split_once("=\"").ok_or("label without =\"")?;
        if !metric_name(key) || key.contains(':') {
            return Err(format!("bad label name {key:?}"));
        }
        let (mut value, mut chars) = (String::new(), r.char_indices());
        let end = loop {
            match chars.next().ok_or("unterminated label value")? {
                (i, '"') => break i,
                (_, '\\') => match chars.next().ok_or("dangling escape")?.1 {
                    '\\' => value.push('\\'),
                    '"' => value.push('"'),
                    'n' => value.push('\n'),
                    c => return Err(format!("bad escape \\{c}")),
                },
                (_, '\n') => return Err("raw newline in a label value".into()),
                (_, c) => value.push(c),
            }
        };
        labels.push((key.to_string(), value));
        rest = &r[end + 1..];
        rest = rest.strip_prefix(',').unwrap_or(rest);
    }
}

/// Parse Prometheus text format 0.0.4 strictly: every family has HELP then TYPE (counter
/// or gauge), counters are named `*_total`, every sample belongs to the family declared
/// just before it, label values are well escaped, values are numbers.
fn parse_exposition(text: &str) -> Result<Vec<Sample>, String> {
    let (mut samples, mut help, mut family) = (Vec::new(), None::<String>, None::<String>);
    for line in text.lines() {
        if let Some(r) = line.strip_prefix("# HELP ") {
            let (name, _) = r
                .split_once(' ')
                .ok_or(format!("HELP without text: {line}"))?;
            help = Some(name.to_string());
        } else if let Some(r) = line.strip_prefix("# TYPE ") {
            let (name, kind) = r.split_once(' ').ok_or(format!("bad TYPE: {line}"))?;
            if help.as_deref() != Some(name) || !metric_name(name) {
                return Err(format!("TYPE without its HELP: {line}"));
            }
            match kind {
                "counter" if name.ends_with("_total") => {}
                "gauge" => {}
                _ => return Err(format!("bad type or counter name: {line}")),
            }
            family = Some(name.to_string());
        } else {
            let split = line.find(['{', ' ']).ok_or(format!("bad sample: {line}"))?;
            let (name, rest) = line.split_at(split);
            if family.as_deref() != Some(name) {
                return Err(format!("sample outside its family: {line:?}"));
            }
            let (labels, rest) = match rest.strip_prefix('{') {
                Some(r) => parse_labels(r)?,
                None => (Vec::new(), rest),
            };
            let value = rest
                .strip_prefix(' ')
                .and_then(|v| v.parse::<f64>().ok())
                .ok_or(format!("bad value: {line:?}"))?;
            samples.push((name.to_string(), labels, value));
        }
    }
    Ok(samples)
}

#[test]
fn the_strict_exposition_parser_refuses_what_a_scraper_would() {
    let ok = "# HELP a_total A.\n# TYPE a_total counter\na_total{x=\"q\\\"b\\\\n\\n\"} 1\n";
    let s = parse_exposition(ok).unwrap();
    assert_eq!(s[0].1, vec![("x".to_string(), "q\"b\\n\n".to_string())]);
    for bad in [
        "# HELP a A.\n# TYPE a counter\na 1\n",
        "# HELP a A.\n# TYPE a gauge\na{x=\"q\"b\"} 1\n",
        "# HELP a A.\n# TYPE a gauge\na{x=\"\\q\"} 1\n",
        "# HELP a A.\n# TYPE a gauge\nb 1\n",
        "a 1\n",
    ] {
        assert!(parse_exposition(bad).is_err(), "{bad}");
    }
}

/// `listen.metrics`: the Prometheus text on a TCP port of its own, read-only; a virtual
/// LU named with a quote, a backslash and a newline is escaped in its label.
#[test]
fn metrics_are_scraped_over_tcp_with_names_escaped() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("metrics.yaml");
    std::fs::write(
        &cfg,
        r#"listen: { unix: nbd.sock, metrics: "127.0.0.1:0" }
backends:
  - name: stateless0
    plugin: stateless
    params:
      array:
        embedded:
          kind: stateless
          dir: stateless0
          disks: [{ name: d0 }, { name: d1 }]
          lus:
            - { lun: 1, blocks: 8192, disk: d0 }
            - { lun: 2, blocks: 8192, disk: d1 }
          mirroring:
            - { mirror: 0, origin: 1, mate: 2 }
virtual_lus:
  - { name: "we\"ird\\na\nme", backend: stateless0, lu: 0, snapshots: [snap] }
"#,
    )
    .unwrap();
    let state = dir.path().join("state");
    let (proc, line) = hvm_tests::spawn_ready(&mut Agent::command(&cfg, &state));
    let agent = Agent { proc, state };
    let addr = line
        .split("metrics on http://")
        .nth(1)
        .and_then(|r| r.split('/').next())
        .unwrap_or_else(|| panic!("no metrics address in {line:?}"));
    let (head, body) = tcp_request(addr, "GET /metrics");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    let samples = parse_exposition(&body).unwrap_or_else(|e| panic!("{e}\n{body}"));
    let labels = |kv: &[(&str, &str)]| -> Labels {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    let weird = "we\"ird\\na\nme";
    assert!(
        samples.contains(&(
            "hvm_recorded_lbas".into(),
            labels(&[
                ("vlu", weird),
                ("backend", "stateless0"),
                ("mode", "Synchronized")
            ]),
            0.0
        )),
        "{body}"
    );
    assert!(body.contains("vlu=\"we\\\"ird\\\\na\\nme\""), "{body}");
    for family in [
        "hvm_resync_copied_lbas_total",
        "hvm_journal_flushes_total",
        "hvm_snapshot_read_bytes_total",
        "hvm_journal_bytes",
        "hvm_resync_paused",
    ] {
        assert!(
            samples.iter().any(|s| s.0 == family),
            "{family} missing:\n{body}"
        );
    }
    // Read-only: another method or path is refused, the API is not reachable here.
    let (head, _) = tcp_request(addr, "POST /metrics");
    assert!(head.starts_with("HTTP/1.1 405"), "{head}");
    let (head, _) = tcp_request(addr, "GET /v1/lus");
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
    let (head, _) = tcp_request(addr, "POST /v1/resync/pause");
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
    assert_eq!(agent.json(&["resync", "status"])["paused"], false);
    // The control socket serves the same text.
    let local = http_get(&agent.control(), "/metrics");
    let (_, local) = local.split_once("\r\n\r\n").unwrap();
    assert!(
        parse_exposition(local).is_ok_and(|s| s.len() == samples.len()),
        "{local}"
    );
}
