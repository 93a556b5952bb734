//! What the array drivers share: their parameters and how they reach the array.
//!
//! A driver's parameters (the `params` of a backend in host-agent's config) are YAML:
//!
//! ```yaml
//! array:
//!   embedded:            # run the array in this process
//!     kind: stateless
//!     dir: /var/lib/hvm/array0
//!     disks: [...]
//!     lus: [...]
//!     mirroring: [...]
//! ```
//!
//! or `array: { connect: "unix:/run/array.sock" }` (or `tcp:HOST:PORT`) to drive an
//! `array-sim serve` daemon. A relative embedded `dir` is taken relative to `state_dir`,
//! which host-agent adds to every plugin's parameters.

use std::sync::Arc;

use hvm_core::backend::Backend;
use serde::Deserialize;

use crate::client::{ArrayClient, SocketClient, Transport};
use crate::config::{ArrayConfig, FirmwareKind};
use crate::engine::Engine;
use hvm_scsi::Address;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    array: ArraySpec,
    #[serde(default)]
    state_dir: Option<std::path::PathBuf>,
}

/// Exactly one of the two. (A struct, not an enum: serde_yaml reads enums as YAML tags,
/// and `array: {embedded: ...}` is what an operator writes.)
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ArraySpec {
    #[serde(default)]
    embedded: Option<serde_yaml::Value>,
    #[serde(default)]
    connect: Option<String>,
}

/// A driver's connection to its array.
pub type Array = ArrayClient<Box<dyn Transport>>;

fn kind_name(k: FirmwareKind) -> &'static str {
    match k {
        FirmwareKind::ModeSelect => "mode-select",
        FirmwareKind::Stateless => "stateless",
        FirmwareKind::PreUpdate => "pre-update",
    }
}

/// Reach the array `params` describe, and check it is of the kind this driver drives.
pub fn open(params: &str, expect: FirmwareKind) -> Result<Array, String> {
    let p: Params = serde_yaml::from_str(params).map_err(|e| format!("driver parameters: {e}"))?;
    match (p.array.embedded, p.array.connect) {
        (Some(_), Some(_)) | (None, None) => Err(
            "driver parameters: array: give exactly one of `embedded` (an array-sim config) and `connect` (unix:PATH or tcp:HOST:PORT)".into(),
        ),
        (Some(value), None) => {
            let text = serde_yaml::to_string(&value).map_err(|e| e.to_string())?;
            let mut cfg =
                ArrayConfig::parse(&text, "array.embedded").map_err(|e| e.to_string())?;
            if let (Some(dir), Some(base)) = (&cfg.dir, &p.state_dir) {
                if dir.is_relative() {
                    cfg.dir = Some(base.join(dir));
                }
            }
            if cfg.kind != expect {
                return Err(format!(
                    "this is the {} driver, but the embedded array is of kind {}",
                    kind_name(expect),
                    kind_name(cfg.kind)
                ));
            }
            let engine = Engine::open(&cfg, None).map_err(|e| e.to_string())?;
            Ok(ArrayClient::new(Box::new(Arc::new(engine))))
        }
        (None, Some(addr)) => {
            let addr: Address = addr.parse()?;
            let client = SocketClient::connect(&addr)
                .map_err(|e| format!("cannot connect to the array at {addr}: {e}"))?;
            let array: Array = ArrayClient::new(Box::new(client));
            let caps = array.describe().map_err(|e| e.to_string())?.capabilities;
            let found = if caps.mode_select {
                FirmwareKind::ModeSelect
            } else if caps.virtual_lu_forming {
                FirmwareKind::Stateless
            } else {
                FirmwareKind::PreUpdate
            };
            if found != expect {
                return Err(format!(
                    "this is the {} driver, but the array at {addr} is of kind {}",
                    kind_name(expect),
                    kind_name(found)
                ));
            }
            Ok(array)
        }
    }
}
