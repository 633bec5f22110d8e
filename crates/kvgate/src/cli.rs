//! Command-line interface: subcommands and their small handlers.

use crate::router_args::RouterArgs;
use clap::{Parser, Subcommand};
use kvgate_core::hashing::{BlockHashes, HashSeed};
use kvgate_core::worker_id::worker_id_for_pod;
use std::fmt;

#[derive(Parser, Debug)]
#[command(
    name = "kvgate",
    version,
    about = "KV-cache-aware request router for LLM inference"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Print the block hashes of a token sequence, as Dynamo and the engines compute them.
    ///
    /// Output: one JSON object {"local":[...],"sequence":[...]} of decimal u64s, one entry per
    /// complete block (a trailing partial block has no hash).
    Hash(HashArgs),
    /// Print the Dynamo worker instance id derived from a Kubernetes pod name.
    WorkerId {
        /// The pod name.
        name: String,
    },
    /// Validate the router configuration (env vars and flags) and print it with every knob.
    Config(Box<RouterArgs>),
    /// Run a simulated inference engine (OpenAI API, paged prefix cache, KV events).
    Mocker(Box<crate::mocker_args::MockerArgs>),
    /// Run the endpoint picker: an Envoy ext_proc server that routes on KV cache overlap and load.
    Epp(Box<crate::epp_args::EppArgs>),
    /// Run the OpenAI-compatible frontend (EPP sidecar, in-process KV router, or a baseline).
    Frontend(Box<FrontendArgs>),
    /// Benchmarks that start real processes and print figures.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// The local demo: mock workers, round-robin vs the KV router on trace conversations, results.
    Demo(Box<kvgate_bench::demo::DemoArgs>),
    /// Print the Kubernetes objects for a DynamoGraphDeployment's EPP (Service, InferencePool,
    /// Istio DestinationRule with --service-mesh) as YAML, without a cluster.
    Render(Box<crate::render_args::RenderArgs>),
    /// Run the Kubernetes operator: for every DynamoGraphDeployment with an EPP component, keep
    /// its EPP Service, InferencePool and (service mesh on) Istio DestinationRule in sync.
    Operator(Box<crate::operator_args::OperatorArgs>),
}

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// What the EPP adds: Envoy+EPP vs Envoy straight to one worker, side by side, at 2k/8k/50k
    /// token prompts and multi-turn 8k conversations (added latency p50/p99, EPP CPU/request).
    Epp(Box<kvgate_bench::epp::BenchEppArgs>),
    /// Hostile traffic at every port of a real deployment (aborted streams, slow-loris, oversized
    /// bodies, unknown models, a KV event flood, a garbage replica-sync peer) with well-formed
    /// requests alongside: panics, leaked bookings, EPP memory growth, failed good requests.
    Abuse(Box<kvgate_bench::abuse::BenchAbuseArgs>),
    /// Several EPP replicas behind one real Envoy, through failures: one SIGKILLed and
    /// restarted, NATS restarted, every replica down (fail-open), all back; hit rate and TTFT
    /// per phase against one replica, failed requests, leaked bookings.
    Ha(Box<kvgate_bench::ha::BenchHaArgs>),
    /// Aggregated vs disaggregated prefill/decode on the same simulated engines and trace,
    /// through Envoy + EPP + sidecars (TTFT, end-to-end latency, throughput).
    Disagg(Box<kvgate_bench::disagg::BenchDisaggArgs>),
    /// KV events applied per second: decoding, the index, NATS JetStream and vLLM ZMQ paths.
    Events(Box<kvgate_bench::events::BenchEventsArgs>),
    /// Index snapshots at scale (1M blocks): size, encode, object store put/get, and restore
    /// time and memory peak in a fresh process.
    Snapshot(Box<kvgate_bench::snapshot::BenchSnapshotArgs>),
    /// The router at 1,000 and 10,000 worker ranks: decision time, memory per rank, and the
    /// cost of a workers-file reload and of a discovery update.
    Fleet(Box<kvgate_bench::fleet::BenchFleetArgs>),
    /// Routing quality in virtual time: every policy replays the same trace on the same
    /// simulated fleet (hit rate vs the reuse bound, TTFT, ITL, e2e, throughput, imbalance).
    Replay(Box<kvgate_bench::replay::BenchReplayArgs>),
    /// Writes a seeded Mooncake-format trace of another shape: agent loops, short chats, huge
    /// documents (for `bench replay --trace`).
    GenTrace(kvgate_bench::gen_trace::GenTraceArgs),
    /// kvgate's prefix index vs dynamo-kv-router's and kv-index's on identical trace streams.
    /// The peers are never linked into kvgate: this runs `cargo bench -p kvgate-peers --bench
    /// indexer` in the source tree kvgate was built from.
    Indexer(kvgate_bench::all::BenchIndexerArgs),
    /// Every benchmark in turn (each in its own process), one markdown report in bench/results/.
    All(Box<kvgate_bench::all::BenchAllArgs>),
    /// (internal) the do-nothing ext_proc picker `bench epp` uses to measure the protocol floor.
    #[command(hide = true)]
    EchoPicker(kvgate_bench::epp::EchoPickerArgs),
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum ModeArg {
    /// Route exactly where the EPP's x-dynamo-* headers say (the worker-pod sidecar).
    Direct,
    /// Route with the in-process KV router.
    Kv,
    RoundRobin,
    Random,
}

#[derive(clap::Args, Debug)]
pub struct FrontendArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (8000 is the pod port an InferencePool targets; 0 picks a free one).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// The workers file (YAML; reloaded when it changes).
    #[arg(long)]
    pub workers: std::path::PathBuf,
    #[arg(long, value_enum, default_value = "kv")]
    pub router_mode: ModeArg,
    /// Routing tokenizer for kv mode (tokenizer.json or its directory); default: the workers
    /// file's `tokenizer`, else the embedded one.
    #[arg(long)]
    pub tokenizer: Option<std::path::PathBuf>,
    /// Largest accepted request body (413 above).
    #[arg(long, default_value_t = 32 << 20)]
    pub max_request_body_bytes: usize,
    /// kv mode, tokens in: route a request that carries `nvext.token_data` on those ids
    /// (checked against the vocabulary) instead of tokenizing it.
    #[arg(long, env = "KVGATE_ACCEPT_TOKEN_DATA", default_value_t = true, action = clap::ArgAction::Set)]
    pub accept_token_data: bool,
    /// Seconds a worker may take to start answering before the client gets 504.
    #[arg(long, default_value_t = 60.0)]
    pub request_timeout_secs: f64,
    #[command(flatten)]
    pub router: RouterArgs,
    #[command(flatten)]
    pub events: crate::event_plane_args::EventPlaneArgs,
}

#[derive(clap::Args, Debug)]
pub struct HashArgs {
    /// Tokens per KV block (must equal the engines' block size).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1_048_576))]
    pub block_size: u32,
    /// LoRA adapter name, mixed into the seed (empty = none).
    #[arg(long)]
    pub lora: Option<String>,
    /// Cache salt / namespace, mixed into the seed (empty = none).
    #[arg(long)]
    pub salt: Option<String>,
    /// Comma-separated u32 token ids, e.g. `1,2,3,4`.
    #[arg(long, value_parser = parse_tokens, allow_hyphen_values = true)]
    pub tokens: Tokens,
}

#[derive(Clone, Debug)]
pub struct Tokens(pub Vec<u32>);

fn parse_tokens(s: &str) -> Result<Tokens, String> {
    let s = s.trim();
    if s.is_empty() {
        return Ok(Tokens(Vec::new()));
    }
    s.split(',')
        .enumerate()
        .map(|(i, t)| {
            let t = t.trim();
            t.parse::<u32>().map_err(|_| {
                format!(
                    "token #{} ({t:?}) is not an integer in 0..=4294967295",
                    i + 1
                )
            })
        })
        .collect::<Result<Vec<u32>, String>>()
        .map(Tokens)
}

#[derive(Debug)]
pub struct CliError(String);

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for CliError {}

pub fn run(cli: Cli) -> Result<(), CliError> {
    match cli.command {
        Command::Hash(args) => {
            println!("{}", hash_json(&args));
            Ok(())
        }
        Command::WorkerId { name } => {
            println!("{}", worker_id_for_pod(&name).0);
            Ok(())
        }
        Command::Config(args) => {
            let config = args.to_config().map_err(|e| CliError(e.to_string()))?;
            println!("{}", crate::router_args::describe(&config));
            Ok(())
        }
        Command::Frontend(args) => {
            let router = args
                .router
                .to_config()
                .map_err(|e| CliError(e.to_string()))?;
            if !(args.request_timeout_secs.is_finite() && args.request_timeout_secs > 0.0) {
                return Err(CliError("--request-timeout-secs must be > 0".into()));
            }
            let replica_sync = args
                .events
                .replica_sync(router.replica_sync && matches!(args.router_mode, ModeArg::Kv))
                .map_err(CliError)?;
            let config = kvgate_frontend::FrontendConfig {
                host: args.host.clone(),
                port: args.port,
                workers_file: args.workers.clone(),
                mode: match args.router_mode {
                    ModeArg::Direct => kvgate_frontend::RouterMode::Direct,
                    ModeArg::Kv => kvgate_frontend::RouterMode::Kv,
                    ModeArg::RoundRobin => kvgate_frontend::RouterMode::RoundRobin,
                    ModeArg::Random => kvgate_frontend::RouterMode::Random,
                },
                router,
                tokenizer: args.tokenizer.clone(),
                max_body_bytes: args.max_request_body_bytes,
                accept_token_data: args.accept_token_data,
                request_timeout: std::time::Duration::from_secs_f64(args.request_timeout_secs),
                event_plane: args.events.router_plane().map_err(CliError)?,
                replica_sync,
            };
            serve(
                "kvgate-frontend",
                kvgate_frontend::serve(config, |addr| {
                    println!("kvgate frontend listening on http://{addr}");
                }),
            )
        }
        Command::Epp(args) => {
            let config = args.to_config().map_err(CliError)?;
            let tls = if config.secure_serving {
                "TLS"
            } else {
                "plaintext h2c"
            };
            serve(
                "kvgate-epp",
                kvgate_epp::serve(config, |b| {
                    println!("kvgate epp ext_proc gRPC ({tls}) on grpc://{}", b.grpc);
                    println!("kvgate epp gRPC health on grpc://{}", b.health);
                    println!("kvgate epp metrics on http://{}", b.metrics);
                }),
            )
        }
        Command::Bench(BenchCommand::EchoPicker(args)) => runtime()?
            .block_on(kvgate_bench::epp::run_echo_picker(args))
            .map_err(CliError),
        Command::Render(args) => {
            let yaml = crate::render_args::run(&args).map_err(CliError)?;
            print!("{yaml}");
            Ok(())
        }
        Command::Operator(args) => serve("kvgate-operator", crate::operator_args::run(&args)),
        Command::Bench(BenchCommand::Indexer(args)) => {
            kvgate_bench::all::run_indexer(args).map_err(CliError)
        }
        Command::Bench(BenchCommand::All(args)) => {
            kvgate_bench::all::run_all(*args).map_err(CliError)
        }
        Command::Bench(BenchCommand::Replay(args)) => {
            kvgate_bench::replay::run(*args).map_err(CliError)
        }
        Command::Bench(BenchCommand::GenTrace(args)) => {
            kvgate_bench::gen_trace::run(&args).map_err(CliError)
        }
        Command::Bench(BenchCommand::Fleet(args)) => {
            kvgate_bench::fleet::run(*args).map_err(CliError)
        }
        Command::Bench(BenchCommand::Snapshot(args)) => {
            kvgate_bench::snapshot::run(*args).map_err(CliError)
        }
        Command::Bench(BenchCommand::Events(args)) => quiet_runtime()?
            .block_on(kvgate_bench::events::run(*args))
            .map_err(CliError),
        Command::Bench(BenchCommand::Disagg(args)) => quiet_runtime()?
            .block_on(kvgate_bench::disagg::run(*args))
            .map_err(CliError),
        Command::Bench(BenchCommand::Ha(args)) => quiet_runtime()?
            .block_on(kvgate_bench::ha::run(*args))
            .map_err(CliError),
        Command::Bench(BenchCommand::Abuse(args)) => quiet_runtime()?
            .block_on(kvgate_bench::abuse::run(*args))
            .map_err(CliError),
        Command::Bench(BenchCommand::Epp(args)) => runtime()?
            .block_on(kvgate_bench::epp::run(*args))
            .map_err(CliError),
        Command::Demo(args) => runtime()?
            .block_on(kvgate_bench::demo::run(*args))
            .map_err(CliError),
        Command::Mocker(args) => {
            let config = args.to_config().map_err(CliError)?;
            let nats = config
                .nats_kv_events
                .as_ref()
                .map(|n| format!("{} subject {}", n.url, n.endpoint_subject()));
            serve(
                "kvgate-mocker",
                kvgate_mocker::serve(config, |addr, zmq, replay| {
                    println!("kvgate mocker listening on http://{addr}");
                    for ep in zmq {
                        println!("kvgate mocker publishing KV events on {ep}");
                    }
                    for ep in replay {
                        println!("kvgate mocker replaying KV events on {ep}");
                    }
                    if let Some(n) = nats {
                        println!("kvgate mocker publishing KV events to NATS {n}");
                    }
                }),
            )
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, CliError> {
    init_tracing("info", None);
    build_runtime()
}

/// Runs a server to its end with logs on stderr and, when the `OTEL_*` variables ask for
/// them, traces exported as `service`; queued spans are flushed before the runtime stops.
fn serve<T>(
    service: &str,
    server: impl std::future::Future<Output = Result<T, String>>,
) -> Result<(), CliError> {
    let rt = build_runtime()?;
    let otel = {
        let _in_runtime = rt.enter();
        kvgate_runtime::telemetry::layer(service).map_err(CliError)?
    };
    init_tracing("info", otel);
    let out = rt.block_on(server);
    kvgate_runtime::telemetry::shutdown();
    out.map(|_| ()).map_err(CliError)
}

/// For commands that run servers in-process and print a report: warnings only, unless
/// RUST_LOG says otherwise.
fn quiet_runtime() -> Result<tokio::runtime::Runtime, CliError> {
    init_tracing("warn", None);
    build_runtime()
}

fn build_runtime() -> Result<tokio::runtime::Runtime, CliError> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError(format!("cannot start the async runtime: {e}")))
}

type OtelLayer = tracing_opentelemetry::OpenTelemetryLayer<
    tracing_subscriber::Registry,
    opentelemetry_sdk::trace::Tracer,
>;

/// Logs go to stderr filtered by `RUST_LOG` (else `default`); spans, when exported, are
/// kvgate's own at INFO and above whatever the log filter says.
fn init_tracing(default: &str, otel: Option<OtelLayer>) {
    use tracing_subscriber::Layer as _;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let spans =
        tracing_subscriber::filter::Targets::new().with_target("kvgate", tracing::Level::INFO);
    let _ = tracing_subscriber::registry()
        .with(otel.map(|l| l.with_filter(spans)))
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_filter(filter),
        )
        .try_init();
}

pub fn hash_json(args: &HashArgs) -> String {
    let seed = HashSeed::new(args.lora.as_deref(), args.salt.as_deref());
    let h = BlockHashes::from_tokens(&args.tokens.0, args.block_size as usize, seed);
    serde_json::json!({
        "local": h.locals().iter().map(|l| l.0).collect::<Vec<u64>>(),
        "sequence": h.seqs().iter().map(|s| s.0).collect::<Vec<u64>>(),
    })
    .to_string()
}
