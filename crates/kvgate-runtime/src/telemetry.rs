//! OpenTelemetry traces: off unless the standard `OTEL_*` variables ask for them, exported over
//! OTLP/gRPC, and W3C trace context (`traceparent`, `tracestate`) read from and written to
//! requests so that one gateway request is one trace across Envoy, the EPP, the sidecar and
//! the engine.
//!
//! Traces are on when `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or `OTEL_EXPORTER_OTLP_ENDPOINT` is
//! set, unless `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none`. The SDK itself reads
//! the rest: `OTEL_SERVICE_NAME` (else the command's name, e.g. `kvgate-epp`),
//! `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER[_ARG]`, `OTEL_BSP_*`,
//! `OTEL_EXPORTER_OTLP_[TRACES_]{HEADERS,TIMEOUT,COMPRESSION}`. Only the `grpc` protocol is
//! built in; `OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL` naming another is refused at start-up.

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use std::sync::OnceLock;
use tracing_opentelemetry::OpenTelemetrySpanExt;

static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();

/// The names of the spans kvgate opens, for the docs and the tests.
pub mod spans {
    /// The EPP's handling of one request body: parse, tokenize, score, book.
    pub const EPP_ROUTE: &str = "epp.route";
    pub const PARSE: &str = "parse";
    pub const TOKENIZE: &str = "tokenize";
    pub const SCORE: &str = "score";
    pub const BOOK: &str = "book";
    /// One request through `kvgate frontend`.
    pub const FRONTEND_REQUEST: &str = "frontend.request";
    /// One generation in `kvgate mocker`.
    pub const MOCKER_GENERATE: &str = "mocker.generate";
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// Whether the environment asks for traces.
pub fn enabled() -> bool {
    let disabled = env("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true"))
        || env("OTEL_TRACES_EXPORTER").is_some_and(|v| v.eq_ignore_ascii_case("none"));
    !disabled
        && (env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_some()
            || env("OTEL_EXPORTER_OTLP_ENDPOINT").is_some())
}

/// The tracing layer that exports spans, or `None` when traces are off. Must be called inside
/// a Tokio runtime (the gRPC channel lives on it). `service` names the process when
/// `OTEL_SERVICE_NAME` does not.
pub fn layer<S>(
    service: &str,
) -> Result<
    Option<tracing_opentelemetry::OpenTelemetryLayer<S, opentelemetry_sdk::trace::Tracer>>,
    String,
>
where
    S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
{
    if !enabled() {
        return Ok(None);
    }
    for var in [
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        "OTEL_EXPORTER_OTLP_PROTOCOL",
    ] {
        if let Some(p) = env(var) {
            if p != "grpc" {
                return Err(format!(
                    "{var}={p}: kvgate exports traces over OTLP/gRPC only; set it to grpc (port 4317)"
                ));
            }
            break;
        }
    }
    use opentelemetry_otlp::WithExportConfig as _;
    let mut exporter = opentelemetry_otlp::SpanExporter::builder().with_tonic();
    // The SDK reads the endpoint variables itself; a bare host:port is made a URL here, since
    // the gRPC client wants a scheme.
    if let Some(ep) =
        env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").or_else(|| env("OTEL_EXPORTER_OTLP_ENDPOINT"))
        && !ep.contains("://")
    {
        exporter = exporter.with_endpoint(format!("http://{ep}"));
    }
    let exporter = exporter
        .build()
        .map_err(|e| format!("OTLP trace exporter: {e}"))?;
    let mut resource = opentelemetry_sdk::Resource::builder();
    if env("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name(service.to_string());
    }
    let provider = SdkTracerProvider::builder()
        .with_resource(resource.build())
        .with_batch_exporter(exporter)
        .build();
    let tracer = provider.tracer("kvgate");
    let _ = PROVIDER.set(provider);
    Ok(Some(tracing_opentelemetry::layer().with_tracer(tracer)))
}

/// Flushes and stops the exporter (at process exit: spans still queued are sent).
pub fn shutdown() {
    if let Some(p) = PROVIDER.get() {
        let _ = p.shutdown();
    }
}

/// The W3C trace context a request carried.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TraceHeaders {
    pub traceparent: Option<String>,
    pub tracestate: Option<String>,
}

/// Longest trace header kept: W3C caps `tracestate` at 32 members of bounded size; anything
/// longer is not a trace context and is not carried.
const MAX_TRACE_HEADER: usize = 1024;

impl TraceHeaders {
    /// Picks `traceparent` and `tracestate` (any case) out of header pairs.
    pub fn from_pairs<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        let mut t = Self::default();
        for (k, v) in pairs {
            if v.len() > MAX_TRACE_HEADER {
                continue;
            }
            if k.eq_ignore_ascii_case("traceparent") {
                t.traceparent = Some(v.to_string());
            } else if k.eq_ignore_ascii_case("tracestate") {
                t.tracestate = Some(v.to_string());
            }
        }
        t
    }

    pub fn from_http(headers: &axum::http::HeaderMap) -> Self {
        Self::from_pairs(
            headers
                .iter()
                .filter_map(|(k, v)| v.to_str().ok().map(|v| (k.as_str(), v))),
        )
    }

    pub fn is_empty(&self) -> bool {
        self.traceparent.is_none()
    }

    /// The parent context these headers name (an empty context when they name none or are
    /// malformed: the span then starts a trace of its own).
    pub fn context(&self) -> opentelemetry::Context {
        TraceContextPropagator::new().extract(self)
    }

    /// Makes `span` a child of the trace these headers name.
    pub fn adopt(&self, span: &tracing::Span) {
        if !self.is_empty() {
            let _ = span.set_parent(self.context());
        }
    }

    /// The headers that carry `span`'s context onward (empty when traces are off).
    pub fn of_span(span: &tracing::Span) -> Self {
        let mut t = Self::default();
        TraceContextPropagator::new().inject_context(&span.context(), &mut t);
        t
    }

    /// The headers as (name, value) pairs, to add to an outgoing request.
    pub fn pairs(&self) -> impl Iterator<Item = (&'static str, &str)> {
        [
            ("traceparent", self.traceparent.as_deref()),
            ("tracestate", self.tracestate.as_deref()),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.map(|v| (k, v)))
    }
}

impl Extractor for TraceHeaders {
    fn get(&self, key: &str) -> Option<&str> {
        match key {
            "traceparent" => self.traceparent.as_deref(),
            "tracestate" => self.tracestate.as_deref(),
            _ => None,
        }
    }

    fn keys(&self) -> Vec<&str> {
        self.pairs().map(|(k, _)| k).collect()
    }
}

impl Injector for TraceHeaders {
    fn set(&mut self, key: &str, value: String) {
        match key {
            "traceparent" => self.traceparent = Some(value),
            "tracestate" if !value.is_empty() => self.tracestate = Some(value),
            _ => {}
        }
    }
}

/// The trace id of the current span, when traces are on and it is sampled (for exemplars).
pub fn current_trace_id() -> Option<String> {
    use opentelemetry::trace::TraceContextExt as _;
    let cx = tracing::Span::current().context();
    let sc = cx.span().span_context().clone();
    (sc.is_valid() && sc.is_sampled()).then(|| sc.trace_id().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::TraceContextExt as _;

    #[test]
    fn reads_w3c_headers_in_any_case_and_drops_oversized_ones() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let long = "x".repeat(MAX_TRACE_HEADER + 1);
        let t = TraceHeaders::from_pairs([("TraceParent", tp), ("tracestate", long.as_str())]);
        assert_eq!(t.traceparent.as_deref(), Some(tp));
        assert_eq!(t.tracestate, None);
        let cx = t.context();
        let sc = cx.span().span_context().clone();
        assert!(sc.is_valid() && sc.is_remote() && sc.is_sampled());
        assert_eq!(
            sc.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
    }

    #[test]
    fn malformed_traceparent_names_no_parent() {
        for bad in [
            "",
            "garbage",
            "00-zz-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        ] {
            let t = TraceHeaders::from_pairs([("traceparent", bad)]);
            assert!(!t.context().span().span_context().is_valid(), "{bad}");
        }
    }

    #[test]
    fn spans_without_an_exporter_carry_no_context() {
        let span = tracing::info_span!("x");
        assert!(TraceHeaders::of_span(&span).is_empty());
    }
}
