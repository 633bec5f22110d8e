//! One ext_proc stream = one HTTP request through the gateway. The request body is gathered
//! (the header answer is held until it is complete), parsed once, tokenized once and routed;
//! the answer carries the destination and the rewritten body. On the response path the first
//! body byte completes prefill, usage gives the actual cached tokens, and the end of the stream
//! (or its failure or cancellation) frees the booking.

use crate::metrics::Metrics;
use crate::protocol::{self, CachedTokensScanner};
use envoy_types::pb::envoy::config::core::v3::HeaderMap;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    HttpBody, HttpHeaders, ProcessingRequest, ProcessingResponse, processing_request::Request,
};
use kvgate_core::router::{Decision, RouteError, WorkerRole};
use kvgate_core::{DpRank, RequestId, WorkerRank};
use kvgate_runtime::routing::{Booking, Prepared, RoutingService};
use kvgate_runtime::telemetry::TraceHeaders;
use kvgate_wire::openai::{Endpoint, OpenAiRequest};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tonic::Status;
use tracing::Instrument as _;

/// Settings of the request path.
#[derive(Clone, Debug)]
pub struct StreamSettings {
    pub max_request_body_bytes: usize,
    pub max_endpoints: usize,
    pub tokenize_timeout: Duration,
    /// Route on `nvext.token_data` when the request carries it.
    pub accept_token_data: bool,
    pub enforce_disagg: bool,
}

pub struct Shared {
    pub service: Arc<RoutingService>,
    pub settings: StreamSettings,
    pub metrics: Arc<Metrics>,
    pub next_id: AtomicU64,
    /// Concurrent large-prompt preparations (parse + tokenize on the blocking pool).
    pub prepare_slots: Arc<tokio::sync::Semaphore>,
}

/// What the request phase learned from the headers.
struct RequestHead {
    path: String,
    remove: Vec<String>,
    subset: Option<Vec<String>>,
    content_length: Option<usize>,
    /// When the request headers arrived (the body phase is timed from here).
    received_at: Instant,
    /// The W3C trace context for the routing span's parent: the ext_proc call's (from the
    /// gRPC metadata), else the request's own headers.
    trace: TraceHeaders,
}

/// An error for the client, sent as an ImmediateResponse.
struct Reject {
    status: u16,
    message: String,
    param: Option<String>,
    retry_after: Option<u32>,
}

impl Reject {
    fn new(status: u16, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            param: None,
            retry_after: None,
        }
    }
}

enum Phase {
    /// Waiting for request headers.
    Start,
    /// Gathering the request body (`seen`: a body message arrived; a request may end with
    /// trailers without any).
    Body { buf: Vec<u8>, seen: bool },
    /// Routed (or passed through); following the response.
    Routed,
}

/// One stream's state. Dropped when the stream ends for any reason (end of response, error,
/// Envoy's reset on client abort, gRPC cancellation): the booking is freed then.
struct StreamState {
    shared: Arc<Shared>,
    head: RequestHead,
    phase: Phase,
    booking: Option<Booking>,
    booked_target: Option<WorkerRank>,
    /// A disaggregated request's prefill leg: done when the decode worker's first byte comes.
    prefill_booking: Option<Booking>,
    scanner: CachedTokensScanner,
    response_status: Option<u16>,
    call_trace: TraceHeaders,
    _active: ActiveGuard,
}

impl Drop for StreamState {
    fn drop(&mut self) {
        if self.booking.is_some() {
            self.shared.metrics.aborted.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The response stream for one ext_proc stream. Messages are handled inside the stream that
/// tonic polls (no task or channel per stream: fewer wake-ups per message); when tonic drops
/// it, the state goes with it.
pub fn responses(
    shared: Arc<Shared>,
    mut inbound: tonic::Streaming<ProcessingRequest>,
    call_trace: TraceHeaders,
) -> impl futures::Stream<Item = Result<ProcessingResponse, Status>> + Send + 'static {
    async_stream::stream! {
        shared.metrics.streams_active.fetch_add(1, Ordering::Relaxed);
        let mut st = StreamState {
            _active: ActiveGuard(shared.metrics.clone()),
            shared,
            head: RequestHead::empty(),
            call_trace,
            phase: Phase::Start,
            booking: None,
            booked_target: None,
            prefill_booking: None,
            scanner: CachedTokensScanner::default(),
            response_status: None,
        };
        loop {
            let req = match inbound.message().await {
                Ok(Some(r)) => r,
                Ok(None) => break,
                // Envoy resets the stream when the HTTP request ends or the client goes away.
                Err(e) => {
                    tracing::debug!(error = %e, "ext_proc stream ended");
                    break;
                }
            };
            let (out, done) = st.handle(req).await;
            for r in out {
                yield Ok(r);
            }
            if done {
                break;
            }
        }
    }
}

/// Drives one stream's messages through the state machine without gRPC (for the fuzz
/// targets): the answers in order, until the stream is done. The state is dropped at the end,
/// as when Envoy closes the stream.
pub async fn run_messages(
    shared: Arc<Shared>,
    messages: impl IntoIterator<Item = ProcessingRequest>,
) -> Vec<ProcessingResponse> {
    shared
        .metrics
        .streams_active
        .fetch_add(1, Ordering::Relaxed);
    let mut st = StreamState {
        _active: ActiveGuard(shared.metrics.clone()),
        shared,
        head: RequestHead::empty(),
        call_trace: TraceHeaders::default(),
        phase: Phase::Start,
        booking: None,
        booked_target: None,
        prefill_booking: None,
        scanner: CachedTokensScanner::default(),
        response_status: None,
    };
    let mut all = Vec::new();
    for m in messages {
        let (out, done) = st.handle(m).await;
        all.extend(out);
        if done {
            break;
        }
    }
    all
}

impl StreamState {
    fn reject(&self, model: &str, r: Reject) -> (Vec<ProcessingResponse>, bool) {
        self.shared.metrics.count_error(model, r.status);
        (
            vec![protocol::immediate(
                r.status,
                &r.message,
                r.param.as_deref(),
                r.retry_after,
            )],
            true,
        )
    }

    /// Handles one message; returns the answers and whether the stream is finished.
    async fn handle(&mut self, req: ProcessingRequest) -> (Vec<ProcessingResponse>, bool) {
        let shared = self.shared.clone();
        let m = &shared.metrics;
        let out: Vec<ProcessingResponse> = match req.request {
            Some(Request::RequestHeaders(ref h)) => {
                self.head = read_head(h);
                self.head.subset = protocol::subset_hint(req.metadata_context.as_ref());
                if h.end_of_stream {
                    // No body (GET /v1/models): a healthy endpoint by load alone.
                    self.phase = Phase::Routed;
                    match bodiless(&shared, &self.head) {
                        Ok(r) => vec![r],
                        Err(r) => return self.reject("", r),
                    }
                } else if let Some(n) = self
                    .head
                    .content_length
                    .filter(|n| *n > shared.settings.max_request_body_bytes)
                {
                    // Refused before a byte of the body is read.
                    let limit = shared.settings.max_request_body_bytes;
                    return self.reject(
                        "",
                        Reject::new(
                            413,
                            format!(
                                "request body of {n} bytes exceeds the EPP's limit of {limit} bytes"
                            ),
                        ),
                    );
                } else {
                    // Trust the declared length only so far: a lying client must not make us
                    // reserve the whole limit up front.
                    let cap = self
                        .head
                        .content_length
                        .unwrap_or(0)
                        .min(shared.settings.max_request_body_bytes)
                        .min(PREALLOC_MAX_BYTES);
                    self.phase = Phase::Body {
                        buf: Vec::with_capacity(cap),
                        seen: false,
                    };
                    Vec::new()
                }
            }
            Some(Request::RequestBody(HttpBody {
                body,
                end_of_stream,
                ..
            })) => {
                let Phase::Body { buf, seen } = &mut self.phase else {
                    tracing::debug!("request body outside the body phase; ignored");
                    return (Vec::new(), false);
                };
                *seen = true;
                if buf.len() + body.len() > shared.settings.max_request_body_bytes {
                    let limit = shared.settings.max_request_body_bytes;
                    return self.reject(
                        "",
                        Reject::new(
                            413,
                            format!("request body exceeds the EPP's limit of {limit} bytes"),
                        ),
                    );
                }
                if buf.is_empty() && end_of_stream {
                    // The whole body in one message: no copy.
                    *buf = body;
                } else {
                    buf.extend_from_slice(&body);
                }
                if !end_of_stream {
                    return (Vec::new(), false);
                }
                let body = std::mem::take(buf);
                self.phase = Phase::Routed;
                let span = self.head.route_span(&self.call_trace);
                match route_body(&shared, &self.head, body, BodyEnd::EndOfStream)
                    .instrument(span)
                    .await
                {
                    Ok(r) => {
                        self.booking = r.booking;
                        self.booked_target = r.target;
                        self.prefill_booking = r.prefill_booking;
                        r.out
                    }
                    Err((model, r)) => return self.reject(&model, r),
                }
            }
            Some(Request::RequestTrailers(_)) => {
                let mut out = Vec::new();
                // HTTP/2 requests may end their body with trailers instead of end_of_stream.
                if let Phase::Body { buf, seen } = &mut self.phase {
                    let body = std::mem::take(buf);
                    let end = if *seen {
                        BodyEnd::Trailers
                    } else {
                        BodyEnd::NoBodyMessages
                    };
                    self.phase = Phase::Routed;
                    let span = self.head.route_span(&self.call_trace);
                    match route_body(&shared, &self.head, body, end)
                        .instrument(span)
                        .await
                    {
                        Ok(r) => {
                            self.booking = r.booking;
                            self.booked_target = r.target;
                            self.prefill_booking = r.prefill_booking;
                            out = r.out;
                        }
                        Err((model, r)) => return self.reject(&model, r),
                    }
                }
                out.push(protocol::trailers_continue(true));
                out
            }
            Some(Request::ResponseHeaders(ref h)) => {
                self.response_status = protocol::get_header(h.headers.as_ref(), ":status")
                    .and_then(|s| s.parse().ok());
                if let Some(code) = self.response_status {
                    m.count_response(code);
                }
                if let (Some(b), Some(booked)) = (&self.booking, self.booked_target)
                    && let Some(served) = protocol::served_endpoint(&req)
                    // The booked worker's own endpoint first: several workers may share one
                    // (a single direct-mode sidecar in front of them all).
                    && shared
                        .service
                        .workers()
                        .with_instance(booked.worker.0, |w| w.host_port() != Some(served.as_str()))
                        .unwrap_or(true)
                    && let Some(w) = shared.service.endpoint_worker(&served)
                    && w.instance_id() != booked.worker
                {
                    // The gateway used another endpoint (fallback or retry): the load is there.
                    let rank = if booked.dp_rank.0 < w.dp_size {
                        booked.dp_rank
                    } else {
                        DpRank(0)
                    };
                    b.rebook(WorkerRank {
                        worker: w.instance_id(),
                        dp_rank: rank,
                    });
                }
                if h.end_of_stream {
                    // A response without a body (e.g. 204) ends here.
                    self.finish_response();
                }
                vec![protocol::response_headers_continue()]
            }
            Some(Request::ResponseBody(HttpBody {
                body,
                end_of_stream,
                ..
            })) => {
                if !body.is_empty()
                    && let Some(b) = &mut self.booking
                {
                    b.first_byte();
                    b.alive();
                }
                if !body.is_empty() {
                    // The decode worker answers only after the prefill leg: it is over.
                    self.prefill_booking = None;
                }
                if self.booking.is_some() && self.response_status.is_none_or(|s| s < 400) {
                    self.scanner.feed(&body);
                }
                if end_of_stream {
                    self.finish_response();
                }
                vec![protocol::body_chunk(body, end_of_stream, false)]
            }
            Some(Request::ResponseTrailers(_)) => {
                self.finish_response();
                vec![protocol::trailers_continue(false)]
            }
            None => Vec::new(),
        };
        (out, false)
    }

    fn finish_response(&mut self) {
        self.prefill_booking = None;
        if let Some(b) = self.booking.take() {
            if let Some(actual) = self.scanner.finish() {
                b.record_actual_cached(actual);
            }
            // Dropping frees the load.
            drop(b);
        }
    }
}

/// Keeps `streams_active` exact however the task ends.
struct ActiveGuard(Arc<Metrics>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.streams_active.fetch_sub(1, Ordering::Relaxed);
    }
}

impl RequestHead {
    fn empty() -> Self {
        Self {
            path: String::new(),
            remove: Vec::new(),
            subset: None,
            content_length: None,
            received_at: Instant::now(),
            trace: TraceHeaders::default(),
        }
    }

    /// The span one request body is routed in, a child of the request's trace.
    fn route_span(&self, call: &TraceHeaders) -> tracing::Span {
        let span = tracing::info_span!(
            "epp.route",
            http.route = %self.path,
            kvgate.isl_tokens = tracing::field::Empty,
            kvgate.worker_id = tracing::field::Empty,
            kvgate.dp_rank = tracing::field::Empty,
            kvgate.endpoint = tracing::field::Empty,
            kvgate.overlap_blocks = tracing::field::Empty,
            kvgate.predicted_cached_tokens = tracing::field::Empty,
            kvgate.status = tracing::field::Empty,
        );
        if call.is_empty() {
            self.trace.adopt(&span);
        } else {
            call.adopt(&span);
        }
        span
    }
}

fn read_head(h: &HttpHeaders) -> RequestHead {
    let map: Option<&HeaderMap> = h.headers.as_ref();
    RequestHead {
        path: protocol::get_header(map, ":path")
            .unwrap_or("/")
            .split('?')
            .next()
            .unwrap_or("/")
            .to_string(),
        remove: protocol::headers_to_remove(map),
        subset: None,
        content_length: protocol::get_header(map, "content-length")
            .and_then(|v| v.trim().parse().ok()),
        received_at: Instant::now(),
        trace: TraceHeaders::from_pairs(
            ["traceparent", "tracestate"]
                .into_iter()
                .filter_map(|k| protocol::get_header(map, k).map(|v| (k, v))),
        ),
    }
}

/// The targets a subset hint allows; `None` = no hint.
fn allowed_targets(
    service: &RoutingService,
    subset: &Option<Vec<String>>,
) -> Result<Option<Vec<WorkerRank>>, Reject> {
    let Some(list) = subset else { return Ok(None) };
    let file = service.workers().current();
    let wanted: std::collections::HashSet<&str> = list.iter().map(String::as_str).collect();
    let mut out = Vec::new();
    for w in &file.workers {
        if w.host_port().is_some_and(|hp| wanted.contains(hp)) {
            out.extend((0..w.dp_size).map(|r| WorkerRank {
                worker: w.instance_id(),
                dp_rank: DpRank(r),
            }));
        }
    }
    if out.is_empty() {
        return Err(Reject {
            retry_after: Some(1),
            ..Reject::new(
                503,
                if list.is_empty() {
                    "the gateway's endpoint subset is empty".to_string()
                } else {
                    // Endpoint addresses are internal: count them, do not echo them.
                    format!(
                        "none of the {} endpoints in the gateway's subset is a known worker",
                        list.len()
                    )
                },
            )
        });
    }
    Ok(Some(out))
}

/// The endpoints to put in the destination header: the ranked targets' distinct `ip:port`s.
fn destinations(service: &RoutingService, ranked: &[WorkerRank], max: usize) -> Vec<String> {
    let workers = service.workers();
    let mut out: Vec<String> = Vec::new();
    for t in ranked {
        if out.len() >= max.max(1) {
            break;
        }
        if let Some(hp) = workers
            .with_instance(t.worker.0, |w| w.host_port().map(str::to_string))
            .flatten()
            && !out.contains(&hp)
        {
            out.push(hp);
        }
    }
    out
}

fn no_workers(enforce_disagg: bool, service: &RoutingService) -> Option<Reject> {
    if enforce_disagg
        && service.has_role(WorkerRole::Prefill)
        && !service.has_role(WorkerRole::Decode)
    {
        return Some(Reject {
            retry_after: Some(5),
            ..Reject::new(
                503,
                "DYN_ENFORCE_DISAGG is true but the decode pool has no worker (no worker with role decode); refusing to route aggregated",
            )
        });
    }
    if enforce_disagg && !service.has_role(WorkerRole::Prefill) {
        return Some(Reject {
            retry_after: Some(5),
            ..Reject::new(
                503,
                "DYN_ENFORCE_DISAGG is true but the prefill pool has no worker (no worker with role prefill); refusing to route aggregated",
            )
        });
    }
    None
}

fn route_error(e: RouteError) -> Reject {
    match e {
        RouteError::NoWorkers => Reject {
            retry_after: Some(1),
            ..Reject::new(503, "no ready endpoint is available for this request")
        },
        RouteError::Overloaded(x) => Reject {
            retry_after: Some(1),
            ..Reject::new(
                429,
                format!(
                    "all {} workers are busy (admission control); retry later",
                    x.candidates_total
                ),
            )
        },
        RouteError::DuplicateRequest => Reject::new(500, "duplicate request id"),
    }
}

/// Routing headers for a decision.
fn decision_headers(d: &Decision) -> Vec<(&'static str, String)> {
    vec![
        ("x-dynamo-worker-instance-id", d.worker.worker.0.to_string()),
        ("x-dynamo-dp-rank", d.worker.dp_rank.0.to_string()),
        ("x-dynamo-routing-mode", "aggregated".to_string()),
    ]
}

/// A request without a body: the least-loaded endpoint, nothing booked.
fn bodiless(shared: &Shared, head: &RequestHead) -> Result<ProcessingResponse, Reject> {
    let s = &shared.service;
    if let Some(r) = no_workers(shared.settings.enforce_disagg, s) {
        return Err(r);
    }
    let allowed = allowed_targets(s, &head.subset)?;
    let id = RequestId::from("epp-bodiless");
    let empty = kvgate_core::hashing::BlockHashes::new(
        s.block_size(),
        kvgate_core::hashing::HashSeed::new(None, None),
    );
    let d = s
        .route(&id, &empty, None, allowed.as_deref(), false)
        .map_err(route_error)?;
    let dest = destinations(s, &d.ranked, shared.settings.max_endpoints);
    if dest.is_empty() {
        return Err(Reject::new(503, "the chosen worker has no endpoint"));
    }
    shared.metrics.count_request("");
    Ok(protocol::route_response(
        &dest.join(","),
        &decision_headers(&d),
        head.remove.clone(),
        None,
    ))
}

/// The most a declared `content-length` reserves before the bytes arrive.
const PREALLOC_MAX_BYTES: usize = 1 << 20;

/// Bodies up to this size are parsed and tokenized on the async thread (about 0.2 ms of work).
const INLINE_PREPARE_BYTES: usize = 8 * 1024;

/// A routed request body: the answers, the booking, the booked target, and for a
/// disaggregated request the prefill leg's booking.
struct Routed {
    out: Vec<ProcessingResponse>,
    booking: Option<Booking>,
    target: Option<WorkerRank>,
    prefill_booking: Option<Booking>,
}

/// Parses, tokenizes and routes a complete request body. Errors carry the model name (for
/// metrics) and the rejection.
/// How the request body ended, which decides how it is re-emitted.
#[derive(Clone, Copy, PartialEq, Eq)]
enum BodyEnd {
    /// A body message with `end_of_stream`.
    EndOfStream,
    /// Trailers after body messages: the re-emitted body must not claim end of stream.
    Trailers,
    /// Trailers and no body message at all: Envoy expects no body response.
    NoBodyMessages,
}

fn reemit(body: &[u8], end: BodyEnd) -> Vec<ProcessingResponse> {
    match end {
        BodyEnd::EndOfStream => protocol::body_chunks(body, true, true),
        BodyEnd::Trailers => protocol::body_chunks(body, true, false),
        BodyEnd::NoBodyMessages => Vec::new(),
    }
}

async fn route_body(
    shared: &Arc<Shared>,
    head: &RequestHead,
    body: Vec<u8>,
    end: BodyEnd,
) -> Result<Routed, (String, Reject)> {
    let started = Instant::now();
    let m = &shared.metrics;
    m.body_seconds
        .observe(started.duration_since(head.received_at).as_secs_f64());
    let s = &shared.service;
    let Some(endpoint) = Endpoint::from_path(&head.path) else {
        // Not an OpenAI generation endpoint: pass the body through, route by load.
        let mut out = vec![bodiless(shared, head).map_err(|r| (String::new(), r))?];
        out.extend(reemit(&body, end));
        return Ok(Routed {
            out,
            booking: None,
            target: None,
            prefill_booking: None,
        });
    };
    if let Some(r) = no_workers(shared.settings.enforce_disagg, s) {
        return Err((String::new(), r));
    }
    let allowed = allowed_targets(s, &head.subset).map_err(|r| (String::new(), r))?;
    let body_len = body.len();
    // Parsing and tokenizing scale with the prompt: keep them off the async threads, and
    // bound them so a pathological prompt cannot hold the request forever.
    let svc = s.clone();
    let accept_tokens = shared.settings.accept_token_data;
    let route_span = tracing::Span::current();
    let work = move || {
        let t = Instant::now();
        let parsed =
            tracing::info_span!(parent: &route_span, "parse", http.request.body.size = body.len())
                .in_scope(|| OpenAiRequest::parse(endpoint, &body))?;
        let parse_time = t.elapsed();
        let t = Instant::now();
        let prepared = tracing::info_span!(parent: &route_span, "tokenize")
            .in_scope(|| svc.prepare(&parsed, Some(&body), accept_tokens));
        Ok::<_, kvgate_wire::openai::ParseError>((parsed, prepared, (parse_time, t.elapsed())))
    };
    // Small prompts take tens of microseconds: a hop to the blocking pool would cost more than
    // the work. Large ones go there, bounded by the timeout.
    let outcome = if body_len <= INLINE_PREPARE_BYTES {
        Ok(Ok(work()))
    } else {
        // Large prompts queue for a bounded number of slots (CPU and memory stay bounded under
        // a burst); the wait counts against the timeout, so an overloaded EPP answers 504
        // rather than piling up work.
        tokio::time::timeout(shared.settings.tokenize_timeout, async {
            // The slot travels with the work: one that outlives its timeout still holds it.
            let slot = shared.prepare_slots.clone().acquire_owned().await;
            tokio::task::spawn_blocking(move || {
                let _slot = slot;
                work()
            })
            .await
        })
        .await
    };
    let (parsed, prepared, (parse_time, tokenize_time)) = match outcome {
        Err(_) => {
            return Err((
                String::new(),
                Reject::new(
                    504,
                    format!(
                        "tokenizing the prompt took longer than {:?}",
                        shared.settings.tokenize_timeout
                    ),
                ),
            ));
        }
        Ok(Err(_)) => return Err((String::new(), Reject::new(500, "request parser failed"))),
        Ok(Ok(Err(e))) => {
            let param = (!e.field.is_empty()).then(|| e.field.clone());
            return Err((
                String::new(),
                Reject {
                    param,
                    ..Reject::new(400, e.to_string())
                },
            ));
        }
        Ok(Ok(Ok(x))) => x,
    };
    let model = parsed.model.clone();
    let served_model = s.workers().current().model.clone();
    if model != served_model {
        return Err((
            // Not the client's string: labels must not grow with what clients send.
            "unknown".to_string(),
            Reject {
                param: Some("model".into()),
                ..Reject::new(
                    404,
                    format!(
                        "The model `{model}` does not exist (this pool serves `{served_model}`)."
                    ),
                )
            },
        ));
    }
    let Prepared {
        hashes,
        body,
        tokens,
        ..
    } = prepared.map_err(|e| {
        (
            model.clone(),
            Reject {
                param: e.field(),
                ..Reject::new(400, e.to_string())
            },
        )
    })?;
    m.parse_seconds.observe(parse_time.as_secs_f64());
    m.tokenize_seconds.observe(tokenize_time.as_secs_f64());
    let id = RequestId::from(format!(
        "epp-{}",
        shared.next_id.fetch_add(1, Ordering::Relaxed)
    ));
    let t = Instant::now();
    // Disaggregated as soon as both pools exist (discovery can add a prefill pool at any time);
    // aggregated otherwise (`no_workers` refused the request if disaggregation is enforced).
    let (d, prefill) = if s.disaggregated_available() {
        let r = s.route_disaggregated(&id, &hashes, parsed.max_tokens, allowed.as_deref());
        m.scheduler_seconds.observe(t.elapsed().as_secs_f64());
        let (prefill_id, p, d) = r.map_err(|e| (model.clone(), route_error(e)))?;
        let pb = Booking::new(
            s.clone(),
            prefill_id,
            p.predicted_cached_tokens,
            tokens as u64,
        );
        (d, Some((p, pb)))
    } else {
        let r = s.route(&id, &hashes, parsed.max_tokens, allowed.as_deref(), true);
        m.scheduler_seconds.observe(t.elapsed().as_secs_f64());
        (r.map_err(|e| (model.clone(), route_error(e)))?, None)
    };
    let booking = Booking::new(s.clone(), id, d.predicted_cached_tokens, tokens as u64);
    let span = tracing::Span::current();
    span.record("kvgate.isl_tokens", tokens as i64);
    span.record("kvgate.worker_id", d.worker.worker.0);
    span.record("kvgate.dp_rank", i64::from(d.worker.dp_rank.0));
    span.record("kvgate.overlap_blocks", i64::from(d.overlap_blocks));
    span.record(
        "kvgate.predicted_cached_tokens",
        d.predicted_cached_tokens as i64,
    );
    let dest = destinations(s, &d.ranked, shared.settings.max_endpoints);
    if dest.is_empty() {
        return Err((
            model,
            Reject::new(503, "the chosen worker has no endpoint (it just left)"),
        ));
    }
    if tokens > 0 {
        m.hit_ratio
            .observe(d.predicted_cached_tokens as f64 / tokens as f64);
    }
    m.input_tokens.observe(tokens as f64);
    m.count_request(&model);
    let mut headers = decision_headers(&d);
    let prefill_booking = prefill.map(|(p, pb)| {
        headers.retain(|(k, _)| *k != "x-dynamo-routing-mode");
        headers.push(("x-dynamo-routing-mode", "disaggregated".to_string()));
        headers.push((
            "x-dynamo-prefill-instance-id",
            p.worker.worker.0.to_string(),
        ));
        headers.push(("x-dynamo-prefill-dp-rank", p.worker.dp_rank.0.to_string()));
        pb
    });
    let mut out = vec![protocol::route_response(
        &dest.join(","),
        &headers,
        head.remove.clone(),
        Some(body.len()),
    )];
    out.extend(reemit(&body, end));
    tracing::Span::current().record("kvgate.endpoint", dest.first().map(String::as_str));
    m.processing_seconds
        .observe(started.elapsed().as_secs_f64());
    Ok(Routed {
        out,
        booking: Some(booking),
        target: Some(d.worker),
        prefill_booking,
    })
}
