//! What the benchmarks in `tests/benches/` share: their settings from the environment and
//! the median they print.

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
}
