//! A simulated inference engine that behaves like vLLM from the outside, free of I/O: a paged KV
//! cache with prefix caching and LRU eviction ([`pool`]), continuous batching with chunked prefill
//! ([`engine`]), and a forward-pass timing model ([`timing`]). The same code runs behind the
//! mocker's HTTP server in real time and inside the trace replay in virtual time, so benchmarks
//! and the product cannot disagree about what a cache is.

pub mod engine;
pub mod pool;
pub mod timing;

pub use engine::{
    Engine, EngineConfig, EngineRequest, EngineStats, Finish, Step, SubmitError, TokenOutput,
};
pub use pool::{BlockPool, CacheEvent, CachedBlock, engine_hash};
pub use timing::TimingModel;
