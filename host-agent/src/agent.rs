//! Putting a configured host together ([`build`]): load the backend plugins, open each
//! backend, build one snapshot manager per backend with its virtual LUs, into a
//! [`Host`]; [`crate::service`] serves it.
//!
//! Each backend's tables live in a journal file in the state directory
//! (`<backend>.journal`, see [`crate::durable`]), replayed on start; with
//! `journal.durable: false` they live in memory only.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, OnceLock};

use hvm_core::backend::{Backend, BackendDescription, BackendError};
use hvm_core::journal::{JournalState, NoLog, StateLog, Tail};
use hvm_core::{LuId, ManagerError, MirrorDefinition, PairConfig, SnapshotManager, VirtualLuId};
use hvm_plugin_abi::host::{path_in, LoadError, Plugin};

use crate::config::{Config, ConfigError, CoordinationConfig, VirtualLuConfig};
use crate::durable::{self, DurableError, FileJournal, Tuning};
use crate::exports::{Access, Manager, VluExport, VluExports};
use crate::host::Host;
use crate::moves::placement::{self, Placement};
use crate::moves::routed::{Routed, Shared, Target};
use crate::moves::{Ledger, Moves, Subject};
use crate::resync::ResyncControl;

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
    /// A listener's files are unusable (`listen.tls`).
    #[error("{reason}")]
    Listen { reason: String },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

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
    // One per virtual LU, shared with its snapshot exports: a backup's reads yield to
    // the database's requests (config `backup_reads`).
    let mut yields = std::collections::BTreeMap::new();
    for (export_name, vlu, access) in names {
        tracing::info!(export = %export_name, backend = %name, mode = ?mgr.mode(vlu), "virtual LU");
        let mut export = VluExport::new(mgr.clone(), vlu, access);
        let origin = built.snapshot_of.get(&export_name).cloned();
        let y = yields
            .entry(origin.clone().unwrap_or_else(|| export_name.clone()))
            .or_insert_with(|| {
                Arc::new(crate::nbd::export::Yield::new(
                    cfg.backup_reads.floor_mib << 20,
                    std::time::Duration::from_millis(cfg.backup_reads.busy_ms),
                ))
            })
            .clone();
        export = export.yielding(y, origin.is_some());
        if origin.is_some() {
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

/// Build the host `cfg` describes, whose relative paths are relative to `base`: open
/// each backend from its plugin, then one snapshot manager per backend over its routed
/// view, with its journal, and the exports of its virtual LUs.
pub fn build(cfg: &Config, base: &Path, state_dir: Option<&Path>) -> Result<Host, AgentError> {
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
    let snapshot_reads = Arc::new(AtomicU64::new(0));
    let (built, moves) = build_managers(cfg, &state_dir, &opened, &snapshot_reads)?;
    Ok(host(cfg, base, state_dir, built, moves, snapshot_reads))
}

/// Every backend's manager over its routed view (the placement file's routes applied),
/// and the moves between them; the restart guard checked.
fn build_managers(
    cfg: &Config,
    state_dir: &Path,
    opened: &BTreeMap<String, Opened>,
    snapshot_reads: &Arc<AtomicU64>,
) -> Result<(Built, Arc<Moves>), AgentError> {
    let ledger = load_placement(state_dir)?;
    let mut routed_by = BTreeMap::new();
    let mut built = Built::default();
    for b in &cfg.backends {
        let r = routed(&b.name, opened, &ledger.get())?;
        build_manager(
            cfg,
            &b.name,
            state_dir,
            &opened[&b.name].desc,
            &r,
            snapshot_reads,
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
    Ok((built, moves))
}

/// The host of what was built, its sockets' and the coordination service's paths made
/// absolute.
fn host(
    cfg: &Config,
    base: &Path,
    state_dir: PathBuf,
    built: Built,
    moves: Arc<Moves>,
    snapshot_reads: Arc<AtomicU64>,
) -> Host {
    let Built {
        exports,
        managers,
        journals,
        virtual_lus,
        snapshot_of,
    } = built;
    Host {
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
        coordination: cfg.coordination.clone().map(|c| coordination(base, c)),
    }
}

/// The coordination service's config, its paths made absolute.
fn coordination(base: &Path, mut c: CoordinationConfig) -> CoordinationConfig {
    c.cert = absolute(base, &c.cert);
    c.ca = c.ca.as_ref().map(|ca| absolute(base, ca));
    c.key = absolute(base, &c.key);
    c.token_file = absolute(base, &c.token_file);
    if let Some(b) = &mut c.backup {
        b.target_root = absolute(base, &b.target_root);
    }
    c
}
