//! The predicted index: what the router *believes* each worker caches because it sent it there.
//!
//! Used as the only index in approximate mode (`DYN_USE_KV_EVENTS=false`) and, with
//! `DYN_ROUTER_PREDICTED_TTL_SECS`, beside the event-fed index (overlap = max of both) to cover the
//! window between routing a request and its KV events arriving.
//!
//! Each routing decision inserts the request's blocks for the chosen worker with an expiry of
//! `now + ttl` (re-routing refreshes it). Entries expire by TTL and, past `max_blocks`
//! (worker, block) entries, the oldest are pruned first.

use crate::events::{KvEvent, KvEventData, StoredBlock};
use crate::fasthash::FastMap;
use crate::ids::{ExternalHash, LocalHash, SeqHash, StorageTier, WorkerId, WorkerRank};
use crate::index::{OverlapScores, PrefixIndex};
use std::collections::VecDeque;
use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct PredictedIndex {
    index: PrefixIndex,
    ttl: Duration,
    max_blocks: usize,
    /// Insertion order == expiry order (one TTL for all).
    queue: VecDeque<(Instant, WorkerRank, SeqHash)>,
    /// The live expiry of each entry; queue items with an older expiry are stale.
    expiry: FastMap<(WorkerRank, SeqHash), Instant>,
    pruned: u64,
    expired: u64,
}

impl PredictedIndex {
    pub fn new(ttl: Duration, max_blocks: usize) -> Self {
        Self {
            index: PrefixIndex::new(),
            ttl,
            max_blocks: max_blocks.max(1),
            queue: VecDeque::new(),
            expiry: FastMap::default(),
            pruned: 0,
            expired: 0,
        }
    }

    /// Live (worker, block) entries.
    pub fn len(&self) -> usize {
        self.expiry.len()
    }

    pub fn is_empty(&self) -> bool {
        self.expiry.is_empty()
    }

    /// Entries removed by the size bound / by the TTL, since creation.
    pub fn pruned(&self) -> u64 {
        self.pruned
    }
    pub fn expired(&self) -> u64 {
        self.expired
    }

    /// Records that `worker` was sent a request with these blocks.
    pub fn insert(
        &mut self,
        worker: WorkerRank,
        locals: &[LocalHash],
        seqs: &[SeqHash],
        now: Instant,
    ) {
        if seqs.is_empty() {
            return;
        }
        self.expire(now);
        let expires = now + self.ttl;
        // Our own chained hash doubles as the "engine" hash: it names the block uniquely.
        let blocks: Vec<StoredBlock> = locals
            .iter()
            .zip(seqs)
            .map(|(&local, &s)| StoredBlock {
                hash: ExternalHash(s.0),
                local,
            })
            .collect();
        self.index.apply(&KvEvent {
            source: worker,
            event_id: 0,
            tier: StorageTier::Device,
            data: KvEventData::Stored {
                parent: None,
                blocks,
            },
        });
        // Leaf first: pruning by size then trims chains from their tips, keeping prefixes matchable.
        for &s in seqs.iter().rev() {
            self.expiry.insert((worker, s), expires);
            self.queue.push_back((expires, worker, s));
        }
        while self.expiry.len() > self.max_blocks {
            if !self.pop_front(true) {
                break;
            }
        }
        // Refreshes leave stale queue items behind; compact when they dominate.
        if self.queue.len() > 2 * self.expiry.len() + 1024 {
            let expiry = &self.expiry;
            self.queue
                .retain(|(t, w, s)| expiry.get(&(*w, *s)) == Some(t));
        }
    }

    /// Drops entries whose TTL has passed.
    pub fn expire(&mut self, now: Instant) {
        while let Some(&(t, _, _)) = self.queue.front() {
            if t > now {
                break;
            }
            self.pop_front(false);
        }
    }

    /// Pops the oldest queue item, removing its entry if it is still live. Returns false when empty.
    fn pop_front(&mut self, by_size: bool) -> bool {
        let Some((t, w, s)) = self.queue.pop_front() else {
            return false;
        };
        if self.expiry.get(&(w, s)) == Some(&t) {
            self.expiry.remove(&(w, s));
            self.index.apply(&KvEvent {
                source: w,
                event_id: 0,
                tier: StorageTier::Device,
                data: KvEventData::Removed {
                    blocks: vec![ExternalHash(s.0)],
                },
            });
            if by_size {
                self.pruned += 1;
            } else {
                self.expired += 1;
            }
        }
        true
    }

    pub fn find_matches(&self, seqs: &[SeqHash]) -> OverlapScores {
        self.index.find_matches(seqs)
    }

    pub fn remove_worker(&mut self, worker: WorkerId) {
        self.index.remove_worker(worker);
        self.expiry.retain(|(w, _), _| w.worker != worker);
        self.queue.retain(|(_, w, _)| w.worker != worker);
    }

    pub fn remove_worker_rank(&mut self, worker: WorkerRank) {
        self.index.remove_worker_rank(worker);
        self.expiry.retain(|(w, _), _| *w != worker);
        self.queue.retain(|(_, w, _)| *w != worker);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hashing::{BlockHashes, HashSeed};

    const W: WorkerRank = WorkerRank::new(1, 0);
    const W2: WorkerRank = WorkerRank::new(2, 0);

    fn h(n: u32, salt: &str) -> BlockHashes {
        let toks: Vec<u32> = (0..n * 4).collect();
        BlockHashes::from_tokens(&toks, 4, HashSeed::new(None, Some(salt)))
    }

    #[test]
    fn routed_blocks_match_until_ttl() {
        let t0 = Instant::now();
        let mut p = PredictedIndex::new(Duration::from_secs(120), 1000);
        let a = h(3, "a");
        p.insert(W, a.locals(), a.seqs(), t0);
        assert_eq!(p.find_matches(a.seqs()).device(&W), 3);
        p.expire(t0 + Duration::from_secs(119));
        assert_eq!(p.find_matches(a.seqs()).device(&W), 3);
        p.expire(t0 + Duration::from_secs(121));
        assert_eq!(p.find_matches(a.seqs()).device(&W), 0);
        assert!(p.is_empty());
        assert_eq!(p.expired(), 3);
    }

    #[test]
    fn rerouting_refreshes_the_ttl() {
        let t0 = Instant::now();
        let mut p = PredictedIndex::new(Duration::from_secs(10), 1000);
        let a = h(2, "a");
        p.insert(W, a.locals(), a.seqs(), t0);
        p.insert(W, a.locals(), a.seqs(), t0 + Duration::from_secs(8));
        p.expire(t0 + Duration::from_secs(12));
        assert_eq!(p.find_matches(a.seqs()).device(&W), 2);
        p.expire(t0 + Duration::from_secs(19));
        assert_eq!(p.find_matches(a.seqs()).device(&W), 0);
    }

    #[test]
    fn size_bound_prunes_the_oldest() {
        let t0 = Instant::now();
        let mut p = PredictedIndex::new(Duration::from_secs(100), 4);
        let a = h(3, "a");
        let b = h(3, "b");
        p.insert(W, a.locals(), a.seqs(), t0);
        p.insert(W2, b.locals(), b.seqs(), t0 + Duration::from_secs(1));
        assert_eq!(p.len(), 4);
        assert_eq!(p.pruned(), 2);
        assert_eq!(p.find_matches(b.seqs()).device(&W2), 3);
        // a lost its two deepest blocks; its first block still matches
        assert_eq!(p.find_matches(a.seqs()).device(&W), 1);
    }
}
