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
    /// The pool's KV block size (workers registering another are left out). Pod discovery:
    /// default 16. Dynamo discovery: default, the block size the first worker registers.
    #[arg(long)]
    pub block_size: Option<u32>,
    /// Where workers are discovered without `--workers`: `kubernetes` (pods of an
    /// InferencePool, the default), or Dynamo's own discovery store as Dynamo 1.6 workers
    /// register themselves: `file` (`--discovery-file-dir`) or `etcd` (`--etcd-endpoints`).
    #[arg(long, value_enum, env = "DYN_DISCOVERY_BACKEND")]
    pub discovery_backend: Option<DiscoveryBackend>,
    /// Dynamo's file discovery store (the directory Dynamo's `DYN_FILE_KV` names).
    #[arg(long, env = "DYN_FILE_KV")]
    pub discovery_file_dir: Option<PathBuf>,
    /// Dynamo's etcd (`http://host:2379`, comma-separated).
    #[arg(long, env = "ETCD_ENDPOINTS", value_delimiter = ',')]
    pub etcd_endpoints: Vec<String>,
    /// Dynamo discovery: the gateway's endpoint for a worker, its pod's direct-mode sidecar
    /// (`dynamo.frontend --router-mode direct`). `{host}` is the host of the worker's
    /// registered request-plane address (its pod IP); without `{host}`, one sidecar for all.
    #[arg(
        long,
        env = "KVGATE_DYNAMO_SIDECAR_URL",
        default_value = "http://{host}:8000"
    )]
    pub dynamo_sidecar_url: String,
    /// Dynamo discovery: seconds between readings of the store.
    #[arg(long, default_value_t = 1.0)]
    pub discovery_poll_secs: f64,
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

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DiscoveryBackend {
    Kubernetes,
    File,
    Etcd,
}

impl EppArgs {
    /// A workers file, pod discovery (an InferencePool or a selector), or Dynamo's store.
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
        if matches!(
            self.discovery_backend,
            Some(DiscoveryBackend::File | DiscoveryBackend::Etcd)
        ) {
            return self.dynamo_source(discovery);
        }
        let block_size = self.block_size.unwrap_or(16);
        let model = self
            .model
            .clone()
            .ok_or("give --workers FILE, or --model for pod discovery (the served model name)")?;
        if block_size == 0 {
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
                block_size,
                kv_events_port: self.kv_events_port,
                unready_grace: std::time::Duration::from_secs_f64(self.unready_grace_secs),
            },
        ))
    }
}

impl EppArgs {
    fn dynamo_source(&self, pod_flags: bool) -> Result<kvgate_epp::WorkerSource, String> {
        use kvgate_runtime::dynamo_discovery::{DynamoDiscovery, DynamoStore};
        if pod_flags {
            return Err("--endpoint-selector and --target-ports are for pod discovery, not --discovery-backend file/etcd".into());
        }
        // Namespace, component and endpoint name the records taken, whichever plane is used.
        self.events.check_subject_tokens()?;
        let store = match self.discovery_backend {
            Some(DiscoveryBackend::File) => DynamoStore::File(self.discovery_file_dir.clone().ok_or(
                "--discovery-backend file needs --discovery-file-dir (DYN_FILE_KV): the directory Dynamo's workers register in",
            )?),
            _ => {
                let urls: Vec<String> = self
                    .etcd_endpoints
                    .iter()
                    .map(|u| u.trim().to_string())
                    .filter(|u| !u.is_empty())
                    .collect();
                if urls.is_empty() {
                    return Err("--discovery-backend etcd needs --etcd-endpoints (ETCD_ENDPOINTS), e.g. http://127.0.0.1:2379".into());
                }
                if let Some(bad) = urls.iter().find(|u| !u.starts_with("http://")) {
                    return Err(format!("--etcd-endpoints: {bad:?} is not an http:// URL (TLS to etcd is not supported yet)"));
                }
                DynamoStore::Etcd(urls)
            }
        };
        if self.block_size == Some(0) {
            return Err("--block-size must be at least 1".into());
        }
        let url = &self.dynamo_sidecar_url;
        let probe = url.replace("{host}", "h");
        if !(probe.starts_with("http://") || probe.starts_with("https://"))
            || probe
                .split("//")
                .nth(1)
                .is_none_or(|rest| rest.is_empty() || rest.contains(char::is_whitespace))
        {
            return Err(format!(
                "--dynamo-sidecar-url {url:?} is not an http:// URL (with {{host}} for the worker's host)"
            ));
        }
        if !(self.discovery_poll_secs.is_finite()
            && (0.05..=60.0).contains(&self.discovery_poll_secs))
        {
            return Err("--discovery-poll-secs must be between 0.05 and 60".into());
        }
        Ok(kvgate_epp::WorkerSource::Dynamo(DynamoDiscovery {
            store,
            namespace: self.events.namespace.clone(),
            component: self.events.component.clone(),
            prefill_component: self.events.prefill_component()?,
            endpoint: self.events.endpoint.clone(),
            sidecar_url: url.clone(),
            model: self.model.clone(),
            block_size: self.block_size,
            poll_every: std::time::Duration::from_secs_f64(self.discovery_poll_secs),
        }))
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
