//! Leader election of `kvgate operator` against the mocked API server (`fake_api`): copies of
//! the operator, each with its own client of one fake cluster, compete for one
//! `coordination.k8s.io/v1` Lease. Exactly one reconciles; when it stops renewing, another takes
//! over once the Lease expires, and not before; a write that loses a race (409) backs off; a
//! leader shutting down releases the Lease. Short timings (lease 2 s, renew 1 s, retry 0.2 s) keep
//! the tests fast.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod fake_api;

use fake_api::{Fake, Logged};
use kvgate_k8s::controller::{Operator, OperatorConfig, OperatorMetrics, run_elected};
use kvgate_k8s::election::ElectionConfig;
use kvgate_k8s::lease::Timing;
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

const NS: &str = "llm";
const DGDS: &str = "dynamographdeployments";
const POOLS: &str = "inferencepools";
const LEASES: &str = "leases";
const LEASE: &str = "kvgate-operator";

fn timing() -> Timing {
    Timing {
        lease_duration: Duration::from_secs(2),
        renew_deadline: Duration::from_secs(1),
        retry_period: Duration::from_millis(200),
    }
}

fn cluster() -> Fake {
    let (fake, _) = Fake::new(false);
    fake.put(
        DGDS,
        json!({
            "apiVersion": "nvidia.com/v1alpha1",
            "kind": "DynamoGraphDeployment",
            "metadata": {"name": "llama", "namespace": NS, "generation": 1},
            "spec": {"services": {
                "Frontend": {"componentType": "frontend", "replicas": 1},
                "Epp": {"componentType": "epp", "replicas": 2},
                "VllmWorker": {"componentType": "worker", "replicas": 4},
            }},
        }),
    );
    fake
}

/// One copy of the operator: its own client (logged under `name`, which is also its identity).
struct Copy {
    name: String,
    metrics: Arc<OperatorMetrics>,
    alive: Arc<AtomicBool>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Copy {
    fn start(fake: &Fake, name: &str) -> Copy {
        let metrics = Arc::new(OperatorMetrics::new());
        let op = Arc::new(Operator::new(
            fake.client(name),
            OperatorConfig {
                // Far apart: every reconcile seen here comes from a watch or the start.
                requeue: Duration::from_secs(300),
                ..OperatorConfig::default()
            },
            metrics.clone(),
        ));
        let cfg = ElectionConfig {
            lease_name: LEASE.into(),
            namespace: NS.into(),
            identity: name.into(),
            timing: timing(),
        };
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(run_elected(op, cfg, async move {
            let _ = rx.await;
        }));
        Copy {
            name: name.into(),
            metrics,
            alive: Arc::new(AtomicBool::new(true)),
            stop: Some(tx),
            task,
        }
    }

    fn leading(&self) -> bool {
        self.metrics.leader.load(Ordering::Relaxed)
    }

    fn reconciles(&self) -> u64 {
        self.metrics.reconciles_ok.load(Ordering::Relaxed)
            + self.metrics.reconciles_failed.load(Ordering::Relaxed)
    }

    /// Kills it: no release, no more renewals (the process died).
    async fn kill(self) {
        self.alive.store(false, Ordering::Relaxed);
        self.task.abort();
        assert!(self.task.await.unwrap_err().is_cancelled());
    }

    /// Stops it as SIGTERM would.
    async fn stop(mut self) {
        self.stop.take().unwrap().send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), self.task)
            .await
            .expect("stops within 5 s")
            .unwrap();
        self.alive.store(false, Ordering::Relaxed);
    }
}

/// Samples the live copies' leader flags every 5 ms; the most seen leading at once.
fn watch_leaders(copies: &[&Copy]) -> Arc<AtomicUsize> {
    let most = Arc::new(AtomicUsize::new(0));
    let flags: Vec<(Arc<OperatorMetrics>, Arc<AtomicBool>)> = copies
        .iter()
        .map(|c| (c.metrics.clone(), c.alive.clone()))
        .collect();
    let m = most.clone();
    tokio::spawn(async move {
        loop {
            let n = flags
                .iter()
                .filter(|(metrics, alive)| {
                    alive.load(Ordering::Relaxed) && metrics.leader.load(Ordering::Relaxed)
                })
                .count();
            m.fetch_max(n, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    most
}

async fn wait_for(what: &str, within: Duration, f: impl Fn() -> bool) {
    let deadline = Instant::now() + within;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn log(fake: &Fake) -> Vec<Logged> {
    fake.state().log.clone()
}

fn is_lease(l: &Logged) -> bool {
    l.path.contains("/coordination.k8s.io/v1/") && l.path.contains("/leases")
}

/// Writes of the Lease by `client`.
fn lease_writes(log: &[Logged], client: &str) -> Vec<Logged> {
    log.iter()
        .filter(|l| l.client == client && is_lease(l) && l.is_write())
        .cloned()
        .collect()
}

/// Writes of anything but the Lease (what reconciling does), by client.
fn object_writes(log: &[Logged], client: &str) -> Vec<Logged> {
    log.iter()
        .filter(|l| l.client == client && !is_lease(l) && l.is_write())
        .cloned()
        .collect()
}

fn lease(fake: &Fake) -> Value {
    fake.get(LEASES, NS, LEASE).expect("the Lease exists")
}

/// The leader and the standby, once exactly one leads and the graph's pool exists.
async fn elected(fake: &Fake, a: Copy, b: Copy) -> (Copy, Copy) {
    wait_for(
        "a leader and the graph's pool",
        Duration::from_secs(10),
        || (a.leading() != b.leading()) && fake.get(POOLS, NS, "llama-pool").is_some(),
    )
    .await;
    if a.leading() { (a, b) } else { (b, a) }
}

#[tokio::test]
async fn two_copies_elect_one_leader_and_only_it_reconciles() {
    let fake = cluster();
    let a = Copy::start(&fake, "a");
    let b = Copy::start(&fake, "b");
    let most = watch_leaders(&[&a, &b]);
    let (leader, standby) = elected(&fake, a, b).await;
    let renewed = lease(&fake)["spec"]["renewTime"].clone();
    // Longer than the lease duration: a standby that wrongly judged it expired would take over.
    tokio::time::sleep(Duration::from_millis(3000)).await;

    assert!(leader.leading() && !standby.leading());
    assert_eq!(most.load(Ordering::Relaxed), 1, "never two leaders");
    let l = lease(&fake);
    assert_eq!(l["spec"]["holderIdentity"], leader.name.as_str());
    assert_eq!(l["spec"]["leaseDurationSeconds"], 2);
    assert_eq!(l["spec"]["leaseTransitions"], 0);
    assert_ne!(l["spec"]["renewTime"], renewed, "the leader renews");

    let log = log(&fake);
    let applied: Vec<String> = object_writes(&log, &leader.name)
        .iter()
        .filter(|w| w.content_type.starts_with("application/apply-patch"))
        .map(|w| w.path.rsplit('/').next().unwrap().to_string())
        .collect();
    assert_eq!(applied, ["llama-epp", "llama-pool"]);
    assert!(leader.reconciles() >= 1);
    // The standby wrote nothing but (maybe) a losing create, watched nothing, reconciled nothing.
    assert!(object_writes(&log, &standby.name).is_empty());
    assert!(
        !log.iter()
            .any(|l| l.client == standby.name && l.query.contains("watch=true")),
        "the standby runs no controller"
    );
    for w in lease_writes(&log, &standby.name) {
        assert_eq!((w.method.as_str(), w.status), ("POST", 409), "{w:?}");
    }
    assert_eq!(standby.reconciles(), 0);
    assert_eq!(
        standby.metrics.leadership_acquired.load(Ordering::Relaxed),
        0
    );
    assert_eq!(
        leader.metrics.leadership_acquired.load(Ordering::Relaxed),
        1
    );
    // Both are ready: a standby is ready to take over.
    assert!(leader.metrics.ready.load(Ordering::Relaxed));
    assert!(standby.metrics.ready.load(Ordering::Relaxed));

    // A leader shutting down releases the Lease: the standby takes it at its next read, far
    // sooner than the 2 s an expiry would take.
    let stopped = Instant::now();
    let name = leader.name.clone();
    leader.stop().await;
    let release = lease_writes(&self::log(&fake), &name).pop().unwrap();
    assert_eq!((release.method.as_str(), release.status), ("PUT", 200));
    assert!(
        release.body["spec"]["holderIdentity"].is_null(),
        "{:?}",
        release.body
    );
    wait_for(
        "the standby to take the released lease",
        Duration::from_secs(10),
        || standby.leading(),
    )
    .await;
    assert!(
        stopped.elapsed() < Duration::from_millis(1500),
        "took {:?}",
        stopped.elapsed()
    );
    assert_eq!(lease(&fake)["spec"]["leaseTransitions"], 1);
    assert_eq!(most.load(Ordering::Relaxed), 1);
    standby.stop().await;
}

#[tokio::test]
async fn the_standby_takes_over_once_a_dead_leaders_lease_expires_and_then_reconciles() {
    let fake = cluster();
    let a = Copy::start(&fake, "a");
    let b = Copy::start(&fake, "b");
    let most = watch_leaders(&[&a, &b]);
    let (leader, standby) = elected(&fake, a, b).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let dead = leader.name.clone();
    let killed = Instant::now();
    leader.kill().await;

    wait_for("the standby to take over", Duration::from_secs(10), || {
        standby.leading()
    })
    .await;
    let took = killed.elapsed();
    let t = timing();
    // The standby times the Lease from when it first saw the last renewal, at most one retry
    // period after it was written; then it notices the expiry at its next read, at most one
    // more retry period later. (Slack for a loaded 2-core machine.)
    let bound = t.lease_duration + 2 * t.retry_period + Duration::from_millis(500);
    assert!(took <= bound, "took {took:?}, more than {bound:?}");

    // Never before the Lease expired: the takeover was written at least a lease duration after
    // the dead leader's last renewal.
    let log = log(&fake);
    let ok = |w: &&Logged| w.status == 200 || w.status == 201;
    let last_renewal = lease_writes(&log, &dead)
        .iter()
        .filter(ok)
        .map(|w| w.at)
        .max()
        .unwrap();
    let takeover = lease_writes(&log, &standby.name)
        .iter()
        .filter(ok)
        .map(|w| w.at)
        .min()
        .unwrap();
    assert!(
        takeover.duration_since(last_renewal) >= t.lease_duration,
        "taken {:?} after the last renewal",
        takeover.duration_since(last_renewal)
    );
    let l = lease(&fake);
    assert_eq!(l["spec"]["holderIdentity"], standby.name.as_str());
    assert_eq!(l["spec"]["leaseTransitions"], 1);
    assert!(object_writes(&log, &dead).iter().all(|w| w.at < killed));
    assert_eq!(most.load(Ordering::Relaxed), 1, "never two leaders");

    // The new leader reconciles: it starts its controller, and repairs a deleted pool.
    wait_for(
        "the new leader's first reconcile",
        Duration::from_secs(10),
        || standby.reconciles() > 0,
    )
    .await;
    fake.remove(POOLS, NS, "llama-pool");
    wait_for("the pool to come back", Duration::from_secs(10), || {
        fake.get(POOLS, NS, "llama-pool").is_some()
    })
    .await;
    let log = self::log(&fake);
    assert!(
        object_writes(&log, &standby.name)
            .iter()
            .any(|w| w.path.ends_with("/inferencepools/llama-pool")),
        "the new leader applied the pool"
    );
    assert_eq!(
        standby.metrics.leadership_acquired.load(Ordering::Relaxed),
        1
    );
    standby.stop().await;
}

#[tokio::test]
async fn of_two_copies_creating_the_lease_at_once_one_gets_a_conflict_and_stays_standby() {
    let fake = cluster();
    // Both read "no Lease" before either writes: both create it.
    fake.gate_gets(LEASES, 2);
    let a = Copy::start(&fake, "a");
    let b = Copy::start(&fake, "b");
    let most = watch_leaders(&[&a, &b]);
    let (leader, standby) = elected(&fake, a, b).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;

    let log = log(&fake);
    let creates = |who: &str| -> Vec<u16> {
        lease_writes(&log, who)
            .iter()
            .filter(|w| w.method == "POST")
            .map(|w| w.status)
            .collect()
    };
    assert_eq!(creates(&leader.name), [201]);
    assert_eq!(creates(&standby.name), [409]);
    assert_eq!(
        lease_writes(&log, &standby.name).len(),
        1,
        "no other write by the loser: the winner keeps renewing"
    );
    assert_eq!(standby.metrics.lease_conflicts.load(Ordering::Relaxed), 1);
    assert!(leader.leading() && !standby.leading());
    assert_eq!(most.load(Ordering::Relaxed), 1, "never two leaders");
    assert_eq!(standby.reconciles(), 0);
    assert!(object_writes(&log, &standby.name).is_empty());
    leader.kill().await;
    standby.kill().await;
}

#[tokio::test]
async fn a_takeover_that_loses_the_race_backs_off_for_a_full_lease_duration() {
    let fake = cluster();
    let ghost = |renewed: &str| {
        json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
               "metadata": {"name": LEASE, "namespace": NS},
               "spec": {"holderIdentity": "ghost", "leaseDurationSeconds": 2,
                        "acquireTime": "2026-01-01T00:00:00.000000Z",
                        "renewTime": renewed, "leaseTransitions": 4}})
    };
    // A holder that never renews, except once: just before b's takeover lands.
    fake.put(LEASES, ghost("2026-01-01T00:00:00.000000Z"));
    fake.race_next_write(LEASES, ghost("2026-01-01T00:00:09.000000Z"));
    let started = Instant::now();
    let b = Copy::start(&fake, "b");

    wait_for("b to lead", Duration::from_secs(15), || b.leading()).await;
    let log = log(&fake);
    let writes = lease_writes(&log, "b");
    let first = &writes[0];
    assert_eq!(
        (first.method.as_str(), first.status),
        ("PUT", 409),
        "the first takeover lost the race"
    );
    // It waited for the ghost's Lease to expire before trying at all...
    assert!(first.at.duration_since(started) >= timing().lease_duration);
    // ...and after the 409 it saw the ghost's renewal and waited a full lease duration again.
    let won = writes.iter().find(|w| w.status == 200).unwrap();
    assert!(
        won.at.duration_since(first.at) >= timing().lease_duration,
        "took over {:?} after the ghost's renewal",
        won.at.duration_since(first.at)
    );
    assert_eq!(
        writes.iter().filter(|w| w.status == 409).count(),
        1,
        "{writes:?}"
    );
    assert_eq!(b.metrics.lease_conflicts.load(Ordering::Relaxed), 1);
    let l = lease(&fake);
    assert_eq!(l["spec"]["holderIdentity"], "b");
    assert_eq!(l["spec"]["leaseTransitions"], 5);
    // b reconciled only once it held the Lease.
    wait_for("b's reconcile", Duration::from_secs(10), || {
        fake.get(POOLS, NS, "llama-pool").is_some()
    })
    .await;
    let log = self::log(&fake);
    let objects = object_writes(&log, "b");
    assert!(!objects.is_empty());
    assert!(objects.iter().all(|w| w.at > won.at));
    assert!(
        !log.iter()
            .any(|l| l.client == "b" && l.query.contains("watch=true") && l.at < won.at),
        "no controller before the lease"
    );
    b.stop().await;
}

#[tokio::test]
async fn a_leader_cut_off_from_the_lease_stops_reconciling_before_anyone_takes_over() {
    let fake = cluster();
    let a = Copy::start(&fake, "a");
    let b = Copy::start(&fake, "b");
    let most = watch_leaders(&[&a, &b]);
    let (leader, standby) = elected(&fake, a, b).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The leader can still write everything but its Lease: the dangerous partition.
    fake.cut_off(&leader.name, LEASES, true);
    let cut = Instant::now();
    wait_for("the leader to step down", Duration::from_secs(5), || {
        !leader.leading()
    })
    .await;
    let stepped_down = cut.elapsed();
    let t = timing();
    assert!(
        stepped_down <= t.renew_deadline + Duration::from_millis(500),
        "stepped down {stepped_down:?} after the cut"
    );
    assert!(!standby.leading(), "before the Lease could expire");
    let down_at = Instant::now();
    assert_eq!(leader.metrics.leadership_lost.load(Ordering::Relaxed), 1);
    wait_for("the standby to take over", Duration::from_secs(10), || {
        standby.leading()
    })
    .await;
    // Its controller is gone: a deleted pool is repaired by the new leader alone.
    fake.remove(POOLS, NS, "llama-pool");
    wait_for("the pool to come back", Duration::from_secs(10), || {
        fake.get(POOLS, NS, "llama-pool").is_some()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let log = log(&fake);
    // Not even a read or a watch: only its Lease (a stopped controller asks nothing, while a
    // running one would reconcile the deleted pool, and renew its watches).
    let after: Vec<String> = log
        .iter()
        .filter(|l| l.client == leader.name && l.at > down_at && !is_lease(l))
        .map(|l| format!("{} {}?{}", l.method, l.path, l.query))
        .collect();
    assert!(
        after.is_empty(),
        "the old leader still reconciles: {after:?}"
    );
    assert!(
        object_writes(&log, &standby.name)
            .iter()
            .any(|w| w.path.ends_with("/inferencepools/llama-pool"))
    );
    // Back in reach, the old leader sees the new holder and stays standby.
    fake.cut_off(&leader.name, LEASES, false);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(standby.leading() && !leader.leading());
    assert_eq!(
        lease(&fake)["spec"]["holderIdentity"],
        standby.name.as_str()
    );
    assert_eq!(lease(&fake)["spec"]["leaseTransitions"], 1);
    assert_eq!(most.load(Ordering::Relaxed), 1, "never two leaders");
    assert!(leader.metrics.lease_errors.load(Ordering::Relaxed) > 0);
    leader.stop().await;
    standby.stop().await;
}
