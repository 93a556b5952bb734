//! Backups as a product (issue 19), end to end on a real PostgreSQL: a full backup, then
//! two incrementals from the database host's changed-block tracking, with pgbench
//! writing between them; every point restored into a new image starts as a cluster that
//! recovers and satisfies pgbench's invariants; each incremental copies no more than
//! 1.05x what the tracking says was written; a corrupted chunk is named by verify; a
//! prune by policy keeps every remaining point restorable to the same bytes; and the
//! README's restore recipe without hvm (jq, zstd, b3sum, dd) gives the same image.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;

use hvm_tests::backup::Hosts;
use hvm_tests::pg::{restore_and_recover, Bench, Deployment};
use serde_json::Value;

const LU: u64 = 256 << 20;

fn run(hosts: &Hosts, extra: &[&str]) -> Value {
    let (out, v) = hosts.run(&["pg"], "pg", extra);
    assert!(
        out.status.success(),
        "backup run: {}\n{v}",
        String::from_utf8_lossy(&out.stderr)
    );
    v
}

/// A restore of `id` into a new file: its SHA-256 as the backup host reports it.
fn restored_sha(hosts: &Hosts, id: &str, to: &Path) -> String {
    let out = hosts.try_restore(id, None, to);
    assert!(
        out.status.success(),
        "restore {id}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v["sha256"].as_str().unwrap().to_string()
}

fn sha256_file(p: &Path) -> String {
    let out = Command::new("sha256sum").arg(p).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// The README's recipe (between its `restore-recipe` markers), run with bash.
fn readme_recipe(repo: &Path, id: &str, vlu: &str, out: &Path) {
    let readme = std::fs::read_to_string(hvm_tests::workspace().join("README.md")).unwrap();
    let start = readme
        .find("<!-- restore-recipe -->")
        .expect("README has the restore recipe");
    let body = &readme[start..];
    let code = body
        .split("```sh\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .unwrap();
    for tool in ["jq", "zstd", "b3sum", "dd"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .status()
            .unwrap();
        assert!(
            found.success(),
            "{tool} is missing (Debian packages jq, zstd, b3sum)"
        );
    }
    let st = Command::new("bash")
        .args(["-euo", "pipefail", "-c", code])
        .env("REPO", repo)
        .env("ID", id)
        .env("VLU", vlu)
        .env("OUT", out)
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "the README recipe failed: {}",
        String::from_utf8_lossy(&st.stderr)
    );
}

/// Bytes copied against bytes written per the tracking, for the incremental `v`.
fn incremental_ratio(v: &Value) -> f64 {
    let l = &v["copy"]["lus"][0];
    assert_eq!(l["kind"], "incremental", "not an incremental: {v}");
    let copied = l["copied_bytes"].as_u64().unwrap();
    let written = l["written_bytes"].as_u64().unwrap();
    let ratio = copied as f64 / written.max(1) as f64;
    println!(
        "incremental {}: {copied} bytes copied, {written} written since {} per tracking: {ratio:.3}x (the LU: {LU})",
        v["id"], l["base"]
    );
    ratio
}

#[test]
fn postgresql_full_and_incrementals_restore_verify_and_prune() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path();
    let d = Deployment::start(work, LU, 5, 20_000);
    let hosts = &d.hosts;
    let mut live = d.cluster;
    let mut ids = Vec::new();
    for round in 0..3 {
        Bench::start(&live, 2, 3).finish();
        let v = run(hosts, &["--wait-resync"]);
        if round == 0 {
            assert_eq!(v["copy"]["kind"], "full", "{v}");
        } else {
            // What pgbench writes in its seconds depends on the machine's speed, so the
            // bound is the tracking's count (at most 1.05x) and less than a whole LU.
            assert_eq!(v["copy"]["kind"], "incremental", "{v}");
            assert!(incremental_ratio(&v) <= 1.05, "{v}");
            assert!(
                v["copy"]["lus"][0]["copied_bytes"].as_u64().unwrap() < LU,
                "{v}"
            );
        }
        ids.push(v["id"].as_str().unwrap().to_string());
    }
    // --full forces a full copy, whatever the tracking says (after more pgbench, so the
    // live cluster ends past the last incremental).
    Bench::start(&live, 2, 2).finish();
    let v = run(hosts, &["--full"]);
    assert_eq!(v["copy"]["kind"], "full", "{v}");
    assert_eq!(v["copy"]["lus"][0]["copied_bytes"], LU, "{v}");
    ids.push(v["id"].as_str().unwrap().to_string());
    let (_, live_rows) = live.pgbench_invariants();
    live.stop();

    // The catalog lists the three, with their kinds and parents.
    let listed = hosts.list(Some("pg"));
    let rows = listed["backups"].as_array().unwrap();
    assert_eq!(rows.len(), 4, "{listed}");
    assert_eq!(rows[0]["kind"], "full");
    assert_eq!(rows[1]["kind"], "incremental");
    assert_eq!(rows[1]["parent"], ids[0].as_str());
    assert_eq!(rows[2]["parent"], ids[1].as_str());

    // Every point: the image, and a cluster that recovers on it with fewer history
    // rows than the next point.
    let mut shas = Vec::new();
    let mut last_rows = 0;
    for (i, id) in ids.iter().enumerate() {
        shas.push(restored_sha(
            hosts,
            id,
            &work.join(format!("point-{i}.img")),
        ));
        if i == 3 {
            break; // the forced full: its bytes are checked after the prune
        }
        let (_, rows) = restore_and_recover(hosts, work, id, live.port + 1, live_rows);
        assert!(
            rows > last_rows,
            "point {i}: {rows} rows, the one before {last_rows}"
        );
        last_rows = rows;
    }
    assert!(shas[0] != shas[1] && shas[1] != shas[2]);

    // The README's recipe without hvm restores the same bytes.
    let by_hand = work.join("by-hand.img");
    readme_recipe(&hosts.target_root.join("pg"), &ids[2], "pg", &by_hand);
    assert_eq!(sha256_file(&by_hand), shas[2]);

    // A corrupted chunk: verify fails and names it; restored, verify passes.
    let m = hosts.manifest("pg", &ids[2]);
    let chunk = m["lus"][0]["extents"][0]["chunk"].as_str().unwrap();
    let path = hosts.chunk_path("pg", chunk);
    let good = std::fs::read(&path).unwrap();
    let mut bad = good.clone();
    let at = bad.len() / 2;
    bad[at] ^= 0x40;
    std::fs::write(&path, &bad).unwrap();
    let out = hosts.verify(&ids[2]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains(chunk), "verify does not name the chunk: {err}");
    std::fs::write(&path, &good).unwrap();
    let out = hosts.verify(&ids[2]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed = hosts.list(Some("pg"));
    assert!(
        !listed["backups"][2]["verified_unix_ms"].is_null(),
        "{listed}"
    );

    // Prune, keeping the last two: the dry run says so and deletes nothing; the prune
    // deletes the first full and the first incremental, and the second incremental
    // (whose parent is gone: each manifest maps the whole LU) and the forced full still
    // restore to the same bytes.
    let prune = |dry: bool| {
        let mut a = vec!["backup", "prune", "--backup", &hosts.backup_addr];
        a.extend(["--target", "pg", "--keep-last", "2"]);
        if dry {
            a.push("--dry-run");
        }
        let out = hosts.hvmctl(&a);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<Value>(&out.stdout).unwrap()
    };
    let p = prune(true);
    assert_eq!(p["delete"], serde_json::json!([ids[0], ids[1]]), "{p}");
    assert_eq!(
        hosts.list(Some("pg"))["backups"].as_array().unwrap().len(),
        4
    );
    let p = prune(false);
    println!("prune: {p}");
    assert!(p["chunks_deleted"].as_u64().unwrap() > 0, "{p}");
    assert_eq!(
        hosts.list(Some("pg"))["backups"].as_array().unwrap().len(),
        2
    );
    for i in 2..4 {
        let to = work.join(format!("after-prune-{i}.img"));
        assert_eq!(restored_sha(hosts, &ids[i], &to), shas[i], "point {i}");
        let out = hosts.verify(&ids[i]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    drop(d.fs);
}
