//! Herding between router replicas: how often peers decide at the same moment as this replica,
//! on a view that lacks each other's choices.
//!
//! Replica sync shows a replica its peers' bookings one sync delay after they are made. A
//! burst spread over N replicas within that delay is decided N times on the same view, and
//! every replica sends its share to the same shortest queue. No sync can be fast enough for an
//! exactly simultaneous burst; what helps is choosing differently. [`HerdGuard`] measures the
//! risk, and the router's replica home ([`crate::router::ReplicaHome`]) acts on it: while peers
//! do decide alongside this replica, its own share of the fleet costs less, so concurrent
//! replicas' first choices land on different workers. When decisions are far apart, the level
//! falls to zero and every replica routes exactly as one router would.
//!
//! The measure: for each own decision, the peer decisions heard within `window` after it (they
//! were made about when it was, unseen). `level` is their smoothed mean per own decision.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Own decisions remembered at most (a bound on memory and on the per-message work).
const MAX_RECENT: usize = 1024;
/// Weight of the newest own decision in the smoothed level.
const ALPHA: f64 = 0.1;

#[derive(Debug)]
pub struct HerdGuard {
    window: Duration,
    /// Own decisions younger than `window`, oldest first, with the peer decisions heard since.
    recent: VecDeque<(Instant, u32)>,
    level: f64,
}

impl HerdGuard {
    /// `window`: about the sync delay (a peer's decision made with one of ours arrives within it).
    pub fn new(window: Duration) -> Self {
        Self {
            window,
            recent: VecDeque::new(),
            level: 0.0,
        }
    }

    pub fn window(&self) -> Duration {
        self.window
    }

    /// This replica made a decision.
    pub fn decided(&mut self, now: Instant) {
        self.fold(now);
        if self.recent.len() == MAX_RECENT {
            self.settle_oldest();
        }
        self.recent.push_back((now, 0));
    }

    /// `n` peer decisions arrived (booked ops of a sync message).
    pub fn peer_decided(&mut self, n: u32, now: Instant) {
        if n == 0 {
            return;
        }
        self.fold(now);
        for e in &mut self.recent {
            e.1 = e.1.saturating_add(n);
        }
    }

    /// Smoothed unseen peer decisions per own decision, as of `now`.
    pub fn level(&mut self, now: Instant) -> f64 {
        self.fold(now);
        self.level
    }

    /// Settles the own decisions whose window has passed.
    fn fold(&mut self, now: Instant) {
        while let Some(&(at, _)) = self.recent.front() {
            if now.saturating_duration_since(at) <= self.window {
                break;
            }
            self.settle_oldest();
        }
    }

    fn settle_oldest(&mut self) {
        if let Some((_, seen)) = self.recent.pop_front() {
            self.level += ALPHA * (f64::from(seen) - self.level);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn simultaneous_peers_raise_the_level_and_spaced_ones_do_not() {
        let t0 = Instant::now();
        let mut bursty = HerdGuard::new(ms(5));
        let mut spaced = HerdGuard::new(ms(5));
        for k in 0..100u64 {
            let t = t0 + ms(100 * k);
            // Bursty: each own decision is followed 1 ms later by 3 peers' of the same moment.
            bursty.decided(t);
            bursty.peer_decided(3, t + ms(1));
            // Spaced: peers decide 50 ms away from ours.
            spaced.decided(t);
            spaced.peer_decided(3, t + ms(50));
        }
        let end = t0 + ms(100 * 100);
        assert!(bursty.level(end) > 2.9, "{}", bursty.level(end));
        assert_eq!(spaced.level(end), 0.0);
    }

    #[test]
    fn the_level_decays_once_bursts_stop() {
        let t0 = Instant::now();
        let mut g = HerdGuard::new(ms(5));
        for k in 0..50u64 {
            g.decided(t0 + ms(10 * k));
            g.peer_decided(2, t0 + ms(10 * k + 1));
        }
        let high = g.level(t0 + ms(1000));
        for k in 0..50u64 {
            g.decided(t0 + ms(1000 + 10 * k));
        }
        let low = g.level(t0 + ms(2000));
        assert!(high > 1.9 && low < 0.02, "{high} {low}");
    }

    #[test]
    fn memory_is_bounded_however_fast_decisions_come() {
        let t0 = Instant::now();
        let mut g = HerdGuard::new(Duration::from_secs(3600));
        for _ in 0..10 * MAX_RECENT {
            g.decided(t0);
            g.peer_decided(1, t0);
        }
        assert_eq!(g.recent.len(), MAX_RECENT);
        assert!(g.level(t0) > 0.0);
    }
}
