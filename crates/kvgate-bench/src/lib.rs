//! kvgate's benchmark drivers and the local demo, as a library the `kvgate` CLI calls.
//!
//! Each module owns one subcommand, its arguments (`clap::Args`) and its report:
//! - [`demo`]: `kvgate demo`, mock workers + router + a workload, round robin against KV routing;
//! - [`epp`]: `kvgate bench epp`, what the EPP adds behind a real Envoy, sequential and concurrent;
//! - [`fleet`]: `kvgate bench fleet`, decision time, memory and reload cost at 1,000–10,000 ranks;
//! - [`ha`]: `kvgate bench ha`, EPP replicas behind a real Envoy through kills and restarts;
//! - [`abuse`]: `kvgate bench abuse`, hostile clients against a live gateway;
//! - [`disagg`]: `kvgate bench disagg`, disaggregated prefill/decode through the gateway;
//! - [`events`]: `kvgate bench events`, KV-event ingestion over NATS and ZMQ;
//! - [`replay`] and [`sweep`]: `kvgate bench replay [--sweep]`, policies on a trace in virtual time;
//! - [`replicas`]: `kvgate bench replay --router-replicas N`, N replicas against one router;
//! - [`snapshot`]: `kvgate bench snapshot`, index snapshot size, object store round trip, restore time and memory;
//! - [`gen_trace`]: `kvgate bench gen-trace`, synthetic trace shapes;
//! - [`all`]: `kvgate bench all` and `kvgate bench indexer`, every benchmark into one report.
//!
//! [`procs`] holds what the drivers share: child processes that die with the bench, free
//! ports, Envoy start-up from the shipped configs, and small statistics helpers.
//!
//! Benchmarks that start processes re-execute the current binary (`std::env::current_exe`), so
//! they must be called from the `kvgate` binary.

pub mod abuse;
pub mod all;
pub mod demo;
pub mod disagg;
pub mod epp;
pub mod events;
pub mod fleet;
pub mod gen_trace;
pub mod ha;
pub mod procs;
pub mod replay;
pub mod replicas;
pub mod snapshot;
pub mod sweep;
