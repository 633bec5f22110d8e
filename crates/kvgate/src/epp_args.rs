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
    #[arg(long)]
    pub workers: PathBuf,
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
    /// Decisions kept for `/debug/decisions`.
    #[arg(long, default_value_t = 256)]
    pub decision_log: usize,
    /// Pool name in metric labels.
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
        Ok(kvgate_epp::EppConfig {
            host: self.host.clone(),
            grpc_port: self.grpc_port,
            health_port: self.health_port,
            metrics_port: self.metrics_port,
            secure_serving: self.secure_serving,
            cert_path: self.cert_path.clone(),
            client_ca: self.client_ca.clone(),
            workers_file: self.workers.clone(),
            router,
            tokenizer: self.tokenizer.clone(),
            max_request_body_bytes: self.max_request_body_bytes,
            max_endpoints: usize::from(self.max_endpoints),
            tokenize_timeout: std::time::Duration::from_secs_f64(self.tokenize_timeout_secs),
            decision_log: self.decision_log,
            pool_name: self.pool_name.clone(),
            event_plane: self.events.router_plane()?,
            replica_sync,
        })
    }
}
