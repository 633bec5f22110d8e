//! The seed's topology with the real NVIDIA Dynamo 1.6.1 from PyPI (`scripts/setup.sh` installs
//! it into `.tools/dynamo-venv`): real Envoy → `kvgate epp` (workers from Dynamo's file
//! discovery store, KV events from the Dynamo workers over core NATS) → a real
//! `python -m dynamo.frontend --router-mode direct` sidecar → real `python -m dynamo.mocker`
//! workers, one of them with two data-parallel ranks. Nothing is written by hand: no workers
//! file, no stream, no worker ids.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Envoy, Nats, Proc, TempDir, free_port, tools_dir};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A Dynamo Python process, killed on drop.
struct Py {
    child: Child,
    what: String,
}

impl Drop for Py {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn dynamo_python() -> PathBuf {
    let py = tools_dir().join("dynamo-venv/bin/python");
    assert!(
        py.exists(),
        "{} missing: run scripts/setup.sh (it installs ai-dynamo 1.6.1 from PyPI)",
        py.display()
    );
    py
}

fn dynamo(what: &str, args: &[&str], store: &Path, nats: &str) -> Py {
    dynamo_env(what, args, store, nats, &[])
}

fn dynamo_env(what: &str, args: &[&str], store: &Path, nats: &str, env: &[(&str, &str)]) -> Py {
    let mut child = Command::new(dynamo_python())
        .args(["-m", what])
        .args(args)
        .envs(env.iter().copied())
        .env("DYN_FILE_KV", store)
        .env("NATS_SERVER", nats)
        .env("DYN_LOG", "warn")
        .env("HF_HUB_OFFLINE", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("start {what}: {e}"));
    std::thread::sleep(Duration::from_millis(100));
    if let Ok(Some(status)) = child.try_wait() {
        panic!("{what} exited at once: {status}");
    }
    Py {
        child,
        what: what.to_string(),
    }
}

impl Py {
    fn alive(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("{} exited: {status}", self.what);
        }
    }
}

fn model_dir() -> String {
    let m = tools_dir().join("dynamo-model");
    assert!(
        m.join("config.json").exists(),
        "{} missing: run scripts/setup.sh",
        m.display()
    );
    m.to_str().unwrap().to_string()
}

/// Dynamo mocker processes (`n` workers of `dp` ranks each) registering in `store`.
fn mockers(n: u32, dp: u32, store: &Path, nats: &str) -> Py {
    mockers_with(n, dp, store, nats, &[])
}

fn mockers_with(n: u32, dp: u32, store: &Path, nats: &str, extra: &[&str]) -> Py {
    let (n, dp) = (n.to_string(), dp.to_string());
    let model = model_dir();
    let mut args = vec![
        "--model-path",
        &model,
        "--model-name",
        "qwen",
        "--discovery-backend",
        "file",
        "--event-plane",
        "nats",
        "--request-plane",
        "tcp",
        "--num-workers",
        &n,
        "--data-parallel-size",
        &dp,
        "--speedup-ratio",
        "20",
        "--block-size",
        "16",
        "--num-gpu-blocks-override",
        "4096",
    ];
    args.extend_from_slice(extra);
    dynamo("dynamo.mocker", &args, store, nats)
}

/// `kvgate epp` on loopback (ephemeral ports, plaintext), its workers from Dynamo's store
/// (`discovery`: the backend flags), its events from NATS, tokenizing as the Dynamo workers do.
fn dynamo_epp(discovery: &[&str], sidecar: &str, nats: &str) -> Proc {
    let model = model_dir();
    let mut args = vec![
        "epp",
        "--host",
        "127.0.0.1",
        "--grpc-port",
        "0",
        "--health-port",
        "0",
        "--metrics-port",
        "0",
        "--secure-serving=false",
        "--dynamo-sidecar-url",
        sidecar,
        "--event-plane",
        "nats",
        "--nats-url",
        nats,
        "--tokenizer",
        &model,
    ];
    args.extend_from_slice(discovery);
    Proc::start(&args, 3)
}

/// A real etcd (Debian's etcd-server, installed by scripts/setup.sh) on loopback.
struct Etcd {
    child: Child,
    url: String,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Etcd {
    fn start(dir: &Path) -> Etcd {
        let bin = tools_dir().join("bin/etcd");
        assert!(
            bin.exists(),
            "{} missing: run scripts/setup.sh",
            bin.display()
        );
        let (client, peer) = (free_port(), free_port());
        let url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let child = Command::new(bin)
            .arg("--data-dir")
            .arg(dir.join("etcd"))
            .args([
                "--listen-client-urls",
                &url,
                "--advertise-client-urls",
                &url,
            ])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("default={peer_url}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start etcd");
        let etcd = Etcd { child, url };
        wait_for("etcd", 15, || {
            common::admin_http::get(&format!("{}/health", etcd.url))
                .is_ok_and(|b| b.contains("true"))
        });
        etcd
    }
}

fn sidecar(port: u16, store: &Path, nats: &str, mode: &str) -> Py {
    let port = port.to_string();
    dynamo(
        "dynamo.frontend",
        &[
            "--discovery-backend",
            "file",
            "--event-plane",
            "nats",
            "--request-plane",
            "tcp",
            "--router-mode",
            mode,
            "--http-host",
            "127.0.0.1",
            "--http-port",
            &port,
        ],
        store,
        nats,
    )
}

/// Model cards (`v1/mdc/...`) registered in the store.
fn cards(store: &Path) -> Vec<serde_json::Value> {
    let Ok(dir) = std::fs::read_dir(store.join("v1/mdc")) else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| std::fs::read(e.path()).ok())
        .filter_map(|b| serde_json::from_slice(&b).ok())
        .collect()
}

fn wait_for(what: &str, secs: u64, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
}

async fn get_json(url: &str) -> serde_json::Value {
    let r = client().get(url).send().await.unwrap();
    r.json().await.unwrap()
}

async fn chat(url: &str, body: &serde_json::Value) -> (u16, serde_json::Value) {
    let r = client()
        .post(format!("{url}/v1/chat/completions"))
        .json(body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)),
    )
}

fn words(tag: &str, n: usize) -> String {
    (0..n)
        .map(|i| format!("{tag}{}", i % 97))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The whole topology, up and reading the workers' events.
struct Seed {
    nats: Nats,
    workers: Vec<Py>,
    side: Py,
    side_url: String,
    _epp: Proc,
    epp_http: String,
    envoy: Envoy,
    store: PathBuf,
    _dir: TempDir,
}

impl Seed {
    /// Two Dynamo workers with two data-parallel ranks each: four ranks.
    async fn start() -> Seed {
        Self::start_with(|store, nats| (vec![mockers(2, 2, store, nats)], 2)).await
    }

    /// `workers(store, nats)` starts the Dynamo worker processes and says how many model cards
    /// they register.
    async fn start_with(workers: impl FnOnce(&Path, &str) -> (Vec<Py>, usize)) -> Seed {
        let dir = TempDir::new("dynamo-seed");
        let store = dir.0.join("store");
        std::fs::create_dir_all(&store).unwrap();
        let nats = Nats::start(free_port(), &dir.0.join("js"));
        let nats_url = nats.url();
        let (workers, n_cards) = workers(&store, &nats_url);
        wait_for("the Dynamo workers to register", 60, || {
            cards(&store).len() >= n_cards
        });
        let sidecar_port = free_port();
        let mut side = sidecar(sidecar_port, &store, &nats_url, "direct");
        let side_url = format!("http://127.0.0.1:{sidecar_port}");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            side.alive();
            if let Ok(r) = client().get(format!("{side_url}/v1/models")).send().await
                && let Ok(v) = r.json::<serde_json::Value>().await
                && v["data"][0]["id"] == "qwen"
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the Dynamo sidecar did not list the model"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }

        let store_s = store.to_str().unwrap();
        let epp = dynamo_epp(
            &[
                "--discovery-backend",
                "file",
                "--discovery-file-dir",
                store_s,
            ],
            &side_url,
            &nats_url,
        );
        let epp_http = epp.url();
        let grpc = epp.grpc();
        let (host, port) = grpc.rsplit_once(':').unwrap();
        let envoy = Envoy::start(
            "gateway.yaml",
            &[
                ("EPP_HOST", host),
                ("EPP_PORT", port),
                ("FAILURE_MODE_ALLOW", "false"),
            ],
        );

        Seed {
            nats,
            workers,
            side,
            side_url,
            _epp: epp,
            epp_http,
            envoy,
            store,
            _dir: dir,
        }
    }

    async fn events_flowing(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while get_json(&format!("{}/debug/index", self.epp_http)).await["event_plane_connected"]
            != true
        {
            assert!(Instant::now() < deadline, "the EPP did not connect to NATS");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // A stream is ready once its consumer exists: give JetStream a moment.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    async fn metric(&self, name: &str) -> f64 {
        let text = reqwest::get(format!("{}/metrics", self.epp_http))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        common::metric(&text, name).unwrap_or(0.0)
    }

    /// Multi-turn conversations through the gateway, each request checked against the EPP's
    /// decision for it. Returns the hit rate the workers reported.
    async fn conversations(&mut self, tag: &str, n: usize) -> f64 {
        let (gw, epp_http) = (self.envoy.url(), self.epp_http.clone());
        let mut checked_followups = 0;
        let mut followup_ranks = std::collections::BTreeSet::new();
        let mut prompt_tokens = 0u64;
        let mut cached_tokens = 0u64;
        for c in 0..n {
            let mut messages = vec![serde_json::json!({"role": "system",
                "content": format!("conversation {tag}{c}: {}", words(&format!("{tag}c{c}w"), 120))})];
            for turn in 0..3 {
                messages.push(serde_json::json!({"role": "user",
                    "content": format!("turn {turn}: {}", words(&format!("{tag}c{c}t{turn}u"), 40))}));
                let body =
                    serde_json::json!({"model": "qwen", "max_tokens": 8, "messages": messages});
                let (status, v) = chat(&gw, &body).await;
                assert_eq!(status, 200, "conversation {c} turn {turn}: {v}");
                for w in &mut self.workers {
                    w.alive();
                }
                self.side.alive();
                let usage = &v["usage"];
                let pt = usage["prompt_tokens"].as_u64().unwrap();
                let cached = usage["prompt_tokens_details"]["cached_tokens"]
                    .as_u64()
                    .unwrap_or(0);
                prompt_tokens += pt;
                cached_tokens += cached;
                // The decision the EPP made for this request.
                let d = get_json(&format!("{epp_http}/debug/decisions?n=1")).await;
                let d = &d["decisions"][0];
                // The worker counted exactly the ids the EPP injected.
                assert_eq!(
                    d["isl_tokens"].as_u64(),
                    Some(pt),
                    "the injected nvext.token_data should be what the worker served: {d} vs {usage}"
                );
                if turn > 0 {
                    let predicted = d["predicted_cached_tokens"].as_u64().unwrap();
                    assert!(
                        predicted >= 16 * 8,
                        "turn {turn} of conversation {tag}{c} should find its history in the EPP's index (fed by the Dynamo workers' events): {d}"
                    );
                    // The sidecar sent it to the chosen worker and rank: the cache the EPP saw
                    // there is the cache the worker hit.
                    assert!(
                        cached >= predicted,
                        "conversation {tag}{c} turn {turn}: the EPP predicted {predicted} cached tokens on worker {} rank {}, the worker reported {cached}: {v}",
                        d["worker_id"],
                        d["dp_rank"]
                    );
                    checked_followups += 1;
                    followup_ranks.insert((d["worker_id"].as_u64(), d["dp_rank"].as_u64()));
                }
                let text = v["choices"][0]["message"]["content"]
                    .as_str()
                    .unwrap_or("")
                    .to_string();
                messages.push(serde_json::json!({"role": "assistant", "content": text}));
            }
        }
        assert_eq!(checked_followups, 2 * n);
        if n >= 8 {
            assert!(
                followup_ranks.iter().any(|(_, r)| *r == Some(1)),
                "some follow-ups should have been routed to data-parallel rank 1: {followup_ranks:?}"
            );
            assert!(
                followup_ranks.len() >= 3,
                "the conversations should spread over the ranks: {followup_ranks:?}"
            );
        }
        cached_tokens as f64 / prompt_tokens as f64
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_epp_dynamo_sidecar_and_dynamo_workers_route_as_one() {
    let mut seed = Seed::start().await;
    let (side_url, store) = (seed.side_url.clone(), seed.store.clone());
    // The sidecar itself honours injected token ids: 50 ids in, 50 prompt tokens counted,
    // whatever the messages say.
    let ids: Vec<u32> = (1000..1050).collect();
    let cards_now = cards(&store);
    let some_worker = cards_now[0]["instance_id"].as_u64().unwrap();
    let r = client()
        .post(format!("{side_url}/v1/chat/completions"))
        .header("x-dynamo-worker-instance-id", some_worker.to_string())
        .json(&serde_json::json!({"model": "qwen", "max_tokens": 2,
            "messages": [{"role": "user", "content": "hi"}], "nvext": {"token_data": ids}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["usage"]["prompt_tokens"], 50, "{v}");

    // The EPP found the four ranks from Dynamo's own records: one load series per rank.
    let metrics = reqwest::get(format!("{}/metrics", seed.epp_http))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let ranks: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("kvgate_router_active_blocks{"))
        .collect();
    assert_eq!(ranks.len(), 4, "2 workers x 2 ranks: {ranks:?}");
    for card in &cards_now {
        let id = card["instance_id"].as_u64().unwrap();
        assert!(
            ranks
                .iter()
                .any(|l| l.contains(&format!("worker=\"{id}\""))),
            "worker {id} missing: {ranks:?}"
        );
    }

    seed.events_flowing().await;
    // First turns are cold on an idle fleet, so they tie over the 4 ranks at random: 8 of them
    // land on 2 ranks or fewer ~2% of the time (seen in CI), 12 about 0.15%.
    let hit = seed.conversations("a", 12).await;
    assert!(hit > 0.4, "hit rate {hit:.3}");
    // Events came from the real workers, none failed to decode or was skipped.
    let applied = seed.metric("kvgate_kv_events_applied_total").await;
    assert!(applied >= 24.0, "events applied: {applied}");
    assert_eq!(
        seed.metric("kvgate_kv_event_decode_errors_total").await,
        0.0
    );
    assert_eq!(seed.metric("kvgate_kv_events_skipped_total").await, 0.0);
}

/// Dynamo workers publish on core NATS and kvgate keeps them in a JetStream stream of its own:
/// across a NATS restart both sides reconnect and routing goes on finding the caches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_restart_under_real_dynamo_workers_loses_no_routing() {
    let mut seed = Seed::start().await;
    seed.events_flowing().await;
    let before = seed.conversations("b", 3).await;
    assert!(before > 0.4, "hit rate before the restart {before:.3}");
    let applied_before = seed.metric("kvgate_kv_events_applied_total").await;
    seed.nats.restart();
    // Both the EPP and the Dynamo workers reconnect on their own.
    let deadline = Instant::now() + Duration::from_secs(30);
    while seed.metric("kvgate_kv_event_plane_disconnects_total").await < 1.0
        || get_json(&format!("{}/debug/index", seed.epp_http)).await["event_plane_connected"]
            != true
    {
        assert!(
            Instant::now() < deadline,
            "the EPP did not see NATS go and come back"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The Dynamo workers' clients reconnect with backoff: give them a moment.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = seed.conversations("c", 3).await;
    assert!(after > 0.4, "hit rate after the restart {after:.3}");
    assert!(seed.metric("kvgate_kv_events_applied_total").await > applied_before);
    assert_eq!(
        seed.metric("kvgate_kv_event_decode_errors_total").await,
        0.0
    );
}

/// Rank series the EPP exports: one per worker rank it routes to.
async fn known_ranks(epp_http: &str) -> usize {
    let text = reqwest::get(format!("{epp_http}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .filter(|l| l.starts_with("kvgate_router_active_blocks{"))
        .count()
}

/// Dynamo workers that join are routed to within a discovery poll; one killed without
/// deregistering leaves when its records expire.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynamo_workers_that_come_and_go_are_followed() {
    let seed = Seed::start().await;
    assert_eq!(known_ranks(&seed.epp_http).await, 4);
    let nats_url = seed.nats.url();
    let extra = mockers(1, 1, &seed.store, &nats_url);
    let t0 = Instant::now();
    while known_ranks(&seed.epp_http).await != 5 {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the new worker was not discovered"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // SIGKILL: no deregistration, the records just stop being refreshed.
    drop(extra);
    let t1 = Instant::now();
    while known_ranks(&seed.epp_http).await != 4 {
        assert!(
            t1.elapsed() < Duration::from_secs(30),
            "the killed worker was still routed to after 30 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!(
        "joined in {:.1} s, killed worker gone in {:.1} s",
        t0.elapsed().as_secs_f64() - t1.elapsed().as_secs_f64(),
        t1.elapsed().as_secs_f64()
    );
}

/// `scripts/interop.sh`'s comparison: kvgate's EPP against Dynamo's own kv router and
/// round-robin on the same real Dynamo workers, hit rates as the workers report them.
#[test]
fn interop_script_kvgate_hits_at_least_as_often_as_dynamos_own_router() {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../scripts/interop.py");
    let out = Command::new(dynamo_python())
        .arg(&script)
        .args(["--kvgate", env!("CARGO_BIN_EXE_kvgate")])
        // The script's own workload (40 conversations x 6 turns, 2 rounds): a smaller one that
        // never fills the caches puts every router that keeps conversations together at the
        // workload's reuse ceiling, where they tie to a few tokens.
        .stderr(Stdio::inherit())
        .output()
        .expect("run scripts/interop.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "interop.py failed: {stdout}");
    let last = stdout.lines().last().expect("interop.py printed nothing");
    let v: serde_json::Value = serde_json::from_str(last).expect("the last line is JSON");
    for k in [
        "kvgate_hit",
        "dynamo_hit",
        "round_robin_hit",
        "errors",
        "events_decoded",
        "events_failed",
    ] {
        assert!(v.get(k).is_some(), "key {k} missing: {v}");
    }
    let hit = |k: &str| v[k].as_f64().unwrap();
    assert_eq!(v["errors"], 0, "{v}");
    assert_eq!(v["events_failed"], 0, "{v}");
    assert!(v["events_decoded"].as_u64().unwrap() > 100, "{v}");
    assert!(
        hit("kvgate_hit") >= hit("dynamo_hit"),
        "kvgate's hit rate should be at least Dynamo's own router's: {v}"
    );
    assert!(hit("dynamo_hit") > hit("round_robin_hit"), "{v}");
}

/// A disaggregated Dynamo graph: a prefill worker (Dynamo registers it under the `prefill`
/// component) and a decode worker. The EPP takes both from the store, reads both components'
/// events, and routes each request disaggregated: the prefill worker computes the prompt (its
/// events index it) and later turns find their history there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disaggregated_requests_through_dynamo_prefill_and_decode_workers() {
    let seed = Seed::start_with(|store, nats| {
        (
            vec![
                mockers_with(1, 1, store, nats, &["--disaggregation-mode", "prefill"]),
                mockers_with(1, 1, store, nats, &["--disaggregation-mode", "decode"]),
            ],
            2,
        )
    })
    .await;
    let kinds: std::collections::BTreeMap<String, u64> = cards(&seed.store)
        .iter()
        .map(|c| {
            (
                c["card_json"]["worker_type"].as_str().unwrap().to_string(),
                c["instance_id"].as_u64().unwrap(),
            )
        })
        .collect();
    let prefill = kinds["prefill"];
    assert!(kinds.contains_key("decode"), "{kinds:?}");
    seed.events_flowing().await;
    let gw = seed.envoy.url();
    let mut cached_later_turns = 0;
    for c in 0..3 {
        let mut messages = vec![serde_json::json!({"role": "system",
            "content": format!("disagg {c}: {}", words(&format!("pd{c}w"), 120))})];
        for turn in 0..2 {
            messages.push(serde_json::json!({"role": "user",
                "content": format!("turn {turn}: {}", words(&format!("pd{c}t{turn}"), 30))}));
            let body = serde_json::json!({"model": "qwen", "max_tokens": 6, "messages": messages});
            let (status, v) = chat(&gw, &body).await;
            assert_eq!(status, 200, "conversation {c} turn {turn}: {v}");
            if turn > 0 {
                cached_later_turns += v["usage"]["prompt_tokens_details"]["cached_tokens"]
                    .as_u64()
                    .unwrap_or(0);
            }
            let text = v["choices"][0]["message"]["content"].as_str().unwrap_or("");
            messages.push(serde_json::json!({"role": "assistant", "content": text}));
        }
    }
    // The prefill worker's own events (on the `prefill` component's subject) filled the index.
    let index = get_json(&format!("{}/debug/index", seed.epp_http)).await;
    let prefill_blocks = index["ranks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["worker_id"].as_u64() == Some(prefill))
        .map(|r| r["blocks"].as_array().map_or(0, |b| b.len()))
        .sum::<usize>();
    assert!(
        prefill_blocks >= 3 * 8,
        "the prefill worker's blocks should be indexed: {index}"
    );
    assert!(
        cached_later_turns > 0,
        "later turns should hit the prefill worker's cache"
    );
    assert_eq!(
        seed.metric("kvgate_kv_event_decode_errors_total").await,
        0.0
    );
}

/// Dynamo's etcd discovery backend: the EPP finds the workers in a real etcd, and a worker that
/// stops (its lease revoked) leaves routing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_discovery_finds_the_dynamo_workers() {
    let dir = TempDir::new("dynamo-etcd");
    let etcd = Etcd::start(&dir.0);
    let nats = Nats::start(free_port(), &dir.0.join("js"));
    let store = dir.0.join("unused-file-store");
    let env = [
        ("ETCD_ENDPOINTS", etcd.url.as_str()),
        ("ETCD_LEASE_TTL", "3"),
    ];
    let args = |n: &'static str| {
        vec![
            "--model-path".to_string(),
            model_dir(),
            "--model-name".into(),
            "qwen".into(),
            "--discovery-backend".into(),
            "etcd".into(),
            "--event-plane".into(),
            "nats".into(),
            "--request-plane".into(),
            "tcp".into(),
            "--num-workers".into(),
            n.into(),
            "--speedup-ratio".into(),
            "20".into(),
            "--block-size".into(),
            "16".into(),
        ]
    };
    let a2 = args("2");
    let a2: Vec<&str> = a2.iter().map(String::as_str).collect();
    let _two = dynamo_env("dynamo.mocker", &a2, &store, &nats.url(), &env);
    let epp = dynamo_epp(
        &["--discovery-backend", "etcd", "--etcd-endpoints", &etcd.url],
        "http://127.0.0.1:9",
        &nats.url(),
    );
    let epp_http = epp.url();
    let t0 = Instant::now();
    while known_ranks(&epp_http).await != 2 {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "2 workers from etcd"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let a1 = args("1");
    let a1: Vec<&str> = a1.iter().map(String::as_str).collect();
    let mut one = dynamo_env("dynamo.mocker", &a1, &store, &nats.url(), &env);
    while known_ranks(&epp_http).await != 3 {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the third worker from etcd"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // SIGTERM: Dynamo revokes the worker's lease, its records go.
    let _ = Command::new("kill")
        .args(["-TERM", &one.child.id().to_string()])
        .status();
    let _ = one.child.wait();
    let t1 = Instant::now();
    while known_ranks(&epp_http).await != 2 {
        assert!(
            t1.elapsed() < Duration::from_secs(20),
            "the stopped worker left etcd"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
