//! The KV event model: what workers tell the router about their caches.
//!
//! Transport formats (Dynamo RouterEvent JSON, vLLM ZMQ msgpack) are decoded into these types at
//! the edges; the prefix index only ever sees this model.

use crate::ids::{ExternalHash, LocalHash, StorageTier, WorkerRank};

/// One block named by a `Stored` event.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct StoredBlock {
    /// The engine's name for the block (what later `Removed` events will name).
    pub hash: ExternalHash,
    /// The hash of the block's tokens alone, as the router computes it.
    pub local: LocalHash,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KvEventData {
    /// A chain of blocks: the first one's parent is `parent` (`None`: it starts a sequence),
    /// each later block's parent is the block before it.
    Stored {
        parent: Option<ExternalHash>,
        blocks: Vec<StoredBlock>,
    },
    Removed {
        blocks: Vec<ExternalHash>,
    },
    /// Every block of this (worker, dp rank) is gone, in every tier.
    Cleared,
}

/// An event from one (worker, dp rank) publisher.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvEvent {
    pub source: WorkerRank,
    /// Monotonic per publisher; a gap means events were lost.
    pub event_id: u64,
    pub tier: StorageTier,
    pub data: KvEventData,
}
