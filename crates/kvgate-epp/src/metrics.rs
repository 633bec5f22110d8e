//! The EPP's Prometheus series (GAIE names where GAIE has one, `kvgate_*` otherwise) and the
//! HTTP server on the metrics port: `/metrics`, `/debug/decisions?n=N`, `/debug/load` (booked
//! load per worker rank, own and other replicas'), `/debug/index` (the
//! blocks the router believes each worker rank caches), `/health`.

use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use kvgate_runtime::prom::{Histogram, Scrape, histogram};
use kvgate_runtime::routing::RoutingService;
use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];
const RATIO_BUCKETS: &[f64] = &[0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0];
const TOKEN_BUCKETS: &[f64] = &[
    64.0, 256.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0, 32768.0, 65536.0, 131072.0,
];

pub struct Metrics {
    pool: String,
    requests: Mutex<HashMap<String, u64>>,
    errors: Mutex<HashMap<(String, u16), u64>>,
    responses: Mutex<HashMap<u16, u64>>,
    pub streams_active: AtomicI64,
    /// Streams that ended with a booking still open (client abort, reset).
    pub aborted: AtomicU64,
    pub scheduler_seconds: Histogram,
    /// Request headers to the end of the body (Envoy streaming the body to the EPP).
    pub body_seconds: Histogram,
    pub parse_seconds: Histogram,
    pub processing_seconds: Histogram,
    pub tokenize_seconds: Histogram,
    pub hit_ratio: Histogram,
    pub input_tokens: Histogram,
}

fn bump<K: std::hash::Hash + Eq>(m: &Mutex<HashMap<K, u64>>, k: K) {
    let mut g = match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    };
    *g.entry(k).or_insert(0) += 1;
}

fn sorted<K: Clone + Ord>(m: &Mutex<HashMap<K, u64>>) -> Vec<(K, u64)> {
    let g = match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    };
    let mut v: Vec<(K, u64)> = g.iter().map(|(k, n)| (k.clone(), *n)).collect();
    v.sort();
    v
}

impl Metrics {
    pub fn new(pool: &str) -> Self {
        Self {
            pool: pool.to_string(),
            requests: Mutex::default(),
            errors: Mutex::default(),
            responses: Mutex::default(),
            streams_active: AtomicI64::new(0),
            aborted: AtomicU64::new(0),
            scheduler_seconds: histogram(LATENCY_BUCKETS),
            body_seconds: histogram(LATENCY_BUCKETS),
            parse_seconds: histogram(LATENCY_BUCKETS),
            processing_seconds: histogram(LATENCY_BUCKETS),
            tokenize_seconds: histogram(LATENCY_BUCKETS),
            hit_ratio: histogram(RATIO_BUCKETS),
            input_tokens: histogram(TOKEN_BUCKETS),
        }
    }

    pub fn count_request(&self, model: &str) {
        bump(&self.requests, model.to_string());
    }

    pub fn count_error(&self, model: &str, code: u16) {
        bump(&self.errors, (model.to_string(), code));
    }

    pub fn count_response(&self, code: u16) {
        bump(&self.responses, code);
    }

    pub fn render(&self, service: &RoutingService) -> Scrape {
        let mut p = Scrape::new();
        for (model, n) in sorted(&self.requests) {
            p.counter(
                "inference_objective_request_total",
                "Requests routed, by model.",
                &[("model_name", &model), ("target_model_name", &model)],
                n as f64,
            );
        }
        for ((model, code), n) in sorted(&self.errors) {
            let code = code.to_string();
            p.counter(
                "inference_objective_request_error_total",
                "Requests answered with an error by the EPP, by model and HTTP status.",
                &[
                    ("model_name", &model),
                    ("target_model_name", &model),
                    ("error_code", &code),
                ],
                n as f64,
            );
        }
        for (code, n) in sorted(&self.responses) {
            let code = code.to_string();
            p.counter(
                "kvgate_epp_upstream_responses_total",
                "Responses from workers seen on the response path, by HTTP status.",
                &[("code", &code)],
                n as f64,
            );
        }
        let pool = [("name", self.pool.as_str())];
        p.gauge(
            "inference_pool_ready_pods",
            "Workers the EPP may route to.",
            &pool,
            service.workers().current().workers.len() as f64,
        );
        p.histogram(
            "inference_extension_scheduler_e2e_duration_seconds",
            "Time to choose a worker (scoring, admission, booking).",
            &[],
            &self.scheduler_seconds,
        );
        p.histogram(
            "kvgate_epp_request_body_seconds",
            "From the request headers to the last request body byte (the body streaming from the gateway).",
            &[],
            &self.body_seconds,
        );
        p.histogram(
            "kvgate_epp_parse_seconds",
            "Parsing the OpenAI request body.",
            &[],
            &self.parse_seconds,
        );
        p.histogram(
            "kvgate_epp_request_processing_seconds",
            "From the last request body byte to the routed answer (parse, tokenize, route, rewrite).",
            &[],
            &self.processing_seconds,
        );
        p.histogram(
            "kvgate_epp_tokenize_seconds",
            "Prompt tokenization (chat template included).",
            &[],
            &self.tokenize_seconds,
        );
        p.histogram(
            "inference_extension_prefix_indexer_hit_ratio",
            "Share of each routed prompt predicted cached on the chosen worker.",
            &[],
            &self.hit_ratio,
        );
        p.histogram(
            "inference_objective_input_tokens",
            "Prompt tokens per routed request.",
            &[],
            &self.input_tokens,
        );
        p.gauge(
            "kvgate_epp_streams_active",
            "Open ext_proc streams (requests in flight through the gateway).",
            &[],
            self.streams_active.load(Ordering::Relaxed) as f64,
        );
        p.counter(
            "kvgate_epp_streams_aborted_total",
            "Streams that ended before the response did (client abort, reset); their load was freed.",
            &[],
            self.aborted.load(Ordering::Relaxed) as f64,
        );
        service.render_metrics(&mut p);
        p
    }
}

#[derive(Clone)]
pub struct MetricsState {
    pub metrics: Arc<Metrics>,
    pub service: Arc<RoutingService>,
}

pub fn app(state: MetricsState) -> axum::Router {
    axum::Router::new()
        .route("/metrics", axum::routing::get(metrics))
        .route("/debug/decisions", axum::routing::get(decisions))
        .route(
            "/debug/index",
            axum::routing::get(
                |State(s): State<MetricsState>, Query(q): Query<HashMap<String, String>>| async move {
                    let reachable = q.get("reachable").is_some_and(|v| v == "1" || v == "true");
                    axum::Json(s.service.index_dump(reachable)).into_response()
                },
            ),
        )
        .route(
            "/debug/load",
            axum::routing::get(|State(s): State<MetricsState>| async move {
                axum::Json(s.service.load_dump()).into_response()
            }),
        )
        .route("/health", axum::routing::get(|| async { "ok" }))
        .fallback(kvgate_runtime::http::not_found)
        .with_state(state)
}

async fn metrics(State(s): State<MetricsState>) -> Response {
    s.metrics.render(&s.service).into_response()
}

/// The last `n` decisions (default 20), newest first: candidates with overlap, load and cost.
async fn decisions(
    State(s): State<MetricsState>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let n = q.get("n").and_then(|v| v.parse().ok()).unwrap_or(20usize);
    axum::Json(serde_json::json!({ "decisions": s.service.recent_decisions(n) })).into_response()
}
