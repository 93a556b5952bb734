//! `hvmctl backup ...` other than the array-side copies: a run across hosts (the
//! console side, `coord::console`), deleting a failed run's snapshots, the backup host's
//! catalog (list, verify, restore, prune) over the coordination service, and the old
//! hvm-backup/1 directories handled locally.

use std::path::PathBuf;
use std::process::ExitCode;

use hvm_host_agent::backups::legacy;
use hvm_host_agent::coord::console;
use hvm_host_agent::coord::{tls, BackupList, Code, Failure, Peer, Pruned, Restored, Verified};
use serde_json::Value;

use crate::arrayctl::{self, CopyKind};
use crate::cli::{parse_rate, BackupCmd, BackupHost, PeerArgs};
use crate::error::{self, Error};

fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        v => v.to_string(),
    }
}

fn peer(address: &str, a: &PeerArgs) -> Result<Peer, String> {
    let env_or = |v: &Option<PathBuf>, var: &str, default: &str| {
        v.clone()
            .or_else(|| std::env::var_os(var).map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from(default))
    };
    let ca = env_or(&a.ca, "HVM_CA", "/etc/hvm/tls/ca.pem");
    let token = env_or(&a.token_file, "HVM_TOKEN_FILE", "/etc/hvm/tls/token");
    let beside_ca = |name: &str| {
        let dir = ca.parent().unwrap_or_else(|| std::path::Path::new("."));
        dir.join(name).display().to_string()
    };
    let cert = env_or(&a.cert, "HVM_CERT", &beside_ca("console.pem"));
    let key = env_or(&a.key, "HVM_KEY", &beside_ca("console-key.pem"));
    Ok(Peer {
        address: address.to_string(),
        tls: tls::client_config(&ca, Some((&cert, &key))).map_err(|e| e.to_string())?,
        token: tls::read_token(&token).map_err(|e| e.to_string())?,
    })
}

fn bar(json: bool) -> impl FnMut(&str, u64, u64) {
    let draw = !json && hvm_host_agent::ctl::bars();
    let mut last = String::new();
    move |label: &str, done: u64, total: u64| {
        if draw && (done == total || done % (64 << 20) == 0) {
            if last != label && !last.is_empty() {
                eprintln!();
            }
            last = label.to_string();
            hvm_host_agent::ctl::progress(label, done, total, "bytes");
        }
    }
}

pub fn backup(sock: &std::path::Path, cmd: &BackupCmd, json: bool) -> error::Result {
    match cmd {
        BackupCmd::Ccopy(a) => arrayctl::copy(sock, json, CopyKind::Ccopy, a),
        BackupCmd::Auto(a) => arrayctl::copy(sock, json, CopyKind::Auto, a),
        BackupCmd::Cow(a) => arrayctl::cow(sock, json, a),
        BackupCmd::Job(a) => arrayctl::job(sock, json, a),
        BackupCmd::Policy { command } => exited(hvm_host_agent::policy::main(command, json)),
        BackupCmd::Run { .. } => backup_run(cmd, json).map_err(|e| e.during("backup run")),
        BackupCmd::Delete { db, vlus, peer: p } => {
            backup_delete(db, vlus, p, json).map_err(|e| e.during("backup delete"))
        }
        BackupCmd::List { .. }
        | BackupCmd::Verify { .. }
        | BackupCmd::Restore { .. }
        | BackupCmd::Prune { .. } => catalog_cmd(cmd, json),
    }
}

/// The status of a command that printed its own messages (the backup policy runner).
fn exited(code: ExitCode) -> error::Result {
    if code == ExitCode::SUCCESS {
        return Ok(());
    }
    let kind = if code == ExitCode::from(2) {
        Error::Usage(String::new())
    } else {
        Error::Failed(String::new())
    };
    Err(Error::Reported(Box::new(kind)))
}

/// `hvmctl backup run`: the console side of one online backup.
fn backup_run(cmd: &BackupCmd, json: bool) -> error::Result {
    let BackupCmd::Run {
        db,
        backup,
        vlus,
        target,
        via,
        db_nbd,
        deadline_ms,
        wait_resync,
        full,
        incremental: _,
        rate,
        consistency,
        peer: p,
    } = cmd
    else {
        return Err(Error::Usage("not backup run".into()));
    };
    let rate = rate
        .as_deref()
        .map(|r| parse_rate(r).ok_or_else(|| Error::not_a_rate(r)))
        .transpose()?;
    let o = console::Options {
        db: peer(db, p).map_err(Error::Usage)?,
        backup: peer(backup, p).map_err(Error::Usage)?,
        vlus: vlus.clone(),
        target: target.clone(),
        via: *via,
        db_nbd: db_nbd.clone(),
        deadline_ms: *deadline_ms,
        wait_resync: *wait_resync,
        full: *full,
        rate,
        consistency: *consistency,
        human: !json,
    };
    let r = console::run(&o);
    if json {
        println!("{}", r.value);
    }
    match r.error {
        None => Ok(()),
        Some(e) if r.code == Some(Code::Timeout) => Err(Error::Deadline(e.to_string())),
        Some(e) => Err(Error::Failed(e.to_string())),
    }
}

/// `hvmctl backup delete`: the snapshots of a failed run, by hand.
fn backup_delete(db: &str, vlus: &[String], p: &PeerArgs, json: bool) -> error::Result {
    let db = peer(db, p).map_err(Error::Usage)?;
    let v = console::delete(&db, vlus).map_err(|f| Error::Failed(f.to_string()))?;
    if json {
        println!("{}", serde_json::to_string(&v).unwrap_or_default());
    } else {
        for x in &v.vlus {
            println!("{}: {}", x.vlu, x.mode);
        }
    }
    Ok(())
}

/// The backup host of a catalog command, or why not.
fn backup_peer(h: &BackupHost) -> Result<Peer, String> {
    let a = h.backup.as_deref().ok_or(
        "--backup HOST:PORT is required: the catalog and the repositories are on the backup host",
    )?;
    peer(a, &h.peer)
}

/// An old-format (hvm-backup/1) directory named instead of a backup id.
fn legacy_dir(id: &str) -> Option<PathBuf> {
    let p = PathBuf::from(id);
    legacy::is_legacy(&p).then_some(p)
}

/// An old-format directory named by `backup verify` or `backup restore --to`: handled
/// here, locally.
fn legacy_cmd(cmd: &BackupCmd, json: bool) -> Option<error::Result> {
    match cmd {
        BackupCmd::Verify { id, .. } => legacy_dir(id).map(|d| legacy_verify(&d, json)),
        BackupCmd::Restore {
            id,
            vlu,
            to: Some(to),
            ..
        } => legacy_dir(id).map(|d| legacy_restore(&d, vlu.as_deref(), to, json)),
        _ => None,
    }
}

/// `backup list|verify|restore|prune`: on the backup host over the coordination
/// service (old-format directories here).
fn catalog_cmd(cmd: &BackupCmd, json: bool) -> error::Result {
    let (name, host) = match cmd {
        BackupCmd::List { host, .. } => ("list", host),
        BackupCmd::Verify { host, .. } => ("verify", host),
        BackupCmd::Restore { host, .. } => ("restore", host),
        BackupCmd::Prune { host, .. } => ("prune", host),
        _ => return Err(Error::Usage("not a catalog command".into())),
    };
    let what = format!("backup {name}");
    if let Some(r) = legacy_cmd(cmd, json) {
        return r.map_err(|e| e.during(&what));
    }
    let r = backup_peer(host).and_then(|bk| catalog_call(&bk, cmd, json));
    let r = r.map_err(|e| Error::Usage(e).during(&what))?;
    let f = match r {
        Ok(v) => {
            if json {
                println!("{}", v.json());
            } else {
                print!("{}", v.human());
            }
            return Ok(());
        }
        Err(f) => f,
    };
    if json {
        println!("{}", serde_json::json!({ "ok": false, "error": f }));
    }
    let e = if f.code == Code::BadRequest {
        Error::Usage(f.to_string())
    } else {
        Error::Failed(f.to_string())
    };
    Err(e.during(&what))
}

/// A catalog command's answer.
enum Answer {
    List(BackupList),
    Verify(Verified),
    Restore(Restored),
    Prune(Pruned),
}

impl Answer {
    fn json(&self) -> String {
        match self {
            Answer::List(v) => serde_json::to_string(v),
            Answer::Verify(v) => serde_json::to_string(v),
            Answer::Restore(v) => serde_json::to_string(v),
            Answer::Prune(v) => serde_json::to_string(v),
        }
        .unwrap_or_default()
    }

    fn human(&self) -> String {
        match self {
            Answer::List(v) => console::list_table(v),
            Answer::Verify(v) => console::verified_line(v),
            Answer::Restore(v) => console::restored_line(v),
            Answer::Prune(v) => console::pruned_line(v),
        }
    }
}

/// Send a catalog command to the backup host `bk`; `Err` for a usage error.
fn catalog_call(bk: &Peer, cmd: &BackupCmd, json: bool) -> Result<Result<Answer, Failure>, String> {
    Ok(match cmd {
        BackupCmd::List {
            target,
            vlu,
            rebuild,
            ..
        } => console::list(bk, target.clone(), vlu.clone(), *rebuild).map(Answer::List),
        BackupCmd::Verify { id, .. } => console::verify(bk, id, !json).map(Answer::Verify),
        BackupCmd::Restore {
            id,
            vlu,
            to,
            in_place,
            force,
            db,
            db_nbd,
            host,
        } => match (to, in_place, db, vlu) {
            (Some(t), _, _, _) => console::restore(bk, id, vlu.clone(), t, !json),
            (None, true, Some(db), Some(vlu)) => {
                let r = hvm_host_agent::coord::inplace::InPlace {
                    backup_host: bk,
                    db: &peer(db, &host.peer)?,
                    id,
                    vlu,
                    db_nbd: db_nbd.as_deref(),
                    force: *force,
                };
                let draw = !json && hvm_host_agent::ctl::bars();
                let v = hvm_host_agent::coord::inplace::restore(&r, &mut |d, t| {
                    if draw {
                        hvm_host_agent::ctl::progress("  restore", d, t, "bytes");
                    }
                });
                if draw {
                    eprintln!();
                }
                v
            }
            _ => return Err("--to PATH or --in-place --db HOST:PORT --vlu V".into()),
        }
        .map(Answer::Restore),
        BackupCmd::Prune {
            target,
            keep_last,
            keep_daily,
            keep_weekly,
            dry_run,
            ..
        } => {
            let keep =
                (keep_last.is_some() || keep_daily.is_some() || keep_weekly.is_some()).then(|| {
                    hvm_host_agent::backups::retention::Keep {
                        last: keep_last.unwrap_or(0),
                        daily: keep_daily.unwrap_or(0),
                        weekly: keep_weekly.unwrap_or(0),
                    }
                });
            console::prune(bk, target, keep, *dry_run).map(Answer::Prune)
        }
        _ => return Err("not a catalog command".into()),
    })
}

fn legacy_verify(dir: &std::path::Path, json: bool) -> error::Result {
    let v = legacy::verify(dir, &mut bar(json)).map_err(|e| Error::Failed(e.to_string()))?;
    if json {
        println!("{v}");
    } else {
        let n = v["files"].as_array().map_or(0, Vec::len);
        println!(
            "{}: backup {} of {} (hvm-backup/1): {n} files match the manifest",
            dir.display(),
            s(&v["id"]),
            s(&v["created"])
        );
    }
    Ok(())
}

fn legacy_restore(
    dir: &std::path::Path,
    vlu: Option<&str>,
    to: &std::path::Path,
    json: bool,
) -> error::Result {
    let v =
        legacy::restore(dir, vlu, to, &mut bar(json)).map_err(|e| Error::Failed(e.to_string()))?;
    if json {
        println!("{v}");
    } else {
        println!(
            "restored {} ({} bytes, SHA-256 {}) to {}",
            s(&v["vlu"]),
            s(&v["size"]),
            s(&v["sha256"]),
            to.display()
        );
    }
    Ok(())
}
