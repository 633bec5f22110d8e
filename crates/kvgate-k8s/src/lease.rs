//! Leader election over a `coordination.k8s.io/v1` Lease, decided without IO: given the Lease as
//! just read and the time, what to write (create, replace guarded by its resourceVersion, or
//! nothing) and whether this copy leads. [`crate::election`] does the reads and writes.
//!
//! The rules, those of client-go's leader election:
//! - a Lease that does not exist, or that names no holder (released), is taken at once;
//! - a Lease held by someone else is taken only once it has stayed unchanged for its
//!   `leaseDurationSeconds`, timed on this copy's own monotonic clock from when this copy first
//!   saw it in that state. The holder's `renewTime` is compared, never trusted as a time: the
//!   two clocks may disagree;
//! - the leader renews every retry period, and leads only while its last successful write was
//!   sent less than the renew deadline ago. The deadline is shorter than the lease duration, so
//!   a leader that cannot renew stops before anyone else may take over;
//! - every write carries the resourceVersion that was read: of two contenders only one wins, the
//!   other gets a 409 Conflict and waits a full lease duration from the winner's write;
//! - `leaseTransitions` goes up by one whenever the holder changes.

use k8s_openapi::api::coordination::v1::LeaseSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use std::time::{Duration, Instant};

/// client-go's defaults.
pub const DEFAULT_LEASE_DURATION: Duration = Duration::from_secs(15);
pub const DEFAULT_RENEW_DEADLINE: Duration = Duration::from_secs(10);
pub const DEFAULT_RETRY_PERIOD: Duration = Duration::from_secs(2);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    /// How long a Lease nobody renews keeps others waiting. Written to the Lease in whole
    /// seconds, rounded up.
    pub lease_duration: Duration,
    /// How long the leader keeps leading without a successful renewal.
    pub renew_deadline: Duration,
    /// How often the Lease is read (and, when leading, renewed).
    pub retry_period: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            lease_duration: DEFAULT_LEASE_DURATION,
            renew_deadline: DEFAULT_RENEW_DEADLINE,
            retry_period: DEFAULT_RETRY_PERIOD,
        }
    }
}

impl Timing {
    /// `lease duration > renew deadline > retry period > 0`, as client-go requires: otherwise a
    /// leader could still be reconciling after its Lease was taken over.
    pub fn validate(&self) -> Result<(), String> {
        if self.retry_period.is_zero() {
            return Err("the leader election retry period must be more than 0".into());
        }
        if self.renew_deadline <= self.retry_period {
            return Err(format!(
                "the leader election renew deadline ({:?}) must be longer than the retry period ({:?})",
                self.renew_deadline, self.retry_period
            ));
        }
        if self.lease_duration <= self.renew_deadline {
            return Err(format!(
                "the leader election lease duration ({:?}) must be longer than the renew deadline ({:?})",
                self.lease_duration, self.renew_deadline
            ));
        }
        if self.lease_seconds() == i32::MAX {
            return Err("the leader election lease duration is too long".into());
        }
        Ok(())
    }

    /// `leaseDurationSeconds` as written: whole seconds, rounded up.
    pub fn lease_seconds(&self) -> i32 {
        let s = self.lease_duration.as_secs() + u64::from(self.lease_duration.subsec_nanos() > 0);
        i32::try_from(s).unwrap_or(i32::MAX)
    }
}

/// A Lease as read from (or returned by) the API server.
#[derive(Clone, Debug, PartialEq)]
pub struct Observed {
    pub spec: LeaseSpec,
    pub resource_version: Option<String>,
}

/// What to write.
#[derive(Clone, Debug, PartialEq)]
pub enum Step {
    /// Nothing: someone else holds a Lease that has not expired (or the read failed).
    Wait,
    /// Create the Lease (it does not exist).
    Create(LeaseSpec),
    /// Replace the Lease, only if it is still at `resource_version`.
    Replace {
        spec: LeaseSpec,
        resource_version: String,
    },
}

/// A change of this copy's role, to log and count.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    Acquired { transitions: i32 },
    Lost(LostReason),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LostReason {
    /// No renewal succeeded within the renew deadline.
    RenewDeadline,
    /// The Lease names another holder.
    TakenBy(String),
    /// The Lease names this copy, but was written by someone else: another copy runs with the
    /// same identity.
    DuplicateIdentity,
    /// Given up on purpose (shutting down).
    Released,
}

/// The holder a Lease names (`None`: nobody; an empty holder is a released Lease).
pub fn holder(spec: &LeaseSpec) -> Option<&str> {
    spec.holder_identity.as_deref().filter(|h| !h.is_empty())
}

/// One copy's view of the election.
#[derive(Debug)]
pub struct Elector {
    identity: String,
    timing: Timing,
    /// The Lease as last seen, and when this copy first saw it like that.
    observed: Option<(Observed, Instant)>,
    /// Leading: when the last successful write of the Lease was sent, and the resourceVersion it
    /// produced.
    lead: Option<(Instant, Option<String>)>,
}

impl Elector {
    pub fn new(identity: impl Into<String>, timing: Timing) -> Self {
        Self {
            identity: identity.into(),
            timing,
            observed: None,
            lead: None,
        }
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    pub fn timing(&self) -> Timing {
        self.timing
    }

    /// The holder of the Lease as last seen.
    pub fn observed_holder(&self) -> Option<&str> {
        self.observed.as_ref().and_then(|(o, _)| holder(&o.spec))
    }

    /// Whether this copy leads at `now`.
    pub fn is_leader(&self, now: Instant) -> bool {
        self.lead
            .as_ref()
            .is_some_and(|(at, _)| now.saturating_duration_since(*at) < self.timing.renew_deadline)
    }

    /// When leadership ends unless a renewal succeeds first.
    pub fn lead_deadline(&self) -> Option<Instant> {
        self.lead
            .as_ref()
            .map(|(at, _)| *at + self.timing.renew_deadline)
    }

    /// Notices a passed renew deadline: `Some(Lost)` once, when the lead just ran out.
    pub fn check(&mut self, now: Instant) -> Option<Change> {
        if self.lead.is_some() && !self.is_leader(now) {
            self.lead = None;
            return Some(Change::Lost(LostReason::RenewDeadline));
        }
        None
    }

    /// The Lease as just read at `now` (`None`: it does not exist); `wall` is the time to write
    /// into it. Returns what to write, and a lost lead if the Lease says so.
    pub fn on_read(
        &mut self,
        now: Instant,
        wall: MicroTime,
        lease: Option<Observed>,
    ) -> (Step, Option<Change>) {
        let mut change = self.check(now);
        let Some(lease) = lease else {
            self.observed = None;
            let lost = self.lead.take().map(|_| Change::Lost(LostReason::Released));
            return (Step::Create(self.record(None, wall)), change.or(lost));
        };
        // Time only the record: a write that changes nothing else (a label) is no renewal.
        let first_seen = match &self.observed {
            Some((o, at)) if o.spec == lease.spec => *at,
            _ => now,
        };
        self.observed = Some((lease.clone(), first_seen));
        let Some(rv) = lease.resource_version.clone() else {
            // Cannot be written safely; the API server always sets it.
            return (Step::Wait, change);
        };
        let ours = holder(&lease.spec) == Some(self.identity.as_str());
        if let Some((_, written)) = &self.lead {
            if ours && written.as_ref() == Some(&rv) {
                return (
                    Step::Replace {
                        spec: self.record(Some(&lease.spec), wall),
                        resource_version: rv,
                    },
                    change,
                );
            }
            self.lead = None;
            change = Some(Change::Lost(match holder(&lease.spec) {
                Some(h) if !ours => LostReason::TakenBy(h.to_string()),
                Some(_) => LostReason::DuplicateIdentity,
                None => LostReason::Released,
            }));
        }
        // Not leading. A Lease naming this identity is treated like anyone else's: it was
        // written by a copy that no longer leads (or by another copy with the same identity),
        // so it is only taken once it expires.
        let free = holder(&lease.spec).is_none();
        let duration = match lease.spec.lease_duration_seconds {
            Some(s) if s > 0 => Duration::from_secs(u64::from(s.unsigned_abs())),
            _ => self.timing.lease_duration,
        };
        let expired = now.saturating_duration_since(first_seen) >= duration;
        if free || expired {
            (
                Step::Replace {
                    spec: self.record(Some(&lease.spec), wall),
                    resource_version: rv,
                },
                change,
            )
        } else {
            (Step::Wait, change)
        }
    }

    /// The Lease to write: renewed when this copy already holds it, else taken over.
    fn record(&self, old: Option<&LeaseSpec>, wall: MicroTime) -> LeaseSpec {
        let same_holder =
            old.and_then(holder) == Some(self.identity.as_str()) && self.lead.is_some();
        let transitions = old.and_then(|o| o.lease_transitions).unwrap_or(0);
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(self.timing.lease_seconds()),
            acquire_time: if same_holder {
                old.and_then(|o| o.acquire_time.clone())
                    .or_else(|| Some(wall.clone()))
            } else {
                Some(wall.clone())
            },
            renew_time: Some(wall),
            lease_transitions: Some(if old.is_none() || same_holder {
                transitions
            } else {
                transitions.saturating_add(1)
            }),
            ..LeaseSpec::default()
        }
    }

    /// The write sent at `sent` (before the read that led to it) succeeded; `stored` is the Lease
    /// the API server returned. Returns `Acquired` when this copy just became the leader.
    pub fn on_written(&mut self, sent: Instant, stored: Observed) -> Option<Change> {
        let was = self.lead.is_some();
        let transitions = stored.spec.lease_transitions.unwrap_or(0);
        let ours = holder(&stored.spec) == Some(self.identity.as_str());
        self.lead = ours.then(|| (sent, stored.resource_version.clone()));
        self.observed = Some((stored, sent));
        match (was, ours) {
            (false, true) => Some(Change::Acquired { transitions }),
            (true, false) => Some(Change::Lost(LostReason::Released)),
            _ => None,
        }
    }

    /// The write was refused with a 409: someone else wrote the Lease since it was read (or
    /// created it first). Nothing is taken; the next read shows the winner's write, which
    /// starts a full lease duration of waiting.
    pub fn on_conflict(&mut self) {
        self.observed = None;
    }

    /// Gives up the lead (shutting down): the Lease to write so that another copy takes over at
    /// once instead of waiting for it to expire. `None` when this copy does not hold it.
    pub fn release(&mut self, wall: MicroTime) -> Option<(Step, Change)> {
        let (_, Some(rv)) = self.lead.take()? else {
            return None;
        };
        let old = self.observed.as_ref().map(|(o, _)| o.spec.clone())?;
        let spec = LeaseSpec {
            holder_identity: None,
            lease_duration_seconds: Some(1),
            acquire_time: Some(wall.clone()),
            renew_time: Some(wall),
            lease_transitions: old.lease_transitions,
            ..LeaseSpec::default()
        };
        Some((
            Step::Replace {
                spec,
                resource_version: rv,
            },
            Change::Lost(LostReason::Released),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake clock: monotonic instants as offsets from a fixed start, and wall times that follow.
    struct Clock(Instant);

    impl Clock {
        fn at(&self, ms: u64) -> Instant {
            self.0 + Duration::from_millis(ms)
        }
        fn wall(&self, ms: u64) -> MicroTime {
            let base = k8s_openapi::jiff::Timestamp::from_second(1_800_000_000).unwrap();
            MicroTime(base + k8s_openapi::jiff::SignedDuration::from_millis(ms as i64))
        }
    }

    fn timing() -> Timing {
        Timing {
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }

    /// The API server: stores what was written, bumping the resourceVersion, if the write's
    /// resourceVersion is current.
    #[derive(Default)]
    struct Server {
        lease: Option<Observed>,
        rv: u64,
    }

    impl Server {
        fn read(&self) -> Option<Observed> {
            self.lease.clone()
        }
        /// `Ok(stored)` or `Err(())` for a 409.
        fn write(&mut self, step: &Step) -> Result<Observed, ()> {
            let spec = match (step, &self.lease) {
                (Step::Create(s), None) => s.clone(),
                (
                    Step::Replace {
                        spec,
                        resource_version,
                    },
                    Some(o),
                ) if o.resource_version.as_ref() == Some(resource_version) => spec.clone(),
                (Step::Wait, _) => panic!("nothing to write"),
                _ => return Err(()),
            };
            self.rv += 1;
            let o = Observed {
                spec,
                resource_version: Some(self.rv.to_string()),
            };
            self.lease = Some(o.clone());
            Ok(o)
        }
    }

    /// One round of `e` at `ms`: read, decide, write.
    fn round(e: &mut Elector, s: &mut Server, c: &Clock, ms: u64) -> Vec<Change> {
        let now = c.at(ms);
        let (step, change) = e.on_read(now, c.wall(ms), s.read());
        let mut changes: Vec<Change> = change.into_iter().collect();
        if step != Step::Wait {
            match s.write(&step) {
                Ok(stored) => changes.extend(e.on_written(now, stored)),
                Err(()) => e.on_conflict(),
            }
        }
        changes
    }

    #[test]
    fn timing_must_leave_the_leader_time_to_stop() {
        assert!(timing().validate().is_ok());
        let bad = Timing {
            renew_deadline: Duration::from_secs(15),
            ..timing()
        };
        assert!(bad.validate().unwrap_err().contains("lease duration"));
        let bad = Timing {
            retry_period: Duration::from_secs(10),
            ..timing()
        };
        assert!(bad.validate().unwrap_err().contains("retry period"));
        let fractional = Timing {
            lease_duration: Duration::from_millis(1500),
            renew_deadline: Duration::from_secs(1),
            retry_period: Duration::from_millis(200),
        };
        assert_eq!(fractional.lease_seconds(), 2, "rounded up, never down");
    }

    #[test]
    fn a_missing_lease_is_created_and_renewed_while_held() {
        let c = Clock(Instant::now());
        let mut s = Server::default();
        let mut a = Elector::new("a", timing());
        assert_eq!(
            round(&mut a, &mut s, &c, 0),
            [Change::Acquired { transitions: 0 }]
        );
        assert!(a.is_leader(c.at(0)));
        let l = s.read().unwrap().spec;
        assert_eq!(l.holder_identity.as_deref(), Some("a"));
        assert_eq!(l.lease_duration_seconds, Some(15));
        assert_eq!(l.acquire_time, Some(c.wall(0)));
        for ms in [2000, 4000, 6000] {
            assert!(round(&mut a, &mut s, &c, ms).is_empty());
        }
        let l = s.read().unwrap().spec;
        assert_eq!(l.renew_time, Some(c.wall(6000)));
        assert_eq!(l.acquire_time, Some(c.wall(0)), "kept while renewing");
        assert_eq!(l.lease_transitions, Some(0));
        assert!(a.is_leader(c.at(15_999)), "10 s after the last renewal");
        assert!(!a.is_leader(c.at(16_000)));
    }

    #[test]
    fn a_held_lease_is_taken_only_after_it_stays_unchanged_for_its_duration() {
        let c = Clock(Instant::now());
        let mut s = Server::default();
        let mut a = Elector::new("a", timing());
        let mut b = Elector::new("b", timing());
        round(&mut a, &mut s, &c, 0);
        // b sees a renewing: it waits however long that goes on.
        let mut ms = 0;
        while ms <= 60_000 {
            round(&mut a, &mut s, &c, ms);
            assert!(round(&mut b, &mut s, &c, ms + 100).is_empty());
            assert!(!b.is_leader(c.at(ms + 100)));
            assert_eq!(b.observed_holder(), Some("a"));
            ms += 2000;
        }
        // a stops renewing (its last write at 60 s); b first saw that record at 60.1 s.
        let last = 60_000;
        let mut t = last + 100;
        while t < last + 100 + 15_000 {
            assert!(round(&mut b, &mut s, &c, t).is_empty(), "too early at {t}");
            // a, cut off from the API, steps down at its renew deadline, long before.
            assert_eq!(a.is_leader(c.at(t)), t < last + 10_000);
            t += 2000;
        }
        assert_eq!(
            a.check(c.at(t)),
            Some(Change::Lost(LostReason::RenewDeadline))
        );
        assert_eq!(a.check(c.at(t)), None, "reported once");
        let t = last + 100 + 15_000;
        assert_eq!(
            round(&mut b, &mut s, &c, t),
            [Change::Acquired { transitions: 1 }]
        );
        let l = s.read().unwrap().spec;
        assert_eq!(l.holder_identity.as_deref(), Some("b"));
        assert_eq!(l.lease_transitions, Some(1));
        assert_eq!(l.acquire_time, Some(c.wall(t)));
        // a comes back: it sees b's Lease, and neither writes nor leads.
        let (step, change) = a.on_read(c.at(t + 500), c.wall(t + 500), s.read());
        assert_eq!((step, change), (Step::Wait, None));
        assert!(!a.is_leader(c.at(t + 500)));
    }

    #[test]
    fn the_holders_declared_duration_is_what_others_wait_for() {
        let c = Clock(Instant::now());
        let mut s = Server::default();
        let long = Timing {
            lease_duration: Duration::from_secs(60),
            ..timing()
        };
        let mut a = Elector::new("a", long);
        let mut b = Elector::new("b", timing());
        round(&mut a, &mut s, &c, 0);
        round(&mut b, &mut s, &c, 0);
        // b's own 15 s is not enough: the Lease says 60.
        assert!(round(&mut b, &mut s, &c, 15_000).is_empty());
        assert!(round(&mut b, &mut s, &c, 59_999).is_empty());
        assert_eq!(
            round(&mut b, &mut s, &c, 60_000),
            [Change::Acquired { transitions: 1 }]
        );
    }

    #[test]
    fn a_leader_that_sees_another_holder_steps_down_at_once() {
        let c = Clock(Instant::now());
        let mut s = Server::default();
        let mut a = Elector::new("a", timing());
        round(&mut a, &mut s, &c, 0);
        // Someone (a copy that judged the Lease expired) wrote itself in.
        let rv = s.read().unwrap().resource_version.unwrap();
        let mut spec = s.read().unwrap().spec;
        spec.holder_identity = Some("z".into());
        s.write(&Step::Replace {
            spec,
            resource_version: rv,
        })
        .unwrap();
        assert_eq!(
            round(&mut a, &mut s, &c, 1000),
            [Change::Lost(LostReason::TakenBy("z".into()))]
        );
        assert!(!a.is_leader(c.at(1000)), "well before its renew deadline");
    }

    #[test]
    fn a_conflict_makes_the_loser_wait_and_never_gives_two_leaders() {
        let c = Clock(Instant::now());
        let mut s = Server::default();
        let mut a = Elector::new("a", timing());
        let mut b = Elector::new("b", timing());
        // Both read "no Lease" and both create: one wins, the other gets a 409.
        let (sa, _) = a.on_read(c.at(0), c.wall(0), s.read());
        let (sb, _) = b.on_read(c.at(0), c.wall(0), s.read());
        assert!(matches!(sa, Step::Create(_)) && matches!(sb, Step::Create(_)));
        let stored = s.write(&sa).unwrap();
        assert!(a.on_written(c.at(0), stored).is_some());
        assert!(s.write(&sb).is_err());
        b.on_conflict();
        assert!(a.is_leader(c.at(0)) && !b.is_leader(c.at(0)));

        // A stale takeover: a lapsed (no renewal for 20 s), so z judges the Lease expired; but a
        // takes it back first, and z's write, based on the older read, is refused.
        let mut z = Elector::new("z", timing());
        round(&mut z, &mut s, &c, 100);
        let (stale, _) = z.on_read(c.at(20_000), c.wall(20_000), s.read());
        assert!(
            matches!(stale, Step::Replace { .. }),
            "expired as z sees it"
        );
        round(&mut a, &mut s, &c, 20_000);
        assert!(s.write(&stale).is_err());
        z.on_conflict();
        // z now waits a full lease duration from what it reads next, while a keeps renewing.
        let mut t = 20_100;
        while t < 80_000 {
            round(&mut a, &mut s, &c, t);
            round(&mut b, &mut s, &c, t + 50);
            round(&mut z, &mut s, &c, t + 70);
            let leaders = [&a, &b, &z]
                .iter()
                .filter(|e| e.is_leader(c.at(t + 80)))
                .count();
            assert_eq!(leaders, 1, "at {t}");
            assert!(a.is_leader(c.at(t + 80)));
            t += 2000;
        }
    }

    #[test]
    fn a_released_lease_is_taken_at_once() {
        let c = Clock(Instant::now());
        let mut s = Server::default();
        let mut a = Elector::new("a", timing());
        let mut b = Elector::new("b", timing());
        round(&mut a, &mut s, &c, 0);
        round(&mut b, &mut s, &c, 100);
        let (step, change) = a.release(c.wall(500)).unwrap();
        assert_eq!(change, Change::Lost(LostReason::Released));
        assert!(!a.is_leader(c.at(500)), "stops before the write");
        s.write(&step).unwrap();
        assert_eq!(s.read().unwrap().spec.holder_identity, None);
        assert!(a.release(c.wall(600)).is_none(), "only once");
        assert_eq!(
            round(&mut b, &mut s, &c, 700),
            [Change::Acquired { transitions: 1 }]
        );
    }

    #[test]
    fn another_copy_with_the_same_identity_is_not_a_second_leader() {
        let c = Clock(Instant::now());
        let mut s = Server::default();
        let mut a1 = Elector::new("a", timing());
        let mut a2 = Elector::new("a", timing());
        round(&mut a1, &mut s, &c, 0);
        // a2 sees its own name but did not write it: it waits like anyone else.
        for t in (100..40_000).step_by(2000) {
            round(&mut a1, &mut s, &c, t);
            assert!(round(&mut a2, &mut s, &c, t + 50).is_empty());
            assert!(!a2.is_leader(c.at(t + 50)));
        }
        // Were a2 to write under that name anyway, a1 notices it did not write that version.
        let rv = s.read().unwrap().resource_version.unwrap();
        let spec = s.read().unwrap().spec;
        s.write(&Step::Replace {
            spec,
            resource_version: rv,
        })
        .unwrap();
        assert_eq!(
            round(&mut a1, &mut s, &c, 41_000),
            [Change::Lost(LostReason::DuplicateIdentity)]
        );
    }

    #[test]
    fn a_leader_keeps_leading_until_its_deadline_and_a_late_renewal_extends_it() {
        let c = Clock(Instant::now());
        let mut s = Server::default();
        let mut a = Elector::new("a", timing());
        round(&mut a, &mut s, &c, 0);
        // No round for 8 s (reads failing): still leading, the deadline is 10 s after the renewal.
        assert!(a.check(c.at(8000)).is_none());
        assert!(a.is_leader(c.at(8000)));
        assert!(round(&mut a, &mut s, &c, 8000).is_empty());
        assert!(a.is_leader(c.at(17_000)));
        assert_eq!(a.lead_deadline(), Some(c.at(18_000)));
    }
}
