//! The frontend's HTTP server and forwarding.

use crate::events::{EventStats, subscribe};
use crate::workers::WorkerSet;
use axum::Router as HttpRouter;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::StreamExt;
use kvgate_core::RequestId;
use kvgate_core::config::RouterConfig;
use kvgate_core::hashing::{BlockHashes, HashSeed};
use kvgate_core::random::{RandomSource, SplitMix64};
use kvgate_core::router::{RouteError, RouteRequest, Router};
use kvgate_runtime::http::{error, method_not_allowed, not_found, read_body};
use kvgate_runtime::prom::PromText;
use kvgate_tokenize::PromptTokenizer;
use kvgate_wire::openai::{Endpoint, OpenAiRequest};
use kvgate_wire::response as resp;
use kvgate_wire::workers::{WorkerEntry, WorkersFile};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;

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
    /// How long a worker may take to answer with response headers.
    pub request_timeout: Duration,
}

struct KvState {
    router: Arc<Mutex<Router>>,
    tokenizer: Arc<PromptTokenizer>,
    events: Arc<EventStats>,
    subscriptions: Mutex<HashMap<(u64, u32), tokio::task::JoinHandle<()>>>,
}

#[derive(Default)]
struct Counters {
    by_code: Mutex<HashMap<u16, u64>>,
    inflight: AtomicU64,
    routed: Mutex<HashMap<String, u64>>,
    predicted_cached_tokens: AtomicU64,
}

struct AppState {
    config: FrontendConfig,
    workers: WorkerSet,
    client: reqwest::Client,
    kv: Option<KvState>,
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
    let workers = WorkerSet::new(file.clone());
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(2))
        .pool_idle_timeout(Duration::from_secs(30))
        .build()
        .map_err(|e| e.to_string())?;
    let kv = if config.mode == RouterMode::Kv {
        let router = Router::new(config.router.clone(), file.block_size as usize)
            .map_err(|e| e.to_string())?;
        let tok_path = config
            .tokenizer
            .clone()
            .or_else(|| file.tokenizer.as_ref().map(PathBuf::from));
        let tokenizer = PromptTokenizer::load(tok_path.as_deref()).map_err(|e| e.to_string())?;
        Some(KvState {
            router: Arc::new(Mutex::new(router)),
            tokenizer: Arc::new(tokenizer),
            events: Arc::new(EventStats::default()),
            subscriptions: Mutex::new(HashMap::new()),
        })
    } else {
        None
    };
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64);
    let state = Arc::new(AppState {
        workers: workers.clone(),
        client,
        kv,
        rr: AtomicU64::new(0),
        rng: Mutex::new(SplitMix64::new(seed)),
        next_id: AtomicU64::new(1),
        counters: Counters::default(),
        config,
    });
    sync_workers(&state, None, &file);
    {
        let st = state.clone();
        workers.watch(state.config.workers_file.clone(), move |old, new| {
            sync_workers(&st, Some(old), new)
        });
    }
    if let Some(kv) = &state.kv {
        // Housekeeping: expire predictions, free bookings whose end was never seen.
        let router = kv.router.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(30)).await;
                if let Ok(mut r) = router.lock() {
                    let freed = r.sweep(Instant::now(), kvgate_core::load::DEFAULT_STALE_AFTER);
                    if !freed.is_empty() {
                        tracing::warn!(n = freed.len(), "freed stale bookings");
                    }
                }
            }
        });
    }
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
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(not_found)
        .with_state(state);
    on_bound(addr);
    axum::serve(listener, app).await.map_err(|e| e.to_string())
}

/// Brings the router and the event subscriptions in line with the workers file.
fn sync_workers(state: &Arc<AppState>, old: Option<&WorkersFile>, new: &WorkersFile) {
    let Some(kv) = &state.kv else { return };
    let Ok(mut router) = kv.router.lock() else {
        return;
    };
    let Ok(mut subs) = kv.subscriptions.lock() else {
        return;
    };
    let new_ids: Vec<u64> = new.workers.iter().map(|w| w.instance_id().0).collect();
    if let Some(old) = old {
        for w in &old.workers {
            let id = w.instance_id();
            // Only what the subscriptions depend on; capacity edits keep them running.
            let changed = new
                .workers
                .iter()
                .find(|n| n.instance_id() == id)
                .is_none_or(|n| {
                    n.kv_events != w.kv_events || n.dp_size != w.dp_size || n.url != w.url
                });
            if !new_ids.contains(&id.0) || changed {
                if !new_ids.contains(&id.0) {
                    router.remove_worker(id);
                }
                subs.retain(|(wid, _), h| {
                    let keep = *wid != id.0;
                    if !keep {
                        h.abort();
                    }
                    keep
                });
            }
        }
    }
    for w in &new.workers {
        router.upsert_worker(w.info());
        if let Some(ep) = &w.kv_events {
            for rank in 0..w.dp_size {
                subs.entry((w.instance_id().0, rank)).or_insert_with(|| {
                    subscribe(
                        kv.router.clone(),
                        kv.events.clone(),
                        w.instance_id(),
                        rank,
                        ep.clone(),
                        new.block_size,
                    )
                });
            }
        }
    }
}

async fn models(State(s): State<Arc<AppState>>) -> Response {
    let file = s.workers.current();
    axum::Json(resp::models(&file.model, 0, 0)).into_response()
}

/// Where a request goes.
struct Target {
    worker: WorkerEntry,
    dp_rank: u32,
    booking: Option<RequestId>,
    body: bytes::Bytes,
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
    let r = handle(&s, req).await;
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
            if let Some(mode) = headers.get("x-dynamo-routing-mode")
                && mode.as_bytes() == b"disaggregated"
            {
                return Err(bad(
                    StatusCode::NOT_IMPLEMENTED,
                    "x-dynamo-routing-mode: disaggregated is not supported by this frontend yet; route aggregated".into(),
                ));
            }
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
            // blocking pool: all three scale with the prompt.
            let tok = kv.tokenizer.clone();
            // An Arc: the body map may be megabytes, and only a reference crosses threads.
            let p = Arc::clone(parsed);
            let block_size = file.block_size as usize;
            let prepared = tokio::task::spawn_blocking(move || {
                let tokens = match &p.token_data {
                    Some(t) => t.clone(),
                    None => tok.tokenize(&p)?,
                };
                let hashes = BlockHashes::from_tokens(
                    &tokens,
                    block_size,
                    HashSeed::new(None, p.cache_salt.as_deref()),
                );
                // The worker gets the ids we routed on: no second tokenization, no drift.
                let body = bytes::Bytes::from(p.body_with_token_data(&tokens));
                Ok::<_, kvgate_tokenize::TokenizeError>((hashes, body))
            })
            .await;
            let (hashes, new_body) = match prepared {
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
            let decision = {
                // Lock order: router, then rng (random mode takes only the rng).
                let (Ok(mut router), Ok(mut rng)) = (kv.router.lock(), s.rng.lock()) else {
                    return Err(bad(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "router lock poisoned".into(),
                    ));
                };
                router.route(
                    RouteRequest {
                        request: &id,
                        hashes: &hashes,
                        expected_output_tokens: parsed.max_tokens,
                        allowed: None,
                        book: true,
                    },
                    Instant::now(),
                    &mut *rng,
                )
            };
            let d = match decision {
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
            s.counters
                .predicted_cached_tokens
                .fetch_add(d.predicted_cached_tokens, Ordering::Relaxed);
            let Some(worker) = s.workers.by_instance_id(d.worker.worker.0) else {
                if let Ok(mut r) = kv.router.lock() {
                    r.free(&id);
                }
                return Err(bad(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the chosen worker just left".into(),
                ));
            };
            // The request goes out as `new_body` (with token_data); the original is not needed.
            drop(body);
            Ok(Target {
                worker,
                dp_rank: d.worker.dp_rank.0,
                booking: Some(id),
                body: new_body,
            })
        }
    }
}

/// Frees the booking when the response ends, fails, or the client goes away.
struct BookingGuard {
    router: Option<Arc<Mutex<Router>>>,
    id: Option<RequestId>,
    prefill_done: bool,
}

impl BookingGuard {
    fn first_byte(&mut self) {
        if !self.prefill_done {
            self.prefill_done = true;
            if let (Some(r), Some(id)) = (&self.router, &self.id)
                && let Ok(mut r) = r.lock()
            {
                r.prefill_complete(id);
            }
        }
    }
}

impl Drop for BookingGuard {
    fn drop(&mut self) {
        if let (Some(r), Some(id)) = (&self.router, &self.id)
            && let Ok(mut r) = r.lock()
        {
            r.free(id);
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
    let mut guard = BookingGuard {
        router: s.kv.as_ref().map(|k| k.router.clone()),
        id: t.booking.clone(),
        prefill_done: false,
    };
    if let Ok(mut m) = s.counters.routed.lock() {
        *m.entry(t.worker.name.clone()).or_insert(0) += 1;
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
    // A streaming worker answers with headers at once; a non-streaming one only when the whole
    // generation is done, so the header timeout applies to streams only.
    let limit = if stream {
        s.config.request_timeout
    } else {
        Duration::from_secs(24 * 3600)
    };
    let sent = tokio::time::timeout(limit, rb.send()).await;
    let upstream = match sent {
        Err(_) => {
            return error(
                StatusCode::GATEWAY_TIMEOUT,
                &format!(
                    "worker {} ({url}) did not answer within {:?}",
                    t.worker.name, s.config.request_timeout
                ),
                None,
            );
        }
        Ok(Err(e)) => {
            return error(
                StatusCode::BAD_GATEWAY,
                &format!("worker {} ({url}) is unreachable: {e}", t.worker.name),
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
    let body = async_stream::stream! {
        while let Some(chunk) = stream.next().await {
            match chunk {
                Ok(b) => {
                    guard.first_byte();
                    yield Ok::<_, std::io::Error>(b);
                }
                Err(e) => {
                    yield Err(std::io::Error::other(e));
                    break;
                }
            }
        }
        drop(guard);
    };
    out.body(Body::from_stream(body))
        .unwrap_or_else(|_| error(StatusCode::INTERNAL_SERVER_ERROR, "response", None))
}

async fn metrics(State(s): State<Arc<AppState>>) -> Response {
    let mode = s.config.mode.as_str();
    let mut p = PromText::new();
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
        let e = &kv.events;
        let counters: [(&str, &str, &AtomicU64); 7] = [
            (
                "kvgate_router_predicted_cached_tokens_total",
                "Prompt tokens the router predicted cached on the chosen worker.",
                &s.counters.predicted_cached_tokens,
            ),
            (
                "kvgate_kv_event_batches_total",
                "KV event batches received.",
                &e.batches,
            ),
            (
                "kvgate_kv_events_applied_total",
                "KV events applied to the index.",
                &e.events,
            ),
            (
                "kvgate_kv_events_rejected_total",
                "KV events refused (e.g. block size mismatch).",
                &e.rejected,
            ),
            (
                "kvgate_kv_event_decode_errors_total",
                "Undecodable KV event messages.",
                &e.decode_errors,
            ),
            (
                "kvgate_kv_event_seq_gaps_total",
                "Breaks in a publisher's sequence (lost messages or restarts).",
                &e.seq_gaps,
            ),
            (
                "kvgate_kv_event_resyncs_total",
                "Times a rank's indexed blocks were dropped to rebuild from events.",
                &e.resyncs,
            ),
        ];
        for (name, help, v) in counters {
            p.counter(name, help, &[], v.load(Ordering::Relaxed) as f64);
        }
        if let Ok(r) = kv.router.lock() {
            p.gauge(
                "kvgate_router_index_nodes",
                "Distinct prefixes in the index.",
                &[],
                r.index().num_nodes() as f64,
            );
            p.gauge(
                "kvgate_router_bookings",
                "Requests booked as in flight.",
                &[],
                r.load().num_bookings() as f64,
            );
            p.counter(
                "kvgate_router_events_unknown_worker_total",
                "Events from workers or ranks not in discovery.",
                &[],
                r.events_unknown_worker() as f64,
            );
            let mut loads: Vec<_> = r
                .load()
                .workers()
                .map(|(w, l)| (*w, l.active_blocks()))
                .collect();
            loads.sort();
            for (w, blocks) in loads {
                let (id, rank) = (w.worker.0.to_string(), w.dp_rank.0.to_string());
                p.gauge(
                    "kvgate_router_active_blocks",
                    "Active KV blocks booked per worker rank.",
                    &[("worker", &id), ("dp_rank", &rank)],
                    blocks as f64,
                );
            }
        }
    }
    p.into_response()
}
