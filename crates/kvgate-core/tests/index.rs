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

/// A second engine naming scheme for the same content (extra hash keys, another connector).
fn ext_alias(seq: SeqHash) -> ExternalHash {
    ExternalHash(seq.0.rotate_left(29) ^ 0x0bad_cafe)
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
    stored_named(w, id, tier, toks, from, to, ext)
}

fn stored_named(
    w: WorkerRank,
    id: u64,
    tier: StorageTier,
    toks: &[u32],
    from: usize,
    to: usize,
    ext: fn(SeqHash) -> ExternalHash,
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
    removed_named(w, id, toks, which, ext)
}

fn removed_named(
    w: WorkerRank,
    id: u64,
    toks: &[u32],
    which: &[usize],
    ext: fn(SeqHash) -> ExternalHash,
) -> KvEvent {
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
    assert_eq!(idx.num_orphan_blocks(), 10);
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

/// Naive reference. A block's prefix is fixed when it is stored (resolved through its parent's
/// engine name at that moment; a chain whose parent name is unknown waits, unbounded, until it
/// appears). A worker matches a prefix when it holds every block of it, under any name.
#[derive(Default)]
struct Model {
    /// (worker, tier) -> engine name -> chained hash
    blocks: BTreeMap<(WorkerRank, usize), BTreeMap<ExternalHash, SeqHash>>,
    /// chains waiting for a parent name: (worker, tier, parent name, blocks)
    pending: Vec<(WorkerRank, usize, ExternalHash, Vec<StoredBlock>)>,
}

impl Model {
    fn lookup(&self, w: WorkerRank, tier: usize, h: ExternalHash) -> Option<SeqHash> {
        // same tier first, then any tier (as an offloaded parent may live elsewhere)
        std::iter::once(tier)
            .chain(0..4)
            .find_map(|t| self.blocks.get(&(w, t)).and_then(|m| m.get(&h)).copied())
    }

    fn store(
        &mut self,
        w: WorkerRank,
        tier: usize,
        mut prev: Option<SeqHash>,
        blocks: &[StoredBlock],
    ) {
        for b in blocks {
            let s = kvgate_core::hashing::seq_hash_after(prev, b.local);
            self.blocks.entry((w, tier)).or_default().insert(b.hash, s);
            prev = Some(s);
        }
    }

    fn apply(&mut self, e: &KvEvent) {
        let (w, tier) = (e.source, e.tier.index());
        match &e.data {
            KvEventData::Stored { parent, blocks } => {
                match parent {
                    None => self.store(w, tier, None, blocks),
                    Some(p) => match self.lookup(w, tier, *p) {
                        Some(ps) => self.store(w, tier, Some(ps), blocks),
                        None => {
                            let entry = (w, tier, *p, blocks.clone());
                            if !self.pending.contains(&entry) {
                                self.pending.push(entry);
                            }
                        }
                    },
                }
                // adopt whatever is now resolvable, until nothing changes
                while let Some(i) = self
                    .pending
                    .iter()
                    .position(|(pw, pt, p, _)| self.lookup(*pw, *pt, *p).is_some())
                {
                    let (pw, pt, p, bl) = self.pending.remove(i);
                    let ps = self.lookup(pw, pt, p);
                    self.store(pw, pt, ps, &bl);
                }
            }
            KvEventData::Removed { blocks } => {
                for h in blocks {
                    let held = self.blocks.get_mut(&(w, tier)).and_then(|m| m.remove(h));
                    if held.is_none() {
                        // a parked block removed before its parent came: split its chain
                        let mut tails = Vec::new();
                        for (pw, pt, _, bl) in &mut self.pending {
                            if *pw == w
                                && *pt == tier
                                && let Some(pos) = bl.iter().position(|b| b.hash == *h)
                            {
                                let tail = bl.split_off(pos + 1);
                                bl.pop();
                                if !tail.is_empty() {
                                    tails.push((w, tier, *h, tail));
                                }
                            }
                        }
                        self.pending.retain(|(_, _, _, bl)| !bl.is_empty());
                        for t in tails {
                            if !self.pending.contains(&t) {
                                self.pending.push(t);
                            }
                        }
                    }
                }
            }
            KvEventData::Cleared => self.forget(w),
        }
    }

    fn forget(&mut self, w: WorkerRank) {
        self.blocks.retain(|k, _| k.0 != w);
        self.pending.retain(|p| p.0 != w);
    }

    fn find_matches(&self, q: &[SeqHash]) -> BTreeMap<WorkerRank, TierOverlap> {
        let mut out: BTreeMap<WorkerRank, TierOverlap> = BTreeMap::new();
        for (&(w, tier), map) in &self.blocks {
            let held: BTreeSet<SeqHash> = map.values().copied().collect();
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
        alias: bool,
    },
    Remove {
        w: u8,
        seq: u8,
        at: u8,
        alias: bool,
    },
    Clear {
        w: u8,
    },
    Forget {
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
        6 => (0u8..3, 0u8..2, 0u8..5, 0u8..6, 1u8..4, proptest::bool::weighted(0.25))
            .prop_map(|(w, tier, seq, from, len, alias)| Op::Store { w, tier, seq, from, len, alias }),
        3 => (0u8..3, 0u8..5, 0u8..6, proptest::bool::weighted(0.25))
            .prop_map(|(w, seq, at, alias)| Op::Remove { w, seq, at, alias }),
        1 => (0u8..3).prop_map(|w| Op::Clear { w }),
        1 => (0u8..3).prop_map(|w| Op::Forget { w }),
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
            alias,
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
            let name = if alias { ext_alias } else { ext };
            stored_named(
                WorkerRank::new(u64::from(w), 0),
                id,
                tier,
                t,
                from,
                to,
                name,
            )
        }
        Op::Remove { w, seq, at, alias } => {
            let t = &seqs[seq as usize];
            let at = (at as usize).min(t.len() / BS - 1);
            let name = if alias { ext_alias } else { ext };
            removed_named(WorkerRank::new(u64::from(w), 0), id, t, &[at], name)
        }
        Op::Forget { .. } => return None,
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
            if let Op::Forget { w } = op {
                let w = WorkerRank::new(u64::from(*w), 0);
                idx.remove_worker_rank(w);
                model.forget(w);
                continue;
            }
            let Some(e) = to_event(op, i as u64, &seqs) else { continue };
            idx.apply(&e);
            model.apply(&e);
            let s = idx.stats();
            prop_assert_eq!(s.orphans_parked - s.orphans_adopted - s.orphans_dropped, idx.num_orphan_blocks() as u64);
            if let Err(e) = idx.check_invariants() {
                prop_assert!(false, "after op {}: {}", i, e);
            }
            // Answers are right after every event, not only at the end.
            for t in &seqs {
                let q = seq_hashes(&local_hashes(t, BS, HashSeed::default()));
                let got: BTreeMap<WorkerRank, TierOverlap> = idx.find_matches(&q).scores.into_iter().collect();
                prop_assert_eq!(got, model.find_matches(&q));
            }
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
        prop_assert_eq!(restored.check_invariants(), Ok(()));
        // Forgetting every worker leaves nothing behind.
        for w in idx.workers() {
            idx.remove_worker_rank(w);
        }
        prop_assert_eq!(idx.check_invariants(), Ok(()));
        prop_assert_eq!(idx.num_nodes(), 0);
    }
}

// ---------- regressions found in review ----------

#[test]
fn two_engine_names_for_one_prefix_keep_it_held_until_both_go() {
    let mut idx = PrefixIndex::new();
    let a = tokens(&[1, 2]);
    idx.apply(&stored_named(W1, 1, StorageTier::Device, &a, 0, 2, ext));
    idx.apply(&stored_named(
        W1,
        2,
        StorageTier::Device,
        &a,
        0,
        2,
        ext_alias,
    ));
    idx.apply(&removed_named(W1, 3, &a, &[0, 1], ext));
    assert_eq!(idx.num_blocks(W1, StorageTier::Device), 2);
    assert_eq!(
        query(&idx, &a)[&W1].device(),
        2,
        "the alias names still hold the prefix"
    );
    let mut restored = PrefixIndex::new();
    for e in idx.dump_events() {
        restored.apply(&e);
    }
    assert_eq!(query(&restored, &a)[&W1].device(), 2);
    idx.apply(&removed_named(W1, 4, &a, &[0, 1], ext_alias));
    assert!(query(&idx, &a).is_empty());
    assert_eq!(idx.num_nodes(), 0);
}

#[test]
fn orphan_fifo_evicts_the_oldest_list_even_after_key_reuse() {
    let mut idx = PrefixIndex::with_orphan_capacity(4);
    let raw = |w, id, parent: Option<u64>, blocks: &[(u64, u32)]| KvEvent {
        source: w,
        event_id: id,
        tier: StorageTier::Device,
        data: KvEventData::Stored {
            parent: parent.map(ExternalHash),
            blocks: blocks
                .iter()
                .map(|&(h, l)| StoredBlock {
                    hash: ExternalHash(h),
                    local: LocalHash(u64::from(l)),
                })
                .collect(),
        },
    };
    idx.apply(&raw(W1, 1, Some(1), &[(100, 1)])); // parked under 1
    idx.apply(&raw(W1, 2, None, &[(1, 0)])); // adopted; its FIFO entry is now stale
    idx.apply(&KvEvent {
        source: W1,
        event_id: 3,
        tier: StorageTier::Device,
        data: KvEventData::Removed {
            blocks: vec![ExternalHash(1), ExternalHash(100)],
        },
    });
    idx.apply(&raw(W1, 4, Some(2), &[(200, 2), (201, 3)])); // oldest live list
    idx.apply(&raw(W1, 5, Some(1), &[(300, 4)])); // newer list under a reused key
    idx.apply(&raw(W1, 6, Some(3), &[(400, 5), (401, 6)])); // must evict the list under 2
    idx.apply(&raw(W1, 7, None, &[(2, 7)]));
    idx.apply(&raw(W1, 8, None, &[(1, 8)]));
    let held: Vec<u64> = idx.blocks().iter().map(|r| r.2.0).collect();
    assert!(held.contains(&300), "the newest list survives: {held:?}");
    assert!(
        !held.contains(&200),
        "the oldest list was evicted: {held:?}"
    );
}

#[test]
fn duplicate_orphans_are_parked_once_and_dumped() {
    let mut idx = PrefixIndex::new();
    let a = tokens(&[1, 2, 3]);
    let e = stored(W1, 2, StorageTier::Device, &a, 1, 3);
    idx.apply(&e);
    idx.apply(&e);
    assert_eq!(idx.num_orphan_blocks(), 2);
    // parked chains survive a dump/restore and are adopted later
    let mut restored = PrefixIndex::new();
    for ev in idx.dump_events() {
        restored.apply(&ev);
    }
    assert_eq!(restored.num_orphan_blocks(), 2);
    restored.apply(&stored(W1, 3, StorageTier::Device, &a, 0, 1));
    assert_eq!(query(&restored, &a)[&W1].device(), 3);
}

#[test]
fn unknown_removals_do_not_scan_the_parking_lot() {
    // 65,536 parked blocks and 2,000 unknown removals: correct, and (with the parked-block
    // count) not quadratic. Correctness is asserted; speed is covered by the benches.
    let mut idx = PrefixIndex::new();
    for i in 0..65_536u64 {
        idx.apply(&KvEvent {
            source: W1,
            event_id: i,
            tier: StorageTier::Device,
            data: KvEventData::Stored {
                parent: Some(ExternalHash(1_000_000 + i)),
                blocks: vec![StoredBlock {
                    hash: ExternalHash(2_000_000 + i),
                    local: LocalHash(i),
                }],
            },
        });
    }
    idx.apply(&KvEvent {
        source: W1,
        event_id: 70_000,
        tier: StorageTier::Device,
        data: KvEventData::Removed {
            blocks: (0..2_000u64).map(|i| ExternalHash(9_000_000 + i)).collect(),
        },
    });
    assert_eq!(idx.num_orphan_blocks(), 65_536);
    assert_eq!(idx.stats().unknown_removals, 2_000);
}

/// A parked chain split by a removal waits for the removed block. When the member already holds
/// that block in another tier (an offload), the rest is placed at once, as a `Stored` naming
/// that parent would be, so that a dump restores the same blocks (found by the model test).
#[test]
fn a_split_parked_chain_hangs_from_its_parent_in_another_tier() {
    let seqs = sequences();
    let ops = [
        Op::Store {
            w: 1,
            tier: 0,
            seq: 0,
            from: 0,
            len: 3,
            alias: false,
        },
        Op::Store {
            w: 1,
            tier: 1,
            seq: 0,
            from: 3,
            len: 1,
            alias: false,
        },
        Op::Remove {
            w: 1,
            seq: 0,
            at: 2,
            alias: false,
        },
        // Blocks 3-4 on device; their parent (block 2) is gone: parked.
        Op::Store {
            w: 1,
            tier: 0,
            seq: 0,
            from: 3,
            len: 2,
            alias: false,
        },
        // Block 3 removed from the parked chain: block 4 waits for block 3, held on the host.
        Op::Remove {
            w: 1,
            seq: 0,
            at: 3,
            alias: false,
        },
    ];
    let mut idx = PrefixIndex::new();
    for (i, op) in ops.iter().enumerate() {
        idx.apply(&to_event(op, i as u64, &seqs).unwrap());
    }
    assert_eq!(idx.num_orphan_blocks(), 0);
    let h = BlockHashes::from_tokens(&seqs[0], BS, HashSeed::default());
    let b4 = ext(h.seqs()[4]);
    assert!(
        idx.reachable_blocks().iter().all(|r| r.2 != b4),
        "block 4 is placed but its prefix (block 2) is not held"
    );
    // Block 2 back on device: block 4 is reachable, and a dump restores exactly this.
    idx.apply(
        &to_event(
            &Op::Store {
                w: 1,
                tier: 0,
                seq: 1,
                from: 1,
                len: 2,
                alias: false,
            },
            9,
            &seqs,
        )
        .unwrap(),
    );
    assert!(idx.reachable_blocks().iter().any(|r| r.2 == b4));
    let mut restored = PrefixIndex::new();
    for e in idx.dump_events() {
        restored.apply(&e);
    }
    assert_eq!(restored.reachable_blocks(), idx.reachable_blocks());
    assert_eq!(idx.check_invariants(), Ok(()));
    let s = idx.stats();
    assert_eq!(s.orphans_parked - s.orphans_adopted - s.orphans_dropped, 0);
}
