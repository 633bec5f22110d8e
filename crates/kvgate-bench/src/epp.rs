//! `kvgate bench epp`: what the EPP adds to a request, measured side by side in one run.
//!
//! Starts a mocker (near-zero simulated compute), its direct-mode sidecar, `kvgate epp`, and two
//! real Envoys: the GAIE gateway (ext_proc to the EPP, then to the sidecar) and a plain one that
//! routes straight to the same sidecar. The same request mix is sent through both, alternating
//! request by request, at several prompt sizes and as multi-turn conversations. The direct
//! requests carry the token ids already (as the EPP would add them), so both paths give the
//! engine identical work and the difference is the EPP: body buffering, parse, tokenize, route,
//! rewrite and the extra ext_proc round trips.

mod load;

pub use load::LoadPoint;

use crate::procs::{DIRECT, Proc, TempDir, cpu_seconds, metric_value, quantile, start_envoy};
use kvgate_tokenize::PromptTokenizer;
use kvgate_wire::openai::{Endpoint, OpenAiRequest};
use serde_json::json;
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(clap::Args, Debug, Clone)]
pub struct BenchEppArgs {
    /// The Envoy binary (scripts/setup.sh installs one into .tools/bin/envoy).
    #[arg(long, env = "KVGATE_ENVOY", default_value = ".tools/bin/envoy")]
    pub envoy: PathBuf,
    /// Prompt sizes in tokens (single-turn phases).
    #[arg(long, value_delimiter = ',', default_value = "2000,8000,50000")]
    pub sizes: Vec<usize>,
    /// Requests per path and phase.
    #[arg(long, default_value_t = 50)]
    pub requests: usize,
    /// Multi-turn phase: conversations of this many turns around 8k tokens (0 = skip).
    #[arg(long, default_value_t = 6)]
    pub turns: usize,
    /// Conversations per path in the multi-turn phase.
    #[arg(long, default_value_t = 10)]
    pub conversations: usize,
    /// Concurrent phases: closed-loop clients at each of these concurrencies (0 = skip them).
    #[arg(long, value_delimiter = ',', default_value = "1,16,64,256")]
    pub concurrency: Vec<usize>,
    /// Prompt sizes of the concurrent single-turn phases (the multi-turn shape is added when
    /// `--turns` >= 2).
    #[arg(long, value_delimiter = ',', default_value = "2000,8000,50000")]
    pub load_sizes: Vec<usize>,
    /// Fewest requests per path at each concurrent point (at least 4 × the concurrency).
    #[arg(long, default_value_t = 240)]
    pub load_requests: usize,
    /// Skip the sequential phases (only the concurrent ones).
    #[arg(long)]
    pub no_sequential: bool,
    /// Plaintext h2c between Envoy and the EPP instead of TLS (the EPP's default).
    #[arg(long)]
    pub plaintext: bool,
    /// Print one JSON object as the last line instead of the tables:
    /// `{"throughput_ratio_vs_floor": {"<prompt>@<concurrency>": r}, "added_p99_ms": {...},
    /// "phases": [...], "load": [...]}`.
    #[arg(long)]
    pub json: bool,
}

/// The do-nothing ext_proc picker (`kvgate bench echo-picker`, hidden): every request goes to
/// `--destination`, with the body held and re-emitted as the EPP does. Its cost is the floor of
/// the ext_proc protocol itself.
#[derive(clap::Args, Debug, Clone)]
pub struct EchoPickerArgs {
    #[arg(long)]
    pub destination: String,
    #[arg(long)]
    pub worker_id: u64,
    #[arg(long)]
    pub plaintext: bool,
}

pub async fn run_echo_picker(a: EchoPickerArgs) -> Result<(), String> {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| e.to_string())?;
    println!(
        "kvgate echo picker on grpc://{}",
        l.local_addr().map_err(|e| e.to_string())?
    );
    kvgate_epp::echo::serve(l, a.destination, a.worker_id, !a.plaintext).await
}

/// Deterministic filler text: `words` pseudo-random words from a small vocabulary.
fn filler(seed: u64, words: usize) -> String {
    const VOCAB: &[&str] = &[
        "cache", "router", "token", "prefix", "worker", "latency", "gateway", "block", "model",
        "request", "stream", "decode", "prefill", "batch", "memory", "kernel", "tensor", "queue",
        "policy", "replica", "shard", "index", "event", "score", "budget", "signal", "vector",
        "matrix", "layer", "weight", "network", "packet",
    ];
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = String::with_capacity(words * 8);
    for i in 0..words {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.push_str(VOCAB[(x % VOCAB.len() as u64) as usize]);
        out.push(if i % 17 == 16 { '.' } else { ' ' });
    }
    out
}

#[derive(serde::Serialize)]
struct Phase {
    name: String,
    prompt_tokens: usize,
    requests: usize,
    tokenize_p50_ms: f64,
    direct_p50_ms: f64,
    direct_p99_ms: f64,
    epp_p50_ms: f64,
    epp_p99_ms: f64,
    added_p50_ms: f64,
    added_p99_ms: f64,
    /// The same pairs through Envoy + a do-nothing picker: what the ext_proc protocol costs.
    protocol_p50_ms: f64,
    protocol_p99_ms: f64,
    epp_processing_mean_ms: f64,
    epp_tokenize_mean_ms: f64,
    epp_cpu_ms_per_request: f64,
    target_ms: f64,
    meets_target: bool,
}

struct Rig {
    _procs: Vec<Proc>,
    epp_pid: u32,
    epp_metrics: String,
    gateway: String,
    direct: String,
    /// Envoy + the do-nothing picker: the protocol's own cost.
    floor: String,
    client: reqwest::Client,
    _dir: TempDir,
}

fn setup(args: &BenchEppArgs) -> Result<Rig, String> {
    if !args.envoy.exists() {
        return Err(format!(
            "Envoy not found at {} (run scripts/setup.sh, or pass --envoy / KVGATE_ENVOY)",
            args.envoy.display()
        ));
    }
    let dir = TempDir::new("bench-epp")?;
    let mocker = Proc::kvgate(
        &[
            "mocker",
            "--port",
            "0",
            "--block-size",
            "16",
            "--num-gpu-blocks",
            "65536",
            "--worker-id",
            "1001",
            "--speedup-ratio",
            "100000",
        ],
        1,
        None,
    )?;
    let murl = mocker.addr("http://")?;
    let side_file = dir.path().join("sidecar.yaml");
    std::fs::write(
        &side_file,
        format!("model: qwen3\nblock_size: 16\nworkers:\n  - {{name: pod-0, id: 1001, url: 'http://{murl}'}}\n"),
    )
    .map_err(|e| e.to_string())?;
    let side_path = side_file.to_string_lossy().to_string();
    let sidecar = Proc::kvgate(
        &[
            "frontend",
            "--port",
            "0",
            "--workers",
            &side_path,
            "--router-mode",
            "direct",
        ],
        1,
        None,
    )?;
    let surl = sidecar.addr("http://")?;
    let epp_file = dir.path().join("epp.yaml");
    std::fs::write(
        &epp_file,
        format!("model: qwen3\nblock_size: 16\nworkers:\n  - {{name: pod-0, id: 1001, url: 'http://{surl}', total_kv_blocks: 65536}}\n"),
    )
    .map_err(|e| e.to_string())?;
    let epp_path = epp_file.to_string_lossy().to_string();
    let mut epp_args = crate::procs::epp_args(&epp_path);
    if args.plaintext {
        epp_args.push("--secure-serving=false");
    }
    let epp = Proc::kvgate(&epp_args, 3, None)?;
    let grpc = epp.addr("grpc://")?;
    let epp_metrics = format!("http://{}/metrics", epp.addr("http://")?);
    let (sh, sp) = surl.rsplit_once(':').ok_or("bad sidecar address")?;
    let (gw, gw_port) =
        crate::procs::start_gateway(&args.envoy, !args.plaintext, &grpc, dir.path(), "gateway")?;
    let (direct, direct_port) = start_envoy(
        &args.envoy,
        DIRECT,
        &[
            ("UPSTREAM_HOST", sh.to_string()),
            ("UPSTREAM_PORT", sp.to_string()),
            ("WORKER_ID", "1001".to_string()),
        ],
        dir.path(),
        "direct",
        1,
    )?;
    let mut echo_args = vec![
        "bench",
        "echo-picker",
        "--destination",
        &surl,
        "--worker-id",
        "1001",
    ];
    if args.plaintext {
        echo_args.push("--plaintext");
    }
    let echo = Proc::kvgate(&echo_args, 1, None)?;
    let echo_addr = echo.addr("grpc://")?;
    let (floor, floor_port) = crate::procs::start_gateway(
        &args.envoy,
        !args.plaintext,
        &echo_addr,
        dir.path(),
        "floor",
    )?;
    let epp_pid = epp.pid();
    Ok(Rig {
        floor: format!("http://127.0.0.1:{floor_port}/v1/chat/completions"),
        _procs: vec![floor, echo, direct, gw, epp, sidecar, mocker],
        epp_pid,
        epp_metrics,
        gateway: format!("http://127.0.0.1:{gw_port}/v1/chat/completions"),
        direct: format!("http://127.0.0.1:{direct_port}/v1/chat/completions"),
        client: reqwest::Client::builder()
            .timeout(Duration::from_secs(120))
            .build()
            .map_err(|e| e.to_string())?,
        _dir: dir,
    })
}

impl Rig {
    async fn send(&self, url: &str, body: &[u8]) -> Result<f64, String> {
        let t = Instant::now();
        let r = self
            .client
            .post(url)
            .header("content-type", "application/json")
            .body(body.to_vec())
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let status = r.status();
        let bytes = r.bytes().await.map_err(|e| e.to_string())?;
        if !status.is_success() {
            return Err(format!(
                "{url}: {status}: {}",
                String::from_utf8_lossy(&bytes)
            ));
        }
        Ok(t.elapsed().as_secs_f64() * 1000.0)
    }

    async fn epp_snapshot(&self) -> (f64, f64, f64, f64, f64) {
        let text = match self.client.get(&self.epp_metrics).send().await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        (
            cpu_seconds(self.epp_pid).unwrap_or(f64::NAN),
            metric_value(&text, "kvgate_epp_request_processing_seconds_sum"),
            metric_value(&text, "kvgate_epp_request_processing_seconds_count"),
            metric_value(&text, "kvgate_epp_tokenize_seconds_sum"),
            metric_value(&text, "kvgate_epp_tokenize_seconds_count"),
        )
    }
}

/// A chat body as the client sends it, and the same body with the EPP's token ids (what the
/// direct path sends, so that the engine does the same work on both paths).
fn bodies(
    tok: &PromptTokenizer,
    messages: serde_json::Value,
) -> Result<(Vec<u8>, Vec<u8>, usize, f64), String> {
    let body = json!({"model": "qwen3", "messages": messages, "max_tokens": 1});
    let raw = body.to_string().into_bytes();
    let parsed = OpenAiRequest::parse(Endpoint::Chat, &raw).map_err(|e| e.to_string())?;
    let tokens = tok.tokenize(&parsed).map_err(|e| e.to_string())?;
    // The reference: the rendered prompt encoded by the tokenizer library on one core.
    let text = tok.render(&parsed).map_err(|e| e.to_string())?;
    let t = Instant::now();
    let n = tiktoken_rs::o200k_base_singleton()
        .encode_with_special_tokens(&text)
        .len();
    let ms = t.elapsed().as_secs_f64() * 1000.0;
    if n != tokens.len() {
        return Err(format!(
            "tokenizer disagreement: {n} vs {} tokens",
            tokens.len()
        ));
    }
    let with_ids = parsed.body_with_token_data(&tokens);
    Ok((raw, with_ids, tokens.len(), ms))
}

fn words_for(tok: &PromptTokenizer, tokens: usize) -> Result<usize, String> {
    let sample = filler(1, 2000);
    let (_, _, n, _) = bodies(tok, json!([{"role": "user", "content": sample}]))?;
    Ok((tokens as f64 * 2000.0 / n as f64).round() as usize)
}

async fn measure(
    rig: &Rig,
    name: String,
    pairs: Vec<(Vec<u8>, Vec<u8>, Vec<u8>)>,
    tokens: usize,
    tokenize_ms: Vec<f64>,
    target: Option<f64>,
) -> Result<Phase, String> {
    let (cpu0, sum0, n0, tsum0, tn0) = rig.epp_snapshot().await;
    let (mut direct, mut epp, mut floor) = (Vec::new(), Vec::new(), Vec::new());
    for (i, (for_epp, for_direct, for_floor)) in pairs.iter().enumerate() {
        // Rotate which path goes first so that none always follows another.
        for k in 0..3 {
            match (i + k) % 3 {
                0 => epp.push(rig.send(&rig.gateway, for_epp).await?),
                1 => direct.push(rig.send(&rig.direct, for_direct).await?),
                _ => floor.push(rig.send(&rig.floor, for_floor).await?),
            }
        }
    }
    let (cpu1, sum1, n1, tsum1, tn1) = rig.epp_snapshot().await;
    let n = pairs.len();
    let tokenize_p50 = quantile(&tokenize_ms, 0.5);
    // Added latency per pair (the two requests of a pair are sent back to back, so drift in
    // the machine's load cancels out), then its quantiles.
    let added: Vec<f64> = epp.iter().zip(&direct).map(|(e, d)| e - d).collect();
    let protocol: Vec<f64> = floor.iter().zip(&direct).map(|(f, d)| f - d).collect();
    let added_p99 = quantile(&added, 0.99);
    let protocol_p99 = quantile(&protocol, 0.99);
    // The EPP may add what the protocol itself costs (the floor), plus tokenizing, plus 1 ms.
    let target_ms = protocol_p99.max(0.0) + target.unwrap_or(tokenize_p50 + 1.0);
    Ok(Phase {
        name,
        prompt_tokens: tokens,
        requests: n,
        tokenize_p50_ms: tokenize_p50,
        direct_p50_ms: quantile(&direct, 0.5),
        direct_p99_ms: quantile(&direct, 0.99),
        epp_p50_ms: quantile(&epp, 0.5),
        epp_p99_ms: quantile(&epp, 0.99),
        added_p50_ms: quantile(&added, 0.5),
        protocol_p50_ms: quantile(&protocol, 0.5),
        protocol_p99_ms: protocol_p99,
        added_p99_ms: added_p99,
        epp_processing_mean_ms: if n1 > n0 {
            (sum1 - sum0) / (n1 - n0) * 1000.0
        } else {
            f64::NAN
        },
        epp_tokenize_mean_ms: if tn1 > tn0 {
            (tsum1 - tsum0) / (tn1 - tn0) * 1000.0
        } else {
            f64::NAN
        },
        epp_cpu_ms_per_request: (cpu1 - cpu0) * 1000.0 / n as f64,
        target_ms,
        meets_target: added_p99 <= target_ms,
    })
}

pub async fn run(args: BenchEppArgs) -> Result<(), String> {
    let tok = PromptTokenizer::embedded().map_err(|e| e.to_string())?;
    let rig = tokio::task::block_in_place(|| setup(&args))?;
    let mut phases = Vec::new();
    // Warm-up: connections, TLS, first-use allocations.
    for i in 0..5 {
        let (a, b, _, _) = bodies(
            &tok,
            json!([{"role": "user", "content": filler(10_000 + i, 200)}]),
        )?;
        rig.send(&rig.gateway, &a).await?;
        rig.send(&rig.direct, &b).await?;
    }
    let mut seed = 1u64;
    let sequential_sizes: &[usize] = if args.no_sequential { &[] } else { &args.sizes };
    for &size in sequential_sizes {
        let words = words_for(&tok, size)?;
        let mut pairs = Vec::new();
        let mut tokenize_ms = Vec::new();
        let mut tokens = 0;
        for _ in 0..args.requests {
            // Fresh prompts for each path: no path profits from another's cache. The direct
            // and protocol-floor paths send the token ids the EPP would have added.
            let (a, _, n, ms) = bodies(
                &tok,
                json!([{"role": "user", "content": filler(seed, words)}]),
            )?;
            let (_, b, _, _) = bodies(
                &tok,
                json!([{"role": "user", "content": filler(seed + 1, words)}]),
            )?;
            let (_, c, _, _) = bodies(
                &tok,
                json!([{"role": "user", "content": filler(seed + 2, words)}]),
            )?;
            seed += 3;
            pairs.push((a, b, c));
            tokenize_ms.push(ms);
            tokens = n;
        }
        if !args.json {
            eprintln!(
                "bench epp: {size}-token prompts ({} requests per path)",
                args.requests
            );
        }
        phases.push(
            measure(
                &rig,
                format!("{}k single-turn", size / 1000),
                pairs,
                tokens,
                tokenize_ms,
                None,
            )
            .await?,
        );
    }
    if !args.no_sequential {
        // Tokens in: the client sends the ids itself (`nvext.token_data`), so the EPP routes
        // on them without tokenizing. Budget: the floor + 1 ms.
        let words = words_for(&tok, 8000)?;
        let mut pairs = Vec::new();
        let mut tokenize_ms = Vec::new();
        let mut tokens = 0;
        for _ in 0..args.requests {
            let ids_for =
                |s: u64| bodies(&tok, json!([{"role": "user", "content": filler(s, words)}]));
            let (_, a, n, ms) = ids_for(seed)?;
            let (_, b, _, _) = ids_for(seed + 1)?;
            let (_, c, _, _) = ids_for(seed + 2)?;
            seed += 3;
            pairs.push((a, b, c));
            tokenize_ms.push(ms);
            tokens = n;
        }
        if !args.json {
            eprintln!("bench epp: 8k-token prompts sent as token ids (tokens in)");
        }
        phases.push(
            measure(
                &rig,
                "8k tokens-in".into(),
                pairs,
                tokens,
                tokenize_ms,
                Some(1.0),
            )
            .await?,
        );
    }
    if args.turns >= 2 && !args.no_sequential {
        // Conversations around 8k tokens: a ~7k-token shared context, then turns of ~250
        // tokens; each request repeats the history, which the EPP has tokenized before.
        let ctx_words = words_for(&tok, 7000)?;
        let turn_words = words_for(&tok, 250)?;
        let mut pairs = Vec::new();
        let mut tokenize_ms = Vec::new();
        let mut tokens = 0;
        let mut convs: Vec<[serde_json::Value; 3]> = (0..args.conversations)
            .map(|c| {
                let s = 1_000_000 + c as u64 * 3;
                [0, 1, 2].map(|k| json!([{"role": "system", "content": filler(s + k, ctx_words)}]))
            })
            .collect();
        for t in 0..args.turns {
            for (c, msgs) in convs.iter_mut().enumerate() {
                let user = |s: u64| json!({"role": "user", "content": filler(s, turn_words)});
                let s = 2_000_000 + (c * 100 + t) as u64 * 3;
                for (k, m) in msgs.iter_mut().enumerate() {
                    if let Some(a) = m.as_array_mut() {
                        a.push(user(s + k as u64));
                    }
                }
                if t > 0 {
                    let (a, _, n, ms) = bodies(&tok, msgs[0].clone())?;
                    let (_, b, _, _) = bodies(&tok, msgs[1].clone())?;
                    let (_, f, _, _) = bodies(&tok, msgs[2].clone())?;
                    pairs.push((a, b, f));
                    tokenize_ms.push(ms);
                    tokens = tokens.max(n);
                } else {
                    // The first turn only seeds the EPP's tokenization cache.
                    let (a, b, _, _) = bodies(&tok, msgs[0].clone())?;
                    rig.send(&rig.gateway, &a).await?;
                    // The other paths' engines see their first turns too.
                    let (_, d, _, _) = bodies(&tok, msgs[1].clone())?;
                    let (_, f, _, _) = bodies(&tok, msgs[2].clone())?;
                    let _ = b;
                    rig.send(&rig.direct, &d).await?;
                    rig.send(&rig.floor, &f).await?;
                }
                let reply = json!({"role": "assistant", "content": "Understood; continuing."});
                for m in msgs.iter_mut() {
                    if let Some(a) = m.as_array_mut() {
                        a.push(reply.clone());
                    }
                }
            }
        }
        if !args.json {
            eprintln!("bench epp: multi-turn conversations (~8k tokens)");
        }
        phases.push(
            measure(
                &rig,
                "8k multi-turn".into(),
                pairs,
                tokens,
                tokenize_ms,
                Some(2.0),
            )
            .await?,
        );
    }
    let concurrencies: Vec<usize> = args
        .concurrency
        .iter()
        .copied()
        .filter(|&c| c > 0)
        .collect();
    let load = if concurrencies.is_empty() {
        Vec::new()
    } else {
        let shapes = load::Shapes {
            tok: &tok,
            sizes: &args.load_sizes,
            turns: args.turns,
        };
        load::run(&rig, &shapes, &concurrencies, args.load_requests, args.json).await?
    };
    if args.json {
        let key = |p: &LoadPoint| format!("{}@{}", p.prompt, p.concurrency);
        let ratios: serde_json::Map<String, serde_json::Value> = load
            .iter()
            .map(|p| (key(p), json!(round3(p.throughput_ratio_vs_floor))))
            .collect();
        let added: serde_json::Map<String, serde_json::Value> = load
            .iter()
            .map(|p| (key(p), json!(round3(p.added_p99_ms))))
            .collect();
        println!(
            "{}",
            json!({"tls": !args.plaintext, "throughput_ratio_vs_floor": ratios,
                "added_p99_ms": added, "phases": phases, "load": load})
        );
        return Ok(());
    }
    println!(
        "EPP overhead: Envoy+EPP ({}) vs Envoy straight to the same worker sidecar, one run, sequential requests",
        if args.plaintext { "h2c" } else { "TLS" }
    );
    println!(
        "{:<17} {:>6} {:>8} {:>9} {:>9} {:>9} {:>9} {:>9} {:>8} {:>8} {:>8} {:>8}",
        "phase",
        "tokens",
        "tok p50",
        "direct p50",
        "added p50",
        "added p99",
        "proto p50",
        "proto p99",
        "epp proc",
        "cpu/req",
        "target",
        ""
    );
    for p in &phases {
        let ms = |v: f64| format!("{v:.2}ms");
        println!(
            "{:<17} {:>6} {:>8} {:>9} {:>9} {:>9} {:>9} {:>9} {:>8} {:>8} {:>8} {}",
            p.name,
            p.prompt_tokens,
            ms(p.tokenize_p50_ms),
            ms(p.direct_p50_ms),
            ms(p.added_p50_ms),
            ms(p.added_p99_ms),
            ms(p.protocol_p50_ms),
            ms(p.protocol_p99_ms),
            ms(p.epp_processing_mean_ms),
            ms(p.epp_cpu_ms_per_request),
            ms(p.target_ms),
            if p.meets_target { "ok" } else { "MISSED" }
        );
    }
    println!(
        "added: per-pair difference (EPP path minus direct path, sent back to back); proto: the same for Envoy + a do-nothing picker that still holds the headers for the body and re-emits it (the ext_proc protocol's own cost); tok p50: the rendered prompt encoded on one core by the tokenizer library (o200k_base); epp proc: the EPP's own mean time from last body byte to routed answer; target: added p99 <= proto p99 + tok p50 + 1 ms (multi-turn: proto p99 + 2 ms; tokens-in: proto p99 + 1 ms)."
    );
    if !load.is_empty() {
        println!(
            "\nUnder concurrent load (closed loop, fresh prompts, every path twice in opposite orders):"
        );
        print!("{}", load::table(&load));
    }
    Ok(())
}

fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}
