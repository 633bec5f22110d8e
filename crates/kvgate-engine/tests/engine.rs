#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The simulated engine: batching, prefix caching, eviction, preemption, timing, and that its KV
//! events let a router rebuild exactly what it caches.

use kvgate_core::hashing::{BlockHashes, HashSeed};
use kvgate_core::index::PrefixIndex;
use kvgate_core::{StorageTier, WorkerRank};
use kvgate_engine::{CacheEvent, Engine, EngineConfig, EngineRequest, SubmitError, TokenOutput};
use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

const W: WorkerRank = WorkerRank::new(7, 0);

fn config(blocks: usize) -> EngineConfig {
    EngineConfig {
        block_size: 4,
        num_gpu_blocks: blocks,
        max_num_seqs: 8,
        max_num_batched_tokens: 64,
        ..Default::default()
    }
}

fn req(id: u64, prompt: Vec<u32>, out: u32) -> EngineRequest {
    EngineRequest {
        id,
        prompt,
        max_output_tokens: out,
        output_seed: id,
        hash_seed: HashSeed::default(),
        kv_transferred: false,
    }
}

/// Runs until idle; returns every output and every event, and checks pool invariants each step.
fn drain(
    e: &mut Engine,
    index: &mut PrefixIndex,
    next_id: &mut u64,
) -> (Vec<TokenOutput>, Vec<CacheEvent>, Duration) {
    let mut outs = Vec::new();
    let mut events = Vec::new();
    let mut total = Duration::ZERO;
    let mut guard = 0;
    while let Some(step) = e.step() {
        e.pool().check_invariants().unwrap();
        for ev in &step.events {
            index.apply(&ev.to_kv_event(W, *next_id));
            *next_id += 1;
        }
        total += step.duration;
        outs.extend(step.outputs);
        events.extend(step.events);
        guard += 1;
        assert!(guard < 100_000, "engine does not make progress");
    }
    (outs, events, total)
}

fn indexed(index: &PrefixIndex) -> BTreeSet<u64> {
    index.blocks().into_iter().map(|(_, _, _, s)| s.0).collect()
}

fn cached(e: &Engine) -> BTreeSet<u64> {
    e.pool().cached_seqs().map(|s| s.0).collect()
}

#[test]
fn one_request_prefills_then_decodes() {
    // a huge pool keeps KV usage ~0, so decode steps cost the curve's intercept
    let mut e = Engine::new(config(1_000_000));
    let mut idx = PrefixIndex::new();
    let mut id = 0;
    e.submit(req(1, (0..10).collect(), 5)).unwrap();
    let (outs, events, dur) = drain(&mut e, &mut idx, &mut id);
    assert_eq!(outs.len(), 5);
    assert_eq!(
        outs.iter().map(|o| o.index).collect::<Vec<_>>(),
        vec![0, 1, 2, 3, 4]
    );
    let f = outs[4].finished.unwrap();
    assert_eq!(
        (f.prompt_tokens, f.cached_tokens, f.completion_tokens),
        (10, 0, 5)
    );
    // 10 prompt + 5 generated = 15 tokens -> 3 full blocks stored, one chain
    let stored: usize = events
        .iter()
        .map(|e| match e {
            CacheEvent::Stored { blocks, .. } => blocks.len(),
            _ => 0,
        })
        .sum();
    assert_eq!(stored, 3);
    assert_eq!(indexed(&idx), cached(&e));
    // one prefill step of 10 tokens + 4 decode steps at near-zero usage
    let t = e.config().timing;
    let want = t.prefill_ms(10) + 4.0 * t.decode_ms(0.0);
    assert!(
        (dur.as_secs_f64() * 1000.0 - want).abs() < 0.5,
        "{dur:?} vs {want}"
    );
    assert_eq!(e.stats().finished, 1);
    assert_eq!(e.pool().active(), 0);
}

#[test]
fn transferred_kv_skips_prefill_but_fills_the_cache() {
    let prompt: Vec<u32> = (0..4000).map(|i| 100 + i % 5000).collect();
    // Computed here: a long prefill step.
    let mut local = Engine::new(config(1024));
    let mut idx = PrefixIndex::new();
    let mut id = 0;
    local.submit(req(1, prompt.clone(), 3)).unwrap();
    let (_, _, computed_time) = drain(&mut local, &mut idx, &mut id);
    // Transferred: no prefill compute, the first token at once, the same blocks cached and
    // announced as stored, and a later request with that prefix hits them.
    let mut remote = Engine::new(config(1024));
    let mut ridx = PrefixIndex::new();
    let mut rid = 0;
    remote
        .submit(EngineRequest {
            kv_transferred: true,
            ..req(1, prompt.clone(), 3)
        })
        .unwrap();
    let first = remote.step().unwrap();
    assert_eq!(first.new_prefill_tokens, 0);
    assert_eq!(first.outputs.len(), 1, "decoding starts in the first step");
    for ev in &first.events {
        ridx.apply(&ev.to_kv_event(W, rid));
        rid += 1;
    }
    let (outs, _, rest) = drain(&mut remote, &mut ridx, &mut rid);
    assert_eq!(outs.len(), 2);
    assert!(
        first.duration + rest < computed_time / 4,
        "{:?} vs {computed_time:?}",
        first.duration + rest
    );
    assert_eq!(cached(&remote), cached(&local));
    assert_eq!(indexed(&ridx), cached(&remote));
    remote.submit(req(2, prompt.clone(), 1)).unwrap();
    let (outs, _, _) = drain(&mut remote, &mut ridx, &mut rid);
    assert!(outs[0].cached_tokens >= 3984, "{}", outs[0].cached_tokens);
}

#[test]
fn shared_prefix_is_served_from_cache() {
    let mut e = Engine::new(config(64));
    let mut idx = PrefixIndex::new();
    let mut id = 0;
    let prefix: Vec<u32> = (100..116).collect(); // 4 blocks
    let mut a = prefix.clone();
    a.extend([1, 2, 3]);
    e.submit(req(1, a, 2)).unwrap();
    drain(&mut e, &mut idx, &mut id);
    let mut b = prefix.clone();
    b.extend([9, 9, 9, 9, 9]);
    e.submit(req(2, b, 2)).unwrap();
    let (outs, _, _) = drain(&mut e, &mut idx, &mut id);
    assert_eq!(outs[0].cached_tokens, 16);
    assert_eq!(outs.last().unwrap().finished.unwrap().cached_tokens, 16);
    assert_eq!(e.stats().prefix_hit_tokens, 16);
    // an identical prompt reuses everything but its last block (which makes the first token)
    let mut c = prefix.clone();
    c.extend([1, 2, 3]);
    e.submit(req(3, c, 1)).unwrap();
    let (outs, _, _) = drain(&mut e, &mut idx, &mut id);
    assert_eq!(outs[0].cached_tokens, 16);
    let exact = prefix.clone();
    e.submit(req(4, exact, 1)).unwrap();
    let (outs, _, _) = drain(&mut e, &mut idx, &mut id);
    assert_eq!(outs[0].cached_tokens, 12);
    assert_eq!(indexed(&idx), cached(&e));
}

#[test]
fn lru_eviction_emits_removed_and_router_follows() {
    let mut e = Engine::new(config(8));
    let mut idx = PrefixIndex::new();
    let mut id = 0;
    for r in 0..6u64 {
        let prompt: Vec<u32> = (0..12).map(|t| t + 1000 * r as u32).collect();
        e.submit(req(r, prompt, 1)).unwrap();
        drain(&mut e, &mut idx, &mut id);
        assert_eq!(indexed(&idx), cached(&e), "after request {r}");
    }
    assert!(e.pool().num_cached() <= 8);
    assert!(idx.stats().blocks_removed > 0);
    // the most recent prompt is still cached, the first is not
    let last: Vec<u32> = (0..12).map(|t| t + 5000).collect();
    let h = BlockHashes::from_tokens(&last, 4, HashSeed::default());
    assert_eq!(idx.find_matches(h.seqs()).device(&W), 3);
    let first: Vec<u32> = (0..12).collect();
    let h = BlockHashes::from_tokens(&first, 4, HashSeed::default());
    assert_eq!(idx.find_matches(h.seqs()).device(&W), 0);
}

#[test]
fn batching_limits_are_respected() {
    let mut cfg = config(1024);
    cfg.max_num_seqs = 3;
    cfg.max_num_batched_tokens = 20;
    let mut e = Engine::new(cfg);
    for r in 0..10u64 {
        e.submit(req(r, (0..30).map(|t| t + 100 * r as u32).collect(), 4))
            .unwrap();
    }
    let mut steps = 0;
    while let Some(s) = e.step() {
        let st = e.stats();
        assert!(st.running <= 3);
        assert!(s.new_prefill_tokens + s.decoding <= 20);
        steps += 1;
    }
    assert_eq!(e.stats().finished, 10);
    // 10 prompts x 30 tokens at <= 20 tokens per step need >= 15 steps
    assert!(steps >= 15);
}

#[test]
fn memory_pressure_preempts_and_everything_finishes() {
    let mut cfg = config(12);
    cfg.max_num_seqs = 6;
    let mut e = Engine::new(cfg);
    let mut idx = PrefixIndex::new();
    let mut id = 0;
    for r in 0..6u64 {
        e.submit(req(r, (0..8).map(|t| t + 50 * r as u32).collect(), 12))
            .unwrap();
    }
    let (outs, _, _) = drain(&mut e, &mut idx, &mut id);
    let done: BTreeMap<u64, u32> = outs
        .iter()
        .filter_map(|o| o.finished.map(|f| (o.id, f.completion_tokens)))
        .collect();
    assert_eq!(done.len(), 6);
    assert!(done.values().all(|&n| n == 12));
    assert!(
        e.stats().preemptions > 0,
        "the pool was meant to be too small"
    );
    assert_eq!(e.pool().active(), 0);
    assert_eq!(indexed(&idx), cached(&e));
}

#[test]
fn abort_releases_blocks_and_bad_requests_are_refused() {
    let mut e = Engine::new(config(16));
    e.submit(req(1, (0..20).collect(), 100)).unwrap_err();
    assert_eq!(
        e.submit(req(1, (0..20).collect(), 100)),
        Err(SubmitError::TooLong {
            blocks_needed: 30,
            capacity: 16
        })
    );
    assert_eq!(e.submit(req(2, vec![], 1)), Err(SubmitError::EmptyPrompt));
    e.submit(req(3, (0..20).collect(), 10)).unwrap();
    e.step();
    assert!(e.pool().active() > 0);
    assert!(e.abort(3));
    assert!(!e.abort(3));
    assert_eq!(e.pool().active(), 0);
    assert!(e.step().is_none());
    e.pool().check_invariants().unwrap();
}

#[test]
fn reset_clears_the_router_view() {
    let mut e = Engine::new(config(32));
    let mut idx = PrefixIndex::new();
    let mut id = 0;
    e.submit(req(1, (0..16).collect(), 1)).unwrap();
    drain(&mut e, &mut idx, &mut id);
    assert!(!cached(&e).is_empty());
    for ev in e.reset_prefix_cache() {
        assert_eq!(ev, CacheEvent::Cleared);
        idx.apply(&ev.to_kv_event(W, 99));
    }
    assert!(cached(&e).is_empty());
    assert_eq!(idx.num_blocks(W, StorageTier::Device), 0);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]
    /// Any workload: the router's index, fed only the engine's events, ends up holding exactly
    /// the blocks the engine caches; every request finishes with its full output.
    #[test]
    fn events_let_the_router_mirror_the_cache(
        reqs in proptest::collection::vec((0u32..4, 1usize..40, 1u32..12, 0usize..3), 1..25),
        blocks in 10usize..80,
    ) {
        let mut cfg = config(blocks);
        cfg.max_num_seqs = 4;
        cfg.max_num_batched_tokens = 24;
        let mut e = Engine::new(cfg);
        let mut idx = PrefixIndex::new();
        let mut id = 0;
        let mut expected = BTreeMap::new();
        for (i, &(prefix, len, out, steps_between)) in reqs.iter().enumerate() {
            // shared prefixes: 4 families of prompts
            let prompt: Vec<u32> = (0..len as u32).map(|t| if t < 16 { prefix * 1000 + t } else { i as u32 * 7919 + t }).collect();
            if e.submit(req(i as u64, prompt, out)).is_ok() {
                expected.insert(i as u64, out);
            }
            for _ in 0..steps_between {
                if let Some(s) = e.step() {
                    for ev in &s.events { idx.apply(&ev.to_kv_event(W, id)); id += 1; }
                    for o in s.outputs { if let Some(f) = o.finished { prop_assert_eq!(expected.remove(&o.id), Some(f.completion_tokens)); } }
                }
                e.pool().check_invariants().unwrap();
            }
        }
        let (outs, _, _) = drain(&mut e, &mut idx, &mut id);
        for o in outs { if let Some(f) = o.finished { prop_assert_eq!(expected.remove(&o.id), Some(f.completion_tokens)); } }
        prop_assert!(expected.is_empty(), "unfinished: {:?}", expected);
        prop_assert_eq!(indexed(&idx), cached(&e));
        prop_assert_eq!(e.pool().active(), 0);
    }
}

#[test]
fn preemption_during_prefill_does_not_fake_cache_hits() {
    // Found in review: a request preempted mid-prefill reported its own recomputed blocks as
    // cached and had its prompt counted twice.
    let mut e = Engine::new(EngineConfig {
        block_size: 5,
        num_gpu_blocks: 8,
        max_num_seqs: 2,
        max_num_batched_tokens: 2,
        ..Default::default()
    });
    e.submit(req(1, (100..112).collect(), 14)).unwrap();
    e.submit(req(2, (200..213).collect(), 1)).unwrap();
    let mut idx = PrefixIndex::new();
    let mut id = 0;
    let (outs, _, _) = drain(&mut e, &mut idx, &mut id);
    for o in outs.iter().filter(|o| o.finished.is_some()) {
        assert_eq!(
            o.finished.unwrap().cached_tokens,
            0,
            "unique prompts cannot hit: {o:?}"
        );
    }
    assert_eq!(e.stats().prompt_tokens, 25);
    assert_eq!(e.stats().prefix_hit_tokens, 0);
}
