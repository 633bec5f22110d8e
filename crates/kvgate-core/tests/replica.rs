//! Replica sync in the core: replicas exchanging messages (lost, late, duplicated) and states
//! converge on the same load view, equal to the union of everyone's own bookings.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use kvgate_core::config::RouterConfig;
use kvgate_core::hashing::{BlockHashes, HashSeed};
use kvgate_core::load::NewBooking;
use kvgate_core::random::SplitMix64;
use kvgate_core::replica::{
    MAX_SYNC_BLOCKS, Received, ReplicaId, ReplicaView, SyncBooking, SyncMessage, SyncOp, SyncState,
    booked_op, is_peer_key, own_state, peer_key,
};
use kvgate_core::router::{ReplicaHome, RouteRequest, Router, WorkerInfo, WorkerRole};
use kvgate_core::scheduler::WorkerCapacity;
use kvgate_core::{LocalHash, RequestId, SeqHash, WorkerId, WorkerRank};
use proptest::prelude::*;
use std::time::{Duration, Instant};

const BS: usize = 16;

fn router(use_kv_events: bool) -> Router {
    let mut r = Router::new(
        RouterConfig {
            use_kv_events,
            ..RouterConfig::default()
        },
        BS,
    )
    .unwrap();
    for id in [1, 2, 3] {
        r.upsert_worker(WorkerInfo {
            id: WorkerId(id),
            dp_size: 1,
            role: WorkerRole::Aggregated,
            capacity: WorkerCapacity::default(),
        });
    }
    r
}

fn prompt(seed: u32, blocks: usize) -> BlockHashes {
    let tokens: Vec<u32> = (0..(blocks * BS) as u32)
        .map(|t| t.wrapping_mul(seed + 7) % 50_000)
        .collect();
    BlockHashes::from_tokens(&tokens, BS, HashSeed::default())
}

/// One router replica with its outbox, as the runtime drives it.
struct Replica {
    id: ReplicaId,
    router: Router,
    view: ReplicaView,
    seq: u64,
    outbox: Vec<SyncOp>,
    live: Vec<RequestId>,
    rng: SplitMix64,
    next: u64,
}

impl Replica {
    fn new(id: u64, use_kv_events: bool) -> Self {
        Self {
            id: ReplicaId(id),
            router: router(use_kv_events),
            view: ReplicaView::new(ReplicaId(id)),
            seq: 0,
            outbox: Vec::new(),
            live: Vec::new(),
            rng: SplitMix64::new(id),
            next: 0,
        }
    }

    fn book(&mut self, h: &BlockHashes, now: Instant) {
        self.book_home(h, None, now);
    }

    fn book_home(&mut self, h: &BlockHashes, home: Option<ReplicaHome>, now: Instant) {
        // Every replica numbers its requests the same way: ids collide across replicas.
        self.next += 1;
        let id = RequestId::from(format!("epp-{}", self.next));
        self.router
            .route(
                RouteRequest {
                    request: &id,
                    hashes: h,
                    expected_output_tokens: None,
                    allowed: None,
                    book: true,
                    home,
                },
                now,
                &mut self.rng,
            )
            .unwrap();
        self.outbox.push(booked_op(&self.router, &id).unwrap());
        self.live.push(id);
    }

    fn prefill_done(&mut self, k: usize) {
        if let Some(id) = self.pick(k)
            && self.router.prefill_complete(&id) == kvgate_core::load::Change::Applied
        {
            self.outbox.push(SyncOp::PrefillDone { id: id.to_string() });
        }
    }

    fn rebook(&mut self, k: usize, to: u64, now: Instant) {
        if let Some(id) = self.pick(k) {
            let w = WorkerRank::new(to, 0);
            if self.router.rebook(&id, w, now) == kvgate_core::load::Change::Applied {
                self.outbox.push(SyncOp::Rebooked {
                    id: id.to_string(),
                    worker_id: to,
                    dp_rank: 0,
                });
            }
        }
    }

    fn free(&mut self, k: usize) {
        if let Some(id) = self.pick(k) {
            self.live.retain(|x| *x != id);
            self.router.free(&id);
            self.outbox.push(SyncOp::Freed { id: id.to_string() });
        }
    }

    fn pick(&self, k: usize) -> Option<RequestId> {
        (!self.live.is_empty()).then(|| self.live[k % self.live.len()].clone())
    }

    fn flush(&mut self) -> Option<SyncMessage> {
        if self.outbox.is_empty() {
            return None;
        }
        self.seq += 1;
        Some(SyncMessage {
            from: self.id,
            seq: self.seq,
            ops: std::mem::take(&mut self.outbox),
        })
    }

    fn heartbeat(&self) -> SyncMessage {
        SyncMessage {
            from: self.id,
            seq: self.seq,
            ops: vec![],
        }
    }

    /// The state a peer gets: the published seq is read before the bookings, and anything still
    /// in the outbox is already in the bookings (the runtime's order).
    fn state(&self) -> SyncState {
        own_state(&self.router, self.id, self.seq)
    }
}

/// Delivers `msg` to replica `to`, fetching states from the others as asked.
fn deliver(reps: &mut [Replica], to: usize, msg: SyncMessage, now: Instant) -> Received {
    let mut outcome = {
        let r = &mut reps[to];
        r.view.on_message(&mut r.router, msg, now)
    };
    while let Received::NeedState(origin) = outcome {
        let state = reps.iter().find(|r| r.id == origin).unwrap().state();
        let r = &mut reps[to];
        outcome = r.view.on_state(&mut r.router, state, now);
    }
    outcome
}

/// The load everyone should see: all replicas' own bookings in one router.
fn truth(reps: &[Replica], now: Instant) -> Router {
    let mut t = router(true);
    for r in reps {
        for b in own_state(&r.router, r.id, 0).bookings {
            let seqs: Vec<SeqHash> = b.seqs.iter().map(|&s| SeqHash(s)).collect();
            t.book_decided(
                NewBooking {
                    request: peer_key(r.id, &b.id),
                    worker: WorkerRank::new(b.worker_id, b.dp_rank),
                    seqs: &seqs,
                    locals: &[] as &[LocalHash],
                    prefill_tokens: b.prefill_tokens,
                    expected_output_tokens: b.expected_output_tokens,
                },
                b.prefill_done,
                b.output_tokens,
                now,
            )
            .unwrap();
        }
    }
    t
}

#[derive(Clone, Debug)]
enum Action {
    Book(usize, u32, usize),
    PrefillDone(usize, usize),
    Rebook(usize, usize, u64),
    Free(usize, usize),
    /// Flush replica i's outbox; each recipient loses it when its bit in the mask is set.
    Flush(usize, u8),
    Heartbeat(usize, u8),
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        4 => (0..3usize, 0..6u32, 1..6usize).prop_map(|(i, p, n)| Action::Book(i, p, n)),
        2 => (0..3usize, 0..8usize).prop_map(|(i, k)| Action::PrefillDone(i, k)),
        1 => (0..3usize, 0..8usize, 1..4u64).prop_map(|(i, k, w)| Action::Rebook(i, k, w)),
        2 => (0..3usize, 0..8usize).prop_map(|(i, k)| Action::Free(i, k)),
        3 => (0..3usize, any::<u8>()).prop_map(|(i, m)| Action::Flush(i, m)),
        1 => (0..3usize, any::<u8>()).prop_map(|(i, m)| Action::Heartbeat(i, m)),
    ]
}

fn broadcast(reps: &mut [Replica], from: usize, msg: &SyncMessage, lost: u8, now: Instant) {
    for to in 0..reps.len() {
        // Lose with probability 1/4 per recipient (two bits of the mask).
        if to != from && (lost >> (2 * to)) & 3 != 0 {
            deliver(reps, to, msg.clone(), now);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Whatever is lost on the way, after a heartbeat round everyone's load view is the union of
    /// everyone's own bookings, in approximate mode (predictions travel too) and with events.
    #[test]
    fn replicas_converge_despite_losses(actions in prop::collection::vec(action(), 1..80), kv_events: bool) {
        let now = Instant::now();
        let mut reps: Vec<Replica> = (1..=3).map(|i| Replica::new(i * 1000 + 7, kv_events)).collect();
        for a in actions {
            match a {
                Action::Book(i, p, n) => reps[i].book(&prompt(p, n), now),
                Action::PrefillDone(i, k) => reps[i].prefill_done(k),
                Action::Rebook(i, k, w) => reps[i].rebook(k, w, now),
                Action::Free(i, k) => reps[i].free(k),
                Action::Flush(i, m) => {
                    if let Some(msg) = reps[i].flush() {
                        broadcast(&mut reps, i, &msg, m, now);
                    }
                }
                Action::Heartbeat(i, m) => {
                    let hb = reps[i].heartbeat();
                    broadcast(&mut reps, i, &hb, m, now);
                }
            }
        }
        for i in 0..3 {
            if let Some(msg) = reps[i].flush() {
                broadcast(&mut reps, i, &msg, 0x00, now);
            }
        }
        for i in 0..3 {
            let hb = reps[i].heartbeat();
            broadcast(&mut reps, i, &hb, 0xff, now);
        }
        let want = truth(&reps, now).load().summary();
        for r in &reps {
            prop_assert_eq!(r.router.load().summary(), want.clone());
            prop_assert_eq!(r.view.unsynced(), 0);
        }
    }
}

#[test]
fn a_late_replica_fetches_the_state_and_then_follows() {
    let now = Instant::now();
    let mut reps = vec![Replica::new(1, true), Replica::new(2, true)];
    reps[0].book(&prompt(1, 4), now);
    reps[0].book(&prompt(2, 3), now);
    let m1 = reps[0].flush().unwrap();
    reps[0].prefill_done(0);
    let m2 = reps[0].flush().unwrap();
    assert_eq!(m2.seq, 2);
    // Replica 2 missed everything; the heartbeat (seq 2) from an unknown peer asks for state.
    let hb = reps[0].heartbeat();
    let state = reps[0].state();
    assert_eq!(state.bookings.len(), 2);
    {
        let r = &mut reps[1];
        assert_eq!(
            r.view.on_message(&mut r.router, hb, now),
            Received::NeedState(ReplicaId(1))
        );
        assert_eq!(
            r.view.on_state(&mut r.router, state, now),
            Received::Applied
        );
    }
    assert_eq!(
        reps[1].router.load().summary(),
        reps[0].router.load().summary()
    );
    // Old messages arriving late change nothing; the next one applies.
    assert_eq!(deliver(&mut reps, 1, m1, now), Received::Duplicate);
    reps[0].free(0);
    let m3 = reps[0].flush().unwrap();
    assert_eq!(deliver(&mut reps, 1, m3, now), Received::Applied);
    assert_eq!(
        reps[1].router.load().summary(),
        reps[0].router.load().summary()
    );
    assert_eq!(reps[1].view.peer_bookings(), 1);
}

#[test]
fn a_replica_heard_from_its_start_needs_no_state() {
    let now = Instant::now();
    let mut reps = vec![Replica::new(1, true), Replica::new(2, true)];
    let hb = reps[0].heartbeat();
    assert_eq!(deliver(&mut reps, 1, hb, now), Received::Applied);
    reps[0].book(&prompt(1, 4), now);
    let m = reps[0].flush().unwrap();
    let r = &mut reps[1];
    assert_eq!(r.view.on_message(&mut r.router, m, now), Received::Applied);
    assert_eq!(r.view.counters.states_applied, 0);
}

#[test]
fn a_gap_buffers_until_the_state_then_replays_what_is_newer() {
    let now = Instant::now();
    let mut reps = vec![Replica::new(1, true), Replica::new(2, true)];
    reps[0].book(&prompt(1, 4), now);
    let m1 = reps[0].flush().unwrap();
    deliver(&mut reps, 1, m1, now);
    reps[0].book(&prompt(2, 4), now);
    let _lost = reps[0].flush().unwrap();
    // The state is taken now (seq 2); then more happens before it arrives.
    let state = reps[0].state();
    reps[0].free(0);
    let m3 = reps[0].flush().unwrap();
    let r = &mut reps[1];
    assert_eq!(
        r.view.on_message(&mut r.router, m3, now),
        Received::NeedState(ReplicaId(1))
    );
    assert_eq!(r.view.counters.gaps, 1);
    assert_eq!(r.view.unsynced(), 1);
    assert_eq!(
        r.view.on_state(&mut r.router, state, now),
        Received::Applied
    );
    assert_eq!(
        reps[1].router.load().summary(),
        reps[0].router.load().summary()
    );
    assert_eq!(reps[1].view.peer_bookings(), 1);
}

#[test]
fn own_messages_are_ignored_and_peers_never_collide_with_own_ids() {
    let now = Instant::now();
    let mut a = Replica::new(1, true);
    let mut b = Replica::new(2, true);
    a.book(&prompt(1, 2), now);
    b.book(&prompt(1, 2), now);
    let ma = a.flush().unwrap();
    assert_eq!(
        a.view.on_message(&mut a.router, ma.clone(), now),
        Received::Own
    );
    // Both used "epp-1": the peer's copy lives under its own key.
    assert_eq!(b.view.on_message(&mut b.router, ma, now), Received::Applied);
    assert_eq!(b.router.load().num_bookings(), 2);
    let keys: Vec<&RequestId> = b.router.load().bookings().map(|(k, _)| k).collect();
    assert_eq!(keys.iter().filter(|k| is_peer_key(k)).count(), 1);
    assert_eq!(own_state(&b.router, b.id, 1).bookings.len(), 1);
}

#[test]
fn silent_peers_lose_their_bookings_and_heartbeats_keep_them_from_the_stale_sweep() {
    let t0 = Instant::now();
    let mut a = Replica::new(1, true);
    let mut b = Replica::new(2, true);
    a.book(&prompt(1, 3), t0);
    let m = a.flush().unwrap();
    b.view.on_message(&mut b.router, m, t0);
    // A heartbeat at 200 s refreshes the booking: the sweep at 400 s (stale after 300 s) keeps it.
    let t1 = t0 + Duration::from_secs(200);
    b.view.on_message(&mut b.router, a.heartbeat(), t1);
    let t2 = t0 + Duration::from_secs(400);
    assert!(b.router.sweep(t2, Duration::from_secs(300)).is_empty());
    assert_eq!(b.router.load().num_bookings(), 1);
    // Silent for 10 s more than the timeout: gone, with its load.
    assert!(
        b.view
            .expire(
                &mut b.router,
                t1 + Duration::from_secs(5),
                Duration::from_secs(10)
            )
            .is_empty()
    );
    assert_eq!(
        b.view.expire(
            &mut b.router,
            t1 + Duration::from_secs(11),
            Duration::from_secs(10)
        ),
        vec![ReplicaId(1)]
    );
    assert_eq!(b.router.load().num_bookings(), 0);
    assert!(b.router.load().summary().is_empty());
    assert_eq!(b.view.peers(), 0);
}

#[test]
fn a_peer_whose_state_cannot_be_fetched_is_forgotten_and_retried_on_its_next_message() {
    let now = Instant::now();
    let mut a = Replica::new(1, true);
    let mut b = Replica::new(2, true);
    a.book(&prompt(1, 3), now);
    let _lost = a.flush().unwrap();
    assert_eq!(
        b.view.on_message(&mut b.router, a.heartbeat(), now),
        Received::NeedState(ReplicaId(1))
    );
    // While fetching, messages wait.
    a.book(&prompt(2, 3), now);
    let m2 = a.flush().unwrap();
    assert_eq!(
        b.view.on_message(&mut b.router, m2, now),
        Received::Buffered
    );
    b.view.on_state_failed(&mut b.router, ReplicaId(1));
    assert_eq!(b.view.peers(), 0);
    assert_eq!(
        b.view.on_message(&mut b.router, a.heartbeat(), now),
        Received::NeedState(ReplicaId(1))
    );
}

#[test]
fn the_wire_format_is_stable_and_limits_are_checked() {
    let msg = SyncMessage {
        from: ReplicaId(255),
        seq: 3,
        ops: vec![
            SyncOp::Booked(SyncBooking {
                id: "epp-1".into(),
                worker_id: 42,
                dp_rank: 1,
                seqs: vec![7, 9],
                locals: vec![],
                prefill_tokens: 32,
                prefill_done: false,
                expected_output_tokens: None,
                output_tokens: 0,
            }),
            SyncOp::PrefillDone { id: "epp-1".into() },
            SyncOp::Freed { id: "epp-1".into() },
        ],
    };
    let json = serde_json::to_string(&msg).unwrap();
    assert_eq!(
        json,
        r#"{"from":255,"seq":3,"ops":[{"booked":{"id":"epp-1","worker_id":42,"dp_rank":1,"seqs":[7,9],"prefill_tokens":32,"prefill_done":false,"output_tokens":0}},{"prefill_done":{"id":"epp-1"}},{"freed":{"id":"epp-1"}}]}"#
    );
    assert_eq!(serde_json::from_str::<SyncMessage>(&json).unwrap(), msg);
    assert!(msg.validate().is_ok());
    let mut big = msg.clone();
    if let SyncOp::Booked(b) = &mut big.ops[0] {
        b.seqs = vec![1; MAX_SYNC_BLOCKS + 1];
    }
    assert!(big.validate().unwrap_err().contains("blocks"));
    let mut odd = msg;
    if let SyncOp::Booked(b) = &mut odd.ops[0] {
        b.locals = vec![1];
    }
    assert!(odd.validate().unwrap_err().contains("local hashes"));
    for bad in [
        r#"{"from":1,"seq":-1}"#,
        r#"{"from":1,"seq":1,"ops":[{"stolen":{}}]}"#,
        r#"{"from":"x","seq":1}"#,
        r#"{"from":1,"seq":1,"ops":[{"booked":{"id":"a"}}]}"#,
    ] {
        assert!(serde_json::from_str::<SyncMessage>(bad).is_err(), "{bad}");
    }
}

// ---------------- herding: replica homes ----------------

/// Routes one cold request on replica `r` at `now` with homes at `discount`; the worker chosen.
fn route_with_home(r: &mut Replica, h: &BlockHashes, discount: f64, now: Instant) -> u64 {
    let home = r.view.deciding(now, discount);
    r.book_home(h, home, now);
    let id = r.live.last().unwrap().clone();
    r.router.load().booking(&id).unwrap().worker.worker.0
}

/// Rounds of one request per replica; `gap` apart within a round (zero: a simultaneous burst).
/// Every message arrives 1 ms after it was sent, and each round's requests end before the next.
/// Returns, per round, the workers chosen.
fn rounds(discount: f64, gap: Duration, n: usize) -> (Vec<Vec<u64>>, Vec<Replica>) {
    let t0 = Instant::now();
    let mut reps: Vec<Replica> = (1..=3).map(|i| Replica::new(i, true)).collect();
    for r in &mut reps {
        r.view = ReplicaView::new(r.id).with_herd_window(Duration::from_millis(2));
    }
    let mut out = Vec::new();
    for round in 0..n {
        let start = t0 + Duration::from_secs(round as u64);
        let mut chosen = Vec::new();
        for k in 0..reps.len() {
            let at = start + gap * k as u32;
            let h = prompt((round * 10 + k) as u32 + 1000, 4);
            chosen.push(route_with_home(&mut reps[k], &h, discount, at));
            if !gap.is_zero() {
                // Spaced: this decision reaches the others before the next one is made.
                let m = reps[k].flush().unwrap();
                for to in 0..reps.len() {
                    if to != k {
                        deliver(&mut reps, to, m.clone(), at + Duration::from_millis(1));
                    }
                }
            }
        }
        if gap.is_zero() {
            let msgs: Vec<SyncMessage> = reps.iter_mut().filter_map(|r| r.flush()).collect();
            for m in msgs {
                for to in 0..reps.len() {
                    if reps[to].id != m.from {
                        deliver(&mut reps, to, m.clone(), start + Duration::from_millis(1));
                    }
                }
            }
        }
        // The round's requests end: each replica frees its own and tells the others.
        let end = start + Duration::from_millis(500);
        for k in 0..reps.len() {
            while !reps[k].live.is_empty() {
                reps[k].free(0);
            }
            if let Some(m) = reps[k].flush() {
                for to in 0..reps.len() {
                    if to != k {
                        deliver(&mut reps, to, m.clone(), end);
                    }
                }
            }
        }
        out.push(chosen);
    }
    (out, reps)
}

fn distinct(ws: &[u64]) -> bool {
    let mut v = ws.to_vec();
    v.sort_unstable();
    v.dedup();
    v.len() == ws.len()
}

#[test]
fn simultaneous_replicas_spread_a_burst_over_their_homes_and_without_them_collide() {
    let (with, mut reps) = rounds(0.4, Duration::ZERO, 30);
    // After the first burst has taught the replicas that peers decide alongside them, every
    // burst lands on three different workers.
    assert!(with[1..].iter().all(|ws| distinct(ws)), "{with:?}");
    let level = reps[0]
        .view
        .herd_level(Instant::now() + Duration::from_secs(60));
    assert!(level > 1.0, "{level}");
    let (without, _) = rounds(0.0, Duration::ZERO, 30);
    assert!(without.iter().any(|ws| !distinct(ws)), "{without:?}");
}

#[test]
fn replicas_deciding_apart_have_no_home_and_route_as_one_router() {
    let (_, mut reps) = rounds(0.4, Duration::from_millis(100), 20);
    for r in &mut reps {
        let now = Instant::now() + Duration::from_secs(60);
        assert_eq!(r.view.herd_level(now), 0.0);
        assert_eq!(r.view.home(now, 0.4), None);
    }
}

#[test]
fn a_home_wins_ties_but_not_a_cache_hit_and_bad_homes_are_refused() {
    use kvgate_core::events::{KvEvent, KvEventData, StoredBlock};
    let now = Instant::now();
    let mut r = router(true);
    for bad in [
        ReplicaHome {
            rank: 0,
            of: 1,
            discount: 0.4,
        },
        ReplicaHome {
            rank: 3,
            of: 3,
            discount: 0.4,
        },
        ReplicaHome {
            rank: 0,
            of: 3,
            discount: 0.0,
        },
        // A full discount would make the home free and blind to cache and load.
        ReplicaHome {
            rank: 0,
            of: 3,
            discount: 1.0,
        },
    ] {
        assert!(!bad.is_usable(), "{bad:?}");
        // Ignored: the same choice as without a home, from the same random state.
        let id = RequestId::from("bad-home");
        let mut choose = |home| {
            r.route(
                RouteRequest {
                    request: &id,
                    hashes: &prompt(5, 4),
                    expected_output_tokens: None,
                    allowed: None,
                    book: false,
                    home,
                },
                now,
                &mut SplitMix64::new(9),
            )
            .unwrap()
        };
        let (with_bad, without) = (choose(Some(bad)), choose(None));
        assert_eq!(with_bad, without, "{bad:?}");
    }
    // Rank 2 of 3: the third worker of the sorted fleet (id 3) is home.
    let home = Some(ReplicaHome {
        rank: 2,
        of: 3,
        discount: 0.4,
    });
    let mut rng = SplitMix64::new(1);
    for i in 0..20u32 {
        let id = RequestId::from(format!("cold-{i}"));
        let d = r
            .route(
                RouteRequest {
                    request: &id,
                    hashes: &prompt(i + 1, 4),
                    expected_output_tokens: None,
                    allowed: None,
                    book: false,
                    home,
                },
                now,
                &mut rng,
            )
            .unwrap();
        assert_eq!(
            d.worker.worker,
            WorkerId(3),
            "idle fleet: the home wins the tie"
        );
    }
    // Worker 1 caches the whole prompt: the hit outweighs the home's discount.
    let h = prompt(77, 8);
    let stored = KvEvent {
        source: WorkerRank::new(1, 0),
        event_id: 1,
        tier: Default::default(),
        data: KvEventData::Stored {
            parent: None,
            blocks: h
                .seqs()
                .iter()
                .zip(h.locals())
                .map(|(s, l)| StoredBlock {
                    hash: kvgate_core::ExternalHash(s.0),
                    local: *l,
                })
                .collect(),
        },
    };
    assert!(r.apply_event(&stored));
    let id = RequestId::from("warm");
    let d = r
        .route(
            RouteRequest {
                request: &id,
                hashes: &h,
                expected_output_tokens: None,
                allowed: None,
                book: false,
                home,
            },
            now,
            &mut rng,
        )
        .unwrap();
    assert_eq!(d.worker.worker, WorkerId(1));
}
