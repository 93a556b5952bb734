//! Copy agents outside the array: the switch of [0059] and the backup device of [0060].
//!
//! - `array-sim switch --listen ADDR`: the switch on the path between the array and the
//!   backup device. A host sends it one [`AgentOp::Xcopy`] (EXTENDED COPY-like: a source
//!   port address, a volume and its ranges, a target device address); the switch reads
//!   the blocks from the array's channel port and writes them to the backup device, so
//!   neither the host nor the array's controller moves the data. With `pair`, the switch
//!   also splits the pair first and resyncs it after ([0059]: "the split of the pair
//!   volume and the re-synchronization may be instructed by the switch").
//! - `array-sim device --listen ADDR --dir DIR`: the backup device, a sequential medium
//!   per file of DIR (the format of [`crate::tape`]). It stores the records a switch
//!   sends it ([`AgentOp::Load`], binary records, [`AgentOp::Unload`]), or executes a
//!   CCOPY itself ([`AgentOp::Ccopy`], [0060]): it reads the blocks from the array's
//!   channel port and stores them.
//!
//! Both check, as the array does for its own CCOPY ([0030]), that the source volume is
//! the secondary of a split pair before copying it. Their [`AgentCounters`] say which
//! bytes they moved; the array's own counters say it copied nothing to a device and no
//! host read anything.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use hvm_core::array_backup::{Area, BackupOp, BackupReply, PairState};
use hvm_scsi::socket::{Address, SocketLink};
use serde::{Deserialize, Serialize};

use crate::channel::json_command;
use crate::client::ArrayClient;
use crate::engine::{Outcome, Response, BLOCK_SIZE};
use crate::scsi::{Command, Sense, CHECK_CONDITION};
use crate::server::Executor;
use crate::tape::TapeWriter;

/// An operation on a copy agent (JSON in the C3h command).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum AgentOp {
    /// To the switch ([0059]): copy `ranges` of `lu` at the array's channel port `source`
    /// onto `medium` of the backup device at `target`.
    Xcopy {
        source: String,
        lu: u32,
        ranges: Vec<Area>,
        target: String,
        medium: String,
        /// The user volume of `lu`'s pair: split it first, resync it after.
        #[serde(default)]
        pair: Option<u32>,
    },
    /// To the backup device ([0060]): copy `ranges` of `lu` at `source` onto `medium`.
    Ccopy {
        source: String,
        lu: u32,
        ranges: Vec<Area>,
        medium: String,
    },
    /// To the backup device, from a copy agent: load a new medium for LU `lu`'s blocks.
    Load {
        medium: String,
        lu: u32,
    },
    /// Write the medium's trailer and unload it.
    Unload,
    Counters,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "kebab-case")]
pub enum AgentReply {
    Done { blocks: u64 },
    Counters(AgentCounters),
}

/// Who moved which bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentCounters {
    /// Commands received (a host's, or a switch's on the device).
    pub commands: u64,
    /// Bytes of JSON commands received: all a host sends for a copy.
    pub command_bytes: u64,
    /// The switch: bytes it read from an array and wrote to a device.
    pub moved_bytes: u64,
    /// The device: bytes of records a copy agent sent it.
    pub received_bytes: u64,
    /// The device: bytes it read from an array itself ([0060]).
    pub pulled_bytes: u64,
}

/// The first bytes of a binary record sent to the device.
pub const RECORD_MAGIC: &[u8; 4] = b"REC1";
const STEP_BLOCKS: u32 = 256;
const TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Default)]
struct Counts {
    commands: AtomicU64,
    command_bytes: AtomicU64,
    moved: AtomicU64,
    received: AtomicU64,
    pulled: AtomicU64,
}

/// A copy agent: the switch (no `dir`) or the backup device (media in `dir`).
pub struct Agent {
    dir: Option<PathBuf>,
    medium: Mutex<Option<TapeWriter>>,
    counts: Counts,
}

type Client = ArrayClient<SocketLink>;

fn connect(addr: &str) -> Result<Client, String> {
    let a: Address = addr.parse().map_err(|e| format!("{addr:?}: {e}"))?;
    SocketLink::connect(&a, TIMEOUT)
        .map(ArrayClient::new)
        .map_err(|e| format!("cannot connect to {addr}: {e}"))
}

fn op<T: serde::de::DeserializeOwned>(c: &Client, o: &impl Serialize) -> Result<T, String> {
    json_command(c, o).map_err(|e| e.to_string())
}

/// [0030]'s check, made by the agent: `lu` is the secondary of a split pair.
fn check_frozen(src: &Client, lu: u32) -> Result<(), String> {
    match op(src, &BackupOp::PairStatus { lu })? {
        BackupReply::Pair(p) if p.secondary == lu && p.state == PairState::Split => Ok(()),
        BackupReply::Pair(p) => Err(format!(
            "LU {lu} is {} in its pair with LU {}; copy a split secondary ([0030])",
            p.state, p.primary
        )),
        r => Err(format!("the array answered {r:?}")),
    }
}

/// Read `ranges` of `lu` from `src`, a step at a time, handing each to `put`.
fn pump(
    src: &Client,
    lu: u32,
    ranges: &[Area],
    mut put: impl FnMut(u64, &[u8]) -> Result<(), String>,
) -> Result<u64, String> {
    let lun = u8::try_from(lu).map_err(|_| format!("LU {lu} is beyond 255"))?;
    let mut total = 0;
    for a in ranges {
        let mut at = a.start;
        while at < a.end() {
            let n = u64::from(STEP_BLOCKS).min(a.end() - at) as u32;
            let cmd = Command::Read16 {
                lba: at,
                blocks: n,
                fua: false,
            };
            let data = src.command(lun, cmd, &[]).map_err(|e| e.to_string())?;
            put(at, &data)?;
            total += u64::from(n);
            at += u64::from(n);
        }
    }
    Ok(total)
}

impl Agent {
    pub fn switch() -> Agent {
        Agent {
            dir: None,
            medium: Mutex::new(None),
            counts: Counts::default(),
        }
    }

    /// A backup device whose media are the files of `dir`.
    pub fn device(dir: PathBuf) -> Agent {
        Agent {
            dir: Some(dir),
            ..Agent::switch()
        }
    }

    fn medium_path(&self, name: &str) -> Result<PathBuf, String> {
        let dir = self
            .dir
            .as_ref()
            .ok_or("this agent is a switch; media are on a backup device")?;
        let plain = !name.is_empty() && !name.contains('/') && name != "." && name != "..";
        if !plain {
            return Err(format!("medium {name:?}: give a file name without `/`"));
        }
        Ok(dir.join(name))
    }

    fn load(&self, name: &str, lu: u32) -> Result<(), String> {
        let path = self.medium_path(name)?;
        let mut m = self.medium.lock().unwrap_or_else(PoisonError::into_inner);
        if m.is_some() {
            return Err("the device is busy: a medium is loaded".into());
        }
        let lun = u8::try_from(lu).map_err(|_| format!("LU {lu} is beyond 255"))?;
        *m = Some(TapeWriter::create(&path, lun).map_err(|e| e.to_string())?);
        Ok(())
    }

    fn record(&self, lba: u64, data: &[u8]) -> Result<(), String> {
        if data.is_empty() || data.len() % BLOCK_SIZE as usize != 0 {
            return Err(format!(
                "a record of {} bytes is not whole blocks",
                data.len()
            ));
        }
        let mut m = self.medium.lock().unwrap_or_else(PoisonError::into_inner);
        let w = m.as_mut().ok_or("no medium is loaded")?;
        w.record(lba, data).map_err(|e| e.to_string())
    }

    fn unload(&self) -> Result<u64, String> {
        let w = self
            .medium
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
            .ok_or("no medium is loaded")?;
        w.finish().map_err(|e| e.to_string())
    }

    /// [0059]: the switch copies from the array to the device.
    fn xcopy(
        &self,
        source: &str,
        lu: u32,
        ranges: &[Area],
        target: &str,
        medium: &str,
        pair: Option<u32>,
    ) -> Result<u64, String> {
        let src = connect(source)?;
        let dst = connect(target)?;
        if let Some(p) = pair {
            op::<BackupReply>(
                &src,
                &BackupOp::PairSplit {
                    lu: p,
                    areas: vec![],
                },
            )?;
        }
        check_frozen(&src, lu)?;
        op::<AgentReply>(
            &dst,
            &AgentOp::Load {
                medium: medium.to_string(),
                lu,
            },
        )?;
        let copied = pump(&src, lu, ranges, |lba, data| {
            let mut msg = Vec::with_capacity(12 + data.len());
            msg.extend_from_slice(RECORD_MAGIC);
            msg.extend_from_slice(&lba.to_le_bytes());
            msg.extend_from_slice(data);
            let cmd = Command::Backup {
                param_len: msg.len() as u32,
            };
            dst.command(0, cmd, &msg).map_err(|e| e.to_string())?;
            self.counts
                .moved
                .fetch_add(data.len() as u64, Ordering::Relaxed);
            Ok(())
        });
        let done = op::<AgentReply>(&dst, &AgentOp::Unload);
        let blocks = copied?;
        done?;
        if let Some(p) = pair {
            op::<BackupReply>(
                &src,
                &BackupOp::PairResync {
                    lu: p,
                    areas: vec![],
                },
            )?;
        }
        Ok(blocks)
    }

    /// [0060]: the device reads from the array and stores.
    fn ccopy(&self, source: &str, lu: u32, ranges: &[Area], medium: &str) -> Result<u64, String> {
        let src = connect(source)?;
        check_frozen(&src, lu)?;
        self.load(medium, lu)?;
        let copied = pump(&src, lu, ranges, |lba, data| {
            self.record(lba, data)?;
            self.counts
                .pulled
                .fetch_add(data.len() as u64, Ordering::Relaxed);
            Ok(())
        });
        let done = self.unload();
        let blocks = copied?;
        done?;
        Ok(blocks)
    }

    fn run(&self, data: &[u8]) -> Result<Vec<u8>, String> {
        if data.starts_with(RECORD_MAGIC) && data.len() >= 12 {
            let lba = u64::from_le_bytes(data[4..12].try_into().unwrap_or([0; 8]));
            self.record(lba, &data[12..])?;
            self.counts
                .received
                .fetch_add((data.len() - 12) as u64, Ordering::Relaxed);
            return Ok(Vec::new());
        }
        self.counts
            .command_bytes
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        let o: AgentOp =
            serde_json::from_slice(data).map_err(|e| format!("the agent's parameters: {e}"))?;
        let blocks = match o {
            AgentOp::Xcopy {
                source,
                lu,
                ranges,
                target,
                medium,
                pair,
            } => self.xcopy(&source, lu, &ranges, &target, &medium, pair)?,
            AgentOp::Ccopy {
                source,
                lu,
                ranges,
                medium,
            } => self.ccopy(&source, lu, &ranges, &medium)?,
            AgentOp::Load { medium, lu } => self.load(&medium, lu).map(|()| 0)?,
            AgentOp::Unload => self.unload()?,
            AgentOp::Counters => {
                return Ok(
                    serde_json::to_vec(&AgentReply::Counters(self.counters())).unwrap_or_default()
                )
            }
        };
        Ok(serde_json::to_vec(&AgentReply::Done { blocks }).unwrap_or_default())
    }

    pub fn counters(&self) -> AgentCounters {
        let c = &self.counts;
        AgentCounters {
            commands: c.commands.load(Ordering::Relaxed),
            command_bytes: c.command_bytes.load(Ordering::Relaxed),
            moved_bytes: c.moved.load(Ordering::Relaxed),
            received_bytes: c.received.load(Ordering::Relaxed),
            pulled_bytes: c.pulled.load(Ordering::Relaxed),
        }
    }
}

impl Executor for Agent {
    fn execute(&self, _lun: u8, cdb: &[u8], data_out: &[u8]) -> Outcome {
        self.counts.commands.fetch_add(1, Ordering::Relaxed);
        let r = match Command::parse(cdb) {
            Ok(cmd @ Command::Backup { .. })
                if cmd.data_out_len(BLOCK_SIZE) == data_out.len() as u64 =>
            {
                self.run(data_out).map_err(|m| (Sense::BACKUP_STATE, m))
            }
            Ok(Command::Backup { .. }) => Err((
                Sense::PARAMETER_LIST_LENGTH,
                "the data-out length differs from the CDB's".into(),
            )),
            Ok(Command::TestUnitReady) => Ok(Vec::new()),
            _ => Err((
                Sense::INVALID_OPCODE,
                "a copy agent takes the C3h command only".into(),
            )),
        };
        Outcome::Reply(match r {
            Ok(d) => Response::good(d),
            Err((sense, m)) => Response {
                status: CHECK_CONDITION,
                sense: Some(sense),
                data: m.into_bytes(),
            },
        })
    }
}
