//! Reloading the config on SIGHUP (or `POST /v1/reload`): what may change while serving.
//!
//! Applied live:
//! - `log_level` (unless `--log-level` or `RUST_LOG` overrides it);
//! - `resync.rate_mib` and `resync.chunk_kib` (a rate set through the control API stays
//!   until the file's value changes);
//! - a virtual LU's `allow_uids` and `allow_gids`, for new connections (connections
//!   already open keep their export), and `read_only`, which from then on also refuses
//!   writes on open connections.
//!
//! Everything else needs a restart: the state, plugin and runtime directories, the
//! journal settings, the listening sockets, the backends, and which virtual LUs exist and
//! how they map onto the array (`backend`, `lu`, `mirroring`, `snapshots`, `save_area`).
//! Those changes are reported, by config path, and not applied; the service keeps running
//! on what it has. A file that does not parse changes nothing and is reported with its
//! line.

use crate::config::{Config, LogLevel, VirtualLuConfig};
use crate::exports::Access;

/// One change the service can make while serving.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Live {
    LogLevel(LogLevel),
    /// Bytes per second; 0: unlimited.
    ResyncRate(u64),
    ResyncChunk(u64),
    /// New access rules for these exports (a virtual LU and its snapshots).
    Access {
        vlu: String,
        exports: Vec<String>,
        access: Access,
    },
}

impl Live {
    /// The config path this change comes from, as reported.
    pub fn path(&self) -> String {
        match self {
            Live::LogLevel(_) => "log_level".into(),
            Live::ResyncRate(_) => "resync.rate_mib".into(),
            Live::ResyncChunk(_) => "resync.chunk_kib".into(),
            Live::Access { vlu, .. } => format!("virtual_lus[{vlu}].access"),
        }
    }
}

/// What a new config changes relative to the one in effect.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub live: Vec<Live>,
    /// Config paths whose changes need a restart.
    pub restart: Vec<String>,
}

fn access(v: &VirtualLuConfig) -> Access {
    Access {
        uids: v.allow_uids.clone(),
        gids: v.allow_gids.clone(),
        read_only: v.read_only,
    }
}

/// Compare the config in effect with a new one.
pub fn plan(old: &Config, new: &Config) -> Plan {
    let mut p = Plan::default();
    settings(old, new, &mut p);
    backends(old, new, &mut p);
    virtual_lus(old, new, &mut p);
    live_settings(old, new, &mut p);
    p
}

/// Top-level settings that need a restart.
fn settings(old: &Config, new: &Config, p: &mut Plan) {
    let fields = [
        ("state_dir", old.state_dir != new.state_dir),
        ("plugin_dir", old.plugin_dir != new.plugin_dir),
        ("runtime_dir", old.runtime_dir != new.runtime_dir),
        ("control_group", old.control_group != new.control_group),
        ("tables", old.tables != new.tables),
        ("backup_reads", old.backup_reads != new.backup_reads),
        ("journal", old.journal != new.journal),
        ("listen", old.listen != new.listen),
        ("coordination", old.coordination != new.coordination),
    ];
    for (f, changed) in fields {
        if changed {
            p.restart.push(f.to_string());
        }
    }
}

/// The log level and the resync's pace change live.
fn live_settings(old: &Config, new: &Config, p: &mut Plan) {
    if old.log_level != new.log_level {
        p.live.push(Live::LogLevel(new.log_level));
    }
    if old.resync.rate_mib != new.resync.rate_mib {
        p.live.push(Live::ResyncRate(new.resync.rate_mib << 20));
    }
    if old.resync.chunk_kib != new.resync.chunk_kib {
        p.live.push(Live::ResyncChunk(new.resync.chunk_kib << 10));
    }
}

/// Backends added, removed or changed: all restart-time.
fn backends(old: &Config, new: &Config, p: &mut Plan) {
    for b in &old.backends {
        match new.backends.iter().find(|n| n.name == b.name) {
            None => p.restart.push(format!("backends[{}] (removed)", b.name)),
            Some(n) if n != b => p.restart.push(format!("backends[{}]", b.name)),
            Some(_) => {}
        }
    }
    for n in &new.backends {
        if !old.backends.iter().any(|b| b.name == n.name) {
            p.restart.push(format!("backends[{}] (added)", n.name));
        }
    }
}

/// Virtual LUs: their place and exports need a restart, their access is live.
fn virtual_lus(old: &Config, new: &Config, p: &mut Plan) {
    for v in &old.virtual_lus {
        let Some(n) = new.virtual_lus.iter().find(|n| n.name == v.name) else {
            p.restart.push(format!("virtual_lus[{}] (removed)", v.name));
            continue;
        };
        virtual_lu(v, n, p);
    }
    for n in &new.virtual_lus {
        if !old.virtual_lus.iter().any(|v| v.name == n.name) {
            p.restart.push(format!("virtual_lus[{}] (added)", n.name));
        }
    }
    // Virtual LU ids follow the order of the list within a backend, and the journal is
    // keyed by them, so an order change is a restart-time change too.
    let order = |c: &Config| {
        c.virtual_lus
            .iter()
            .map(|v| v.name.clone())
            .collect::<Vec<_>>()
    };
    let (mut a, mut b) = (order(old), order(new));
    a.retain(|x| b.contains(x));
    b.retain(|x| a.contains(x));
    if a != b {
        p.restart.push("virtual_lus (order)".into());
    }
}

/// One virtual LU in both configs.
fn virtual_lu(v: &VirtualLuConfig, n: &VirtualLuConfig, p: &mut Plan) {
    let fields = [
        ("backend", v.backend != n.backend),
        ("lu", v.lu != n.lu),
        ("mirroring", v.mirroring != n.mirroring),
        ("snapshots", v.snapshots != n.snapshots),
        ("save_area", v.save_area != n.save_area),
    ];
    for (f, changed) in fields {
        if changed {
            p.restart.push(format!("virtual_lus[{}].{f}", v.name));
        }
    }
    if access(v) != access(n) {
        p.live.push(Live::Access {
            vlu: v.name.clone(),
            exports: std::iter::once(&v.name)
                .chain(&v.snapshots)
                .cloned()
                .collect(),
            access: access(n),
        });
    }
}

/// `old` with the live changes of `new` taken over: the config in effect after a reload
/// that applied them. Restart-only changes stay pending, so each later reload reports
/// them again.
pub fn effective(old: &Config, new: &Config) -> Config {
    let mut e = old.clone();
    e.log_level = new.log_level;
    e.resync = new.resync;
    for v in &mut e.virtual_lus {
        if let Some(n) = new.virtual_lus.iter().find(|n| n.name == v.name) {
            v.read_only = n.read_only;
            v.allow_uids = n.allow_uids.clone();
            v.allow_gids = n.allow_gids.clone();
        }
    }
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "
listen: { unix: nbd.sock }
backends:
  - { name: a, plugin: stateless, params: { array: { connect: 'unix:/x' } } }
virtual_lus:
  - { name: db, backend: a, lu: 0, snapshots: [db-snap] }
  - { name: logs, backend: a, lu: 3, snapshots: [logs-snap] }
";

    fn cfg(text: &str) -> Config {
        Config::parse(text, "c.yaml").unwrap()
    }

    #[test]
    fn nothing_changed_is_an_empty_plan() {
        assert_eq!(plan(&cfg(BASE), &cfg(BASE)), Plan::default());
    }

    #[test]
    fn control_group_and_table_budget_need_a_restart() {
        let new = cfg(&format!(
            "control_group: hvm\ntables: {{ budget_mib_per_tib: 64 }}\n{BASE}"
        ));
        let p = plan(&cfg(BASE), &new);
        assert_eq!(p.restart, ["control_group", "tables"]);
        assert!(p.live.is_empty());
    }

    #[test]
    fn live_changes() {
        let new = cfg(&format!(
            "log_level: debug\nresync: {{ rate_mib: 8, chunk_kib: 256 }}\n{}",
            BASE.replace(
                "lu: 3, snapshots: [logs-snap]",
                "lu: 3, snapshots: [logs-snap], allow_uids: [7], read_only: true"
            )
        ));
        let p = plan(&cfg(BASE), &new);
        assert!(p.restart.is_empty(), "{p:?}");
        assert_eq!(
            p.live,
            vec![
                Live::Access {
                    vlu: "logs".into(),
                    exports: vec!["logs".into(), "logs-snap".into()],
                    access: Access {
                        uids: vec![7],
                        gids: vec![],
                        read_only: true
                    }
                },
                Live::LogLevel(LogLevel::Debug),
                Live::ResyncRate(8 << 20),
                Live::ResyncChunk(256 << 10),
            ]
        );
        let e = effective(&cfg(BASE), &new);
        assert_eq!(plan(&e, &new), Plan::default());
    }

    #[test]
    fn restart_changes_are_named_and_stay_pending() {
        let new = cfg(&BASE
            .replace("connect: 'unix:/x'", "connect: 'unix:/y'")
            .replace("lu: 3, snapshots: [logs-snap]", "lu: 4, snapshots: [l2]")
            .replace("unix: nbd.sock", "unix: other.sock")
            .replace(
                "  - { name: db,",
                "  - { name: new, backend: a, lu: 9, snapshots: [] }\n  - { name: db,",
            ));
        let p = plan(&cfg(BASE), &new);
        assert!(p.live.is_empty(), "{p:?}");
        assert_eq!(
            p.restart,
            vec![
                "listen",
                "backends[a]",
                "virtual_lus[logs].lu",
                "virtual_lus[logs].snapshots",
                "virtual_lus[new] (added)",
            ]
        );
        let e = effective(&cfg(BASE), &new);
        assert_eq!(plan(&e, &new).restart, p.restart);
    }

    #[test]
    fn reordering_virtual_lus_needs_a_restart() {
        let swapped = BASE.replace(
            "  - { name: db, backend: a, lu: 0, snapshots: [db-snap] }\n",
            "",
        ) + "  - { name: db, backend: a, lu: 0, snapshots: [db-snap] }\n";
        let p = plan(&cfg(BASE), &cfg(&swapped));
        assert_eq!(p.restart, vec!["virtual_lus (order)"]);
    }
}
