//! `kvgate bench ha`: several EPP replicas behind one real Envoy, and the failures users meet.
//!
//! The rig: a real nats-server (JetStream), `--workers` mockers publishing their KV events on
//! it, a direct-mode sidecar per mocker, `--replicas` EPPs (replica sync on, each its own
//! durable consumer) and two real Envoys with the fail-open gateway config
//! (`deploy/envoy/gateway-fail-open.yaml`): one whose ext_proc cluster holds every replica, and
//! one holding only the first (the single-replica baseline, on the same engines in the same run).
//!
//! Multi-turn conversations (a shared system prompt, then turns that extend the conversation)
//! are driven through the gateway in phases, each with conversations of its own:
//! 1. `warm-up` (not reported): the shared prompt and the routers' learned rates;
//! 2. `single`: through the one-replica gateway;
//! 3. `steady`: through the gateway of all replicas;
//! 4. `kill`: one replica is SIGKILLed early in the phase and restarted `--restart-after-secs`
//!    later;
//! 5. `restarted`: the restarted replica routes among the others again (its own hit rate,
//!    from its counters, against its hit rate before the kill: `restarted_hit_ratio`);
//! 6. `nats-restart`: nats-server is killed mid-phase and restarted on the same store;
//! 7. `all-down`: every replica is stopped; the gateway must serve by plain load balancing;
//! 8. `recovered`: the replicas are back.
//!
//! Per phase it reports the prefix hit rate (the engines' own `cached_tokens`), TTFT p50/p90 and
//! failures; then the killed replica's requests in flight and the failures they caused, the
//! bookings left on every replica once all is done, and how long the restarted replica took to
//! be ready. The last line with `--json` is one object with the keys `replicas`,
//! `hit_ratio_vs_single`, `ttft_p90_ratio_vs_single`, `failed_during_kill`, `inflight_at_kill`,
//! `leaked_bookings`, `ready_after_restart_s`, `fail_open_success_ratio`,
//! `hit_after_recovery_ratio` (and `phases`, `restarted_hit_ratio`).

use crate::demo::{DemoRequest, Outcome, one, pct};
use crate::procs::{NatsServer, Proc, TempDir, free_port, metric_value, start_fail_open_gateway};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(clap::Args, Debug, Clone)]
pub struct BenchHaArgs {
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
    /// EPP replicas behind the gateway.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(2..=8))]
    pub replicas: u32,
    /// Mock engines (each behind its own direct-mode sidecar).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=16))]
    pub workers: u32,
    /// Conversations per phase.
    #[arg(long, default_value_t = 24)]
    pub conversations: usize,
    /// Turns per conversation (each extends the previous turn's prompt).
    #[arg(long, default_value_t = 5)]
    pub turns: usize,
    /// Tokens of the system prompt every conversation shares.
    #[arg(long, default_value_t = 512)]
    pub system_tokens: usize,
    /// Tokens each turn adds.
    #[arg(long, default_value_t = 256)]
    pub turn_tokens: usize,
    /// Output tokens per request.
    #[arg(long, default_value_t = 24)]
    pub max_tokens: u32,
    /// Conversations start spread over this many seconds of each phase.
    #[arg(long, default_value_t = 6.0)]
    pub phase_secs: f64,
    /// Pause between a conversation's turns (a user reading), in milliseconds.
    #[arg(long, default_value_t = 300)]
    pub think_ms: u64,
    /// KV cache of each mock engine, in 16-token blocks.
    #[arg(long, default_value_t = 4096)]
    pub kv_blocks: usize,
    /// Mock engines run this many times faster than the timing model.
    #[arg(long, default_value_t = 4.0)]
    pub speedup: f64,
    /// `kill`: seconds between the SIGKILL and the restart.
    #[arg(long, default_value_t = 2.0)]
    pub restart_after_secs: f64,
    /// A request unanswered for this long counts as failed (hung).
    #[arg(long, default_value_t = 30)]
    pub request_timeout_secs: u64,
    /// Print one JSON object as the last line instead of the tables.
    #[arg(long)]
    pub json: bool,
}

/// One phase's figures.
#[derive(Clone, Debug, Serialize)]
pub struct Phase {
    pub name: String,
    pub requests: usize,
    pub failed: usize,
    pub hit_rate: f64,
    pub ttft_p50_ms: f64,
    pub ttft_p90_ms: f64,
}

impl Phase {
    fn new(name: &str, o: &Outcome, requests: usize) -> Self {
        let mut t = o.ttft.clone();
        Self {
            name: name.to_string(),
            requests,
            failed: o.errors,
            hit_rate: o.cached_tokens as f64 / o.prompt_tokens.max(1) as f64,
            ttft_p50_ms: pct(&mut t, 0.5),
            ttft_p90_ms: pct(&mut t, 0.9),
        }
    }
}

/// The JSON summary (the keys are a contract: operators script against them).
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    pub replicas: u32,
    pub hit_ratio_vs_single: f64,
    pub ttft_p90_ratio_vs_single: f64,
    pub failed_during_kill: usize,
    pub inflight_at_kill: u64,
    pub leaked_bookings: u64,
    pub ready_after_restart_s: f64,
    pub fail_open_success_ratio: f64,
    pub hit_after_recovery_ratio: f64,
    /// The restarted replica's hit rate over the `restarted` phase / its hit rate before the
    /// kill (from its own counters; `null` when it routed nothing with usage).
    pub restarted_hit_ratio: Option<f64>,
    pub phases: Vec<Phase>,
}

/// One EPP replica: fixed ports, so a restart takes its old place in Envoy's cluster.
struct Epp {
    index: usize,
    grpc_port: u16,
    args: Vec<String>,
    dir: PathBuf,
    proc: Option<Proc>,
    /// `http://host:port` of its metrics/debug server (changes on restart).
    http: String,
    /// `http://host:port` of its gRPC health server.
    health: String,
}

impl Epp {
    fn new(index: usize, workers: &Path, nats: &str, dir: &Path) -> Result<Self, String> {
        let grpc_port = free_port()?;
        let args: Vec<String> = [
            "epp",
            "--host",
            "127.0.0.1",
            "--grpc-port",
            &grpc_port.to_string(),
            "--health-port",
            "0",
            "--metrics-port",
            "0",
            "--workers",
            &workers.to_string_lossy(),
            "--secure-serving=false",
            "--event-plane",
            "nats",
            "--nats-url",
            nats,
            "--namespace",
            "kvgate-ha",
            "--kv-consumer",
            &format!("kvgate-ha-epp-{index}"),
            "--router-replica-sync",
            "true",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let mut e = Self {
            index,
            grpc_port,
            args,
            dir: dir.to_path_buf(),
            proc: None,
            http: String::new(),
            health: String::new(),
        };
        e.start()?;
        Ok(e)
    }

    fn picker(&self) -> String {
        format!("127.0.0.1:{}", self.grpc_port)
    }

    fn start(&mut self) -> Result<(), String> {
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        let p = Proc::kvgate(&args, 3, Some(&self.dir))
            .map_err(|e| format!("epp {}: {e}", self.index))?;
        self.http = format!("http://{}", p.addr("http://")?);
        self.health = p
            .lines()
            .iter()
            .find(|l| l.contains("health"))
            .and_then(|l| l.split_whitespace().find(|w| w.starts_with("grpc://")))
            .map(|w| w.replace("grpc://", "http://"))
            .ok_or_else(|| format!("epp {}: no health address", self.index))?;
        self.proc = Some(p);
        Ok(())
    }

    /// SIGKILL: no goodbye to its peers, its streams cut mid-flight.
    fn kill(&mut self) {
        self.proc = None;
    }

    async fn ready(&self) -> bool {
        let Ok(ch) = tonic::transport::Channel::from_shared(self.health.clone()) else {
            return false;
        };
        let Ok(ch) = ch.connect_timeout(Duration::from_secs(1)).connect().await else {
            return false;
        };
        let mut c = tonic_health::pb::health_client::HealthClient::new(ch);
        matches!(
            c.check(tonic_health::pb::HealthCheckRequest {
                service: "readiness".into(),
            })
            .await,
            Ok(r) if r.get_ref().status
                == tonic_health::pb::health_check_response::ServingStatus::Serving as i32
        )
    }

    async fn wait_ready(&self, within: Duration) -> Result<Duration, String> {
        let t0 = Instant::now();
        while !self.ready().await {
            if t0.elapsed() > within {
                return Err(format!(
                    "epp {} not ready after {:.0} s",
                    self.index,
                    within.as_secs_f64()
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(t0.elapsed())
    }

    async fn get(&self, c: &reqwest::Client, path: &str) -> Option<String> {
        c.get(format!("{}{path}", self.http))
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()
    }

    /// (own, peers') bookings held now.
    async fn bookings(&self, c: &reqwest::Client) -> Option<(u64, u64)> {
        let v: serde_json::Value = serde_json::from_str(&self.get(c, "/debug/load").await?).ok()?;
        Some((
            v["bookings"]["own"].as_u64()?,
            v["bookings"]["peers"].as_u64()?,
        ))
    }

    /// (actual cached tokens, prompt tokens) of the decisions whose responses reported usage.
    async fn hit_counters(&self, c: &reqwest::Client) -> Option<(f64, f64)> {
        let m = self.get(c, "/metrics").await?;
        Some((
            metric_value(&m, "kvgate_router_actual_cached_tokens_total"),
            metric_value(&m, "kvgate_router_reported_prompt_tokens_total"),
        ))
    }
}

/// Conversation `c` of phase `p`: the shared system prompt, then `turns` turns; turn `t`'s
/// prompt is turn `t - 1`'s plus `turn_tokens` more.
fn conversation(a: &BenchHaArgs, p: u64, c: u64) -> Vec<Vec<u32>> {
    let system: Vec<u32> = kvgate_sim::trace::block_tokens(1, a.system_tokens).collect();
    let mut prompt = system;
    (0..a.turns as u64)
        .map(|t| {
            let id = 1_000_000 + p * 100_000 + c * 100 + t;
            prompt.extend(kvgate_sim::trace::block_tokens(id, a.turn_tokens));
            prompt.clone()
        })
        .collect()
}

/// Drives phase `p`'s conversations through `gateway` (closed loop per conversation, starts
/// spread over `phase_secs`).
async fn drive(a: &BenchHaArgs, gateway: &str, p: u64) -> Result<(Outcome, usize), String> {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .timeout(Duration::from_secs(a.request_timeout_secs))
        .build()
        .map_err(|e| e.to_string())?;
    let out = Arc::new(tokio::sync::Mutex::new(Outcome::default()));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..a.conversations as u64 {
        let turns = conversation(a, p, c);
        let (client, out, url) = (client.clone(), out.clone(), gateway.to_string());
        let offset = Duration::from_secs_f64(a.phase_secs * c as f64 / a.conversations as f64);
        let (think, max_tokens) = (Duration::from_millis(a.think_ms), a.max_tokens);
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep(offset).await;
            for prompt in turns {
                let r = DemoRequest {
                    at: Duration::ZERO,
                    prompt,
                    max_tokens,
                };
                one(&client, &url, &r, &out).await;
                tokio::time::sleep(think).await;
            }
        }));
    }
    for t in tasks {
        t.await.map_err(|e| e.to_string())?;
    }
    let mut o = out.lock().await.clone();
    o.wall = start.elapsed().as_secs_f64();
    Ok((o, a.conversations * a.turns))
}

struct Rig {
    dir: TempDir,
    nats: NatsServer,
    epps: Vec<Epp>,
    _workers: Vec<Proc>,
    _envoys: Vec<Proc>,
    /// Gateways: every replica; the first replica only.
    all: String,
    single: String,
}

fn setup(a: &BenchHaArgs) -> Result<Rig, String> {
    for (what, p) in [("Envoy", &a.envoy), ("nats-server", &a.nats_server)] {
        if !p.exists() {
            return Err(format!(
                "{what} not found at {} (run scripts/setup.sh)",
                p.display()
            ));
        }
    }
    let dir = TempDir::new("bench-ha")?;
    let nats = NatsServer::start(&a.nats_server, "bench-ha", "run scripts/setup.sh")?;
    let url = nats.url();
    let ids: Vec<u64> = (0..u64::from(a.workers)).map(|i| 2001 + i).collect();
    let (blocks, speedup) = (a.kv_blocks.to_string(), a.speedup.to_string());
    let mut procs = Vec::new();
    let mut mockers = Vec::new();
    for id in &ids {
        let id_s = id.to_string();
        let m = Proc::kvgate(
            &[
                "mocker",
                "--port",
                "0",
                "--block-size",
                "16",
                "--num-gpu-blocks",
                &blocks,
                "--worker-id",
                &id_s,
                "--speedup-ratio",
                &speedup,
                "--event-plane",
                "nats",
                "--nats-url",
                &url,
                "--namespace",
                "kvgate-ha",
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
    for _ in &ids {
        let s = Proc::kvgate(
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
            "  - {{name: pod-{id}, id: {id}, url: 'http://{s}', total_kv_blocks: {}}}\n",
            a.kv_blocks
        ));
    }
    std::fs::write(&epp_file, y).map_err(|e| e.to_string())?;
    let epps = (0..a.replicas as usize)
        .map(|i| Epp::new(i, &epp_file, &url, dir.path()))
        .collect::<Result<Vec<_>, _>>()?;
    let endpoints: Vec<(&str, u64)> = sidecars
        .iter()
        .map(String::as_str)
        .zip(ids.iter().copied())
        .collect();
    let pickers: Vec<String> = epps.iter().map(Epp::picker).collect();
    let all_pickers: Vec<&str> = pickers.iter().map(String::as_str).collect();
    let (e_all, p_all, _) = start_fail_open_gateway(
        &a.envoy,
        &all_pickers,
        &endpoints,
        dir.path(),
        "gateway-all",
        1,
    )?;
    let (e_one, p_one, _) = start_fail_open_gateway(
        &a.envoy,
        &all_pickers[..1],
        &endpoints,
        dir.path(),
        "gateway-single",
        1,
    )?;
    Ok(Rig {
        dir,
        nats,
        epps,
        _workers: procs,
        _envoys: vec![e_all, e_one],
        all: format!("http://127.0.0.1:{p_all}"),
        single: format!("http://127.0.0.1:{p_one}"),
    })
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 { a / b } else { f64::NAN }
}

pub async fn run(a: BenchHaArgs) -> Result<(), String> {
    if a.conversations == 0 || a.turns == 0 {
        return Err("--conversations and --turns must be > 0".into());
    }
    if !(a.phase_secs.is_finite() && a.phase_secs > 0.0) {
        return Err("--phase-secs must be > 0".into());
    }
    if !(a.speedup.is_finite() && a.speedup > 0.0) {
        return Err("--speedup must be > 0".into());
    }
    if !(a.restart_after_secs.is_finite() && a.restart_after_secs >= 0.0) {
        return Err("--restart-after-secs must be >= 0".into());
    }
    let say = |s: &str| {
        if !a.json {
            eprintln!("{s}");
        }
    };
    say(&format!(
        "starting nats-server, {} mockers + sidecars, {} EPP replicas, 2 Envoys",
        a.workers, a.replicas
    ));
    let mut rig = setup(&a)?;
    let ready_within = Duration::from_secs(30);
    for e in &rig.epps {
        e.wait_ready(ready_within).await?;
    }
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .map_err(|e| e.to_string())?;
    let mut phases = Vec::new();

    say("phase warm-up");
    drive(&a, &rig.all, 0).await?;

    say("phase single (one replica)");
    let (o, n) = drive(&a, &rig.single, 1).await?;
    phases.push(Phase::new("single", &o, n));

    say("phase steady (every replica)");
    let (o, n) = drive(&a, &rig.all, 2).await?;
    phases.push(Phase::new("steady", &o, n));

    // Kill: the phase runs while the main task kills and restarts one replica.
    say("phase kill (one replica SIGKILLed mid-phase, then restarted)");
    let victim = 1usize;
    let load = {
        let (a2, gw) = (a.clone(), rig.all.clone());
        tokio::spawn(async move { drive(&a2, &gw, 3).await })
    };
    // Early in the phase, so that the restarted replica routes some of it.
    tokio::time::sleep(Duration::from_secs_f64(a.phase_secs * 0.25)).await;
    let before = rig.epps[victim].hit_counters(&http).await;
    let inflight_at_kill = rig.epps[victim]
        .bookings(&http)
        .await
        .map_or(0, |(own, _)| own);
    rig.epps[victim].kill();
    tokio::time::sleep(Duration::from_secs_f64(a.restart_after_secs)).await;
    rig.epps[victim].start()?;
    let ready_after_restart = rig.epps[victim].wait_ready(ready_within).await?;
    let (o, n) = load.await.map_err(|e| e.to_string())??;
    let failed_during_kill = o.errors;
    phases.push(Phase::new("kill", &o, n));

    say("phase restarted (the killed replica back among the others)");
    let (o, n) = drive(&a, &rig.all, 7).await?;
    phases.push(Phase::new("restarted", &o, n));
    let after = rig.epps[victim].hit_counters(&http).await;
    say(&format!(
        "  killed replica's (cached, prompt) tokens with usage: before the kill {before:?}, after its restart {after:?}"
    ));
    let restarted_hit_ratio = match (before, after) {
        (Some((bc, bp)), Some((ac, ap))) if bp > 0.0 && ap > 0.0 && bc > 0.0 => {
            Some((ac / ap) / (bc / bp))
        }
        _ => None,
    };

    say("phase nats-restart (nats-server killed mid-phase and restarted)");
    let load = {
        let (a2, gw) = (a.clone(), rig.all.clone());
        tokio::spawn(async move { drive(&a2, &gw, 4).await })
    };
    tokio::time::sleep(Duration::from_secs_f64(a.phase_secs * 0.5)).await;
    rig.nats.stop();
    tokio::time::sleep(Duration::from_secs(1)).await;
    rig.nats.restart()?;
    let (o, n) = load.await.map_err(|e| e.to_string())??;
    phases.push(Phase::new("nats-restart", &o, n));

    say("phase all-down (every replica stopped; the gateway fails open)");
    for e in &mut rig.epps {
        e.kill();
    }
    let (o, n) = drive(&a, &rig.all, 5).await?;
    let fail_open_success_ratio = ratio((n - o.errors.min(n)) as f64, n as f64);
    phases.push(Phase::new("all-down", &o, n));

    say("phase recovered (the replicas back)");
    for e in &mut rig.epps {
        e.start()?;
    }
    for e in &rig.epps {
        e.wait_ready(ready_within).await?;
    }
    let (o, n) = drive(&a, &rig.all, 6).await?;
    phases.push(Phase::new("recovered", &o, n));

    // Every booking must come back: own ones at each response's end, peers' through sync (a
    // killed replica's, when its silence outlasts the peer timeout).
    let deadline = Instant::now() + Duration::from_secs(20);
    let leaked_bookings = loop {
        let mut total = 0u64;
        for e in &rig.epps {
            let (own, peers) = e
                .bookings(&http)
                .await
                .ok_or_else(|| format!("epp {}: /debug/load did not answer", e.index))?;
            total += own + peers;
        }
        if total == 0 || Instant::now() > deadline {
            break total;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let find = |n: &str| phases.iter().find(|p| p.name == n).cloned();
    let (single, steady, recovered) = (find("single"), find("steady"), find("recovered"));
    let (Some(single), Some(steady), Some(recovered)) = (single, steady, recovered) else {
        return Err("a phase is missing".into());
    };
    let summary = Summary {
        replicas: a.replicas,
        hit_ratio_vs_single: ratio(steady.hit_rate, single.hit_rate),
        ttft_p90_ratio_vs_single: ratio(steady.ttft_p90_ms, single.ttft_p90_ms),
        failed_during_kill,
        inflight_at_kill,
        leaked_bookings,
        ready_after_restart_s: ready_after_restart.as_secs_f64(),
        fail_open_success_ratio,
        hit_after_recovery_ratio: ratio(recovered.hit_rate, steady.hit_rate),
        restarted_hit_ratio,
        phases,
    };
    let _ = rig.dir.path();
    if a.json {
        println!(
            "{}",
            serde_json::to_string(&summary).map_err(|e| e.to_string())?
        );
        return Ok(());
    }
    println!(
        "\n{} EPP replicas behind a real Envoy, {} mockers; {} conversations x {} turns per phase\n",
        a.replicas, a.workers, a.conversations, a.turns
    );
    println!("| phase | requests | failed | hit rate | TTFT p50 (ms) | TTFT p90 (ms) |");
    println!("|---|---|---|---|---|---|");
    for p in &summary.phases {
        println!(
            "| {} | {} | {} | {:.3} | {:.0} | {:.0} |",
            p.name, p.requests, p.failed, p.hit_rate, p.ttft_p50_ms, p.ttft_p90_ms
        );
    }
    let f = |x: Option<f64>| x.map_or("n/a".to_string(), |v| format!("{v:.2}"));
    println!(
        "\nhit rate vs one replica {:.3}, TTFT p90 vs one replica {:.2}; kill: {} failed of {} in flight on the killed replica, ready {:.1} s after restart, its hit rate after / before {}; fail-open success {:.3}; hit rate after recovery / steady {:.3}; bookings left {}",
        summary.hit_ratio_vs_single,
        summary.ttft_p90_ratio_vs_single,
        summary.failed_during_kill,
        summary.inflight_at_kill,
        summary.ready_after_restart_s,
        f(summary.restarted_hit_ratio),
        summary.fail_open_success_ratio,
        summary.hit_after_recovery_ratio,
        summary.leaked_bookings
    );
    Ok(())
}
