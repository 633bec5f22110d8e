//! `kvgate bench events`: KV events applied per second on each path into the router, measured
//! side by side in one run: decoding alone, the index alone, the NATS JetStream path (messages
//! already in the stream, read by a fresh durable consumer), the vLLM ZMQ path, and router
//! replica sync (booking changes from one replica applied by another over NATS).

use async_nats::jetstream;
use kvgate_core::config::RouterConfig;
use kvgate_core::router::{Router, WorkerInfo, WorkerRole};
use kvgate_core::scheduler::WorkerCapacity;
use kvgate_core::{
    ExternalHash, KvEvent, KvEventData, LocalHash, StorageTier, StoredBlock, WorkerId, WorkerRank,
};
use kvgate_runtime::events::EventStats;
use kvgate_runtime::nats::NatsEventConfig;
use kvgate_wire::dynamo::RouterEvent;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(clap::Args, Debug)]
pub struct BenchEventsArgs {
    /// Events per path.
    #[arg(long, default_value_t = 200_000)]
    pub events: usize,
    /// Events per message.
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
    /// Blocks per `stored` event.
    #[arg(long, default_value_t = 4)]
    pub blocks_per_event: usize,
    /// Workers publishing.
    #[arg(long, default_value_t = 16)]
    pub workers: u64,
    /// nats-server binary, started on a free loopback port with a temporary JetStream store.
    #[arg(
        long,
        env = "KVGATE_NATS_SERVER",
        default_value = ".tools/bin/nats-server"
    )]
    pub nats_server: PathBuf,
    /// Use this NATS server instead of starting one.
    #[arg(long)]
    pub nats_url: Option<String>,
}

fn splitmix(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A synthetic stream: per worker, chains of stored blocks growing from earlier ones; every
/// fourth event removes the blocks an earlier event stored.
fn synth(a: &BenchEventsArgs) -> Vec<KvEvent> {
    let mut rng = 42u64;
    let mut next_id = vec![0u64; a.workers as usize];
    let mut last: Vec<Vec<Vec<ExternalHash>>> = vec![Vec::new(); a.workers as usize];
    (0..a.events)
        .map(|i| {
            let w = (i as u64 % a.workers) as usize;
            let id = next_id[w];
            next_id[w] += 1;
            let source = WorkerRank::new(w as u64 + 1, 0);
            let data = if i % 4 == 3 && !last[w].is_empty() {
                let victim = last[w].remove(0);
                KvEventData::Removed { blocks: victim }
            } else {
                let parent = last[w].last().and_then(|c| c.last().copied());
                let blocks: Vec<StoredBlock> = (0..a.blocks_per_event)
                    .map(|_| StoredBlock {
                        hash: ExternalHash(splitmix(&mut rng)),
                        local: LocalHash(splitmix(&mut rng)),
                    })
                    .collect();
                last[w].push(blocks.iter().map(|b| b.hash).collect());
                KvEventData::Stored { parent, blocks }
            };
            KvEvent {
                source,
                event_id: id,
                tier: StorageTier::Device,
                data,
            }
        })
        .collect()
}

fn router(a: &BenchEventsArgs) -> Result<Router, String> {
    let mut r = Router::new(RouterConfig::default(), 16).map_err(|e| e.to_string())?;
    for w in 1..=a.workers {
        r.upsert_worker(WorkerInfo {
            id: WorkerId(w),
            dp_size: 1,
            role: WorkerRole::Aggregated,
            capacity: WorkerCapacity::default(),
        });
    }
    Ok(r)
}

fn messages(events: &[KvEvent], batch: usize) -> Vec<Vec<u8>> {
    events
        .chunks(batch.max(1))
        .map(|c| {
            let v: Vec<RouterEvent> = c.iter().map(RouterEvent::from_kv_event).collect();
            serde_json::to_vec(&v).unwrap_or_default()
        })
        .collect()
}

async fn wait_applied(stats: &EventStats, n: u64, timeout: Duration) -> (u64, Duration) {
    let t0 = Instant::now();
    loop {
        let done = stats.events.load(Ordering::Relaxed);
        if done >= n || t0.elapsed() > timeout {
            return (done, t0.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

fn row(name: &str, n: u64, of: usize, d: Duration) {
    println!(
        "| {name} | {n} of {of} | {:.1} | {:.0} |",
        d.as_secs_f64() * 1e3,
        n as f64 / d.as_secs_f64().max(1e-9)
    );
}

pub async fn run(a: BenchEventsArgs) -> Result<(), String> {
    if a.workers == 0 || a.events == 0 {
        return Err("--workers and --events must be > 0".into());
    }
    let events = synth(&a);
    let msgs = messages(&events, a.batch);
    let n = events.len();
    println!(
        "{n} events ({} blocks per stored event, {} per message, {} workers)\n",
        a.blocks_per_event, a.batch, a.workers
    );
    println!("| path | applied | ms | events/s |\n| --- | --- | --- | --- |");

    // Decoding alone.
    let t0 = Instant::now();
    let mut decoded = 0u64;
    for m in &msgs {
        decoded += RouterEvent::decode_message(m).map_or(0, |v| v.len() as u64);
    }
    row("decode Dynamo JSON", decoded, n, t0.elapsed());

    // The index alone.
    let mut r = router(&a)?;
    let t0 = Instant::now();
    let applied = events.iter().filter(|e| r.apply_event(e)).count() as u64;
    row("index apply", applied, n, t0.elapsed());

    // NATS JetStream: publish everything, then read it with a fresh consumer.
    let (_server, url) = match &a.nats_url {
        Some(u) => (None, u.clone()),
        None => {
            let s = crate::procs::NatsServer::start(
                &a.nats_server,
                "bench-events",
                "run scripts/setup.sh or pass --nats-url",
            )?;
            let u = s.url();
            (Some(s), u)
        }
    };
    let cfg = NatsEventConfig {
        url: url.clone(),
        namespace: format!("bench{}", std::process::id()),
        component: "backend".into(),
        endpoint: "generate".into(),
        prefill_component: None,
        durable: true,
        consumer: "bench".into(),
        max_age: Duration::from_secs(600),
        snapshot: None,
        snapshot_every: Duration::from_secs(30),
    };
    let client = kvgate_runtime::nats::connect(&url, "kvgate-bench", |_| {}).await?;
    let js = jetstream::new(client.clone());
    let stream = kvgate_runtime::nats::ensure_stream(&js, &cfg).await?;
    let subject = cfg.publish_subject();
    let t0 = Instant::now();
    let mut acks = Vec::with_capacity(1024);
    for m in &msgs {
        let ack = js
            .publish(subject.clone(), bytes::Bytes::from(m.clone()))
            .await
            .map_err(|e| format!("publish: {e}"))?;
        acks.push(ack);
        if acks.len() == 1024 {
            for ack in acks.drain(..) {
                ack.await.map_err(|e| format!("publish ack: {e}"))?;
            }
        }
    }
    for ack in acks.drain(..) {
        ack.await.map_err(|e| format!("publish ack: {e}"))?;
    }
    row("NATS JetStream publish (acked)", n as u64, n, t0.elapsed());
    let shared = Arc::new(Mutex::new(router(&a)?));
    let stats = Arc::new(EventStats::new());
    let task = kvgate_runtime::nats::consume(shared.clone(), stats.clone(), cfg.clone());
    let (done, d) = wait_applied(&stats, n as u64, Duration::from_secs(120)).await;
    row("NATS JetStream consume + apply", done, n, d);
    task.abort();
    let _ = stream.delete_consumer("bench").await;
    let _ = js.delete_stream(cfg.stream()).await;

    replica_path(&a, &url).await?;

    // vLLM ZMQ: one publisher per worker rank, one subscription each.
    zmq_path(&a, &events).await?;
    Ok(())
}

/// Replica sync: the booking changes one router replica publishes (half bookings, half frees),
/// applied by another through NATS.
async fn replica_path(a: &BenchEventsArgs, url: &str) -> Result<(), String> {
    use kvgate_core::hashing::{BlockHashes, HashSeed};
    use kvgate_core::replica::{SyncOp, booked_op};
    use kvgate_core::router::RouteRequest;
    use kvgate_runtime::replica::{ReplicaSync, ReplicaSyncConfig};
    let cfg = ReplicaSyncConfig::new(url, &format!("benchsync{}", std::process::id()), "backend");
    let (ra, rb) = (
        Arc::new(Mutex::new(router(a)?)),
        Arc::new(Mutex::new(router(a)?)),
    );
    let (sa, sb) = (
        ReplicaSync::start(ra.clone(), cfg.clone()),
        ReplicaSync::start(rb.clone(), cfg),
    );
    sa.ready().await;
    sb.ready().await;
    // The ops, prepared outside the clock: route and book on A, then free.
    let n = (a.events / 2).max(1);
    let mut ops = Vec::with_capacity(2 * n);
    {
        let mut r = ra.lock().map_err(|_| "lock")?;
        let mut rng = kvgate_core::random::SplitMix64::new(7);
        let mut frees = Vec::with_capacity(n);
        for i in 0..n {
            let tokens: Vec<u32> = (0..128u32)
                .map(|t| t ^ (i as u32).wrapping_mul(2654435761))
                .collect();
            let h = BlockHashes::from_tokens(&tokens, 16, HashSeed::default());
            let id = kvgate_core::RequestId::from(format!("b{i}"));
            r.route(
                RouteRequest {
                    request: &id,
                    hashes: &h,
                    expected_output_tokens: None,
                    allowed: None,
                    book: true,
                    home: None,
                },
                Instant::now(),
                &mut rng,
            )
            .map_err(|e| e.to_string())?;
            ops.extend(booked_op(&r, &id));
            frees.push(id);
        }
        for id in frees {
            r.free(&id);
            ops.push(SyncOp::Freed { id: id.to_string() });
        }
    }
    let total = ops.len() as u64;
    let t0 = Instant::now();
    for op in ops {
        sa.send(op);
    }
    let applied = loop {
        let applied = sb.with_view(|v| v.counters.ops_applied);
        if applied >= total || t0.elapsed() > Duration::from_secs(120) {
            break applied;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    };
    row(
        "replica sync: booking changes applied by a peer",
        applied,
        total as usize,
        t0.elapsed(),
    );
    sa.stop();
    sb.stop();
    Ok(())
}

async fn zmq_path(a: &BenchEventsArgs, events: &[KvEvent]) -> Result<(), String> {
    use kvgate_wire::vllm::{VllmBatch, VllmEvent, encode_batch};
    use zeromq::{Socket, SocketSend, ZmqMessage};
    let shared = Arc::new(Mutex::new(router(a)?));
    let stats = Arc::new(EventStats::new());
    let mut socks = Vec::new();
    let mut tasks = Vec::new();
    for w in 1..=a.workers {
        let mut sock = zeromq::PubSocket::new();
        let ep = sock
            .bind("tcp://127.0.0.1:0")
            .await
            .map_err(|e| e.to_string())?
            .to_string();
        tasks.push(kvgate_runtime::events::subscribe(
            shared.clone(),
            stats.clone(),
            WorkerId(w),
            0,
            ep,
            None,
            16,
        ));
        socks.push(sock);
    }
    // Wait for the subscriptions (each starts with a `cleared`, counted as applied).
    wait_applied(&stats, a.workers, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let base = stats.events.load(Ordering::Relaxed);
    // vLLM events carry the tokens; the consumer hashes them.
    let mut per_worker: Vec<Vec<Vec<VllmEvent>>> = vec![Vec::new(); a.workers as usize];
    let mut tok = 0u32;
    for e in events {
        let w = (e.source.worker.0 - 1) as usize;
        let v = match &e.data {
            KvEventData::Stored { parent, blocks } => VllmEvent::BlockStored {
                block_hashes: blocks.iter().map(|b| b.hash.0).collect(),
                parent_block_hash: parent.map(|p| p.0),
                token_ids: (0..blocks.len() * 16)
                    .map(|_| {
                        tok = tok.wrapping_add(1);
                        tok
                    })
                    .collect(),
                block_size: 16,
                lora_name: None,
                medium: Some("GPU".into()),
            },
            KvEventData::Removed { blocks } => VllmEvent::BlockRemoved {
                block_hashes: blocks.iter().map(|h| h.0).collect(),
                medium: Some("GPU".into()),
            },
            KvEventData::Cleared => VllmEvent::AllBlocksCleared,
        };
        let list = &mut per_worker[w];
        if list.last().is_none_or(|b| b.len() >= a.batch.max(1)) {
            list.push(Vec::new());
        }
        if let Some(b) = list.last_mut() {
            b.push(v);
        }
    }
    let payloads: Vec<Vec<bytes::Bytes>> = per_worker
        .into_iter()
        .map(|batches| {
            batches
                .into_iter()
                .map(|events| {
                    bytes::Bytes::from(encode_batch(&VllmBatch {
                        ts: 0.0,
                        events,
                        dp_rank: Some(0),
                    }))
                })
                .collect()
        })
        .collect();
    let t0 = Instant::now();
    let most = payloads.iter().map(Vec::len).max().unwrap_or(0);
    for i in 0..most {
        for (w, sock) in socks.iter_mut().enumerate() {
            if let Some(p) = payloads[w].get(i) {
                let mut msg = ZmqMessage::from(bytes::Bytes::new());
                msg.push_back(bytes::Bytes::copy_from_slice(&(i as u64).to_be_bytes()));
                msg.push_back(p.clone());
                sock.send(msg).await.map_err(|e| e.to_string())?;
            }
        }
        // Yield now and then so that subscribers keep up (PUB drops at its high-water mark).
        if i % 64 == 63 {
            tokio::task::yield_now().await;
        }
    }
    let want = base + events.len() as u64;
    let deadline = Instant::now() + Duration::from_secs(60);
    while stats.events.load(Ordering::Relaxed) < want && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let done = stats.events.load(Ordering::Relaxed) - base;
    row(
        "vLLM ZMQ publish + consume + apply",
        done,
        events.len(),
        t0.elapsed(),
    );
    for t in tasks {
        t.abort();
    }
    Ok(())
}
