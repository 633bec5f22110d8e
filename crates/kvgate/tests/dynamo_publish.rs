#![allow(clippy::unwrap_used, clippy::expect_used)]
//! kvgate mockers publish KV events as Dynamo 1.6 workers do, and NVIDIA Dynamo 1.6.1's own KV
//! router routes on them: two `kvgate mocker`s register in a Dynamo file discovery store
//! (`--dynamo-discovery-dir`) and publish on NATS (one through JetStream, one on core NATS); a
//! real `python -m dynamo.frontend --router-mode kv` discovers them and subscribes to their
//! events. A prompt served by one mocker is then sent to Dynamo's frontend: its router picks
//! that mocker, with as many overlapping blocks as the mocker cached (read from the router's
//! own decision record in its log). The request Dynamo then sends to the worker fails: kvgate's
//! mocker serves OpenAI HTTP, not Dynamo's TCP request plane; the routing decision comes first.

mod common;

use common::{Nats, Proc, TempDir, free_port, metric, tools_dir};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BLOCK: u64 = 16;

/// A Dynamo Python process, killed on drop.
struct Py(Child);

impl Drop for Py {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn model_dir() -> PathBuf {
    let dir = tools_dir().join("dynamo-model");
    assert!(
        dir.join("tokenizer.json").exists(),
        "{} missing: run scripts/setup.sh",
        dir.display()
    );
    dir
}

/// Dynamo's frontend in KV mode over the store, logging its routing decisions to `log`.
fn dynamo_frontend(store: &Path, nats: &str, port: u16, log: &Path) -> Py {
    let py = tools_dir().join("dynamo-venv/bin/python");
    assert!(
        py.exists(),
        "{} missing: run scripts/setup.sh (it installs ai-dynamo 1.6.1 from PyPI)",
        py.display()
    );
    let port = port.to_string();
    let child = Command::new(py)
        .args(["-m", "dynamo.frontend", "--discovery-backend", "file"])
        .args(["--event-plane", "nats", "--request-plane", "tcp"])
        .args(["--router-mode", "kv", "--http-host", "127.0.0.1"])
        .args(["--http-port", &port])
        .env("DYN_FILE_KV", store)
        .env("NATS_SERVER", nats)
        .env("HF_HUB_OFFLINE", "1")
        // The KV router's decision ([ROUTING] Best: worker_W dp_rank=R with N/M blocks
        // overlap) and the indexer's complaints about events it drops.
        .env(
            "DYN_LOG",
            "warn,dynamo_llm::kv_router::routing_host=debug,dynamo_llm::kv_router::indexer=debug",
        )
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .expect("start dynamo.frontend");
    Py(child)
}

fn kvgate_mocker(id: u64, dp: u32, store: &Path, nats: &str, durable: bool) -> Proc {
    let id = id.to_string();
    let dp = dp.to_string();
    let model = model_dir();
    let durable = format!("--durable-kv-events={durable}");
    Proc::start(
        &[
            "mocker",
            "--port",
            "0",
            "--model",
            "qwen",
            "--tokenizer",
            model.to_str().unwrap(),
            "--block-size",
            "16",
            "--num-gpu-blocks",
            "256",
            "--worker-id",
            &id,
            "--dp-size",
            &dp,
            "--speedup-ratio",
            "50",
            "--event-plane",
            "nats",
            "--nats-url",
            nats,
            &durable,
            "--dynamo-discovery-dir",
            store.to_str().unwrap(),
        ],
        2,
    )
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A routing decision of Dynamo's KV router: (worker, dp rank, overlap blocks, request blocks).
fn decisions(log: &Path) -> Vec<(u64, u32, u64, u64)> {
    let text = strip_ansi(&std::fs::read_to_string(log).unwrap_or_default());
    text.lines()
        .filter_map(|l| {
            let rest = l.split("[ROUTING] Best: worker_").nth(1)?;
            let (worker, rest) = rest.split_once(" dp_rank=")?;
            let (rank, rest) = rest.split_once(" with ")?;
            let (blocks, _) = rest.split_once(" blocks overlap")?;
            let (overlap, total) = blocks.split_once('/')?;
            Some((
                worker.parse().ok()?,
                rank.parse().ok()?,
                overlap.parse().ok()?,
                total.parse().ok()?,
            ))
        })
        .collect()
}

fn wait_for<T>(what: &str, secs: u64, log: &Path, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > deadline {
            let text = strip_ansi(&std::fs::read_to_string(log).unwrap_or_default());
            let tail: Vec<&str> = text.lines().rev().take(30).collect();
            panic!(
                "timed out waiting for {what}; Dynamo frontend log tail:\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

async fn complete(
    client: &reqwest::Client,
    base: &str,
    prompt: &str,
    rank: Option<u32>,
) -> (u16, serde_json::Value) {
    let mut req = client.post(format!("{base}/v1/completions"));
    if let Some(rank) = rank {
        req = req.header("x-dynamo-dp-rank", rank.to_string());
    }
    let r = req
        .json(&serde_json::json!({"model": "qwen", "prompt": prompt, "max_tokens": 2}))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or_default())
}

fn nats_published(m: &Proc) -> f64 {
    let text = common::admin_http::get(&format!("{}/metrics", m.url())).unwrap_or_default();
    metric(&text, "kvgate_mocker_nats_messages_published_total").unwrap_or(0.0)
}

/// Caches `prompt` on rank `rank` of mocker `m` (worker `id`), then asks Dynamo's frontend to
/// route it: the router's decision must name that worker and rank with all the prompt's full
/// blocks overlapping.
async fn routes_to_the_cache(
    client: &reqwest::Client,
    frontend: &str,
    log: &Path,
    m: &Proc,
    (id, rank): (u64, u32),
    prompt: &str,
) -> u64 {
    let before = nats_published(m);
    let (status, body) = complete(client, &m.url(), prompt, Some(rank)).await;
    assert_eq!(status, 200, "{body}");
    let prompt_tokens = body["usage"]["prompt_tokens"].as_u64().unwrap();
    let full_blocks = prompt_tokens / BLOCK;
    assert!(full_blocks >= 4, "{prompt_tokens} tokens");
    // The stored event is on the wire (JetStream: acknowledged).
    wait_for("the mocker's KV events", 10, log, || {
        (nats_published(m) > before).then_some(())
    });
    std::thread::sleep(Duration::from_millis(300));
    let seen = decisions(log).len();
    let (status, body) = complete(client, frontend, prompt, None).await;
    // Dynamo's request plane is not the mocker's: the request fails after the decision.
    assert_ne!(status, 200, "{body}");
    let decision = wait_for("Dynamo's routing decision", 10, log, || {
        decisions(log).get(seen).copied()
    });
    assert_eq!(
        decision,
        (
            id,
            rank,
            full_blocks,
            full_blocks + u64::from(prompt_tokens % BLOCK != 0)
        ),
        "Dynamo's router should pick worker {id} rank {rank} with its {full_blocks} cached blocks \
         (decision: worker, dp rank, overlap, request blocks)"
    );
    eprintln!(
        "Dynamo's KV router: worker {} dp_rank {} with {}/{} blocks overlap ({prompt_tokens} prompt tokens cached on kvgate mocker {id} rank {rank})",
        decision.0, decision.1, decision.2, decision.3
    );
    full_blocks
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynamo_kv_router_routes_on_kvgate_mocker_events() {
    let dir = TempDir::new("dynpub");
    let nats = Nats::start(free_port(), &dir.0.join("js"));
    let url = nats.url();
    let store = dir.0.join("dynamo-store");
    // 1001 (two dp ranks, a publisher each) publishes through JetStream (acknowledged), 1002
    // on core NATS: the same bytes.
    let m1 = kvgate_mocker(1001, 2, &store, &url, true);
    let m2 = kvgate_mocker(1002, 1, &store, &url, false);
    let count = |bucket: &str| {
        std::fs::read_dir(store.join("v1").join(bucket))
            .map(|d| d.count())
            .unwrap_or(0)
    };
    assert_eq!(
        (count("instances"), count("mdc"), count("event_sources")),
        (2, 2, 3),
        "each mocker registers an instance, a model card and a kv-events source per rank"
    );
    assert_eq!(
        count("event_channels"),
        5,
        "kv-events per rank, kv_metrics per worker"
    );

    let log = dir.0.join("dynamo-frontend.log");
    let port = free_port();
    let _fe = dynamo_frontend(&store, &url, port, &log);
    let frontend = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    // Serving the model means the KV router is up and subscribed.
    let models = format!("{frontend}/v1/models");
    wait_for("Dynamo's frontend to serve qwen", 40, &log, || {
        let body = common::admin_http::get(&models).ok()?;
        body.contains("\"qwen\"").then_some(())
    });

    let p2 = common::text("dynamo-publish-core-nats", 70);
    let n2 = routes_to_the_cache(&client, &frontend, &log, &m2, (1002, 0), &p2).await;
    let p1 = common::text("dynamo-publish-jetstream", 110);
    let n1 = routes_to_the_cache(&client, &frontend, &log, &m1, (1001, 1), &p1).await;
    assert!(n1 > n2, "the second prompt is longer ({n1} vs {n2} blocks)");

    let text = strip_ansi(&std::fs::read_to_string(&log).unwrap());
    assert!(
        !text.contains("Dropping KV event batch"),
        "Dynamo's indexer dropped kvgate events:\n{text}"
    );
    assert!(
        text.contains("KV source is live-only") && text.contains("worker_id=1001"),
        "Dynamo's router should have found the mockers' event sources:\n{text}"
    );
}
