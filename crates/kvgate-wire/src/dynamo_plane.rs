//! Dynamo 1.6's event plane as a worker writes it: what a Dynamo 1.6.1 worker publishes on core
//! NATS, byte for byte (same MessagePack types, widths and field order; checked against
//! messages captured from the real `python -m dynamo.mocker`, `tests/fixtures/dynamo-1.6.1/`).
//!
//! Every message is an envelope, a MessagePack map
//! `{publisher_id, sequence, published_at, topic, payload}`: `publisher_id` random per
//! publisher, `sequence` counting from 0 per publisher, `published_at` Unix milliseconds,
//! `payload` a `bin` holding the MessagePack of the topic's message:
//!
//! - `kv-events` (subject `namespace.{ns}.component.{c}.endpoint.{e}.kv-events`, one publisher
//!   per worker and dp rank): an array of `RouterEvent` maps `{worker_id, storage_tier,
//!   residency_domain, event: {event_id, data, dp_rank}}`, `data` being `{stored: {parent_hash,
//!   start_position, blocks: [{block_hash, tokens_hash, mm_extra_info}]}}` (`residency_domain`
//!   `worker` unless the event names another, `start_position` and `mm_extra_info` nil as
//!   Dynamo's engines leave them), `{removed:
//!   {block_hashes}}` or the string `cleared`.
//! - `kv_metrics` (sibling subject `.kv_metrics`, one publisher per worker): `{worker_id,
//!   dp_rank, active_decode_blocks, active_prefill_tokens, kv_used_blocks}`.
//!
//! Integers take MessagePack's shortest form, as Dynamo's serializer writes them.

use crate::dynamo::{KvCacheEventData, RouterEvent};
use kvgate_core::KvEvent;
use rmpv::Value as M;

/// Topic (and subject suffix) of KV cache events.
pub const KV_EVENTS_TOPIC: &str = "kv-events";
/// Topic (and subject suffix) of a worker's KV usage.
pub const KV_METRICS_TOPIC: &str = "kv_metrics";

/// Where a worker's blocks live, as Dynamo 1.6 labels them (`residency_domain`; written when
/// the event names none).
pub const RESIDENCY_DOMAIN: &str = "worker";

/// NATS subject of `topic` for a Dynamo endpoint: `namespace.{ns}.component.{c}.endpoint.{e}.{topic}`.
pub fn endpoint_subject(namespace: &str, component: &str, endpoint: &str, topic: &str) -> String {
    format!("namespace.{namespace}.component.{component}.endpoint.{endpoint}.{topic}")
}

/// One event plane publisher: its id and the sequence number of its next message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlanePublisher {
    pub publisher_id: u64,
    next_sequence: u64,
}

impl PlanePublisher {
    pub fn new(publisher_id: u64) -> Self {
        Self {
            publisher_id,
            next_sequence: 0,
        }
    }

    /// A publisher with a fresh random id, in the range Dynamo's ids take (below 2^53).
    pub fn random() -> Self {
        Self::new(random_publisher_id())
    }

    /// The sequence number the next envelope gets.
    pub fn next_sequence(&self) -> u64 {
        self.next_sequence
    }

    /// Wraps `payload` (already encoded) in the next envelope of this publisher.
    pub fn envelope(&mut self, topic: &str, payload: &[u8], published_at_ms: u64) -> Vec<u8> {
        let seq = self.next_sequence;
        self.next_sequence += 1;
        encode_envelope(self.publisher_id, seq, published_at_ms, topic, payload)
    }

    /// The next `kv-events` envelope: `events` as one batch, stamped now.
    pub fn kv_events(&mut self, events: &[RouterEvent]) -> Vec<u8> {
        let payload = encode_kv_events(events);
        self.envelope(KV_EVENTS_TOPIC, &payload, unix_millis())
    }

    /// The next `kv_metrics` envelope, stamped now.
    pub fn kv_metrics(&mut self, metrics: &KvMetrics) -> Vec<u8> {
        let payload = encode_kv_metrics(metrics);
        self.envelope(KV_METRICS_TOPIC, &payload, unix_millis())
    }
}

/// A random id below 2^53 (Dynamo's publisher ids are JSON-safe integers), from the standard
/// library's per-process random hash keys and the clock: unique, not cryptographic.
pub fn random_publisher_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.write_u32(std::process::id());
    // Never 0: some readers take 0 for "unset".
    (h.finish() & ((1 << 53) - 1)).max(1)
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn unix_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The event plane envelope around an encoded `payload`.
pub fn encode_envelope(
    publisher_id: u64,
    sequence: u64,
    published_at_ms: u64,
    topic: &str,
    payload: &[u8],
) -> Vec<u8> {
    let env = M::Map(vec![
        (M::from("publisher_id"), M::from(publisher_id)),
        (M::from("sequence"), M::from(sequence)),
        (M::from("published_at"), M::from(published_at_ms)),
        (M::from("topic"), M::from(topic)),
        (M::from("payload"), M::Binary(payload.to_vec())),
    ]);
    write(&env, payload.len() + 64)
}

/// A `kv-events` payload: the batch as a MessagePack array of `RouterEvent` maps.
pub fn encode_kv_events(events: &[RouterEvent]) -> Vec<u8> {
    let batch = M::Array(events.iter().map(router_event_value).collect());
    write(&batch, 64 + 96 * events.len())
}

/// [`encode_kv_events`] from the router's event model.
pub fn encode_kv_events_from(events: &[KvEvent]) -> Vec<u8> {
    let batch: Vec<RouterEvent> = events.iter().map(RouterEvent::from_kv_event).collect();
    encode_kv_events(&batch)
}

fn router_event_value(e: &RouterEvent) -> M {
    let data = match &e.event.data {
        KvCacheEventData::Stored(s) => M::Map(vec![(
            M::from("stored"),
            M::Map(vec![
                (M::from("parent_hash"), opt_u64(s.parent_hash)),
                (M::from("start_position"), opt_u64(s.start_position)),
                (
                    M::from("blocks"),
                    M::Array(
                        s.blocks
                            .iter()
                            .map(|b| {
                                M::Map(vec![
                                    (M::from("block_hash"), M::from(b.block_hash)),
                                    (M::from("tokens_hash"), M::from(b.tokens_hash)),
                                    (M::from("mm_extra_info"), M::Nil),
                                ])
                            })
                            .collect(),
                    ),
                ),
            ]),
        )]),
        KvCacheEventData::Removed(r) => M::Map(vec![(
            M::from("removed"),
            M::Map(vec![(
                M::from("block_hashes"),
                M::Array(r.block_hashes.iter().map(|&h| M::from(h)).collect()),
            )]),
        )]),
        KvCacheEventData::Cleared => M::from("cleared"),
    };
    M::Map(vec![
        (M::from("worker_id"), M::from(e.worker_id)),
        (M::from("storage_tier"), M::from(e.storage_tier.as_str())),
        (
            M::from("residency_domain"),
            M::from(e.residency_domain.as_deref().unwrap_or(RESIDENCY_DOMAIN)),
        ),
        (
            M::from("event"),
            M::Map(vec![
                (M::from("event_id"), M::from(e.event.event_id)),
                (M::from("data"), data),
                (M::from("dp_rank"), M::from(e.event.dp_rank)),
            ]),
        ),
    ])
}

/// A worker's KV usage as Dynamo 1.6 reports it on `kv_metrics` (one message per dp rank).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KvMetrics {
    pub worker_id: u64,
    pub dp_rank: u32,
    /// Dynamo's mocker leaves these two unset.
    pub active_decode_blocks: Option<u64>,
    pub active_prefill_tokens: Option<u64>,
    /// Blocks in use (held by running requests).
    pub kv_used_blocks: u64,
}

/// A `kv_metrics` payload.
pub fn encode_kv_metrics(m: &KvMetrics) -> Vec<u8> {
    let v = M::Map(vec![
        (M::from("worker_id"), M::from(m.worker_id)),
        (M::from("dp_rank"), M::from(m.dp_rank)),
        (
            M::from("active_decode_blocks"),
            opt_u64(m.active_decode_blocks),
        ),
        (
            M::from("active_prefill_tokens"),
            opt_u64(m.active_prefill_tokens),
        ),
        (M::from("kv_used_blocks"), M::from(m.kv_used_blocks)),
    ]);
    write(&v, 96)
}

fn opt_u64(v: Option<u64>) -> M {
    v.map_or(M::Nil, M::from)
}

fn write(v: &M, capacity: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(capacity);
    // Writing into a Vec cannot fail.
    let _ = rmpv::encode::write_value(&mut out, v);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dynamo::{KvCacheEvent, RemoveData, StoreData, StoredBlockData};
    use kvgate_core::{ExternalHash, KvEventData, LocalHash, StorageTier, StoredBlock, WorkerRank};

    fn stored(worker: u64, rank: u32, id: u64, parent: Option<u64>, n: u64) -> RouterEvent {
        RouterEvent {
            worker_id: worker,
            storage_tier: StorageTier::Device,
            residency_domain: Some(RESIDENCY_DOMAIN.into()),
            event: KvCacheEvent {
                event_id: id,
                data: KvCacheEventData::Stored(StoreData {
                    parent_hash: parent,
                    start_position: None,
                    blocks: (0..n)
                        .map(|i| StoredBlockData {
                            block_hash: u64::MAX - i,
                            tokens_hash: i * 7_919,
                        })
                        .collect(),
                }),
                dp_rank: rank,
            },
        }
    }

    #[test]
    fn kv_events_round_trip_through_the_decoder() {
        let batch = vec![
            stored(9_450_797_095_980_962_858, 0, 1, None, 3),
            stored(9_450_797_095_980_962_858, 0, 2, Some(u64::MAX - 2), 1),
            RouterEvent {
                worker_id: 7,
                storage_tier: StorageTier::HostPinned,
                residency_domain: Some(RESIDENCY_DOMAIN.into()),
                event: KvCacheEvent {
                    event_id: 3,
                    data: KvCacheEventData::Removed(RemoveData {
                        block_hashes: vec![1, 300, 70_000, 5_000_000_000, u64::MAX],
                    }),
                    dp_rank: 3,
                },
            },
            RouterEvent {
                worker_id: 7,
                storage_tier: StorageTier::Device,
                residency_domain: Some(RESIDENCY_DOMAIN.into()),
                event: KvCacheEvent {
                    event_id: 4,
                    data: KvCacheEventData::Cleared,
                    dp_rank: 0,
                },
            },
        ];
        let mut p = PlanePublisher::new(2_738_103_701_783_371);
        for seq in 0..3u64 {
            let msg = p.kv_events(&batch);
            let (events, at) = RouterEvent::decode_message_stamped(&msg).unwrap();
            assert_eq!(events, batch);
            assert!(at.unwrap() > 1_700_000_000_000);
            // The envelope fields.
            let env = rmpv::decode::read_value(&mut &msg[..]).unwrap();
            let field = |k: &str| {
                env.as_map()
                    .unwrap()
                    .iter()
                    .find(|(key, _)| key.as_str() == Some(k))
                    .map(|(_, v)| v.clone())
                    .unwrap()
            };
            assert_eq!(field("publisher_id").as_u64(), Some(2_738_103_701_783_371));
            assert_eq!(field("sequence").as_u64(), Some(seq));
            assert_eq!(field("topic").as_str(), Some(KV_EVENTS_TOPIC));
            assert!(matches!(field("payload"), M::Binary(_)));
        }
        assert_eq!(p.next_sequence(), 3);
    }

    #[test]
    fn kv_events_from_the_core_model() {
        let e = KvEvent {
            source: WorkerRank::new(42, 1),
            event_id: 9,
            tier: StorageTier::Device,
            data: KvEventData::Stored {
                parent: Some(ExternalHash(5)),
                blocks: vec![StoredBlock {
                    hash: ExternalHash(6),
                    local: LocalHash(7),
                }],
            },
        };
        let msg = encode_envelope(
            1,
            0,
            2,
            KV_EVENTS_TOPIC,
            &encode_kv_events_from(std::slice::from_ref(&e)),
        );
        let events = RouterEvent::decode_message(&msg).unwrap();
        assert_eq!(
            events[0].residency_domain.as_deref(),
            Some(RESIDENCY_DOMAIN)
        );
        assert_eq!(
            events.iter().map(|e| e.to_kv_event()).collect::<Vec<_>>(),
            vec![e]
        );
    }

    #[test]
    fn random_ids_differ_and_stay_json_safe() {
        let a = random_publisher_id();
        let b = random_publisher_id();
        assert_ne!(a, b);
        assert!(a > 0 && a < 1 << 53 && b < 1 << 53);
    }

    #[test]
    fn subjects() {
        assert_eq!(
            endpoint_subject("dynamo", "backend", "generate", KV_METRICS_TOPIC),
            "namespace.dynamo.component.backend.endpoint.generate.kv_metrics"
        );
    }
}
