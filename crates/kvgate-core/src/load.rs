//! In-flight load per (worker, dp rank): what the router has sent and not yet seen finish.
//!
//! A [`Booking`] is made when a request is routed and lives until it is freed:
//! - **prefill tokens**: the prompt tokens the worker must still compute (`isl - cached`), counted
//!   until prefill completes (first response byte);
//! - **active blocks**: the prompt's complete blocks, deduplicated per worker by chained hash, so
//!   requests sharing a prefix count it once (a refcount per block);
//! - **output blocks** (optional): `ceil(expected_output_tokens / block_size)` predicted blocks,
//!   weighted by `1 - progress` as the request generates toward its expected length.
//!
//! Lifecycle: [`LoadTracker::book`] -> [`LoadTracker::prefill_complete`] -> [`LoadTracker::free`].
//! Freeing twice, completing an unknown id or freeing an unknown id is harmless (reported as
//! [`Change::NoChange`]). Bookings older than a stale timeout are swept.

use crate::fasthash::FastMap;
use crate::ids::{LocalHash, RequestId, SeqHash, WorkerRank};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Dynamo's default lifetime of a booking before it is considered leaked.
pub const DEFAULT_STALE_AFTER: Duration = Duration::from_secs(300);

#[derive(Clone, Debug)]
pub struct Booking {
    pub worker: WorkerRank,
    pub seqs: Vec<SeqHash>,
    /// The blocks' local hashes (so that a moved booking can move its prediction too).
    pub locals: Vec<LocalHash>,
    pub prefill_tokens: u64,
    pub prefill_done: bool,
    pub expected_output_tokens: Option<u32>,
    pub output_tokens: u32,
    /// When it was booked, or last seen alive (`touch`); the stale sweep measures from here.
    pub booked_at: Instant,
    /// When it was booked (never moved): the latency model measures from here.
    pub created_at: Instant,
    /// Prefill tokens already queued on the worker when this request was booked there.
    pub queued_ahead: u64,
    /// When its first token was reported with a time ([`LoadTracker::complete_prefill_at`]).
    pub first_token_at: Option<Instant>,
}

impl Booking {
    /// Predicted output blocks still to come, weighted by remaining progress.
    fn output_blocks(&self, block_size: usize) -> f64 {
        match self.expected_output_tokens {
            Some(expected) if expected > 0 && block_size > 0 => {
                let blocks = (expected as usize).div_ceil(block_size) as f64;
                let progress = (f64::from(self.output_tokens) / f64::from(expected)).min(1.0);
                blocks * (1.0 - progress)
            }
            _ => 0.0,
        }
    }
}

/// Load of one (worker, dp rank).
#[derive(Clone, Debug, Default)]
pub struct WorkerLoad {
    pub prefill_tokens: u64,
    /// Refcount of each active block.
    blocks: FastMap<SeqHash, u32>,
    /// Sum of the bookings' weighted predicted output blocks.
    pub output_blocks: f64,
    pub requests: usize,
}

impl WorkerLoad {
    pub fn active_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Active blocks plus predicted output blocks: the decode-side load.
    pub fn decode_blocks(&self) -> f64 {
        self.blocks.len() as f64 + self.output_blocks
    }

    /// Blocks of `seqs` this worker does not already hold active. Bookings always cover whole
    /// prefix chains, so presence is monotone along `seqs` and a binary search finds the cut.
    pub fn new_blocks(&self, seqs: &[SeqHash]) -> usize {
        // Callers in a big fleet ask [`LoadTracker::new_blocks`], which skips workers that do
        // not hold the first block without touching their maps.
        let (mut lo, mut hi) = (0usize, seqs.len());
        while lo < hi {
            let mid = (lo + hi) / 2;
            if self.blocks.contains_key(&seqs[mid]) {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        seqs.len() - lo
    }
}

/// One (worker, rank)'s load in numbers.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct LoadSummary {
    pub worker: WorkerRank,
    pub requests: usize,
    pub prefill_tokens: u64,
    pub active_blocks: usize,
    pub output_blocks: f64,
}

/// What a lifecycle call changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    Applied,
    NoChange,
}

#[derive(Debug)]
pub struct LoadTracker {
    block_size: usize,
    workers: FastMap<WorkerRank, WorkerLoad>,
    bookings: HashMap<RequestId, Booking>,
    /// The workers with a booking that starts with a given block, and how many. A chained
    /// hash names its whole prefix, so a request's first block is active on a worker exactly
    /// when one of these starts with it: a decision probes only those workers' block maps,
    /// not all of a 10,000-rank fleet's.
    first_blocks: FastMap<SeqHash, FastMap<WorkerRank, u32>>,
    /// How many workers hold each active block. Along one request's chain these counts only
    /// fall, and a worker's active prefix can end only where they do: when a shared system
    /// prompt is active on every rank, one count per level answers for all of them instead
    /// of a binary search in each rank's own map (a cache miss per probe).
    block_holders: FastMap<SeqHash, u32>,
    /// Workers whose figures changed since the last [`LoadTracker::take_changed`]; `None`
    /// when more than [`MAX_CHANGED`] did (the reader then refreshes every worker).
    changed: Option<Vec<WorkerRank>>,
}

/// Changed workers remembered between two reads before the list gives up and says "all".
pub const MAX_CHANGED: usize = 4096;

/// A worker's load in the numbers a decision reads ([`LoadTracker::figures`]).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LoadFigures {
    pub prefill_tokens: u64,
    pub active_blocks: usize,
    pub output_blocks: f64,
    pub requests: usize,
}

/// What changed since the last read ([`LoadTracker::take_changed`]).
#[derive(Debug, PartialEq)]
pub enum Changed {
    /// These workers (repeats possible).
    Some(Vec<WorkerRank>),
    /// Too many to list: every worker may have changed.
    All,
}

/// One request's blocks, ready to count what each worker lacks ([`LoadTracker::new_blocks_probe`]).
pub struct NewBlocksProbe<'a> {
    workers: &'a FastMap<WorkerRank, WorkerLoad>,
    seqs: &'a [SeqHash],
    /// Workers whose active bookings start with the request's first block (`None`: nobody's).
    holders: Option<&'a FastMap<WorkerRank, u32>>,
    /// The active prefix lengths a holder can have, ascending: the levels `d` where fewer
    /// workers hold `seqs[d]` than `seqs[d - 1]` (none hold `seqs[len]`).
    depths: Vec<usize>,
}

impl NewBlocksProbe<'_> {
    /// The workers whose active bookings start like the request (all others have none of
    /// its blocks active).
    pub fn holders(&self) -> impl Iterator<Item = &WorkerRank> {
        self.holders.into_iter().flat_map(|h| h.keys())
    }

    /// Blocks of the request not active on `worker` (its load map is read only when one of
    /// its bookings starts like the request).
    pub fn of(&self, worker: &WorkerRank) -> usize {
        match self.holders {
            Some(h) if h.contains_key(worker) => self.of_holder(worker),
            _ => self.seqs.len(),
        }
    }

    /// [`of`](Self::of) for a worker from [`holders`](Self::holders).
    pub fn of_holder(&self, worker: &WorkerRank) -> usize {
        let len = self.seqs.len();
        match self.depths.as_slice() {
            // Every holder's active prefix ends at the same level.
            [d] => len - d,
            depths => match self.workers.get(worker) {
                Some(l) => {
                    // The levels it holds are a prefix of `depths`.
                    let held =
                        depths.partition_point(|&d| l.blocks.contains_key(&self.seqs[d - 1]));
                    len - held.checked_sub(1).map_or(0, |i| depths[i])
                }
                None => len,
            },
        }
    }
}

/// The levels `d` in `(lo, hi]` where `count(d) < count(d - 1)`, ascending, given `count` (how
/// many workers hold the `k`-th block of a chain) at both ends. Counts never rise along a
/// chain, so a span whose ends agree holds no drop: the search probes O(drops x log len)
/// levels.
fn level_drops(
    count: &dyn Fn(usize) -> u32,
    (lo, at_lo): (usize, u32),
    (hi, at_hi): (usize, u32),
    out: &mut Vec<usize>,
) {
    if at_lo <= at_hi || hi <= lo {
        return;
    }
    if hi == lo + 1 {
        out.push(hi);
        return;
    }
    let mid = lo + (hi - lo) / 2;
    let at_mid = count(mid);
    level_drops(count, (lo, at_lo), (mid, at_mid), out);
    level_drops(count, (mid, at_mid), (hi, at_hi), out);
}

/// Adds one booking's blocks to a worker's refcounts, counting each block's new holder.
fn hold_blocks(load: &mut WorkerLoad, holders: &mut FastMap<SeqHash, u32>, seqs: &[SeqHash]) {
    for &s in seqs {
        let c = load.blocks.entry(s).or_insert(0);
        if *c == 0 {
            *holders.entry(s).or_insert(0) += 1;
        }
        *c += 1;
    }
}

/// Takes one booking's blocks off a worker's refcounts, [`hold_blocks`] undone: a block the
/// worker no longer holds at all loses it as a holder (and is forgotten with its last one).
fn release_blocks(load: &mut WorkerLoad, holders: &mut FastMap<SeqHash, u32>, seqs: &[SeqHash]) {
    for s in seqs {
        let Some(c) = load.blocks.get_mut(s) else {
            continue;
        };
        *c -= 1;
        if *c > 0 {
            continue;
        }
        load.blocks.remove(s);
        if let Some(n) = holders.get_mut(s) {
            *n -= 1;
            if *n == 0 {
                holders.remove(s);
            }
        }
    }
}

/// A booking request: what the router decided to send where.
#[derive(Clone, Debug)]
pub struct NewBooking<'a> {
    pub request: RequestId,
    pub worker: WorkerRank,
    pub seqs: &'a [SeqHash],
    /// Local hashes of the same blocks (may be empty when nobody needs them).
    pub locals: &'a [LocalHash],
    /// Prompt tokens the worker must compute (prompt minus what it already caches).
    pub prefill_tokens: u64,
    pub expected_output_tokens: Option<u32>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BookError {
    /// The id is already booked; the existing booking is kept.
    Duplicate,
}

impl LoadTracker {
    pub fn new(block_size: usize) -> Self {
        Self {
            block_size,
            workers: FastMap::default(),
            bookings: HashMap::new(),
            first_blocks: FastMap::default(),
            block_holders: FastMap::default(),
            changed: Some(Vec::new()),
        }
    }

    /// `worker`'s figures (zero when it carries no load).
    pub fn figures(&self, worker: &WorkerRank) -> LoadFigures {
        self.workers
            .get(worker)
            .map_or_else(LoadFigures::default, |l| LoadFigures {
                prefill_tokens: l.prefill_tokens,
                active_blocks: l.active_blocks(),
                output_blocks: l.output_blocks,
                requests: l.requests,
            })
    }

    /// The workers whose [`figures`](Self::figures) may have changed since the last call, so
    /// that a reader can keep its own copy of them up to date without reading every worker.
    pub fn take_changed(&mut self) -> Changed {
        match self.changed.replace(Vec::new()) {
            Some(v) => Changed::Some(v),
            None => Changed::All,
        }
    }

    fn note_changed(&mut self, worker: WorkerRank) {
        note_change(&mut self.changed, worker);
    }

    /// The workers with an active booking that starts with `first` (see `first_blocks`).
    pub fn first_block_holders(&self, first: &SeqHash) -> Option<&FastMap<WorkerRank, u32>> {
        self.first_blocks.get(first)
    }

    /// Blocks of `seqs` that `worker` does not hold active, [`WorkerLoad::new_blocks`] without
    /// touching the worker's map when its first block is not active there.
    pub fn new_blocks(&self, worker: &WorkerRank, seqs: &[SeqHash]) -> usize {
        self.new_blocks_probe(seqs).of(worker)
    }

    /// [`new_blocks`](Self::new_blocks) for one request over many workers: the request's
    /// first-block holders are looked up once, not once per candidate.
    pub fn new_blocks_probe<'a>(&'a self, seqs: &'a [SeqHash]) -> NewBlocksProbe<'a> {
        let holders = seqs.first().and_then(|f| self.first_blocks.get(f));
        let mut depths = Vec::new();
        if let Some(h) = holders {
            let count = |k: usize| {
                if k >= seqs.len() {
                    0
                } else {
                    self.block_holders.get(&seqs[k]).copied().unwrap_or(0)
                }
            };
            level_drops(&count, (0, h.len() as u32), (seqs.len(), 0), &mut depths);
        }
        NewBlocksProbe {
            workers: &self.workers,
            seqs,
            holders,
            depths,
        }
    }

    fn note_first(&mut self, worker: WorkerRank, seqs: &[SeqHash], up: bool) {
        let Some(first) = seqs.first() else { return };
        if up {
            *self
                .first_blocks
                .entry(*first)
                .or_default()
                .entry(worker)
                .or_insert(0) += 1;
        } else if let Some(h) = self.first_blocks.get_mut(first) {
            if let Some(c) = h.get_mut(&worker) {
                *c -= 1;
                if *c == 0 {
                    h.remove(&worker);
                }
            }
            if h.is_empty() {
                self.first_blocks.remove(first);
            }
        }
    }

    pub fn load(&self, worker: &WorkerRank) -> Option<&WorkerLoad> {
        self.workers.get(worker)
    }

    pub fn booking(&self, request: &RequestId) -> Option<&Booking> {
        self.bookings.get(request)
    }

    pub fn num_bookings(&self) -> usize {
        self.bookings.len()
    }

    /// Load per (worker, rank), sorted: what the debug endpoint shows and replicas compare.
    pub fn summary(&self) -> Vec<LoadSummary> {
        let mut v: Vec<LoadSummary> = self
            .workers
            .iter()
            .map(|(w, l)| LoadSummary {
                worker: *w,
                requests: l.requests,
                prefill_tokens: l.prefill_tokens,
                active_blocks: l.active_blocks(),
                output_blocks: l.output_blocks,
            })
            .collect();
        v.sort_by_key(|s| s.worker);
        v
    }

    /// Every booking (in no particular order).
    pub fn bookings(&self) -> impl Iterator<Item = (&RequestId, &Booking)> {
        self.bookings.iter()
    }

    pub fn workers(&self) -> impl Iterator<Item = (&WorkerRank, &WorkerLoad)> {
        self.workers.iter()
    }

    pub fn book(&mut self, b: NewBooking<'_>, now: Instant) -> Result<(), BookError> {
        if self.bookings.contains_key(&b.request) {
            return Err(BookError::Duplicate);
        }
        let load = self.workers.entry(b.worker).or_default();
        let booking = Booking {
            worker: b.worker,
            seqs: b.seqs.to_vec(),
            locals: b.locals.to_vec(),
            prefill_tokens: b.prefill_tokens,
            prefill_done: false,
            expected_output_tokens: b.expected_output_tokens,
            output_tokens: 0,
            booked_at: now,
            created_at: now,
            queued_ahead: load.prefill_tokens,
            first_token_at: None,
        };
        load.prefill_tokens += booking.prefill_tokens;
        hold_blocks(load, &mut self.block_holders, &booking.seqs);
        load.output_blocks += booking.output_blocks(self.block_size);
        load.requests += 1;
        self.note_first(b.worker, b.seqs, true);
        self.note_changed(b.worker);
        self.bookings.insert(b.request, booking);
        Ok(())
    }

    /// The first response byte arrived: the prompt is computed.
    pub fn prefill_complete(&mut self, request: &RequestId) -> Change {
        match self.mark_prefill_done(request, None) {
            Some(_) => Change::Applied,
            None => Change::NoChange,
        }
    }

    /// Like [`prefill_complete`](Self::prefill_complete), at `now`; returns the booking when it
    /// applied.
    pub fn complete_prefill_at(&mut self, request: &RequestId, now: Instant) -> Option<&Booking> {
        self.mark_prefill_done(request, Some(now))
    }

    fn mark_prefill_done(&mut self, request: &RequestId, now: Option<Instant>) -> Option<&Booking> {
        let b = self.bookings.get_mut(request)?;
        if b.prefill_done {
            return None;
        }
        b.prefill_done = true;
        b.first_token_at = now;
        if let Some(load) = self.workers.get_mut(&b.worker) {
            load.prefill_tokens = load.prefill_tokens.saturating_sub(b.prefill_tokens);
        }
        // The field, not the method: `b` still borrows the bookings, and is returned.
        note_change(&mut self.changed, b.worker);
        Some(b)
    }

    /// The request has generated `total_output_tokens` so far (moves predicted output load).
    pub fn record_output(&mut self, request: &RequestId, total_output_tokens: u32) -> Change {
        let Some(b) = self.bookings.get_mut(request) else {
            return Change::NoChange;
        };
        let before = b.output_blocks(self.block_size);
        b.output_tokens = total_output_tokens;
        let after = b.output_blocks(self.block_size);
        if let Some(load) = self.workers.get_mut(&b.worker) {
            load.output_blocks = (load.output_blocks - before + after).max(0.0);
        }
        let worker = b.worker;
        self.note_changed(worker);
        Change::Applied
    }

    /// Moves a booking to another worker (the gateway served it elsewhere than booked).
    pub fn rebook(&mut self, request: &RequestId, to: WorkerRank) -> Change {
        let Some(b) = self.bookings.get(request) else {
            return Change::NoChange;
        };
        if b.worker == to {
            return Change::NoChange;
        }
        let Some(b) = self.remove_booking(request) else {
            return Change::NoChange;
        };
        let prefill = if b.prefill_done { 0 } else { b.prefill_tokens };
        let load = self.workers.entry(to).or_default();
        load.prefill_tokens += prefill;
        hold_blocks(load, &mut self.block_holders, &b.seqs);
        let moved = Booking { worker: to, ..b };
        load.output_blocks += moved.output_blocks(self.block_size);
        load.requests += 1;
        self.note_first(to, &moved.seqs, true);
        self.note_changed(to);
        self.bookings.insert(request.clone(), moved);
        Change::Applied
    }

    /// The request ended (completed, failed or aborted).
    pub fn free(&mut self, request: &RequestId) -> Change {
        match self.take(request) {
            Some(_) => Change::Applied,
            None => Change::NoChange,
        }
    }

    /// Like [`free`](Self::free); returns the removed booking.
    pub fn take(&mut self, request: &RequestId) -> Option<Booking> {
        self.remove_booking(request)
    }

    fn remove_booking(&mut self, request: &RequestId) -> Option<Booking> {
        let b = self.bookings.remove(request)?;
        self.note_first(b.worker, &b.seqs, false);
        self.note_changed(b.worker);
        let empty = if let Some(load) = self.workers.get_mut(&b.worker) {
            if !b.prefill_done {
                load.prefill_tokens = load.prefill_tokens.saturating_sub(b.prefill_tokens);
            }
            release_blocks(load, &mut self.block_holders, &b.seqs);
            load.output_blocks = (load.output_blocks - b.output_blocks(self.block_size)).max(0.0);
            load.requests = load.requests.saturating_sub(1);
            if load.requests == 0 {
                // Clear float dust so that an idle worker is exactly idle.
                load.output_blocks = 0.0;
            }
            load.requests == 0 && load.blocks.is_empty() && load.prefill_tokens == 0
        } else {
            false
        };
        if empty {
            self.workers.remove(&b.worker);
        }
        Some(b)
    }

    /// Frees bookings older than `max_age` (leaked by a lost end-of-stream); returns their ids.
    /// The request is still alive (its response is flowing): restart its stale clock, so a
    /// generation longer than the stale timeout keeps its load.
    pub fn touch(&mut self, request: &RequestId, now: Instant) -> Change {
        match self.bookings.get_mut(request) {
            Some(b) => {
                b.booked_at = now;
                Change::Applied
            }
            None => Change::NoChange,
        }
    }

    pub fn sweep_stale(&mut self, now: Instant, max_age: Duration) -> Vec<RequestId> {
        let stale: Vec<RequestId> = self
            .bookings
            .iter()
            .filter(|(_, b)| now.saturating_duration_since(b.booked_at) > max_age)
            .map(|(id, _)| id.clone())
            .collect();
        for id in &stale {
            self.remove_booking(id);
        }
        stale
    }

    /// Drops every booking on a worker (it left discovery); returns their ids.
    pub fn remove_worker(&mut self, worker: crate::ids::WorkerId) -> Vec<RequestId> {
        let ids: Vec<RequestId> = self
            .bookings
            .iter()
            .filter(|(_, b)| b.worker.worker == worker)
            .map(|(id, _)| id.clone())
            .collect();
        for id in &ids {
            self.remove_booking(id);
        }
        let before = self.workers.len();
        self.workers.retain(|k, _| k.worker != worker);
        if self.workers.len() != before {
            // Entries without bookings (cannot normally remain): say everything changed.
            self.changed = None;
        }
        ids
    }
}

/// Records that `worker`'s figures changed, in the list of changes since the last read; past
/// [`MAX_CHANGED`] the list gives up (`None`: every worker may have changed).
fn note_change(changed: &mut Option<Vec<WorkerRank>>, worker: WorkerRank) {
    if let Some(v) = changed {
        if v.len() >= MAX_CHANGED {
            *changed = None;
        } else {
            v.push(worker);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    const W: WorkerRank = WorkerRank::new(1, 0);
    const W2: WorkerRank = WorkerRank::new(2, 0);

    fn seqs(ids: &[u64]) -> Vec<SeqHash> {
        ids.iter().map(|&i| SeqHash(i)).collect()
    }

    fn book(t: &mut LoadTracker, id: &str, w: WorkerRank, s: &[SeqHash], prefill: u64) {
        t.book(
            NewBooking {
                request: id.into(),
                worker: w,
                seqs: s,
                locals: &[],
                prefill_tokens: prefill,
                expected_output_tokens: None,
            },
            Instant::now(),
        )
        .unwrap();
    }

    #[test]
    fn lifecycle_and_shared_prefix_dedup() {
        let mut t = LoadTracker::new(16);
        book(&mut t, "a", W, &seqs(&[1, 2, 3]), 48);
        book(&mut t, "b", W, &seqs(&[1, 2, 4, 5]), 40);
        let l = t.load(&W).unwrap();
        assert_eq!(l.active_blocks(), 5);
        assert_eq!(l.prefill_tokens, 88);
        assert_eq!(l.requests, 2);
        assert_eq!(l.new_blocks(&seqs(&[1, 2, 3, 9])), 1);
        assert_eq!(l.new_blocks(&seqs(&[7, 8])), 2);
        assert_eq!(t.prefill_complete(&"a".into()), Change::Applied);
        assert_eq!(t.prefill_complete(&"a".into()), Change::NoChange);
        assert_eq!(t.load(&W).unwrap().prefill_tokens, 40);
        assert_eq!(t.free(&"a".into()), Change::Applied);
        assert_eq!(t.free(&"a".into()), Change::NoChange);
        assert_eq!(t.free(&"nope".into()), Change::NoChange);
        assert_eq!(t.prefill_complete(&"nope".into()), Change::NoChange);
        let l = t.load(&W).unwrap();
        assert_eq!(l.active_blocks(), 4);
        assert_eq!(l.prefill_tokens, 40);
        t.free(&"b".into());
        assert!(t.load(&W).is_none());
    }

    #[test]
    fn duplicate_booking_is_refused_and_keeps_the_first() {
        let mut t = LoadTracker::new(16);
        book(&mut t, "a", W, &seqs(&[1]), 16);
        let again = t.book(
            NewBooking {
                request: "a".into(),
                worker: W2,
                seqs: &seqs(&[2]),
                locals: &[],
                prefill_tokens: 1,
                expected_output_tokens: None,
            },
            Instant::now(),
        );
        assert_eq!(again, Err(BookError::Duplicate));
        assert_eq!(t.booking(&"a".into()).unwrap().worker, W);
    }

    #[test]
    fn output_blocks_decay_with_progress() {
        let mut t = LoadTracker::new(16);
        t.book(
            NewBooking {
                request: "a".into(),
                worker: W,
                seqs: &seqs(&[1]),
                locals: &[],
                prefill_tokens: 16,
                expected_output_tokens: Some(160),
            },
            Instant::now(),
        )
        .unwrap();
        assert_eq!(t.load(&W).unwrap().output_blocks, 10.0);
        assert_eq!(t.load(&W).unwrap().decode_blocks(), 11.0);
        t.record_output(&"a".into(), 80);
        assert_eq!(t.load(&W).unwrap().output_blocks, 5.0);
        t.record_output(&"a".into(), 400);
        assert_eq!(t.load(&W).unwrap().output_blocks, 0.0);
    }

    #[test]
    fn touched_bookings_survive_the_stale_sweep() {
        let mut t = LoadTracker::new(16);
        let t0 = Instant::now();
        book(&mut t, "long", W, &seqs(&[1]), 16);
        book(&mut t, "leaked", W, &seqs(&[2]), 16);
        let age = Duration::from_secs(300);
        assert_eq!(
            t.touch(&"long".into(), t0 + Duration::from_secs(200)),
            Change::Applied
        );
        assert_eq!(t.touch(&"nope".into(), t0), Change::NoChange);
        let freed = t.sweep_stale(t0 + Duration::from_secs(400), age);
        assert_eq!(freed, vec![RequestId::from("leaked")]);
        assert!(t.booking(&"long".into()).is_some());
        let freed = t.sweep_stale(t0 + Duration::from_secs(600), age);
        assert_eq!(freed, vec![RequestId::from("long")]);
    }

    #[test]
    fn rebook_moves_everything() {
        let mut t = LoadTracker::new(16);
        book(&mut t, "a", W, &seqs(&[1, 2]), 32);
        assert_eq!(t.rebook(&"a".into(), W2), Change::Applied);
        assert!(t.load(&W).is_none());
        assert_eq!(t.load(&W2).unwrap().active_blocks(), 2);
        assert_eq!(t.load(&W2).unwrap().prefill_tokens, 32);
        assert_eq!(t.rebook(&"a".into(), W2), Change::NoChange);
        t.free(&"a".into());
        assert!(t.load(&W2).is_none());
    }

    #[test]
    fn stale_bookings_are_swept() {
        let mut t = LoadTracker::new(16);
        let t0 = Instant::now();
        t.book(
            NewBooking {
                request: "old".into(),
                worker: W,
                seqs: &seqs(&[1]),
                locals: &[],
                prefill_tokens: 16,
                expected_output_tokens: None,
            },
            t0,
        )
        .unwrap();
        t.book(
            NewBooking {
                request: "new".into(),
                worker: W,
                seqs: &seqs(&[2]),
                locals: &[],
                prefill_tokens: 16,
                expected_output_tokens: None,
            },
            t0 + Duration::from_secs(200),
        )
        .unwrap();
        let swept = t.sweep_stale(t0 + Duration::from_secs(301), DEFAULT_STALE_AFTER);
        assert_eq!(swept, vec![RequestId::from("old")]);
        assert_eq!(t.load(&W).unwrap().requests, 1);
    }

    #[derive(Clone, Debug)]
    enum Op {
        Book(u8, u8, u8, u8),
        Prefill(u8),
        Free(u8),
        Rebook(u8, u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0u8..12, 0u8..3, 0u8..4, 1u8..6).prop_map(|(r, w, p, n)| Op::Book(r, w, p, n)),
            2 => (0u8..12).prop_map(Op::Prefill),
            3 => (0u8..12).prop_map(Op::Free),
            1 => (0u8..12, 0u8..3).prop_map(|(r, w)| Op::Rebook(r, w)),
        ]
    }

    proptest! {
        /// Whatever the order of book / complete / free / rebook, each worker's load equals what
        /// its live bookings imply, and freeing everything leaves nothing behind.
        #[test]
        fn load_equals_live_bookings(ops in proptest::collection::vec(op(), 1..80)) {
            let mut t = LoadTracker::new(4);
            let now = Instant::now();
            let chain = |p: u8, n: u8| -> Vec<SeqHash> {
                (0..n).map(|i| SeqHash(u64::from(p) * 100 + u64::from(i))).collect()
            };
            for op in ops {
                match op {
                    Op::Book(r, w, p, n) => {
                        let _ = t.book(NewBooking {
                            request: format!("r{r}").into(),
                            worker: WorkerRank::new(u64::from(w), 0),
                            seqs: &chain(p, n),
                            locals: &[],
                            prefill_tokens: u64::from(n) * 4,
                            expected_output_tokens: Some(u32::from(n) * 3),
                        }, now);
                    }
                    Op::Prefill(r) => { t.prefill_complete(&format!("r{r}").into()); }
                    Op::Free(r) => { t.free(&format!("r{r}").into()); }
                    Op::Rebook(r, w) => { t.rebook(&format!("r{r}").into(), WorkerRank::new(u64::from(w), 0)); }
                }
                // expected per worker from live bookings
                let mut want: BTreeMap<WorkerRank, (u64, std::collections::BTreeSet<SeqHash>, usize)> = BTreeMap::new();
                for b in t.bookings.values() {
                    let e = want.entry(b.worker).or_default();
                    if !b.prefill_done { e.0 += b.prefill_tokens; }
                    e.1.extend(b.seqs.iter().copied());
                    e.2 += 1;
                }
                for (w, (prefill, blocks, n)) in &want {
                    let l = t.load(w).unwrap();
                    prop_assert_eq!(l.prefill_tokens, *prefill);
                    prop_assert_eq!(l.active_blocks(), blocks.len());
                    prop_assert_eq!(l.requests, *n);
                }
                prop_assert_eq!(t.workers.len(), want.len());
                // Each active block's holder count is the number of workers holding it.
                let mut holders: BTreeMap<SeqHash, u32> = BTreeMap::new();
                for (_, blocks, _) in want.values() {
                    for s in blocks { *holders.entry(*s).or_default() += 1; }
                }
                prop_assert_eq!(t.block_holders.iter().map(|(s, n)| (*s, *n)).collect::<BTreeMap<_, _>>(), holders);
                // The first-block shortcut answers as a scan of the live bookings would.
                for w in 0..3u64 {
                    let w = WorkerRank::new(w, 0);
                    for (p, n) in [(0u8, 5u8), (1, 3), (2, 1), (3, 4), (9, 2)] {
                        let q = chain(p, n);
                        let held = want.get(&w).map_or(0, |(_, blocks, _)| {
                            q.iter().take_while(|s| blocks.contains(s)).count()
                        });
                        prop_assert_eq!(t.new_blocks(&w, &q), q.len() - held);
                        let probe = t.new_blocks_probe(&q);
                        prop_assert_eq!(probe.holders().any(|h| *h == w), held > 0);
                        if held > 0 {
                            prop_assert_eq!(probe.of_holder(&w), q.len() - held);
                        }
                    }
                }
            }
            let ids: Vec<RequestId> = t.bookings.keys().cloned().collect();
            for id in ids { t.free(&id); }
            prop_assert!(t.workers.is_empty());
            prop_assert!(t.first_blocks.is_empty());
            prop_assert!(t.block_holders.is_empty());
        }
    }
}
