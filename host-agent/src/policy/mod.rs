//! Backup policies for a fleet of database hosts (`hvmctl backup policy`): a YAML file of
//! entries ([`file`]), when each is due ([`schedule`]), the runner that backs up the due
//! entries N at a time with each failure confined to its entry ([`run`]), and the last
//! result of each entry ([`state`]).
//!
//! Scheduling is left to a systemd timer (`host-agent/packaging/hvm-backup-policy.timer`)
//! that starts `hvmctl backup policy run FILE` periodically: the convention admins
//! expect, with missed runs caught up (`Persistent=true`), logs in the journal and no
//! extra daemon holding TLS keys. The policy decides which entries are due at each start.

pub mod file;
pub mod run;
pub mod schedule;
pub mod state;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Mutex;

use serde_json::json;

use crate::coord::{rfc3339, unix_ms};
use file::PolicyFile;
use run::{Identity, Outcome};
use state::{Last, RunLock, State};

#[derive(clap::Subcommand)]
pub enum PolicyCmd {
    /// Back up the due entries of a policy file, at most N at once; exit status 0 only
    /// if every one succeeded (1 if any failed, 2 for a bad file or state).
    Run {
        file: PathBuf,
        /// Run only this entry, whether due or not (again for several).
        #[arg(long = "only")]
        only: Vec<String>,
        /// Entries backed up at once.
        #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
        parallel: u16,
        /// The state file [default: $HVM_POLICY_STATE, else the file's `state:`, else
        /// /var/lib/hvm/backup-policy.json].
        #[arg(long)]
        state: Option<PathBuf>,
    },
    /// The last result of each entry (of FILE's entries, if given, never-run ones too).
    Status {
        file: Option<PathBuf>,
        #[arg(long)]
        state: Option<PathBuf>,
    },
}

/// `hvmctl backup policy ...`.
pub fn main(cmd: &PolicyCmd, json: bool) -> ExitCode {
    let r = match cmd {
        PolicyCmd::Run {
            file,
            only,
            parallel,
            state,
        } => run_cmd(file, only, usize::from(*parallel), state.as_deref(), json),
        PolicyCmd::Status { file, state } => status_cmd(file.as_deref(), state.as_deref(), json),
    };
    r.unwrap_or_else(|e| {
        eprintln!("hvmctl backup policy: {e}");
        ExitCode::from(2)
    })
}

fn run_cmd(
    file: &std::path::Path,
    only: &[String],
    parallel: usize,
    state_flag: Option<&std::path::Path>,
    json: bool,
) -> Result<ExitCode, String> {
    let f = PolicyFile::load(file)?;
    let path = state::path(state_flag, f.state.as_deref());
    let _lock = RunLock::take(&path)?;
    let st = State::load(&path)?;
    let entries = run::choose(&f, only, &st, unix_ms())?;
    let identity = Identity::load(&f.tls)?;
    let not_due = f.entries.len() - entries.len();
    if !json {
        println!(
            "policy {}: {} due, {not_due} not due; {} at a time",
            file.display(),
            entries.len(),
            parallel.min(entries.len().max(1))
        );
    }
    let before = st.clone();
    let shared = Mutex::new(st);
    let save_error = Mutex::new(None);
    let done = |o: &Outcome| {
        let mut s = shared
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        s.entries.insert(o.name.clone(), o.last.clone());
        if let Err(e) = s.save(&path) {
            *save_error
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(e);
        }
        if !json {
            println!("{}", line(&o.name, &o.last));
        }
    };
    let mut outcomes = run::run_all(entries, &identity, &before, parallel, &done);
    outcomes.sort_by(|a, b| a.name.cmp(&b.name));
    let failed = outcomes.iter().filter(|o| !o.last.ok).count();
    let save_error = save_error
        .into_inner()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if json {
        let v: Vec<_> = outcomes
            .iter()
            .map(|o| entry_json(&o.name, Some(&o.last)))
            .collect();
        println!(
            "{}",
            json!({ "entries": v, "ok": outcomes.len() - failed, "failed": failed, "not_due": not_due, "state": path, "state_error": save_error })
        );
    } else {
        print!(
            "{}",
            table(outcomes.iter().map(|o| (o.name.as_str(), Some(&o.last))))
        );
        println!(
            "{} entries: {} ok, {failed} failed, {not_due} not due",
            outcomes.len() + not_due,
            outcomes.len() - failed
        );
    }
    if let Some(e) = save_error {
        return Err(format!("the state could not be saved: {e}"));
    }
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn status_cmd(
    file: Option<&std::path::Path>,
    state_flag: Option<&std::path::Path>,
    json: bool,
) -> Result<ExitCode, String> {
    let f = file.map(PolicyFile::load).transpose()?;
    let path = state::path(state_flag, f.as_ref().and_then(|f| f.state.as_deref()));
    let st = State::load(&path)?;
    let names: Vec<String> = match &f {
        Some(f) => f.entries.iter().map(|e| e.name.clone()).collect(),
        None => st.entries.keys().cloned().collect(),
    };
    let rows: Vec<(&str, Option<&Last>)> = names
        .iter()
        .map(|n| (n.as_str(), st.entries.get(n)))
        .collect();
    if json {
        let v: Vec<_> = rows.iter().map(|(n, l)| entry_json(n, *l)).collect();
        println!("{}", json!({ "state": path, "entries": v }));
    } else {
        print!("{}", table(rows.iter().copied()));
    }
    let all_ok = rows.iter().all(|(_, l)| l.is_some_and(|l| l.ok));
    Ok(if all_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn result(l: Option<&Last>) -> &'static str {
    match l {
        None => "never run",
        Some(l) if l.ok => "ok",
        Some(_) => "failed",
    }
}

fn entry_json(name: &str, l: Option<&Last>) -> serde_json::Value {
    json!({ "name": name, "result": result(l), "last": l })
}

/// One line as an entry ends.
fn line(name: &str, l: &Last) -> String {
    let secs = l.end_unix_ms.saturating_sub(l.start_unix_ms) as f64 / 1000.0;
    match &l.reason {
        None => format!(
            "  {name}: ok, {} backup {} ({} MiB copied) in {secs:.1} s",
            l.kind.as_deref().unwrap_or("?"),
            l.backup.as_deref().unwrap_or("?"),
            l.copied_bytes >> 20
        ),
        Some(r) => format!(
            "  {name}: FAILED after {} attempt(s) in {secs:.1} s: {r}",
            l.attempts
        ),
    }
}

/// The status table: entry, last run, result, kind, backup, duration, reason.
fn table<'a>(rows: impl Iterator<Item = (&'a str, Option<&'a Last>)>) -> String {
    let mut s = format!(
        "{:<20} {:<20} {:<9} {:<11} {:<28} {:>8}  {}\n",
        "ENTRY", "LAST RUN (UTC)", "RESULT", "KIND", "BACKUP", "SECONDS", "REASON"
    );
    for (name, l) in rows {
        let when = l
            .map(|l| rfc3339(l.start_unix_ms / 1000))
            .unwrap_or_else(|| "-".into());
        let secs = l.map(|l| {
            format!(
                "{:.1}",
                l.end_unix_ms.saturating_sub(l.start_unix_ms) as f64 / 1000.0
            )
        });
        s.push_str(&format!(
            "{name:<20} {when:<20} {:<9} {:<11} {:<28} {:>8}  {}\n",
            result(l),
            l.and_then(|l| l.kind.as_deref()).unwrap_or("-"),
            l.and_then(|l| l.backup.as_deref()).unwrap_or("-"),
            secs.as_deref().unwrap_or("-"),
            l.and_then(|l| l.reason.as_deref()).unwrap_or("")
        ));
    }
    s
}
