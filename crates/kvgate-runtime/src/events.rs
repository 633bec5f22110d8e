//! KV event ingestion into the router: workers' vLLM-style ZMQ publishers (here) and the
//! NATS event plane ([`crate::nats`]); both count into [`EventStats`].

use kvgate_core::router::Router;
use kvgate_core::sequencer::Sequenced;
use kvgate_core::{DpRank, WorkerId, WorkerRank};
use kvgate_wire::vllm::{GroupFilter, decode_batch_detailed, to_kv_event_detailed};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use zeromq::{Socket, SocketRecv};

#[derive(Default)]
pub struct EventStats {
    pub batches: AtomicU64,
    pub events: AtomicU64,
    pub rejected: AtomicU64,
    pub decode_errors: AtomicU64,
    pub seq_gaps: AtomicU64,
    /// Times a worker rank's indexed blocks were dropped because its event stream could not be
    /// trusted any more (new subscription, publisher restart, lost events).
    pub resyncs: AtomicU64,
    /// Events seen twice (redelivery) and dropped.
    pub duplicates: AtomicU64,
    /// Events kvgate cannot index correctly and skips, by reason (e.g. a residency domain
    /// other than the worker's own cache): `kvgate_kv_events_skipped_total{reason}`.
    pub skipped: Mutex<std::collections::BTreeMap<&'static str, u64>>,
    /// ZMQ catch-ups through a publisher's replay socket, the messages they brought, failures.
    pub replays: AtomicU64,
    pub replayed_messages: AtomicU64,
    pub replay_failures: AtomicU64,
    /// ZMQ subscriptions that reconnected to their publisher (each resyncs the rank).
    pub reconnects: AtomicU64,
    /// NATS event plane: connected now (ZMQ: always true).
    pub plane_connected: AtomicBool,
    pub plane_disconnects: AtomicU64,
    /// Worker ranks whose events are refused (e.g. another block size), with the reason: shown
    /// by `/debug/index` and counted in `kvgate_router_misconfigured_ranks`.
    pub misconfigured: Mutex<std::collections::BTreeMap<(u64, u32), String>>,
    /// Index snapshots: seconds the start-up restore took, events restored, files written.
    pub restore_seconds: Mutex<Option<f64>>,
    pub restored_events: AtomicU64,
    pub snapshots_written: AtomicU64,
    /// Size of the last snapshot written or restored.
    pub snapshot_bytes: AtomicU64,
    /// Snapshot writes that failed; snapshots found at start-up and ignored (unreadable,
    /// damaged, of another stream).
    pub snapshot_failures: AtomicU64,
    pub snapshots_discarded: AtomicU64,
    /// Engine restarts nobody announced, by how they were seen
    /// (`kvgate_kv_rank_restarts_total{reason}`, [`kvgate_core::incarnation`]).
    pub restarts: Mutex<std::collections::BTreeMap<&'static str, u64>>,
    /// Seconds from a batch's publish time (its own timestamp: vLLM's `ts`, the Dynamo
    /// envelope's `published_at`, JetStream's stored time) to its events being in the index.
    pub apply_lag: ApplyLag,
}

/// The apply-lag histogram (a newtype so that [`EventStats`] keeps its `Default`).
pub struct ApplyLag(pub crate::prom::Histogram);

const APPLY_LAG_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

impl Default for ApplyLag {
    fn default() -> Self {
        Self(crate::prom::histogram(APPLY_LAG_BUCKETS))
    }
}

impl ApplyLag {
    /// Records the lag of a batch published at `published_unix_secs` (0 or less: unknown, as
    /// from publishers that send no time). Clock skew between hosts can make it negative,
    /// which is recorded as 0.
    pub fn observe_published(&self, published_unix_secs: f64) {
        if published_unix_secs <= 0.0 || !published_unix_secs.is_finite() {
            return;
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        self.0.observe((now - published_unix_secs).max(0.0));
    }
}

impl EventStats {
    pub fn new() -> Self {
        Self {
            plane_connected: AtomicBool::new(true),
            ..Default::default()
        }
    }

    /// Counts one rank restart seen by `reason`.
    pub fn restart(&self, reason: &'static str) {
        if let Ok(mut m) = self.restarts.lock() {
            *m.entry(reason).or_insert(0) += 1;
        }
    }

    /// Counts one skipped event; the first of each reason is logged as a warning.
    pub fn skip(&self, reason: &'static str, detail: &dyn std::fmt::Display) {
        let Ok(mut m) = self.skipped.lock() else {
            return;
        };
        let n = m.entry(reason).or_insert(0);
        if *n == 0 {
            tracing::warn!(reason, %detail, "skipping KV events kvgate cannot index correctly (counted in kvgate_kv_events_skipped_total)");
        }
        *n += 1;
    }
}

/// Applies what the sequencer released: a restart or a gap first drops the rank's blocks (its
/// state can no longer be trusted: under-reporting a cache costs a hit, over-reporting sends
/// requests to blocks that are gone), then the ready events go into the index.
pub fn apply_sequenced(router: &Mutex<Router>, stats: &EventStats, out: Sequenced) {
    if let Ok(mut r) = router.lock() {
        apply_sequenced_to(&mut r, stats, out);
    }
}

/// [`apply_sequenced`] for a caller that already holds the router.
pub fn apply_sequenced_to(r: &mut Router, stats: &EventStats, out: Sequenced) {
    if out.duplicate {
        stats.duplicates.fetch_add(1, Ordering::Relaxed);
    }
    let clear = |r: &mut Router, source: WorkerRank, event_id: u64| {
        clear_rank(r, source, event_id);
        stats.resyncs.fetch_add(1, Ordering::Relaxed);
    };
    if let Some(gap) = out.gap {
        stats.seq_gaps.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            worker = gap.source.worker.0,
            dp_rank = gap.source.dp_rank.0,
            first_missing = gap.first_missing,
            missing = gap.missing,
            "KV events lost; dropping this rank's indexed blocks to rebuild them from new events"
        );
        clear(r, gap.source, gap.first_missing);
    }
    if out.restarted
        && let Some(first) = out.ready.first()
    {
        tracing::info!(
            worker = first.source.worker.0,
            dp_rank = first.source.dp_rank.0,
            "KV event publisher restarted"
        );
        clear(r, first.source, first.event_id);
    }
    for e in &out.ready {
        // Events of unknown workers are counted by the router itself.
        if r.apply_event(e) {
            stats.events.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Forgets what the index believes a rank caches. Used whenever events may have been missed:
/// under-reporting a cache only costs a hit, over-reporting sends requests to a cache that is
/// gone.
fn resync(router: &Mutex<Router>, stats: &EventStats, source: WorkerRank, event_id: u64) {
    if let Ok(mut r) = router.lock() {
        clear_rank(&mut r, source, event_id);
    }
    stats.resyncs.fetch_add(1, Ordering::Relaxed);
}

/// Drops every block the index holds for `source`, as a `cleared` event from it would.
pub(crate) fn clear_rank(r: &mut Router, source: WorkerRank, event_id: u64) {
    r.apply_event(&kvgate_core::KvEvent {
        source,
        event_id,
        tier: kvgate_core::StorageTier::Device,
        data: kvgate_core::KvEventData::Cleared,
    });
}

/// Subscribes to one rank's publisher and applies its events until the task is aborted.
/// `endpoint` is the worker's base endpoint; rank r listens on port + r (vLLM's convention).
/// With `replay` (the worker's replay socket, same convention), messages this subscription
/// missed (joining late, or a sequence gap) are fetched from the publisher's buffer; without
/// it, or when the buffer no longer reaches back, the rank's blocks are dropped instead.
pub fn subscribe(
    router: Arc<Mutex<Router>>,
    stats: Arc<EventStats>,
    worker: WorkerId,
    dp_rank: u32,
    endpoint: String,
    replay: Option<String>,
    block_size: u32,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let ep = match rank_endpoint(&endpoint, dp_rank) {
            Some(ep) => ep,
            None => {
                tracing::error!(%endpoint, "bad kv_events endpoint");
                return;
            }
        };
        let replay_ep = replay.as_deref().and_then(|r| rank_endpoint(r, dp_rank));
        let mut sock = zeromq::SubSocket::new();
        // connect() waits for the peer (and retries): a worker that starts later is picked up.
        loop {
            match sock.connect(&ep).await {
                Ok(()) => break,
                Err(e) => {
                    tracing::warn!(%ep, error = %e, "KV event publisher not reachable yet");
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                }
            }
        }
        if let Err(e) = sock.subscribe("").await {
            tracing::error!(%ep, error = %e, "cannot subscribe");
            return;
        }
        tracing::info!(%ep, worker = worker.0, dp_rank, "subscribed to KV events");
        // Reports reconnections (the library reconnects by itself, with backoff).
        let mut monitor = sock.monitor();
        let mut lost = false;
        // The rank's events are attributed by the port they arrive on, never by the payload.
        let source = WorkerRank {
            worker,
            dp_rank: DpRank(dp_rank),
        };
        // Whatever was indexed before this subscription may have changed unseen.
        resync(&router, &stats, source, 0);
        let mut sub = RankFeed {
            router: &router,
            stats: &stats,
            source,
            block_size,
            refused_logged: false,
            last_seq: None,
            groups: GroupFilter::new(),
        };
        let mut live_last: Option<u64> = None;
        loop {
            let received = tokio::select! {
                m = sock.recv() => Some(m),
                ev = futures::StreamExt::next(&mut monitor) => {
                    // Only a connection that follows a loss is a reconnect.
                    if let Some(zeromq::SocketEvent::Disconnected(..)) = ev {
                        lost = true;
                    }
                    if let Some(zeromq::SocketEvent::Connected(..)) = ev
                        && std::mem::take(&mut lost)
                    {
                        // Reconnected: the publisher may be a new process whose first messages
                        // went out before we were back. Start this rank over from its replay
                        // buffer (or from the events that follow).
                        tracing::info!(%ep, worker = worker.0, dp_rank, "KV event publisher reconnected; resyncing this rank");
                        stats.reconnects.fetch_add(1, Ordering::Relaxed);
                        resync(&router, &stats, source, 0);
                        sub.last_seq = None;
                        sub.groups = GroupFilter::new();
                        live_last = None;
                        if replay_ep.is_some() {
                            sub.catch_up(replay_ep.as_deref(), 0).await;
                        }
                    }
                    None
                }
            };
            let Some(received) = received else { continue };
            let msg = match received {
                Ok(m) => m.into_vec(),
                Err(e) => {
                    tracing::debug!(%ep, error = %e, "KV event receive error");
                    continue;
                }
            };
            let (seq, payload) = match msg.as_slice() {
                [_, seq, payload] if seq.len() == 8 => {
                    let mut b = [0u8; 8];
                    b.copy_from_slice(seq);
                    (u64::from_be_bytes(b), payload)
                }
                _ => {
                    stats.decode_errors.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
            };
            // A SUB socket never delivers a message twice: a sequence number at or below the
            // last one received live means the publisher started over (its cache did too).
            // Its first messages were likely sent before we reconnected: catch up from 0.
            if live_last.is_some_and(|l| seq <= l) {
                stats.seq_gaps.fetch_add(1, Ordering::Relaxed);
                tracing::info!(
                    worker = worker.0,
                    dp_rank,
                    seq,
                    "KV event publisher restarted; resyncing this rank"
                );
                resync(&router, &stats, source, seq);
                sub.last_seq = None;
                sub.groups = GroupFilter::new();
                if seq > 0 && replay_ep.is_some() {
                    sub.catch_up(replay_ep.as_deref(), 0).await;
                }
            } else {
                match sub.last_seq {
                    Some(last) if seq > last.wrapping_add(1) => {
                        stats.seq_gaps.fetch_add(1, Ordering::Relaxed);
                        if sub.catch_up(replay_ep.as_deref(), last + 1).await == CatchUp::Failed {
                            tracing::warn!(
                                worker = worker.0,
                                dp_rank,
                                last,
                                seq,
                                "KV events lost; resyncing this rank"
                            );
                            resync(&router, &stats, source, seq);
                        }
                    }
                    // Joined late: what the publisher sent before is in its replay buffer.
                    None if seq > 0 && replay_ep.is_some() => {
                        sub.catch_up(replay_ep.as_deref(), 0).await;
                    }
                    _ => {}
                }
            }
            live_last = Some(seq);
            if sub.last_seq.is_some_and(|l| seq <= l) {
                // Brought by the catch-up just done.
                continue;
            }
            sub.apply(seq, payload);
        }
    })
}

/// How a catch-up through the replay socket went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CatchUp {
    /// Everything from the requested sequence on was applied.
    Covered,
    /// The buffer no longer reached back: the rank was resynced, then what it had applied.
    Partial,
    /// No replay (none configured, or it failed): nothing changed.
    Failed,
}
/// Most messages taken from one replay.
const MAX_REPLAY: usize = 100_000;

struct RankFeed<'a> {
    router: &'a Mutex<Router>,
    stats: &'a EventStats,
    source: WorkerRank,
    block_size: u32,
    refused_logged: bool,
    last_seq: Option<u64>,
    /// Which of the publisher's KV cache groups is indexed (hybrid models): learned from its
    /// events, started over with the rank's blocks when the publisher may be a new process.
    groups: GroupFilter,
}

impl RankFeed<'_> {
    fn apply(&mut self, seq: u64, payload: &[u8]) {
        self.last_seq = Some(seq);
        let batch = match decode_batch_detailed(payload) {
            Ok(b) => b,
            Err(e) => {
                self.stats.decode_errors.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(error = %e, "undecodable KV event batch");
                return;
            }
        };
        self.stats.batches.fetch_add(1, Ordering::Relaxed);
        let Ok(mut r) = self.router.lock() else {
            return;
        };
        let published = batch.ts;
        for e in &batch.events {
            // Events of a KV cache group the index cannot model (a hybrid model's sliding-window
            // or Mamba group, a second full-attention group) are skipped, never applied as
            // the rank's prefix cache: counted by reason, the first of each reason logged.
            if let Err(reason) = self.groups.admit(e) {
                let m = &e.meta;
                self.stats.skip(
                    reason,
                    &format_args!(
                        "worker {} dp rank {}: KV cache group {:?} ({} {:?}, sliding window {:?}; indexed group {:?})",
                        self.source.worker.0,
                        self.source.dp_rank.0,
                        m.group_idx,
                        e.event.kind(),
                        m.kv_cache_spec_kind,
                        m.kv_cache_spec_sliding_window,
                        self.groups.indexed_group(),
                    ),
                );
                continue;
            }
            match to_kv_event_detailed(e, self.source, seq, self.block_size) {
                Ok(ev) => {
                    r.apply_event(&ev);
                    self.stats.events.fetch_add(1, Ordering::Relaxed);
                }
                Err(err) => {
                    self.stats.rejected.fetch_add(1, Ordering::Relaxed);
                    if let Ok(mut m) = self.stats.misconfigured.lock() {
                        m.insert(
                            (self.source.worker.0, self.source.dp_rank.0),
                            err.to_string(),
                        );
                    }
                    // Once per subscription: a misconfigured publisher would flood the log.
                    if !self.refused_logged {
                        self.refused_logged = true;
                        tracing::error!(worker = self.source.worker.0, dp_rank = self.source.dp_rank.0, error = %err, "KV events refused (counted in kvgate_kv_events_rejected_total)");
                    }
                }
            }
        }
        drop(r);
        self.stats.apply_lag.observe_published(published);
    }

    /// Fetches and applies the messages from `from` on through the replay socket.
    async fn catch_up(&mut self, replay_ep: Option<&str>, from: u64) -> CatchUp {
        let Some(ep) = replay_ep else {
            return CatchUp::Failed;
        };
        match fetch_replay(ep, from).await {
            Ok(msgs) => {
                self.stats.replays.fetch_add(1, Ordering::Relaxed);
                let complete = from == 0 || msgs.first().is_some_and(|(s, _)| *s <= from);
                if !complete {
                    // The buffer no longer reaches back: the rank's state cannot be trusted.
                    resync(self.router, self.stats, self.source, from);
                }
                for (seq, payload) in msgs {
                    if self.last_seq.is_some_and(|l| seq <= l) {
                        continue;
                    }
                    self.stats.replayed_messages.fetch_add(1, Ordering::Relaxed);
                    self.apply(seq, &payload);
                }
                if complete {
                    CatchUp::Covered
                } else {
                    CatchUp::Partial
                }
            }
            Err(e) => {
                self.stats.replay_failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%ep, error = %e, "KV event replay failed");
                CatchUp::Failed
            }
        }
    }
}

/// vLLM's replay protocol, client side: DEALER sends `["", start_seq]`, the publisher answers
/// `["", seq, payload]` per buffered message and `["", -1, ""]` at the end.
async fn fetch_replay(ep: &str, from: u64) -> Result<Vec<(u64, Vec<u8>)>, String> {
    use std::time::Duration;
    use zeromq::SocketSend;
    let wait = Duration::from_secs(2);
    let mut sock = zeromq::DealerSocket::new();
    tokio::time::timeout(wait, sock.connect(ep))
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| e.to_string())?;
    let mut req = zeromq::ZmqMessage::from(bytes::Bytes::new());
    req.push_back(bytes::Bytes::copy_from_slice(&from.to_be_bytes()));
    tokio::time::timeout(wait, sock.send(req))
        .await
        .map_err(|_| "send timed out".to_string())?
        .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    loop {
        let msg = tokio::time::timeout(wait, sock.recv())
            .await
            .map_err(|_| "no end of replay".to_string())?
            .map_err(|e| e.to_string())?
            .into_vec();
        let n = msg.len();
        if n < 2 {
            return Err("short replay message".into());
        }
        let seq = <[u8; 8]>::try_from(msg[n - 2].as_ref())
            .map_err(|_| "replay sequence is not 8 bytes".to_string())?;
        let seq = i64::from_be_bytes(seq);
        if seq == -1 {
            return Ok(out);
        }
        if out.len() >= MAX_REPLAY {
            return Err(format!("replay longer than {MAX_REPLAY} messages"));
        }
        out.push((seq as u64, msg[n - 1].to_vec()));
    }
}

fn rank_endpoint(base: &str, rank: u32) -> Option<String> {
    let rest = base.strip_prefix("tcp://")?;
    let (host, port) = rest.rsplit_once(':')?;
    let port: u16 = port.parse().ok()?;
    let port = port.checked_add(u16::try_from(rank).ok()?)?;
    Some(format!("tcp://{host}:{port}"))
}

#[cfg(test)]
mod tests {
    use super::ApplyLag;

    fn count_and_sum(l: &ApplyLag) -> (u64, f64) {
        let mut p = crate::prom::Scrape::new();
        p.histogram("lag_seconds", "L.", &[], &l.0);
        let t = p.encode();
        let get = |k: &str| {
            t.lines()
                .find_map(|x| x.strip_prefix(k))
                .and_then(|v| v.trim().parse::<f64>().ok())
                .unwrap_or(f64::NAN)
        };
        (get("lag_seconds_count ") as u64, get("lag_seconds_sum "))
    }

    #[test]
    fn lag_is_measured_from_the_publish_time_and_unknown_times_are_skipped() {
        let l = ApplyLag::default();
        for unknown in [0.0, -5.0, f64::NAN, f64::INFINITY] {
            l.observe_published(unknown);
        }
        assert_eq!(count_and_sum(&l).0, 0);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        l.observe_published(now - 2.0);
        // A publisher whose clock runs ahead counts as no lag, not a negative one.
        l.observe_published(now + 60.0);
        let (n, sum) = count_and_sum(&l);
        assert_eq!(n, 2);
        assert!((2.0..3.0).contains(&sum), "{sum}");
    }
}
