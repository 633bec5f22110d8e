//! Where the mocker's KV events go. [`EventSink`] is the seam: the ZMQ publisher (vLLM format)
//! lives here; the NATS publisher (Dynamo format) plugs in the same way.

use bytes::Bytes;
use kvgate_engine::CacheEvent;
use kvgate_wire::vllm::{VllmBatch, VllmEvent, encode_batch};
use std::sync::Arc;
use tokio::sync::mpsc;
use zeromq::{Socket, SocketSend, ZmqMessage};

pub trait EventSink: Send + Sync {
    fn publish(&self, rank: u32, events: &[CacheEvent]);
}

/// Publishes nothing.
pub struct NoEvents;

impl EventSink for NoEvents {
    fn publish(&self, _: u32, _: &[CacheEvent]) {}
}

/// Several sinks at once.
pub struct Fanout(pub Vec<Arc<dyn EventSink>>);

impl EventSink for Fanout {
    fn publish(&self, rank: u32, events: &[CacheEvent]) {
        for s in &self.0 {
            s.publish(rank, events);
        }
    }
}

pub fn to_vllm(events: &[CacheEvent], block_size: u32) -> Vec<VllmEvent> {
    events
        .iter()
        .map(|e| match e {
            CacheEvent::Stored { parent, blocks } => VllmEvent::BlockStored {
                block_hashes: blocks.iter().map(|b| b.hash.0).collect(),
                parent_block_hash: parent.map(|p| p.0),
                token_ids: blocks
                    .iter()
                    .flat_map(|b| b.tokens.iter().copied())
                    .collect(),
                block_size,
                lora_name: None,
                medium: Some("GPU".into()),
            },
            CacheEvent::Removed { hashes } => VllmEvent::BlockRemoved {
                block_hashes: hashes.iter().map(|h| h.0).collect(),
                medium: Some("GPU".into()),
            },
            CacheEvent::Cleared => VllmEvent::AllBlocksCleared,
        })
        .collect()
}

/// vLLM's ZMQ publisher: one PUB socket per dp rank (port + rank, as vLLM does), multipart
/// `[topic, seq (8-byte BE), msgpack batch]`, seq counting from 0 per socket.
pub struct ZmqPublisher {
    txs: Vec<mpsc::UnboundedSender<Vec<VllmEvent>>>,
}

impl ZmqPublisher {
    /// Binds `tcp://HOST:PORT` (+ rank for rank > 0). Returns the bound endpoints.
    pub async fn bind(
        endpoint: &str,
        dp_size: u32,
        topic: &str,
    ) -> Result<(Self, Vec<String>), String> {
        let (host, port) = endpoint
            .strip_prefix("tcp://")
            .and_then(|r| r.rsplit_once(':'))
            .ok_or_else(|| format!("--zmq-kv-events {endpoint:?} must be tcp://HOST:PORT"))?;
        let port: u16 = port
            .parse()
            .map_err(|_| format!("--zmq-kv-events {endpoint:?}: bad port"))?;
        let mut txs = Vec::new();
        let mut bound = Vec::new();
        // Rank r publishes on base + r (vLLM's convention); with port 0, rank 0 picks the base.
        let mut base = port;
        for rank in 0..dp_size {
            let p = if rank == 0 {
                base
            } else {
                base.saturating_add(rank as u16)
            };
            let mut sock = zeromq::PubSocket::new();
            let ep = sock
                .bind(&format!("tcp://{host}:{p}"))
                .await
                .map_err(|e| format!("cannot bind ZMQ publisher tcp://{host}:{p}: {e}"))?;
            if rank == 0 {
                base = ep
                    .to_string()
                    .rsplit(':')
                    .next()
                    .and_then(|p| p.parse().ok())
                    .unwrap_or(port);
            }
            bound.push(ep.to_string());
            let (tx, mut rx) = mpsc::unbounded_channel::<Vec<VllmEvent>>();
            let topic = Bytes::from(topic.to_string());
            tokio::spawn(async move {
                let mut seq: u64 = 0;
                while let Some(events) = rx.recv().await {
                    let ts = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0.0, |d| d.as_secs_f64());
                    let payload = encode_batch(&VllmBatch {
                        ts,
                        events,
                        dp_rank: Some(rank),
                    });
                    let mut msg = ZmqMessage::from(topic.clone());
                    msg.push_back(Bytes::copy_from_slice(&seq.to_be_bytes()));
                    msg.push_back(Bytes::from(payload));
                    seq += 1;
                    if let Err(e) = sock.send(msg).await {
                        tracing::warn!(rank, error = %e, "ZMQ publish failed");
                    }
                }
            });
            txs.push(tx);
        }
        Ok((Self { txs }, bound))
    }
}

/// Binds a [`ZmqPublisher`] and wraps it as a sink that knows the block size.
pub struct ZmqSink {
    publisher: ZmqPublisher,
    block_size: u32,
}

impl ZmqSink {
    pub fn new(publisher: ZmqPublisher, block_size: u32) -> Self {
        Self {
            publisher,
            block_size,
        }
    }
}

impl EventSink for ZmqSink {
    fn publish(&self, rank: u32, events: &[CacheEvent]) {
        if let Some(tx) = self.publisher.txs.get(rank as usize) {
            let _ = tx.send(to_vllm(events, self.block_size));
        }
    }
}
