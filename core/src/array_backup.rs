//! The array-side backup functions of EP 1 058 190 as generic operations: what a driver
//! translates into its array's command set when the array offers them (pair formation,
//! split and resync with difference bitmaps, area-unit split, CCOPY to a backup device,
//! AUTO mode, working-volume copy-on-write backup, and the working-volume pool). The
//! names of CCI (ShadowImage) are given beside ours where they differ.
//!
//! These types cross the plugin boundary as JSON, so a field added later with a serde
//! default does not break a plugin built before it.

use serde::{Deserialize, Serialize};

/// A run of blocks: `blocks` blocks from `start` (Fig. 5's parameter 53).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Area {
    pub start: u64,
    pub blocks: u64,
}

impl Area {
    /// One past the last block.
    pub fn end(&self) -> u64 {
        self.start.saturating_add(self.blocks)
    }
}

impl std::fmt::Display for Area {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}+{}", self.start, self.blocks)
    }
}

impl std::str::FromStr for Area {
    type Err = String;

    /// `START+BLOCKS`, for example `2048+512`.
    fn from_str(s: &str) -> Result<Area, String> {
        let (a, b) = s
            .split_once('+')
            .ok_or_else(|| format!("expected START+BLOCKS, found {s:?}"))?;
        let num = |x: &str| {
            x.trim()
                .parse::<u64>()
                .map_err(|_| format!("{x:?} in {s:?} is not a block number"))
        };
        let area = Area {
            start: num(a)?,
            blocks: num(b)?,
        };
        if area.blocks == 0 {
            return Err(format!("{s:?} has no blocks"));
        }
        Ok(area)
    }
}

/// One operation on the array.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum BackupOp {
    /// Form a pair and start the initial copy (step 40; `paircreate`).
    PairCreate { primary: u32, secondary: u32 },
    /// Split the pair of user volume `lu`: the listed areas, or all of it when none is
    /// listed (Fig. 5 with the split bit set; `pairsplit`).
    PairSplit {
        lu: u32,
        #[serde(default)]
        areas: Vec<Area>,
    },
    /// Resynchronise the listed split areas, or all of them (Fig. 5 with the split bit
    /// clear, Fig. 7; `pairresync`).
    PairResync {
        lu: u32,
        #[serde(default)]
        areas: Vec<Area>,
    },
    /// Dissolve the pair of user volume `lu` (`pairsplit -S`).
    PairDelete { lu: u32 },
    /// The pair `lu` belongs to (Inquiry of pairing, step 43; `pairdisplay`).
    PairStatus { lu: u32 },
    /// Copy the listed ranges of `lu` to a backup device inside the array: `lu` must be a
    /// split secondary volume ([0029]-[0030]); with `auto`, `lu` is the user volume and
    /// the array splits, copies and resyncs by itself ([0037]-[0040]).
    Ccopy {
        lu: u32,
        device: String,
        ranges: Vec<Area>,
        #[serde(default)]
        auto: bool,
    },
    /// Back up the listed ranges of user volume `lu` with a working volume from the pool
    /// ([0062]-[0122]). `same_block` saves a block at its own number in the working
    /// volume ([0081]) instead of compactly ([0122]); `wait_for_copy` is the prior art of
    /// [0005]-[0006] instead: a write to a block still to be copied waits for the copy.
    Cow {
        lu: u32,
        device: String,
        ranges: Vec<Area>,
        #[serde(default)]
        same_block: bool,
        #[serde(default)]
        wait_for_copy: bool,
    },
    /// The state of a copy job.
    Job { id: u32 },
    /// Set a volume's attribute: user or work ([0103]).
    Attribute { lu: u32, work: bool },
    /// The array's counters.
    Counters,
    /// The backup devices.
    Devices,
}

/// The answer to a [`BackupOp`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "kebab-case")]
pub enum BackupReply {
    Done,
    /// The copy was checked and started; this is its job ([0030]: completion is reported
    /// at the start of the copy, not at its end).
    Started {
        job: u32,
    },
    Pair(PairStatus),
    Job(JobStatus),
    Counters(ArrayCounters),
    Devices {
        devices: Vec<DeviceStatus>,
    },
}

/// The state of a pair (CCI's names in brackets).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PairState {
    /// The initial copy is running (COPY).
    Forming,
    /// Every update reaches both volumes (PAIR).
    Duplex,
    /// All or some areas are split (PSUS).
    Split,
    /// A resync is copying the marked blocks (COPY(RS)).
    Resyncing,
}

impl std::fmt::Display for PairState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PairState::Forming => "forming",
            PairState::Duplex => "duplex",
            PairState::Split => "split",
            PairState::Resyncing => "resyncing",
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PairStatus {
    pub primary: u32,
    pub secondary: u32,
    pub state: PairState,
    /// Blocks per bit of the bitmaps ([0020]'s n).
    pub blocks_per_bit: u32,
    /// Bits of each bitmap.
    pub units: u64,
    /// Bits set in the pair split bitmap ([0042]).
    pub split_units: u64,
    /// Bits set in the difference bitmap ([0020]).
    pub diff_units: u64,
    /// The split areas, in blocks.
    pub split_areas: Vec<Area>,
    /// Bytes the array copied between the volumes of this pair (initial copy, resyncs).
    pub copied_bytes: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum JobState {
    Running,
    Done,
    Failed,
}

impl std::fmt::Display for JobState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            JobState::Running => "running",
            JobState::Done => "done",
            JobState::Failed => "failed",
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobStatus {
    pub id: u32,
    /// `ccopy`, `auto` or `cow`.
    pub kind: String,
    pub lu: u32,
    pub device: String,
    pub state: JobState,
    #[serde(default)]
    pub message: Option<String>,
    pub total_blocks: u64,
    pub done_blocks: u64,
    /// The working volume of a `cow` job.
    #[serde(default)]
    pub working_volume: Option<u32>,
    /// Blocks a `cow` job saved to its working volume before a write.
    #[serde(default)]
    pub saved_blocks: u64,
    /// Microseconds from the start of the job to its end (or to now).
    pub elapsed_us: u64,
}

/// What the array moved and what hosts moved, to show that a backup's data did not pass
/// through a host.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArrayCounters {
    /// Bytes hosts read from the array.
    pub host_read_bytes: u64,
    /// Bytes hosts wrote to the array.
    pub host_write_bytes: u64,
    /// Bytes the array wrote to its backup devices.
    pub device_bytes: u64,
    /// Bytes the array saved to working volumes before a write.
    pub saved_bytes: u64,
    /// Bytes the array copied between paired volumes.
    pub pair_copy_bytes: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceStatus {
    pub name: String,
    pub path: String,
    pub busy: bool,
}

/// Which of the functions the array offers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupCapabilities {
    pub pairs: bool,
    pub ccopy: bool,
    pub auto: bool,
    pub area_split: bool,
    pub cow: bool,
    pub pool: bool,
}

impl BackupCapabilities {
    pub const ALL: BackupCapabilities = BackupCapabilities {
        pairs: true,
        ccopy: true,
        auto: true,
        area_split: true,
        cow: true,
        pool: true,
    };

    pub fn any(&self) -> bool {
        *self != BackupCapabilities::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn areas_parse_and_bad_ones_say_why() {
        assert_eq!(
            "2048+512".parse::<Area>(),
            Ok(Area {
                start: 2048,
                blocks: 512
            })
        );
        assert!("2048".parse::<Area>().unwrap_err().contains("START+BLOCKS"));
        assert!("x+1"
            .parse::<Area>()
            .unwrap_err()
            .contains("not a block number"));
        assert!("5+0".parse::<Area>().unwrap_err().contains("no blocks"));
    }

    #[test]
    fn an_op_without_new_fields_still_parses() {
        let op: BackupOp = serde_json::from_str(r#"{"op":"pair-split","lu":3}"#).unwrap();
        assert_eq!(
            op,
            BackupOp::PairSplit {
                lu: 3,
                areas: vec![]
            }
        );
        let text = serde_json::to_string(&BackupReply::Started { job: 7 }).unwrap();
        assert_eq!(text, r#"{"reply":"started","job":7}"#);
    }
}
