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
