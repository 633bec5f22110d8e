//! `kvgate bench disagg`: aggregated vs disaggregated serving on the same simulated hardware
//! and the same trace, through the real GAIE path (Envoy -> `kvgate epp` -> direct-mode
//! sidecars -> mockers).
//!
//! Both runs use `--workers` identical simulated engines. Aggregated: every engine serves whole
//! requests. Disaggregated: `--prefill-workers` of them compute prompts (role prefill) and the
//! rest decode (role decode), the KV crossing at `--kv-transfer-gbps`. The workload is the
//! demo's: multi-turn conversations sampled from a Mooncake-format trace, replayed at their
//! (scaled) arrival times.

use crate::demo::{DemoArgs, Outcome, pct, workload};
use crate::procs::{GATEWAY_PLAIN, start_envoy};
use kvgate_core::config::RouterConfig;
use kvgate_engine::{EngineConfig, TimingModel};
use kvgate_frontend::{FrontendConfig, RouterMode};
use kvgate_mocker::{MockerConfig, Role};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

#[derive(clap::Args, Debug, Clone)]
pub struct BenchDisaggArgs {
    #[command(flatten)]
    pub demo: DemoArgs,
    /// Of `--workers`, how many compute prompts in the disaggregated run (default: half).
    #[arg(long)]
    pub prefill_workers: Option<u32>,
    /// Prefill -> decode KV transfer bandwidth, GB/s.
    #[arg(long, default_value_t = 25.0)]
    pub kv_transfer_gbps: f64,
    /// The Envoy binary (scripts/setup.sh installs one into .tools/bin/envoy).
    #[arg(long, env = "KVGATE_ENVOY", default_value = ".tools/bin/envoy")]
    pub envoy: PathBuf,
}

async fn start_mocker(
    id: u64,
    role: Role,
    a: &BenchDisaggArgs,
) -> Result<(SocketAddr, String), String> {
    let config = MockerConfig {
        port: 0,
        worker_id: id,
        role,
        engine: EngineConfig {
            block_size: 16,
            num_gpu_blocks: a.demo.kv_blocks,
            max_num_seqs: 64,
            max_num_batched_tokens: 8192,
            enable_prefix_caching: true,
            timing: TimingModel::default(),
        },
        speedup_ratio: a.demo.speedup_ratio,
        zmq_kv_events: Some("tcp://127.0.0.1:0".into()),
        kv_transfer_gbps: a.kv_transfer_gbps,
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

async fn start_sidecar(workers: PathBuf) -> Result<SocketAddr, String> {
    let config = FrontendConfig {
        host: "127.0.0.1".into(),
        port: 0,
        workers_file: workers,
        mode: RouterMode::Direct,
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
            eprintln!("sidecar: {e}");
        }
    });
    rx.await.map_err(|_| "a sidecar did not start".to_string())
}

async fn start_epp(workers: PathBuf) -> Result<SocketAddr, String> {
    let config = kvgate_epp::EppConfig {
        host: "127.0.0.1".into(),
        grpc_port: 0,
        health_port: 0,
        metrics_port: 0,
        secure_serving: false,
        cert_path: None,
        client_ca: None,
        workers: kvgate_epp::WorkerSource::File(workers),
        router: RouterConfig::default(),
        tokenizer: None,
        max_request_body_bytes: 64 << 20,
        max_endpoints: 1,
        tokenize_timeout: Duration::from_secs(30),
        accept_token_data: true,
        decision_log: 16,
        pool_name: "bench".into(),
        event_plane: kvgate_runtime::routing::EventPlane::Zmq,
        replica_sync: None,
    };
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        if let Err(e) = kvgate_epp::serve(config, move |b| {
            let _ = tx.send(b.grpc);
        })
        .await
        {
            eprintln!("epp: {e}");
        }
    });
    rx.await.map_err(|_| "the EPP did not start".to_string())
}

/// One configuration: `prefill` engines of role prefill (0 = aggregated), the rest serving.
pub(crate) async fn run_config(
    a: &BenchDisaggArgs,
    reqs: &Arc<Vec<crate::demo::DemoRequest>>,
    prefill: u32,
    dir: &Path,
    label: &str,
) -> Result<Outcome, String> {
    let mut engines = Vec::new();
    for i in 0..a.demo.workers {
        let id = 5000 + u64::from(i) + if prefill > 0 { 100 } else { 0 };
        let role = if i < prefill {
            Role::Prefill
        } else if prefill > 0 {
            Role::Decode
        } else {
            Role::Aggregated
        };
        let (addr, zmq) = start_mocker(id, role, a).await?;
        engines.push((id, role, addr, zmq));
    }
    let role_name = |r: Role| match r {
        Role::Prefill => "prefill",
        Role::Decode => "decode",
        Role::Aggregated => "aggregated",
    };
    // The sidecars' view: every engine by its own address.
    let mut side = String::from("model: qwen3\nblock_size: 16\nworkers:\n");
    for (id, role, addr, _) in &engines {
        side.push_str(&format!(
            "  - {{name: e{id}, id: {id}, url: 'http://{addr}', role: {}}}\n",
            role_name(*role)
        ));
    }
    let side_file = dir.join(format!("{label}-sidecar.yaml"));
    std::fs::write(&side_file, side).map_err(|e| e.to_string())?;
    // The EPP's view: serving engines behind their pod sidecar, prefill engines direct.
    let mut pool = String::from("model: qwen3\nblock_size: 16\nworkers:\n");
    for (id, role, addr, zmq) in &engines {
        let url = if *role == Role::Prefill {
            format!("http://{addr}")
        } else {
            format!("http://{}", start_sidecar(side_file.clone()).await?)
        };
        pool.push_str(&format!(
            "  - {{name: e{id}, id: {id}, url: '{url}', role: {}, total_kv_blocks: {}, max_num_batched_tokens: 8192, kv_events: '{zmq}'}}\n",
            role_name(*role),
            a.demo.kv_blocks
        ));
    }
    let pool_file = dir.join(format!("{label}-pool.yaml"));
    std::fs::write(&pool_file, pool).map_err(|e| e.to_string())?;
    let epp = start_epp(pool_file).await?;
    let (envoy, port) = tokio::task::block_in_place(|| {
        start_envoy(
            &a.envoy,
            GATEWAY_PLAIN,
            &[
                ("EPP_HOST", epp.ip().to_string()),
                ("EPP_PORT", epp.port().to_string()),
                ("FAILURE_MODE_ALLOW", "false".to_string()),
            ],
            dir,
            label,
            1,
        )
    })?;
    let url = format!("http://127.0.0.1:{port}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let o = crate::demo::replay(&url, reqs, label, !a.demo.json).await;
    drop(envoy);
    o
}

pub async fn run(a: BenchDisaggArgs) -> Result<(), String> {
    if !a.envoy.exists() {
        return Err(format!(
            "Envoy not found at {} (run scripts/setup.sh, or pass --envoy / KVGATE_ENVOY)",
            a.envoy.display()
        ));
    }
    let prefill = a.prefill_workers.unwrap_or(a.demo.workers / 2);
    if a.demo.workers < 2 || prefill == 0 || prefill >= a.demo.workers {
        return Err(format!(
            "--prefill-workers must leave at least one prefill and one decode worker among --workers {}",
            a.demo.workers
        ));
    }
    let (reqs, bound) = workload(&a.demo)?;
    let reqs = Arc::new(reqs);
    let dir = std::env::temp_dir().join(format!("kvgate-bench-disagg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    if !a.demo.json {
        eprintln!(
            "kvgate bench disagg: {} engines ({} prefill + {} decode when disaggregated), {} requests, ~{:.0}s per run, KV transfer {} GB/s",
            a.demo.workers,
            prefill,
            a.demo.workers - prefill,
            reqs.len(),
            a.demo.duration_secs,
            a.kv_transfer_gbps
        );
    }
    let mut rows = Vec::new();
    for (label, p) in [("aggregated", 0), ("disaggregated", prefill)] {
        let mut o = run_config(&a, &reqs, p, &dir, label).await?;
        rows.push(serde_json::json!({
            "mode": label,
            "requests": o.ttft.len(),
            "errors": o.errors,
            "decode_side_hit_rate": o.cached_tokens as f64 / o.prompt_tokens.max(1) as f64,
            "ttft_p50_ms": pct(&mut o.ttft, 0.5),
            "ttft_p90_ms": pct(&mut o.ttft, 0.9),
            "e2e_p50_ms": pct(&mut o.e2e, 0.5),
            "e2e_p90_ms": pct(&mut o.e2e, 0.9),
            "throughput_tok_s": (o.prompt_tokens + o.output_tokens) as f64 / o.wall.max(1e-9),
        }));
    }
    let _ = std::fs::remove_dir_all(&dir);
    if a.demo.json {
        println!(
            "{}",
            serde_json::json!({"modes": rows, "reuse_bound": bound})
        );
        return Ok(());
    }
    println!(
        "\n{:<14} {:>8} {:>7} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "mode", "requests", "errors", "TTFT p50", "TTFT p90", "e2e p50", "e2e p90", "tokens/s"
    );
    for r in &rows {
        let f = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
        println!(
            "{:<14} {:>8} {:>7} {:>8.1}ms {:>8.1}ms {:>8.1}ms {:>8.1}ms {:>10.0}",
            r["mode"].as_str().unwrap_or(""),
            r["requests"].as_u64().unwrap_or(0),
            r["errors"].as_u64().unwrap_or(0),
            f("ttft_p50_ms"),
            f("ttft_p90_ms"),
            f("e2e_p50_ms"),
            f("e2e_p90_ms"),
            f("throughput_tok_s"),
        );
    }
    println!(
        "\nSame engines, trace and arrival times; simulated engine time / speed-up {}. Both runs go through Envoy + kvgate epp + direct-mode sidecars.",
        a.demo.speedup_ratio
    );
    Ok(())
}
