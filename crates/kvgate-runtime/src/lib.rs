//! Async glue shared by kvgate's servers (mocker, frontend, EPP):
//! - [`http`]: OpenAI-shaped JSON errors and bounded body reading;
//! - [`prom`]: a small Prometheus text-exposition writer and histogram;
//! - [`workers`]: the live worker set from a workers file, reloaded on change;
//! - [`events`]: KV event ingestion from workers' ZMQ publishers;
//! - [`routing`]: the routing service (router + tokenizer + bookings + decision log) that the
//!   EPP and the kv-mode frontend share;
//! - [`dynamo_discovery`]: workers from Dynamo's own discovery store (file or etcd);
//! - [`nats`]: KV events over NATS / JetStream; [`snapshot`]: index snapshots in a file or a
//!   JetStream object store; [`replica`]: router replica sync over NATS.

pub mod dynamo_discovery;
pub mod etcd;
pub mod events;
pub mod http;
pub mod nats;
pub mod prom;
pub mod replica;
pub mod routing;
pub mod snapshot;
pub mod telemetry;
pub mod workers;
