//! `kvgate bench abuse`: hostile traffic at every port of a real deployment while well-formed
//! requests run alongside. The deployment is real Envoy → `kvgate epp` (KV events and replica
//! sync over a real NATS) → direct-mode sidecars → mockers. The hostile traffic is:
//! - streams aborted before the body ends, mid-prefill and mid-decode;
//! - slow-loris bodies;
//! - bodies just over the limit, with and without a content length;
//! - requests naming a model nobody serves;
//! - a publisher flooding the KV event subject (unknown workers, random hashes, garbage);
//! - a replica-sync peer sending garbage, then one valid booking, then vanishing.
//!
//! Afterwards every booking must be back to zero, no process may have panicked or died, the
//! EPP's RSS must stay within `--rss-bound-mb` of its idle figure, and every well-formed request
//! must have succeeded. The last line with `--json` is
//! `{"panics", "leaked_bookings", "rss_growth_mb", "good_requests_failed", "inputs_fuzzed", ...}`.

use crate::procs::{Proc, TempDir, free_port, rss_mb};
use futures::StreamExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;

#[derive(clap::Args, Debug)]
pub struct BenchAbuseArgs {
    /// The Envoy binary (scripts/setup.sh installs one into .tools/bin/envoy).
    #[arg(long, env = "KVGATE_ENVOY", default_value = ".tools/bin/envoy")]
    pub envoy: PathBuf,
    /// The nats-server binary (scripts/setup.sh installs one into .tools/bin/nats-server).
    #[arg(
        long,
        env = "KVGATE_NATS_SERVER",
        default_value = ".tools/bin/nats-server"
    )]
    pub nats_server: PathBuf,
    /// Streams aborted at random points.
    #[arg(long, default_value_t = 1000)]
    pub aborts: usize,
    /// Requests naming an unknown model.
    #[arg(long, default_value_t = 10_000)]
    pub unknown_model: usize,
    /// KV event messages the hostile publisher sends.
    #[arg(long, default_value_t = 50_000)]
    pub flood_events: usize,
    /// Slow-loris connections (one body byte every 50 ms).
    #[arg(long, default_value_t = 16)]
    pub slow_loris: usize,
    /// Bodies just over the EPP's limit.
    #[arg(long, default_value_t = 50)]
    pub oversized: usize,
    /// The EPP's `--max-request-body-bytes`.
    #[arg(long, default_value_t = 262_144)]
    pub max_request_body_bytes: usize,
    /// Allowed growth of the EPP's resident memory over its idle figure, MiB.
    #[arg(long, default_value_t = 64.0)]
    pub rss_bound_mb: f64,
    /// A small run for the test suite: 100 aborts, 500 unknown-model requests, 5,000 events.
    #[arg(long)]
    pub quick: bool,
    /// Print one JSON object as the last line.
    #[arg(long)]
    pub json: bool,
}

fn chat(content: &str, max_tokens: u32, stream: bool, model: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "stream": stream,
        "stream_options": {"include_usage": true},
    }))
    .unwrap_or_default()
}

fn words(tag: &str, n: usize) -> String {
    (0..n)
        .map(|i| format!("{tag}{} ", i * 7919 % 997))
        .collect()
}

/// A small deterministic generator (the run is reproducible).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

#[derive(Default)]
struct Counts {
    inputs: AtomicU64,
    /// Hostile requests answered with a status other than the one they should get.
    unexpected: AtomicU64,
    good_ok: AtomicU64,
    good_failed: AtomicU64,
}

struct Rig {
    procs: Vec<Proc>,
    epp_pid: u32,
    epp_http: String,
    gateway: String,
    nats_url: String,
    _envoy: Proc,
    _dir: TempDir,
}

fn setup(a: &BenchAbuseArgs) -> Result<Rig, String> {
    for (what, p) in [("Envoy", &a.envoy), ("nats-server", &a.nats_server)] {
        if !p.exists() {
            return Err(format!(
                "{what} not found at {} (run scripts/setup.sh)",
                p.display()
            ));
        }
    }
    let dir = TempDir::new("bench-abuse")?;
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let port = free_port()?;
    let store = dir.path().join("nats");
    let nats = Proc::start(
        "nats-server",
        &a.nats_server,
        &[
            "-js",
            "-a",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-sd",
            &store.to_string_lossy(),
        ],
        0,
        Some(dir.path()),
    )?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            return Err("nats-server did not listen".into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let nats_url = format!("nats://127.0.0.1:{port}");
    let mut procs = vec![nats];
    let ids = [1001u64, 1002];
    let mut mockers = Vec::new();
    for id in ids {
        let id_s = id.to_string();
        let m = Proc::start(
            &format!("mocker-{id}"),
            &exe,
            &[
                "mocker",
                "--port",
                "0",
                "--block-size",
                "16",
                "--num-gpu-blocks",
                "8192",
                "--worker-id",
                &id_s,
                "--speedup-ratio",
                "20",
                "--event-plane",
                "nats",
                "--nats-url",
                &nats_url,
            ],
            2,
            Some(dir.path()),
        )?;
        mockers.push(m.addr("http://")?);
        procs.push(m);
    }
    let side_file = dir.path().join("sidecar.yaml");
    let mut y = String::from("model: qwen3\nblock_size: 16\nworkers:\n");
    for (id, m) in ids.iter().zip(&mockers) {
        y.push_str(&format!(
            "  - {{name: w{id}, id: {id}, url: 'http://{m}'}}\n"
        ));
    }
    std::fs::write(&side_file, y).map_err(|e| e.to_string())?;
    let mut sidecars = Vec::new();
    for id in ids {
        let s = Proc::start(
            &format!("sidecar-{id}"),
            &exe,
            &[
                "frontend",
                "--port",
                "0",
                "--workers",
                &side_file.to_string_lossy(),
                "--router-mode",
                "direct",
            ],
            1,
            Some(dir.path()),
        )?;
        sidecars.push(s.addr("http://")?);
        procs.push(s);
    }
    let epp_file = dir.path().join("epp.yaml");
    let mut y = String::from("model: qwen3\nblock_size: 16\nworkers:\n");
    for (id, s) in ids.iter().zip(&sidecars) {
        y.push_str(&format!(
            "  - {{name: pod-{id}, id: {id}, url: 'http://{s}', total_kv_blocks: 8192}}\n"
        ));
    }
    std::fs::write(&epp_file, y).map_err(|e| e.to_string())?;
    let limit = a.max_request_body_bytes.to_string();
    let epp_path = epp_file.to_string_lossy().to_string();
    let epp = Proc::start(
        "epp",
        &exe,
        &[
            crate::procs::epp_args(&epp_path).as_slice(),
            &[
                "--secure-serving=false",
                "--event-plane",
                "nats",
                "--nats-url",
                &nats_url,
                "--router-replica-sync",
                "true",
                "--max-request-body-bytes",
                &limit,
            ],
        ]
        .concat(),
        3,
        Some(dir.path()),
    )?;
    let grpc = epp.addr("grpc://")?;
    let epp_http = format!("http://{}", epp.addr("http://")?);
    let epp_pid = epp.pid();
    procs.push(epp);
    let (envoy, gw_port) =
        crate::procs::start_gateway(&a.envoy, false, &grpc, dir.path(), "gateway")?;
    Ok(Rig {
        _envoy: envoy,
        procs,
        epp_pid,
        epp_http,
        gateway: format!("127.0.0.1:{gw_port}"),
        nats_url,
        _dir: dir,
    })
}

fn client() -> Result<reqwest::Client, String> {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(64)
        .build()
        .map_err(|e| e.to_string())
}

async fn post(c: &reqwest::Client, url: &str, body: Vec<u8>) -> Result<(u16, Vec<u8>), String> {
    let r = c
        .post(url)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let s = r.status().as_u16();
    let b = r.bytes().await.map_err(|e| e.to_string())?;
    Ok((s, b.to_vec()))
}

/// Well-formed multi-turn requests until `stop`.
async fn good_traffic(url: String, counts: Arc<Counts>, stop: Arc<AtomicBool>) {
    let Ok(c) = client() else { return };
    let mut turn = 0usize;
    while !stop.load(Ordering::Relaxed) {
        let session = turn % 3;
        let content = format!(
            "{}{}",
            words(&format!("s{session}"), 200),
            words(&format!("t{turn}"), 5)
        );
        let stream = turn % 2 == 1;
        match post(&c, &url, chat(&content, 8, stream, "qwen3")).await {
            Ok((200, _)) => counts.good_ok.fetch_add(1, Ordering::Relaxed),
            Ok((s, b)) => {
                eprintln!(
                    "good request failed: {s} {}",
                    String::from_utf8_lossy(&b)
                        .chars()
                        .take(200)
                        .collect::<String>()
                );
                counts.good_failed.fetch_add(1, Ordering::Relaxed)
            }
            Err(e) => {
                eprintln!("good request failed: {e}");
                counts.good_failed.fetch_add(1, Ordering::Relaxed)
            }
        };
        turn += 1;
    }
}

/// Streams aborted before the body ends (raw TCP), mid-prefill and mid-decode.
async fn aborts(gw: String, n: usize, counts: Arc<Counts>) {
    let Ok(c) = client() else { return };
    let url = format!("http://{gw}/v1/chat/completions");
    let rng = Arc::new(std::sync::Mutex::new(Rng(42)));
    futures::stream::iter(0..n)
        .for_each_concurrent(16, |i| {
            let (c, url, gw, rng, counts) =
                (c.clone(), url.clone(), gw.clone(), rng.clone(), counts.clone());
            async move {
                counts.inputs.fetch_add(1, Ordering::Relaxed);
                let (delay, cut) = match rng.lock() {
                    Ok(mut r) => (r.below(30), r.below(90) + 5),
                    Err(_) => (5, 50),
                };
                let body = chat(&words(&format!("a{}", i % 50), 300), 64, true, "qwen3");
                match i % 3 {
                    0 => {
                        // The body stops part way and the connection closes.
                        if let Ok(mut s) = tokio::net::TcpStream::connect(&gw).await {
                            let head = format!(
                                "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                                body.len()
                            );
                            let part = body.len() * cut as usize / 100;
                            let _ = s.write_all(head.as_bytes()).await;
                            let _ = s.write_all(&body[..part.min(body.len() - 1)]).await;
                            tokio::time::sleep(Duration::from_millis(delay)).await;
                        }
                    }
                    1 => {
                        // Mid-prefill: the client gives up before the first byte.
                        let _ = tokio::time::timeout(
                            Duration::from_millis(delay + 1),
                            c.post(&url).body(body).send(),
                        )
                        .await;
                    }
                    _ => {
                        // Mid-decode: the first chunk, then away.
                        if let Ok(r) = c.post(&url).body(body).send().await {
                            let mut s = r.bytes_stream();
                            let _ = s.next().await;
                        }
                    }
                }
            }
        })
        .await;
}

/// Bodies sent one byte every 50 ms: half finish (and must succeed), half are abandoned.
async fn slow_loris(gw: String, n: usize, counts: Arc<Counts>) {
    futures::stream::iter(0..n)
        .for_each_concurrent(n.max(1), |i| {
            let (gw, counts) = (gw.clone(), counts.clone());
            async move {
                counts.inputs.fetch_add(1, Ordering::Relaxed);
                let body = chat(&words(&format!("l{i}"), 10), 2, false, "qwen3");
                let Ok(mut s) = tokio::net::TcpStream::connect(&gw).await else {
                    return;
                };
                let t0 = Instant::now();
                let head = format!(
                    "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    body.len()
                );
                let _ = s.write_all(head.as_bytes()).await;
                let finish = i % 2 == 0;
                let upto = if finish { body.len() } else { body.len() / 2 };
                for b in &body[..upto] {
                    if s.write_all(&[*b]).await.is_err() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    if !finish && b == &b'q' {
                        break;
                    }
                }
                if finish {
                    let mut out = Vec::new();
                    let _ = tokio::time::timeout(
                        Duration::from_secs(30),
                        tokio::io::AsyncReadExt::read_to_end(&mut s, &mut out),
                    )
                    .await;
                    if !out.starts_with(b"HTTP/1.1 200") {
                        let text = String::from_utf8_lossy(&out);
                        eprintln!(
                            "slow-loris request that finished got, after {:.1} s: {} ({})",
                            t0.elapsed().as_secs_f64(),
                            text.lines().next().unwrap_or(""),
                            text.rsplit("\r\n\r\n").next().unwrap_or("").chars().take(300).collect::<String>()
                        );
                        counts.unexpected.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        })
        .await;
}

/// Bodies one byte over the limit, with a content length (refused before the body) and
/// without (chunked: refused when the limit is crossed). Both must be 413.
async fn oversized(gw: String, n: usize, limit: usize, counts: Arc<Counts>) {
    let Ok(c) = client() else { return };
    let url = format!("http://{gw}/v1/chat/completions");
    let pad = limit.saturating_sub(80);
    for i in 0..n {
        counts.inputs.fetch_add(1, Ordering::Relaxed);
        let mut body = chat(&"x".repeat(pad), 2, false, "qwen3");
        while body.len() <= limit {
            let extra = limit + 1 - body.len();
            body = chat(&"x".repeat(pad + extra), 2, false, "qwen3");
        }
        let r = if i % 2 == 0 {
            c.post(&url).body(body).send().await
        } else {
            let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
                body.chunks(16 * 1024).map(|c| Ok(c.to_vec())).collect();
            c.post(&url)
                .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
                .send()
                .await
        };
        let status = r.map(|r| r.status().as_u16()).unwrap_or(0);
        if status != 413 {
            eprintln!("oversized body #{i} got {status}, not 413");
            counts.unexpected.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Requests for a model nobody serves: each must be a 404 naming the model.
async fn unknown_model(gw: String, n: usize, counts: Arc<Counts>) {
    let Ok(c) = client() else { return };
    let url = format!("http://{gw}/v1/chat/completions");
    futures::stream::iter(0..n)
        .for_each_concurrent(32, |i| {
            let (c, url, counts) = (c.clone(), url.clone(), counts.clone());
            async move {
                counts.inputs.fetch_add(1, Ordering::Relaxed);
                let model = format!("no-such-model-{i}");
                match post(&c, &url, chat("hi", 2, false, &model)).await {
                    Ok((404, b)) if String::from_utf8_lossy(&b).contains(&model) => {}
                    other => {
                        if counts.unexpected.fetch_add(1, Ordering::Relaxed) < 3 {
                            eprintln!("unknown model got {other:?}");
                        }
                    }
                }
            }
        })
        .await;
}

/// A hostile KV event publisher: events for unknown workers, removals of random hashes and
/// stores under unknown parents for the real workers, and garbage.
async fn event_flood(nats_url: String, n: usize, counts: Arc<Counts>) -> Result<(), String> {
    let client = async_nats::connect(&nats_url)
        .await
        .map_err(|e| format!("NATS: {e}"))?;
    let subject = kvgate_wire::dynamo::stream_queue_subject(&kvgate_wire::dynamo::stream_name(
        &kvgate_wire::dynamo::kv_events_subject("dynamo", "backend"),
    ));
    let mut rng = Rng(7);
    for i in 0..n {
        counts.inputs.fetch_add(1, Ordering::Relaxed);
        let h = rng.next() >> 1;
        let payload: Vec<u8> = match i % 4 {
            0 => format!(
                r#"{{"worker_id":{},"event":{{"event_id":{i},"dp_rank":0,"data":{{"stored":{{"parent_hash":null,"blocks":[{{"block_hash":{h},"tokens_hash":{h}}}]}}}}}}}}"#,
                rng.next() >> 1
            )
            .into_bytes(),
            1 => format!(
                r#"{{"worker_id":1001,"event":{{"event_id":{},"dp_rank":0,"data":{{"removed":{{"block_hashes":[{h}]}}}}}}}}"#,
                1_000_000 + i
            )
            .into_bytes(),
            2 => format!(
                r#"{{"worker_id":1002,"event":{{"event_id":{},"dp_rank":7,"data":{{"stored":{{"parent_hash":{h},"blocks":[{{"block_hash":{},"tokens_hash":1}}]}}}}}}}}"#,
                1_000_000 + i,
                h ^ 1
            )
            .into_bytes(),
            _ => (0..rng.below(200)).map(|_| rng.next() as u8).collect(),
        };
        client
            .publish(subject.clone(), payload.into())
            .await
            .map_err(|e| format!("publish: {e}"))?;
    }
    client.flush().await.map_err(|e| format!("flush: {e}"))?;
    Ok(())
}

/// A replica-sync peer sending garbage, then one valid booking, then never heard from again
/// (its booking must go when the peer times out).
async fn sync_garbage(nats_url: String, counts: Arc<Counts>) -> Result<usize, String> {
    let client = async_nats::connect(&nats_url)
        .await
        .map_err(|e| format!("NATS: {e}"))?;
    let cfg = kvgate_runtime::replica::ReplicaSyncConfig::new(&nats_url, "dynamo", "backend");
    let subject = cfg.subject();
    let mut rng = Rng(9);
    let mut msgs: Vec<Vec<u8>> = vec![
        b"{}".to_vec(),
        b"null".to_vec(),
        br#"{"from":1,"seq":"x"}"#.to_vec(),
        br#"{"from":2,"seq":1,"ops":[{"booked":{"id":"a","worker_id":1001,"dp_rank":0,"seqs":[1,2],"locals":[1],"prefill_tokens":5}}]}"#.to_vec(),
        format!(r#"{{"from":3,"seq":1,"ops":[{{"booked":{{"id":"big","worker_id":1001,"dp_rank":0,"seqs":[{}],"prefill_tokens":1}}}}]}}"#, vec!["1"; 70_000].join(",")).into_bytes(),
        vec![b'['; 100_000],
        vec![0xff; 5000],
    ];
    for _ in 0..200 {
        msgs.push((0..rng.below(300)).map(|_| rng.next() as u8).collect());
    }
    // One peer that books and then vanishes.
    msgs.push(br#"{"from":77,"seq":1,"ops":[{"booked":{"id":"ghost","worker_id":1001,"dp_rank":0,"seqs":[11,12,13],"prefill_tokens":48}}]}"#.to_vec());
    let n = msgs.len();
    for m in msgs {
        counts.inputs.fetch_add(1, Ordering::Relaxed);
        client
            .publish(subject.clone(), m.into())
            .await
            .map_err(|e| format!("publish: {e}"))?;
    }
    client.flush().await.map_err(|e| format!("flush: {e}"))?;
    Ok(n)
}

async fn bookings(c: &reqwest::Client, epp_http: &str) -> Option<u64> {
    let v: serde_json::Value = c
        .get(format!("{epp_http}/debug/load"))
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()?;
    Some(v["bookings"]["own"].as_u64()? + v["bookings"]["peers"].as_u64()?)
}

pub async fn run(mut a: BenchAbuseArgs) -> Result<(), String> {
    if a.quick {
        a.aborts = a.aborts.min(100);
        a.unknown_model = a.unknown_model.min(500);
        a.flood_events = a.flood_events.min(5000);
        a.slow_loris = a.slow_loris.min(4);
        a.oversized = a.oversized.min(10);
    }
    let mut rig = setup(&a)?;
    let c = client()?;
    let url = format!("http://{}/v1/chat/completions", rig.gateway);
    // Warm up (tokenizer, caches, connections), then the idle figure.
    for i in 0..10 {
        let (s, b) = post(
            &c,
            &url,
            chat(&words(&format!("w{i}"), 100), 4, false, "qwen3"),
        )
        .await?;
        if s != 200 {
            return Err(format!(
                "warm-up request failed: {s} {}",
                String::from_utf8_lossy(&b)
            ));
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle_rss = rss_mb(rig.epp_pid);
    let started = Instant::now();
    let counts = Arc::new(Counts::default());
    let stop = Arc::new(AtomicBool::new(false));
    let good = tokio::spawn(good_traffic(url.clone(), counts.clone(), stop.clone()));
    let gw = rig.gateway.clone();
    let (r_flood, sync_n, ..) = tokio::join!(
        event_flood(rig.nats_url.clone(), a.flood_events, counts.clone()),
        sync_garbage(rig.nats_url.clone(), counts.clone()),
        aborts(gw.clone(), a.aborts, counts.clone()),
        slow_loris(gw.clone(), a.slow_loris, counts.clone()),
        oversized(
            gw.clone(),
            a.oversized,
            a.max_request_body_bytes,
            counts.clone()
        ),
        unknown_model(gw.clone(), a.unknown_model, counts.clone()),
    );
    r_flood?;
    let sync_n = sync_n?;
    stop.store(true, Ordering::Relaxed);
    let _ = good.await;
    let abuse_secs = started.elapsed().as_secs_f64();
    // Every booking must drain: aborted streams at once, the vanished peer's after its
    // timeout (10 s).
    let deadline = Instant::now() + Duration::from_secs(40);
    let mut left = bookings(&c, &rig.epp_http).await.unwrap_or(u64::MAX);
    while left > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
        left = bookings(&c, &rig.epp_http).await.unwrap_or(u64::MAX);
    }
    let drain_secs = started.elapsed().as_secs_f64() - abuse_secs;
    // Still routing after all that.
    let after = post(&c, &url, chat(&words("after", 100), 4, false, "qwen3")).await;
    if !matches!(after, Ok((200, _))) {
        counts.good_failed.fetch_add(1, Ordering::Relaxed);
    }
    let rss_after = rss_mb(rig.epp_pid);
    // What the EPP saw of the hostile publishers (evidence that they reached it).
    let m = match c.get(format!("{}/metrics", rig.epp_http)).send().await {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    };
    let seen = |name: &str| -> f64 {
        m.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
            .unwrap_or(0.0)
    };
    let failures: Vec<String> = rig.procs.iter_mut().filter_map(Proc::failed).collect();
    for f in &failures {
        eprintln!("{f}");
    }
    let growth = rss_after - idle_rss;
    let j = serde_json::json!({
        "panics": failures.len(),
        "leaked_bookings": left,
        "rss_growth_mb": (growth * 10.0).round() / 10.0,
        "good_requests_failed": counts.good_failed.load(Ordering::Relaxed),
        "inputs_fuzzed": counts.inputs.load(Ordering::Relaxed),
        "good_requests": counts.good_ok.load(Ordering::Relaxed),
        "unexpected_answers": counts.unexpected.load(Ordering::Relaxed),
        "idle_rss_mb": (idle_rss * 10.0).round() / 10.0,
        "rss_bound_mb": a.rss_bound_mb,
        "aborts": a.aborts,
        "slow_loris": a.slow_loris,
        "oversized": a.oversized,
        "unknown_model": a.unknown_model,
        "flood_events": a.flood_events,
        "sync_garbage": sync_n,
        "epp_events_unknown_worker": seen("kvgate_router_events_unknown_worker_total "),
        "epp_event_decode_errors": seen("kvgate_kv_event_decode_errors_total "),
        "epp_sync_malformed": seen("kvgate_replica_sync_malformed_total "),
        "epp_streams_aborted": seen("kvgate_epp_streams_aborted_total "),
        "epp_413": seen("inference_objective_request_error_total{model_name=\"\",target_model_name=\"\",error_code=\"413\"} "),
        "abuse_seconds": (abuse_secs * 10.0).round() / 10.0,
        "drain_seconds": (drain_secs * 10.0).round() / 10.0,
    });
    if !a.json {
        println!(
            "kvgate bench abuse: Envoy -> EPP (NATS events, replica sync) -> 2 sidecars -> 2 mockers"
        );
        for k in [
            "inputs_fuzzed",
            "good_requests",
            "good_requests_failed",
            "unexpected_answers",
            "panics",
            "leaked_bookings",
            "idle_rss_mb",
            "rss_growth_mb",
            "abuse_seconds",
            "drain_seconds",
        ] {
            println!("  {k:<22} {}", j[k]);
        }
    }
    println!("{j}");
    let ok = failures.is_empty()
        && left == 0
        && counts.good_failed.load(Ordering::Relaxed) == 0
        && counts.unexpected.load(Ordering::Relaxed) == 0
        && growth <= a.rss_bound_mb;
    if ok {
        Ok(())
    } else {
        Err("abuse left damage (see the JSON above)".into())
    }
}
