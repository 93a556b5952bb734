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

use clap::{CommandFactory, Parser};
use hvm_host_agent::coord::tls;

mod arrayctl;
mod backup;
mod cli;
mod control;
mod error;
mod render;

use cli::{Cli, Cmd, TlsCmd};
use error::Error;

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
    let sock = cli::socket_path(cli);
    let json = cli.json;
    match &cli.command {
        Cmd::Demo {
            dir,
            size_mib,
            warmup,
        } => demo(dir.clone(), *size_mib, *warmup, json),
        Cmd::Backup { command } => backup::backup(&sock, command, json),
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
