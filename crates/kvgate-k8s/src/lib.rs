//! Kubernetes for kvgate:
//! - [`pool`]: the `InferencePool` type (Gateway API Inference Extension, `v1`);
//! - [`dgd`]: the subset of Dynamo's `DynamoGraphDeployment` that says which graph has an EPP;
//! - [`render`]: the EPP Service, `InferencePool` and Istio `DestinationRule` for a graph, as
//!   `kvgate render` prints them;
//! - [`schema`]: checks objects against a CRD's OpenAPI v3 schema (what the API server would
//!   refuse or prune), used by the tests on every object kvgate renders;
//! - [`discovery`] (pods to endpoints, sans-IO) and [`watch`] (the kube-rs watcher around it):
//!   the EPP's pod discovery;
//! - [`operator`] (what to apply, delete and report for a graph, sans-IO) and [`controller`]
//!   (the kube-rs controller around it): `kvgate operator`;
//! - [`lease`] (leader election over a Lease, sans-IO) and [`election`] (its kube-rs reads and
//!   writes): one active `kvgate operator` among several copies.

pub mod controller;
pub mod dgd;
pub mod discovery;
pub mod election;
pub mod lease;
pub mod meta;
pub mod operator;
pub mod pool;
pub mod render;
pub mod schema;
pub mod watch;

pub use dgd::DynamoGraphDeployment;
pub use pool::InferencePool;
pub use render::{
    RenderError, RenderOptions, Rendered, ServiceMesh, TlsMode, parse_dgd, parse_dgds, render,
};
pub use schema::{CrdSchema, Violation};
