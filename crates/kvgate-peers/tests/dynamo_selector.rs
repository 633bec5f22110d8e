//! kvgate's `dynamo` policy against Dynamo's own selector (`dynamo-kv-router` 1.6.1,
//! `SelectionCore`), on replays of the bundled trace through simulated engines that emit real KV
//! events (evictions included).
//!
//! - Lock step: both routers see every event and every request; at each arrival the real
//!   selector chooses, and its choice must be one of the workers kvgate's cost function ranks
//!   cheapest. Both then book that choice, so their states stay equal and every later decision
//!   is compared too.
//! - The real selector as a replay policy: it routes the whole replay, with no refused call and
//!   no booking left behind, and caches far better than round robin.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use kvgate_core::random::SplitMix64;
use kvgate_core::router::RouteRequest;
use kvgate_core::{RequestId, WorkerRank};
use kvgate_engine::{CacheEvent, EngineConfig, TimingModel};
use kvgate_sim::policy::{Arrival, KvRouter, Policy, RoundRobin, WorkerView};
use kvgate_sim::sim::{SimConfig, fleet_view, simulate};
use kvgate_sim::trace::{self, TraceRow};
use kvgate_sim::tracegen::{GenConfig, Shape, generate};
use std::time::Instant;
use support::dynamo_selector::DynamoSelector;

const TRACE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../bench/traces/mooncake_conversation_trace.jsonl"
);

/// The generated agent trace's rate scale for these 8 engines.
const AGENT_SCALE: f64 = 1.0;

/// A small fleet that queues and evicts: 8 engines of 8,192 blocks.
fn cfg(rate_scale: f64) -> SimConfig {
    SimConfig {
        workers: 8,
        engine: EngineConfig {
            block_size: 16,
            num_gpu_blocks: 8192,
            max_num_seqs: 64,
            max_num_batched_tokens: 8192,
            enable_prefix_caching: true,
            timing: TimingModel::default(),
        },
        tokens_per_trace_block: 512,
        rate_scale,
        max_output_tokens: Some(256),
    }
}

fn rows(n: usize) -> Vec<TraceRow> {
    let text = std::fs::read_to_string(TRACE).expect("bundled trace");
    let mut rows = trace::parse(&text).expect("trace parses");
    rows.truncate(n);
    rows
}

fn rank(w: usize) -> WorkerRank {
    WorkerRank::new(w as u64 + 1, 0)
}

/// Both routers on one stream; the real selector decides, kvgate checks the decision.
struct Lockstep {
    ours: KvRouter,
    theirs: DynamoSelector,
    rng: SplitMix64,
    decisions: usize,
    /// Decisions where kvgate's cheapest worker was unique (no tie for the selector to break).
    unique: usize,
    /// Decisions whose chosen worker had cached blocks of the prompt.
    with_overlap: usize,
    /// Decisions where some worker had active prefill (the load terms were live).
    with_load: usize,
    mismatches: Vec<String>,
}

impl Policy for Lockstep {
    fn name(&self) -> &str {
        "lockstep"
    }

    fn route(&mut self, req: &Arrival<'_>, _: &[WorkerView], now: Instant) -> usize {
        let id = RequestId::from(req.id.to_string());
        let probe = self.ours.router_mut().route(
            RouteRequest {
                request: &id,
                hashes: req.hashes,
                expected_output_tokens: Some(req.max_output_tokens),
                allowed: None,
                book: false,
                home: None,
            },
            now,
            &mut self.rng,
        );
        let theirs = match self.theirs.select(req) {
            Ok(w) => w,
            Err(e) => {
                self.mismatches.push(e);
                return 0;
            }
        };
        self.decisions += 1;
        let Ok(decision) = probe else {
            self.mismatches
                .push(format!("request {}: kvgate refused: {probe:?}", req.id));
            return theirs;
        };
        let cands = &decision.explanation.candidates;
        assert_eq!(cands.len(), decision.explanation.candidates_total);
        let min = cands.iter().map(|c| c.cost).fold(f64::INFINITY, f64::min);
        let cheapest = cands.iter().filter(|c| c.cost == min).count();
        if cheapest == 1 {
            self.unique += 1;
        }
        if cands.iter().any(|c| c.active_prefill_tokens > 0) {
            self.with_load += 1;
        }
        match cands.iter().find(|c| c.worker == rank(theirs)) {
            Some(c) if c.cost == min => {
                if c.overlap_blocks > 0 {
                    self.with_overlap += 1;
                }
            }
            Some(c) => self.mismatches.push(format!(
                "request {}: Dynamo chose worker {} at kvgate cost {} (overlap {}, prefill {}, \
                 decode {}); kvgate's cheapest is {} at {}",
                req.id,
                theirs,
                c.cost,
                c.overlap_blocks,
                c.prefill_blocks,
                c.decode_blocks,
                decision.worker.worker.0 - 1,
                min
            )),
            None => self
                .mismatches
                .push(format!("request {}: worker {theirs} not scored", req.id)),
        }
        // Book the selector's choice on kvgate's side too.
        let booked = self.ours.router_mut().route(
            RouteRequest {
                request: &id,
                hashes: req.hashes,
                expected_output_tokens: Some(req.max_output_tokens),
                allowed: Some(&[rank(theirs)]),
                book: true,
                home: None,
            },
            now,
            &mut self.rng,
        );
        assert!(
            booked.is_ok(),
            "kvgate could not book {}: {booked:?}",
            req.id
        );
        theirs
    }

    fn first_token(&mut self, id: u64, now: Instant) {
        self.ours.first_token(id, now);
        self.theirs.first_token(id, now);
    }

    fn finished(&mut self, id: u64, now: Instant) {
        self.ours.finished(id, now);
        self.theirs.finished(id, now);
    }

    fn cache_events(&mut self, worker: usize, events: &[CacheEvent]) {
        self.ours.cache_events(worker, events);
        self.theirs.cache_events(worker, events);
    }

    fn open_bookings(&mut self) -> Option<usize> {
        self.ours.open_bookings()
    }
}

/// Runs `rows` with both routers in lock step; panics on any refused call or differing decision.
fn lockstep(rows: &[TraceRow], c: &SimConfig) -> Lockstep {
    let fleet = fleet_view(c);
    let mut lock = Lockstep {
        ours: KvRouter::dynamo(&fleet, c.engine.block_size, 7).unwrap(),
        theirs: DynamoSelector::new(&fleet, c.engine.block_size).unwrap(),
        rng: SplitMix64::new(7),
        decisions: 0,
        unique: 0,
        with_overlap: 0,
        with_load: 0,
        mismatches: Vec::new(),
    };
    let r = simulate(rows, c, &mut lock, |_, _| {}).unwrap();
    assert_eq!(r.completed, rows.len());
    assert!(
        lock.theirs.errors.is_empty(),
        "the selector refused calls: {:?}",
        &lock.theirs.errors[..lock.theirs.errors.len().min(5)]
    );
    assert!(
        lock.mismatches.is_empty(),
        "{} of {} decisions differ; first: {:?}",
        lock.mismatches.len(),
        lock.decisions,
        &lock.mismatches[..lock.mismatches.len().min(5)]
    );
    assert_eq!(lock.decisions, rows.len());
    assert_eq!(lock.theirs.open_bookings(), Some(0));
    assert_eq!(lock.ours.open_bookings(), Some(0));
    eprintln!(
        "decisions {}, unique cheapest {}, on a cached prefix {}, under load {}, hit rate {:.3}",
        lock.decisions, lock.unique, lock.with_overlap, lock.with_load, r.hit_rate
    );
    lock
}

fn agent_rows(n: usize) -> Vec<TraceRow> {
    let mut g = GenConfig::new(Shape::Agent, 3);
    g.requests = n;
    generate(&g)
}

/// The bundled trace 4x faster than recorded: every engine queues, prompts are evicted, and
/// the load terms decide.
#[test]
fn kvgate_dynamo_policy_matches_dynamos_selector_under_overload() {
    let lock = lockstep(&rows(1500), &cfg(4.0));
    // Not a vacuous pass: nearly every decision had one cheapest worker and queued prefill.
    assert!(
        lock.unique * 10 > lock.decisions * 9,
        "{} unique",
        lock.unique
    );
    assert!(
        lock.with_load * 10 > lock.decisions * 9,
        "{} loaded",
        lock.with_load
    );
}

/// Agent loops sharing long system prompts at a moderate rate: the cached prefix decides.
#[test]
fn kvgate_dynamo_policy_matches_dynamos_selector_on_shared_prefixes() {
    let lock = lockstep(&agent_rows(1500), &cfg(AGENT_SCALE));
    assert!(
        lock.with_overlap * 10 > lock.decisions * 8,
        "{} overlap",
        lock.with_overlap
    );
    assert!(lock.unique * 4 > lock.decisions, "{} unique", lock.unique);
    assert!(
        lock.with_load * 4 > lock.decisions,
        "{} loaded",
        lock.with_load
    );
}

#[test]
fn dynamos_selector_routes_a_whole_replay() {
    let c = cfg(AGENT_SCALE);
    let rows = agent_rows(1500);
    let fleet = fleet_view(&c);
    let mut sel = DynamoSelector::new(&fleet, c.engine.block_size).unwrap();
    let r = simulate(&rows, &c, &mut sel, |_, _| {}).unwrap();
    assert!(
        sel.errors.is_empty(),
        "{:?}",
        &sel.errors[..sel.errors.len().min(5)]
    );
    assert_eq!(r.completed, rows.len());
    assert_eq!(r.open_bookings_at_end, Some(0));
    let rr = simulate(&rows, &c, &mut RoundRobin::default(), |_, _| {}).unwrap();
    eprintln!(
        "hit rate: dynamo-selector {:.3}, round-robin {:.3}",
        r.hit_rate, rr.hit_rate
    );
    assert!(
        r.hit_rate > 1.3 * rr.hit_rate,
        "{} vs {}",
        r.hit_rate,
        rr.hit_rate
    );
}
