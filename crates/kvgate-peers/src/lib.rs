//! Parity checks and side-by-side benchmarks against peer routers (`dynamo-kv-router`, later
//! `kv-index`). Peers are dev-dependencies of this crate only: the product never links them.
