//! Peer adapters shared by the tests and benches of this crate.

pub mod dynamo_selector;
