//! Where the mocker's KV events go. [`EventSink`] is the seam: the ZMQ publisher (vLLM format)
//! and the NATS publisher (Dynamo 1.6's event plane, [`NatsSink`]) live here.

use bytes::Bytes;
use kvgate_engine::CacheEvent;
use kvgate_wire::vllm::{EventLayout, VllmBatch, VllmEvent, encode_batch_as};
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
        Self::bind_with_replay(endpoint, None, dp_size, topic, EventLayout::Map, Vec::new())
            .await
            .map(|(p, eps, _)| (p, eps))
    }

    /// Also binds vLLM's replay socket (ROUTER; rank r at port + r) over the last
    /// [`REPLAY_BUFFER`] messages of each rank, events in `layout`. `drop_seqs`: sequence numbers to leave unsent
    /// (kept for replay): a test hook that forces gaps. Returns the publisher and the bound PUB
    /// and replay endpoints.
    pub async fn bind_with_replay(
        endpoint: &str,
        replay: Option<&str>,
        dp_size: u32,
        topic: &str,
        layout: EventLayout,
        drop_seqs: Vec<u64>,
    ) -> Result<(Self, Vec<String>, Vec<String>), String> {
        // Rank r uses base + r: with port 0, pick a base whose next ports are free too.
        let endpoint = &consecutive_base(endpoint, dp_size)?;
        let replay = replay.map(|r| consecutive_base(r, dp_size)).transpose()?;
        let replay = replay.as_deref();
        let mut replay_bound = Vec::new();
        let mut buffers = Vec::new();
        let mut replay_base: Option<u16> = None;
        for rank in 0..dp_size {
            let buffer: ReplayBuffer =
                Arc::new(std::sync::Mutex::new(std::collections::VecDeque::new()));
            if let Some(ep) = replay {
                let (bound, port) = bind_replay(ep, rank, replay_base, buffer.clone()).await?;
                // Rank r listens on base + r; with port 0, rank 0's port is the base.
                replay_base.get_or_insert(port);
                replay_bound.push(bound);
            }
            buffers.push(buffer);
        }
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
            let buffer = buffers[rank as usize].clone();
            let drop_seqs = drop_seqs.clone();
            tokio::spawn(async move {
                let mut seq: u64 = 0;
                while let Some(events) = rx.recv().await {
                    let ts = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0.0, |d| d.as_secs_f64());
                    let payload = encode_batch_as(
                        &VllmBatch {
                            ts,
                            events,
                            dp_rank: Some(rank),
                        },
                        layout,
                    );
                    let payload = Bytes::from(payload);
                    if let Ok(mut b) = buffer.lock() {
                        if b.len() >= REPLAY_BUFFER {
                            b.pop_front();
                        }
                        b.push_back((seq, payload.clone()));
                    }
                    let skip = drop_seqs.contains(&seq);
                    let mut msg = ZmqMessage::from(topic.clone());
                    msg.push_back(Bytes::copy_from_slice(&seq.to_be_bytes()));
                    msg.push_back(payload);
                    seq += 1;
                    if skip {
                        continue;
                    }
                    if let Err(e) = sock.send(msg).await {
                        tracing::warn!(rank, error = %e, "ZMQ publish failed");
                    }
                }
            });
            txs.push(tx);
        }
        Ok((Self { txs }, bound, replay_bound))
    }
}

/// Messages each rank keeps for replay (vLLM's default `buffer_steps`).
pub const REPLAY_BUFFER: usize = 10_000;

type ReplayBuffer = Arc<std::sync::Mutex<std::collections::VecDeque<(u64, Bytes)>>>;

/// vLLM's replay protocol: a request `[.., start_seq (8-byte BE)]` is answered with
/// `[identity, "", seq, payload]` for every buffered message from `start_seq` on, then
/// `[identity, "", -1, ""]`.
/// `tcp://HOST:0` for `n` > 1 ranks becomes `tcp://HOST:P` where P..P+n are free right now
/// (an ephemeral port's neighbours are often taken); anything else is returned as is.
fn consecutive_base(endpoint: &str, n: u32) -> Result<String, String> {
    let Some((host, "0")) = endpoint
        .strip_prefix("tcp://")
        .and_then(|r| r.rsplit_once(':'))
    else {
        return Ok(endpoint.to_string());
    };
    if n <= 1 {
        return Ok(endpoint.to_string());
    }
    // ZMQ's wildcard host.
    let probe_host = if host == "*" { "0.0.0.0" } else { host };
    for _ in 0..100 {
        let first = std::net::TcpListener::bind((probe_host, 0))
            .map_err(|e| format!("cannot bind {endpoint}: {e}"))?;
        let base = first.local_addr().map_err(|e| e.to_string())?.port();
        let Some(last) = base.checked_add(n as u16 - 1) else {
            continue;
        };
        let rest: Result<Vec<_>, _> = (base + 1..=last)
            .map(|p| std::net::TcpListener::bind((probe_host, p)))
            .collect();
        if rest.is_ok() {
            return Ok(format!("tcp://{host}:{base}"));
        }
    }
    Err(format!("no {n} consecutive free ports for {endpoint}"))
}

async fn bind_replay(
    endpoint: &str,
    rank: u32,
    base: Option<u16>,
    buffer: ReplayBuffer,
) -> Result<(String, u16), String> {
    use zeromq::SocketRecv;
    let (host, port) = endpoint
        .strip_prefix("tcp://")
        .and_then(|r| r.rsplit_once(':'))
        .ok_or_else(|| format!("--zmq-replay {endpoint:?} must be tcp://HOST:PORT"))?;
    let port: u16 = port
        .parse()
        .map_err(|_| format!("--zmq-replay {endpoint:?}: bad port"))?;
    let p = base.unwrap_or(port).saturating_add(rank as u16);
    let mut sock = zeromq::RouterSocket::new();
    let ep = sock
        .bind(&format!("tcp://{host}:{p}"))
        .await
        .map_err(|e| format!("cannot bind ZMQ replay socket tcp://{host}:{p}: {e}"))?
        .to_string();
    let bound_port = ep
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or(p);
    tokio::spawn(async move {
        loop {
            let Ok(req) = sock.recv().await else { continue };
            let frames = req.into_vec();
            let (Some(identity), Some(last)) = (frames.first(), frames.last()) else {
                continue;
            };
            let Ok(start) = <[u8; 8]>::try_from(last.as_ref()) else {
                continue;
            };
            let start = u64::from_be_bytes(start);
            let replies: Vec<(u64, Bytes)> = match buffer.lock() {
                Ok(b) => b.iter().filter(|(s, _)| *s >= start).cloned().collect(),
                Err(_) => Vec::new(),
            };
            let end = (-1i64).to_be_bytes();
            for (seq, payload) in replies
                .into_iter()
                .map(|(s, p)| (s.to_be_bytes(), p))
                .chain(std::iter::once((end, Bytes::new())))
            {
                let mut msg = ZmqMessage::from(identity.clone());
                msg.push_back(Bytes::new());
                msg.push_back(Bytes::copy_from_slice(&seq));
                msg.push_back(payload);
                if sock.send(msg).await.is_err() {
                    break;
                }
            }
        }
    });
    Ok((ep, bound_port))
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

/// Counters of the NATS publisher.
#[derive(Default)]
pub struct NatsPublishStats {
    /// Messages (one per engine step and rank: a batch of `RouterEvent`s) published (with
    /// JetStream: acknowledged).
    pub published: std::sync::atomic::AtomicU64,
    pub events: std::sync::atomic::AtomicU64,
    /// Failed attempts (NATS away): the message is retried, in order.
    pub retries: std::sync::atomic::AtomicU64,
    /// Messages dropped because the backlog was full (the router sees a gap).
    pub dropped: std::sync::atomic::AtomicU64,
    /// Messages waiting to be published.
    pub backlog: std::sync::atomic::AtomicU64,
}

/// Most messages held while NATS is unreachable; beyond, new ones are dropped.
const MAX_BACKLOG: u64 = 1 << 20;

/// One dp rank's kv-events publisher: its event plane envelope state and next event id.
struct RankPublisher {
    plane: kvgate_wire::dynamo_plane::PlanePublisher,
    next_event_id: u64,
}

/// A message for the publishing task.
struct Outgoing {
    subject: String,
    /// JetStream de-duplication id (`{publisher_id}-{sequence}`).
    msg_id: String,
    bytes: Vec<u8>,
}

/// Dynamo 1.6's NATS event plane, as a Dynamo 1.6.1 worker publishes it
/// ([`kvgate_wire::dynamo_plane`]): each engine step's events of a rank are one envelope on
/// `namespace.{ns}.component.{c}.endpoint.{e}.kv-events`, from that rank's own publisher
/// (random `publisher_id`, `sequence` from 0), event ids counting from 1 per rank as Dynamo's
/// do. Before them, each rank says `cleared` (event id 0): a restarted worker starts empty
/// (Dynamo's router clears nothing it did not know). Without `--durable-kv-events` messages go
/// out on core NATS, as Dynamo's do; with it they are published into the JetStream stream
/// (which captures the same subject) and each is acknowledged before the next is sent; failed
/// publishes are retried in order, so a NATS outage delays events but loses none (up to
/// [`MAX_BACKLOG`] messages). KV usage goes out on the sibling `.kv_metrics` subject
/// ([`NatsSink::report_kv_usage`]).
pub struct NatsSink {
    tx: mpsc::UnboundedSender<Outgoing>,
    client: async_nats::Client,
    worker_id: u64,
    ranks: Vec<std::sync::Mutex<RankPublisher>>,
    metrics: std::sync::Mutex<kvgate_wire::dynamo_plane::PlanePublisher>,
    metrics_subject: String,
    subject: String,
    pub stats: Arc<NatsPublishStats>,
}

impl NatsSink {
    pub async fn start(
        cfg: kvgate_runtime::nats::NatsEventConfig,
        worker_id: u64,
        dp_size: u32,
    ) -> Result<Self, String> {
        use kvgate_wire::dynamo_plane::{KV_METRICS_TOPIC, PlanePublisher, endpoint_subject};
        use std::sync::atomic::Ordering;
        let client = kvgate_runtime::nats::connect(&cfg.url, "kvgate-mocker", |_| {}).await?;
        let subject = cfg.endpoint_subject();
        let js = if cfg.durable {
            let js = async_nats::jetstream::new(client.clone());
            kvgate_runtime::nats::ensure_stream(&js, &cfg).await?;
            Some(js)
        } else {
            None
        };
        let stats = Arc::new(NatsPublishStats::default());
        let (tx, mut rx) = mpsc::unbounded_channel::<Outgoing>();
        let task_stats = stats.clone();
        let task_client = client.clone();
        tokio::spawn(async move {
            while let Some(msg) = rx.recv().await {
                let payload = Bytes::from(msg.bytes);
                // A retry after a lost ack must not store the message twice: JetStream drops
                // repeats of a message id (within its duplicate window).
                let mut headers = async_nats::HeaderMap::new();
                headers.insert("Nats-Msg-Id", msg.msg_id.as_str());
                let mut delay = std::time::Duration::from_millis(50);
                loop {
                    let sent = match &js {
                        Some(js) => match js
                            .publish_with_headers(
                                msg.subject.clone(),
                                headers.clone(),
                                payload.clone(),
                            )
                            .await
                        {
                            Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
                            Err(e) => Err(e.to_string()),
                        },
                        None => task_client
                            .publish(msg.subject.clone(), payload.clone())
                            .await
                            .map_err(|e| e.to_string()),
                    };
                    match sent {
                        Ok(()) => break,
                        Err(e) => {
                            task_stats.retries.fetch_add(1, Ordering::Relaxed);
                            tracing::debug!(error = %e, "KV event publish failed; retrying");
                            tokio::time::sleep(delay).await;
                            delay = (delay * 2).min(std::time::Duration::from_secs(1));
                        }
                    }
                }
                task_stats.published.fetch_add(1, Ordering::Relaxed);
                task_stats.backlog.fetch_sub(1, Ordering::Relaxed);
            }
        });
        let sink = Self {
            tx,
            client,
            worker_id,
            ranks: (0..dp_size.max(1))
                .map(|_| {
                    std::sync::Mutex::new(RankPublisher {
                        plane: PlanePublisher::random(),
                        next_event_id: 0,
                    })
                })
                .collect(),
            metrics: std::sync::Mutex::new(PlanePublisher::random()),
            metrics_subject: endpoint_subject(
                &cfg.namespace,
                &cfg.component,
                &cfg.endpoint,
                KV_METRICS_TOPIC,
            ),
            subject,
            stats,
        };
        for rank in 0..dp_size.max(1) {
            sink.publish(rank, &[CacheEvent::Cleared]);
        }
        Ok(sink)
    }

    /// The kv-events publisher id of each dp rank (what Dynamo's discovery records name).
    pub fn publisher_ids(&self) -> Vec<u64> {
        self.ranks
            .iter()
            .filter_map(|r| r.lock().ok().map(|r| r.plane.publisher_id))
            .collect()
    }

    /// The id of the `kv_metrics` publisher (one per worker, as Dynamo's).
    pub fn metrics_publisher_id(&self) -> u64 {
        self.metrics.lock().map_or(0, |m| m.publisher_id)
    }

    pub fn worker_id(&self) -> u64 {
        self.worker_id
    }

    /// Publishes each rank's KV usage on `.kv_metrics` (core NATS, as Dynamo does) whenever it
    /// changes, checked every 20 ms, and every 5 s regardless (not while NATS is away); runs as
    /// long as the process.
    pub fn report_kv_usage(self: &Arc<Self>, engines: Vec<crate::driver::EngineHandle>) {
        let sink = self.clone();
        tokio::spawn(async move {
            let mut last: Vec<Option<(u64, std::time::Instant)>> = vec![None; engines.len()];
            let mut tick = tokio::time::interval(std::time::Duration::from_millis(20));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            loop {
                tick.tick().await;
                for (e, seen) in engines.iter().zip(last.iter_mut()) {
                    let used = e.stats().active_blocks as u64;
                    let stale = seen.is_none_or(|(v, at)| {
                        v != used || at.elapsed() >= std::time::Duration::from_secs(5)
                    });
                    if stale {
                        sink.publish_kv_metrics(e.rank, used).await;
                        *seen = Some((used, std::time::Instant::now()));
                    }
                }
            }
        });
    }

    async fn publish_kv_metrics(&self, rank: u32, kv_used_blocks: u64) {
        let m = kvgate_wire::dynamo_plane::KvMetrics {
            worker_id: self.worker_id,
            dp_rank: rank,
            active_decode_blocks: None,
            active_prefill_tokens: None,
            kv_used_blocks,
        };
        // While NATS is away, usage reports would only queue up behind the KV events.
        if self.client.connection_state() != async_nats::connection::State::Connected {
            return;
        }
        let Ok(bytes) = self.metrics.lock().map(|mut p| p.kv_metrics(&m)) else {
            return;
        };
        // Best effort, as Dynamo's: a lost usage report is replaced by the next one.
        if let Err(e) = self
            .client
            .publish(self.metrics_subject.clone(), Bytes::from(bytes))
            .await
        {
            tracing::debug!(error = %e, "kv_metrics publish failed");
        }
    }
}

impl EventSink for NatsSink {
    fn publish(&self, rank: u32, events: &[CacheEvent]) {
        use std::sync::atomic::Ordering;
        if events.is_empty() {
            return;
        }
        let Some(Ok(mut p)) = self.ranks.get(rank as usize).map(|r| r.lock()) else {
            return;
        };
        let source = kvgate_core::WorkerRank::new(self.worker_id, rank);
        let first = p.next_event_id;
        p.next_event_id += events.len() as u64;
        let batch: Vec<kvgate_wire::dynamo::RouterEvent> = events
            .iter()
            .enumerate()
            .map(|(i, e)| {
                kvgate_wire::dynamo::RouterEvent::from_kv_event(
                    &e.to_kv_event(source, first + i as u64),
                )
            })
            .collect();
        // The sequence number is taken even when the message is dropped below: the gap tells
        // the router that something was lost.
        let sequence = p.plane.next_sequence();
        let bytes = p.plane.kv_events(&batch);
        let msg_id = format!("{}-{sequence}", p.plane.publisher_id);
        drop(p);
        if self.stats.backlog.load(Ordering::Relaxed) >= MAX_BACKLOG {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.stats.backlog.fetch_add(1, Ordering::Relaxed);
        self.stats
            .events
            .fetch_add(events.len() as u64, Ordering::Relaxed);
        let out = Outgoing {
            subject: self.subject.clone(),
            msg_id,
            bytes,
        };
        if self.tx.send(out).is_err() {
            self.stats.backlog.fetch_sub(1, Ordering::Relaxed);
        }
    }
}
