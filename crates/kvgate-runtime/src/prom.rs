//! Prometheus text exposition (format 0.0.4), written by hand: the servers export a few dozen
//! series, several with colons in their names (vLLM's), which this keeps exact.

use axum::http::header;
use axum::response::{IntoResponse, Response};
use std::collections::HashSet;
use std::fmt::Write as _;
use std::sync::Mutex;

/// A fixed-bucket histogram that many tasks observe into.
pub struct Histogram {
    bounds: Vec<f64>,
    state: Mutex<HistogramSnapshot>,
}

#[derive(Clone, Debug, Default)]
pub struct HistogramSnapshot {
    /// Per bucket (not cumulative), one per bound.
    pub counts: Vec<u64>,
    pub count: u64,
    pub sum: f64,
}

impl Histogram {
    /// `bounds` are the buckets' upper limits, increasing.
    pub fn new(bounds: &[f64]) -> Self {
        Self {
            bounds: bounds.to_vec(),
            state: Mutex::new(HistogramSnapshot {
                counts: vec![0; bounds.len()],
                count: 0,
                sum: 0.0,
            }),
        }
    }

    pub fn observe(&self, v: f64) {
        let mut s = match self.state.lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        };
        if let Some(i) = self.bounds.iter().position(|b| v <= *b) {
            s.counts[i] += 1;
        }
        s.count += 1;
        s.sum += v;
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        match self.state.lock() {
            Ok(s) => s.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }
}

#[derive(Default)]
pub struct PromText {
    out: String,
    described: HashSet<String>,
}

/// Escapes a label value.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl PromText {
    pub fn new() -> Self {
        Self::default()
    }

    fn sample(&mut self, kind: &str, name: &str, help: &str, labels: &[(&str, &str)], value: f64) {
        if self.described.insert(name.to_string()) {
            let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        }
        self.line(name, labels, value);
    }

    fn line(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"{}\"", escape(v));
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
    }

    pub fn counter(&mut self, name: &str, help: &str, labels: &[(&str, &str)], value: f64) {
        self.sample("counter", name, help, labels, value);
    }

    pub fn gauge(&mut self, name: &str, help: &str, labels: &[(&str, &str)], value: f64) {
        self.sample("gauge", name, help, labels, value);
    }

    /// A histogram from its cumulative bucket counts.
    pub fn histogram(&mut self, name: &str, help: &str, labels: &[(&str, &str)], h: &Histogram) {
        if self.described.insert(name.to_string()) {
            let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} histogram");
        }
        let snap = h.snapshot();
        let bucket = format!("{name}_bucket");
        let mut cumulative = 0u64;
        for (le, n) in h.bounds.iter().zip(&snap.counts) {
            cumulative += n;
            let le = le.to_string();
            let mut l: Vec<(&str, &str)> = labels.to_vec();
            l.push(("le", &le));
            self.line(&bucket, &l, cumulative as f64);
        }
        let mut l: Vec<(&str, &str)> = labels.to_vec();
        l.push(("le", "+Inf"));
        self.line(&bucket, &l, snap.count as f64);
        self.line(&format!("{name}_sum"), labels, snap.sum);
        self.line(&format!("{name}_count"), labels, snap.count as f64);
    }

    pub fn into_response(self) -> Response {
        (
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            self.out,
        )
            .into_response()
    }

    pub fn as_str(&self) -> &str {
        &self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describes_each_metric_once_and_escapes_labels() {
        let mut p = PromText::new();
        p.counter("a_total", "A.", &[("w", "x\"y")], 1.0);
        p.counter("a_total", "A.", &[("w", "z")], 2.0);
        p.gauge("vllm:b", "B.", &[], 0.5);
        assert_eq!(
            p.as_str(),
            "# HELP a_total A.\n# TYPE a_total counter\na_total{w=\"x\\\"y\"} 1\na_total{w=\"z\"} 2\n# HELP vllm:b B.\n# TYPE vllm:b gauge\nvllm:b 0.5\n"
        );
    }

    #[test]
    fn histograms_are_cumulative_with_sum_and_count() {
        let h = Histogram::new(&[0.1, 1.0]);
        h.observe(0.05);
        h.observe(0.5);
        h.observe(7.0);
        let mut p = PromText::new();
        p.histogram("d_seconds", "D.", &[("m", "x")], &h);
        assert_eq!(
            p.as_str(),
            "# HELP d_seconds D.\n# TYPE d_seconds histogram\nd_seconds_bucket{m=\"x\",le=\"0.1\"} 1\nd_seconds_bucket{m=\"x\",le=\"1\"} 2\nd_seconds_bucket{m=\"x\",le=\"+Inf\"} 3\nd_seconds_sum{m=\"x\"} 7.55\nd_seconds_count{m=\"x\"} 3\n"
        );
    }
}
