//! The prefix index: which (worker, dp rank) holds which prefix, per storage tier, fed by KV events.
//!
//! Layout, chosen for memory at 1,000 workers x 16,384 blocks and for cheap queries:
//! - `nodes`: one entry per distinct prefix, keyed by the router's chained [`SeqHash`], holding a
//!   sorted, inline-first list of holders (`member << 2 | tier` in a `u32`). A prefix shared by
//!   many workers is stored once.
//! - per member (an interned (worker, dp rank)): one map per tier from the engine's
//!   [`ExternalHash`] to the node's `SeqHash`, so `Removed` events (which name engine hashes) and
//!   `Stored` parents resolve in O(1).
//!
//! A query walks the request's chained hashes from the root, intersecting holder lists; a
//! holder's score in a tier is the number of leading blocks it holds there.
//!
//! Events may arrive out of order (a child before its parent): such `Stored` events are parked,
//! bounded, until the parent appears. Duplicates are idempotent. Unknown removals are counted
//! and ignored.

use crate::events::{KvEvent, KvEventData, StoredBlock};
use crate::fasthash::FastMap;
use crate::hashing::seq_hash_after;
use crate::holders::Holders;
use crate::ids::{ExternalHash, LocalHash, SeqHash, StorageTier, WorkerId, WorkerRank};
use crate::orphans::{Orphan, OrphanLot};

/// `member << 2 | tier`.
type Holder = u32;

const TIERS: usize = 4;

/// The most members (interned (worker, dp rank) pairs) an index can hold at once.
pub const MAX_MEMBERS: usize = 1 << 30;

/// Default bound on blocks parked while waiting for an unknown parent.
pub const DEFAULT_ORPHAN_CAPACITY: usize = 65_536;

#[derive(Clone, Debug)]
struct Node {
    local: LocalHash,
    /// The parent prefix; a root names itself (a prefix cannot be its own parent), which saves
    /// the 8 bytes an `Option` would cost on every node.
    parent: SeqHash,
    holders: Holders,
}

impl Node {
    fn parent(&self, me: SeqHash) -> Option<SeqHash> {
        (self.parent != me).then_some(self.parent)
    }
}

#[derive(Debug, Default)]
struct Member {
    key: Option<WorkerRank>,
    blocks: [FastMap<ExternalHash, SeqHash>; TIERS],
    /// Extra engine hashes naming a prefix this member already holds in that tier (engines with
    /// extra hash keys, two connectors, ...): the holder entry goes only when the last one goes.
    /// Sparse: almost always empty.
    extra: [FastMap<SeqHash, u32>; TIERS],
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
    nodes: FastMap<SeqHash, Node>,
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
            nodes: FastMap::default(),
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

    /// Distinct prefixes (nodes) held by anyone.
    pub fn num_nodes(&self) -> usize {
        self.nodes.len()
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
                self.apply_stored(m, event.tier, *parent, blocks.clone())
            }
            KvEventData::Removed { blocks } => {
                for &h in blocks {
                    self.remove_block(m, event.tier, h);
                }
            }
            KvEventData::Cleared => {
                self.stats.clears += 1;
                self.clear_member(m);
            }
        }
    }

    fn lookup(&self, m: u32, tier: StorageTier, hash: ExternalHash) -> Option<SeqHash> {
        let member = &self.members[m as usize];
        // The parent usually lives in the same tier; after an offload it may live in another.
        if let Some(&s) = member.blocks[tier.index()].get(&hash) {
            return Some(s);
        }
        member.blocks.iter().find_map(|b| b.get(&hash).copied())
    }

    fn apply_stored(
        &mut self,
        m: u32,
        tier: StorageTier,
        parent: Option<ExternalHash>,
        blocks: Vec<StoredBlock>,
    ) {
        if blocks.is_empty() {
            return;
        }
        let prev = match parent {
            None => None,
            Some(p) => match self.lookup(m, tier, p) {
                Some(s) => Some(s),
                None => {
                    self.orphans.park(m, p, Orphan { tier, blocks });
                    return;
                }
            },
        };
        // Chains to apply: this one, then any parked children it unblocks (iteratively).
        let mut work: Vec<(Option<SeqHash>, Orphan)> = vec![(prev, Orphan { tier, blocks })];
        let mut first = true;
        while let Some((mut prev, chain)) = work.pop() {
            if !first {
                self.orphans.count_adopted(chain.blocks.len());
            }
            first = false;
            for b in &chain.blocks {
                let seq = seq_hash_after(prev, b.local);
                self.insert_block(m, chain.tier, b.hash, seq, b.local, prev);
                prev = Some(seq);
                for child in self.orphans.take(m, b.hash) {
                    work.push((Some(seq), child));
                }
            }
        }
    }

    fn insert_block(
        &mut self,
        m: u32,
        tier: StorageTier,
        hash: ExternalHash,
        seq: SeqHash,
        local: LocalHash,
        parent: Option<SeqHash>,
    ) {
        let old = self.members[m as usize].blocks[tier.index()].insert(hash, seq);
        match old {
            Some(old) if old == seq => {
                self.stats.duplicate_blocks += 1;
                return;
            }
            // The engine reused a hash for other content: forget the old placement.
            Some(old) => self.unhold(m, tier, old),
            None => {}
        }
        self.stats.blocks_stored += 1;
        let holder = (m << 2) | tier.index() as u32;
        match self.nodes.entry(seq) {
            std::collections::hash_map::Entry::Occupied(mut e) => {
                let holders = &mut e.get_mut().holders;
                if holders.as_slice().binary_search(&holder).is_ok() {
                    // Another engine hash of this member already names this prefix.
                    *self.members[m as usize].extra[tier.index()]
                        .entry(seq)
                        .or_insert(0) += 1;
                } else {
                    holders.insert(holder);
                }
            }
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(Node {
                    local,
                    parent: parent.unwrap_or(seq),
                    holders: Holders::one(holder),
                });
            }
        }
    }

    /// Releases one engine hash's claim on `seq`; the holder goes with the last claim.
    fn unhold(&mut self, m: u32, tier: StorageTier, seq: SeqHash) {
        let extra = &mut self.members[m as usize].extra[tier.index()];
        if !extra.is_empty()
            && let Some(c) = extra.get_mut(&seq)
        {
            *c -= 1;
            if *c == 0 {
                extra.remove(&seq);
            }
            return;
        }
        let holder = (m << 2) | tier.index() as u32;
        if let Some(node) = self.nodes.get_mut(&seq)
            && node.holders.remove(holder)
        {
            self.nodes.remove(&seq);
        }
    }

    fn remove_block(&mut self, m: u32, tier: StorageTier, hash: ExternalHash) {
        match self.members[m as usize].blocks[tier.index()].remove(&hash) {
            Some(seq) => {
                self.stats.blocks_removed += 1;
                self.unhold(m, tier, seq);
            }
            None => {
                self.stats.unknown_removals += 1;
                self.orphans.remove_block(m, tier, hash);
            }
        }
    }

    fn clear_member(&mut self, m: u32) {
        for t in 0..TIERS {
            let blocks = std::mem::take(&mut self.members[m as usize].blocks[t]);
            self.stats.blocks_removed += blocks.len() as u64;
            for (_, seq) in blocks {
                self.unhold(m, StorageTier::from_index(t), seq);
            }
            self.members[m as usize].extra[t].clear();
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
            for b in &mut member.blocks {
                b.shrink_to_fit();
            }
            for e in &mut member.extra {
                e.shrink_to_fit();
            }
            self.free_members.push(m);
        }
    }

    /// For each (worker, dp rank), how many leading blocks of `seqs` it holds, per tier.
    pub fn find_matches(&self, seqs: &[SeqHash]) -> OverlapScores {
        let mut out = OverlapScores::default();
        let Some(first) = seqs.first().and_then(|s| self.nodes.get(s)) else {
            return out;
        };
        let mut cur: Vec<Holder> = first.holders.as_slice().to_vec();
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
            let Some(node) = self.nodes.get(&seqs[depth]) else {
                break;
            };
            let holders = node.holders.as_slice();
            if holders == cur.as_slice() {
                depth += 1;
                continue;
            }
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
                for (&h, &s) in map {
                    out.push((key, StorageTier::from_index(t), h, s));
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
            let held: crate::fasthash::FastSet<SeqHash> = member
                .blocks
                .iter()
                .flat_map(|b| b.values().copied())
                .collect();
            let mut reachable: FastMap<SeqHash, bool> = FastMap::default();
            for (t, map) in member.blocks.iter().enumerate() {
                for (&h, &s) in map {
                    if self.is_reachable(s, &held, &mut reachable) {
                        out.push((key, StorageTier::from_index(t), h, s));
                    }
                }
            }
        }
        out.sort_unstable();
        out
    }

    fn is_reachable(
        &self,
        seq: SeqHash,
        held: &crate::fasthash::FastSet<SeqHash>,
        memo: &mut FastMap<SeqHash, bool>,
    ) -> bool {
        // Walk up to the first ancestor with a known answer, then fill the memo on the way back.
        let mut path = Vec::new();
        let mut cur = Some(seq);
        let mut answer = true;
        while let Some(s) = cur {
            if let Some(&known) = memo.get(&s) {
                answer = known;
                break;
            }
            if !held.contains(&s) {
                answer = false;
                break;
            }
            path.push(s);
            cur = self.nodes.get(&s).and_then(|n| n.parent(s));
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
        for member in &self.members {
            let Some(key) = member.key else { continue };
            let event_id = member.last_event_id.unwrap_or(0);
            // The engine hash by which this member names each chained hash (device preferred).
            let mut ext_of: FastMap<SeqHash, ExternalHash> = FastMap::default();
            for map in member.blocks.iter().rev() {
                for (&h, &s) in map {
                    ext_of.insert(s, h);
                }
            }
            let held: crate::fasthash::FastSet<SeqHash> = ext_of.keys().copied().collect();
            let mut memo = FastMap::default();
            let mut depths: FastMap<SeqHash, usize> = FastMap::default();
            let mut rows: Vec<(usize, usize, Option<ExternalHash>, StoredBlock)> = Vec::new();
            for (t, map) in member.blocks.iter().enumerate() {
                for (&h, &s) in map {
                    if !self.is_reachable(s, &held, &mut memo) {
                        continue;
                    }
                    let Some(node) = self.nodes.get(&s) else {
                        continue;
                    };
                    let depth = self.depth_of(s, &mut depths);
                    let parent_ext = node.parent(s).and_then(|ps| ext_of.get(&ps).copied());
                    rows.push((
                        depth,
                        t,
                        parent_ext,
                        StoredBlock {
                            hash: h,
                            local: node.local,
                        },
                    ));
                }
            }
            rows.sort_unstable_by_key(|r| (r.0, r.1, r.2, r.3.hash));
            for (_, t, parent, block) in rows {
                events.push(KvEvent {
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
            events.push(KvEvent {
                source: key,
                event_id: member.last_event_id.unwrap_or(0),
                tier: orphan.tier,
                data: KvEventData::Stored {
                    parent: Some(parent),
                    blocks: orphan.blocks.clone(),
                },
            });
        }
        events
    }

    /// Distance from the root, memoised so that dumping is linear in the number of blocks.
    fn depth_of(&self, seq: SeqHash, memo: &mut FastMap<SeqHash, usize>) -> usize {
        let mut path = Vec::new();
        let mut cur = Some(seq);
        let mut base = 0;
        while let Some(s) = cur {
            if let Some(&d) = memo.get(&s) {
                base = d + 1;
                break;
            }
            path.push(s);
            cur = self.nodes.get(&s).and_then(|n| n.parent(s));
        }
        for (d, s) in (base..).zip(path.into_iter().rev()) {
            memo.insert(s, d);
        }
        memo.get(&seq).copied().unwrap_or(0)
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
        let mut total = map_bytes(&self.nodes);
        total += self
            .nodes
            .values()
            .map(|n| n.holders.heap_bytes())
            .sum::<usize>();
        total += self.members.capacity() * std::mem::size_of::<Member>();
        for m in &self.members {
            total += m.blocks.iter().map(map_bytes).sum::<usize>();
        }
        total += map_bytes(&self.member_ids);
        total
    }
}
