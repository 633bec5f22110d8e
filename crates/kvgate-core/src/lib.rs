//! kvgate's routing core, free of I/O: no async runtime, no sockets, no clock reads (time is a
//! parameter), no global state. Adapters (ext_proc, HTTP, NATS, ZMQ, Kubernetes) wrap it.
//!
//! - [`hashing`]: tokens to block hashes, identical to Dynamo and vLLM-compatible engines.
//! - [`index`]: the prefix index fed by KV events ([`sharded`]: split by worker for threads);
//!   [`sequencer`] orders those events.
//! - [`load`]: in-flight requests per worker (prefill tokens, active blocks, output blocks).
//! - [`predicted`]: the approximate index used without KV events (routing decisions with a TTL).
//! - [`latency`]: kvgate's policy: predicted time to first token, learned prefill rate.
//! - [`scheduler`]: the cost function, selection, temperature, admission and explanations.
//! - [`router`]: all of the above behind one type that books and frees requests.
//! - [`replica`]: router replicas sharing their bookings (messages, gaps, states).
//! - [`incarnation`]: engine restarts seen in the event stream; [`snapshot`]: the index snapshot format.
//! - [`config`]: the router's knobs, validated, with Dynamo's names and defaults.

mod blockmap;
pub mod config;
pub mod envelope;
pub mod events;
pub mod fasthash;
pub mod hashing;
pub mod herding;
mod holders;
pub mod ids;
pub mod incarnation;
pub mod index;
pub mod latency;
pub mod load;
mod orphans;
pub mod predicted;
pub mod random;
pub mod replica;
pub mod router;
pub mod scheduler;
pub mod sequencer;
pub mod sharded;
pub mod snapshot;
pub mod worker_id;

pub use events::{KvEvent, KvEventData, StoredBlock};
pub use ids::{
    DpRank, ExternalHash, LocalHash, RequestId, SeqHash, StorageTier, WorkerId, WorkerRank,
};
