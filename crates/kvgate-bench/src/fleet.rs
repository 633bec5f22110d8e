//! `kvgate bench fleet`: the router at 1,000 and 10,000 worker ranks, in process.
//!
//! For each fleet size the bench builds the routing service the EPP runs, gives it the workers
//! the two ways the EPP learns them (a workers file, and pod discovery from Pod objects), fills
//! the prefix index with KV events (every rank caches a few prompt families), then routes a
//! stream of pre-hashed requests, booking each and freeing the oldest so that a steady number
//! is in flight. It reports:
//! - decision time p50/p99/max (score + book, the EPP's `route` call; tokenization excluded),
//!   for short and long prompts: if scoring were O(fleet) per block, the long prompts would
//!   cost their block count times more;
//! - index and load memory per rank (the index's own count, and the process's RSS growth);
//! - the cost of a workers-file reload, of the first discovery sync, and of one discovery
//!   update (a pod's readiness flips) at that size.
//!
//! `--json` prints `{"fleets": [{"ranks", "decision_p50_us", "decision_p99_us", ...}]}` last.

use crate::procs::{quantile, rss_mb};
use kvgate_core::config::RouterConfig;
use kvgate_core::hashing::{BlockHashes, HashSeed};
use kvgate_core::{
    DpRank, ExternalHash, KvEvent, KvEventData, RequestId, StorageTier, StoredBlock, WorkerRank,
};
use kvgate_k8s::discovery::{ANN_DP_SIZE, ANN_TOTAL_KV_BLOCKS, PodFacts, PoolConfig, endpoints};
use kvgate_runtime::routing::RoutingService;
use kvgate_wire::workers::{WorkerEntry, WorkersFile};
use serde_json::json;
use std::collections::{BTreeMap, VecDeque};
use std::time::Instant;

#[derive(clap::Args, Debug, Clone)]
pub struct BenchFleetArgs {
    /// Fleet sizes in worker ranks.
    #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
    pub ranks: Vec<usize>,
    /// Data-parallel ranks per worker (ranks / dp-size workers).
    #[arg(long, default_value_t = 1)]
    pub dp_size: u32,
    /// Routed requests per fleet size and prompt length.
    #[arg(long, default_value_t = 5000)]
    pub requests: usize,
    /// Requests kept in flight (booked, not yet freed), per rank.
    #[arg(long, default_value_t = 2.0)]
    pub in_flight_per_rank: f64,
    /// Prompt families (shared prefixes) across the fleet; each rank caches `--families-per-rank`.
    #[arg(long, default_value_t = 256)]
    pub families: usize,
    #[arg(long, default_value_t = 4)]
    pub families_per_rank: usize,
    /// Prompt lengths in tokens (16-token blocks).
    #[arg(long, value_delimiter = ',', default_value = "2048,8192")]
    pub prompt_tokens: Vec<usize>,
    /// Tokens every prompt starts with, whatever its family (a deployment-wide system prompt):
    /// then every rank caches it and has it active, the case where per-rank work on the
    /// prompt's blocks would cost the most. 0: families share nothing.
    #[arg(long, default_value_t = 0)]
    pub system_prompt_tokens: usize,
    /// Print one JSON object as the last line.
    #[arg(long)]
    pub json: bool,
}

const BLOCK: usize = 16;

#[derive(serde::Serialize, Debug, Clone)]
pub struct FleetPoint {
    pub ranks: usize,
    pub workers: usize,
    pub prompt_tokens: usize,
    pub system_prompt_tokens: usize,
    pub requests: usize,
    pub in_flight: usize,
    pub decision_p50_us: f64,
    pub decision_p99_us: f64,
    pub decision_max_us: f64,
    pub free_p50_us: f64,
    pub index_bytes_per_rank: f64,
    pub indexed_blocks_per_rank: f64,
    pub rss_mb_per_1k_ranks_workers: f64,
    pub rss_mb_per_1k_ranks_index: f64,
    pub rss_mb_per_1k_ranks_load: f64,
    pub file_reload_ms: f64,
    pub discovery_first_sync_ms: f64,
    pub discovery_update_ms: f64,
    pub hit_rate: f64,
}

fn tokens(system: usize, family: usize, unique: u64, n: usize) -> Vec<u32> {
    // Everyone shares the system prompt, a family its first 3/4; the rest is the request's own.
    let shared = n * 3 / 4;
    (0..n)
        .map(|i| {
            if i < system {
                (i * 53 + 11) as u32 % 190_000
            } else if i < shared {
                (family * 7919 + i * 31) as u32 % 190_000
            } else {
                ((unique.wrapping_mul(2_654_435_761) as usize + i * 17) % 190_000) as u32
            }
        })
        .collect()
}

fn entries(workers: usize, dp: u32) -> Vec<WorkerEntry> {
    (0..workers)
        .map(|i| WorkerEntry {
            name: format!("pod-{i}"),
            id: Some(10_000 + i as u64),
            url: format!("http://10.{}.{}.{}:8000", i / 65536, i / 256 % 256, i % 256),
            role: Default::default(),
            dp_size: dp,
            total_kv_blocks: Some(16_384),
            max_num_batched_tokens: Some(8192),
            kv_events: None,
            kv_events_replay: None,
        })
        .collect()
}

fn file_yaml(entries: &[WorkerEntry]) -> String {
    let mut y = String::from("model: qwen3\nblock_size: 16\nworkers:\n");
    for e in entries {
        y.push_str(&format!(
            "  - {{name: {}, id: {}, url: '{}', dp_size: {}, total_kv_blocks: 16384, max_num_batched_tokens: 8192}}\n",
            e.name,
            e.id.unwrap_or_default(),
            e.url,
            e.dp_size
        ));
    }
    y
}

fn pods(workers: usize, dp: u32) -> Vec<PodFacts> {
    (0..workers)
        .map(|i| {
            PodFacts::from_json(&json!({
                "metadata": {"name": format!("pod-{i}"), "labels": {"app": "vllm"},
                    "annotations": {ANN_DP_SIZE: dp.to_string(), ANN_TOTAL_KV_BLOCKS: "16384"}},
                "status": {"podIP": format!("10.{}.{}.{}", i / 65536, i / 256 % 256, i % 256),
                    "conditions": [{"type": "Ready", "status": "True"}]}
            }))
        })
        .collect()
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}

fn one_fleet(a: &BenchFleetArgs, ranks: usize, prompt: usize) -> Result<FleetPoint, String> {
    let dp = a.dp_size.max(1);
    let workers = ranks.div_ceil(dp as usize);
    let ranks = workers * dp as usize;
    let rss0 = rss_mb(std::process::id());
    let list = entries(workers, dp);
    let base = WorkersFile::parse("model: qwen3\nblock_size: 16\nworkers: []\n")
        .map_err(|e| e.to_string())?;
    let svc = RoutingService::new(base.clone(), RouterConfig::default(), None, 256)?;
    svc.set_workers(list.clone());
    let rss_workers = rss_mb(std::process::id());

    // The index: each rank caches `families_per_rank` families' shared prefixes.
    let seed = HashSeed::new(None, None);
    let mut ev_id = 0u64;
    for (w, e) in list.iter().enumerate() {
        for r in 0..dp {
            let rank_no = w * dp as usize + r as usize;
            let mut events = Vec::new();
            for k in 0..a.families_per_rank {
                let fam = (rank_no * 131 + k * 977) % a.families.max(1);
                let t = tokens(a.system_prompt_tokens, fam, 0, prompt);
                let h = BlockHashes::from_tokens(&t[..prompt * 3 / 4], BLOCK, seed);
                let blocks = h
                    .locals()
                    .iter()
                    .zip(h.seqs())
                    .map(|(l, s)| StoredBlock {
                        // The engine's name for the block: unique per rank, as engines' are.
                        hash: ExternalHash(s.0 ^ (rank_no as u64).wrapping_mul(0x9E37_79B9)),
                        local: *l,
                    })
                    .collect();
                ev_id += 1;
                events.push(KvEvent {
                    source: WorkerRank {
                        worker: e.instance_id(),
                        dp_rank: DpRank(r),
                    },
                    event_id: ev_id,
                    tier: StorageTier::Device,
                    data: KvEventData::Stored {
                        parent: None,
                        blocks,
                    },
                });
            }
            svc.apply_kv_events(&events);
        }
    }
    let (index_bytes, indexed_blocks) = svc.with_router(|r| {
        let blocks: usize = r
            .targets(&[kvgate_core::router::WorkerRole::Aggregated])
            .into_iter()
            .map(|t| r.index().num_blocks(t, StorageTier::Device))
            .sum();
        (r.index().approx_heap_bytes(), blocks)
    });
    let rss_index = rss_mb(std::process::id());

    // Requests, hashed outside the clock.
    let hashes: Vec<BlockHashes> = (0..a.requests)
        .map(|i| {
            let fam = (i * 2_654_435_761usize) % a.families.max(1);
            BlockHashes::from_tokens(
                &tokens(a.system_prompt_tokens, fam, i as u64 + 1, prompt),
                BLOCK,
                seed,
            )
        })
        .collect();
    let in_flight = ((ranks as f64 * a.in_flight_per_rank) as usize).max(1);
    let mut live: VecDeque<RequestId> = VecDeque::with_capacity(in_flight + 1);
    let mut decide = Vec::with_capacity(a.requests);
    let mut free = Vec::with_capacity(a.requests);
    let (mut cached, mut total) = (0u64, 0u64);
    // Fill the steady state first (bookings without timing), then measure.
    let warm = in_flight;
    let mut n = 0usize;
    while n < warm + a.requests {
        let h = &hashes[n % hashes.len()];
        let id = RequestId::from(format!("r{n}"));
        let t = Instant::now();
        let d = svc
            .route(&id, h, Some(64), None, true)
            .map_err(|e| format!("route: {e:?}"))?;
        let took = t.elapsed().as_secs_f64() * 1e6;
        if n >= warm {
            decide.push(took);
            cached += d.predicted_cached_tokens;
            total += h.num_tokens() as u64;
        }
        live.push_back(id);
        if live.len() > in_flight
            && let Some(old) = live.pop_front()
        {
            let t = Instant::now();
            svc.free(&old);
            if n >= warm {
                free.push(t.elapsed().as_secs_f64() * 1e6);
            }
        }
        n += 1;
    }
    let rss_load = rss_mb(std::process::id());

    // Reloads at this size: the workers file with one worker changed, as the file watcher does.
    let mut changed = list.clone();
    if let Some(e) = changed.last_mut() {
        e.url = "http://10.255.255.1:8000".into();
    }
    let yaml = file_yaml(&changed);
    let t = Instant::now();
    let f = WorkersFile::parse(&yaml).map_err(|e| e.to_string())?;
    svc.set_workers(f.workers);
    let file_reload_ms = ms(t);

    // Discovery: a fresh service learns the fleet from Pod objects, then one pod turns unready.
    let cfg = PoolConfig {
        selector: BTreeMap::from([("app".to_string(), "vllm".to_string())]),
        target_ports: vec![8000],
        block_size: BLOCK as u32,
        kv_events_port: None,
    };
    let mut pod_list = pods(workers, dp);
    let disc = RoutingService::new(base, RouterConfig::default(), None, 256)?;
    let t = Instant::now();
    let (es, skipped) = endpoints(pod_list.iter(), &cfg);
    if !skipped.is_empty() || es.len() != workers {
        return Err(format!(
            "discovery kept {} of {workers} pods: {:?}",
            es.len(),
            skipped.first()
        ));
    }
    disc.set_workers(es);
    let discovery_first_sync_ms = ms(t);
    if let Some(p) = pod_list.get_mut(workers / 2) {
        p.ready = false;
    }
    let t = Instant::now();
    let (es, _) = endpoints(pod_list.iter(), &cfg);
    disc.set_workers(es);
    let discovery_update_ms = ms(t);
    let routable = disc.with_router(|r| {
        r.targets(&[kvgate_core::router::WorkerRole::Aggregated])
            .len()
    });
    if routable != ranks - dp as usize {
        return Err(format!(
            "after one pod turned unready, {routable} ranks are routable, not {}",
            ranks - dp as usize
        ));
    }
    drop(disc);
    let per_1k = |mb: f64| mb / ranks as f64 * 1000.0;
    Ok(FleetPoint {
        ranks,
        workers,
        prompt_tokens: prompt,
        system_prompt_tokens: a.system_prompt_tokens.min(prompt),
        requests: decide.len(),
        in_flight,
        decision_p50_us: quantile(&decide, 0.5),
        decision_p99_us: quantile(&decide, 0.99),
        decision_max_us: quantile(&decide, 1.0),
        free_p50_us: quantile(&free, 0.5),
        index_bytes_per_rank: index_bytes as f64 / ranks as f64,
        indexed_blocks_per_rank: indexed_blocks as f64 / ranks as f64,
        rss_mb_per_1k_ranks_workers: per_1k(rss_workers - rss0),
        rss_mb_per_1k_ranks_index: per_1k(rss_index - rss_workers),
        rss_mb_per_1k_ranks_load: per_1k(rss_load - rss_index),
        file_reload_ms,
        discovery_first_sync_ms,
        discovery_update_ms,
        hit_rate: cached as f64 / total.max(1) as f64,
    })
}

pub fn run(a: BenchFleetArgs) -> Result<(), String> {
    if a.ranks.is_empty() || a.ranks.contains(&0) {
        return Err("--ranks: give one or more fleet sizes above 0".into());
    }
    if a.requests == 0 || a.prompt_tokens.iter().any(|&p| p < 4 * BLOCK) {
        return Err("--requests must be > 0 and --prompt-tokens at least 64".into());
    }
    let mut points = Vec::new();
    for &ranks in &a.ranks {
        for &prompt in &a.prompt_tokens {
            if !a.json {
                let system = match a.system_prompt_tokens.min(prompt) {
                    0 => String::new(),
                    n => format!(", all starting with one {n}-token system prompt"),
                };
                eprintln!("bench fleet: {ranks} ranks, {prompt}-token prompts{system}");
            }
            points.push(one_fleet(&a, ranks, prompt)?);
        }
    }
    if a.json {
        println!("{}", json!({"fleets": points}));
        return Ok(());
    }
    println!(
        "{:>6} {:>7} {:>8} {:>9} {:>9} {:>9} {:>8} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>6}",
        "ranks",
        "prompt",
        "in-fl.",
        "dec p50",
        "dec p99",
        "dec max",
        "free p50",
        "idx B/rk",
        "RSS wk/1k",
        "RSS ld/1k",
        "file rel.",
        "disc sync",
        "disc upd",
        "hit"
    );
    for p in &points {
        println!(
            "{:>6} {:>7} {:>8} {:>7.1}µs {:>7.1}µs {:>7.1}µs {:>6.1}µs {:>9.0} {:>7.2}MB {:>7.2}MB {:>7.1}ms {:>7.1}ms {:>7.1}ms {:>6.3}",
            p.ranks,
            p.prompt_tokens,
            p.in_flight,
            p.decision_p50_us,
            p.decision_p99_us,
            p.decision_max_us,
            p.free_p50_us,
            p.index_bytes_per_rank,
            p.rss_mb_per_1k_ranks_workers,
            p.rss_mb_per_1k_ranks_load,
            p.file_reload_ms,
            p.discovery_first_sync_ms,
            p.discovery_update_ms,
            p.hit_rate
        );
    }
    println!(
        "dec: one routing decision (score + book, the EPP's route call; tokenization excluded); idx B/rk: the prefix index's heap per rank; RSS wk/ld per 1k ranks: process growth for the worker list and for the in-flight bookings; file rel.: parse + apply a workers file with one worker changed; disc sync/upd: Pod objects to endpoints to router, first time and after one pod turns unready."
    );
    Ok(())
}
