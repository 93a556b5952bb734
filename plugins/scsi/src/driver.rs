//! What the three array drivers share: their parameters and how they reach an array.
//!
//! A driver's parameters (the `params` of a backend in host-agent's config) name one
//! array, or, for the stateless driver, volumes whose legs are LUNs:
//!
//! ```yaml
//! array:
//!   embedded: { kind: stateless, dir: ..., disks: [...], lus: [...], mirroring: [...] }
//!   # or  connect: "unix:/run/array.sock"          (an array-sim daemon; or tcp:HOST:PORT)
//!   # or  iscsi: "iscsi://127.0.0.1:3260/iqn.2026-12.example:array0/1"
//! timeout: 30        # seconds a command may take (default 30); then EIO and a reconnect
//! initiator: iqn...  # iSCSI initiator name (default iqn.2026-12.invalid.hvm:host-agent)
//! # stateless driver only, instead of `array`:
//! volumes:
//!   - { lu: 0, legs: ["iscsi://127.0.0.1:3260/IQN/1", "iscsi://127.0.0.1:3260/IQN/2"] }
//! ```
//!
//! `embedded` runs array-sim in the host's process; only a plugin built with its
//! `embedded` feature (on by default) has it. The plugin names the embedded config's type
//! ([`Embed`]: array-sim's `ArrayConfig`, or [`NotEmbedded`]), so the whole text is
//! parsed once, into typed parameters, and this crate does not depend on the simulator.
//! A relative embedded `dir` is taken relative to `state_dir`, which host-agent adds to
//! every plugin's parameters.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hvm_legs::{Mirrored, VolumeSpec};
use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::client::ArrayClient;
use crate::leg::{LunArray, ScsiLeg};
use crate::socket::{Address, SocketClient, DEFAULT_TIMEOUT};
use crate::transport::Transport;

/// A driver's parameters; `E` is the embedded array's config (see [`Embed`]).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, bound = "E: Embed")]
pub struct Params<E> {
    #[serde(default)]
    pub array: Option<ArraySpec<E>>,
    #[serde(default)]
    pub volumes: Option<Vec<VolumeSpec>>,
    /// Seconds a command may go unanswered.
    #[serde(default)]
    pub timeout: Option<f64>,
    #[serde(default)]
    pub initiator: Option<String>,
    #[serde(default)]
    pub state_dir: Option<PathBuf>,
}

/// Exactly one of the three. (A struct, not an enum: serde_yaml reads enums as YAML tags,
/// and `array: {embedded: ...}` is what an operator writes.)
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, bound = "E: Embed")]
pub struct ArraySpec<E> {
    #[serde(default)]
    pub embedded: Option<E>,
    #[serde(default)]
    pub connect: Option<String>,
    #[serde(default)]
    pub iscsi: Option<String>,
}

/// A driver's connection to its array.
pub type Array = ArrayClient<Box<dyn Transport>>;

/// The config of an embedded array, parsed with the rest of the parameters, and how to
/// build the array from it: array-sim's engine (its `ArrayConfig`), when the plugin has
/// it. A relative path in it is taken relative to `state_dir`.
pub trait Embed: DeserializeOwned + std::fmt::Debug {
    fn open(&self, state_dir: Option<&Path>) -> Result<Box<dyn Transport>, String>;
}

/// The embedded config of a plugin built without the `embedded` feature: any value is
/// read past, and refused when the array is opened.
pub type NotEmbedded = serde::de::IgnoredAny;

impl Embed for NotEmbedded {
    fn open(&self, _: Option<&Path>) -> Result<Box<dyn Transport>, String> {
        Err("driver parameters: array.embedded: this plugin was built without the `embedded` transport (array-sim)".into())
    }
}

impl<E: Embed> Params<E> {
    /// The parameters' text, parsed once, the embedded array's config with them (serde's
    /// message names the field's path and line).
    pub fn parse(text: &str) -> Result<Params<E>, String> {
        serde_yaml::from_str(text).map_err(|e| format!("driver parameters: {e}"))
    }
}

impl<E> Params<E> {
    pub fn timeout(&self) -> Result<Duration, String> {
        match self.timeout {
            None => Ok(DEFAULT_TIMEOUT),
            Some(s) if s > 0.0 && s.is_finite() => Ok(Duration::from_secs_f64(s)),
            Some(s) => Err(format!(
                "driver parameters: timeout: {s} is not a positive number of seconds"
            )),
        }
    }

    #[cfg(feature = "iscsi")]
    fn iscsi_options(&self) -> Result<crate::iscsi::IscsiOptions, String> {
        let mut o = crate::iscsi::IscsiOptions {
            timeout: self.timeout()?,
            ..Default::default()
        };
        if let Some(i) = &self.initiator {
            o.initiator = i.clone();
        }
        Ok(o)
    }
}

/// The three kinds of array of EP 1 148 416, as an opened array shows itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ArrayKind {
    /// Fig. 2: the array keeps each LU's mode (E1).
    ModeSelect,
    /// Fig. 9: no snapshot state in the array (E2).
    Stateless,
    /// Fig. 14: a mirroring LU with a read-only mate and pre-update data (E4).
    PreUpdate,
}

impl ArrayKind {
    pub fn name(self) -> &'static str {
        match self {
            ArrayKind::ModeSelect => "mode-select",
            ArrayKind::Stateless => "stateless",
            ArrayKind::PreUpdate => "pre-update",
        }
    }

    /// The kind whose functions `caps` (from `Backend::describe`) offer.
    pub fn of(caps: &hvm_core::backend::Capabilities) -> ArrayKind {
        if caps.mode_select {
            ArrayKind::ModeSelect
        } else if caps.read_only_mate {
            ArrayKind::PreUpdate
        } else {
            ArrayKind::Stateless
        }
    }
}

/// Refuse an array that is not of the kind `expect` this driver drives.
pub fn check_kind(array: &Array, expect: ArrayKind, at: &str) -> Result<(), String> {
    use hvm_core::backend::Backend;
    let found = ArrayKind::of(
        &array
            .describe()
            .map_err(|e| format!("{at}: {e}"))?
            .capabilities,
    );
    if found != expect {
        return Err(format!(
            "this is the {} driver, but {at} is of kind {}",
            expect.name(),
            found.name()
        ));
    }
    Ok(())
}

/// Where the array of `spec` is, for messages.
pub fn location<E>(spec: &ArraySpec<E>) -> String {
    match (&spec.embedded, &spec.connect, &spec.iscsi) {
        (Some(_), _, _) => "the embedded array".into(),
        (_, Some(a), _) => a.clone(),
        (_, _, Some(u)) => u.clone(),
        _ => "no array".into(),
    }
}

/// Reach the array `p.array` names. Also returns the LUN an `iscsi:` URL names.
pub fn open_array<E: Embed>(p: &Params<E>) -> Result<(Array, Option<u8>), String> {
    let Some(spec) = &p.array else {
        return Err("driver parameters: `array` is missing".into());
    };
    match (&spec.embedded, &spec.connect, &spec.iscsi) {
        (Some(cfg), None, None) => Ok((
            ArrayClient::new(cfg.open(p.state_dir.as_deref())?),
            None,
        )),
        (None, Some(addr), None) => {
            let addr: Address = addr.parse()?;
            let t = SocketClient::connect_with_timeout(&addr, p.timeout()?)
                .map_err(|e| format!("cannot connect to the array at {addr}: {e}"))?;
            Ok((ArrayClient::new(Box::new(t)), None))
        }
        (None, None, Some(url)) => {
            let (t, lun) = iscsi_transport(p, url)?;
            Ok((ArrayClient::new(Box::new(t)), Some(lun)))
        }
        _ => Err("driver parameters: array: give exactly one of `embedded` (an array-sim config), `connect` (unix:PATH or tcp:HOST:PORT) and `iscsi` (iscsi://HOST[:PORT]/IQN/LUN)".into()),
    }
}

#[cfg(feature = "iscsi")]
fn iscsi_transport<E>(
    p: &Params<E>,
    url: &str,
) -> Result<(crate::iscsi::IscsiTransport, u8), String> {
    let u: crate::iscsi::IscsiUrl = url.parse()?;
    let t = crate::iscsi::IscsiTransport::connect(&u, &p.iscsi_options()?)
        .map_err(|e| format!("{u}: {e}"))?;
    Ok((t, u.lun))
}

#[cfg(not(feature = "iscsi"))]
fn iscsi_transport<E>(_: &Params<E>, url: &str) -> Result<(Box<dyn Transport>, u8), String> {
    Err(format!(
        "{url}: this plugin was built without the iSCSI transport (feature `iscsi`)"
    ))
}

/// The stateless array of `p.volumes`, each leg a LUN named by URL (`iscsi://...`);
/// legs on one target share its session.
pub fn open_volumes<E>(p: &Params<E>) -> Result<LunArray, String> {
    let Some(vols) = &p.volumes else {
        return Err("driver parameters: `volumes` is missing".into());
    };
    let mut sessions: HashMap<(String, String), Arc<dyn Transport>> = HashMap::new();
    let mut volumes = Vec::with_capacity(vols.len());
    for v in vols {
        let [a, b] = v.leg_names()?;
        let a = open_leg(p, a, &mut sessions)?;
        let b = open_leg(p, b, &mut sessions)?;
        volumes.push((v.lu, a, b, v.size.map(|s| s.0)));
    }
    Mirrored::new(volumes).map(LunArray)
}

#[cfg(feature = "iscsi")]
fn open_leg<E>(
    p: &Params<E>,
    name: &str,
    sessions: &mut HashMap<(String, String), Arc<dyn Transport>>,
) -> Result<ScsiLeg, String> {
    let u: crate::iscsi::IscsiUrl = name.parse()?;
    let t = match sessions.get(&u.session_key()) {
        Some(t) => t.clone(),
        None => {
            let t: Arc<dyn Transport> = Arc::new(
                crate::iscsi::IscsiTransport::connect(&u, &p.iscsi_options()?)
                    .map_err(|e| format!("{u}: {e}"))?,
            );
            sessions.insert(u.session_key(), t.clone());
            t
        }
    };
    ScsiLeg::open(t, u.lun, &u.to_string())
}

#[cfg(not(feature = "iscsi"))]
fn open_leg<E>(
    _: &Params<E>,
    name: &str,
    _: &mut HashMap<(String, String), Arc<dyn Transport>>,
) -> Result<ScsiLeg, String> {
    Err(format!(
        "{name}: this plugin was built without the iSCSI transport (feature `iscsi`)"
    ))
}
