//! `kvgate bench replay`: routing quality in virtual time. Every policy replays the same trace on
//! the same simulated fleet (`kvgate-sim`); the table compares prefix hit rate with the trace's
//! reuse bound, TTFT, inter-token latency, end-to-end latency, throughput and load imbalance.
//! With `--sweep` it measures each policy's capacity at a TTFT objective instead
//! ([`crate::sweep`]); `--trace-shape` replays a generated trace of another shape.

use kvgate_engine::{EngineConfig, TimingModel};
use kvgate_sim::policy::{
    GaieDefault, KvRouter, LeastLoad, LlmdDefault, Lmetric, Policy, Random, RoundRobin,
    SglangCacheAware,
};
use kvgate_sim::sim::{PolicyResult, SimConfig, fleet_view, simulate};
use kvgate_sim::trace::{self, TraceRow};
use kvgate_sim::tracegen::{GenConfig, Shape};
use std::path::PathBuf;

/// The bundled Mooncake conversation trace (see bench/traces/README.md).
const DEFAULT_TRACE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../bench/traces/mooncake_conversation_trace.jsonl"
);

pub const POLICIES: [&str; 9] = [
    "random",
    "round-robin",
    "least-load",
    "gaie-default",
    "sglang-cache-aware",
    "llm-d-default",
    "lmetric",
    "dynamo",
    "kvgate",
];

#[derive(clap::Args, Debug, Clone)]
pub struct BenchReplayArgs {
    /// Mooncake-format trace (JSON lines: timestamp ms, input_length, output_length, hash_ids).
    #[arg(long, default_value = DEFAULT_TRACE)]
    pub trace: PathBuf,
    /// Replay a generated trace of this shape instead of `--trace` (agent, chat, docs; see
    /// `kvgate bench gen-trace`).
    #[arg(long, value_name = "SHAPE")]
    pub trace_shape: Option<String>,
    /// Seed of the generated trace.
    #[arg(long, default_value_t = 1)]
    pub trace_seed: u64,
    /// Capacity sweep: each policy over a grid of rate scales, its capacity at the TTFT p90
    /// objective, ratios, hit rates and throughput per point.
    #[arg(long)]
    pub sweep: bool,
    /// `--sweep`: the TTFT p90 objective, in milliseconds.
    #[arg(long, default_value_t = 2000.0)]
    pub slo_ttft_p90_ms: f64,
    /// `--sweep`: explicit grid of rate scales, comma-separated (default: from the 80%-busy
    /// scale upward by `--grid-step` until 1.5x past every policy's knee).
    #[arg(long, value_delimiter = ',')]
    pub scales: Vec<f64>,
    /// `--sweep`: ratio between consecutive grid points.
    #[arg(long, default_value_t = 1.25)]
    pub grid_step: f64,
    /// `--sweep`: at most this many grid points.
    #[arg(long, default_value_t = 14)]
    pub max_points: usize,
    /// `--sweep`: simulations run in parallel.
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Simulated engines.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub workers: u32,
    /// Arrivals this many times faster than the trace's. Default: the scale found for
    /// `--load-target`.
    #[arg(long)]
    pub rate_scale: Option<f64>,
    /// Busy fraction of the engines to aim for when `--rate-scale` is not given (found by
    /// bisection under least-load routing).
    #[arg(long, default_value_t = 0.8)]
    pub load_target: f64,
    /// Policies to run, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = POLICIES.map(String::from))]
    pub policies: Vec<String>,
    /// Spread requests that share a timestamp evenly up to the next one (the bundled trace's
    /// timestamps come in ~3 s steps, ~10 requests each: as recorded they arrive in exactly
    /// simultaneous bursts).
    #[arg(long)]
    pub spread_ties: bool,
    /// Replay only the first N requests.
    #[arg(long)]
    pub requests: Option<usize>,
    /// Tokens per trace block id (the trace's are 512; smaller is faster and keeps sharing).
    #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u32).range(16..=4096))]
    pub tokens_per_trace_block: u32,
    /// KV cache of each engine, in 16-token blocks.
    #[arg(long, default_value_t = 16_384)]
    pub num_gpu_blocks: usize,
    #[arg(long, default_value_t = 256)]
    pub max_num_seqs: usize,
    #[arg(long, default_value_t = 8192)]
    pub max_num_batched_tokens: usize,
    /// Cap on output tokens per request (default: the trace's).
    #[arg(long)]
    pub max_output_tokens: Option<u32>,
    /// Seed of the randomised policies and tie-breaks.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Also draw TTFT CDFs and hit rates into this SVG file (`--sweep`: TTFT p90 and hit rate
    /// against the rate scale).
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
    /// Check the simulation against reality: replay the same requests through real mocker
    /// processes' engines behind the frontend (round-robin and the KV router), `--speedup`
    /// times faster than real time, and compare with the simulated round-robin and dynamo.
    #[arg(long)]
    pub real: bool,
    /// `--real`: the engines (and the arrivals) run this many times faster than real time.
    #[arg(long, default_value_t = 2.0)]
    pub speedup: f64,
    /// `--real`: how far real TTFT p50 may be from the simulated one, as a factor either way
    /// (HTTP, event delivery and a shared machine add to the real side).
    #[arg(long, default_value_t = REAL_TTFT_FACTOR)]
    pub ttft_tolerance: f64,
    /// `--real`: the Envoy binary for the gateway path (Envoy -> kvgate epp -> sidecars ->
    /// mockers); that path is reported as skipped when it is missing (scripts/setup.sh installs
    /// one).
    #[arg(long, env = "KVGATE_ENVOY", default_value = ".tools/bin/envoy")]
    pub envoy: PathBuf,
    /// Replay through this many independent router replicas behind one gateway, and compare
    /// them with one router (`--replica-base-policy` alone); with `--sweep`, their capacities.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub router_replicas: u32,
    /// `--router-replicas`: the policy every replica runs.
    #[arg(long, default_value = "kvgate")]
    pub replica_base_policy: String,
    /// `--router-replicas`: bookings reach the other replicas this many milliseconds after they
    /// change; comma-separated for one row per delay.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    pub replica_sync_delay_ms: Vec<f64>,
    /// `--router-replicas`: `on` (bookings shared, after each delay), `off` (each replica
    /// counts only its own), or `on,off` for both rows.
    #[arg(long, value_delimiter = ',', default_value = "on")]
    pub replica_sync: Vec<String>,
    /// `--router-replicas`: how the gateway spreads requests over replicas: round-robin or
    /// random. Every replica sees every engine's KV events either way.
    #[arg(long, default_value = "round-robin")]
    pub replica_spread: String,
    /// `--router-replicas`: the replicas' home discount against herding, as the product's
    /// `--replica-home-discount` (0: off).
    #[arg(long, default_value_t = kvgate_runtime::replica::DEFAULT_HOME_DISCOUNT)]
    pub replica_home_discount: f64,
    /// `--router-replicas`: the herding measure's window, as the product's
    /// `--replica-herd-window-ms` (default: twice each sync delay, as an operator would set it).
    #[arg(long)]
    pub replica_herd_window_ms: Option<f64>,
}

/// `--real` agreement bounds: hit rates within this much (absolute)...
const REAL_HIT_TOLERANCE: f64 = 0.05;
/// ...and TTFT p50 within this factor either way, by default (`--ttft-tolerance`).
const REAL_TTFT_FACTOR: f64 = 1.5;

/// Replays `rows` through real engines and compares with the simulation of the same fleet.
fn real_check(a: &BenchReplayArgs, rows: &[TraceRow], cfg: &SimConfig) -> Result<(), String> {
    use kvgate_frontend::RouterMode;
    if !(a.speedup.is_finite() && a.speedup > 0.0) {
        return Err("--speedup must be > 0".into());
    }
    if !(a.ttft_tolerance.is_finite() && a.ttft_tolerance >= 1.0) {
        return Err("--ttft-tolerance must be >= 1".into());
    }
    // The demo's mock workers: 64 sequences per engine, `kv_blocks` blocks.
    let cfg = SimConfig {
        engine: EngineConfig {
            max_num_seqs: 64,
            ..cfg.engine.clone()
        },
        ..cfg.clone()
    };
    let demo = crate::demo::DemoArgs {
        workers: cfg.workers as u32,
        trace: None,
        conversations: 0,
        duration_secs: 0.0,
        tokens_per_trace_block: cfg.tokens_per_trace_block as u32,
        max_output_tokens: cfg.max_output_tokens.unwrap_or(u32::MAX),
        kv_blocks: cfg.engine.num_gpu_blocks,
        speedup_ratio: a.speedup,
        json: false,
    };
    let t0 = rows.first().map_or(0.0, |r| r.timestamp);
    let reqs: Vec<crate::demo::DemoRequest> = rows
        .iter()
        .map(|r| crate::demo::DemoRequest {
            at: std::time::Duration::from_secs_f64(
                (r.timestamp - t0) / 1000.0 / (cfg.rate_scale * a.speedup),
            ),
            prompt: trace::prompt(r, cfg.tokens_per_trace_block),
            max_tokens: cfg
                .max_output_tokens
                .map_or(r.output_length, |c| r.output_length.min(u64::from(c)))
                .clamp(1, u64::from(u32::MAX)) as u32,
        })
        .collect();
    let reqs = std::sync::Arc::new(reqs);
    let dir = std::env::temp_dir().join(format!("kvgate-replay-real-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    println!(
        "\n{} requests on {} engines, real time x{} (TTFT below in real ms; simulated ones divided by {}):\n",
        rows.len(),
        cfg.workers,
        a.speedup,
        a.speedup
    );
    println!(
        "| policy | hit rate real | simulated | TTFT p50 real | simulated | TTFT p90 real | simulated | errors | agree |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    let mut disagree = 0;
    let mut compared = 0;
    let gateway = crate::disagg::BenchDisaggArgs {
        demo: demo.clone(),
        prefill_workers: None,
        kv_transfer_gbps: 25.0,
        envoy: a.envoy.clone(),
    };
    // The KV paths run the product's default policy, as a user gets it.
    let default = kvgate_core::config::RouterPolicy::default().as_str();
    let paths: [(&str, &str); 3] = [
        ("round-robin", "round-robin"),
        ("kv", default),
        ("envoy+epp", default),
    ];
    for (path, sim_name) in paths {
        let real = match path {
            "round-robin" => rt.block_on(crate::demo::run_policy(
                &demo,
                &reqs,
                RouterMode::RoundRobin,
                &dir,
            ))?,
            "kv" => rt.block_on(crate::demo::run_policy(&demo, &reqs, RouterMode::Kv, &dir))?,
            _ if !a.envoy.exists() => {
                println!(
                    "| {path} vs {sim_name} | skipped: no Envoy at {} (scripts/setup.sh installs one) | | | | | | | |",
                    a.envoy.display()
                );
                continue;
            }
            _ => rt.block_on(crate::disagg::run_config(&gateway, &reqs, 0, &dir, "real"))?,
        };
        compared += 1;
        let sim = run_one(rows, &cfg, sim_name, a.seed, true)?;
        let mut ttft = real.ttft.clone();
        let real_hit = real.cached_tokens as f64 / real.prompt_tokens.max(1) as f64;
        let (r50, r90) = (
            crate::demo::pct(&mut ttft, 0.5),
            crate::demo::pct(&mut ttft, 0.9),
        );
        let (s50, s90) = (sim.ttft_p50_ms / a.speedup, sim.ttft_p90_ms / a.speedup);
        let ok = real.errors == 0
            && (real_hit - sim.hit_rate).abs() <= REAL_HIT_TOLERANCE
            && r50 <= s50 * a.ttft_tolerance
            && r50 >= s50 / a.ttft_tolerance;
        if !ok {
            disagree += 1;
        }
        println!(
            "| {path} vs {sim_name} | {real_hit:.3} | {:.3} | {r50:.1} | {s50:.1} | {r90:.1} | {s90:.1} | {} | {} |",
            sim.hit_rate,
            real.errors,
            if ok { "yes" } else { "NO" }
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    println!(
        "\nagreement: hit rates within {REAL_HIT_TOLERANCE} and TTFT p50 within x{}, no errors",
        a.ttft_tolerance
    );
    if disagree > 0 {
        return Err(format!(
            "{disagree} of {compared} paths disagree with the simulation"
        ));
    }
    Ok(())
}

const COLOURS: [&str; 9] = [
    "#999999", "#b07aa1", "#76b7b2", "#f28e2b", "#59a14f", "#edc948", "#9c755f", "#4e79a7",
    "#e15759",
];

pub(crate) fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// TTFT CDFs (log time axis) on the left, hit rates against the reuse bound on the right.
fn svg(results: &[(String, PolicyResult)], bound: f64, title: &str) -> String {
    use std::fmt::Write as _;
    let (w, h) = (1100.0, 460.0);
    let (l, t, pw, ph) = (70.0, 50.0, 560.0, 340.0);
    let mut out = String::new();
    let _ = write!(
        out,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12"><rect width="100%" height="100%" fill="white"/><text x="{l}" y="24" font-size="15">{}</text>"##,
        esc(title)
    );
    // TTFT CDF: x = log10(ms) from 10 ms to 10 s.
    let (lo, hi) = (1.0f64, 4.0f64);
    let x = |ms: f64| l + (ms.max(1.0).log10().clamp(lo, hi) - lo) / (hi - lo) * pw;
    let y = |q: f64| t + ph - q * ph;
    let _ = write!(
        out,
        r##"<rect x="{l}" y="{t}" width="{pw}" height="{ph}" fill="none" stroke="#333"/>"##
    );
    for (ms, label) in [
        (10.0, "10 ms"),
        (100.0, "100 ms"),
        (1000.0, "1 s"),
        (10000.0, "10 s"),
    ] {
        let xx = x(ms);
        let _ = write!(
            out,
            r##"<line x1="{xx}" y1="{t}" x2="{xx}" y2="{}" stroke="#ddd"/><text x="{xx}" y="{}" text-anchor="middle">{label}</text>"##,
            t + ph,
            t + ph + 16.0
        );
    }
    for q in [0.5, 0.9, 0.99] {
        let yy = y(q);
        let _ = write!(
            out,
            r##"<line x1="{l}" y1="{yy}" x2="{}" y2="{yy}" stroke="#ddd"/><text x="{}" y="{}" text-anchor="end">p{}</text>"##,
            l + pw,
            l - 6.0,
            yy + 4.0,
            (q * 100.0) as u32
        );
    }
    let _ = write!(
        out,
        r##"<text x="{}" y="{}" text-anchor="middle">time to first token (CDF)</text>"##,
        l + pw / 2.0,
        t + ph + 36.0
    );
    for (i, (name, r)) in results.iter().enumerate() {
        let c = COLOURS[i % COLOURS.len()];
        let n = r.ttft_ms.len();
        if n == 0 {
            continue;
        }
        let step = (n / 400).max(1);
        let mut pts = String::new();
        for (k, ms) in r.ttft_ms.iter().enumerate().step_by(step) {
            let _ = write!(pts, "{:.1},{:.1} ", x(*ms), y((k + 1) as f64 / n as f64));
        }
        let _ = write!(
            out,
            r##"<polyline points="{pts}" fill="none" stroke="{c}" stroke-width="1.6"/><text x="{}" y="{}" fill="{c}">{}</text>"##,
            l + 8.0,
            t + 16.0 + 15.0 * i as f64,
            esc(name)
        );
    }
    // Hit rates, bound dashed.
    let (bl, bw) = (l + pw + 130.0, 280.0);
    let bar_h = ph / results.len().max(1) as f64;
    let scale = |v: f64| v / bound.max(1e-9).max(v) * bw;
    for (i, (name, r)) in results.iter().enumerate() {
        let c = COLOURS[i % COLOURS.len()];
        let yy = t + i as f64 * bar_h;
        let _ = write!(
            out,
            r##"<rect x="{bl}" y="{}" width="{:.1}" height="{:.1}" fill="{c}"/><text x="{}" y="{}" text-anchor="end">{}</text><text x="{}" y="{}">{:.3}</text>"##,
            yy + 4.0,
            scale(r.hit_rate),
            bar_h - 8.0,
            bl - 6.0,
            yy + bar_h / 2.0 + 4.0,
            esc(name),
            bl + scale(r.hit_rate) + 4.0,
            yy + bar_h / 2.0 + 4.0,
            r.hit_rate
        );
    }
    let bx = bl + scale(bound);
    let _ = write!(
        out,
        r##"<line x1="{bx}" y1="{t}" x2="{bx}" y2="{}" stroke="#333" stroke-dasharray="4 3"/><text x="{bx}" y="{}" text-anchor="middle">reuse bound {bound:.3}</text><text x="{}" y="{}" text-anchor="middle">prefix hit rate</text></svg>"##,
        t + ph,
        t + ph + 16.0,
        bl + bw / 2.0,
        t + ph + 36.0
    );
    out
}

/// Builds a policy a caller brings to the replay for one run: a peer the product does not link.
/// `kvgate-peers`' replay bench registers Dynamo's own selector (`dynamo-selector`) this way.
pub type PolicyFactory = fn(&SimConfig, u64) -> Result<Box<dyn Policy>, String>;

static EXTRA_POLICIES: std::sync::Mutex<Vec<(&'static str, PolicyFactory)>> =
    std::sync::Mutex::new(Vec::new());

/// Makes `name` a policy of `kvgate bench replay` (and its sweep) in this process. A name
/// registered again replaces the earlier factory; built-in names cannot be taken.
pub fn register_policy(name: &'static str, factory: PolicyFactory) -> Result<(), String> {
    if POLICIES.contains(&name) || crate::replicas::Variant::parse(name).is_some() {
        return Err(format!("{name:?} is a built-in policy"));
    }
    let mut extra = EXTRA_POLICIES
        .lock()
        .map_err(|_| "the policy registry is poisoned".to_string())?;
    extra.retain(|(n, _)| *n != name);
    extra.push((name, factory));
    Ok(())
}

fn extra_policy(name: &str) -> Option<PolicyFactory> {
    let extra = EXTRA_POLICIES.lock().ok()?;
    extra.iter().find(|(n, _)| *n == name).map(|(_, f)| *f)
}

/// Every policy name this process knows, for error messages.
fn known_policies() -> String {
    let mut names: Vec<&str> = POLICIES.to_vec();
    if let Ok(extra) = EXTRA_POLICIES.lock() {
        names.extend(extra.iter().map(|(n, _)| *n));
    }
    names.join(", ")
}

fn policy(name: &str, cfg: &SimConfig, seed: u64) -> Result<Box<dyn Policy>, String> {
    if let Some(v) = crate::replicas::Variant::parse(name) {
        return v?.policy(cfg, seed);
    }
    if let Some(factory) = extra_policy(name) {
        return factory(cfg, seed);
    }
    let fleet = fleet_view(cfg);
    let bs = cfg.engine.block_size;
    Ok(match name {
        "random" => Box::new(Random::new(seed)),
        "round-robin" => Box::new(RoundRobin::default()),
        "least-load" => Box::new(LeastLoad::new(seed)),
        "gaie-default" => Box::new(GaieDefault::new(cfg.workers, seed)),
        "sglang-cache-aware" => Box::new(SglangCacheAware::new(cfg.workers, bs, seed)),
        "dynamo" => Box::new(KvRouter::dynamo(&fleet, bs, seed)?),
        "kvgate" => Box::new(KvRouter::kvgate(&fleet, bs, seed)?),
        "llm-d-default" => Box::new(LlmdDefault::new(cfg.workers, seed)),
        "lmetric" => Box::new(Lmetric::new(&fleet, bs)?),
        other => {
            return Err(format!(
                "unknown policy {other:?} (known: {})",
                known_policies()
            ));
        }
    })
}

pub(crate) fn run_one(
    rows: &[TraceRow],
    cfg: &SimConfig,
    name: &str,
    seed: u64,
    quiet: bool,
) -> Result<PolicyResult, String> {
    let mut p = policy(name, cfg, seed)?;
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let r = simulate(rows, cfg, p.as_mut(), |done, total| {
        if !quiet && tty {
            crate::demo::progress(name, done, total);
        }
    })?;
    Ok(r)
}

/// The rate scale at which least-load routing keeps the engines `target` busy.
fn find_rate_scale(
    rows: &[TraceRow],
    cfg: &SimConfig,
    target: f64,
    quiet: bool,
) -> Result<f64, String> {
    // Probe on a prefix of the trace: the load level is a property of the arrival rate.
    let probe = &rows[..rows.len().min(3000)];
    let busy = |scale: f64| -> Result<f64, String> {
        let c = SimConfig {
            rate_scale: scale,
            ..cfg.clone()
        };
        let r = run_one(probe, &c, "least-load", 1, true)?;
        if !quiet {
            eprintln!(
                "  rate scale {scale:>8.3}: engines {:.0}% busy",
                r.busy_fraction * 100.0
            );
        }
        Ok(r.busy_fraction)
    };
    let (mut lo, mut hi) = (0.01f64, 1000.0f64);
    for _ in 0..14 {
        let mid = (lo * hi).sqrt();
        if busy(mid)? < target {
            lo = mid;
        } else {
            hi = mid;
        }
        if hi / lo < 1.05 {
            break;
        }
    }
    Ok((lo * hi).sqrt())
}

pub fn run(mut a: BenchReplayArgs) -> Result<(), String> {
    let replicas = a.router_replicas > 1;
    if replicas {
        if a.real {
            return Err("--router-replicas runs in the simulation only; `kvgate bench ha` runs replicas for real".into());
        }
        a.policies = crate::replicas::policies(&a)?;
    }
    let (mut rows, trace_name) = match &a.trace_shape {
        Some(shape) => {
            let shape = Shape::parse(shape)?;
            (
                kvgate_sim::tracegen::generate(&GenConfig::new(shape, a.trace_seed)),
                format!("generated {shape} trace (seed {})", a.trace_seed),
            )
        }
        None => {
            let text = std::fs::read_to_string(&a.trace)
                .map_err(|e| format!("cannot read the trace {}: {e}", a.trace.display()))?;
            (trace::parse(&text)?, a.trace.display().to_string())
        }
    };
    if let Some(n) = a.requests {
        rows.truncate(n.max(1));
    }
    let trace_name = if a.spread_ties {
        let moved = trace::spread_ties(&mut rows);
        format!("{trace_name}, {moved} simultaneous arrivals spread")
    } else {
        trace_name
    };
    for p in &a.policies {
        if let Some(v) = crate::replicas::Variant::parse(p) {
            v?;
        } else if !POLICIES.contains(&p.as_str()) && extra_policy(p).is_none() {
            return Err(format!(
                "unknown policy {p:?} (known: {})",
                known_policies()
            ));
        }
    }
    if !(a.load_target > 0.0 && a.load_target < 1.0) {
        return Err("--load-target must be in (0, 1)".into());
    }
    let mut cfg = SimConfig {
        workers: a.workers as usize,
        engine: EngineConfig {
            block_size: 16,
            num_gpu_blocks: a.num_gpu_blocks,
            max_num_seqs: a.max_num_seqs,
            max_num_batched_tokens: a.max_num_batched_tokens,
            enable_prefix_caching: true,
            timing: TimingModel::default(),
        },
        tokens_per_trace_block: a.tokens_per_trace_block as usize,
        rate_scale: 1.0,
        max_output_tokens: a.max_output_tokens,
    };
    let bound = trace::reuse_bound(&rows, cfg.tokens_per_trace_block);
    let started = std::time::Instant::now();
    if let Some(p) = &a.plot
        && !p.extension().is_some_and(|e| e.eq_ignore_ascii_case("svg"))
    {
        return Err(format!(
            "--plot {}: the plot is written as SVG (vector, renders on GitHub and in browsers); name the file *.svg",
            p.display()
        ));
    }
    if a.rate_scale.is_some_and(|s| !(s.is_finite() && s > 0.0)) {
        return Err("--rate-scale must be > 0".into());
    }
    if a.sweep {
        return run_sweep(&a, &rows, &mut cfg, &trace_name, bound, replicas);
    }
    if a.real {
        // The bundled trace's ~80%-busy scale on 16 engines; real runs are short checks.
        cfg.rate_scale = a.rate_scale.unwrap_or(1.57);
        return real_check(&a, &rows, &cfg);
    }
    cfg.rate_scale = match a.rate_scale {
        Some(s) if s.is_finite() && s > 0.0 => s,
        Some(_) => return Err("--rate-scale must be > 0".into()),
        None => {
            if !a.json {
                eprintln!(
                    "finding the rate scale for {:.0}% busy engines:",
                    a.load_target * 100.0
                );
            }
            find_rate_scale(&rows, &cfg, a.load_target, a.json)?
        }
    };
    let mut results: Vec<(String, PolicyResult)> = Vec::new();
    for p in &a.policies {
        results.push((p.clone(), run_one(&rows, &cfg, p, a.seed, a.json)?));
    }
    if let Some(path) = &a.plot {
        let title = format!(
            "{} requests, {} engines, rate scale {:.2}",
            rows.len(),
            a.workers,
            cfg.rate_scale
        );
        std::fs::write(path, svg(&results, bound, &title))
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    let vs_single = replicas.then(|| crate::replicas::compare(&results));
    if a.json {
        let policies: serde_json::Map<String, serde_json::Value> = results
            .iter()
            .map(|(n, r)| (n.clone(), serde_json::to_value(r).unwrap_or_default()))
            .collect();
        let mut out = serde_json::json!({
            "trace": trace_name,
            "requests": rows.len(),
            "workers": a.workers,
            "rate_scale": cfg.rate_scale,
            "reuse_bound": bound,
            "policies": policies,
        });
        if let Some(v) = &vs_single {
            out["router_replicas"] = a.router_replicas.into();
            out["replica_spread"] = a.replica_spread.clone().into();
            out["replica_home_discount"] = a.replica_home_discount.into();
            out["vs_single"] = serde_json::to_value(v).unwrap_or_default();
        }
        println!("{out}");
        return Ok(());
    }
    println!(
        "\n{} requests, {} engines, rate scale {:.2}, {} tokens per trace block; reuse bound {:.3}; simulated in {:.1} s\n",
        rows.len(),
        a.workers,
        cfg.rate_scale,
        a.tokens_per_trace_block,
        bound,
        started.elapsed().as_secs_f64()
    );
    println!(
        "| policy | hit rate | of bound | TTFT p50 | p90 | p99 (ms) | ITL (ms) | e2e p50 | p90 (ms) | output tok/s | imbalance | busy |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for (n, r) in &results {
        println!(
            "| {n} | {:.3} | {:.0}% | {:.0} | {:.0} | {:.0} | {:.1} | {:.0} | {:.0} | {:.0} | {:.2} | {:.0}% |",
            r.hit_rate,
            100.0 * r.hit_rate / bound.max(1e-9),
            r.ttft_p50_ms,
            r.ttft_p90_ms,
            r.ttft_p99_ms,
            r.itl_mean_ms,
            r.e2e_p50_ms,
            r.e2e_p90_ms,
            r.throughput_tok_s,
            r.imbalance,
            r.busy_fraction * 100.0
        );
    }
    if let Some(v) = &vs_single {
        println!(
            "\n{} router replicas against one ({} spread):\n",
            a.router_replicas, a.replica_spread
        );
        print!("{}", crate::replicas::table(v, &a.policies));
    }
    Ok(())
}

fn run_sweep(
    a: &BenchReplayArgs,
    rows: &[TraceRow],
    cfg: &mut SimConfig,
    trace_name: &str,
    bound: f64,
    replicas: bool,
) -> Result<(), String> {
    if !(a.slo_ttft_p90_ms.is_finite() && a.slo_ttft_p90_ms > 0.0) {
        return Err("--slo-ttft-p90-ms must be > 0".into());
    }
    if a.scales.iter().any(|s| !(s.is_finite() && *s > 0.0)) {
        return Err("--scales must all be > 0".into());
    }
    if a.threads == 0 || a.threads > 64 {
        return Err("--threads must be in 1..=64".into());
    }
    let started = std::time::Instant::now();
    let start = if a.scales.is_empty() {
        match a.rate_scale {
            Some(s) => s,
            None => {
                if !a.json {
                    eprintln!(
                        "finding the rate scale for {:.0}% busy engines (the sweep's first point):",
                        a.load_target * 100.0
                    );
                }
                find_rate_scale(rows, cfg, a.load_target, a.json)?
            }
        }
    } else {
        a.scales[0]
    };
    let default = if replicas {
        a.replica_base_policy.as_str()
    } else {
        kvgate_core::config::RouterPolicy::default().as_str()
    };
    let sw = crate::sweep::sweep(a, rows, cfg, start, default)?;
    let v = crate::sweep::verdict(&sw);
    let vs_single = replicas.then(|| crate::replicas::sweep_vs_single(&sw, default));
    let secs = started.elapsed().as_secs_f64();
    if let Some(path) = &a.plot {
        let title = format!(
            "{trace_name}: {} requests, {} engines; TTFT p90 objective {:.0} ms",
            rows.len(),
            a.workers,
            a.slo_ttft_p90_ms
        );
        std::fs::write(path, crate::sweep::svg(&sw, &title, &COLOURS))
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    if a.json {
        let out = serde_json::json!({
            "trace": trace_name,
            "requests": rows.len(),
            "workers": a.workers,
            "reuse_bound": bound,
            "seconds": secs,
            "sweep": sw,
            "verdict": v,
        });
        let mut out = out;
        if let Some(r) = &vs_single {
            out["router_replicas"] = a.router_replicas.into();
            out["replica_spread"] = a.replica_spread.clone().into();
            out["replica_home_discount"] = a.replica_home_discount.into();
            out["vs_single"] = serde_json::to_value(r).unwrap_or_default();
        }
        println!("{out}");
        return Ok(());
    }
    println!(
        "\n{trace_name}: {} requests, {} engines, reuse bound {bound:.3}; swept in {secs:.0} s\n",
        rows.len(),
        a.workers
    );
    print!("{}", crate::sweep::table(&sw, &v));
    if let Some(r) = &vs_single {
        match r.knee_rate_scale {
            Some(k) => println!(
                "\n{} router replicas against one ({} spread), at the single router's knee (x{k:.2}, its highest grid point within the objective):\n",
                a.router_replicas, a.replica_spread
            ),
            None => println!(
                "\nthe single router misses the objective at every grid point: no knee to compare at"
            ),
        }
        print!("{}", crate::replicas::table(&r.variants, &a.policies));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn always_round_robin(_: &SimConfig, _: u64) -> Result<Box<dyn Policy>, String> {
        Ok(Box::new(RoundRobin::default()))
    }

    #[test]
    fn registered_policies_are_built_and_listed_but_built_in_names_are_not_taken() {
        let cfg = SimConfig {
            workers: 2,
            engine: EngineConfig {
                block_size: 16,
                num_gpu_blocks: 64,
                max_num_seqs: 4,
                max_num_batched_tokens: 256,
                enable_prefix_caching: true,
                timing: TimingModel::default(),
            },
            tokens_per_trace_block: 16,
            rate_scale: 1.0,
            max_output_tokens: None,
        };
        let unknown = policy("test-extra", &cfg, 1).err().unwrap_or_default();
        assert!(unknown.contains("unknown policy"), "{unknown}");
        assert!(register_policy("dynamo", always_round_robin).is_err());
        assert!(register_policy("kvgate@4/unsynced/random", always_round_robin).is_err());
        assert!(register_policy("test-extra", always_round_robin).is_ok());
        let p = policy("test-extra", &cfg, 1);
        assert_eq!(
            p.map(|p| p.name().to_string()).ok().as_deref(),
            Some("round-robin")
        );
        assert!(
            known_policies().ends_with("test-extra"),
            "{}",
            known_policies()
        );
        // A built-in name still builds the built-in.
        let d = policy("dynamo", &cfg, 1);
        assert_eq!(
            d.map(|p| p.name().to_string()).ok().as_deref(),
            Some("dynamo")
        );
    }
}
