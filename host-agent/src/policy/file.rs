//! The policy file: one entry per database host (or consistency group) to back up.
//!
//! ```yaml
//! tls: { ca: /etc/hvm/tls/ca.pem, token_file: /etc/hvm/tls/token }   # optional
//! state: /var/lib/hvm/backup-policy.json                             # optional
//! entries:
//!   - name: db01-pg
//!     db: db01:7430                 # the database host's coordination address
//!     vlus: [pg]                    # one consistency group
//!     backup: bk1:7430              # the backup host
//!     target: s3://backups/db01     # repository: s3://BUCKET/PREFIX or under target_root
//!     schedule: daily 02:00         # UTC; or `weekly sun 03:00`, `every 6h`, `always`
//!     full_every: 7                 # a full backup every 7th (default: 7; 1 = always full)
//!     keep: { last: 7, daily: 7, weekly: 4 }   # pruned after each backup (optional)
//!     rate: 200M                    # copy rate limit, bytes/s (K, M, G; 0 or unset: none)
//!     deadline_ms: 5000             # freeze deadline, under the database host's own
//!     hooks: { before: "...", after: "..." }   # console-side commands (optional)
//!     retries: 2                    # retries after a transport error (default 2)
//!     consistency: application      # or crash: no freeze hook on the database host
//! ```

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer};

use super::schedule::Schedule;
use crate::backups::retention::Keep;
use crate::coord::console::Via;
use crate::coord::Consistency;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyFile {
    #[serde(default)]
    pub tls: TlsFiles,
    /// Where the last result of each entry is kept.
    #[serde(default)]
    pub state: Option<PathBuf>,
    pub entries: Vec<Entry>,
}

/// The console's TLS files; unset ones default as in `hvmctl backup run`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    pub ca: Option<PathBuf>,
    pub token_file: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    pub name: String,
    pub db: String,
    pub vlus: Vec<String>,
    pub backup: String,
    pub target: String,
    #[serde(deserialize_with = "schedule")]
    pub schedule: Schedule,
    #[serde(default = "seven")]
    pub full_every: u32,
    #[serde(default)]
    pub keep: Option<Keep>,
    #[serde(default, deserialize_with = "rate")]
    pub rate: Option<u64>,
    #[serde(default)]
    pub deadline_ms: Option<u64>,
    #[serde(default)]
    pub hooks: Hooks,
    #[serde(default = "two")]
    pub retries: u32,
    #[serde(default = "auto", deserialize_with = "via")]
    pub via: Via,
    #[serde(default)]
    pub db_nbd: Option<String>,
    /// `crash`: the database host runs no freeze hook (see `hvmctl backup run
    /// --consistency`).
    #[serde(default)]
    pub consistency: Consistency,
}

/// Commands run by the console through `sh -c`, with `HVM_POLICY`, `HVM_DB`,
/// `HVM_TARGET` (and `HVM_RESULT`, `HVM_REASON` for `after`) in their environment. A
/// failing `before` ends the entry before anything is frozen; `after` runs whatever the
/// result and a failure of it fails the entry. Each may run `hook_timeout_secs`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hooks {
    pub before: Option<String>,
    pub after: Option<String>,
    #[serde(default = "five_minutes")]
    pub timeout_secs: u64,
}

fn seven() -> u32 {
    7
}
fn two() -> u32 {
    2
}
fn five_minutes() -> u64 {
    300
}
fn auto() -> Via {
    Via::Auto
}

fn via<'de, D: Deserializer<'de>>(d: D) -> Result<Via, D::Error> {
    let s = String::deserialize(d)?;
    <Via as clap::ValueEnum>::from_str(&s, true).map_err(|_| {
        serde::de::Error::custom(format!("via {s:?}: one of auto, array-device, array, nbd"))
    })
}

fn schedule<'de, D: Deserializer<'de>>(d: D) -> Result<Schedule, D::Error> {
    let s = String::deserialize(d)?;
    Schedule::parse(&s).map_err(serde::de::Error::custom)
}

fn rate<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        N(u64),
        S(String),
    }
    match Option::<Raw>::deserialize(d)? {
        None => Ok(None),
        Some(Raw::N(n)) => Ok(Some(n)),
        Some(Raw::S(s)) => parse_rate(&s).map(Some).map_err(serde::de::Error::custom),
    }
}

/// `200M`, `1G`, `512K`, `1000` (bytes per second, powers of 1024); `0` is no limit, as
/// for `hvmctl backup run --rate` and a plain number here.
pub fn parse_rate(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, shift) = match s.char_indices().last() {
        Some((i, 'K' | 'k')) => (&s[..i], 10),
        Some((i, 'M' | 'm')) => (&s[..i], 20),
        Some((i, 'G' | 'g')) => (&s[..i], 30),
        _ => (s, 0),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1 << shift))
        .ok_or_else(|| {
            format!(
                "rate {s:?}: expected bytes per second such as 200M, 1G or 500000 (0: no limit)"
            )
        })
}

impl PolicyFile {
    /// Read and check `path`; the error is one line naming the file.
    pub fn load(path: &Path) -> Result<PolicyFile, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let f: PolicyFile = serde_yaml::from_str(&text)
            .map_err(|e| format!("{}: {}", path.display(), e.to_string().replace('\n', " ")))?;
        f.check().map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(f)
    }

    fn check(&self) -> Result<(), String> {
        if self.entries.is_empty() {
            return Err("no entries".into());
        }
        let mut names = BTreeSet::new();
        for e in &self.entries {
            let plain = !e.name.is_empty()
                && e.name.len() <= 64
                && e.name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
            if !plain {
                return Err(format!(
                    "entry name {:?}: use 1-64 characters of A-Z a-z 0-9 . _ -",
                    e.name
                ));
            }
            if !names.insert(e.name.as_str()) {
                return Err(format!("entry name {} is used twice", e.name));
            }
            if e.vlus.is_empty() {
                return Err(format!("entry {}: vlus is empty", e.name));
            }
            if e.full_every == 0 {
                return Err(format!("entry {}: full_every must be at least 1", e.name));
            }
            if e.retries > 10 {
                return Err(format!("entry {}: retries is at most 10", e.name));
            }
            for (what, a) in [("db", &e.db), ("backup", &e.backup)] {
                if a.rsplit_once(':')
                    .is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
                {
                    return Err(format!("entry {}: {what} {a:?} is not HOST:PORT", e.name));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn load(text: &str) -> Result<PolicyFile, String> {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("p.yaml");
        std::fs::write(&p, text).unwrap();
        PolicyFile::load(&p)
    }

    const ONE: &str = "entries:\n  - {name: a, db: 'h:1', vlus: [pg], backup: 'b:2', target: s3://bkt/a, schedule: daily 02:00, rate: 200M, keep: {last: 3}}\n";

    #[test]
    fn an_entry_with_its_defaults() {
        let f = load(ONE).unwrap();
        let e = &f.entries[0];
        assert_eq!(e.rate, Some(200 << 20));
        assert_eq!(e.full_every, 7);
        assert_eq!(e.retries, 2);
        assert_eq!(
            e.keep,
            Some(Keep {
                last: 3,
                daily: 0,
                weekly: 0
            })
        );
        assert_eq!(e.schedule, Schedule::Daily { minute: 120 });
        // `0` is no limit whether written as a number or a string.
        for zero in ["rate: 0", "rate: '0'"] {
            let f = load(&ONE.replace("rate: 200M", zero)).unwrap();
            assert_eq!(f.entries[0].rate, Some(0), "{zero}");
        }
        assert!(parse_rate("99999999999G").is_err());
    }

    #[test]
    fn the_example_file_loads() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/backup-policy.yaml");
        let f = PolicyFile::load(&p).unwrap();
        assert_eq!(f.entries.len(), 2);
        assert_eq!(
            f.entries[0].keep,
            Some(Keep {
                last: 7,
                daily: 7,
                weekly: 4
            })
        );
        assert_eq!(f.entries[1].schedule, Schedule::Every { ms: 6 * 3_600_000 });
        assert_eq!(f.entries[0].consistency, Consistency::Application);
        assert_eq!(f.entries[1].consistency, Consistency::Crash);
    }

    #[test]
    fn bad_files_are_refused_with_the_reason() {
        for (text, why) in [
            ("entries: []\n", "no entries"),
            (&ONE.replace("name: a", "name: 'a b'"), "entry name"),
            (&ONE.replace("daily 02:00", "daily 25:00"), "schedule"),
            (&ONE.replace("200M", "fast"), "rate"),
            (&ONE.replace("'h:1'", "h"), "HOST:PORT"),
            (&ONE.replace("vlus: [pg]", "vlus: []"), "vlus is empty"),
            (&ONE.replace("rate:", "speed:"), "unknown field"),
            (
                &ONE.replace("rate: 200M", "consistency: none"),
                "consistency",
            ),
            (
                &format!("{ONE}{}", &ONE["entries:\n".len()..]),
                "used twice",
            ),
        ] {
            let e = load(text).unwrap_err();
            assert!(e.contains(why), "{e} (want {why})");
            assert!(!e.contains('\n'), "{e}");
        }
    }
}
