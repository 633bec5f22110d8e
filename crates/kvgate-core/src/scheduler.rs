//! Worker selection: admission, the cost function, temperature sampling, and the explanation.
//!
//! Cost per candidate, in blocks (lower wins), as Dynamo's router defines it:
//!
//! ```text
//! prefill_tokens = active_prefill_tokens + isl_tokens           (0 when track_prefill_tokens = false)
//! decay          = 1 / (1 + credit_decay * ((active_prefill - min_active_prefill) / block_size) / request_blocks)
//! credit_blocks  = credit * decay * device_overlap_blocks
//! decode_blocks  = active_blocks (+ predicted output blocks) + new_blocks   (0 when track_active_blocks = false)
//! cost           = prefill_load_scale * max(prefill_tokens / block_size - credit_blocks, 0) + decode_blocks
//! ```
//!
//! `min_active_prefill` is taken over the eligible candidates; `new_blocks` are the request's blocks
//! the worker does not already hold in its *active* requests. Temperature 0 picks the minimum,
//! ties broken uniformly at random; temperature `T > 0` samples with
//! `p_i ∝ exp(-(c_i - c_min) / ((c_max - c_min) * T))`, uniform when all costs are equal.
//!
//! That is [`RouterPolicy::Dynamo`]. Under [`RouterPolicy::Kvgate`] the same inputs (and the same
//! credit, decay, scale and track-* knobs) feed a predicted time to first token instead, in
//! milliseconds: see [`crate::latency`]. Selection, temperature and admission are shared.
//!
//! Admission (`token-capacity`) first removes busy workers (strict `>` on each threshold); when
//! every candidate is busy the outcome is [`Outcome::Overloaded`], distinct from "no workers".

use crate::config::{AdmissionConfig, RouterConfig, RouterPolicy};
use crate::ids::WorkerRank;
use crate::index::TierOverlap;
use crate::latency::{Estimates, Predicted, Predictor, to_f64};
use crate::random::RandomSource;
use serde::Serialize;

/// The cost function's weights (normally the config's; a decode leg may override the credit).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CostWeights {
    pub policy: RouterPolicy,
    pub overlap_score_credit: f64,
    pub overlap_score_credit_decay: f64,
    pub prefill_load_scale: f64,
    pub track_prefill_tokens: bool,
    pub track_active_blocks: bool,
    pub temperature: f64,
}

impl From<&RouterConfig> for CostWeights {
    fn from(c: &RouterConfig) -> Self {
        Self {
            policy: c.policy,
            overlap_score_credit: c.overlap_score_credit,
            overlap_score_credit_decay: c.overlap_score_credit_decay,
            prefill_load_scale: c.prefill_load_scale,
            track_prefill_tokens: c.track_prefill_tokens,
            track_active_blocks: c.track_active_blocks,
            temperature: c.temperature,
        }
    }
}

impl CostWeights {
    /// The prefill queue the kvgate policy sees for `t` queued tokens: none anywhere when
    /// prefill tokens are not tracked, only the request's own.
    fn queue(&self, t: u64) -> u64 {
        if self.track_prefill_tokens { t } else { 0 }
    }
}

/// What a worker can hold, when known (from discovery or the workers file).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct WorkerCapacity {
    pub total_kv_blocks: Option<u64>,
    pub max_num_batched_tokens: Option<u64>,
}

/// One candidate's state at decision time, gathered by the caller.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CandidateInput {
    pub worker: WorkerRank,
    pub overlap: TierOverlap,
    pub active_prefill_tokens: u64,
    /// Deduplicated active blocks.
    pub active_blocks: usize,
    /// Predicted (weighted) output blocks.
    pub output_blocks: f64,
    /// Request blocks not already active on this worker.
    pub new_blocks: usize,
    /// Requests booked on the worker (running or queued).
    pub requests: usize,
    pub capacity: WorkerCapacity,
    /// Fraction taken off this candidate's cost: its share of a replica's home workers
    /// ([`crate::router::RouteRequest::home`]); 0 when not home or alone.
    pub home_discount: f64,
}

/// Why admission control skipped a worker.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum Busy {
    /// `active_blocks / total_kv_blocks > threshold`.
    DecodeBlocks {
        active_blocks: usize,
        total_kv_blocks: u64,
        threshold: f64,
    },
    /// `active_prefill_tokens > threshold`.
    PrefillTokens {
        active_prefill_tokens: u64,
        threshold: u64,
    },
    /// `active_prefill_tokens > frac * max_num_batched_tokens`.
    PrefillTokensFrac {
        active_prefill_tokens: u64,
        limit: f64,
    },
}

/// One candidate's line in the explanation.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CandidateScore {
    pub worker: WorkerRank,
    pub overlap_blocks: u32,
    pub host_overlap_blocks: u32,
    pub disk_overlap_blocks: u32,
    pub active_prefill_tokens: u64,
    pub active_blocks: usize,
    pub output_blocks: f64,
    pub new_blocks: usize,
    pub prefill_blocks: f64,
    pub decay: f64,
    pub credit_blocks: f64,
    pub decode_blocks: f64,
    /// The policy's cost: blocks under `dynamo`, predicted milliseconds under `kvgate` (whose
    /// components are in `predicted`; the block terms above are then shown for comparison).
    pub cost: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub predicted: Option<Predicted>,
    /// Selection probability (temperature > 0 only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub probability: Option<f64>,
    /// Set when admission control excluded the worker.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub busy: Option<Busy>,
}

/// Everything that went into one decision, for debugging and the EPP's debug endpoint.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Explanation {
    pub policy: RouterPolicy,
    /// The kvgate policy's prefill rate and residency at decision time.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub estimates: Option<Estimates>,
    pub isl_tokens: usize,
    pub request_blocks: usize,
    pub block_size: usize,
    pub temperature: f64,
    pub min_active_prefill_tokens: u64,
    /// Every candidate scored (`candidates` lists at most [`MAX_EXPLAINED`] of them).
    pub candidates_total: usize,
    pub candidates: Vec<CandidateScore>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chosen: Option<WorkerRank>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// `ranked[0]` is the choice; the rest are eligible fallbacks by increasing cost.
    Chosen { ranked: Vec<WorkerRank> },
    /// Every candidate is busy under admission control.
    Overloaded,
    /// There was no candidate at all.
    NoCandidates,
}

/// The request side of a decision.
#[derive(Clone, Copy, Debug)]
pub struct ScoreRequest {
    pub isl_tokens: usize,
    pub block_size: usize,
    /// Used by the kvgate policy only.
    pub estimates: Estimates,
}

impl ScoreRequest {
    pub fn request_blocks(&self) -> usize {
        if self.block_size == 0 {
            0
        } else {
            self.isl_tokens.div_ceil(self.block_size)
        }
    }
}

/// Admission check of one worker; `None` means it may take work.
pub fn busy(a: &AdmissionConfig, c: &CandidateInput) -> Option<Busy> {
    if !a.enabled() {
        return None;
    }
    if let (Some(threshold), Some(total)) =
        (a.active_decode_blocks_threshold, c.capacity.total_kv_blocks)
        && total > 0
        && c.active_blocks as f64 / total as f64 > threshold
    {
        return Some(Busy::DecodeBlocks {
            active_blocks: c.active_blocks,
            total_kv_blocks: total,
            threshold,
        });
    }
    if let Some(threshold) = a.active_prefill_tokens_threshold
        && c.active_prefill_tokens > threshold
    {
        return Some(Busy::PrefillTokens {
            active_prefill_tokens: c.active_prefill_tokens,
            threshold,
        });
    }
    if let (Some(frac), Some(max)) = (
        a.active_prefill_tokens_threshold_frac,
        c.capacity.max_num_batched_tokens,
    ) {
        let limit = frac * max as f64;
        if c.active_prefill_tokens as f64 > limit {
            return Some(Busy::PrefillTokensFrac {
                active_prefill_tokens: c.active_prefill_tokens,
                limit,
            });
        }
    }
    None
}

/// What the scheduler reads of its candidates: how many, and each one's inputs on demand. A
/// slice is one. The router's is a view over its per-target arrays: a 10,000-rank decision
/// then builds each input in registers as it scores it, instead of first writing 10,000 of
/// them (1.2 MB) to read them back.
pub trait Candidates {
    fn count(&self) -> usize;
    fn get(&self, i: usize) -> CandidateInput;
    /// Only the field the shortest-queue pass reads.
    fn active_prefill_tokens(&self, i: usize) -> u64 {
        self.get(i).active_prefill_tokens
    }
}

impl Candidates for [CandidateInput] {
    fn count(&self) -> usize {
        self.len()
    }
    #[inline(always)]
    fn get(&self, i: usize) -> CandidateInput {
        self[i]
    }
}

/// Scores every candidate (busy ones too, for the explanation) and selects one.
pub fn schedule(
    weights: &CostWeights,
    admission: &AdmissionConfig,
    req: ScoreRequest,
    candidates: &[CandidateInput],
    rng: &mut dyn RandomSource,
) -> (Outcome, Explanation) {
    schedule_over(weights, admission, req, candidates, rng)
}

/// [`schedule`] over any [`Candidates`].
pub fn schedule_over<C: Candidates + ?Sized>(
    weights: &CostWeights,
    admission: &AdmissionConfig,
    req: ScoreRequest,
    candidates: &C,
    rng: &mut dyn RandomSource,
) -> (Outcome, Explanation) {
    let n = candidates.count();
    let bs = req.block_size.max(1) as f64;
    let request_blocks = req.request_blocks().max(1) as f64;
    // Admission off (the default): nobody is busy, and a 10,000-rank fleet needs no list.
    let busy: Vec<Option<Busy>> = if admission.enabled() {
        (0..n)
            .map(|i| busy(admission, &candidates.get(i)))
            .collect()
    } else {
        Vec::new()
    };
    let busy_of = |i: usize| busy.get(i).copied().flatten();
    let min_active_prefill = (0..n)
        .filter(|&i| busy_of(i).is_none())
        .map(|i| candidates.active_prefill_tokens(i))
        .min()
        .unwrap_or(0);

    let scorer = Scorer {
        weights,
        isl_tokens: req.isl_tokens,
        bs,
        request_blocks,
        min_active_prefill,
        predictor: Predictor::new(
            &req.estimates,
            req.isl_tokens as u64,
            req.block_size as u64,
            weights.queue(min_active_prefill),
            weights.prefill_load_scale,
        ),
    };
    let terms = |c: &CandidateInput, explain: bool| scorer.terms(c, explain);
    // One candidate's line in the explanation. Large fleets at temperature 0 keep only (cost,
    // overlap, worker, busy) per candidate and build full lines for the explained few: writing
    // 10,000 lines of 200 bytes per decision cost more than scoring them.
    let line = |i: usize| -> CandidateScore {
        let c = &candidates.get(i);
        let t = terms(c, true);
        CandidateScore {
            worker: c.worker,
            overlap_blocks: t.overlap,
            host_overlap_blocks: c.overlap.get(crate::ids::StorageTier::HostPinned),
            disk_overlap_blocks: c.overlap.get(crate::ids::StorageTier::Disk),
            active_prefill_tokens: c.active_prefill_tokens,
            active_blocks: c.active_blocks,
            output_blocks: c.output_blocks,
            new_blocks: c.new_blocks,
            prefill_blocks: t.prefill_blocks,
            decay: t.decay,
            credit_blocks: t.credit_blocks,
            decode_blocks: t.decode_blocks,
            cost: t.cost,
            predicted: t.predicted,
            probability: None,
            busy: busy_of(i),
        }
    };

    let mut explanation = Explanation {
        policy: weights.policy,
        estimates: (weights.policy == RouterPolicy::Kvgate).then_some(req.estimates),
        isl_tokens: req.isl_tokens,
        request_blocks: req.request_blocks(),
        block_size: req.block_size,
        temperature: weights.temperature,
        min_active_prefill_tokens: min_active_prefill,
        candidates_total: n,
        candidates: Vec::new(),
        chosen: None,
    };
    if n == 0 {
        return (Outcome::NoCandidates, explanation);
    }
    let full = weights.temperature > 0.0 || n <= MAX_EXPLAINED;
    let mut scores: Vec<CandidateScore> = Vec::new();
    let slim: Vec<Slim> = if full {
        scores = (0..n).map(line).collect();
        scores.iter().map(Slim::of).collect()
    } else {
        // Neighbours in a big fleet are mostly in the same state (idle, or alike with nothing
        // cached): their cost is the previous one's, with no arithmetic. The cost is a pure
        // function of these inputs, so reusing it changes no bit.
        let mut last: Option<(CandidateInput, f64)> = None;
        (0..n)
            .map(|i| {
                let c = candidates.get(i);
                let cost = match &last {
                    Some((p, cost)) if same_cost_inputs(p, &c) => *cost,
                    _ => {
                        let cost = terms(&c, false).cost;
                        last = Some((c, cost));
                        cost
                    }
                };
                Slim {
                    cost,
                    overlap: c.overlap.device(),
                    worker: c.worker,
                    busy: busy_of(i).is_some(),
                }
            })
            .collect()
    };
    // Eligible candidates by index, walked rather than listed: with nobody busy (admission off,
    // the default) a list would be the whole fleet again.
    let any_busy = slim.iter().any(|s| s.busy);
    let eligible = || (0..slim.len()).filter(|&i| !any_busy || !slim[i].busy);
    // The explained lines: all of them in small fleets (and with sampling probabilities), else
    // the cheapest few rebuilt from their inputs.
    let lines = |scores: Vec<CandidateScore>, idx: Option<Vec<usize>>, chosen: Option<usize>| {
        if full && scores.len() <= MAX_EXPLAINED {
            return scores;
        }
        let idx = idx.unwrap_or_else(|| explained_indices(&slim, chosen));
        if full {
            idx.iter().map(|&i| scores[i].clone()).collect()
        } else {
            idx.iter().map(|&i| line(i)).collect()
        }
    };
    if eligible().next().is_none() {
        explanation.candidates = lines(scores, None, None);
        return (Outcome::Overloaded, explanation);
    }

    let chosen = if weights.temperature > 0.0 {
        let listed: Vec<usize> = eligible().collect();
        sample_softmax(&mut scores, &listed, weights.temperature, rng)
    } else {
        argmin_random_ties(&slim, eligible(), weights.policy, rng)
    };

    // Fallbacks: the best other eligible candidates by cost, ties by worker for stable output.
    // Only the first MAX_FALLBACKS are ordered: the cheapest one more than that, in one pass
    // (the chosen is among them, or they are all cheaper than it).
    let by_cost = |&a: &usize, &b: &usize| {
        slim[a]
            .cost
            .total_cmp(&slim[b].cost)
            .then(slim[a].worker.cmp(&slim[b].worker))
    };
    let mut rest = smallest(eligible(), MAX_FALLBACKS + 1, by_cost);
    match rest.iter().position(|&i| i == chosen) {
        Some(p) => {
            rest.remove(p);
        }
        None => rest.truncate(MAX_FALLBACKS),
    }
    let mut ranked = Vec::with_capacity(rest.len() + 1);
    ranked.push(slim[chosen].worker);
    ranked.extend(rest.iter().map(|&i| slim[i].worker));
    explanation.chosen = Some(slim[chosen].worker);
    // At temperature 0 with nobody busy, the explained cheapest are the choice and the first
    // fallbacks, already ordered: no second selection over the whole fleet.
    let idx = (!full && !any_busy && rest.len() >= MAX_EXPLAINED - 1).then(|| {
        let mut idx: Vec<usize> = std::iter::once(chosen)
            .chain(rest.iter().copied().take(MAX_EXPLAINED - 1))
            .collect();
        idx.sort_unstable();
        idx
    });
    explanation.candidates = lines(scores, idx, Some(chosen));
    (Outcome::Chosen { ranked }, explanation)
}

/// Whether two candidates' costs are necessarily equal: every input of the cost but the worker's
/// name is the same (floats compared bit for bit).
#[inline(always)]
fn same_cost_inputs(a: &CandidateInput, b: &CandidateInput) -> bool {
    a.overlap == b.overlap
        && a.active_prefill_tokens == b.active_prefill_tokens
        && a.active_blocks == b.active_blocks
        && a.new_blocks == b.new_blocks
        && a.requests == b.requests
        && a.capacity == b.capacity
        && a.output_blocks.to_bits() == b.output_blocks.to_bits()
        && a.home_discount.to_bits() == b.home_discount.to_bits()
}

/// One decision's scoring: the weights and what every candidate shares.
struct Scorer<'a> {
    weights: &'a CostWeights,
    isl_tokens: usize,
    bs: f64,
    request_blocks: f64,
    min_active_prefill: u64,
    predictor: Predictor,
}

impl Scorer<'_> {
    fn decay(&self, c: &CandidateInput) -> f64 {
        let w = self.weights;
        if w.track_prefill_tokens && w.overlap_score_credit_decay > 0.0 {
            let excess = c
                .active_prefill_tokens
                .saturating_sub(self.min_active_prefill) as f64
                / self.bs;
            1.0 / (1.0 + w.overlap_score_credit_decay * excess / self.request_blocks)
        } else {
            1.0
        }
    }

    fn prefill_blocks(&self, c: &CandidateInput) -> f64 {
        if self.weights.track_prefill_tokens {
            (c.active_prefill_tokens as f64 + self.isl_tokens as f64) / self.bs
        } else {
            0.0
        }
    }

    /// One candidate's cost and its components. Selection reads only the cost; the explanation
    /// reads the rest, for the candidates it lists. With `explain` false, components the cost
    /// does not need are left at 0: most of a big fleet caches nothing of the prompt, and its
    /// decay (three divisions) cannot matter then. Always inlined, so that selection's calls
    /// keep only the cost's arithmetic.
    #[inline(always)]
    fn terms(&self, c: &CandidateInput, explain: bool) -> Terms {
        let overlap = c.overlap.device();
        let decay = if explain || overlap > 0 {
            self.decay(c)
        } else {
            1.0
        };
        let credit_blocks = if overlap > 0 {
            self.weights.overlap_score_credit * decay * f64::from(overlap)
        } else {
            0.0
        };
        let prefill_blocks = if explain || self.weights.policy == RouterPolicy::Dynamo {
            self.prefill_blocks(c)
        } else {
            0.0
        };
        let decode_blocks = if self.weights.track_active_blocks {
            to_f64(c.active_blocks as u64) + c.output_blocks + to_f64(c.new_blocks as u64)
        } else {
            0.0
        };
        let (cost, predicted) = match self.weights.policy {
            RouterPolicy::Dynamo => (
                self.weights.prefill_load_scale * (prefill_blocks - credit_blocks).max(0.0)
                    + decode_blocks,
                None,
            ),
            RouterPolicy::Kvgate => {
                let p = self.predictor.predict(
                    credit_blocks,
                    self.weights.queue(c.active_prefill_tokens),
                    c.requests,
                    match c.capacity.total_kv_blocks {
                        Some(total) if self.weights.track_active_blocks => {
                            Some((decode_blocks, c.active_blocks, total))
                        }
                        _ => None,
                    },
                );
                // Near-equal candidates tie, so that the cache decides between them.
                (round_tenth(p.total_ms()), Some(p))
            }
        };
        // A share of the whole predicted cost, queue included: under load, replicas that
        // decide at once on one view differ mainly in which queue looks shortest.
        let cost = if c.home_discount > 0.0 {
            cost * (1.0 - c.home_discount)
        } else {
            cost
        };
        Terms {
            overlap,
            decay,
            credit_blocks,
            prefill_blocks,
            decode_blocks,
            cost,
            predicted,
        }
    }
}

/// A candidate's cost and the components the explanation shows.
struct Terms {
    overlap: u32,
    decay: f64,
    credit_blocks: f64,
    prefill_blocks: f64,
    decode_blocks: f64,
    cost: f64,
    predicted: Option<Predicted>,
}

/// `x` rounded to 0.1, half away from zero, as `(x * 10.0).round() / 10.0`. Costs are
/// non-negative and far below 2^52, where the integer part truncates exactly and the
/// fraction `t - trunc(t)` is exact too: no libm call per candidate. Anything else (NaN,
/// infinities, negative or huge values) takes `f64::round`.
fn round_tenth(x: f64) -> f64 {
    let t = x * 10.0;
    // Sign bit, not `>= 0`: -0.0 must stay -0.0 (total_cmp orders it first).
    if t.is_sign_positive() && t < 4.0e15 {
        let whole = t as i64 as f64;
        let r = if t - whole >= 0.5 { whole + 1.0 } else { whole };
        r / 10.0
    } else {
        t.round() / 10.0
    }
}

/// What selection reads of a candidate's line.
#[derive(Clone, Copy, Debug)]
struct Slim {
    cost: f64,
    overlap: u32,
    worker: WorkerRank,
    busy: bool,
}

impl Slim {
    fn of(c: &CandidateScore) -> Self {
        Self {
            cost: c.cost,
            overlap: c.overlap_blocks,
            worker: c.worker,
            busy: c.busy.is_some(),
        }
    }
}

/// Fallback targets a decision ranks after its choice (the EPP sends at most 64 endpoints).
pub const MAX_FALLBACKS: usize = 64;

/// Candidates an explanation lists: all of them in fleets up to this size, else the cheapest
/// this many (the chosen one always among them, the count of all in `candidates_total`).
pub const MAX_EXPLAINED: usize = 32;

/// The `k` least of `items` by `cmp` (a total order), sorted. Items enter a buffer only when
/// they beat the k-th least so far, and the buffer is cut back to `k` when it reaches `2k`:
/// over a fleet most items cost one comparison, and nothing is sorted but the winners.
fn smallest(
    items: impl Iterator<Item = usize>,
    k: usize,
    cmp: impl Fn(&usize, &usize) -> std::cmp::Ordering,
) -> Vec<usize> {
    let mut buf: Vec<usize> = Vec::with_capacity(2 * k.max(1));
    if k == 0 {
        return buf;
    }
    let mut bound: Option<usize> = None;
    for i in items {
        if let Some(b) = bound
            && cmp(&i, &b) != std::cmp::Ordering::Less
        {
            continue;
        }
        buf.push(i);
        if buf.len() == 2 * k {
            buf.select_nth_unstable_by(k - 1, &cmp);
            buf.truncate(k);
            bound = Some(buf[k - 1]);
        }
    }
    if buf.len() > k {
        buf.select_nth_unstable_by(k - 1, &cmp);
        buf.truncate(k);
    }
    buf.sort_unstable_by(&cmp);
    buf
}

/// The indices of the explained candidates, in candidate order: the [`MAX_EXPLAINED`]
/// cheapest (eligible before busy), with `chosen` in place of the last if it is not among them.
fn explained_indices(slim: &[Slim], chosen: Option<usize>) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..slim.len()).collect();
    if slim.len() > MAX_EXPLAINED {
        idx.select_nth_unstable_by(MAX_EXPLAINED - 1, |&a, &b| {
            let (x, y) = (&slim[a], &slim[b]);
            x.busy
                .cmp(&y.busy)
                .then(x.cost.total_cmp(&y.cost))
                .then(x.worker.cmp(&y.worker))
        });
        idx.truncate(MAX_EXPLAINED);
        if let Some(c) = chosen
            && !idx.contains(&c)
        {
            // Sampled (temperature) beyond the cheapest: its line replaces the last one.
            idx[MAX_EXPLAINED - 1] = c;
        }
    }
    idx.sort_unstable();
    idx
}

fn argmin_random_ties(
    scores: &[Slim],
    eligible: impl Iterator<Item = usize> + Clone,
    policy: RouterPolicy,
    rng: &mut dyn RandomSource,
) -> usize {
    // total_cmp puts NaN last, so a NaN cost never wins over a number.
    let first = eligible.clone().next();
    let Some(min) = eligible
        .clone()
        .map(|i| scores[i].cost)
        .min_by(f64::total_cmp)
    else {
        return 0;
    };
    let mut ties: Vec<usize> = eligible.filter(|&i| scores[i].cost == min).collect();
    if policy == RouterPolicy::Kvgate
        && let Some(most) = ties.iter().map(|&i| scores[i].overlap).max()
    {
        ties.retain(|&i| scores[i].overlap == most);
    }
    match ties.len() {
        // Every cost is NaN (cannot happen with a validated config): take the first.
        0 => first.unwrap_or(0),
        1 => ties[0],
        n => ties[rng.below(n)],
    }
}

fn sample_softmax(
    scores: &mut [CandidateScore],
    eligible: &[usize],
    temperature: f64,
    rng: &mut dyn RandomSource,
) -> usize {
    let (min, max) = eligible
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &i| {
            (lo.min(scores[i].cost), hi.max(scores[i].cost))
        });
    let range = max - min;
    let scale = range * temperature;
    let weights: Vec<f64> = if range == 0.0 {
        vec![1.0; eligible.len()]
    } else if scale.is_finite() && scale > 0.0 {
        eligible
            .iter()
            .map(|&i| (-(scores[i].cost - min) / scale).exp())
            .collect()
    } else {
        // A temperature so small that the spread underflows, or non-finite costs: the limit
        // of the distribution is the argmin.
        let slim: Vec<Slim> = scores.iter().map(Slim::of).collect();
        return argmin_random_ties(&slim, eligible.iter().copied(), RouterPolicy::Dynamo, rng);
    };
    let total: f64 = weights.iter().sum();
    if !(total.is_finite() && total > 0.0) {
        let slim: Vec<Slim> = scores.iter().map(Slim::of).collect();
        return argmin_random_ties(&slim, eligible.iter().copied(), RouterPolicy::Dynamo, rng);
    }
    for (k, &i) in eligible.iter().enumerate() {
        scores[i].probability = Some(weights[k] / total);
    }
    let mut u = rng.next_f64() * total;
    for (k, &i) in eligible.iter().enumerate() {
        u -= weights[k];
        if u < 0.0 {
            return i;
        }
    }
    eligible[eligible.len() - 1]
}

#[cfg(test)]
mod tests {
    use super::{round_tenth, smallest};
    use proptest::prelude::*;

    proptest! {
        /// The k least are the first k of a full sort, for any k, duplicates included.
        #[test]
        fn smallest_k_is_the_head_of_a_sort(
            costs in proptest::collection::vec(0u8..20, 0..400),
            k in 0usize..80,
        ) {
            let cmp = |a: &usize, b: &usize| costs[*a].cmp(&costs[*b]).then(a.cmp(b));
            let mut all: Vec<usize> = (0..costs.len()).collect();
            all.sort_by(cmp);
            all.truncate(k);
            prop_assert_eq!(smallest(0..costs.len(), k, cmp), all);
        }
    }

    fn reference(x: f64) -> f64 {
        (x * 10.0).round() / 10.0
    }

    #[test]
    fn rounding_to_a_tenth_matches_round_at_the_edges() {
        for x in [
            0.0,
            -0.0,
            0.05,
            0.15,
            0.049_999_999_999_999_996,
            0.049_999_999_999_999_99,
            1.25,
            2.5e14,
            4.5e14,
            4.0e14 + 0.05,
            1e300,
            -3.25,
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::MIN_POSITIVE,
        ] {
            assert_eq!(round_tenth(x).to_bits(), reference(x).to_bits(), "{x}");
        }
        assert!(round_tenth(f64::NAN).is_nan());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(20_000))]
        #[test]
        fn rounding_to_a_tenth_is_round(x in 0.0f64..1e7, bits in any::<u64>()) {
            prop_assert_eq!(round_tenth(x).to_bits(), reference(x).to_bits());
            let y = f64::from_bits(bits);
            if !y.is_nan() {
                prop_assert_eq!(round_tenth(y).to_bits(), reference(y).to_bits(), "{}", y);
            }
        }
    }
}
