//! Putting a configured host together: load the backend plugins, open each backend, build
//! one snapshot manager per backend with its virtual LUs, and serve them over NBD.
//!
//! Each backend's tables live in a journal file in the state directory
//! (`<backend>.journal`, see [`crate::durable`]), replayed on start; with
//! `journal.durable: false` they live in memory only.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use hvm_core::backend::{Backend, BackendDescription, BackendError};
use hvm_core::journal::{JournalState, NoLog, StateLog, Tail};
use hvm_core::{LuId, ManagerError, MirrorDefinition, PairConfig, SnapshotManager, VirtualLuId};
use hvm_plugin_abi::host::{path_in, LoadError, Plugin};

use crate::config::{Config, ConfigError, CoordinationConfig, LogLevel, VirtualLuConfig};
use crate::coord::server::Service;
use crate::durable::{self, DurableError, FileJournal, Tuning};
use crate::exports::{Access, Manager, VluExport, VluExports};
use crate::moves::placement::{self, Placement};
use crate::moves::routed::{Place, Routed, Shared, Target};
use crate::moves::{Ledger, MoveError, MoveRequest, MoveStatus, Moves, Subject};
use crate::nbd::export::Exports;
use crate::nbd::server::{self, Limits};
use crate::reload::{self, Live, ReloadReport};
use crate::resync::{self, ResyncControl};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("backend {backend}: {source}")]
    Plugin {
        backend: String,
        #[source]
        source: Box<LoadError>,
    },
    /// The plugin refused its parameters, or what they name (a missing file, an array
    /// that does not answer).
    #[error("{file}: {at}{}: backend {backend}: {message}", line.map(|l| format!(" (line {l})")).unwrap_or_default())]
    Params {
        file: String,
        at: String,
        line: Option<usize>,
        backend: String,
        message: String,
    },
    #[error("backend {backend}: describing the array failed: {source}")]
    Describe {
        backend: String,
        #[source]
        source: BackendError,
    },
    #[error("virtual LU {name}: backend {backend} reports no mirroring definition whose primary LU is {lu} (it has {available}); list one under the virtual LU's `mirroring`")]
    NoDefinition {
        name: String,
        backend: String,
        lu: u32,
        available: String,
    },
    #[error("virtual LU {name}: mirroring: {reason}")]
    Listed { name: String, reason: String },
    #[error("backend {backend}: {source}")]
    Manager {
        backend: String,
        #[source]
        source: ManagerError,
    },
    #[error("backend {backend}: journal: {source}")]
    Journal {
        backend: String,
        #[source]
        source: DurableError,
    },
    #[error(transparent)]
    Coordination(#[from] crate::coord::server::ServiceError),
    #[error("{reason}")]
    Placement { reason: String },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A configured host, ready to serve.
pub struct Agent {
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
    pub last_reload: Mutex<Option<ReloadReport>>,
    /// Bytes read through snapshot exports since start.
    pub snapshot_reads: Arc<AtomicU64>,
    /// The agent-to-agent backup service's config, its paths made absolute.
    pub coordination: Option<CoordinationConfig>,
}

/// Applies a new log level; an error says why it cannot.
pub type LogHook = Box<dyn Fn(LogLevel) -> Result<(), String> + Send + Sync>;

fn absolute(base: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

/// A backend opened from its plugin, with what it reported at start.
struct Opened {
    backend: Shared,
    desc: BackendDescription,
}

/// What the managers are built into.
#[derive(Default)]
struct Built {
    exports: VluExports,
    managers: BTreeMap<String, Arc<Manager>>,
    journals: BTreeMap<String, Arc<FileJournal>>,
    virtual_lus: BTreeMap<String, (String, VirtualLuId)>,
    snapshot_of: BTreeMap<String, String>,
}

/// The pairs of backend `b`'s virtual LUs, in config order, and their export names.
type PairsOf = (Vec<PairConfig>, Vec<(String, VirtualLuId, Access)>);

fn open_backend(
    b: &crate::config::BackendConfig,
    base: &Path,
    plugin_dir: &Path,
    state_dir: &Path,
) -> Result<Opened, AgentError> {
    let err = |source| AgentError::Plugin {
        backend: b.name.clone(),
        source: Box::new(source),
    };
    let path = if b.plugin.contains('/') {
        absolute(base, Path::new(&b.plugin))
    } else {
        path_in(plugin_dir, &b.plugin)
    };
    let plugin = Plugin::load(&path).map_err(err)?;
    let opened = plugin.open(&b.params.text(state_dir));
    let backend: Shared = Arc::new(opened.map_err(|e| refused(b, e))?);
    // issue 22: an array's EP 1 058 190 pairs are reported as mirroring definitions.
    let backend = crate::pairs::wrap(backend);
    let desc = backend.describe().map_err(|source| AgentError::Describe {
        backend: b.name.clone(),
        source,
    })?;
    tracing::info!(
        backend = %b.name,
        plugin = %path.display(),
        lus = desc.lus.len(),
        mirroring = desc.mirroring.len(),
        "backend opened"
    );
    Ok(Opened { backend, desc })
}

/// A plugin's refusal to open: named by the config file, field and line of the params
/// when the config came from a file.
fn refused(b: &crate::config::BackendConfig, e: LoadError) -> AgentError {
    match (e, b.params.origin()) {
        (LoadError::Open { path, error }, Some(o)) => AgentError::Params {
            file: o.file.clone(),
            at: o.at.clone(),
            line: o.line,
            backend: b.name.clone(),
            message: format!("{}: {}", path.display(), error.message),
        },
        (e, _) => AgentError::Plugin {
            backend: b.name.clone(),
            source: Box::new(e),
        },
    }
}

/// The mirroring definition of virtual LU `v`: listed in the config [0054], or the one
/// the array reports whose primary LU is `v.lu`.
fn definition(
    v: &VirtualLuConfig,
    desc: &BackendDescription,
) -> Result<MirrorDefinition, AgentError> {
    match &v.mirroring {
        // The manager checks a listed one against the array's LUs and capabilities.
        Some(m) => m.definition(v.lu).map_err(|reason| AgentError::Listed {
            name: v.name.clone(),
            reason,
        }),
        None => desc
            .mirroring
            .iter()
            .find(|d| d.primary() == LuId(v.lu))
            .cloned()
            .ok_or_else(|| AgentError::NoDefinition {
                name: v.name.clone(),
                backend: v.backend.clone(),
                lu: v.lu,
                available: desc
                    .mirroring
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("; "),
            }),
    }
}

fn pairs_of(
    cfg: &Config,
    backend: &str,
    desc: &BackendDescription,
    snapshot_of: &mut BTreeMap<String, String>,
) -> Result<PairsOf, AgentError> {
    let mut pairs = Vec::new();
    let mut names = Vec::new();
    let mut next = 0u32;
    for v in cfg.virtual_lus.iter().filter(|v| v.backend == backend) {
        let def = definition(v, desc)?;
        let origin = VirtualLuId(next);
        let snapshots: Vec<VirtualLuId> = (0..v.snapshots.len() as u32)
            .map(|i| VirtualLuId(next + 1 + i))
            .collect();
        next += 1 + v.snapshots.len() as u32;
        let access = Access {
            uids: v.allow_uids.clone(),
            gids: v.allow_gids.clone(),
            read_only: v.read_only,
        };
        names.push((v.name.clone(), origin, access.clone()));
        for (n, id) in v.snapshots.iter().zip(&snapshots) {
            names.push((n.clone(), *id, access.clone()));
            snapshot_of.insert(n.clone(), v.name.clone());
        }
        pairs.push(PairConfig {
            origin,
            snapshots,
            definition: def,
            save_area: v.save_area.map(LuId),
        });
    }
    Ok((pairs, names))
}

/// A backend's state log, its journal file when durable, and the state replayed from it.
struct StateLogOf {
    log: Arc<dyn StateLog>,
    journal: Option<Arc<FileJournal>>,
    recovered: Option<JournalState>,
}

/// The state log of backend `name`: its journal file, replayed, or none.
fn state_log(
    cfg: &Config,
    name: &str,
    state_dir: &Path,
    pairs: &[PairConfig],
    desc: &BackendDescription,
) -> Result<StateLogOf, AgentError> {
    if !cfg.journal.durable {
        return Ok(StateLogOf {
            log: Arc::new(NoLog),
            journal: None,
            recovered: None,
        });
    }
    let jerr = |source| AgentError::Journal {
        backend: name.to_string(),
        source,
    };
    let tuning = Tuning {
        region_lbas: cfg.journal.region_kib * 2,
        compact_bytes: cfg.journal.compact_mib << 20,
    };
    let path = state_dir.join(format!("{name}.journal"));
    let mut recovered = None;
    if let Some(r) = durable::recover(&path).map_err(jerr)? {
        if r.tail != Tail::Clean {
            tracing::warn!(journal = %path.display(), tail = ?r.tail, "journal ends in a torn or corrupt record; it was dropped (a crash during an append)");
        }
        tracing::info!(journal = %path.display(), records = r.records, "journal replayed");
        recovered = Some(r.state);
    }
    let capacity = pairs
        .iter()
        .map(|p| {
            let lbas = desc.capacity(p.definition.primary()).unwrap_or(u64::MAX);
            (p.origin, lbas)
        })
        .collect();
    let budgets = budgets(cfg, pairs, desc);
    let j = Arc::new(FileJournal::create(&path, capacity, tuning).map_err(jerr)?);
    j.set_budgets(&budgets);
    Ok(StateLogOf {
        log: j.clone(),
        journal: Some(j),
        recovered,
    })
}

/// The journal's copy of each pair's tables gets the manager's budgets: the config's
/// `tables.budget_mib_per_tib` for the update-location table (an E4 pair's stays exact)
/// and for each changed-block set.
fn budgets(
    cfg: &Config,
    pairs: &[PairConfig],
    desc: &BackendDescription,
) -> BTreeMap<hvm_core::VirtualLuId, durable::Budgets> {
    pairs
        .iter()
        .map(|p| {
            let lbas = desc.capacity(p.definition.primary()).unwrap_or(0);
            let b = hvm_core::TableBudget::for_lu_at(lbas, cfg.tables.per_tib());
            let table = p.save_area.is_none().then_some(b);
            (p.origin, durable::Budgets { table, tracking: b })
        })
        .collect()
}

/// Home backend `name` as its manager sees it: the placement's routes applied.
fn routed(
    name: &str,
    opened: &BTreeMap<String, Opened>,
    placement: &Placement,
) -> Result<Arc<Routed>, AgentError> {
    let r = Routed::new(name, opened[name].backend.clone());
    for (lu, place) in placement.routes.get(name).into_iter().flatten() {
        let backend = opened.get(&place.backend).ok_or_else(|| AgentError::Placement {
            reason: format!(
                "backend {name} LU {lu} was moved to {place}, but the config has no backend {:?}; put it back in the config",
                place.backend
            ),
        })?;
        r.set(
            LuId(*lu),
            Target {
                place: place.clone(),
                backend: backend.backend.clone(),
            },
        );
    }
    Ok(Arc::new(r))
}

/// The placement file, with a move that had not switched when the agent stopped rolled
/// back: its source holds every acknowledged write.
fn load_placement(state_dir: &Path) -> Result<Arc<Ledger>, AgentError> {
    let path = placement::path(state_dir);
    let mut pl = Placement::load(&path).map_err(|reason| AgentError::Placement { reason })?;
    if let Some(m) = pl.moving.take() {
        tracing::warn!(vlu = %m.vlu, to = %m.to.first().map(ToString::to_string).unwrap_or_default(), "a move was interrupted before its switch; rolled back (the data stays where it was; run the move again)");
        pl.save(&path).map_err(|source| AgentError::Io {
            path: path.clone(),
            source,
        })?;
    }
    Ok(Arc::new(Ledger::new(path, pl)))
}

/// The snapshot manager of backend `name` over its routed view, its journal, and the
/// exports of its virtual LUs.
#[allow(clippy::too_many_arguments)]
fn build_manager(
    cfg: &Config,
    name: &str,
    state_dir: &Path,
    desc: &BackendDescription,
    routed: &Arc<Routed>,
    snapshot_reads: &Arc<AtomicU64>,
    built: &mut Built,
) -> Result<(), AgentError> {
    let (pairs, names) = pairs_of(cfg, name, desc, &mut built.snapshot_of)?;
    let StateLogOf {
        log,
        journal,
        recovered,
    } = state_log(cfg, name, state_dir, &pairs, desc)?;
    let backend: Box<dyn Backend> = Box::new(routed.clone());
    let mgr = Arc::new(
        SnapshotManager::open_budgeted(
            backend,
            pairs,
            log,
            recovered.as_ref(),
            cfg.tables.per_tib(),
        )
        .map_err(|source| AgentError::Manager {
            backend: name.to_string(),
            source,
        })?,
    );
    if let Some(j) = journal {
        // The manager's checkpoint is in the new file; it replaces the old one.
        j.commit().map_err(|source| AgentError::Journal {
            backend: name.to_string(),
            source,
        })?;
        built.journals.insert(name.to_string(), j);
    }
    for (export_name, vlu, access) in names {
        tracing::info!(export = %export_name, backend = %name, mode = ?mgr.mode(vlu), "virtual LU");
        let mut export = VluExport::new(mgr.clone(), vlu, access);
        if built.snapshot_of.contains_key(&export_name) {
            export = export.counting_reads(snapshot_reads.clone());
        }
        built.exports.insert(export_name.clone(), export);
        built
            .virtual_lus
            .insert(export_name, (name.to_string(), vlu));
    }
    built.managers.insert(name.to_string(), mgr);
    Ok(())
}

/// The restart guard: every origin virtual LU must use the LUs its data was written to,
/// as the placement file recorded them; one that does not is refused, never served. A
/// virtual LU seen for the first time has its LUs recorded.
fn guard_placement(built: &Built, moves: &Moves) -> Result<(), AgentError> {
    let mut seen = BTreeMap::new();
    for (name, (home, vlu)) in &built.virtual_lus {
        if built.snapshot_of.contains_key(name) {
            continue;
        }
        let s = Subject {
            name,
            home,
            mgr: &built.managers[home],
            vlu: *vlu,
        };
        let now = moves.identities(&s).map_err(|e| AgentError::Placement {
            reason: e.to_string(),
        })?;
        if let Some(was) = moves.ledger().get().identities.get(name) {
            if *was != now {
                return Err(AgentError::Placement {
                    reason: format!(
                        "virtual LU {name}: its data was written to [{}], but the config now puts it on [{}]; refusing to serve it from other LUs. Put the config back, or, to start {name} afresh on the new LUs, remove {name:?} from \"identities\" in {}",
                        was.join("; "),
                        now.join("; "),
                        moves.ledger().path().display()
                    ),
                });
            }
        }
        seen.insert(name.clone(), now);
    }
    moves
        .ledger()
        .update(|pl| {
            for (n, ids) in seen {
                pl.identities.entry(n).or_insert(ids);
            }
        })
        .map_err(|source| AgentError::Io {
            path: moves.ledger().path().to_path_buf(),
            source,
        })
}

impl Agent {
    /// Build from `cfg`, whose relative paths are relative to `base`.
    pub fn build(cfg: &Config, base: &Path, state_dir: Option<&Path>) -> Result<Agent, AgentError> {
        let state_dir = match (state_dir, &cfg.state_dir) {
            (Some(d), _) => d.to_path_buf(),
            (None, Some(d)) => absolute(base, d),
            (None, None) => base.join("hvm-state"),
        };
        std::fs::create_dir_all(&state_dir).map_err(|source| AgentError::Io {
            path: state_dir.clone(),
            source,
        })?;
        let plugin_dir = match &cfg.plugin_dir {
            Some(d) => absolute(base, d),
            None => std::env::current_exe()
                .ok()
                .and_then(|e| e.parent().map(Path::to_path_buf))
                .unwrap_or_else(|| PathBuf::from(".")),
        };
        let mut opened = BTreeMap::new();
        for b in &cfg.backends {
            opened.insert(
                b.name.clone(),
                open_backend(b, base, &plugin_dir, &state_dir)?,
            );
        }
        let ledger = load_placement(&state_dir)?;
        let mut routed_by = BTreeMap::new();
        let mut built = Built::default();
        let snapshot_reads = Arc::new(AtomicU64::new(0));
        for b in &cfg.backends {
            let r = routed(&b.name, &opened, &ledger.get())?;
            build_manager(
                cfg,
                &b.name,
                &state_dir,
                &opened[&b.name].desc,
                &r,
                &snapshot_reads,
                &mut built,
            )?;
            routed_by.insert(b.name.clone(), r);
        }
        let shared = opened
            .iter()
            .map(|(n, o)| (n.clone(), o.backend.clone()))
            .collect();
        let moves = Arc::new(Moves::new(ledger, shared, routed_by));
        guard_placement(&built, &moves)?;
        let Built {
            exports,
            managers,
            journals,
            virtual_lus,
            snapshot_of,
        } = built;
        Ok(Agent {
            exports: Arc::new(exports),
            moves,
            managers,
            journals,
            resync: Arc::new(ResyncControl::new(
                cfg.resync.chunk_kib << 10,
                cfg.resync.rate_mib << 20,
            )),
            virtual_lus,
            snapshot_of,
            socket: absolute(&state_dir, &cfg.listen.unix),
            control: match &cfg.runtime_dir {
                Some(d) => absolute(base, d),
                None => std::env::var_os("RUNTIME_DIRECTORY")
                    .map(PathBuf::from)
                    .unwrap_or_else(|| state_dir.join("run")),
            }
            .join("control.sock"),
            tcp: cfg.listen.tcp.clone(),
            tcp_bound: OnceLock::new(),
            state_dir,
            config: Mutex::new(cfg.clone()),
            config_file: None,
            log_level: OnceLock::new(),
            last_reload: Mutex::new(None),
            snapshot_reads,
            coordination: cfg.coordination.clone().map(|mut c| {
                c.cert = absolute(base, &c.cert);
                c.ca = c.ca.as_ref().map(|ca| absolute(base, ca));
                c.key = absolute(base, &c.key);
                c.token_file = absolute(base, &c.token_file);
                if let Some(b) = &mut c.backup {
                    b.target_root = absolute(base, &b.target_root);
                }
                c
            }),
        })
    }

    /// Reload the config file: apply what may change live, report the rest (see
    /// [`crate::reload`]). The report is also kept for `GET /v1/status`.
    pub fn reload(&self) -> ReloadReport {
        let mut report = ReloadReport {
            file: self
                .config_file
                .as_ref()
                .map(|f| f.display().to_string())
                .unwrap_or_default(),
            at: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            ..ReloadReport::default()
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

    fn apply(&self, new: &Config, report: &mut ReloadReport) {
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
    pub fn start_move(&self, name: &str, req: &MoveRequest) -> Result<MoveStatus, MoveError> {
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

    /// Bind the configured sockets (a stale Unix socket file is replaced); load the
    /// coordination service's TLS files and token.
    pub async fn listen(self: &Arc<Self>) -> Result<Listeners, AgentError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| AgentError::Io { path, source }
        };
        if let Some(parent) = self.socket.parent() {
            std::fs::create_dir_all(parent).map_err(io(parent))?;
        }
        if std::fs::symlink_metadata(&self.socket).is_ok() {
            std::fs::remove_file(&self.socket).map_err(io(&self.socket))?;
        }
        let unix = tokio::net::UnixListener::bind(&self.socket).map_err(io(&self.socket))?;
        let control = crate::control::bind(&self.control).map_err(io(&self.control))?;
        let tcp = match &self.tcp {
            Some(addr) => Some(
                tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(io(Path::new(addr)))?,
            ),
            None => None,
        };
        if let Some(a) = tcp.as_ref().and_then(|t| t.local_addr().ok()) {
            let _ = self.tcp_bound.set(a.to_string());
        }
        let coordination = match &self.coordination {
            Some(c) => {
                let svc = Arc::new(Service::new(self.clone(), c.clone())?);
                let listener = svc.bind().await?;
                if let Ok(a) = listener.local_addr() {
                    tracing::info!(address = %a, roles = ?c.roles, "coordination service listening (TLS)");
                }
                Some((listener, svc))
            }
            None => None,
        };
        Ok(Listeners {
            unix,
            tcp,
            control,
            coordination,
        })
    }

    /// Serve the exports on `listeners`, and run the resync service, until `shutdown`
    /// completes; then drain the connections (requests taken are answered), stop the
    /// resync and write each journal as an exact checkpoint.
    pub async fn serve(self: &Arc<Self>, listeners: Listeners, shutdown: impl Future<Output = ()>) {
        let exports: Arc<dyn Exports> = self.exports.clone();
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.changed().await;
        };
        let backends: Vec<resync::Backend> = self
            .managers
            .iter()
            .map(|(name, mgr)| resync::Backend {
                name: name.clone(),
                mgr: mgr.clone(),
                journal: self.journals.get(name).cloned(),
            })
            .collect();
        let ctl = self.resync.clone();
        let resync = std::thread::Builder::new()
            .name("resync".into())
            .spawn(move || resync::run(&backends, &ctl));
        let mut tasks = vec![tokio::spawn(server::run_unix(
            listeners.unix,
            exports.clone(),
            Limits::default(),
            stopped(stop_rx.clone()),
        ))];
        if let Some(tcp) = listeners.tcp {
            tasks.push(tokio::spawn(server::run_tcp(
                tcp,
                exports,
                Limits::default(),
                stopped(stop_rx.clone()),
            )));
        }
        if let Some((listener, svc)) = listeners.coordination {
            tasks.push(tokio::spawn(svc.run(listener, stopped(stop_rx.clone()))));
        }
        tasks.push(tokio::spawn(crate::control::serve(
            listeners.control,
            self.clone(),
            stopped(stop_rx),
        )));
        shutdown.await;
        tracing::info!("stopping: draining connections");
        let _ = stop_tx.send(true);
        for t in tasks {
            let _ = t.await;
        }
        self.resync.stop();
        if let Ok(t) = resync {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
        self.close();
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

/// The bound sockets of an agent.
pub struct Listeners {
    pub unix: tokio::net::UnixListener,
    pub control: tokio::net::UnixListener,
    pub tcp: Option<tokio::net::TcpListener>,
    /// The coordination service's TLS listener.
    pub coordination: Option<(tokio::net::TcpListener, Arc<Service>)>,
}
