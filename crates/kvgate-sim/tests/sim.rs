//! The simulation against hand-computed timings, and every policy against the reuse bound.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use kvgate_engine::{EngineConfig, TimingModel};
use kvgate_sim::policy::{
    GaieDefault, KvRouter, LeastLoad, LlmdDefault, Lmetric, Policy, Random, RoundRobin,
    SglangCacheAware,
};
use kvgate_sim::sim::{SimConfig, fleet_view, simulate};
use kvgate_sim::trace::{TraceRow, reuse_bound};
use proptest::prelude::*;

fn cfg(workers: usize) -> SimConfig {
    SimConfig {
        workers,
        engine: EngineConfig {
            block_size: 16,
            num_gpu_blocks: 4096,
            max_num_seqs: 64,
            max_num_batched_tokens: 2048,
            enable_prefix_caching: true,
            timing: TimingModel::default(),
        },
        tokens_per_trace_block: 64,
        rate_scale: 1.0,
        max_output_tokens: None,
    }
}

fn row(ms: f64, blocks: &[u64], out: u64) -> TraceRow {
    TraceRow {
        timestamp: ms,
        input_length: blocks.len() as u64 * 512,
        output_length: out,
        hash_ids: blocks.to_vec(),
    }
}

fn all_policies(c: &SimConfig) -> Vec<Box<dyn Policy>> {
    let fleet = fleet_view(c);
    vec![
        Box::new(Random::new(1)),
        Box::new(RoundRobin::default()),
        Box::new(LeastLoad::new(1)),
        Box::new(GaieDefault::new(c.workers, 1)),
        Box::new(SglangCacheAware::new(c.workers, 16, 1)),
        Box::new(KvRouter::dynamo(&fleet, 16, 1).unwrap()),
        Box::new(KvRouter::kvgate(&fleet, 16, 1).unwrap()),
        Box::new(LlmdDefault::new(c.workers, 1)),
        Box::new(Lmetric::new(&fleet, 16).unwrap()),
    ]
}

#[test]
fn one_request_takes_the_timing_models_time() {
    let c = cfg(1);
    // 4 trace blocks of 64 tokens: a 256-token prompt, 3 output tokens.
    let rows = vec![row(0.0, &[1, 2, 3, 4], 3)];
    let r = simulate(&rows, &c, &mut RoundRobin::default(), |_, _| {}).unwrap();
    let t = TimingModel::default();
    let prefill = t.prefill_ms(256);
    assert_eq!(r.completed, 1);
    assert!((r.ttft_p50_ms - prefill).abs() < 0.01, "{r:?}");
    // Two more decode passes follow the one that produced the first token.
    let decode_ms = r.e2e_p50_ms - r.ttft_p50_ms;
    assert!(
        decode_ms > 2.0 * t.decode_ms(0.0) - 0.01 && decode_ms < 2.0 * t.decode_ms(0.1) + 0.01,
        "{r:?}"
    );
    assert_eq!(r.hit_rate, 0.0);
}

#[test]
fn a_repeated_prompt_hits_the_cache_of_its_worker() {
    let c = cfg(1);
    let rows = vec![row(0.0, &[1, 2, 3, 4], 2), row(10_000.0, &[1, 2, 3, 4], 2)];
    let r = simulate(&rows, &c, &mut RoundRobin::default(), |_, _| {}).unwrap();
    // The second prompt finds all but its last block cached (the engine computes at least one
    // token): 240 of 512 prompt tokens.
    assert!((r.hit_rate - 240.0 / 512.0).abs() < 1e-9, "{r:?}");
    assert!(r.ttft_p50_ms < TimingModel::default().prefill_ms(256));
}

/// Conversations: each shares its first blocks with its earlier turns.
fn conversations(n: usize, turns: usize, gap_ms: f64) -> Vec<TraceRow> {
    let mut rows = Vec::new();
    for c in 0..n as u64 {
        for t in 0..turns as u64 {
            let blocks: Vec<u64> = (0..=t + 2).map(|b| c * 1000 + b).collect();
            rows.push(row((t as f64 * n as f64 + c as f64) * gap_ms, &blocks, 8));
        }
    }
    rows.sort_by(|a, b| a.timestamp.total_cmp(&b.timestamp));
    rows
}

#[test]
fn cache_aware_policies_find_the_reuse_that_random_misses() {
    let c = cfg(8);
    let rows = conversations(24, 5, 40.0);
    let bound = reuse_bound(&rows, c.tokens_per_trace_block);
    let mut hits = std::collections::HashMap::new();
    for mut p in all_policies(&c) {
        let r = simulate(&rows, &c, p.as_mut(), |_, _| {}).unwrap();
        assert_eq!(r.completed, rows.len(), "{}", p.name());
        assert!(
            r.hit_rate <= bound + 1e-9,
            "{} hit {} over the bound {bound}",
            p.name(),
            r.hit_rate
        );
        hits.insert(p.name().to_string(), r.hit_rate);
    }
    for cache_aware in [
        "sglang-cache-aware",
        "dynamo",
        "kvgate",
        "llm-d-default",
        "lmetric",
    ] {
        assert!(
            hits[cache_aware] > 0.9 * bound && hits[cache_aware] > 1.5 * hits["random"],
            "{cache_aware}: {hits:?} (bound {bound})"
        );
    }
}

#[test]
fn runs_are_deterministic() {
    let c = cfg(4);
    let rows = conversations(10, 3, 25.0);
    let fleet = fleet_view(&c);
    let a = simulate(
        &rows,
        &c,
        &mut KvRouter::kvgate(&fleet, 16, 9).unwrap(),
        |_, _| {},
    )
    .unwrap();
    let b = simulate(
        &rows,
        &c,
        &mut KvRouter::kvgate(&fleet, 16, 9).unwrap(),
        |_, _| {},
    )
    .unwrap();
    assert_eq!(format!("{a:?}"), format!("{b:?}"));
}

#[test]
fn bad_configurations_are_refused() {
    let rows = vec![row(0.0, &[1], 1)];
    let mut c = cfg(0);
    assert!(simulate(&rows, &c, &mut RoundRobin::default(), |_, _| {}).is_err());
    c.workers = 1;
    c.rate_scale = 0.0;
    assert!(simulate(&rows, &c, &mut RoundRobin::default(), |_, _| {}).is_err());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// No policy completes fewer requests than it was given or hits more than the trace allows.
    #[test]
    fn every_policy_completes_everything_within_the_bound(
        seeds in prop::collection::vec((0u64..6, 1usize..5, 1u64..20, 0u32..400), 1..40),
        workers in 1usize..5,
    ) {
        let c = cfg(workers);
        let mut t = 0.0;
        let rows: Vec<TraceRow> = seeds
            .iter()
            .map(|&(conv, len, out, gap)| {
                t += f64::from(gap);
                let blocks: Vec<u64> = (0..len as u64).map(|b| conv * 100 + b).collect();
                row(t, &blocks, out)
            })
            .collect();
        let bound = reuse_bound(&rows, c.tokens_per_trace_block);
        for mut p in all_policies(&c) {
            let r = simulate(&rows, &c, p.as_mut(), |_, _| {}).unwrap();
            prop_assert_eq!(r.completed, rows.len());
            prop_assert!(r.hit_rate <= bound + 1e-9);
            prop_assert!(r.ttft_p50_ms > 0.0);
        }
    }
}
