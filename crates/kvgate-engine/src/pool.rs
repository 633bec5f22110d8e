//! The paged KV cache of one engine (one dp rank): a fixed number of blocks, prefix caching of
//! full blocks by chained hash, reference counts, LRU eviction of unreferenced cached blocks, and
//! the KV events that each store / evict / clear produces.

use kvgate_core::fasthash::FastMap;
use kvgate_core::{ExternalHash, LocalHash, SeqHash};
use std::collections::BTreeMap;
use xxhash_rust::xxh3::xxh3_64_with_seed;

/// A slot index in the pool.
pub type SlotId = u32;

/// The engine's own name for a block: a keyed hash of the router's chained hash, so that the
/// router has to map engine hashes to prefixes through events (as with real vLLM), never by luck.
pub fn engine_hash(seq: SeqHash) -> ExternalHash {
    ExternalHash(xxh3_64_with_seed(&seq.0.to_le_bytes(), 0x6b76_6761_7465))
}

/// One block in a `Stored` event, with its tokens (the vLLM ZMQ format carries them).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CachedBlock {
    pub hash: ExternalHash,
    pub local: LocalHash,
    pub tokens: Vec<u32>,
}

/// What happened to the cache, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CacheEvent {
    Stored {
        parent: Option<ExternalHash>,
        blocks: Vec<CachedBlock>,
    },
    Removed {
        hashes: Vec<ExternalHash>,
    },
    Cleared,
}

#[derive(Clone, Copy, Debug, Default)]
struct Slot {
    refs: u32,
    /// Set when the block is full and registered in the prefix cache.
    seq: Option<SeqHash>,
    lru_tick: u64,
}

#[derive(Debug)]
pub struct BlockPool {
    slots: Vec<Slot>,
    /// Slots holding nothing reusable.
    free: Vec<SlotId>,
    /// Registered full blocks.
    cached: FastMap<SeqHash, SlotId>,
    /// Unreferenced registered blocks, least recently used first.
    lru: BTreeMap<u64, SlotId>,
    tick: u64,
    events: Vec<CacheEvent>,
    prefix_caching: bool,
}

impl BlockPool {
    pub fn new(num_blocks: usize, prefix_caching: bool) -> Self {
        Self {
            slots: vec![Slot::default(); num_blocks],
            free: (0..num_blocks as SlotId).rev().collect(),
            cached: FastMap::default(),
            lru: BTreeMap::new(),
            tick: 0,
            events: Vec::new(),
            prefix_caching,
        }
    }

    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// Blocks that can be handed out now (free + evictable).
    pub fn available(&self) -> usize {
        self.free.len() + self.lru.len()
    }

    /// Blocks referenced by running requests.
    pub fn active(&self) -> usize {
        self.capacity() - self.available()
    }

    /// Registered (prefix-cached) blocks, referenced or not.
    pub fn num_cached(&self) -> usize {
        self.cached.len()
    }

    /// Whether a block with this prefix is cached.
    pub fn contains(&self, seq: SeqHash) -> bool {
        self.cached.contains_key(&seq)
    }

    /// Every cached prefix (for comparing with a router's view).
    pub fn cached_seqs(&self) -> impl Iterator<Item = SeqHash> + '_ {
        self.cached.keys().copied()
    }

    /// Leading blocks of `seqs` that are cached.
    pub fn prefix_hits(&self, seqs: &[SeqHash]) -> usize {
        if !self.prefix_caching {
            return 0;
        }
        seqs.iter()
            .take_while(|s| self.cached.contains_key(s))
            .count()
    }

    /// How many of the first `n` blocks of `seqs` sit unreferenced in the LRU (acquiring them
    /// takes them out of `available`).
    pub fn idle_hits(&self, seqs: &[SeqHash], n: usize) -> usize {
        seqs[..n]
            .iter()
            .filter(|s| {
                self.cached
                    .get(s)
                    .is_some_and(|&id| self.slots[id as usize].refs == 0)
            })
            .count()
    }

    /// Takes a reference on a cached block.
    pub fn acquire(&mut self, seq: SeqHash) -> Option<SlotId> {
        let &id = self.cached.get(&seq)?;
        let slot = &mut self.slots[id as usize];
        if slot.refs == 0 {
            self.lru.remove(&slot.lru_tick);
        }
        slot.refs += 1;
        Some(id)
    }

    /// A fresh block, evicting the least recently used unreferenced cached block if needed.
    pub fn allocate(&mut self) -> Option<SlotId> {
        let id = match self.free.pop() {
            Some(id) => id,
            None => {
                let (_, id) = self.lru.pop_first()?;
                if let Some(seq) = self.slots[id as usize].seq.take() {
                    self.cached.remove(&seq);
                    self.push_removed(engine_hash(seq));
                }
                id
            }
        };
        self.slots[id as usize] = Slot {
            refs: 1,
            seq: None,
            lru_tick: 0,
        };
        Some(id)
    }

    /// The block in `slot` is now full: cache it under `seq`. If another slot already caches the
    /// same prefix, or the parent prefix is no longer cached, this copy stays private (and is
    /// freed with its request).
    pub fn register(
        &mut self,
        slot: SlotId,
        seq: SeqHash,
        parent: Option<SeqHash>,
        local: LocalHash,
        tokens: &[u32],
    ) {
        if !self.prefix_caching || self.cached.contains_key(&seq) {
            return;
        }
        // A block is only reachable through its whole prefix: if the parent is no longer cached
        // (this request held a private duplicate of it and the shared copy was evicted), caching
        // the child would advertise a block no lookup can hit.
        if let Some(p) = parent
            && !self.cached.contains_key(&p)
        {
            return;
        }
        self.cached.insert(seq, slot);
        self.slots[slot as usize].seq = Some(seq);
        let block = CachedBlock {
            hash: engine_hash(seq),
            local,
            tokens: tokens.to_vec(),
        };
        let parent = parent.map(engine_hash);
        // Extend the previous Stored event when this block continues its chain.
        if let Some(CacheEvent::Stored { blocks, .. }) = self.events.last_mut()
            && blocks.last().map(|b| b.hash) == parent
            && parent.is_some()
        {
            blocks.push(block);
            return;
        }
        self.events.push(CacheEvent::Stored {
            parent,
            blocks: vec![block],
        });
    }

    /// Drops a reference; an unreferenced cached block becomes evictable, others free.
    pub fn release(&mut self, slot: SlotId) {
        let s = &mut self.slots[slot as usize];
        if s.refs == 0 {
            return;
        }
        s.refs -= 1;
        if s.refs == 0 {
            if s.seq.is_some() {
                self.tick += 1;
                s.lru_tick = self.tick;
                self.lru.insert(self.tick, slot);
            } else {
                self.free.push(slot);
            }
        }
    }

    /// Forgets every unreferenced cached block (vLLM's prefix-cache reset). Emits `Cleared` when
    /// nothing is referenced, else one `Removed` for what was dropped.
    pub fn reset_prefix_cache(&mut self) {
        let dropped: Vec<SlotId> = std::mem::take(&mut self.lru).into_values().collect();
        let mut hashes = Vec::with_capacity(dropped.len());
        for id in dropped {
            if let Some(seq) = self.slots[id as usize].seq.take() {
                self.cached.remove(&seq);
                hashes.push(engine_hash(seq));
            }
            self.free.push(id);
        }
        if self.cached.is_empty() {
            self.events.push(CacheEvent::Cleared);
        } else if !hashes.is_empty() {
            self.events.push(CacheEvent::Removed { hashes });
        }
    }

    fn push_removed(&mut self, hash: ExternalHash) {
        if let Some(CacheEvent::Removed { hashes }) = self.events.last_mut() {
            hashes.push(hash);
        } else {
            self.events.push(CacheEvent::Removed { hashes: vec![hash] });
        }
    }

    /// Events since the last call, in order.
    pub fn drain_events(&mut self) -> Vec<CacheEvent> {
        std::mem::take(&mut self.events)
    }

    /// Internal consistency, for tests: every slot is exactly one of free / in LRU / referenced.
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut state = vec![0u8; self.slots.len()];
        for &id in &self.free {
            state[id as usize] += 1;
            if self.slots[id as usize].refs != 0 || self.slots[id as usize].seq.is_some() {
                return Err(format!("free slot {id} is referenced or cached"));
            }
        }
        for &id in self.lru.values() {
            state[id as usize] += 1;
            if self.slots[id as usize].refs != 0 || self.slots[id as usize].seq.is_none() {
                return Err(format!("lru slot {id} is referenced or uncached"));
            }
        }
        for (i, s) in self.slots.iter().enumerate() {
            if s.refs > 0 {
                state[i] += 1;
            }
            if state[i] != 1 {
                return Err(format!("slot {i} is in {} states", state[i]));
            }
            if let Some(seq) = s.seq
                && self.cached.get(&seq) != Some(&(i as SlotId))
            {
                return Err(format!(
                    "slot {i} caches a prefix the map does not point back to"
                ));
            }
        }
        Ok(())
    }
}

impl CacheEvent {
    /// The router's event model (tokens dropped: the router only needs the local hashes).
    pub fn to_kv_event(
        &self,
        source: kvgate_core::WorkerRank,
        event_id: u64,
    ) -> kvgate_core::KvEvent {
        use kvgate_core::{KvEvent, KvEventData, StorageTier, StoredBlock};
        let data = match self {
            CacheEvent::Stored { parent, blocks } => KvEventData::Stored {
                parent: *parent,
                blocks: blocks
                    .iter()
                    .map(|b| StoredBlock {
                        hash: b.hash,
                        local: b.local,
                    })
                    .collect(),
            },
            CacheEvent::Removed { hashes } => KvEventData::Removed {
                blocks: hashes.clone(),
            },
            CacheEvent::Cleared => KvEventData::Cleared,
        };
        KvEvent {
            source,
            event_id,
            tier: StorageTier::Device,
            data,
        }
    }
}
