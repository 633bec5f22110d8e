//! `kvgate epp` flags.

use crate::router_args::RouterArgs;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct EppArgs {
    /// Address the gRPC, health and metrics servers listen on.
    #[arg(long, default_value = "0.0.0.0")]
    pub host: String,
    /// ext_proc gRPC port (Envoy's `envoy.service.ext_proc.v3.ExternalProcessor`; also serves
    /// gRPC health). 0 picks a free port.
    #[arg(long, default_value_t = 9002)]
    pub grpc_port: u16,
    /// Plaintext gRPC health port (`grpc.health.v1`, for kubelet probes).
    #[arg(long, default_value_t = 9003)]
    pub health_port: u16,
    /// Prometheus metrics and the debug endpoint (`/metrics`, `/debug/decisions`).
    #[arg(long, default_value_t = 9090)]
    pub metrics_port: u16,
    /// TLS on the ext_proc port; `--secure-serving=false` serves plaintext h2c.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub secure_serving: bool,
    /// Directory holding `tls.crt` and `tls.key` (reloaded when they change); default: a
    /// self-signed certificate generated at start-up.
    #[arg(long)]
    pub cert_path: Option<PathBuf>,
    /// PEM CA bundle; when set, the gateway must present a client certificate it signed (mTLS).
    #[arg(long)]
    pub client_ca: Option<PathBuf>,
    /// The workers file (YAML, the frontend's format; reloaded when it changes). Worker URLs
    /// are the endpoints (`ip:port`) the gateway routes to: the pods' sidecar frontends.
    /// Without it, the workers are discovered from Kubernetes: the pods of InferencePool
    /// `--pool-name`, or of `--endpoint-selector`.
    #[arg(long)]
    pub workers: Option<PathBuf>,
    /// Pod discovery: the namespace of the pool and its pods (default: the EPP's own).
    #[arg(long, env = "POD_NAMESPACE")]
    pub pool_namespace: Option<String>,
    /// Pod discovery without an InferencePool: pods with these labels (`k=v,k2=v2`).
    #[arg(long, value_name = "K=V,...")]
    pub endpoint_selector: Option<String>,
    /// With `--endpoint-selector`: the ports of each pod that are endpoints.
    #[arg(long, value_delimiter = ',', value_name = "PORT,...")]
    pub target_ports: Vec<u16>,
    /// Pod discovery: the served model name (requests for another model get 404).
    #[arg(long)]
    pub model: Option<String>,
    /// Pod discovery: the pool's KV block size (pods annotating another are left out).
    #[arg(long, default_value_t = 16)]
    pub block_size: u32,
    /// Pod discovery: seconds a pod that stops being Ready keeps its cache entries and KV event
    /// subscription (out of routing meanwhile), so a readiness flap costs no cache knowledge;
    /// 0 drops them at once.
    #[arg(long, env = "KVGATE_UNREADY_GRACE_SECS", default_value_t = 30.0, allow_hyphen_values = true, value_parser = parse_grace)]
    pub unready_grace_secs: f64,
    /// Pod discovery: the engines' vLLM ZMQ KV event port, for pods without the
    /// `kvgate.io/kv-events-port` annotation.
    #[arg(long)]
    pub kv_events_port: Option<u16>,
    /// Routing tokenizer (tokenizer.json or its directory); default: the workers file's
    /// `tokenizer`, else the embedded one.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Largest request body the EPP accepts (413 above).
    #[arg(long, default_value_t = 32 << 20)]
    pub max_request_body_bytes: usize,
    /// Endpoints in `x-gateway-destination-endpoint`, best first (a fallback list for gateways
    /// that support one; plain Envoy's ORIGINAL_DST takes exactly one).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub max_endpoints: u16,
    /// Seconds tokenization may take before the client gets 504.
    #[arg(long, default_value_t = 10.0)]
    pub tokenize_timeout_secs: f64,
    /// Tokens in: route a request that carries `nvext.token_data` on those ids (checked against
    /// the vocabulary, 400 if one is unknown) and skip tokenizing it. Off: always tokenize the
    /// messages and overwrite the ids (for engines that ignore `nvext`).
    #[arg(long, env = "KVGATE_ACCEPT_TOKEN_DATA", default_value_t = true, action = clap::ArgAction::Set)]
    pub accept_token_data: bool,
    /// Decisions kept for `/debug/decisions`.
    #[arg(long, default_value_t = 256)]
    pub decision_log: usize,
    /// The InferencePool: its name in metric labels, and, without `--workers` or
    /// `--endpoint-selector`, the pool whose pods are the workers.
    #[arg(long, default_value = "kvgate")]
    pub pool_name: String,
    #[command(flatten)]
    pub router: RouterArgs,
    #[command(flatten)]
    pub events: crate::event_plane_args::EventPlaneArgs,
}

impl EppArgs {
    pub fn to_config(&self) -> Result<kvgate_epp::EppConfig, String> {
        let router = self.router.to_config().map_err(|e| e.to_string())?;
        if !(self.tokenize_timeout_secs.is_finite() && self.tokenize_timeout_secs > 0.0) {
            return Err("--tokenize-timeout-secs must be > 0".into());
        }
        let replica_sync = self.events.replica_sync(router.replica_sync)?;
        let workers = self.worker_source()?;
        Ok(kvgate_epp::EppConfig {
            host: self.host.clone(),
            grpc_port: self.grpc_port,
            health_port: self.health_port,
            metrics_port: self.metrics_port,
            secure_serving: self.secure_serving,
            cert_path: self.cert_path.clone(),
            client_ca: self.client_ca.clone(),
            workers,
            router,
            tokenizer: self.tokenizer.clone(),
            max_request_body_bytes: self.max_request_body_bytes,
            max_endpoints: usize::from(self.max_endpoints),
            tokenize_timeout: std::time::Duration::from_secs_f64(self.tokenize_timeout_secs),
            accept_token_data: self.accept_token_data,
            decision_log: self.decision_log,
            pool_name: self.pool_name.clone(),
            event_plane: self.events.router_plane()?,
            replica_sync,
        })
    }
}

impl EppArgs {
    /// A workers file, or pod discovery (an InferencePool or a selector).
    fn worker_source(&self) -> Result<kvgate_epp::WorkerSource, String> {
        let discovery = self.endpoint_selector.is_some() || !self.target_ports.is_empty();
        if let Some(file) = &self.workers {
            if discovery || self.model.is_some() {
                return Err(
                    "--workers lists the workers; --endpoint-selector, --target-ports and --model are for pod discovery: use one or the other".into(),
                );
            }
            return Ok(kvgate_epp::WorkerSource::File(file.clone()));
        }
        let model = self
            .model
            .clone()
            .ok_or("give --workers FILE, or --model for pod discovery (the served model name)")?;
        if self.block_size == 0 {
            return Err("--block-size must be at least 1".into());
        }
        let pool = match (&self.endpoint_selector, self.target_ports.is_empty()) {
            (Some(sel), false) => kvgate_epp::PoolRef::Selector {
                selector: kvgate_k8s::discovery::parse_selector(sel)?,
                target_ports: self.target_ports.clone(),
            },
            (Some(_), true) => return Err("--endpoint-selector needs --target-ports".into()),
            (None, false) => return Err("--target-ports needs --endpoint-selector".into()),
            (None, true) => kvgate_epp::PoolRef::InferencePool(self.pool_name.clone()),
        };
        let mut unique = self.target_ports.clone();
        unique.sort_unstable();
        unique.dedup();
        if self.target_ports.len() > 8
            || self.target_ports.contains(&0)
            || unique.len() != self.target_ports.len()
        {
            return Err("--target-ports: 1 to 8 distinct ports, each at least 1".into());
        }
        Ok(kvgate_epp::WorkerSource::Kubernetes(
            kvgate_epp::KubernetesWorkers {
                client: None,
                namespace: self.pool_namespace.clone(),
                pool,
                model,
                block_size: self.block_size,
                kv_events_port: self.kv_events_port,
                unready_grace: std::time::Duration::from_secs_f64(self.unready_grace_secs),
            },
        ))
    }
}

fn parse_grace(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if v.is_finite() && (0.0..=3600.0).contains(&v) {
        Ok(v)
    } else {
        Err("must be between 0 and 3600 seconds".into())
    }
}
