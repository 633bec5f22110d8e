//! The parking lot of the prefix index: `Stored` chains whose parent has not arrived yet, keyed by
//! (member, parent engine hash), bounded, oldest list out first.
//!
//! Invariant (checked by tests): `parked - adopted - dropped == blocks()`.

use crate::events::StoredBlock;
use crate::fasthash::FastMap;
use crate::ids::{ExternalHash, StorageTier};
use std::collections::VecDeque;

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Orphan {
    pub tier: StorageTier,
    pub blocks: Vec<StoredBlock>,
}

#[derive(Debug)]
struct List {
    /// When the list was created: FIFO entries with another generation are stale.
    generation: u64,
    orphans: Vec<Orphan>,
}

type Key = (u32, ExternalHash);

#[derive(Debug)]
pub(crate) struct OrphanLot {
    lists: FastMap<Key, List>,
    order: VecDeque<(Key, u64)>,
    /// How many parked copies of each (member, tier, block) exist: lets an unknown removal skip
    /// the scan when the block is not parked.
    parked_blocks: FastMap<(u32, u8, ExternalHash), u32>,
    blocks: usize,
    capacity: usize,
    next_generation: u64,
    pub parked: u64,
    pub adopted: u64,
    pub dropped: u64,
}

impl OrphanLot {
    pub fn new(capacity: usize) -> Self {
        Self {
            lists: FastMap::default(),
            order: VecDeque::new(),
            parked_blocks: FastMap::default(),
            blocks: 0,
            capacity,
            next_generation: 0,
            parked: 0,
            adopted: 0,
            dropped: 0,
        }
    }

    pub fn blocks(&self) -> usize {
        self.blocks
    }

    fn track(&mut self, m: u32, o: &Orphan, add: bool) {
        for b in &o.blocks {
            let key = (m, o.tier.index() as u8, b.hash);
            if add {
                *self.parked_blocks.entry(key).or_insert(0) += 1;
            } else if let Some(c) = self.parked_blocks.get_mut(&key) {
                *c -= 1;
                if *c == 0 {
                    self.parked_blocks.remove(&key);
                }
            }
        }
    }

    fn drop_list(&mut self, key: Key) {
        if let Some(list) = self.lists.remove(&key) {
            for o in &list.orphans {
                self.track(key.0, o, false);
                self.blocks -= o.blocks.len();
                self.dropped += o.blocks.len() as u64;
            }
        }
    }

    /// Parks a chain waiting for `parent`, evicting the oldest lists if over capacity.
    pub fn park(&mut self, m: u32, parent: ExternalHash, orphan: Orphan) {
        let n = orphan.blocks.len();
        self.parked += n as u64;
        let key = (m, parent);
        let duplicate = self
            .lists
            .get(&key)
            .is_some_and(|l| l.orphans.contains(&orphan));
        if duplicate || n > self.capacity {
            self.dropped += n as u64;
            return;
        }
        while self.blocks + n > self.capacity {
            let Some((k, generation)) = self.order.pop_front() else {
                break;
            };
            if self
                .lists
                .get(&k)
                .is_some_and(|l| l.generation == generation)
            {
                self.drop_list(k);
            }
        }
        self.track(m, &orphan, true);
        self.blocks += n;
        match self.lists.get_mut(&key) {
            Some(list) => list.orphans.push(orphan),
            None => {
                let generation = self.next_generation;
                self.next_generation += 1;
                self.lists.insert(
                    key,
                    List {
                        generation,
                        orphans: vec![orphan],
                    },
                );
                self.order.push_back((key, generation));
            }
        }
        if self.order.len() > 2 * self.lists.len() + 64 {
            let lists = &self.lists;
            self.order
                .retain(|(k, g)| lists.get(k).is_some_and(|l| l.generation == *g));
        }
    }

    /// Takes the chains waiting for `parent` (the caller applies them and counts the outcome
    /// with [`count_adopted`](Self::count_adopted)).
    pub fn take(&mut self, m: u32, parent: ExternalHash) -> Vec<Orphan> {
        if self.blocks == 0 {
            return Vec::new();
        }
        let Some(list) = self.lists.remove(&(m, parent)) else {
            return Vec::new();
        };
        for o in &list.orphans {
            self.track(m, o, false);
            self.blocks -= o.blocks.len();
        }
        list.orphans
    }

    pub fn count_adopted(&mut self, n: usize) {
        self.adopted += n as u64;
    }

    /// A parked block was removed before its parent came: drop it, splitting its chain (the
    /// blocks after it now wait for it). Returns whether anything was parked under that name.
    pub fn remove_block(&mut self, m: u32, tier: StorageTier, hash: ExternalHash) -> bool {
        if !self
            .parked_blocks
            .contains_key(&(m, tier.index() as u8, hash))
        {
            return false;
        }
        let keys: Vec<Key> = self
            .lists
            .iter()
            .filter(|(k, l)| {
                k.0 == m
                    && l.orphans
                        .iter()
                        .any(|o| o.tier == tier && o.blocks.iter().any(|b| b.hash == hash))
            })
            .map(|(k, _)| *k)
            .collect();
        let mut tails = Vec::new();
        for key in keys {
            let Some(list) = self.lists.get_mut(&key) else {
                continue;
            };
            let mut removed = Vec::new();
            for o in &mut list.orphans {
                if o.tier != tier {
                    continue;
                }
                if let Some(pos) = o.blocks.iter().position(|b| b.hash == hash) {
                    let tail = o.blocks.split_off(pos + 1);
                    let gone = o.blocks.pop();
                    removed.extend(gone);
                    if !tail.is_empty() {
                        tails.push(Orphan { tier, blocks: tail });
                    }
                }
            }
            list.orphans.retain(|o| !o.blocks.is_empty());
            if list.orphans.is_empty() {
                self.lists.remove(&key);
            }
            for b in removed {
                self.track(
                    m,
                    &Orphan {
                        tier,
                        blocks: vec![b],
                    },
                    false,
                );
                self.blocks -= 1;
                self.dropped += 1;
            }
        }
        // The tails stay parked (same blocks, so no new count), now waiting for the removed block.
        for tail in tails {
            let n = tail.blocks.len();
            self.track(m, &tail, false);
            self.blocks -= n;
            self.parked -= n as u64;
            self.park(m, hash, tail);
        }
        true
    }

    /// Drops everything parked by one member.
    pub fn clear_member(&mut self, m: u32) {
        if self.blocks == 0 {
            return;
        }
        let keys: Vec<Key> = self.lists.keys().filter(|k| k.0 == m).copied().collect();
        for k in keys {
            self.drop_list(k);
        }
    }

    /// Every parked chain, for dumps.
    pub fn iter(&self) -> impl Iterator<Item = (u32, ExternalHash, &Orphan)> {
        self.lists
            .iter()
            .flat_map(|(k, l)| l.orphans.iter().map(move |o| (k.0, k.1, o)))
    }
}
