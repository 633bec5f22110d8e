//! The prefix index split by (worker, dp rank) into independent [`PrefixIndex`] shards, so that
//! events for different workers can be applied on different threads with nothing shared.
//!
//! - Every event touches exactly one (worker, dp rank), and a [`PrefixIndex`]'s answer for one
//!   worker depends only on that worker's events. So a worker's events all go to one shard, and a
//!   query is answered by asking every shard and taking the union of their answers (the shards
//!   hold disjoint workers, so nothing needs combining). The union is exactly the answer a single
//!   index fed the same events gives.
//! - A (worker, dp rank) is placed when first seen, on the shard holding the fewest, and stays
//!   there until it is removed; that keeps shards even whatever the worker ids are.
//! - Shards share nothing: a prefix held by workers on two shards is stored on both (a position,
//!   16 + 12 bytes, per shard). With one holder per position, the common case, nothing is
//!   duplicated.
//! - The type itself is single-threaded, like [`PrefixIndex`]. To run shards on threads, hand
//!   [`shards_mut`](ShardedPrefixIndex::shards_mut) chunks to scoped threads, route each event
//!   with [`route`](ShardedPrefixIndex::route) (or [`shard_of`](ShardedPrefixIndex::shard_of) once
//!   placed), have each thread answer queries on its own shards and [`merge_into`] the parts.

use crate::events::KvEvent;
use crate::fasthash::FastMap;
use crate::ids::{SeqHash, StorageTier, WorkerId, WorkerRank};
use crate::index::{IndexStats, OverlapScores, PrefixIndex};

/// Adds a shard's answer to `out`. Shards hold disjoint workers, so this is a union.
pub fn merge_into(out: &mut OverlapScores, part: OverlapScores) {
    if out.scores.is_empty() {
        *out = part;
        return;
    }
    out.scores.reserve(part.scores.len());
    for (k, v) in part.scores {
        out.scores.insert(k, v);
    }
}

#[derive(Debug)]
pub struct ShardedPrefixIndex {
    shards: Vec<PrefixIndex>,
    /// Where each placed (worker, dp rank) lives.
    placed: FastMap<WorkerRank, u32>,
    /// Placed (worker, dp rank)s per shard.
    load: Vec<u32>,
}

impl ShardedPrefixIndex {
    /// `shards` independent indexes (at least one).
    pub fn new(shards: usize) -> Self {
        let n = shards.max(1);
        Self {
            shards: (0..n).map(|_| PrefixIndex::new()).collect(),
            placed: FastMap::default(),
            load: vec![0; n],
        }
    }

    pub fn num_shards(&self) -> usize {
        self.shards.len()
    }

    /// The shard a (worker, dp rank) lives on, if it has been placed.
    pub fn shard_of(&self, worker: WorkerRank) -> Option<usize> {
        self.placed.get(&worker).map(|&s| s as usize)
    }

    /// The shard a (worker, dp rank) lives on, placing it on the least loaded shard (the lowest
    /// such index) if it is new.
    pub fn route(&mut self, worker: WorkerRank) -> usize {
        if let Some(&s) = self.placed.get(&worker) {
            return s as usize;
        }
        let s = (0..self.load.len())
            .min_by_key(|&i| self.load[i])
            .unwrap_or(0);
        self.load[s] += 1;
        self.placed.insert(worker, s as u32);
        s
    }

    pub fn shards(&self) -> &[PrefixIndex] {
        &self.shards
    }

    /// The shards, for applying events and answering queries on several threads (route events
    /// first: [`route`](Self::route) places new workers).
    pub fn shards_mut(&mut self) -> &mut [PrefixIndex] {
        &mut self.shards
    }

    pub fn apply(&mut self, event: &KvEvent) {
        let s = self.route(event.source);
        self.shards[s].apply(event);
    }

    /// The union of every shard's answer: what a single [`PrefixIndex`] fed the same events says.
    pub fn find_matches(&self, seqs: &[SeqHash]) -> OverlapScores {
        let mut out = OverlapScores::default();
        for shard in &self.shards {
            merge_into(&mut out, shard.find_matches(seqs));
        }
        out
    }

    pub fn num_blocks(&self, worker: WorkerRank, tier: StorageTier) -> usize {
        self.shard_of(worker)
            .map_or(0, |s| self.shards[s].num_blocks(worker, tier))
    }

    /// Positions over all shards (a prefix held on two shards counts twice).
    pub fn num_nodes(&self) -> usize {
        self.shards.iter().map(PrefixIndex::num_nodes).sum()
    }

    pub fn num_heads(&self) -> usize {
        self.shards.iter().map(PrefixIndex::num_heads).sum()
    }

    pub fn workers(&self) -> Vec<WorkerRank> {
        let mut v: Vec<WorkerRank> = self.shards.iter().flat_map(|s| s.workers()).collect();
        v.sort_unstable();
        v
    }

    pub fn last_event_id(&self, worker: WorkerRank) -> Option<u64> {
        self.shard_of(worker)
            .and_then(|s| self.shards[s].last_event_id(worker))
    }

    /// Every shard's counters, summed.
    pub fn stats(&self) -> IndexStats {
        let mut t = IndexStats::default();
        for s in &self.shards {
            let x = s.stats();
            t.events_applied += x.events_applied;
            t.blocks_stored += x.blocks_stored;
            t.blocks_removed += x.blocks_removed;
            t.duplicate_blocks += x.duplicate_blocks;
            t.unknown_removals += x.unknown_removals;
            t.orphans_parked += x.orphans_parked;
            t.orphans_adopted += x.orphans_adopted;
            t.orphans_dropped += x.orphans_dropped;
            t.clears += x.clears;
            t.blocks_over_capacity += x.blocks_over_capacity;
        }
        t
    }

    /// Forgets every dp rank of a worker.
    pub fn remove_worker(&mut self, worker: WorkerId) {
        let ranks: Vec<WorkerRank> = self
            .placed
            .keys()
            .filter(|k| k.worker == worker)
            .copied()
            .collect();
        for r in ranks {
            self.remove_worker_rank(r);
        }
    }

    /// Forgets one (worker, dp rank); it is placed afresh if it comes back.
    pub fn remove_worker_rank(&mut self, worker: WorkerRank) {
        if let Some(s) = self.placed.remove(&worker) {
            self.shards[s as usize].remove_worker_rank(worker);
            self.load[s as usize] -= 1;
        }
    }

    /// Every shard's layout invariants (see [`PrefixIndex::check_invariants`]), and that each
    /// worker lives only on its shard.
    pub fn check_invariants(&self) -> Result<(), String> {
        for (i, s) in self.shards.iter().enumerate() {
            s.check_invariants()
                .map_err(|e| format!("shard {i}: {e}"))?;
            for w in s.workers() {
                if self.shard_of(w) != Some(i) {
                    return Err(format!("{w:?} found on shard {i}, placed elsewhere"));
                }
            }
        }
        Ok(())
    }

    pub fn approx_heap_bytes(&self) -> usize {
        self.shards
            .iter()
            .map(PrefixIndex::approx_heap_bytes)
            .sum::<usize>()
            + self.placed.capacity() * (std::mem::size_of::<(WorkerRank, u32)>() + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{KvEventData, StoredBlock};
    use crate::hashing::seq_hash_after;
    use crate::ids::{ExternalHash, LocalHash};
    use proptest::prelude::*;

    /// A few short token-block sequences sharing prefixes (as local hashes).
    const SEQS: [&[u64]; 5] = [
        &[1, 2, 3, 4, 5, 6],
        &[1, 2, 3, 7, 8],
        &[1, 2, 9],
        &[10, 11, 12, 13],
        &[1, 2, 3, 4, 5, 6, 14, 15],
    ];

    fn seqs_of(locals: &[u64]) -> Vec<SeqHash> {
        let mut out = Vec::new();
        let mut prev = None;
        for &l in locals {
            let s = seq_hash_after(prev, LocalHash(l));
            out.push(s);
            prev = Some(s);
        }
        out
    }

    /// The engine's name for a block: its chained hash, scrambled per worker when `salted` (an
    /// engine is free to name blocks as it likes).
    fn ext(seq: SeqHash, worker: u64, salted: bool) -> ExternalHash {
        ExternalHash(if salted {
            seq.0 ^ worker.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        } else {
            seq.0
        })
    }

    #[derive(Clone, Debug)]
    enum Op {
        /// Store blocks `from..to` of a sequence (parented on block `from - 1`).
        Store {
            w: u64,
            rank: u32,
            tier: usize,
            seq: usize,
            from: usize,
            to: usize,
        },
        /// Remove some blocks of a sequence.
        Remove {
            w: u64,
            rank: u32,
            tier: usize,
            seq: usize,
            which: Vec<usize>,
        },
        Clear {
            w: u64,
            rank: u32,
        },
        Forget {
            w: u64,
        },
    }

    fn op() -> impl Strategy<Value = Op> {
        let who = (0u64..6, 0u32..2);
        prop_oneof![
            6 => (who.clone(), 0usize..2, 0usize..SEQS.len(), 0usize..8, 1usize..9).prop_map(
                |((w, rank), tier, seq, a, b)| {
                    let len = SEQS[seq].len();
                    let from = a.min(len - 1);
                    let to = (from + b).min(len);
                    Op::Store { w, rank, tier, seq, from, to }
                }
            ),
            3 => (who.clone(), 0usize..2, 0usize..SEQS.len(), proptest::collection::vec(0usize..8, 1..4))
                .prop_map(|((w, rank), tier, seq, which)| Op::Remove { w, rank, tier, seq, which }),
            1 => who.prop_map(|(w, rank)| Op::Clear { w, rank }),
            1 => (0u64..6).prop_map(|w| Op::Forget { w }),
        ]
    }

    fn event(op: &Op, id: u64, salted: bool) -> Option<KvEvent> {
        let (w, rank, tier, data) = match op {
            Op::Store {
                w,
                rank,
                tier,
                seq,
                from,
                to,
            } => {
                let locals = SEQS[*seq];
                let seqs = seqs_of(locals);
                let parent = from.checked_sub(1).map(|p| ext(seqs[p], *w, salted));
                let blocks = (*from..*to)
                    .map(|i| StoredBlock {
                        hash: ext(seqs[i], *w, salted),
                        local: LocalHash(locals[i]),
                    })
                    .collect();
                (*w, *rank, *tier, KvEventData::Stored { parent, blocks })
            }
            Op::Remove {
                w,
                rank,
                tier,
                seq,
                which,
            } => {
                let seqs = seqs_of(SEQS[*seq]);
                let blocks = which
                    .iter()
                    .filter_map(|&i| seqs.get(i))
                    .map(|&s| ext(s, *w, salted))
                    .collect();
                (*w, *rank, *tier, KvEventData::Removed { blocks })
            }
            Op::Clear { w, rank } => (*w, *rank, 0, KvEventData::Cleared),
            Op::Forget { .. } => return None,
        };
        Some(KvEvent {
            source: WorkerRank::new(w, rank),
            event_id: id,
            tier: StorageTier::from_index(tier),
            data,
        })
    }

    fn all_prefix_queries() -> Vec<Vec<SeqHash>> {
        let mut qs: Vec<Vec<SeqHash>> = SEQS.iter().map(|s| seqs_of(s)).collect();
        // A query diverging from every stored sequence after two blocks, and an unknown one.
        qs.push(seqs_of(&[1, 2, 99, 4]));
        qs.push(seqs_of(&[42]));
        qs
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        /// After every event, a sharded index answers every query exactly as a single index fed
        /// the same events, holds the same blocks, and keeps its invariants; also when its shards
        /// are driven separately (as threads would), routed by `route`.
        #[test]
        fn sharded_answers_as_the_single_index(
            ops in proptest::collection::vec(op(), 1..50),
            shards in 1usize..5,
            salted in any::<bool>(),
        ) {
            let mut single = PrefixIndex::new();
            let mut sharded = ShardedPrefixIndex::new(shards);
            let mut split = ShardedPrefixIndex::new(shards);
            let queries = all_prefix_queries();
            for (i, op) in ops.iter().enumerate() {
                match event(op, i as u64 + 1, salted) {
                    Some(e) => {
                        single.apply(&e);
                        sharded.apply(&e);
                        let s = split.route(e.source);
                        split.shards_mut()[s].apply(&e);
                    }
                    None => {
                        let Op::Forget { w } = op else { unreachable!() };
                        single.remove_worker(WorkerId(*w));
                        sharded.remove_worker(WorkerId(*w));
                        split.remove_worker(WorkerId(*w));
                    }
                }
                prop_assert_eq!(sharded.check_invariants(), Ok(()));
                for q in &queries {
                    let want = single.find_matches(q);
                    prop_assert_eq!(&sharded.find_matches(q), &want);
                    // Per shard, then merged, as threads do.
                    let mut parts = OverlapScores::default();
                    for shard in split.shards() {
                        merge_into(&mut parts, shard.find_matches(q));
                    }
                    prop_assert_eq!(&parts, &want);
                }
                prop_assert_eq!(sharded.workers(), single.workers());
                let mut blocks: Vec<_> = sharded.shards().iter().flat_map(|s| s.blocks()).collect();
                blocks.sort_unstable();
                prop_assert_eq!(blocks, single.blocks());
                let (a, b) = (sharded.stats(), single.stats());
                prop_assert_eq!(a.blocks_stored, b.blocks_stored);
                prop_assert_eq!(a.blocks_removed, b.blocks_removed);
                prop_assert_eq!(a.events_applied, b.events_applied);
            }
        }
    }

    #[test]
    fn a_prefix_held_on_two_shards_is_reported_for_both_workers() {
        let mut ix = ShardedPrefixIndex::new(2);
        let store = |w: u64, seq: usize, to: usize| Op::Store {
            w,
            rank: 0,
            tier: 0,
            seq,
            from: 0,
            to,
        };
        for (i, op) in [store(1, 0, 6), store(2, 1, 3), store(3, 3, 4)]
            .iter()
            .enumerate()
        {
            ix.apply(&event(op, i as u64, true).unwrap());
        }
        assert_ne!(
            ix.shard_of(WorkerRank::new(1, 0)),
            ix.shard_of(WorkerRank::new(2, 0))
        );
        let got = ix.find_matches(&seqs_of(SEQS[0]));
        assert_eq!(got.device(&WorkerRank::new(1, 0)), 6);
        assert_eq!(got.device(&WorkerRank::new(2, 0)), 3);
        assert_eq!(got.scores.len(), 2);
        // Each shard stores the shared prefix once.
        assert_eq!(ix.num_nodes(), 6 + 3 + 4);
    }

    #[test]
    fn new_workers_go_to_the_least_loaded_shard_and_come_back_anywhere() {
        let mut ix = ShardedPrefixIndex::new(3);
        let placed: Vec<usize> = (0..6).map(|w| ix.route(WorkerRank::new(w, 0))).collect();
        assert_eq!(placed, [0, 1, 2, 0, 1, 2]);
        ix.remove_worker(WorkerId(1));
        assert_eq!(ix.shard_of(WorkerRank::new(1, 0)), None);
        assert_eq!(ix.route(WorkerRank::new(9, 0)), 1);
        assert_eq!(ix.route(WorkerRank::new(9, 0)), 1);
    }
}
