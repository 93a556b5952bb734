//! What the benchmarks in `tests/benches/` share: their settings from the environment, the
//! median and load average they print, and the CPU clock they read.

use std::time::Duration;

/// The value of the environment variable `name` parsed as a `T`, or `default` when it is
/// unset or does not parse.
pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// The median of `v` (the upper one of an even count): one round disturbed by the host
/// (writeback, a neighbour) moves it least. Panics on an empty slice.
pub fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The load average over 1, 5 and 15 minutes, as `/proc/loadavg` has it ("?" when it
/// cannot be read).
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

/// The calling thread's CPU time: other load takes turns on the cores, so a bench that
/// counts this thread's work reads this clock, not the wall clock.
pub fn thread_cpu() -> Duration {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID)
        .expect("the thread CPU clock");
    Duration::from(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_median_is_the_middle_value_in_order() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 3.0);
    }

    #[test]
    fn env_or_falls_back_when_unset_or_unparsable() {
        assert_eq!(env_or("HVM_TESTS_BENCH_UNSET_VARIABLE", 7u32), 7);
        assert_eq!(env_or("PATH", 5usize), 5);
    }

    #[test]
    fn thread_cpu_counts_this_threads_work_only() {
        let before = thread_cpu();
        let mut x = 0u64;
        for i in 0..5_000_000u64 {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
        }
        assert!(thread_cpu() > before, "{x}");
        let idle = thread_cpu();
        std::thread::sleep(Duration::from_millis(50));
        assert!(thread_cpu() - idle < Duration::from_millis(25));
    }
}
