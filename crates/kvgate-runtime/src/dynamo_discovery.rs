//! Workers from Dynamo's own discovery store, as Dynamo 1.6 workers register themselves: no
//! hand-written worker list.
//!
//! A Dynamo worker writes, per served endpoint, an instance record (`v1/instances/...`:
//! namespace, component, endpoint, `instance_id`, its request-plane address) and a model card
//! (`v1/mdc/...`: model name, `kv_cache_block_size`, `worker_type`, and under `runtime_config`
//! `total_kv_blocks`, `max_num_batched_tokens`, `data_parallel_start_rank`,
//! `data_parallel_size`). The store is a directory (Dynamo's `file` backend, `DYN_FILE_KV`)
//! or etcd (`ETCD_ENDPOINTS`); records go away when the worker leaves (a file record not
//! rewritten for [`FILE_RECORD_TTL`], an etcd record whose lease expired).
//!
//! This module turns one reading of the store into workers-file entries ([`parse`], pure) and
//! follows the store by polling ([`follow`]). The gateway's endpoint for a worker is its pod's
//! sidecar (`dynamo.frontend --router-mode direct`), named by a URL template whose `{host}` is
//! the host of the worker's request-plane address (the pod IP in Kubernetes).

use kvgate_wire::workers::{Role, WorkerEntry};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

/// Where Dynamo's discovery records live.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DynamoStore {
    /// Dynamo's `file` backend: the directory `DYN_FILE_KV` names.
    File(PathBuf),
    /// Dynamo's `etcd` backend: client URLs (`http://host:2379`), tried in order. Dynamo keys
    /// its records `v1/instances/{ns}/{component}/{endpoint}/{id hex}` there (the file
    /// backend URL-encodes the same key into one file name); the values are the same JSON.
    Etcd(Vec<String>),
}

impl std::fmt::Display for DynamoStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DynamoStore::File(p) => write!(f, "file store {}", p.display()),
            DynamoStore::Etcd(urls) => write!(f, "etcd {}", urls.join(",")),
        }
    }
}

/// Which workers to take from the store, and how the gateway reaches them.
#[derive(Clone, Debug)]
pub struct DynamoDiscovery {
    pub store: DynamoStore,
    pub namespace: String,
    /// The workers' component, and a disaggregated graph's prefill workers' (Dynamo registers
    /// its prefill workers under their own component, `prefill`).
    pub component: String,
    pub prefill_component: Option<String>,
    pub endpoint: String,
    /// The sidecar's URL; `{host}` is replaced by the host of the worker's request-plane
    /// address. Without `{host}`, every worker is reached through the one sidecar named.
    pub sidecar_url: String,
    /// The served model (cards for other models are left out); `None`: the first card's.
    pub model: Option<String>,
    /// Workers registering another block size are left out; `None`: the first card's.
    pub block_size: Option<u32>,
    pub poll_every: Duration,
}

/// One record, as `(key, value)`: the key relative to the store's root (`v1/instances/...`).
pub type Record = (String, Vec<u8>);

/// What one reading of the store yields.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Discovered {
    /// Model name and block size of the cards that were taken.
    pub model: Option<String>,
    pub block_size: Option<u32>,
    pub workers: Vec<WorkerEntry>,
    /// Instances left out, with the reason.
    pub skipped: Vec<(u64, String)>,
}

const INSTANCES: &str = "v1/instances/";
const CARDS: &str = "v1/mdc/";

/// Reads every instance record and model card.
pub async fn read(store: &DynamoStore) -> Result<(Vec<Record>, Vec<Record>), String> {
    match store {
        DynamoStore::File(dir) => {
            let dir = dir.clone();
            tokio::task::spawn_blocking(move || {
                Ok((read_dir(&dir, INSTANCES)?, read_dir(&dir, CARDS)?))
            })
            .await
            .map_err(|e| format!("reading the Dynamo file store: {e}"))?
        }
        DynamoStore::Etcd(urls) => {
            let mut last = String::from("no etcd endpoint given");
            for url in urls {
                match (
                    crate::etcd::list_prefix(url, INSTANCES).await,
                    crate::etcd::list_prefix(url, CARDS).await,
                ) {
                    (Ok(i), Ok(c)) => return Ok((i, c)),
                    (Err(e), _) | (_, Err(e)) => last = e,
                }
            }
            Err(last)
        }
    }
}

/// Dynamo's file backend rewrites a live worker's records every few seconds and treats one not
/// rewritten for 10 s as expired (a worker killed without deregistering leaves its files).
pub const FILE_RECORD_TTL: Duration = Duration::from_secs(10);

/// Records are capped: a store is a few records per worker.
const MAX_RECORDS: usize = 200_000;
const MAX_RECORD_BYTES: u64 = 1 << 20;

fn read_dir(root: &std::path::Path, prefix: &str) -> Result<Vec<Record>, String> {
    let dir = root.join(prefix.trim_end_matches('/'));
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        // Nothing registered yet.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(format!("cannot read {}: {e}", dir.display())),
    };
    let mut out = Vec::new();
    for entry in entries.flatten() {
        if out.len() >= MAX_RECORDS {
            break;
        }
        let path = entry.path();
        let Ok(meta) = entry.metadata() else { continue };
        if !meta.is_file() || meta.len() > MAX_RECORD_BYTES {
            continue;
        }
        let fresh = meta
            .modified()
            .ok()
            .and_then(|m| std::time::SystemTime::now().duration_since(m).ok())
            .is_none_or(|age| age <= FILE_RECORD_TTL);
        if !fresh {
            continue;
        }
        // A record removed (the worker left) or half written between listing and reading is
        // simply not there this time.
        let Ok(bytes) = std::fs::read(&path) else {
            continue;
        };
        let name = entry.file_name().to_string_lossy().into_owned();
        out.push((format!("{prefix}{name}"), bytes));
    }
    Ok(out)
}

/// The model card fields kvgate uses.
#[derive(Clone, Debug, PartialEq)]
struct Card {
    model: String,
    block_size: u32,
    role: Role,
    total_kv_blocks: Option<u64>,
    max_num_batched_tokens: Option<u64>,
    dp_start: u64,
    dp_size: u32,
}

fn card_of(v: &Value) -> Result<Card, String> {
    let c = v.get("card_json").ok_or("no card_json")?;
    let model = c
        .get("display_name")
        .and_then(Value::as_str)
        .ok_or("no display_name")?
        .to_string();
    let block_size = c
        .get("kv_cache_block_size")
        .and_then(Value::as_u64)
        .filter(|b| (1..=u64::from(u32::MAX)).contains(b))
        .ok_or("no kv_cache_block_size")? as u32;
    let role = match c.get("worker_type").and_then(Value::as_str) {
        None | Some("aggregated") => Role::Aggregated,
        Some("prefill") => Role::Prefill,
        Some("decode") => Role::Decode,
        Some(other) => return Err(format!("worker_type {other:?} is not one kvgate routes to")),
    };
    let rc = c.get("runtime_config").cloned().unwrap_or(Value::Null);
    let dp_size = rc
        .get("data_parallel_size")
        .and_then(Value::as_u64)
        .unwrap_or(1);
    if !(1..=4096).contains(&dp_size) {
        return Err(format!("data_parallel_size {dp_size} out of range"));
    }
    Ok(Card {
        model,
        block_size,
        role,
        total_kv_blocks: rc.get("total_kv_blocks").and_then(Value::as_u64),
        max_num_batched_tokens: rc.get("max_num_batched_tokens").and_then(Value::as_u64),
        dp_start: rc
            .get("data_parallel_start_rank")
            .and_then(Value::as_u64)
            .unwrap_or(0),
        dp_size: dp_size as u32,
    })
}

/// The host of a request-plane address such as `10.0.0.7:41383/4a0c.../dynamo/backend/generate`.
fn transport_host(v: &Value) -> Option<String> {
    let addr = v.get("transport")?.get("tcp")?.as_str()?;
    let hostport = addr.split('/').next()?;
    let host = match hostport.rsplit_once(':') {
        Some((h, _)) => h,
        None => hostport,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    (!host.is_empty()).then(|| host.to_string())
}

fn sidecar_for(template: &str, host: Option<&str>) -> Option<String> {
    if !template.contains("{host}") {
        return Some(template.to_string());
    }
    let host = host?;
    let host = if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_string()
    };
    Some(template.replace("{host}", &host))
}

/// Turns one reading of the store into the workers to route to. Pure: the same records give
/// the same workers, sorted by instance id.
pub fn parse(cfg: &DynamoDiscovery, instances: &[Record], cards: &[Record]) -> Discovered {
    let matches = |v: &Value| {
        let component = v.get("component").and_then(Value::as_str);
        v.get("namespace").and_then(Value::as_str) == Some(cfg.namespace.as_str())
            && (component == Some(cfg.component.as_str())
                || (component.is_some() && component == cfg.prefill_component.as_deref()))
            && v.get("endpoint").and_then(Value::as_str) == Some(cfg.endpoint.as_str())
    };
    let mut out = Discovered {
        model: cfg.model.clone(),
        block_size: cfg.block_size,
        ..Default::default()
    };
    // Cards by instance id; the lowest id's card decides the model and block size when they
    // are not configured, so that every reading of the same store agrees.
    let mut card_by_id: BTreeMap<u64, Result<Card, String>> = BTreeMap::new();
    for (_, bytes) in cards {
        let Ok(v) = serde_json::from_slice::<Value>(bytes) else {
            continue;
        };
        if v.get("type").and_then(Value::as_str) != Some("Model") || !matches(&v) {
            continue;
        }
        let Some(id) = v.get("instance_id").and_then(Value::as_u64) else {
            continue;
        };
        card_by_id.insert(id, card_of(&v));
    }
    if let Some(first) = card_by_id.values().find_map(|c| c.as_ref().ok()) {
        out.model.get_or_insert_with(|| first.model.clone());
        out.block_size.get_or_insert(first.block_size);
    }
    let mut seen = std::collections::HashSet::new();
    for (key, bytes) in instances {
        let v = match serde_json::from_slice::<Value>(bytes) {
            Ok(v) => v,
            Err(e) => {
                tracing::debug!(key, error = %e, "unreadable Dynamo instance record");
                continue;
            }
        };
        if v.get("type").and_then(Value::as_str) != Some("Endpoint") || !matches(&v) {
            continue;
        }
        let Some(id) = v.get("instance_id").and_then(Value::as_u64) else {
            continue;
        };
        if !seen.insert(id) {
            continue;
        }
        let card = match card_by_id.get(&id) {
            None => {
                out.skipped
                    .push((id, "no model card registered yet".into()));
                continue;
            }
            Some(Err(e)) => {
                out.skipped.push((id, format!("model card: {e}")));
                continue;
            }
            Some(Ok(c)) => c,
        };
        if out.model.as_deref() != Some(card.model.as_str()) {
            out.skipped.push((
                id,
                format!("serves model {:?}, not this pool's", card.model),
            ));
            continue;
        }
        if out.block_size != Some(card.block_size) {
            out.skipped.push((
                id,
                format!(
                    "KV block size {} differs from the pool's {:?}",
                    card.block_size, out.block_size
                ),
            ));
            continue;
        }
        if card.dp_start != 0 {
            out.skipped.push((
                id,
                format!(
                    "data_parallel_start_rank {} (ranks not starting at 0 are not supported)",
                    card.dp_start
                ),
            ));
            continue;
        }
        let host = transport_host(&v);
        let Some(url) = sidecar_for(&cfg.sidecar_url, host.as_deref()) else {
            out.skipped.push((
                id,
                "no TCP request-plane address to derive the sidecar's {host} from".into(),
            ));
            continue;
        };
        let component = v
            .get("component")
            .and_then(Value::as_str)
            .unwrap_or(&cfg.component);
        out.workers.push(WorkerEntry {
            name: format!("{component}-{id:x}"),
            id: Some(id),
            url,
            role: card.role,
            dp_size: card.dp_size,
            total_kv_blocks: card.total_kv_blocks,
            max_num_batched_tokens: card.max_num_batched_tokens,
            kv_events: None,
            kv_events_replay: None,
        });
    }
    out.workers.sort_by_key(|w| w.id);
    out
}

/// Reads the store until it yields at least one worker (logging while it waits), for a
/// router that learns its model and block size from the store.
pub async fn first(cfg: &DynamoDiscovery) -> Discovered {
    let mut logged = std::time::Instant::now() - Duration::from_secs(60);
    loop {
        match read(&cfg.store).await {
            Ok((i, c)) => {
                let d = parse(cfg, &i, &c);
                if !d.workers.is_empty() {
                    return d;
                }
                if logged.elapsed() >= Duration::from_secs(10) {
                    tracing::info!(store = %cfg.store, namespace = %cfg.namespace, component = %cfg.component, endpoint = %cfg.endpoint, skipped = ?d.skipped, "waiting for Dynamo workers to register");
                    logged = std::time::Instant::now();
                }
            }
            Err(e) => {
                if logged.elapsed() >= Duration::from_secs(10) {
                    tracing::warn!(store = %cfg.store, error = %e, "cannot read the Dynamo discovery store; retrying");
                    logged = std::time::Instant::now();
                }
            }
        }
        tokio::time::sleep(cfg.poll_every).await;
    }
}

/// Polls the store and calls `on_change` with the workers whenever they change (also the
/// first time). A store that cannot be read keeps the last workers. Stops when `on_change`
/// returns false.
pub async fn follow(cfg: DynamoDiscovery, mut on_change: impl FnMut(Discovered) -> bool) {
    let mut last: Option<Vec<WorkerEntry>> = None;
    let mut failing = false;
    loop {
        match read(&cfg.store).await {
            Ok((i, c)) => {
                if failing {
                    tracing::info!(store = %cfg.store, "Dynamo discovery store readable again");
                    failing = false;
                }
                let d = parse(&cfg, &i, &c);
                if last.as_ref() != Some(&d.workers) {
                    tracing::info!(
                        workers = d.workers.len(),
                        left_out = d.skipped.len(),
                        "Dynamo workers changed"
                    );
                    for (id, why) in &d.skipped {
                        tracing::debug!(instance_id = id, reason = %why, "Dynamo instance left out");
                    }
                    last = Some(d.workers.clone());
                    if !on_change(d) {
                        return;
                    }
                }
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(store = %cfg.store, error = %e, "cannot read the Dynamo discovery store; keeping the last workers");
                    failing = true;
                }
            }
        }
        tokio::time::sleep(cfg.poll_every).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> DynamoDiscovery {
        DynamoDiscovery {
            store: DynamoStore::File("/nonexistent".into()),
            namespace: "dynamo".into(),
            component: "backend".into(),
            prefill_component: Some("prefill".into()),
            endpoint: "generate".into(),
            sidecar_url: "http://{host}:8000".into(),
            model: None,
            block_size: None,
            poll_every: Duration::from_millis(100),
        }
    }

    fn instance(id: u64, host: &str) -> Record {
        (
            format!("v1/instances/dynamo%2Fbackend%2Fgenerate%2F{id:x}"),
            format!(
                r#"{{"type":"Endpoint","component":"backend","endpoint":"generate","namespace":"dynamo","instance_id":{id},"transport":{{"tcp":"{host}:41383/{id:x}/dynamo/backend/generate"}},"device_type":"cuda","request_plane_codec":"msgpack"}}"#
            )
            .into_bytes(),
        )
    }

    fn card(id: u64, model: &str, block: u32, kind: &str, dp: u32) -> Record {
        (
            format!("v1/mdc/dynamo%2Fbackend%2Fgenerate%2F{id:x}"),
            format!(
                r#"{{"type":"Model","namespace":"dynamo","component":"backend","endpoint":"generate","instance_id":{id},"card_json":{{"display_name":"{model}","slug":"{model}","kv_cache_block_size":{block},"worker_type":"{kind}","runtime_config":{{"total_kv_blocks":16384,"max_num_seqs":256,"max_num_batched_tokens":8192,"data_parallel_start_rank":0,"data_parallel_size":{dp}}}}}}}"#
            )
            .into_bytes(),
        )
    }

    #[test]
    fn instances_with_cards_become_workers() {
        let big = 14290016167255686350u64;
        let instances = vec![
            instance(big, "10.0.0.8"),
            instance(7, "10.0.0.7"),
            // Another endpoint of the same worker (Dynamo registers several): not routed to.
            (
                "v1/instances/x".into(),
                br#"{"type":"Endpoint","component":"backend","endpoint":"worker_kv_query_source_1","namespace":"dynamo","instance_id":7}"#.to_vec(),
            ),
            instance(9, "10.0.0.9"),
            (
                "v1/instances/bad".into(),
                b"{not json".to_vec(),
            ),
        ];
        let cards = vec![
            card(big, "qwen", 16, "aggregated", 2),
            card(7, "qwen", 16, "prefill", 1),
            card(9, "qwen", 32, "aggregated", 1),
        ];
        let d = parse(&cfg(), &instances, &cards);
        assert_eq!(d.model.as_deref(), Some("qwen"));
        assert_eq!(d.block_size, Some(16));
        let got: Vec<(u64, &str, Role, u32)> = d
            .workers
            .iter()
            .map(|w| (w.id.unwrap_or(0), w.url.as_str(), w.role, w.dp_size))
            .collect();
        assert_eq!(
            got,
            vec![
                (7, "http://10.0.0.7:8000", Role::Prefill, 1),
                (big, "http://10.0.0.8:8000", Role::Aggregated, 2),
            ]
        );
        assert_eq!(d.workers[0].total_kv_blocks, Some(16384));
        assert_eq!(d.workers[0].max_num_batched_tokens, Some(8192));
        assert_eq!(d.skipped.len(), 1);
        assert!(d.skipped[0].1.contains("block size 32"), "{:?}", d.skipped);
    }

    #[test]
    fn configured_model_and_one_sidecar() {
        let mut c = cfg();
        c.model = Some("other".into());
        c.sidecar_url = "http://127.0.0.1:8781".into();
        let instances = vec![instance(1, "10.0.0.1"), instance(2, "10.0.0.2")];
        let cards = vec![
            card(1, "qwen", 16, "aggregated", 1),
            card(2, "other", 16, "decode", 1),
        ];
        let d = parse(&c, &instances, &cards);
        assert_eq!(d.workers.len(), 1);
        assert_eq!(d.workers[0].id, Some(2));
        assert_eq!(d.workers[0].url, "http://127.0.0.1:8781");
        assert_eq!(d.workers[0].role, Role::Decode);
        // No card yet: waiting, not an error.
        let d = parse(&c, &[instance(3, "h")], &[]);
        assert!(d.workers.is_empty());
        assert_eq!(d.skipped[0].1, "no model card registered yet");
    }

    #[test]
    fn ipv6_hosts_are_bracketed() {
        assert_eq!(
            sidecar_for("http://{host}:8000", Some("fd00::7")).as_deref(),
            Some("http://[fd00::7]:8000")
        );
        let v: Value = serde_json::from_str(
            r#"{"transport":{"tcp":"[fd00::7]:41383/ab/dynamo/backend/generate"}}"#,
        )
        .unwrap();
        assert_eq!(transport_host(&v).as_deref(), Some("fd00::7"));
    }

    #[test]
    fn file_store_is_read_and_missing_dirs_are_empty() {
        let dir = std::env::temp_dir().join(format!("kvgate-dynstore-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = DynamoStore::File(dir.clone());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (i, c) = rt.block_on(read(&store)).unwrap();
        assert!(i.is_empty() && c.is_empty());
        std::fs::create_dir_all(dir.join("v1/instances")).unwrap();
        std::fs::create_dir_all(dir.join("v1/mdc")).unwrap();
        let (k, v) = instance(5, "10.1.1.1");
        std::fs::write(dir.join(&k), &v).unwrap();
        let (k2, v2) = card(5, "qwen", 16, "aggregated", 1);
        std::fs::write(dir.join(&k2), &v2).unwrap();
        let (i, c) = rt.block_on(read(&store)).unwrap();
        let d = parse(&cfg(), &i, &c);
        assert_eq!(d.workers.len(), 1, "{d:?}");
        assert_eq!(d.workers[0].url, "http://10.1.1.1:8000");
        // A worker killed without deregistering: its records stop being rewritten and expire.
        let old = std::time::SystemTime::now() - FILE_RECORD_TTL - Duration::from_secs(1);
        std::fs::File::options()
            .write(true)
            .open(dir.join(&k))
            .unwrap()
            .set_modified(old)
            .unwrap();
        let (i, c) = rt.block_on(read(&store)).unwrap();
        assert!(parse(&cfg(), &i, &c).workers.is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
