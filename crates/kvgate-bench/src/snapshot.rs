//! `kvgate bench snapshot`: what a warm start from an index snapshot costs at scale. Builds an
//! index of `--blocks` blocks (default 1M) over `--workers` workers, encodes its snapshot (what
//! the router does under its lock every `--kv-snapshot-interval-secs`), writes it to and reads
//! it back from a JetStream object store on a real nats-server, and restores it in a fresh
//! process (re-executing this binary) whose time and memory peak (`VmHWM`) are those of a
//! replacement pod: nothing but the snapshot bytes and the index it rebuilds.

use kvgate_core::config::RouterConfig;
use kvgate_core::router::{Router, WorkerInfo, WorkerRole};
use kvgate_core::scheduler::WorkerCapacity;
use kvgate_core::{
    ExternalHash, KvEvent, KvEventData, LocalHash, StorageTier, StoredBlock, WorkerId, WorkerRank,
};
use kvgate_runtime::snapshot::SnapshotTarget;
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args, Debug)]
pub struct BenchSnapshotArgs {
    /// Blocks in the index.
    #[arg(long, default_value_t = 1_000_000)]
    pub blocks: u64,
    /// Workers holding them (one dp rank each).
    #[arg(long, default_value_t = 16)]
    pub workers: u64,
    /// Blocks per cached sequence (one chain of `stored` blocks).
    #[arg(long, default_value_t = 256)]
    pub chain: u64,
    /// nats-server binary, started on a free loopback port with a temporary JetStream store.
    #[arg(
        long,
        env = "KVGATE_NATS_SERVER",
        default_value = ".tools/bin/nats-server"
    )]
    pub nats_server: PathBuf,
    /// Use this NATS server instead of starting one.
    #[arg(long)]
    pub nats_url: Option<String>,
    /// Skip the object store (encode, decode and restore only).
    #[arg(long)]
    pub no_nats: bool,
    /// Print one JSON object as the last line.
    #[arg(long)]
    pub json: bool,
    /// (internal) restore this snapshot file in this process and print the figures as JSON.
    #[arg(long, hide = true)]
    pub restore_from: Option<PathBuf>,
}

const STREAM: &str = "kvgate-bench-snapshot";

fn router(workers: u64) -> Result<Router, String> {
    let mut r = Router::new(RouterConfig::default(), 16).map_err(|e| e.to_string())?;
    r.upsert_workers((0..workers).map(|w| WorkerInfo {
        id: WorkerId(w + 1),
        dp_size: 1,
        role: WorkerRole::Aggregated,
        capacity: WorkerCapacity::default(),
    }));
    Ok(r)
}

/// `VmHWM` (peak resident memory) and `VmRSS` of this process, in MiB.
fn memory_mib() -> (f64, f64) {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let get = |k: &str| {
        s.lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .map_or(f64::NAN, |kb| kb / 1024.0)
    };
    (get("VmHWM:"), get("VmRSS:"))
}

fn splitmix(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The child: restore a snapshot file, report time and memory.
fn restore_child(a: &BenchSnapshotArgs, path: &PathBuf) -> Result<(), String> {
    let (hwm0, _) = memory_mib();
    let mut r = router(a.workers)?;
    let t0 = Instant::now();
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let read_s = t0.elapsed().as_secs_f64();
    let restored = kvgate_runtime::snapshot::restore_router(&mut r, &bytes, STREAM)?;
    drop(bytes);
    let total_s = t0.elapsed().as_secs_f64();
    let (hwm, rss) = memory_mib();
    let blocks: usize = r
        .index()
        .workers()
        .iter()
        .map(|&w| r.index().num_blocks(w, StorageTier::Device))
        .sum();
    println!(
        "{}",
        serde_json::json!({
            "restore_s": restored.seconds,
            "read_file_s": read_s,
            "total_s": total_s,
            "events": restored.events,
            "blocks": blocks,
            "index_heap_mib": r.index().approx_heap_bytes() as f64 / (1 << 20) as f64,
            "vm_hwm_start_mib": hwm0,
            "vm_hwm_mib": hwm,
            "vm_rss_mib": rss,
        })
    );
    Ok(())
}

pub fn run(a: BenchSnapshotArgs) -> Result<(), String> {
    if let Some(path) = &a.restore_from {
        return restore_child(&a, path);
    }
    if a.workers == 0 || a.chain == 0 {
        return Err("--workers and --chain must be > 0".into());
    }
    // Build: per worker, chains of `chain` blocks, each chain its own sequence.
    let t0 = Instant::now();
    let mut r = router(a.workers)?;
    let per_worker = a.blocks / a.workers;
    let mut rng = 7u64;
    let mut id = 0u64;
    for w in 0..a.workers {
        let mut left = per_worker;
        while left > 0 {
            let n = left.min(a.chain);
            left -= n;
            id += 1;
            let blocks = (0..n)
                .map(|_| StoredBlock {
                    hash: ExternalHash(splitmix(&mut rng)),
                    local: LocalHash(splitmix(&mut rng)),
                })
                .collect();
            r.apply_event(&KvEvent {
                source: WorkerRank::new(w + 1, 0),
                event_id: id,
                tier: StorageTier::Device,
                data: KvEventData::Stored {
                    parent: None,
                    blocks,
                },
            });
        }
    }
    let build_s = t0.elapsed().as_secs_f64();
    let blocks = per_worker * a.workers;
    // Encode, as the router does under its lock.
    let t1 = Instant::now();
    let bytes = kvgate_runtime::snapshot::encode_router(&r, STREAM, 123_456, &[]);
    let encode_s = t1.elapsed().as_secs_f64();
    let size = bytes.len();
    let t2 = Instant::now();
    let decoded = kvgate_core::snapshot::decode(&bytes).map_err(|e| e.to_string())?;
    let n_events = decoded.events().filter(Result::is_ok).count();
    let decode_s = t2.elapsed().as_secs_f64();
    drop(r);

    // The object store round trip.
    let (put_s, get_s) = if a.no_nats {
        (f64::NAN, f64::NAN)
    } else {
        let (server, url) = match &a.nats_url {
            Some(u) => (None, u.clone()),
            None => {
                let s = crate::procs::NatsServer::start(
                    &a.nats_server,
                    "bench-snapshot",
                    "run scripts/setup.sh, pass --nats-url or --no-nats",
                )?;
                let u = s.url();
                (Some(s), u)
            }
        };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        let res = rt.block_on(async {
            let client = kvgate_runtime::nats::connect(&url, "kvgate-bench", |_| {}).await?;
            let js = kvgate_runtime::snapshot::context(client);
            let target = SnapshotTarget::Object {
                bucket: format!("kvgate-bench-{}", std::process::id()),
                key: STREAM.into(),
            };
            // The first put creates the bucket: time the second.
            kvgate_runtime::snapshot::store(Some(&js), &target, STREAM, 1, bytes.clone(), true)
                .await?;
            let t = Instant::now();
            kvgate_runtime::snapshot::store(Some(&js), &target, STREAM, 2, bytes.clone(), true)
                .await?;
            let put = t.elapsed().as_secs_f64();
            let t = Instant::now();
            let back = kvgate_runtime::snapshot::load(Some(&js), &target)
                .await?
                .ok_or("the snapshot object is missing")?;
            let get = t.elapsed().as_secs_f64();
            if back != bytes {
                return Err("the object read back differs".to_string());
            }
            Ok::<_, String>((put, get))
        });
        drop(server);
        res?
    };

    // Restore in a fresh process.
    let dir = std::env::temp_dir().join(format!("kvgate-bench-snapshot-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let file = dir.join("index.snapshot");
    std::fs::write(&file, &bytes).map_err(|e| e.to_string())?;
    drop(bytes);
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let out = std::process::Command::new(exe)
        .args(["bench", "snapshot", "--workers", &a.workers.to_string()])
        .arg("--restore-from")
        .arg(&file)
        .output()
        .map_err(|e| format!("cannot run the restore child: {e}"))?;
    let _ = std::fs::remove_dir_all(&dir);
    if !out.status.success() {
        return Err(format!(
            "restore child failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let child: serde_json::Value = stdout
        .lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok())
        .ok_or_else(|| format!("restore child printed no figures: {stdout}"))?;
    let f = |k: &str| child[k].as_f64().unwrap_or(f64::NAN);
    let restored_blocks = child["blocks"].as_u64().unwrap_or(0);
    if restored_blocks != blocks {
        return Err(format!(
            "restored {restored_blocks} blocks of {blocks}: the snapshot lost blocks"
        ));
    }
    let mib = size as f64 / (1 << 20) as f64;
    println!("index snapshot, {blocks} blocks over {} workers", a.workers);
    println!("  build index          {build_s:>8.2} s");
    println!(
        "  encode (router lock) {encode_s:>8.3} s   {mib:.1} MiB, {:.1} bytes/block, {n_events} events",
        size as f64 / blocks as f64
    );
    println!("  decode only          {decode_s:>8.3} s");
    println!("  object store put     {put_s:>8.3} s   get {get_s:.3} s (digest checked)");
    println!(
        "  restore (new process) {:>7.3} s   index heap {:.1} MiB, peak RSS {:.1} MiB (VmHWM; {:.1} MiB at process start)",
        f("restore_s"),
        f("index_heap_mib"),
        f("vm_hwm_mib"),
        f("vm_hwm_start_mib")
    );
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "blocks": blocks,
                "workers": a.workers,
                "build_s": build_s,
                "snapshot_bytes": size,
                "bytes_per_block": size as f64 / blocks as f64,
                "encode_s": encode_s,
                "decode_s": decode_s,
                "object_put_s": put_s,
                "object_get_s": get_s,
                "restore_s": f("restore_s"),
                "restore_index_heap_mib": f("index_heap_mib"),
                "restore_peak_rss_mib": f("vm_hwm_mib"),
                "restore_start_rss_mib": f("vm_hwm_start_mib"),
            })
        );
    }
    Ok(())
}
