//! The routing core behind one type: workers, the event-fed prefix index, the predicted index,
//! in-flight load and the scheduler. Adapters own one `Router` (behind whatever lock or actor
//! they like), feed it events and worker changes, and call [`Router::route`] /
//! [`Router::prefill_complete`] / [`Router::free`] as requests progress.

use crate::config::{ConfigError, RouterConfig};
use crate::events::KvEvent;
use crate::fasthash::FastMap;
use crate::hashing::BlockHashes;
use crate::ids::{RequestId, WorkerId, WorkerRank};
use crate::index::{OverlapScores, PrefixIndex, TierOverlap};
use crate::latency::{Estimates, LatencyModel};
use crate::load::{BookError, Change, Changed, LoadFigures, LoadTracker, NewBooking};
use crate::predicted::PredictedIndex;
use crate::random::RandomSource;
use crate::scheduler::{
    CandidateInput, Candidates, CostWeights, Explanation, Outcome, ScoreRequest, WorkerCapacity,
    schedule_over,
};
use serde::Serialize;
use std::time::{Duration, Instant};

/// What a worker does in a disaggregated deployment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkerRole {
    #[default]
    Aggregated,
    Prefill,
    Decode,
}

/// A worker as discovery knows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WorkerInfo {
    pub id: WorkerId,
    pub dp_size: u32,
    pub role: WorkerRole,
    pub capacity: WorkerCapacity,
}

/// One routing question.
#[derive(Clone, Copy, Debug)]
pub struct RouteRequest<'a> {
    pub request: &'a RequestId,
    pub hashes: &'a BlockHashes,
    pub expected_output_tokens: Option<u32>,
    /// Only these targets may be chosen (a gateway's subset hint); `None` = all.
    pub allowed: Option<&'a [WorkerRank]>,
    /// Book the request's load on the chosen worker (false: just answer, e.g. a dry run).
    pub book: bool,
    /// This replica's home share of the fleet for this decision, when replicas route side by
    /// side and the herd measure says they decide together ([`crate::replica::ReplicaView::home`]).
    /// `None`, a single replica or a zero discount: no home.
    pub home: Option<ReplicaHome>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    pub worker: WorkerRank,
    /// Every eligible target by increasing cost; `ranked[0] == worker`.
    pub ranked: Vec<WorkerRank>,
    /// Device blocks of the prompt the chosen worker is believed to cache.
    pub overlap_blocks: u32,
    /// Prompt tokens the router predicts the worker will not recompute.
    pub predicted_cached_tokens: u64,
    pub explanation: Explanation,
}

#[derive(Clone, Debug, PartialEq)]
pub enum RouteError {
    /// No worker (of the needed role, inside the allowed subset) exists.
    NoWorkers,
    /// Every candidate is busy under admission control.
    Overloaded(Box<Explanation>),
    /// The request id is already booked.
    DuplicateRequest,
}

impl std::fmt::Display for RouteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RouteError::NoWorkers => f.write_str("no worker is available for this request"),
            RouteError::Overloaded(e) => write!(
                f,
                "all {} workers are busy (admission control)",
                e.candidates_total
            ),
            RouteError::DuplicateRequest => f.write_str("request id is already in flight"),
        }
    }
}

impl std::error::Error for RouteError {}

#[derive(Debug)]
pub struct Router {
    config: RouterConfig,
    block_size: usize,
    workers: FastMap<WorkerId, WorkerInfo>,
    /// Every (worker, dp rank) with its role and capacity, sorted; rebuilt when workers change
    /// so that a decision does not re-collect and sort the fleet.
    targets: Vec<(WorkerRank, WorkerRole, WorkerCapacity)>,
    /// Each target's load figures, in target order: a decision over 10,000 ranks reads them
    /// in one pass over this array instead of probing the load map once per rank (a cache
    /// miss each). Kept up to date from [`LoadTracker::take_changed`] before each decision.
    figures: Vec<LoadFigures>,
    /// Position of each target in `targets`.
    target_pos: FastMap<WorkerRank, usize>,
    /// The roles among `targets` (at most three), so that a decision knows without a pass
    /// over the fleet whether every target is a candidate.
    target_roles: Vec<WorkerRole>,
    /// The candidates' target positions when only some targets are candidates, kept between
    /// decisions.
    positions: Vec<usize>,
    /// What only some targets have for a decision (overlap, new blocks), by target position;
    /// written for those few, read in the pass over the fleet, reset right after. A shared
    /// system prompt gives all 10,000 ranks an entry: this costs one position lookup each,
    /// where a list sorted by position cost a sort.
    sparse: Vec<SparseInput>,
    /// Positions `sparse` holds something at.
    touched: Vec<usize>,
    index: PrefixIndex,
    predicted: Option<PredictedIndex>,
    load: LoadTracker,
    events_unknown_worker: u64,
    /// The event feed is down: the index may be stale, so route on load alone until it is back.
    events_blind: bool,
    /// Workers out of routing for now (a pod turned unready), with when they left. Their cache
    /// entries, predictions and bookings stay and their events still apply, so one that comes
    /// back soon routes on what it holds; [`Router::expire_parked`] forgets them for good.
    parked: FastMap<WorkerId, (WorkerInfo, Instant)>,
    /// The kvgate policy's learned prefill rate and residency.
    latency: LatencyModel,
}

/// One of `of` router replicas, number `rank`: targets at positions `rank, rank + of, ...` of
/// the sorted fleet are its home and cost `discount` less. Replicas that decide the same
/// instant on the same view would otherwise all pick the same worker; homes make their
/// first choices differ while a cache hit or a real load gap still outweighs the discount.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ReplicaHome {
    pub rank: usize,
    pub of: usize,
    pub discount: f64,
}

impl ReplicaHome {
    /// Whether this home changes anything: more than one replica, a rank among them, and a
    /// discount in (0, 1). Others are ignored, as if no home were given.
    pub fn is_usable(&self) -> bool {
        self.of > 1 && self.rank < self.of && self.discount > 0.0 && self.discount < 1.0
    }
}

/// One target's decision inputs that most targets lack: its overlap with the prompt, and its
/// new blocks when some of its bookings start like the prompt.
#[derive(Clone, Copy, Debug)]
struct SparseInput {
    overlap: TierOverlap,
    /// `u32::MAX`: every block of the prompt is new there.
    new_blocks: u32,
}

impl SparseInput {
    const NONE: Self = Self {
        overlap: TierOverlap([0; crate::index::TIERS]),
        new_blocks: u32::MAX,
    };
}

/// One decision's candidates as the scheduler reads them: the targets (all, or those at
/// `positions`), each one's inputs assembled from the per-target arrays when it is scored.
struct TargetView<'a> {
    targets: &'a [(WorkerRank, WorkerRole, WorkerCapacity)],
    figures: &'a [LoadFigures],
    sparse: &'a [SparseInput],
    positions: Option<&'a [usize]>,
    /// The prompt's blocks: a target without an entry in `sparse` has all of them new.
    prompt_blocks: usize,
    home: Option<ReplicaHome>,
    track_output_blocks: bool,
}

impl TargetView<'_> {
    #[inline(always)]
    fn position(&self, i: usize) -> usize {
        self.positions.map_or(i, |p| p[i])
    }
}

impl Candidates for TargetView<'_> {
    fn count(&self) -> usize {
        self.positions.map_or(self.targets.len(), <[usize]>::len)
    }

    #[inline(always)]
    fn get(&self, i: usize) -> CandidateInput {
        let i = self.position(i);
        let (worker, _, capacity) = self.targets[i];
        let f = &self.figures[i];
        let SparseInput {
            overlap,
            new_blocks,
        } = self.sparse[i];
        CandidateInput {
            home_discount: self
                .home
                .map_or(0.0, |h| if i % h.of == h.rank { h.discount } else { 0.0 }),
            worker,
            overlap,
            active_prefill_tokens: f.prefill_tokens,
            active_blocks: f.active_blocks,
            output_blocks: if self.track_output_blocks {
                f.output_blocks
            } else {
                0.0
            },
            new_blocks: if new_blocks == u32::MAX {
                self.prompt_blocks
            } else {
                new_blocks as usize
            },
            requests: f.requests,
            capacity,
        }
    }

    #[inline(always)]
    fn active_prefill_tokens(&self, i: usize) -> u64 {
        self.figures[self.position(i)].prefill_tokens
    }
}

/// The most data-parallel ranks a worker may announce.
pub const MAX_DP_SIZE: u32 = 1024;

impl Router {
    /// `block_size` must equal the workers' KV block size. The configuration is validated.
    pub fn new(config: RouterConfig, block_size: usize) -> Result<Self, ConfigError> {
        config.validate()?;
        if block_size == 0 {
            return Err(ConfigError::new(
                &crate::config::KV_CACHE_BLOCK_SIZE,
                0,
                "the block size must be at least 1 token",
            ));
        }
        let predicted = if !config.use_kv_events {
            Some(PredictedIndex::new(
                config.approx_ttl,
                config.approx_max_blocks,
            ))
        } else {
            config
                .predicted_ttl
                .map(|ttl| PredictedIndex::new(ttl, config.approx_max_blocks))
        };
        Ok(Self {
            block_size,
            workers: FastMap::default(),
            targets: Vec::new(),
            figures: Vec::new(),
            target_pos: FastMap::default(),
            target_roles: Vec::new(),
            positions: Vec::new(),
            sparse: Vec::new(),
            touched: Vec::new(),
            index: PrefixIndex::new(),
            predicted,
            load: LoadTracker::new(block_size),
            latency: LatencyModel::new(config.prefill_tokens_per_sec),
            config,
            events_unknown_worker: 0,
            events_blind: false,
            parked: FastMap::default(),
        })
    }

    pub fn config(&self) -> &RouterConfig {
        &self.config
    }
    pub fn block_size(&self) -> usize {
        self.block_size
    }
    pub fn index(&self) -> &PrefixIndex {
        &self.index
    }
    pub fn load(&self) -> &LoadTracker {
        &self.load
    }
    pub fn predicted(&self) -> Option<&PredictedIndex> {
        self.predicted.as_ref()
    }
    /// The kvgate policy's current prefill rate and residency.
    pub fn estimates(&self) -> Estimates {
        self.latency.estimates()
    }

    /// Adds or updates a worker. `dp_size` is clamped to `1..=MAX_DP_SIZE`.
    /// A parked worker comes back with its cache entries.
    pub fn upsert_worker(&mut self, info: WorkerInfo) {
        self.upsert_workers([info]);
    }

    /// [`upsert_worker`](Self::upsert_worker) for many workers, with the target list rebuilt
    /// once (a fleet of 10,000 is registered in one pass, not in 10,000).
    pub fn upsert_workers(&mut self, infos: impl IntoIterator<Item = WorkerInfo>) {
        let mut changed = false;
        for mut info in infos {
            info.dp_size = info.dp_size.clamp(1, MAX_DP_SIZE);
            let parked = self.parked.remove(&info.id).map(|(i, _)| i);
            // A parked worker's return changes the targets even with the same facts.
            changed |= parked.is_some();
            let old = self.workers.insert(info.id, info).or(parked);
            changed |= old != Some(info);
            // Ranks that disappeared lose their cache entries and predictions.
            if let Some(old) = old {
                for r in info.dp_size..old.dp_size {
                    let rank = WorkerRank {
                        worker: info.id,
                        dp_rank: crate::DpRank(r),
                    };
                    self.index.remove_worker_rank(rank);
                    if let Some(p) = &mut self.predicted {
                        p.remove_worker_rank(rank);
                    }
                }
            }
        }
        if changed {
            self.rebuild_targets();
        }
    }

    /// Events dropped because their (worker, dp rank) is not a known target.
    pub fn events_unknown_worker(&self) -> u64 {
        self.events_unknown_worker
    }

    /// Whether `w` is a known (worker, dp rank) whose events are indexed: a routing target, or
    /// a parked one.
    pub fn is_target(&self, w: WorkerRank) -> bool {
        self.workers
            .get(&w.worker)
            .or_else(|| self.parked.get(&w.worker).map(|(i, _)| i))
            .is_some_and(|info| w.dp_rank.0 < info.dp_size)
    }

    /// Takes a worker out of routing but keeps what is known about it (cache entries,
    /// predictions, bookings) and keeps applying its events, so that if it is back soon
    /// ([`upsert_worker`](Self::upsert_worker)) it routes on its cache at once. Returns false
    /// for a worker that is not a routing target.
    pub fn park_worker(&mut self, id: WorkerId, now: Instant) -> bool {
        let Some(info) = self.workers.remove(&id) else {
            return false;
        };
        self.parked.insert(id, (info, now));
        self.rebuild_targets();
        true
    }

    pub fn is_parked(&self, id: WorkerId) -> bool {
        self.parked.contains_key(&id)
    }

    /// The parked workers and when they were parked.
    pub fn parked_workers(&self) -> impl Iterator<Item = (&WorkerInfo, Instant)> {
        self.parked.values().map(|(i, t)| (i, *t))
    }

    /// Forgets the workers parked for `grace` or longer, as [`remove_worker`](Self::remove_worker)
    /// does. Returns them.
    pub fn expire_parked(&mut self, now: Instant, grace: Duration) -> Vec<WorkerId> {
        let mut gone: Vec<WorkerId> = self
            .parked
            .iter()
            .filter(|(_, (_, since))| now.saturating_duration_since(*since) >= grace)
            .map(|(id, _)| *id)
            .collect();
        gone.sort_unstable();
        for id in &gone {
            self.remove_worker(*id);
        }
        gone
    }

    /// Forgets a worker (routing or parked): blocks, predictions and bookings. Returns the
    /// bookings dropped.
    pub fn remove_worker(&mut self, id: WorkerId) -> Vec<RequestId> {
        self.workers.remove(&id);
        self.parked.remove(&id);
        self.rebuild_targets();
        self.index.remove_worker(id);
        if let Some(p) = &mut self.predicted {
            p.remove_worker(id);
        }
        self.load.remove_worker(id)
    }

    pub fn workers(&self) -> impl Iterator<Item = &WorkerInfo> {
        self.workers.values()
    }

    fn rebuild_targets(&mut self) {
        self.targets = self
            .workers
            .values()
            .flat_map(|w| {
                (0..w.dp_size).map(move |r| {
                    (
                        WorkerRank {
                            worker: w.id,
                            dp_rank: crate::DpRank(r),
                        },
                        w.role,
                        w.capacity,
                    )
                })
            })
            .collect();
        self.targets.sort_unstable_by_key(|t| t.0);
        self.target_pos = self
            .targets
            .iter()
            .enumerate()
            .map(|(i, t)| (t.0, i))
            .collect();
        self.target_roles.clear();
        for t in &self.targets {
            if !self.target_roles.contains(&t.1) {
                self.target_roles.push(t.1);
            }
        }
        self.sparse = vec![SparseInput::NONE; self.targets.len()];
        let _ = self.load.take_changed();
        self.figures = self
            .targets
            .iter()
            .map(|t| self.load.figures(&t.0))
            .collect();
    }

    /// Brings `figures` up to date with the load tracker.
    fn refresh_figures(&mut self) {
        match self.load.take_changed() {
            Changed::Some(workers) => {
                for w in workers {
                    if let Some(&i) = self.target_pos.get(&w) {
                        self.figures[i] = self.load.figures(&w);
                    }
                }
            }
            Changed::All => {
                for (f, t) in self.figures.iter_mut().zip(&self.targets) {
                    *f = self.load.figures(&t.0);
                }
            }
        }
    }

    /// Every (worker, dp rank) target of the given roles, sorted.
    pub fn targets(&self, roles: &[WorkerRole]) -> Vec<WorkerRank> {
        self.targets
            .iter()
            .filter(|t| roles.contains(&t.1))
            .map(|t| t.0)
            .collect()
    }

    /// Applies a KV event. Ignored in approximate mode (only decisions count there); counted and
    /// dropped when its (worker, dp rank) is unknown, so that stray or late events cannot grow
    /// the index with workers nobody will ever remove. Returns whether it was applied.
    pub fn apply_event(&mut self, event: &KvEvent) -> bool {
        if !self.config.use_kv_events {
            return false;
        }
        if !self.is_target(event.source) {
            self.events_unknown_worker += 1;
            return false;
        }
        self.index.apply(event);
        true
    }

    /// While blind (the KV event feed is disconnected), the index is not consulted: routing
    /// falls back to load (and predictions, where enabled). Events still apply.
    pub fn set_events_blind(&mut self, blind: bool) {
        self.events_blind = blind;
    }

    pub fn events_blind(&self) -> bool {
        self.events_blind
    }

    /// Overlap as routing sees it: the event index, raised by predictions where enabled.
    pub fn overlaps(&mut self, hashes: &BlockHashes, now: Instant) -> OverlapScores {
        let mut scores = if self.config.use_kv_events && !self.events_blind {
            self.index.find_matches(hashes.seqs())
        } else {
            OverlapScores::default()
        };
        if let Some(p) = &mut self.predicted {
            p.expire(now);
            for (w, o) in p.find_matches(hashes.seqs()).scores {
                let e = scores.scores.entry(w).or_default();
                e.0[0] = e.0[0].max(o.device());
            }
        }
        scores
    }

    /// Chooses a target for an aggregated request (among aggregated and decode workers) and,
    /// with `book`, books its load there.
    pub fn route(
        &mut self,
        req: RouteRequest<'_>,
        now: Instant,
        rng: &mut dyn RandomSource,
    ) -> Result<Decision, RouteError> {
        self.route_among(
            req,
            &[WorkerRole::Aggregated, WorkerRole::Decode],
            CostWeights::from(&self.config),
            now,
            rng,
        )
    }

    /// Like [`route`](Self::route), over the given roles and with explicit cost weights (a
    /// decode leg routes with overlap credit off, a prefill leg among prefill workers).
    pub fn route_among(
        &mut self,
        req: RouteRequest<'_>,
        roles: &[WorkerRole],
        weights: CostWeights,
        now: Instant,
        rng: &mut dyn RandomSource,
    ) -> Result<Decision, RouteError> {
        if req.book && self.load.booking(req.request).is_some() {
            return Err(RouteError::DuplicateRequest);
        }
        let allowed: Option<crate::fasthash::FastSet<WorkerRank>> =
            req.allowed.map(|a| a.iter().copied().collect());
        let keep = |t: &(WorkerRank, WorkerRole, WorkerCapacity)| {
            roles.contains(&t.1) && allowed.as_ref().is_none_or(|a| a.contains(&t.0))
        };
        // The candidates' target positions when only some targets are (a role or an allowed
        // subset); `None` when all are, the common case, with no list to build.
        let mut positions = std::mem::take(&mut self.positions);
        positions.clear();
        let subset = allowed.is_some() || !self.target_roles.iter().all(|r| roles.contains(r));
        if subset {
            positions.extend(
                self.targets
                    .iter()
                    .enumerate()
                    .filter(|(_, t)| keep(t))
                    .map(|(i, _)| i),
            );
        }
        if self.targets.is_empty() || (subset && positions.is_empty()) {
            self.positions = positions;
            return Err(RouteError::NoWorkers);
        }
        let overlaps = self.overlaps(req.hashes, now);
        self.refresh_figures();
        let seqs = req.hashes.seqs();
        let home = req.home.filter(ReplicaHome::is_usable);
        // What only some targets have, by position, read in the pass below: the overlap of
        // those caching part of the prompt, the new blocks of those whose active bookings
        // start like it. Every other target has none and all of them new.
        let probe = self.load.new_blocks_probe(seqs);
        for (w, o) in &overlaps.scores {
            if let Some(&i) = self.target_pos.get(w) {
                self.sparse[i].overlap = *o;
                self.touched.push(i);
            }
        }
        for w in probe.holders() {
            if let Some(&i) = self.target_pos.get(w) {
                // At most the prompt's length; a prompt of 2^32 blocks cannot be parsed.
                self.sparse[i].new_blocks =
                    u32::try_from(probe.of_holder(w)).unwrap_or(u32::MAX - 1);
                self.touched.push(i);
            }
        }
        let isl = req.hashes.num_tokens();
        let view = TargetView {
            targets: &self.targets,
            figures: &self.figures,
            sparse: &self.sparse,
            positions: subset.then_some(positions.as_slice()),
            prompt_blocks: seqs.len(),
            home,
            track_output_blocks: self.config.track_output_blocks,
        };
        let (outcome, explanation) = schedule_over(
            &weights,
            &self.config.admission,
            ScoreRequest {
                isl_tokens: isl,
                block_size: self.block_size,
                estimates: self.latency.estimates(),
            },
            &view,
            rng,
        );
        for i in self.touched.drain(..) {
            self.sparse[i] = SparseInput::NONE;
        }
        if positions.capacity() > 4 * self.targets.len().max(64) {
            // The fleet shrank a lot: give the memory back.
            positions = Vec::new();
        }
        self.positions = positions;
        let ranked = match outcome {
            Outcome::Chosen { ranked } => ranked,
            Outcome::Overloaded => return Err(RouteError::Overloaded(Box::new(explanation))),
            Outcome::NoCandidates => return Err(RouteError::NoWorkers),
        };
        let worker = ranked[0];
        let overlap_blocks = overlaps.device(&worker);
        let cached = (u64::from(overlap_blocks) * self.block_size as u64).min(isl as u64);
        let decision = Decision {
            worker,
            ranked,
            overlap_blocks,
            predicted_cached_tokens: cached,
            explanation,
        };
        if req.book {
            self.book_chosen(&req, &decision, now)?;
        }
        Ok(decision)
    }

    /// Books the request on the worker `decision` chose (what `route_among` does when
    /// `req.book`). Separate so that an adapter can time scoring and booking apart while
    /// holding the router once for both.
    pub fn book_chosen(
        &mut self,
        req: &RouteRequest<'_>,
        decision: &Decision,
        now: Instant,
    ) -> Result<(), RouteError> {
        let seqs = req.hashes.seqs();
        let isl = req.hashes.num_tokens() as u64;
        let booked = self.load.book(
            NewBooking {
                request: req.request.clone(),
                worker: decision.worker,
                seqs,
                locals: if self.predicted.is_some() {
                    req.hashes.locals()
                } else {
                    &[]
                },
                prefill_tokens: isl - decision.predicted_cached_tokens.min(isl),
                expected_output_tokens: if self.config.track_output_blocks {
                    req.expected_output_tokens
                } else {
                    None
                },
            },
            now,
        );
        if booked == Err(BookError::Duplicate) {
            return Err(RouteError::DuplicateRequest);
        }
        if let Some(p) = &mut self.predicted {
            p.insert(decision.worker, req.hashes.locals(), seqs, now);
        }
        Ok(())
    }

    /// Books load decided elsewhere (a peer router replica): no scoring, the same accounting,
    /// and the same prediction when the approximate index is on and `b.locals` are given.
    pub fn book_decided(
        &mut self,
        b: NewBooking<'_>,
        prefill_done: bool,
        output_tokens: u32,
        now: Instant,
    ) -> Result<(), BookError> {
        let (request, worker, seqs, locals) = (b.request.clone(), b.worker, b.seqs, b.locals);
        self.load.book(b, now)?;
        if prefill_done {
            self.load.prefill_complete(&request);
        }
        if output_tokens > 0 {
            self.load.record_output(&request, output_tokens);
        }
        if let Some(p) = &mut self.predicted
            && !locals.is_empty()
            && locals.len() == seqs.len()
        {
            p.insert(worker, locals, seqs, now);
        }
        Ok(())
    }

    /// The request's first token arrived (time unknown: nothing is learned).
    pub fn prefill_complete(&mut self, request: &RequestId) -> Change {
        self.load.prefill_complete(request)
    }

    /// The request's first token arrived at `now`: also a sample of the worker's prefill rate.
    pub fn prefill_complete_at(&mut self, request: &RequestId, now: Instant) -> Change {
        let Some(b) = self.load.complete_prefill_at(request, now) else {
            return Change::NoChange;
        };
        let tokens = b.queued_ahead + b.prefill_tokens;
        let elapsed = now.saturating_duration_since(b.created_at);
        self.latency.observe_prefill(tokens, elapsed);
        Change::Applied
    }

    pub fn record_output(&mut self, request: &RequestId, total_output_tokens: u32) -> Change {
        self.load.record_output(request, total_output_tokens)
    }

    /// The gateway served the request elsewhere than booked: move the booking, and the
    /// prediction with it (the serving worker is the one that will cache the prompt).
    pub fn rebook(&mut self, request: &RequestId, to: WorkerRank, now: Instant) -> Change {
        let change = self.load.rebook(request, to);
        if change == Change::Applied
            && let Some(p) = &mut self.predicted
            && let Some(b) = self.load.booking(request)
        {
            p.insert(to, &b.locals, &b.seqs, now);
        }
        change
    }

    /// The request is still alive: keep its booking from being swept as stale.
    pub fn touch(&mut self, request: &RequestId, now: Instant) -> Change {
        self.load.touch(request, now)
    }

    /// The request ended (time unknown: nothing is learned).
    pub fn free(&mut self, request: &RequestId) -> Change {
        self.load.free(request)
    }

    /// The request ended at `now`: also a sample of how long a request holds KV memory once
    /// it runs, from its first token to its end. Queueing before the first token is left out on
    /// purpose: under overload it grows without bound, and a residency that grows with the
    /// queue would make the memory term drown the cache term just when hits matter most.
    pub fn free_at(&mut self, request: &RequestId, now: Instant) -> Change {
        let Some(b) = self.load.take(request) else {
            return Change::NoChange;
        };
        if let Some(t) = b.first_token_at {
            self.latency
                .observe_residency(now.saturating_duration_since(t));
        }
        Change::Applied
    }

    /// Periodic housekeeping: expire predictions, free leaked bookings. Returns the freed ids.
    pub fn sweep(&mut self, now: Instant, stale_after: Duration) -> Vec<RequestId> {
        if let Some(p) = &mut self.predicted {
            p.expire(now);
        }
        self.load.sweep_stale(now, stale_after)
    }
}
