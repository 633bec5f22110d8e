//! `kvgate frontend`: an OpenAI-compatible HTTP server in front of engine workers.
//!
//! - `direct`: the worker-pod sidecar behind the EPP. Routes exactly where `x-dynamo-*` headers
//!   say, never re-routes, refuses requests without a worker id.
//! - `kv`: tokenizes and routes with the in-process router (the same core the EPP uses), books
//!   load, marks prefill complete at the first response byte and frees at the end or on
//!   disconnect; follows the workers' caches through their ZMQ KV events.
//! - `round-robin`, `random`: baselines.

pub mod server;

pub use server::{FrontendConfig, RouterMode, serve};
