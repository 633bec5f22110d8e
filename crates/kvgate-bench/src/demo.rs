//! `kvgate demo`: mock workers, a router, a workload, results.
//!
//! Starts `--workers` mockers and a frontend in this process, replays multi-turn conversations
//! from a Mooncake-format trace (an embedded sample by default) once through round-robin and
//! once through the KV router, on fresh caches each time, and prints what each achieved: prefix
//! hit rate (from the workers' own `cached_tokens`), TTFT p50/p90, end-to-end p50 and throughput.

use futures::StreamExt;
use kvgate_core::config::RouterConfig;
use kvgate_engine::{EngineConfig, TimingModel};
use kvgate_frontend::{FrontendConfig, RouterMode};
use kvgate_mocker::MockerConfig;
use serde::Deserialize;
use std::collections::HashMap;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

const EMBEDDED: &str = include_str!("../data/demo_conversations.jsonl");

#[derive(clap::Args, Debug, Clone)]
pub struct DemoArgs {
    /// Mock workers to start.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=32))]
    pub workers: u32,
    /// A Mooncake-format trace to sample conversations from (default: the embedded sample).
    #[arg(long)]
    pub trace: Option<PathBuf>,
    /// Conversations to replay (each has 3+ requests in the trace).
    #[arg(long, default_value_t = 50)]
    pub conversations: usize,
    /// Replay the whole workload within this many seconds (arrival order and gaps kept, scaled).
    #[arg(long, default_value_t = 20.0)]
    pub duration_secs: f64,
    /// Tokens per trace block (the trace's blocks are 512 tokens; smaller keeps the demo fast).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(16..=512))]
    pub tokens_per_trace_block: u32,
    /// Cap on output tokens per request.
    #[arg(long, default_value_t = 48)]
    pub max_output_tokens: u32,
    /// KV cache capacity of each mock worker, in 16-token blocks.
    #[arg(long, default_value_t = 2048)]
    pub kv_blocks: usize,
    /// Mock workers run this many times faster than the timing model.
    #[arg(long, default_value_t = 2.0)]
    pub speedup_ratio: f64,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Deserialize)]
struct TraceRow {
    timestamp: f64,
    input_length: u64,
    output_length: u64,
    hash_ids: Vec<u64>,
}

pub(crate) struct DemoRequest {
    pub(crate) at: Duration,
    pub(crate) prompt: Vec<u32>,
    pub(crate) max_tokens: u32,
}

/// The demo's sampling rule (see data/README.md): group by the second block id, keep groups of
/// 3+ requests, take the first `n` groups by first appearance with all their requests.
fn sample(rows: Vec<TraceRow>, n: usize) -> Vec<TraceRow> {
    let mut groups: HashMap<u64, Vec<usize>> = HashMap::new();
    for (i, r) in rows.iter().enumerate() {
        if let Some(&k) = r.hash_ids.get(1) {
            groups.entry(k).or_default().push(i);
        }
    }
    let mut multi: Vec<&Vec<usize>> = groups.values().filter(|v| v.len() >= 3).collect();
    multi.sort_by_key(|v| v[0]);
    let mut keep: Vec<usize> = multi.into_iter().take(n).flatten().copied().collect();
    keep.sort_unstable();
    let mut rows: Vec<Option<TraceRow>> = rows.into_iter().map(Some).collect();
    keep.into_iter().filter_map(|i| rows[i].take()).collect()
}

/// Token ids for trace block `id`: the same id always expands to the same tokens.
fn block_tokens(id: u64, n: usize) -> impl Iterator<Item = u32> {
    (0..n as u64).map(move |j| {
        let mut z = id.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ j.wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z ^= z >> 31;
        z = z.wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z >> 33) % 100_000) as u32 + 1_000
    })
}

pub(crate) fn workload(args: &DemoArgs) -> Result<(Vec<DemoRequest>, f64), String> {
    let text = match &args.trace {
        Some(p) => {
            std::fs::read_to_string(p).map_err(|e| format!("cannot read {}: {e}", p.display()))?
        }
        None => EMBEDDED.to_string(),
    };
    let rows = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str::<TraceRow>(l).map_err(|e| format!("trace line {}: {e}", i + 1))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let rows = sample(rows, args.conversations);
    if rows.is_empty() {
        return Err("the trace has no conversation with 3 or more requests".into());
    }
    let (t0, t1) = (rows[0].timestamp, rows[rows.len() - 1].timestamp);
    let scale = if t1 > t0 {
        args.duration_secs / ((t1 - t0) / 1000.0)
    } else {
        1.0
    };
    let per_block = args.tokens_per_trace_block as usize;
    // Reuse bound of the workload itself (infinite cache), in tokens.
    let mut seen = std::collections::HashSet::new();
    let (mut hit, mut total) = (0u64, 0u64);
    let reqs = rows
        .iter()
        .map(|r| {
            let len = (r.input_length as usize * per_block).div_ceil(512).max(1);
            let mut prompt = Vec::with_capacity(len);
            for &h in &r.hash_ids {
                let take = per_block.min(len - prompt.len());
                prompt.extend(block_tokens(h, take));
                total += take as u64;
                if !seen.insert(h) {
                    hit += take as u64;
                }
                if prompt.len() >= len {
                    break;
                }
            }
            DemoRequest {
                at: Duration::from_secs_f64((r.timestamp - t0) / 1000.0 * scale),
                prompt,
                max_tokens: (r.output_length / 8).clamp(1, u64::from(args.max_output_tokens))
                    as u32,
            }
        })
        .collect();
    Ok((reqs, hit as f64 / total.max(1) as f64))
}

#[derive(Default, Clone)]
pub(crate) struct Outcome {
    pub(crate) ttft: Vec<f64>,
    pub(crate) e2e: Vec<f64>,
    pub(crate) prompt_tokens: u64,
    pub(crate) cached_tokens: u64,
    pub(crate) output_tokens: u64,
    pub(crate) errors: usize,
    pub(crate) wall: f64,
}

pub(crate) fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

async fn start_mocker(id: u64, args: &DemoArgs) -> Result<(SocketAddr, String), String> {
    let config = MockerConfig {
        port: 0,
        worker_id: id,
        engine: EngineConfig {
            block_size: 16,
            num_gpu_blocks: args.kv_blocks,
            max_num_seqs: 64,
            max_num_batched_tokens: 8192,
            enable_prefix_caching: true,
            timing: TimingModel::default(),
        },
        speedup_ratio: args.speedup_ratio,
        zmq_kv_events: Some("tcp://127.0.0.1:0".into()),
        ..MockerConfig::default()
    };
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let r = kvgate_mocker::serve(config, move |addr, zmq, _| {
            let _ = tx.send((addr, zmq.into_iter().next().unwrap_or_default()));
        })
        .await;
        if let Err(e) = r {
            eprintln!("mocker {id}: {e}");
        }
    });
    rx.await
        .map_err(|_| format!("mock worker {id} did not start"))
}

async fn start_frontend(workers: PathBuf, mode: RouterMode) -> Result<SocketAddr, String> {
    let config = FrontendConfig {
        host: "127.0.0.1".into(),
        port: 0,
        workers_file: workers,
        mode,
        router: RouterConfig::default(),
        tokenizer: None,
        max_body_bytes: 64 << 20,
        accept_token_data: true,
        request_timeout: Duration::from_secs(120),
        event_plane: kvgate_runtime::routing::EventPlane::Zmq,
        replica_sync: None,
    };
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        if let Err(e) = kvgate_frontend::serve(config, move |addr| {
            let _ = tx.send(addr);
        })
        .await
        {
            eprintln!("frontend: {e}");
        }
    });
    rx.await
        .map_err(|_| "the frontend did not start".to_string())
}

/// A progress bar on a terminal; elsewhere (logs, CI) one line when a run completes.
pub(crate) fn progress(label: &str, done: usize, total: usize) {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        if done == total {
            eprintln!("  {label:<12} {done}/{total} requests done");
        }
        return;
    }
    let width = 30;
    let filled = done * width / total.max(1);
    eprint!(
        "\r  {label:<12} [{}{}] {done}/{total}",
        "#".repeat(filled),
        " ".repeat(width - filled)
    );
    if done == total {
        eprintln!();
    }
    let _ = std::io::stderr().flush();
}

pub(crate) async fn one(
    client: &reqwest::Client,
    url: &str,
    r: &DemoRequest,
    out: &tokio::sync::Mutex<Outcome>,
) {
    let body = serde_json::json!({
        "model": "qwen3", "prompt": r.prompt, "max_tokens": r.max_tokens,
        "stream": true, "stream_options": {"include_usage": true},
    });
    let start = Instant::now();
    let resp = match client
        .post(format!("{url}/v1/completions"))
        .json(&body)
        .send()
        .await
    {
        Ok(r) if r.status().is_success() => r,
        _ => {
            out.lock().await.errors += 1;
            return;
        }
    };
    let mut stream = resp.bytes_stream();
    let mut ttft = None;
    let mut buf = Vec::new();
    let mut usage = None;
    while let Some(Ok(chunk)) = stream.next().await {
        if ttft.is_none() {
            ttft = Some(start.elapsed().as_secs_f64());
        }
        buf.extend_from_slice(&chunk);
        while let Some(pos) = buf.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = buf.drain(..pos + 2).collect();
            let line = String::from_utf8_lossy(&event);
            let data = line.trim().trim_start_matches("data: ");
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(data)
                && v.get("usage").is_some_and(|u| !u.is_null())
            {
                usage = Some(v["usage"].clone());
            }
        }
    }
    let mut o = out.lock().await;
    match (ttft, usage) {
        (Some(t), Some(u)) => {
            o.ttft.push(t * 1000.0);
            o.e2e.push(start.elapsed().as_secs_f64() * 1000.0);
            o.prompt_tokens += u["prompt_tokens"].as_u64().unwrap_or(0);
            o.output_tokens += u["completion_tokens"].as_u64().unwrap_or(0);
            o.cached_tokens +=
                kvgate_wire::response::cached_tokens(&serde_json::json!({ "usage": u }))
                    .unwrap_or(0);
        }
        _ => o.errors += 1,
    }
}

pub(crate) async fn run_policy(
    args: &DemoArgs,
    reqs: &Arc<Vec<DemoRequest>>,
    mode: RouterMode,
    dir: &std::path::Path,
) -> Result<Outcome, String> {
    let mut yaml = String::from("model: qwen3\nblock_size: 16\nworkers:\n");
    for i in 0..args.workers {
        let id = 1000 + u64::from(i);
        let (addr, zmq) = start_mocker(id, args).await?;
        yaml.push_str(&format!(
            "  - name: mock-{i}\n    id: {id}\n    url: http://{addr}\n    total_kv_blocks: {}\n    max_num_batched_tokens: 8192\n    kv_events: {zmq}\n",
            args.kv_blocks
        ));
    }
    let wf = dir.join(format!("workers-{}.yaml", mode.as_str()));
    std::fs::write(&wf, yaml).map_err(|e| e.to_string())?;
    let fe = start_frontend(wf, mode).await?;
    let url = format!("http://{fe}");
    // Let the router's event subscriptions connect before traffic starts.
    tokio::time::sleep(Duration::from_millis(500)).await;
    replay(&url, reqs, mode.as_str(), true).await
}

/// Sends every request to `url` at its arrival time (open loop), showing progress under
/// `label` when `show`, and gathers the outcome.
pub(crate) async fn replay(
    url: &str,
    reqs: &Arc<Vec<DemoRequest>>,
    label: &str,
    show: bool,
) -> Result<Outcome, String> {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .build()
        .map_err(|e| e.to_string())?;
    let out = Arc::new(tokio::sync::Mutex::new(Outcome::default()));
    let done = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..reqs.len() {
        let (reqs, out, done, client, url) = (
            reqs.clone(),
            out.clone(),
            done.clone(),
            client.clone(),
            url.to_string(),
        );
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep_until(tokio::time::Instant::from_std(start + reqs[i].at)).await;
            one(&client, &url, &reqs[i], &out).await;
            done.fetch_add(1, Ordering::Relaxed);
        }));
    }
    let mut shown = usize::MAX;
    while done.load(Ordering::Relaxed) < reqs.len() {
        let now = done.load(Ordering::Relaxed);
        if now != shown && show {
            progress(label, now, reqs.len());
            shown = now;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    if show {
        progress(label, reqs.len(), reqs.len());
    }
    for t in tasks {
        let _ = t.await;
    }
    let mut o = out.lock().await.clone();
    o.wall = start.elapsed().as_secs_f64();
    Ok(o)
}

pub async fn run(args: DemoArgs) -> Result<(), String> {
    if !(args.speedup_ratio.is_finite() && args.speedup_ratio > 0.0) {
        return Err("--speedup-ratio must be > 0".into());
    }
    let (reqs, bound) = workload(&args)?;
    let reqs = Arc::new(reqs);
    let dir = std::env::temp_dir().join(format!("kvgate-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let avg_prompt = reqs.iter().map(|r| r.prompt.len()).sum::<usize>() / reqs.len().max(1);
    eprintln!(
        "kvgate demo: {} mock workers, {} requests from multi-turn conversations (avg prompt {avg_prompt} tokens), replayed over ~{:.0}s per policy",
        args.workers,
        reqs.len(),
        args.duration_secs
    );
    let mut results = Vec::new();
    for mode in [RouterMode::RoundRobin, RouterMode::Kv] {
        let o = run_policy(&args, &reqs, mode, &dir).await?;
        results.push((mode, o));
    }
    let _ = std::fs::remove_dir_all(&dir);
    let rows: Vec<serde_json::Value> = results
        .iter_mut()
        .map(|(mode, o)| {
            serde_json::json!({
                "policy": mode.as_str(),
                "requests": o.ttft.len(),
                "errors": o.errors,
                "hit_rate": o.cached_tokens as f64 / o.prompt_tokens.max(1) as f64,
                "ttft_p50_ms": pct(&mut o.ttft, 0.5),
                "ttft_p90_ms": pct(&mut o.ttft, 0.9),
                "e2e_p50_ms": pct(&mut o.e2e, 0.5),
                "throughput_tok_s": (o.prompt_tokens + o.output_tokens) as f64 / o.wall.max(1e-9),
            })
        })
        .collect();
    if args.json {
        println!(
            "{}",
            serde_json::json!({"policies": rows, "reuse_bound": bound})
        );
        return Ok(());
    }
    println!();
    println!(
        "{:<12} {:>8} {:>7} {:>9} {:>11} {:>11} {:>11} {:>12}",
        "policy", "requests", "errors", "hit rate", "TTFT p50", "TTFT p90", "e2e p50", "tokens/s"
    );
    for r in &rows {
        println!(
            "{:<12} {:>8} {:>7} {:>8.1}% {:>9.1}ms {:>9.1}ms {:>9.1}ms {:>12.0}",
            r["policy"].as_str().unwrap_or(""),
            r["requests"].as_u64().unwrap_or(0),
            r["errors"].as_u64().unwrap_or(0),
            r["hit_rate"].as_f64().unwrap_or(0.0) * 100.0,
            r["ttft_p50_ms"].as_f64().unwrap_or(f64::NAN),
            r["ttft_p90_ms"].as_f64().unwrap_or(f64::NAN),
            r["e2e_p50_ms"].as_f64().unwrap_or(f64::NAN),
            r["throughput_tok_s"].as_f64().unwrap_or(0.0),
        );
    }
    println!(
        "\nreuse bound of this workload (infinite cache): {:.1}% of prompt tokens. Hit rates are the workers' own\n\
         usage.prompt_tokens_details.cached_tokens; times are simulated engine time / speed-up {}.",
        bound * 100.0,
        args.speedup_ratio
    );
    Ok(())
}
