//! The prefix index: which (worker, dp rank) holds which prefix, per storage tier, fed by KV events.
//!
//! Layout, chosen so that a `Stored` chain is written and a query is answered by walking memory
//! in order, instead of one random hash-table probe per block:
//! - `slots`: one [`Position`] per distinct prefix: its chained [`SeqHash`], its parent's slot
//!   and its holder set (`member << 2 | tier` entries, interned, see `holders`), 16 bytes; the
//!   content hash and the child count sit in parallel arrays that lookups never read. A prefix
//!   shared by many workers is stored once.
//! - A position usually sits in the slot right after its parent's: a new chain is allocated
//!   slot after slot, and freed slots are reused last-in first-out, which hands back the runs
//!   that LRU eviction frees (a chain's tail goes deepest block first) in ascending order.
//!   Positions that do not (roots, a parent's second child, a chain cut by the allocator) are
//!   *heads* and are found through `heads`, a map from chained hash to slot. So a position is
//!   found from its parent in one step: the next slot, else the heads map. Only heads cost a
//!   hash-table entry.
//! - A position leaves when no one holds it and no child position is left under it (a worker
//!   may evict a block in the middle of a chain and keep the tail: the held tail keeps its
//!   unheld ancestors, which match nobody, until it goes too).
//! - per member (an interned (worker, dp rank)): one map per tier from the engine's
//!   [`ExternalHash`] to the slot, so `Removed` events (which name engine hashes) and `Stored`
//!   parents resolve in O(1) in a table of the member's own size.
//!
//! A query walks the request's chained hashes from the root, intersecting holder lists; a
//! holder's score in a tier is the number of leading blocks it holds there.
//!
//! Events may arrive out of order (a child before its parent): such `Stored` events are parked,
//! bounded, until the parent appears. Duplicates are idempotent. Unknown removals are counted
//! and ignored.

use crate::blockmap::BlockMap;
use crate::events::{KvEvent, KvEventData, StoredBlock};
use crate::fasthash::FastMap;
use crate::hashing::seq_hash_after;
use crate::holders::{HolderSets, NO_HOLDERS, SetRef};
use crate::ids::{ExternalHash, LocalHash, SeqHash, StorageTier, WorkerId, WorkerRank};
use crate::orphans::{Orphan, OrphanLot};

/// `member << 2 | tier`.
type Holder = u32;

pub(crate) const TIERS: usize = 4;

/// The most members (interned (worker, dp rank) pairs) an index can hold at once.
pub const MAX_MEMBERS: usize = 1 << 28;

/// Default bound on blocks parked while waiting for an unknown parent.
pub const DEFAULT_ORPHAN_CAPACITY: usize = 65_536;

/// An event's blocks are applied in batches of this many, each batch's member-table buckets
/// loaded together first (see `BlockMap::touch_all`).
const TOUCH_BATCH: usize = 32;

/// The parent of a root position.
const ROOT: u32 = u32::MAX;
/// The parent field of a free slot.
const FREE: u32 = u32::MAX - 1;
/// The most positions the index holds; blocks past it are counted and not indexed.
const MAX_POSITIONS: usize = (u32::MAX - 2) as usize;

/// What a lookup reads of a position (16 bytes, so that a walk streams little memory); its
/// content hash and child count live in parallel arrays.
#[derive(Clone, Debug)]
struct Position {
    seq: SeqHash,
    /// The parent's slot, [`ROOT`], or [`FREE`].
    parent: u32,
    holders: SetRef,
}

impl Position {
    fn free() -> Self {
        Self {
            seq: SeqHash(0),
            parent: FREE,
            holders: NO_HOLDERS,
        }
    }
}

/// Whether the position in `slot` with parent `parent` is found through the heads map.
fn is_head(slot: u32, parent: u32) -> bool {
    parent == ROOT || slot == 0 || parent != slot - 1
}

#[derive(Debug, Default)]
struct Member {
    key: Option<WorkerRank>,
    /// Engine hash -> slot, per tier.
    blocks: [BlockMap; TIERS],
    /// Extra engine hashes naming a prefix this member already holds in that tier (engines with
    /// extra hash keys, two connectors, ...), by slot: the holder entry goes only when the last
    /// one goes. Sparse: almost always empty.
    extra: [FastMap<u32, u32>; TIERS],
    last_event_id: Option<u64>,
}

/// Counters of what the index did with the events it was given (never reset).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IndexStats {
    pub events_applied: u64,
    pub blocks_stored: u64,
    pub blocks_removed: u64,
    /// `Stored` blocks that named a block already held with the same content.
    pub duplicate_blocks: u64,
    /// `Removed` hashes the member did not hold.
    pub unknown_removals: u64,
    /// Blocks parked because their parent was unknown when they arrived.
    pub orphans_parked: u64,
    /// Parked blocks applied once their parent arrived.
    pub orphans_adopted: u64,
    /// Parked blocks dropped (capacity exceeded, removed while parked, or owner cleared).
    pub orphans_dropped: u64,
    pub clears: u64,
    /// Blocks not indexed because the index holds the most positions it can address.
    pub blocks_over_capacity: u64,
}

/// Per-tier count of leading request blocks that one (worker, dp rank) holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TierOverlap(pub [u32; TIERS]);

impl TierOverlap {
    pub fn get(&self, tier: StorageTier) -> u32 {
        self.0[tier.index()]
    }
    pub fn device(&self) -> u32 {
        self.0[0]
    }
}

/// The answer to "how many leading blocks of this request does each worker hold?".
/// Workers that hold nothing are absent.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OverlapScores {
    pub scores: FastMap<WorkerRank, TierOverlap>,
}

impl OverlapScores {
    pub fn get(&self, worker: &WorkerRank) -> TierOverlap {
        // Most of a big fleet holds nothing of a prompt: skip hashing for an empty answer.
        if self.scores.is_empty() {
            return TierOverlap::default();
        }
        self.scores.get(worker).copied().unwrap_or_default()
    }
    pub fn device(&self, worker: &WorkerRank) -> u32 {
        self.get(worker).device()
    }
    pub fn max_device(&self) -> u32 {
        self.scores.values().map(|o| o.device()).max().unwrap_or(0)
    }
}

#[derive(Debug)]
pub struct PrefixIndex {
    slots: Vec<Position>,
    /// Per slot: the block's content hash (for dumps).
    locals: Vec<LocalHash>,
    /// Per slot: live positions whose parent it is.
    children: Vec<u32>,
    /// Free slots, reused last in, first out.
    free: Vec<u32>,
    /// Chained hash -> slot of every live position not stored right after its parent.
    heads: FastMap<SeqHash, u32>,
    live: usize,
    sets: HolderSets,
    members: Vec<Member>,
    member_ids: FastMap<WorkerRank, u32>,
    free_members: Vec<u32>,
    orphans: OrphanLot,
    stats: IndexStats,
}

impl Default for PrefixIndex {
    fn default() -> Self {
        Self::new()
    }
}

impl PrefixIndex {
    pub fn new() -> Self {
        Self::with_orphan_capacity(DEFAULT_ORPHAN_CAPACITY)
    }

    pub fn with_orphan_capacity(orphan_capacity: usize) -> Self {
        Self {
            slots: Vec::new(),
            locals: Vec::new(),
            children: Vec::new(),
            free: Vec::new(),
            heads: FastMap::default(),
            live: 0,
            sets: HolderSets::default(),
            members: Vec::new(),
            member_ids: FastMap::default(),
            free_members: Vec::new(),
            orphans: OrphanLot::new(orphan_capacity),
            stats: IndexStats::default(),
        }
    }

    pub fn stats(&self) -> IndexStats {
        IndexStats {
            orphans_parked: self.orphans.parked,
            orphans_adopted: self.orphans.adopted,
            orphans_dropped: self.orphans.dropped,
            ..self.stats
        }
    }

    /// Distinct prefixes (positions) in the index: those held by anyone, and unheld ancestors
    /// kept for a held descendant.
    pub fn num_nodes(&self) -> usize {
        self.live
    }

    /// Positions not stored right after their parent (found through a hash table; the rest are
    /// found by reading the next slot). A layout figure for benchmarks.
    pub fn num_heads(&self) -> usize {
        self.heads.len()
    }

    /// Blocks held by one (worker, dp rank) in one tier.
    pub fn num_blocks(&self, worker: WorkerRank, tier: StorageTier) -> usize {
        self.member(worker)
            .map_or(0, |m| m.blocks[tier.index()].len())
    }

    /// (worker, dp rank) pairs that hold at least one block or have sent an event.
    pub fn workers(&self) -> Vec<WorkerRank> {
        let mut v: Vec<WorkerRank> = self.member_ids.keys().copied().collect();
        v.sort_unstable();
        v
    }

    pub fn last_event_id(&self, worker: WorkerRank) -> Option<u64> {
        self.member(worker).and_then(|m| m.last_event_id)
    }

    /// Blocks parked while waiting for their parent.
    pub fn num_orphan_blocks(&self) -> usize {
        self.orphans.blocks()
    }

    fn member(&self, worker: WorkerRank) -> Option<&Member> {
        self.member_ids
            .get(&worker)
            .map(|&id| &self.members[id as usize])
    }

    fn intern(&mut self, worker: WorkerRank) -> u32 {
        if let Some(&id) = self.member_ids.get(&worker) {
            return id;
        }
        let id = match self.free_members.pop() {
            Some(id) => id,
            None => {
                let id = self.members.len();
                assert!(id < MAX_MEMBERS, "prefix index member limit reached");
                self.members.push(Member::default());
                id as u32
            }
        };
        self.members[id as usize].key = Some(worker);
        self.member_ids.insert(worker, id);
        id
    }

    /// Applies one event. Never fails: anything inconsistent is counted in [`IndexStats`].
    pub fn apply(&mut self, event: &KvEvent) {
        let m = self.intern(event.source);
        let member = &mut self.members[m as usize];
        member.last_event_id = Some(
            member
                .last_event_id
                .map_or(event.event_id, |l| l.max(event.event_id)),
        );
        self.stats.events_applied += 1;
        match &event.data {
            KvEventData::Stored { parent, blocks } => {
                self.apply_stored(m, event.tier, *parent, blocks)
            }
            KvEventData::Removed { blocks } => {
                for batch in blocks.chunks(TOUCH_BATCH) {
                    self.members[m as usize].blocks[event.tier.index()]
                        .touch_all(batch.iter().map(|h| h.0));
                    for &h in batch {
                        self.remove_block(m, event.tier, h);
                    }
                }
            }
            KvEventData::Cleared => {
                self.stats.clears += 1;
                self.clear_member(m);
            }
        }
    }

    fn lookup(&self, m: u32, tier: StorageTier, hash: ExternalHash) -> Option<u32> {
        let member = &self.members[m as usize];
        // The parent usually lives in the same tier; after an offload it may live in another.
        if let Some(s) = member.blocks[tier.index()].get(hash.0) {
            return Some(s);
        }
        member.blocks.iter().find_map(|b| b.get(hash.0))
    }

    /// The child of `parent` (a slot or [`ROOT`]) whose chained hash is `seq`.
    #[inline]
    fn child(&self, parent: u32, seq: SeqHash) -> Option<u32> {
        if parent != ROOT
            && let Some(p) = self.slots.get(parent as usize + 1)
            && p.parent == parent
            && p.seq == seq
        {
            return Some(parent + 1);
        }
        self.heads
            .get(&seq)
            .copied()
            .filter(|&h| self.slots[h as usize].parent == parent)
    }

    fn apply_stored(
        &mut self,
        m: u32,
        tier: StorageTier,
        parent: Option<ExternalHash>,
        blocks: &[StoredBlock],
    ) {
        if blocks.is_empty() {
            return;
        }
        let prev = match parent {
            None => ROOT,
            Some(p) => match self.lookup(m, tier, p) {
                Some(s) => s,
                None => {
                    self.orphans.park(
                        m,
                        p,
                        Orphan {
                            tier,
                            blocks: blocks.to_vec(),
                        },
                    );
                    return;
                }
            },
        };
        let map = &mut self.members[m as usize].blocks[tier.index()];
        map.reserve(blocks.len());
        self.store_chain(m, tier, prev, blocks);
        // Parked chains this one unblocked, and the ones those unblock.
        let mut work: Vec<(u32, Orphan)> = Vec::new();
        if self.orphans.blocks() > 0 {
            for b in blocks {
                if let Some(slot) = self.members[m as usize].blocks[tier.index()].get(b.hash.0) {
                    for child in self.orphans.take(m, b.hash) {
                        work.push((slot, child));
                    }
                }
            }
        }
        self.adopt(m, work);
    }

    /// Stores parked chains under the slots they now hang from, and the chains those unblock.
    fn adopt(&mut self, m: u32, mut work: Vec<(u32, Orphan)>) {
        while let Some((prev, chain)) = work.pop() {
            self.orphans.count_adopted(chain.blocks.len());
            self.store_chain(m, chain.tier, prev, &chain.blocks);
            for b in &chain.blocks {
                if let Some(slot) =
                    self.members[m as usize].blocks[chain.tier.index()].get(b.hash.0)
                {
                    for child in self.orphans.take(m, b.hash) {
                        work.push((slot, child));
                    }
                }
            }
        }
    }

    /// Stores `blocks` as a chain under `prev` (a slot or [`ROOT`]).
    fn store_chain(&mut self, m: u32, tier: StorageTier, mut prev: u32, blocks: &[StoredBlock]) {
        // Once a position is created here, everything after it is new too: it had no children.
        let mut fresh = false;
        for (i, b) in blocks.iter().enumerate() {
            let prev_seq = (prev != ROOT).then(|| self.slots[prev as usize].seq);
            let seq = seq_hash_after(prev_seq, b.local);
            if i % TOUCH_BATCH == 0 {
                let batch = &blocks[i..blocks.len().min(i + TOUCH_BATCH)];
                self.members[m as usize].blocks[tier.index()]
                    .touch_all(batch.iter().map(|b| b.hash.0));
            }
            let found = if fresh { None } else { self.child(prev, seq) };
            let slot = match found {
                Some(s) => s,
                None => match self.create(prev, seq, b.local) {
                    Some(s) => {
                        fresh = true;
                        s
                    }
                    None => {
                        self.stats.blocks_over_capacity += (blocks.len() - i) as u64;
                        return;
                    }
                },
            };
            self.hold(m, tier, b.hash, slot);
            prev = slot;
        }
    }

    /// A new, unheld position under `parent`; `None` when the index is full.
    fn create(&mut self, parent: u32, seq: SeqHash, local: LocalHash) -> Option<u32> {
        let pos = Position {
            seq,
            parent,
            holders: NO_HOLDERS,
        };
        let slot = match self.free.pop() {
            Some(s) => {
                self.slots[s as usize] = pos;
                self.locals[s as usize] = local;
                self.children[s as usize] = 0;
                s
            }
            None => {
                if self.slots.len() >= MAX_POSITIONS {
                    return None;
                }
                self.slots.push(pos);
                self.locals.push(local);
                self.children.push(0);
                (self.slots.len() - 1) as u32
            }
        };
        if parent != ROOT {
            self.children[parent as usize] += 1;
        }
        if is_head(slot, parent) {
            self.heads.insert(seq, slot);
        }
        self.live += 1;
        Some(slot)
    }

    /// Records that member `m` holds `slot` in `tier` under the engine's name `hash`.
    fn hold(&mut self, m: u32, tier: StorageTier, hash: ExternalHash, slot: u32) {
        let old = self.members[m as usize].blocks[tier.index()].insert(hash.0, slot);
        if old == Some(slot) {
            self.stats.duplicate_blocks += 1;
            return;
        }
        self.stats.blocks_stored += 1;
        let holder = (m << 2) | tier.index() as u32;
        let set = self.slots[slot as usize].holders;
        if set == NO_HOLDERS {
            // The common case (a new position): the set of one is the holder itself.
            self.slots[slot as usize].holders = holder;
        } else if self.sets.contains(set, holder) {
            // Another engine hash of this member already names this prefix.
            *self.members[m as usize].extra[tier.index()]
                .entry(slot)
                .or_insert(0) += 1;
        } else {
            self.slots[slot as usize].holders = self.sets.with(set, holder);
        }
        // The engine reused a hash for other content: forget the old placement (after the new
        // one is held, so that freeing the old one cannot take the new one with it).
        if let Some(old) = old {
            self.unhold(m, tier, old);
        }
    }

    /// Releases one engine hash's claim on `slot`; the holder goes with the last claim.
    fn unhold(&mut self, m: u32, tier: StorageTier, slot: u32) {
        let extra = &mut self.members[m as usize].extra[tier.index()];
        if !extra.is_empty()
            && let Some(c) = extra.get_mut(&slot)
        {
            *c -= 1;
            if *c == 0 {
                extra.remove(&slot);
            }
            return;
        }
        let holder = (m << 2) | tier.index() as u32;
        let held = self.slots[slot as usize].holders;
        // The common case (the only holder leaves) needs no set arithmetic.
        let set = if held == holder {
            NO_HOLDERS
        } else {
            self.sets.without(held, holder)
        };
        self.slots[slot as usize].holders = set;
        if set == NO_HOLDERS {
            self.release(slot);
        }
    }

    /// Frees `slot` and then its ancestors while they are neither held nor have children.
    fn release(&mut self, mut slot: u32) {
        loop {
            let pos = &mut self.slots[slot as usize];
            if pos.holders != NO_HOLDERS || pos.parent == FREE || self.children[slot as usize] > 0 {
                return;
            }
            let parent = pos.parent;
            let seq = pos.seq;
            *pos = Position::free();
            if is_head(slot, parent) && self.heads.get(&seq) == Some(&slot) {
                self.heads.remove(&seq);
            }
            self.free.push(slot);
            self.live -= 1;
            if parent == ROOT {
                return;
            }
            self.children[parent as usize] -= 1;
            slot = parent;
        }
    }

    fn remove_block(&mut self, m: u32, tier: StorageTier, hash: ExternalHash) {
        match self.members[m as usize].blocks[tier.index()].remove(hash.0) {
            Some(slot) => {
                self.stats.blocks_removed += 1;
                self.unhold(m, tier, slot);
            }
            None => {
                self.stats.unknown_removals += 1;
                // A parked block removed: the rest of its chain now waits for it. Another tier
                // of the member may hold that block already (an offload), and a `Stored` naming
                // it as parent would resolve there: so the rest is adopted now, as a restore
                // from a dump would place it.
                if self.orphans.remove_block(m, tier, hash)
                    && let Some(slot) = self.lookup(m, tier, hash)
                {
                    let work = self
                        .orphans
                        .take(m, hash)
                        .into_iter()
                        .map(|chain| (slot, chain))
                        .collect();
                    self.adopt(m, work);
                }
            }
        }
    }

    fn clear_member(&mut self, m: u32) {
        for t in 0..TIERS {
            let blocks = std::mem::take(&mut self.members[m as usize].blocks[t]);
            self.stats.blocks_removed += blocks.len() as u64;
            self.members[m as usize].extra[t].clear();
            for slot in blocks.values() {
                self.unhold(m, StorageTier::from_index(t), slot);
            }
        }
        self.orphans.clear_member(m);
    }

    /// Forgets every dp rank of a worker (it left discovery): blocks, parked events, identity.
    pub fn remove_worker(&mut self, worker: WorkerId) {
        let ranks: Vec<WorkerRank> = self
            .member_ids
            .keys()
            .filter(|k| k.worker == worker)
            .copied()
            .collect();
        for rank in ranks {
            self.remove_worker_rank(rank);
        }
    }

    /// Forgets one (worker, dp rank).
    pub fn remove_worker_rank(&mut self, worker: WorkerRank) {
        if let Some(m) = self.member_ids.remove(&worker) {
            self.clear_member(m);
            let member = &mut self.members[m as usize];
            member.key = None;
            member.last_event_id = None;
            for e in &mut member.extra {
                e.shrink_to_fit();
            }
            self.free_members.push(m);
        }
    }

    /// For each (worker, dp rank), how many leading blocks of `seqs` it holds, per tier.
    pub fn find_matches(&self, seqs: &[SeqHash]) -> OverlapScores {
        let mut out = OverlapScores::default();
        let Some(mut slot) = seqs.first().and_then(|&s| self.child(ROOT, s)) else {
            return out;
        };
        let first = &self.slots[slot as usize].holders;
        let mut cur: Vec<Holder> = self.sets.members(first).to_vec();
        if cur.is_empty() {
            return out;
        }
        out.scores.reserve(cur.len());
        // The ref of the set `cur` equals, if any: while the walk stays on positions with that
        // set (almost every step), a step is one integer compare.
        let mut cur_ref = Some(*first);
        let mut next: Vec<Holder> = Vec::with_capacity(cur.len());
        let record = |holder: Holder, depth: usize, out: &mut OverlapScores| {
            let member = &self.members[(holder >> 2) as usize];
            if let Some(key) = member.key {
                let e = out.scores.entry(key).or_default();
                e.0[(holder & 3) as usize] = depth as u32;
            }
        };
        let mut depth = 1;
        while depth < seqs.len() {
            // Fast path: the chain goes on in the next slot with the same holder set. (A
            // matching chained hash names the prefix, so its parent is `slot`.)
            if let Some(r) = cur_ref {
                let run = self.slots[slot as usize + 1..]
                    .iter()
                    .zip(&seqs[depth..])
                    .take_while(|(p, q)| p.seq == **q && p.holders == r)
                    .count();
                slot += run as u32;
                depth += run;
                if depth >= seqs.len() {
                    break;
                }
            }
            let Some(s) = self.child(slot, seqs[depth]) else {
                break;
            };
            slot = s;
            let set = &self.slots[s as usize].holders;
            if cur_ref == Some(*set) {
                depth += 1;
                continue;
            }
            let holders = self.sets.members(set);
            // Sorted-merge intersection; those that drop out score `depth`.
            next.clear();
            let (mut i, mut j) = (0, 0);
            while i < cur.len() {
                if j >= holders.len() || cur[i] < holders[j] {
                    record(cur[i], depth, &mut out);
                    i += 1;
                } else if cur[i] > holders[j] {
                    j += 1;
                } else {
                    next.push(cur[i]);
                    i += 1;
                    j += 1;
                }
            }
            std::mem::swap(&mut cur, &mut next);
            if cur.is_empty() {
                return out;
            }
            cur_ref = (cur.len() == holders.len()).then_some(*set);
            depth += 1;
        }
        for &h in &cur {
            record(h, depth, &mut out);
        }
        out
    }

    /// Every block held, as (worker, tier, engine hash, chained hash), sorted. For tests and debugging.
    pub fn blocks(&self) -> Vec<(WorkerRank, StorageTier, ExternalHash, SeqHash)> {
        let mut out = Vec::new();
        for member in &self.members {
            let Some(key) = member.key else { continue };
            for (t, map) in member.blocks.iter().enumerate() {
                for (h, slot) in map.iter() {
                    out.push((
                        key,
                        StorageTier::from_index(t),
                        ExternalHash(h),
                        self.slots[slot as usize].seq,
                    ));
                }
            }
        }
        out.sort_unstable();
        out
    }

    /// Blocks whose whole prefix the holder also holds (in any tier): the only blocks that can
    /// ever contribute to a match. Sorted.
    pub fn reachable_blocks(&self) -> Vec<(WorkerRank, StorageTier, ExternalHash, SeqHash)> {
        let mut out = Vec::new();
        for member in &self.members {
            let Some(key) = member.key else { continue };
            let held: crate::fasthash::FastSet<u32> =
                member.blocks.iter().flat_map(BlockMap::values).collect();
            let mut reachable: FastMap<u32, bool> = FastMap::default();
            for (t, map) in member.blocks.iter().enumerate() {
                for (h, slot) in map.iter() {
                    if self.is_reachable(slot, &held, &mut reachable) {
                        out.push((
                            key,
                            StorageTier::from_index(t),
                            ExternalHash(h),
                            self.slots[slot as usize].seq,
                        ));
                    }
                }
            }
        }
        out.sort_unstable();
        out
    }

    fn is_reachable(
        &self,
        slot: u32,
        held: &crate::fasthash::FastSet<u32>,
        memo: &mut FastMap<u32, bool>,
    ) -> bool {
        // Walk up to the first ancestor with a known answer, then fill the memo on the way back.
        let mut path = Vec::new();
        let mut cur = slot;
        let mut answer = true;
        while cur != ROOT {
            if let Some(&known) = memo.get(&cur) {
                answer = known;
                break;
            }
            if !held.contains(&cur) {
                answer = false;
                break;
            }
            path.push(cur);
            cur = self.slots[cur as usize].parent;
        }
        for s in path {
            memo.insert(s, answer);
        }
        answer
    }

    /// The index's state as `Stored` events: every matchable block, parents before children
    /// (ordered by depth across tiers), one event per (worker, tier, parent); then the chains
    /// still parked for a missing parent. Restoring them into an empty index reproduces every
    /// answer of [`find_matches`](Self::find_matches). Blocks whose prefix is no longer held are
    /// left out: they cannot match. Each event carries the member's last applied event id.
    pub fn dump_events(&self) -> Vec<KvEvent> {
        let mut events = Vec::new();
        self.dump_each(|e| events.push(e));
        events
    }

    /// [`dump_events`](Self::dump_events) one event at a time, in the same order, without
    /// holding the whole list (a snapshot of a large index is encoded as it is dumped).
    pub fn dump_each(&self, mut f: impl FnMut(KvEvent)) {
        for member in &self.members {
            let Some(key) = member.key else { continue };
            let event_id = member.last_event_id.unwrap_or(0);
            // The engine hash by which this member names each position (device preferred).
            let mut ext_of: FastMap<u32, ExternalHash> = FastMap::default();
            for map in member.blocks.iter().rev() {
                for (h, slot) in map.iter() {
                    ext_of.insert(slot, ExternalHash(h));
                }
            }
            let held: crate::fasthash::FastSet<u32> = ext_of.keys().copied().collect();
            let mut memo = FastMap::default();
            let mut depths: FastMap<u32, usize> = FastMap::default();
            let mut rows: Vec<(usize, usize, Option<ExternalHash>, StoredBlock)> = Vec::new();
            for (t, map) in member.blocks.iter().enumerate() {
                for (h, slot) in map.iter() {
                    let h = ExternalHash(h);
                    if !self.is_reachable(slot, &held, &mut memo) {
                        continue;
                    }
                    let pos = &self.slots[slot as usize];
                    let depth = self.depth_of(slot, &mut depths);
                    let parent_ext = (pos.parent != ROOT)
                        .then(|| ext_of.get(&pos.parent).copied())
                        .flatten();
                    rows.push((
                        depth,
                        t,
                        parent_ext,
                        StoredBlock {
                            hash: h,
                            local: self.locals[slot as usize],
                        },
                    ));
                }
            }
            rows.sort_unstable_by_key(|r| (r.0, r.1, r.2, r.3.hash));
            for (_, t, parent, block) in rows {
                f(KvEvent {
                    source: key,
                    event_id,
                    tier: StorageTier::from_index(t),
                    data: KvEventData::Stored {
                        parent,
                        blocks: vec![block],
                    },
                });
            }
        }
        let mut parked: Vec<(u32, ExternalHash, &Orphan)> = self.orphans.iter().collect();
        parked.sort_unstable_by_key(|(m, p, o)| (*m, *p, o.tier, o.blocks.first().map(|b| b.hash)));
        for (m, parent, orphan) in parked {
            let member = &self.members[m as usize];
            let Some(key) = member.key else { continue };
            f(KvEvent {
                source: key,
                event_id: member.last_event_id.unwrap_or(0),
                tier: orphan.tier,
                data: KvEventData::Stored {
                    parent: Some(parent),
                    blocks: orphan.blocks.clone(),
                },
            });
        }
    }

    /// Distance from the root, memoised so that dumping is linear in the number of blocks.
    fn depth_of(&self, slot: u32, memo: &mut FastMap<u32, usize>) -> usize {
        let mut path = Vec::new();
        let mut cur = slot;
        let mut base = 0;
        while cur != ROOT {
            if let Some(&d) = memo.get(&cur) {
                base = d + 1;
                break;
            }
            path.push(cur);
            cur = self.slots[cur as usize].parent;
        }
        for (d, s) in (base..).zip(path.into_iter().rev()) {
            memo.insert(s, d);
        }
        memo.get(&slot).copied().unwrap_or(0)
    }

    /// Checks the layout's invariants (for tests): every live position is found from its
    /// parent, children counts are exact, nothing unheld and childless is kept, the free list
    /// and the heads map name exactly the free slots and the heads. Returns what is wrong.
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut children = vec![0u32; self.slots.len()];
        let mut live = 0;
        for (i, p) in self.slots.iter().enumerate() {
            if p.parent == FREE {
                continue;
            }
            live += 1;
            if p.parent != ROOT {
                match self.slots.get(p.parent as usize) {
                    Some(q) if q.parent != FREE => children[p.parent as usize] += 1,
                    _ => return Err(format!("slot {i}: parent {} is not live", p.parent)),
                }
            }
            if self.child(p.parent, p.seq) != Some(i as u32) {
                return Err(format!("slot {i} is not found from its parent"));
            }
        }
        for (i, p) in self.slots.iter().enumerate() {
            if p.parent == FREE {
                continue;
            }
            if self.children[i] != children[i] {
                return Err(format!(
                    "slot {i}: {} children counted, {} live",
                    self.children[i], children[i]
                ));
            }
            if p.holders == NO_HOLDERS && self.children[i] == 0 {
                return Err(format!("slot {i} is neither held nor a parent"));
            }
        }
        if live != self.live {
            return Err(format!("{live} live positions, {} counted", self.live));
        }
        if self.free.len() + live != self.slots.len() {
            return Err("the free list does not match the free slots".into());
        }
        let heads = self
            .slots
            .iter()
            .enumerate()
            .filter(|(i, p)| p.parent != FREE && is_head(*i as u32, p.parent))
            .count();
        if heads != self.heads.len() {
            return Err(format!("{heads} heads, {} in the map", self.heads.len()));
        }
        for (mi, member) in self.members.iter().enumerate() {
            for (t, map) in member.blocks.iter().enumerate() {
                for slot in map.values() {
                    let holder = ((mi as u32) << 2) | t as u32;
                    if !self
                        .sets
                        .contains(self.slots[slot as usize].holders, holder)
                    {
                        return Err(format!("member block in slot {slot} is not a holder there"));
                    }
                }
            }
        }
        self.sets.check(
            self.slots
                .iter()
                .filter(|p| p.parent != FREE)
                .map(|p| p.holders),
        )
    }

    /// Approximate heap bytes used by the index's own structures (for memory benchmarks).
    pub fn approx_heap_bytes(&self) -> usize {
        fn map_bytes<K, V, S>(m: &std::collections::HashMap<K, V, S>) -> usize {
            // hashbrown: buckets of (K, V) plus one control byte each (+ a group of padding).
            let buckets = if m.capacity() == 0 {
                0
            } else {
                (m.capacity() * 8 / 7).next_power_of_two()
            };
            buckets * (std::mem::size_of::<(K, V)>() + 1)
        }
        let mut total = self.slots.capacity() * std::mem::size_of::<Position>()
            + self.locals.capacity() * std::mem::size_of::<LocalHash>()
            + self.children.capacity() * std::mem::size_of::<u32>();
        total += self.sets.heap_bytes();
        total += self.free.capacity() * std::mem::size_of::<u32>();
        total += map_bytes(&self.heads);
        total += self.members.capacity() * std::mem::size_of::<Member>();
        for m in &self.members {
            total += m.blocks.iter().map(BlockMap::heap_bytes).sum::<usize>();
            total += m.extra.iter().map(map_bytes).sum::<usize>();
        }
        total += map_bytes(&self.member_ids);
        total
    }
}
