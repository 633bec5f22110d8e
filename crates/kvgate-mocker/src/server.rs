//! The mocker's HTTP server.

use crate::driver::EngineHandle;
use crate::publisher::{
    EventSink, Fanout, NatsPublishStats, NatsSink, NoEvents, ZmqPublisher, ZmqSink,
};
use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::StreamExt;
use kvgate_core::hashing::HashSeed;
use kvgate_engine::{Engine, EngineConfig, EngineRequest, TokenOutput};
use kvgate_runtime::http::{error, method_not_allowed, not_found, read_body};
use kvgate_runtime::prom::Scrape;
use kvgate_runtime::telemetry::TraceHeaders;
use kvgate_tokenize::PromptTokenizer;
use kvgate_wire::openai::{Endpoint, OpenAiRequest};
use kvgate_wire::response as resp;
use serde_json::Value;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::net::TcpListener;
use tracing::Instrument as _;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Role {
    #[default]
    Aggregated,
    Prefill,
    Decode,
}

#[derive(Clone, Debug)]
pub struct MockerConfig {
    pub host: String,
    pub port: u16,
    pub model: String,
    pub worker_id: u64,
    pub dp_size: u32,
    pub role: Role,
    pub engine: EngineConfig,
    pub speedup_ratio: f64,
    /// `max_tokens` when the request gives none.
    pub default_max_tokens: u32,
    pub max_body_bytes: usize,
    /// `tcp://HOST:PORT` of the vLLM-format ZMQ publisher (rank r binds PORT + r).
    pub zmq_kv_events: Option<String>,
    pub zmq_topic: String,
    /// Event layout on ZMQ: vLLM 0.33's maps or older vLLM's positional arrays.
    pub zmq_layout: kvgate_wire::vllm::EventLayout,
    /// vLLM's replay socket (ROUTER, `tcp://HOST:PORT`; rank r binds PORT + r).
    pub zmq_replay: Option<String>,
    /// Test hook: ZMQ sequence numbers published to the replay buffer only (forces gaps).
    pub zmq_drop_seqs: Vec<u64>,
    /// Publish Dynamo-format KV events on the NATS event plane.
    pub nats_kv_events: Option<kvgate_runtime::nats::NatsEventConfig>,
    /// Register in a Dynamo file discovery store (needs `nats_kv_events`).
    pub dynamo_discovery: Option<crate::dynamo_discovery::DynamoRegistration>,
    pub tokenizer: Option<std::path::PathBuf>,
    /// KV cache bytes per token (all layers, K and V), for the transfer time of a
    /// disaggregated request's prompt.
    pub kv_bytes_per_token: u64,
    /// Bandwidth of the prefill -> decode KV transfer, GB/s.
    pub kv_transfer_gbps: f64,
}

impl Default for MockerConfig {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 9100,
            model: "qwen3".into(),
            worker_id: 0,
            dp_size: 1,
            role: Role::Aggregated,
            engine: EngineConfig::default(),
            speedup_ratio: 1.0,
            default_max_tokens: 64,
            // 36 layers x 8 KV heads x 128 dims x (K, V) x 2 bytes: an 8B-class model in bf16.
            kv_bytes_per_token: 147_456,
            kv_transfer_gbps: 25.0,
            max_body_bytes: 32 << 20,
            zmq_kv_events: None,
            zmq_topic: String::new(),
            zmq_layout: kvgate_wire::vllm::EventLayout::Map,
            zmq_replay: None,
            zmq_drop_seqs: Vec::new(),
            nats_kv_events: None,
            dynamo_discovery: None,
            tokenizer: None,
        }
    }
}

struct Metrics {
    /// Prefill legs served for a remote decode worker.
    remote_prefills: AtomicU64,
    /// Decode legs whose prompt KV came from a prefill worker, and the simulated transfer time.
    kv_transfers: AtomicU64,
    kv_transfer_micros: AtomicU64,
    token_data_requests: AtomicU64,
    token_data_mismatch: AtomicU64,
    success_length: AtomicU64,
    aborted: AtomicU64,
}

struct AppState {
    config: MockerConfig,
    engines: Vec<EngineHandle>,
    tokenizer: Arc<PromptTokenizer>,
    next_id: AtomicU64,
    metrics: Metrics,
    nats: Option<Arc<NatsPublishStats>>,
    created: u64,
}

/// Binds, starts the engines and serves until the process ends. Returns the bound address
/// through `on_bound` before serving (port 0 picks a free port).
pub async fn serve(
    config: MockerConfig,
    on_bound: impl FnOnce(SocketAddr, Vec<String>, Vec<String>),
) -> Result<(), String> {
    let tokenizer =
        Arc::new(PromptTokenizer::load(config.tokenizer.as_deref()).map_err(|e| e.to_string())?);
    let mut zmq_endpoints = Vec::new();
    let mut replay_endpoints = Vec::new();
    let mut sinks: Vec<Arc<dyn EventSink>> = Vec::new();
    if let Some(ep) = &config.zmq_kv_events {
        let (publisher, bound, replay) = ZmqPublisher::bind_with_replay(
            ep,
            config.zmq_replay.as_deref(),
            config.dp_size,
            &config.zmq_topic,
            config.zmq_layout,
            config.zmq_drop_seqs.clone(),
        )
        .await?;
        zmq_endpoints = bound;
        replay_endpoints = replay;
        sinks.push(Arc::new(ZmqSink::new(
            publisher,
            config.engine.block_size as u32,
        )));
    }
    let mut nats = None;
    let mut nats_sink = None;
    if let Some(cfg) = &config.nats_kv_events {
        let sink = Arc::new(NatsSink::start(cfg.clone(), config.worker_id, config.dp_size).await?);
        nats = Some(sink.stats.clone());
        sinks.push(sink.clone());
        nats_sink = Some(sink);
    }
    let sink: Arc<dyn EventSink> = match sinks.len() {
        0 => Arc::new(NoEvents),
        1 => sinks.remove(0),
        _ => Arc::new(Fanout(sinks)),
    };
    let engines = (0..config.dp_size.max(1))
        .map(|rank| {
            EngineHandle::spawn(
                Engine::new(config.engine.clone()),
                rank,
                config.speedup_ratio,
                sink.clone(),
            )
        })
        .collect::<Vec<EngineHandle>>();
    let listener = TcpListener::bind((config.host.as_str(), config.port))
        .await
        .map_err(|e| format!("cannot listen on {}:{}: {e}", config.host, config.port))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    if let Some(sink) = &nats_sink {
        sink.report_kv_usage(engines.clone());
    }
    if let Some(reg) = &config.dynamo_discovery {
        let (Some(sink), Some(cfg)) = (&nats_sink, &config.nats_kv_events) else {
            return Err("Dynamo discovery registration needs the NATS event plane".into());
        };
        crate::dynamo_discovery::register(
            reg,
            &crate::dynamo_discovery::WorkerRecord {
                namespace: cfg.namespace.clone(),
                component: cfg.component.clone(),
                endpoint: cfg.endpoint.clone(),
                instance_id: config.worker_id,
                model: config.model.clone(),
                address: addr.to_string(),
                block_size: config.engine.block_size as u32,
                total_kv_blocks: config.engine.num_gpu_blocks as u64,
                max_num_seqs: config.engine.max_num_seqs as u64,
                max_num_batched_tokens: config.engine.max_num_batched_tokens as u64,
                dp_size: config.dp_size.max(1),
                worker_type: match config.role {
                    Role::Aggregated => "aggregated",
                    Role::Prefill => "prefill",
                    Role::Decode => "decode",
                },
                kv_publishers: sink.publisher_ids(),
                metrics_publisher: sink.metrics_publisher_id(),
            },
        )?;
    }
    let state = Arc::new(AppState {
        engines,
        tokenizer,
        next_id: AtomicU64::new(1),
        metrics: Metrics {
            remote_prefills: AtomicU64::new(0),
            kv_transfers: AtomicU64::new(0),
            kv_transfer_micros: AtomicU64::new(0),
            token_data_requests: AtomicU64::new(0),
            token_data_mismatch: AtomicU64::new(0),
            success_length: AtomicU64::new(0),
            aborted: AtomicU64::new(0),
        },
        nats,
        created: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        config,
    });
    let app = Router::new()
        .route("/v1/chat/completions", post(completions))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/health", get(|| async { "ok" }))
        .route("/metrics", get(metrics))
        .route("/debug/kv", get(debug_kv))
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(not_found)
        .with_state(state);
    on_bound(addr, zmq_endpoints, replay_endpoints);
    // Streamed responses are many small writes: without TCP_NODELAY each one after the first
    // waits for the peer's delayed ACK (~40 ms on Linux) on a pooled connection.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp: &mut tokio::net::TcpStream| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, app).await.map_err(|e| e.to_string())
}

async fn models(State(s): State<Arc<AppState>>) -> Response {
    let max_len = (s.config.engine.num_gpu_blocks * s.config.engine.block_size) as u64;
    axum::Json(resp::models(&s.config.model, s.created, max_len)).into_response()
}

/// Picks the rank: the one named by `x-dynamo-dp-rank` if valid, else the least busy.
fn pick_rank(s: &AppState, headers: &HeaderMap) -> Result<usize, String> {
    if let Some(v) = headers.get("x-dynamo-dp-rank") {
        let rank = v
            .to_str()
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
            .filter(|&r| r < s.engines.len());
        return rank
            .ok_or_else(|| format!("x-dynamo-dp-rank must be a rank in 0..{}", s.engines.len()));
    }
    Ok(s.engines
        .iter()
        .enumerate()
        .min_by_key(|(_, e)| {
            let st = e.stats();
            (st.running + st.waiting, st.active_blocks)
        })
        .map_or(0, |(i, _)| i))
}

/// What a request's `kv_transfer_params` (vLLM's P/D connector field) ask of this worker.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Transfer {
    /// An ordinary request.
    None,
    /// `do_remote_decode`: compute the prompt and one token, hand the KV to a decode worker.
    PrefillForRemote,
    /// `do_remote_prefill`: the prompt's KV comes from the prefill worker named in the params.
    FromRemote,
}

fn transfer_mode(role: Role, body: &serde_json::Map<String, Value>) -> Result<Transfer, String> {
    let Some(p) = body.get("kv_transfer_params") else {
        return Ok(Transfer::None);
    };
    if p.is_null() {
        return Ok(Transfer::None);
    }
    let Some(p) = p.as_object() else {
        return Err("`kv_transfer_params` must be an object".into());
    };
    let flag = |k: &str| p.get(k).and_then(Value::as_bool).unwrap_or(false);
    match (flag("do_remote_decode"), flag("do_remote_prefill")) {
        (true, true) => Err(
            "`kv_transfer_params` cannot ask for both do_remote_decode and do_remote_prefill"
                .into(),
        ),
        (true, false) if role == Role::Prefill => Ok(Transfer::PrefillForRemote),
        (true, false) => Err(format!(
            "do_remote_decode needs a prefill worker; this one is {role:?}"
        )
        .to_lowercase()),
        (false, true) if role == Role::Decode => Ok(Transfer::FromRemote),
        (false, true) => Err(format!(
            "do_remote_prefill needs a decode worker; this one is {role:?}"
        )
        .to_lowercase()),
        (false, false) => Ok(Transfer::None),
    }
}

async fn completions(State(s): State<Arc<AppState>>, req: Request) -> Response {
    let span = tracing::info_span!(
        "mocker.generate",
        http.route = %req.uri().path(),
        kvgate.worker_id = s.config.worker_id,
        kvgate.dp_rank = tracing::field::Empty,
        kvgate.prompt_tokens = tracing::field::Empty,
        kvgate.token_data = tracing::field::Empty,
        kvgate.cached_tokens = tracing::field::Empty,
    );
    TraceHeaders::from_http(req.headers()).adopt(&span);
    generate(s, req).instrument(span).await
}

async fn generate(s: Arc<AppState>, req: Request) -> Response {
    let Some(endpoint) = Endpoint::from_path(req.uri().path()) else {
        return error(StatusCode::NOT_FOUND, "unknown endpoint", None);
    };
    let headers = req.headers().clone();
    let body = match read_body(req.into_body(), s.config.max_body_bytes).await {
        Ok(b) => b,
        Err(r) => return *r,
    };
    let parsed = match OpenAiRequest::parse(endpoint, &body) {
        Ok(p) => Arc::new(p),
        Err(e) => {
            let param = (!e.field.is_empty()).then_some(e.field.as_str());
            return error(StatusCode::BAD_REQUEST, &e.to_string(), param);
        }
    };
    if parsed.model != s.config.model {
        return error(
            StatusCode::NOT_FOUND,
            &format!("The model `{}` does not exist.", parsed.model),
            Some("model"),
        );
    }
    let transfer = match transfer_mode(s.config.role, &parsed.body) {
        Ok(t) => t,
        Err(msg) => return error(StatusCode::BAD_REQUEST, &msg, Some("kv_transfer_params")),
    };
    if transfer == Transfer::PrefillForRemote && parsed.stream {
        return error(
            StatusCode::BAD_REQUEST,
            "a prefill leg (do_remote_decode) is answered in one piece: set stream to false",
            Some("stream"),
        );
    }
    let rank = match pick_rank(&s, &headers) {
        Ok(r) => r,
        Err(msg) => return error(StatusCode::BAD_REQUEST, &msg, None),
    };
    // Tokenize (off the async threads: prompts can be long).
    let tok = s.tokenizer.clone();
    let p2 = Arc::clone(&parsed);
    let own = match tokio::task::spawn_blocking(move || tok.tokenize(&p2)).await {
        Ok(Ok(ids)) => ids,
        Ok(Err(e)) => return error(StatusCode::BAD_REQUEST, &e.to_string(), None),
        Err(_) => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "tokenizer task failed",
                None,
            );
        }
    };
    let prompt = match &parsed.token_data {
        Some(ids) => {
            s.metrics
                .token_data_requests
                .fetch_add(1, Ordering::Relaxed);
            if *ids != own {
                s.metrics
                    .token_data_mismatch
                    .fetch_add(1, Ordering::Relaxed);
            }
            ids.clone()
        }
        None => own,
    };
    let span = tracing::Span::current();
    span.record("kvgate.dp_rank", rank as i64);
    span.record("kvgate.prompt_tokens", prompt.len() as i64);
    span.record("kvgate.token_data", parsed.token_data.is_some());
    let id = s.next_id.fetch_add(1, Ordering::Relaxed);
    let max_tokens = if transfer == Transfer::PrefillForRemote {
        1
    } else {
        parsed
            .max_tokens
            .unwrap_or(s.config.default_max_tokens)
            .max(1)
    };
    if transfer == Transfer::FromRemote {
        // The prompt's KV crosses the wire before decoding can start.
        let bytes = prompt.len() as f64 * s.config.kv_bytes_per_token as f64;
        let secs = bytes / (s.config.kv_transfer_gbps * 1e9) / s.config.speedup_ratio;
        tokio::time::sleep(std::time::Duration::from_secs_f64(secs)).await;
        s.metrics.kv_transfers.fetch_add(1, Ordering::Relaxed);
        s.metrics
            .kv_transfer_micros
            .fetch_add((secs * 1e6) as u64, Ordering::Relaxed);
    }
    if transfer == Transfer::PrefillForRemote {
        s.metrics.remote_prefills.fetch_add(1, Ordering::Relaxed);
    }
    let prompt_len = prompt.len();
    let engine = &s.engines[rank];
    let rx = match engine
        .submit(EngineRequest {
            id,
            prompt,
            max_output_tokens: max_tokens,
            output_seed: id,
            hash_seed: HashSeed::new(None, parsed.cache_salt.as_deref()),
            kv_transferred: transfer == Transfer::FromRemote,
        })
        .await
    {
        Ok(rx) => rx,
        Err(e @ kvgate_engine::SubmitError::TooLong { .. }) => {
            return error(StatusCode::BAD_REQUEST, &e.to_string(), Some("max_tokens"));
        }
        Err(kvgate_engine::SubmitError::EmptyPrompt) => {
            return error(
                StatusCode::BAD_REQUEST,
                "the prompt is empty",
                Some("messages"),
            );
        }
        Err(kvgate_engine::SubmitError::EngineGone) => {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "the engine is not running",
                None,
            );
        }
    };
    let chat = endpoint == Endpoint::Chat;
    let rid = if chat {
        format!("chatcmpl-{id}")
    } else {
        format!("cmpl-{id}")
    };
    let mut response = if parsed.stream {
        stream_response(
            s.clone(),
            engine.clone(),
            rx,
            chat,
            rid,
            parsed.include_usage,
            id,
        )
    } else {
        // A prefill leg tells the decode worker where to fetch the KV from (the fields
        // vLLM's NIXL connector returns).
        let params = (transfer == Transfer::PrefillForRemote).then(|| {
            serde_json::json!({
                "do_remote_prefill": true,
                "do_remote_decode": false,
                "remote_engine_id": format!("{}-{rank}", s.config.worker_id),
                "remote_block_ids": (0..prompt_len.div_ceil(s.config.engine.block_size.max(1))).collect::<Vec<usize>>(),
                "remote_host": s.config.host,
                "remote_port": s.config.port,
                "num_tokens": prompt_len,
            })
        });
        collect_response(&s, engine, rx, chat, &rid, id, params).await
    };
    let h = response.headers_mut();
    h.insert("x-kvgate-worker-id", HeaderValue::from(s.config.worker_id));
    h.insert("x-kvgate-dp-rank", HeaderValue::from(rank as u64));
    response
}

/// Aborts the request in the engine if the response is dropped before it finished.
struct AbortOnDrop {
    engine: EngineHandle,
    id: u64,
    done: bool,
    state: Arc<AppState>,
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if !self.done {
            self.engine.abort(self.id);
            self.state.metrics.aborted.fetch_add(1, Ordering::Relaxed);
        }
    }
}

async fn collect_response(
    s: &Arc<AppState>,
    engine: &EngineHandle,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<TokenOutput>,
    chat: bool,
    rid: &str,
    id: u64,
    kv_transfer_params: Option<Value>,
) -> Response {
    let mut guard = AbortOnDrop {
        engine: engine.clone(),
        id,
        done: false,
        state: s.clone(),
    };
    let mut ids = Vec::new();
    while let Some(out) = rx.recv().await {
        ids.push(out.token);
        if let Some(f) = out.finished {
            guard.done = true;
            s.metrics.success_length.fetch_add(1, Ordering::Relaxed);
            let text = s.tokenizer.tokenizer().decode(&ids);
            tracing::Span::current().record("kvgate.cached_tokens", f.cached_tokens as i64);
            let usage = resp::usage(f.prompt_tokens, f.completion_tokens, f.cached_tokens);
            let mut body = resp::completion(
                chat,
                rid,
                s.created,
                &s.config.model,
                &text,
                "length",
                usage,
            );
            if let (Some(p), Some(o)) = (kv_transfer_params, body.as_object_mut()) {
                o.insert("kv_transfer_params".into(), p);
            }
            return axum::Json(body).into_response();
        }
    }
    error(
        StatusCode::INTERNAL_SERVER_ERROR,
        "the engine dropped the request",
        None,
    )
}

fn sse(v: &Value) -> bytes::Bytes {
    bytes::Bytes::from(format!("data: {v}\n\n"))
}

fn stream_response(
    s: Arc<AppState>,
    engine: EngineHandle,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<TokenOutput>,
    chat: bool,
    rid: String,
    include_usage: bool,
    id: u64,
) -> Response {
    // Created before the stream so that a body that is never polled still aborts the request.
    let guard = AbortOnDrop {
        engine,
        id,
        done: false,
        state: s.clone(),
    };
    let body = async_stream::stream! {
        // Move the whole guard in (a closure would otherwise capture just the `done` field).
        let mut guard = guard;
        let model = s.config.model.clone();
        let mut first = true;
        while let Some(out) = rx.recv().await {
            let text = s.tokenizer.tokenizer().decode(&[out.token]);
            let finish = out.finished.map(|_| "length");
            yield Ok::<_, std::convert::Infallible>(sse(&resp::chunk(chat, &rid, s.created, &model, &text, first, finish)));
            first = false;
            if let Some(f) = out.finished {
                guard.done = true;
                s.metrics.success_length.fetch_add(1, Ordering::Relaxed);
                if include_usage {
                    let usage = resp::usage(f.prompt_tokens, f.completion_tokens, f.cached_tokens);
                    yield Ok(sse(&resp::usage_chunk(chat, &rid, s.created, &model, usage)));
                }
                yield Ok(bytes::Bytes::from_static(b"data: [DONE]\n\n"));
                break;
            }
        }
    };
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(body.boxed()))
        .unwrap_or_else(|_| error(StatusCode::INTERNAL_SERVER_ERROR, "response", None))
}

/// The blocks each rank caches, by engine hash (to compare with a router's index).
async fn debug_kv(State(s): State<Arc<AppState>>) -> Response {
    let mut ranks = Vec::new();
    for e in &s.engines {
        let Some(blocks) = e.dump().await else {
            return error(StatusCode::SERVICE_UNAVAILABLE, "engine stopped", None);
        };
        ranks.push(serde_json::json!({"dp_rank": e.rank, "blocks": blocks}));
    }
    axum::Json(serde_json::json!({"worker_id": s.config.worker_id, "ranks": ranks})).into_response()
}

async fn metrics(State(s): State<Arc<AppState>>) -> Response {
    let model = s.config.model.as_str();
    let mut p = Scrape::new();
    type Stat = fn(&kvgate_engine::EngineStats) -> f64;
    let per_engine: [(&str, &str, bool, Stat); 8] = [
        (
            "vllm:num_requests_running",
            "Requests in the running batch.",
            false,
            |st| st.running as f64,
        ),
        (
            "vllm:num_requests_waiting",
            "Requests waiting to be scheduled.",
            false,
            |st| st.waiting as f64,
        ),
        (
            "vllm:kv_cache_usage_perc",
            "Fraction of KV blocks in use.",
            false,
            |st| st.active_blocks as f64 / st.total_blocks.max(1) as f64,
        ),
        (
            "vllm:prompt_tokens_total",
            "Prompt tokens processed.",
            true,
            |st| st.prompt_tokens as f64,
        ),
        (
            "vllm:generation_tokens_total",
            "Tokens generated.",
            true,
            |st| st.generation_tokens as f64,
        ),
        (
            "vllm:prefix_cache_queries_total",
            "Prompt tokens looked up in the prefix cache.",
            true,
            |st| st.prefix_query_tokens as f64,
        ),
        (
            "vllm:prefix_cache_hits_total",
            "Prompt tokens served from the prefix cache.",
            true,
            |st| st.prefix_hit_tokens as f64,
        ),
        ("vllm:num_preemptions_total", "Preemptions.", true, |st| {
            st.preemptions as f64
        }),
    ];
    let stats: Vec<(String, kvgate_engine::EngineStats)> = s
        .engines
        .iter()
        .map(|e| (e.rank.to_string(), e.stats()))
        .collect();
    for (name, help, counter, f) in per_engine {
        for (rank, st) in &stats {
            let labels = [("model_name", model), ("engine", rank.as_str())];
            if counter {
                p.counter(name, help, &labels, f(st));
            } else {
                p.gauge(name, help, &labels, f(st));
            }
        }
    }
    p.counter(
        "vllm:request_success_total",
        "Finished requests.",
        &[("model_name", model), ("finished_reason", "length")],
        s.metrics.success_length.load(Ordering::Relaxed) as f64,
    );
    let (bs, blocks) = (
        s.config.engine.block_size.to_string(),
        s.config.engine.num_gpu_blocks.to_string(),
    );
    let caching = if s.config.engine.enable_prefix_caching {
        "True"
    } else {
        "False"
    };
    for (rank, _) in &stats {
        p.gauge(
            "vllm:cache_config_info",
            "KV cache configuration.",
            &[
                ("block_size", &bs),
                ("num_gpu_blocks", &blocks),
                ("enable_prefix_caching", caching),
                ("engine", rank),
            ],
            1.0,
        );
    }
    let m = &s.metrics;
    p.counter(
        "kvgate_mocker_token_data_requests_total",
        "Requests that carried nvext.token_data.",
        &[],
        m.token_data_requests.load(Ordering::Relaxed) as f64,
    );
    p.counter(
        "kvgate_mocker_remote_prefills_total",
        "Prefill legs computed for a remote decode worker (kv_transfer_params.do_remote_decode).",
        &[],
        m.remote_prefills.load(Ordering::Relaxed) as f64,
    );
    if let Some(n) = &s.nats {
        let rows: [(&str, &str, &AtomicU64, bool); 5] = [
            (
                "kvgate_mocker_nats_messages_published_total",
                "KV event messages acknowledged by NATS.",
                &n.published,
                true,
            ),
            (
                "kvgate_mocker_nats_events_total",
                "KV events handed to the NATS publisher.",
                &n.events,
                true,
            ),
            (
                "kvgate_mocker_nats_publish_retries_total",
                "Failed NATS publish attempts (retried in order).",
                &n.retries,
                true,
            ),
            (
                "kvgate_mocker_nats_messages_dropped_total",
                "KV event messages dropped because the backlog was full.",
                &n.dropped,
                true,
            ),
            (
                "kvgate_mocker_nats_backlog",
                "KV event messages waiting for NATS.",
                &n.backlog,
                false,
            ),
        ];
        for (name, help, v, counter) in rows {
            let v = v.load(Ordering::Relaxed) as f64;
            if counter {
                p.counter(name, help, &[], v);
            } else {
                p.gauge(name, help, &[], v);
            }
        }
    }
    p.counter(
        "kvgate_mocker_kv_transfers_total",
        "Decode legs whose prompt KV was transferred from a prefill worker.",
        &[],
        m.kv_transfers.load(Ordering::Relaxed) as f64,
    );
    p.counter(
        "kvgate_mocker_kv_transfer_seconds_total",
        "Simulated KV transfer time of those decode legs (after the speedup ratio).",
        &[],
        m.kv_transfer_micros.load(Ordering::Relaxed) as f64 / 1e6,
    );
    p.counter(
        "kvgate_mocker_token_data_mismatch_total",
        "Requests whose nvext.token_data differed from the mocker's own tokenization.",
        &[],
        m.token_data_mismatch.load(Ordering::Relaxed) as f64,
    );
    p.counter(
        "kvgate_mocker_aborted_total",
        "Requests abandoned by their client.",
        &[],
        m.aborted.load(Ordering::Relaxed) as f64,
    );
    p.into_response()
}
