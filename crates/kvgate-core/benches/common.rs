//! Synthetic cluster workloads shared by the benches.

#![allow(clippy::unwrap_used, clippy::expect_used)]
#![allow(dead_code)]

use kvgate_core::hashing::{next_seq_hash, seq_hash_after};
use kvgate_core::index::PrefixIndex;
use kvgate_core::random::{RandomSource, SplitMix64};
use kvgate_core::{
    ExternalHash, KvEvent, KvEventData, LocalHash, SeqHash, StorageTier, StoredBlock, WorkerRank,
};

/// Local hash of the `j`-th block of conversation `conv` (conversations share a system prompt
/// of `shared` blocks drawn from a few templates).
pub fn block_local(conv: u64, j: usize, shared: usize) -> LocalHash {
    let owner = if j < shared {
        conv % 16
    } else {
        conv + 1_000_000
    };
    LocalHash(
        (owner ^ ((j as u64) << 40))
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .rotate_left(23),
    )
}

pub fn conv_seqs(conv: u64, blocks: usize, shared: usize) -> (Vec<LocalHash>, Vec<SeqHash>) {
    let locals: Vec<LocalHash> = (0..blocks).map(|j| block_local(conv, j, shared)).collect();
    let mut seqs = Vec::with_capacity(blocks);
    let mut parent = None;
    for &l in &locals {
        let s = seq_hash_after(parent, l);
        seqs.push(s);
        parent = Some(s);
    }
    (locals, seqs)
}

/// Engine-side name of a block: some function of the prefix that is not our hash.
pub fn ext_of(seq: SeqHash) -> ExternalHash {
    ExternalHash(next_seq_hash(seq, LocalHash(7)).0)
}

/// Stored events of worker `w` of a `workers`-worker cluster: `convs_per_worker` conversations
/// of `blocks_per_conv` blocks (the first `shared` from 16 shared templates). One in ten
/// conversations is another worker's (the same prefix cached twice).
pub fn worker_events(
    w: u64,
    workers: u64,
    convs_per_worker: u64,
    blocks_per_conv: usize,
    shared: usize,
    rng: &mut SplitMix64,
) -> Vec<KvEvent> {
    let mut events = Vec::new();
    for c in 0..convs_per_worker {
        let conv = if rng.below(10) == 0 {
            rng.below((workers * convs_per_worker) as usize) as u64
        } else {
            w * convs_per_worker + c
        };
        let (locals, seqs) = conv_seqs(conv, blocks_per_conv, shared);
        events.push(KvEvent {
            source: WorkerRank::new(w, 0),
            event_id: c,
            tier: StorageTier::Device,
            data: KvEventData::Stored {
                parent: None,
                blocks: locals
                    .iter()
                    .zip(&seqs)
                    .map(|(&local, &s)| StoredBlock {
                        hash: ext_of(s),
                        local,
                    })
                    .collect(),
            },
        });
    }
    events
}

pub fn cluster_events(
    workers: u64,
    convs_per_worker: u64,
    blocks_per_conv: usize,
    shared: usize,
    rng_seed: u64,
) -> Vec<KvEvent> {
    let mut rng = SplitMix64::new(rng_seed);
    (0..workers)
        .flat_map(|w| {
            worker_events(
                w,
                workers,
                convs_per_worker,
                blocks_per_conv,
                shared,
                &mut rng,
            )
        })
        .collect()
}

pub fn build_index(events: &[KvEvent]) -> PrefixIndex {
    let mut idx = PrefixIndex::new();
    for e in events {
        idx.apply(e);
    }
    idx
}
