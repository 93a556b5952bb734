//! host-agent's configuration (YAML). See `host-agent/examples/quickstart.yaml`.
//!
//! ```yaml
//! state_dir: /var/lib/hvm            # relative: to this file; --state-dir overrides
//! log_level: info                    # error, warn, info, debug or trace; --log-level and
//!                                    #   RUST_LOG override
//! plugin_dir: /usr/lib/hvm/plugins   # default: beside the host-agent binary
//! runtime_dir: /run/hvm              # the control socket (control.sock) lives here, in a
//!                                    #   0700 directory; default: $RUNTIME_DIRECTORY
//!                                    #   (systemd), else <state_dir>/run
//! control_group: hvm                # optional: members may use the control socket
//!                                    #   (socket 0660, its directory 0750, this group)
//! journal:                           # the tables' journal files, in state_dir
//!   durable: true                    # false: tables in memory only (lost on a crash)
//!   region_kib: 4096                 # activity region: one flush per region per epoch
//!   compact_mib: 64                  # compact a journal file past this size
//! tables:                            # memory of the update-location tables and of the
//!   budget_mib_per_tib: 32           #   changed-block sets, each, per TiB of LU (at
//!                                    #   least 4 MiB); past it they coarsen: cover
//!                                    #   more than was written, never less
//! resync:
//!   chunk_kib: 1024                  # LBAs copied per resync step
//!   rate_mib: 0                      # bytes per second per backend; 0: unlimited
//! backup_reads:                      # a snapshot export's reads (a backup pulling the
//!                                    #   snapshot over NBD) yield to the database's I/O
//!   floor_mib: 64                    #   on its virtual LU: while that is busy, at most
//!                                    #   this many MiB/s (never less: a busy database
//!                                    #   cannot starve the backup); 0: never yield
//!   busy_ms: 50                      # busy: a request on the virtual LU this recently
//! listen:
//!   unix: nbd.sock                   # relative: in state_dir
//!   tcp: 127.0.0.1:10809             # optional; only unrestricted exports on TCP
//!   tls:                             # required with tcp: NBD STARTTLS, client
//!     cert: tls/db1.pem              #   certificates chaining to ca required
//!     key: tls/db1-key.pem
//!     ca: tls/ca.pem
//!   insecure: false                  # true: serve tcp in plain text instead
//!   metrics: 127.0.0.1:9100          # optional: GET /metrics (Prometheus text) over
//!                                    #   plain HTTP, read-only, nothing else served
//! backends:
//!   - name: array0
//!     plugin: stateless              # a name in plugin_dir, or a path to the .so
//!     params: { array: { embedded: { kind: stateless, dir: array0, ... } } }
//!                                    # the plugin also gets `state_dir: <state_dir>`
//! virtual_lus:
//!   - name: db                       # the export of the original data
//!     backend: array0
//!     lu: 0                          # the mirroring definition whose primary LU is 0,
//!                                    #   as the array reports it (Mode Sense, INQUIRY)
//!     mirroring: { origin: 1, mate: 2 }  # or listed here instead [0054]: stateless
//!                                    #   {origin, mate}, mode-select {mates: [..]},
//!                                    #   pre-update {mate}
//!     snapshots: [db-snap]           # the snapshot export(s)
//!     save_area: 9                   # pre-update (E4) arrays only
//!     read_only: false
//!     allow_uids: []                 # SO_PEERCRED checks; empty: anyone who can
//!     allow_gids: []                 #   reach the socket
//! coordination:                      # optional: the agent-to-agent service that
//!                                    #   `hvmctl backup run` drives (see `coord`)
//!   listen: 0.0.0.0:7430             # TCP, TLS only
//!   cert: tls/db1.pem                # this agent's certificate chain and key (PEM);
//!   key: tls/db1-key.pem             #   `hvmctl tls init` makes a CA and them
//!   ca: tls/ca.pem                   # clients must present a certificate signed by
//!                                    #   it; default: ca.pem beside `cert`
//!   token_file: tls/token            # the shared token every request must carry
//!   roles: [database]                # database and/or backup
//!   freeze:                          # database role: the bounded freeze
//!     deadline_ms: 10000             # quiesce start to snapshot; past it all is thawed
//!     hooks:                         # quiesced in this order, resumed in reverse
//!       - command: { pre: "sync", post: "true" }    # sh -c, HVM_* in the environment
//!       - fsfreeze: /srv/pgdata                      # a mount point
//!       - postgresql: { connect: "host=/run/postgresql user=postgres" }
//!   restore:                         # database role: `backup restore --in-place --force`
//!     stop: "systemctl stop postgresql && umount /srv/pgdata && nbd-client -d /dev/nbd0"
//!                                    # sh -c; must end every NBD client of the vLU
//!   backup:                          # backup role
//!     target_root: /srv/backups      # backups are written only under this directory
//! ```

use std::path::{Path, PathBuf};

use hvm_core::{LuId, MirrorDefinition};
use serde::{Deserialize, Deserializer};

/// A number field checked for its range while it is parsed, so that serde_yaml's error
/// names the field's path and its line; the ranges keep every product the agent forms
/// from them (KiB to LBAs, MiB to bytes, milliseconds to a deadline) far from overflow.
macro_rules! ranged {
    ($name:ident, $lo:expr, $hi:expr, $unit:expr) => {
        fn $name<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
            d.deserialize_u64(Ranged {
                lo: $lo,
                hi: $hi,
                unit: $unit,
            })
        }
    };
}

/// The visitor behind [`ranged!`]: the range error is raised inside serde_yaml's
/// deserialize call for the scalar, which is what gives it the scalar's line.
struct Ranged {
    lo: u64,
    hi: u64,
    unit: &'static str,
}

impl serde::de::Visitor<'_> for Ranged {
    type Value = u64;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "a whole number from {} to {} {}",
            self.lo, self.hi, self.unit
        )
    }

    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<u64, E> {
        if (self.lo..=self.hi).contains(&v) {
            Ok(v)
        } else {
            Err(E::custom(format!(
                "{v} is out of range: expected {} to {} {}",
                self.lo, self.hi, self.unit
            )))
        }
    }

    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<u64, E> {
        match u64::try_from(v) {
            Ok(v) => self.visit_u64(v),
            Err(_) => Err(E::invalid_value(serde::de::Unexpected::Signed(v), &self)),
        }
    }
}

ranged!(region_kib, 4, 1 << 20, "KiB (a multiple of 4)");
ranged!(compact_mib, 1, 1 << 20, "MiB");
ranged!(chunk_kib, 1, 32 * 1024, "KiB");
ranged!(rate_mib, 0, 1 << 20, "MiB/s (0: unlimited)");
ranged!(deadline_ms, 1, 24 * 3_600_000, "milliseconds");
ranged!(budget_mib_per_tib, 1, 1 << 16, "MiB per TiB of LU");
ranged!(floor_mib, 0, 1 << 20, "MiB/s (0: never yield)");
ranged!(busy_ms, 1, 60_000, "milliseconds");

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub state_dir: Option<PathBuf>,
    #[serde(default)]
    pub plugin_dir: Option<PathBuf>,
    #[serde(default)]
    pub runtime_dir: Option<PathBuf>,
    /// The group whose members may use the control socket (`hvmctl` without root): the
    /// socket is made 0660 and its directory 0750, both of this group. Default: none.
    #[serde(default)]
    pub control_group: Option<String>,
    #[serde(default)]
    pub log_level: LogLevel,
    #[serde(default)]
    pub journal: JournalConfig,
    #[serde(default)]
    pub resync: ResyncConfig,
    #[serde(default)]
    pub tables: TablesConfig,
    #[serde(default)]
    pub backup_reads: BackupReadsConfig,
    pub listen: Listen,
    pub backends: Vec<BackendConfig>,
    #[serde(default)]
    pub virtual_lus: Vec<VirtualLuConfig>,
    #[serde(default)]
    pub coordination: Option<CoordinationConfig>,
}

/// The agent-to-agent backup service.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinationConfig {
    pub listen: String,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The CA a client's certificate must chain to; default `ca.pem` beside `cert`, as
    /// `hvmctl tls init` writes it.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    pub token_file: PathBuf,
    pub roles: Vec<Role>,
    #[serde(default)]
    pub freeze: FreezeConfig,
    #[serde(default)]
    pub backup: Option<BackupRoleConfig>,
    #[serde(default)]
    pub restore: RestoreConfig,
}

/// The database role's side of `hvmctl backup restore --in-place`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreConfig {
    /// With `--force`: a command (`sh -c`, `HVM_VLU`, `HVM_BACKUP`, `HVM_CLIENTS` in the
    /// environment) that ends every NBD client of the virtual LU, e.g. stops the
    /// database, unmounts its filesystem and disconnects `nbd-client`. Nothing starts
    /// them again: after the restore the DBA does.
    #[serde(default)]
    pub stop: Option<String>,
}

impl CoordinationConfig {
    /// The CA file client certificates are checked against.
    pub fn ca_file(&self) -> PathBuf {
        self.ca.clone().unwrap_or_else(|| {
            self.cert
                .parent()
                .unwrap_or_else(|| Path::new("."))
                .join("ca.pem")
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Database,
    Backup,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FreezeConfig {
    #[serde(deserialize_with = "deadline_ms")]
    pub deadline_ms: u64,
    pub hooks: Vec<HookConfig>,
}

impl Default for FreezeConfig {
    fn default() -> Self {
        FreezeConfig {
            deadline_ms: 10_000,
            hooks: Vec::new(),
        }
    }
}

/// One quiesce hook: exactly one of the fields.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HookConfig {
    #[serde(default)]
    pub command: Option<CommandHook>,
    #[serde(default)]
    pub fsfreeze: Option<PathBuf>,
    #[serde(default)]
    pub postgresql: Option<PostgresHook>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandHook {
    #[serde(default)]
    pub pre: Option<String>,
    #[serde(default)]
    pub post: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresHook {
    /// A libpq-style connection string (`host=/run/postgresql port=5432 user=postgres`).
    pub connect: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupRoleConfig {
    pub target_root: PathBuf,
    /// Retention for `hvmctl backup prune` without --keep-* flags.
    #[serde(default)]
    pub keep: Option<crate::backups::retention::Keep>,
}

/// The tables' journal files.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JournalConfig {
    pub durable: bool,
    #[serde(deserialize_with = "region_kib")]
    pub region_kib: u64,
    #[serde(deserialize_with = "compact_mib")]
    pub compact_mib: u64,
}

impl Default for JournalConfig {
    fn default() -> Self {
        JournalConfig {
            durable: true,
            region_kib: 4096,
            compact_mib: 64,
        }
    }
}

/// The memory of the tables (issue 20): each update-location table (but an E4 pair's,
/// which stays exact) and each changed-block set (issue 19) may hold this much per TiB
/// of its LU, at least 4 MiB; past it, its ranges are coarsened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TablesConfig {
    #[serde(deserialize_with = "budget_mib_per_tib")]
    pub budget_mib_per_tib: u64,
}

impl Default for TablesConfig {
    fn default() -> Self {
        TablesConfig {
            budget_mib_per_tib: 32,
        }
    }
}

impl TablesConfig {
    /// The budget in bytes per TiB.
    pub fn per_tib(&self) -> u64 {
        self.budget_mib_per_tib << 20
    }
}

/// The resync service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ResyncConfig {
    #[serde(deserialize_with = "chunk_kib")]
    pub chunk_kib: u64,
    #[serde(deserialize_with = "rate_mib")]
    pub rate_mib: u64,
}

impl Default for ResyncConfig {
    fn default() -> Self {
        ResyncConfig {
            chunk_kib: 1024,
            rate_mib: 0,
        }
    }
}

/// How a snapshot export's reads (a backup pulling the snapshot over NBD) yield to the
/// database's I/O on the virtual LU they are the snapshot of, as DRBD's resync yields to
/// application I/O down to its `c-min-rate` (see [`crate::nbd::export::Yield`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BackupReadsConfig {
    /// MiB/s the backup's reads get while the virtual LU is busy; 0: never yield.
    #[serde(deserialize_with = "floor_mib")]
    pub floor_mib: u64,
    /// The virtual LU is busy for this long after each of its requests.
    #[serde(deserialize_with = "busy_ms")]
    pub busy_ms: u64,
}

impl Default for BackupReadsConfig {
    fn default() -> Self {
        BackupReadsConfig {
            floor_mib: 64,
            busy_ms: 50,
        }
    }
}

/// How much the service logs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Error,
    Warn,
    #[default]
    Info,
    Debug,
    Trace,
}

impl LogLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::Error => "error",
            LogLevel::Warn => "warn",
            LogLevel::Info => "info",
            LogLevel::Debug => "debug",
            LogLevel::Trace => "trace",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listen {
    pub unix: PathBuf,
    #[serde(default)]
    pub tcp: Option<String>,
    /// TLS for `tcp`: clients upgrade with NBD_OPT_STARTTLS and present a certificate
    /// that chains to `ca`.
    #[serde(default)]
    pub tls: Option<NbdTls>,
    /// Serve `tcp` in plain text (anyone who reaches the port reads and writes the
    /// unrestricted exports); refused unless written here.
    #[serde(default)]
    pub insecure: bool,
    /// `HOST:PORT` of a plain-HTTP listener that serves `GET /metrics` (Prometheus text)
    /// and nothing else, for a scraper; the control socket serves it too.
    #[serde(default, deserialize_with = "host_port")]
    pub metrics: Option<String>,
}

/// A `HOST:PORT` checked while it is parsed (so the error names the field and its line):
/// a host and a port from 0 to 65535 (0: any free port).
fn host_port<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    d.deserialize_str(HostPort).map(Some)
}

/// The visitor behind [`host_port`], raising its error inside the scalar's deserialize
/// call as [`Ranged`] does.
struct HostPort;

impl serde::de::Visitor<'_> for HostPort {
    type Value = String;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HOST:PORT")
    }

    fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<String, E> {
        let ok = s
            .rsplit_once(':')
            .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
        if ok {
            Ok(s.to_string())
        } else {
            Err(E::custom(format!(
                "{s:?} is not HOST:PORT with a port from 0 to 65535 (e.g. 127.0.0.1:9100)"
            )))
        }
    }
}

/// `listen.tls`: the server's certificate chain and key, and the CA client
/// certificates must chain to (PEM files; relative: to the config file).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NbdTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    pub name: String,
    pub plugin: String,
    #[serde(default)]
    pub params: PluginParams,
}

/// A backend's `params`: YAML that only its plugin reads. They cross the plugin boundary
/// once, as one text ([`PluginParams::text`]), which the plugin parses once into its
/// typed parameters; the host only adds `state_dir`.
#[derive(Clone, Debug, Default, Deserialize, serde::Serialize)]
#[serde(transparent)]
pub struct PluginParams {
    value: serde_yaml::Value,
    /// Where they are in the config file, for the plugin's errors; set by
    /// [`Config::parse`].
    #[serde(skip)]
    origin: Option<ParamsOrigin>,
}

/// The file and field a backend's params came from, and their line.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ParamsOrigin {
    pub file: String,
    /// `backends[N].params`.
    pub at: String,
    pub line: Option<usize>,
}

/// Two backends' params are equal when their YAML is: where it sits in the file does not
/// change the backend (a reload compares them).
impl PartialEq for PluginParams {
    fn eq(&self, other: &Self) -> bool {
        self.value == other.value
    }
}

impl PluginParams {
    /// The text the plugin is opened with: the params, with the host's state directory as
    /// `state_dir` unless they set one (a driver keeps its files there; what it keeps is
    /// the driver's affair).
    pub fn text(&self, state_dir: &Path) -> String {
        use serde_yaml::{Mapping, Value};
        let mut params = match &self.value {
            Value::Null => Value::Mapping(Mapping::new()),
            v => v.clone(),
        };
        if let Some(m) = params.as_mapping_mut() {
            let key = Value::String("state_dir".into());
            if !m.contains_key(&key) {
                m.insert(key, Value::String(state_dir.display().to_string()));
            }
        }
        // A Value always serializes (its keys and scalars are YAML already).
        serde_yaml::to_string(&params).unwrap_or_default()
    }

    /// Where they came from, when [`Config::parse`] read them.
    pub fn origin(&self) -> Option<&ParamsOrigin> {
        self.origin.as_ref()
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VirtualLuConfig {
    pub name: String,
    pub backend: String,
    pub lu: u32,
    #[serde(default)]
    pub mirroring: Option<MirroringConfig>,
    pub snapshots: Vec<String>,
    #[serde(default)]
    pub save_area: Option<u32>,
    #[serde(default)]
    pub read_only: bool,
    #[serde(default)]
    pub allow_uids: Vec<u32>,
    #[serde(default)]
    pub allow_gids: Vec<u32>,
}

/// A mirroring definition row listed in the config ([0054]) for the virtual LU's `lu`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MirroringConfig {
    #[serde(default)]
    pub origin: Option<u32>,
    #[serde(default)]
    pub mate: Option<u32>,
    #[serde(default)]
    pub mates: Option<Vec<u32>>,
}

impl MirroringConfig {
    /// The row for primary LU `lu`, or what is wrong with it.
    pub fn definition(&self, lu: u32) -> Result<MirrorDefinition, String> {
        match (self.origin, self.mate, &self.mates) {
            (Some(origin), Some(mate), None) => Ok(MirrorDefinition::Triple {
                mirror: LuId(lu),
                origin: LuId(origin),
                mate: LuId(mate),
            }),
            (None, Some(mate), None) => Ok(MirrorDefinition::Pair {
                mirror: LuId(lu),
                mate: LuId(mate),
            }),
            (None, None, Some(mates)) if !mates.is_empty() => Ok(MirrorDefinition::Managed {
                lu: LuId(lu),
                mates: mates.iter().copied().map(LuId).collect(),
            }),
            _ => Err(
                "expected {origin, mate} (stateless array), {mates: [..]} (Mode Select array) \
                 or {mate} (pre-update array)"
                    .into(),
            ),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: {source}")]
    Read {
        file: String,
        #[source]
        source: std::io::Error,
    },
    /// serde_yaml's message has the line and column and what was expected.
    #[error("{file}: {source}")]
    Parse {
        file: String,
        #[source]
        source: serde_yaml::Error,
    },
    #[error("{file}: {at}: {message}{}", line.map(|l| format!(" at line {l}")).unwrap_or_default())]
    Invalid {
        file: String,
        at: String,
        message: String,
        /// Where `at` is in the file, when [`line_of`] finds it.
        line: Option<usize>,
    },
}

/// The 1-based line of field `at` (`a.b[2].c`) in `text`, for the checks made after
/// parsing (serde_yaml keeps no positions). Follows block mappings and sequences, and
/// stops at the line of a flow collection (`{..}`, `[..]`) that holds the rest.
pub fn line_of(text: &str, at: &str) -> Option<usize> {
    let lines: Vec<&str> = text.lines().collect();
    let indent = |l: &str| l.len() - l.trim_start().len();
    let (mut row, mut floor) = (0usize, 0usize);
    // `from_here`: the next key may be on this line (the first, or a sequence item's).
    let (mut first, mut from_here) = (true, true);
    for seg in at.split('.') {
        let (key, index) = match seg.split_once('[') {
            Some((k, i)) => (k, i.trim_end_matches(']').parse::<usize>().ok()),
            None => (seg, None),
        };
        if !key.is_empty() {
            let here = lines[row].trim_start().trim_start_matches("- ");
            if !first && (here.starts_with('{') || here.contains(&format!("{{ {key}:"))) {
                return Some(row + 1); // a flow mapping on this line holds the rest
            }
            let found = (row + usize::from(!from_here)..lines.len()).find(|&r| {
                let l = lines[r];
                let t = l.trim_start().trim_start_matches("- ");
                (first || (from_here && r == row) || indent(l) >= floor)
                    && t.starts_with(&format!("{key}:"))
            })?;
            row = found;
            floor = indent(lines[row]);
        }
        (first, from_here) = (false, false);
        if let Some(n) = index {
            if lines[row].contains('[') {
                return Some(row + 1); // a flow sequence
            }
            let items: Vec<usize> = (row + 1..lines.len())
                .take_while(|&r| lines[r].trim().is_empty() || indent(lines[r]) >= floor)
                .filter(|&r| lines[r].trim_start().starts_with("- "))
                .collect();
            let min = items.iter().map(|&r| indent(lines[r])).min()?;
            row = *items.iter().filter(|&&r| indent(lines[r]) == min).nth(n)?;
            floor = indent(lines[row]) + 2;
            from_here = true;
        }
    }
    Some(row + 1)
}

impl Config {
    /// Read and check `path`; returns the config and the directory relative paths in it
    /// are resolved against.
    pub fn load(path: &Path) -> Result<(Config, PathBuf), ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: file.clone(),
            source,
        })?;
        let cfg = Config::parse(&text, &file)?;
        let base = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        Ok((cfg, base))
    }

    pub fn parse(text: &str, file: &str) -> Result<Config, ConfigError> {
        let mut cfg: Config = serde_yaml::from_str(text).map_err(|source| ConfigError::Parse {
            file: file.into(),
            source,
        })?;
        let bad = |at: String, message: String| ConfigError::Invalid {
            file: file.into(),
            line: line_of(text, &at),
            at,
            message,
        };
        cfg.check_numbers().map_err(|(at, m)| bad(at, m))?;
        cfg.check_listen().map_err(|(at, m)| bad(at, m))?;
        cfg.check_names().map_err(|(at, m)| bad(at, m))?;
        if let Some(c) = &cfg.coordination {
            c.check().map_err(|(at, m)| bad(at, m))?;
        }
        for (i, b) in cfg.backends.iter_mut().enumerate() {
            let at = format!("backends[{i}].params");
            b.params.origin = Some(ParamsOrigin {
                file: file.into(),
                line: line_of(text, &at),
                at,
            });
        }
        Ok(cfg)
    }

    fn check_numbers(&self) -> Result<(), Refusal> {
        if self.journal.region_kib == 0 || self.journal.region_kib % 4 != 0 {
            return Err((
                "journal.region_kib".into(),
                format!(
                    "{} is not a positive multiple of 4",
                    self.journal.region_kib
                ),
            ));
        }
        if self.resync.chunk_kib == 0 || self.resync.chunk_kib > 32 * 1024 {
            return Err((
                "resync.chunk_kib".into(),
                format!("{} is not between 1 and 32768", self.resync.chunk_kib),
            ));
        }
        Ok(())
    }

    fn check_listen(&self) -> Result<(), Refusal> {
        let l = &self.listen;
        if l.tcp.is_some() && l.tls.is_none() && !l.insecure {
            return Err((
                "listen.tcp".into(),
                "plain TCP lets anyone who reaches the port read and write the exports: give listen.tls { cert, key, ca } (hvmctl tls init makes them), or write listen.insecure: true".into(),
            ));
        }
        if l.tls.is_some() && l.tcp.is_none() {
            return Err((
                "listen.tls".into(),
                "TLS is for listen.tcp, which is not set".into(),
            ));
        }
        Ok(())
    }

    /// Backend names are unique, every virtual LU names one, and export names are valid
    /// and unique.
    fn check_names(&self) -> Result<(), Refusal> {
        let mut names = std::collections::BTreeSet::new();
        for (i, b) in self.backends.iter().enumerate() {
            if !names.insert(b.name.as_str()) {
                return Err((
                    format!("backends[{i}].name"),
                    format!("{:?} is used twice", b.name),
                ));
            }
        }
        let mut exports = std::collections::BTreeSet::new();
        for (i, v) in self.virtual_lus.iter().enumerate() {
            if !names.contains(v.backend.as_str()) {
                return Err((
                    format!("virtual_lus[{i}].backend"),
                    format!("no backend named {:?}", v.backend),
                ));
            }
            if let Some(m) = &v.mirroring {
                m.definition(v.lu)
                    .map_err(|e| (format!("virtual_lus[{i}].mirroring"), e))?;
            }
            for n in std::iter::once(&v.name).chain(&v.snapshots) {
                let why = if n.is_empty() || n.len() > 4096 || n.contains('\0') {
                    format!("{n:?} is not a valid export name (1-4096 bytes, no NUL)")
                } else if !exports.insert(n.clone()) {
                    format!("export name {n:?} is used twice")
                } else {
                    continue;
                };
                return Err((format!("virtual_lus[{i}]"), why));
            }
        }
        Ok(())
    }
}

/// A check's refusal: the field's path (`a.b[2].c`) and why.
type Refusal = (String, String);

impl CoordinationConfig {
    fn check(&self) -> Result<(), Refusal> {
        if self.roles.is_empty() {
            return Err((
                "coordination.roles".into(),
                "expected at least one of database, backup".into(),
            ));
        }
        if self.roles.contains(&Role::Backup) && self.backup.is_none() {
            return Err((
                "coordination.backup".into(),
                "the backup role needs `backup: { target_root: DIR }`".into(),
            ));
        }
        if self.freeze.deadline_ms == 0 {
            return Err((
                "coordination.freeze.deadline_ms".into(),
                "expected a positive number of milliseconds".into(),
            ));
        }
        for (i, h) in self.freeze.hooks.iter().enumerate() {
            let set = [
                h.command.is_some(),
                h.fsfreeze.is_some(),
                h.postgresql.is_some(),
            ];
            if set.iter().filter(|b| **b).count() != 1 {
                return Err((
                    format!("coordination.freeze.hooks[{i}]"),
                    "expected exactly one of command, fsfreeze, postgresql".into(),
                ));
            }
            if let Some(cmd) = &h.command {
                if cmd.pre.is_none() && cmd.post.is_none() {
                    return Err((
                        format!("coordination.freeze.hooks[{i}].command"),
                        "expected pre, post or both".into(),
                    ));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OK: &str = "
listen: { unix: nbd.sock }
backends:
  - { name: a, plugin: stateless, params: { array: { connect: 'unix:/x' } } }
virtual_lus:
  - { name: db, backend: a, lu: 0, snapshots: [db-snap] }
";

    #[test]
    fn the_backup_examples_parse() {
        for (name, text) in [
            (
                "backup-db-host.yaml",
                include_str!("../examples/backup-db-host.yaml"),
            ),
            (
                "backup-backup-host.yaml",
                include_str!("../examples/backup-backup-host.yaml"),
            ),
        ] {
            let c = Config::parse(text, name).unwrap();
            assert!(c.coordination.is_some(), "{name}");
        }
        let db = Config::parse(include_str!("../examples/backup-db-host.yaml"), "db").unwrap();
        let hooks = &db.coordination.unwrap().freeze.hooks;
        assert!(hooks[0].postgresql.is_some() && hooks[1].fsfreeze.is_some());
    }

    #[test]
    fn coordination_errors() {
        let with = |c: &str| Config::parse(&format!("{OK}coordination:\n{c}"), "c.yaml");
        let base = "  listen: 127.0.0.1:0\n  cert: c\n  key: k\n  token_file: t\n";
        let e = with(&format!("{base}  roles: [backup]\n"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("coordination.backup: the backup role needs"),
            "{e}"
        );
        let e = with(&format!("{base}  roles: []\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("coordination.roles"), "{e}");
        let e = with(&format!("{base}  roles: [database]\n  freeze:\n    hooks:\n      - {{ fsfreeze: /a, command: {{ pre: x }} }}\n"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("coordination.freeze.hooks[0]: expected exactly one"),
            "{e}"
        );
        let e = with(&format!("{base}  roles: [dba]\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown variant `dba`"), "{e}");
        assert!(with(&format!("{base}  roles: [database]\n")).is_ok());
    }

    #[test]
    fn parses() {
        let c = Config::parse(OK, "c.yaml").unwrap();
        assert_eq!(c.virtual_lus[0].snapshots, vec!["db-snap".to_string()]);
        assert_eq!(c.tables.per_tib(), 32 << 20);
        let c = Config::parse(
            &format!("{OK}tables: {{ budget_mib_per_tib: 8 }}\n"),
            "c.yaml",
        );
        assert_eq!(c.unwrap().tables.per_tib(), 8 << 20);
        let c = Config::parse(OK, "c.yaml").unwrap();
        assert_eq!(c.backup_reads, BackupReadsConfig::default());
        let c = Config::parse(&format!("{OK}backup_reads: {{ floor_mib: 0 }}\n"), "c.yaml");
        let b = c.unwrap().backup_reads;
        assert_eq!((b.floor_mib, b.busy_ms), (0, 50));
    }

    #[test]
    fn numbers_are_range_checked_with_field_and_line() {
        for (yaml, field, line) in [
            (
                "journal:\n  compact_mib: 99999999999999\n",
                "journal.compact_mib",
                8,
            ),
            (
                "journal:\n  region_kib: 18446744073709551615\n",
                "journal.region_kib",
                8,
            ),
            (
                "resync:\n  rate_mib: 17592186044416\n",
                "resync.rate_mib",
                8,
            ),
            ("resync: { chunk_kib: 0 }\n", "resync.chunk_kib", 7),
            (
                "tables:\n  budget_mib_per_tib: 0\n",
                "tables.budget_mib_per_tib",
                8,
            ),
            ("resync: { chunk_kib: -1 }\n", "resync.chunk_kib", 7),
            ("backup_reads: { busy_ms: 0 }\n", "backup_reads.busy_ms", 7),
        ] {
            let e = Config::parse(&format!("{OK}{yaml}"), "c.yaml")
                .unwrap_err()
                .to_string();
            assert!(
                e.starts_with(&format!("c.yaml: {field}: ")) && e.contains(&format!("line {line}")),
                "{yaml}: {e}"
            );
        }
        let freeze = "coordination:\n  listen: x\n  cert: c\n  key: k\n  token_file: t\n  roles: [database]\n  freeze:\n    deadline_ms: 18446744073709551615\n";
        let e = Config::parse(&format!("{OK}{freeze}"), "c.yaml")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("coordination.freeze.deadline_ms: 18446744073709551615 is out of range")
                && e.contains("line 14"),
            "{e}"
        );
    }

    #[test]
    fn the_metrics_listener_is_host_and_port() {
        let with = |m: &str| {
            Config::parse(
                &OK.replace("nbd.sock }", &format!("nbd.sock, metrics: {m} }}")),
                "c.yaml",
            )
        };
        assert_eq!(
            with("127.0.0.1:9100").unwrap().listen.metrics.as_deref(),
            Some("127.0.0.1:9100")
        );
        assert!(with("'[::1]:0'").is_ok());
        for bad in ["9100", "localhost:65536", "':9100'", "host:port"] {
            let e = with(bad).unwrap_err().to_string();
            assert!(
                e.starts_with("c.yaml: listen.metrics: ")
                    && e.contains("not HOST:PORT")
                    && e.contains("line 2"),
                "{bad}: {e}"
            );
        }
        assert_eq!(Config::parse(OK, "c.yaml").unwrap().listen.metrics, None);
    }

    #[test]
    fn checks_after_parsing_name_the_line() {
        let text = "listen: { unix: nbd.sock }\nbackends:\n  - name: a\n    plugin: p\n  - name: a\n    plugin: q\n";
        let e = Config::parse(text, "c.yaml").unwrap_err().to_string();
        assert!(
            e.contains("backends[1].name") && e.ends_with("at line 5"),
            "{e}"
        );
        let e = Config::parse(&OK.replace("backend: a", "backend: b"), "c.yaml")
            .unwrap_err()
            .to_string();
        assert!(e.ends_with("at line 6"), "{e}");
        assert_eq!(line_of(text, "backends[0].plugin"), Some(4));
        assert_eq!(line_of(text, "backends[2].name"), None);
    }

    #[test]
    fn errors_name_file_line_and_what() {
        let e = Config::parse(&OK.replace("lu: 0", "lu: zero"), "c.yaml")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("c.yaml: ") && e.contains("line 6"), "{e}");
        let e = Config::parse(&format!("{OK}colour: red\n"), "c.yaml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `colour`"), "{e}");
        let e = Config::parse(&OK.replace("backend: a", "backend: b"), "c.yaml")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("virtual_lus[0].backend: no backend named \"b\""),
            "{e}"
        );
        let e = Config::parse(&OK.replace("[db-snap]", "[db]"), "c.yaml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("used twice"), "{e}");
        let e = Config::parse(&format!("log_level: loud\n{OK}"), "c.yaml")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("unknown variant `loud`") && e.contains("line 1"),
            "{e}"
        );
        let e = Config::parse(
            &OK.replace("lu: 0,", "lu: 0, mirroring: {origin: 1},"),
            "c.yaml",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("virtual_lus[0].mirroring: expected"), "{e}");
        let c = Config::parse(
            &OK.replace("lu: 0,", "lu: 0, mirroring: {origin: 1, mate: 2},"),
            "c.yaml",
        )
        .unwrap();
        assert_eq!(
            c.virtual_lus[0].mirroring.as_ref().unwrap().definition(0),
            Ok(MirrorDefinition::Triple {
                mirror: LuId(0),
                origin: LuId(1),
                mate: LuId(2)
            })
        );
        let c = Config::parse(&format!("log_level: debug\n{OK}"), "c.yaml").unwrap();
        assert_eq!(c.log_level, LogLevel::Debug);
    }
}
