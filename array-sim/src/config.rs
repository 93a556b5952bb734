//! The array's configuration: its firmware kind, disk units, LUs and mirroring table.
//!
//! ```yaml
//! kind: stateless            # mode-select | stateless | pre-update
//! disks:
//!   - name: d0
//!     iops: 2000             # optional service-time model; omitted = unthrottled
//!     bandwidth_mb_s: 200
//!   - name: d1
//! lus:
//!   - { lun: 1, blocks: 131072, disk: d0 }
//!   - { lun: 2, blocks: 131072, disk: d1 }
//! mirroring:                 # Fig. 9 rows for the stateless kind
//!   - { mirror: 0, origin: 1, mate: 2 }
//! read_distribution: least-busy   # or alternate (legs in turn, whatever their load)
//! ```
//!
//! Mirroring rows by kind: `mode-select` takes `{ lu, mates: [..] }` (Fig. 2),
//! `stateless` `{ mirror, origin, mate }` (Fig. 9; the mirroring LU has no storage and
//! is not listed under `lus`), `pre-update` `{ mirror, mate }` (Fig. 14; both are listed
//! under `lus`: the mirroring LU's own file is one leg, the mate's the other).
//!
//! The array-side backup functions of EP 1 058 190 (see [`crate::backup`]) are turned on
//! by a `backup` section, on the mode-select and pre-update kinds (the stateless kind
//! keeps no state at all, [0051]); they work on LUs outside the mirroring rows:
//!
//! ```yaml
//! backup:
//!   blocks_per_bit: 8        # n blocks per bit of the bitmaps ([0020]); default 1
//!   devices:                 # sequential backup devices, files of records
//!     - { name: tape0, file: tape0.rec }   # relative to the array's directory
//!   work: [12, 13]           # LUs whose attribute starts as "work" ([0102])
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use hvm_scsi::socket::Address;
use serde::{Deserialize, Deserializer};

use crate::fault::FaultRule;

/// Largest LU: 2^40 blocks of 512 bytes (512 TiB), so that byte offsets and sums of LU
/// sizes stay far from wrapping a u64.
pub const MAX_BLOCKS: u64 = 1 << 40;
/// Largest `backup.blocks_per_bit`.
pub const MAX_BLOCKS_PER_BIT: u64 = 1 << 20;

/// The range check of a number field, raised inside serde_yaml's deserialize call of the
/// scalar so that the error has the field's path and line.
struct Ranged {
    lo: u64,
    hi: u64,
    what: &'static str,
}

impl serde::de::Visitor<'_> for Ranged {
    type Value = u64;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} from {} to {}", self.what, self.lo, self.hi)
    }

    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<u64, E> {
        if (self.lo..=self.hi).contains(&v) {
            Ok(v)
        } else {
            Err(E::custom(format!(
                "{v} is out of range: expected {} from {} to {}",
                self.what, self.lo, self.hi
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

fn lu_blocks<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    d.deserialize_u64(Ranged {
        lo: 1,
        hi: MAX_BLOCKS,
        what: "a number of 512-byte blocks",
    })
}

fn blocks_per_bit<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    let v = d.deserialize_u64(Ranged {
        lo: 1,
        hi: MAX_BLOCKS_PER_BIT,
        what: "blocks per bit",
    })?;
    u32::try_from(v).map_err(serde::de::Error::custom)
}

/// A backup device's file: a relative path that stays inside the array's directory (no
/// `..`, no root), so a config cannot make the array write over files elsewhere.
fn device_file<'de, D: Deserializer<'de>>(d: D) -> Result<PathBuf, D::Error> {
    struct Inside;
    impl serde::de::Visitor<'_> for Inside {
        type Value = PathBuf;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a file name relative to the array's directory")
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<PathBuf, E> {
            let p = PathBuf::from(v);
            let inside = !v.is_empty()
                && p.components()
                    .all(|c| matches!(c, std::path::Component::Normal(_)));
            if inside {
                Ok(p)
            } else {
                Err(E::custom(format!(
                    "{v:?} is outside the array's directory: give a relative path without `..`"
                )))
            }
        }
    }
    d.deserialize_str(Inside)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FirmwareKind {
    ModeSelect,
    Stateless,
    PreUpdate,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    pub name: String,
    /// Operations per second the disk serves; with `bandwidth_mb_s`, the service time of
    /// one I/O is `1/iops + bytes/bandwidth`.
    #[serde(default)]
    pub iops: Option<f64>,
    #[serde(default)]
    pub bandwidth_mb_s: Option<f64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LuConfig {
    pub lun: u8,
    /// Capacity in 512-byte blocks.
    #[serde(deserialize_with = "lu_blocks")]
    pub blocks: u64,
    pub disk: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(untagged, deny_unknown_fields)]
pub enum MirrorConfig {
    Managed { lu: u8, mates: Vec<u8> },
    Triple { mirror: u8, origin: u8, mate: u8 },
    Pair { mirror: u8, mate: u8 },
}

impl MirrorConfig {
    /// Every LU the row names (a stateless row's mirroring LU included).
    pub fn lus(&self) -> Vec<u8> {
        match self {
            MirrorConfig::Managed { lu, mates } => {
                std::iter::once(*lu).chain(mates.iter().copied()).collect()
            }
            MirrorConfig::Triple {
                mirror,
                origin,
                mate,
            } => vec![*mirror, *origin, *mate],
            MirrorConfig::Pair { mirror, mate } => vec![*mirror, *mate],
        }
    }
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArrayConfig {
    pub kind: FirmwareKind,
    /// Where the LU files and the mode table live; relative paths are relative to the
    /// config file. May be left out when the caller gives one.
    #[serde(default)]
    pub dir: Option<PathBuf>,
    pub disks: Vec<DiskConfig>,
    pub lus: Vec<LuConfig>,
    #[serde(default)]
    pub mirroring: Vec<MirrorConfig>,
    #[serde(default)]
    pub faults: Vec<FaultRule>,
    #[serde(default)]
    pub backup: Option<BackupConfig>,
    /// How a read that may use several legs picks one (issue 20's [0077] benchmark).
    #[serde(default)]
    pub read_distribution: ReadDistribution,
    /// Channel paths to other arrays (see [`crate::channel`]); needs `backup`.
    #[serde(default)]
    pub channel: Option<ChannelConfig>,
}

/// How a read that may use several legs (a mirroring LU's) picks one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReadDistribution {
    /// The leg whose disk has the fewest outstanding I/Os, alternating on a tie ([0077]).
    #[default]
    LeastBusy,
    /// The legs in turn, whatever their load: the switch that shows what [0077] buys.
    Alternate,
}

/// The array-side backup functions (EP 1 058 190).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupConfig {
    #[serde(default = "one", deserialize_with = "blocks_per_bit")]
    pub blocks_per_bit: u32,
    #[serde(default)]
    pub devices: Vec<DeviceConfig>,
    #[serde(default)]
    pub work: Vec<u8>,
}

fn one() -> u32 {
    1
}

/// A backup device: a file of records (a tape).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceConfig {
    pub name: String,
    #[serde(deserialize_with = "device_file")]
    pub file: PathBuf,
}

/// A config that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: {source}")]
    Read {
        file: String,
        #[source]
        source: std::io::Error,
    },
    /// serde_yaml's message carries the line and column and what was expected.
    #[error("{file}: {source}")]
    Parse {
        file: String,
        #[source]
        source: serde_yaml::Error,
    },
    #[error("{file}: {message}")]
    Invalid { file: String, message: String },
}

impl ArrayConfig {
    pub fn load(path: &Path) -> Result<ArrayConfig, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: file.clone(),
            source,
        })?;
        let mut cfg = ArrayConfig::parse(&text, &file)?;
        if let Some(dir) = &cfg.dir {
            if dir.is_relative() {
                cfg.dir = Some(path.parent().unwrap_or(Path::new(".")).join(dir));
            }
        }
        Ok(cfg)
    }

    /// Parse and check `text`; `file` names it in errors.
    pub fn parse(text: &str, file: &str) -> Result<ArrayConfig, ConfigError> {
        let cfg: ArrayConfig = serde_yaml::from_str(text).map_err(|source| ConfigError::Parse {
            file: file.to_string(),
            source,
        })?;
        cfg.check().map_err(|message| ConfigError::Invalid {
            file: file.to_string(),
            message,
        })?;
        Ok(cfg)
    }

    /// The checks past serde's: what [`ArrayConfig::parse`] refuses after parsing.
    pub fn check(&self) -> Result<(), String> {
        for (i, r) in self.faults.iter().enumerate() {
            r.validate().map_err(|e| format!("faults[{i}]: {e}"))?;
        }
        let disks = self.check_disks()?;
        let lus = self.check_lus(&disks)?;
        let used = self.check_mirroring(&lus)?;
        if let Some(c) = &self.channel {
            if self.backup.is_none() {
                return Err(
                    "channel: remote pairs need the backup functions; add a `backup` section"
                        .into(),
                );
            }
            c.check()?;
        }
        if let Some(b) = &self.backup {
            self.check_backup(b, &lus, &used)?;
        }
        Ok(())
    }

    /// Disk names unique, their rates positive; gives the names.
    fn check_disks(&self) -> Result<BTreeSet<&str>, String> {
        let disks: BTreeSet<&str> = self.disks.iter().map(|d| d.name.as_str()).collect();
        if disks.len() != self.disks.len() {
            return Err("two disks have the same name".into());
        }
        for d in &self.disks {
            for (what, v) in [("iops", d.iops), ("bandwidth_mb_s", d.bandwidth_mb_s)] {
                if v.is_some_and(|v| !(v.is_finite() && v > 0.0)) {
                    return Err(format!("disk {}: {what} must be a positive number", d.name));
                }
            }
        }
        Ok(disks)
    }

    /// Each LU on a listed disk, not empty, listed once; gives LU → blocks.
    fn check_lus(&self, disks: &BTreeSet<&str>) -> Result<BTreeMap<u8, u64>, String> {
        let mut lus = BTreeMap::new();
        for lu in &self.lus {
            if !disks.contains(lu.disk.as_str()) {
                return Err(format!("LU {}: no disk named {:?}", lu.lun, lu.disk));
            }
            if lu.blocks == 0 {
                return Err(format!("LU {}: blocks must be at least 1", lu.lun));
            }
            if lus.insert(lu.lun, lu.blocks).is_some() {
                return Err(format!("LU {} is listed twice", lu.lun));
            }
        }
        Ok(lus)
    }

    /// The mirroring rows fit the kind, their LUs exist, match in size and are in one row
    /// only; gives the LUs the rows use.
    fn check_mirroring(&self, lus: &BTreeMap<u8, u64>) -> Result<BTreeSet<u8>, String> {
        let mut used = BTreeSet::new();
        for row in &self.mirroring {
            let (stored, virtual_lu): (Vec<u8>, Option<u8>) = match (self.kind, row) {
                (FirmwareKind::ModeSelect, MirrorConfig::Managed { lu, mates }) => {
                    if mates.is_empty() || mates.len() >= crate::geometry::MAX_LEGS {
                        return Err(format!(
                            "LU {lu}: a mirroring row needs 1 to {} mates",
                            crate::geometry::MAX_LEGS - 1
                        ));
                    }
                    (row.lus(), None)
                }
                (FirmwareKind::Stateless, MirrorConfig::Triple { mirror, origin, mate }) => {
                    (vec![*origin, *mate], Some(*mirror))
                }
                (FirmwareKind::PreUpdate, MirrorConfig::Pair { .. }) => (row.lus(), None),
                (kind, row) => {
                    return Err(format!(
                        "mirroring row {row:?} does not fit a {kind:?} array (mode-select: {{lu, mates}}, stateless: {{mirror, origin, mate}}, pre-update: {{mirror, mate}})"
                    ))
                }
            };
            let mut capacity = None;
            for lun in &stored {
                let Some(&blocks) = lus.get(lun) else {
                    return Err(format!(
                        "mirroring row {row:?}: LU {lun} is not listed under lus"
                    ));
                };
                if capacity.is_some_and(|c| c != blocks) {
                    return Err(format!("mirroring row {row:?}: its LUs differ in size"));
                }
                capacity = Some(blocks);
            }
            for lun in stored.iter().chain(virtual_lu.iter()) {
                if !used.insert(*lun) {
                    return Err(format!("LU {lun} is in two mirroring rows or twice in one"));
                }
            }
            if let Some(m) = virtual_lu {
                if lus.contains_key(&m) {
                    return Err(format!(
                        "LU {m} is a mirroring LU made of two others; it must not be listed under lus"
                    ));
                }
            }
        }
        Ok(used)
    }

    fn check_backup(
        &self,
        b: &BackupConfig,
        lus: &BTreeMap<u8, u64>,
        used: &BTreeSet<u8>,
    ) -> Result<(), String> {
        if self.kind == FirmwareKind::Stateless {
            return Err("backup: the stateless kind keeps no state ([0051]); pairs and copy jobs need a mode-select or pre-update array".into());
        }
        if b.blocks_per_bit == 0 {
            return Err("backup.blocks_per_bit must be at least 1".into());
        }
        let mut names = BTreeSet::new();
        for d in &b.devices {
            if d.name.is_empty() || !names.insert(d.name.as_str()) {
                return Err(format!(
                    "backup.devices: the name {:?} is empty or used twice",
                    d.name
                ));
            }
        }
        for lun in &b.work {
            if !lus.contains_key(lun) {
                return Err(format!("backup.work: LU {lun} is not listed under lus"));
            }
            if used.contains(lun) {
                return Err(format!(
                    "backup.work: LU {lun} is in a mirroring row; working volumes are plain LUs"
                ));
            }
        }
        Ok(())
    }
}

/// The `channel` section of an array's config.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelConfig {
    /// This array's name on its channel paths.
    pub name: String,
    #[serde(default)]
    pub paths: Vec<PathConfig>,
}

/// One channel path: the array at its other end and that array's channel port.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PathConfig {
    pub name: String,
    /// The other array's `channel.name`.
    pub peer: String,
    /// The other array's channel port: `unix:PATH` or `tcp:HOST:PORT`.
    pub address: String,
}

impl ChannelConfig {
    pub(crate) fn check(&self) -> Result<(), String> {
        if self.name.is_empty() || self.name.contains(char::is_whitespace) {
            return Err("channel.name must be a word".into());
        }
        let mut names = std::collections::BTreeSet::new();
        for p in &self.paths {
            if p.name.is_empty() || p.name.contains(char::is_whitespace) || !names.insert(&p.name) {
                return Err(format!(
                    "channel.paths: the name {:?} is empty, not a word or used twice",
                    p.name
                ));
            }
            p.address
                .parse::<Address>()
                .map_err(|e| format!("channel.paths {}: address {:?}: {e}", p.name, p.address))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIG9: &str = "
kind: stateless
disks: [{name: d0}, {name: d1}]
lus:
  - {lun: 1, blocks: 64, disk: d0}
  - {lun: 2, blocks: 64, disk: d1}
mirroring:
  - {mirror: 0, origin: 1, mate: 2}
";

    #[test]
    fn parses_a_fig9_array() {
        let cfg = ArrayConfig::parse(FIG9, "fig9.yaml").unwrap();
        assert_eq!(cfg.kind, FirmwareKind::Stateless);
        assert_eq!(
            cfg.mirroring,
            vec![MirrorConfig::Triple {
                mirror: 0,
                origin: 1,
                mate: 2
            }]
        );
    }

    #[test]
    fn errors_name_file_line_and_what_was_expected() {
        let err = ArrayConfig::parse(
            "kind: stateless\ndisks: []\nlus: []\ncolour: red\n",
            "a.yaml",
        )
        .unwrap_err()
        .to_string();
        assert!(err.starts_with("a.yaml: "), "{err}");
        assert!(
            err.contains("unknown field `colour`") && err.contains("line 4"),
            "{err}"
        );
        let err = ArrayConfig::parse("kind: raid5\ndisks: []\nlus: []\n", "b.yaml")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("line 1") && err.contains("mode-select"),
            "{err}"
        );
        let err = ArrayConfig::parse(
            &FIG9.replace("blocks: 64, disk: d1", "blocks: 65, disk: d1"),
            "c.yaml",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("differ in size"), "{err}");
        let err = ArrayConfig::parse(
            &FIG9.replace("kind: stateless", "kind: pre-update"),
            "d.yaml",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("does not fit"), "{err}");
    }

    /// Numbers that would wrap (blocks × 512) or overflow a delay, and backup-device
    /// paths that leave the array's directory, are refused with the file, the field and
    /// the line; before, a block count of 2^55 parsed and made a 0-byte LU.
    #[test]
    fn numbers_and_device_paths_are_checked() {
        for (from, to, want) in [
            (
                "blocks: 64, disk: d0",
                "blocks: 36028797018963968, disk: d0",
                "lus[0].blocks: 36028797018963968 is out of range",
            ),
            (
                "blocks: 64, disk: d0",
                "blocks: 0, disk: d0",
                "lus[0].blocks: 0 is out of range",
            ),
            (
                "blocks: 64, disk: d0",
                "blocks: -64, disk: d0",
                "lus[0].blocks: invalid",
            ),
        ] {
            let err = ArrayConfig::parse(&FIG9.replace(from, to), "a.yaml")
                .unwrap_err()
                .to_string();
            assert!(
                err.starts_with("a.yaml: ") && err.contains(want) && err.contains("line 5"),
                "{err}"
            );
        }
        let backup = |device: &str| {
            format!(
                "kind: mode-select\ndisks: [{{name: d0}}]\nlus:\n  - {{lun: 1, blocks: 64, disk: d0}}\nbackup:\n  blocks_per_bit: 1\n  devices:\n    - {{ name: t, file: {device} }}\n"
            )
        };
        ArrayConfig::parse(&backup("tapes/t0.rec"), "b.yaml").unwrap();
        for bad in ["/etc/passwd", "../t0.rec", "tapes/../../t0.rec", "''"] {
            let err = ArrayConfig::parse(&backup(bad), "b.yaml")
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("backup.devices[0].file")
                    && err.contains("outside the array's directory")
                    || bad == "''" && err.contains("line 8"),
                "{bad}: {err}"
            );
            assert!(err.contains("line 8"), "{err}");
        }
        let err = ArrayConfig::parse(
            &backup("t0.rec").replace("blocks_per_bit: 1", "blocks_per_bit: 4294967296"),
            "b.yaml",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("backup.blocks_per_bit") && err.contains("line 6"),
            "{err}"
        );
        let err = ArrayConfig::parse(
            &format!("{FIG9}faults:\n  - {{ action: delay, delay_ms: 1e300 }}\n"),
            "f.yaml",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("f.yaml: faults[0]: a delay fault needs delay_ms"),
            "{err}"
        );
    }
}
