//! hvmctl's command line (clap): the commands, their arguments and `--help`'s exit
//! statuses; the man pages and completions are made from these definitions.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use hvm_host_agent::coord::console::Via;
use hvm_host_agent::coord::Consistency;

use crate::arrayctl::{ArrayCmd, CopyArgs, CowArgs, DeviceCmd, JobArgs, PairCmd, VolumeCmd};

/// The exit statuses (set in `main` alone, from `Error::exit_status`).
pub const EXIT_STATUS: &str = "Exit status:
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
pub struct Cli {
    /// The control socket [default: $HVM_CONTROL, else /run/hvm/control.sock].
    #[arg(long, global = true)]
    pub socket: Option<PathBuf>,
    /// Print the agent's JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Cmd,
}

#[derive(Subcommand)]
pub enum Cmd {
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
pub struct PeerArgs {
    /// The CA certificate the agents' certificates are signed by [default: $HVM_CA,
    /// else /etc/hvm/tls/ca.pem].
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// The shared token [default: $HVM_TOKEN_FILE, else /etc/hvm/tls/token].
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// The client certificate the agents require [default: $HVM_CERT, else console.pem
    /// beside the CA certificate, as `hvmctl tls init` writes it].
    #[arg(long)]
    pub cert: Option<PathBuf>,
    /// Its key [default: $HVM_KEY, else console-key.pem beside the CA certificate].
    #[arg(long)]
    pub key: Option<PathBuf>,
}

/// The backup host of the catalog operations.
#[derive(clap::Args, Clone)]
pub struct BackupHost {
    /// The backup host's coordination address, HOST:PORT.
    #[arg(long)]
    pub backup: Option<String>,
    #[command(flatten)]
    pub peer: PeerArgs,
}

#[derive(Subcommand)]
pub enum BackupCmd {
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
        /// application: the database host's freeze hooks run (PostgreSQL's backup mode,
        /// fsfreeze); crash: none runs, the snapshot is one instant of the group as a
        /// power cut leaves it, and a restore is a crash recovery (WAL in the group).
        #[arg(long, default_value = "application")]
        consistency: Consistency,
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
pub enum TlsCmd {
    /// Make a CA, a certificate and key for each host (signed by the CA) and a token.
    Init {
        dir: PathBuf,
        /// A name (DNS or IP) an agent is reached by; one certificate each.
        #[arg(long = "host", required = true)]
        hosts: Vec<String>,
    },
}

#[derive(Subcommand)]
pub enum LuCmd {
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
pub enum SnapCmd {
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
pub enum ResyncCmd {
    /// Progress of every pair.
    Status,
    Pause,
    Resume,
    /// Rate limit per backend, e.g. 100M, 1G or 0 (unlimited); bytes per second.
    Rate {
        rate: String,
    },
}

pub fn socket_path(cli: &Cli) -> PathBuf {
    cli.socket
        .clone()
        .or_else(|| std::env::var_os("HVM_CONTROL").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("/run/hvm/control.sock"))
}

/// A rate such as 200M, 1G or 500000 bytes per second (0: no limit): the policy file's
/// parser, so both read a rate alike.
pub fn parse_rate(s: &str) -> Option<u64> {
    hvm_host_agent::policy::file::parse_rate(s).ok()
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
