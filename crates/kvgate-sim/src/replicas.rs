//! Several router replicas behind one gateway, in virtual time: the question is what N
//! independent routers cost in hit rate and latency against one.
//!
//! [`Replicated`] holds N [`KvRouter`]s. The gateway spreads arrivals over them (round robin or
//! at random, [`Spread`]); the replica a request reached books it and follows it to its end.
//! Every replica applies every engine's KV events (each subscribes to the whole event plane).
//! With sync on, each replica publishes what it does to its bookings as the real sync does
//! (`kvgate-core::replica`: numbered [`SyncMessage`]s of [`SyncOp`]s) and every other replica
//! applies them through its own [`ReplicaView`] `delay` later; with sync off a replica counts
//! only its own bookings as load. The messages are the product's, applied by the product's code:
//! only the transport (NATS) is replaced by a queue with a fixed delay.

use crate::policy::{Arrival, KvRouter, Policy, WorkerView};
use kvgate_core::RequestId;
use kvgate_core::random::{RandomSource, SplitMix64};
use kvgate_core::replica::{
    Received, ReplicaId, ReplicaView, SyncMessage, SyncOp, booked_op, own_state,
};
use kvgate_engine::CacheEvent;
use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// How the gateway spreads requests over the replicas.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Spread {
    RoundRobin,
    Random,
}

impl Spread {
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "round-robin" => Ok(Self::RoundRobin),
            "random" => Ok(Self::Random),
            other => Err(format!(
                "unknown replica spread {other:?} (known: round-robin, random)"
            )),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::RoundRobin => "round-robin",
            Self::Random => "random",
        }
    }
}

struct Replica {
    router: KvRouter,
    view: ReplicaView,
    me: ReplicaId,
    /// The last sync message this replica published.
    seq: u64,
}

/// One message on its way to one replica.
struct InFlight {
    at: Instant,
    to: usize,
    msg: SyncMessage,
}

/// N router replicas as one [`Policy`].
pub struct Replicated {
    name: String,
    replicas: Vec<Replica>,
    spread: Spread,
    rng: SplitMix64,
    next: usize,
    /// `None`: sync off.
    delay: Option<Duration>,
    /// Sync messages not yet delivered, in delivery order (the delay is fixed).
    queue: VecDeque<InFlight>,
    /// Which replica owns each request in flight.
    owner: HashMap<u64, usize>,
    /// Peer states fetched because a view could not follow a peer (never, with this in-order
    /// transport; counted so a test can say so).
    state_fetches: u64,
    /// `Some(d)`: replica homes with discount `d` (see [`Replicated::with_home`]).
    home_discount: Option<f64>,
}

fn request_id(id: u64) -> RequestId {
    RequestId::from(id.to_string())
}

impl Replicated {
    /// `replicas` routers made by `make(i)` (each its own index, load and random stream).
    pub fn new(
        name: &str,
        replicas: usize,
        spread: Spread,
        delay: Option<Duration>,
        seed: u64,
        mut make: impl FnMut(usize) -> Result<KvRouter, String>,
    ) -> Result<Self, String> {
        if replicas == 0 {
            return Err("at least one router replica is needed".into());
        }
        let replicas = (0..replicas)
            .map(|i| {
                let me = ReplicaId(i as u64 + 1);
                Ok(Replica {
                    router: make(i)?,
                    view: ReplicaView::new(me),
                    me,
                    seq: 0,
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(Self {
            name: name.to_string(),
            replicas,
            spread,
            rng: SplitMix64::new(seed ^ 0x5EED_0F5E_ED00_0001),
            next: 0,
            delay,
            queue: VecDeque::new(),
            owner: HashMap::new(),
            state_fetches: 0,
            home_discount: None,
        })
    }

    /// Replica homes against herding ([`kvgate_core::herding`]): each replica's herd window is
    /// `window` (the sync delay is what a deployment would measure).
    pub fn with_home(mut self, discount: Option<f64>, window: Duration) -> Self {
        self.home_discount = discount;
        for r in &mut self.replicas {
            let view = std::mem::replace(&mut r.view, ReplicaView::new(r.me));
            r.view = view.with_herd_window(window);
        }
        self
    }

    /// Bookings each replica holds (its own and its peers'), after every message in flight
    /// has arrived. All zero once every request finished: nothing leaked.
    pub fn bookings_per_replica(&mut self) -> Vec<usize> {
        self.deliver(None);
        self.replicas
            .iter()
            .map(|r| r.router.router().load().bookings().count())
            .collect()
    }

    pub fn state_fetches(&self) -> u64 {
        self.state_fetches
    }

    /// Sends replica `from`'s op to every other replica, `delay` from `now`.
    fn publish(&mut self, from: usize, op: SyncOp, now: Instant) {
        let Some(delay) = self.delay else { return };
        let r = &mut self.replicas[from];
        r.seq += 1;
        let msg = SyncMessage {
            from: r.me,
            seq: r.seq,
            ops: vec![op],
        };
        for to in 0..self.replicas.len() {
            if to != from {
                self.queue.push_back(InFlight {
                    at: now + delay,
                    to,
                    msg: msg.clone(),
                });
            }
        }
    }

    /// Applies the messages due by `now` (all of them with `None`).
    fn deliver(&mut self, now: Option<Instant>) {
        while let Some(m) = self.queue.front() {
            if now.is_some_and(|t| m.at > t) {
                break;
            }
            let Some(m) = self.queue.pop_front() else {
                break;
            };
            // Applied at its arrival time, though the simulation only looks now.
            let at = m.at;
            let to = &mut self.replicas[m.to];
            let got = to.view.on_message(to.router.router_mut(), m.msg, at);
            if let Received::NeedState(peer) = got {
                // In-process, the peer's state is at hand: what the real sync fetches over
                // NATS.
                self.state_fetches += 1;
                let Some(origin) = self.replicas.iter().position(|r| r.me == peer) else {
                    continue;
                };
                let state = own_state(
                    self.replicas[origin].router.router(),
                    peer,
                    self.replicas[origin].seq,
                );
                let to = &mut self.replicas[m.to];
                let _ = to.view.on_state(to.router.router_mut(), state, at);
            }
        }
    }
}

impl Policy for Replicated {
    fn name(&self) -> &str {
        &self.name
    }

    fn route(&mut self, req: &Arrival<'_>, _: &[WorkerView], now: Instant) -> usize {
        self.deliver(Some(now));
        let n = self.replicas.len();
        let r = match self.spread {
            Spread::RoundRobin => {
                self.next = (self.next + 1) % n;
                self.next
            }
            Spread::Random => self.rng.below(n),
        };
        let rep = &mut self.replicas[r];
        let home = rep.view.deciding(now, self.home_discount.unwrap_or(0.0));
        let w = rep.router.route_home(req, home, now);
        self.owner.insert(req.id, r);
        if let Some(op) = booked_op(self.replicas[r].router.router(), &request_id(req.id)) {
            self.publish(r, op, now);
        }
        w
    }

    fn first_token(&mut self, id: u64, now: Instant) {
        self.deliver(Some(now));
        let Some(&r) = self.owner.get(&id) else {
            return;
        };
        self.replicas[r].router.first_token(id, now);
        self.publish(r, SyncOp::PrefillDone { id: id.to_string() }, now);
    }

    fn finished(&mut self, id: u64, now: Instant) {
        self.deliver(Some(now));
        let Some(r) = self.owner.remove(&id) else {
            return;
        };
        self.replicas[r].router.finished(id, now);
        self.publish(r, SyncOp::Freed { id: id.to_string() }, now);
    }

    fn cache_events(&mut self, worker: usize, events: &[CacheEvent]) {
        for r in &mut self.replicas {
            r.router.cache_events(worker, events);
        }
    }

    fn open_bookings(&mut self) -> Option<usize> {
        Some(self.bookings_per_replica().iter().sum())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::{SimConfig, fleet_view, simulate};
    use crate::trace::TraceRow;
    use kvgate_engine::{EngineConfig, TimingModel};

    fn cfg(workers: usize) -> SimConfig {
        SimConfig {
            workers,
            engine: EngineConfig {
                block_size: 16,
                num_gpu_blocks: 2048,
                max_num_seqs: 64,
                max_num_batched_tokens: 2048,
                enable_prefix_caching: true,
                timing: TimingModel::default(),
            },
            tokens_per_trace_block: 64,
            rate_scale: 1.0,
            max_output_tokens: Some(16),
        }
    }

    /// Multi-turn conversations: each turn extends the last one's prompt.
    fn rows() -> Vec<TraceRow> {
        let mut rows = Vec::new();
        let mut t = 0.0;
        for turn in 0..6u64 {
            for conv in 0..24u64 {
                let hash_ids: Vec<u64> = (0..=turn).map(|k| conv * 100 + k).collect();
                rows.push(TraceRow {
                    timestamp: t,
                    input_length: hash_ids.len() as u64 * 64,
                    output_length: 8,
                    hash_ids,
                });
                t += 40.0;
            }
        }
        rows
    }

    fn replicated(n: usize, delay: Option<Duration>, spread: Spread) -> Replicated {
        let c = cfg(4);
        let fleet = fleet_view(&c);
        Replicated::new("kvgate-replicas", n, spread, delay, 7, |i| {
            KvRouter::kvgate(&fleet, 16, 7 + i as u64)
        })
        .unwrap()
    }

    #[test]
    fn every_booking_returns_to_zero_with_sync_on_and_off() {
        for (delay, spread) in [
            (Some(Duration::ZERO), Spread::RoundRobin),
            (Some(Duration::from_millis(250)), Spread::Random),
            (None, Spread::RoundRobin),
        ] {
            let mut p = replicated(3, delay, spread);
            let r = simulate(&rows(), &cfg(4), &mut p, |_, _| {}).unwrap();
            assert_eq!(r.completed, r.requests);
            assert_eq!(p.bookings_per_replica(), vec![0, 0, 0], "{delay:?}");
            assert_eq!(p.state_fetches(), 0);
        }
    }

    #[test]
    fn synced_replicas_see_each_others_load_and_unsynced_ones_do_not() {
        let c = cfg(4);
        let fleet = fleet_view(&c);
        let hashes =
            kvgate_core::hashing::BlockHashes::from_tokens(&[1u32; 64], 16, Default::default());
        let t0 = Instant::now();
        for (delay, expect_peer) in [(Some(Duration::from_millis(5)), true), (None, false)] {
            let mut p = replicated(2, delay, Spread::RoundRobin);
            let req = Arrival {
                id: 1,
                hashes: &hashes,
                max_output_tokens: 8,
            };
            p.route(&req, &fleet, t0);
            // Before the delay has passed, the other replica knows nothing.
            p.deliver(Some(t0 + Duration::from_millis(1)));
            assert_eq!(p.replicas[0].router.router().load().bookings().count(), 0);
            p.deliver(Some(t0 + Duration::from_millis(10)));
            let seen = p.replicas[0].router.router().load().bookings().count();
            assert_eq!(seen == 1, expect_peer, "{delay:?}");
            assert_eq!(p.replicas[1].router.router().load().bookings().count(), 1);
            p.finished(1, t0 + Duration::from_millis(20));
            assert_eq!(p.bookings_per_replica(), vec![0, 0]);
        }
    }

    #[test]
    fn one_replica_routes_as_the_router_alone() {
        let c = cfg(4);
        let fleet = fleet_view(&c);
        let mut alone = KvRouter::kvgate(&fleet, 16, 7).unwrap();
        let a = simulate(&rows(), &c, &mut alone, |_, _| {}).unwrap();
        let mut one = replicated(1, Some(Duration::ZERO), Spread::RoundRobin);
        let b = simulate(&rows(), &c, &mut one, |_, _| {}).unwrap();
        assert_eq!(a.hit_rate, b.hit_rate);
        assert_eq!(a.ttft_ms, b.ttft_ms);
    }

    /// Bursts of cold prompts, each burst's requests at one instant.
    fn bursts() -> Vec<TraceRow> {
        let mut rows = Vec::new();
        for b in 0..40u64 {
            for k in 0..8u64 {
                let hash_ids: Vec<u64> = (0..8).map(|j| (b * 8 + k) * 100 + j).collect();
                rows.push(TraceRow {
                    timestamp: b as f64 * 400.0,
                    input_length: 8 * 64,
                    output_length: 8,
                    hash_ids,
                });
            }
        }
        rows
    }

    #[test]
    fn homes_undo_the_herd_of_simultaneous_bursts() {
        let c = cfg(8);
        let fleet = fleet_view(&c);
        let run = |home: Option<f64>, n: usize| {
            let mut p = Replicated::new(
                "r",
                n,
                Spread::RoundRobin,
                Some(Duration::from_millis(1)),
                7,
                |i| KvRouter::kvgate(&fleet, 16, 7 + i as u64),
            )
            .unwrap()
            .with_home(home, Duration::from_millis(2));
            let r = simulate(&bursts(), &c, &mut p, |_, _| {}).unwrap();
            assert_eq!(p.bookings_per_replica(), vec![0; n]);
            r.ttft_p90_ms
        };
        let single = run(None, 1);
        let herd = run(None, 4);
        let homes = run(Some(0.4), 4);
        assert!(herd > 1.3 * single, "herd {herd} single {single}");
        assert!(homes < 0.8 * herd, "homes {homes} herd {herd}");
        assert!(homes < 1.15 * single, "homes {homes} single {single}");
    }
}
