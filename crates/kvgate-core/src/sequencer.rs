//! Per-publisher ordering of KV events by `event_id`: reorders within a window, drops duplicates,
//! reports gaps (lost events: the caller must recover, e.g. replay or rebuild that worker) and
//! publisher restarts (the engine's cache started empty again).
//!
//! - A restart is a `cleared` event with an id already passed (how a publisher that starts over
//!   announces itself), an id of 0 after more than a window of events, or a jump back of more
//!   than 2^20 ids (a durable replay never goes that far back).
//! - Ids below the first one seen (reordering right at start-up) are applied late, not dropped:
//!   the index tolerates reordering, losing them would not be.
//! - A gap is declared when the window overflows or when the oldest missing id has been missing
//!   for `max_wait`.
//!
//! Sans-IO: time is passed in, so a gap that is not filled within `max_wait` is declared by
//! [`EventSequencer::poll_gaps`].

use crate::events::KvEvent;
use crate::fasthash::FastMap;
use crate::ids::WorkerRank;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gap {
    pub source: WorkerRank,
    /// First missing event id.
    pub first_missing: u64,
    /// Number of consecutive ids that never arrived.
    pub missing: u64,
}

/// What to do after offering one event.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Sequenced {
    /// Events now ready, in id order, to apply to the index.
    pub ready: Vec<KvEvent>,
    /// Ids skipped for good: the worker's indexed state may have drifted.
    pub gap: Option<Gap>,
    /// The event was already seen and was dropped.
    pub duplicate: bool,
    /// The publisher restarted (its ids went back): clear its blocks before applying `ready`.
    pub restarted: bool,
}

#[derive(Debug, Default)]
struct Publisher {
    next: Option<u64>,
    /// The lowest id applied since (re)start.
    first: u64,
    /// Events applied since (re)start.
    applied: u64,
    pending: BTreeMap<u64, KvEvent>,
    /// When the current gap opened (`pending` non-empty).
    gap_since: Option<Instant>,
}

/// Ids further back than this are a restart even without an id of 0.
const RESTART_JUMP: u64 = 1 << 20;

#[derive(Debug)]
pub struct EventSequencer {
    window: usize,
    max_wait: Duration,
    publishers: FastMap<WorkerRank, Publisher>,
}

impl EventSequencer {
    /// `window`: how many out-of-order events to hold per publisher before declaring a gap;
    /// `max_wait`: how long to wait for a missing event.
    pub fn new(window: usize, max_wait: Duration) -> Self {
        Self {
            window: window.max(1),
            max_wait,
            publishers: FastMap::default(),
        }
    }

    pub fn offer(&mut self, event: KvEvent, now: Instant) -> Sequenced {
        let window = self.window as u64;
        let p = self.publishers.entry(event.source).or_default();
        let mut out = Sequenced::default();
        let id = event.event_id;
        let Some(next) = p.next else {
            p.next = Some(id.wrapping_add(1));
            p.first = id;
            p.applied = 1;
            out.ready.push(event);
            return out;
        };
        if id < next {
            // A publisher that starts over announces it with `cleared` (the mocker does), or
            // betrays it by an id of 0 after a while, or by a large jump back.
            let announced = matches!(event.data, crate::events::KvEventData::Cleared);
            let restart = announced || (id == 0 && p.applied > window) || next - id > RESTART_JUMP;
            if restart {
                p.pending.clear();
                p.gap_since = None;
                p.next = Some(id.wrapping_add(1));
                p.first = id;
                p.applied = 1;
                out.restarted = true;
                out.ready.push(event);
            } else if id < p.first {
                // Never seen: it was overtaken at start-up.
                p.first = id;
                p.applied += 1;
                out.ready.push(event);
            } else {
                out.duplicate = true;
            }
            return out;
        }
        if id == next {
            out.ready.push(event);
            p.next = Some(id.wrapping_add(1));
        } else {
            match p.pending.entry(id) {
                std::collections::btree_map::Entry::Occupied(_) => {
                    out.duplicate = true;
                    return out;
                }
                std::collections::btree_map::Entry::Vacant(v) => {
                    v.insert(event);
                }
            }
            p.gap_since.get_or_insert(now);
            if p.pending.len() > self.window {
                out.gap = Self::skip_to_first_pending(p, now);
            }
        }
        Self::drain(p, &mut out.ready);
        p.applied += out.ready.len() as u64;
        out
    }

    /// Declares gaps that have stayed open longer than `max_wait`.
    pub fn poll_gaps(&mut self, now: Instant) -> Vec<Sequenced> {
        let mut outs = Vec::new();
        for p in self.publishers.values_mut() {
            let Some(since) = p.gap_since else { continue };
            if now.saturating_duration_since(since) < self.max_wait {
                continue;
            }
            let mut out = Sequenced {
                gap: Self::skip_to_first_pending(p, now),
                ..Default::default()
            };
            Self::drain(p, &mut out.ready);
            p.applied += out.ready.len() as u64;
            outs.push(out);
        }
        outs
    }

    /// Forgets a publisher (removed worker, or recovery that rebuilt its state).
    pub fn reset(&mut self, source: WorkerRank) {
        self.publishers.remove(&source);
    }

    /// Keeps only the publishers `keep` accepts (e.g. still in discovery).
    pub fn retain(&mut self, mut keep: impl FnMut(WorkerRank) -> bool) {
        self.publishers.retain(|s, _| keep(*s));
    }

    /// Publishers tracked.
    pub fn len(&self) -> usize {
        self.publishers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.publishers.is_empty()
    }

    /// Whether events are held back waiting for missing ones (a snapshot now would miss them).
    pub fn holding(&self) -> bool {
        self.publishers.values().any(|p| !p.pending.is_empty())
    }

    /// The id the publisher's next event should carry, if any event was seen.
    pub fn expected(&self, source: WorkerRank) -> Option<u64> {
        self.publishers.get(&source).and_then(|p| p.next)
    }

    /// Gives up on the missing ids before the first pending event; whatever is still missing
    /// after it is a new gap, opened `now`.
    fn skip_to_first_pending(p: &mut Publisher, now: Instant) -> Option<Gap> {
        let (&first, e) = p.pending.iter().next()?;
        let source = e.source;
        let next = p.next?;
        p.next = Some(first);
        p.gap_since = Some(now);
        Some(Gap {
            source,
            first_missing: next,
            missing: first - next,
        })
    }

    fn drain(p: &mut Publisher, ready: &mut Vec<KvEvent>) {
        while let Some(next) = p.next {
            match p.pending.remove(&next) {
                Some(e) => {
                    ready.push(e);
                    p.next = Some(next.wrapping_add(1));
                }
                None => break,
            }
        }
        // The gap closes when nothing waits; a new one opens at the next early arrival.
        if p.pending.is_empty() {
            p.gap_since = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::KvEventData;
    use crate::ids::StorageTier;

    fn ev(id: u64) -> KvEvent {
        KvEvent {
            source: WorkerRank::new(1, 0),
            event_id: id,
            tier: StorageTier::Device,
            data: KvEventData::Removed { blocks: vec![] },
        }
    }

    fn cleared(id: u64) -> KvEvent {
        KvEvent {
            data: KvEventData::Cleared,
            ..ev(id)
        }
    }

    #[test]
    fn a_cleared_event_going_back_is_a_restart_even_early() {
        let t = Instant::now();
        let mut s = EventSequencer::new(64, Duration::from_secs(1));
        for id in 0..5 {
            assert_eq!(ids(&s.offer(ev(id), t)), vec![id]);
        }
        // A publisher that restarted after 5 events (fewer than the window) and announced it.
        let out = s.offer(cleared(0), t);
        assert!(out.restarted);
        assert_eq!(ids(&out), vec![0]);
        assert_eq!(ids(&s.offer(ev(1), t)), vec![1]);
        // Without the announcement, an early id 0 is taken for a duplicate.
        assert!(s.offer(ev(0), t).duplicate);
        // A cleared event in sequence is applied like any other.
        let out = s.offer(cleared(2), t);
        assert!(!out.restarted);
        assert_eq!(ids(&out), vec![2]);
    }

    fn ids(s: &Sequenced) -> Vec<u64> {
        s.ready.iter().map(|e| e.event_id).collect()
    }

    #[test]
    fn holding_and_retain() {
        let t = Instant::now();
        let mut s = EventSequencer::new(8, Duration::from_secs(1));
        s.offer(ev(10), t);
        assert!(!s.holding());
        s.offer(ev(12), t);
        assert!(s.holding());
        s.offer(ev(11), t);
        assert!(!s.holding());
        assert_eq!(s.len(), 1);
        s.retain(|w| w != WorkerRank::new(1, 0));
        assert!(s.is_empty());
        assert_eq!(s.expected(WorkerRank::new(1, 0)), None);
    }

    #[test]
    fn reorders_within_window_and_drops_duplicates() {
        let t = Instant::now();
        let mut s = EventSequencer::new(8, Duration::from_secs(1));
        assert_eq!(ids(&s.offer(ev(10), t)), vec![10]);
        assert!(ids(&s.offer(ev(12), t)).is_empty());
        assert!(s.offer(ev(12), t).duplicate);
        assert_eq!(ids(&s.offer(ev(11), t)), vec![11, 12]);
        assert!(s.offer(ev(11), t).duplicate);
        assert!(s.offer(ev(10), t).duplicate);
        assert_eq!(s.expected(WorkerRank::new(1, 0)), Some(13));
    }

    #[test]
    fn window_overflow_declares_gap() {
        let t = Instant::now();
        let mut s = EventSequencer::new(2, Duration::from_secs(60));
        s.offer(ev(1), t);
        assert!(s.offer(ev(4), t).gap.is_none());
        assert!(s.offer(ev(5), t).gap.is_none());
        let out = s.offer(ev(6), t);
        assert_eq!(
            out.gap,
            Some(Gap {
                source: WorkerRank::new(1, 0),
                first_missing: 2,
                missing: 2
            })
        );
        assert_eq!(ids(&out), vec![4, 5, 6]);
    }

    #[test]
    fn timeout_declares_gap() {
        let t = Instant::now();
        let mut s = EventSequencer::new(100, Duration::from_millis(500));
        s.offer(ev(1), t);
        s.offer(ev(3), t);
        assert!(s.poll_gaps(t + Duration::from_millis(100)).is_empty());
        let outs = s.poll_gaps(t + Duration::from_millis(600));
        assert_eq!(outs.len(), 1);
        assert_eq!(
            outs[0].gap.map(|g| (g.first_missing, g.missing)),
            Some((2, 1))
        );
        assert_eq!(ids(&outs[0]), vec![3]);
    }

    #[test]
    fn id_zero_after_a_window_of_events_is_a_restart() {
        let t = Instant::now();
        let mut s = EventSequencer::new(8, Duration::from_secs(1));
        for i in 0..500 {
            s.offer(ev(i), t);
        }
        let out = s.offer(ev(0), t);
        assert!(out.restarted);
        assert_eq!(ids(&out), vec![0]);
        assert_eq!(ids(&s.offer(ev(1), t)), vec![1]);
        // far jumps back are restarts too
        s.offer(ev(5_000_000), t);
        let mut s2 = EventSequencer::new(8, Duration::from_secs(1));
        s2.offer(ev(5_000_000), t);
        assert!(s2.offer(ev(7), t).restarted);
    }

    #[test]
    fn startup_reorder_is_applied_not_dropped() {
        let t = Instant::now();
        let mut s = EventSequencer::new(8, Duration::from_secs(1));
        assert_eq!(ids(&s.offer(ev(5), t)), vec![5]);
        let out = s.offer(ev(4), t);
        assert!(!out.duplicate && !out.restarted);
        assert_eq!(ids(&out), vec![4]);
        assert!(s.offer(ev(4), t).duplicate);
        assert!(s.offer(ev(5), t).duplicate);
        // id 0 early on is a late event, not a restart
        let out = s.offer(ev(0), t);
        assert!(!out.restarted);
        assert_eq!(ids(&out), vec![0]);
    }

    #[test]
    fn gap_timer_runs_from_when_the_gap_opened() {
        let t = Instant::now();
        let mut s = EventSequencer::new(100, Duration::from_millis(500));
        s.offer(ev(1), t);
        s.offer(ev(5), t);
        s.offer(ev(3), t + Duration::from_millis(400));
        let g = s.poll_gaps(t + Duration::from_millis(600));
        assert_eq!(g.len(), 1);
        assert_eq!(g[0].gap.map(|g| (g.first_missing, g.missing)), Some((2, 1)));
        assert_eq!(ids(&g[0]), vec![3]);
        // 4 is still missing; its gap opened at 600 ms
        assert!(s.poll_gaps(t + Duration::from_millis(900)).is_empty());
        assert_eq!(s.poll_gaps(t + Duration::from_millis(1200)).len(), 1);
    }
}
