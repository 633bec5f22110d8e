//! `kvgate epp`: the Gateway API Inference Extension endpoint picker. Envoy (or any GAIE
//! gateway) opens an ext_proc stream per HTTP request; the EPP reads the OpenAI body, tokenizes
//! it, scores workers on KV-cache overlap and load, and answers with the destination endpoint,
//! the `x-dynamo-*` routing headers and the body with `nvext.token_data`. It follows the
//! response to release the request's load and to measure what the worker really had cached.
//!
//! - [`protocol`]: ext_proc message details (sans-IO);
//! - [`stream`]: the per-request state machine;
//! - [`tls`]: certificates (self-signed default, rotation, mutual TLS);
//! - [`metrics`]: Prometheus series and the debug endpoint.

pub mod echo;
pub mod metrics;
pub mod protocol;
pub mod stream;
pub mod tls;

use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::{
    ExternalProcessor, ExternalProcessorServer,
};
use envoy_types::pb::envoy::service::ext_proc::v3::{ProcessingRequest, ProcessingResponse};
use kvgate_core::config::RouterConfig;
use kvgate_runtime::routing::RoutingService;
use kvgate_wire::workers::WorkersFile;
use metrics::{Metrics, MetricsState};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;
use stream::{Shared, StreamSettings};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;

#[derive(Clone, Debug)]
pub struct EppConfig {
    pub host: String,
    pub grpc_port: u16,
    pub health_port: u16,
    pub metrics_port: u16,
    /// TLS on the ext_proc port (off: h2c).
    pub secure_serving: bool,
    /// Directory with `tls.crt` and `tls.key`; default: a self-signed certificate.
    pub cert_path: Option<PathBuf>,
    /// PEM CA bundle: when set, clients must present a certificate it signed.
    pub client_ca: Option<PathBuf>,
    /// Where the workers come from: a workers file, or the pods of an InferencePool.
    pub workers: WorkerSource,
    pub router: RouterConfig,
    pub tokenizer: Option<PathBuf>,
    pub max_request_body_bytes: usize,
    pub max_endpoints: usize,
    pub tokenize_timeout: Duration,
    /// Route on `nvext.token_data` when a request carries it (tokens in); off: always tokenize.
    pub accept_token_data: bool,
    pub decision_log: usize,
    /// Pool name in metric labels.
    pub pool_name: String,
    /// Where the router reads KV events.
    pub event_plane: kvgate_runtime::routing::EventPlane,
    /// Share bookings with the other EPP replicas over NATS (`DYN_ROUTER_REPLICA_SYNC`).
    pub replica_sync: Option<kvgate_runtime::replica::ReplicaSyncConfig>,
}

/// Where the EPP learns its workers.
#[derive(Clone, Debug)]
pub enum WorkerSource {
    /// A workers file (YAML), reloaded when it changes.
    File(PathBuf),
    /// Pods in Kubernetes.
    Kubernetes(KubernetesWorkers),
    /// Dynamo's own discovery store (its `file` or `etcd` backend), as Dynamo workers
    /// register themselves.
    Dynamo(kvgate_runtime::dynamo_discovery::DynamoDiscovery),
}

/// Pod discovery: the pods of an InferencePool (or of a label selector), their Ready state
/// followed live.
#[derive(Clone)]
pub struct KubernetesWorkers {
    /// The API client; `None`: in-cluster configuration or the local kubeconfig.
    pub client: Option<kube::Client>,
    /// `None`: the client's default namespace (the EPP pod's own in a cluster).
    pub namespace: Option<String>,
    pub pool: PoolRef,
    /// The served model name (requests for another model get 404).
    pub model: String,
    /// The pool's KV block size (pods annotating another one are left out).
    pub block_size: u32,
    /// The engines' vLLM ZMQ KV event port, for pods that do not annotate one.
    pub kv_events_port: Option<u16>,
    /// How long a pod that stops being an endpoint (unready, deleted) keeps its cache entries
    /// and event subscription in case it comes back (zero: dropped at once).
    pub unready_grace: Duration,
}

impl std::fmt::Debug for KubernetesWorkers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubernetesWorkers")
            .field("namespace", &self.namespace)
            .field("pool", &self.pool)
            .field("model", &self.model)
            .field("block_size", &self.block_size)
            .field("kv_events_port", &self.kv_events_port)
            .field("unready_grace", &self.unready_grace)
            .finish_non_exhaustive()
    }
}

/// Which pods.
#[derive(Clone, Debug)]
pub enum PoolRef {
    /// The selector and target ports of this InferencePool (followed: a change to them
    /// restarts the pod watch).
    InferencePool(String),
    /// An explicit selector and ports (`--endpoint-selector`, `--target-ports`).
    Selector {
        selector: std::collections::BTreeMap<String, String>,
        target_ports: Vec<u16>,
    },
}

/// Resolves the pool and starts following its pods; `ready` fires after the first complete list.
async fn start_discovery(
    k: &KubernetesWorkers,
    service: &Arc<RoutingService>,
    ready: tokio::sync::oneshot::Sender<()>,
) -> Result<(), String> {
    let client = match &k.client {
        Some(c) => c.clone(),
        None => kube::Client::try_default().await.map_err(|e| {
            format!(
                "pod discovery needs the Kubernetes API (in-cluster config or a kubeconfig): {e}"
            )
        })?,
    };
    let namespace = k
        .namespace
        .clone()
        .unwrap_or_else(|| client.default_namespace().to_string());
    let (selector, target_ports) = match &k.pool {
        PoolRef::InferencePool(name) => {
            kvgate_k8s::watch::read_pool(client.clone(), &namespace, name).await?
        }
        PoolRef::Selector {
            selector,
            target_ports,
        } => (selector.clone(), target_ports.clone()),
    };
    tracing::info!(
        namespace,
        ?selector,
        ?target_ports,
        "discovering workers from pods"
    );
    let pool = kvgate_k8s::discovery::PoolConfig {
        selector,
        target_ports,
        block_size: k.block_size,
        kv_events_port: k.kv_events_port,
    };
    service.set_unready_grace(k.unready_grace);
    // Weak: discovery must not keep the service alive.
    let me = Arc::downgrade(service);
    let mut ready = Some(ready);
    let on_update = move |endpoints: Vec<kvgate_wire::workers::WorkerEntry>,
                          skipped: Vec<kvgate_k8s::discovery::Skipped>| {
        let Some(me) = me.upgrade() else {
            return false;
        };
        tracing::info!(
            endpoints = endpoints.len(),
            left_out = skipped.len(),
            "pool membership changed"
        );
        me.set_workers(endpoints);
        if let Some(r) = ready.take() {
            let _ = r.send(());
        }
        true
    };
    match &k.pool {
        // Follow the pool too: the operator rewrites its selector when the graph changes.
        PoolRef::InferencePool(name) => {
            let name = name.clone();
            let initial = (pool.selector.clone(), pool.target_ports.clone());
            tokio::spawn(async move {
                kvgate_k8s::watch::watch_pool_pods(
                    client, &namespace, &name, initial, pool, on_update,
                )
                .await;
            });
        }
        PoolRef::Selector { .. } => {
            tokio::spawn(async move {
                kvgate_k8s::watch::watch_pods(client, &namespace, pool, on_update).await;
            });
        }
    }
    Ok(())
}

/// Where the servers listen (useful with port 0).
#[derive(Clone, Copy, Debug)]
pub struct Bound {
    pub grpc: SocketAddr,
    pub health: SocketAddr,
    pub metrics: SocketAddr,
}

struct Epp {
    shared: Arc<Shared>,
}

type ProcessStream = Pin<Box<dyn Stream<Item = Result<ProcessingResponse, tonic::Status>> + Send>>;

#[tonic::async_trait]
impl ExternalProcessor for Epp {
    type ProcessStream = ProcessStream;

    async fn process(
        &self,
        request: tonic::Request<tonic::Streaming<ProcessingRequest>>,
    ) -> Result<tonic::Response<Self::ProcessStream>, tonic::Status> {
        // Envoy, with tracing on, gives the ext_proc call a span of its own and sends its
        // context in the gRPC metadata: the EPP's spans hang under it.
        let trace = kvgate_runtime::telemetry::TraceHeaders::from_pairs(
            ["traceparent", "tracestate"]
                .into_iter()
                .filter_map(|k| request.metadata().get(k)?.to_str().ok().map(|v| (k, v))),
        );
        let inbound = request.into_inner();
        Ok(tonic::Response::new(Box::pin(stream::responses(
            self.shared.clone(),
            inbound,
            trace,
        ))))
    }
}

/// Runs ext_proc message sequences through the EPP's stream state machine in-process, with no
/// gRPC and no network: what the fuzz targets (`crates/kvgate-fuzz`) drive. Not a stable API.
#[doc(hidden)]
pub mod fuzzing {
    use super::*;
    pub use envoy_types::pb::envoy::service::ext_proc::v3::{
        ProcessingRequest, ProcessingResponse,
    };

    pub struct Harness {
        shared: Arc<Shared>,
    }

    impl Harness {
        /// An EPP over `workers` (a workers file's text), default router settings, the default
        /// tokenizer, a 1 MiB body limit.
        pub fn new(workers: &str) -> Result<Self, String> {
            let mut file = WorkersFile::parse(workers).map_err(|e| e.to_string())?;
            // The service starts empty and is given the workers, as discovery does.
            let entries = std::mem::take(&mut file.workers);
            let service = RoutingService::new(file, RouterConfig::default(), None, 16)?;
            // Workers with `kv_events` would subscribe: call inside a Tokio runtime then.
            service.set_workers(entries);
            Ok(Self {
                shared: Arc::new(Shared {
                    service,
                    settings: StreamSettings {
                        max_request_body_bytes: 1 << 20,
                        max_endpoints: 1,
                        tokenize_timeout: Duration::from_secs(5),
                        accept_token_data: true,
                        enforce_disagg: false,
                    },
                    metrics: Arc::new(Metrics::new("fuzz")),
                    next_id: AtomicU64::new(1),
                    prepare_slots: Arc::new(tokio::sync::Semaphore::new(2)),
                }),
            })
        }

        /// One stream: the answers, in order.
        pub async fn run(&self, messages: Vec<ProcessingRequest>) -> Vec<ProcessingResponse> {
            stream::run_messages(self.shared.clone(), messages).await
        }

        /// Requests booked as in flight (0 once every stream has ended).
        pub fn bookings(&self) -> usize {
            let d = self.shared.service.load_dump();
            let n = |k: &str| d["bookings"][k].as_u64().unwrap_or(0) as usize;
            n("own") + n("peers")
        }

        pub fn streams_active(&self) -> i64 {
            self.shared
                .metrics
                .streams_active
                .load(std::sync::atomic::Ordering::Relaxed)
        }
    }
}

const EXT_PROC_SERVICE: &str = "envoy.service.ext_proc.v3.ExternalProcessor";

async fn bind(host: &str, port: u16, what: &str) -> Result<TcpListener, String> {
    TcpListener::bind((host, port))
        .await
        .map_err(|e| format!("cannot listen on {host}:{port} ({what}): {e}"))
}

/// Starts the EPP and runs until a server fails. `on_bound` gets the listening addresses.
pub async fn serve(config: EppConfig, on_bound: impl FnOnce(Bound)) -> Result<(), String> {
    // Dynamo discovery: the model and block size come from what the workers register, so the
    // first workers are awaited before anything else starts.
    let mut dynamo_first = None;
    let file = match &config.workers {
        WorkerSource::Dynamo(d) => {
            let first = kvgate_runtime::dynamo_discovery::first(d).await;
            let file = WorkersFile {
                model: first.model.clone().unwrap_or_default(),
                block_size: first.block_size.unwrap_or(d.block_size.unwrap_or(16)),
                tokenizer: None,
                workers: Vec::new(),
            };
            tracing::info!(model = %file.model, block_size = file.block_size, workers = first.workers.len(), store = %d.store, "Dynamo workers discovered");
            dynamo_first = Some(first);
            file
        }
        WorkerSource::File(path) => WorkersFile::load(path).map_err(|e| e.to_string())?,
        WorkerSource::Kubernetes(k) => WorkersFile {
            model: k.model.clone(),
            block_size: k.block_size,
            tokenizer: None,
            workers: Vec::new(),
        },
    };
    let service = RoutingService::new(
        file,
        config.router.clone(),
        config.tokenizer.as_deref(),
        config.decision_log,
    )?;
    // Ready once the workers are known: at once from a file, after the first pod list otherwise.
    let (workers_ready, workers_known) = tokio::sync::oneshot::channel();
    match &config.workers {
        WorkerSource::File(path) => {
            service.start_with(path.clone(), config.event_plane.clone());
            let _ = workers_ready.send(());
        }
        WorkerSource::Kubernetes(k) => {
            service.start_external(config.event_plane.clone());
            start_discovery(k, &service, workers_ready).await?;
        }
        WorkerSource::Dynamo(d) => {
            service.start_external(config.event_plane.clone());
            if let Some(first) = dynamo_first.take() {
                service.set_workers(first.workers);
            }
            let _ = workers_ready.send(());
            // Pinned to what the first workers registered: a later card with another model
            // or block size is left out, not adopted.
            let mut d = d.clone();
            let current = service.workers().current();
            d.model = Some(current.model.clone());
            d.block_size = Some(current.block_size);
            let me = Arc::downgrade(&service);
            tokio::spawn(kvgate_runtime::dynamo_discovery::follow(d, move |found| {
                let Some(me) = me.upgrade() else {
                    return false;
                };
                me.set_workers(found.workers);
                true
            }));
        }
    }
    let replica = config
        .replica_sync
        .clone()
        .map(|cfg| service.start_replica_sync(cfg));
    let metrics = Arc::new(Metrics::new(&config.pool_name));
    let shared = Arc::new(Shared {
        service: service.clone(),
        settings: StreamSettings {
            max_request_body_bytes: config.max_request_body_bytes,
            max_endpoints: config.max_endpoints,
            tokenize_timeout: config.tokenize_timeout,
            accept_token_data: config.accept_token_data,
            enforce_disagg: config.router.enforce_disagg,
        },
        metrics: metrics.clone(),
        next_id: AtomicU64::new(1),
        prepare_slots: Arc::new(tokio::sync::Semaphore::new(
            2 * std::thread::available_parallelism().map_or(2, |n| n.get()),
        )),
    });
    let tls = if config.secure_serving {
        let tls = tls::ReloadingTls::new(config.cert_path.as_deref(), config.client_ca.as_deref())?;
        tls.watch(Duration::from_secs(2));
        Some(tls)
    } else {
        if config.client_ca.is_some() {
            return Err(
                "--client-ca needs TLS; it cannot be used with --secure-serving=false".into(),
            );
        }
        None
    };

    let grpc = bind(&config.host, config.grpc_port, "ext_proc gRPC").await?;
    let health = bind(&config.host, config.health_port, "gRPC health").await?;
    let metrics_l = bind(&config.host, config.metrics_port, "metrics").await?;
    let bound = Bound {
        grpc: grpc.local_addr().map_err(|e| e.to_string())?,
        health: health.local_addr().map_err(|e| e.to_string())?,
        metrics: metrics_l.local_addr().map_err(|e| e.to_string())?,
    };

    // Ready when the workers are known and, with replica sync, the other replicas' load has
    // been fetched.
    let (reporter, health_service) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("liveness", tonic_health::ServingStatus::Serving)
        .await;
    let ready_names = ["", EXT_PROC_SERVICE, "readiness"];
    let ready_now = matches!(config.workers, WorkerSource::File(_)) && replica.is_none();
    for name in ready_names {
        let status = if ready_now {
            tonic_health::ServingStatus::Serving
        } else {
            tonic_health::ServingStatus::NotServing
        };
        reporter.set_service_status(name, status).await;
    }
    tokio::spawn(async move {
        if ready_now {
            return;
        }
        if workers_known.await.is_err() {
            return;
        }
        if let Some(sync) = replica {
            sync.ready().await;
        }
        for name in ready_names {
            reporter
                .set_service_status(name, tonic_health::ServingStatus::Serving)
                .await;
        }
    });
    let epp = ExternalProcessorServer::new(Epp { shared })
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20);

    let grpc_server = {
        let health_service = health_service.clone();
        async move {
            match tls {
                Some(tls) => {
                    let incoming = tls_incoming(grpc, tls);
                    grpc_builder()
                        .add_service(health_service)
                        .add_service(epp)
                        .serve_with_incoming(incoming)
                        .await
                }
                None => {
                    grpc_builder()
                        .add_service(health_service)
                        .add_service(epp)
                        .serve_with_incoming(plain_incoming(grpc))
                        .await
                }
            }
            .map_err(|e| format!("ext_proc server: {e}"))
        }
    };
    let health_server = async move {
        tonic::transport::Server::builder()
            .add_service(health_service)
            .serve_with_incoming(plain_incoming(health))
            .await
            .map_err(|e| format!("health server: {e}"))
    };
    let app = metrics::app(MetricsState {
        metrics,
        service: service.clone(),
    });
    let metrics_server = async move {
        axum::serve(metrics_l, app)
            .await
            .map_err(|e| format!("metrics server: {e}"))
    };
    on_bound(bound);
    tokio::try_join!(grpc_server, health_server, metrics_server).map(|_| ())
}

/// HTTP/2 settings for the ext_proc port. Request bodies arrive as a burst of chunks on one
/// stream: with h2's default 64 KiB stream window, a large prompt would wait on window updates
/// (a round trip each), so the windows are sized for multi-megabyte prompts.
fn grpc_builder() -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .initial_stream_window_size(Some(16 << 20))
        .initial_connection_window_size(Some(64 << 20))
        .max_concurrent_streams(None)
        // Every client abort makes Envoy reset its ext_proc stream, often before this server
        // has accepted it. h2's rapid-reset guard answers more than 20 such pending resets with
        // a GOAWAY, which fails every request in flight on the connection (Envoy answers them
        // 500): an abort burst under CPU load did exactly that in `kvgate bench abuse`. The
        // port's one client is the gateway, so the guard is set far above any abort burst.
        .http2_max_pending_accept_reset_streams(Some(100_000))
        // A gateway that vanished without closing must not hold streams (and bodies) forever.
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
}

fn accepted(stream: TcpStream) -> TcpStream {
    // Small gRPC frames each way per request: do not let Nagle hold them.
    let _ = stream.set_nodelay(true);
    stream
}

fn plain_incoming(listener: TcpListener) -> impl Stream<Item = Result<TcpStream, std::io::Error>> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((s, _)) => {
                    if tx.send(Ok(accepted(s))).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    });
    ReceiverStream::new(rx)
}

/// Accepts TCP connections and completes TLS handshakes concurrently (a slow or hostile client
/// cannot stall the others), yielding the finished streams.
fn tls_incoming(
    listener: TcpListener,
    tls: Arc<tls::ReloadingTls>,
) -> impl Stream<Item = Result<tokio_rustls::server::TlsStream<TcpStream>, std::io::Error>> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let (s, peer) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            // The configuration current now: rotated certificates apply to new connections.
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.config());
            let tx = tx.clone();
            tokio::spawn(async move {
                let hs =
                    tokio::time::timeout(Duration::from_secs(10), acceptor.accept(accepted(s)));
                match hs.await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(tls)).await;
                    }
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}
