//! KV event ingestion into the router: workers' vLLM-style ZMQ publishers (here) and the
//! NATS event plane ([`crate::nats`]); both count into [`EventStats`].

use kvgate_core::router::Router;
use kvgate_core::sequencer::Sequenced;
use kvgate_core::{DpRank, WorkerId, WorkerRank};
use kvgate_wire::vllm::{decode_batch, to_kv_event};
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
    /// NATS event plane: connected now (ZMQ: always true).
    pub plane_connected: AtomicBool,
    pub plane_disconnects: AtomicU64,
    /// Worker ranks whose events are refused (e.g. another block size), with the reason: shown
    /// by `/debug/index` and counted in `kvgate_router_misconfigured_ranks`.
    pub misconfigured: Mutex<std::collections::BTreeMap<(u64, u32), String>>,
}

impl EventStats {
    pub fn new() -> Self {
        Self {
            plane_connected: AtomicBool::new(true),
            ..Default::default()
        }
    }
}

/// Applies what the sequencer released: a restart or a gap first drops the rank's blocks (its
/// state can no longer be trusted: under-reporting a cache costs a hit, over-reporting sends
/// requests to blocks that are gone), then the ready events go into the index.
pub fn apply_sequenced(router: &Mutex<Router>, stats: &EventStats, out: Sequenced) {
    if out.duplicate {
        stats.duplicates.fetch_add(1, Ordering::Relaxed);
    }
    let Ok(mut r) = router.lock() else { return };
    let clear = |r: &mut Router, source: WorkerRank, event_id: u64| {
        r.apply_event(&kvgate_core::KvEvent {
            source,
            event_id,
            tier: kvgate_core::StorageTier::Device,
            data: kvgate_core::KvEventData::Cleared,
        });
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
        clear(&mut r, gap.source, gap.first_missing);
    }
    if out.restarted
        && let Some(first) = out.ready.first()
    {
        tracing::info!(
            worker = first.source.worker.0,
            dp_rank = first.source.dp_rank.0,
            "KV event publisher restarted"
        );
        clear(&mut r, first.source, first.event_id);
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
/// gone. (Replay-based recovery comes with the event plane.)
fn resync(router: &Mutex<Router>, stats: &EventStats, source: WorkerRank, event_id: u64) {
    if let Ok(mut r) = router.lock() {
        r.apply_event(&kvgate_core::KvEvent {
            source,
            event_id,
            tier: kvgate_core::StorageTier::Device,
            data: kvgate_core::KvEventData::Cleared,
        });
    }
    stats.resyncs.fetch_add(1, Ordering::Relaxed);
}

/// Subscribes to one rank's publisher and applies its events until the task is aborted.
/// `endpoint` is the worker's base endpoint; rank r listens on port + r (vLLM's convention).
pub fn subscribe(
    router: Arc<Mutex<Router>>,
    stats: Arc<EventStats>,
    worker: WorkerId,
    dp_rank: u32,
    endpoint: String,
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
        // The rank's events are attributed by the port they arrive on, never by the payload.
        let source = WorkerRank {
            worker,
            dp_rank: DpRank(dp_rank),
        };
        // Whatever was indexed before this subscription may have changed unseen.
        resync(&router, &stats, source, 0);
        let mut last_seq: Option<u64> = None;
        let mut refused_logged = false;
        loop {
            let msg = match sock.recv().await {
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
            if let Some(last) = last_seq
                && seq != last.wrapping_add(1)
            {
                // A gap (lost messages) or a restart (sequence went back): drop the rank's view
                // and rebuild it from the events that follow.
                stats.seq_gaps.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    worker = worker.0,
                    dp_rank,
                    last,
                    seq,
                    "KV event sequence broken; resyncing this rank"
                );
                resync(&router, &stats, source, seq);
            }
            last_seq = Some(seq);
            let batch = match decode_batch(payload) {
                Ok(b) => b,
                Err(e) => {
                    stats.decode_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(error = %e, "undecodable KV event batch");
                    continue;
                }
            };
            stats.batches.fetch_add(1, Ordering::Relaxed);
            let Ok(mut r) = router.lock() else { return };
            for e in &batch.events {
                match to_kv_event(e, source, seq, block_size) {
                    Ok(ev) => {
                        r.apply_event(&ev);
                        stats.events.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(err) => {
                        stats.rejected.fetch_add(1, Ordering::Relaxed);
                        if let Ok(mut m) = stats.misconfigured.lock() {
                            m.insert((worker.0, dp_rank), err.to_string());
                        }
                        // Once per subscription: a misconfigured publisher would flood the log.
                        if !refused_logged {
                            refused_logged = true;
                            tracing::error!(worker = worker.0, dp_rank, error = %err, "KV events refused (counted in kvgate_kv_events_rejected_total)");
                        }
                    }
                }
            }
        }
    })
}

fn rank_endpoint(base: &str, rank: u32) -> Option<String> {
    let rest = base.strip_prefix("tcp://")?;
    let (host, port) = rest.rsplit_once(':')?;
    let port: u16 = port.parse().ok()?;
    let port = port.checked_add(u16::try_from(rank).ok()?)?;
    Some(format!("tcp://{host}:{port}"))
}
