//! Fault injection: per LU and operation, an error with chosen sense data, an added delay,
//! or a dropped connection; for the next N commands or at a rate. Rules come from the
//! config, or at runtime from the vendor SET FAULT command (so a test can break the array
//! mid-run).
//!
//! SET FAULT data-out (big-endian), 24 bytes:
//! `lun u8 (FFh: any)`, `op u8 (0 any, 1 read, 2 write, 3 flush, 4 copy)`,
//! `action u8 (0 clear all rules, 1 error, 2 delay, 3 drop)`, `sense key u8`, `asc u8`,
//! `ascq u8`, 2 reserved, `count u32 (0: unlimited)`, `rate u32 (per million; 0: every
//! command)`, `delay_us u32`, 4 reserved.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use serde::Deserialize;

use crate::scsi::{Sense, SenseKey};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FaultOp {
    Any,
    Read,
    Write,
    Flush,
    Copy,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FaultAction {
    /// Answer CHECK CONDITION with this sense (default MEDIUM ERROR).
    Error,
    /// Serve the command after an added delay.
    Delay,
    /// Close the connection without answering.
    Drop,
}

/// One rule, as written in the config.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultRule {
    /// The LU it applies to; omitted: every LU.
    #[serde(default)]
    pub lun: Option<u8>,
    #[serde(default = "any_op")]
    pub op: FaultOp,
    pub action: FaultAction,
    /// Sense key, ASC and ASCQ for `error`; default: the medium error of the operation.
    #[serde(default)]
    pub sense: Option<[u8; 3]>,
    /// Apply to the next `count` matching commands only.
    #[serde(default)]
    pub count: Option<u64>,
    /// Apply to this fraction (0-1) of matching commands.
    #[serde(default)]
    pub rate: Option<f64>,
    #[serde(default)]
    pub delay_ms: Option<f64>,
}

fn any_op() -> FaultOp {
    FaultOp::Any
}

/// What the array must do with a command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Injected {
    None,
    Error(Sense),
    Delay(Duration),
    Drop,
}

pub const SET_FAULT_LEN: usize = 24;

/// Longest injected delay: a larger (or not finite) one would overflow a `Duration`.
pub const MAX_DELAY_MS: f64 = 3_600_000.0;

impl FaultRule {
    /// Decode SET FAULT data-out; `None` means "clear all rules".
    pub fn decode(d: &[u8]) -> Result<Option<FaultRule>, Sense> {
        if d.len() != SET_FAULT_LEN {
            return Err(Sense::PARAMETER_LIST_LENGTH);
        }
        let bad = Sense::INVALID_FIELD_IN_PARAMETERS;
        let be = |i: usize| u32::from_be_bytes([d[i], d[i + 1], d[i + 2], d[i + 3]]);
        let op = match d[1] {
            0 => FaultOp::Any,
            1 => FaultOp::Read,
            2 => FaultOp::Write,
            3 => FaultOp::Flush,
            4 => FaultOp::Copy,
            _ => return Err(bad),
        };
        let action = match d[2] {
            0 => return Ok(None),
            1 => FaultAction::Error,
            2 => FaultAction::Delay,
            3 => FaultAction::Drop,
            _ => return Err(bad),
        };
        if action == FaultAction::Error && SenseKey::from_u8(d[3]).is_none() {
            return Err(bad);
        }
        let (count, rate, delay_us) = (be(8), be(12), be(16));
        Ok(Some(FaultRule {
            lun: (d[0] != 0xff).then_some(d[0]),
            op,
            action,
            sense: (action == FaultAction::Error).then_some([d[3], d[4], d[5]]),
            count: (count != 0).then_some(u64::from(count)),
            rate: (rate != 0).then(|| f64::from(rate) / 1e6),
            delay_ms: (action == FaultAction::Delay).then(|| f64::from(delay_us) / 1e3),
        }))
    }

    /// SET FAULT data-out for this rule (`None`: clear all rules).
    pub fn encode(rule: Option<&FaultRule>) -> [u8; SET_FAULT_LEN] {
        let mut d = [0u8; SET_FAULT_LEN];
        let Some(r) = rule else {
            return d;
        };
        d[0] = r.lun.unwrap_or(0xff);
        d[1] = match r.op {
            FaultOp::Any => 0,
            FaultOp::Read => 1,
            FaultOp::Write => 2,
            FaultOp::Flush => 3,
            FaultOp::Copy => 4,
        };
        d[2] = match r.action {
            FaultAction::Error => 1,
            FaultAction::Delay => 2,
            FaultAction::Drop => 3,
        };
        if let Some([k, a, q]) = r.sense {
            d[3..6].copy_from_slice(&[k, a, q]);
        }
        let count = r.count.map_or(0, |c| c.min(u64::from(u32::MAX)) as u32);
        let rate = r.rate.map_or(0, |x| (x.clamp(0.0, 1.0) * 1e6) as u32);
        let delay = r.delay_ms.map_or(0, |ms| (ms * 1e3) as u32);
        d[8..12].copy_from_slice(&count.to_be_bytes());
        d[12..16].copy_from_slice(&rate.to_be_bytes());
        d[16..20].copy_from_slice(&delay.to_be_bytes());
        d
    }

    /// The rule's numbers are in range and its sense key is one array-sim answers with.
    pub(crate) fn validate(&self) -> Result<(), String> {
        if let Some(r) = self.rate {
            if !(0.0..=1.0).contains(&r) {
                return Err(format!("fault rate {r} is not between 0 and 1"));
            }
        }
        if let Some([k, _, _]) = self.sense {
            if SenseKey::from_u8(k).is_none() {
                return Err(format!("fault sense key {k:#x} is not one array-sim uses"));
            }
        }
        if self.action == FaultAction::Delay
            && self
                .delay_ms
                .is_none_or(|d| !(0.0..=MAX_DELAY_MS).contains(&d))
        {
            return Err(format!(
                "a delay fault needs delay_ms from 0 to {MAX_DELAY_MS} (one hour)"
            ));
        }
        Ok(())
    }
}

struct Active {
    rule: FaultRule,
    remaining: Option<u64>,
}

/// The rules in force, checked before every command.
#[derive(Default)]
pub struct Faults {
    rules: Mutex<Vec<Active>>,
    /// Fast path: no rules, no lock.
    count: AtomicU64,
    /// Deterministic pseudo-random stream for rates.
    seed: AtomicU64,
}

impl Faults {
    pub fn new(rules: &[FaultRule]) -> Result<Faults, String> {
        let f = Faults::default();
        for r in rules {
            f.add(r.clone())?;
        }
        Ok(f)
    }

    pub fn add(&self, rule: FaultRule) -> Result<(), String> {
        rule.validate()?;
        let mut rules = self.rules.lock().unwrap_or_else(|e| e.into_inner());
        rules.push(Active {
            remaining: rule.count,
            rule,
        });
        self.count.store(rules.len() as u64, Ordering::SeqCst);
        Ok(())
    }

    pub fn clear(&self) {
        self.rules.lock().unwrap_or_else(|e| e.into_inner()).clear();
        self.count.store(0, Ordering::SeqCst);
    }

    /// What to do with a command on `lun` doing `op`. Rules inject faults into I/O
    /// (`op` read, write, flush or copy; a rule's `any` means any of these): a command
    /// that is not I/O (the engine passes [`FaultOp::Any`]: INQUIRY, MODE SENSE/SELECT,
    /// the backup commands and SET FAULT itself) is never failed, so no rule can stop
    /// the SET FAULT that would clear it, nor the probes a host needs to see the array.
    pub fn check(&self, lun: u8, op: FaultOp) -> Injected {
        if op == FaultOp::Any || self.count.load(Ordering::Relaxed) == 0 {
            return Injected::None;
        }
        let mut rules = self.rules.lock().unwrap_or_else(|e| e.into_inner());
        let mut hit = Injected::None;
        for a in rules.iter_mut() {
            let r = &a.rule;
            if r.lun.is_some_and(|l| l != lun) || (r.op != FaultOp::Any && r.op != op) {
                continue;
            }
            if let Some(rate) = r.rate {
                // splitmix64 step: repeatable runs for a given sequence of commands.
                let mut z = self
                    .seed
                    .fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed);
                z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
                if ((z ^ (z >> 31)) as f64 / u64::MAX as f64) >= rate {
                    continue;
                }
            }
            if a.remaining == Some(0) {
                continue;
            }
            if let Some(n) = a.remaining.as_mut() {
                *n -= 1;
            }
            hit = match r.action {
                FaultAction::Drop => Injected::Drop,
                FaultAction::Delay => {
                    Injected::Delay(Duration::from_secs_f64(r.delay_ms.unwrap_or(0.0) / 1e3))
                }
                FaultAction::Error => Injected::Error(match r.sense {
                    Some([k, a, q]) => {
                        Sense::new(SenseKey::from_u8(k).unwrap_or(SenseKey::MediumError), a, q)
                    }
                    None if op == FaultOp::Write => Sense::WRITE_ERROR,
                    None => Sense::UNRECOVERED_READ_ERROR,
                }),
            };
            break;
        }
        rules.retain(|a| a.remaining != Some(0));
        self.count.store(rules.len() as u64, Ordering::SeqCst);
        hit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(action: FaultAction) -> FaultRule {
        FaultRule {
            lun: Some(1),
            op: FaultOp::Write,
            action,
            sense: None,
            count: Some(2),
            rate: None,
            delay_ms: Some(5.0),
        }
    }

    #[test]
    fn next_n_commands_then_gone() {
        let f = Faults::new(&[rule(FaultAction::Error)]).unwrap();
        assert_eq!(f.check(2, FaultOp::Write), Injected::None);
        assert_eq!(f.check(1, FaultOp::Read), Injected::None);
        assert_eq!(
            f.check(1, FaultOp::Write),
            Injected::Error(Sense::WRITE_ERROR)
        );
        assert_eq!(
            f.check(1, FaultOp::Write),
            Injected::Error(Sense::WRITE_ERROR)
        );
        assert_eq!(f.check(1, FaultOp::Write), Injected::None);
    }

    #[test]
    fn rate_hits_about_that_fraction() {
        let mut r = rule(FaultAction::Drop);
        r.count = None;
        r.rate = Some(0.25);
        let f = Faults::new(&[r]).unwrap();
        let hits = (0..10_000)
            .filter(|_| f.check(1, FaultOp::Write) == Injected::Drop)
            .count();
        assert!((2000..3000).contains(&hits), "{hits}");
    }

    #[test]
    fn set_fault_data_round_trip_and_errors() {
        let mut r = rule(FaultAction::Error);
        r.sense = Some([0x7, 0x27, 0x00]);
        r.delay_ms = None;
        let d = FaultRule::encode(Some(&r));
        assert_eq!(FaultRule::decode(&d), Ok(Some(r)));
        assert_eq!(FaultRule::decode(&FaultRule::encode(None)), Ok(None));
        assert_eq!(
            FaultRule::decode(&d[..10]),
            Err(Sense::PARAMETER_LIST_LENGTH)
        );
        let mut bad = d;
        bad[2] = 9;
        assert_eq!(
            FaultRule::decode(&bad),
            Err(Sense::INVALID_FIELD_IN_PARAMETERS)
        );
    }
}
