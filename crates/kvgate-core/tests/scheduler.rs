//! Every router knob's effect on decisions, checked through the scheduler and the `Router`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use kvgate_core::config::{AdmissionConfig, AdmissionMode, RouterConfig, RouterPolicy};
use kvgate_core::hashing::{BlockHashes, HashSeed};
use kvgate_core::index::TierOverlap;
use kvgate_core::latency::{BATCH_PENALTY, Estimates};
use kvgate_core::random::SplitMix64;
use kvgate_core::router::{RouteError, RouteRequest, Router, WorkerInfo, WorkerRole};
use kvgate_core::scheduler::{
    Busy, CandidateInput, CostWeights, Outcome, ScoreRequest, WorkerCapacity, schedule,
};
use kvgate_core::{
    ExternalHash, KvEvent, KvEventData, RequestId, StorageTier, StoredBlock, WorkerId, WorkerRank,
};
use proptest::prelude::*;
use std::time::{Duration, Instant};

const BS: usize = 16;
const A: WorkerRank = WorkerRank::new(1, 0);
const B: WorkerRank = WorkerRank::new(2, 0);
const C: WorkerRank = WorkerRank::new(3, 0);

fn cand(
    worker: WorkerRank,
    overlap: u32,
    prefill: u64,
    active: usize,
    new: usize,
) -> CandidateInput {
    CandidateInput {
        worker,
        overlap: TierOverlap([overlap, 0, 0, 0]),
        active_prefill_tokens: prefill,
        active_blocks: active,
        output_blocks: 0.0,
        new_blocks: new,
        requests: 0,
        capacity: WorkerCapacity {
            total_kv_blocks: Some(1000),
            max_num_batched_tokens: Some(8192),
        },
        home_discount: 0.0,
    }
}

/// Dynamo's cost function (the parity mode): what most tests here pin down.
fn weights(f: impl FnOnce(&mut RouterConfig)) -> CostWeights {
    let mut c = RouterConfig {
        policy: RouterPolicy::Dynamo,
        ..RouterConfig::default()
    };
    f(&mut c);
    CostWeights::from(&c)
}

fn req(isl: usize) -> ScoreRequest {
    ScoreRequest {
        isl_tokens: isl,
        block_size: BS,
        estimates: Estimates::default(),
    }
}

fn run(
    w: &CostWeights,
    cands: &[CandidateInput],
    isl: usize,
) -> (Outcome, kvgate_core::scheduler::Explanation) {
    schedule(
        w,
        &AdmissionConfig::default(),
        req(isl),
        cands,
        &mut SplitMix64::new(1),
    )
}

fn chosen(o: &Outcome) -> WorkerRank {
    match o {
        Outcome::Chosen { ranked } => ranked[0],
        other => panic!("expected a choice, got {other:?}"),
    }
}

fn cost_of(e: &kvgate_core::scheduler::Explanation, w: WorkerRank) -> f64 {
    e.candidates.iter().find(|c| c.worker == w).unwrap().cost
}

#[test]
fn cost_matches_the_documented_formula() {
    // A: 10 overlap blocks, 320 active prefill tokens, 40 active blocks, 22 new.
    let (_, e) = run(
        &weights(|_| {}),
        &[cand(A, 10, 320, 40, 22), cand(B, 0, 0, 0, 32)],
        512,
    );
    // prefill = (320 + 512) / 16 = 52 blocks, credit 10, decode = 40 + 22
    assert_eq!(cost_of(&e, A), (52.0 - 10.0) + 62.0);
    assert_eq!(cost_of(&e, B), 32.0 + 32.0);
    assert_eq!(e.request_blocks, 32);
}

#[test]
fn overlap_wins_by_default_and_credit_zero_ignores_it() {
    let cands = [cand(A, 20, 0, 0, 12), cand(B, 0, 0, 0, 32)];
    let (o, _) = run(&weights(|_| {}), &cands, 512);
    assert_eq!(chosen(&o), A);
    let (_, e) = run(
        &weights(|c| c.overlap_score_credit = 0.0),
        &[cand(A, 20, 0, 0, 32), cand(B, 0, 0, 0, 32)],
        512,
    );
    assert_eq!(
        cost_of(&e, A),
        cost_of(&e, B),
        "credit 0: overlap changes nothing"
    );
    // credit above 1 amplifies the overlap
    let (_, e2) = run(&weights(|c| c.overlap_score_credit = 2.0), &cands, 512);
    assert_eq!(cost_of(&e2, A), (32.0 - 40.0f64).max(0.0) + 12.0);
}

#[test]
fn credit_decay_shrinks_credit_for_loaded_workers() {
    // A caches 16 blocks but has 512 prefill tokens queued (32 blocks above B).
    let cands = [cand(A, 16, 512, 0, 16), cand(B, 0, 0, 0, 32)];
    let (_, e0) = run(&weights(|_| {}), &cands, 512);
    let a0 = e0.candidates.iter().find(|c| c.worker == A).unwrap();
    assert_eq!(a0.decay, 1.0);
    assert_eq!(a0.credit_blocks, 16.0);
    let (o, e) = run(
        &weights(|c| c.overlap_score_credit_decay = 1.0),
        &cands,
        512,
    );
    let a = e.candidates.iter().find(|c| c.worker == A).unwrap();
    // decay = 1 / (1 + 1.0 * (512/16) / 32) = 0.5
    assert_eq!(a.decay, 0.5);
    assert_eq!(a.credit_blocks, 8.0);
    assert_eq!(
        e.candidates.iter().find(|c| c.worker == B).unwrap().decay,
        1.0
    );
    assert_eq!(e.min_active_prefill_tokens, 0);
    assert!(cost_of(&e, A) > cost_of(&e0, A));
    assert_eq!(chosen(&o), B);
}

#[test]
fn prefill_scale_zero_ignores_prompt_load() {
    // A has a huge prefill queue but fewer decode blocks: with scale 0 only decode load counts.
    let cands = [cand(A, 0, 100_000, 10, 32), cand(B, 0, 0, 50, 32)];
    let (o, _) = run(&weights(|_| {}), &cands, 512);
    assert_eq!(chosen(&o), B);
    let (o, e) = run(&weights(|c| c.prefill_load_scale = 0.0), &cands, 512);
    assert_eq!(chosen(&o), A);
    assert_eq!(cost_of(&e, A), 42.0);
    // and scale 2 doubles the prompt side
    let (_, e2) = run(
        &weights(|c| c.prefill_load_scale = 2.0),
        &[cand(A, 4, 0, 0, 28)],
        512,
    );
    assert_eq!(cost_of(&e2, A), 2.0 * (32.0 - 4.0) + 28.0);
}

#[test]
fn track_prefill_tokens_off_drops_the_prompt_term() {
    let cands = [cand(A, 0, 100_000, 10, 32), cand(B, 30, 0, 50, 2)];
    let (_, e) = run(&weights(|c| c.track_prefill_tokens = false), &cands, 512);
    assert_eq!(cost_of(&e, A), 42.0);
    assert_eq!(cost_of(&e, B), 52.0);
    assert!(e.candidates.iter().all(|c| c.prefill_blocks == 0.0));
}

#[test]
fn track_active_blocks_off_drops_the_decode_term() {
    let cands = [cand(A, 0, 0, 900, 32), cand(B, 0, 16, 0, 32)];
    let (o, _) = run(&weights(|_| {}), &cands, 512);
    assert_eq!(chosen(&o), B);
    let (o, e) = run(&weights(|c| c.track_active_blocks = false), &cands, 512);
    assert_eq!(chosen(&o), A);
    assert!(e.candidates.iter().all(|c| c.decode_blocks == 0.0));
}

#[test]
fn temperature_zero_breaks_ties_uniformly() {
    let cands = [
        cand(A, 0, 0, 0, 32),
        cand(B, 0, 0, 0, 32),
        cand(C, 0, 0, 0, 32),
    ];
    let w = weights(|_| {});
    let mut rng = SplitMix64::new(9);
    let mut counts = [0usize; 3];
    let n = 30_000;
    for _ in 0..n {
        let (o, _) = schedule(&w, &AdmissionConfig::default(), req(512), &cands, &mut rng);
        counts[(chosen(&o).worker.0 - 1) as usize] += 1;
    }
    for c in counts {
        let f = c as f64 / n as f64;
        assert!((f - 1.0 / 3.0).abs() < 0.015, "{counts:?}");
    }
}

#[test]
fn temperature_spreads_choices_by_the_formula() {
    // costs 64, 48, 32 (no overlap, different decode loads)
    let cands = [
        cand(A, 0, 0, 32, 0),
        cand(B, 0, 0, 16, 0),
        cand(C, 0, 0, 0, 0),
    ];
    for t in [0.5, 1.0, 4.0] {
        let w = weights(|c| c.temperature = t);
        let costs = [64.0f64, 48.0, 32.0];
        let z: f64 = costs.iter().map(|c| (-(c - 32.0) / (32.0 * t)).exp()).sum();
        let want: Vec<f64> = costs
            .iter()
            .map(|c| (-(c - 32.0) / (32.0 * t)).exp() / z)
            .collect();
        let mut rng = SplitMix64::new(5);
        let mut counts = [0usize; 3];
        let n = 40_000;
        let mut reported = None;
        for _ in 0..n {
            let (o, e) = schedule(&w, &AdmissionConfig::default(), req(0), &cands, &mut rng);
            counts[(chosen(&o).worker.0 - 1) as usize] += 1;
            reported.get_or_insert_with(|| {
                e.candidates
                    .iter()
                    .map(|c| c.probability.unwrap())
                    .collect::<Vec<_>>()
            });
        }
        let reported = reported.unwrap();
        for i in 0..3 {
            assert!((reported[i] - want[i]).abs() < 1e-12);
            let f = counts[i] as f64 / n as f64;
            assert!(
                (f - want[i]).abs() < 0.012,
                "T={t} i={i}: {f} vs {}",
                want[i]
            );
        }
    }
    // all costs equal: uniform even at T > 0
    let eq = [cand(A, 0, 0, 0, 0), cand(B, 0, 0, 0, 0)];
    let (_, e) = schedule(
        &weights(|c| c.temperature = 1.0),
        &AdmissionConfig::default(),
        req(0),
        &eq,
        &mut SplitMix64::new(1),
    );
    assert!(e.candidates.iter().all(|c| c.probability == Some(0.5)));
}

fn admission(f: impl FnOnce(&mut AdmissionConfig)) -> AdmissionConfig {
    let mut a = AdmissionConfig {
        mode: AdmissionMode::TokenCapacity,
        ..Default::default()
    };
    f(&mut a);
    a
}

#[test]
fn admission_thresholds_exclude_the_right_workers() {
    let w = weights(|_| {});
    let mut rng = SplitMix64::new(1);
    // A: 901/1000 blocks active (busy above 0.9), B: 900 exactly (not busy: strict >), C idle.
    let cands = [
        cand(A, 0, 0, 901, 0),
        cand(B, 0, 0, 900, 0),
        cand(C, 0, 5000, 0, 0),
    ];
    let (o, e) = schedule(
        &w,
        &admission(|a| a.active_decode_blocks_threshold = Some(0.9)),
        req(16),
        &cands,
        &mut rng,
    );
    assert!(matches!(
        e.candidates[0].busy,
        Some(Busy::DecodeBlocks { .. })
    ));
    assert!(e.candidates[1].busy.is_none());
    assert!(!matches!(&o, Outcome::Chosen { ranked } if ranked.contains(&A)));
    // absolute prefill threshold
    let (o, e) = schedule(
        &w,
        &admission(|a| a.active_prefill_tokens_threshold = Some(4096)),
        req(16),
        &cands,
        &mut rng,
    );
    assert!(matches!(
        e.candidates[2].busy,
        Some(Busy::PrefillTokens {
            active_prefill_tokens: 5000,
            threshold: 4096
        })
    ));
    assert_eq!(o, Outcome::Chosen { ranked: vec![B, A] });
    // fractional prefill threshold: 0.5 * 8192 = 4096
    let (_, e) = schedule(
        &w,
        &admission(|a| a.active_prefill_tokens_threshold_frac = Some(0.5)),
        req(16),
        &cands,
        &mut rng,
    );
    assert!(matches!(
        e.candidates[2].busy,
        Some(Busy::PrefillTokensFrac { .. })
    ));
    // admission off: nobody is busy whatever the load
    let (_, e) = schedule(&w, &AdmissionConfig::default(), req(16), &cands, &mut rng);
    assert!(e.candidates.iter().all(|c| c.busy.is_none()));
    // the decode threshold alone enables token-capacity
    let implicit = AdmissionConfig {
        active_decode_blocks_threshold: Some(0.9),
        ..Default::default()
    };
    let (_, e) = schedule(&w, &implicit, req(16), &cands, &mut rng);
    assert!(e.candidates[0].busy.is_some());
}

#[test]
fn all_busy_is_overloaded_and_distinct_from_no_workers() {
    let w = weights(|_| {});
    let a = admission(|a| a.active_prefill_tokens_threshold = Some(100));
    let cands = [cand(A, 0, 101, 0, 0), cand(B, 0, 500, 0, 0)];
    let (o, e) = schedule(&w, &a, req(16), &cands, &mut SplitMix64::new(1));
    assert_eq!(o, Outcome::Overloaded);
    assert_eq!(e.candidates.len(), 2);
    let (o, _) = schedule(&w, &a, req(16), &[], &mut SplitMix64::new(1));
    assert_eq!(o, Outcome::NoCandidates);
}

#[test]
fn ranked_fallbacks_are_by_cost() {
    let cands = [
        cand(A, 0, 0, 30, 0),
        cand(B, 0, 0, 10, 0),
        cand(C, 0, 0, 20, 0),
    ];
    let (o, _) = run(&weights(|_| {}), &cands, 16);
    assert_eq!(
        o,
        Outcome::Chosen {
            ranked: vec![B, C, A]
        }
    );
}

// ---------------- property tests ----------------

fn arb_cand(i: u64) -> impl Strategy<Value = CandidateInput> {
    (0u32..64, 0u64..20_000, 0usize..1000, 0usize..64, 0u32..4).prop_map(
        move |(o, p, a, n, out)| CandidateInput {
            worker: WorkerRank::new(i, 0),
            overlap: TierOverlap([o, 0, 0, 0]),
            active_prefill_tokens: p,
            active_blocks: a,
            output_blocks: f64::from(out),
            new_blocks: n,
            requests: a / 16,
            capacity: WorkerCapacity {
                total_kv_blocks: Some(1000),
                max_num_batched_tokens: Some(8192),
            },
            home_discount: 0.0,
        },
    )
}

fn arb_weights() -> impl Strategy<Value = CostWeights> {
    (
        0.0f64..3.0,
        0.0f64..2.0,
        0.0f64..3.0,
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(c, d, s, tp, ta, kv)| CostWeights {
            policy: if kv {
                RouterPolicy::Kvgate
            } else {
                RouterPolicy::Dynamo
            },
            overlap_score_credit: c,
            overlap_score_credit_decay: d,
            prefill_load_scale: s,
            track_prefill_tokens: tp,
            track_active_blocks: ta,
            temperature: 0.0,
        })
}

proptest! {
    #[test]
    fn choice_is_a_cheapest_eligible_worker(
        w in arb_weights(),
        cands in (0u64..8).prop_flat_map(|n| (0..n.max(1)).map(arb_cand).collect::<Vec<_>>()),
        threshold in prop_oneof![Just(None), (0u64..20_000).prop_map(Some)],
        isl in 0usize..4096,
        seed in any::<u64>(),
    ) {
        let a = AdmissionConfig { mode: AdmissionMode::TokenCapacity, active_prefill_tokens_threshold: threshold.filter(|&t| t > 0), ..Default::default() };
        let (o, e) = schedule(&w, &a, req(isl), &cands, &mut SplitMix64::new(seed));
        let eligible: Vec<_> = e.candidates.iter().filter(|c| c.busy.is_none()).collect();
        match o {
            Outcome::Chosen { ranked } => {
                let min = eligible.iter().map(|c| c.cost).fold(f64::INFINITY, f64::min);
                let best = e.candidates.iter().find(|c| c.worker == ranked[0]).unwrap();
                prop_assert!(best.busy.is_none());
                prop_assert_eq!(best.cost, min);
                prop_assert_eq!(ranked.len(), eligible.len());
                for pair in ranked[1..].windows(2) {
                    let c0 = e.candidates.iter().find(|c| c.worker == pair[0]).unwrap().cost;
                    let c1 = e.candidates.iter().find(|c| c.worker == pair[1]).unwrap().cost;
                    prop_assert!(c0 <= c1);
                }
                for c in &e.candidates {
                    prop_assert!(c.cost.is_finite() && c.cost >= 0.0);
                }
            }
            Outcome::Overloaded => prop_assert!(eligible.is_empty() && !cands.is_empty()),
            Outcome::NoCandidates => prop_assert!(cands.is_empty()),
        }
    }

    #[test]
    fn more_overlap_never_costs_more(w in arb_weights(), c in arb_cand(1), extra in 1u32..32, isl in 0usize..4096) {
        let mut more = c;
        more.overlap = TierOverlap([c.overlap.device() + extra, 0, 0, 0]);
        let (_, e1) = schedule(&w, &AdmissionConfig::default(), req(isl), &[c], &mut SplitMix64::new(0));
        let (_, e2) = schedule(&w, &AdmissionConfig::default(), req(isl), &[more], &mut SplitMix64::new(0));
        prop_assert!(e2.candidates[0].cost <= e1.candidates[0].cost);
    }
}

// ---------------- through the Router ----------------

fn router(f: impl FnOnce(&mut RouterConfig)) -> Router {
    let mut c = RouterConfig {
        policy: RouterPolicy::Dynamo,
        ..RouterConfig::default()
    };
    f(&mut c);
    c.validate().unwrap();
    let mut r = Router::new(c, BS).unwrap();
    for id in [1, 2] {
        r.upsert_worker(WorkerInfo {
            id: WorkerId(id),
            dp_size: 1,
            role: WorkerRole::Aggregated,
            capacity: WorkerCapacity {
                total_kv_blocks: Some(1000),
                max_num_batched_tokens: Some(8192),
            },
        });
    }
    r
}

fn prompt(tag: u32, blocks: usize) -> BlockHashes {
    let toks: Vec<u32> = (0..(blocks * BS) as u32).map(|i| i ^ (tag << 20)).collect();
    BlockHashes::from_tokens(&toks, BS, HashSeed::default())
}

fn stored_event(w: WorkerRank, h: &BlockHashes) -> KvEvent {
    KvEvent {
        source: w,
        event_id: 1,
        tier: StorageTier::Device,
        data: KvEventData::Stored {
            parent: None,
            blocks: h
                .locals()
                .iter()
                .zip(h.seqs())
                .map(|(&local, s)| StoredBlock {
                    hash: ExternalHash(s.0 ^ 1),
                    local,
                })
                .collect(),
        },
    }
}

fn route(
    r: &mut Router,
    id: &str,
    h: &BlockHashes,
    now: Instant,
) -> Result<kvgate_core::router::Decision, RouteError> {
    r.route(
        RouteRequest {
            request: &RequestId::from(id),
            hashes: h,
            expected_output_tokens: Some(256),
            allowed: None,
            book: true,
            home: None,
        },
        now,
        &mut SplitMix64::new(3),
    )
}

#[test]
fn events_steer_requests_to_the_cache() {
    let mut r = router(|_| {});
    let h = prompt(1, 8);
    r.apply_event(&stored_event(B, &h));
    let d = route(&mut r, "x", &h, Instant::now()).unwrap();
    assert_eq!(d.worker, B);
    assert_eq!(d.overlap_blocks, 8);
    assert_eq!(d.predicted_cached_tokens, 128);
    assert_eq!(r.load().load(&B).unwrap().prefill_tokens, 0);
    assert_eq!(r.load().load(&B).unwrap().active_blocks(), 8);
    r.prefill_complete(&"x".into());
    r.free(&"x".into());
    assert!(r.load().load(&B).is_none());
    assert_eq!(route(&mut r, "x", &h, Instant::now()).unwrap().worker, B);
    assert_eq!(
        route(&mut r, "x", &h, Instant::now()),
        Err(RouteError::DuplicateRequest)
    );
}

#[test]
fn approximate_mode_follows_decisions_until_ttl() {
    let mut r = router(|c| {
        c.use_kv_events = false;
        c.approx_ttl = Duration::from_secs(120);
    });
    let t0 = Instant::now();
    let h = prompt(2, 8);
    // events are ignored in approximate mode
    r.apply_event(&stored_event(B, &h));
    assert_eq!(r.index().num_nodes(), 0);
    let first = route(&mut r, "a", &h, t0).unwrap().worker;
    r.free(&"a".into());
    let d = route(&mut r, "b", &h, t0 + Duration::from_secs(1)).unwrap();
    assert_eq!(d.worker, first);
    assert_eq!(d.overlap_blocks, 8);
    r.free(&"b".into());
    // after the TTL the prediction is gone
    let d = route(&mut r, "c", &h, t0 + Duration::from_secs(200)).unwrap();
    assert_eq!(d.overlap_blocks, 0);
}

#[test]
fn predicted_ttl_covers_the_gap_before_events() {
    let t0 = Instant::now();
    let h = prompt(3, 8);
    // without predicted TTL: the second request sees no overlap until events arrive
    let mut plain = router(|_| {});
    route(&mut plain, "a", &h, t0).unwrap();
    assert_eq!(route(&mut plain, "b", &h, t0).unwrap().overlap_blocks, 0);
    let mut r = router(|c| c.predicted_ttl = Some(Duration::from_secs(5)));
    let w = route(&mut r, "a", &h, t0).unwrap().worker;
    r.free(&"a".into());
    let d = route(&mut r, "b", &h, t0 + Duration::from_secs(1)).unwrap();
    assert_eq!((d.worker, d.overlap_blocks), (w, 8));
    r.free(&"b".into());
    assert_eq!(
        route(&mut r, "c", &h, t0 + Duration::from_secs(10))
            .unwrap()
            .overlap_blocks,
        0
    );
}

#[test]
fn track_output_blocks_adds_predicted_decode_load() {
    let t0 = Instant::now();
    let mut on = router(|c| c.track_output_blocks = true);
    let h = prompt(4, 4);
    let d = route(&mut on, "a", &h, t0).unwrap();
    // 256 expected output tokens = 16 blocks predicted
    assert_eq!(on.load().load(&d.worker).unwrap().output_blocks, 16.0);
    on.record_output(&"a".into(), 128);
    assert_eq!(on.load().load(&d.worker).unwrap().output_blocks, 8.0);
    let mut off = router(|_| {});
    let d = route(&mut off, "a", &h, t0).unwrap();
    assert_eq!(off.load().load(&d.worker).unwrap().output_blocks, 0.0);
}

#[test]
fn subset_hint_and_worker_removal() {
    let mut r = router(|_| {});
    let h = prompt(5, 4);
    r.apply_event(&stored_event(B, &h));
    let allowed = [A];
    let d = r
        .route(
            RouteRequest {
                request: &"s".into(),
                hashes: &h,
                expected_output_tokens: None,
                allowed: Some(&allowed),
                book: true,
                home: None,
            },
            Instant::now(),
            &mut SplitMix64::new(1),
        )
        .unwrap();
    assert_eq!(d.worker, A);
    let none: [WorkerRank; 0] = [];
    let e = r.route(
        RouteRequest {
            request: &"t".into(),
            hashes: &h,
            expected_output_tokens: None,
            allowed: Some(&none),
            book: true,
            home: None,
        },
        Instant::now(),
        &mut SplitMix64::new(1),
    );
    assert_eq!(e, Err(RouteError::NoWorkers));
    let dropped = r.remove_worker(WorkerId(1));
    assert_eq!(dropped, vec![RequestId::from("s")]);
    r.remove_worker(WorkerId(2));
    assert_eq!(r.index().num_nodes(), 0);
    assert_eq!(
        route(&mut r, "u", &h, Instant::now()),
        Err(RouteError::NoWorkers)
    );
}

#[test]
fn overloaded_router_refuses_with_explanation() {
    let mut r = router(|c| {
        c.admission = AdmissionConfig {
            active_prefill_tokens_threshold: Some(100),
            mode: AdmissionMode::TokenCapacity,
            ..Default::default()
        }
    });
    let t0 = Instant::now();
    route(&mut r, "a", &prompt(6, 8), t0).unwrap();
    route(&mut r, "b", &prompt(7, 8), t0).unwrap();
    match route(&mut r, "c", &prompt(8, 8), t0) {
        Err(RouteError::Overloaded(e)) => assert!(e.candidates.iter().all(|c| c.busy.is_some())),
        other => panic!("{other:?}"),
    }
    // prefill completion frees the prefill budget
    r.prefill_complete(&"a".into());
    assert!(route(&mut r, "c", &prompt(8, 8), t0).is_ok());
}

#[test]
fn dp_ranks_are_candidates() {
    let mut r = Router::new(RouterConfig::default(), BS).unwrap();
    r.upsert_worker(WorkerInfo {
        id: WorkerId(9),
        dp_size: 2,
        role: WorkerRole::Aggregated,
        capacity: WorkerCapacity::default(),
    });
    let h = prompt(9, 4);
    r.apply_event(&stored_event(WorkerRank::new(9, 1), &h));
    let d = route(&mut r, "a", &h, Instant::now()).unwrap();
    assert_eq!(d.worker, WorkerRank::new(9, 1));
    assert_eq!(d.ranked, vec![WorkerRank::new(9, 1), WorkerRank::new(9, 0)]);
    // prefill-only workers are not candidates for aggregated routing
    r.upsert_worker(WorkerInfo {
        id: WorkerId(10),
        dp_size: 1,
        role: WorkerRole::Prefill,
        capacity: WorkerCapacity::default(),
    });
    assert_eq!(
        r.targets(&[WorkerRole::Aggregated, WorkerRole::Decode])
            .len(),
        2
    );
    // shrinking dp_size drops the vanished rank's cache
    r.upsert_worker(WorkerInfo {
        id: WorkerId(9),
        dp_size: 1,
        role: WorkerRole::Aggregated,
        capacity: WorkerCapacity::default(),
    });
    assert_eq!(
        r.index()
            .num_blocks(WorkerRank::new(9, 1), StorageTier::Device),
        0
    );
}

// ---------- regressions found in review ----------

#[test]
fn rebook_moves_the_prediction_too() {
    let mut r = router(|c| c.use_kv_events = false);
    let h = prompt(20, 8);
    let t0 = Instant::now();
    let d = route(&mut r, "a", &h, t0).unwrap();
    let other = if d.worker == A { B } else { A };
    r.rebook(&"a".into(), other, t0);
    let m = r.predicted().unwrap().find_matches(h.seqs());
    assert_eq!(m.device(&other), 8);
}

#[test]
fn events_for_unknown_workers_or_ranks_are_dropped() {
    let mut r = router(|_| {});
    let h = prompt(21, 2);
    assert!(!r.apply_event(&stored_event(WorkerRank::new(77, 0), &h)));
    assert!(!r.apply_event(&stored_event(WorkerRank::new(1, 5), &h)));
    r.remove_worker(WorkerId(2));
    assert!(!r.apply_event(&stored_event(B, &h)));
    assert_eq!(r.events_unknown_worker(), 3);
    assert_eq!(r.index().num_nodes(), 0);
    assert!(r.apply_event(&stored_event(A, &h)));
}

#[test]
fn dp_size_is_clamped() {
    let mut r = Router::new(RouterConfig::default(), BS).unwrap();
    let info = |dp| WorkerInfo {
        id: WorkerId(9),
        dp_size: dp,
        role: WorkerRole::Aggregated,
        capacity: WorkerCapacity::default(),
    };
    r.upsert_worker(info(1));
    let h = prompt(22, 2);
    r.apply_event(&stored_event(WorkerRank::new(9, 0), &h));
    r.upsert_worker(info(0));
    assert_eq!(
        r.targets(&[WorkerRole::Aggregated]),
        vec![WorkerRank::new(9, 0)]
    );
    assert_eq!(
        r.index()
            .num_blocks(WorkerRank::new(9, 0), StorageTier::Device),
        2
    );
    r.upsert_worker(info(u32::MAX));
    assert_eq!(
        r.targets(&[WorkerRole::Aggregated]).len(),
        kvgate_core::router::MAX_DP_SIZE as usize
    );
}

#[test]
fn router_refuses_an_invalid_config() {
    let c = RouterConfig {
        prefill_load_scale: f64::NAN,
        ..Default::default()
    };
    let e = Router::new(c, BS).unwrap_err();
    assert_eq!(e.env, "DYN_ROUTER_PREFILL_LOAD_SCALE");
    assert!(Router::new(RouterConfig::default(), 0).is_err());
}

#[test]
fn nan_costs_and_tiny_temperatures_still_pick_the_cheapest() {
    let mut w = weights(|_| {});
    w.temperature = 5e-324;
    let cands = [cand(A, 0, 0, 0, 0), cand(B, 0, 0, 1, 0)];
    let (o, e) = run(&w, &cands, 0);
    assert_eq!(o, Outcome::Chosen { ranked: vec![A, B] });
    assert!(
        e.candidates
            .iter()
            .all(|c| c.probability.is_none_or(|p| p.is_finite()))
    );
    // NaN weights (an unvalidated config) must not panic
    let mut w = weights(|_| {});
    w.prefill_load_scale = f64::NAN;
    let (o, _) = run(&w, &cands, 16);
    assert!(matches!(o, Outcome::Chosen { .. }));
}

#[test]
fn a_parked_worker_is_not_routed_to_but_keeps_its_cache_until_it_expires() {
    let mut r = router(|_| {});
    let t0 = Instant::now();
    let h = prompt(31, 8);
    r.apply_event(&stored_event(B, &h));
    assert!(r.park_worker(WorkerId(2), t0));
    assert!(!r.park_worker(WorkerId(2), t0), "already parked");
    assert!(r.is_parked(WorkerId(2)));
    // Out of routing: its prefix goes to A.
    assert_eq!(r.targets(&[WorkerRole::Aggregated]), vec![A]);
    let d = route(&mut r, "while-parked", &h, t0).unwrap();
    assert_eq!(d.worker, A);
    r.free(&"while-parked".into());
    // Its events still apply (the engine runs on while its pod is unready).
    let more = prompt(32, 4);
    assert!(r.apply_event(&stored_event(B, &more)));
    // Back within the grace period: it routes on everything it holds at once.
    r.upsert_worker(WorkerInfo {
        id: WorkerId(2),
        dp_size: 1,
        role: WorkerRole::Aggregated,
        capacity: WorkerCapacity {
            total_kv_blocks: Some(1000),
            max_num_batched_tokens: Some(8192),
        },
    });
    assert!(!r.is_parked(WorkerId(2)));
    let h2 = prompt(31, 8);
    let d = route(&mut r, "back", &h2, t0).unwrap();
    assert_eq!((d.worker, d.overlap_blocks), (B, 8));
    r.free(&"back".into());
    assert_eq!(route(&mut r, "more", &more, t0).unwrap().worker, B);
    r.free(&"more".into());

    // Parked again and never back: forgotten after the grace period, not before.
    let t1 = t0 + Duration::from_secs(100);
    r.park_worker(WorkerId(2), t1);
    assert!(
        r.expire_parked(t1 + Duration::from_secs(29), Duration::from_secs(30))
            .is_empty()
    );
    assert_eq!(r.index().num_blocks(B, StorageTier::Device), 12);
    assert_eq!(
        r.expire_parked(t1 + Duration::from_secs(30), Duration::from_secs(30)),
        vec![WorkerId(2)]
    );
    assert_eq!(r.index().num_blocks(B, StorageTier::Device), 0);
    assert!(!r.is_parked(WorkerId(2)));
    assert!(!r.apply_event(&stored_event(B, &h)), "unknown once expired");
}

// ---------------- the kvgate policy ----------------

fn kvgate(f: impl FnOnce(&mut RouterConfig)) -> CostWeights {
    let mut c = RouterConfig::default();
    assert_eq!(
        c.policy,
        RouterPolicy::Kvgate,
        "kvgate is the default policy"
    );
    f(&mut c);
    CostWeights::from(&c)
}

/// A 1024-token request at 10,000 prefill tokens/s, admission off.
fn kv_schedule(
    w: &CostWeights,
    cands: &[CandidateInput],
    seed: u64,
) -> (Outcome, kvgate_core::scheduler::Explanation) {
    schedule(
        w,
        &AdmissionConfig::default(),
        req_at(1024, 10_000.0),
        cands,
        &mut SplitMix64::new(seed),
    )
}

/// 10,000 prefill tokens per second: 10 tokens per millisecond.
fn req_at(isl: usize, rate: f64) -> ScoreRequest {
    ScoreRequest {
        estimates: Estimates {
            prefill_tokens_per_sec: rate,
            residency_ms: 5_000.0,
            ..Estimates::default()
        },
        ..req(isl)
    }
}

#[test]
fn kvgate_cost_is_the_predicted_ttft_in_ms() {
    let w = kvgate(|_| {});
    let mut a = cand(A, 32, 1000, 10, 0);
    a.requests = 3;
    let (_, e) = kv_schedule(&w, &[a], 0);
    let c = &e.candidates[0];
    let p = c.predicted.unwrap();
    // 512 of 1024 tokens cached; (1000 + 512) / 10 ms queued; 0.25 * 51.2 ms * (1 + 3).
    assert_eq!((p.cached_tokens, p.uncached_tokens), (512, 512));
    assert!((p.prefill_ms - 151.2).abs() < 1e-9, "{p:?}");
    assert!(
        (p.batch_ms - BATCH_PENALTY * 51.2 * 4.0).abs() < 1e-9,
        "{p:?}"
    );
    assert_eq!(p.memory_wait_ms, 0.0);
    assert!((c.cost - 202.4).abs() < 1e-9, "{c:?}");
    assert_eq!(e.policy, RouterPolicy::Kvgate);
    assert_eq!(e.estimates.unwrap().prefill_tokens_per_sec, 10_000.0);
    let json = serde_json::to_value(&e).unwrap();
    assert_eq!(json["policy"], "kvgate");
    assert!(json["candidates"][0]["predicted"]["batch_ms"].is_number());
}

#[test]
fn kvgate_stays_on_the_cache_until_its_queue_outweighs_the_recompute() {
    let w = kvgate(|_| {});
    // A: caches the whole 4096-token prompt, queued work q; B: idle, cold.
    let pick = |q: u64| {
        let a = cand(A, 256, q, 0, 0);
        let b = cand(B, 0, 0, 0, 256);
        chosen(
            &schedule(
                &w,
                &AdmissionConfig::default(),
                req_at(4096, 10_000.0),
                &[a, b],
                &mut SplitMix64::new(1),
            )
            .0,
        )
    };
    // Cold costs (4096 + 0.25 * 4096) / 10 = 512 ms; warm costs q / 10 ms.
    assert_eq!(pick(0), A);
    assert_eq!(pick(5000), A);
    assert_eq!(pick(5200), B);
}

#[test]
fn kvgate_spreads_cold_work_by_batch_size() {
    let w = kvgate(|_| {});
    // Same queue, same (no) cache: the worker with fewer requests wins.
    let mut a = cand(A, 0, 0, 0, 64);
    a.requests = 8;
    let mut b = cand(B, 0, 0, 0, 64);
    b.requests = 2;
    let (o, _) = kv_schedule(&w, &[a, b], 0);
    assert_eq!(chosen(&o), B);
}

#[test]
fn kvgate_charges_the_wait_for_kv_memory() {
    let w = kvgate(|_| {});
    // A caches half the prompt but its KV cache is full; B is cold with room.
    let a = cand(A, 32, 0, 990, 32);
    let b = cand(B, 0, 0, 100, 64);
    let (o, e) = kv_schedule(&w, &[a, b], 0);
    assert_eq!(chosen(&o), B);
    let pa = e.candidates[0].predicted.unwrap();
    assert_eq!(pa.memory_excess_blocks, 22.0);
    assert!((pa.memory_wait_ms - 22.0 / 990.0 * 5_000.0).abs() < 1e-9);
    // With active blocks untracked (or capacity unknown) there is no memory term.
    let w = kvgate(|c| c.track_active_blocks = false);
    let (o, e) = kv_schedule(&w, &[a, b], 0);
    assert_eq!(chosen(&o), A);
    assert_eq!(e.candidates[0].predicted.unwrap().memory_wait_ms, 0.0);
}

#[test]
fn kvgate_knobs_keep_their_meaning() {
    let a = cand(A, 64, 4000, 0, 0);
    let b = cand(B, 0, 0, 0, 64);
    let run = |w: &CostWeights| {
        schedule(
            w,
            &AdmissionConfig::default(),
            req_at(1024, 10_000.0),
            &[a, b],
            &mut SplitMix64::new(0),
        )
    };
    // Default: A caches everything but has 400 ms queued; B computes 1024 tokens: 128 ms.
    assert_eq!(chosen(&run(&kvgate(|_| {})).0), B);
    // Not tracking prefill tokens: A's queue is invisible.
    assert_eq!(
        chosen(&run(&kvgate(|c| c.track_prefill_tokens = false)).0),
        A
    );
    // Credit 0: nothing counts as cached; both compute the prompt, B has no queue.
    let (_, e) = run(&kvgate(|c| c.overlap_score_credit = 0.0));
    assert_eq!(e.candidates[0].predicted.unwrap().cached_tokens, 0);
    // Credit decay shrinks the credit of the loaded worker.
    let (_, e) = run(&kvgate(|c| c.overlap_score_credit_decay = 1.0));
    let p = e.candidates[0].predicted.unwrap();
    assert!(p.cached_tokens < 1024, "{p:?}");
    // Prefill load scale 0: only the batch and memory terms remain; A (all cached) is free.
    let (o, e) = run(&kvgate(|c| c.prefill_load_scale = 0.0));
    assert_eq!(chosen(&o), A);
    assert_eq!(e.candidates[0].cost, 0.0);
    // Temperature samples over the same costs.
    let (_, e) = run(&kvgate(|c| c.temperature = 1.0));
    assert!(e.candidates.iter().all(|c| c.probability.is_some()));
}

#[test]
fn kvgate_ties_go_to_the_bigger_cache() {
    let w = kvgate(|c| c.prefill_load_scale = 0.0);
    // Both cost 0 (no batch, no memory term); A caches more.
    for seed in 0..20 {
        let a = cand(A, 64, 0, 0, 0);
        let b = cand(B, 10, 0, 0, 0);
        let (o, _) = kv_schedule(&w, &[b, a], seed);
        assert_eq!(chosen(&o), A);
    }
}

#[test]
fn the_router_learns_the_prefill_rate_and_residency_from_its_bookings() {
    let mut r = router(|c| c.policy = RouterPolicy::Kvgate);
    let before = r.estimates();
    assert!(before.learned_rate);
    let t0 = Instant::now();
    let p = prompt(7, 256);
    let id = RequestId::from("a");
    route(&mut r, "a", &p, t0).unwrap();
    // 4096 tokens in 50 ms: 81,920 tokens/s, above the initial guess, so the rate rises.
    r.prefill_complete_at(&id, t0 + Duration::from_millis(50));
    let after = r.estimates();
    assert_eq!(after.rate_samples, 1);
    assert!(after.prefill_tokens_per_sec > before.prefill_tokens_per_sec);
    r.free_at(&id, t0 + Duration::from_secs(30));
    let e = r.estimates();
    assert_eq!(e.residency_samples, 1);
    assert!(e.residency_ms > before.residency_ms);
    // A fixed rate is not learned.
    let mut r = router(|c| {
        c.policy = RouterPolicy::Kvgate;
        c.prefill_tokens_per_sec = Some(12_345.0);
    });
    route(&mut r, "a", &p, t0).unwrap();
    r.prefill_complete_at(&id, t0 + Duration::from_millis(50));
    assert_eq!(r.estimates().prefill_tokens_per_sec, 12_345.0);
}

/// A big fleet's decision ranks the best fallbacks only and explains the cheapest candidates
/// (the chosen one always among them), in worker order, with the count of all.
#[test]
fn big_fleets_rank_and_explain_a_bounded_few() {
    use kvgate_core::scheduler::{MAX_EXPLAINED, MAX_FALLBACKS};
    // 500 candidates, costs spread by queued prefill; worker 250 caches the prompt, idle.
    let cands: Vec<CandidateInput> = (0..500u64)
        .map(|i| {
            let (overlap, queued) = if i == 250 {
                (60, 0)
            } else {
                (0, (i * 37 % 500) * 16)
            };
            cand(WorkerRank::new(i, 0), overlap, queued, 0, 64)
        })
        .collect();
    for (temperature, policy) in [
        (0.0, RouterPolicy::Dynamo),
        (5.0, RouterPolicy::Dynamo),
        (0.0, RouterPolicy::Kvgate),
    ] {
        let w = weights(|c| {
            c.temperature = temperature;
            c.policy = policy;
        });
        let (outcome, e) = run(&w, &cands, 1024);
        let Outcome::Chosen { ranked } = outcome else {
            panic!("{outcome:?}")
        };
        assert_eq!(ranked.len(), MAX_FALLBACKS + 1);
        assert_eq!(e.candidates_total, 500);
        assert_eq!(e.candidates.len(), MAX_EXPLAINED);
        assert!(e.candidates.iter().any(|c| Some(c.worker) == e.chosen));
        assert!(e.candidates.windows(2).all(|p| p[0].worker < p[1].worker));
        // The fallbacks are the cheapest others, in order, as a full sort would give.
        let mut all: Vec<_> = (0..500u64)
            .map(|i| WorkerRank::new(i, 0))
            .filter(|&r| r != ranked[0])
            .map(|r| {
                let cost = w_cost(&w, &cands, r);
                (cost, r)
            })
            .collect();
        all.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        let want: Vec<WorkerRank> = all.iter().take(MAX_FALLBACKS).map(|x| x.1).collect();
        assert_eq!(&ranked[1..], &want[..]);
        if temperature == 0.0 {
            assert_eq!(ranked[0], WorkerRank::new(250, 0));
            // Explained: the choice and the cheapest others, in worker order.
            let mut want: Vec<WorkerRank> = ranked[..MAX_EXPLAINED].to_vec();
            want.sort();
            let got: Vec<WorkerRank> = e.candidates.iter().map(|c| c.worker).collect();
            assert_eq!(got, want);
        }
    }
}

proptest! {
    /// A big fleet (scored without full explanation lines, reusing a neighbour's cost when its
    /// inputs are the same) gives every candidate the cost it has when scored alone: the
    /// choice is a cheapest one and the fallbacks are the next cheapest, in order. The fleet is
    /// one state and its variants in a single input each, so that neighbours are often equal
    /// or differ in one input only; one idle candidate makes the shortest queue 0, as in the
    /// lone scoring.
    #[test]
    fn big_fleets_cost_each_candidate_as_if_alone(
        w in arb_weights(),
        base in arb_cand(0),
        picks in prop::collection::vec(0usize..10, 40..120),
    ) {
        use kvgate_core::scheduler::MAX_FALLBACKS;
        let variant = |k: usize| {
            let mut c = base;
            match k {
                1 => c.overlap.0[0] += 1,
                2 => c.active_prefill_tokens += 16,
                3 => c.active_blocks += 1,
                4 => c.new_blocks += 1,
                5 => c.requests += 1,
                6 => c.output_blocks += 0.5,
                7 => c.capacity.total_kv_blocks = Some(999),
                8 => c.home_discount = 0.25,
                9 => c.overlap.0[0] = c.overlap.0[0].saturating_sub(1),
                _ => {}
            }
            c
        };
        let mut cands = vec![cand(WorkerRank::new(0, 0), 0, 0, 0, 64)];
        for (k, &p) in picks.iter().enumerate() {
            let mut c = variant(p);
            c.worker = WorkerRank::new(k as u64 + 1, 0);
            cands.push(c);
        }
        let (o, _) = run(&w, &cands, 1024);
        let Outcome::Chosen { ranked } = o else { panic!("{o:?}") };
        let mut all: Vec<(f64, WorkerRank)> =
            cands.iter().map(|c| (w_cost(&w, &cands, c.worker), c.worker)).collect();
        all.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        let cost_of = |r: WorkerRank| all.iter().find(|x| x.1 == r).unwrap().0;
        prop_assert_eq!(cost_of(ranked[0]).to_bits(), all[0].0.to_bits());
        let want: Vec<WorkerRank> = all
            .iter()
            .filter(|x| x.1 != ranked[0])
            .take(MAX_FALLBACKS)
            .map(|x| x.1)
            .collect();
        prop_assert_eq!(&ranked[1..], &want[..]);
    }
}

/// Many equal candidates: the choice is a random one of them, and the explanation lists the
/// lowest-numbered 31 others besides it (the 32 cheapest by cost then worker, the choice in
/// place of the last when it is not among them), with or without admission control.
#[test]
fn big_fleets_explain_the_choice_among_ties() {
    use kvgate_core::scheduler::MAX_EXPLAINED;
    let cands: Vec<CandidateInput> = (0..300u64)
        .map(|i| {
            cand(
                WorkerRank::new(i, 0),
                0,
                if i < 5 { 4096 } else { 0 },
                0,
                64,
            )
        })
        .collect();
    let w = weights(|_| ());
    let mut chosen_beyond = 0;
    for seed in 0..20 {
        for admission in [false, true] {
            let a = if admission {
                // Worker 0-4 hold 4096 queued tokens: busy above 1000.
                AdmissionConfig {
                    mode: AdmissionMode::TokenCapacity,
                    active_prefill_tokens_threshold: Some(1000),
                    ..AdmissionConfig::default()
                }
            } else {
                AdmissionConfig::default()
            };
            let (outcome, e) = schedule(
                &w,
                &a,
                ScoreRequest {
                    isl_tokens: 1024,
                    block_size: 16,
                    estimates: Default::default(),
                },
                &cands,
                &mut SplitMix64::new(seed),
            );
            let Outcome::Chosen { ranked } = outcome else {
                panic!("{outcome:?}")
            };
            let chosen = ranked[0];
            assert!(
                chosen.worker.0 >= 5,
                "{chosen:?}: the queued ones cost more"
            );
            // Cheapest 32 by (busy, cost, worker): workers 5..37 (all idle, equal cost).
            let mut want: Vec<WorkerRank> = (5..5 + MAX_EXPLAINED as u64)
                .map(|i| WorkerRank::new(i, 0))
                .collect();
            if !want.contains(&chosen) {
                chosen_beyond += 1;
                want[MAX_EXPLAINED - 1] = chosen;
            }
            want.sort();
            let got: Vec<WorkerRank> = e.candidates.iter().map(|c| c.worker).collect();
            assert_eq!(got, want, "seed {seed} admission {admission}");
        }
    }
    assert!(
        chosen_beyond > 0,
        "some random choices fall beyond the first 32"
    );
}

/// One candidate's cost, scored alone (costs do not depend on the other candidates here: no
/// candidate is busy and the minimum queued prefill is 0 in both).
fn w_cost(w: &CostWeights, cands: &[CandidateInput], r: WorkerRank) -> f64 {
    let zero = cand(WorkerRank::new(9999, 0), 0, 0, 0, 64);
    let c = *cands.iter().find(|c| c.worker == r).unwrap();
    let (_, e) = run(
        &CostWeights {
            temperature: 0.0,
            ..*w
        },
        &[c, zero],
        1024,
    );
    e.candidates.iter().find(|x| x.worker == r).unwrap().cost
}

/// The router keeps a copy of each target's load figures for speed: after any sequence of
/// bookings, first tokens, output, moves, frees, sweeps and fleet changes, every candidate a
/// decision scores carries exactly the load tracker's figures.
#[derive(Clone, Debug)]
enum LoadOp {
    Route(u8, u8),
    Book(u8, u8),
    FirstToken(u8),
    Output(u8, u16),
    Rebook(u8, u8),
    Free(u8),
    Sweep,
    AddWorker(u8),
    RemoveWorker(u8),
    Park(u8),
    Stored(u8, u8, u8),
}

fn load_op() -> impl Strategy<Value = LoadOp> {
    prop_oneof![
        3 => (any::<u8>(), 0u8..6).prop_map(|(r, p)| LoadOp::Route(r % 24, p)),
        2 => (any::<u8>(), 1u8..6).prop_map(|(r, w)| LoadOp::Book(r % 24, w)),
        2 => any::<u8>().prop_map(|r| LoadOp::FirstToken(r % 24)),
        2 => (any::<u8>(), any::<u16>()).prop_map(|(r, n)| LoadOp::Output(r % 24, n % 600)),
        1 => (any::<u8>(), 1u8..6).prop_map(|(r, w)| LoadOp::Rebook(r % 24, w)),
        2 => any::<u8>().prop_map(|r| LoadOp::Free(r % 24)),
        1 => Just(LoadOp::Sweep),
        1 => (1u8..6).prop_map(LoadOp::AddWorker),
        1 => (1u8..6).prop_map(LoadOp::RemoveWorker),
        1 => (1u8..6).prop_map(LoadOp::Park),
        2 => (1u8..6, 0u8..2, 0u8..6).prop_map(|(w, d, p)| LoadOp::Stored(w, d, p)),
    ]
}

proptest! {
    #[test]
    fn candidates_carry_the_load_trackers_figures(
        ops in proptest::collection::vec(load_op(), 1..120),
        policy in prop_oneof![Just(RouterPolicy::Dynamo), Just(RouterPolicy::Kvgate)],
    ) {
        let mut r = router(|c| {
            c.policy = policy;
            c.track_output_blocks = true;
        });
        let t0 = Instant::now();
        let info = |w: u8| WorkerInfo {
            id: WorkerId(u64::from(w)),
            dp_size: 2,
            role: WorkerRole::Aggregated,
            capacity: WorkerCapacity::default(),
        };
        let id = |n: u8| RequestId::from(format!("r{n}"));
        let mut rng = SplitMix64::new(7);
        for (k, op) in ops.iter().enumerate() {
            let now = t0 + Duration::from_millis(k as u64 * 10);
            match *op {
                LoadOp::Route(n, p) => {
                    let _ = route(&mut r, &format!("r{n}"), &prompt(u32::from(p), 4), now);
                }
                LoadOp::Book(n, w) => {
                    let h = prompt(u32::from(w), 3);
                    let _ = r.book_decided(
                        kvgate_core::load::NewBooking {
                            request: id(n),
                            worker: WorkerRank::new(u64::from(w), 1),
                            seqs: h.seqs(),
                            locals: &[],
                            prefill_tokens: 48,
                            expected_output_tokens: Some(64),
                        },
                        false,
                        0,
                        now,
                    );
                }
                LoadOp::FirstToken(n) => {
                    r.prefill_complete_at(&id(n), now);
                }
                LoadOp::Output(n, t) => {
                    r.record_output(&id(n), u32::from(t));
                }
                LoadOp::Rebook(n, w) => {
                    r.rebook(&id(n), WorkerRank::new(u64::from(w), 0), now);
                }
                LoadOp::Free(n) => {
                    r.free_at(&id(n), now);
                }
                LoadOp::Sweep => {
                    r.sweep(now, Duration::from_millis(300));
                }
                LoadOp::AddWorker(w) => r.upsert_worker(info(w)),
                LoadOp::RemoveWorker(w) => {
                    r.remove_worker(WorkerId(u64::from(w)));
                }
                LoadOp::Park(w) => {
                    r.park_worker(WorkerId(u64::from(w)), now);
                }
                LoadOp::Stored(w, d, p) => {
                    r.apply_event(&stored_event(
                        WorkerRank::new(u64::from(w), u32::from(d)),
                        &prompt(u32::from(p), 2),
                    ));
                }
            }
            // A dry run scores every target (or a subset): each line must show the tracker's
            // figures, the index's overlap and the active blocks' new-block count.
            let probe = RequestId::from("probe");
            let h = prompt((k % 7) as u32, 4);
            let subset: Vec<WorkerRank> = (1..6u64)
                .flat_map(|w| [WorkerRank::new(w, 0), WorkerRank::new(w, 1)])
                .filter(|x| !(x.worker.0 + u64::from(x.dp_rank.0) + k as u64).is_multiple_of(3))
                .collect();
            let overlap = r.overlaps(&h, now);
            let Ok(d) = r.route(
                RouteRequest {
                    request: &probe,
                    hashes: &h,
                    expected_output_tokens: None,
                    allowed: (k % 2 == 1).then_some(&subset[..]),
                    book: false,
                    home: None,
                },
                now,
                &mut rng,
            ) else {
                continue;
            };
            prop_assert_eq!(d.explanation.candidates.len(), d.explanation.candidates_total);
            for c in &d.explanation.candidates {
                let f = r.load().figures(&c.worker);
                prop_assert_eq!(c.active_prefill_tokens, f.prefill_tokens, "{:?}", c.worker);
                prop_assert_eq!(c.active_blocks, f.active_blocks, "{:?}", c.worker);
                prop_assert_eq!(c.output_blocks, f.output_blocks, "{:?}", c.worker);
                prop_assert_eq!(c.overlap_blocks, overlap.device(&c.worker), "{:?}", c.worker);
                prop_assert_eq!(c.new_blocks, r.load().new_blocks(&c.worker, h.seqs()), "{:?}", c.worker);
                if let Some(p) = &c.predicted {
                    prop_assert_eq!(p.requests, f.requests, "{:?}", c.worker);
                }
            }
        }
    }
}
