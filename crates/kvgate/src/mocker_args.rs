//! `kvgate mocker` flags.

use clap::{Args, ValueEnum};
use kvgate_engine::{EngineConfig, TimingModel};
use kvgate_mocker::{MockerConfig, Role};

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum RoleArg {
    Aggregated,
    Prefill,
    Decode,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LayoutArg {
    /// vLLM 0.33 and later: each event a map tagged by `type`.
    Map,
    /// Older vLLM: each event a positional array, the type first.
    Array,
}

#[derive(Args, Debug, Clone)]
pub struct MockerArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (0 picks a free one; the bound address is printed).
    #[arg(long, default_value_t = 9100)]
    pub port: u16,
    /// The model name served (requests naming another model get 404).
    #[arg(long, default_value = "qwen3")]
    pub model: String,
    /// Worker instance id reported in `x-kvgate-worker-id`.
    #[arg(long, default_value_t = 0)]
    pub worker_id: u64,
    /// Data-parallel ranks, each with its own KV cache.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub dp_size: u32,
    #[arg(long, value_enum, default_value = "aggregated")]
    pub role: RoleArg,
    /// Tokens per KV block.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub block_size: u32,
    /// KV cache capacity in blocks (per rank).
    #[arg(long, default_value_t = 16_384, value_parser = clap::value_parser!(u64).range(1..=100_000_000))]
    pub num_gpu_blocks: u64,
    /// Most requests in the running batch.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub max_num_seqs: u64,
    /// Most tokens per forward pass (chunked prefill budget).
    #[arg(long, default_value_t = 8192, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub max_num_batched_tokens: u64,
    /// Run this many times faster than the timing model (10 = a 100 ms pass takes 10 ms).
    #[arg(long, default_value_t = 1.0)]
    pub speedup_ratio: f64,
    /// `max_tokens` for requests that give none.
    #[arg(long, default_value_t = 64)]
    pub default_max_tokens: u32,
    /// Largest accepted request body (413 above).
    #[arg(long, default_value_t = 32 << 20)]
    pub max_request_body_bytes: usize,
    /// Publish vLLM-format KV events on this ZMQ endpoint (tcp://HOST:PORT; rank r uses PORT+r).
    #[arg(long)]
    pub zmq_kv_events: Option<String>,
    /// vLLM's replay socket for the ZMQ events (ROUTER, tcp://HOST:PORT; rank r uses PORT+r):
    /// subscribers that missed messages fetch them from here.
    #[arg(long, requires = "zmq_kv_events")]
    pub zmq_replay: Option<String>,
    /// (testing) ZMQ sequence numbers kept for replay but not published, to force gaps.
    #[arg(long, hide = true, value_delimiter = ',')]
    pub zmq_drop_seqs: Vec<u64>,
    /// ZMQ topic of the KV events.
    #[arg(long, default_value = "")]
    pub zmq_topic: String,
    /// How the ZMQ events are laid out (both are vLLM's; routers must read both).
    #[arg(long, value_enum, default_value = "map")]
    pub zmq_event_layout: LayoutArg,
    /// HF tokenizer (`tokenizer.json` or a directory with it); default: embedded o200k + ChatML.
    #[arg(long)]
    pub tokenizer: Option<std::path::PathBuf>,
    /// KV cache bytes per token (all layers, K and V): sets the simulated transfer time of a
    /// disaggregated request's prompt (default: an 8B-class model in bf16).
    #[arg(long, default_value_t = 147_456)]
    pub kv_bytes_per_token: u64,
    /// Prefill -> decode KV transfer bandwidth in GB/s (decode role).
    #[arg(long, default_value_t = 25.0)]
    pub kv_transfer_gbps: f64,
    #[command(flatten)]
    pub events: crate::event_plane_args::EventPlaneArgs,
    /// Register each worker in this Dynamo file discovery store (Dynamo's `DYN_FILE_KV`) as a
    /// Dynamo 1.6 worker does (instance, model card, event channels), so Dynamo's own frontend
    /// and KV router find it and index its KV events. Needs `--event-plane nats`; with
    /// `--worker-id 0` the worker gets a random id, as Dynamo's do.
    #[arg(long)]
    pub dynamo_discovery_dir: Option<std::path::PathBuf>,
    /// Model directory named in the model card (`config.json`, `tokenizer.json`,
    /// `tokenizer_config.json`; Dynamo's frontend tokenizes with it). Default: `--tokenizer`'s
    /// directory.
    #[arg(long)]
    pub dynamo_model_path: Option<std::path::PathBuf>,
}

impl MockerArgs {
    pub fn to_config(&self) -> Result<MockerConfig, String> {
        if !(self.speedup_ratio.is_finite() && self.speedup_ratio > 0.0) {
            return Err(format!(
                "--speedup-ratio {} must be a number > 0",
                self.speedup_ratio
            ));
        }
        if !(self.kv_transfer_gbps.is_finite() && self.kv_transfer_gbps > 0.0) {
            return Err(format!(
                "--kv-transfer-gbps {} must be a number > 0",
                self.kv_transfer_gbps
            ));
        }
        let nats_kv_events = self.events.publisher()?;
        let dynamo_discovery = match &self.dynamo_discovery_dir {
            None => None,
            Some(dir) => {
                if nats_kv_events.is_none() {
                    return Err("--dynamo-discovery-dir needs --event-plane nats".into());
                }
                let model_dir = match (&self.dynamo_model_path, &self.tokenizer) {
                    (Some(m), _) => m.clone(),
                    (None, Some(t)) if t.is_dir() => t.clone(),
                    (None, Some(t)) => t
                        .parent()
                        .map(std::path::Path::to_path_buf)
                        .unwrap_or_default(),
                    (None, None) => {
                        return Err(
                            "--dynamo-discovery-dir needs --dynamo-model-path (or --tokenizer): the model card names the model directory".into(),
                        );
                    }
                };
                Some(kvgate_mocker::dynamo_discovery::DynamoRegistration {
                    dir: dir.clone(),
                    model_dir,
                })
            }
        };
        let worker_id = match (self.worker_id, &dynamo_discovery) {
            (0, Some(_)) => kvgate_wire::dynamo_plane::random_publisher_id(),
            (id, _) => id,
        };
        Ok(MockerConfig {
            host: self.host.clone(),
            port: self.port,
            model: self.model.clone(),
            worker_id,
            dp_size: self.dp_size,
            role: match self.role {
                RoleArg::Aggregated => Role::Aggregated,
                RoleArg::Prefill => Role::Prefill,
                RoleArg::Decode => Role::Decode,
            },
            engine: EngineConfig {
                block_size: self.block_size as usize,
                num_gpu_blocks: self.num_gpu_blocks as usize,
                max_num_seqs: self.max_num_seqs as usize,
                max_num_batched_tokens: self.max_num_batched_tokens as usize,
                enable_prefix_caching: true,
                timing: TimingModel::default(),
            },
            speedup_ratio: self.speedup_ratio,
            default_max_tokens: self.default_max_tokens,
            max_body_bytes: self.max_request_body_bytes,
            zmq_kv_events: self.zmq_kv_events.clone(),
            zmq_topic: self.zmq_topic.clone(),
            zmq_layout: match self.zmq_event_layout {
                LayoutArg::Map => kvgate_wire::vllm::EventLayout::Map,
                LayoutArg::Array => kvgate_wire::vllm::EventLayout::Array,
            },
            zmq_replay: self.zmq_replay.clone(),
            zmq_drop_seqs: self.zmq_drop_seqs.clone(),
            nats_kv_events,
            dynamo_discovery,
            tokenizer: self.tokenizer.clone(),
            kv_bytes_per_token: self.kv_bytes_per_token,
            kv_transfer_gbps: self.kv_transfer_gbps,
        })
    }
}
