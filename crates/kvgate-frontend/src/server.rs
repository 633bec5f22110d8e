//! The frontend's HTTP server and forwarding.

use axum::Router as HttpRouter;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::StreamExt;
use kvgate_core::RequestId;
use kvgate_core::config::RouterConfig;
use kvgate_core::random::{RandomSource, SplitMix64};
use kvgate_core::router::RouteError;
use kvgate_runtime::http::{error, method_not_allowed, not_found, read_body};
use kvgate_runtime::prom::Scrape;
use kvgate_runtime::routing::{Booking, DEFAULT_DECISION_LOG, RoutingService};
use kvgate_runtime::telemetry::TraceHeaders;
use kvgate_runtime::workers::WorkerSet;
use kvgate_wire::openai::{Endpoint, OpenAiRequest};
use kvgate_wire::response as resp;
use kvgate_wire::workers::{WorkerEntry, WorkersFile};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tracing::Instrument as _;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RouterMode {
    Direct,
    Kv,
    RoundRobin,
    Random,
}

impl RouterMode {
    pub fn as_str(self) -> &'static str {
        match self {
            RouterMode::Direct => "direct",
            RouterMode::Kv => "kv",
            RouterMode::RoundRobin => "round-robin",
            RouterMode::Random => "random",
        }
    }
}

#[derive(Clone, Debug)]
pub struct FrontendConfig {
    pub host: String,
    pub port: u16,
    pub workers_file: PathBuf,
    pub mode: RouterMode,
    pub router: RouterConfig,
    /// Routing tokenizer (kv mode); default: the workers file's, else the embedded one.
    pub tokenizer: Option<PathBuf>,
    pub max_body_bytes: usize,
    /// kv mode: route on `nvext.token_data` when a request carries it (tokens in).
    pub accept_token_data: bool,
    /// How long a worker may take to answer with response headers.
    pub request_timeout: Duration,
    /// Where kv mode reads KV events.
    pub event_plane: kvgate_runtime::routing::EventPlane,
    /// kv mode: share bookings with the other router replicas over NATS.
    pub replica_sync: Option<kvgate_runtime::replica::ReplicaSyncConfig>,
}

#[derive(Default)]
struct Counters {
    by_code: Mutex<HashMap<u16, u64>>,
    inflight: AtomicU64,
    routed: Mutex<HashMap<String, u64>>,
}

struct AppState {
    config: FrontendConfig,
    workers: WorkerSet,
    client: reqwest::Client,
    kv: Option<Arc<RoutingService>>,
    rr: AtomicU64,
    rng: Mutex<SplitMix64>,
    next_id: AtomicU64,
    counters: Counters,
}

pub async fn serve(
    config: FrontendConfig,
    on_bound: impl FnOnce(SocketAddr),
) -> Result<(), String> {
    let file = WorkersFile::load(&config.workers_file).map_err(|e| e.to_string())?;
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(2))
        .pool_idle_timeout(Duration::from_secs(30))
        .build()
        .map_err(|e| e.to_string())?;
    let (workers, kv) = if config.mode == RouterMode::Kv {
        let svc = RoutingService::new(
            file,
            config.router.clone(),
            config.tokenizer.as_deref(),
            DEFAULT_DECISION_LOG,
        )?;
        svc.start_with(config.workers_file.clone(), config.event_plane.clone());
        if let Some(cfg) = config.replica_sync.clone() {
            // Listen only once the other replicas' load is known.
            svc.start_replica_sync(cfg).ready().await;
        }
        (svc.workers().clone(), Some(svc))
    } else {
        let workers = WorkerSet::new(file);
        workers.watch(config.workers_file.clone(), |_, _| true);
        (workers, None)
    };
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64);
    let state = Arc::new(AppState {
        workers,
        client,
        kv,
        rr: AtomicU64::new(0),
        rng: Mutex::new(SplitMix64::new(seed)),
        next_id: AtomicU64::new(1),
        counters: Counters::default(),
        config,
    });
    let listener = TcpListener::bind((state.config.host.as_str(), state.config.port))
        .await
        .map_err(|e| {
            format!(
                "cannot listen on {}:{}: {e}",
                state.config.host, state.config.port
            )
        })?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let app = HttpRouter::new()
        .route("/v1/chat/completions", post(completions))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/health", get(|| async { "ok" }))
        .route("/metrics", get(metrics))
        .route(
            "/debug/load",
            get(|State(s): State<Arc<AppState>>| async move {
                match &s.kv {
                    Some(kv) => axum::Json(kv.load_dump()).into_response(),
                    None => error(
                        StatusCode::NOT_FOUND,
                        "/debug/load exists in --router-mode kv only",
                        None,
                    ),
                }
            }),
        )
        .route(
            "/debug/index",
            get(|State(s): State<Arc<AppState>>| async move {
                match &s.kv {
                    Some(kv) => axum::Json(kv.index_dump(false)).into_response(),
                    None => error(
                        StatusCode::NOT_FOUND,
                        "/debug/index exists in --router-mode kv only",
                        None,
                    ),
                }
            }),
        )
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(not_found)
        .with_state(state);
    on_bound(addr);
    // Streamed responses are many small writes: without TCP_NODELAY each one after the first
    // waits for the peer's delayed ACK (~40 ms on Linux) on a pooled connection.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp: &mut tokio::net::TcpStream| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, app).await.map_err(|e| e.to_string())
}

async fn models(State(s): State<Arc<AppState>>) -> Response {
    let file = s.workers.current();
    axum::Json(resp::models(&file.model, 0, 0)).into_response()
}

/// Where a request goes.
struct Target {
    worker: WorkerEntry,
    dp_rank: u32,
    booking: Option<Booking>,
    body: bytes::Bytes,
    /// Disaggregated: the prefill leg to run first.
    prefill: Option<PrefillLeg>,
}

/// The prefill half of a disaggregated request.
struct PrefillLeg {
    worker: WorkerEntry,
    dp_rank: u32,
    /// The request as the prefill worker gets it: one token, not streamed, `do_remote_decode`.
    body: bytes::Bytes,
    parsed: Arc<OpenAiRequest>,
}

/// Reads and checks the EPP's prefill headers and prepares the prefill leg.
fn prefill_leg(
    s: &Arc<AppState>,
    headers: &HeaderMap,
    parsed: &Arc<OpenAiRequest>,
) -> Result<PrefillLeg, Box<Response>> {
    let bad = |status: StatusCode, msg: String| Box::new(error(status, &msg, None));
    let id = header_u64(headers, "x-dynamo-prefill-instance-id")
        .map_err(|m| bad(StatusCode::BAD_REQUEST, m))?
        .ok_or_else(|| {
            bad(
                StatusCode::BAD_REQUEST,
                "x-dynamo-routing-mode: disaggregated needs x-dynamo-prefill-instance-id".into(),
            )
        })?;
    let worker = s.workers.by_instance_id(id).ok_or_else(|| {
        bad(
            StatusCode::NOT_FOUND,
            format!("unknown prefill worker instance id {id} (x-dynamo-prefill-instance-id)"),
        )
    })?;
    let rank = header_u64(headers, "x-dynamo-prefill-dp-rank")
        .map_err(|m| bad(StatusCode::BAD_REQUEST, m))?
        .unwrap_or(0);
    if rank >= u64::from(worker.dp_size) {
        return Err(bad(
            StatusCode::BAD_REQUEST,
            format!(
                "x-dynamo-prefill-dp-rank {rank} is out of range for worker {id} (dp_size {})",
                worker.dp_size
            ),
        ));
    }
    let mut body = parsed.body.clone();
    body.insert(
        "kv_transfer_params".into(),
        serde_json::json!({"do_remote_decode": true, "do_remote_prefill": false}),
    );
    body.insert("max_tokens".into(), serde_json::json!(1));
    body.remove("max_completion_tokens");
    body.insert("stream".into(), serde_json::json!(false));
    body.remove("stream_options");
    let bytes = serde_json::to_vec(&serde_json::Value::Object(body)).unwrap_or_default();
    Ok(PrefillLeg {
        worker,
        dp_rank: rank as u32,
        body: bytes::Bytes::from(bytes),
        parsed: Arc::clone(parsed),
    })
}

/// Runs the prefill leg; returns the `kv_transfer_params` the decode leg must carry, or the
/// error response for the client.
async fn run_prefill(
    s: &AppState,
    leg: &PrefillLeg,
    path: &str,
) -> Result<serde_json::Value, Response> {
    let url = format!("{}{}", leg.worker.url.trim_end_matches('/'), path);
    let name = &leg.worker.name;
    let sent = s
        .client
        .post(&url)
        .header(header::CONTENT_TYPE, "application/json")
        .header("x-dynamo-dp-rank", leg.dp_rank.to_string())
        .header(
            "x-dynamo-worker-instance-id",
            leg.worker.instance_id().0.to_string(),
        )
        .body(leg.body.clone());
    let mut sent = sent;
    for (k, v) in TraceHeaders::of_span(&tracing::Span::current()).pairs() {
        sent = sent.header(k, v);
    }
    let sent = sent.send().await;
    let r = sent.map_err(|e| {
        tracing::warn!(worker = %name, %url, error = %e, "prefill worker unreachable");
        error(
            StatusCode::BAD_GATEWAY,
            &format!("prefill worker {name} is unreachable"),
            None,
        )
    })?;
    let status = r.status().as_u16();
    let v: serde_json::Value = r.json().await.unwrap_or(serde_json::Value::Null);
    if !(200..300).contains(&status) {
        let msg = v["error"]["message"].as_str().unwrap_or("no message");
        // The client's own mistakes (4xx) keep their status; the worker's failures are 502.
        let code = if (400..500).contains(&status) {
            StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY)
        } else {
            StatusCode::BAD_GATEWAY
        };
        return Err(error(
            code,
            &format!("prefill worker {name} answered {status}: {msg}"),
            None,
        ));
    }
    match v.get("kv_transfer_params") {
        Some(p) if p.is_object() => Ok(p.clone()),
        _ => Err(error(
            StatusCode::BAD_GATEWAY,
            &format!(
                "prefill worker {name} returned no kv_transfer_params (is it running with a P/D connector, role prefill?)"
            ),
            None,
        )),
    }
}

fn header_u64(headers: &HeaderMap, name: &str) -> Result<Option<u64>, String> {
    match headers.get(name) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Some)
            .ok_or_else(|| format!("header {name} must be a decimal integer")),
    }
}

/// Counts a request in flight for as long as its handler runs (also when the client goes away
/// and the handler future is dropped).
struct Inflight<'a>(&'a AtomicU64);

impl Drop for Inflight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn completions(State(s): State<Arc<AppState>>, req: Request) -> Response {
    s.counters.inflight.fetch_add(1, Ordering::Relaxed);
    let guard = Inflight(&s.counters.inflight);
    let span = tracing::info_span!(
        "frontend.request",
        http.route = %req.uri().path(),
        kvgate.router_mode = s.config.mode.as_str(),
        kvgate.worker_id = tracing::field::Empty,
        kvgate.dp_rank = tracing::field::Empty,
        kvgate.worker = tracing::field::Empty,
        http.response.status_code = tracing::field::Empty,
    );
    TraceHeaders::from_http(req.headers()).adopt(&span);
    let r = handle(&s, req).instrument(span.clone()).await;
    span.record("http.response.status_code", r.status().as_u16());
    drop(guard);
    if let Ok(mut m) = s.counters.by_code.lock() {
        *m.entry(r.status().as_u16()).or_insert(0) += 1;
    }
    r
}

async fn handle(s: &Arc<AppState>, req: Request) -> Response {
    let Some(endpoint) = Endpoint::from_path(req.uri().path()) else {
        return error(StatusCode::NOT_FOUND, "unknown endpoint", None);
    };
    let path = req.uri().path().to_string();
    let headers = req.headers().clone();
    let body = match read_body(req.into_body(), s.config.max_body_bytes).await {
        Ok(b) => b,
        Err(r) => return *r,
    };
    // Parsing a large body is CPU work: keep it off the async threads.
    let b2 = body.clone();
    let parsed = match tokio::task::spawn_blocking(move || {
        OpenAiRequest::parse(endpoint, &b2).map(Arc::new)
    })
    .await
    {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => {
            let param = (!e.field.is_empty()).then_some(e.field.as_str());
            return error(StatusCode::BAD_REQUEST, &e.to_string(), param);
        }
        Err(_) => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "request parser failed",
                None,
            );
        }
    };
    let file = s.workers.current();
    if parsed.model != file.model {
        return error(
            StatusCode::NOT_FOUND,
            &format!("The model `{}` does not exist.", parsed.model),
            Some("model"),
        );
    }
    let target = match pick(s, &file, &headers, &parsed, body).await {
        Ok(t) => t,
        Err(r) => return *r,
    };
    forward(s.clone(), target, &path, &headers, parsed.stream).await
}

async fn pick(
    s: &Arc<AppState>,
    file: &WorkersFile,
    headers: &HeaderMap,
    parsed: &Arc<OpenAiRequest>,
    body: bytes::Bytes,
) -> Result<Target, Box<Response>> {
    let bad = |status: StatusCode, msg: String| Box::new(error(status, &msg, None));
    match s.config.mode {
        RouterMode::Direct => {
            let disaggregated = match headers.get("x-dynamo-routing-mode").map(|v| v.as_bytes()) {
                None | Some(b"aggregated") => false,
                Some(b"disaggregated") => true,
                Some(_) => {
                    return Err(bad(
                        StatusCode::BAD_REQUEST,
                        "x-dynamo-routing-mode must be aggregated or disaggregated".into(),
                    ));
                }
            };
            let prefill = if disaggregated {
                Some(prefill_leg(s, headers, parsed)?)
            } else {
                None
            };
            let id = header_u64(headers, "x-dynamo-worker-instance-id")
                .map_err(|m| bad(StatusCode::BAD_REQUEST, m))?
                .ok_or_else(|| {
                    bad(
                        StatusCode::BAD_REQUEST,
                        "missing header x-dynamo-worker-instance-id: in --router-mode direct the EPP chooses the worker and this frontend only forwards where it says".into(),
                    )
                })?;
            let worker = s.workers.by_instance_id(id).ok_or_else(|| {
                bad(
                    StatusCode::NOT_FOUND,
                    format!("unknown worker instance id {id} (x-dynamo-worker-instance-id)"),
                )
            })?;
            let rank = header_u64(headers, "x-dynamo-dp-rank")
                .map_err(|m| bad(StatusCode::BAD_REQUEST, m))?
                .unwrap_or(0);
            if rank >= u64::from(worker.dp_size) {
                return Err(bad(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "x-dynamo-dp-rank {rank} is out of range for worker {id} (dp_size {})",
                        worker.dp_size
                    ),
                ));
            }
            Ok(Target {
                worker,
                dp_rank: rank as u32,
                booking: None,
                body,
                prefill,
            })
        }
        RouterMode::RoundRobin | RouterMode::Random => {
            let targets: Vec<(&WorkerEntry, u32)> = file
                .workers
                .iter()
                .flat_map(|w| (0..w.dp_size).map(move |r| (w, r)))
                .collect();
            if targets.is_empty() {
                return Err(bad(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "no workers configured".into(),
                ));
            }
            let i = if s.config.mode == RouterMode::RoundRobin {
                s.rr.fetch_add(1, Ordering::Relaxed) as usize % targets.len()
            } else {
                s.rng.lock().map_or(0, |mut r| r.below(targets.len()))
            };
            Ok(Target {
                worker: targets[i].0.clone(),
                dp_rank: targets[i].1,
                booking: None,
                body,
                prefill: None,
            })
        }
        RouterMode::Kv => {
            let Some(kv) = &s.kv else {
                return Err(bad(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "kv state missing".into(),
                ));
            };
            // Tokenize (unless the ids came with the request), hash and rewrite the body on the
            // blocking pool: all three scale with the prompt. An Arc: the body map may be
            // megabytes, and only a reference crosses threads.
            let p = Arc::clone(parsed);
            let svc = kv.clone();
            let raw = body.clone();
            let accept = s.config.accept_token_data;
            let prepared =
                tokio::task::spawn_blocking(move || svc.prepare(&p, Some(&raw), accept)).await;
            let prepared = match prepared {
                Ok(Ok(x)) => x,
                Ok(Err(e)) => return Err(bad(StatusCode::BAD_REQUEST, e.to_string())),
                Err(_) => {
                    return Err(bad(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "tokenizer failed".into(),
                    ));
                }
            };
            let id = RequestId::from(format!("fe-{}", s.next_id.fetch_add(1, Ordering::Relaxed)));
            let d = match kv.route(&id, &prepared.hashes, parsed.max_tokens, None, true) {
                Ok(d) => d,
                Err(RouteError::NoWorkers) => {
                    return Err(bad(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "no worker is available".into(),
                    ));
                }
                Err(RouteError::Overloaded(_)) => {
                    let mut r = error(
                        StatusCode::TOO_MANY_REQUESTS,
                        "all workers are busy; retry later",
                        None,
                    );
                    r.headers_mut()
                        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
                    return Err(Box::new(r));
                }
                Err(e) => return Err(bad(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())),
            };
            let booking = Booking::new(
                kv.clone(),
                id,
                d.predicted_cached_tokens,
                prepared.hashes.num_tokens() as u64,
            );
            let Some(worker) = s.workers.by_instance_id(d.worker.worker.0) else {
                // Dropping the booking frees it.
                return Err(bad(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the chosen worker just left".into(),
                ));
            };
            // The request goes out with token_data; the original body is not needed.
            drop(body);
            Ok(Target {
                worker,
                dp_rank: d.worker.dp_rank.0,
                booking: Some(booking),
                body: bytes::Bytes::from(prepared.body),
                prefill: None,
            })
        }
    }
}

async fn forward(
    s: Arc<AppState>,
    t: Target,
    path: &str,
    headers: &HeaderMap,
    stream: bool,
) -> Response {
    let mut t = t;
    let mut guard = t.booking.take();
    if let Ok(mut m) = s.counters.routed.lock() {
        *m.entry(t.worker.name.clone()).or_insert(0) += 1;
    }
    if let Some(leg) = t.prefill.take() {
        // Disaggregated: the prefill worker computes the prompt, then the decode worker
        // continues from the KV it hands over.
        let params = match run_prefill(&s, &leg, path).await {
            Ok(p) => p,
            Err(r) => return r,
        };
        let mut body = leg.parsed.body.clone();
        body.insert("kv_transfer_params".into(), params);
        t.body = bytes::Bytes::from(
            serde_json::to_vec(&serde_json::Value::Object(body)).unwrap_or_default(),
        );
    }
    let url = format!("{}{}", t.worker.url.trim_end_matches('/'), path);
    let mut rb = s
        .client
        .post(&url)
        .header(header::CONTENT_TYPE, "application/json")
        .header("x-dynamo-dp-rank", t.dp_rank.to_string())
        .header(
            "x-dynamo-worker-instance-id",
            t.worker.instance_id().0.to_string(),
        )
        .body(t.body);
    if let Some(v) = headers.get("x-request-id") {
        rb = rb.header("x-request-id", v.clone());
    }
    let span = tracing::Span::current();
    span.record("kvgate.worker_id", t.worker.instance_id().0);
    span.record("kvgate.dp_rank", i64::from(t.dp_rank));
    span.record("kvgate.worker", t.worker.name.as_str());
    for (k, v) in TraceHeaders::of_span(&span).pairs() {
        rb = rb.header(k, v);
    }
    // A streaming worker answers with headers at once; a non-streaming one only when the whole
    // generation is done, so the header timeout applies to streams only.
    let limit = if stream {
        s.config.request_timeout
    } else {
        Duration::from_secs(24 * 3600)
    };
    let sent = tokio::time::timeout(limit, rb.send()).await;
    let upstream = match sent {
        // The client learns which worker failed, not where it lives: addresses and the
        // connection error go to the log only.
        Err(_) => {
            tracing::warn!(worker = %t.worker.name, %url, "worker did not answer in time");
            return error(
                StatusCode::GATEWAY_TIMEOUT,
                &format!(
                    "worker {} did not answer within {:?}",
                    t.worker.name, s.config.request_timeout
                ),
                None,
            );
        }
        Ok(Err(e)) => {
            tracing::warn!(worker = %t.worker.name, %url, error = %e, "worker unreachable");
            return error(
                StatusCode::BAD_GATEWAY,
                &format!("worker {} is unreachable", t.worker.name),
                None,
            );
        }
        Ok(Ok(r)) => r,
    };
    let status =
        StatusCode::from_u16(upstream.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    let mut out = Response::builder().status(status);
    for name in [
        "content-type",
        "cache-control",
        "x-kvgate-worker-id",
        "x-kvgate-dp-rank",
        "retry-after",
    ] {
        if let Some(v) = upstream.headers().get(name)
            && let Ok(v) = HeaderValue::from_bytes(v.as_bytes())
        {
            out = out.header(name, v);
        }
    }
    out = out.header("x-kvgate-routed-to", t.worker.name.as_str());
    let mut stream = upstream.bytes_stream();
    // Routing accuracy: the cached tokens the worker reports, against the prediction.
    let mut scanner = status
        .is_success()
        .then(kvgate_wire::response::CachedTokensScanner::default);
    let body = async_stream::stream! {
        while let Some(chunk) = stream.next().await {
            match chunk {
                Ok(b) => {
                    if let Some(g) = &mut guard {
                        g.first_byte();
                        g.alive();
                        if let Some(sc) = &mut scanner {
                            sc.feed(&b);
                        }
                    }
                    yield Ok::<_, std::io::Error>(b);
                }
                Err(e) => {
                    yield Err(std::io::Error::other(e));
                    break;
                }
            }
        }
        if let Some(g) = &guard
            && let Some(actual) = scanner.as_mut().and_then(|sc| sc.finish())
        {
            g.record_actual_cached(actual);
        }
        drop(guard);
    };
    out.body(Body::from_stream(body))
        .unwrap_or_else(|_| error(StatusCode::INTERNAL_SERVER_ERROR, "response", None))
}

async fn metrics(State(s): State<Arc<AppState>>) -> Response {
    let mode = s.config.mode.as_str();
    let mut p = Scrape::new();
    if let Ok(m) = s.counters.by_code.lock() {
        let mut codes: Vec<_> = m.iter().map(|(c, n)| (*c, *n)).collect();
        codes.sort();
        for (code, n) in codes {
            let code = code.to_string();
            p.counter(
                "kvgate_frontend_requests_total",
                "Requests by HTTP status.",
                &[("mode", mode), ("code", &code)],
                n as f64,
            );
        }
    }
    p.gauge(
        "kvgate_frontend_inflight_requests",
        "Requests being handled.",
        &[],
        s.counters.inflight.load(Ordering::Relaxed) as f64,
    );
    if let Ok(m) = s.counters.routed.lock() {
        let mut names: Vec<_> = m.iter().map(|(w, n)| (w.clone(), *n)).collect();
        names.sort();
        for (w, n) in names {
            p.counter(
                "kvgate_frontend_routed_total",
                "Requests sent to each worker.",
                &[("worker", &w)],
                n as f64,
            );
        }
    }
    if let Some(kv) = &s.kv {
        kv.render_metrics(&mut p);
    }
    p.into_response()
}
