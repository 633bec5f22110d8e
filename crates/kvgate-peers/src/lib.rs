//! Parity checks and side-by-side benchmarks against peer routers (`dynamo-kv-router`,
//! `kv-index`; `benches/indexer.rs` compares the prefix indexes). Peers are dev-dependencies of
//! this crate only: the product never links them.
