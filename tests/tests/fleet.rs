//! A fleet on one machine: ten database hosts (separate host-agent processes and ports,
//! each with its own embedded array) and one backup host, backed up by one
//! `hvmctl backup policy run --parallel 4`; one database host killed during the run
//! fails only its entry, with its reason, and the status table says so.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::Stdio;

use hvm_host_agent::backups::store::{DirStore, Store};
use hvm_tests::backup::Site;

const HOSTS: usize = 10;
/// Blocks of each database host's LU (2 MiB: the fleet stays lean).
const BLOCKS: u64 = 4096;
/// The host killed once the first entry has ended: with 4 at a time, its entry has not
/// started yet.
const KILLED: usize = 7;

/// The policy file: one entry per database host, each into its own repository.
fn policy(site: &Site) -> PathBuf {
    let mut s = format!(
        "tls: {{ ca: {t}/ca.pem, token_file: {t}/token }}\nstate: {}\nentries:\n",
        site.dir.join("policy-state.json").display(),
        t = site.tls.display()
    );
    for (i, (_, addr)) in site.dbs.iter().enumerate() {
        s.push_str(&format!(
            "  - {{ name: db{i:02}, db: '{addr}', vlus: [pg], backup: '{}', target: db{i:02}, schedule: daily 02:00, via: nbd, retries: 1 }}\n",
            site.backup_addr
        ));
    }
    let p = site.dir.join("policy.yaml");
    std::fs::write(&p, s).unwrap();
    p
}

#[test]
fn a_policy_backs_up_ten_hosts_and_one_killed_host_fails_alone() {
    let work = tempfile::tempdir().unwrap();
    let mut site = Site::start(work.path(), HOSTS, BLOCKS, &[]);
    for (i, (db, _)) in site.dbs.iter().enumerate() {
        // Each host's data differs: its number in the first MiB.
        db.qemu_io("pg", &[&format!("write -P {} 0 1M", 0x10 + i)]);
    }
    let policy = policy(&site);
    // The run, its lines read as they come: the first ended entry is the moment to kill
    // host 7.
    let mut run = site
        .hvmctl()
        .args(["backup", "policy", "run"])
        .arg(&policy)
        .args(["--parallel", "4"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = String::new();
    let mut killed = false;
    for line in BufReader::new(run.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        if !killed && line.trim_start().starts_with("db") && line.contains(": ") {
            let p = &mut site.dbs[KILLED].0.proc.0;
            p.kill().unwrap();
            p.wait().unwrap();
            killed = true;
        }
        out.push_str(&line);
        out.push('\n');
    }
    let status = run.wait().unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(&mut run.stderr.take().unwrap(), &mut err).unwrap();
    eprintln!("{out}{err}");
    assert!(killed, "no entry line: {out}");
    assert_eq!(status.code(), Some(1), "one entry failed: exit status 1");
    assert!(
        out.contains("10 entries: 9 ok, 1 failed, 0 not due"),
        "{out}"
    );

    // The status table: 9 ok with their backups, 1 failed with the reason.
    let st = site
        .hvmctl()
        .args(["--json", "backup", "policy", "status"])
        .arg(&policy)
        .output()
        .unwrap();
    assert_eq!(
        st.status.code(),
        Some(1),
        "status exits 1 while an entry failed"
    );
    let v: serde_json::Value = serde_json::from_slice(&st.stdout).unwrap();
    let entries = v["entries"].as_array().unwrap();
    assert_eq!(entries.len(), HOSTS);
    for (i, e) in entries.iter().enumerate() {
        let last = &e["last"];
        if i == KILLED {
            assert_eq!(e["result"], "failed", "{e}");
            let reason = last["reason"].as_str().unwrap();
            assert!(
                reason.contains(&site.dbs[KILLED].1),
                "the reason names the host: {reason}"
            );
            assert_eq!(
                last["attempts"], 2,
                "one retry after a transport error: {e}"
            );
            continue;
        }
        assert_eq!(e["result"], "ok", "{e}");
        assert_eq!(last["kind"], "full", "{e}");
        // The backup is in that host's repository on the backup host, manifest last.
        let id = last["backup"].as_str().unwrap();
        let repo = DirStore::open(&site.repos.join(format!("db{i:02}"))).unwrap();
        assert!(
            repo.exists(&format!("backups/{id}/manifest.json")).unwrap(),
            "{e}"
        );
    }
    let human = site
        .hvmctl()
        .args(["backup", "policy", "status"])
        .arg(&policy)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&human.stdout);
    eprintln!("{text}");
    assert_eq!(
        text.lines().filter(|l| l.contains(" ok ")).count(),
        9,
        "{text}"
    );
    assert_eq!(
        text.lines().filter(|l| l.contains(" failed ")).count(),
        1,
        "{text}"
    );

    // Nothing is due again today but the failed entry, which the next run retries.
    let again = site
        .hvmctl()
        .args(["backup", "policy", "run"])
        .arg(&policy)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&again.stdout);
    assert!(text.contains("1 due, 9 not due"), "{text}");
    assert_eq!(again.status.code(), Some(1), "{text}");
}
