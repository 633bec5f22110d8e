//! Engine restarts read off the KV event stream, whatever the engine says about them.
//!
//! A restarted engine starts with an empty cache. Most publishers say so with a `cleared`
//! event, but that event can be missed (published while nobody listened, lost with NATS),
//! and real Dynamo 1.6 workers do not send one at all. The blocks the old process published
//! must still leave the index: routing to them sends requests to a cache that is gone. Two
//! signals survive a missed `cleared`:
//!
//! - **A new publisher for the rank.** A Dynamo publisher draws a random `publisher_id` per
//!   process; a rank's events coming from a publisher the rank has not heard from before mean a
//!   new process speaks for it ([`RestartReason::NewPublisher`]). A rank may legitimately have
//!   more than one live publisher (e.g. a cache offloader publishing other tiers): a publisher
//!   already heard for the rank never triggers this again, so two live publishers cost one
//!   clear, not one per message.
//! - **An event id going back** within one publisher, in a message that is not a redelivery
//!   ([`RestartReason::EventIdReset`]): its numbering started over. Publishers without an
//!   envelope (a bare `RouterEvent`) are tracked under "no publisher", so this also covers
//!   them.
//!
//! What is known per rank can be saved with an index snapshot ([`Incarnations::export`]) and
//! loaded back ([`Incarnations::import`]): a router restored from a snapshot then notices a
//! worker that restarted while it was down the first time that worker speaks, and drops the
//! blocks the snapshot held for it instead of resurrecting them.
//!
//! Sans-IO and bounded: per rank at most [`MAX_PUBLISHERS_PER_RANK`] publishers are kept (the
//! least recently heard is forgotten first); ranks that leave discovery are dropped by
//! [`Incarnations::retain`].

use crate::fasthash::FastMap;
use crate::ids::WorkerRank;

/// Why a rank was taken as restarted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RestartReason {
    /// Events from a publisher the rank had not heard before (a new engine process).
    NewPublisher,
    /// A publisher's event id went back in a message that was not a redelivery.
    EventIdReset,
}

impl RestartReason {
    pub const fn as_str(self) -> &'static str {
        match self {
            RestartReason::NewPublisher => "new_publisher",
            RestartReason::EventIdReset => "event_id_reset",
        }
    }
}

/// What is known about one publisher of one rank, as saved in a snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct IncarnationRecord {
    pub rank: WorkerRank,
    /// The envelope's `publisher_id`; `None` for events without an envelope.
    pub publisher: Option<u64>,
    /// The event id this publisher's next event should carry (one past the highest seen).
    pub next_event_id: u64,
}

/// Most publishers remembered per rank.
pub const MAX_PUBLISHERS_PER_RANK: usize = 8;

#[derive(Clone, Copy, Debug)]
struct Heard {
    publisher: Option<u64>,
    next: u64,
    last_seen: u64,
}

#[derive(Debug, Default)]
pub struct Incarnations {
    ranks: FastMap<WorkerRank, Vec<Heard>>,
    clock: u64,
}

impl Incarnations {
    pub fn new() -> Self {
        Self::default()
    }

    /// Checks one event of `rank` (id `event_id`) from `publisher`, before it is sequenced.
    /// `redelivered`: the transport delivered its message before (ids behind are duplicates,
    /// not a restart). Returns why the rank must be taken as restarted, if it must: the caller
    /// then drops the rank's blocks and lets its event ids start afresh, and applies this event
    /// as the first of the new process.
    pub fn check(
        &mut self,
        rank: WorkerRank,
        publisher: Option<u64>,
        event_id: u64,
        redelivered: bool,
    ) -> Option<RestartReason> {
        self.clock += 1;
        let clock = self.clock;
        let heard = self.ranks.entry(rank).or_default();
        let next = event_id.saturating_add(1);
        let Some(h) = heard.iter_mut().find(|h| h.publisher == publisher) else {
            let restart = !heard.is_empty();
            if heard.len() >= MAX_PUBLISHERS_PER_RANK
                && let Some(oldest) = heard
                    .iter()
                    .enumerate()
                    .min_by_key(|(_, h)| h.last_seen)
                    .map(|(i, _)| i)
            {
                heard.swap_remove(oldest);
            }
            heard.push(Heard {
                publisher,
                next,
                last_seen: clock,
            });
            return restart.then_some(RestartReason::NewPublisher);
        };
        h.last_seen = clock;
        if event_id < h.next {
            if redelivered {
                return None;
            }
            h.next = next;
            return Some(RestartReason::EventIdReset);
        }
        h.next = next;
        None
    }

    /// Forgets what is known about `rank` (its blocks were dropped and it starts afresh, e.g.
    /// after lost messages or an announced restart).
    pub fn forget(&mut self, rank: WorkerRank) {
        self.ranks.remove(&rank);
    }

    /// Keeps only the ranks `keep` accepts (e.g. still in discovery).
    pub fn retain(&mut self, mut keep: impl FnMut(WorkerRank) -> bool) {
        self.ranks.retain(|r, _| keep(*r));
    }

    /// Forgets everything (the index was rebuilt from scratch).
    pub fn clear(&mut self) {
        self.ranks.clear();
    }

    /// Ranks tracked.
    pub fn len(&self) -> usize {
        self.ranks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ranks.is_empty()
    }

    /// Everything known, sorted (for a snapshot).
    pub fn export(&self) -> Vec<IncarnationRecord> {
        let mut out: Vec<IncarnationRecord> = self
            .ranks
            .iter()
            .flat_map(|(&rank, heard)| {
                heard.iter().map(move |h| IncarnationRecord {
                    rank,
                    publisher: h.publisher,
                    next_event_id: h.next,
                })
            })
            .collect();
        out.sort_unstable();
        out
    }

    /// Replaces what is known with `records` (from a snapshot); extra publishers of a rank
    /// beyond [`MAX_PUBLISHERS_PER_RANK`] are ignored.
    pub fn import(&mut self, records: impl IntoIterator<Item = IncarnationRecord>) {
        self.ranks.clear();
        for r in records {
            self.clock += 1;
            let heard = self.ranks.entry(r.rank).or_default();
            if heard.len() >= MAX_PUBLISHERS_PER_RANK
                || heard.iter().any(|h| h.publisher == r.publisher)
            {
                continue;
            }
            heard.push(Heard {
                publisher: r.publisher,
                next: r.next_event_id,
                last_seen: self.clock,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const R: WorkerRank = WorkerRank::new(1, 0);

    #[test]
    fn a_new_publisher_for_a_known_rank_is_a_restart_once() {
        let mut t = Incarnations::new();
        // The first publisher heard is no restart (nothing was known).
        assert_eq!(t.check(R, Some(10), 1, false), None);
        assert_eq!(t.check(R, Some(10), 2, false), None);
        // A Dynamo worker restarted: new random publisher id, ids from 1 again, no `cleared`.
        assert_eq!(
            t.check(R, Some(11), 1, false),
            Some(RestartReason::NewPublisher)
        );
        assert_eq!(t.check(R, Some(11), 2, false), None);
        // The old publisher speaking again (a second live publisher) is no new restart, and
        // neither is the new one afterwards: two live publishers cost one clear.
        assert_eq!(t.check(R, Some(10), 3, false), None);
        assert_eq!(t.check(R, Some(11), 3, false), None);
        // Other ranks are independent.
        assert_eq!(t.check(WorkerRank::new(1, 1), Some(11), 1, false), None);
    }

    #[test]
    fn an_event_id_going_back_is_a_restart_unless_redelivered() {
        let mut t = Incarnations::new();
        for id in 0..5 {
            assert_eq!(t.check(R, None, id, false), None);
        }
        // A redelivery repeats ids: not a restart.
        assert_eq!(t.check(R, None, 3, true), None);
        assert_eq!(t.check(R, None, 5, false), None);
        // A bare publisher numbering from 1 again, without `cleared`.
        assert_eq!(
            t.check(R, None, 1, false),
            Some(RestartReason::EventIdReset)
        );
        assert_eq!(t.check(R, None, 2, false), None);
        // The same for an enveloped publisher that kept its id.
        assert_eq!(
            t.check(R, Some(4), 9, false),
            Some(RestartReason::NewPublisher)
        );
        assert_eq!(
            t.check(R, Some(4), 0, false),
            Some(RestartReason::EventIdReset)
        );
    }

    #[test]
    fn exported_state_detects_a_restart_after_import() {
        let mut t = Incarnations::new();
        t.check(R, Some(10), 7, false);
        t.check(WorkerRank::new(2, 0), None, 3, false);
        let saved = t.export();
        assert_eq!(
            saved,
            vec![
                IncarnationRecord {
                    rank: R,
                    publisher: Some(10),
                    next_event_id: 8
                },
                IncarnationRecord {
                    rank: WorkerRank::new(2, 0),
                    publisher: None,
                    next_event_id: 4
                },
            ]
        );
        let mut u = Incarnations::new();
        u.import(saved);
        // Same publisher carrying on: nothing to do.
        assert_eq!(u.check(R, Some(10), 8, false), None);
        // Worker 2 restarted while the router was down (ids from 1 again, `cleared` missed).
        assert_eq!(
            u.check(WorkerRank::new(2, 0), None, 1, false),
            Some(RestartReason::EventIdReset)
        );
        // Worker 1 restarted later: a new publisher.
        assert_eq!(
            u.check(R, Some(99), 1, false),
            Some(RestartReason::NewPublisher)
        );
    }

    #[test]
    fn bounded_per_rank_and_retained() {
        let mut t = Incarnations::new();
        for p in 0..(MAX_PUBLISHERS_PER_RANK as u64 * 3) {
            t.check(R, Some(p), 1, false);
        }
        assert_eq!(t.export().len(), MAX_PUBLISHERS_PER_RANK);
        t.check(WorkerRank::new(2, 0), None, 1, false);
        t.retain(|r| r != R);
        assert_eq!(t.len(), 1);
        t.forget(WorkerRank::new(2, 0));
        assert!(t.is_empty());
    }

    proptest! {
        /// One publisher numbering its events upwards (with holes, with redeliveries of ids
        /// already seen) is never taken as restarted; once it starts over below what it
        /// reached, it is, exactly once.
        #[test]
        fn one_restart_per_reset(
            steps in proptest::collection::vec((1u64..5, any::<bool>()), 1..100),
            reset_to in 0u64..3,
        ) {
            let mut t = Incarnations::new();
            let mut id = 10u64;
            for (step, redeliver) in &steps {
                id += step;
                prop_assert_eq!(t.check(R, Some(1), id, false), None);
                if *redeliver {
                    prop_assert_eq!(t.check(R, Some(1), id - 1, true), None);
                }
            }
            prop_assert_eq!(t.check(R, Some(1), reset_to, false), Some(RestartReason::EventIdReset));
            prop_assert_eq!(t.check(R, Some(1), reset_to + 1, false), None);
        }
    }
}
