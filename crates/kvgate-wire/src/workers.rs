//! The workers file shared by the frontend and the EPP:
//!
//! ```yaml
//! model: qwen3
//! block_size: 16
//! workers:
//!   - name: worker-0          # instance id = `id` if given, else derived from the name like a Dynamo pod id
//!     id: 1001
//!     url: http://127.0.0.1:9100
//!     role: aggregated        # aggregated | prefill | decode
//!     dp_size: 1
//!     total_kv_blocks: 16384
//!     max_num_batched_tokens: 8192
//!     kv_events: tcp://127.0.0.1:5557
//! ```
//!
//! Unknown keys are refused (a typo must not silently drop a setting).

use kvgate_core::WorkerId;
use kvgate_core::router::{WorkerInfo, WorkerRole};
use kvgate_core::scheduler::WorkerCapacity;
use kvgate_core::worker_id::worker_id_for_pod;
use serde::Deserialize;
use std::collections::HashSet;
use std::fmt;

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkersFile {
    /// The served model name (requests for another model get 404).
    pub model: String,
    /// KV block size of every worker.
    pub block_size: u32,
    /// Tokenizer for routing (`tokenizer.json` path or directory); default: the embedded one.
    #[serde(default)]
    pub tokenizer: Option<String>,
    pub workers: Vec<WorkerEntry>,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerEntry {
    pub name: String,
    #[serde(default)]
    pub id: Option<u64>,
    /// Base URL of the worker's OpenAI server, e.g. `http://127.0.0.1:9100`.
    pub url: String,
    #[serde(default)]
    pub role: Role,
    #[serde(default = "one")]
    pub dp_size: u32,
    #[serde(default)]
    pub total_kv_blocks: Option<u64>,
    #[serde(default)]
    pub max_num_batched_tokens: Option<u64>,
    /// The worker's vLLM-style ZMQ KV event publisher (`tcp://host:port`).
    #[serde(default)]
    pub kv_events: Option<String>,
    /// Its replay socket (vLLM's `replay_endpoint`, ROUTER, `tcp://host:port`; rank r at
    /// port + r): missed events are fetched from it instead of dropping the rank's blocks.
    #[serde(default)]
    pub kv_events_replay: Option<String>,
}

fn one() -> u32 {
    1
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    #[default]
    Aggregated,
    Prefill,
    Decode,
}

impl From<Role> for WorkerRole {
    fn from(r: Role) -> Self {
        match r {
            Role::Aggregated => WorkerRole::Aggregated,
            Role::Prefill => WorkerRole::Prefill,
            Role::Decode => WorkerRole::Decode,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkersFileError(pub String);

impl fmt::Display for WorkersFileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for WorkersFileError {}

impl WorkerEntry {
    /// The instance id: explicit, else derived from the name as Dynamo derives pod ids.
    pub fn instance_id(&self) -> WorkerId {
        self.id
            .map_or_else(|| worker_id_for_pod(&self.name), WorkerId)
    }

    pub fn info(&self) -> WorkerInfo {
        WorkerInfo {
            id: self.instance_id(),
            dp_size: self.dp_size,
            role: self.role.into(),
            capacity: WorkerCapacity {
                total_kv_blocks: self.total_kv_blocks,
                max_num_batched_tokens: self.max_num_batched_tokens,
            },
        }
    }

    /// `host:port` of the worker's URL (what a gateway puts in `x-gateway-destination-endpoint`).
    pub fn host_port(&self) -> Option<&str> {
        let rest = self
            .url
            .strip_prefix("http://")
            .or_else(|| self.url.strip_prefix("https://"))?;
        let hp = rest.split('/').next()?;
        (!hp.is_empty()).then_some(hp)
    }
}

impl WorkersFile {
    pub fn parse(text: &str) -> Result<Self, WorkersFileError> {
        let f: WorkersFile = serde_yaml_ng::from_str(text)
            .map_err(|e| WorkersFileError(format!("workers file: {e}")))?;
        f.validate()?;
        Ok(f)
    }

    pub fn load(path: &std::path::Path) -> Result<Self, WorkersFileError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            WorkersFileError(format!("cannot read workers file {}: {e}", path.display()))
        })?;
        Self::parse(&text).map_err(|e| WorkersFileError(format!("{}: {}", path.display(), e.0)))
    }

    fn validate(&self) -> Result<(), WorkersFileError> {
        let err = |m: String| Err(WorkersFileError(m));
        if self.model.trim().is_empty() {
            return err("workers file: `model` must not be empty".into());
        }
        if self.block_size == 0 || self.block_size > 1 << 20 {
            return err(format!(
                "workers file: `block_size` = {} must be in [1, 1048576]",
                self.block_size
            ));
        }
        let mut ids = HashSet::new();
        let mut names = HashSet::new();
        for (i, w) in self.workers.iter().enumerate() {
            let at = format!("workers[{i}] ({})", w.name);
            if w.name.trim().is_empty() {
                return err(format!("workers file: workers[{i}].name must not be empty"));
            }
            // Names appear in headers and metric labels: keep them to Kubernetes-style characters.
            if w.name.len() > 253
                || !w
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
            {
                return err(format!(
                    "workers file: workers[{i}].name = {:?} may only use letters, digits, '-', '.' and '_' (at most 253)",
                    w.name
                ));
            }
            if !names.insert(w.name.as_str()) {
                return err(format!("workers file: {at}: duplicate name"));
            }
            if !ids.insert(w.instance_id()) {
                return err(format!(
                    "workers file: {at}: instance id {} is used twice",
                    w.instance_id()
                ));
            }
            if w.host_port().is_none() {
                return err(format!(
                    "workers file: {at}.url = {:?} must be http://host:port",
                    w.url
                ));
            }
            if w.dp_size == 0 || w.dp_size > 1024 {
                return err(format!(
                    "workers file: {at}.dp_size = {} must be in [1, 1024]",
                    w.dp_size
                ));
            }
            for (field, v) in [
                ("kv_events", &w.kv_events),
                ("kv_events_replay", &w.kv_events_replay),
            ] {
                if let Some(ev) = v
                    && !ev.starts_with("tcp://")
                {
                    return err(format!(
                        "workers file: {at}.{field} = {ev:?} must be tcp://host:port"
                    ));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
model: qwen3
block_size: 16
workers:
  - name: worker-0
    id: 1001
    url: http://127.0.0.1:9100
    role: aggregated
    dp_size: 1
    total_kv_blocks: 16384
    max_num_batched_tokens: 8192
    kv_events: tcp://127.0.0.1:5557
  - name: vllm-worker-0
    url: http://127.0.0.1:9101/
    role: decode
"#;

    #[test]
    fn parses_the_documented_example() {
        let f = WorkersFile::parse(EXAMPLE).unwrap();
        assert_eq!(f.model, "qwen3");
        assert_eq!(f.workers[0].instance_id(), WorkerId(1001));
        // derived like a Dynamo pod id
        assert_eq!(f.workers[1].instance_id(), WorkerId(3637812819037538));
        assert_eq!(f.workers[1].role, Role::Decode);
        assert_eq!(f.workers[1].dp_size, 1);
        assert_eq!(f.workers[1].host_port(), Some("127.0.0.1:9101"));
        let info = f.workers[0].info();
        assert_eq!(info.capacity.total_kv_blocks, Some(16384));
    }

    #[test]
    fn mistakes_are_named() {
        let cases = [
            (EXAMPLE.replace("dp_size: 1", "dp_sise: 1"), "dp_sise"),
            (
                EXAMPLE.replace("block_size: 16", "block_size: 0"),
                "block_size",
            ),
            (
                EXAMPLE.replace("id: 1001", "id: 3637812819037538"),
                "used twice",
            ),
            (
                EXAMPLE.replace("http://127.0.0.1:9100", "127.0.0.1:9100"),
                "must be http://host:port",
            ),
            (EXAMPLE.replace("role: decode", "role: both"), "role"),
            (
                EXAMPLE.replace("tcp://127.0.0.1:5557", "127.0.0.1:5557"),
                "kv_events",
            ),
            ("model: [".to_string(), "workers file"),
            (
                EXAMPLE.replace("name: worker-0", "name: \"bad name\\n\""),
                "may only use",
            ),
        ];
        for (text, want) in cases {
            let e = WorkersFile::parse(&text).unwrap_err().to_string();
            assert!(e.contains(want), "{want}: {e}");
        }
    }
}
