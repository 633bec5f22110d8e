//! The routing service shared by the EPP and the kv-mode frontend: one [`Router`] behind a lock,
//! fed by the workers file and the workers' KV events, plus what the servers around it need:
//! prompt preparation (tokenize, hash, inject `nvext.token_data`), bookings that free themselves,
//! a log of recent decisions for the debug endpoint, and routing-accuracy counters.

use crate::events::{EventStats, subscribe};
use crate::prom::Scrape;
use crate::replica::{ReplicaSync, ReplicaSyncConfig};
use crate::workers::WorkerSet;
use kvgate_core::config::RouterConfig;
use kvgate_core::hashing::{BlockHashes, HashSeed};
use kvgate_core::load::Change;
use kvgate_core::random::SplitMix64;
use kvgate_core::replica::{SyncOp, booked_op, is_peer_key};
use kvgate_core::router::{Decision, RouteError, RouteRequest, Router, WorkerRole};
use kvgate_core::scheduler::{CostWeights, Explanation};
use kvgate_core::{RequestId, WorkerRank};
use kvgate_tokenize::{PromptTokenizer, TokenizeError};
use kvgate_wire::openai::OpenAiRequest;
use kvgate_wire::workers::{WorkerEntry, WorkersFile};
use serde::Serialize;
use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Decision latency buckets, seconds: 10 µs to 250 ms.
pub const DECISION_BUCKETS: &[f64] = &[
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25,
];

/// How many decisions the debug log keeps by default.
pub const DEFAULT_DECISION_LOG: usize = 256;

/// A prompt ready to route: its block hashes and the body to forward (with the token ids).
pub struct Prepared {
    pub hashes: BlockHashes,
    pub body: Vec<u8>,
    pub tokens: usize,
    /// Whether the ids came with the request (`nvext.token_data`) instead of our tokenizer.
    pub client_tokens: bool,
}

/// One routing decision as the debug endpoint shows it.
#[derive(Clone, Debug, Serialize)]
pub struct DecisionRecord {
    pub request_id: String,
    pub unix_ms: u64,
    pub worker_id: u64,
    pub dp_rank: u32,
    pub worker_name: String,
    pub isl_tokens: usize,
    pub overlap_blocks: u32,
    pub predicted_cached_tokens: u64,
    /// `usage.prompt_tokens_details.cached_tokens` of the response, once seen.
    pub actual_cached_tokens: Option<u64>,
    /// Set when the gateway served the request on another endpoint than chosen.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub served_by: Option<u64>,
    pub explanation: Explanation,
}

#[derive(Default)]
pub struct AccuracyStats {
    pub decisions: AtomicU64,
    pub predicted_cached_tokens: AtomicU64,
    /// Predictions of the decisions whose responses reported usage (compare with `actual`).
    pub predicted_reported_tokens: AtomicU64,
    pub actual_cached_tokens: AtomicU64,
    pub responses_with_usage: AtomicU64,
    /// Decisions whose actual cached tokens differed from the prediction.
    pub mispredicted: AtomicU64,
    pub rebooked: AtomicU64,
    /// Prompt tokens of the booked decisions (the denominator of the predicted hit rate).
    pub routed_prompt_tokens: AtomicU64,
    /// Prompt tokens of the decisions whose responses reported usage (the denominator of the
    /// actual hit rate: a ratio of sums, block-weighted, never a mean of per-request ratios).
    pub reported_prompt_tokens: AtomicU64,
}

/// Where the router's KV events come from.
#[derive(Clone, Debug)]
pub enum EventPlane {
    /// Each worker's vLLM ZMQ publisher (`kv_events` in the workers file).
    Zmq,
    /// Dynamo's NATS event plane.
    Nats(Box<crate::nats::NatsEventConfig>),
}

pub struct RoutingService {
    router: Arc<Mutex<Router>>,
    tokenizer: Arc<PromptTokenizer>,
    workers: WorkerSet,
    pub events: Arc<EventStats>,
    /// ZMQ subscriptions follow the workers file; off when events come over NATS.
    zmq_events: std::sync::atomic::AtomicBool,
    nats: Mutex<Option<(crate::nats::NatsEventConfig, tokio::task::JoinHandle<()>)>>,
    /// Bookings shared with the other router replicas (`DYN_ROUTER_REPLICA_SYNC`).
    replica: std::sync::OnceLock<Arc<ReplicaSync>>,
    subscriptions: Mutex<HashMap<(u64, u32), tokio::task::JoinHandle<()>>>,
    rng: Mutex<SplitMix64>,
    log: Mutex<VecDeque<DecisionRecord>>,
    log_len: usize,
    pub accuracy: AccuracyStats,
    /// Whole routing decisions (score and book, the router lock included).
    pub decision_seconds: crate::prom::TracedHistogram,
    /// The same, in milliseconds, under Dynamo's name.
    decision_ms: crate::prom::Histogram,
    /// Each booked decision's predicted hit rate (Dynamo's `kv_hit_rate`).
    predicted_hit_rate: crate::prom::Histogram,
    /// How long a worker that left the list (a pod turned unready) keeps its cache entries and
    /// event subscription, in case it comes back; zero removes at once. Only for
    /// [`set_workers`](Self::set_workers), the discovery path.
    unready_grace: Mutex<Duration>,
    /// Parked workers as they were listed, to tell a worker that is back from a new engine
    /// with the same id (another address: a restarted pod).
    parked: Mutex<HashMap<u64, kvgate_wire::workers::WorkerEntry>>,
    pub parking: ParkingStats,
}

/// What became of workers that left the list with a grace period.
#[derive(Debug, Default)]
pub struct ParkingStats {
    pub parked: AtomicU64,
    /// Back within the grace period, with their cache entries.
    pub returned: AtomicU64,
    /// Not back in time: forgotten.
    pub expired: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock cannot leave these structures half-updated in a way that
    // is worse than stopping routing altogether.
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl RoutingService {
    /// `tokenizer`: a `tokenizer.json` (or its directory); default: the workers file's, else the
    /// embedded one.
    pub fn new(
        file: WorkersFile,
        config: RouterConfig,
        tokenizer: Option<&Path>,
        log_len: usize,
    ) -> Result<Arc<Self>, String> {
        let router = Router::new(config, file.block_size as usize).map_err(|e| e.to_string())?;
        let tok_path = tokenizer
            .map(Path::to_path_buf)
            .or_else(|| file.tokenizer.as_ref().map(PathBuf::from));
        let tokenizer = PromptTokenizer::load(tok_path.as_deref()).map_err(|e| e.to_string())?;
        // Built now (tens of milliseconds), not on the first tokens-in request.
        tokenizer.vocabulary();
        let seed = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64);
        Ok(Arc::new(Self {
            router: Arc::new(Mutex::new(router)),
            tokenizer: Arc::new(tokenizer),
            workers: WorkerSet::new(file),
            events: Arc::new(EventStats::new()),
            zmq_events: std::sync::atomic::AtomicBool::new(true),
            nats: Mutex::new(None),
            replica: std::sync::OnceLock::new(),
            subscriptions: Mutex::new(HashMap::new()),
            rng: Mutex::new(SplitMix64::new(seed)),
            log: Mutex::new(VecDeque::new()),
            log_len,
            accuracy: AccuracyStats::default(),
            decision_seconds: crate::prom::traced_histogram(DECISION_BUCKETS),
            decision_ms: crate::prom::histogram(
                &DECISION_BUCKETS
                    .iter()
                    .map(|s| s * 1000.0)
                    .collect::<Vec<_>>(),
            ),
            predicted_hit_rate: crate::prom::histogram(&[
                0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0,
            ]),
            unready_grace: Mutex::new(Duration::ZERO),
            parked: Mutex::new(HashMap::new()),
            parking: ParkingStats::default(),
        }))
    }

    /// Registers the workers, subscribes to their events, watches `workers_file` for changes and
    /// sweeps stale bookings. Needs a Tokio runtime.
    pub fn start(self: &Arc<Self>, workers_file: PathBuf) {
        self.start_with(workers_file, EventPlane::Zmq);
    }

    /// [`start`](Self::start) with the KV events read from `plane`.
    pub fn start_with(self: &Arc<Self>, workers_file: PathBuf, plane: EventPlane) {
        self.start_source(Some(workers_file), plane);
    }

    /// Like [`start_with`](Self::start_with), for workers that something else discovers (pod
    /// discovery): they arrive through [`set_workers`](Self::set_workers).
    pub fn start_external(self: &Arc<Self>, plane: EventPlane) {
        self.start_source(None, plane);
    }

    /// Replaces the worker list (model, block size and tokenizer stay): the router, the
    /// bookings of removed workers and the event subscriptions follow. With an
    /// [unready grace](Self::set_unready_grace), a worker that leaves is parked instead of
    /// removed: out of routing, its cache entries and subscription kept until the grace ends.
    pub fn set_workers(&self, workers: Vec<kvgate_wire::workers::WorkerEntry>) {
        let old = self.workers.current();
        let new = WorkersFile {
            workers,
            ..(*old).clone()
        };
        if new == *old {
            return;
        }
        self.workers.replace(new.clone());
        let grace = *lock(&self.unready_grace);
        self.sync_workers_with(Some(&old), &new, grace);
    }

    /// How long a worker that leaves [`set_workers`](Self::set_workers)'s list keeps what the
    /// router knows about it (zero: forgotten at once). Readiness probes that flap under load
    /// then cost no cache knowledge.
    pub fn set_unready_grace(&self, grace: Duration) {
        *lock(&self.unready_grace) = grace;
    }

    /// Forgets the parked workers whose grace has run out. Holds the router, the subscriptions
    /// and the parked list together (in the order `sync_workers_with` takes them), so a worker
    /// cannot come back half-forgotten.
    pub fn expire_parked(&self) {
        let grace = *lock(&self.unready_grace);
        let mut router = lock(&self.router);
        let mut subs = lock(&self.subscriptions);
        let mut parked = lock(&self.parked);
        if parked.is_empty() {
            return;
        }
        for id in router.expire_parked(Instant::now(), grace) {
            let entry = parked.remove(&id.0);
            lock(&self.events.misconfigured).retain(|(w, _), _| *w != id.0);
            subs.retain(|(wid, _), h| {
                let keep = *wid != id.0;
                if !keep {
                    h.abort();
                }
                keep
            });
            self.parking.expired.fetch_add(1, Ordering::Relaxed);
            tracing::info!(
                worker = entry.as_ref().map_or("", |e| e.name.as_str()),
                grace_secs = grace.as_secs_f64(),
                "worker not back within the grace period; its cache entries are dropped"
            );
        }
    }

    fn start_source(self: &Arc<Self>, workers_file: Option<PathBuf>, plane: EventPlane) {
        let nats = match plane {
            EventPlane::Nats(cfg) => {
                self.zmq_events
                    .store(false, std::sync::atomic::Ordering::Relaxed);
                Some(*cfg)
            }
            EventPlane::Zmq => None,
        };
        let file = self.workers.current();
        self.sync_workers(None, &file);
        // After the workers are known: events (and a restored snapshot) for unknown workers
        // are dropped.
        if let Some(cfg) = nats {
            let task = crate::nats::consume(self.router.clone(), self.events.clone(), cfg.clone());
            *lock(&self.nats) = Some((cfg, task));
        }
        // Weak: the watcher must not keep the service (and its event tasks) alive.
        if let Some(workers_file) = workers_file {
            let me = Arc::downgrade(self);
            self.workers
                .watch(workers_file, move |old, new| match me.upgrade() {
                    Some(me) => {
                        me.sync_workers(Some(old), new);
                        true
                    }
                    None => false,
                });
        }
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let Some(me) = me.upgrade() else { return };
                me.expire_parked();
            }
        });
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(30)).await;
                let Some(me) = me.upgrade() else { return };
                let freed = {
                    let mut r = lock(&me.router);
                    let freed = r.sweep(Instant::now(), kvgate_core::load::DEFAULT_STALE_AFTER);
                    for id in freed.iter().filter(|id| !is_peer_key(id)) {
                        me.sync(SyncOp::Freed { id: id.to_string() });
                    }
                    freed
                };
                if !freed.is_empty() {
                    tracing::warn!(n = freed.len(), "freed stale bookings");
                }
            }
        });
    }

    /// Shares this router's bookings with its replicas over NATS and applies theirs. Once only;
    /// await [`ReplicaSync::ready`] before reporting ready. Needs a Tokio runtime.
    pub fn start_replica_sync(self: &Arc<Self>, config: ReplicaSyncConfig) -> Arc<ReplicaSync> {
        self.replica
            .get_or_init(|| ReplicaSync::start(self.router.clone(), config))
            .clone()
    }

    pub fn replica(&self) -> Option<&Arc<ReplicaSync>> {
        self.replica.get()
    }

    /// Queues an own op for the replicas; called with the router lock held, so that ops leave in
    /// the order the router saw them.
    fn sync(&self, op: SyncOp) {
        if let Some(r) = self.replica.get() {
            r.send(op);
        }
    }

    pub fn workers(&self) -> &WorkerSet {
        &self.workers
    }

    pub fn tokenizer(&self) -> &Arc<PromptTokenizer> {
        &self.tokenizer
    }

    pub fn block_size(&self) -> usize {
        lock(&self.router).block_size()
    }

    /// Runs `f` with the router locked (for metrics and tests).
    pub fn with_router<R>(&self, f: impl FnOnce(&Router) -> R) -> R {
        f(&lock(&self.router))
    }

    /// Brings the router and the event subscriptions in line with the workers file.
    fn sync_workers(&self, old: Option<&WorkersFile>, new: &WorkersFile) {
        self.sync_workers_with(old, new, Duration::ZERO);
    }

    fn sync_workers_with(&self, old: Option<&WorkersFile>, new: &WorkersFile, grace: Duration) {
        let mut router = lock(&self.router);
        let mut subs = lock(&self.subscriptions);
        // By id: a fleet of 10,000 is compared in one pass, not in 10,000 scans.
        let new_by_id: HashMap<u64, &kvgate_wire::workers::WorkerEntry> =
            new.workers.iter().map(|w| (w.instance_id().0, w)).collect();
        let now = Instant::now();
        {
            let mut parked = lock(&self.parked);
            for w in &new.workers {
                let id = w.instance_id();
                let Some(prev) = parked.remove(&id.0) else {
                    continue;
                };
                let same_engine = prev.kv_events == w.kv_events
                    && prev.kv_events_replay == w.kv_events_replay
                    && prev.dp_size == w.dp_size
                    && prev.url == w.url;
                if same_engine {
                    self.parking.returned.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(worker = %w.name, "worker back within the grace period, with its cache entries");
                } else {
                    // Same id, another engine: what was indexed is not its cache.
                    router.remove_worker(id);
                    lock(&self.events.misconfigured).retain(|(x, _), _| *x != id.0);
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
        if let Some(old) = old {
            for w in &old.workers {
                let id = w.instance_id();
                if !new_by_id.contains_key(&id.0) && !grace.is_zero() && router.park_worker(id, now)
                {
                    // Out of routing; its engine may well still run and publish, so the
                    // subscription and the cache entries stay until the grace ends.
                    lock(&self.parked).insert(id.0, w.clone());
                    self.parking.parked.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                // Only what the subscriptions depend on; capacity edits keep them running.
                let changed = new_by_id.get(&id.0).is_none_or(|n| {
                    n.kv_events != w.kv_events
                        || n.kv_events_replay != w.kv_events_replay
                        || n.dp_size != w.dp_size
                        || n.url != w.url
                });
                if !new_by_id.contains_key(&id.0) {
                    router.remove_worker(id);
                }
                if changed {
                    // A re-subscription judges the worker afresh, and what the old one indexed
                    // is no longer followed.
                    lock(&self.events.misconfigured).retain(|(w, _), _| *w != id.0);
                    if new_by_id.contains_key(&id.0)
                        && self.zmq_events.load(std::sync::atomic::Ordering::Relaxed)
                    {
                        for rank in 0..w.dp_size {
                            crate::events::clear_rank(
                                &mut router,
                                kvgate_core::WorkerRank::new(id.0, rank),
                                0,
                            );
                        }
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
        router.upsert_workers(new.workers.iter().map(|w| w.info()));
        drop(router);
        if !self.zmq_events.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        for w in &new.workers {
            if let Some(ep) = &w.kv_events {
                for rank in 0..w.dp_size {
                    subs.entry((w.instance_id().0, rank)).or_insert_with(|| {
                        subscribe(
                            self.router.clone(),
                            self.events.clone(),
                            w.instance_id(),
                            rank,
                            ep.clone(),
                            w.kv_events_replay.clone(),
                            new.block_size,
                        )
                    });
                }
            }
        }
    }

    /// Tokenizes (unless the request carries token ids and `accept_client_tokens`), hashes and
    /// rewrites the body with the token ids. CPU-bound: call it from a blocking thread for large
    /// prompts. `raw`: the bytes `req` was parsed from, when at hand (the rewrite then splices
    /// instead of re-serialising).
    ///
    /// Tokens in: with `accept_client_tokens`, a request carrying `nvext.token_data` is routed
    /// on those ids and forwarded unchanged: the engine serves the ids it is given (Dynamo's
    /// workers do), so the ids are the prompt the cache sees, and tokenizing the messages again
    /// would only cost time. The ids are checked against the vocabulary first. Without it, the
    /// messages are tokenized and whatever ids came in are overwritten (for engines that ignore
    /// `nvext`). A completions `prompt` given as ids is always used, after the same check.
    pub fn prepare(
        &self,
        req: &OpenAiRequest,
        raw: Option<&[u8]>,
        accept_client_tokens: bool,
    ) -> Result<Prepared, TokenizeError> {
        let block_size = self.block_size();
        let client = match &req.token_data {
            Some(t) if accept_client_tokens => {
                self.tokenizer.check_ids(t, "nvext.token_data")?;
                Some(t)
            }
            _ => None,
        };
        let owned;
        let tokens: &[u32] = match client {
            Some(t) => t,
            None => {
                owned = self.tokenizer.tokenize(req)?;
                &owned
            }
        };
        let hashes = BlockHashes::from_tokens(
            tokens,
            block_size,
            HashSeed::new(None, req.cache_salt.as_deref()),
        );
        // The worker gets the ids we routed on: no second tokenization, no drift.
        let body = match (raw, client) {
            (Some(raw), Some(_)) => raw.to_vec(),
            (Some(raw), None) => req.raw_body_with_token_data(raw, tokens),
            (None, _) => req.body_with_token_data(tokens),
        };
        Ok(Prepared {
            hashes,
            body,
            tokens: tokens.len(),
            client_tokens: client.is_some(),
        })
    }

    /// Chooses (and with `book`, books) a target among aggregated and decode workers, inside
    /// `allowed` when given. Booked decisions are logged for the debug endpoint.
    pub fn route(
        &self,
        id: &RequestId,
        hashes: &BlockHashes,
        expected_output_tokens: Option<u32>,
        allowed: Option<&[WorkerRank]>,
        book: bool,
    ) -> Result<Decision, RouteError> {
        self.route_among(
            id,
            hashes,
            expected_output_tokens,
            allowed,
            book,
            &[WorkerRole::Aggregated, WorkerRole::Decode],
            None,
        )
    }

    /// Whether requests are routed disaggregated now: a prefill pool and a decode pool exist.
    pub fn disaggregated_available(&self) -> bool {
        let r = lock(&self.router);
        !r.targets(&[WorkerRole::Prefill]).is_empty()
            && !r.targets(&[WorkerRole::Decode]).is_empty()
    }

    /// A disaggregated decision, both legs booked: the prefill worker by the full KV cost
    /// among prefill workers (their caches count), the decode worker among decode workers by
    /// load alone (overlap credit off: the KV arrives by transfer), as Dynamo does. The prefill
    /// leg is booked as `<id>/prefill`. `allowed` (the gateway's subset) applies to the decode
    /// worker, the endpoint the gateway connects to.
    pub fn route_disaggregated(
        &self,
        id: &RequestId,
        hashes: &BlockHashes,
        expected_output_tokens: Option<u32>,
        allowed: Option<&[WorkerRank]>,
    ) -> Result<(RequestId, Decision, Decision), RouteError> {
        let prefill_id = RequestId::from(format!("{}/prefill", id.as_str()));
        let prefill = self.route_among(
            &prefill_id,
            hashes,
            Some(1),
            None,
            true,
            &[WorkerRole::Prefill],
            None,
        )?;
        let weights = CostWeights {
            overlap_score_credit: 0.0,
            ..CostWeights::from(lock(&self.router).config())
        };
        match self.route_among(
            id,
            hashes,
            expected_output_tokens,
            allowed,
            true,
            &[WorkerRole::Decode],
            Some(weights),
        ) {
            Ok(decode) => Ok((prefill_id, prefill, decode)),
            Err(e) => {
                self.free(&prefill_id);
                Err(e)
            }
        }
    }

    /// Routes among workers of `roles` with `weights` (default: the configured cost).
    #[allow(clippy::too_many_arguments)]
    pub fn route_among(
        &self,
        id: &RequestId,
        hashes: &BlockHashes,
        expected_output_tokens: Option<u32>,
        allowed: Option<&[WorkerRank]>,
        book: bool,
        roles: &[WorkerRole],
        weights: Option<CostWeights>,
    ) -> Result<Decision, RouteError> {
        let started = Instant::now();
        // Replica homes against herding: read (and the decision recorded) before the router
        // lock, since the view's lock comes first.
        let home = self
            .replica
            .get()
            .filter(|_| book)
            .and_then(|s| s.deciding(started));
        let decision = {
            // Lock order: router, then rng.
            let mut router = lock(&self.router);
            let mut rng = lock(&self.rng);
            let weights = weights.unwrap_or_else(|| CostWeights::from(router.config()));
            let req = RouteRequest {
                request: id,
                hashes,
                expected_output_tokens,
                allowed,
                // Booked below, in a span of its own, under the same lock.
                book: false,
                home,
            };
            let score = tracing::info_span!(
                "score",
                kvgate.candidates = tracing::field::Empty,
                kvgate.worker_id = tracing::field::Empty,
                kvgate.dp_rank = tracing::field::Empty,
                kvgate.overlap_blocks = tracing::field::Empty,
                kvgate.predicted_cached_tokens = tracing::field::Empty,
            );
            let d = score
                .in_scope(|| router.route_among(req, roles, weights, Instant::now(), &mut *rng))?;
            score.record("kvgate.candidates", d.explanation.candidates_total as i64);
            score.record("kvgate.worker_id", d.worker.worker.0);
            score.record("kvgate.dp_rank", i64::from(d.worker.dp_rank.0));
            score.record("kvgate.overlap_blocks", i64::from(d.overlap_blocks));
            score.record(
                "kvgate.predicted_cached_tokens",
                d.predicted_cached_tokens as i64,
            );
            drop(score);
            if book {
                let _book =
                    tracing::info_span!("book", kvgate.worker_id = d.worker.worker.0).entered();
                let req = RouteRequest {
                    request: id,
                    hashes,
                    expected_output_tokens,
                    allowed,
                    book: true,
                    home: None,
                };
                router.book_chosen(&req, &d, Instant::now())?;
                if self.replica.get().is_some()
                    && let Some(op) = booked_op(&router, id)
                {
                    self.sync(op);
                }
            }
            d
        };
        let took = started.elapsed().as_secs_f64();
        crate::prom::observe_traced(&self.decision_seconds, took);
        self.decision_ms.observe(took * 1000.0);
        if book {
            self.accuracy.decisions.fetch_add(1, Ordering::Relaxed);
            self.accuracy
                .predicted_cached_tokens
                .fetch_add(decision.predicted_cached_tokens, Ordering::Relaxed);
            self.accuracy
                .routed_prompt_tokens
                .fetch_add(hashes.num_tokens() as u64, Ordering::Relaxed);
            if hashes.num_tokens() > 0 {
                self.predicted_hit_rate
                    .observe(decision.predicted_cached_tokens as f64 / hashes.num_tokens() as f64);
            }
            let name = self
                .workers
                .with_instance(decision.worker.worker.0, |w| w.name.clone())
                .unwrap_or_default();
            let rec = DecisionRecord {
                request_id: id.as_str().to_string(),
                unix_ms: unix_ms(),
                worker_id: decision.worker.worker.0,
                dp_rank: decision.worker.dp_rank.0,
                worker_name: name,
                isl_tokens: hashes.num_tokens(),
                overlap_blocks: decision.overlap_blocks,
                predicted_cached_tokens: decision.predicted_cached_tokens,
                actual_cached_tokens: None,
                served_by: None,
                explanation: decision.explanation.clone(),
            };
            let mut log = lock(&self.log);
            if self.log_len > 0 {
                if log.len() >= self.log_len {
                    log.pop_front();
                }
                log.push_back(rec);
            }
        }
        Ok(decision)
    }

    /// Whether any worker of `role` is known.
    pub fn has_role(&self, role: WorkerRole) -> bool {
        !lock(&self.router).targets(&[role]).is_empty()
    }

    pub fn prefill_complete(&self, id: &RequestId) {
        let mut r = lock(&self.router);
        if r.prefill_complete_at(id, Instant::now()) == Change::Applied {
            self.sync(SyncOp::PrefillDone { id: id.to_string() });
        }
    }

    pub fn touch(&self, id: &RequestId) {
        lock(&self.router).touch(id, Instant::now());
    }

    /// Applies KV events straight to the index (in-process engines and benchmarks; the event
    /// planes go through their own sequencing). Returns how many applied.
    pub fn apply_kv_events(&self, events: &[kvgate_core::KvEvent]) -> usize {
        let mut r = lock(&self.router);
        events.iter().filter(|e| r.apply_event(e)).count()
    }

    pub fn free(&self, id: &RequestId) {
        let mut r = lock(&self.router);
        if r.free_at(id, Instant::now()) == Change::Applied {
            self.sync(SyncOp::Freed { id: id.to_string() });
        }
    }

    /// The request was served by `to` instead of the booked target: move its load there.
    pub fn rebook(&self, id: &RequestId, to: WorkerRank) {
        let changed = {
            let mut r = lock(&self.router);
            let changed = r.rebook(id, to, Instant::now());
            if changed == Change::Applied {
                self.sync(SyncOp::Rebooked {
                    id: id.to_string(),
                    worker_id: to.worker.0,
                    dp_rank: to.dp_rank.0,
                });
            }
            changed
        };
        if changed == Change::Applied {
            self.accuracy.rebooked.fetch_add(1, Ordering::Relaxed);
            self.update_log(id, |r| r.served_by = Some(to.worker.0));
        }
    }

    /// Records the cached tokens the worker reported for a routed request.
    pub fn record_actual_cached(
        &self,
        id: &RequestId,
        predicted: u64,
        prompt_tokens: u64,
        actual: u64,
    ) {
        let a = &self.accuracy;
        a.responses_with_usage.fetch_add(1, Ordering::Relaxed);
        a.reported_prompt_tokens
            .fetch_add(prompt_tokens, Ordering::Relaxed);
        a.actual_cached_tokens.fetch_add(actual, Ordering::Relaxed);
        a.predicted_reported_tokens
            .fetch_add(predicted, Ordering::Relaxed);
        if actual != predicted {
            a.mispredicted.fetch_add(1, Ordering::Relaxed);
        }
        self.update_log(id, |r| r.actual_cached_tokens = Some(actual));
    }

    fn update_log(&self, id: &RequestId, f: impl FnOnce(&mut DecisionRecord)) {
        let mut log = lock(&self.log);
        if let Some(r) = log.iter_mut().rev().find(|r| r.request_id == id.as_str()) {
            f(r);
        }
    }

    /// The last `n` decisions, newest first.
    pub fn recent_decisions(&self, n: usize) -> Vec<DecisionRecord> {
        lock(&self.log).iter().rev().take(n).cloned().collect()
    }

    /// The worker entry and target for `host:port` (what a gateway calls an endpoint).
    pub fn endpoint_worker(&self, endpoint: &str) -> Option<WorkerEntry> {
        self.workers.by_endpoint(endpoint)
    }

    /// Router, event and accuracy series.
    pub fn render_metrics(&self, p: &mut Scrape) {
        let a = &self.accuracy;
        let e = &self.events;
        let counters: [(&str, &str, &AtomicU64); 15] = [
            (
                "kvgate_router_routed_prompt_tokens_total",
                "Prompt tokens of the booked decisions (predicted hit rate = predicted_cached_tokens / this).",
                &a.routed_prompt_tokens,
            ),
            (
                "kvgate_router_reported_prompt_tokens_total",
                "Prompt tokens of the decisions whose responses reported usage (hit rate = actual_cached_tokens / this).",
                &a.reported_prompt_tokens,
            ),
            (
                "kvgate_router_decisions_total",
                "Routing decisions that booked a worker.",
                &a.decisions,
            ),
            (
                "kvgate_router_predicted_cached_tokens_total",
                "Prompt tokens the router predicted cached on the chosen worker.",
                &a.predicted_cached_tokens,
            ),
            (
                "kvgate_router_reported_predicted_cached_tokens_total",
                "Predicted cached tokens of the decisions whose responses reported usage.",
                &a.predicted_reported_tokens,
            ),
            (
                "kvgate_router_actual_cached_tokens_total",
                "Cached prompt tokens the workers reported (usage.prompt_tokens_details.cached_tokens).",
                &a.actual_cached_tokens,
            ),
            (
                "kvgate_router_responses_with_usage_total",
                "Routed responses that reported cached tokens.",
                &a.responses_with_usage,
            ),
            (
                "kvgate_router_mispredicted_total",
                "Routed responses whose cached tokens differed from the prediction.",
                &a.mispredicted,
            ),
            (
                "kvgate_router_rebooked_total",
                "Requests the gateway served elsewhere than chosen (booking moved).",
                &a.rebooked,
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
        if let Ok(skipped) = e.skipped.lock() {
            for (reason, n) in skipped.iter() {
                p.counter(
                    "kvgate_kv_events_skipped_total",
                    "KV events kvgate cannot index correctly and skips, by reason.",
                    &[("reason", reason)],
                    *n as f64,
                );
            }
        }
        p.traced_histogram(
            "kvgate_router_decision_seconds",
            "One routing decision: scoring and booking, waiting for the router lock included.",
            &[],
            &self.decision_seconds,
        );
        p.histogram(
            "kvgate_kv_event_apply_lag_seconds",
            "From a KV event batch's publish time (vLLM ts, Dynamo published_at, JetStream's stored time) to its events in the index; catch-up after a restart shows here too.",
            &[],
            &e.apply_lag.0,
        );
        let file = self.workers.current();
        let names: HashMap<u64, &str> = file
            .workers
            .iter()
            .map(|w| (w.instance_id().0, w.name.as_str()))
            .collect();
        for (name, help, v) in [
            (
                "kvgate_kv_event_replays_total",
                "Catch-ups through a ZMQ publisher's replay socket.",
                &e.replays,
            ),
            (
                "kvgate_kv_event_replayed_messages_total",
                "Messages recovered through replay.",
                &e.replayed_messages,
            ),
            (
                "kvgate_kv_event_replay_failures_total",
                "Replays that failed (the rank was resynced instead).",
                &e.replay_failures,
            ),
        ] {
            p.counter(name, help, &[], v.load(Ordering::Relaxed) as f64);
        }
        p.counter(
            "kvgate_kv_event_duplicates_total",
            "KV events delivered twice (redelivery) and dropped.",
            &[],
            e.duplicates.load(Ordering::Relaxed) as f64,
        );
        if let Some(secs) = *lock(&e.restore_seconds) {
            p.gauge(
                "kvgate_kv_index_restore_seconds",
                "Seconds the start-up restore of the index snapshot took.",
                &[],
                secs,
            );
            p.gauge(
                "kvgate_kv_index_restored_events",
                "Events restored from the index snapshot.",
                &[],
                e.restored_events.load(Ordering::Relaxed) as f64,
            );
        }
        p.counter(
            "kvgate_kv_index_snapshots_written_total",
            "Index snapshots written.",
            &[],
            e.snapshots_written.load(Ordering::Relaxed) as f64,
        );
        for (name, help, v) in [
            (
                "kvgate_kv_index_snapshot_write_failures_total",
                "Index snapshot writes that failed.",
                &e.snapshot_failures,
            ),
            (
                "kvgate_kv_index_snapshots_discarded_total",
                "Index snapshots found at start-up and ignored (unreadable, damaged, another stream's).",
                &e.snapshots_discarded,
            ),
        ] {
            p.counter(name, help, &[], v.load(Ordering::Relaxed) as f64);
        }
        p.gauge(
            "kvgate_kv_index_snapshot_bytes",
            "Size of the last index snapshot written or restored.",
            &[],
            e.snapshot_bytes.load(Ordering::Relaxed) as f64,
        );
        if let Ok(restarts) = e.restarts.lock() {
            for (reason, n) in restarts.iter() {
                p.counter(
                    "kvgate_kv_rank_restarts_total",
                    "Engine restarts seen in the KV events without a cleared event (new publisher, event ids back); the rank's blocks were dropped.",
                    &[("reason", reason)],
                    *n as f64,
                );
            }
        }
        if lock(&self.nats).is_some() {
            p.gauge(
                "kvgate_kv_event_plane_connected",
                "1 while the NATS event plane is connected.",
                &[],
                f64::from(u8::from(e.plane_connected.load(Ordering::Relaxed))),
            );
            p.counter(
                "kvgate_kv_event_plane_disconnects_total",
                "Times the NATS event plane connection was lost.",
                &[],
                e.plane_disconnects.load(Ordering::Relaxed) as f64,
            );
        }
        p.gauge(
            "kvgate_router_parked_workers",
            "Workers out of routing (not ready) whose cache entries are kept for the unready grace period.",
            &[],
            lock(&self.parked).len() as f64,
        );
        for (name, help, v) in [
            (
                "kvgate_router_workers_parked_total",
                "Workers that left the pool and were parked with their cache entries.",
                &self.parking.parked,
            ),
            (
                "kvgate_router_workers_returned_total",
                "Parked workers back within the grace period, routing on their cache at once.",
                &self.parking.returned,
            ),
            (
                "kvgate_router_parked_expired_total",
                "Parked workers not back within the grace period, whose cache entries were dropped.",
                &self.parking.expired,
            ),
        ] {
            p.counter(name, help, &[], v.load(Ordering::Relaxed) as f64);
        }
        p.gauge(
            "kvgate_router_misconfigured_ranks",
            "Worker ranks whose KV events are refused (see /debug/index for why).",
            &[],
            lock(&self.events.misconfigured).len() as f64,
        );
        let r = lock(&self.router);
        p.gauge(
            "kvgate_router_events_blind",
            "1 while routing ignores the KV index because the event feed is down (load-only scoring).",
            &[],
            f64::from(u8::from(r.events_blind())),
        );
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
        // Every routable rank, idle ones at 0 (a dashboard shows the whole fleet). Dynamo's
        // type label: prefill workers are `prefill`, everything else `decode`.
        let mut loads = Vec::new();
        for (roles, kind) in [
            (&[WorkerRole::Aggregated, WorkerRole::Decode][..], "decode"),
            (&[WorkerRole::Prefill][..], "prefill"),
        ] {
            for w in r.targets(roles) {
                let l = r.load().load(&w);
                let blocks = l.map_or(0, |l| l.active_blocks()) as u64;
                loads.push((w, kind, blocks, l.map_or(0, |l| l.prefill_tokens)));
            }
        }
        drop(r);
        loads.sort();
        for (w, kind, blocks, prefill) in loads {
            let (id, rank) = (w.worker.0.to_string(), w.dp_rank.0.to_string());
            let name = names.get(&w.worker.0).copied().unwrap_or("");
            let labels = [("worker", id.as_str()), ("dp_rank", &rank), ("name", name)];
            let dynamo = [
                ("worker_id", id.as_str()),
                ("dp_rank", &rank),
                ("worker_type", kind),
            ];
            for (kvgate, dyn_name, help, v) in [
                (
                    "kvgate_router_active_blocks",
                    "dynamo_frontend_worker_active_decode_blocks",
                    "Active KV blocks booked per worker rank.",
                    blocks,
                ),
                (
                    "kvgate_router_active_prefill_tokens",
                    "dynamo_frontend_worker_active_prefill_tokens",
                    "Prompt tokens booked and not yet prefilled, per worker rank.",
                    prefill,
                ),
            ] {
                p.gauge(kvgate, help, &labels, v as f64);
                p.gauge(
                    dyn_name,
                    &format!("{help} (Dynamo's name)"),
                    &dynamo,
                    v as f64,
                );
            }
        }
        p.counter(
            "dynamo_component_router_requests_total",
            "Routing decisions that booked a worker (Dynamo's name for kvgate_router_decisions_total).",
            &[],
            a.decisions.load(Ordering::Relaxed) as f64,
        );
        p.histogram(
            "dynamo_component_router_kv_hit_rate",
            "Predicted KV cache hit rate of each booked decision, 0 to 1 (Dynamo's name; per request, so not block-weighted: see kvgate_router_predicted_cached_tokens_total).",
            &[],
            &self.predicted_hit_rate,
        );
        p.histogram(
            "dynamo_router_overhead_total_ms",
            "One routing decision in milliseconds (Dynamo's name; kvgate_router_decision_seconds in seconds).",
            &[],
            &self.decision_ms,
        );
        if let Some(sync) = self.replica.get() {
            render_replica_metrics(sync, p);
        }
    }
}

impl RoutingService {
    /// What the index believes each worker rank caches on device: engine block hashes, sorted
    /// (for `/debug/index` and for comparing with the workers' own dumps).
    /// `reachable_only`: only blocks whose whole prefix the rank holds (the ones that can match,
    /// and the ones a snapshot keeps).
    pub fn index_dump(&self, reachable_only: bool) -> serde_json::Value {
        let r = lock(&self.router);
        let mut by_rank: std::collections::BTreeMap<(u64, u32), Vec<u64>> = Default::default();
        let blocks = if reachable_only {
            r.index().reachable_blocks()
        } else {
            r.index().blocks()
        };
        for (w, tier, ext, _) in blocks {
            if tier == kvgate_core::StorageTier::Device {
                by_rank
                    .entry((w.worker.0, w.dp_rank.0))
                    .or_default()
                    .push(ext.0);
            }
        }
        let blind = r.events_blind();
        let mut parked: Vec<u64> = r.parked_workers().map(|(i, _)| i.id.0).collect();
        parked.sort_unstable();
        drop(r);
        let ranks: Vec<serde_json::Value> = by_rank
            .into_iter()
            .map(|((worker, dp_rank), mut blocks)| {
                blocks.sort_unstable();
                serde_json::json!({"worker_id": worker, "dp_rank": dp_rank, "blocks": blocks})
            })
            .collect();
        let misconfigured: Vec<serde_json::Value> = lock(&self.events.misconfigured)
            .iter()
            .map(|((w, d), why)| serde_json::json!({"worker_id": w, "dp_rank": d, "reason": why}))
            .collect();
        serde_json::json!({
            "misconfigured": misconfigured,
            "parked": parked,
            "events_blind": blind,
            "event_plane_connected": self.events.plane_connected.load(Ordering::Relaxed),
            "ranks": ranks,
        })
    }
}

fn render_replica_metrics(sync: &ReplicaSync, p: &mut Scrape) {
    let st = &sync.stats;
    let c = sync.with_view(|v| (v.peers(), v.unsynced(), v.peer_bookings(), v.counters));
    let (peers, unsynced, peer_bookings, counters) = c;
    for (name, help, v) in [
        (
            "kvgate_replica_sync_peers",
            "Router replicas followed.",
            peers as f64,
        ),
        (
            "kvgate_replica_sync_unsynced_peers",
            "Replicas whose state is being fetched.",
            unsynced as f64,
        ),
        (
            "kvgate_replica_sync_peer_bookings",
            "Bookings of other replicas counted as load here.",
            peer_bookings as f64,
        ),
        (
            "kvgate_replica_herd_level",
            "Peer routing decisions made alongside each of this replica's, unseen (smoothed); above 0, replica homes are on.",
            sync.herd_level(),
        ),
        (
            "kvgate_replica_sync_connected",
            "1 while connected to NATS for replica sync.",
            f64::from(u8::from(st.connected.load(Ordering::Relaxed))),
        ),
        (
            "kvgate_replica_sync_ready",
            "1 once the peers' states were fetched at start-up.",
            f64::from(u8::from(st.ready.load(Ordering::Relaxed))),
        ),
        (
            "kvgate_replica_sync_bootstrap_seconds",
            "Start-up until the peers' load was known.",
            st.bootstrap_micros.load(Ordering::Relaxed) as f64 / 1e6,
        ),
    ] {
        p.gauge(name, help, &[], v);
    }
    for (name, help, v) in [
        (
            "kvgate_replica_sync_messages_sent_total",
            "Sync messages published (batches of ops).",
            st.messages_sent.load(Ordering::Relaxed),
        ),
        (
            "kvgate_replica_sync_ops_sent_total",
            "Booking changes published.",
            st.ops_sent.load(Ordering::Relaxed),
        ),
        (
            "kvgate_replica_sync_publish_failures_total",
            "Sync messages NATS refused.",
            st.publish_failures.load(Ordering::Relaxed),
        ),
        (
            "kvgate_replica_sync_messages_received_total",
            "Peers' sync messages received.",
            st.messages_received.load(Ordering::Relaxed),
        ),
        (
            "kvgate_replica_sync_ops_applied_total",
            "Peers' booking changes applied.",
            counters.ops_applied,
        ),
        (
            "kvgate_replica_sync_duplicates_total",
            "Peers' messages already applied.",
            counters.duplicates,
        ),
        (
            "kvgate_replica_sync_malformed_total",
            "Undecodable or oversized sync messages dropped.",
            st.malformed.load(Ordering::Relaxed),
        ),
        (
            "kvgate_replica_sync_gaps_total",
            "Gaps in a peer's message numbers (lost messages), each repaired by a state fetch.",
            counters.gaps,
        ),
        (
            "kvgate_replica_sync_states_applied_total",
            "Peers' states fetched and applied.",
            counters.states_applied,
        ),
        (
            "kvgate_replica_sync_states_served_total",
            "State requests answered.",
            st.states_served.load(Ordering::Relaxed),
        ),
        (
            "kvgate_replica_sync_state_fetch_failures_total",
            "State requests that failed (peer gone or slow).",
            st.state_fetch_failures.load(Ordering::Relaxed),
        ),
        (
            "kvgate_replica_sync_peers_expired_total",
            "Replicas dropped after going silent.",
            counters.peers_expired,
        ),
    ] {
        p.counter(name, help, &[], v as f64);
    }
}

impl RoutingService {
    /// The load view: per worker rank, and which bookings are this replica's (`/debug/load`).
    pub fn load_dump(&self) -> serde_json::Value {
        let r = lock(&self.router);
        let workers = r.load().summary();
        let peer = r
            .load()
            .bookings()
            .filter(|(id, _)| is_peer_key(id))
            .count();
        let total = r.load().num_bookings();
        drop(r);
        let replica = self.replica.get().map(|s| {
            let (peers, unsynced) = s.with_view(|v| (v.peers(), v.unsynced()));
            let home = s.next_home(Instant::now());
            serde_json::json!({
                "id": s.me.to_string(),
                "ready": s.is_ready(),
                "peers": peers,
                "unsynced_peers": unsynced,
                "herd_level": s.herd_level(),
                // The home share the next decision would use (null: none, routing as one).
                "home": home.map(|h| serde_json::json!({
                    "rank": h.rank,
                    "of": h.of,
                    "discount": h.discount,
                })),
            })
        });
        serde_json::json!({
            "replica": replica,
            "bookings": {"own": total - peer, "peers": peer},
            "workers": workers,
        })
    }
}

impl Drop for RoutingService {
    fn drop(&mut self) {
        if let Some(r) = self.replica.get() {
            r.stop();
        }
        if let Some((_, task)) = lock(&self.nats).take() {
            task.abort();
        }
        for (_, h) in lock(&self.subscriptions).drain() {
            h.abort();
        }
    }
}

/// A booked request. Marks prefill complete on the first response byte and frees the booking
/// when dropped, so every way a request can end (completion, error, disconnect, cancellation)
/// releases its load exactly once.
pub struct Booking {
    service: Arc<RoutingService>,
    id: RequestId,
    pub predicted_cached_tokens: u64,
    prompt_tokens: u64,
    prefill_done: bool,
    last_touch: Instant,
}

/// How often a streaming response refreshes its booking against the stale sweep.
const TOUCH_EVERY: Duration = Duration::from_secs(30);

impl Booking {
    pub fn new(
        service: Arc<RoutingService>,
        id: RequestId,
        predicted_cached_tokens: u64,
        prompt_tokens: u64,
    ) -> Self {
        Self {
            service,
            id,
            predicted_cached_tokens,
            prompt_tokens,
            prefill_done: false,
            last_touch: Instant::now(),
        }
    }

    /// Response data is flowing: keeps a long generation from being swept as stale.
    pub fn alive(&mut self) {
        let now = Instant::now();
        if now.duration_since(self.last_touch) >= TOUCH_EVERY {
            self.last_touch = now;
            self.service.touch(&self.id);
        }
    }

    pub fn id(&self) -> &RequestId {
        &self.id
    }

    pub fn first_byte(&mut self) {
        if !self.prefill_done {
            self.prefill_done = true;
            self.service.prefill_complete(&self.id);
        }
    }

    pub fn rebook(&self, to: WorkerRank) {
        self.service.rebook(&self.id, to);
    }

    pub fn record_actual_cached(&self, actual: u64) {
        self.service.record_actual_cached(
            &self.id,
            self.predicted_cached_tokens,
            self.prompt_tokens,
            actual,
        );
    }
}

impl Drop for Booking {
    fn drop(&mut self) {
        self.service.free(&self.id);
    }
}
