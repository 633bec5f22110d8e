//! Prefix index: unit cases and a model-based property test against a naive reference.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use kvgate_core::hashing::{BlockHashes, HashSeed, local_hashes, seq_hashes};
use kvgate_core::index::{PrefixIndex, TierOverlap};
use kvgate_core::{
    ExternalHash, KvEvent, KvEventData, LocalHash, SeqHash, StorageTier, StoredBlock, WorkerId,
    WorkerRank,
};
use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet};

const BS: usize = 4;

/// A fake engine hash: deterministic in the block's full prefix, like real engines'.
fn ext(seq: SeqHash) -> ExternalHash {
    ExternalHash(seq.0.rotate_left(17) ^ 0xdead_beef)
}

fn tokens(ids: &[u32]) -> Vec<u32> {
    ids.iter()
        .flat_map(|&b| (0..BS as u32).map(move |k| b * 100 + k))
        .collect()
}

/// Stored event for blocks `from..to` of a token sequence.
fn stored(
    w: WorkerRank,
    id: u64,
    tier: StorageTier,
    toks: &[u32],
    from: usize,
    to: usize,
) -> KvEvent {
    let h = BlockHashes::from_tokens(toks, BS, HashSeed::default());
    let parent = if from == 0 {
        None
    } else {
        Some(ext(h.seqs()[from - 1]))
    };
    KvEvent {
        source: w,
        event_id: id,
        tier,
        data: KvEventData::Stored {
            parent,
            blocks: (from..to)
                .map(|i| StoredBlock {
                    hash: ext(h.seqs()[i]),
                    local: h.locals()[i],
                })
                .collect(),
        },
    }
}

fn removed(w: WorkerRank, id: u64, toks: &[u32], which: &[usize]) -> KvEvent {
    let h = BlockHashes::from_tokens(toks, BS, HashSeed::default());
    KvEvent {
        source: w,
        event_id: id,
        tier: StorageTier::Device,
        data: KvEventData::Removed {
            blocks: which.iter().map(|&i| ext(h.seqs()[i])).collect(),
        },
    }
}

fn query(idx: &PrefixIndex, toks: &[u32]) -> BTreeMap<WorkerRank, TierOverlap> {
    let h = BlockHashes::from_tokens(toks, BS, HashSeed::default());
    idx.find_matches(h.seqs()).scores.into_iter().collect()
}

const W1: WorkerRank = WorkerRank::new(1, 0);
const W1R1: WorkerRank = WorkerRank::new(1, 1);
const W2: WorkerRank = WorkerRank::new(2, 0);

#[test]
fn leading_overlap_per_worker() {
    let mut idx = PrefixIndex::new();
    let a = tokens(&[1, 2, 3, 4]);
    idx.apply(&stored(W1, 1, StorageTier::Device, &a, 0, 4));
    idx.apply(&stored(W2, 1, StorageTier::Device, &a, 0, 2));
    let q = query(&idx, &tokens(&[1, 2, 3, 9]));
    assert_eq!(q[&W1].device(), 3);
    assert_eq!(q[&W2].device(), 2);
    assert_eq!(query(&idx, &tokens(&[5, 2, 3])), BTreeMap::new());
    // a partial trailing block does not count
    let mut partial = tokens(&[1, 2]);
    partial.push(7);
    assert_eq!(query(&idx, &partial)[&W1].device(), 2);
}

#[test]
fn dp_ranks_are_separate_caches() {
    let mut idx = PrefixIndex::new();
    let a = tokens(&[1, 2, 3]);
    idx.apply(&stored(W1, 1, StorageTier::Device, &a, 0, 3));
    idx.apply(&stored(W1R1, 1, StorageTier::Device, &a, 0, 1));
    let q = query(&idx, &a);
    assert_eq!(q[&W1].device(), 3);
    assert_eq!(q[&W1R1].device(), 1);
    idx.remove_worker_rank(W1R1);
    assert!(!query(&idx, &a).contains_key(&W1R1));
    idx.apply(&stored(W1R1, 2, StorageTier::Device, &a, 0, 2));
    idx.remove_worker(WorkerId(1));
    assert!(query(&idx, &a).is_empty());
    assert_eq!(idx.num_nodes(), 0);
}

#[test]
fn tiers_are_reported_separately() {
    let mut idx = PrefixIndex::new();
    let a = tokens(&[1, 2, 3, 4]);
    idx.apply(&stored(W1, 1, StorageTier::Device, &a, 0, 2));
    idx.apply(&stored(W1, 2, StorageTier::HostPinned, &a, 0, 4));
    let q = query(&idx, &a)[&W1];
    assert_eq!(q.get(StorageTier::Device), 2);
    assert_eq!(q.get(StorageTier::HostPinned), 4);
    assert_eq!(q.get(StorageTier::Disk), 0);
}

#[test]
fn removal_cuts_the_prefix_and_cleared_empties_the_worker() {
    let mut idx = PrefixIndex::new();
    let a = tokens(&[1, 2, 3, 4]);
    idx.apply(&stored(W1, 1, StorageTier::Device, &a, 0, 4));
    idx.apply(&removed(W1, 2, &a, &[1]));
    assert_eq!(query(&idx, &a)[&W1].device(), 1);
    // the engine stores block 1 again: blocks 2.. become matchable again
    idx.apply(&stored(W1, 3, StorageTier::Device, &a, 1, 2));
    assert_eq!(query(&idx, &a)[&W1].device(), 4);
    idx.apply(&KvEvent {
        source: W1,
        event_id: 4,
        tier: StorageTier::Device,
        data: KvEventData::Cleared,
    });
    assert!(query(&idx, &a).is_empty());
    assert_eq!(idx.num_blocks(W1, StorageTier::Device), 0);
    assert_eq!(idx.num_nodes(), 0);
}

#[test]
fn duplicates_are_idempotent_and_unknown_removals_harmless() {
    let mut idx = PrefixIndex::new();
    let a = tokens(&[1, 2]);
    let e = stored(W1, 1, StorageTier::Device, &a, 0, 2);
    idx.apply(&e);
    idx.apply(&e);
    assert_eq!(idx.stats().duplicate_blocks, 2);
    assert_eq!(idx.num_blocks(W1, StorageTier::Device), 2);
    idx.apply(&removed(W1, 2, &tokens(&[9, 9, 9]), &[2]));
    idx.apply(&removed(W2, 1, &a, &[0]));
    assert_eq!(idx.stats().unknown_removals, 2);
    assert_eq!(query(&idx, &a)[&W1].device(), 2);
}

#[test]
fn child_before_parent_is_adopted() {
    let mut idx = PrefixIndex::new();
    let a = tokens(&[1, 2, 3, 4, 5]);
    idx.apply(&stored(W1, 3, StorageTier::Device, &a, 3, 5));
    idx.apply(&stored(W1, 2, StorageTier::Device, &a, 1, 3));
    assert!(query(&idx, &a).is_empty());
    assert_eq!(idx.num_orphan_blocks(), 4);
    idx.apply(&stored(W1, 1, StorageTier::Device, &a, 0, 1));
    assert_eq!(query(&idx, &a)[&W1].device(), 5);
    assert_eq!(idx.num_orphan_blocks(), 0);
    assert_eq!(idx.stats().orphans_adopted, 4);
}

#[test]
fn removal_of_a_parked_block_splits_its_chain() {
    let mut idx = PrefixIndex::new();
    let a = tokens(&[1, 2, 3, 4]);
    idx.apply(&stored(W1, 2, StorageTier::Device, &a, 1, 4));
    idx.apply(&removed(W1, 3, &a, &[2]));
    idx.apply(&stored(W1, 1, StorageTier::Device, &a, 0, 1));
    // block 1 adopted; block 2 was removed so block 3 keeps waiting for it
    assert_eq!(query(&idx, &a)[&W1].device(), 2);
    assert_eq!(idx.num_orphan_blocks(), 1);
    idx.apply(&stored(W1, 4, StorageTier::Device, &a, 2, 3));
    assert_eq!(query(&idx, &a)[&W1].device(), 4);
}

#[test]
fn orphan_parking_is_bounded() {
    let mut idx = PrefixIndex::with_orphan_capacity(10);
    for i in 0..20u32 {
        let t = tokens(&[1000 + i, 1, 2]);
        idx.apply(&stored(W1, u64::from(i), StorageTier::Device, &t, 1, 3));
    }
    assert!(idx.num_orphan_blocks() <= 10);
    assert_eq!(idx.stats().orphans_parked, 40);
    assert_eq!(idx.stats().orphans_dropped, 30);
    // the newest survive: their parents still get them adopted
    let t = tokens(&[1019, 1, 2]);
    idx.apply(&stored(W1, 99, StorageTier::Device, &t, 0, 1));
    assert_eq!(query(&idx, &t)[&W1].device(), 3);
}

#[test]
fn engine_hash_reused_for_new_content_moves_the_block() {
    let mut idx = PrefixIndex::new();
    let a = tokens(&[1]);
    let b = tokens(&[2]);
    let h = ExternalHash(5);
    let ev = |t: &[u32], id| KvEvent {
        source: W1,
        event_id: id,
        tier: StorageTier::Device,
        data: KvEventData::Stored {
            parent: None,
            blocks: vec![StoredBlock {
                hash: h,
                local: local_hashes(t, BS, HashSeed::default())[0],
            }],
        },
    };
    idx.apply(&ev(&a, 1));
    idx.apply(&ev(&b, 2));
    assert!(query(&idx, &a).is_empty());
    assert_eq!(query(&idx, &b)[&W1].device(), 1);
    assert_eq!(idx.num_nodes(), 1);
}

#[test]
fn dump_restores_every_answer() {
    let mut idx = PrefixIndex::new();
    let a = tokens(&[1, 2, 3, 4]);
    let b = tokens(&[1, 2, 7, 8, 9]);
    idx.apply(&stored(W1, 5, StorageTier::Device, &a, 0, 4));
    idx.apply(&stored(W1, 6, StorageTier::Device, &b, 2, 5));
    idx.apply(&stored(W2, 1, StorageTier::HostPinned, &b, 0, 3));
    idx.apply(&removed(W1, 7, &a, &[3]));
    let mut restored = PrefixIndex::new();
    for e in idx.dump_events() {
        restored.apply(&e);
    }
    assert_eq!(restored.reachable_blocks(), idx.reachable_blocks());
    for q in [&a, &b] {
        assert_eq!(query(&restored, q), query(&idx, q));
    }
    assert_eq!(restored.last_event_id(W1), Some(7));
}

// ---------- model-based property test ----------

/// A held block in the model: its local hash and its parent's engine hash.
type ModelBlock = (LocalHash, Option<ExternalHash>);

/// Naive reference: per worker and tier, engine hash -> block.
#[derive(Default)]
struct Model {
    blocks: BTreeMap<(WorkerRank, usize), BTreeMap<ExternalHash, ModelBlock>>,
}

impl Model {
    fn apply(&mut self, e: &KvEvent) {
        match &e.data {
            KvEventData::Stored { parent, blocks } => {
                let map = self.blocks.entry((e.source, e.tier.index())).or_default();
                let mut p = *parent;
                for b in blocks {
                    map.insert(b.hash, (b.local, p));
                    p = Some(b.hash);
                }
            }
            KvEventData::Removed { blocks } => {
                if let Some(map) = self.blocks.get_mut(&(e.source, e.tier.index())) {
                    for h in blocks {
                        map.remove(h);
                    }
                }
            }
            KvEventData::Cleared => self.blocks.retain(|k, _| k.0 != e.source),
        }
    }

    /// Chained hash of a held block by following parents through every tier of that worker.
    fn seq_of(&self, w: WorkerRank, tier: usize, h: ExternalHash, fuel: usize) -> Option<SeqHash> {
        if fuel == 0 {
            return None;
        }
        let (local, parent) = self
            .blocks
            .get(&(w, tier))
            .and_then(|m| m.get(&h))
            .copied()?;
        let parent_seq = match parent {
            None => None,
            Some(p) => Some((0..4).find_map(|t| {
                let t = if t == 0 { tier } else { t - 1 };
                self.seq_of(w, t, p, fuel - 1)
            })?),
        };
        Some(match parent_seq {
            None => SeqHash(local.0),
            Some(ps) => kvgate_core::hashing::next_seq_hash(ps, local),
        })
    }

    fn find_matches(&self, q: &[SeqHash]) -> BTreeMap<WorkerRank, TierOverlap> {
        let mut out: BTreeMap<WorkerRank, TierOverlap> = BTreeMap::new();
        for (&(w, tier), map) in &self.blocks {
            let held: BTreeSet<SeqHash> = map
                .keys()
                .filter_map(|&h| self.seq_of(w, tier, h, 64))
                .collect();
            let n = q.iter().take_while(|s| held.contains(s)).count();
            if n > 0 {
                out.entry(w).or_default().0[tier] = n as u32;
            }
        }
        out
    }
}

#[derive(Clone, Debug)]
enum Op {
    Store {
        w: u8,
        tier: u8,
        seq: u8,
        from: u8,
        len: u8,
    },
    Remove {
        w: u8,
        seq: u8,
        at: u8,
    },
    Clear {
        w: u8,
    },
}

/// A handful of overlapping token sequences (shared prefixes) so that ops collide often.
fn sequences() -> Vec<Vec<u32>> {
    vec![
        tokens(&[1, 2, 3, 4, 5, 6]),
        tokens(&[1, 2, 3, 7, 8]),
        tokens(&[1, 9, 10, 11]),
        tokens(&[12, 13, 14, 15, 16]),
        tokens(&[1, 2, 17]),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0u8..3, 0u8..2, 0u8..5, 0u8..6, 1u8..4)
            .prop_map(|(w, tier, seq, from, len)| Op::Store { w, tier, seq, from, len }),
        3 => (0u8..3, 0u8..5, 0u8..6).prop_map(|(w, seq, at)| Op::Remove { w, seq, at }),
        1 => (0u8..3).prop_map(|w| Op::Clear { w }),
    ]
}

fn to_event(op: &Op, id: u64, seqs: &[Vec<u32>]) -> Option<KvEvent> {
    Some(match *op {
        Op::Store {
            w,
            tier,
            seq,
            from,
            len,
        } => {
            let t = &seqs[seq as usize];
            let n = t.len() / BS;
            let from = (from as usize).min(n - 1);
            let to = (from + len as usize).min(n);
            let tier = if tier == 0 {
                StorageTier::Device
            } else {
                StorageTier::HostPinned
            };
            stored(WorkerRank::new(u64::from(w), 0), id, tier, t, from, to)
        }
        Op::Remove { w, seq, at } => {
            let t = &seqs[seq as usize];
            let at = (at as usize).min(t.len() / BS - 1);
            removed(WorkerRank::new(u64::from(w), 0), id, t, &[at])
        }
        Op::Clear { w } => KvEvent {
            source: WorkerRank::new(u64::from(w), 0),
            event_id: id,
            tier: StorageTier::Device,
            data: KvEventData::Cleared,
        },
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn index_agrees_with_naive_model(ops in proptest::collection::vec(op(), 1..60)) {
        let seqs = sequences();
        let mut idx = PrefixIndex::new();
        let mut model = Model::default();
        for (i, op) in ops.iter().enumerate() {
            let Some(e) = to_event(op, i as u64, &seqs) else { continue };
            idx.apply(&e);
            model.apply(&e);
        }
        for t in &seqs {
            let q = seq_hashes(&local_hashes(t, BS, HashSeed::default()));
            let got: BTreeMap<WorkerRank, TierOverlap> = idx.find_matches(&q).scores.into_iter().collect();
            prop_assert_eq!(got, model.find_matches(&q));
        }
        // dump -> restore reproduces every answer
        let mut restored = PrefixIndex::new();
        for e in idx.dump_events() {
            restored.apply(&e);
        }
        prop_assert_eq!(restored.reachable_blocks(), idx.reachable_blocks());
        for t in &seqs {
            let q = seq_hashes(&local_hashes(t, BS, HashSeed::default()));
            prop_assert_eq!(restored.find_matches(&q), idx.find_matches(&q));
        }
    }
}
