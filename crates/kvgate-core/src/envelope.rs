//! Gap detection on the Dynamo 1.6 event plane's envelope: every publisher (one per worker
//! process and topic, a random `publisher_id`) numbers its messages with `sequence` from 0
//! without gaps. Core NATS delivers one publisher's messages in order, so a jump means lost
//! messages (a slow consumer, a NATS restart): the ranks that publisher speaks for can no
//! longer be trusted and are rebuilt from new events.
//!
//! Event ids are still ordered per rank by [`crate::sequencer::EventSequencer`]; this layer
//! sees losses that event ids cannot (a message lost with the last events of a rank, or ranks
//! whose event ids are not contiguous).
//!
//! Sans-IO and bounded: at most `max_publishers` are tracked; past that the least recently seen
//! is forgotten (its next message then starts it afresh, which only misses one gap check).

use crate::fasthash::FastMap;
use crate::ids::WorkerRank;

/// What one message's envelope says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EnvelopeCheck {
    /// The next message, or the first seen from this publisher.
    InOrder,
    /// Already seen (a redelivery): drop the message.
    Duplicate,
    /// `missing` messages never arrived: drop the `ranks` the publisher spoke for, then apply
    /// this message.
    Gap {
        missing: u64,
        ranks: Vec<WorkerRank>,
    },
    /// The publisher started over at 0 (a restarted process reusing its id): its ranks start
    /// from an empty cache.
    Restarted { ranks: Vec<WorkerRank> },
}

#[derive(Debug, Default)]
struct Publisher {
    next: u64,
    ranks: Vec<WorkerRank>,
    last_seen: u64,
}

#[derive(Debug)]
pub struct EnvelopeTracker {
    publishers: FastMap<u64, Publisher>,
    max_publishers: usize,
    clock: u64,
}

/// More ranks than this behind one publisher is not a worker (DP ranks of one engine).
const MAX_RANKS_PER_PUBLISHER: usize = 1024;

impl EnvelopeTracker {
    pub fn new(max_publishers: usize) -> Self {
        Self {
            publishers: FastMap::default(),
            max_publishers: max_publishers.max(1),
            clock: 0,
        }
    }

    /// Checks one message from `publisher` numbered `sequence`, carrying events of `ranks`.
    /// `redelivered`: the transport says it delivered this message before.
    pub fn offer(
        &mut self,
        publisher: u64,
        sequence: u64,
        ranks: impl IntoIterator<Item = WorkerRank>,
        redelivered: bool,
    ) -> EnvelopeCheck {
        self.clock += 1;
        if !self.publishers.contains_key(&publisher) && self.publishers.len() >= self.max_publishers
        {
            self.evict_oldest();
        }
        let clock = self.clock;
        let p = self
            .publishers
            .entry(publisher)
            .or_insert_with(|| Publisher {
                next: sequence,
                ranks: Vec::new(),
                last_seen: clock,
            });
        p.last_seen = clock;
        let check = if sequence == p.next {
            EnvelopeCheck::InOrder
        } else if sequence > p.next {
            EnvelopeCheck::Gap {
                missing: sequence - p.next,
                ranks: p.ranks.clone(),
            }
        } else if sequence == 0 && !redelivered {
            EnvelopeCheck::Restarted {
                ranks: std::mem::take(&mut p.ranks),
            }
        } else {
            return EnvelopeCheck::Duplicate;
        };
        p.next = sequence.wrapping_add(1);
        for r in ranks {
            if !p.ranks.contains(&r) && p.ranks.len() < MAX_RANKS_PER_PUBLISHER {
                p.ranks.push(r);
            }
        }
        check
    }

    /// Forgets ranks that left discovery (and publishers left with none).
    pub fn retain_ranks(&mut self, mut keep: impl FnMut(WorkerRank) -> bool) {
        self.publishers.retain(|_, p| {
            p.ranks.retain(|r| keep(*r));
            !p.ranks.is_empty()
        });
    }

    pub fn len(&self) -> usize {
        self.publishers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.publishers.is_empty()
    }

    fn evict_oldest(&mut self) {
        if let Some((&id, _)) = self.publishers.iter().min_by_key(|(_, p)| p.last_seen) {
            self.publishers.remove(&id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{DpRank, WorkerId};
    use proptest::prelude::*;

    fn rank(w: u64) -> WorkerRank {
        WorkerRank {
            worker: WorkerId(w),
            dp_rank: DpRank(0),
        }
    }

    #[test]
    fn in_order_duplicate_gap_restart() {
        let mut t = EnvelopeTracker::new(8);
        assert_eq!(t.offer(7, 0, [rank(1)], false), EnvelopeCheck::InOrder);
        assert_eq!(t.offer(7, 1, [rank(1)], false), EnvelopeCheck::InOrder);
        assert_eq!(t.offer(7, 1, [rank(1)], true), EnvelopeCheck::Duplicate);
        assert_eq!(
            t.offer(7, 4, [rank(2)], false),
            EnvelopeCheck::Gap {
                missing: 2,
                ranks: vec![rank(1)]
            }
        );
        assert_eq!(t.offer(7, 5, [], false), EnvelopeCheck::InOrder);
        assert_eq!(
            t.offer(7, 0, [rank(1)], false),
            EnvelopeCheck::Restarted {
                ranks: vec![rank(1), rank(2)]
            }
        );
        // A redelivered 0 is a duplicate, never a restart.
        assert_eq!(t.offer(7, 0, [rank(1)], true), EnvelopeCheck::Duplicate);
        // Another publisher is independent; joining mid-stream is in order.
        assert_eq!(t.offer(8, 41, [rank(3)], false), EnvelopeCheck::InOrder);
    }

    #[test]
    fn bounded_and_retained() {
        let mut t = EnvelopeTracker::new(2);
        t.offer(1, 0, [rank(1)], false);
        t.offer(2, 0, [rank(2)], false);
        t.offer(3, 0, [rank(3)], false);
        assert_eq!(t.len(), 2);
        t.retain_ranks(|r| r != rank(3));
        assert_eq!(t.len(), 1);
    }

    proptest! {
        /// Whatever is dropped from an in-order stream, the gaps reported add up to exactly
        /// the messages lost, and nothing kept is called a duplicate.
        #[test]
        fn gaps_count_exactly_the_lost(keep in proptest::collection::vec(any::<bool>(), 1..200)) {
            let mut t = EnvelopeTracker::new(4);
            let mut lost_reported = 0;
            let mut first = None;
            let mut last = 0;
            for (seq, k) in keep.iter().enumerate() {
                if !k { continue; }
                let seq = seq as u64;
                first.get_or_insert(seq);
                last = seq;
                match t.offer(5, seq, [rank(1)], false) {
                    EnvelopeCheck::InOrder => {}
                    EnvelopeCheck::Gap { missing, .. } => lost_reported += missing,
                    other => prop_assert!(false, "unexpected {:?}", other),
                }
            }
            if let Some(first) = first {
                let kept = keep.iter().filter(|k| **k).count() as u64;
                prop_assert_eq!(lost_reported, last - first + 1 - kept);
            }
        }
    }
}
