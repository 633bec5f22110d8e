//! Replica sync: router replicas behind one gateway share their bookings, so that each sees the
//! load the others put on the workers (`DYN_ROUTER_REPLICA_SYNC`).
//!
//! Every replica is the authority on its own bookings. It publishes what it does to them as
//! numbered [`SyncMessage`]s (one `seq` per replica, +1 per message; a heartbeat repeats the
//! last `seq` with no ops) and answers a state request with all of them ([`SyncState`], tagged
//! with the last `seq` it had published before reading its bookings). A [`ReplicaView`] applies
//! peers' messages to the local [`Router`] under keys of their own ([`peer_key`]), so two
//! replicas' request ids never collide, and asks for a peer's state whenever it cannot follow
//! it: a peer first heard of mid-stream (a late start, or back after a partition), or a gap in
//! its `seq` (a message lost, also seen through the heartbeat). A state replaces what the view
//! held for that peer; the messages that arrived meanwhile are then replayed past its `seq`. All
//! ops are keyed by request id and the last op on an id wins, so replaying ops the state
//! already reflects converges to the origin's state.
//!
//! A peer silent for longer than a timeout is gone: its bookings are dropped. A peer's heartbeat
//! keeps its bookings from the stale sweep (the peer sweeps its own and says so).
//!
//! Transport (NATS in `kvgate-runtime`) and timers live outside; this is plain data.

use crate::herding::HerdGuard;
use crate::ids::{LocalHash, RequestId, SeqHash, WorkerRank};
use crate::load::{Booking, NewBooking};
use crate::router::{ReplicaHome, Router};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::time::{Duration, Instant};

/// A router replica's identity: random per process, so a restarted replica is a new peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ReplicaId(pub u64);

impl fmt::Display for ReplicaId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// Most blocks one synced booking may carry (a 1M-token prompt at block size 16).
pub const MAX_SYNC_BLOCKS: usize = 65_536;
/// Most messages buffered for a peer while its state is being fetched.
pub const MAX_PENDING: usize = 100_000;

/// One booking as it travels between replicas.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyncBooking {
    pub id: String,
    pub worker_id: u64,
    pub dp_rank: u32,
    /// The prompt's complete blocks (chained hashes; identical on every replica).
    pub seqs: Vec<u64>,
    /// Their local hashes, when the approximate index needs them; else empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub locals: Vec<u64>,
    pub prefill_tokens: u64,
    #[serde(default)]
    pub prefill_done: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected_output_tokens: Option<u32>,
    #[serde(default)]
    pub output_tokens: u32,
}

impl SyncBooking {
    pub fn from_booking(id: &str, b: &Booking) -> Self {
        Self {
            id: id.to_string(),
            worker_id: b.worker.worker.0,
            dp_rank: b.worker.dp_rank.0,
            seqs: b.seqs.iter().map(|s| s.0).collect(),
            locals: b.locals.iter().map(|l| l.0).collect(),
            prefill_tokens: b.prefill_tokens,
            prefill_done: b.prefill_done,
            expected_output_tokens: b.expected_output_tokens,
            output_tokens: b.output_tokens,
        }
    }

    fn validate(&self) -> Result<(), String> {
        if self.seqs.len() > MAX_SYNC_BLOCKS {
            return Err(format!(
                "booking {:?} carries {} blocks (at most {MAX_SYNC_BLOCKS})",
                self.id,
                self.seqs.len()
            ));
        }
        if !self.locals.is_empty() && self.locals.len() != self.seqs.len() {
            return Err(format!(
                "booking {:?} has {} local hashes for {} blocks",
                self.id,
                self.locals.len(),
                self.seqs.len()
            ));
        }
        Ok(())
    }
}

/// What a replica did to one of its bookings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum SyncOp {
    Booked(SyncBooking),
    PrefillDone {
        id: String,
    },
    Rebooked {
        id: String,
        worker_id: u64,
        dp_rank: u32,
    },
    Freed {
        id: String,
    },
}

/// A replica's numbered batch of ops; no ops = a heartbeat carrying the last `seq`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyncMessage {
    pub from: ReplicaId,
    pub seq: u64,
    #[serde(default)]
    pub ops: Vec<SyncOp>,
}

impl SyncMessage {
    /// Structural limits a peer's message must respect before it touches the router.
    pub fn validate(&self) -> Result<(), String> {
        for op in &self.ops {
            if let SyncOp::Booked(b) = op {
                b.validate()?;
            }
        }
        Ok(())
    }
}

/// A replica's bookings, as of its message `seq`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyncState {
    pub from: ReplicaId,
    pub seq: u64,
    pub bookings: Vec<SyncBooking>,
}

impl SyncState {
    pub fn validate(&self) -> Result<(), String> {
        self.bookings.iter().try_for_each(SyncBooking::validate)
    }
}

/// The local key of a peer's request: a NUL (which no HTTP header value holds) and the peer.
pub fn peer_key(from: ReplicaId, id: &str) -> RequestId {
    RequestId::from(format!("\0{from}/{id}"))
}

/// Whether a booking key is a peer's (see [`peer_key`]).
pub fn is_peer_key(id: &RequestId) -> bool {
    id.as_str().starts_with('\0')
}

/// The ops to publish for this replica's own booking `id`, as it stands now.
pub fn booked_op(router: &Router, id: &RequestId) -> Option<SyncOp> {
    let b = router.load().booking(id)?;
    Some(SyncOp::Booked(SyncBooking::from_booking(id.as_str(), b)))
}

/// This replica's own bookings (what a peer's state request gets).
pub fn own_state(router: &Router, me: ReplicaId, seq: u64) -> SyncState {
    let mut bookings: Vec<SyncBooking> = router
        .load()
        .bookings()
        .filter(|(id, _)| !is_peer_key(id))
        .map(|(id, b)| SyncBooking::from_booking(id.as_str(), b))
        .collect();
    bookings.sort_by(|a, b| a.id.cmp(&b.id));
    SyncState {
        from: me,
        seq,
        bookings,
    }
}

/// What [`ReplicaView::on_message`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Received {
    /// Our own message, echoed back: ignored.
    Own,
    Applied,
    /// Already applied (or covered by a state): ignored.
    Duplicate,
    /// Held until the peer's state arrives.
    Buffered,
    /// This peer cannot be followed: fetch its state and call [`ReplicaView::on_state`].
    NeedState(ReplicaId),
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyncCounters {
    pub messages_applied: u64,
    pub ops_applied: u64,
    pub duplicates: u64,
    /// Gaps in a peer's sequence (lost messages).
    pub gaps: u64,
    pub states_applied: u64,
    pub peers_expired: u64,
    /// Buffered messages dropped because a peer's state took too long.
    pub pending_overflow: u64,
}

#[derive(Debug)]
struct Peer {
    synced: bool,
    /// Highest `seq` applied (meaningful when `synced`).
    last_seq: u64,
    last_seen: Instant,
    /// Keys of the peer's bookings held in the router.
    ids: HashSet<RequestId>,
    /// Messages that arrived while the peer's state was being fetched.
    pending: Vec<SyncMessage>,
}

impl Peer {
    fn new(now: Instant) -> Self {
        Self {
            synced: false,
            last_seq: 0,
            last_seen: now,
            ids: HashSet::new(),
            pending: Vec::new(),
        }
    }
}

/// The peers as this replica follows them. See the module docs.
#[derive(Debug)]
pub struct ReplicaView {
    me: ReplicaId,
    peers: HashMap<ReplicaId, Peer>,
    pub counters: SyncCounters,
    herd: HerdGuard,
}

/// Default [`HerdGuard`] window: a few times replica sync's delivery on one network (~1 ms).
pub const DEFAULT_HERD_WINDOW: Duration = Duration::from_millis(5);

impl ReplicaView {
    pub fn new(me: ReplicaId) -> Self {
        Self {
            me,
            peers: HashMap::new(),
            counters: SyncCounters::default(),
            herd: HerdGuard::new(DEFAULT_HERD_WINDOW),
        }
    }

    /// The herding measure's window (about the sync delay; [`DEFAULT_HERD_WINDOW`] otherwise).
    pub fn with_herd_window(mut self, window: Duration) -> Self {
        self.herd = HerdGuard::new(window);
        self
    }

    /// This replica made a routing decision (see [`HerdGuard`]).
    pub fn decided(&mut self, now: Instant) {
        self.herd.decided(now);
    }

    /// Smoothed peer decisions unseen at each own decision (see [`HerdGuard`]).
    pub fn herd_level(&mut self, now: Instant) -> f64 {
        self.herd.level(now)
    }

    /// This replica's home share of the fleet as of `now`: its rank among itself and the
    /// peers it follows, and `discount` scaled by how often peers decide alongside it. `None`
    /// when alone or when peers' decisions come apart from its own: then it routes exactly as
    /// a single router.
    pub fn home(&mut self, now: Instant, discount: f64) -> Option<ReplicaHome> {
        if self.peers.is_empty() || discount <= 0.0 {
            return None;
        }
        let level = self.herd.level(now).min(1.0);
        if level < 0.01 {
            return None;
        }
        let rank = self.peers.keys().filter(|p| **p < self.me).count();
        Some(ReplicaHome {
            rank,
            of: self.peers.len() + 1,
            discount: discount * level,
        })
    }

    /// A decision is being made at `now`: its home (as [`home`](Self::home)), and the decision
    /// recorded for the herd measure (as [`decided`](Self::decided)) in the same call, so that
    /// an adapter takes the view's lock once per decision. An attempt that then fails (no
    /// worker, overload) still counts: peers deciding alongside it are as much a herd.
    pub fn deciding(&mut self, now: Instant, discount: f64) -> Option<ReplicaHome> {
        let home = self.home(now, discount);
        self.herd.decided(now);
        home
    }

    pub fn me(&self) -> ReplicaId {
        self.me
    }

    /// Peers currently followed (synced or being fetched).
    pub fn peers(&self) -> usize {
        self.peers.len()
    }

    /// Peers whose state is awaited.
    pub fn unsynced(&self) -> usize {
        self.peers.values().filter(|p| !p.synced).count()
    }

    /// Peers' bookings held in the router.
    pub fn peer_bookings(&self) -> usize {
        self.peers.values().map(|p| p.ids.len()).sum()
    }

    /// Applies a peer's message (or decides it needs the peer's state first).
    pub fn on_message(&mut self, router: &mut Router, msg: SyncMessage, now: Instant) -> Received {
        if msg.from == self.me {
            return Received::Own;
        }
        let from = msg.from;
        let peer = match self.peers.entry(msg.from) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                let p = e.insert(Peer::new(now));
                // A replica heard from its very beginning needs no state: it had nothing before.
                let from_start = if msg.ops.is_empty() {
                    msg.seq == 0
                } else {
                    msg.seq == 1
                };
                if from_start {
                    p.synced = true;
                } else {
                    p.pending.push(msg);
                    return Received::NeedState(from);
                }
                p
            }
        };
        peer.last_seen = now;
        if !peer.synced {
            if peer.pending.len() >= MAX_PENDING {
                // The state is late; what is dropped here reappears as a gap after it.
                peer.pending.clear();
                self.counters.pending_overflow += 1;
            }
            peer.pending.push(msg);
            return Received::Buffered;
        }
        if msg.ops.is_empty() {
            if msg.seq > peer.last_seq {
                // The heartbeat says messages were sent that never arrived.
                self.counters.gaps += 1;
                peer.synced = false;
                return Received::NeedState(from);
            }
            // The peer is alive, and so are its bookings.
            for id in &peer.ids {
                router.touch(id, now);
            }
            return Received::Applied;
        }
        if msg.seq <= peer.last_seq {
            self.counters.duplicates += 1;
            return Received::Duplicate;
        }
        if msg.seq > peer.last_seq + 1 {
            self.counters.gaps += 1;
            peer.synced = false;
            peer.pending.push(msg);
            return Received::NeedState(from);
        }
        peer.last_seq = msg.seq;
        let booked = msg
            .ops
            .iter()
            .filter(|op| matches!(op, SyncOp::Booked(_)))
            .count();
        self.herd.peer_decided(booked as u32, now);
        self.counters.ops_applied += msg.ops.len() as u64;
        self.counters.messages_applied += 1;
        for op in msg.ops {
            apply_op(router, from, &mut peer.ids, op, now);
        }
        Received::Applied
    }

    /// A peer's state arrived: it replaces what was held for that peer, then the messages
    /// buffered meanwhile are replayed. Returns `NeedState` again if they still leave a gap.
    pub fn on_state(&mut self, router: &mut Router, state: SyncState, now: Instant) -> Received {
        if state.from == self.me {
            return Received::Own;
        }
        let from = state.from;
        let peer = self.peers.entry(from).or_insert_with(|| Peer::new(now));
        for id in peer.ids.drain() {
            router.free(&id);
        }
        for b in state.bookings {
            apply_op(router, from, &mut peer.ids, SyncOp::Booked(b), now);
        }
        peer.synced = true;
        peer.last_seq = state.seq;
        peer.last_seen = now;
        self.counters.states_applied += 1;
        let pending = std::mem::take(&mut peer.pending);
        let mut outcome = Received::Applied;
        for msg in pending {
            match self.on_message(router, msg, now) {
                Received::NeedState(r) => outcome = Received::NeedState(r),
                _ => continue,
            }
        }
        outcome
    }

    /// The peer's state could not be fetched (it is gone): forget it and its bookings. Its next
    /// message, if any, starts over.
    pub fn on_state_failed(&mut self, router: &mut Router, from: ReplicaId) {
        self.forget(router, from);
    }

    /// Forgets peers silent for longer than `timeout`; returns them.
    pub fn expire(
        &mut self,
        router: &mut Router,
        now: Instant,
        timeout: Duration,
    ) -> Vec<ReplicaId> {
        let silent: Vec<ReplicaId> = self
            .peers
            .iter()
            .filter(|(_, p)| now.saturating_duration_since(p.last_seen) > timeout)
            .map(|(id, _)| *id)
            .collect();
        for id in &silent {
            self.forget(router, *id);
            self.counters.peers_expired += 1;
        }
        silent
    }

    fn forget(&mut self, router: &mut Router, from: ReplicaId) {
        if let Some(p) = self.peers.remove(&from) {
            for id in p.ids {
                router.free(&id);
            }
        }
    }
}

fn apply_op(
    router: &mut Router,
    from: ReplicaId,
    ids: &mut HashSet<RequestId>,
    op: SyncOp,
    now: Instant,
) {
    match op {
        SyncOp::Booked(b) => {
            let key = peer_key(from, &b.id);
            let seqs: Vec<SeqHash> = b.seqs.iter().map(|&s| SeqHash(s)).collect();
            let locals: Vec<LocalHash> = b.locals.iter().map(|&l| LocalHash(l)).collect();
            let booked = router.book_decided(
                NewBooking {
                    request: key.clone(),
                    worker: WorkerRank::new(b.worker_id, b.dp_rank),
                    seqs: &seqs,
                    locals: &locals,
                    prefill_tokens: b.prefill_tokens,
                    expected_output_tokens: b.expected_output_tokens,
                },
                b.prefill_done,
                b.output_tokens,
                now,
            );
            // A duplicate is already held (a state covered it): the held copy stands.
            let _ = booked;
            ids.insert(key);
        }
        SyncOp::PrefillDone { id } => {
            router.prefill_complete(&peer_key(from, &id));
        }
        SyncOp::Rebooked {
            id,
            worker_id,
            dp_rank,
        } => {
            router.rebook(
                &peer_key(from, &id),
                WorkerRank::new(worker_id, dp_rank),
                now,
            );
        }
        SyncOp::Freed { id } => {
            let key = peer_key(from, &id);
            router.free(&key);
            ids.remove(&key);
        }
    }
}
