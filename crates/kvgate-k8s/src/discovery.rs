//! Pods to endpoints, without I/O: which pods of a pool are routable and what the router needs
//! to know about each. The kube watcher ([`crate::watch`]) feeds it the pods it sees.
//!
//! A pod is an endpoint when it matches the selector, is Ready, is not terminating and has an
//! IP. Each target port of such a pod is one endpoint. The worker instance id is derived from
//! the pod name as Dynamo derives it (CONTRACTS.md section 3); a second or later target port gets
//! the id of `<pod>-<port>`, so that every endpoint has its own. The role comes from
//! `nvidia.com/dynamo-sub-component-type` (`prefill`/`decode`; absent: aggregated). What a pod
//! cannot say with labels it says with annotations (all optional):
//!
//! | annotation | meaning |
//! | --- | --- |
//! | `kvgate.io/block-size` | the engine's KV block size; a pod that disagrees with the pool is left out, with the reason |
//! | `kvgate.io/dp-size` | data-parallel ranks behind the port |
//! | `kvgate.io/total-kv-blocks` | KV cache capacity in blocks |
//! | `kvgate.io/max-num-batched-tokens` | the engine's prefill chunk |
//! | `kvgate.io/kv-events-port` | the vLLM ZMQ KV event publisher's port on the pod |
//! | `kvgate.io/kv-events-replay-port` | its replay socket's port |

use kvgate_core::router::MAX_DP_SIZE;
use kvgate_wire::workers::{Role, WorkerEntry};
use serde_json::Value;
use std::collections::BTreeMap;

pub const ANN_BLOCK_SIZE: &str = "kvgate.io/block-size";
pub const ANN_DP_SIZE: &str = "kvgate.io/dp-size";
pub const ANN_TOTAL_KV_BLOCKS: &str = "kvgate.io/total-kv-blocks";
pub const ANN_MAX_BATCHED: &str = "kvgate.io/max-num-batched-tokens";
pub const ANN_KV_EVENTS_PORT: &str = "kvgate.io/kv-events-port";
pub const ANN_KV_REPLAY_PORT: &str = "kvgate.io/kv-events-replay-port";
pub const LABEL_ROLE: &str = crate::dgd::labels::SUB_COMPONENT_TYPE;

/// What discovery needs of a pod.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodFacts {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub ip: Option<String>,
    /// The `Ready` condition is `True`.
    pub ready: bool,
    /// Has a deletion timestamp.
    pub terminating: bool,
}

impl PodFacts {
    /// From a Pod object as JSON (the API's shape).
    pub fn from_json(pod: &Value) -> Self {
        let map = |v: &Value| -> BTreeMap<String, String> {
            v.as_object()
                .map(|m| {
                    m.iter()
                        .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                        .collect()
                })
                .unwrap_or_default()
        };
        let meta = &pod["metadata"];
        let status = &pod["status"];
        let ready = status["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["type"] == "Ready" && c["status"] == "True");
        Self {
            name: meta["name"].as_str().unwrap_or_default().to_string(),
            labels: map(&meta["labels"]),
            annotations: map(&meta["annotations"]),
            ip: status["podIP"]
                .as_str()
                .filter(|s| !s.is_empty())
                .map(String::from),
            ready,
            terminating: !meta["deletionTimestamp"].is_null(),
        }
    }
}

/// Which pods and ports make the pool, and what the router assumes of them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolConfig {
    /// Pods with all of these labels.
    pub selector: BTreeMap<String, String>,
    /// One endpoint per port per pod (1-8).
    pub target_ports: Vec<u16>,
    /// The pool's KV block size.
    pub block_size: u32,
    /// ZMQ KV event port for pods that do not annotate one (`None`: events come another way).
    pub kv_events_port: Option<u16>,
}

/// A pod left out, and why (for logs and the debug endpoint).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Skipped {
    pub pod: String,
    pub reason: String,
}

/// The endpoints of `pods` (sorted by name), and the pods that were seen but left out. Pods
/// that do not match the selector are ignored silently (a watch may still hold a relabelled
/// pod).
pub fn endpoints<'a>(
    pods: impl IntoIterator<Item = &'a PodFacts>,
    cfg: &PoolConfig,
) -> (Vec<WorkerEntry>, Vec<Skipped>) {
    let mut out = Vec::new();
    let mut skipped = Vec::new();
    // Pods in name order, so that which of two colliding pods is kept does not depend on the
    // order the watch delivered them.
    let mut pods: Vec<&PodFacts> = pods
        .into_iter()
        .filter(|p| cfg.selector.iter().all(|(k, v)| p.labels.get(k) == Some(v)))
        .collect();
    pods.sort_by(|a, b| a.name.cmp(&b.name));
    let mut ids = std::collections::HashMap::new();
    for p in pods {
        let es = endpoint(p, cfg).and_then(|es| {
            // `<pod>-<port>` may be another pod's name: every endpoint needs its own id.
            match es
                .iter()
                .find_map(|e| ids.get(&e.instance_id()).map(|o| (e, o)))
            {
                Some((e, other)) => Err(format!(
                    "endpoint {} has the worker id of pod {other}'s endpoint",
                    e.name
                )),
                None => Ok(es),
            }
        });
        match es {
            Ok(mut es) => {
                for e in &es {
                    ids.insert(e.instance_id(), p.name.clone());
                }
                out.append(&mut es);
            }
            Err(reason) => skipped.push(Skipped {
                pod: p.name.clone(),
                reason,
            }),
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    skipped.sort_by(|a, b| a.pod.cmp(&b.pod));
    (out, skipped)
}

fn number<T: std::str::FromStr>(p: &PodFacts, key: &str) -> Result<Option<T>, String> {
    match p.annotations.get(key) {
        None => Ok(None),
        Some(v) => v
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| format!("annotation {key}={v:?} is not a number")),
    }
}

fn endpoint(p: &PodFacts, cfg: &PoolConfig) -> Result<Vec<WorkerEntry>, String> {
    if p.terminating {
        return Err("terminating".into());
    }
    if !p.ready {
        return Err("not Ready".into());
    }
    let Some(ip) = &p.ip else {
        return Err("no pod IP yet".into());
    };
    let role = match p.labels.get(LABEL_ROLE).map(String::as_str) {
        None | Some("") => Role::Aggregated,
        Some("prefill") => Role::Prefill,
        Some("decode") => Role::Decode,
        Some(other) => {
            return Err(format!(
                "label {LABEL_ROLE}={other:?}: expected prefill or decode"
            ));
        }
    };
    if let Some(bs) = number::<u32>(p, ANN_BLOCK_SIZE)?
        && bs != cfg.block_size
    {
        return Err(format!(
            "block size {bs} ({ANN_BLOCK_SIZE}) differs from the pool's {}; its cache would be misread",
            cfg.block_size
        ));
    }
    let dp_size = number::<u32>(p, ANN_DP_SIZE)?.unwrap_or(1);
    if dp_size == 0 || dp_size > MAX_DP_SIZE {
        return Err(format!(
            "annotation {ANN_DP_SIZE}={dp_size} must be in [1, {MAX_DP_SIZE}]"
        ));
    }
    let total_kv_blocks = number::<u64>(p, ANN_TOTAL_KV_BLOCKS)?;
    let max_num_batched_tokens = number::<u64>(p, ANN_MAX_BATCHED)?;
    let events_port = number::<u16>(p, ANN_KV_EVENTS_PORT)?.or(cfg.kv_events_port);
    let replay_port = number::<u16>(p, ANN_KV_REPLAY_PORT)?;
    // IPv6 addresses go in brackets in URLs.
    let host = if ip.contains(':') {
        format!("[{ip}]")
    } else {
        ip.clone()
    };
    Ok(cfg
        .target_ports
        .iter()
        .enumerate()
        .map(|(i, port)| {
            let name = if i == 0 {
                p.name.clone()
            } else {
                format!("{}-{port}", p.name)
            };
            WorkerEntry {
                name,
                id: None,
                url: format!("http://{host}:{port}"),
                role,
                dp_size,
                total_kv_blocks,
                max_num_batched_tokens,
                // One publisher per pod: it speaks for the first port's engine only (crediting
                // its blocks to every port's worker would send prefix hits to engines that lack
                // the cache); further ports are routed on load and predictions.
                kv_events: events_port
                    .filter(|_| i == 0)
                    .map(|e| format!("tcp://{host}:{e}")),
                kv_events_replay: replay_port
                    .filter(|_| i == 0)
                    .map(|e| format!("tcp://{host}:{e}")),
            }
        })
        .collect())
}

/// Parses `k=v,k2=v2` (an `--endpoint-selector`).
pub fn parse_selector(s: &str) -> Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| format!("selector {part:?}: expected key=value"))?;
        let (k, v) = (k.trim(), v.trim());
        if !crate::meta::is_label_key(k) || !crate::meta::is_label_value(v) {
            return Err(format!(
                "selector {part:?}: not a valid label key=value (only equality selectors)"
            ));
        }
        out.insert(k.to_string(), v.to_string());
    }
    if out.is_empty() {
        return Err("the endpoint selector is empty: it would select every pod".into());
    }
    Ok(out)
}
