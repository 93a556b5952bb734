//! A configured host's state ([`Host`]): what [`crate::agent`] builds from the config and
//! [`crate::service`] serves; the control API and the coordination service borrow it.
//! It knows nothing of the listeners that reach it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use hvm_core::VirtualLuId;

use crate::config::{Config, CoordinationConfig, LogLevel};
use crate::durable::FileJournal;
use crate::exports::{Manager, VluExports};
use crate::moves::routed::Place;
use crate::moves::{Move, MoveError, MoveRequest, Moves, Subject};
use crate::reload::{self, Live};
use crate::resync::ResyncControl;
use hvm_api::Reload;

/// The state of a configured host, which the control API and the coordination service
/// borrow: its backends' managers and journals, the exports, moves and resync, where it
/// serves, and the config in effect.
pub struct Host {
    pub exports: Arc<VluExports>,
    /// Moves of virtual LUs between backends, and where their data lives.
    pub moves: Arc<Moves>,
    /// Managers by backend name.
    pub managers: BTreeMap<String, Arc<Manager>>,
    /// Export name -> (backend name, virtual LU).
    pub virtual_lus: BTreeMap<String, (String, VirtualLuId)>,
    /// Snapshot export name -> the export it is the snapshot of.
    pub snapshot_of: BTreeMap<String, String>,
    /// Journals by backend name (none when `journal.durable` is false).
    pub journals: BTreeMap<String, Arc<FileJournal>>,
    pub resync: Arc<ResyncControl>,
    pub state_dir: PathBuf,
    pub socket: PathBuf,
    /// The control API's socket.
    pub control: PathBuf,
    pub tcp: Option<String>,
    /// The NBD TCP listener's bound address, once bound.
    pub tcp_bound: OnceLock<String>,
    /// The config in effect: the file's at start, with what reloads applied since.
    pub config: Mutex<Config>,
    /// The file a reload reads (none: reloading is refused).
    pub config_file: Option<PathBuf>,
    /// Sets the log level, when the log level is the config's to set (no `--log-level`,
    /// no `RUST_LOG`); installed by the binary that set up logging.
    pub log_level: OnceLock<LogHook>,
    pub last_reload: Mutex<Option<Reload>>,
    /// Bytes read through snapshot exports since start.
    pub snapshot_reads: Arc<AtomicU64>,
    /// The agent-to-agent backup service's config, its paths made absolute.
    pub coordination: Option<CoordinationConfig>,
}

/// Applies a new log level; an error says why it cannot.
pub type LogHook = Box<dyn Fn(LogLevel) -> Result<(), String> + Send + Sync>;

impl Host {
    /// Reload the config file: apply what may change live, report the rest (see
    /// [`crate::reload`]). The report is also kept for `GET /v1/status`.
    pub fn reload(&self) -> Reload {
        let mut report = Reload {
            file: self
                .config_file
                .as_ref()
                .map(|f| f.display().to_string())
                .unwrap_or_default(),
            at: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            ..Reload::default()
        };
        match &self.config_file {
            None => report.error = Some("no config file to reload".into()),
            Some(file) => match Config::load(file) {
                Err(e) => report.error = Some(e.to_string()),
                Ok((new, _)) => self.apply(&new, &mut report),
            },
        }
        match &report.error {
            Some(e) => tracing::error!(error = %e, "reload: the config was not changed"),
            None => {
                tracing::info!(applied = ?report.applied, "config reloaded");
                for path in &report.needs_restart {
                    tracing::warn!(change = %path, "reload: this change takes effect only after a restart");
                }
                for why in &report.not_applied {
                    tracing::warn!(change = %why, "reload: not applied");
                }
            }
        }
        *self
            .last_reload
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(report.clone());
        report
    }

    fn apply(&self, new: &Config, report: &mut Reload) {
        let mut current = self.config.lock().unwrap_or_else(PoisonError::into_inner);
        let plan = reload::plan(&current, new);
        for change in &plan.live {
            let applied = match change {
                Live::LogLevel(level) => match self.log_level.get() {
                    Some(set) => set(*level),
                    None => Err("logging was not set up by this process".into()),
                },
                Live::ResyncRate(bps) => {
                    self.resync.set_rate(*bps);
                    Ok(())
                }
                Live::ResyncChunk(bytes) => {
                    self.resync.set_chunk(*bytes);
                    Ok(())
                }
                Live::Access {
                    exports, access, ..
                } => {
                    for name in exports {
                        self.exports.set_access(name, access.clone());
                    }
                    Ok(())
                }
            };
            match applied {
                Ok(()) => report.applied.push(change.path()),
                Err(why) => report.not_applied.push(format!("{}: {why}", change.path())),
            }
        }
        report.needs_restart = plan.restart;
        let level = current.log_level;
        *current = reload::effective(&current, new);
        if !report.applied.iter().any(|p| p == "log_level") {
            current.log_level = level;
        }
    }

    /// The manager and virtual LU behind an export name.
    /// Start moving origin virtual LU `name` as `req` asks (see [`crate::moves`]).
    pub fn start_move(&self, name: &str, req: &MoveRequest) -> Result<Move, MoveError> {
        let unknown = || MoveError::Refused(format!("no virtual LU named {name:?}"));
        if let Some(origin) = self.snapshot_of.get(name) {
            return Err(MoveError::Refused(format!(
                "{name} is the snapshot of {origin}; move {origin}, and its snapshot LUs move with it"
            )));
        }
        let (home, vlu) = self.virtual_lus.get(name).ok_or_else(unknown)?;
        let mgr = self.managers.get(home).ok_or_else(unknown)?;
        let subject = Subject {
            name,
            home,
            mgr,
            vlu: *vlu,
        };
        let job = self.moves.start(&subject, req, &self.places_in_use())?;
        Ok(job.status())
    }

    /// The places of every origin virtual LU's LUs now.
    fn places_in_use(&self) -> BTreeSet<Place> {
        let mut used = BTreeSet::new();
        for (name, (home, vlu)) in &self.virtual_lus {
            let Some(mgr) = self.managers.get(home) else {
                continue;
            };
            let s = Subject {
                name,
                home,
                mgr,
                vlu: *vlu,
            };
            used.extend(self.moves.places(&s).unwrap_or_default());
        }
        used
    }

    /// Where origin virtual LU `name`'s mirror LU is now, when that is not where the
    /// config created it.
    pub fn moved_to(&self, name: &str) -> Option<Place> {
        let (home, vlu) = self.virtual_lus.get(name)?;
        let mgr = self.managers.get(home)?;
        let s = Subject {
            name,
            home,
            mgr,
            vlu: *vlu,
        };
        let primary = self.moves.places(&s).ok()?.into_iter().next()?;
        (primary.backend != *home).then_some(primary)
    }

    pub fn virtual_lu(&self, name: &str) -> Option<(Arc<Manager>, VirtualLuId)> {
        let (backend, vlu) = self.virtual_lus.get(name)?;
        Some((self.managers.get(backend)?.clone(), *vlu))
    }

    /// Write every journal as an exact checkpoint (a clean stop).
    pub fn close(&self) {
        for (name, j) in &self.journals {
            match j.compact() {
                Ok(()) => {
                    tracing::info!(backend = %name, journal = %j.path().display(), "journal checkpointed")
                }
                Err(e) => tracing::error!(backend = %name, error = %e, "journal checkpoint failed"),
            }
        }
    }
}
