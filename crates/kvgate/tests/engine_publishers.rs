#![allow(clippy::unwrap_used, clippy::expect_used)]
//! kvgate against the REAL KV-event publishers of vLLM 0.34 and SGLang 0.5 (their installed
//! `ZmqEventPublisher`, `KVEventBatch`, `BlockStored`, ... in `.tools/vllm-venv`, from
//! `scripts/setup-vllm.sh`), driven by `scripts/engine_publish.py` through a scripted sequence:
//! - what the publishers put on the wire (their replay buffers, byte for byte) decodes to
//!   exactly the expected events, hybrid-model fields included;
//! - kvgate's ZMQ subscriber (in process, and in `kvgate epp` from a workers file with
//!   `kv_events: tcp://...`) follows both data-parallel ranks on the engines' port convention,
//!   catches up through the replay socket on what was published before it subscribed, and ends
//!   with exactly the expected blocks (engine hash, tier, chained hash of the token ids with
//!   LoRA and salt) per worker rank;
//! - events of KV cache groups the index cannot model (a sliding-window group, a Mamba group, a
//!   second full-attention group) are skipped and counted, and a sliding window's eviction does
//!   not remove a block the full-attention group still holds.
//!
//! Keep the scripted events in step with `vllm_script` / `sglang_script` in the script.

mod common;

use common::*;
use kvgate_core::config::RouterConfig;
use kvgate_core::hashing::{BlockHashes, HashSeed};
use kvgate_core::router::{Router, WorkerInfo};
use kvgate_core::{SeqHash, StorageTier, WorkerId};
use kvgate_runtime::events::{EventStats, subscribe};
use kvgate_wire::vllm::{
    DetailedBatch, DetailedEvent, EventMeta, SKIP_GROUP, SKIP_SPEC_KIND, VllmEvent,
    decode_batch_detailed,
};
use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

const BLOCK_SIZE: u32 = 4;
/// The script's timestamps: `ts = T0 + 10 * phase + batch`.
const T0: f64 = 1_700_000_000.0;
const BIG: u64 = 0xFEDC_BA98_7654_3210;
/// kvgate's u64 for the 32-byte block hash 0, 1, ..., 31 (xxh3-64 of the bytes).
const BYTES_HASH: u64 = 0x3523_581f_e96e_4c05;

fn venv_python() -> PathBuf {
    let py = tools_dir().join("vllm-venv/bin/python");
    assert!(
        py.exists(),
        "{} missing: run scripts/setup.sh (it runs scripts/setup-vllm.sh, which installs vLLM's and SGLang's publishers)",
        py.display()
    );
    py
}

/// `engine_publish.py`, killed on drop (closing its stdin also ends it).
struct Publisher {
    child: Child,
    _stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
    dump: PathBuf,
}

impl Drop for Publisher {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Publisher {
    /// Starts the script and waits until phase 1 is published (before anyone subscribed).
    fn start(engine: &str, endpoint: &str, replay: &str, subscribers: usize, dir: &Path) -> Self {
        let script =
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../scripts/engine_publish.py");
        let dump = dir.join(format!("{engine}.json"));
        let mut child = Command::new(venv_python())
            .arg(script)
            .args([engine, "--endpoint", endpoint, "--replay", replay])
            .args(["--subscribers", &subscribers.to_string()])
            .arg("--dump")
            .arg(&dump)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start scripts/engine_publish.py");
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let p = Publisher {
            child,
            _stdin: stdin,
            lines,
            dump,
        };
        p.expect_line("ready");
        p
    }

    fn expect_line(&self, prefix: &str) {
        match self.lines.recv_timeout(Duration::from_secs(20)) {
            Ok(l) if l.starts_with(prefix) => {}
            other => panic!("engine_publish.py: expected {prefix:?}, got {other:?}"),
        }
    }

    /// Waits until phase 2 is published; returns the published (seq, payload) per rank.
    fn finish(&self) -> BTreeMap<u32, Vec<(u64, Vec<u8>)>> {
        self.expect_line("done");
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&self.dump).unwrap()).unwrap();
        let hex = |s: &str| {
            (0..s.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
                .collect::<Vec<u8>>()
        };
        v.as_object()
            .unwrap()
            .iter()
            .map(|(rank, msgs)| {
                let msgs = msgs
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|m| (m[0].as_u64().unwrap(), hex(m[1].as_str().unwrap())))
                    .collect();
                (rank.parse().unwrap(), msgs)
            })
            .collect()
    }
}

/// Two consecutive free loopback ports (rank 0 and rank 1 of a publisher).
fn free_ports() -> u16 {
    loop {
        let p = free_port();
        if p < u16::MAX && std::net::TcpListener::bind(("127.0.0.1", p + 1)).is_ok() {
            return p;
        }
    }
}

fn toks(start: u32, blocks: u32) -> Vec<u32> {
    (start..start + blocks * BLOCK_SIZE).collect()
}

fn stored(hashes: &[u64], parent: Option<u64>, tokens: Vec<u32>) -> VllmEvent {
    VllmEvent::BlockStored {
        block_hashes: hashes.to_vec(),
        parent_block_hash: parent,
        token_ids: tokens,
        block_size: BLOCK_SIZE,
        lora_name: None,
        medium: Some("GPU".into()),
    }
}

fn with_lora(mut e: VllmEvent, lora: &str) -> VllmEvent {
    if let VllmEvent::BlockStored { lora_name, .. } = &mut e {
        *lora_name = Some(lora.into());
    }
    e
}

fn in_medium(mut e: VllmEvent, m: &str) -> VllmEvent {
    if let VllmEvent::BlockStored { medium, .. } | VllmEvent::BlockRemoved { medium, .. } = &mut e {
        *medium = Some(m.into());
    }
    e
}

fn removed(hashes: &[u64]) -> VllmEvent {
    VllmEvent::BlockRemoved {
        block_hashes: hashes.to_vec(),
        medium: Some("GPU".into()),
    }
}

/// vLLM 0.34's annotations of a stored event.
fn spec(group: u32, kind: &str, window: Option<u32>) -> EventMeta {
    EventMeta {
        group_idx: Some(group),
        kv_cache_spec_kind: Some(kind.into()),
        kv_cache_spec_sliding_window: window,
        ..EventMeta::default()
    }
}

fn group(g: u32) -> EventMeta {
    EventMeta {
        group_idx: Some(g),
        ..EventMeta::default()
    }
}

fn ev(event: VllmEvent, meta: EventMeta) -> DetailedEvent {
    DetailedEvent { event, meta }
}

fn batch(rank: u32, phase: u32, i: u32, events: Vec<DetailedEvent>) -> DetailedBatch {
    DetailedBatch {
        ts: T0 + f64::from(10 * phase + i),
        events,
        dp_rank: Some(rank),
    }
}

/// What `vllm_script` publishes, per rank, in sequence order.
fn vllm_expected() -> BTreeMap<u32, Vec<DetailedBatch>> {
    let full = |g| spec(g, "full_attention", None);
    let local = |mut m: EventMeta, l: &str| {
        m.locality = Some(l.into());
        m
    };
    let rank0 = vec![
        batch(
            0,
            0,
            0,
            vec![
                ev(stored(&[11, 12], None, toks(100, 2)), full(0)),
                ev(
                    stored(&[11, 12], None, toks(100, 2)),
                    spec(1, "sliding_window", Some(8)),
                ),
                ev(stored(&[11, 12], None, toks(100, 2)), full(3)),
            ],
        ),
        batch(
            0,
            1,
            0,
            vec![
                ev(stored(&[13], Some(12), toks(108, 1)), full(0)),
                ev(removed(&[11]), group(1)),
            ],
        ),
        batch(
            0,
            1,
            1,
            vec![
                ev(
                    with_lora(stored(&[BIG], None, toks(200, 1)), "adapter-a"),
                    full(0),
                ),
                ev(stored(&[BYTES_HASH], None, toks(300, 1)), full(0)),
                ev(
                    in_medium(stored(&[14], Some(13), toks(112, 1)), "CPU"),
                    local(full(0), "LOCAL"),
                ),
                ev(
                    in_medium(stored(&[15], None, toks(400, 1)), "CPU"),
                    local(full(0), "REMOTE"),
                ),
            ],
        ),
        batch(
            0,
            1,
            2,
            vec![
                ev(removed(&[BYTES_HASH]), group(0)),
                ev(stored(&[16], None, toks(500, 1)), spec(2, "mamba", None)),
            ],
        ),
    ];
    let mla = || spec(0, "mla_attention", None);
    let rank1 = vec![
        batch(1, 0, 0, vec![ev(stored(&[21], None, toks(600, 1)), mla())]),
        batch(
            1,
            1,
            0,
            vec![ev(VllmEvent::AllBlocksCleared, EventMeta::default())],
        ),
        batch(
            1,
            1,
            1,
            vec![ev(stored(&[22, 23], None, toks(700, 2)), mla())],
        ),
    ];
    BTreeMap::from([(0, rank0), (1, rank1)])
}

/// What `sglang_script` publishes (one rank).
fn sglang_expected() -> BTreeMap<u32, Vec<DetailedBatch>> {
    let none = EventMeta::default;
    let salted = EventMeta {
        cache_salt: Some("tenant-1".into()),
        ..EventMeta::default()
    };
    BTreeMap::from([(
        0,
        vec![
            batch(
                0,
                0,
                0,
                vec![ev(stored(&[31, 32], None, toks(800, 2)), none())],
            ),
            batch(
                0,
                1,
                0,
                vec![
                    // SGLang's signed 64-bit hash -5.
                    ev(stored(&[u64::MAX - 4], Some(32), toks(808, 1)), none()),
                    ev(stored(&[33], None, toks(900, 1)), salted),
                    ev(
                        with_lora(stored(&[34], None, toks(1000, 1)), "adapter-b"),
                        none(),
                    ),
                ],
            ),
            batch(
                0,
                1,
                1,
                vec![
                    ev(
                        in_medium(stored(&[35], None, toks(1100, 1)), "CPU_PINNED"),
                        none(),
                    ),
                    ev(
                        in_medium(stored(&[36], None, toks(1200, 1)), "DISK"),
                        none(),
                    ),
                    ev(removed(&[34]), none()),
                ],
            ),
        ],
    )])
}

/// Chained hashes of `tokens`' blocks as the router computes them for a request.
fn seqs(tokens: Vec<u32>, lora: Option<&str>, salt: Option<&str>) -> Vec<SeqHash> {
    BlockHashes::from_tokens(&tokens, BLOCK_SIZE as usize, HashSeed::new(lora, salt))
        .seqs()
        .to_vec()
}

type Held = BTreeSet<(u32, StorageTier, u64, SeqHash)>;

/// (dp rank, tier, engine hash, chained hash) of every block the index holds for `worker`.
fn held(router: &Mutex<Router>, worker: u64) -> Held {
    router
        .lock()
        .unwrap()
        .index()
        .blocks()
        .into_iter()
        .filter(|(w, ..)| w.worker.0 == worker)
        .map(|(w, tier, ext, seq)| (w.dp_rank.0, tier, ext.0, seq))
        .collect()
}

fn assert_decodes_exactly(
    published: &BTreeMap<u32, Vec<(u64, Vec<u8>)>>,
    expected: &BTreeMap<u32, Vec<DetailedBatch>>,
) {
    assert_eq!(
        published.keys().collect::<Vec<_>>(),
        expected.keys().collect::<Vec<_>>()
    );
    for (rank, msgs) in published {
        let want = &expected[rank];
        let seqs: Vec<u64> = msgs.iter().map(|(s, _)| *s).collect();
        assert_eq!(
            seqs,
            (0..want.len() as u64).collect::<Vec<_>>(),
            "rank {rank}"
        );
        for ((seq, payload), want) in msgs.iter().zip(want) {
            let got = decode_batch_detailed(payload)
                .unwrap_or_else(|e| panic!("rank {rank} seq {seq}: {e}"));
            assert_eq!(&got, want, "rank {rank} seq {seq}");
        }
    }
}

struct InProcess {
    router: Arc<Mutex<Router>>,
    stats: Arc<EventStats>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for InProcess {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// kvgate's ZMQ subscriber in this process, one task per rank, as the EPP starts them.
fn subscribe_in_process(worker: u64, dp_size: u32, endpoint: &str, replay: &str) -> InProcess {
    let mut r = Router::new(RouterConfig::default(), BLOCK_SIZE as usize).unwrap();
    r.upsert_worker(WorkerInfo {
        id: WorkerId(worker),
        dp_size,
        role: Default::default(),
        capacity: Default::default(),
    });
    let router = Arc::new(Mutex::new(r));
    let stats = Arc::new(EventStats::new());
    let tasks = (0..dp_size)
        .map(|rank| {
            subscribe(
                router.clone(),
                stats.clone(),
                WorkerId(worker),
                rank,
                endpoint.to_string(),
                Some(replay.to_string()),
                BLOCK_SIZE,
            )
        })
        .collect();
    InProcess {
        router,
        stats,
        tasks,
    }
}

/// `kvgate epp` with one worker publishing on `endpoint` (and `replay`), block size 4.
fn epp_for(dir: &TempDir, worker: u64, dp_size: u32, endpoint: &str, replay: &str) -> Proc {
    let y = format!(
        "model: qwen3\nblock_size: {BLOCK_SIZE}\nworkers:\n  - name: engine\n    id: {worker}\n    url: http://127.0.0.1:9\n    dp_size: {dp_size}\n    kv_events: {endpoint}\n    kv_events_replay: {replay}\n"
    );
    let path = dir.0.join(format!("workers-{worker}.yaml"));
    std::fs::write(&path, y).unwrap();
    epp(&path, &["--secure-serving=false"])
}

/// Polls `f` until it returns true (20 s at most).
async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// (dp rank, engine hash) of the device blocks `/debug/index` lists for `worker`.
fn epp_index(epp: &Proc, worker: u64) -> BTreeSet<(u32, u64)> {
    let body = admin_http::get(&format!("{}/debug/index", epp.url())).unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    let mut out = BTreeSet::new();
    for r in v["ranks"].as_array().into_iter().flatten() {
        if r["worker_id"].as_u64() == Some(worker) {
            let rank = r["dp_rank"].as_u64().unwrap() as u32;
            for b in r["blocks"].as_array().unwrap() {
                out.insert((rank, b.as_u64().unwrap()));
            }
        }
    }
    out
}

fn epp_metrics(epp: &Proc) -> String {
    admin_http::get(&format!("{}/metrics", epp.url())).unwrap_or_default()
}

fn skipped(stats: &EventStats) -> BTreeMap<&'static str, u64> {
    stats.skipped.lock().unwrap().clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vllm_zmq_publisher_hybrid_model_events() {
    let dir = TempDir::new("vllm-pub");
    let (pub_port, replay_port) = (free_ports(), free_ports());
    let (sub_ep, replay_ep) = (
        format!("tcp://127.0.0.1:{pub_port}"),
        format!("tcp://127.0.0.1:{replay_port}"),
    );
    // vLLM binds its PUB socket only for wildcard endpoints (otherwise it connects).
    let publisher = Publisher::start(
        "vllm",
        &format!("tcp://*:{pub_port}"),
        &replay_ep,
        2,
        &dir.0,
    );
    let worker = 71;
    let local = subscribe_in_process(worker, 2, &sub_ep, &replay_ep);
    let epp = epp_for(&dir, worker, 2, &sub_ep, &replay_ep);
    let published = publisher.finish();
    assert_decodes_exactly(&published, &vllm_expected());

    // Rank 0: group 0 (full attention) indexed; its block 11 stays although the sliding-window
    // group evicted it; the bytes-hash block came and went; block 14 was offloaded to CPU,
    // 15 is a remote store's; group 2 (Mamba) and the second full-attention group 3 are not
    // indexed. Rank 1: cleared, then 22 and 23 (MLA: a full-prefix cache).
    let chain = seqs(toks(100, 4), None, None);
    let want: Held = [
        (0, StorageTier::Device, 11, chain[0]),
        (0, StorageTier::Device, 12, chain[1]),
        (0, StorageTier::Device, 13, chain[2]),
        (0, StorageTier::HostPinned, 14, chain[3]),
        (
            0,
            StorageTier::Device,
            BIG,
            seqs(toks(200, 1), Some("adapter-a"), None)[0],
        ),
        (
            0,
            StorageTier::External,
            15,
            seqs(toks(400, 1), None, None)[0],
        ),
        (
            1,
            StorageTier::Device,
            22,
            seqs(toks(700, 2), None, None)[0],
        ),
        (
            1,
            StorageTier::Device,
            23,
            seqs(toks(700, 2), None, None)[1],
        ),
    ]
    .into_iter()
    .collect();
    eventually(
        "the in-process index never held the expected blocks",
        || held(&local.router, worker) == want,
    )
    .await;
    // Phase 1 (published before anyone subscribed) came through the replay socket.
    let s = &local.stats;
    assert!(s.replays.load(Ordering::Relaxed) >= 2);
    assert!(s.replayed_messages.load(Ordering::Relaxed) >= 2);
    assert_eq!(s.decode_errors.load(Ordering::Relaxed), 0);
    assert_eq!(s.rejected.load(Ordering::Relaxed), 0);
    // Sliding-window stored + its removal + Mamba; the second full-attention group.
    assert_eq!(
        skipped(s),
        BTreeMap::from([(SKIP_GROUP, 1), (SKIP_SPEC_KIND, 3)])
    );
    // 14 events published, 4 skipped.
    assert_eq!(s.events.load(Ordering::Relaxed), 10);
    assert_eq!(held(&local.router, worker), want, "no change afterwards");

    // The EPP, from its workers file, ends the same (its /debug/index lists device blocks).
    let device: BTreeSet<(u32, u64)> = want
        .iter()
        .filter(|b| b.1 == StorageTier::Device)
        .map(|b| (b.0, b.2))
        .collect();
    eventually("the EPP's index never held the expected blocks", || {
        epp_index(&epp, worker) == device
    })
    .await;
    let t = epp_metrics(&epp);
    for (reason, n) in [("group_idx", 1.0), ("kv_cache_spec_kind", 3.0)] {
        let name = format!("kvgate_kv_events_skipped_total{{reason=\"{reason}\"}}");
        assert_eq!(metric(&t, &name), Some(n), "{name}\n{t}");
    }
    assert_eq!(metric(&t, "kvgate_kv_event_decode_errors_total"), Some(0.0));
    assert_eq!(metric(&t, "kvgate_kv_events_rejected_total"), Some(0.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sglang_zmq_publisher_events() {
    let dir = TempDir::new("sglang-pub");
    let (pub_port, replay_port) = (free_port(), free_port());
    let (sub_ep, replay_ep) = (
        format!("tcp://127.0.0.1:{pub_port}"),
        format!("tcp://127.0.0.1:{replay_port}"),
    );
    let publisher = Publisher::start("sglang", &sub_ep, &replay_ep, 2, &dir.0);
    let worker = 72;
    let local = subscribe_in_process(worker, 1, &sub_ep, &replay_ep);
    let epp = epp_for(&dir, worker, 1, &sub_ep, &replay_ep);
    let published = publisher.finish();
    assert_decodes_exactly(&published, &sglang_expected());

    let chain = seqs(toks(800, 3), None, None);
    let want: Held = [
        (0, StorageTier::Device, 31, chain[0]),
        (0, StorageTier::Device, 32, chain[1]),
        (0, StorageTier::Device, u64::MAX - 4, chain[2]),
        // Hashed with the salt, as the router hashes a request that carries it.
        (
            0,
            StorageTier::Device,
            33,
            seqs(toks(900, 1), None, Some("tenant-1"))[0],
        ),
        (
            0,
            StorageTier::HostPinned,
            35,
            seqs(toks(1100, 1), None, None)[0],
        ),
        (0, StorageTier::Disk, 36, seqs(toks(1200, 1), None, None)[0]),
    ]
    .into_iter()
    .collect();
    eventually(
        "the in-process index never held the expected blocks",
        || held(&local.router, worker) == want,
    )
    .await;
    let s = &local.stats;
    assert!(s.replayed_messages.load(Ordering::Relaxed) >= 1);
    assert_eq!(s.decode_errors.load(Ordering::Relaxed), 0);
    assert!(skipped(s).is_empty(), "{:?}", skipped(s));
    assert_eq!(s.events.load(Ordering::Relaxed), 7);

    let device: BTreeSet<(u32, u64)> = want
        .iter()
        .filter(|b| b.1 == StorageTier::Device)
        .map(|b| (b.0, b.2))
        .collect();
    eventually("the EPP's index never held the expected blocks", || {
        epp_index(&epp, worker) == device
    })
    .await;
    assert_eq!(
        metric(&epp_metrics(&epp), "kvgate_kv_event_decode_errors_total"),
        Some(0.0)
    );
}
