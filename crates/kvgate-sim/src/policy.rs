//! Routing policies the simulation compares, all behind [`Policy`] and all seeing the same
//! fleet: what a real router of that kind would know (its own routing history, the engines'
//! scraped metrics, or their KV events).
//!
//! - [`Random`], [`RoundRobin`], [`LeastLoad`] (fewest in-flight requests);
//! - [`GaieDefault`]: the GAIE reference picker's default scorers: approximate prefix (routing
//!   history, 16-token blocks, the first 256 blocks, an LRU of 31,250 blocks per server) weight 3,
//!   queue length weight 2, KV-cache utilisation weight 2;
//! - [`SglangCacheAware`]: SGLang's cache-aware router: an approximate prefix tree per worker
//!   from routing history, shortest queue when loads are imbalanced (`max - min > 32` and
//!   `max > 1.0001 * min`), else the longest match if it covers more than half the prompt, else
//!   the worker with the smallest tree;
//! - [`KvRouter`] with [`KvRouter::dynamo`]: Dynamo's cost function with its default knobs,
//!   reimplemented in `kvgate-core` and fed by the engines' KV events;
//! - [`KvRouter`] with [`KvRouter::kvgate`]: kvgate's policy, from `kvgate-core` (the product's);
//! - [`LlmdDefault`]: llm-d's 2026 default scheduler profile: a prefix-cache affinity filter
//!   ("sticky until saturated") and a token-load scorer;
//! - [`Lmetric`]: LMetric's score, queued plus own uncached prefill tokens times the batch size.
//!
//! Engines' metrics are read at decision time (a real picker scrapes them every ~50 ms: this
//! favours the metric-driven policies slightly).

use kvgate_core::config::{RouterConfig, RouterPolicy};
use kvgate_core::hashing::BlockHashes;
use kvgate_core::random::{RandomSource, SplitMix64};
use kvgate_core::router::{ReplicaHome, RouteRequest, Router, WorkerInfo, WorkerRole};
use kvgate_core::scheduler::WorkerCapacity;
use kvgate_core::{RequestId, SeqHash, WorkerId, WorkerRank};
use kvgate_engine::CacheEvent;
use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// A worker as a policy may see it when deciding.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct WorkerView {
    /// Requests routed here and not finished (what a router counts itself).
    pub in_flight: usize,
    /// The engine's queue and batch (what its metrics report).
    pub waiting: usize,
    pub running: usize,
    /// Fraction of KV blocks in use.
    pub kv_usage: f64,
    pub total_kv_blocks: usize,
    pub max_num_batched_tokens: usize,
}

/// The request being routed.
pub struct Arrival<'a> {
    pub id: u64,
    pub hashes: &'a BlockHashes,
    pub max_output_tokens: u32,
}

pub trait Policy {
    fn name(&self) -> &str;
    /// Picks a worker index for `req`.
    fn route(&mut self, req: &Arrival<'_>, fleet: &[WorkerView], now: Instant) -> usize;
    /// The request's first token left the worker.
    fn first_token(&mut self, _id: u64, _now: Instant) {}
    /// The request finished.
    fn finished(&mut self, _id: u64, _now: Instant) {}
    /// A worker's KV events (for policies fed by them).
    fn cache_events(&mut self, _worker: usize, _events: &[CacheEvent]) {}
    /// Bookings still held once the run is over (for policies that book): anything but 0 is
    /// a leak.
    fn open_bookings(&mut self) -> Option<usize> {
        None
    }
}

/// Uniformly random among the indices where `better` finds no better one.
fn pick_best<T: PartialOrd + Copy>(
    rng: &mut SplitMix64,
    n: usize,
    score: impl Fn(usize) -> T,
    lower_is_better: bool,
) -> usize {
    let mut best: Vec<usize> = Vec::new();
    let mut best_score: Option<T> = None;
    for i in 0..n {
        let s = score(i);
        let better = match best_score {
            None => true,
            Some(b) => {
                if lower_is_better {
                    s < b
                } else {
                    s > b
                }
            }
        };
        if better {
            best.clear();
            best.push(i);
            best_score = Some(s);
        } else if best_score.is_some_and(|b| b == s) {
            best.push(i);
        }
    }
    if best.len() <= 1 {
        return best.first().copied().unwrap_or(0);
    }
    best[(rng.next_u64() % best.len() as u64) as usize]
}

pub struct Random(SplitMix64);

impl Random {
    pub fn new(seed: u64) -> Self {
        Self(SplitMix64::new(seed))
    }
}

impl Policy for Random {
    fn name(&self) -> &str {
        "random"
    }
    fn route(&mut self, _: &Arrival<'_>, fleet: &[WorkerView], _: Instant) -> usize {
        (self.0.next_u64() % fleet.len().max(1) as u64) as usize
    }
}

#[derive(Default)]
pub struct RoundRobin(usize);

impl Policy for RoundRobin {
    fn name(&self) -> &str {
        "round-robin"
    }
    fn route(&mut self, _: &Arrival<'_>, fleet: &[WorkerView], _: Instant) -> usize {
        let w = self.0 % fleet.len().max(1);
        self.0 += 1;
        w
    }
}

pub struct LeastLoad(SplitMix64);

impl LeastLoad {
    pub fn new(seed: u64) -> Self {
        Self(SplitMix64::new(seed))
    }
}

impl Policy for LeastLoad {
    fn name(&self) -> &str {
        "least-load"
    }
    fn route(&mut self, _: &Arrival<'_>, fleet: &[WorkerView], _: Instant) -> usize {
        pick_best(&mut self.0, fleet.len(), |i| fleet[i].in_flight, true)
    }
}

/// A bounded LRU set of block hashes (the approximate caches of the history-based pickers).
#[derive(Default)]
struct LruBlocks {
    cap: usize,
    tick: u64,
    last: HashMap<SeqHash, u64>,
    order: VecDeque<(SeqHash, u64)>,
}

impl LruBlocks {
    fn new(cap: usize) -> Self {
        Self {
            cap,
            ..Self::default()
        }
    }

    fn touch(&mut self, h: SeqHash) {
        self.tick += 1;
        self.last.insert(h, self.tick);
        self.order.push_back((h, self.tick));
        while self.last.len() > self.cap {
            let Some((old, t)) = self.order.pop_front() else {
                break;
            };
            // Stale queue entries (touched again later) are skipped.
            if self.last.get(&old) == Some(&t) {
                self.last.remove(&old);
            }
        }
        // Keep the queue from growing without bound through repeated touches.
        if self.order.len() > 4 * self.cap.max(1024) {
            let last = &self.last;
            self.order.retain(|(h, t)| last.get(h) == Some(t));
        }
    }

    fn contains(&self, h: &SeqHash) -> bool {
        self.last.contains_key(h)
    }

    /// Leading blocks of `seqs` present.
    fn prefix_len(&self, seqs: &[SeqHash]) -> usize {
        seqs.iter().take_while(|s| self.contains(s)).count()
    }
}

/// GAIE's default picker (see the module docs).
pub struct GaieDefault {
    rng: SplitMix64,
    lru: Vec<LruBlocks>,
}

/// GAIE prefix scorer defaults: blocks considered, LRU capacity per server.
const GAIE_MAX_PREFIX_BLOCKS: usize = 256;
const GAIE_LRU_PER_SERVER: usize = 31_250;

impl GaieDefault {
    pub fn new(workers: usize, seed: u64) -> Self {
        Self {
            rng: SplitMix64::new(seed),
            lru: (0..workers)
                .map(|_| LruBlocks::new(GAIE_LRU_PER_SERVER))
                .collect(),
        }
    }
}

impl Policy for GaieDefault {
    fn name(&self) -> &str {
        "gaie-default"
    }
    fn route(&mut self, req: &Arrival<'_>, fleet: &[WorkerView], _: Instant) -> usize {
        let seqs = &req.hashes.seqs()[..req.hashes.seqs().len().min(GAIE_MAX_PREFIX_BLOCKS)];
        let (qmin, qmax) = fleet.iter().fold((usize::MAX, 0), |(lo, hi), w| {
            (lo.min(w.waiting), hi.max(w.waiting))
        });
        let lru = &self.lru;
        let score = |i: usize| {
            let prefix = if seqs.is_empty() {
                0.0
            } else {
                lru[i].prefix_len(seqs) as f64 / seqs.len() as f64
            };
            let queue = if qmax == qmin {
                1.0
            } else {
                (qmax - fleet[i].waiting) as f64 / (qmax - qmin) as f64
            };
            let kv = 1.0 - fleet[i].kv_usage;
            3.0 * prefix + 2.0 * queue + 2.0 * kv
        };
        let w = pick_best(&mut self.rng, fleet.len(), score, false);
        for &s in seqs {
            self.lru[w].touch(s);
        }
        w
    }
}

/// SGLang's cache-aware router (see the module docs).
pub struct SglangCacheAware {
    rng: SplitMix64,
    trees: Vec<HashMap<SeqHash, Instant>>,
    in_flight: Vec<usize>,
    owner: HashMap<u64, usize>,
    last_eviction: Option<Instant>,
    block_size: usize,
}

const SGLANG_CACHE_THRESHOLD: f64 = 0.5;
const SGLANG_BALANCE_ABS: usize = 32;
const SGLANG_BALANCE_REL: f64 = 1.0001;
const SGLANG_EVICTION_INTERVAL: Duration = Duration::from_secs(60);
/// SGLang's default tree size is 2^24 characters: about 4M tokens, in 16-token blocks.
const SGLANG_MAX_TREE_BLOCKS: usize = (1 << 24) / 4 / 16;

impl SglangCacheAware {
    pub fn new(workers: usize, block_size: usize, seed: u64) -> Self {
        Self {
            rng: SplitMix64::new(seed),
            trees: vec![HashMap::new(); workers],
            in_flight: vec![0; workers],
            owner: HashMap::new(),
            last_eviction: None,
            block_size,
        }
    }

    fn evict(&mut self, now: Instant) {
        let due = self
            .last_eviction
            .is_none_or(|t| now.saturating_duration_since(t) >= SGLANG_EVICTION_INTERVAL);
        if !due {
            return;
        }
        self.last_eviction = Some(now);
        for tree in &mut self.trees {
            if tree.len() > SGLANG_MAX_TREE_BLOCKS {
                let mut by_age: Vec<(Instant, SeqHash)> =
                    tree.iter().map(|(h, t)| (*t, *h)).collect();
                // By age, then hash: blocks of one request share a timestamp, and the map's
                // order (random per process) must not choose among them.
                by_age.sort_unstable();
                for (_, h) in by_age.iter().take(tree.len() - SGLANG_MAX_TREE_BLOCKS) {
                    tree.remove(h);
                }
            }
        }
    }
}

impl Policy for SglangCacheAware {
    fn name(&self) -> &str {
        "sglang-cache-aware"
    }
    fn route(&mut self, req: &Arrival<'_>, fleet: &[WorkerView], now: Instant) -> usize {
        self.evict(now);
        let n = fleet.len();
        let (min, max) = self
            .in_flight
            .iter()
            .fold((usize::MAX, 0), |(lo, hi), &l| (lo.min(l), hi.max(l)));
        let imbalanced = max.saturating_sub(min) > SGLANG_BALANCE_ABS
            && max as f64 > min as f64 * SGLANG_BALANCE_REL;
        let seqs = req.hashes.seqs();
        let w = if imbalanced {
            let load = &self.in_flight;
            pick_best(&mut self.rng, n, |i| load[i], true)
        } else {
            let trees = &self.trees;
            let matched = |i: usize| seqs.iter().take_while(|s| trees[i].contains_key(s)).count();
            let best = pick_best(&mut self.rng, n, matched, false);
            let tokens = req.hashes.num_tokens().max(1);
            let rate = (matched(best) * self.block_size) as f64 / tokens as f64;
            if rate > SGLANG_CACHE_THRESHOLD {
                best
            } else {
                pick_best(&mut self.rng, n, |i| trees[i].len(), true)
            }
        };
        for &s in seqs {
            self.trees[w].insert(s, now);
        }
        self.in_flight[w] += 1;
        self.owner.insert(req.id, w);
        w
    }
    fn finished(&mut self, id: u64, _: Instant) {
        if let Some(w) = self.owner.remove(&id) {
            self.in_flight[w] = self.in_flight[w].saturating_sub(1);
        }
    }
}

/// A router core fed by the engines' KV events and booking its own decisions, with the policy
/// its configuration names: Dynamo's cost function ([`KvRouter::dynamo`]) or kvgate's
/// ([`KvRouter::kvgate`], the product default). The same code as in `kvgate epp`.
pub struct KvRouter {
    name: String,
    router: Router,
    rng: SplitMix64,
    events: u64,
}

fn worker_rank(i: usize) -> WorkerRank {
    WorkerRank::new(i as u64 + 1, 0)
}

fn request_id(id: u64) -> RequestId {
    RequestId::from(id.to_string())
}

impl KvRouter {
    /// A router with any configuration (its `policy` decides the scoring).
    pub fn with_config(
        name: &str,
        config: RouterConfig,
        fleet: &[WorkerView],
        block_size: usize,
        seed: u64,
    ) -> Result<Self, String> {
        let mut router = Router::new(config, block_size).map_err(|e| e.to_string())?;
        for (i, w) in fleet.iter().enumerate() {
            router.upsert_worker(WorkerInfo {
                id: WorkerId(i as u64 + 1),
                dp_size: 1,
                role: WorkerRole::Aggregated,
                capacity: WorkerCapacity {
                    total_kv_blocks: Some(w.total_kv_blocks as u64),
                    max_num_batched_tokens: Some(w.max_num_batched_tokens as u64),
                },
            });
        }
        Ok(Self {
            name: name.into(),
            router,
            rng: SplitMix64::new(seed),
            events: 0,
        })
    }

    /// Dynamo's KV router: its cost function with the default knobs (credit 1, prefill load
    /// scale 1, temperature 0, active blocks tracked), as reimplemented in `kvgate-core`.
    pub fn dynamo(fleet: &[WorkerView], block_size: usize, seed: u64) -> Result<Self, String> {
        let config = RouterConfig {
            policy: RouterPolicy::Dynamo,
            ..RouterConfig::default()
        };
        Self::with_config("dynamo", config, fleet, block_size, seed)
    }

    /// kvgate's policy ([`kvgate_core::latency`]) with the default knobs: the prefill rate is
    /// learned from the simulated first tokens, as it would be from real ones.
    pub fn kvgate(fleet: &[WorkerView], block_size: usize, seed: u64) -> Result<Self, String> {
        let config = RouterConfig {
            policy: RouterPolicy::Kvgate,
            ..RouterConfig::default()
        };
        Self::with_config("kvgate", config, fleet, block_size, seed)
    }

    pub fn router(&self) -> &Router {
        &self.router
    }

    pub fn router_mut(&mut self) -> &mut Router {
        &mut self.router
    }

    /// Routes (and books) `req` as [`Policy::route`] does, with a replica home for this one
    /// decision (see [`ReplicaHome`]).
    pub fn route_home(
        &mut self,
        req: &Arrival<'_>,
        home: Option<ReplicaHome>,
        now: Instant,
    ) -> usize {
        let id = request_id(req.id);
        let decision = self.router.route(
            RouteRequest {
                request: &id,
                hashes: req.hashes,
                expected_output_tokens: Some(req.max_output_tokens),
                allowed: None,
                book: true,
                home,
            },
            now,
            &mut self.rng,
        );
        match decision {
            Ok(d) => d.worker.worker.0 as usize - 1,
            // Admission control is off: only an empty fleet can refuse.
            Err(_) => 0,
        }
    }
}

impl Policy for KvRouter {
    fn name(&self) -> &str {
        &self.name
    }

    fn route(&mut self, req: &Arrival<'_>, _: &[WorkerView], now: Instant) -> usize {
        self.route_home(req, None, now)
    }

    fn first_token(&mut self, id: u64, now: Instant) {
        self.router.prefill_complete_at(&request_id(id), now);
    }

    fn finished(&mut self, id: u64, now: Instant) {
        self.router.free_at(&request_id(id), now);
    }

    fn cache_events(&mut self, worker: usize, events: &[CacheEvent]) {
        for e in events {
            self.events += 1;
            self.router
                .apply_event(&e.to_kv_event(worker_rank(worker), self.events));
        }
    }

    fn open_bookings(&mut self) -> Option<usize> {
        Some(self.router.load().bookings().count())
    }
}

/// llm-d's affinity filter: a prefix score at least this keeps the request on warm endpoints.
const LLMD_AFFINITY_THRESHOLD: f64 = 0.80;
/// ...unless the warm endpoints' predicted wait exceeds the cold ones' by more than this.
const LLMD_RELEASE_MS: f64 = 18_000.0;
/// The peak prefill throughput llm-d calibrates its wait prediction with.
const LLMD_PREFILL_TOKENS_PER_SEC: f64 = 15_928.0;
/// The token-load scorer's saturation point.
const LLMD_MAX_TOKEN_LOAD: u64 = 4_194_304;
/// llm-d's approximate prefix index: 64-token blocks, 31,250 per endpoint.
const LLMD_BLOCK_TOKENS: usize = 64;
const LLMD_LRU_PER_ENDPOINT: usize = 31_250;

/// llm-d's 2026 default profile, as its docs describe it: an approximate prefix index from
/// routing history (64-token blocks, an LRU per endpoint); endpoints whose prefix score (matched
/// share of the prompt) is at least 0.80 are kept ("sticky") unless the best of them would wait
/// more than 18 s longer than the best cold one, the wait being the uncached tokens committed
/// there (routed, no first token yet) over 15,928 tokens/s; the survivors are scored by token
/// load (committed uncached tokens plus this request's, `1 - min(L, 2^22) / 2^22`), and the
/// highest score wins, ties at random.
pub struct LlmdDefault {
    rng: SplitMix64,
    lru: Vec<LruBlocks>,
    committed: Vec<u64>,
    open: HashMap<u64, (usize, u64)>,
}

impl LlmdDefault {
    pub fn new(workers: usize, seed: u64) -> Self {
        Self {
            rng: SplitMix64::new(seed),
            lru: (0..workers)
                .map(|_| LruBlocks::new(LLMD_LRU_PER_ENDPOINT))
                .collect(),
            committed: vec![0; workers],
            open: HashMap::new(),
        }
    }
}

impl Policy for LlmdDefault {
    fn name(&self) -> &str {
        "llm-d-default"
    }
    fn route(&mut self, req: &Arrival<'_>, fleet: &[WorkerView], _: Instant) -> usize {
        // One 64-token block per four 16-token ones: the hash of its last 16-token block
        // identifies the whole prefix up to there.
        let per = (LLMD_BLOCK_TOKENS / req.hashes.block_size().max(1)).max(1);
        let chunks: Vec<SeqHash> = req
            .hashes
            .seqs()
            .iter()
            .skip(per - 1)
            .step_by(per)
            .copied()
            .collect();
        let isl = req.hashes.num_tokens() as u64;
        let n = fleet.len();
        let matched: Vec<usize> = (0..n).map(|i| self.lru[i].prefix_len(&chunks)).collect();
        let uncached = |i: usize| isl.saturating_sub((matched[i] * LLMD_BLOCK_TOKENS) as u64);
        let score = |i: usize| {
            if chunks.is_empty() {
                0.0
            } else {
                matched[i] as f64 / chunks.len() as f64
            }
        };
        let wait_ms = |i: usize| self.committed[i] as f64 / LLMD_PREFILL_TOKENS_PER_SEC * 1e3;
        let warm: Vec<usize> = (0..n)
            .filter(|&i| score(i) >= LLMD_AFFINITY_THRESHOLD)
            .collect();
        let cold: Vec<usize> = (0..n)
            .filter(|&i| score(i) < LLMD_AFFINITY_THRESHOLD)
            .collect();
        let min_wait = |set: &[usize]| {
            set.iter()
                .map(|&i| wait_ms(i))
                .fold(f64::INFINITY, f64::min)
        };
        let candidates: Vec<usize> = if warm.is_empty()
            || (!cold.is_empty() && min_wait(&warm) - min_wait(&cold) > LLMD_RELEASE_MS)
        {
            (0..n).collect()
        } else {
            warm
        };
        let token_score = |k: usize| {
            let i = candidates[k];
            let load = (self.committed[i] + uncached(i)).min(LLMD_MAX_TOKEN_LOAD);
            1.0 - load as f64 / LLMD_MAX_TOKEN_LOAD as f64
        };
        let k = pick_best(&mut self.rng, candidates.len(), token_score, false);
        let w = candidates.get(k).copied().unwrap_or(0);
        let own = uncached(w);
        self.committed[w] += own;
        self.open.insert(req.id, (w, own));
        for &c in &chunks {
            self.lru[w].touch(c);
        }
        w
    }
    fn first_token(&mut self, id: u64, _: Instant) {
        if let Some((w, t)) = self.open.get_mut(&id) {
            self.committed[*w] = self.committed[*w].saturating_sub(*t);
            *t = 0;
        }
    }
    fn finished(&mut self, id: u64, _: Instant) {
        if let Some((w, t)) = self.open.remove(&id) {
            self.committed[w] = self.committed[w].saturating_sub(t);
        }
    }
}

/// LMetric (arXiv 2603.15202): the worker minimising `(queued uncached prefill tokens + this
/// request's uncached tokens) * (outstanding requests + 1)`, first index on ties; nothing to
/// tune. Cache state from the engines' KV events and load from its own bookings, through the
/// router core's index and load tracker.
pub struct Lmetric {
    inner: KvRouter,
}

impl Lmetric {
    pub fn new(fleet: &[WorkerView], block_size: usize) -> Result<Self, String> {
        let config = RouterConfig {
            policy: RouterPolicy::Dynamo,
            ..RouterConfig::default()
        };
        Ok(Self {
            inner: KvRouter::with_config("lmetric", config, fleet, block_size, 1)?,
        })
    }
}

impl Policy for Lmetric {
    fn name(&self) -> &str {
        "lmetric"
    }
    fn route(&mut self, req: &Arrival<'_>, fleet: &[WorkerView], now: Instant) -> usize {
        let router = &mut self.inner.router;
        let overlaps = router.overlaps(req.hashes, now);
        let bs = router.block_size() as u64;
        let isl = req.hashes.num_tokens() as u64;
        let load = router.load();
        let mut best = (u128::MAX, 0usize);
        for i in 0..fleet.len() {
            let w = worker_rank(i);
            let cached = (u64::from(overlaps.device(&w)) * bs).min(isl);
            let (queued, reqs) = load
                .load(&w)
                .map_or((0, 0), |l| (l.prefill_tokens, l.requests as u64));
            let score = u128::from(queued + isl - cached) * u128::from(reqs + 1);
            if score < best.0 {
                best = (score, i);
            }
        }
        let id = request_id(req.id);
        let allowed = [worker_rank(best.1)];
        let decision = router.route(
            RouteRequest {
                request: &id,
                hashes: req.hashes,
                expected_output_tokens: Some(req.max_output_tokens),
                allowed: Some(&allowed),
                book: true,
                home: None,
            },
            now,
            &mut self.inner.rng,
        );
        decision.map_or(best.1, |d| d.worker.worker.0 as usize - 1)
    }
    fn first_token(&mut self, id: u64, now: Instant) {
        self.inner.first_token(id, now);
    }
    fn finished(&mut self, id: u64, now: Instant) {
        self.inner.finished(id, now);
    }
    fn cache_events(&mut self, worker: usize, events: &[CacheEvent]) {
        self.inner.cache_events(worker, events);
    }
}
