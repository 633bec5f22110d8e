//! The concurrent half of `kvgate bench epp`: closed-loop load at several concurrencies through
//! the three paths of the rig (Envoy + EPP, Envoy + the do-nothing picker, Envoy direct), with
//! fresh prompts on every request so that no path profits from a cache the others fill.
//!
//! Each point (prompt shape × concurrency) runs every path twice, in opposite orders, so that
//! drift in the shared machine's load falls on all paths alike. Throughput is requests over
//! wall time; latency quantiles are over every request of the path; the EPP's CPU per request
//! comes from `/proc`, and its phase times (body streaming, parse, tokenize, decision) from its
//! own histograms.

use super::{Rig, filler, words_for};
use crate::procs::{cpu_seconds, metric_value, quantile};
use kvgate_tokenize::PromptTokenizer;
use kvgate_wire::openai::{Endpoint, OpenAiRequest};
use serde_json::json;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

/// One prompt shape at one concurrency, all three paths.
#[derive(serde::Serialize, Clone, Debug)]
pub struct LoadPoint {
    /// `2k`, `8k`, `50k`, `8k-multiturn`: the key prefix of the JSON maps.
    pub prompt: String,
    pub prompt_tokens: usize,
    pub concurrency: usize,
    pub requests_per_path: usize,
    pub epp_rps: f64,
    pub floor_rps: f64,
    pub direct_rps: f64,
    pub throughput_ratio_vs_floor: f64,
    pub epp_p50_ms: f64,
    pub epp_p99_ms: f64,
    pub floor_p50_ms: f64,
    pub floor_p99_ms: f64,
    pub direct_p50_ms: f64,
    pub direct_p99_ms: f64,
    /// EPP path minus direct path, quantile by quantile.
    pub added_p50_ms: f64,
    pub added_p99_ms: f64,
    /// The same for the do-nothing picker: the protocol's own share.
    pub floor_added_p99_ms: f64,
    pub epp_cpu_ms_per_request: f64,
    /// Means from the EPP's histograms over the EPP path's requests.
    pub body_stream_ms: f64,
    pub parse_ms: f64,
    pub tokenize_ms: f64,
    pub decision_ms: f64,
    pub errors: usize,
}

/// A job is what one client sends in order: one request, or the turns of a conversation.
type Job = Vec<Vec<u8>>;

struct PathRun {
    latencies_ms: Vec<f64>,
    wall_s: f64,
    errors: usize,
}

/// Sends every job through `url` with `concurrency` clients pulling from one queue.
async fn closed_loop(rig: &Rig, url: &str, jobs: Arc<Vec<Job>>, concurrency: usize) -> PathRun {
    let next = Arc::new(AtomicUsize::new(0));
    let errors = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency.min(jobs.len()).max(1) {
        let (jobs, next, errors) = (jobs.clone(), next.clone(), errors.clone());
        let client = rig.client.clone();
        let url = url.to_string();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(job) = jobs.get(i) else { break };
                for body in job {
                    let t = Instant::now();
                    let ok = match client
                        .post(&url)
                        .header("content-type", "application/json")
                        .body(body.clone())
                        .send()
                        .await
                    {
                        Ok(r) => {
                            let good = r.status().is_success();
                            good && r.bytes().await.is_ok()
                        }
                        Err(_) => false,
                    };
                    if ok {
                        lat.push(t.elapsed().as_secs_f64() * 1000.0);
                    } else {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            lat
        }));
    }
    let mut latencies_ms = Vec::new();
    for t in tasks {
        if let Ok(l) = t.await {
            latencies_ms.extend(l);
        }
    }
    PathRun {
        latencies_ms,
        wall_s: started.elapsed().as_secs_f64(),
        errors: errors.load(Ordering::Relaxed),
    }
}

/// Sums and counts of the EPP's phase histograms, and its CPU time.
#[derive(Clone, Copy, Default)]
struct EppCounters {
    cpu_s: f64,
    sums: [f64; 4],
    counts: [f64; 4],
}

const PHASES: [&str; 4] = [
    "kvgate_epp_request_body_seconds",
    "kvgate_epp_parse_seconds",
    "kvgate_epp_tokenize_seconds",
    "kvgate_router_decision_seconds",
];

async fn counters(rig: &Rig) -> EppCounters {
    let text = match rig.client.get(&rig.epp_metrics).send().await {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    };
    let mut c = EppCounters {
        cpu_s: cpu_seconds(rig.epp_pid).unwrap_or(f64::NAN),
        ..Default::default()
    };
    for (i, p) in PHASES.iter().enumerate() {
        c.sums[i] = metric_value(&text, &format!("{p}_sum"));
        c.counts[i] = metric_value(&text, &format!("{p}_count"));
    }
    c
}

/// Unique per request across the whole run, so that no engine cache is ever warm.
static NONCE: AtomicU64 = AtomicU64::new(1);

/// The prompt shapes: fresh single-turn prompts of each size, and multi-turn conversations.
pub struct Shapes<'a> {
    pub tok: &'a PromptTokenizer,
    pub sizes: &'a [usize],
    pub turns: usize,
}

/// Single-turn jobs for one path: the EPP path gets plain chat bodies, the others the same
/// shape with token ids (what the EPP would have added), so that the engine's work is equal.
fn single_turn_jobs(base: &str, base_ids: &[u32], n: usize, with_ids: bool) -> Vec<Job> {
    (0..n)
        .map(|_| {
            let nonce = NONCE.fetch_add(1, Ordering::Relaxed);
            let content = format!("request {nonce}: {base}");
            let doc = if with_ids {
                // A fresh prefix in the ids too: the first block never repeats.
                let mut ids = base_ids.to_vec();
                if let Some(first) = ids.first_mut() {
                    *first = 1000 + (nonce % 190_000) as u32;
                }
                if let Some(second) = ids.get_mut(1) {
                    *second = 1000 + (nonce / 190_000 % 190_000) as u32;
                }
                json!({"model": "qwen3", "messages": [{"role": "user", "content": content}],
                    "max_tokens": 1, "nvext": {"token_data": ids}})
            } else {
                json!({"model": "qwen3", "messages": [{"role": "user", "content": content}],
                    "max_tokens": 1})
            };
            vec![doc.to_string().into_bytes()]
        })
        .collect()
}

/// `n` conversations of `turns` turns around 8k tokens (a ~7k-token context, ~250-token turns);
/// every turn repeats the history. With ids, each body carries its own tokenization.
fn multi_turn_jobs(
    tok: &PromptTokenizer,
    ctx_words: usize,
    turn_words: usize,
    n: usize,
    turns: usize,
    with_ids: bool,
) -> Result<Vec<Job>, String> {
    let mut jobs = Vec::with_capacity(n);
    for _ in 0..n {
        let nonce = NONCE.fetch_add(1, Ordering::Relaxed);
        let mut msgs = vec![json!({"role": "system", "content":
            format!("conversation {nonce}: {}", filler(nonce, ctx_words))})];
        let mut job = Vec::with_capacity(turns);
        for t in 0..turns {
            msgs.push(
                json!({"role": "user", "content": filler(nonce * 131 + t as u64, turn_words)}),
            );
            let doc = json!({"model": "qwen3", "messages": msgs, "max_tokens": 1});
            let raw = doc.to_string().into_bytes();
            if with_ids {
                let parsed =
                    OpenAiRequest::parse(Endpoint::Chat, &raw).map_err(|e| e.to_string())?;
                let ids = tok.tokenize(&parsed).map_err(|e| e.to_string())?;
                job.push(parsed.body_with_token_data(&ids));
            } else {
                job.push(raw);
            }
            msgs.push(json!({"role": "assistant", "content": "Understood; continuing."}));
        }
        jobs.push(job);
    }
    Ok(jobs)
}

/// Requests per path at `concurrency`: enough for a steady state, at least `floor_n`.
fn requests_for(concurrency: usize, floor_n: usize) -> usize {
    (concurrency * 4).max(floor_n)
}

pub async fn run(
    rig: &Rig,
    shapes: &Shapes<'_>,
    concurrencies: &[usize],
    min_requests: usize,
    quiet: bool,
) -> Result<Vec<LoadPoint>, String> {
    let mut points = Vec::new();
    for &size in shapes.sizes {
        let words = words_for(shapes.tok, size)?;
        let base = filler(7_000_000 + size as u64, words);
        let parsed = OpenAiRequest::parse(
            Endpoint::Chat,
            json!({"model": "qwen3", "messages": [{"role": "user", "content": base}]})
                .to_string()
                .as_bytes(),
        )
        .map_err(|e| e.to_string())?;
        let base_ids = shapes.tok.tokenize(&parsed).map_err(|e| e.to_string())?;
        for &c in concurrencies {
            let n = requests_for(c, min_requests);
            if !quiet {
                eprintln!(
                    "bench epp: {size}-token prompts at concurrency {c} ({n} requests per path)"
                );
            }
            let make = |with_ids| single_turn_jobs(&base, &base_ids, n, with_ids);
            let label = format!("{}k", size / 1000);
            points.push(point(rig, label, base_ids.len(), c, n, make).await?);
        }
    }
    if shapes.turns >= 2 {
        let ctx_words = words_for(shapes.tok, 7000)?;
        let turn_words = words_for(shapes.tok, 250)?;
        for &c in concurrencies {
            let convs = requests_for(c, min_requests).div_ceil(shapes.turns);
            if !quiet {
                eprintln!(
                    "bench epp: multi-turn conversations at concurrency {c} ({convs} conversations of {} turns per path)",
                    shapes.turns
                );
            }
            // Bodies are built up front (outside the clock); building can fail, so collect.
            let mut built = Vec::new();
            for with_ids in [false, true, true] {
                built.push(multi_turn_jobs(
                    shapes.tok,
                    ctx_words,
                    turn_words,
                    convs,
                    shapes.turns,
                    with_ids,
                )?);
            }
            let mut it = built.into_iter();
            let make = move |_with_ids: bool| it.next().unwrap_or_default();
            let tokens = 7000 + 250 * shapes.turns;
            points.push(
                point(
                    rig,
                    "8k-multiturn".into(),
                    tokens,
                    c,
                    convs * shapes.turns,
                    make,
                )
                .await?,
            );
        }
    }
    Ok(points)
}

/// Runs the three paths twice each (EPP, floor, direct; then direct, floor, EPP). `make(false)`
/// gives the EPP path's jobs, `make(true)` the others' (called once per path and round).
async fn point(
    rig: &Rig,
    prompt: String,
    tokens: usize,
    concurrency: usize,
    n: usize,
    mut make: impl FnMut(bool) -> Vec<Job>,
) -> Result<LoadPoint, String> {
    // Each path's jobs, split into its two rounds.
    let split: Vec<[Arc<Vec<Job>>; 2]> = (0..3)
        .map(|k| {
            let mut first = make(k != 0);
            let second = first.split_off(first.len() / 2);
            [Arc::new(first), Arc::new(second)]
        })
        .collect();
    let urls = [&rig.gateway, &rig.floor, &rig.direct];
    let mut runs: [Vec<PathRun>; 3] = Default::default();
    let mut epp_delta = EppCounters::default();
    for (round, order) in [[0usize, 1, 2], [2, 1, 0]].iter().enumerate() {
        for &path in order {
            let c0 = if path == 0 {
                counters(rig).await
            } else {
                EppCounters::default()
            };
            let r = closed_loop(rig, urls[path], split[path][round].clone(), concurrency).await;
            if path == 0 {
                let c1 = counters(rig).await;
                epp_delta.cpu_s += c1.cpu_s - c0.cpu_s;
                for i in 0..PHASES.len() {
                    epp_delta.sums[i] += c1.sums[i] - c0.sums[i];
                    epp_delta.counts[i] += c1.counts[i] - c0.counts[i];
                }
            }
            runs[path].push(r);
        }
    }
    let merge = |rs: &[PathRun]| {
        let lat: Vec<f64> = rs.iter().flat_map(|r| r.latencies_ms.clone()).collect();
        let wall: f64 = rs.iter().map(|r| r.wall_s).sum();
        let errors: usize = rs.iter().map(|r| r.errors).sum();
        let rps = lat.len() as f64 / wall.max(1e-9);
        (lat, rps, errors)
    };
    let (epp, epp_rps, e0) = merge(&runs[0]);
    let (floor, floor_rps, e1) = merge(&runs[1]);
    let (direct, direct_rps, e2) = merge(&runs[2]);
    let mean_ms = |i: usize| {
        if epp_delta.counts[i] > 0.0 {
            epp_delta.sums[i] / epp_delta.counts[i] * 1000.0
        } else {
            f64::NAN
        }
    };
    let q = quantile;
    Ok(LoadPoint {
        prompt,
        prompt_tokens: tokens,
        concurrency,
        requests_per_path: n,
        epp_rps,
        floor_rps,
        direct_rps,
        throughput_ratio_vs_floor: epp_rps / floor_rps.max(1e-9),
        epp_p50_ms: q(&epp, 0.5),
        epp_p99_ms: q(&epp, 0.99),
        floor_p50_ms: q(&floor, 0.5),
        floor_p99_ms: q(&floor, 0.99),
        direct_p50_ms: q(&direct, 0.5),
        direct_p99_ms: q(&direct, 0.99),
        added_p50_ms: q(&epp, 0.5) - q(&direct, 0.5),
        added_p99_ms: q(&epp, 0.99) - q(&direct, 0.99),
        floor_added_p99_ms: q(&floor, 0.99) - q(&direct, 0.99),
        epp_cpu_ms_per_request: epp_delta.cpu_s * 1000.0 / epp.len().max(1) as f64,
        body_stream_ms: mean_ms(0),
        parse_ms: mean_ms(1),
        tokenize_ms: mean_ms(2),
        decision_ms: mean_ms(3),
        errors: e0 + e1 + e2,
    })
}

/// The table of the concurrent phases.
pub fn table(points: &[LoadPoint]) -> String {
    let mut out = format!(
        "{:<14} {:>5} {:>8} {:>8} {:>8} {:>6} {:>9} {:>9} {:>9} {:>8} {:>7} {:>7} {:>7} {:>7} {:>4}\n",
        "prompt",
        "conc",
        "epp r/s",
        "floor",
        "direct",
        "ratio",
        "added p50",
        "added p99",
        "floor p99",
        "cpu/req",
        "body",
        "parse",
        "tok",
        "decide",
        "err"
    );
    for p in points {
        let ms = |v: f64| format!("{v:.2}");
        out.push_str(&format!(
            "{:<14} {:>5} {:>8.1} {:>8.1} {:>8.1} {:>6.2} {:>9} {:>9} {:>9} {:>8} {:>7} {:>7} {:>7} {:>7} {:>4}\n",
            p.prompt,
            p.concurrency,
            p.epp_rps,
            p.floor_rps,
            p.direct_rps,
            p.throughput_ratio_vs_floor,
            ms(p.added_p50_ms),
            ms(p.added_p99_ms),
            ms(p.floor_added_p99_ms),
            ms(p.epp_cpu_ms_per_request),
            ms(p.body_stream_ms),
            ms(p.parse_ms),
            ms(p.tokenize_ms),
            ms(p.decision_ms),
            p.errors
        ));
    }
    out.push_str("ratio: Envoy+EPP req/s over Envoy+do-nothing-picker req/s; added: EPP path minus direct path (ms); floor p99: the picker's added p99; body/parse/tok/decide: the EPP's mean phase times (ms), body = request headers to last body byte.\n");
    out
}
