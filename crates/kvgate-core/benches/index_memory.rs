//! Memory and build time of the prefix index at cluster scale (default 1,000 workers x 16,384
//! blocks each), printed as figures. `cargo bench -p kvgate-core --bench index_memory [-- WORKERS BLOCKS]`

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use std::time::Instant;

fn main() {
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let workers = args.first().copied().unwrap_or(1000);
    let blocks_per_worker = args.get(1).copied().unwrap_or(16_384);
    let blocks_per_conv = 256usize;
    let convs = blocks_per_worker / blocks_per_conv as u64;
    for (label, shared) in [
        ("system-prompt-shared (8 blocks)", 8usize),
        ("no sharing", 0),
    ] {
        let mut idx = kvgate_core::index::PrefixIndex::new();
        let t = Instant::now();
        let mut pairs = 0u64;
        // Stream worker by worker so the event list never holds the whole cluster.
        let mut rng = kvgate_core::random::SplitMix64::new(42);
        for w in 0..workers {
            for e in worker_events(w, workers, convs, blocks_per_conv, shared, &mut rng) {
                if let kvgate_core::KvEventData::Stored { blocks, .. } = &e.data {
                    pairs += blocks.len() as u64;
                }
                idx.apply(&e);
            }
        }
        let secs = t.elapsed().as_secs_f64();
        let bytes = idx.approx_heap_bytes();
        println!(
            "index_memory {label}: workers={workers} blocks/worker={blocks_per_worker} pairs={pairs} nodes={} heap={:.1} MiB bytes/pair={:.1} build={:.2}s ({:.2} M blocks/s)",
            idx.num_nodes(),
            bytes as f64 / (1 << 20) as f64,
            bytes as f64 / pairs as f64,
            secs,
            pairs as f64 / secs / 1e6,
        );
    }
}
