//! `hvmctl`: the administrator's command line for host-agent's control API.
//!
//! ```sh
//! hvmctl status
//! hvmctl lu list
//! hvmctl snapshot acquire db
//! hvmctl snapshot delete db --wait
//! hvmctl lu move db --to legs0 [--lus 0] [--rate 200M] [--wait] | --cancel
//! hvmctl extents db
//! hvmctl verify db [--rate 100M] [--repair]
//! hvmctl resync pause|resume|rate 100M
//! hvmctl backends
//! hvmctl reload
//! hvmctl demo            # the whole online backup on embedded arrays
//! hvmctl tls init /etc/hvm/tls --host db1 --host bk1
//! hvmctl backup run --db db1:7430 --backup bk1:7430 --vlu pg --target pg [--full] [--rate 200M]
//! hvmctl backup list --backup bk1:7430 [--target pg] [--vlu pg] [--rebuild]
//! hvmctl backup verify --backup bk1:7430 ID
//! hvmctl backup restore --backup bk1:7430 ID --vlu pg --to /dev/sdx | --in-place --db db1:7430
//! hvmctl backup prune --backup bk1:7430 --target pg --keep-last 7 --keep-daily 7 [--dry-run]
//! hvmctl pair create|split|resync|delete|status|wait ...   # array-side, EP 1 058 190
//! hvmctl backup ccopy|auto|cow|job ...
//! hvmctl volume attribute LU user|work
//! hvmctl device list|restore ...
//! hvmctl array counters
//! ```
//!
//! Human tables by default (from the `hvm_api` reply types, see `render`), `--json` for
//! scripts (the agent's JSON as it came). One error type (`error::Error`) gives the exit
//! status, in `main` alone: 0 done, 1 refused or failed (the message says why), 2 usage,
//! 3 the agent cannot be reached, 4 a deadline passed (a backup's freeze deadline, or
//! `pair wait --timeout`), 5 `verify` found legs that differ (and did not repair them).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use hvm_host_agent::backups::legacy;
use hvm_host_agent::coord::console::{self, Via};
use hvm_host_agent::coord::{tls, Code, Peer};
use serde_json::Value;

mod arrayctl;
mod control;
mod error;
mod render;

use arrayctl::{ArrayCmd, CopyArgs, CopyKind, CowArgs, DeviceCmd, JobArgs, PairCmd, VolumeCmd};
use error::Error;

/// The exit statuses (set in `main` alone, from [`Error::exit_status`]).
const EXIT_STATUS: &str = "Exit status:
  0  done
  1  the agent, the backup host or the array refused, or the operation failed (the message says why)
  2  usage: a bad argument or input
  3  the agent cannot be reached on its control socket, or answered garbage
  4  a deadline passed: a backup's freeze deadline (everything was thawed and rolled back), or `pair wait --timeout`
  5  `verify` found legs that differ and did not repair them";

#[derive(Parser)]
#[command(
    name = "hvmctl",
    about = "control host-agent (hvm host volume manager)",
    after_help = EXIT_STATUS
)]
struct Cli {
    /// The control socket [default: $HVM_CONTROL, else /run/hvm/control.sock].
    #[arg(long, global = true)]
    socket: Option<PathBuf>,
    /// Print the agent's JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// The agent's version, counts and resync settings.
    Status,
    /// Virtual LUs.
    Lu {
        #[command(subcommand)]
        command: LuCmd,
    },
    /// Acquire or delete a snapshot.
    Snapshot {
        #[command(subcommand)]
        command: SnapCmd,
    },
    /// The update-location table of a virtual LU's pair.
    Extents { vlu: String },
    /// Compare the legs of a Synchronized virtual LU while I/O goes on, chunk by chunk
    /// under the pair's range lock, and list the ranges that differ (exit status 5 when
    /// they do and were not repaired).
    Verify {
        vlu: String,
        /// Bytes compared per second (e.g. 100M); default unlimited.
        #[arg(long)]
        rate: Option<String>,
        /// Write the differing ranges again from the origin leg.
        #[arg(long)]
        repair: bool,
    },
    /// The resync service.
    Resync {
        #[command(subcommand)]
        command: ResyncCmd,
    },
    /// Backends, their health and journals.
    Backends,
    /// Reload the agent's config file, as SIGHUP does: apply what may change live and
    /// list what needs a restart.
    Reload,
    /// The whole online backup on embedded arrays of all three kinds, against a
    /// host-agent it starts (beside hvmctl, with the plugins) in a temporary directory:
    /// writer, quiesce, snapshot, resume, copy, verify, delete, resync, verify.
    Demo {
        /// Work in this directory and keep it (default: a temporary one, removed).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Size of each virtual LU, MiB.
        #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u64).range(1..=8192))]
        size_mib: u64,
        /// Seconds the writer runs before the snapshot.
        #[arg(long, default_value_t = 1.0)]
        warmup: f64,
    },
    /// Online backup across hosts: console, database host and backup host.
    Backup {
        #[command(subcommand)]
        command: BackupCmd,
    },
    /// Certificates and the token for the agents' coordination service.
    Tls {
        #[command(subcommand)]
        command: TlsCmd,
    },
    /// Pairs inside an array (EP 1 058 190): create, split (whole or by area), resync,
    /// delete, status, wait.
    Pair {
        #[command(subcommand)]
        command: PairCmd,
    },
    /// A volume's user/work attribute in the array's working-volume pool.
    Volume {
        #[command(subcommand)]
        command: VolumeCmd,
    },
    /// An array's backup devices, and restoring a backup medium.
    Device {
        #[command(subcommand)]
        command: DeviceCmd,
    },
    /// An array's counters.
    Array {
        #[command(subcommand)]
        command: ArrayCmd,
    },
    /// Print the shell completion script of hvmctl (bash, zsh, fish, elvish, powershell).
    Completions { shell: hvm_host_agent::docs::Shell },
    /// Write the man pages of hvmctl and its subcommands into DIR (for packaging).
    #[command(hide = true)]
    Man { dir: PathBuf },
}

#[derive(clap::Args, Clone)]
struct PeerArgs {
    /// The CA certificate the agents' certificates are signed by [default: $HVM_CA,
    /// else /etc/hvm/tls/ca.pem].
    #[arg(long)]
    ca: Option<PathBuf>,
    /// The shared token [default: $HVM_TOKEN_FILE, else /etc/hvm/tls/token].
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// The client certificate the agents require [default: $HVM_CERT, else console.pem
    /// beside the CA certificate, as `hvmctl tls init` writes it].
    #[arg(long)]
    cert: Option<PathBuf>,
    /// Its key [default: $HVM_KEY, else console-key.pem beside the CA certificate].
    #[arg(long)]
    key: Option<PathBuf>,
}

/// The backup host of the catalog operations.
#[derive(clap::Args, Clone)]
struct BackupHost {
    /// The backup host's coordination address, HOST:PORT.
    #[arg(long)]
    backup: Option<String>,
    #[command(flatten)]
    peer: PeerArgs,
}

#[derive(Subcommand)]
enum BackupCmd {
    /// Backups of many database hosts from a policy file (`run`, `status`).
    Policy {
        #[command(subcommand)]
        command: hvm_host_agent::policy::PolicyCmd,
    },
    /// Quiesce the database host, snapshot the virtual LUs at one instant, resume; copy
    /// on the backup host; delete the snapshots (resync starts).
    Run {
        /// The database host's coordination address, HOST:PORT.
        #[arg(long)]
        db: String,
        /// The backup host's coordination address, HOST:PORT.
        #[arg(long)]
        backup: String,
        /// A virtual LU to back up; several make one consistency group.
        #[arg(long = "vlu", required = true)]
        vlus: Vec<String>,
        /// The repository: a directory relative to the backup host's target_root
        /// (created on first use), later s3://BUCKET/PREFIX.
        #[arg(long)]
        target: String,
        /// Copy the whole virtual LUs even when an incremental backup is possible.
        #[arg(long, conflicts_with = "incremental")]
        full: bool,
        /// Copy only what was written since the last backup when the repository holds
        /// it (the default; a full backup when it does not, and the report says why).
        #[arg(long)]
        incremental: bool,
        /// Copy rate limit, bytes per second (100M, 1G; 0: unlimited).
        #[arg(long)]
        rate: Option<String>,
        /// Where the backup host reads the snapshot.
        #[arg(long, value_enum, default_value_t = Via::Auto)]
        via: Via,
        /// The database host's NBD TCP address, if not its listen.tcp.
        #[arg(long)]
        db_nbd: Option<String>,
        /// A freeze deadline shorter than the database host's configured one.
        #[arg(long)]
        deadline_ms: Option<u64>,
        /// Wait for the resync after the snapshot is deleted.
        #[arg(long)]
        wait_resync: bool,
        #[command(flatten)]
        peer: PeerArgs,
    },
    /// Delete the snapshots of virtual LUs on a database host (finishing a failed run by
    /// hand).
    Delete {
        #[arg(long)]
        db: String,
        #[arg(long = "vlu", required = true)]
        vlus: Vec<String>,
        #[command(flatten)]
        peer: PeerArgs,
    },
    /// The backup host's catalog: id, time, virtual LUs, kind, parent, bytes stored
    /// and logical, verified-at.
    List {
        #[command(flatten)]
        host: BackupHost,
        /// Only the backups of this repository.
        #[arg(long)]
        target: Option<String>,
        /// Only the backups holding this virtual LU.
        #[arg(long)]
        vlu: Option<String>,
        /// Rebuild the catalog from the repositories' manifests first.
        #[arg(long)]
        rebuild: bool,
    },
    /// Read every chunk of backup ID and check it against its SHA-256; a bad chunk is
    /// named. (A directory of the old format hvm-backup/1 is checked here, locally.)
    Verify {
        id: String,
        #[command(flatten)]
        host: BackupHost,
    },
    /// Write a virtual LU's image at backup ID to a new file or a block device on the
    /// backup host (--to), or onto the live virtual LU on the database host
    /// (--in-place). (A directory of the old format hvm-backup/1 is restored here,
    /// locally.)
    Restore {
        id: String,
        #[arg(long)]
        vlu: Option<String>,
        /// An absolute path on the backup host: a new file, or a block device that is
        /// not mounted or in use.
        #[arg(
            long,
            required_unless_present = "in_place",
            conflicts_with = "in_place"
        )]
        to: Option<PathBuf>,
        /// Restore onto the live virtual LU over the database host's NBD listener,
        /// writing only the blocks that differ. Refused while NBD clients have the
        /// virtual LU open (stop the database, unmount, disconnect first); new
        /// connections are refused while it writes. Nothing is started afterwards.
        #[arg(long, requires = "db", requires = "vlu")]
        in_place: bool,
        /// With --in-place: run the database host's coordination.restore.stop command to
        /// end the clients, and restore once none is left.
        #[arg(long, requires = "in_place")]
        force: bool,
        /// The database host's coordination address (with --in-place).
        #[arg(long)]
        db: Option<String>,
        /// The database host's NBD TCP address, if not its listen.tcp.
        #[arg(long)]
        db_nbd: Option<String>,
        #[command(flatten)]
        host: BackupHost,
    },
    /// Delete the backups of a repository that a retention policy does not keep, then
    /// the chunks no remaining backup uses. The newest backup is always kept.
    Prune {
        #[command(flatten)]
        host: BackupHost,
        #[arg(long)]
        target: String,
        /// Keep the newest N backups (of each set of virtual LUs).
        #[arg(long)]
        keep_last: Option<u32>,
        /// Keep the newest backup of each of the last D days that have one.
        #[arg(long)]
        keep_daily: Option<u32>,
        /// Keep the newest backup of each of the last W weeks that have one.
        #[arg(long)]
        keep_weekly: Option<u32>,
        /// Say what would be deleted; delete nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Array-side: copy ranges of a split secondary volume to a backup device inside
    /// the array; no data passes through a host ([0029]-[0030]).
    Ccopy(CopyArgs),
    /// Array-side: split the user volume's pair, copy the secondary to a backup device
    /// and resync, in one command ([0037]-[0040]).
    Auto(CopyArgs),
    /// Array-side: back up the user volume while it is written, saving the old data of a
    /// block to a working volume before its first write ([0062]-[0122]).
    Cow(CowArgs),
    /// Array-side: the state of a copy job.
    Job(JobArgs),
}

#[derive(Subcommand)]
enum TlsCmd {
    /// Make a CA, a certificate and key for each host (signed by the CA) and a token.
    Init {
        dir: PathBuf,
        /// A name (DNS or IP) an agent is reached by; one certificate each.
        #[arg(long = "host", required = true)]
        hosts: Vec<String>,
    },
}

#[derive(Subcommand)]
enum LuCmd {
    /// Every virtual LU with its mode and READ/WRITE destinations.
    List,
    /// Move a virtual LU's data to another backend while it serves I/O (as pvmove):
    /// copy, with writes going to both, then switch in a moment. It must be
    /// Synchronized; a snapshot is refused until the move ends.
    Move {
        vlu: String,
        /// The backend to move to.
        #[arg(long, required_unless_present = "cancel")]
        to: Option<String>,
        /// The target's mirror LU (default: the first free one of the same kind).
        #[arg(long)]
        lus: Option<u32>,
        /// Copy rate, bytes per second (100M, 1G; 0: unlimited); again while a move
        /// runs changes its rate.
        #[arg(long)]
        rate: Option<String>,
        /// Wait for the move to end, with a progress bar.
        #[arg(long)]
        wait: bool,
        /// Stop the move under way; the data stays where it was.
        #[arg(long, conflicts_with_all = ["to", "lus", "rate"])]
        cancel: bool,
    },
}

#[derive(Subcommand)]
enum SnapCmd {
    /// Freeze the snapshot LU at this instant ([0027], [0060]).
    Acquire { vlu: String },
    /// Roll the origin back to its snapshot (an undo without a backup): writes since the
    /// acquire are undone, clients' writes wait meanwhile, then the snapshot is deleted
    /// and the legs resynchronise. Stop the database first.
    Rollback {
        vlu: String,
        /// Wait for the resync after it, with a progress bar.
        #[arg(long)]
        wait: bool,
    },
    /// Delete the snapshot; the legs resynchronise ([0031], [0061]).
    Delete {
        vlu: String,
        /// Wait for resync to finish, with a progress bar.
        #[arg(long)]
        wait: bool,
    },
}

#[derive(Subcommand)]
enum ResyncCmd {
    /// Progress of every pair.
    Status,
    Pause,
    Resume,
    /// Rate limit per backend, e.g. 100M, 1G or 0 (unlimited); bytes per second.
    Rate {
        rate: String,
    },
}

fn socket_path(cli: &Cli) -> PathBuf {
    cli.socket
        .clone()
        .or_else(|| std::env::var_os("HVM_CONTROL").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("/run/hvm/control.sock"))
}

/// A rate such as 200M, 1G or 500000 bytes per second (0: no limit): the policy file's
/// parser, so both read a rate alike.
fn parse_rate(s: &str) -> Option<u64> {
    hvm_host_agent::policy::file::parse_rate(s).ok()
}

fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        v => v.to_string(),
    }
}

/// `hvmctl demo`: it starts its own host-agent, so it needs no control socket.
fn demo(dir: Option<PathBuf>, size_mib: u64, warmup: f64, quiet: bool) -> error::Result {
    let opts = hvm_host_agent::demo::Options {
        dir,
        size_mib,
        warmup: std::time::Duration::from_secs_f64(warmup.clamp(0.0, 3600.0)),
        quiet,
    };
    hvm_host_agent::demo::run(&opts)
        .map(|_| ())
        .map_err(|e| Error::Failed(format!("demo: {e}")))
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

fn backup(sock: &std::path::Path, cmd: &BackupCmd, json: bool) -> error::Result {
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
        human: !json,
    };
    let r = console::run(&o);
    if json {
        println!("{}", r.value);
    }
    match r.error {
        None => Ok(()),
        Some(e) if r.value["error"]["code"] == serde_json::json!(Code::Timeout) => {
            Err(Error::Deadline(e.to_string()))
        }
        Some(e) => Err(Error::Failed(e.to_string())),
    }
}

/// `hvmctl backup delete`: the snapshots of a failed run, by hand.
fn backup_delete(db: &str, vlus: &[String], p: &PeerArgs, json: bool) -> error::Result {
    let db = peer(db, p).map_err(Error::Usage)?;
    let v = console::delete(&db, vlus).map_err(|f| Error::Failed(f.to_string()))?;
    if json {
        println!("{v}");
    } else {
        for x in v["vlus"].as_array().into_iter().flatten() {
            println!("{}: {}", s(&x["vlu"]), s(&x["mode"]));
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
                println!("{v}");
            } else {
                print!("{}", console::human(name, &v));
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

/// Send a catalog command to the backup host `bk`; `Err` for a usage error.
fn catalog_call(
    bk: &Peer,
    cmd: &BackupCmd,
    json: bool,
) -> Result<Result<Value, hvm_host_agent::coord::Failure>, String> {
    Ok(match cmd {
        BackupCmd::List {
            target,
            vlu,
            rebuild,
            ..
        } => console::list(bk, target.clone(), vlu.clone(), *rebuild),
        BackupCmd::Verify { id, .. } => console::verify(bk, id, !json),
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
            (Some(t), _, _, _) => {
                let to = console::RestoreDest::Path(t.clone());
                console::restore(bk, id, vlu.clone(), &to, !json)
            }
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
        },
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
            console::prune(bk, target, keep, *dry_run)
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if !matches!(e, Error::Reported(_)) {
                eprintln!("hvmctl: {e}");
            }
            ExitCode::from(e.exit_status())
        }
    }
}

/// Run the command line's command.
fn run(cli: &Cli) -> error::Result {
    let sock = socket_path(cli);
    let json = cli.json;
    match &cli.command {
        Cmd::Demo {
            dir,
            size_mib,
            warmup,
        } => demo(dir.clone(), *size_mib, *warmup, json),
        Cmd::Backup { command } => backup(&sock, command, json),
        Cmd::Pair { command } => arrayctl::pair(&sock, json, command),
        Cmd::Volume { command } => arrayctl::volume(&sock, json, command),
        Cmd::Device { command } => arrayctl::device(&sock, json, command),
        Cmd::Array { command } => arrayctl::array(&sock, json, command),
        Cmd::Completions { shell } => {
            hvm_host_agent::docs::write_completions(Cli::command(), *shell)
                .map_err(|e| Error::Failed(format!("completions: {e}")))
        }
        Cmd::Man { dir } => man(dir),
        Cmd::Tls {
            command: TlsCmd::Init { dir, hosts },
        } => tls_init(dir, hosts),
        _ => control::run(&sock, &cli.command, json),
    }
}

/// `hvmctl man DIR`: the man pages, for packaging; lists the files written.
fn man(dir: &std::path::Path) -> error::Result {
    let files = hvm_host_agent::docs::write_man(Cli::command(), dir)
        .map_err(|e| Error::Failed(format!("man: {}: {e}", dir.display())))?;
    for f in files {
        println!("{}", f.display());
    }
    Ok(())
}

/// `hvmctl tls init`: lists the files written.
fn tls_init(dir: &std::path::Path, hosts: &[String]) -> error::Result {
    let files = tls::init(dir, hosts).map_err(|e| Error::Failed(format!("tls init: {e}")))?;
    for f in files {
        println!("{}", f.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates() {
        assert_eq!(parse_rate("100M"), Some(100 << 20));
        assert_eq!(parse_rate("0"), Some(0));
        assert_eq!(parse_rate("1g"), Some(1 << 30));
        assert_eq!(parse_rate("fast"), None);
    }
}
