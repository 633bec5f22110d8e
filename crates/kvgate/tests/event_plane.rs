#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The NATS event plane end to end with a real nats-server (JetStream): mockers publish
//! Dynamo-format KV events, the EPP and the kv-mode frontend index them; their indexes are
//! compared with the mockers' own caches through NATS outages and router restarts.

mod common;

use common::*;
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

fn nats_flags<'a>(url: &'a str, consumer: &'a str) -> Vec<&'a str> {
    vec![
        "--event-plane",
        "nats",
        "--nats-url",
        url,
        "--namespace",
        "kvtest",
        "--kv-consumer",
        consumer,
    ]
}

/// A mocker publishing on NATS only, with a small cache (evictions happen).
fn nats_mocker(id: u64, dp: u32, url: &str) -> Proc {
    let (id, dp) = (id.to_string(), dp.to_string());
    let mut args = vec![
        "mocker",
        "--port",
        "0",
        "--block-size",
        "16",
        "--num-gpu-blocks",
        "160",
        "--worker-id",
        &id,
        "--dp-size",
        &dp,
        "--speedup-ratio",
        "50",
    ];
    args.extend(nats_flags(url, "unused"));
    // listening + publishing lines
    Proc::start(&args, 2)
}

fn workers_yaml(dir: &TempDir, mockers: &[(&Proc, u64, u32)]) -> PathBuf {
    let mut y = String::from("model: qwen3\nblock_size: 16\nworkers:\n");
    for (i, (m, id, dp)) in mockers.iter().enumerate() {
        y.push_str(&format!(
            "  - name: worker-{i}\n    id: {id}\n    url: {}\n    dp_size: {dp}\n    total_kv_blocks: 160\n",
            m.url()
        ));
    }
    let path = dir.0.join("workers.yaml");
    std::fs::write(&path, y).unwrap();
    path
}

fn get_json(url: &str) -> serde_json::Value {
    let body = admin_http::get(url).unwrap_or_default();
    serde_json::from_str(&body).unwrap_or(serde_json::Value::Null)
}

/// (worker, rank, engine hash) of every block the mockers cache.
fn mocker_blocks(mockers: &[&Proc]) -> BTreeSet<(u64, u64, u64)> {
    let mut out = BTreeSet::new();
    for m in mockers {
        let v = get_json(&format!("{}/debug/kv", m.url()));
        let w = v["worker_id"].as_u64().unwrap();
        for r in v["ranks"].as_array().unwrap() {
            for b in r["blocks"].as_array().unwrap() {
                out.insert((w, r["dp_rank"].as_u64().unwrap(), b.as_u64().unwrap()));
            }
        }
    }
    out
}

/// The same, as a router's `/debug/index` has it.
fn index_blocks(base: &str) -> BTreeSet<(u64, u64, u64)> {
    index_blocks_at(&format!("{base}/debug/index"))
}

fn index_blocks_at(url: &str) -> BTreeSet<(u64, u64, u64)> {
    let v = get_json(url);
    let mut out = BTreeSet::new();
    for r in v["ranks"].as_array().into_iter().flatten() {
        let (w, d) = (
            r["worker_id"].as_u64().unwrap(),
            r["dp_rank"].as_u64().unwrap(),
        );
        for b in r["blocks"].as_array().unwrap() {
            out.insert((w, d, b.as_u64().unwrap()));
        }
    }
    out
}

/// Waits until the router's index equals the mockers' caches; panics with the difference.
fn assert_converges(what: &str, router: &str, mockers: &[&Proc]) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let want = mocker_blocks(mockers);
        let got = index_blocks(router);
        if want == got && !want.is_empty() {
            return;
        }
        if Instant::now() > deadline {
            let missing = want.difference(&got).count();
            let extra = got.difference(&want).count();
            panic!(
                "{what}: index never matched the mockers' caches: {} cached, {} indexed, {missing} missing, {extra} extra",
                want.len(),
                got.len()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Sum of a metric over all its label sets.
fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn metrics(base: &str) -> String {
    admin_http::get(&format!("{base}/metrics")).unwrap_or_default()
}

fn wait_metric(base: &str, name: &str, ok: impl Fn(f64) -> bool) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let v = metric(&metrics(base), name);
        if let Some(v) = v
            && ok(v)
        {
            return v;
        }
        assert!(Instant::now() < deadline, "{name} stayed at {v:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `n` chat requests through the frontend, 4 at a time; a mix of shared system prompts and
/// unique ones so that caches fill, hit and evict. Returns how many succeeded.
async fn workload(frontend: &str, n: usize, seed: usize) -> usize {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let mut ok = 0;
    for chunk in (0..n).collect::<Vec<_>>().chunks(4) {
        let futs = chunk.iter().map(|&i| {
            let shared = text(&format!("sys{}", (i + seed) % 3), 120);
            let own = text(&format!("q{seed}x{i}"), 40 + (i * 37) % 200);
            let body = chat_body(&format!("{shared}\n{own}"), 4, false);
            let c = client.clone();
            async move {
                c.post(format!("{frontend}/v1/chat/completions"))
                    .json(&body)
                    .send()
                    .await
                    .map(|r| r.status().as_u16())
                    .unwrap_or(0)
            }
        });
        for s in futures::future::join_all(futs).await {
            ok += usize::from(s == 200);
        }
    }
    ok
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_jetstream_index_matches_the_workers_through_outages_and_restarts() {
    let dir = TempDir::new("nats");
    let store = dir.0.join("js");
    let mut nats = Nats::start(free_port(), &store);
    let url = nats.url();
    let m1 = nats_mocker(1001, 1, &url);
    let m2 = nats_mocker(1002, 2, &url);
    let mockers = [&m1, &m2];
    let workers = workers_yaml(&dir, &[(&m1, 1001, 1), (&m2, 1002, 2)]);
    let snapshot = dir.0.join("epp-index.json");
    let snapshot_s = snapshot.to_str().unwrap().to_string();
    let mut epp_args = vec![
        "--secure-serving=false",
        "--kv-snapshot",
        &snapshot_s,
        "--kv-snapshot-interval-secs",
        "0.2",
    ];
    epp_args.extend(nats_flags(&url, "epp-a"));
    let epp_proc = epp(&workers, &epp_args);
    let epp_url = epp_proc.url();
    let fe = frontend(&workers, "kv", &nats_flags(&url, "frontend"));
    let fe_url = fe.url();

    // 1. A mixed workload; both routers' indexes equal the caches (with evictions: the caches
    //    hold 160 blocks per rank, the workload needs many more).
    assert_eq!(workload(&fe_url, 48, 0).await, 48);
    assert_converges("epp", &epp_url, &mockers);
    assert_converges("frontend", &fe_url, &mockers);
    let published: f64 = [&m1, &m2]
        .iter()
        .map(|m| metric(&metrics(&m.url()), "kvgate_mocker_nats_events_total").unwrap())
        .sum();
    let applied = metric(&metrics(&epp_url), "kvgate_kv_events_applied_total").unwrap();
    assert!(
        applied >= published,
        "applied {applied} of {published} events"
    );
    // Blocks computed (prompt tokens not served from cache) exceed the 3 x 160 cache slots:
    // the caches evicted, and the index followed the removals.
    let computed: f64 = mockers
        .iter()
        .map(|m| {
            let t = metrics(&m.url());
            metric_sum(&t, "vllm:prompt_tokens_total")
                - metric_sum(&t, "vllm:prefix_cache_hits_total")
        })
        .sum();
    assert!(
        computed / 16.0 > 1.5 * 480.0,
        "the workload should overflow the caches ({computed} tokens computed)"
    );
    assert_eq!(
        metric(&metrics(&epp_url), "kvgate_router_events_blind"),
        Some(0.0)
    );

    // 2. NATS goes away: routers say they are blind, requests are still served (load-only
    //    scoring), the mockers hold their events.
    nats.stop();
    wait_metric(&epp_url, "kvgate_router_events_blind", |v| v == 1.0);
    wait_metric(&fe_url, "kvgate_kv_event_plane_connected", |v| v == 0.0);
    assert_eq!(
        workload(&fe_url, 12, 1).await,
        12,
        "served while NATS was down"
    );
    let backlog: f64 = mockers
        .iter()
        .map(|m| metric(&metrics(&m.url()), "kvgate_mocker_nats_backlog").unwrap())
        .sum();
    assert!(backlog > 0.0, "events should wait for NATS");

    // 3. NATS is back (same store): nothing lost, the indexes converge again.
    nats.restart();
    wait_metric(&epp_url, "kvgate_router_events_blind", |v| v == 0.0);
    for m in mockers {
        wait_metric(&m.url(), "kvgate_mocker_nats_backlog", |v| v == 0.0);
    }
    assert_converges("epp after the NATS restart", &epp_url, &mockers);
    assert_converges("frontend after the NATS restart", &fe_url, &mockers);
    assert!(
        metric(
            &metrics(&epp_url),
            "kvgate_kv_event_plane_disconnects_total"
        )
        .unwrap()
            >= 1.0
    );
    for m in mockers {
        assert_eq!(
            metric(
                &metrics(&m.url()),
                "kvgate_mocker_nats_messages_dropped_total"
            ),
            Some(0.0)
        );
    }
    assert_eq!(
        metric(&metrics(&epp_url), "kvgate_kv_event_seq_gaps_total"),
        Some(0.0),
        "no event may be lost"
    );

    // 4. Malformed messages are counted and dropped; nothing breaks.
    let subject = "namespace-kvtest-component-backend-kv-events.queue";
    for bad in [
        &b"not json"[..],
        b"{\"worker_id\":1001,\"event\":{\"event_id\":\"x\"}}",
        b"{\"worker_id\":1001,\"event\":{\"event_id\":1,\"data\":{\"stored\":{\"blocks\":[{\"block_hash\":1",
        b"\x85\xa5topic",
    ] {
        nats.publish_raw(subject, bad);
    }
    wait_metric(&epp_url, "kvgate_kv_event_decode_errors_total", |v| {
        v >= 4.0
    });
    assert_eq!(workload(&fe_url, 8, 2).await, 8);
    assert_converges("epp after malformed events", &epp_url, &mockers);

    // 5. The EPP restarts: it restores its index snapshot, reads the stream from where the
    //    snapshot ends through its durable consumer, and its index equals the caches again.
    //    A snapshot keeps the blocks that can match (whole prefix held): compare with those.
    std::thread::sleep(Duration::from_millis(800)); // the last snapshot lands
    let applied_before = metric(&metrics(&epp_url), "kvgate_kv_events_applied_total").unwrap();
    assert!(
        metric(
            &metrics(&epp_url),
            "kvgate_kv_index_snapshots_written_total"
        )
        .unwrap()
            >= 1.0
    );
    let matchable = index_blocks_at(&format!("{epp_url}/debug/index?reachable=1"));
    assert!(!matchable.is_empty());
    drop(epp_proc);
    let epp_proc = epp(&workers, &epp_args);
    let epp_url = epp_proc.url();
    let deadline = Instant::now() + Duration::from_secs(20);
    while index_blocks(&epp_url) != matchable {
        assert!(
            Instant::now() < deadline,
            "restored index: {} blocks, expected the {} matchable ones",
            index_blocks(&epp_url).len(),
            matchable.len()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let t = metrics(&epp_url);
    assert!(
        metric(&t, "kvgate_kv_index_restore_seconds").is_some(),
        "{t}"
    );
    assert!(metric(&t, "kvgate_kv_index_restored_events").unwrap() > 0.0);
    let applied_after = metric(&t, "kvgate_kv_events_applied_total").unwrap();
    assert!(
        applied_after < applied_before / 2.0,
        "resumed after the snapshot: {applied_after} events re-applied of {applied_before}"
    );
    drop(epp_proc);

    // 6. Without its snapshot, a restarted EPP re-reads the whole retained stream: same index.
    std::fs::remove_file(&snapshot).unwrap();
    let epp_proc = epp(&workers, &epp_args);
    assert_converges("epp rebuilt from the stream", &epp_proc.url(), &mockers);
}

/// `--durable-kv-events=false`: a plain core-NATS subscription on Dynamo's subject.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn core_nats_subscription_indexes_the_same() {
    let dir = TempDir::new("corenats");
    let nats = Nats::start(free_port(), &dir.0.join("js"));
    let url = nats.url();
    let mut flags = nats_flags(&url, "core");
    flags.push("--durable-kv-events=false");
    // The routers subscribe before the mockers publish (core NATS keeps nothing).
    let mut m_args = vec![
        "mocker",
        "--port",
        "0",
        "--block-size",
        "16",
        "--num-gpu-blocks",
        "160",
        "--worker-id",
        "7",
        "--speedup-ratio",
        "50",
    ];
    m_args.extend(flags.iter().copied());
    let dir_workers = {
        // A placeholder URL first: the EPP must be subscribed before the mocker starts.
        let port = free_port();
        let y = format!(
            "model: qwen3\nblock_size: 16\nworkers:\n  - name: w\n    id: 7\n    url: http://127.0.0.1:{port}\n"
        );
        let p = dir.0.join("workers.yaml");
        std::fs::write(&p, y).unwrap();
        (p, port)
    };
    let mut epp_args = vec!["--secure-serving=false"];
    epp_args.extend(flags.iter().copied());
    let epp_proc = epp(&dir_workers.0, &epp_args);
    let epp_url = epp_proc.url();
    wait_metric(&epp_url, "kvgate_kv_event_plane_connected", |v| v == 1.0);
    let port = dir_workers.1.to_string();
    m_args[2] = &port;
    let m = Proc::start(&m_args, 2);
    let fe = frontend(&dir_workers.0, "kv", &flags);
    wait_metric(&fe.url(), "kvgate_kv_event_plane_connected", |v| v == 1.0);
    assert_eq!(workload(&fe.url(), 16, 0).await, 16);
    assert_converges("epp over core NATS", &epp_url, &[&m]);
    assert_eq!(
        metric(&metrics(&epp_url), "kvgate_kv_event_seq_gaps_total"),
        Some(0.0)
    );
}

/// A worker whose engine uses another block size than the router: its events are refused
/// loudly (counted, the rank listed as misconfigured with the reason), never indexed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_size_mismatch_is_refused_and_reported() {
    let dir = TempDir::new("blocksize");
    let m = Proc::start(
        &[
            "mocker",
            "--port",
            "0",
            "--block-size",
            "32",
            "--worker-id",
            "9",
            "--speedup-ratio",
            "50",
            "--zmq-kv-events",
            "tcp://127.0.0.1:0",
        ],
        2,
    );
    let y = format!(
        "model: qwen3\nblock_size: 16\nworkers:\n  - name: w\n    id: 9\n    url: {}\n    kv_events: {}\n",
        m.url(),
        m.zmq()
    );
    let workers = dir.0.join("workers.yaml");
    std::fs::write(&workers, y).unwrap();
    let fe = frontend(&workers, "kv", &[]);
    let url = fe.url();
    // ZMQ subscriptions drop what is published before they connect: keep sending until the
    // router has seen (and refused) events.
    let deadline = Instant::now() + Duration::from_secs(20);
    while metric(&metrics(&url), "kvgate_kv_events_rejected_total").unwrap_or(0.0) == 0.0 {
        assert!(Instant::now() < deadline, "no event was refused");
        assert_eq!(workload(&url, 2, 0).await, 2, "requests are still served");
    }
    assert_eq!(
        metric(&metrics(&url), "kvgate_router_misconfigured_ranks"),
        Some(1.0)
    );
    let v = get_json(&format!("{url}/debug/index"));
    let bad = &v["misconfigured"][0];
    assert_eq!(bad["worker_id"], 9);
    assert!(
        bad["reason"].as_str().unwrap().contains("block size 32"),
        "{bad}"
    );
    assert!(index_blocks(&url).is_empty(), "refused events were indexed");
    assert!(!mocker_blocks(&[&m]).is_empty());
}

/// vLLM ZMQ: messages the subscriber never got (forced by the mocker's test hook) are fetched
/// through the replay socket; the index still equals the cache, with no resync beyond the
/// subscription's first one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zmq_events_in_both_vllm_layouts_with_gaps_recovered_through_replay() {
    let dir = TempDir::new("replay");
    // Worker 5 publishes vLLM 0.33's maps on two ranks, worker 6 older vLLM's positional arrays;
    // both leave sequence numbers 2, 5 and 9 of every rank to the replay socket.
    let zmq_mocker = |id: &str, dp: &str, layout: &str, lines: usize| {
        Proc::start(
            &[
                "mocker",
                "--port",
                "0",
                "--block-size",
                "16",
                "--num-gpu-blocks",
                "160",
                "--worker-id",
                id,
                "--dp-size",
                dp,
                "--speedup-ratio",
                "50",
                "--zmq-kv-events",
                "tcp://127.0.0.1:0",
                "--zmq-replay",
                "tcp://127.0.0.1:0",
                "--zmq-event-layout",
                layout,
                "--zmq-drop-seqs",
                "2,5,9",
            ],
            lines,
        )
    };
    let maps = zmq_mocker("5", "2", "map", 5);
    let arrays = zmq_mocker("6", "1", "array", 3);
    let replay = |m: &Proc| {
        m.lines
            .iter()
            .find_map(|l| {
                l.strip_prefix("kvgate mocker replaying KV events on ")
                    .map(str::to_string)
            })
            .unwrap()
    };
    let mut y = String::from("model: qwen3\nblock_size: 16\nworkers:\n");
    for (m, id, dp) in [(&maps, 5, 2), (&arrays, 6, 1)] {
        y.push_str(&format!(
            "  - name: w{id}\n    id: {id}\n    url: {}\n    dp_size: {dp}\n    kv_events: {}\n    kv_events_replay: {}\n",
            m.url(),
            m.zmq(),
            replay(m)
        ));
    }
    let workers = dir.0.join("workers.yaml");
    std::fs::write(&workers, y).unwrap();
    let fe = frontend(&workers, "kv", &[]);
    let url = fe.url();
    // Give the subscriptions a moment, then a workload long enough to pass the dropped seqs.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(workload(&url, 60, 0).await, 60);
    assert_converges("frontend over ZMQ with replay", &url, &[&maps, &arrays]);
    let idx = index_blocks(&url);
    assert!(
        idx.iter().any(|(w, _, _)| *w == 6) && idx.iter().any(|(w, _, _)| *w == 5),
        "both layouts indexed"
    );
    let t = metrics(&url);
    assert!(
        metric(&t, "kvgate_kv_event_seq_gaps_total").unwrap() >= 9.0,
        "{t}"
    );
    assert!(metric(&t, "kvgate_kv_event_replayed_messages_total").unwrap() >= 9.0);
    assert_eq!(
        metric(&t, "kvgate_kv_event_replay_failures_total"),
        Some(0.0)
    );
    assert_eq!(
        metric(&t, "kvgate_kv_event_decode_errors_total"),
        Some(0.0),
        "{t}"
    );
    // One resync per rank when its subscription started; none for the gaps.
    assert_eq!(metric(&t, "kvgate_kv_event_resyncs_total"), Some(3.0));
}

/// A ZMQ publisher that restarts (same ports, empty cache, sequence from 0): the router notices,
/// drops the old process's blocks and catches up with the new one through replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zmq_publisher_restart_is_noticed() {
    let dir = TempDir::new("zmqrestart");
    let (http, pubp, rep) = (free_port(), free_port(), free_port());
    let (http_s, pub_ep, rep_ep) = (
        http.to_string(),
        format!("tcp://127.0.0.1:{pubp}"),
        format!("tcp://127.0.0.1:{rep}"),
    );
    let args = [
        "mocker",
        "--port",
        &http_s,
        "--block-size",
        "16",
        "--num-gpu-blocks",
        "160",
        "--worker-id",
        "3",
        "--speedup-ratio",
        "50",
        "--zmq-kv-events",
        &pub_ep,
        "--zmq-replay",
        &rep_ep,
    ];
    let m = Proc::start(&args, 3);
    let y = format!(
        "model: qwen3\nblock_size: 16\nworkers:\n  - name: w\n    id: 3\n    url: {}\n    kv_events: {pub_ep}\n    kv_events_replay: {rep_ep}\n",
        m.url()
    );
    let workers = dir.0.join("workers.yaml");
    std::fs::write(&workers, y).unwrap();
    let fe = frontend(&workers, "kv", &[]);
    let url = fe.url();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(workload(&url, 16, 0).await, 16);
    assert_converges("before the restart", &url, &[&m]);
    let before = index_blocks(&url);
    drop(m);
    let m = Proc::start(&args, 3);
    assert_eq!(workload(&url, 16, 7).await, 16);
    assert_converges("after the restart", &url, &[&m]);
    let after = index_blocks(&url);
    let stale = before.difference(&mocker_blocks(&[&m])).count();
    assert!(stale > 0, "the restarted cache should differ");
    assert!(
        before.difference(&after).count() >= stale,
        "the old process's blocks must be gone"
    );
}

/// A mocker on NATS on a fixed HTTP port (so that it can be restarted under the same URL).
fn nats_mocker_on(port: &str, id: &str, url: &str) -> Proc {
    let mut args = vec![
        "mocker",
        "--port",
        port,
        "--block-size",
        "16",
        "--num-gpu-blocks",
        "160",
        "--worker-id",
        id,
        "--speedup-ratio",
        "50",
    ];
    args.extend(nats_flags(url, "unused"));
    Proc::start(&args, 2)
}

/// One chat request; the prompt tokens the worker served from its cache.
async fn cached_tokens(frontend: &str, prompt: &str) -> u64 {
    let v: serde_json::Value = reqwest::Client::new()
        .post(format!("{frontend}/v1/chat/completions"))
        .json(&chat_body(prompt, 2, false))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap_or(0)
}

/// Warm start without a volume: a router keeps its index snapshot in a JetStream object store;
/// a replacement router (another pod: new consumer, no file) restores it, routes to the
/// workers that hold a prompt before any new event arrives, and reads only the newer events.
/// A corrupted snapshot object is ignored (counted) and the index rebuilt from the stream;
/// a restarted engine's old blocks leave the index.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn object_store_snapshot_warm_starts_a_replacement_router() {
    let dir = TempDir::new("objsnap");
    let nats = Nats::start(free_port(), &dir.0.join("js"));
    let url = nats.url();
    let (p1, p2) = (free_port().to_string(), free_port().to_string());
    let m1 = nats_mocker_on(&p1, "1001", &url);
    let m2 = nats_mocker_on(&p2, "1002", &url);
    let workers = workers_yaml(&dir, &[(&m1, 1001, 1), (&m2, 1002, 1)]);
    let router = |consumer: &'static str| {
        let mut flags = nats_flags(&url, consumer);
        flags.extend([
            "--kv-snapshot-bucket",
            "kvgate-test-snapshots",
            "--kv-snapshot-interval-secs",
            "0.2",
        ]);
        frontend(&workers, "kv", &flags)
    };
    let a = router("fe-a");
    assert_eq!(workload(&a.url(), 16, 0).await, 16);
    // Four long prompts, each cached on whichever worker A picked.
    let prompts: Vec<String> = (0..4).map(|i| text(&format!("warm{i}"), 60)).collect();
    for p in &prompts {
        cached_tokens(&a.url(), p).await;
    }
    assert_converges("router a", &a.url(), &[&m1, &m2]);
    // Each is cached now (a second request through A hits).
    for p in &prompts {
        let hit = cached_tokens(&a.url(), p).await;
        assert!(hit >= 48, "through router a: {hit} tokens cached");
    }
    assert_converges("router a", &a.url(), &[&m1, &m2]);
    std::thread::sleep(Duration::from_millis(800)); // the last snapshot lands
    let t = metrics(&a.url());
    assert!(
        metric(&t, "kvgate_kv_index_snapshots_written_total").unwrap() >= 1.0,
        "{t}"
    );
    assert!(metric(&t, "kvgate_kv_index_snapshot_bytes").unwrap() > 0.0);
    let applied_before = metric(&t, "kvgate_kv_events_applied_total").unwrap();
    drop(a);

    // The replacement: another consumer, nothing on disk.
    let b = router("fe-b");
    let b_url = b.url();
    wait_metric(&b_url, "kvgate_kv_index_restored_events", |v| v > 0.0);
    let restored = index_blocks(&b_url);
    let cached = mocker_blocks(&[&m1, &m2]);
    assert!(!restored.is_empty());
    assert!(
        restored.is_subset(&cached),
        "restored blocks the workers do not hold"
    );
    let applied_after = metric(&metrics(&b_url), "kvgate_kv_events_applied_total").unwrap();
    assert!(
        applied_after < applied_before / 4.0,
        "the replacement re-applied {applied_after} of {applied_before} events"
    );
    // Routed on the restored index: each prompt lands where its prefix is cached.
    for (i, p) in prompts.iter().enumerate() {
        let hit = cached_tokens(&b_url, p).await;
        assert!(hit >= 48, "prompt {i}: only {hit} tokens cached");
    }
    assert_eq!(
        metric(
            &metrics(&b_url),
            "kvgate_kv_index_snapshots_discarded_total"
        ),
        Some(0.0)
    );
    std::thread::sleep(Duration::from_millis(800));
    drop(b);

    // A corrupted object: ignored with a warning, counted, the index rebuilt from the stream,
    // and the object replaced by a good snapshot.
    let client = kvgate_runtime::nats::connect(&url, "test", |_| {})
        .await
        .unwrap();
    let js = kvgate_runtime::snapshot::context(client);
    let target = kvgate_runtime::snapshot::SnapshotTarget::Object {
        bucket: "kvgate-test-snapshots".into(),
        key: "namespace-kvtest-component-backend-kv-events".into(),
    };
    let good = kvgate_runtime::snapshot::load(Some(&js), &target)
        .await
        .unwrap()
        .expect("a snapshot object");
    let mut bad = good.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0x55;
    kvgate_runtime::snapshot::store(
        Some(&js),
        &target,
        "namespace-kvtest-component-backend-kv-events",
        u64::MAX,
        bad,
        true,
    )
    .await
    .unwrap();
    let c = router("fe-c");
    let c_url = c.url();
    assert_converges("router c rebuilt from the stream", &c_url, &[&m1, &m2]);
    let t = metrics(&c_url);
    assert_eq!(
        metric(&t, "kvgate_kv_index_snapshots_discarded_total"),
        Some(1.0)
    );
    assert!(
        metric(&t, "kvgate_kv_index_restored_events").is_none(),
        "{t}"
    );
    assert!(metric(&t, "kvgate_kv_events_applied_total").unwrap() >= applied_before);
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(&metrics(&c_url), "kvgate_kv_index_snapshots_written_total").unwrap_or(0.0) < 1.0 {
        assert!(
            Instant::now() < deadline,
            "the bad object was never replaced"
        );
        assert_eq!(workload(&c_url, 2, 9).await, 2);
        std::thread::sleep(Duration::from_millis(300));
    }
    let replaced = kvgate_runtime::snapshot::load(Some(&js), &target)
        .await
        .unwrap()
        .unwrap();
    assert!(kvgate_core::snapshot::decode(&replaced).is_ok());

    // An engine restarts (same id and URL, empty cache): its old blocks leave the index.
    let before = index_blocks(&c_url);
    assert!(before.iter().any(|(w, _, _)| *w == 1001));
    drop(m1);
    let m1 = nats_mocker_on(&p1, "1001", &url);
    assert_eq!(workload(&c_url, 8, 5).await, 8);
    assert_converges("after the engine restart", &c_url, &[&m1, &m2]);
}

/// Restarted engines whose restart nobody announced: a Dynamo 1.6 worker sends no `cleared`
/// (or it was lost), and a bare `RouterEvent` publisher's ids start over. Each time the old
/// process's blocks must leave the index, also across a router restart from its snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_engines_without_cleared_leave_no_stale_blocks() {
    use kvgate_core::{ExternalHash, KvEvent, KvEventData, LocalHash, StorageTier, StoredBlock};
    use kvgate_wire::dynamo::RouterEvent;
    use kvgate_wire::dynamo_plane::PlanePublisher;
    let dir = TempDir::new("restarts");
    let nats = Nats::start(free_port(), &dir.0.join("js"));
    let url = nats.url();
    let y = format!(
        "model: qwen3\nblock_size: 16\nworkers:\n  - name: a\n    id: 77\n    url: http://127.0.0.1:{}\n  - name: b\n    id: 78\n    url: http://127.0.0.1:{}\n",
        free_port(),
        free_port()
    );
    let workers = dir.0.join("workers.yaml");
    std::fs::write(&workers, y).unwrap();
    let mut args = vec![
        "--secure-serving=false",
        "--kv-snapshot-bucket",
        "snaps",
        "--kv-snapshot-interval-secs",
        "0.2",
    ];
    args.extend(nats_flags(&url, "epp"));
    let e = epp(&workers, &args);
    wait_metric(&e.url(), "kvgate_kv_event_plane_connected", |v| v == 1.0);
    std::thread::sleep(Duration::from_millis(300)); // the stream exists
    let stored = |w: u64, id: u64, parent: Option<u64>, hashes: &[u64]| {
        RouterEvent::from_kv_event(&KvEvent {
            source: kvgate_core::WorkerRank::new(w, 0),
            event_id: id,
            tier: StorageTier::Device,
            data: KvEventData::Stored {
                parent: parent.map(ExternalHash),
                blocks: hashes
                    .iter()
                    .map(|&h| StoredBlock {
                        hash: ExternalHash(h),
                        local: LocalHash(h + 1_000_000),
                    })
                    .collect(),
            },
        })
    };
    let dynamo = "namespace.kvtest.component.backend.endpoint.generate.kv-events";
    let bare = "namespace-kvtest-component-backend-kv-events.queue";
    let blocks_of = |w: u64| -> BTreeSet<u64> {
        index_blocks(&e.url())
            .into_iter()
            .filter(|(x, _, _)| *x == w)
            .map(|(_, _, h)| h)
            .collect()
    };
    let wait_blocks = |w: u64, want: &[u64]| {
        let want: BTreeSet<u64> = want.iter().copied().collect();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let got = blocks_of(w);
            if got == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "worker {w}: {got:?}, want {want:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    // Worker 77, first process (Dynamo envelope, publisher A), no `cleared`.
    let mut pa = PlanePublisher::new(0xA);
    nats.publish_raw(dynamo, &pa.kv_events(&[stored(77, 1, None, &[1, 2, 3])]));
    nats.publish_raw(dynamo, &pa.kv_events(&[stored(77, 2, Some(3), &[4])]));
    // Worker 78, a bare RouterEvent publisher (kvgate's older layout).
    for (id, h) in [(1u64, 50u64), (2, 51), (3, 52)] {
        let parent = (h > 50).then_some(h - 1);
        nats.publish_raw(
            bare,
            &serde_json::to_vec(&stored(78, id, parent, &[h])).unwrap(),
        );
    }
    wait_blocks(77, &[1, 2, 3, 4]);
    wait_blocks(78, &[50, 51, 52]);

    // (b) Worker 77 restarts: a new publisher, event ids from 1 again, no `cleared`.
    let mut pb = PlanePublisher::new(0xB);
    nats.publish_raw(dynamo, &pb.kv_events(&[stored(77, 1, None, &[100, 101])]));
    wait_blocks(77, &[100, 101]);
    // (c) Worker 78's ids start over without `cleared`.
    nats.publish_raw(
        bare,
        &serde_json::to_vec(&stored(78, 1, None, &[60])).unwrap(),
    );
    wait_blocks(78, &[60]);
    let t = metrics(&e.url());
    assert_eq!(
        metric(
            &t,
            "kvgate_kv_rank_restarts_total{reason=\"new_publisher\"}"
        ),
        Some(1.0),
        "{t}"
    );
    assert_eq!(
        metric(
            &t,
            "kvgate_kv_rank_restarts_total{reason=\"event_id_reset\"}"
        ),
        Some(1.0)
    );

    // The router restarts from its snapshot; meanwhile worker 77 restarts again (publisher C,
    // ids from 1, no `cleared`) and worker 78's ids start over again: the snapshot's blocks
    // of both must not come back.
    wait_metric(&e.url(), "kvgate_kv_index_snapshots_written_total", |v| {
        v >= 1.0
    });
    std::thread::sleep(Duration::from_millis(600));
    drop(e);
    let mut pc = PlanePublisher::new(0xC);
    nats.publish_raw(dynamo, &pc.kv_events(&[stored(77, 1, None, &[200])]));
    nats.publish_raw(
        bare,
        &serde_json::to_vec(&stored(78, 1, None, &[70])).unwrap(),
    );
    let e = epp(&workers, &args);
    let blocks_of = |w: u64| -> BTreeSet<u64> {
        index_blocks(&e.url())
            .into_iter()
            .filter(|(x, _, _)| *x == w)
            .map(|(_, _, h)| h)
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (a, b) = (blocks_of(77), blocks_of(78));
        if a == BTreeSet::from([200]) && b == BTreeSet::from([70]) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "after the restore: 77 {a:?}, 78 {b:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let t = metrics(&e.url());
    assert!(
        metric(&t, "kvgate_kv_index_restored_events").unwrap() > 0.0,
        "{t}"
    );
    // Only the two newer messages were read.
    assert_eq!(
        metric(&t, "kvgate_kv_events_applied_total"),
        Some(2.0),
        "{t}"
    );
}
