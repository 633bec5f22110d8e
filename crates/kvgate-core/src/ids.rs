//! Identities used throughout the router: workers, data-parallel ranks, block hashes, requests.
//!
//! Block hashes come in three kinds that must never be mixed up, hence three newtypes:
//! - [`LocalHash`]: hash of one block's tokens alone (seeded by LoRA / salt), what the router computes.
//! - [`SeqHash`]: chained hash naming a block *and its whole prefix*; the prefix index's key.
//! - [`ExternalHash`]: the engine's own name for a block, as carried by KV events.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::sync::Arc;

/// A worker (engine instance) id, as Dynamo names instances: a decimal u64.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct WorkerId(pub u64);

/// A data-parallel rank inside one worker; each rank has its own KV cache and load.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct DpRank(pub u32);

/// One routing target: a worker and one of its data-parallel ranks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct WorkerRank {
    pub worker: WorkerId,
    pub dp_rank: DpRank,
}

impl WorkerRank {
    pub const fn new(worker: u64, dp_rank: u32) -> Self {
        Self {
            worker: WorkerId(worker),
            dp_rank: DpRank(dp_rank),
        }
    }
}

impl fmt::Display for WorkerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl fmt::Display for WorkerRank {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.worker.0, self.dp_rank.0)
    }
}

macro_rules! hash_newtype {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub u64);
    };
}

hash_newtype!(
    /// Hash of one complete block's tokens (XXH3-64 of their little-endian bytes, LoRA/salt seeded).
    LocalHash
);
hash_newtype!(
    /// Chained hash of a block and every block before it; equal iff the whole prefix is equal.
    SeqHash
);
hash_newtype!(
    /// The engine's own block hash from KV events (vLLM: low 64 bits, reinterpreted as unsigned).
    ExternalHash
);

/// A request id as the caller knows it (e.g. `x-request-id`); cheap to clone.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId(Arc<str>);

impl RequestId {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl From<&str> for RequestId {
    fn from(s: &str) -> Self {
        Self(Arc::from(s))
    }
}

impl From<String> for RequestId {
    fn from(s: String) -> Self {
        Self(Arc::from(s))
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where a cached block lives. Only `Device` blocks earn overlap credit in the cost function;
/// the others are reported so that callers can see what could be onboarded.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum StorageTier {
    #[default]
    Device,
    HostPinned,
    Disk,
    External,
}

impl StorageTier {
    pub const ALL: [StorageTier; 4] = [
        StorageTier::Device,
        StorageTier::HostPinned,
        StorageTier::Disk,
        StorageTier::External,
    ];

    pub const fn index(self) -> usize {
        match self {
            StorageTier::Device => 0,
            StorageTier::HostPinned => 1,
            StorageTier::Disk => 2,
            StorageTier::External => 3,
        }
    }

    pub const fn from_index(i: usize) -> Self {
        match i & 3 {
            0 => StorageTier::Device,
            1 => StorageTier::HostPinned,
            2 => StorageTier::Disk,
            _ => StorageTier::External,
        }
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            StorageTier::Device => "device",
            StorageTier::HostPinned => "host_pinned",
            StorageTier::Disk => "disk",
            StorageTier::External => "external",
        }
    }
}
