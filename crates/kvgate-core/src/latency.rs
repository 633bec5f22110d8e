//! kvgate's routing policy ([`RouterPolicy::Kvgate`](crate::config::RouterPolicy)): each
//! candidate is scored by the time, in milliseconds, its first token is predicted to take, from
//! the router's own bookings (fresh at decision time, unlike scraped metrics):
//!
//! ```text
//! cached      = min(isl, credit * decay * device_overlap_blocks * block_size)   (decay as Dynamo's)
//! uncached    = isl - cached
//! queued      = active_prefill_tokens                     (0 when track_prefill_tokens = false)
//! q_min       = the shortest such queue among the eligible candidates
//! effective   = q_min + (queued - q_min) / (1 + q_min / (rate * SATURATION_QUEUE_MS))
//! prefill_ms  = prefill_load_scale * (effective + uncached) / rate
//! batch_ms    = BATCH_PENALTY * uncached / rate * (1 + requests)
//! memory_ms   = max(demand - total_kv_blocks, 0) / max(active_blocks, 1) * residency
//!               demand = active_blocks (+ output_blocks) + new_blocks   (0 when track_active_blocks
//!               = false or the worker's capacity is unknown)
//! cost        = prefill_ms + batch_ms + memory_ms         (rounded to 0.1 ms)
//! ```
//!
//! - `prefill_ms` is the queue the prompt joins: work that never queues (a cache hit) is the
//!   largest saving a saturated fleet can get, so affinity holds under overload.
//! - `effective` discounts queue differences once every candidate has a queue (the fleet is
//!   saturated): a warm request then stays where its prefix is, and the cold requests, which
//!   have nothing to lose, do the balancing. Without it, overload turns routing into queue
//!   balancing, hits fall, every queue grows, and the fleet falls off a cliff.
//! - `batch_ms` charges uncached work by the worker's batch (LMetric's product): a prompt that
//!   must be computed goes where it slows the fewest running requests, which spreads cold work
//!   and keeps one warm worker from becoming a hot spot.
//! - `memory_ms` is the wait for KV memory when the prompt does not fit beside the active
//!   requests: the share of the active set that must finish, times how long requests stay.
//!
//! Ties (to 0.1 ms) go to the candidate caching more of the prompt, then at random.
//!
//! `rate` (prefill tokens per second) is fixed by `KVGATE_PREFILL_TOKENS_PER_SEC` or learned: each
//! first token measures `(tokens queued ahead at booking + own tokens) / (booking to first token)`,
//! and an asymmetric average tracks the upper part of those samples (a sample is slowed, never
//! sped up, by decode steps and memory waits). `residency` is the mean first-token-to-end time of
//! the requests this router freed (how long a running request holds its KV blocks).

use serde::Serialize;
use std::time::Duration;

/// Weight of the batch term: uncached work costs this fraction of its prefill time once more
/// per request running on the worker. Measured with `kvgate bench replay --sweep`.
pub const BATCH_PENALTY: f64 = 0.25;
/// The queue (in milliseconds of prefill) at which the fleet counts as saturated: queue
/// differences between candidates are divided by `1 + shortest queue / this`.
pub const SATURATION_QUEUE_MS: f64 = 250.0;
/// The prefill rate assumed before any sample (tokens per second).
pub const INITIAL_PREFILL_TOKENS_PER_SEC: f64 = 20_000.0;
/// The residency assumed before any request ended.
pub const INITIAL_RESIDENCY: Duration = Duration::from_secs(10);
/// First tokens with less prefill work than this are mostly fixed overhead: not sampled.
pub const MIN_SAMPLE_TOKENS: u64 = 2048;
const RATE_UP: f64 = 0.2;
const RATE_DOWN: f64 = 0.02;
const RESIDENCY_ALPHA: f64 = 0.01;
const RATE_BOUNDS: (f64, f64) = (100.0, 1e9);

/// What the policy currently believes about the fleet's speed.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Estimates {
    pub prefill_tokens_per_sec: f64,
    pub residency_ms: f64,
    /// True when the rate is learned (not fixed by configuration).
    pub learned_rate: bool,
    pub rate_samples: u64,
    pub residency_samples: u64,
}

impl Default for Estimates {
    fn default() -> Self {
        LatencyModel::new(None).estimates()
    }
}

/// The learned half of the policy: prefill rate and request residency.
#[derive(Clone, Debug)]
pub struct LatencyModel {
    fixed_rate: Option<f64>,
    rate: f64,
    residency_ms: f64,
    rate_samples: u64,
    residency_samples: u64,
}

impl LatencyModel {
    /// `fixed_rate` (tokens per second) disables learning of the rate.
    pub fn new(fixed_rate: Option<f64>) -> Self {
        Self {
            fixed_rate,
            rate: fixed_rate.unwrap_or(INITIAL_PREFILL_TOKENS_PER_SEC),
            residency_ms: INITIAL_RESIDENCY.as_secs_f64() * 1e3,
            rate_samples: 0,
            residency_samples: 0,
        }
    }

    pub fn estimates(&self) -> Estimates {
        Estimates {
            prefill_tokens_per_sec: self.rate,
            residency_ms: self.residency_ms,
            learned_rate: self.fixed_rate.is_none(),
            rate_samples: self.rate_samples,
            residency_samples: self.residency_samples,
        }
    }

    /// A first token: `tokens` of prefill (queued ahead plus own) took `elapsed`.
    pub fn observe_prefill(&mut self, tokens: u64, elapsed: Duration) {
        if self.fixed_rate.is_some() || tokens < MIN_SAMPLE_TOKENS {
            return;
        }
        let secs = elapsed.as_secs_f64();
        if secs <= 0.0 {
            return;
        }
        let sample = (tokens as f64 / secs).clamp(RATE_BOUNDS.0, RATE_BOUNDS.1);
        let alpha = if sample > self.rate {
            RATE_UP
        } else {
            RATE_DOWN
        };
        self.rate += alpha * (sample - self.rate);
        self.rate_samples += 1;
    }

    /// A request ended `elapsed` after it was booked.
    pub fn observe_residency(&mut self, elapsed: Duration) {
        let ms = elapsed.as_secs_f64() * 1e3;
        if !ms.is_finite() {
            return;
        }
        self.residency_ms += RESIDENCY_ALPHA * (ms - self.residency_ms);
        self.residency_samples += 1;
    }
}

/// One candidate's predicted components (the kvgate policy's line in an explanation).
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Predicted {
    /// Prompt tokens credited as cached (after credit and decay).
    pub cached_tokens: u64,
    pub uncached_tokens: u64,
    pub queued_prefill_tokens: u64,
    /// The queue after the saturation discount (see the module docs).
    pub effective_queued_tokens: f64,
    pub requests: usize,
    pub prefill_ms: f64,
    pub batch_ms: f64,
    pub memory_wait_ms: f64,
    /// KV blocks the request would need beyond the worker's capacity.
    pub memory_excess_blocks: f64,
}

impl Predicted {
    pub fn total_ms(&self) -> f64 {
        self.prefill_ms + self.batch_ms + self.memory_wait_ms
    }
}

/// The inputs of one candidate's prediction.
#[derive(Clone, Copy, Debug)]
pub struct PredictInput {
    pub isl_tokens: u64,
    pub credited_blocks: f64,
    pub block_size: u64,
    pub queued_prefill_tokens: u64,
    /// The shortest queue among the eligible candidates.
    pub min_queued_prefill_tokens: u64,
    pub requests: usize,
    pub prefill_load_scale: f64,
    /// `Some((demand_blocks, active_blocks, total_kv_blocks))` when memory is accounted.
    pub memory: Option<(f64, usize, u64)>,
}

/// `x as f64` for counts below 2^63 (tokens, blocks, requests; larger ones count as 2^63), in
/// two instructions: x86-64's baseline converts signed 64-bit integers only, and an unsigned
/// conversion costs a six-instruction sequence, several times per candidate over 10,000.
#[inline(always)]
pub(crate) fn to_f64(x: u64) -> f64 {
    x.min(i64::MAX as u64) as i64 as f64
}

/// The integer part of `x` clamped to [0, 2^63), the reverse of [`to_f64`] (NaN gives 0).
#[inline(always)]
pub(crate) fn trunc_u64(x: f64) -> u64 {
    // `as i64` saturates; the clamp at 0 keeps the result non-negative.
    (x as i64).max(0) as u64
}

/// The prediction for one candidate.
pub fn predict(input: &PredictInput, est: &Estimates) -> Predicted {
    Predictor::new(
        est,
        input.isl_tokens,
        input.block_size,
        input.min_queued_prefill_tokens,
        input.prefill_load_scale,
    )
    .predict(
        input.credited_blocks,
        input.queued_prefill_tokens,
        input.requests,
        input.memory,
    )
}

/// [`predict`] for one request over many candidates: what does not depend on the candidate
/// (the rate, the saturation discount, a cold prompt's batch term) is computed once, with the
/// same operations in the same order, so the answers are bit for bit [`predict`]'s.
#[derive(Clone, Copy, Debug)]
pub struct Predictor {
    isl_tokens: u64,
    block_size: f64,
    prefill_load_scale: f64,
    residency_ms: f64,
    rate_ms: f64,
    saturation: f64,
    min_queued: f64,
    /// `1 + min_queued / saturation`: the divisor of every queue at or above the shortest.
    divisor: f64,
    /// The batch term's per-request unit for a prompt with nothing cached.
    cold_batch_unit: f64,
}

impl Predictor {
    pub fn new(
        est: &Estimates,
        isl_tokens: u64,
        block_size: u64,
        min_queued_prefill_tokens: u64,
        prefill_load_scale: f64,
    ) -> Self {
        let rate_ms = (est.prefill_tokens_per_sec / 1e3).max(RATE_BOUNDS.0 / 1e3);
        let saturation = rate_ms * SATURATION_QUEUE_MS;
        let min_queued = min_queued_prefill_tokens as f64;
        Self {
            isl_tokens,
            block_size: block_size as f64,
            prefill_load_scale,
            residency_ms: est.residency_ms,
            rate_ms,
            saturation,
            min_queued,
            divisor: 1.0 + min_queued / saturation,
            cold_batch_unit: BATCH_PENALTY * isl_tokens as f64 / rate_ms,
        }
    }

    #[inline(always)]
    /// One candidate: `credited_blocks` of the prompt credited as cached, `queued` prefill
    /// tokens ahead, `requests` running or queued, and `memory` as [`PredictInput::memory`].
    pub fn predict(
        &self,
        credited_blocks: f64,
        queued_prefill_tokens: u64,
        requests: usize,
        memory: Option<(f64, usize, u64)>,
    ) -> Predicted {
        let cached_f = (credited_blocks * self.block_size).max(0.0);
        let cached = if cached_f >= to_f64(self.isl_tokens) {
            self.isl_tokens
        } else {
            trunc_u64(cached_f)
        };
        let uncached = self.isl_tokens - cached;
        let queued = to_f64(queued_prefill_tokens);
        let effective = if queued == self.min_queued {
            // The shortest queue (most of an idle fleet): `min + 0 / divisor`, exactly.
            queued
        } else {
            let (min_q, divisor) = if queued > self.min_queued {
                (self.min_queued, self.divisor)
            } else {
                (queued, 1.0 + queued / self.saturation)
            };
            min_q + (queued - min_q) / divisor
        };
        let prefill_ms = self.prefill_load_scale * (effective + to_f64(uncached)) / self.rate_ms;
        let batch_unit = if cached == 0 {
            self.cold_batch_unit
        } else {
            BATCH_PENALTY * to_f64(uncached) / self.rate_ms
        };
        let batch_ms = batch_unit * (1.0 + to_f64(requests as u64));
        let (memory_wait_ms, memory_excess_blocks) = match memory {
            Some((demand, active, total)) if total > 0 && demand > to_f64(total) => {
                let excess = demand - to_f64(total);
                (excess / active.max(1) as f64 * self.residency_ms, excess)
            }
            _ => (0.0, 0.0),
        };
        Predicted {
            cached_tokens: cached,
            uncached_tokens: uncached,
            queued_prefill_tokens,
            effective_queued_tokens: effective,
            requests,
            prefill_ms,
            batch_ms,
            memory_wait_ms,
            memory_excess_blocks,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input() -> PredictInput {
        PredictInput {
            isl_tokens: 4096,
            credited_blocks: 0.0,
            block_size: 16,
            queued_prefill_tokens: 0,
            min_queued_prefill_tokens: 0,
            requests: 0,
            prefill_load_scale: 1.0,
            memory: None,
        }
    }

    fn est(rate: f64) -> Estimates {
        Estimates {
            prefill_tokens_per_sec: rate,
            ..Estimates::default()
        }
    }

    #[test]
    fn components_follow_the_formula() {
        let p = predict(
            &PredictInput {
                credited_blocks: 64.0,
                queued_prefill_tokens: 1000,
                requests: 3,
                ..input()
            },
            &est(10_000.0),
        );
        assert_eq!(p.cached_tokens, 1024);
        assert_eq!(p.uncached_tokens, 3072);
        assert!((p.prefill_ms - 407.2).abs() < 1e-9, "{p:?}");
        assert!((p.batch_ms - 0.25 * 307.2 * 4.0).abs() < 1e-9, "{p:?}");
        assert_eq!(p.memory_wait_ms, 0.0);
    }

    #[test]
    fn queue_differences_shrink_once_every_candidate_has_a_queue() {
        let e = est(10_000.0);
        // Nobody idle: the shortest queue is 10,000 tokens = 1 s = 4 saturation units, so the
        // 5,000 tokens above it count as 1,000.
        let p = predict(
            &PredictInput {
                queued_prefill_tokens: 15_000,
                min_queued_prefill_tokens: 10_000,
                ..input()
            },
            &e,
        );
        assert!((p.effective_queued_tokens - 11_000.0).abs() < 1e-9, "{p:?}");
        assert!((p.prefill_ms - (11_000.0 + 4096.0) / 10.0).abs() < 1e-9);
        // An idle candidate exists: queues count in full.
        let p = predict(
            &PredictInput {
                queued_prefill_tokens: 15_000,
                ..input()
            },
            &e,
        );
        assert_eq!(p.effective_queued_tokens, 15_000.0);
    }

    #[test]
    fn credit_never_exceeds_the_prompt() {
        let p = predict(
            &PredictInput {
                credited_blocks: 1e6,
                ..input()
            },
            &est(10_000.0),
        );
        assert_eq!((p.cached_tokens, p.uncached_tokens), (4096, 0));
        assert_eq!(p.batch_ms, 0.0);
    }

    #[test]
    fn memory_wait_only_beyond_capacity() {
        let e = Estimates {
            residency_ms: 8000.0,
            ..est(10_000.0)
        };
        let fits = predict(
            &PredictInput {
                memory: Some((100.0, 90, 100)),
                ..input()
            },
            &e,
        );
        assert_eq!(fits.memory_wait_ms, 0.0);
        let over = predict(
            &PredictInput {
                memory: Some((120.0, 80, 100)),
                ..input()
            },
            &e,
        );
        assert!((over.memory_wait_ms - 20.0 / 80.0 * 8000.0).abs() < 1e-9);
        assert_eq!(over.memory_excess_blocks, 20.0);
    }

    #[test]
    fn the_rate_learns_upward_fast_and_downward_slowly() {
        let mut m = LatencyModel::new(None);
        let start = m.estimates().prefill_tokens_per_sec;
        m.observe_prefill(40_000, Duration::from_secs(1));
        let up = m.estimates().prefill_tokens_per_sec;
        assert!((up - (start + 0.2 * (40_000.0 - start))).abs() < 1e-6);
        m.observe_prefill(4_000, Duration::from_secs(1));
        let down = m.estimates().prefill_tokens_per_sec;
        assert!((down - (up - 0.02 * (up - 4_000.0))).abs() < 1e-6);
        // Small prefills and zero durations are not samples.
        m.observe_prefill(100, Duration::from_millis(1));
        m.observe_prefill(10_000, Duration::ZERO);
        assert_eq!(m.estimates().rate_samples, 2);
        assert_eq!(m.estimates().prefill_tokens_per_sec, down);
    }

    #[test]
    fn a_fixed_rate_is_never_learned() {
        let mut m = LatencyModel::new(Some(30_000.0));
        m.observe_prefill(1_000_000, Duration::from_secs(1));
        let e = m.estimates();
        assert_eq!(e.prefill_tokens_per_sec, 30_000.0);
        assert!(!e.learned_rate);
        m.observe_residency(Duration::from_secs(20));
        let r = m.estimates().residency_ms;
        assert!((r - (10_000.0 + 0.01 * 10_000.0)).abs() < 1e-9);
    }

    /// The formula as first written, one candidate at a time: what [`Predictor`] must equal.
    fn reference(input: &PredictInput, est: &Estimates) -> Predicted {
        let rate_ms = (est.prefill_tokens_per_sec / 1e3).max(RATE_BOUNDS.0 / 1e3);
        let cached_f = (input.credited_blocks * input.block_size as f64).max(0.0);
        let cached = if cached_f >= input.isl_tokens as f64 {
            input.isl_tokens
        } else {
            cached_f as u64
        };
        let uncached = input.isl_tokens - cached;
        let queued = input.queued_prefill_tokens as f64;
        let min_q = (input.min_queued_prefill_tokens as f64).min(queued);
        let saturation = rate_ms * SATURATION_QUEUE_MS;
        let effective = min_q + (queued - min_q) / (1.0 + min_q / saturation);
        let prefill_ms = input.prefill_load_scale * (effective + uncached as f64) / rate_ms;
        let batch_ms = BATCH_PENALTY * uncached as f64 / rate_ms * (1.0 + input.requests as f64);
        let (memory_wait_ms, memory_excess_blocks) = match input.memory {
            Some((demand, active, total)) if total > 0 && demand > total as f64 => {
                let excess = demand - total as f64;
                (excess / active.max(1) as f64 * est.residency_ms, excess)
            }
            _ => (0.0, 0.0),
        };
        Predicted {
            cached_tokens: cached,
            uncached_tokens: uncached,
            queued_prefill_tokens: input.queued_prefill_tokens,
            effective_queued_tokens: effective,
            requests: input.requests,
            prefill_ms,
            batch_ms,
            memory_wait_ms,
            memory_excess_blocks,
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(5_000))]
        #[test]
        fn the_per_decision_predictor_is_bit_for_bit_the_formula(
            isl in 0u64..200_000,
            credited in proptest::prop_oneof![proptest::strategy::Just(0.0f64), 0.0f64..20_000.0],
            bs in 1u64..128,
            queued in 0u64..2_000_000,
            min_queued in 0u64..2_000_000,
            // Often the shortest queue itself, as most of an idle fleet is.
            at_min in proptest::bool::weighted(0.3),
            requests in 0usize..500,
            scale in 0.0f64..4.0,
            rate in 50.0f64..1e7,
            memory in proptest::option::of((0.0f64..1e6, 0usize..100_000, 0u64..200_000)),
        ) {
            let input = PredictInput {
                isl_tokens: isl,
                credited_blocks: credited,
                block_size: bs,
                queued_prefill_tokens: queued,
                min_queued_prefill_tokens: if at_min { queued } else { min_queued },
                requests,
                prefill_load_scale: scale,
                memory,
            };
            let e = est(rate);
            let (got, want) = (predict(&input, &e), reference(&input, &e));
            proptest::prop_assert_eq!(got.total_ms().to_bits(), want.total_ms().to_bits());
            proptest::prop_assert_eq!(got.effective_queued_tokens.to_bits(), want.effective_queued_tokens.to_bits());
            proptest::prop_assert_eq!(got, want);
        }
    }
}
