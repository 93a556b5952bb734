//! When an entry is due. Times are UTC (a fleet spans time zones; the catalog's and
//! retention's days are UTC too).
//!
//! - `daily HH:MM`: due once the latest HH:MM has passed since the entry's last
//!   successful backup started;
//! - `weekly DAY HH:MM` (`mon` .. `sun`): the same, once a week;
//! - `every N{m,h,d}` (`hourly` = `every 1h`): due when the last successful backup
//!   started at least N ago, less 5 % so that a timer firing at the same period does not
//!   skip every other run;
//! - `always`: due at every `policy run` (the timer alone sets the cadence).
//!
//! A failed or never-run entry is due at once, so the next timer run retries it.

const MINUTE_MS: u64 = 60_000;
const DAY_MS: u64 = 86_400_000;
const WEEK_MS: u64 = 7 * DAY_MS;
const DAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Schedule {
    Always,
    Every {
        ms: u64,
    },
    /// Minutes after 00:00 UTC.
    Daily {
        minute: u64,
    },
    /// Minutes after Monday 00:00 UTC.
    Weekly {
        minute: u64,
    },
}

fn hh_mm(s: &str) -> Option<u64> {
    let (h, m) = s.split_once(':')?;
    let (h, m) = (h.parse::<u64>().ok()?, m.parse::<u64>().ok()?);
    (h < 24 && m < 60 && s.len() == 5).then_some(h * 60 + m)
}

impl Schedule {
    pub fn parse(s: &str) -> Result<Schedule, String> {
        let words: Vec<&str> = s.split_whitespace().collect();
        let parsed = match words.as_slice() {
            ["always"] => Some(Schedule::Always),
            ["hourly"] => Some(Schedule::Every { ms: 60 * MINUTE_MS }),
            ["every", n] => every(n).map(|ms| Schedule::Every { ms }),
            ["daily", t] => hh_mm(t).map(|minute| Schedule::Daily { minute }),
            ["weekly", d, t] => DAYS
                .iter()
                .position(|x| d.eq_ignore_ascii_case(x))
                .zip(hh_mm(t))
                .map(|(day, m)| Schedule::Weekly {
                    minute: day as u64 * 1440 + m,
                }),
            _ => None,
        };
        parsed.ok_or_else(|| {
            format!("schedule {s:?}: expected `daily HH:MM`, `weekly mon HH:MM`, `every 6h` (m, h, d), `hourly` or `always` (UTC)")
        })
    }

    /// Whether a run at `now` (Unix ms) is due, the last successful one having started at
    /// `last_ok`.
    pub fn due(&self, last_ok: Option<u64>, now: u64) -> bool {
        let Some(last) = last_ok else { return true };
        match *self {
            Schedule::Always => true,
            Schedule::Every { ms } => now.saturating_sub(last) >= ms - ms / 20,
            Schedule::Daily { minute } => last < latest(now, DAY_MS, 0, minute * MINUTE_MS),
            // The Unix epoch was a Thursday: Monday 00:00 is 4 days further on.
            Schedule::Weekly { minute } => {
                last < latest(now, WEEK_MS, 4 * DAY_MS, minute * MINUTE_MS)
            }
        }
    }
}

/// `every`'s `N{m,h,d}` in milliseconds (at least one minute).
fn every(n: &str) -> Option<u64> {
    let (num, unit) = n.split_at(n.len().checked_sub(1)?);
    let unit = match unit {
        "m" => MINUTE_MS,
        "h" => 60 * MINUTE_MS,
        "d" => DAY_MS,
        _ => return None,
    };
    num.parse::<u64>().ok().filter(|n| *n > 0).map(|n| n * unit)
}

/// The latest instant ≤ `now` that lies `offset` into a period of `period` ms, periods
/// starting at `start` (mod `period`).
fn latest(now: u64, period: u64, start: u64, offset: u64) -> u64 {
    let phase = (start + offset) % period;
    now - (now + period - phase) % period
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// 2026-12-01 (a Tuesday) at HH:MM UTC.
    fn at(h: u64, m: u64) -> u64 {
        1_796_083_200_000 + (h * 60 + m) * MINUTE_MS
    }

    #[test]
    fn the_epoch_day_of_the_tests() {
        assert_eq!(
            crate::coord::rfc3339(at(0, 0) / 1000),
            "2026-12-01T00:00:00Z"
        );
    }

    #[test]
    fn daily() {
        let s = Schedule::parse("daily 02:00").unwrap();
        assert!(s.due(None, at(1, 0)));
        // Last at 02:00:05 today: not due until 02:00 tomorrow.
        let last = at(2, 0) + 5_000;
        assert!(!s.due(Some(last), at(23, 59)));
        assert!(s.due(Some(last), at(2, 0) + DAY_MS));
        // Last yesterday at 02:10: due from today's 02:00, not before.
        let last = at(2, 10) - DAY_MS;
        assert!(!s.due(Some(last), at(1, 59)));
        assert!(s.due(Some(last), at(2, 0)));
    }

    #[test]
    fn weekly_and_every() {
        let s = Schedule::parse("weekly tue 03:00").unwrap();
        let last = at(3, 1) - WEEK_MS;
        assert!(!s.due(Some(last), at(2, 59)));
        assert!(s.due(Some(last), at(3, 0)));
        assert!(!s.due(Some(at(3, 1)), at(3, 0) + 6 * DAY_MS));
        let s = Schedule::parse("every 6h").unwrap();
        assert!(!s.due(Some(at(0, 0)), at(5, 0)));
        assert!(s.due(Some(at(0, 0)), at(5, 50)), "5 % early is on time");
        assert!(Schedule::parse("always")
            .unwrap()
            .due(Some(at(1, 0)), at(1, 0)));
        for bad in [
            "daily",
            "daily 2:00",
            "weekly xyz 02:00",
            "every 0h",
            "every 6",
            "cron * * *",
        ] {
            assert!(Schedule::parse(bad).is_err(), "{bad}");
        }
    }
}
