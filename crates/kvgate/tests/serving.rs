#![allow(clippy::unwrap_used, clippy::expect_used)]
//! End to end on loopback: real mocker and frontend processes; routing checked by what the
//! workers report (serving worker header, cached tokens, metrics).

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

async fn post(
    url: &str,
    body: &serde_json::Value,
) -> (u16, reqwest::header::HeaderMap, serde_json::Value) {
    let r = client()
        .post(format!("{url}/v1/chat/completions"))
        .json(body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let v = r.json().await.unwrap_or(serde_json::Value::Null);
    (status, headers, v)
}

fn worker_of(h: &reqwest::header::HeaderMap) -> String {
    h.get("x-kvgate-worker-id")
        .unwrap()
        .to_str()
        .unwrap()
        .to_string()
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_mode_follows_the_cache_and_spreads_load() {
    let (a, b) = (mocker(1001, 20.0, &[]), mocker(1002, 20.0, &[]));
    let dir = TempDir::new("kv");
    let wf = workers_file(&dir, &[(&a, 1001), (&b, 1002)], None);
    let fe = frontend(&wf, "kv", &[]);
    let url = fe.url();

    // A long shared prefix: the first request lands somewhere, its KV events reach the router,
    // and the follow-ups land on the same worker and are served from its cache.
    let prefix = text("shared", 400);
    let (s1, h1, _) = post(
        &url,
        &chat_body(&format!("{prefix} first question"), 4, false),
    )
    .await;
    assert_eq!(s1, 200);
    let first = worker_of(&h1);
    tokio::time::sleep(Duration::from_millis(300)).await;
    for i in 0..4 {
        let (s, h, v) = post(
            &url,
            &chat_body(&format!("{prefix} follow-up {i}"), 4, false),
        )
        .await;
        assert_eq!(s, 200);
        assert_eq!(worker_of(&h), first, "follow-up {i} left the cached worker");
        let cached = v["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap();
        let prompt = v["usage"]["prompt_tokens"].as_u64().unwrap();
        assert!(
            cached >= prompt * 8 / 10,
            "follow-up {i}: cached {cached} of {prompt}"
        );
    }
    let m = get_text(&format!("{url}/metrics")).await;
    assert!(
        metric(&m, "kvgate_kv_events_applied_total").unwrap() > 0.0,
        "{m}"
    );
    assert!(metric(&m, "kvgate_router_predicted_cached_tokens_total").unwrap() > 0.0);
    // The frontend read what the workers actually had cached, for all five responses.
    assert_eq!(
        metric(&m, "kvgate_router_responses_with_usage_total"),
        Some(5.0)
    );
    assert!(metric(&m, "kvgate_router_actual_cached_tokens_total").unwrap() > 0.0);

    // Distinct prompts sent together: the router sees the in-flight load and uses both workers.
    let futs: Vec<_> = (0..8)
        .map(|i| {
            let url = url.clone();
            async move {
                post(
                    &url,
                    &chat_body(&text(&format!("distinct{i}x"), 300), 40, false),
                )
                .await
            }
        })
        .collect();
    let results = futures::future::join_all(futs).await;
    let mut seen = std::collections::BTreeSet::new();
    for (s, h, _) in &results {
        assert_eq!(*s, 200);
        seen.insert(worker_of(h));
    }
    assert_eq!(seen.len(), 2, "load did not spread: {seen:?}");
    // everything finished: no booking left behind
    let m = get_text(&format!("{url}/metrics")).await;
    assert_eq!(metric(&m, "kvgate_router_bookings"), Some(0.0), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_passes_through_and_disconnect_releases_load() {
    let a = mocker(1001, 5.0, &[]);
    let dir = TempDir::new("stream");
    let wf = workers_file(&dir, &[(&a, 1001)], None);
    let fe = frontend(&wf, "kv", &[]);
    let url = fe.url();

    let r = client()
        .post(format!("{url}/v1/chat/completions"))
        .json(&chat_body("tell me a story", 6, true))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers().get("content-type").unwrap(),
        "text/event-stream"
    );
    let body = r.text().await.unwrap();
    let events: Vec<&str> = body.split("\n\n").filter(|e| !e.is_empty()).collect();
    assert_eq!(events.last(), Some(&"data: [DONE]"));
    // 6 token chunks + 1 usage chunk + [DONE]
    assert_eq!(events.len(), 8, "{body}");
    let usage: serde_json::Value =
        serde_json::from_str(events[6].trim_start_matches("data: ")).unwrap();
    assert_eq!(usage["usage"]["completion_tokens"], 6);

    // A long stream, abandoned after its first chunk.
    let r = client()
        .post(format!("{url}/v1/chat/completions"))
        .json(&chat_body("a very long answer please", 2000, true))
        .send()
        .await
        .unwrap();
    let mut s = r.bytes_stream();
    let first = s.next().await.unwrap().unwrap();
    assert!(first.starts_with(b"data: "));
    let m = get_text(&format!("{url}/metrics")).await;
    assert_eq!(metric(&m, "kvgate_router_bookings"), Some(1.0));
    drop(s);
    // The frontend frees the booking; the mocker stops generating for the gone client.
    let mut freed = false;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let m = get_text(&format!("{url}/metrics")).await;
        let mm = get_text(&format!("{}/metrics", a.url())).await;
        if metric(&m, "kvgate_router_bookings") == Some(0.0)
            && metric(&mm, "vllm:num_requests_running") == Some(0.0)
            && metric(&mm, "kvgate_mocker_aborted_total") == Some(1.0)
        {
            freed = true;
            break;
        }
    }
    assert!(freed, "in-flight load leaked after the client disconnected");
    let m = get_text(&format!("{url}/metrics")).await;
    assert_eq!(
        metric(&m, "kvgate_frontend_inflight_requests"),
        Some(0.0),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_mode_obeys_headers_and_refuses_without_them() {
    let (a, b) = (mocker(1001, 50.0, &[]), mocker(1002, 50.0, &[]));
    let dir = TempDir::new("direct");
    let wf = workers_file(
        &dir,
        &[(&a, 1001), (&b, 1002)],
        Some(("dead", 1003, "http://127.0.0.1:9")),
    );
    let fe = frontend(&wf, "direct", &[]);
    let url = fe.url();
    let send = |id: Option<&'static str>| {
        let url = url.clone();
        async move {
            let mut rb = client()
                .post(format!("{url}/v1/chat/completions"))
                .json(&chat_body("hi", 2, false));
            if let Some(id) = id {
                rb = rb.header("x-dynamo-worker-instance-id", id);
            }
            let r = rb.send().await.unwrap();
            let st = r.status().as_u16();
            let h = r.headers().clone();
            (st, h, r.json::<serde_json::Value>().await.unwrap())
        }
    };
    for _ in 0..3 {
        let (s, h, _) = send(Some("1002")).await;
        assert_eq!(s, 200);
        assert_eq!(worker_of(&h), "1002");
    }
    let (s, h, _) = send(Some("1001")).await;
    assert_eq!((s, worker_of(&h).as_str()), (200, "1001"));
    let (s, _, v) = send(None).await;
    assert_eq!(s, 400);
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("x-dynamo-worker-instance-id"),
        "{v}"
    );
    let (s, _, v) = send(Some("77")).await;
    assert_eq!(s, 404);
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("unknown worker instance id 77")
    );
    // a dead worker: a clear 502 naming it, and not saying where it lives
    let (s, _, v) = send(Some("1003")).await;
    assert_eq!(s, 502);
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("dead") && msg.contains("unreachable"), "{v}");
    assert!(
        !msg.contains("127.0.0.1") && !msg.contains("http://"),
        "address echoed: {v}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_clear_errors() {
    let a = mocker(1001, 50.0, &[]);
    let dir = TempDir::new("errors");
    let wf = workers_file(&dir, &[(&a, 1001)], None);
    let fe = frontend(&wf, "kv", &["--max-request-body-bytes", "4096"]);
    let url = fe.url();
    let c = client();
    let r = c
        .post(format!("{url}/v1/chat/completions"))
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: serde_json::Value = r.json().await.unwrap();
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not valid JSON")
    );
    let big = chat_body(&"x".repeat(10_000), 1, false);
    let r = c
        .post(format!("{url}/v1/chat/completions"))
        .json(&big)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], 413);
    let mut wrong = chat_body("hi", 1, false);
    wrong["model"] = "llama".into();
    let r = c
        .post(format!("{url}/v1/chat/completions"))
        .json(&wrong)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let v: serde_json::Value = r.json().await.unwrap();
    assert!(v["error"]["message"].as_str().unwrap().contains("llama"));
    let r = c
        .post(format!("{url}/v1/chat/completions"))
        .json(&serde_json::json!({"model": "qwen3"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["error"]["param"], "messages");
    let models: serde_json::Value = c
        .get(format!("{url}/v1/models"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["data"][0]["id"], "qwen3");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_alternates() {
    let (a, b) = (mocker(1001, 50.0, &[]), mocker(1002, 50.0, &[]));
    let dir = TempDir::new("rr");
    let wf = workers_file(&dir, &[(&a, 1001), (&b, 1002)], None);
    let fe = frontend(&wf, "round-robin", &[]);
    let mut order = Vec::new();
    for _ in 0..4 {
        let (s, h, _) = post(&fe.url(), &chat_body("same prompt every time", 1, false)).await;
        assert_eq!(s, 200);
        order.push(worker_of(&h));
    }
    assert_ne!(order[0], order[1]);
    assert_eq!(order[0], order[2]);
    assert_eq!(order[1], order[3]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_file_is_reloaded() {
    let (a, b) = (mocker(1001, 50.0, &[]), mocker(1002, 50.0, &[]));
    let dir = TempDir::new("reload");
    let wf = workers_file(&dir, &[(&a, 1001)], None);
    let fe = frontend(&wf, "direct", &[]);
    let url = fe.url();
    let send = |id: &'static str| {
        let url = url.clone();
        async move {
            client()
                .post(format!("{url}/v1/chat/completions"))
                .header("x-dynamo-worker-instance-id", id)
                .json(&chat_body("hi", 1, false))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    assert_eq!(send("1002").await, 404);
    // add the second worker; the frontend picks it up without a restart
    tokio::time::sleep(Duration::from_millis(1100)).await;
    workers_file(&dir, &[(&a, 1001), (&b, 1002)], None);
    let mut ok = false;
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if send("1002").await == 200 {
            ok = true;
            break;
        }
    }
    assert!(ok, "the new worker was not picked up");
    // a broken file is refused and the last good one stays
    std::fs::write(&wf, "model: [").unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(send("1002").await, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_parallel_ranks_are_separate_targets() {
    let a = mocker(1001, 20.0, &["--dp-size", "2"]);
    assert_eq!(a.lines.iter().filter(|l| l.contains("tcp://")).count(), 2);
    let dir = TempDir::new("dp");
    let wf = workers_file(&dir, &[(&a, 1001)], None);
    let fe = frontend(&wf, "kv", &[]);
    let url = fe.url();
    let rank_of = |h: &reqwest::header::HeaderMap| {
        h.get("x-kvgate-dp-rank")
            .unwrap()
            .to_str()
            .unwrap()
            .to_string()
    };
    // concurrent distinct prompts use both ranks
    let futs: Vec<_> = (0..6)
        .map(|i| {
            let url = url.clone();
            async move {
                post(
                    &url,
                    &chat_body(&text(&format!("rank{i}x"), 200), 30, false),
                )
                .await
            }
        })
        .collect();
    let ranks: std::collections::BTreeSet<String> = futures::future::join_all(futs)
        .await
        .iter()
        .map(|(s, h, _)| {
            assert_eq!(*s, 200);
            rank_of(h)
        })
        .collect();
    assert_eq!(ranks.len(), 2, "{ranks:?}");
    // a follow-up goes back to the rank that caches its prefix (events from both rank ports)
    let prefix = text("dpshared", 300);
    let (_, h1, _) = post(&url, &chat_body(&format!("{prefix} one"), 2, false)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_, h2, v2) = post(&url, &chat_body(&format!("{prefix} two"), 2, false)).await;
    assert_eq!(rank_of(&h1), rank_of(&h2));
    assert!(
        v2["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap()
            > 0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_worker_is_not_credited_with_its_old_cache() {
    let a = mocker(1001, 50.0, &[]);
    let dir = TempDir::new("restart");
    let wf = workers_file(&dir, &[(&a, 1001)], None);
    let fe = frontend(&wf, "kv", &[]);
    let url = fe.url();
    let port = a.url().rsplit(':').next().unwrap().to_string();
    let zmq = a.zmq();
    let (s, _, _) = post(&url, &chat_body(&text("before", 400), 2, false)).await;
    assert_eq!(s, 200);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let nodes_before = metric(
        &get_text(&format!("{url}/metrics")).await,
        "kvgate_router_index_nodes",
    )
    .unwrap();
    assert!(nodes_before > 50.0, "{nodes_before}");
    // the worker restarts on the same ports with an empty cache
    drop(a);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let _b = Proc::start(
        &[
            "mocker",
            "--port",
            &port,
            "--block-size",
            "16",
            "--num-gpu-blocks",
            "4096",
            "--worker-id",
            "1001",
            "--speedup-ratio",
            "50",
            "--zmq-kv-events",
            &zmq,
        ],
        2,
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (s, _, _) = post(&url, &chat_body(&text("after", 100), 2, false)).await;
    assert_eq!(s, 200);
    let mut ok = false;
    for _ in 0..30 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let m = get_text(&format!("{url}/metrics")).await;
        let nodes = metric(&m, "kvgate_router_index_nodes").unwrap();
        // only the new request's blocks: the old cache was forgotten, not kept beside them
        if nodes < nodes_before && metric(&m, "kvgate_kv_event_resyncs_total").unwrap() >= 2.0 {
            ok = true;
            break;
        }
    }
    assert!(ok, "{}", get_text(&format!("{url}/metrics")).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_mode_runs_both_legs_of_a_disaggregated_request() {
    let p = mocker(2001, 20.0, &["--role", "prefill"]);
    let d = mocker(2002, 20.0, &["--role", "decode"]);
    let agg = mocker(2003, 20.0, &[]);
    let dir = TempDir::new("pd");
    let wf = workers_file(&dir, &[(&p, 2001), (&d, 2002), (&agg, 2003)], None);
    let fe = frontend(&wf, "direct", &[]);
    let url = fe.url();
    let send = |headers: Vec<(&'static str, &'static str)>, stream: bool| {
        let url = url.clone();
        async move {
            let mut rb = client()
                .post(format!("{url}/v1/chat/completions"))
                .json(&chat_body(&text("disagg", 300), 12, stream));
            for (k, v) in headers {
                rb = rb.header(k, v);
            }
            let r = rb.send().await.unwrap();
            let status = r.status().as_u16();
            let h = r.headers().clone();
            (status, h, r.text().await.unwrap())
        }
    };
    let pd = vec![
        ("x-dynamo-routing-mode", "disaggregated"),
        ("x-dynamo-worker-instance-id", "2002"),
        ("x-dynamo-prefill-instance-id", "2001"),
    ];
    let (status, h, body) = send(pd.clone(), false).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(worker_of(&h), "2002", "the decode worker answers");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["usage"]["completion_tokens"], 12);
    // Streaming through the decode leg.
    let (status, _, body) = send(pd.clone(), true).await;
    assert_eq!(status, 200);
    assert!(body.trim_end().ends_with("data: [DONE]"), "{body}");
    let pm = get_text(&format!("{}/metrics", p.url())).await;
    let dm = get_text(&format!("{}/metrics", d.url())).await;
    assert_eq!(
        metric(&pm, "kvgate_mocker_remote_prefills_total"),
        Some(2.0)
    );
    assert_eq!(metric(&dm, "kvgate_mocker_kv_transfers_total"), Some(2.0));
    assert!(metric(&dm, "kvgate_mocker_kv_transfer_seconds_total").unwrap() > 0.0);
    // The decode worker cached the transferred prompt: a later aggregated request reuses it.
    let (status, _, body) = send(vec![("x-dynamo-worker-instance-id", "2002")], false).await;
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(
        v["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap()
            > 300
    );

    // Clear errors for each way the headers or the workers can be wrong.
    type Headers = Vec<(&'static str, &'static str)>;
    let cases: Vec<(Headers, u16, &str)> = vec![
        (
            vec![
                ("x-dynamo-routing-mode", "disaggregated"),
                ("x-dynamo-worker-instance-id", "2002"),
            ],
            400,
            "x-dynamo-prefill-instance-id",
        ),
        (
            vec![
                ("x-dynamo-routing-mode", "disaggregated"),
                ("x-dynamo-worker-instance-id", "2002"),
                ("x-dynamo-prefill-instance-id", "99"),
            ],
            404,
            "unknown prefill worker",
        ),
        (
            vec![
                ("x-dynamo-routing-mode", "disaggregated"),
                ("x-dynamo-worker-instance-id", "2002"),
                ("x-dynamo-prefill-instance-id", "2003"),
            ],
            400,
            "needs a prefill worker",
        ),
        (
            vec![
                ("x-dynamo-routing-mode", "sideways"),
                ("x-dynamo-worker-instance-id", "2002"),
            ],
            400,
            "aggregated or disaggregated",
        ),
    ];
    for (headers, want, needle) in cases {
        let (status, _, body) = send(headers, false).await;
        assert_eq!(status, want, "{body}");
        assert!(body.contains(needle), "{body}");
    }
}
