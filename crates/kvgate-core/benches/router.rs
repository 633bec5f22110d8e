//! Criterion benches of the routing core. Figures only: no thresholds are asserted anywhere.
//!
//! `cargo bench -p kvgate-core --bench router`

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use kvgate_core::hashing::{BlockHashes, HashSeed};
use std::hint::black_box;

fn hashing(c: &mut Criterion) {
    let mut g = c.benchmark_group("hash");
    let tokens: Vec<u32> = (0..8192u32)
        .map(|i| i.wrapping_mul(2_654_435_761) % 151_936)
        .collect();
    for bs in [16usize, 64] {
        g.throughput(Throughput::Elements(tokens.len() as u64));
        g.bench_with_input(BenchmarkId::new("8k_tokens_block", bs), &bs, |b, &bs| {
            b.iter(|| BlockHashes::from_tokens(black_box(&tokens), bs, HashSeed::default()))
        });
    }
    g.finish();
}

fn events(c: &mut Criterion) {
    let mut g = c.benchmark_group("index_apply");
    // 64 workers x 32 conversations x 64 blocks = 131k (block, worker) pairs per iteration.
    let evs = cluster_events(64, 32, 64, 8, 1);
    let blocks: u64 = 64 * 32 * 64;
    g.throughput(Throughput::Elements(evs.len() as u64));
    g.sample_size(20);
    g.bench_function("stored_events_64_blocks_each", |b| {
        b.iter(|| build_index(black_box(&evs)))
    });
    g.throughput(Throughput::Elements(blocks));
    g.bench_function("stored_then_removed_blocks", |b| {
        b.iter_batched(
            || build_index(&evs),
            |mut idx| {
                for e in &evs {
                    if let kvgate_core::KvEventData::Stored { blocks, .. } = &e.data {
                        idx.apply(&kvgate_core::KvEvent {
                            source: e.source,
                            event_id: e.event_id + 1,
                            tier: e.tier,
                            data: kvgate_core::KvEventData::Removed {
                                blocks: blocks.iter().map(|b| b.hash).collect(),
                            },
                        });
                    }
                }
                idx
            },
            criterion::BatchSize::LargeInput,
        )
    });
    g.finish();
}

fn matches(c: &mut Criterion) {
    let mut g = c.benchmark_group("find_matches_512_block_request");
    for workers in [1u64, 100, 1000] {
        // Each worker caches 16 conversations of 256 blocks (4,096 blocks per worker).
        let evs = cluster_events(workers, 16, 256, 8, 2);
        let idx = build_index(&evs);
        // A request continuing worker 0's first conversation (hit on 256 blocks, then 256 new).
        let (_, mut seqs) = conv_seqs(0, 256, 8);
        let (_, tail) = conv_seqs(u64::MAX / 2, 512, 0);
        seqs.extend_from_slice(&tail[256..]);
        g.bench_with_input(BenchmarkId::new("workers", workers), &workers, |b, _| {
            b.iter(|| idx.find_matches(black_box(&seqs)))
        });
    }
    g.finish();
}

fn decision(c: &mut Criterion) {
    use kvgate_core::config::RouterConfig;
    use kvgate_core::random::SplitMix64;
    use kvgate_core::router::{RouteRequest, Router, WorkerInfo, WorkerRole};
    use kvgate_core::scheduler::WorkerCapacity;
    use kvgate_core::{RequestId, WorkerId};
    use std::time::Instant;

    let mut g = c.benchmark_group("route_decision_8k_prompt");
    for workers in [16u64, 100, 1000, 10_000] {
        let mut router = Router::new(RouterConfig::default(), 16).expect("valid config");
        for w in 0..workers {
            router.upsert_worker(WorkerInfo {
                id: WorkerId(w),
                dp_size: 1,
                role: WorkerRole::Aggregated,
                capacity: WorkerCapacity {
                    total_kv_blocks: Some(16_384),
                    max_num_batched_tokens: Some(8192),
                },
            });
        }
        for e in cluster_events(workers, 16, 256, 8, 3) {
            router.apply_event(&e);
        }
        // 8,192-token prompt = 512 blocks; book some load so every term is exercised.
        let tokens: Vec<u32> = (0..8192u32)
            .map(|i| i.wrapping_mul(2_654_435_761) % 151_936)
            .collect();
        let hashes = BlockHashes::from_tokens(&tokens, 16, HashSeed::default());
        let mut rng = SplitMix64::new(1);
        let now = Instant::now();
        for i in 0..workers * 2 {
            let id = RequestId::from(format!("warm-{i}"));
            let _ = router.route(
                RouteRequest {
                    request: &id,
                    hashes: &hashes,
                    expected_output_tokens: None,
                    allowed: None,
                    book: true,
                    home: None,
                },
                now,
                &mut rng,
            );
        }
        let id = RequestId::from("probe");
        g.bench_with_input(BenchmarkId::new("workers", workers), &workers, |b, _| {
            b.iter(|| {
                router
                    .route(
                        RouteRequest {
                            request: &id,
                            hashes: black_box(&hashes),
                            expected_output_tokens: None,
                            allowed: None,
                            book: false,
                            home: None,
                        },
                        now,
                        &mut rng,
                    )
                    .map(|d| d.worker)
            })
        });
    }
    g.finish();
}

criterion_group!(benches, hashing, events, matches, decision);
criterion_main!(benches);
