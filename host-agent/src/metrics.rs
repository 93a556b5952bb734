//! Prometheus metrics as text: the families [`Scrape`] holds, written by the
//! `prometheus-client` crate (the Prometheus project's Rust client) in Prometheus' text
//! format 0.0.4: HELP and TYPE lines, counters named with `_total`, label values escaped
//! (`\\`, `\"`, `\n`), so a virtual LU named with a quote or a newline cannot break a
//! scrape. [`crate::control`] fills a `Scrape` from the agent at each scrape and serves it
//! on the control socket and on `listen.metrics`.
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

/// The `Content-Type` of the text: Prometheus' text format 0.0.4.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// One sample's labels, in order (empty: the sample is written without braces).
pub type Labels = Vec<(&'static str, String)>;

/// One metric family: its name (without `_total`: the encoder adds it to counters), help,
/// type and samples.
#[derive(Debug)]
struct Family {
    name: &'static str,
    help: &'static str,
    kind: MetricType,
    samples: Vec<(Labels, u64)>,
}

/// The metrics as read at one scrape.
#[derive(Debug, Default)]
pub struct Scrape {
    families: Vec<Family>,
}

impl Scrape {
    /// Add a family; `samples` with empty labels are written without braces.
    fn add(
        &mut self,
        name: &'static str,
        help: &'static str,
        kind: MetricType,
        samples: Vec<(Labels, u64)>,
    ) {
        self.families.push(Family {
            name,
            help,
            kind,
            samples,
        });
    }

    /// A gauge family: a value now.
    pub fn gauge(&mut self, name: &'static str, help: &'static str, samples: Vec<(Labels, u64)>) {
        self.add(name, help, MetricType::Gauge, samples);
    }

    /// A counter family (named `NAME_total` in the text): a count that only grows, or
    /// starts again from 0.
    pub fn counter(&mut self, name: &'static str, help: &'static str, samples: Vec<(Labels, u64)>) {
        self.add(name, help, MetricType::Counter, samples);
    }

    /// The exposition text.
    pub fn text(self) -> String {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(self));
        let mut out = String::new();
        // Writing to a String fails only if a value's Display does, which ours do not.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &registry);
        out
    }
}

fn encode_value(
    kind: MetricType,
    v: u64,
    e: prometheus_client::encoding::MetricEncoder<'_>,
) -> std::fmt::Result {
    match kind {
        MetricType::Counter => ConstCounter::new(v).encode(e),
        _ => ConstGauge::new(v).encode(e),
    }
}

impl Collector for Scrape {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> std::fmt::Result {
        for f in &self.families {
            let mut m = encoder.encode_descriptor(f.name, f.help, None, f.kind)?;
            match f.samples.as_slice() {
                [(labels, v)] if labels.is_empty() => encode_value(f.kind, *v, m)?,
                samples => {
                    for (labels, v) in samples {
                        encode_value(f.kind, *v, m.encode_family(labels)?)?;
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped_and_counters_end_in_total() {
        let mut s = Scrape::default();
        let name = "a\"b\\c\nd".to_string();
        s.gauge(
            "hvm_recorded_lbas",
            "LBAs recorded.",
            vec![(
                vec![
                    ("vlu", name),
                    ("backend", "b0".into()),
                    ("mode", "Snapshot".into()),
                ],
                16,
            )],
        );
        s.counter(
            "hvm_journal_flushes",
            "Journal flushes (fdatasync).",
            vec![(vec![("backend", "b0".into())], 3)],
        );
        s.gauge("hvm_x", "x.", vec![(vec![], 1)]);
        let text = s.text();
        assert!(
            text.contains(
                "hvm_recorded_lbas{vlu=\"a\\\"b\\\\c\\nd\",backend=\"b0\",mode=\"Snapshot\"} 16\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("# TYPE hvm_journal_flushes_total counter\nhvm_journal_flushes_total{backend=\"b0\"} 3\n"),
            "{text}"
        );
        assert!(text.contains("\nhvm_x 1\n"), "{text}");
        assert_eq!(text.lines().count(), 9, "{text}");
    }
}
