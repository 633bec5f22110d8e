//! Dynamo's own worker selector (`dynamo-kv-router` 1.6.1, `services::selection::SelectionCore`)
//! behind kvgate-sim's [`Policy`], so a replay drives the real peer rather than kvgate's
//! reimplementation of its cost function.
//!
//! The selector is fed what a Dynamo deployment feeds it: workers registered with their KV
//! capacity and batch budget, the engines' KV events into its own radix-tree indexer, and each
//! request's lifecycle (`select_and_reserve`, `prefill_complete`, `free_reservation`). Prompts
//! go in as the hash-only trio (local block hashes, sequence hashes, input length), which the
//! hash-parity test shows equal to what Dynamo computes from the tokens.
//!
//! The selector is async; a current-thread tokio runtime runs each call to completion, so the
//! simulation stays sequential. KV events are flushed through the indexer before the next
//! selection reads it, as the simulation's own routers see events at once.

#![allow(dead_code)]

use dynamo_kv_router::KvRouterConfig;
use dynamo_kv_router::identity::RoutingPartitionId;
use dynamo_kv_router::indexer::KvIndexerInterface;
use dynamo_kv_router::protocols::{
    ExternalSequenceBlockHash, KvCacheEvent, KvCacheEventData, KvCacheRemoveData, KvCacheStoreData,
    KvCacheStoredBlockData, LocalBlockHash, RouterEvent, RoutingConstraints,
};
use dynamo_kv_router::services::indexer::backend::Indexer;
use dynamo_kv_router::services::selection::{
    PromptRequest, SelectAndReserveRequest, SelectionCacheConfig, SelectionCore, WorkerLifecycle,
    WorkerRequest,
};
use kvgate_engine::CacheEvent;
use kvgate_sim::policy::{Arrival, Policy, WorkerView};
use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;
use tokio_util::sync::CancellationToken;

pub const NAME: &str = "dynamo-selector";
const MODEL: &str = "default";
const GROUP: &str = "default";

/// Worker `i` of the simulation is Dynamo worker `i + 1`, DP rank 0 (as kvgate's `KvRouter`).
pub fn worker_id(i: usize) -> u64 {
    i as u64 + 1
}

pub struct DynamoSelector {
    runtime: tokio::runtime::Runtime,
    core: SelectionCore,
    key: RoutingPartitionId,
    event_id: u64,
    /// Events applied since the indexer was last flushed.
    unflushed: bool,
    open: HashSet<u64>,
    /// Calls the selector refused (each one a failure of the drive, reported by the caller).
    pub errors: Vec<String>,
}

impl DynamoSelector {
    /// Dynamo's selector with `KvRouterConfig::default()`: the router's documented defaults
    /// (credit 1, no credit decay, prefill load scale 1, temperature 0, no queue). Ties are drawn
    /// by the crate's unseeded generator, so two runs may part where costs tie.
    pub fn new(fleet: &[WorkerView], block_size: usize) -> Result<Self, String> {
        Self::with_config(fleet, block_size, KvRouterConfig::default())
    }

    pub fn with_config(
        fleet: &[WorkerView],
        block_size: usize,
        config: KvRouterConfig,
    ) -> Result<Self, String> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("tokio runtime: {e}"))?;
        let block_size = u32::try_from(block_size).map_err(|_| "block size too large")?;
        static INSTANCES: AtomicU64 = AtomicU64::new(0);
        let instance = INSTANCES.fetch_add(1, Ordering::Relaxed);
        let core = runtime.block_on(async {
            let core = SelectionCore::try_new_local(
                config,
                1,
                CancellationToken::new(),
                SelectionCacheConfig::default(),
                std::sync::Arc::new(|config, role, _| {
                    dynamo_kv_router::WorkerSelectionPolicy::reference(
                        config.clone(),
                        role.default_selector_label(),
                    )
                }),
            )
            .map_err(|e| format!("SelectionCore: {e}"))?;
            for (i, w) in fleet.iter().enumerate() {
                core.upsert_worker(WorkerRequest {
                    worker_id: worker_id(i),
                    model_name: MODEL.into(),
                    routing_group: GROUP.into(),
                    endpoint: Some(format!("http://worker-{i}:8000")),
                    // The selector insists on an event source per rank and subscribes to it;
                    // nothing publishes on this path (events are applied below, in order).
                    kv_events_endpoint: Some(format!(
                        "ipc://{}/kvgate-dynamo-selector-{}-{instance}-{i}",
                        std::env::temp_dir().display(),
                        std::process::id()
                    )),
                    block_size: Some(block_size),
                    max_num_batched_tokens: Some(w.max_num_batched_tokens as u64),
                    total_kv_blocks: Some(w.total_kv_blocks as u64),
                    ..WorkerRequest::default()
                })
                .await
                .map_err(|e| format!("upsert worker {i}: {e}"))
                .and_then(|record| {
                    if record.lifecycle == WorkerLifecycle::Schedulable {
                        Ok(())
                    } else {
                        Err(format!(
                            "worker {i} is not schedulable: {:?}",
                            record.not_schedulable_reasons
                        ))
                    }
                })?;
            }
            Ok::<_, String>(core)
        })?;
        Ok(Self {
            runtime,
            core,
            key: RoutingPartitionId::new(MODEL, GROUP),
            event_id: 0,
            unflushed: false,
            open: HashSet::new(),
            errors: Vec::new(),
        })
    }

    fn indexer(&self) -> Option<Indexer> {
        self.core.partition(&self.key).map(|p| p.indexer().clone())
    }

    fn flush(&mut self) {
        if !self.unflushed {
            return;
        }
        self.unflushed = false;
        if let Some(indexer) = self.indexer() {
            self.runtime.block_on(async {
                match &indexer {
                    Indexer::Single { primary, .. } => {
                        primary.flush().await;
                    }
                    Indexer::Concurrent { primary, .. } => {
                        primary.flush().await;
                    }
                    _ => {}
                }
            });
        }
    }

    /// Selects and books a worker for `req`; `Err` carries the selector's refusal.
    pub fn select(&mut self, req: &Arrival<'_>) -> Result<usize, String> {
        // Never on a stale index: the simulation's own routers see each event at once.
        self.flush();
        let request = SelectAndReserveRequest {
            model_name: MODEL.into(),
            routing_group: GROUP.into(),
            selection_id: Some(req.id.to_string()),
            prompt: PromptRequest {
                block_hashes: Some(req.hashes.locals().iter().map(|l| l.0 as i64).collect()),
                sequence_hashes: Some(req.hashes.seqs().iter().map(|s| s.0 as i64).collect()),
                isl_tokens: Some(req.hashes.num_tokens()),
                ..PromptRequest::default()
            },
            router_config_override: None,
            expected_output_tokens: Some(req.max_output_tokens),
            priority_jump: None,
            strict_priority: None,
            session_id: None,
            session_context: None,
            affinity_target: None,
            pinned_worker: None,
            allowed_worker_ids: None,
            routing_constraints: RoutingConstraints::default(),
        };
        let response = self
            .runtime
            .block_on(self.core.select_and_reserve(request))
            .map_err(|e| format!("select_and_reserve {}: {e}", req.id))?;
        self.open.insert(req.id);
        let w = response
            .worker_id
            .checked_sub(1)
            .ok_or_else(|| format!("selector chose unknown worker {}", response.worker_id))?;
        Ok(w as usize)
    }

    fn lifecycle(&mut self, id: u64, free: bool) {
        if !self.open.contains(&id) {
            return;
        }
        let sid = id.to_string();
        let r = if free {
            self.open.remove(&id);
            self.runtime.block_on(self.core.free_reservation(&sid))
        } else {
            self.runtime.block_on(self.core.prefill_complete(&sid))
        };
        if let Err(e) = r {
            self.errors.push(format!(
                "{} {id}: {e}",
                if free { "free" } else { "prefill" }
            ));
        }
    }

    pub fn apply(&mut self, worker: usize, events: &[CacheEvent]) {
        let Some(indexer) = self.indexer() else {
            self.errors.push("no partition for the KV events".into());
            return;
        };
        for e in events {
            self.event_id += 1;
            let data = match e {
                CacheEvent::Stored { parent, blocks } => {
                    KvCacheEventData::Stored(KvCacheStoreData {
                        parent_hash: parent.map(|p| ExternalSequenceBlockHash(p.0)),
                        start_position: None,
                        blocks: blocks
                            .iter()
                            .map(|b| KvCacheStoredBlockData {
                                block_hash: ExternalSequenceBlockHash(b.hash.0),
                                tokens_hash: LocalBlockHash(b.local.0),
                                mm_extra_info: None,
                            })
                            .collect(),
                    })
                }
                CacheEvent::Removed { hashes } => KvCacheEventData::Removed(KvCacheRemoveData {
                    block_hashes: hashes
                        .iter()
                        .map(|h| ExternalSequenceBlockHash(h.0))
                        .collect(),
                }),
                CacheEvent::Cleared => KvCacheEventData::Cleared,
            };
            let event = RouterEvent::new(
                worker_id(worker),
                KvCacheEvent {
                    event_id: self.event_id,
                    data,
                    dp_rank: 0,
                },
            );
            if let Err(err) = self.runtime.block_on(indexer.apply_event_routed(event)) {
                self.errors.push(format!("KV event: {err}"));
            }
        }
        self.unflushed |= !events.is_empty();
    }
}

impl Policy for DynamoSelector {
    fn name(&self) -> &str {
        NAME
    }

    fn route(&mut self, req: &Arrival<'_>, _: &[WorkerView], _: Instant) -> usize {
        match self.select(req) {
            Ok(w) => w,
            Err(e) => {
                self.errors.push(e);
                0
            }
        }
    }

    fn first_token(&mut self, id: u64, _: Instant) {
        self.lifecycle(id, false);
    }

    fn finished(&mut self, id: u64, _: Instant) {
        self.lifecycle(id, true);
    }

    fn cache_events(&mut self, worker: usize, events: &[CacheEvent]) {
        self.apply(worker, events);
    }

    fn open_bookings(&mut self) -> Option<usize> {
        Some(self.open.len())
    }
}

impl Drop for DynamoSelector {
    fn drop(&mut self) {
        // A replay cannot fail a route, so refusals are said here rather than lost (the tests
        // assert there are none).
        if let Some(first) = self.errors.first() {
            eprintln!(
                "{NAME}: {} calls refused by the selector; first: {first}",
                self.errors.len()
            );
        }
        self.core.shutdown();
    }
}
