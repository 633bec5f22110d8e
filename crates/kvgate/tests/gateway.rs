#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The GAIE path end to end with real processes: Envoy 1.40 (from `deploy/envoy/`) as the
//! gateway, `kvgate epp` as its ext_proc endpoint picker, `kvgate frontend --router-mode direct`
//! as each worker pod's sidecar, and mockers as the engines (KV events over ZMQ to the EPP).
//! Needs `.tools/bin/envoy` (scripts/setup.sh installs it); fails, never skips, without it.

mod common;

use common::*;
use futures::StreamExt;
use std::time::Duration;

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
}

struct Cluster {
    _mockers: Vec<Proc>,
    sidecars: Vec<Proc>,
    epp: Proc,
    /// More EPP replicas behind the same Envoy (`Options::epps` > 1).
    replicas: Vec<Proc>,
    /// The EPPs' workers file and flags (to start another replica).
    epp_file: std::path::PathBuf,
    epp_flags: Vec<String>,
    envoy: Envoy,
    ids: Vec<u64>,
    _dir: TempDir,
}

struct Options<'a> {
    workers: usize,
    speedup: f64,
    epp_flags: &'a [&'a str],
    tls: bool,
    /// EPP replicas behind the gateway's ext_proc cluster.
    epps: usize,
}

impl Default for Options<'_> {
    fn default() -> Self {
        Options {
            workers: 2,
            speedup: 20.0,
            epp_flags: &[],
            tls: false,
            epps: 1,
        }
    }
}

fn cluster(o: Options<'_>) -> Cluster {
    let ids: Vec<u64> = (0..o.workers as u64).map(|i| 1001 + i).collect();
    let mockers: Vec<Proc> = ids.iter().map(|id| mocker(*id, o.speedup, &[])).collect();
    let dir = TempDir::new("gw");
    let pairs: Vec<(&Proc, u64)> = mockers.iter().zip(ids.iter().copied()).collect();
    // The sidecars know the engine behind each instance id...
    let sidecar_file = workers_file(&dir, &pairs, None);
    let sidecars: Vec<Proc> = (0..o.workers)
        .map(|_| frontend(&sidecar_file, "direct", &[]))
        .collect();
    // ...and the EPP knows the pods' sidecar endpoints and the engines' event publishers.
    let mut y = String::from("model: qwen3\nblock_size: 16\nworkers:\n");
    for (i, id) in ids.iter().enumerate() {
        y.push_str(&format!(
            "  - name: pod-{i}\n    id: {id}\n    url: {}\n    total_kv_blocks: 4096\n    max_num_batched_tokens: 8192\n    kv_events: {}\n",
            sidecars[i].url(),
            mockers[i].zmq()
        ));
    }
    let epp_file = dir.0.join("epp-workers.yaml");
    std::fs::write(&epp_file, y).unwrap();
    let mut flags: Vec<&str> = Vec::new();
    if !o.tls {
        flags.push("--secure-serving=false");
    }
    flags.extend_from_slice(o.epp_flags);
    let epp = epp(&epp_file, &flags);
    let replicas: Vec<Proc> = (1..o.epps)
        .map(|_| common::epp(&epp_file, &flags))
        .collect();
    let grpc = epp.grpc();
    let (host, port) = grpc.rsplit_once(':').unwrap();
    // The first EPP is the template's endpoint; the other replicas join its cluster.
    let endpoint = format!("port_value: {port}}}}}}}");
    let extra: Vec<String> = replicas.iter().map(|r| r.grpc()).collect();
    let envoy = Envoy::start_edited(
        if o.tls {
            "gateway-tls.yaml"
        } else {
            "gateway.yaml"
        },
        &[
            ("EPP_HOST", host),
            ("EPP_PORT", port),
            ("FAILURE_MODE_ALLOW", "false"),
        ],
        |cfg| {
            let mut out = String::new();
            for line in cfg.lines() {
                out.push_str(line);
                out.push('\n');
                if line.trim_start().starts_with("- endpoint:") && line.ends_with(&endpoint) {
                    for hp in &extra {
                        let (h, p) = hp.rsplit_once(':').unwrap();
                        let indent = &line[..line.len() - line.trim_start().len()];
                        out.push_str(&format!(
                            "{indent}- endpoint: {{address: {{socket_address: {{address: {h}, port_value: {p}}}}}}}\n"
                        ));
                    }
                }
            }
            assert_eq!(
                out.matches("- endpoint:").count(),
                cfg.matches("- endpoint:").count() + extra.len(),
                "the EPP endpoint was not found in the gateway template"
            );
            out
        },
    );
    Cluster {
        _mockers: mockers,
        sidecars,
        epp,
        replicas,
        epp_file,
        epp_flags: flags.iter().map(|f| f.to_string()).collect(),
        envoy,
        ids,
        _dir: dir,
    }
}

impl Cluster {
    async fn epp_metrics(&self) -> String {
        get_text(&format!("{}/metrics", self.epp.url())).await
    }

    /// Waits until the EPP has indexed at least `n` prefixes from the workers' KV events.
    async fn wait_indexed(&self, n: f64) {
        for _ in 0..200 {
            if metric(&self.epp_metrics().await, "kvgate_router_index_nodes").unwrap_or(0.0) >= n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the EPP never indexed {n} blocks from the workers' events");
    }

    async fn wait_bookings(&self, n: f64) {
        for _ in 0..200 {
            if metric(&self.epp_metrics().await, "kvgate_router_bookings") == Some(n) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("EPP bookings never returned to {n}");
    }
}

async fn get_text(url: &str) -> String {
    client()
        .get(url)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

struct Reply {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: serde_json::Value,
}

impl Reply {
    fn worker(&self) -> String {
        self.headers
            .get("x-kvgate-worker-id")
            .unwrap_or_else(|| panic!("no worker header: {} {}", self.status, self.body))
            .to_str()
            .unwrap()
            .to_string()
    }

    fn cached(&self) -> u64 {
        self.body["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap()
    }
}

async fn send(url: &str, body: &[u8], headers: &[(&str, &str)]) -> Reply {
    let mut rb = client()
        .post(format!("{url}/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(body.to_vec());
    for (k, v) in headers {
        rb = rb.header(*k, *v);
    }
    let r = rb.send().await.unwrap();
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let text = r.text().await.unwrap();
    Reply {
        status,
        headers,
        body: serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)),
    }
}

async fn chat(url: &str, content: &str, headers: &[(&str, &str)]) -> Reply {
    let body = chat_body(content, 4, false).to_string();
    send(url, body.as_bytes(), headers).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_prefixes_land_on_their_worker_through_envoy_and_spoofed_headers_change_nothing() {
    let c = cluster(Options::default());
    let url = c.envoy.url();
    let prefix = text("shared", 500);
    let first = chat(&url, &format!("{prefix} question zero"), &[]).await;
    assert_eq!(first.status, 200, "{}", first.body);
    let home = first.worker();
    c.wait_indexed(20.0).await;
    for i in 1..4 {
        let r = chat(&url, &format!("{prefix} question {i}"), &[]).await;
        assert_eq!(
            r.worker(),
            home,
            "request {i} left the worker holding its prefix"
        );
        assert!(
            r.cached() >= 500,
            "request {i} reused only {} tokens",
            r.cached()
        );
    }
    // A client naming another worker, endpoint or routing mode is ignored.
    let other_id = c
        .ids
        .iter()
        .find(|id| id.to_string() != home)
        .unwrap()
        .to_string();
    let other_pod = c
        .sidecars
        .iter()
        .map(|s| s.url().trim_start_matches("http://").to_string())
        .collect::<Vec<_>>();
    for pod in &other_pod {
        let r = chat(
            &url,
            &format!("{prefix} question spoofed"),
            &[
                ("x-dynamo-worker-instance-id", other_id.as_str()),
                ("x-gateway-destination-endpoint", pod.as_str()),
                ("x-dynamo-routing-mode", "disaggregated"),
            ],
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(
            r.worker(),
            home,
            "a client-sent routing header moved the request"
        );
    }
    // The engines got the EPP's token ids and agreed with them.
    let m = c.epp_metrics().await;
    assert!(metric(&m, "kvgate_router_actual_cached_tokens_total").unwrap() >= 2000.0);
    assert_eq!(
        metric(&m, "kvgate_router_responses_with_usage_total"),
        Some(6.0)
    );
    assert!(m.contains(
        "inference_objective_request_total{model_name=\"qwen3\",target_model_name=\"qwen3\"} 6"
    ));
    assert!(m.contains("inference_extension_scheduler_e2e_duration_seconds_count 6"));
    c.wait_bookings(0.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_responses_pass_through_intact() {
    let c = cluster(Options::default());
    let url = c.envoy.url();
    let body = chat_body(&text("stream", 200), 24, true).to_string();
    let r = client()
        .post(format!("{url}/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let text = r.text().await.unwrap();
    let events: Vec<&str> = text
        .split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .map(|e| e.strip_prefix("data: ").unwrap())
        .collect();
    assert_eq!(*events.last().unwrap(), "[DONE]");
    let chunks: Vec<serde_json::Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let content_chunks = chunks
        .iter()
        .filter(|c| c["choices"][0]["delta"]["content"].is_string())
        .count();
    let usage = &chunks.last().unwrap()["usage"];
    assert_eq!(usage["completion_tokens"], 24);
    assert_eq!(content_chunks, 24, "every token arrived as its own event");
    c.wait_bookings(0.0).await;
    // The EPP read the usage from the stream.
    let m = c.epp_metrics().await;
    assert_eq!(
        metric(&m, "kvgate_router_responses_with_usage_total"),
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distinct_prompts_spread_and_aborted_streams_release_their_load() {
    // Slow engines: requests overlap, so load decides.
    let c = cluster(Options {
        speedup: 2.0,
        ..Options::default()
    });
    let url = c.envoy.url();
    let futs: Vec<_> = (0..8)
        .map(|i| {
            let url = url.clone();
            async move {
                let body = chat_body(&text(&format!("distinct{i}x"), 150), 16, false).to_string();
                send(&url, body.as_bytes(), &[]).await
            }
        })
        .collect();
    let replies = futures::future::join_all(futs).await;
    let mut per_worker = std::collections::HashMap::new();
    for r in &replies {
        assert_eq!(r.status, 200, "{}", r.body);
        *per_worker.entry(r.worker()).or_insert(0) += 1;
    }
    assert_eq!(per_worker.len(), 2, "all on one worker: {per_worker:?}");
    assert!(
        per_worker.values().all(|n| *n >= 2),
        "lopsided: {per_worker:?}"
    );
    c.wait_bookings(0.0).await;

    // A client that walks away mid-stream: the EPP frees the request's load.
    let body = chat_body(&text("abort", 150), 2000, true).to_string();
    let r = client()
        .post(format!("{url}/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    let mut s = r.bytes_stream();
    let first = s.next().await.unwrap().unwrap();
    assert!(!first.is_empty());
    assert_eq!(
        metric(&c.epp_metrics().await, "kvgate_router_bookings"),
        Some(1.0)
    );
    drop(s);
    c.wait_bookings(0.0).await;
    assert!(metric(&c.epp_metrics().await, "kvgate_epp_streams_aborted_total").unwrap() >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_reaches_the_epp_over_tls() {
    // The EPP's default: TLS with a self-signed certificate (Envoy does not verify it).
    let c = cluster(Options {
        workers: 1,
        tls: true,
        ..Options::default()
    });
    assert!(c.epp.lines[0].contains("TLS"), "{:?}", c.epp.lines);
    let r = chat(&c.envoy.url(), "over tls", &[]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.worker(), "1001");
    assert_eq!(c.envoy.stat("http.gateway.ext_proc.streams_started"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_reach_the_client_with_json_bodies() {
    // One slow worker; busy above 1% of its 4096 blocks (a 1,000-token prompt books ~70).
    let c = cluster(Options {
        workers: 1,
        speedup: 1.0,
        epp_flags: &[
            "--max-request-body-bytes",
            "60000",
            "--active-decode-blocks-threshold",
            "0.01",
        ],
        ..Options::default()
    });
    let url = c.envoy.url();
    let r = send(&url, b"{\"model\": \"qwen3\", \"messages\": [", &[]).await;
    assert_eq!(r.status, 400);
    assert!(
        r.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("JSON"),
        "{}",
        r.body
    );
    let r = send(
        &url,
        br#"{"messages":[{"role":"user","content":"hi"}]}"#,
        &[],
    )
    .await;
    assert_eq!(r.status, 400);
    assert_eq!(r.body["error"]["param"], "model");
    let big = chat_body(&"x".repeat(70_000), 4, false).to_string();
    let r = send(&url, big.as_bytes(), &[]).await;
    assert_eq!(r.status, 413, "{}", r.body);
    assert!(
        r.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("60000")
    );

    // Fill the worker with one long stream, then the next request is shed with 429.
    let body = chat_body(&text("busy", 400), 2000, true).to_string();
    let held = client()
        .post(format!("{url}/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(held.status().as_u16(), 200);
    let r = chat(&url, &text("shed", 400), &[]).await;
    assert_eq!(r.status, 429, "{}", r.body);
    assert_eq!(r.headers["retry-after"], "1");
    assert!(
        r.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("busy")
    );
    drop(held);
    c.wait_bookings(0.0).await;
    let m = c.epp_metrics().await;
    for code in ["400", "413", "429"] {
        assert!(
            m.contains(&format!("error_code=\"{code}\"")),
            "no {code} in the error metric"
        );
    }

    // DYN_ENFORCE_DISAGG without a prefill pool: 503 naming it.
    let c = cluster(Options {
        workers: 1,
        epp_flags: &["--enforce-disagg", "true"],
        ..Options::default()
    });
    let r = chat(&c.envoy.url(), "hello", &[]).await;
    assert_eq!(r.status, 503, "{}", r.body);
    assert!(
        r.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("prefill")
    );
    assert!(r.headers.contains_key("retry-after"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn epp_down_fails_closed_or_open_as_configured() {
    // A live worker pod that a client would like to reach directly.
    let m = mocker(1001, 20.0, &[]);
    let dir = TempDir::new("fail");
    let wf = workers_file(&dir, &[(&m, 1001)], None);
    let pod = frontend(&wf, "direct", &[]);
    let pod_addr = pod.url().trim_start_matches("http://").to_string();
    let dead = free_port().to_string();
    for allow in ["false", "true"] {
        let envoy = Envoy::start(
            "gateway.yaml",
            &[
                ("EPP_HOST", "127.0.0.1"),
                ("EPP_PORT", &dead),
                ("FAILURE_MODE_ALLOW", allow),
            ],
        );
        let url = envoy.url();
        // A request with a body cannot continue without the EPP in FULL_DUPLEX_STREAMED mode.
        let r = chat(
            &url,
            "hello",
            &[("x-gateway-destination-endpoint", &pod_addr)],
        )
        .await;
        assert_eq!(r.status, 500, "allow={allow}: {}", r.body);
        let models = client()
            .get(format!("{url}/v1/models"))
            .header("x-gateway-destination-endpoint", &pod_addr)
            .header("x-dynamo-worker-instance-id", "1001")
            .send()
            .await
            .unwrap();
        let status = models.status().as_u16();
        if allow == "false" {
            // FailClose: the gateway refuses.
            assert_eq!(status, 500);
            assert_eq!(envoy.stat("http.gateway.ext_proc.failure_mode_allowed"), 0);
        } else {
            // FailOpen: the request goes on without the EPP, but never to the endpoint the
            // client named (the gateway strips it), so plain ORIGINAL_DST has nowhere to go.
            assert_eq!(envoy.stat("http.gateway.ext_proc.failure_mode_allowed"), 1);
            assert_eq!(
                status, 503,
                "fail-open must not honour a client-sent destination"
            );
        }
    }
}

/// A sample of a labelled Prometheus series (`name{...label="v"...}`), 0 when absent.
fn labelled(text: &str, name: &str, label: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disaggregated_serving_through_envoy_and_a_prefill_pool_appearing_at_runtime() {
    // Engines: one prefill worker, two decode workers (one with two data-parallel ranks).
    let prefill = mocker(3001, 20.0, &["--role", "prefill"]);
    let d1 = mocker(3002, 20.0, &["--role", "decode"]);
    let d2 = mocker(3003, 20.0, &["--role", "decode", "--dp-size", "2"]);
    let dir = TempDir::new("gw-pd");
    // The decode pods' sidecars know every engine (they call the prefill worker themselves).
    let engines = workers_file(&dir, &[(&prefill, 3001), (&d1, 3002), (&d2, 3003)], None);
    let s1 = frontend(&engines, "direct", &[]);
    let s2 = frontend(&engines, "direct", &[]);
    // The EPP starts with the decode pool only: requests are served aggregated.
    let decode_only = format!(
        "model: qwen3\nblock_size: 16\nworkers:\n  - {{name: dec-0, id: 3002, url: {}, role: decode, total_kv_blocks: 4096, kv_events: {}}}\n  - {{name: dec-1, id: 3003, url: {}, role: decode, dp_size: 2, total_kv_blocks: 4096, kv_events: {}}}\n",
        s1.url(),
        d1.zmq(),
        s2.url(),
        d2.zmq()
    );
    let pool = dir.0.join("pool.yaml");
    std::fs::write(&pool, &decode_only).unwrap();
    let epp = epp(&pool, &["--secure-serving=false"]);
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
    let url = envoy.url();
    let r = chat(&url, &text("before", 200), &[]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let pm = get_text(&format!("{}/metrics", prefill.url())).await;
    assert_eq!(
        metric(&pm, "kvgate_mocker_remote_prefills_total"),
        Some(0.0)
    );

    // The prefill pool scales from 0 to 1: the EPP switches to disaggregated, no restart.
    let prefill_entry = format!(
        "  - {{name: pre-0, id: 3001, url: {}, role: prefill, total_kv_blocks: 4096, kv_events: {}}}\n",
        prefill.url(),
        prefill.zmq()
    );
    std::fs::write(&pool, format!("{decode_only}{prefill_entry}")).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let r = chat(&url, &text("switch", 200), &[]).await;
        assert_eq!(r.status, 200, "{}", r.body);
        let pm = get_text(&format!("{}/metrics", prefill.url())).await;
        if metric(&pm, "kvgate_mocker_remote_prefills_total").unwrap_or(0.0) > 0.0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never switched to disaggregated"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Disaggregated requests sharing a prefix, several in flight at once: both legs run, the
    // prefill worker reuses the prefix, decode load spreads over workers and ranks.
    let prefix = text("pdshared", 400);
    let pm0 = get_text(&format!("{}/metrics", prefill.url())).await;
    let hits0 = labelled(&pm0, "vllm:prefix_cache_hits_total", "engine=\"0\"");
    let futs: Vec<_> = (0..6)
        .map(|i| {
            let url = url.clone();
            let content = format!("{prefix} question {i}");
            async move {
                let body = chat_body(&content, 24, false).to_string();
                send(&url, body.as_bytes(), &[]).await
            }
        })
        .collect();
    let replies = futures::future::join_all(futs).await;
    let mut seen = std::collections::BTreeSet::new();
    for r in &replies {
        assert_eq!(r.status, 200, "{}", r.body);
        let rank = r.headers["x-kvgate-dp-rank"].to_str().unwrap().to_string();
        seen.insert((r.worker(), rank));
    }
    assert!(
        seen.iter().all(|(w, _)| w != "3001"),
        "the prefill worker never answers: {seen:?}"
    );
    assert!(seen.len() >= 2, "decode load did not spread: {seen:?}");
    let pm = get_text(&format!("{}/metrics", prefill.url())).await;
    let hits = labelled(&pm, "vllm:prefix_cache_hits_total", "engine=\"0\"") - hits0;
    assert!(
        hits >= 5.0 * 300.0,
        "the prefill worker did not reuse the shared prefix ({hits} tokens)"
    );
    let d1m = get_text(&format!("{}/metrics", d1.url())).await;
    let d2m = get_text(&format!("{}/metrics", d2.url())).await;
    let transfers = metric(&d1m, "kvgate_mocker_kv_transfers_total").unwrap_or(0.0)
        + metric(&d2m, "kvgate_mocker_kv_transfers_total").unwrap_or(0.0);
    let prefills = metric(&pm, "kvgate_mocker_remote_prefills_total").unwrap();
    assert_eq!(transfers, prefills, "every prefill leg has its decode leg");

    // DP ranks are honoured: the two-rank decode worker serves on both ranks.
    for i in 0..12 {
        let body = chat_body(&text(&format!("dp{i}x"), 120), 48, false).to_string();
        let url = url.clone();
        tokio::spawn(async move { send(&url, body.as_bytes(), &[]).await });
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let d2m = get_text(&format!("{}/metrics", d2.url())).await;
        let r0 = labelled(&d2m, "vllm:generation_tokens_total", "engine=\"0\"");
        let r1 = labelled(&d2m, "vllm:generation_tokens_total", "engine=\"1\"");
        if r0 > 0.0 && r1 > 0.0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "rank use: {r0} / {r1}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The load view an EPP serves on `/debug/load`.
async fn load_view(epp: &Proc) -> serde_json::Value {
    serde_json::from_str(&get_text(&format!("{}/debug/load", epp.url())).await).unwrap()
}

/// The readiness an EPP reports on its gRPC health port (`None`: not answering).
async fn readiness(epp: &Proc) -> Option<i32> {
    let addr = epp
        .lines
        .iter()
        .find(|l| l.contains("health"))
        .and_then(|l| l.split_whitespace().find(|w| w.starts_with("grpc://")))
        .unwrap()
        .replace("grpc://", "http://");
    let channel = tonic::transport::Channel::from_shared(addr)
        .ok()?
        .connect()
        .await
        .ok()?;
    let mut client = tonic_health::pb::health_client::HealthClient::new(channel);
    let reply = client
        .check(tonic_health::pb::HealthCheckRequest {
            service: "readiness".into(),
        })
        .await
        .ok()?;
    Some(reply.into_inner().status)
}

const SERVING: i32 = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;

/// Waits until every EPP shows the same per-worker load with `requests` in flight in all, and
/// returns it.
async fn same_load_view(epps: &[&Proc], requests: u64) -> serde_json::Value {
    let mut last = Vec::new();
    for _ in 0..200 {
        let mut views = Vec::new();
        for e in epps {
            views.push(load_view(e).await);
        }
        let total: u64 = views[0]["workers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| w["requests"].as_u64().unwrap())
            .sum();
        if total == requests && views.iter().all(|v| v["workers"] == views[0]["workers"]) {
            return views[0]["workers"].clone();
        }
        last = views;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the EPPs' load views never agreed on {requests} requests: {last:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn epp_replicas_behind_one_gateway_share_one_load_view_and_a_late_one_bootstraps_it() {
    let store = TempDir::new("nats");
    let nats = Nats::start(free_port(), &store.0);
    let url = nats.url();
    let sync = [
        "--router-replica-sync",
        "true",
        "--nats-url",
        url.as_str(),
        "--namespace",
        "gwsync",
    ];
    // Real-time engines and long generations: the requests stay in flight while we look.
    let c = cluster(Options {
        speedup: 1.0,
        epps: 2,
        epp_flags: &sync,
        ..Options::default()
    });
    let epps = [&c.epp, &c.replicas[0]];
    for e in epps {
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        while readiness(e).await != Some(SERVING) {
            assert!(
                std::time::Instant::now() < deadline,
                "an EPP replica never became ready"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let gw = c.envoy.url();
    let mut streams = Vec::new();
    for i in 0..8 {
        let body = chat_body(&text(&format!("replica{i}x"), 150), 4000, true).to_string();
        let r = client()
            .post(format!("{gw}/v1/chat/completions"))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let mut s = r.bytes_stream();
        assert!(!s.next().await.unwrap().unwrap().is_empty());
        streams.push(s);
    }
    // Envoy split the streams over both replicas; each books its own and sees the other's.
    let view = same_load_view(&epps, 8).await;
    for e in epps {
        let v = load_view(e).await;
        let (own, peers) = (
            v["bookings"]["own"].as_u64().unwrap(),
            v["bookings"]["peers"].as_u64().unwrap(),
        );
        assert!(own > 0 && peers > 0 && own + peers == 8, "{v}");
        assert_eq!(v["replica"]["peers"], 1, "{v}");
        // Requests a few ms apart, sync ~1 ms: no herding, no home (routing as one router).
        assert!(v["replica"]["herd_level"].as_f64().unwrap() >= 0.0, "{v}");
        assert!(v["replica"].get("home").is_some(), "{v}");
    }
    assert!(
        view.as_array()
            .unwrap()
            .iter()
            .all(|w| w["prefill_tokens"] == 0),
        "prefill done everywhere (first bytes seen): {view}"
    );

    // Garbage on the sync subject is counted and dropped; the views stay as they were.
    let subject = "namespace.gwsync.component.backend.router-replicas";
    nats.publish_raw(subject, b"{\"from\":1,\"seq\":");
    let huge = format!(
        r#"{{"from":7,"seq":1,"ops":[{{"booked":{{"id":"x","worker_id":1001,"dp_rank":0,"seqs":[{}],"prefill_tokens":1}}}}]}}"#,
        vec!["1"; 70_000].join(",")
    );
    nats.publish_raw(subject, huge.as_bytes());
    for e in epps {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let m = get_text(&format!("{}/metrics", e.url())).await;
            if metric(&m, "kvgate_replica_sync_malformed_total") == Some(2.0) {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "malformed sync messages not counted"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    assert_eq!(same_load_view(&epps, 8).await, view);

    // A replica started now is not ready until it holds the others' load.
    let flags: Vec<&str> = c.epp_flags.iter().map(String::as_str).collect();
    let late = epp(&c.epp_file, &flags);
    assert_ne!(
        readiness(&late).await,
        Some(SERVING),
        "ready before bootstrapping"
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while readiness(&late).await != Some(SERVING) {
        assert!(
            std::time::Instant::now() < deadline,
            "the late replica never became ready"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let late_view = load_view(&late).await;
    assert_eq!(
        late_view["workers"], view,
        "the late replica's load view at ready"
    );
    assert_eq!(late_view["bookings"]["peers"], 8);
    let m = get_text(&format!("{}/metrics", late.url())).await;
    assert_eq!(metric(&m, "kvgate_replica_sync_peers"), Some(2.0));
    assert!(metric(&m, "kvgate_replica_sync_states_applied_total").unwrap() >= 2.0);

    // The clients leave: every replica, the late one included, returns to idle.
    drop(streams);
    same_load_view(&[&c.epp, &c.replicas[0], &late], 0).await;
    for e in [&c.epp, &c.replicas[0], &late] {
        let v = load_view(e).await;
        assert_eq!(
            v["bookings"],
            serde_json::json!({"own": 0, "peers": 0}),
            "{v}"
        );
    }
}
