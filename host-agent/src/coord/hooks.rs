//! Quiesce hooks on the database host: a command (pre and post), `fsfreeze` of a mount
//! point, and PostgreSQL (`pg_backup_start` with an immediate checkpoint on a held
//! connection, then `pg_backup_stop`, whose backup label goes next to the copy).
//!
//! A hook's `quiesce` may be abandoned at the freeze's deadline (its future dropped);
//! the hook remembers enough to undo it, and `resume` always undoes whatever may have
//! been done: it kills a command still running (its whole process group) and runs the
//! post command, thaws a filesystem that may be frozen, and cancels and closes the
//! PostgreSQL session (which ends a backup it started).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

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
        /// `fsfreeze -f` was started: the filesystem may be frozen.
        maybe_frozen: bool,
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

async fn fsfreeze(flag: &str, path: &PathBuf) -> Result<(), String> {
    let out = tokio::process::Command::new("fsfreeze")
        .arg(flag)
        .arg(path)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| format!("cannot run fsfreeze (util-linux): {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "fsfreeze {flag} {}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
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
                maybe_frozen: false,
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
            Kind::Fsfreeze { path, maybe_frozen } => {
                *maybe_frozen = true;
                fsfreeze("-f", path).await
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
        let mut files = Files::new();
        match &mut self.kind {
            Kind::Command { post, running, .. } => {
                if let Some(pgid) = running.take() {
                    kill_group(pgid);
                }
                if let Some(cmd) = post {
                    let mut env = env.to_vec();
                    env.push(("HVM_PHASE".into(), "post".into()));
                    env.push(("HVM_OUTCOME".into(), outcome.as_str().into()));
                    let mut running = None;
                    let r =
                        tokio::time::timeout(RESUME_TIMEOUT, run_command(cmd, &env, &mut running))
                            .await;
                    if let Some(pgid) = running {
                        kill_group(pgid);
                    }
                    r.map_err(|_| format!("`{cmd}` did not end within {RESUME_TIMEOUT:?}"))??;
                }
            }
            Kind::Fsfreeze { path, maybe_frozen } => {
                if std::mem::take(maybe_frozen) {
                    let r = tokio::time::timeout(RESUME_TIMEOUT, fsfreeze("-u", path))
                        .await
                        .map_err(|_| {
                            format!(
                                "fsfreeze -u {} did not end within {RESUME_TIMEOUT:?}",
                                path.display()
                            )
                        })?;
                    if let Err(e) = r {
                        // -u on a filesystem that is not frozen (the freeze failed or
                        // never got that far) is EINVAL: nothing to thaw.
                        if outcome == Outcome::Ok || !e.contains("Invalid argument") {
                            return Err(e);
                        }
                    }
                }
            }
            Kind::Postgres { session, .. } => {
                let Some(s) = session.take() else {
                    return Ok(files);
                };
                if outcome == Outcome::Ok && s.started {
                    let sql = if s.version >= 150_000 {
                        "SELECT labelfile, spcmapfile FROM pg_backup_stop(false)"
                    } else {
                        "SELECT labelfile, spcmapfile FROM pg_stop_backup(false, false)"
                    };
                    let row = tokio::time::timeout(RESUME_TIMEOUT, s.client.query_one(sql, &[]))
                        .await
                        .map_err(|_| {
                            format!("pg_backup_stop did not end within {RESUME_TIMEOUT:?}")
                        })?
                        .map_err(pg)?;
                    let label: String = row.get(0);
                    let map: Option<String> = row.get(1);
                    files.insert("backup_label".into(), label);
                    if let Some(m) = map.filter(|m| !m.is_empty()) {
                        files.insert("tablespace_map".into(), m);
                    }
                } else {
                    // Cancel whatever runs; closing the session ends a backup it began.
                    let cancel = s.client.cancel_token();
                    let _ = tokio::time::timeout(
                        Duration::from_secs(2),
                        cancel.cancel_query(tokio_postgres::NoTls),
                    )
                    .await;
                }
                drop(s);
            }
        }
        Ok(files)
    }
}
