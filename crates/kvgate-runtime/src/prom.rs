//! Prometheus exposition through `prometheus-client` (OpenMetrics text).
//!
//! Most of kvgate's series are read at scrape time from state the servers keep anyway (atomics,
//! the router's load table), so each `/metrics` answer gathers a [`Scrape`]: samples grouped
//! into families in first-seen order, then encoded by `prometheus-client` as a
//! [`Collector`]. Latency distributions are live [`Histogram`]s observed on the request path.
//! Names are kept exactly, colons included (vLLM's `vllm:*`), since dashboards script against
//! them.

use axum::http::header;
use axum::response::{IntoResponse, Response};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use std::collections::HashMap;

pub use prometheus_client::metrics::histogram::Histogram;

/// A histogram whose buckets carry an exemplar: the trace id of a recent observation.
pub type TracedHistogram =
    prometheus_client::metrics::exemplar::HistogramWithExemplars<Vec<(String, String)>>;

/// A [`TracedHistogram`] with the given upper bucket bounds.
pub fn traced_histogram(bounds: &[f64]) -> TracedHistogram {
    TracedHistogram::new(bounds.iter().copied())
}

/// Observes `v`, with the current span's trace id as the exemplar when traces are on.
pub fn observe_traced(h: &TracedHistogram, v: f64) {
    let exemplar = crate::telemetry::current_trace_id().map(|t| vec![("trace_id".to_string(), t)]);
    h.observe(v, exemplar, None);
}

/// The content type of [`Scrape::into_response`].
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A histogram with the given upper bucket bounds (increasing; `+Inf` is implied).
pub fn histogram(bounds: &[f64]) -> Histogram {
    Histogram::new(bounds.iter().copied())
}

#[derive(Debug, Clone)]
enum Value {
    Counter(f64),
    Gauge(f64),
    Histogram(Histogram),
    Traced(TracedHistogram),
}

type Labels = Vec<(String, String)>;

#[derive(Debug)]
struct Family {
    kind: MetricType,
    help: String,
    samples: Vec<(Labels, Value)>,
}

/// One scrape's samples, grouped by family. Adding a sample to a family already seen appends
/// to it, so callers may interleave families (per-worker loops) and still get one descriptor
/// per family.
#[derive(Debug, Default)]
pub struct Scrape {
    order: Vec<String>,
    families: HashMap<String, Family>,
}

impl Scrape {
    pub fn new() -> Self {
        Self::default()
    }

    fn add(&mut self, kind: MetricType, name: &str, help: &str, labels: &[(&str, &str)], v: Value) {
        let fam = self.families.entry(name.to_string()).or_insert_with(|| {
            self.order.push(name.to_string());
            Family {
                kind,
                help: help.to_string(),
                samples: Vec::new(),
            }
        });
        // One name, one type: a second type under a name seen before would be invalid
        // exposition, so such a sample is dropped (a programming error, caught in tests).
        debug_assert!(
            std::mem::discriminant(&fam.kind) == std::mem::discriminant(&kind),
            "metric {name} registered with two types"
        );
        if std::mem::discriminant(&fam.kind) != std::mem::discriminant(&kind) {
            return;
        }
        let labels = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        fam.samples.push((labels, v));
    }

    /// A counter sample. `name` is the exposed name and ends in `_total` (OpenMetrics adds the
    /// suffix to the family name itself).
    pub fn counter(&mut self, name: &str, help: &str, labels: &[(&str, &str)], value: f64) {
        debug_assert!(name.ends_with("_total"), "counter {name} without _total");
        let family = name.strip_suffix("_total").unwrap_or(name);
        self.add(
            MetricType::Counter,
            family,
            help,
            labels,
            Value::Counter(value),
        );
    }

    pub fn gauge(&mut self, name: &str, help: &str, labels: &[(&str, &str)], value: f64) {
        self.add(MetricType::Gauge, name, help, labels, Value::Gauge(value));
    }

    /// A live histogram's current state (the handle is shared, not copied).
    pub fn histogram(&mut self, name: &str, help: &str, labels: &[(&str, &str)], h: &Histogram) {
        self.add(
            MetricType::Histogram,
            name,
            help,
            labels,
            Value::Histogram(h.clone()),
        );
    }

    /// A live histogram with exemplars.
    pub fn traced_histogram(
        &mut self,
        name: &str,
        help: &str,
        labels: &[(&str, &str)],
        h: &TracedHistogram,
    ) {
        self.add(
            MetricType::Histogram,
            name,
            help,
            labels,
            Value::Traced(h.clone()),
        );
    }

    /// The OpenMetrics text of this scrape.
    pub fn encode(self) -> String {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(self));
        let mut out = String::new();
        // Writing into a String cannot fail; an encoder error would leave a partial text,
        // which the scraper rejects as a whole (no EOF marker).
        let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        out
    }

    pub fn into_response(self) -> Response {
        (
            [(header::CONTENT_TYPE, OPENMETRICS_CONTENT_TYPE)],
            self.encode(),
        )
            .into_response()
    }
}

/// Integral values are written as integers (`6`, not `6.0`): scripts and tests read them so.
fn encode_value(v: &Value, enc: prometheus_client::encoding::MetricEncoder) -> std::fmt::Result {
    const EXACT: f64 = 9_007_199_254_740_992.0; // 2^53
    match v {
        Value::Counter(x) if x.fract() == 0.0 && *x >= 0.0 && *x < EXACT => {
            ConstCounter::new(*x as u64).encode(enc)
        }
        Value::Counter(x) => ConstCounter::new(*x).encode(enc),
        Value::Gauge(x) if x.fract() == 0.0 && x.abs() < EXACT => {
            ConstGauge::new(*x as i64).encode(enc)
        }
        Value::Gauge(x) => ConstGauge::new(*x).encode(enc),
        Value::Histogram(h) => h.encode(enc),
        Value::Traced(h) => h.encode(enc),
    }
}

impl Collector for Scrape {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for name in &self.order {
            let Some(fam) = self.families.get(name) else {
                continue;
            };
            let mut m = encoder.encode_descriptor(name, &fam.help, None, fam.kind)?;
            for (labels, v) in &fam.samples {
                encode_value(v, m.encode_family(labels)?)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_families_escapes_labels_and_keeps_colons() {
        let mut p = Scrape::new();
        p.counter("a_total", "A.", &[("w", "x\"y")], 1.0);
        p.gauge("vllm:b", "B.", &[], 0.5);
        p.counter("a_total", "A.", &[("w", "z")], 2.0);
        assert_eq!(
            p.encode(),
            "# HELP a A.\n# TYPE a counter\na_total{w=\"x\\\"y\"} 1\na_total{w=\"z\"} 2\n# HELP vllm:b B.\n# TYPE vllm:b gauge\nvllm:b 0.5\n# EOF\n"
        );
    }

    #[test]
    fn histograms_are_cumulative_with_sum_and_count() {
        let h = histogram(&[0.1, 1.0]);
        h.observe(0.05);
        h.observe(0.5);
        h.observe(7.0);
        let mut p = Scrape::new();
        p.histogram("d_seconds", "D.", &[("m", "x")], &h);
        let text = p.encode();
        for line in [
            "# TYPE d_seconds histogram",
            "d_seconds_bucket{le=\"0.1\",m=\"x\"} 1",
            "d_seconds_bucket{le=\"1.0\",m=\"x\"} 2",
            "d_seconds_bucket{le=\"+Inf\",m=\"x\"} 3",
            "d_seconds_sum{m=\"x\"} 7.55",
            "d_seconds_count{m=\"x\"} 3",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
        }
    }

    #[test]
    fn traced_histograms_carry_the_trace_id_as_exemplar() {
        let h = traced_histogram(&[0.1, 1.0]);
        h.observe(0.5, Some(vec![("trace_id".into(), "abc".into())]), None);
        observe_traced(&h, 0.05); // no span with a trace: no exemplar
        let mut p = Scrape::new();
        p.traced_histogram("d_seconds", "D.", &[], &h);
        let t = p.encode();
        assert!(
            t.contains("d_seconds_bucket{le=\"1.0\"} 2 # {trace_id=\"abc\"} 0.5"),
            "{t}"
        );
        assert!(t.contains("d_seconds_bucket{le=\"0.1\"} 1\n"), "{t}");
    }

    #[test]
    fn integral_values_print_as_integers() {
        let mut p = Scrape::new();
        p.gauge("g", "G.", &[], -3.0);
        p.counter("c_total", "C.", &[], 0.25);
        let t = p.encode();
        assert!(
            t.contains("\ng -3\n") && t.contains("\nc_total 0.25\n"),
            "{t}"
        );
    }
}
