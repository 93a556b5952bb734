//! hvm host-agent: the service that loads backend plugins, serves virtual LUs over NBD,
//! persists hvm-core's tables and coordinates online backups.
//!
//! - [`config`]: the YAML config; [`agent`]: builds a configured [`host::Host`] (its
//!   backends, managers and virtual LUs), the state the handlers borrow; [`service`]: the
//!   composition root that binds the listeners and serves a host; [`exports`]: virtual
//!   LUs as NBD exports; [`nbd`]: the NBD server;
//!   [`control`]: the control API; [`ctl`]: its client side, for hvmctl.
//! - [`coord`]: backup coordination across hosts (`hvmctl backup run`), agent to agent
//!   over TLS; [`gate`]: the write gate behind a consistency group's instant.
//! - [`demo`]: `hvmctl demo`, the whole online backup against a real host-agent.
//! - [`durable`]: the tables' journal files, with group commit and activity regions;
//!   [`resync`]: the resync service.
//! - [`reload`]: what a SIGHUP may change live; [`notify`]: systemd's sd_notify.
//! - [`files`]: whole-file writes a crash leaves old or new (repository objects,
//!   placement, policy state).
//! - [`plugin_check`]: the `host-agent plugin check` report.

pub mod agent;
pub mod backups;
pub mod config;
pub mod control;
pub mod coord;
pub mod ctl;
pub mod demo;
pub mod docs;
pub mod durable;
pub mod exports;
pub mod files;
pub mod gate;
pub mod host;
pub mod metrics;
pub mod moves;
pub mod nbd;
pub mod notify;
// issue 22: EP 1 058 190 pairs as mirroring definitions for virtual LUs.
pub mod pairs;
pub mod policy;
pub mod reload;
pub mod resync;
pub mod service;

use hvm_plugin_abi::host::Plugin;
use hvm_plugin_abi::ThreadModel;

/// The report `host-agent plugin check` prints for a loadable plugin.
pub fn plugin_check(plugin: &Plugin) -> String {
    let c = plugin.capabilities;
    let caps: Vec<&str> = [
        (c.mode_select, "mode-select"),
        (c.virtual_lu_forming, "virtual-lu-forming"),
        (c.read_only_mate, "read-only-mate"),
        (c.array_copy, "array-copy"),
        (c.fua, "fua"),
    ]
    .iter()
    .filter(|(on, _)| *on)
    .map(|(_, n)| *n)
    .collect();
    format!(
        "plugin:       {}\nversion:      {}\nfile:         {}\ninterface:    hvm_plugin {}\ncapabilities: {}\nthread model: {}\n",
        plugin.name,
        plugin.version,
        plugin.path.display(),
        if plugin.interface == Plugin::interface_version() {
            plugin.interface.clone()
        } else {
            format!(
                "{} (this host's is {}; no array-side backup functions)",
                plugin.interface,
                Plugin::interface_version()
            )
        },
        if caps.is_empty() { "none".into() } else { caps.join(", ") },
        match plugin.thread_model {
            ThreadModel::Parallel => "parallel",
            ThreadModel::SerializeAll => "serialize-all",
        }
    )
}
