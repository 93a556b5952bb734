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
//! Human tables by default, `--json` for scripts. Exit status 1 when the agent refuses
//! (the message says why), 2 for usage errors, 3 when the agent cannot be reached, 4 when
//! a deadline passed: a backup's freeze deadline (everything was thawed and rolled back)
//! or `pair wait --timeout`, 5 when `verify` found legs that differ (and did not repair
//! them).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use hvm_host_agent::arrayctl::{
    self, ArrayCmd, CopyArgs, CopyKind, CowArgs, DeviceCmd, JobArgs, PairCmd, VolumeCmd,
};
use hvm_host_agent::backups::legacy;
use hvm_host_agent::coord::console::{self, Via};
use hvm_host_agent::coord::{tls, Code, Peer};
use hvm_host_agent::ctl::{call, wait_resync};
use serde_json::Value;

#[derive(Parser)]
#[command(
    name = "hvmctl",
    about = "control host-agent (hvm host volume manager)"
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
        /// writing only the blocks that differ. Stop the database first.
        #[arg(long, requires = "db")]
        in_place: bool,
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

fn table(rows: &[Vec<String>]) -> String {
    let cols = rows.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..cols)
        .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(v, w)| format!("{v:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        v => v.to_string(),
    }
}

/// A move's status in one line.
/// `hvmctl lu list`: one row per virtual LU.
fn lu_table(body: &Value) -> String {
    let mut rows = vec![[
        "NAME",
        "BACKEND",
        "MODE",
        "READ",
        "WRITE",
        "SNAPSHOT OF",
        "SIZE",
        "RECORDED LBAS",
        "CHANGED SINCE BACKUP",
        "DATA ON",
        "MOVE",
    ]
    .map(String::from)
    .to_vec()];
    for l in body.as_array().into_iter().flatten() {
        rows.push(vec![
            s(&l["name"]),
            s(&l["backend"]),
            s(&l["mode"]),
            l["read"].as_u64().map_or("-".into(), |x| format!("LU {x}")),
            l["write"]
                .as_u64()
                .map_or("-".into(), |x| format!("LU {x}")),
            s(&l["snapshot_of"]),
            format!("{} MiB", l["size_bytes"].as_u64().unwrap_or(0) >> 20),
            s(&l["recorded_lbas"]),
            tracking_cell(&l["tracking"]),
            l["placement"]
                .as_str()
                .map_or_else(|| s(&l["backend"]), str::to_string),
            if l["move"].is_null() {
                "-".into()
            } else {
                move_line(&l["move"])
            },
        ]);
    }
    table(&rows)
}

/// An LU's changed-block tracking: bytes since the base, and the backup being copied.
fn tracking_cell(t: &Value) -> String {
    if t.is_null() {
        return "-".into();
    }
    let mib = |v: &Value| v.as_u64().unwrap_or(0) as f64 / f64::from(1 << 20);
    let base = t["base"].as_str().unwrap_or("no backup");
    let mut out = format!("{:.1} MiB since {base}", mib(&t["current_bytes"]));
    if !t["pending"].is_null() {
        let p = &t["pending"];
        out += &format!(", {} copying {:.1} MiB", s(&p["backup"]), mib(&p["bytes"]));
    }
    if t["granule"].as_u64().unwrap_or(512) > 512 {
        out += &format!(
            " ({} KiB granules)",
            t["granule"].as_u64().unwrap_or(0) >> 10
        );
    }
    out
}

fn move_line(b: &Value) -> String {
    let pct = |b: &Value| {
        let total = b["total_bytes"].as_u64().unwrap_or(0).max(1);
        b["copied_bytes"].as_u64().unwrap_or(0) * 100 / total
    };
    let to = s(&b["to"][0]["backend"]) + ":" + &s(&b["to"][0]["lu"]);
    match b["phase"].as_str() {
        Some("copying") => format!("MOVING {}% to {to}", pct(b)),
        Some("done") => format!(
            "moved to {to} in {:.1} s (switch {:.2} ms)",
            b["elapsed_ms"].as_f64().unwrap_or(0.0) / 1e3,
            b["switch_ms"].as_f64().unwrap_or(0.0)
        ),
        Some(p) => format!("move to {to} {p} {}", s(&b["reason"])),
        None => "-".into(),
    }
}

/// One line for a verify result: identical, or the differing ranges.
fn verify_line(body: &Value) -> String {
    let mib = body["compared_bytes"].as_u64().unwrap_or(0) >> 20;
    let secs = body["seconds"].as_f64().unwrap_or(0.0);
    if body["identical"] == true {
        return format!(
            "{}: legs identical ({mib} MiB compared in {secs:.2} s)",
            s(&body["name"])
        );
    }
    let ranges: Vec<String> = body["differing"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| format!("{}-{}", s(&r[0]), s(&r[1])))
        .collect();
    format!(
        "{}: legs differ in {} LBAs (LBA ranges {}){}",
        s(&body["name"]),
        s(&body["differing_lbas"]),
        ranges.join(", "),
        if body["repaired"] == true {
            "; repaired from the origin"
        } else {
            ""
        }
    )
}

fn human(cmd: &Cmd, body: &Value) -> String {
    match cmd {
        Cmd::Verify { .. } => format!("{}\n", verify_line(body)),
        Cmd::Lu {
            command: LuCmd::Move { vlu, .. },
        } => format!("{vlu}: {}\n", move_line(body)),
        Cmd::Lu { .. } => lu_table(body),
        Cmd::Extents { vlu } => {
            let mut out = format!(
                "{vlu}: {}, {} LBAs recorded\n",
                s(&body["mode"]),
                s(&body["total_lbas"])
            );
            let mut rows = vec![vec![
                "FIRST LBA".to_string(),
                "LAST LBA".into(),
                "LBAS".into(),
            ]];
            for r in body["ranges"].as_array().into_iter().flatten() {
                let (a, b) = (r[0].as_u64().unwrap_or(0), r[1].as_u64().unwrap_or(0));
                rows.push(vec![a.to_string(), b.to_string(), (b - a + 1).to_string()]);
            }
            out.push_str(&table(&rows));
            out
        }
        Cmd::Resync {
            command: ResyncCmd::Status,
        } => {
            let mut out = format!(
                "resync: {}, rate {}\n",
                if body["paused"] == true {
                    "paused"
                } else {
                    "running"
                },
                match body["bytes_per_second"].as_u64() {
                    Some(0) | None => "unlimited".to_string(),
                    Some(r) => format!("{} MiB/s", r >> 20),
                }
            );
            let mut rows = vec![[
                "NAME",
                "BACKEND",
                "MODE",
                "REMAINING LBAS",
                "COPIED LBAS",
                "SKIPPED LBAS",
            ]
            .map(String::from)
            .to_vec()];
            for p in body["pairs"].as_array().into_iter().flatten() {
                rows.push(vec![
                    s(&p["name"]),
                    s(&p["backend"]),
                    s(&p["mode"]),
                    s(&p["remaining_lbas"]),
                    s(&p["copied_lbas"]),
                    s(&p["skipped_lbas"]),
                ]);
            }
            out.push_str(&table(&rows));
            out
        }
        Cmd::Backends => {
            let mut rows = vec![[
                "NAME",
                "HEALTH",
                "ARRAY-SIDE BACKUP",
                "JOURNAL",
                "JOURNAL BYTES",
                "FLUSHES",
            ]
            .map(String::from)
            .to_vec()];
            for b in body["backends"].as_array().into_iter().flatten() {
                let backup: Vec<&str> = b["backup"]
                    .as_object()
                    .into_iter()
                    .flatten()
                    .filter(|(_, on)| **on == Value::Bool(true))
                    .map(|(k, _)| k.as_str())
                    .collect();
                rows.push(vec![
                    s(&b["name"]),
                    s(&b["health"]),
                    if backup.is_empty() {
                        "-".into()
                    } else {
                        backup.join(",")
                    },
                    s(&b["journal"]["path"]),
                    s(&b["journal"]["stats"]["file_bytes"]),
                    s(&b["journal"]["stats"]["flushes"]),
                ]);
            }
            let mut out = table(&rows);
            for b in body["backends"].as_array().into_iter().flatten() {
                for l in b["lus"].as_array().into_iter().flatten() {
                    let id = l["identity"]
                        .as_str()
                        .unwrap_or("(the driver does not say)");
                    out.push_str(&format!("{} LU {}: {id}\n", s(&b["name"]), s(&l["lu"])));
                }
            }
            out
        }
        Cmd::Reload => {
            let list = |k: &str| {
                let items: Vec<String> = body[k].as_array().into_iter().flatten().map(s).collect();
                if items.is_empty() {
                    "none".to_string()
                } else {
                    items.join(", ")
                }
            };
            format!(
                "reloaded {}\napplied:       {}\nneeds restart: {}\nnot applied:   {}\n",
                s(&body["file"]),
                list("applied"),
                list("needs_restart"),
                list("not_applied")
            )
        }
        _ => match body.as_object() {
            Some(m) => m.iter().map(|(k, v)| format!("{k}: {}\n", s(v))).collect(),
            None => format!("{}\n", s(body)),
        },
    }
}

/// `hvmctl demo`: it starts its own host-agent, so it needs no control socket.
fn demo(dir: Option<PathBuf>, size_mib: u64, warmup: f64, quiet: bool) -> ExitCode {
    let opts = hvm_host_agent::demo::Options {
        dir,
        size_mib,
        warmup: std::time::Duration::from_secs_f64(warmup.clamp(0.0, 3600.0)),
        quiet,
    };
    match hvm_host_agent::demo::run(&opts) {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hvmctl demo: {e}");
            ExitCode::FAILURE
        }
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

fn backup(sock: &std::path::Path, cmd: &BackupCmd, json: bool) -> ExitCode {
    let print = |v: &serde_json::Value, human: String| {
        if json {
            println!("{v}");
        } else {
            print!("{human}");
        }
    };
    match cmd {
        BackupCmd::Ccopy(a) => arrayctl::copy(sock, json, CopyKind::Ccopy, a),
        BackupCmd::Auto(a) => arrayctl::copy(sock, json, CopyKind::Auto, a),
        BackupCmd::Cow(a) => arrayctl::cow(sock, json, a),
        BackupCmd::Job(a) => arrayctl::job(sock, json, a),
        BackupCmd::Policy { command } => hvm_host_agent::policy::main(command, json),
        BackupCmd::Run {
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
        } => {
            let rate = match rate.as_deref().map(parse_rate) {
                None => None,
                Some(Some(r)) => Some(r),
                Some(None) => {
                    eprintln!("hvmctl backup run: {rate:?} is not a rate (bytes per second, e.g. 100M, 1G, 0)");
                    return ExitCode::from(2);
                }
            };
            let (db, backup) = match (peer(db, p), peer(backup, p)) {
                (Ok(d), Ok(b)) => (d, b),
                (Err(e), _) | (_, Err(e)) => {
                    eprintln!("hvmctl backup run: {e}");
                    return ExitCode::from(2);
                }
            };
            let o = console::Options {
                db,
                backup,
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
                None => ExitCode::SUCCESS,
                Some(e) => {
                    eprintln!("hvmctl backup run: {e}");
                    if r.value["error"]["code"] == serde_json::json!(Code::Timeout) {
                        ExitCode::from(4)
                    } else {
                        ExitCode::FAILURE
                    }
                }
            }
        }
        BackupCmd::Delete { db, vlus, peer: p } => {
            let db = match peer(db, p) {
                Ok(d) => d,
                Err(e) => {
                    eprintln!("hvmctl backup delete: {e}");
                    return ExitCode::from(2);
                }
            };
            match console::delete(&db, vlus) {
                Ok(v) => {
                    let lines = v["vlus"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|x| format!("{}: {}\n", s(&x["vlu"]), s(&x["mode"])))
                        .collect();
                    print(&v, lines);
                    ExitCode::SUCCESS
                }
                Err(f) => {
                    eprintln!("hvmctl backup delete: {f}");
                    ExitCode::FAILURE
                }
            }
        }
        BackupCmd::List { .. }
        | BackupCmd::Verify { .. }
        | BackupCmd::Restore { .. }
        | BackupCmd::Prune { .. } => catalog_cmd(cmd, json),
    }
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
fn legacy_cmd(cmd: &BackupCmd, json: bool) -> Option<ExitCode> {
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
fn catalog_cmd(cmd: &BackupCmd, json: bool) -> ExitCode {
    let (name, host) = match cmd {
        BackupCmd::List { host, .. } => ("list", host),
        BackupCmd::Verify { host, .. } => ("verify", host),
        BackupCmd::Restore { host, .. } => ("restore", host),
        BackupCmd::Prune { host, .. } => ("prune", host),
        _ => return ExitCode::from(2),
    };
    if let Some(code) = legacy_cmd(cmd, json) {
        return code;
    }
    let r = backup_peer(host).and_then(|bk| catalog_call(&bk, cmd, json));
    let r = match r {
        Ok(r) => r,
        Err(e) => {
            eprintln!("hvmctl backup {name}: {e}");
            return ExitCode::from(2);
        }
    };
    match r {
        Ok(v) => {
            if json {
                println!("{v}");
            } else {
                print!("{}", console::human(name, &v));
            }
            ExitCode::SUCCESS
        }
        Err(f) => {
            if json {
                println!("{}", serde_json::json!({ "ok": false, "error": f }));
            }
            eprintln!("hvmctl backup {name}: {f}");
            if f.code == Code::BadRequest {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
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
            db,
            db_nbd,
            host,
        } => {
            let to = match (to, in_place, db) {
                (Some(t), _, _) => console::RestoreDest::Path(t.clone()),
                (None, true, Some(db)) => console::RestoreDest::InPlace {
                    db: peer(db, &host.peer)?,
                    db_nbd: db_nbd.clone(),
                },
                _ => return Err("--to PATH or --in-place --db HOST:PORT".into()),
            };
            console::restore(bk, id, vlu.clone(), &to, !json)
        }
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

fn legacy_verify(dir: &std::path::Path, json: bool) -> ExitCode {
    match legacy::verify(dir, &mut bar(json)) {
        Ok(v) => {
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
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("hvmctl backup verify: {e}");
            ExitCode::FAILURE
        }
    }
}

fn legacy_restore(
    dir: &std::path::Path,
    vlu: Option<&str>,
    to: &std::path::Path,
    json: bool,
) -> ExitCode {
    match legacy::restore(dir, vlu, to, &mut bar(json)) {
        Ok(v) => {
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
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("hvmctl backup restore: {e}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let sock = socket_path(&cli);
    let enc = hvm_host_agent::ctl::segment;
    let (method, path, body) = match &cli.command {
        Cmd::Status => ("GET", "/v1/status".to_string(), None),
        Cmd::Lu {
            command: LuCmd::List,
        } => ("GET", "/v1/lus".into(), None),
        Cmd::Lu {
            command: LuCmd::Move {
                vlu, cancel: true, ..
            },
        } => ("DELETE", format!("/v1/lus/{}/move", enc(vlu)), None),
        Cmd::Lu {
            command: LuCmd::Move {
                vlu, to, lus, rate, ..
            },
        } => {
            let rate = match rate.as_deref().map(parse_rate) {
                Some(None) => {
                    eprintln!(
                        "hvmctl: {rate:?} is not a rate (bytes per second, e.g. 100M, 1G, 0)"
                    );
                    return ExitCode::from(2);
                }
                Some(r) => r,
                None => None,
            };
            let body = serde_json::json!({ "to": to, "lus": lus, "rate": rate });
            ("POST", format!("/v1/lus/{}/move", enc(vlu)), Some(body))
        }
        Cmd::Snapshot {
            command: SnapCmd::Acquire { vlu },
        } => ("POST", format!("/v1/lus/{}/snapshot", enc(vlu)), None),
        Cmd::Snapshot {
            command: SnapCmd::Delete { vlu, .. },
        } => ("DELETE", format!("/v1/lus/{}/snapshot", enc(vlu)), None),
        Cmd::Snapshot {
            command: SnapCmd::Rollback { vlu, .. },
        } => ("POST", format!("/v1/lus/{}/rollback", enc(vlu)), None),
        Cmd::Extents { vlu } => ("GET", format!("/v1/lus/{}/extents", enc(vlu)), None),
        Cmd::Verify { vlu, rate, repair } => {
            let rate = match rate.as_deref().map(parse_rate) {
                Some(None) => {
                    eprintln!("hvmctl: {rate:?} is not a rate (bytes per second, e.g. 100M)");
                    return ExitCode::from(2);
                }
                Some(Some(r)) => r,
                None => 0,
            };
            let body = serde_json::json!({ "rate": rate, "repair": repair });
            ("POST", format!("/v1/lus/{}/verify", enc(vlu)), Some(body))
        }
        Cmd::Resync { command } => match command {
            ResyncCmd::Status => ("GET", "/v1/resync".into(), None),
            ResyncCmd::Pause => ("POST", "/v1/resync/pause".into(), None),
            ResyncCmd::Resume => ("POST", "/v1/resync/resume".into(), None),
            ResyncCmd::Rate { rate } => {
                let Some(bps) = parse_rate(rate) else {
                    eprintln!(
                        "hvmctl: {rate:?} is not a rate (bytes per second, e.g. 100M, 1G, 0)"
                    );
                    return ExitCode::from(2);
                };
                (
                    "PUT",
                    "/v1/resync/rate".into(),
                    Some(serde_json::json!({ "bytes_per_second": bps })),
                )
            }
        },
        Cmd::Backends => ("GET", "/v1/backends".into(), None),
        Cmd::Reload => ("POST", "/v1/reload".into(), None),
        Cmd::Demo {
            dir,
            size_mib,
            warmup,
        } => return demo(dir.clone(), *size_mib, *warmup, cli.json),
        Cmd::Backup { command } => return backup(&sock, command, cli.json),
        Cmd::Pair { command } => return arrayctl::pair(&sock, cli.json, command),
        Cmd::Volume { command } => return arrayctl::volume(&sock, cli.json, command),
        Cmd::Device { command } => return arrayctl::device(&sock, cli.json, command),
        Cmd::Array { command } => return arrayctl::array(&sock, cli.json, command),
        Cmd::Completions { shell } => {
            return hvm_host_agent::docs::completions(Cli::command(), *shell)
        }
        Cmd::Man { dir } => return hvm_host_agent::docs::man(Cli::command(), dir),
        Cmd::Tls {
            command: TlsCmd::Init { dir, hosts },
        } => {
            return match tls::init(dir, hosts) {
                Ok(files) => {
                    for f in files {
                        println!("{}", f.display());
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("hvmctl tls init: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    };
    let reply = match call(&sock, method, &path, body.as_ref()) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("hvmctl: {e}");
            return ExitCode::from(3);
        }
    };
    if reply.status >= 400 {
        eprintln!("hvmctl: {}", s(&reply.body["error"]));
        return ExitCode::FAILURE;
    }
    let mut body = reply.body;
    if let Cmd::Lu {
        command:
            LuCmd::Move {
                vlu,
                wait: true,
                cancel: false,
                ..
            },
    } = &cli.command
    {
        match hvm_host_agent::ctl::wait_move(&sock, vlu, cli.json) {
            Ok(b) => body = b,
            Err(e) => {
                eprintln!("hvmctl: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    if let Cmd::Snapshot {
        command: SnapCmd::Delete { vlu, wait: true } | SnapCmd::Rollback { vlu, wait: true },
    } = &cli.command
    {
        match wait_resync(&sock, vlu, cli.json) {
            Ok(p) => body["resync"] = p,
            Err(e) => {
                eprintln!("hvmctl: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    if cli.json {
        println!("{body}");
    } else {
        print!("{}", human(&cli.command, &body));
    }
    if matches!(cli.command, Cmd::Verify { .. })
        && body["identical"] == false
        && body["repaired"] != true
    {
        return ExitCode::from(5);
    }
    ExitCode::SUCCESS
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
