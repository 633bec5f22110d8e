//! The discrete-event simulation: a fleet of [`Engine`]s in virtual time, requests arriving as
//! the trace says (arrival gaps divided by `rate_scale`), a [`Policy`] choosing where each goes.
//!
//! Each engine runs one forward pass at a time: `Engine::step` is called when the engine is free
//! and has work, and its outputs (tokens, finishes, KV events) become visible when the pass ends,
//! `duration` later. Requests routed meanwhile join the next pass. Events are the only clock: an
//! hour of trace takes seconds.

use crate::policy::{Arrival, Policy, WorkerView};
use crate::trace::{self, TraceRow};
use kvgate_core::hashing::{BlockHashes, HashSeed};
use kvgate_engine::{Engine, EngineConfig, EngineRequest, Step};
use serde::Serialize;
use std::time::{Duration, Instant};

#[derive(Clone, Debug)]
pub struct SimConfig {
    pub workers: usize,
    pub engine: EngineConfig,
    /// Tokens each trace hash id expands to (Mooncake: 512).
    pub tokens_per_trace_block: usize,
    /// Arrivals come this many times faster than in the trace.
    pub rate_scale: f64,
    /// Cap on output tokens per request (`None`: the trace's).
    pub max_output_tokens: Option<u32>,
}

/// What happened to one request.
#[derive(Clone, Copy, Debug, Default)]
struct Record {
    arrival: f64,
    first_token: Option<f64>,
    finish: Option<f64>,
    prompt_tokens: usize,
    cached_tokens: usize,
    output_tokens: u32,
    worker: usize,
}

/// One policy's figures.
#[derive(Clone, Debug, Serialize)]
pub struct PolicyResult {
    pub requests: usize,
    pub completed: usize,
    /// Prompt tokens served from the engines' prefix caches / prompt tokens.
    pub hit_rate: f64,
    pub ttft_p50_ms: f64,
    pub ttft_p90_ms: f64,
    pub ttft_p99_ms: f64,
    /// Mean time between a request's output tokens.
    pub itl_mean_ms: f64,
    pub e2e_p50_ms: f64,
    pub e2e_p90_ms: f64,
    /// Output tokens per second of virtual time.
    pub throughput_tok_s: f64,
    /// Most prompt tokens computed by one worker / the mean (1 = perfectly even).
    pub imbalance: f64,
    /// Time the engines spent in forward passes while requests were arriving / (workers x
    /// that window): the load level.
    pub busy_fraction: f64,
    pub makespan_s: f64,
    pub preemptions: u64,
    /// Bookings the router still held after the last request finished (policies that book;
    /// anything but 0 is a leak).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub open_bookings_at_end: Option<usize>,
    /// Every completed request's TTFT, sorted (for CDFs).
    #[serde(skip)]
    pub ttft_ms: Vec<f64>,
}

pub fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

struct WorkerSim {
    engine: Engine,
    /// The pass in flight and when it ends.
    pass: Option<(f64, Step)>,
    /// Pass time inside the arrival window.
    busy: f64,
}

/// The fleet's state as policies see it.
fn views(workers: &[WorkerSim], in_flight: &[usize]) -> Vec<WorkerView> {
    workers
        .iter()
        .zip(in_flight)
        .map(|(w, &n)| {
            let s = w.engine.stats();
            WorkerView {
                in_flight: n,
                waiting: s.waiting,
                running: s.running,
                kv_usage: w.engine.kv_usage(),
                total_kv_blocks: w.engine.config().num_gpu_blocks,
                max_num_batched_tokens: w.engine.config().max_num_batched_tokens,
            }
        })
        .collect()
}

/// An empty fleet's view (to build policies before a run).
pub fn fleet_view(cfg: &SimConfig) -> Vec<WorkerView> {
    vec![
        WorkerView {
            total_kv_blocks: cfg.engine.num_gpu_blocks,
            max_num_batched_tokens: cfg.engine.max_num_batched_tokens,
            ..WorkerView::default()
        };
        cfg.workers
    ]
}

/// Replays `rows` through `policy`; `progress(done, total)` is called now and then.
pub fn simulate(
    rows: &[TraceRow],
    cfg: &SimConfig,
    policy: &mut dyn Policy,
    mut progress: impl FnMut(usize, usize),
) -> Result<PolicyResult, String> {
    if cfg.workers == 0 {
        return Err("at least one worker is needed".into());
    }
    if !(cfg.rate_scale.is_finite() && cfg.rate_scale > 0.0) {
        return Err("the rate scale must be > 0".into());
    }
    let base = Instant::now();
    let at = |t: f64| base + Duration::from_secs_f64(t.max(0.0));
    let t0 = rows.first().map_or(0.0, |r| r.timestamp);
    let mut workers: Vec<WorkerSim> = (0..cfg.workers)
        .map(|_| WorkerSim {
            engine: Engine::new(cfg.engine.clone()),
            pass: None,
            busy: 0.0,
        })
        .collect();
    let mut in_flight = vec![0usize; cfg.workers];
    let mut records = vec![Record::default(); rows.len()];
    let mut next = 0usize;
    let mut now: f64;
    let block_size = cfg.engine.block_size;
    // From the first arrival to the last: the span over which the load level is measured.
    let window = rows
        .last()
        .map_or(0.0, |r| (r.timestamp - t0) / 1000.0 / cfg.rate_scale);
    loop {
        let arrival_t = rows
            .get(next)
            .map(|r| (r.timestamp - t0) / 1000.0 / cfg.rate_scale);
        let pass_end = workers
            .iter()
            .enumerate()
            .filter_map(|(i, w)| w.pass.as_ref().map(|(end, _)| (*end, i)))
            .min_by(|a, b| a.0.total_cmp(&b.0));
        // Passes that end at an arrival's instant deliver first.
        let take_pass = match (arrival_t, pass_end) {
            (None, None) => break,
            (Some(_), None) => false,
            (None, Some(_)) => true,
            (Some(a), Some((e, _))) => e <= a,
        };
        if take_pass {
            let Some((end, w)) = pass_end else { break };
            now = end;
            let Some((_, step)) = workers[w].pass.take() else {
                continue;
            };
            policy.cache_events(w, &step.events);
            for out in &step.outputs {
                let Some(rec) = records.get_mut(out.id as usize) else {
                    continue;
                };
                if out.index == 0 {
                    rec.first_token = Some(now);
                    rec.cached_tokens = out.cached_tokens;
                    policy.first_token(out.id, at(now));
                }
                if let Some(f) = out.finished {
                    rec.finish = Some(now);
                    rec.output_tokens = f.completion_tokens;
                    rec.cached_tokens = f.cached_tokens;
                    in_flight[w] = in_flight[w].saturating_sub(1);
                    policy.finished(out.id, at(now));
                }
            }
            start_pass(&mut workers[w], now, window);
        } else {
            let Some(t) = arrival_t else { break };
            now = t;
            let row = &rows[next];
            let id = next as u64;
            next += 1;
            let prompt = trace::prompt(row, cfg.tokens_per_trace_block);
            let hashes = BlockHashes::from_tokens(&prompt, block_size, HashSeed::default());
            let max_output = cfg
                .max_output_tokens
                .map_or(row.output_length, |cap| {
                    row.output_length.min(u64::from(cap))
                })
                .clamp(1, u64::from(u32::MAX)) as u32;
            let fleet = views(&workers, &in_flight);
            let w = policy
                .route(
                    &Arrival {
                        id,
                        hashes: &hashes,
                        max_output_tokens: max_output,
                    },
                    &fleet,
                    at(now),
                )
                .min(cfg.workers - 1);
            records[id as usize] = Record {
                arrival: now,
                prompt_tokens: prompt.len(),
                worker: w,
                ..Record::default()
            };
            workers[w]
                .engine
                .submit(EngineRequest {
                    id,
                    prompt,
                    max_output_tokens: max_output,
                    output_seed: id,
                    hash_seed: HashSeed::default(),
                    kv_transferred: false,
                })
                .map_err(|e| format!("request {id}: {e:?}"))?;
            in_flight[w] += 1;
            if workers[w].pass.is_none() {
                start_pass(&mut workers[w], now, window);
            }
            if next.is_multiple_of(256) {
                progress(next, rows.len());
            }
        }
    }
    progress(rows.len(), rows.len());
    let mut r = summarise(&records, &workers, cfg.workers, window);
    r.open_bookings_at_end = policy.open_bookings();
    Ok(r)
}

fn start_pass(w: &mut WorkerSim, now: f64, window: f64) {
    if let Some(step) = w.engine.step() {
        // A pass always takes some time, so the clock moves.
        let d = step.duration.as_secs_f64().max(1e-6);
        w.busy += ((now + d).min(window) - now).max(0.0);
        w.pass = Some((now + d, step));
    }
}

fn summarise(records: &[Record], workers: &[WorkerSim], n: usize, window: f64) -> PolicyResult {
    let mut ttft = Vec::new();
    let mut e2e = Vec::new();
    let (mut prompt, mut cached, mut output) = (0u64, 0u64, 0u64);
    let (mut itl_sum, mut itl_n) = (0.0f64, 0u64);
    let mut computed = vec![0u64; n];
    let (mut first, mut last) = (f64::INFINITY, 0.0f64);
    let mut completed = 0;
    for r in records {
        first = first.min(r.arrival);
        let (Some(ft), Some(fin)) = (r.first_token, r.finish) else {
            continue;
        };
        completed += 1;
        last = last.max(fin);
        ttft.push((ft - r.arrival) * 1e3);
        e2e.push((fin - r.arrival) * 1e3);
        prompt += r.prompt_tokens as u64;
        cached += r.cached_tokens as u64;
        output += u64::from(r.output_tokens);
        if r.output_tokens > 1 {
            itl_sum += (fin - ft) * 1e3;
            itl_n += u64::from(r.output_tokens - 1);
        }
        computed[r.worker] += (r.prompt_tokens - r.cached_tokens.min(r.prompt_tokens)) as u64;
    }
    let makespan = (last - first).max(1e-9);
    let mean = computed.iter().sum::<u64>() as f64 / n as f64;
    let busy: f64 = workers.iter().map(|w| w.busy).sum();
    PolicyResult {
        requests: records.len(),
        completed,
        hit_rate: cached as f64 / prompt.max(1) as f64,
        ttft_p50_ms: percentile(&mut ttft, 0.5),
        ttft_p90_ms: percentile(&mut ttft, 0.9),
        ttft_p99_ms: percentile(&mut ttft, 0.99),
        itl_mean_ms: if itl_n > 0 {
            itl_sum / itl_n as f64
        } else {
            f64::NAN
        },
        e2e_p50_ms: percentile(&mut e2e, 0.5),
        e2e_p90_ms: percentile(&mut e2e, 0.9),
        throughput_tok_s: output as f64 / makespan,
        imbalance: if mean > 0.0 {
            computed.iter().copied().max().unwrap_or(0) as f64 / mean
        } else {
            1.0
        },
        busy_fraction: if window > 0.0 {
            busy / (n as f64 * window)
        } else {
            1.0
        },
        makespan_s: makespan,
        preemptions: workers.iter().map(|w| w.engine.stats().preemptions).sum(),
        open_bookings_at_end: None,
        ttft_ms: ttft,
    }
}
