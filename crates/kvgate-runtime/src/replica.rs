//! Replica sync over NATS (`DYN_ROUTER_REPLICA_SYNC`): the transport and timers around
//! [`kvgate_core::replica`].
//!
//! - Own ops are queued by the [`RoutingService`](crate::routing::RoutingService) while it holds
//!   the router lock (so their order is the order of the router's changes) and published in
//!   numbered batches on `namespace.{ns}.component.{c}.router-replicas`; a heartbeat repeats the
//!   last number every `heartbeat`.
//! - Peers' messages are applied to the local router; a peer that cannot be followed is asked
//!   for its state on `{subject}.state.{replica}` (NATS request/reply).
//! - Ready: after one heartbeat period and a half has passed (every live peer has been heard)
//!   and every peer's state has been applied, or after `bootstrap_timeout`.

use crate::nats::connect;
use kvgate_core::replica::{
    Received, ReplicaId, ReplicaView, SyncMessage, SyncOp, SyncState, own_state,
};
use kvgate_core::router::{ReplicaHome, Router};
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};

#[derive(Clone, Debug)]
pub struct ReplicaSyncConfig {
    pub url: String,
    pub namespace: String,
    pub component: String,
    pub heartbeat: Duration,
    /// A peer silent this long is gone (its bookings are dropped).
    pub peer_timeout: Duration,
    /// Longest wait for peers' states before reporting ready anyway.
    pub bootstrap_timeout: Duration,
    /// The replica home's discount while peers decide alongside ([`ReplicaView::home`]).
    pub home_discount: f64,
    /// The herding measure's window ([`kvgate_core::herding`]).
    pub herd_window: Duration,
}

/// `--replica-home-discount`'s default: the best of those measured in docs/ha.md#bursts.
pub const DEFAULT_HOME_DISCOUNT: f64 = 0.4;
/// `--replica-herd-window-ms`'s default: twice sync's delivery on one network (~1 ms). Much
/// wider, and steady traffic counts as concurrent: homes switch on where they cost hit rate.
pub const DEFAULT_HERD_WINDOW_MS: f64 = 2.0;

impl ReplicaSyncConfig {
    pub fn new(url: &str, namespace: &str, component: &str) -> Self {
        Self {
            url: url.into(),
            namespace: namespace.into(),
            component: component.into(),
            heartbeat: Duration::from_secs(1),
            peer_timeout: Duration::from_secs(10),
            bootstrap_timeout: Duration::from_secs(10),
            home_discount: DEFAULT_HOME_DISCOUNT,
            herd_window: Duration::from_secs_f64(DEFAULT_HERD_WINDOW_MS / 1000.0),
        }
    }

    pub fn subject(&self) -> String {
        format!(
            "namespace.{}.component.{}.router-replicas",
            self.namespace, self.component
        )
    }

    pub fn state_subject(&self, of: ReplicaId) -> String {
        format!("{}.state.{of}", self.subject())
    }
}

/// Counters of the sync plane (the view's own counters are in [`ReplicaView`]).
#[derive(Default)]
pub struct SyncStats {
    pub messages_sent: AtomicU64,
    pub ops_sent: AtomicU64,
    pub publish_failures: AtomicU64,
    pub messages_received: AtomicU64,
    pub malformed: AtomicU64,
    pub states_served: AtomicU64,
    pub state_fetch_failures: AtomicU64,
    pub connected: AtomicBool,
    pub ready: AtomicBool,
    /// Start to ready, in microseconds.
    pub bootstrap_micros: AtomicU64,
}

pub struct ReplicaSync {
    pub me: ReplicaId,
    pub config: ReplicaSyncConfig,
    tx: mpsc::UnboundedSender<SyncOp>,
    /// The last message number published (what a state is tagged with).
    published: AtomicU64,
    view: Mutex<ReplicaView>,
    fetching: Mutex<HashSet<ReplicaId>>,
    ready: watch::Sender<bool>,
    pub stats: SyncStats,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// Largest sync message or state accepted from NATS.
const MAX_PAYLOAD: usize = 64 << 20;
/// Most ops in one published message.
const MAX_BATCH: usize = 512;

impl ReplicaSync {
    /// Starts syncing `router` with its peers. Needs a Tokio runtime. Lock order: the view,
    /// then the router.
    pub fn start(router: Arc<Mutex<Router>>, config: ReplicaSyncConfig) -> Arc<Self> {
        let me = ReplicaId(random_id());
        let (tx, rx) = mpsc::unbounded_channel();
        let (ready, _) = watch::channel(false);
        let view = ReplicaView::new(me).with_herd_window(config.herd_window);
        let sync = Arc::new(Self {
            me,
            config,
            tx,
            published: AtomicU64::new(0),
            view: Mutex::new(view),
            fetching: Mutex::new(HashSet::new()),
            ready,
            stats: SyncStats::default(),
            tasks: Mutex::new(Vec::new()),
        });
        let task = tokio::spawn(run(sync.clone(), router, rx));
        lock(&sync.tasks).push(task);
        tracing::info!(replica = %me, subject = %sync.config.subject(), "router replica sync on");
        sync
    }

    /// Queues an own op (call with the router lock held, right after the change).
    pub fn send(&self, op: SyncOp) {
        let _ = self.tx.send(op);
    }

    /// Resolves once the peers' states are in (or the bootstrap timed out).
    pub async fn ready(&self) {
        let mut rx = self.ready.subscribe();
        let _ = rx.wait_for(|r| *r).await;
    }

    pub fn is_ready(&self) -> bool {
        *self.ready.borrow()
    }

    /// Runs `f` on the view (for metrics and the debug endpoint).
    pub fn with_view<R>(&self, f: impl FnOnce(&ReplicaView) -> R) -> R {
        f(&lock(&self.view))
    }

    /// The home share a decision at `now` would get, without recording one (for the debug view).
    pub fn next_home(&self, now: Instant) -> Option<ReplicaHome> {
        lock(&self.view).home(now, self.config.home_discount)
    }

    /// A decision starts at `now`: the home share to route it with, and the decision recorded
    /// for the herd measure (call before taking the router: the view's lock comes first).
    pub fn deciding(&self, now: Instant) -> Option<ReplicaHome> {
        lock(&self.view).deciding(now, self.config.home_discount)
    }

    /// Smoothed peer decisions unseen at each own decision (the herding measure).
    pub fn herd_level(&self) -> f64 {
        lock(&self.view).herd_level(Instant::now())
    }

    pub fn stop(&self) {
        for t in lock(&self.tasks).drain(..) {
            t.abort();
        }
    }
}

impl Drop for ReplicaSync {
    fn drop(&mut self) {
        self.stop();
    }
}

fn random_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    // RandomState is seeded from the OS; mix in the time and pid for good measure.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.write_u32(std::process::id());
    h.finish()
}

async fn run(
    sync: Arc<ReplicaSync>,
    router: Arc<Mutex<Router>>,
    mut rx: mpsc::UnboundedReceiver<SyncOp>,
) {
    let started = Instant::now();
    let cfg = sync.config.clone();
    let client = {
        let weak = Arc::downgrade(&sync);
        match connect(&cfg.url, "kvgate-router-replica", move |up| {
            if let Some(s) = weak.upgrade() {
                s.stats.connected.store(up, Ordering::Relaxed);
            }
        })
        .await
        {
            Ok(c) => c,
            Err(e) => {
                tracing::error!("replica sync: {e}");
                mark_ready(&sync, started);
                return;
            }
        }
    };
    let subject = cfg.subject();
    let (messages, states) = match (
        client.subscribe(subject.clone()).await,
        client.subscribe(cfg.state_subject(sync.me)).await,
    ) {
        (Ok(m), Ok(s)) => (m, s),
        (Err(e), _) | (_, Err(e)) => {
            tracing::error!(%subject, "replica sync: cannot subscribe: {e}");
            mark_ready(&sync, started);
            return;
        }
    };
    let tasks = [
        tokio::spawn(receive(
            sync.clone(),
            router.clone(),
            client.clone(),
            messages,
        )),
        tokio::spawn(serve_states(
            sync.clone(),
            router.clone(),
            client.clone(),
            states,
        )),
        tokio::spawn(bootstrap(sync.clone(), started)),
    ];
    lock(&sync.tasks).extend(tasks);
    publish_loop(&sync, &router, &client, &mut rx).await;
}

/// Publishes own ops in numbered batches, and heartbeats; expires silent peers.
async fn publish_loop(
    sync: &Arc<ReplicaSync>,
    router: &Mutex<Router>,
    client: &async_nats::Client,
    rx: &mut mpsc::UnboundedReceiver<SyncOp>,
) {
    let subject = sync.config.subject();
    let mut tick = tokio::time::interval(sync.config.heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seq = 0u64;
    loop {
        let ops = tokio::select! {
            op = rx.recv() => {
                let Some(op) = op else { return };
                let mut ops = vec![op];
                while ops.len() < MAX_BATCH {
                    match rx.try_recv() {
                        Ok(op) => ops.push(op),
                        Err(_) => break,
                    }
                }
                ops
            }
            _ = tick.tick() => {
                let expired = {
                    let mut view = lock(&sync.view);
                    let mut r = lock(router);
                    view.expire(&mut r, Instant::now(), sync.config.peer_timeout)
                };
                for p in expired {
                    tracing::warn!(peer = %p, "router replica went silent: its bookings are dropped");
                }
                Vec::new()
            }
        };
        if !ops.is_empty() {
            seq += 1;
        }
        let n = ops.len() as u64;
        let msg = SyncMessage {
            from: sync.me,
            seq,
            ops,
        };
        let payload = match serde_json::to_vec(&msg) {
            Ok(p) => p,
            Err(e) => {
                tracing::error!("replica sync: cannot encode: {e}");
                continue;
            }
        };
        // While NATS is away the client buffers; what it loses, peers see as a gap.
        if let Err(e) = client.publish(subject.clone(), payload.into()).await {
            sync.stats.publish_failures.fetch_add(1, Ordering::Relaxed);
            tracing::debug!("replica sync: publish failed: {e}");
        }
        sync.published.store(seq, Ordering::Release);
        if n > 0 {
            sync.stats.messages_sent.fetch_add(1, Ordering::Relaxed);
            sync.stats.ops_sent.fetch_add(n, Ordering::Relaxed);
        }
    }
}

async fn receive(
    sync: Arc<ReplicaSync>,
    router: Arc<Mutex<Router>>,
    client: async_nats::Client,
    mut messages: async_nats::Subscriber,
) {
    use futures::StreamExt;
    while let Some(m) = messages.next().await {
        if m.payload.len() > MAX_PAYLOAD {
            sync.stats.malformed.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let msg = match serde_json::from_slice::<SyncMessage>(&m.payload)
            .map_err(|e| e.to_string())
            .and_then(|msg| msg.validate().map(|()| msg))
        {
            Ok(msg) => msg,
            Err(e) => {
                sync.stats.malformed.fetch_add(1, Ordering::Relaxed);
                tracing::debug!("replica sync: dropped a malformed message: {e}");
                continue;
            }
        };
        if msg.from == sync.me {
            continue;
        }
        sync.stats.messages_received.fetch_add(1, Ordering::Relaxed);
        let outcome = {
            let mut view = lock(&sync.view);
            let mut r = lock(&router);
            view.on_message(&mut r, msg, Instant::now())
        };
        if let Received::NeedState(peer) = outcome {
            fetch_state(&sync, &router, &client, peer);
        }
    }
}

/// Asks `peer` for its state in the background (once at a time per peer).
fn fetch_state(
    sync: &Arc<ReplicaSync>,
    router: &Arc<Mutex<Router>>,
    client: &async_nats::Client,
    peer: ReplicaId,
) {
    if !lock(&sync.fetching).insert(peer) {
        return;
    }
    let (sync, router, client) = (sync.clone(), router.clone(), client.clone());
    tokio::spawn(async move {
        // A state can still leave a gap (messages lost while it travelled): ask again, a few times.
        for _ in 0..3 {
            let answer = client
                .send_request(
                    sync.config.state_subject(peer),
                    async_nats::Request::new().timeout(Some(Duration::from_secs(2))),
                )
                .await
                .map_err(|e| e.to_string())
                .and_then(|m| {
                    serde_json::from_slice::<SyncState>(&m.payload).map_err(|e| e.to_string())
                })
                .and_then(|s| {
                    if s.from != peer {
                        return Err(format!("state from {} instead of {peer}", s.from));
                    }
                    s.validate().map(|()| s)
                });
            let mut view = lock(&sync.view);
            let mut r = lock(&router);
            match answer {
                Ok(state) => {
                    tracing::info!(%peer, bookings = state.bookings.len(), seq = state.seq, "applied a peer router's state");
                    if view.on_state(&mut r, state, Instant::now()) != Received::NeedState(peer) {
                        break;
                    }
                }
                Err(e) => {
                    sync.stats
                        .state_fetch_failures
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%peer, "cannot fetch a peer router's state ({e}); forgetting it until it speaks again");
                    view.on_state_failed(&mut r, peer);
                    break;
                }
            }
        }
        lock(&sync.fetching).remove(&peer);
    });
}

async fn serve_states(
    sync: Arc<ReplicaSync>,
    router: Arc<Mutex<Router>>,
    client: async_nats::Client,
    mut requests: async_nats::Subscriber,
) {
    use futures::StreamExt;
    while let Some(m) = requests.next().await {
        let Some(reply) = m.reply else { continue };
        // The number first, the bookings second: the bookings are at least as new as it.
        let seq = sync.published.load(Ordering::Acquire);
        let state = own_state(&lock(&router), sync.me, seq);
        match serde_json::to_vec(&state) {
            Ok(p) => {
                if let Err(e) = client.publish(reply, p.into()).await {
                    tracing::warn!("replica sync: cannot answer a state request: {e}");
                } else {
                    sync.stats.states_served.fetch_add(1, Ordering::Relaxed);
                }
            }
            Err(e) => tracing::error!("replica sync: cannot encode the state: {e}"),
        }
    }
}

async fn bootstrap(sync: Arc<ReplicaSync>, started: Instant) {
    // Every live peer heartbeats within one period; half a period more covers the delivery.
    tokio::time::sleep(sync.config.heartbeat.mul_f64(1.5)).await;
    let deadline = started + sync.config.bootstrap_timeout;
    loop {
        let waiting = lock(&sync.view).unsynced() + lock(&sync.fetching).len();
        if waiting == 0 {
            break;
        }
        if Instant::now() >= deadline {
            tracing::warn!(
                waiting,
                "replica sync: peers' states not all in after {:?}; ready with a partial load view",
                sync.config.bootstrap_timeout
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    mark_ready(&sync, started);
}

fn mark_ready(sync: &ReplicaSync, started: Instant) {
    sync.stats
        .bootstrap_micros
        .store(started.elapsed().as_micros() as u64, Ordering::Relaxed);
    sync.stats.ready.store(true, Ordering::Relaxed);
    sync.ready.send_replace(true);
    let peers = lock(&sync.view).peers();
    tracing::info!(replica = %sync.me, peers, took = ?started.elapsed(), "router replica ready");
}
