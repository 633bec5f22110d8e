#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The fail-open gateway (`deploy/envoy/gateway-fail-open.yaml`, rendered by
//! `kvgate_bench::procs::fail_open_gateway_template`) with real processes: Envoy 1.40, `kvgate epp`,
//! direct-mode sidecars and mockers. While the EPP is up, it routes; when it is killed or frozen,
//! requests are served by plain load balancing over the pool; when it is back, it routes again.
//! Requests the EPP held when it died get the documented 503. Needs `.tools/bin/envoy`.

mod common;

use common::*;
use futures::StreamExt;
use std::time::{Duration, Instant};

/// Well below a hang: the gateway's slowest documented failure (a frozen EPP) takes about 5 s.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(15);

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(CLIENT_TIMEOUT)
        .build()
        .unwrap()
}

/// Mockers, their pods' direct-mode sidecars, and the EPP's workers file.
struct Pool {
    _mockers: Vec<Proc>,
    sidecars: Vec<Proc>,
    ids: Vec<u64>,
    epp_file: std::path::PathBuf,
    _dir: TempDir,
}

fn pool(workers: usize) -> Pool {
    let ids: Vec<u64> = (0..workers as u64).map(|i| 1001 + i).collect();
    let mockers: Vec<Proc> = ids.iter().map(|id| mocker(*id, 20.0, &[])).collect();
    let dir = TempDir::new("failopen");
    let pairs: Vec<(&Proc, u64)> = mockers.iter().zip(ids.iter().copied()).collect();
    let sidecar_file = workers_file(&dir, &pairs, None);
    let sidecars: Vec<Proc> = (0..workers)
        .map(|_| frontend(&sidecar_file, "direct", &[]))
        .collect();
    let mut y = String::from("model: qwen3\nblock_size: 16\nworkers:\n");
    for (i, id) in ids.iter().enumerate() {
        y.push_str(&format!(
            "  - name: pod-{i}\n    id: {id}\n    url: {}\n    total_kv_blocks: 4096\n    kv_events: {}\n",
            sidecars[i].url(),
            mockers[i].zmq()
        ));
    }
    let epp_file = dir.0.join("epp-workers.yaml");
    std::fs::write(&epp_file, y).unwrap();
    Pool {
        _mockers: mockers,
        sidecars,
        ids,
        epp_file,
        _dir: dir,
    }
}

impl Pool {
    /// `kvgate epp` (h2c) on `grpc_port` (0: any), so that a restarted one takes the old port.
    fn epp(&self, grpc_port: u16) -> Proc {
        let port = grpc_port.to_string();
        let file = self.epp_file.to_str().unwrap();
        Proc::start(
            &[
                "epp",
                "--host",
                "127.0.0.1",
                "--grpc-port",
                &port,
                "--health-port",
                "0",
                "--metrics-port",
                "0",
                "--secure-serving=false",
                "--workers",
                file,
            ],
            3,
        )
    }

    /// The fail-open gateway in front of `epp`, with this pool as its fallback.
    fn gateway(&self, epp: &Proc) -> Envoy {
        let grpc = epp.grpc();
        let urls: Vec<String> = self.sidecars.iter().map(Proc::url).collect();
        let endpoints: Vec<(&str, u64)> = urls
            .iter()
            .map(String::as_str)
            .zip(self.ids.iter().copied())
            .collect();
        let template =
            kvgate_bench::procs::fail_open_gateway_template(&[grpc.as_str()], &endpoints).unwrap();
        Envoy::start_text("gateway-fail-open.yaml", &template, &[], |c| c)
    }
}

fn grpc_port(epp: &Proc) -> u16 {
    epp.grpc().rsplit_once(':').unwrap().1.parse().unwrap()
}

async fn epp_metric(epp: &Proc, name: &str) -> f64 {
    let text = client()
        .get(format!("{}/metrics", epp.url()))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    metric(&text, name).unwrap_or(0.0)
}

async fn wait_bookings(epp: &Proc, n: f64) {
    for _ in 0..200 {
        if epp_metric(epp, "kvgate_router_bookings").await == n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("the EPP never held {n} bookings");
}

/// What a client saw of one chat completion.
#[derive(Debug)]
struct Outcome {
    status: u16,
    /// `x-kvgate-fail-open` was set: served by the fallback cluster, not by the EPP's choice.
    fail_open: bool,
    /// `x-kvgate-reason`.
    reason: Option<String>,
    worker: Option<String>,
    /// A 200 with the whole answer (usage; `[DONE]` for a stream).
    complete: bool,
    body: String,
    elapsed: Duration,
}

async fn chat(url: &str, tag: &str, max_tokens: u32, stream: bool) -> Outcome {
    let start = Instant::now();
    let body = chat_body(&format!("{tag} {}", text(tag, 40)), max_tokens, stream).to_string();
    let r = client()
        .post(format!("{url}/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap_or_else(|e| panic!("{tag}: no answer within {CLIENT_TIMEOUT:?}: {e}"));
    let status = r.status().as_u16();
    let header = |k: &str| r.headers().get(k).map(|v| v.to_str().unwrap().to_string());
    let (fail_open, reason, worker) = (
        header("x-kvgate-fail-open").is_some(),
        header("x-kvgate-reason"),
        header("x-kvgate-worker-id"),
    );
    let (body, read_ok) = match r.text().await {
        Ok(t) => (t, true),
        Err(e) => (format!("body error: {e}"), false),
    };
    let complete = status == 200
        && read_ok
        && if stream {
            body.trim_end().ends_with("data: [DONE]")
        } else {
            serde_json::from_str::<serde_json::Value>(&body)
                .map(|v| v["usage"]["completion_tokens"].as_u64() == Some(u64::from(max_tokens)))
                .unwrap_or(false)
        };
    Outcome {
        status,
        fail_open,
        reason,
        worker,
        complete,
        body,
        elapsed: start.elapsed(),
    }
}

/// `n` short chat completions over `lanes` concurrent clients, every other one streamed.
async fn burst(url: &str, tag: &str, n: usize, lanes: usize) -> Vec<Outcome> {
    let futs = (0..lanes).map(|lane| {
        let url = url.to_string();
        let tag = tag.to_string();
        async move {
            let mut out = Vec::new();
            for i in (lane..n).step_by(lanes) {
                out.push(chat(&url, &format!("{tag}{i}x"), 8, i % 2 == 1).await);
            }
            out
        }
    });
    futures::future::join_all(futs)
        .await
        .into_iter()
        .flatten()
        .collect()
}

/// The documented shape of a request the EPP held when it failed.
fn assert_epp_unavailable(o: &Outcome, what: &str) {
    assert_eq!(o.status, 503, "{what}: {o:?}");
    assert_eq!(
        o.reason.as_deref(),
        Some("epp-unavailable"),
        "{what}: {o:?}"
    );
    let v: serde_json::Value = serde_json::from_str(&o.body).unwrap();
    assert_eq!(v["error"]["type"], "ServiceUnavailableError", "{what}: {v}");
    assert_eq!(v["error"]["code"], 503, "{what}: {v}");
    assert!(
        v["error"]["details"]
            .as_str()
            .unwrap()
            .starts_with("ext_proc_error"),
        "{what}: {v}"
    );
}

/// Checks a burst sent while no EPP answers; returns how many failed.
fn check_fail_open(outs: &[Outcome], ids: &[u64], what: &str) -> usize {
    let failed: Vec<&Outcome> = outs.iter().filter(|o| !o.complete).collect();
    for o in &failed {
        assert_epp_unavailable(o, what);
    }
    let served: std::collections::BTreeSet<String> = outs
        .iter()
        .filter(|o| o.complete)
        .map(|o| {
            assert!(
                o.fail_open,
                "{what}: served without the fail-open mark: {o:?}"
            );
            o.worker.clone().unwrap()
        })
        .collect();
    let all: std::collections::BTreeSet<String> = ids.iter().map(u64::to_string).collect();
    assert_eq!(served, all, "{what}: plain balancing must use every worker");
    let slowest = outs.iter().map(|o| o.elapsed).max().unwrap();
    assert!(
        slowest < Duration::from_secs(5),
        "{what}: slowest {slowest:?}"
    );
    eprintln!(
        "{what}: {} of {} served by fallback, failed {}, slowest {slowest:?}",
        outs.len() - failed.len(),
        outs.len(),
        failed.len()
    );
    failed.len()
}

/// Sends requests until one is routed by the EPP again; returns how long that took. Every
/// request must succeed meanwhile (by fallback or by the EPP).
async fn until_epp_routes(url: &str, tag: &str, limit: Duration) -> Duration {
    let start = Instant::now();
    for i in 0.. {
        let o = chat(url, &format!("{tag}{i}x"), 8, i % 2 == 1).await;
        assert!(o.complete, "{tag}: {o:?}");
        if !o.fail_open {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < limit,
            "EPP routing did not resume within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    unreachable!()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_fail_open_while_no_epp_answers_and_epp_routing_resumes() {
    let p = pool(2);
    let epp = p.epp(0);
    let port = grpc_port(&epp);
    let envoy = p.gateway(&epp);
    let url = envoy.url();

    // 1. The EPP routes every request; a client abort does not count against it.
    for o in burst(&url, "up", 8, 2).await {
        assert!(o.complete && !o.fail_open, "{o:?}");
    }
    assert_eq!(epp_metric(&epp, "kvgate_router_decisions_total").await, 8.0);
    let r = client()
        .post(format!("{url}/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(chat_body(&text("abort", 40), 3000, true).to_string())
        .send()
        .await
        .unwrap();
    assert!(!r.bytes_stream().next().await.unwrap().unwrap().is_empty());
    wait_bookings(&epp, 0.0).await;
    let ejections = "cluster.epp.outlier_detection.ejections_enforced_total";
    assert_eq!(envoy.stat(ejections), 0, "a client abort ejected the EPP");
    assert_eq!(envoy.stat("http.gateway.ext_proc.failure_mode_allowed"), 0);

    // 2. SIGKILL with two long requests held by the EPP: neither can go on through it. The
    //    non-streamed one gets the 503 inside the gateway, which retries it: it is served again,
    //    by fallback. The streamed one, whose 200 is already out, is cut short.
    let held = {
        let url = url.clone();
        tokio::spawn(async move { chat(&url, "held", 1000, false).await })
    };
    let stream = client()
        .post(format!("{url}/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(chat_body(&text("heldstream", 40), 3000, true).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    let mut stream = stream.bytes_stream();
    assert!(!stream.next().await.unwrap().unwrap().is_empty());
    wait_bookings(&epp, 2.0).await;
    let killed = Instant::now();
    drop(epp);
    let held = held.await.unwrap();
    assert!(held.complete && held.fail_open, "{held:?}");
    assert!(envoy.stat("cluster.gateway.upstream_rq_retry_success") >= 1);
    let held_after = killed.elapsed();
    let rest = tokio::time::timeout(Duration::from_secs(5), async {
        let mut text = String::new();
        while let Some(chunk) = stream.next().await {
            match chunk {
                Ok(b) => text.push_str(&String::from_utf8_lossy(&b)),
                Err(_) => return (text, false),
            }
        }
        (text, true)
    })
    .await
    .expect("the stream held at the kill hung");
    assert!(
        !rest.0.contains("[DONE]"),
        "the stream held at the kill went on"
    );
    eprintln!(
        "kill with 2 held: non-streamed served by fallback {held_after:?} after the kill; stream cut (clean end: {})",
        rest.1
    );

    // 3. Right after the kill: plain load balancing.
    let mut failed = check_fail_open(
        &burst(&url, "down", 200, 4).await,
        &p.ids,
        "after a kill with requests in flight",
    );
    assert!(envoy.stat("http.gateway.ext_proc.failure_mode_allowed") >= 200 - failed as u64);

    // 4. The EPP is back: routing resumes within the health check interval.
    let restarted = Instant::now();
    let epp = p.epp(port);
    let started = restarted.elapsed();
    let resumed = until_epp_routes(&url, "back", Duration::from_secs(10)).await;
    eprintln!("EPP restarted in {started:?}; routing resumed {resumed:?} after it listened");
    for o in burst(&url, "again", 10, 2).await {
        assert!(o.complete && !o.fail_open, "{o:?}");
    }
    assert!(epp_metric(&epp, "kvgate_router_decisions_total").await >= 11.0);

    // 5. SIGKILL of an idle EPP, requests arriving at once.
    drop(epp);
    failed += check_fail_open(
        &burst(&url, "idle", 200, 4).await,
        &p.ids,
        "after a kill with nothing in flight",
    );
    assert!(
        failed <= 4,
        "{failed} of 400 requests failed after the kills (needs >= 99% served)"
    );

    // 6. And back once more.
    let epp = p.epp(port);
    until_epp_routes(&url, "back2", Duration::from_secs(10)).await;
    assert!(epp_metric(&epp, "kvgate_router_decisions_total").await >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_epp_delays_its_requests_by_seconds_and_a_body_too_large_to_retry_gets_the_503() {
    let p = pool(2);
    let epp = p.epp(0);
    let envoy = p.gateway(&epp);
    let url = envoy.url();
    let o = chat(&url, "warm", 8, false).await;
    assert!(o.complete && !o.fail_open, "{o:?}");

    // SIGSTOP: the EPP's port still accepts and its connection stays open, but nothing answers.
    let signal = |sig: &str| {
        let ok = std::process::Command::new("kill")
            .args([sig, &epp.pid().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig}");
    };
    signal("-STOP");
    // Both sent before the health check notices, so both reach the frozen EPP and wait for the
    // HTTP/2 keepalive (2 s interval + 3 s timeout) to close its connection. The small one is then
    // retried and fails open; the 1.5 MB one is over the 1 MiB retry buffer and gets the 503.
    let big = {
        let url = url.clone();
        tokio::spawn(async move {
            let start = Instant::now();
            let body = chat_body(&"many words ".repeat(140_000), 8, false).to_string();
            assert!(body.len() > 1_500_000);
            let r = client()
                .post(format!("{url}/v1/chat/completions"))
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .expect("the large request hung");
            let status = r.status().as_u16();
            let reason = r
                .headers()
                .get("x-kvgate-reason")
                .map(|v| v.to_str().unwrap().to_string());
            Outcome {
                status,
                fail_open: false,
                reason,
                worker: None,
                complete: false,
                body: r.text().await.unwrap(),
                elapsed: start.elapsed(),
            }
        })
    };
    let small = chat(&url, "frozen", 8, false).await;
    let big = big.await.unwrap();
    assert!(small.complete && small.fail_open, "{small:?}");
    assert!(small.elapsed < Duration::from_secs(8), "{small:?}");
    assert_epp_unavailable(&big, "the large request sent to the frozen EPP");
    assert!(big.elapsed < Duration::from_secs(8), "{big:?}");
    eprintln!(
        "frozen EPP: small request served by fallback after {:?}, large one 503 after {:?}",
        small.elapsed, big.elapsed
    );
    let outs = burst(&url, "frozen-after", 40, 2).await;
    assert_eq!(check_fail_open(&outs, &p.ids, "while the EPP is frozen"), 0);

    signal("-CONT");
    let resumed = until_epp_routes(&url, "thawed", Duration::from_secs(10)).await;
    eprintln!("thawed EPP routes again after {resumed:?}");
}
