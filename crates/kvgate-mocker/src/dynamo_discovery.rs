//! Registers the mocker in a Dynamo 1.6 file discovery store (`DYN_FILE_KV`) the way a Dynamo
//! worker does, so Dynamo's own frontend and KV router find it and read its KV events:
//!
//! - `v1/instances/{ns}/{c}/{e}/{id:x}`: the endpoint instance (its `tcp` transport names the
//!   mocker's HTTP address; the mocker does not speak Dynamo's request plane, so requests Dynamo
//!   sends there fail, after its router has chosen the worker);
//! - `v1/mdc/{ns}/{c}/{e}/{id:x}`: the model card (the model directory's `config.json`,
//!   `tokenizer.json` and `tokenizer_config.json`, with their blake3 checksums, which Dynamo's
//!   frontend checks; the KV block size, the cache size, the dp size);
//! - `v1/event_channels/namespace/{ns}/component/{c}/endpoint/{e}/topic/{topic}/{publisher:x}`:
//!   each event plane publisher (kv-events per dp rank, kv_metrics per worker) on NATS;
//! - `v1/event_sources/...` (same key, kv-events only): which worker and dp rank a publisher
//!   speaks for. Without a recovery target, Dynamo's router indexes the events live.
//!
//! Keys are percent-encoded into file names (every character but ASCII letters and digits).
//! Dynamo expires records ~10 s after their file was last modified, so they are touched every
//! 2 s (and rewritten if Dynamo deleted them); they are removed when the mocker stops.

use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where and what to register.
#[derive(Clone, Debug)]
pub struct DynamoRegistration {
    /// The store root (`DYN_FILE_KV`).
    pub dir: PathBuf,
    /// Model directory with `config.json`, `tokenizer.json`, `tokenizer_config.json`.
    pub model_dir: PathBuf,
}

/// What the registration says about the worker.
#[derive(Clone, Debug)]
pub struct WorkerRecord {
    pub namespace: String,
    pub component: String,
    pub endpoint: String,
    pub instance_id: u64,
    pub model: String,
    /// `host:port` written as the instance's transport.
    pub address: String,
    pub block_size: u32,
    pub total_kv_blocks: u64,
    pub max_num_seqs: u64,
    pub max_num_batched_tokens: u64,
    pub dp_size: u32,
    /// `aggregated`, `prefill` or `decode`.
    pub worker_type: &'static str,
    /// The kv-events publisher of each dp rank.
    pub kv_publishers: Vec<u64>,
    pub metrics_publisher: u64,
}

const REFRESH: Duration = Duration::from_secs(2);

/// A file name for a key: every byte but ASCII letters and digits as `%XX`, as Dynamo's file
/// store writes them.
pub fn encode_key(key: &str) -> String {
    let mut out = String::with_capacity(key.len() * 2);
    for b in key.bytes() {
        if b.is_ascii_alphanumeric() {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `path`, `checksum` (`blake3:<hex>`) and `size` of a model file.
fn checked_file(path: &Path) -> Result<Value, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("model file {}: {e}", path.display()))?;
    Ok(json!({
        "path": path.display().to_string(),
        "checksum": format!("blake3:{}", blake3::hash(&bytes).to_hex()),
        "size": bytes.len(),
    }))
}

/// Dynamo's model slug: lower case, characters other than letters, digits, `-` and `_` as `_`.
fn slug(name: &str) -> String {
    name.chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The records (bucket, key, JSON) for `w`.
pub fn records(w: &WorkerRecord, model_dir: &Path) -> Result<Vec<(String, String, Value)>, String> {
    let model_dir = model_dir
        .canonicalize()
        .map_err(|e| format!("model directory {}: {e}", model_dir.display()))?;
    let config = checked_file(&model_dir.join("config.json"))?;
    let tokenizer = checked_file(&model_dir.join("tokenizer.json"))?;
    let tokenizer_config = checked_file(&model_dir.join("tokenizer_config.json"))?;
    let max_context = std::fs::read(model_dir.join("config.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
        .and_then(|v| v.get("max_position_embeddings").and_then(Value::as_u64))
        .unwrap_or(w.total_kv_blocks * u64::from(w.block_size));
    let (ns, c, e) = (&w.namespace, &w.component, &w.endpoint);
    let id = w.instance_id;
    let instance_key = format!("{ns}/{c}/{e}/{id:x}");
    let instance = json!({
        "type": "Endpoint",
        "component": c,
        "endpoint": e,
        "namespace": ns,
        "instance_id": id,
        "transport": {"tcp": format!("{}/{id:x}/{ns}/{c}/{e}", w.address)},
        "device_type": "cuda",
        "request_plane_codec": "msgpack",
    });
    let card = json!({
        "type": "Model",
        "namespace": ns,
        "component": c,
        "endpoint": e,
        "instance_id": id,
        "card_json": {
            "display_name": w.model,
            "slug": slug(&w.model),
            "source_path": model_dir.display().to_string(),
            "model_info": {"hf_config_json": config},
            "tokenizer": {"hf_tokenizer_json": tokenizer},
            "prompt_formatter": {"hf_tokenizer_config_json": tokenizer_config},
            "architectural_max_context_length": max_context,
            "context_length": 0,
            "kv_cache_block_size": w.block_size,
            "migration_limit": 0,
            "model_type": "Chat | Completions",
            "model_input": "Tokens",
            "worker_type": w.worker_type,
            "needs": [],
            "runtime_config": {
                "context_length": 0,
                "total_kv_blocks": w.total_kv_blocks,
                "max_num_seqs": w.max_num_seqs,
                "max_num_batched_tokens": w.max_num_batched_tokens,
                "tool_call_parser": null,
                "reasoning_parser": null,
                "tool_call_arguments_format": "json_string",
                "structural_tag_mode": "off",
                "structural_tag_scope": "auto",
                "structural_tag_schema": "auto",
                "exclude_tools_when_tool_choice_none": true,
                "data_parallel_start_rank": 0,
                "data_parallel_size": w.dp_size,
                // No worker-side indexer to recover from: Dynamo's router reads events live.
                "enable_local_indexer": false,
                "kv_event_publishing_enabled": true,
                "runtime_data": {},
                "enable_eagle": false,
            },
            "media_decoder": null,
            "media_fetcher": null,
        },
    });
    let scope =
        json!({"kind": "endpoint", "endpoint": {"namespace": ns, "component": c, "name": e}});
    let channel = |topic: &str, publisher: u64| {
        json!({
            "type": "EventChannel",
            "scope": scope,
            "topic": topic,
            "instance_id": publisher,
            "transport": {"kind": "Nats", "config": {
                "subject_prefix": format!("namespace.{ns}.component.{c}.endpoint.{e}"),
            }},
        })
    };
    let topic_key = |topic: &str, publisher: u64| {
        format!("namespace/{ns}/component/{c}/endpoint/{e}/topic/{topic}/{publisher:x}")
    };
    let mut out = vec![
        ("instances".to_string(), instance_key.clone(), instance),
        ("mdc".to_string(), instance_key, card),
    ];
    for (rank, &p) in w.kv_publishers.iter().enumerate() {
        let topic = kvgate_wire::dynamo_plane::KV_EVENTS_TOPIC;
        out.push((
            "event_channels".into(),
            topic_key(topic, p),
            channel(topic, p),
        ));
        out.push((
            "event_sources".into(),
            topic_key(topic, p),
            json!({
                "type": "EventSource",
                "scope": scope,
                "topic": topic,
                "publisher_id": p,
                "metadata": {
                    "kv_state_endpoint": {"namespace": ns, "component": c, "name": e},
                    "worker": {"worker_id": id, "dp_rank": rank},
                    "publisher_id": p,
                },
            }),
        ));
    }
    let topic = kvgate_wire::dynamo_plane::KV_METRICS_TOPIC;
    out.push((
        "event_channels".into(),
        topic_key(topic, w.metrics_publisher),
        channel(topic, w.metrics_publisher),
    ));
    Ok(out)
}

/// The registered files; removed on drop.
struct Registered {
    files: Vec<(PathBuf, Vec<u8>)>,
    tmp: PathBuf,
}

impl Registered {
    /// Writes a file whole: into a temporary directory first, then renamed into its bucket,
    /// so Dynamo's watcher never reads half a record.
    fn write(&self, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::create_dir_all(&self.tmp)?;
        let tmp = self.tmp.join(path.file_name().unwrap_or_default());
        std::fs::write(&tmp, bytes)?;
        std::fs::rename(&tmp, path)
    }

    fn write_all(&self) -> Result<(), String> {
        for (path, bytes) in &self.files {
            self.write(path, bytes)
                .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        }
        Ok(())
    }

    /// Touches every record (rewrites the ones that are gone).
    fn refresh(&self) {
        for (path, bytes) in &self.files {
            let touched = std::fs::File::options()
                .write(true)
                .open(path)
                .and_then(|f| f.set_modified(std::time::SystemTime::now()));
            if touched.is_err()
                && let Err(e) = self.write(path, bytes)
            {
                tracing::warn!(path = %path.display(), error = %e, "cannot refresh the Dynamo discovery record");
            }
        }
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        for (path, _) in &self.files {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Writes the records and keeps them fresh until the runtime stops (then removes them).
pub fn register(reg: &DynamoRegistration, worker: &WorkerRecord) -> Result<(), String> {
    let root = reg.dir.join("v1");
    let files = records(worker, &reg.model_dir)?
        .into_iter()
        .map(|(bucket, key, v)| {
            (
                root.join(bucket).join(encode_key(&key)),
                v.to_string().into_bytes(),
            )
        })
        .collect();
    let registered = Registered {
        files,
        tmp: root.join(format!(".kvgate-tmp-{:x}", worker.instance_id)),
    };
    registered.write_all()?;
    tracing::info!(
        dir = %reg.dir.display(),
        instance_id = worker.instance_id,
        "registered in the Dynamo discovery store"
    );
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(REFRESH);
        loop {
            tick.tick().await;
            registered.refresh();
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn keys_are_encoded_as_dynamo_names_its_files() {
        assert_eq!(
            encode_key(
                "namespace/dynamo/component/backend/endpoint/generate/topic/kv-events/9ba4a7280c34b"
            ),
            "namespace%2Fdynamo%2Fcomponent%2Fbackend%2Fendpoint%2Fgenerate%2Ftopic%2Fkv%2Devents%2F9ba4a7280c34b"
        );
        assert_eq!(
            encode_key("dynamo/backend/worker_kv_query_source_4ab2bbfa57d27/8327f9e2e63d142a"),
            "dynamo%2Fbackend%2Fworker%5Fkv%5Fquery%5Fsource%5F4ab2bbfa57d27%2F8327f9e2e63d142a"
        );
    }

    /// The records have the shape of the ones a Dynamo 1.6.1 worker writes (captured in
    /// kvgate-wire's fixtures): the same fields, in the same order.
    #[test]
    fn records_match_the_captured_ones() {
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../kvgate-wire/tests/fixtures/dynamo-1.6.1/discovery");
        let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.tools/dynamo-model");
        assert!(
            model.join("tokenizer.json").exists(),
            "{} missing: run scripts/setup.sh",
            model.display()
        );
        let w = WorkerRecord {
            namespace: "dynamo".into(),
            component: "backend".into(),
            endpoint: "generate".into(),
            instance_id: 9_450_797_095_980_962_858,
            model: "qwen".into(),
            address: "192.0.2.2:38413".into(),
            block_size: 16,
            total_kv_blocks: 24,
            max_num_seqs: 256,
            max_num_batched_tokens: 8192,
            dp_size: 2,
            worker_type: "aggregated",
            kv_publishers: vec![2_738_103_701_783_371, 1_314_104_294_079_783],
            metrics_publisher: 3_992_544_989_853_990,
        };
        let recs = records(&w, &model).unwrap();
        let read = |name: &str| -> Value {
            serde_json::from_slice(&std::fs::read(fixtures.join(name)).unwrap()).unwrap()
        };
        let find = |bucket: &str, key_end: &str| {
            recs.iter()
                .find(|(b, k, _)| b == bucket && k.ends_with(key_end))
                .map(|(_, _, v)| v.clone())
                .unwrap()
        };
        fn keys(v: &Value) -> Vec<String> {
            v.as_object().unwrap().keys().cloned().collect()
        }
        assert_eq!(
            find("instances", "8327f9e2e63d142a"),
            read("instance.generate.json")
        );
        assert_eq!(
            find("event_channels", "kv-events/9ba4a7280c34b"),
            read("event_channel.kv-events.9ba4a7280c34b.json")
        );
        assert_eq!(
            find("event_channels", "kv_metrics/e2f32d1deb926"),
            read("event_channel.kv_metrics.e2f32d1deb926.json")
        );
        // The event source: the same, less the recovery target (no worker-side indexer).
        let mut want = read("event_source.kv-events.4ab2bbfa57d27.json");
        want["metadata"]
            .as_object_mut()
            .unwrap()
            .remove("recovery_target");
        assert_eq!(find("event_sources", "kv-events/4ab2bbfa57d27"), want);
        let card = find("mdc", "8327f9e2e63d142a");
        let want = read("mdc.generate.json");
        assert_eq!(keys(&card), keys(&want));
        assert_eq!(keys(&card["card_json"]), keys(&want["card_json"]));
        assert_eq!(
            keys(&card["card_json"]["runtime_config"]),
            keys(&want["card_json"]["runtime_config"])
        );
        for k in [
            "kv_cache_block_size",
            "model_type",
            "model_input",
            "worker_type",
        ] {
            assert_eq!(card["card_json"][k], want["card_json"][k], "{k}");
        }
        assert_eq!(
            card["card_json"]["runtime_config"]["enable_local_indexer"],
            false
        );
        assert!(
            card["card_json"]["tokenizer"]["hf_tokenizer_json"]["checksum"]
                .as_str()
                .unwrap()
                .starts_with("blake3:")
        );
    }
}
