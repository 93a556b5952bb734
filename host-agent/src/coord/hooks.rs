//! Quiesce hooks on the database host: a command (pre and post), `fsfreeze` of a mount
//! point, and PostgreSQL (`pg_backup_start` with an immediate checkpoint on a held
//! connection, then `pg_backup_stop`, whose backup label goes next to the copy).
//!
//! The fsfreeze hook writes the filesystem's dirty data out first (`syncfs`, while the
//! database still writes), then freezes it (the `FIFREEZE` ioctl, which syncs again what
//! came since, now with writes held) and thaws it with `FITHAW`: writes wait only for
//! the last sync and the snapshot, not for all the dirty data nor for starting a
//! `fsfreeze` process twice.
//!
//! A hook's `quiesce` may be abandoned at the freeze's deadline (its future dropped);
//! the hook remembers enough to undo it, and `resume` always undoes whatever may have
//! been done: it kills a command still running (its whole process group) and runs the
//! post command, waits for a freeze still in the kernel and thaws the filesystem if it
//! froze it, and cancels and closes the PostgreSQL session (which ends a backup it
//! started).

use std::collections::BTreeMap;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;

use crate::config::HookConfig;

/// How long a resume step may take before it is reported as failed.
pub const RESUME_TIMEOUT: Duration = Duration::from_secs(30);

/// How the freeze ended, for the post command's `HVM_OUTCOME`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    Failed,
    Timeout,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Failed => "failed",
            Outcome::Timeout => "timeout",
        }
    }
}

enum Kind {
    Command {
        pre: Option<String>,
        post: Option<String>,
        /// The pre command's process group, while it may be running.
        running: Option<i32>,
    },
    Fsfreeze {
        path: PathBuf,
        /// This hook froze the filesystem and so must thaw it.
        frozen: bool,
        /// The `FIFREEZE` ioctl on a blocking thread, not seen to end: the quiesce was
        /// abandoned at the deadline (a freeze in the kernel cannot be interrupted).
        pending: Option<tokio::task::JoinHandle<Result<(), String>>>,
        /// How long the `syncfs` before the freeze took, for the step list.
        synced_ms: Option<f64>,
    },
    Postgres {
        connect: String,
        session: Option<PgSession>,
    },
}

struct PgSession {
    client: tokio_postgres::Client,
    /// pg_backup_start was sent: a backup may be in progress in this session.
    started: bool,
    /// 15 and later: pg_backup_start/stop; before: pg_start_backup/pg_stop_backup.
    version: u32,
}

pub struct Hook {
    kind: Kind,
}

/// Files a hook produced at resume (the PostgreSQL backup label).
pub type Files = BTreeMap<String, String>;

pub(super) async fn run_command(
    cmd: &str,
    env: &[(String, String)],
    running: &mut Option<i32>,
) -> Result<(), String> {
    let mut child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start `sh -c {cmd:?}`: {e}"))?;
    *running = child.id().map(|p| p as i32);
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err).await;
    }
    let status = child.wait().await.map_err(|e| e.to_string())?;
    *running = None;
    if status.success() {
        Ok(())
    } else {
        let err = err.trim();
        Err(format!(
            "`{cmd}` exited with {status}{}{err}",
            if err.is_empty() { "" } else { ": " }
        ))
    }
}

fn kill_group(pgid: i32) {
    use nix::sys::signal::{killpg, Signal};
    let _ = killpg(nix::unistd::Pid::from_raw(pgid), Signal::SIGKILL);
}

/// The filesystem ioctls of `fsfreeze(8)` (linux/fs.h).
const FIFREEZE: libc::Ioctl = libc::_IOWR::<libc::c_int>(b'X' as u32, 119);
const FITHAW: libc::Ioctl = libc::_IOWR::<libc::c_int>(b'X' as u32, 120);

/// What `fsfreeze` runs on: the mount point, opened read-only (a directory, as
/// `fsfreeze(8)` requires).
fn open_mount(path: &Path) -> Result<std::fs::File, String> {
    let f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    match f.metadata() {
        Ok(m) if m.is_dir() => Ok(f),
        Ok(_) => Err(format!("{}: not a directory", path.display())),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// `syncfs`, `FIFREEZE` or `FITHAW` on the filesystem of `path` (blocking).
fn fs_call(path: &Path, what: &'static str) -> Result<(), String> {
    let f = open_mount(path)?;
    let fd = f.as_raw_fd();
    // SAFETY: plain system calls on a descriptor we hold open; the freeze ioctls take
    // no argument the kernel reads.
    let r = unsafe {
        match what {
            "syncfs" => libc::syncfs(fd),
            "freeze" => libc::ioctl(fd, FIFREEZE, 0),
            _ => libc::ioctl(fd, FITHAW, 0),
        }
    };
    if r == 0 {
        Ok(())
    } else {
        Err(format!(
            "{what} {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        ))
    }
}

/// [`fs_call`] off the async threads.
async fn fs_blocking(path: &Path, what: &'static str) -> Result<(), String> {
    let p = path.to_path_buf();
    tokio::task::spawn_blocking(move || fs_call(&p, what))
        .await
        .map_err(|e| format!("{what} {}: {e}", path.display()))?
}

fn pg(e: tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("PostgreSQL: {}: {}", db.code().code(), db.message()),
        None => match std::error::Error::source(&e) {
            Some(cause) => format!("PostgreSQL: {e}: {cause}"),
            None => format!("PostgreSQL: {e}"),
        },
    }
}

impl Hook {
    pub fn new(cfg: &HookConfig) -> Hook {
        let kind = if let Some(c) = &cfg.command {
            Kind::Command {
                pre: c.pre.clone(),
                post: c.post.clone(),
                running: None,
            }
        } else if let Some(p) = &cfg.fsfreeze {
            Kind::Fsfreeze {
                path: p.clone(),
                frozen: false,
                pending: None,
                synced_ms: None,
            }
        } else {
            Kind::Postgres {
                connect: cfg
                    .postgresql
                    .as_ref()
                    .map(|p| p.connect.clone())
                    .unwrap_or_default(),
                session: None,
            }
        };
        Hook { kind }
    }

    /// A part of the last quiesce timed apart, as (step name, ms): the fsfreeze hook's
    /// `syncfs` before the freeze (writes go on during it; the rest of the hook's step
    /// is the freeze itself, writes held).
    pub fn take_part(&mut self) -> Option<(String, f64)> {
        match &mut self.kind {
            Kind::Fsfreeze {
                path, synced_ms, ..
            } => synced_ms
                .take()
                .map(|ms| (format!("syncfs {}", path.display()), ms)),
            _ => None,
        }
    }

    pub fn name(&self) -> String {
        match &self.kind {
            Kind::Command { pre, post, .. } => format!(
                "command {:?}",
                pre.as_deref().or(post.as_deref()).unwrap_or_default()
            ),
            Kind::Fsfreeze { path, .. } => format!("fsfreeze {}", path.display()),
            Kind::Postgres { .. } => "postgresql".into(),
        }
    }

    /// Quiesce. `env` is the backup's `HVM_*` variables; `label` names the backup.
    pub async fn quiesce(&mut self, env: &[(String, String)], label: &str) -> Result<(), String> {
        match &mut self.kind {
            Kind::Command { pre, running, .. } => match pre {
                Some(cmd) => {
                    let mut env = env.to_vec();
                    env.push(("HVM_PHASE".into(), "pre".into()));
                    run_command(cmd, &env, running).await
                }
                None => Ok(()),
            },
            Kind::Fsfreeze {
                path,
                frozen,
                pending,
                synced_ms,
            } => {
                // The dirty data goes out while the database still writes; the freeze
                // then syncs only what came since, with writes held.
                let t = Instant::now();
                fs_blocking(path, "syncfs").await?;
                *synced_ms = Some(t.elapsed().as_secs_f64() * 1000.0);
                let p = path.clone();
                let task =
                    pending.insert(tokio::task::spawn_blocking(move || fs_call(&p, "freeze")));
                let r = match task.await {
                    Ok(r) => r,
                    Err(e) => Err(format!("freeze {}: {e}", path.display())),
                };
                *pending = None;
                // Failed: not frozen by us (a refusal, or frozen by someone else
                // already: EBUSY), nothing to thaw.
                *frozen = r.is_ok();
                r
            }
            Kind::Postgres { connect, session } => {
                let (client, conn) = tokio_postgres::connect(connect, tokio_postgres::NoTls)
                    .await
                    .map_err(pg)?;
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %e, "the PostgreSQL hook's connection ended");
                    }
                });
                let version: u32 = client
                    .query_one("SELECT current_setting('server_version_num')", &[])
                    .await
                    .map_err(pg)?
                    .get::<_, String>(0)
                    .parse()
                    .unwrap_or(0);
                let s = session.insert(PgSession {
                    client,
                    started: false,
                    version,
                });
                // fast => true: pg_backup_start runs its checkpoint now, at full speed,
                // instead of spreading it over checkpoint_completion_target.
                s.started = true;
                let sql = if s.version >= 150_000 {
                    "SELECT pg_backup_start($1, true)::text"
                } else {
                    "SELECT pg_start_backup($1, true, false)::text"
                };
                s.client.query_one(sql, &[&label]).await.map_err(pg)?;
                Ok(())
            }
        }
    }

    /// Undo `quiesce`, however far it got. `outcome` Ok means the snapshot was taken:
    /// PostgreSQL's backup is then stopped normally and its label returned.
    pub async fn resume(
        &mut self,
        env: &[(String, String)],
        outcome: Outcome,
    ) -> Result<Files, String> {
        match &mut self.kind {
            Kind::Command { post, running, .. } => {
                resume_command(post.as_deref(), running, env, outcome).await?
            }
            Kind::Fsfreeze {
                path,
                frozen,
                pending,
                ..
            } => thaw(path, std::mem::take(frozen), pending.take(), outcome).await?,
            Kind::Postgres { session, .. } => {
                if let Some(s) = session.take() {
                    return stop_backup(s, outcome).await;
                }
            }
        }
        Ok(Files::new())
    }
}

/// Kill a pre command still running (its process group), then run the post command with
/// `HVM_PHASE=post` and `HVM_OUTCOME`.
async fn resume_command(
    post: Option<&str>,
    running: &mut Option<i32>,
    env: &[(String, String)],
    outcome: Outcome,
) -> Result<(), String> {
    if let Some(pgid) = running.take() {
        kill_group(pgid);
    }
    let Some(cmd) = post else {
        return Ok(());
    };
    let mut env = env.to_vec();
    env.push(("HVM_PHASE".into(), "post".into()));
    env.push(("HVM_OUTCOME".into(), outcome.as_str().into()));
    let mut running = None;
    let r = tokio::time::timeout(RESUME_TIMEOUT, run_command(cmd, &env, &mut running)).await;
    if let Some(pgid) = running {
        kill_group(pgid);
    }
    r.map_err(|_| format!("`{cmd}` did not end within {RESUME_TIMEOUT:?}"))?
}

/// Thaw `path` if this hook froze it, or may have: a freeze abandoned at the deadline may
/// still be in the kernel, and thawing before it ends would leave the filesystem frozen.
async fn thaw(
    path: &Path,
    mut froze: bool,
    pending: Option<tokio::task::JoinHandle<Result<(), String>>>,
    outcome: Outcome,
) -> Result<(), String> {
    if let Some(task) = pending {
        froze = match tokio::time::timeout(RESUME_TIMEOUT, task).await {
            Ok(Ok(r)) => r.is_ok(),
            // The thread panicked: it may have frozen; thaw to be sure.
            Ok(Err(_)) => true,
            Err(_) => {
                return Err(format!(
                    "the freeze of {} did not end within {RESUME_TIMEOUT:?}",
                    path.display()
                ))
            }
        };
    }
    if !froze {
        return Ok(());
    }
    let r = tokio::time::timeout(RESUME_TIMEOUT, fs_blocking(path, "thaw"))
        .await
        .map_err(|_| {
            format!(
                "thaw {} did not end within {RESUME_TIMEOUT:?}",
                path.display()
            )
        })?;
    match r {
        // EINVAL: not frozen (thawed by someone else meanwhile).
        Err(e) if outcome == Outcome::Ok || !e.contains("Invalid argument") => Err(e),
        _ => Ok(()),
    }
}

/// End the session's backup: after a good freeze, `pg_backup_stop`, whose label (and
/// tablespace map) are the files returned; otherwise cancel whatever runs and close the
/// session, which ends a backup it began.
async fn stop_backup(s: PgSession, outcome: Outcome) -> Result<Files, String> {
    let mut files = Files::new();
    if outcome == Outcome::Ok && s.started {
        let sql = if s.version >= 150_000 {
            "SELECT labelfile, spcmapfile FROM pg_backup_stop(false)"
        } else {
            "SELECT labelfile, spcmapfile FROM pg_stop_backup(false, false)"
        };
        let row = tokio::time::timeout(RESUME_TIMEOUT, s.client.query_one(sql, &[]))
            .await
            .map_err(|_| format!("pg_backup_stop did not end within {RESUME_TIMEOUT:?}"))?
            .map_err(pg)?;
        let label: String = row.get(0);
        let map: Option<String> = row.get(1);
        files.insert("backup_label".into(), label);
        if let Some(m) = map.filter(|m| !m.is_empty()) {
            files.insert("tablespace_map".into(), m);
        }
    } else {
        let cancel = s.client.cancel_token();
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            cancel.cancel_query(tokio_postgres::NoTls),
        )
        .await;
    }
    Ok(files)
}
