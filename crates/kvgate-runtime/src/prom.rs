//! Prometheus text exposition (format 0.0.4), written by hand: the servers export a few dozen
//! series, several with colons in their names (vLLM's), which this keeps exact.

use axum::http::header;
use axum::response::{IntoResponse, Response};
use std::collections::HashSet;
use std::fmt::Write as _;

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
}
