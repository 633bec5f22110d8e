//! `kvgate mocker`: a simulated inference engine that behaves like vLLM from the outside.
//!
//! - OpenAI HTTP API (`/v1/chat/completions`, `/v1/completions` streaming and not, `/v1/models`,
//!   `/health`, `/metrics` with vLLM's metric names); responses report
//!   `usage.prompt_tokens_details.cached_tokens` from the simulated cache and name the serving
//!   worker and rank in `x-kvgate-worker-id` / `x-kvgate-dp-rank`.
//! - One [`kvgate_engine::Engine`] per dp rank, driven in real time ([`driver`]), scaled by
//!   `--speedup-ratio`.
//! - KV events through the [`publisher::EventSink`] seam: vLLM's ZMQ format, or Dynamo 1.6's NATS
//!   event plane; optionally registered in Dynamo's file discovery store
//!   ([`dynamo_discovery`]) so Dynamo's own router reads them.

pub mod driver;
pub mod dynamo_discovery;
pub mod publisher;
pub mod server;

pub use server::{MockerConfig, Role, serve};
