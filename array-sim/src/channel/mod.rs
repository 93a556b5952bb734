//! Channel paths between arrays, and the array's channel port (EP 1 058 190's fourth
//! embodiment, Fig. 8, [0053]-[0057]).
//!
//! An array with backup functions has a *channel port* besides its host port (`array-sim
//! serve --channel-listen ADDR`): the port other arrays and copy agents (the switch of
//! [0059], the backup device of [0060], see [`crate::switch`]) use. Hosts use the host
//! port; the array counts the bytes of each port apart, so a test can show who read what.
//!
//! A *channel path* is configured on both arrays it joins:
//!
//! ```yaml
//! channel:
//!   name: a                  # this array's name on its paths
//!   paths:
//!     - { name: to-b, peer: b, address: unix:/run/b-channel.sock }  # b's channel port
//! ```
//!
//! Array `a` sends the updates of a remote pair's user volume over the path (see
//! [`crate::remote`]); array `b` accepts a remote pair only from a peer it has a path
//! to. On `b` the secondary volume is *attached*: hosts cannot write it, the updates
//! from `a` reach it (and, when it is the user volume of a local pair, that pair's
//! secondary too: the triplex of [0058]), and once `a` splits the pair it is frozen and a
//! CCOPY may copy it to a backup device ([0057]).
//!
//! Over the channel port the commands are READ(16), READ CAPACITY(16), and the vendor
//! C3h command carrying either a binary update (`RWR1`, LBA, data) or a JSON
//! [`PortOp`] or the array's own backup operations (`hvm_core::array_backup::BackupOp`,
//! which the switch of [0059] uses to split and resync). Hosts reach the functions of
//! this module with JSON [`ChannelOp`]s on the host port (see [`ChannelClient`]).

pub mod remote;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use hvm_core::array_backup::{Area, BackupOp, BackupReply};
use hvm_core::backend::{BackendError, BackendErrorKind};
use hvm_scsi::socket::{Address, SocketLink};
use hvm_scsi::Transport;
use serde::{Deserialize, Serialize};

use crate::backup::{Firmware, Refusal};
use crate::config::{ChannelConfig, PathConfig};
use crate::geometry::{BLOCK_SIZE, MAX_TRANSFER_BLOCKS};
use crate::outcome::{EngineCounters, Outcome, Response};
use crate::scsi::{self, Command, Sense, CHECK_CONDITION};
use crate::store::Store;
use hvm_scsi::client::ArrayClient;
use remote::{RemotePair, RemotePairStatus};

/// A host's operation on the channel functions (JSON on the host port's C3h command).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum ChannelOp {
    /// Pair user volume `primary` of this array with LU `secondary` of the array at the
    /// other end of `path`, and start the initial copy over the path.
    RemotePairCreate {
        primary: u32,
        path: String,
        secondary: u32,
    },
    RemotePairSplit {
        lu: u32,
    },
    /// Copy the units marked since the split or suspension over the path ([0031]).
    RemotePairResync {
        lu: u32,
    },
    RemotePairDelete {
        lu: u32,
    },
    /// A remote pair, seen from its user volume here or its secondary here.
    RemotePairStatus {
        lu: u32,
    },
    /// [0037]-[0040] over the path: split, have the other array copy the secondary to its
    /// backup device, resync when the copy ends. The answer is the other array's job.
    RemoteAuto {
        lu: u32,
        device: String,
        ranges: Vec<Area>,
    },
    /// Cut a path (as a broken link would) or restore it.
    PathDisable {
        path: String,
    },
    PathEnable {
        path: String,
    },
    Paths,
    PortCounters,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "kebab-case")]
pub enum ChannelReply {
    Done,
    Started { job: u32 },
    RemotePair(RemotePairStatus),
    Paths { paths: Vec<PathStatus> },
    Counters(PortCounters),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PathStatus {
    pub name: String,
    pub peer: String,
    pub address: String,
    pub enabled: bool,
    pub connected: bool,
    /// Bytes of updates and copies sent over the path.
    pub sent_bytes: u64,
    pub failures: u64,
}

/// Bytes through the channel port, apart from the host port's.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortCounters {
    /// Bytes read through the channel port (by copy agents).
    pub port_read_bytes: u64,
    /// Bytes of updates received from other arrays.
    pub port_write_bytes: u64,
    /// Bytes this array sent over its paths.
    pub path_sent_bytes: u64,
}

/// What an array sends over a path (JSON on the peer's channel port).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum PortOp {
    Attach {
        from: String,
        primary: u32,
        lu: u32,
        blocks: u64,
    },
    Detach {
        from: String,
        lu: u32,
    },
    Freeze {
        from: String,
        lu: u32,
        frozen: bool,
    },
    Ccopy {
        from: String,
        lu: u32,
        device: String,
        ranges: Vec<Area>,
    },
    Job {
        id: u32,
    },
}

/// The first bytes of a binary update on the channel port.
pub const UPDATE_MAGIC: &[u8; 4] = b"RWR1";

/// The host-side client of [`ChannelOp`]s.
pub trait ChannelClient {
    fn channel(&self, op: &ChannelOp) -> Result<ChannelReply, BackendError>;
}

impl<T: Transport> ChannelClient for ArrayClient<T> {
    fn channel(&self, op: &ChannelOp) -> Result<ChannelReply, BackendError> {
        json_command(self, op)
    }
}

/// Send `op` as JSON in a C3h command to LUN 0 and parse the JSON answer.
pub fn json_command<T: Transport, O: Serialize, R: serde::de::DeserializeOwned>(
    c: &ArrayClient<T>,
    op: &O,
) -> Result<R, BackendError> {
    let data = serde_json::to_vec(op)
        .map_err(|e| BackendError::new(BackendErrorKind::Io, e.to_string()))?;
    let cmd = Command::Backup {
        param_len: data.len() as u32,
    };
    let reply = c.command(0, cmd, &data)?;
    serde_json::from_slice(&reply)
        .map_err(|e| BackendError::new(BackendErrorKind::Io, format!("a malformed answer: {e}")))
}

/// A refusal with its reason.
pub(crate) fn refuse(sense: Sense, message: impl Into<String>) -> Refusal {
    Refusal {
        sense,
        message: message.into(),
    }
}

pub(crate) fn state_err(m: impl Into<String>) -> Refusal {
    refuse(Sense::BACKUP_STATE, m)
}

pub(crate) fn param_err(m: impl Into<String>) -> Refusal {
    refuse(Sense::BACKUP_PARAMETERS, m)
}

/// The sending end of one channel path.
pub(crate) struct Link {
    pub(crate) name: String,
    pub(crate) peer: String,
    address: Address,
    enabled: AtomicBool,
    conn: Mutex<Option<Arc<SocketLink>>>,
    sent: AtomicU64,
    failures: AtomicU64,
}

/// How long the peer may take to answer one command over a path.
const PATH_TIMEOUT: Duration = Duration::from_secs(10);

impl Link {
    fn new(p: &PathConfig) -> Result<Link, String> {
        Ok(Link {
            name: p.name.clone(),
            peer: p.peer.clone(),
            address: p
                .address
                .parse()
                .map_err(|e| format!("{}: {e}", p.address))?,
            enabled: AtomicBool::new(true),
            conn: Mutex::new(None),
            sent: AtomicU64::new(0),
            failures: AtomicU64::new(0),
        })
    }

    pub(crate) fn enabled(&self) -> bool {
        self.enabled.load(Ordering::SeqCst)
    }

    fn connection(&self) -> Result<Arc<SocketLink>, String> {
        let mut c = self.conn.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(l) = &*c {
            return Ok(l.clone());
        }
        let l = Arc::new(
            SocketLink::connect(&self.address, PATH_TIMEOUT).map_err(|e| {
                format!(
                    "path {} to array {}: cannot connect to {}: {e}",
                    self.name, self.peer, self.address
                )
            })?,
        );
        *c = Some(l.clone());
        Ok(l)
    }

    /// One C3h command over the path: its data-in, or why it failed.
    fn call(&self, lun: u8, data: &[u8]) -> Result<Vec<u8>, String> {
        if !self.enabled() {
            return Err(format!(
                "path {} to array {} is disabled",
                self.name, self.peer
            ));
        }
        let r = self.connection().and_then(|l| {
            let cmd = Command::Backup {
                param_len: data.len() as u32,
            };
            l.execute(lun, &cmd.encode(), data).map_err(|e| {
                *self.conn.lock().unwrap_or_else(PoisonError::into_inner) = None;
                format!("path {} to array {}: {e}", self.name, self.peer)
            })
        });
        let r = r.and_then(|resp| {
            if resp.status == scsi::GOOD {
                Ok(resp.data)
            } else {
                Err(format!(
                    "array {} refused: {}",
                    self.peer,
                    String::from_utf8_lossy(&resp.data)
                ))
            }
        });
        if r.is_err() {
            self.failures.fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    /// Send an update of `lun` (at the peer) over the path.
    pub(crate) fn write(&self, lun: u8, lba: u64, data: &[u8]) -> Result<(), String> {
        let mut msg = Vec::with_capacity(12 + data.len());
        msg.extend_from_slice(UPDATE_MAGIC);
        msg.extend_from_slice(&lba.to_le_bytes());
        msg.extend_from_slice(data);
        self.call(lun, &msg)?;
        self.sent.fetch_add(data.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    pub(crate) fn op(&self, op: &PortOp) -> Result<BackupReply, String> {
        let data = serde_json::to_vec(op).map_err(|e| e.to_string())?;
        let reply = self.call(0, &data)?;
        serde_json::from_slice(&reply)
            .map_err(|e| format!("array {}: a malformed answer: {e}", self.peer))
    }

    fn status(&self) -> PathStatus {
        PathStatus {
            name: self.name.clone(),
            peer: self.peer.clone(),
            address: self.address.to_string(),
            enabled: self.enabled(),
            connected: self
                .conn
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .is_some(),
            sent_bytes: self.sent.load(Ordering::Relaxed),
            failures: self.failures.load(Ordering::Relaxed),
        }
    }
}

/// A secondary volume here of a remote pair whose user volume is in another array.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Attached {
    pub(crate) from: String,
    pub(crate) primary: u32,
    /// Split by the other array: CCOPY may copy it.
    pub(crate) frozen: bool,
}

#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) port_read: AtomicU64,
    pub(crate) port_write: AtomicU64,
}

/// The channel functions of one array.
pub struct Channel {
    pub(crate) name: String,
    /// Blocks per bit of the difference bitmaps.
    pub(crate) n: u64,
    pub(crate) dir: PathBuf,
    pub(crate) plain: BTreeMap<u8, u64>,
    pub(crate) store: Arc<Store>,
    pub(crate) fw: Arc<Firmware>,
    pub(crate) links: BTreeMap<String, Arc<Link>>,
    /// Remote pairs whose user volume is here.
    pub(crate) pairs: Mutex<Vec<RemotePair>>,
    /// Secondaries here of remote pairs.
    attached: Mutex<BTreeMap<u8, Attached>>,
    /// Whether any LU here is in a remote pair (the write path's fast test).
    active: AtomicBool,
    pub(crate) counters: Counters,
}

impl std::fmt::Debug for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Channel")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

const ATTACHED_FILE: &str = "remote-secondaries";

impl Channel {
    pub(crate) fn open(
        cfg: Option<&ChannelConfig>,
        n: u64,
        dir: &Path,
        plain: BTreeMap<u8, u64>,
        store: Arc<Store>,
        fw: Arc<Firmware>,
    ) -> Result<Arc<Channel>, String> {
        let mut links = BTreeMap::new();
        for p in cfg.map(|c| c.paths.as_slice()).unwrap_or_default() {
            links.insert(p.name.clone(), Arc::new(Link::new(p)?));
        }
        let ch = Channel {
            name: cfg.map_or_else(String::new, |c| c.name.clone()),
            n,
            dir: dir.to_path_buf(),
            plain,
            store,
            fw,
            links,
            pairs: Mutex::new(Vec::new()),
            attached: Mutex::new(load_attached(&dir.join(ATTACHED_FILE))?),
            active: AtomicBool::new(false),
            counters: Counters::default(),
        };
        *ch.lock_pairs() = ch.load_pairs()?;
        ch.refresh_active();
        let ch = Arc::new(ch);
        Ok(ch)
    }

    pub(crate) fn lock_pairs(&self) -> MutexGuard<'_, Vec<RemotePair>> {
        self.pairs.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn lock_attached(&self) -> MutexGuard<'_, BTreeMap<u8, Attached>> {
        self.attached.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn refresh_active(&self) {
        let any = !self.lock_pairs().is_empty() || !self.lock_attached().is_empty();
        self.active.store(any, Ordering::SeqCst);
    }

    pub(crate) fn link(&self, name: &str) -> Result<Arc<Link>, Refusal> {
        self.links.get(name).cloned().ok_or_else(|| {
            let known: Vec<&String> = self.links.keys().collect();
            param_err(format!(
                "no channel path {name:?} (this array has {known:?})"
            ))
        })
    }

    pub(crate) fn attached(&self, lun: u8) -> Option<Attached> {
        self.lock_attached().get(&lun).cloned()
    }

    /// An orderly stop: the remote pairs' bitmaps are written whole and marked clean.
    pub fn shutdown(&self) -> Result<(), String> {
        self.shutdown_pairs()
    }

    // ---- the host port ----

    /// The host-port commands this module answers (`None`: the usual path answers).
    pub(crate) fn on_host(
        self: &Arc<Self>,
        lun: u8,
        cmd: Command,
        data_out: &[u8],
        counters: &EngineCounters,
    ) -> Option<Result<Vec<u8>, Refusal>> {
        match cmd {
            Command::Backup { .. } => {
                if let Ok(op) = serde_json::from_slice::<ChannelOp>(data_out) {
                    return Some(
                        self.host_op(op)
                            .map(|r| serde_json::to_vec(&r).unwrap_or_default()),
                    );
                }
                let op: BackupOp = serde_json::from_slice(data_out).ok()?;
                self.intercept(&op)
            }
            Command::Write16 { lba, blocks, fua } if self.active.load(Ordering::SeqCst) => {
                let cap = *self.plain.get(&lun)?;
                if lba.checked_add(u64::from(blocks)).is_none_or(|e| e > cap)
                    || blocks > MAX_TRANSFER_BLOCKS
                {
                    return None;
                }
                let r = self.host_write(lun, lba, data_out)?;
                Some(r.and_then(|()| {
                    counters
                        .host_write_bytes
                        .fetch_add(data_out.len() as u64, Ordering::Relaxed);
                    if fua {
                        self.store
                            .sync(lun)
                            .map_err(|s| refuse(s, "flushing the volume"))?;
                    }
                    Ok(Vec::new())
                }))
            }
            _ => None,
        }
    }

    fn host_op(self: &Arc<Self>, op: ChannelOp) -> Result<ChannelReply, Refusal> {
        let lun = |l: u32| u8::try_from(l).map_err(|_| param_err(format!("LU {l} is beyond 255")));
        Ok(match op {
            ChannelOp::RemotePairCreate {
                primary,
                path,
                secondary,
            } => {
                self.remote_create(lun(primary)?, &path, lun(secondary)?)?;
                ChannelReply::Done
            }
            ChannelOp::RemotePairSplit { lu } => {
                self.remote_split(lun(lu)?)?;
                ChannelReply::Done
            }
            ChannelOp::RemotePairResync { lu } => {
                self.remote_resync(lun(lu)?)?;
                ChannelReply::Done
            }
            ChannelOp::RemotePairDelete { lu } => {
                self.remote_delete(lun(lu)?)?;
                ChannelReply::Done
            }
            ChannelOp::RemotePairStatus { lu } => {
                ChannelReply::RemotePair(self.remote_status(lun(lu)?)?)
            }
            ChannelOp::RemoteAuto { lu, device, ranges } => ChannelReply::Started {
                job: self.remote_auto(lun(lu)?, &device, ranges)?,
            },
            ChannelOp::PathDisable { ref path } | ChannelOp::PathEnable { ref path } => {
                let on = matches!(op, ChannelOp::PathEnable { .. });
                let l = self.link(path)?;
                l.enabled.store(on, Ordering::SeqCst);
                if !on {
                    *l.conn.lock().unwrap_or_else(PoisonError::into_inner) = None;
                }
                ChannelReply::Done
            }
            ChannelOp::Paths => ChannelReply::Paths {
                paths: self.links.values().map(|l| l.status()).collect(),
            },
            ChannelOp::PortCounters => ChannelReply::Counters(PortCounters {
                port_read_bytes: self.counters.port_read.load(Ordering::Relaxed),
                port_write_bytes: self.counters.port_write.load(Ordering::Relaxed),
                path_sent_bytes: self
                    .links
                    .values()
                    .map(|l| l.sent.load(Ordering::Relaxed))
                    .sum(),
            }),
        })
    }

    /// The array's own backup operations that meet a remote pair.
    fn intercept(self: &Arc<Self>, op: &BackupOp) -> Option<Result<Vec<u8>, Refusal>> {
        let remote = |l: u32| {
            let l = u8::try_from(l).ok()?;
            if self.lock_pairs().iter().any(|p| p.primary == l) {
                return Some(format!("LU {l} is the user volume of a remote pair"));
            }
            self.attached(l).map(|a| {
                format!(
                    "LU {l} is the secondary volume of LU {} of array {}",
                    a.primary, a.from
                )
            })
        };
        let r = match op {
            BackupOp::PairCreate { primary, secondary } => {
                // A remote secondary may be the user volume of a local pair ([0058]).
                let p = u8::try_from(*primary).ok();
                let primary_remote =
                    p.is_some_and(|l| self.lock_pairs().iter().any(|x| x.primary == l));
                let why = remote(*secondary)
                    .or_else(|| primary_remote.then(|| remote(*primary)).flatten())?;
                Err(state_err(why))
            }
            BackupOp::Attribute { lu, work: true } => Err(state_err(remote(*lu)?)),
            BackupOp::Ccopy {
                lu,
                device,
                ranges,
                auto: false,
            } => {
                let l = u8::try_from(*lu).ok()?;
                let a = self.attached(l)?;
                self.ccopy_attached(l, &a, device, ranges.clone())
                    .map(|job| BackupReply::Started { job })
            }
            _ => return None,
        };
        Some(r.map(|reply| serde_json::to_vec(&reply).unwrap_or_default()))
    }

    /// [0057] with [0029]-[0030]: a CCOPY of a secondary here, once its pair is split.
    fn ccopy_attached(
        &self,
        lun: u8,
        a: &Attached,
        device: &str,
        ranges: Vec<Area>,
    ) -> Result<u32, Refusal> {
        if !a.frozen {
            return Err(state_err(format!(
                "LU {lun} is the secondary of LU {} of array {}, and that pair is not split; split it first ([0030])",
                a.primary, a.from
            )));
        }
        self.fw.ccopy_frozen(lun, device, ranges)
    }

    /// A host write: refused on a secondary here, sent over the path for a user volume
    /// of a remote pair (`None`: not in a remote pair).
    fn host_write(&self, lun: u8, lba: u64, data: &[u8]) -> Option<Result<(), Refusal>> {
        if let Some(a) = self.attached(lun) {
            return Some(Err(refuse(
                Sense::WRITE_PROTECTED,
                format!(
                    "LU {lun} is the secondary volume of LU {} of array {}; hosts cannot write it",
                    a.primary, a.from
                ),
            )));
        }
        if !self.lock_pairs().iter().any(|p| p.primary == lun) {
            return None;
        }
        Some(self.remote_write(lun, lba, data))
    }

    // ---- the channel port ----

    fn port_command(&self, lun: u8, cmd: Command, data: &[u8]) -> Result<Vec<u8>, Refusal> {
        let io = |s: Sense| refuse(s, format!("{s}"));
        match cmd {
            Command::TestUnitReady => Ok(Vec::new()),
            Command::ReadCapacity16 { alloc_len } => {
                let blocks = self
                    .plain
                    .get(&lun)
                    .ok_or_else(|| io(Sense::LUN_NOT_SUPPORTED))?;
                let mut d = scsi::encode_read_capacity_16(*blocks, BLOCK_SIZE).to_vec();
                d.truncate(alloc_len as usize);
                Ok(d)
            }
            Command::Read16 { lba, blocks, .. } => {
                let cap = *self
                    .plain
                    .get(&lun)
                    .ok_or_else(|| io(Sense::LUN_NOT_SUPPORTED))?;
                if lba.checked_add(u64::from(blocks)).is_none_or(|e| e > cap) {
                    return Err(io(Sense::LBA_OUT_OF_RANGE));
                }
                if blocks > MAX_TRANSFER_BLOCKS {
                    return Err(io(Sense::INVALID_FIELD_IN_CDB));
                }
                self.fw.check_read(lun)?;
                let mut buf = vec![0u8; blocks as usize * BLOCK_SIZE as usize];
                self.store.read(lun, lba, &mut buf).map_err(io)?;
                self.counters
                    .port_read
                    .fetch_add(buf.len() as u64, Ordering::Relaxed);
                Ok(buf)
            }
            Command::Backup { .. } if data.starts_with(UPDATE_MAGIC) && data.len() >= 12 => {
                let lba = u64::from_le_bytes(data[4..12].try_into().unwrap_or([0; 8]));
                self.update(lun, lba, &data[12..]).map(|()| Vec::new())
            }
            Command::Backup { .. } => {
                let reply = if let Ok(op) = serde_json::from_slice::<PortOp>(data) {
                    self.port_op(op)?
                } else {
                    let op: BackupOp = serde_json::from_slice(data)
                        .map_err(|e| param_err(format!("the channel port's parameters: {e}")))?;
                    self.fw.execute(op, (0, 0))?
                };
                Ok(serde_json::to_vec(&reply).unwrap_or_default())
            }
            _ => Err(refuse(
                Sense::INVALID_OPCODE,
                "the channel port takes READ(16), READ CAPACITY(16) and C3h",
            )),
        }
    }

    /// An update from the user volume's array: to the secondary here, and down its local
    /// pair if it has one (the triplex of [0058]).
    fn update(&self, lun: u8, lba: u64, data: &[u8]) -> Result<(), Refusal> {
        let a = self.attached(lun).ok_or_else(|| {
            state_err(format!(
                "LU {lun} is not the secondary of a remote pair here"
            ))
        })?;
        if a.frozen {
            return Err(state_err(format!(
                "LU {lun} is split from LU {} of array {}",
                a.primary, a.from
            )));
        }
        let cap = self.plain.get(&lun).copied().unwrap_or(0);
        let blocks = (data.len() / BLOCK_SIZE as usize) as u64;
        if data.len() % BLOCK_SIZE as usize != 0 || lba.checked_add(blocks).is_none_or(|e| e > cap)
        {
            return Err(param_err(format!(
                "an update of {} bytes at block {lba} does not fit LU {lun}",
                data.len()
            )));
        }
        if !self.fw.host_write(lun, lba, data)? {
            self.store
                .write(lun, lba, data)
                .map_err(|s| refuse(s, "writing the secondary volume"))?;
        }
        self.counters
            .port_write
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    fn port_op(&self, op: PortOp) -> Result<BackupReply, Refusal> {
        let lun = |l: u32| u8::try_from(l).map_err(|_| param_err(format!("LU {l} is beyond 255")));
        match op {
            PortOp::Attach {
                from,
                primary,
                lu,
                blocks,
            } => self.attach(&from, primary, lun(lu)?, blocks),
            PortOp::Detach { from, lu } => self.change_attached(&from, lun(lu)?, None),
            PortOp::Freeze { from, lu, frozen } => {
                self.change_attached(&from, lun(lu)?, Some(frozen))
            }
            PortOp::Ccopy {
                from,
                lu,
                device,
                ranges,
            } => {
                let l = lun(lu)?;
                let a = self.attached(l).filter(|a| a.from == from).ok_or_else(|| {
                    state_err(format!(
                        "LU {l} is not the secondary of a pair of array {from}"
                    ))
                })?;
                Ok(BackupReply::Started {
                    job: self.ccopy_attached(l, &a, &device, ranges)?,
                })
            }
            PortOp::Job { id } => self.fw.execute(BackupOp::Job { id }, (0, 0)),
        }
    }

    fn attach(
        &self,
        from: &str,
        primary: u32,
        lun: u8,
        blocks: u64,
    ) -> Result<BackupReply, Refusal> {
        if !self.links.values().any(|l| l.peer == from) {
            return Err(state_err(format!(
                "this array has no channel path to array {from:?}; a remote pair needs a path configured on both"
            )));
        }
        let cap = *self
            .plain
            .get(&lun)
            .ok_or_else(|| param_err(format!("LU {lun} is not a plain LU of this array")))?;
        if cap != blocks {
            return Err(param_err(format!(
                "LU {lun} has {cap} blocks, the user volume {blocks}"
            )));
        }
        if self.fw.paired(lun) == Some(false)
            || self.fw.is_work(lun)
            || self.lock_pairs().iter().any(|p| p.primary == lun)
        {
            return Err(state_err(format!(
                "LU {lun} is a secondary, a working volume or in a remote pair here"
            )));
        }
        let mut at = self.lock_attached();
        if at
            .get(&lun)
            .is_some_and(|a| a.from != from || a.primary != primary)
        {
            return Err(state_err(format!(
                "LU {lun} is already the secondary of another remote pair"
            )));
        }
        at.insert(
            lun,
            Attached {
                from: from.to_string(),
                primary,
                frozen: false,
            },
        );
        save_attached(&self.dir.join(ATTACHED_FILE), &at)?;
        drop(at);
        self.refresh_active();
        Ok(BackupReply::Done)
    }

    /// Freeze or thaw (`Some`) or detach (`None`) a secondary here.
    fn change_attached(
        &self,
        from: &str,
        lun: u8,
        frozen: Option<bool>,
    ) -> Result<BackupReply, Refusal> {
        let mut at = self.lock_attached();
        let Some(a) = at.get_mut(&lun).filter(|a| a.from == from) else {
            return Err(state_err(format!(
                "LU {lun} is not the secondary of a pair of array {from}"
            )));
        };
        if frozen != Some(true) && self.fw.is_copying(lun) {
            return Err(state_err(format!(
                "LU {lun} is under copying to a backup device; try after the copy ends"
            )));
        }
        match frozen {
            Some(f) => a.frozen = f,
            None => {
                at.remove(&lun);
            }
        }
        save_attached(&self.dir.join(ATTACHED_FILE), &at)?;
        drop(at);
        self.refresh_active();
        Ok(BackupReply::Done)
    }

    pub(crate) fn attached_status(&self, lun: u8) -> Option<RemotePairStatus> {
        let a = self.attached(lun)?;
        let units = self.plain.get(&lun).copied().unwrap_or(0).div_ceil(self.n);
        Some(RemotePairStatus {
            primary: a.primary,
            secondary: u32::from(lun),
            path: String::new(),
            peer: a.from,
            here: remote::Role::Secondary,
            state: None,
            frozen: a.frozen,
            blocks_per_bit: self.n as u32,
            units,
            diff_units: 0,
            copied_bytes: 0,
            reason: None,
        })
    }
}

fn load_attached(path: &Path) -> Result<BTreeMap<u8, Attached>, String> {
    let mut out = BTreeMap::new();
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    for (i, line) in text.lines().enumerate() {
        let bad = || {
            format!(
                "{}: line {}: expected \"LU FROM PRIMARY FROZEN\"",
                path.display(),
                i + 1
            )
        };
        let f: Vec<&str> = line.split_whitespace().collect();
        let [lu, from, primary, frozen] = f.as_slice() else {
            return Err(bad());
        };
        let a = Attached {
            from: (*from).to_string(),
            primary: primary.parse().map_err(|_| bad())?,
            frozen: *frozen == "1",
        };
        out.insert(lu.parse().map_err(|_| bad())?, a);
    }
    Ok(out)
}

fn save_attached(path: &Path, at: &BTreeMap<u8, Attached>) -> Result<(), Refusal> {
    let text: String = at
        .iter()
        .map(|(l, a)| format!("{l} {} {} {}\n", a.from, a.primary, u8::from(a.frozen)))
        .collect();
    crate::backup::write_atomic(path, &text)
}

/// The channel port of an array, served like the host port (`array-sim serve
/// --channel-listen`).
pub struct ChannelPort(pub(crate) Arc<Channel>);

impl ChannelPort {
    /// One command on the channel port (served by `server` like the host port's).
    pub(crate) fn execute(&self, lun: u8, cdb: &[u8], data_out: &[u8]) -> Outcome {
        let r = Command::parse(cdb)
            .map_err(|s| refuse(s, format!("{s}")))
            .and_then(|cmd| {
                if cmd.data_out_len(BLOCK_SIZE) != data_out.len() as u64 {
                    return Err(refuse(
                        Sense::PARAMETER_LIST_LENGTH,
                        "the data-out length differs from the CDB's",
                    ));
                }
                self.0.port_command(lun, cmd, data_out)
            });
        Outcome::Reply(match r {
            Ok(d) => Response::good(d),
            Err(r) => Response {
                status: CHECK_CONDITION,
                sense: Some(r.sense),
                data: r.message.into_bytes(),
            },
        })
    }
}
