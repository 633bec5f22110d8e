//! KV event ingestion from workers' vLLM-style ZMQ publishers into the router.

use kvgate_core::router::Router;
use kvgate_core::{DpRank, WorkerId, WorkerRank};
use kvgate_wire::vllm::{decode_batch, to_kv_event};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use zeromq::{Socket, SocketRecv};

#[derive(Default)]
pub struct EventStats {
    pub batches: AtomicU64,
    pub events: AtomicU64,
    pub rejected: AtomicU64,
    pub decode_errors: AtomicU64,
    pub seq_gaps: AtomicU64,
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
        let mut last_seq: Option<u64> = None;
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
                stats.seq_gaps.fetch_add(1, Ordering::Relaxed);
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
            let source = WorkerRank {
                worker,
                dp_rank: DpRank(batch.dp_rank.unwrap_or(dp_rank)),
            };
            let Ok(mut r) = router.lock() else { return };
            for e in &batch.events {
                match to_kv_event(e, source, seq, block_size) {
                    Ok(ev) => {
                        r.apply_event(&ev);
                        stats.events.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(err) => {
                        stats.rejected.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(worker = worker.0, error = %err, "KV event refused");
                    }
                }
            }
        }
    })
}

fn rank_endpoint(base: &str, rank: u32) -> Option<String> {
    let rest = base.strip_prefix("tcp://")?;
    let (host, port) = rest.rsplit_once(':')?;
    let port: u32 = port.parse().ok()?;
    Some(format!("tcp://{host}:{}", port + rank))
}
