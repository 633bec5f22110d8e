//! Dynamo's KV event wire format on the NATS event plane: `RouterEvent` JSON (serde snake_case,
//! externally tagged), bare or inside the event plane's envelope.
//!
//! ```json
//! {"worker_id":42,"storage_tier":"device","event":{"event_id":7,"dp_rank":0,"data":{"stored":{
//!   "parent_hash":null,"blocks":[{"block_hash":1,"tokens_hash":2}]}}}}
//! ```
//!
//! `block_hash` is the engine's name for a block, `tokens_hash` the router's local hash of its
//! tokens. Unknown fields are ignored; hashes may arrive as signed integers (reinterpreted as u64).

use kvgate_core::{
    DpRank, ExternalHash, KvEvent, KvEventData, LocalHash, StorageTier, StoredBlock, WorkerId,
    WorkerRank,
};
use serde::{Deserialize, Deserializer, Serialize};
use std::fmt;

/// Messages larger than this are refused before parsing (NATS' own default limit is 1 MiB).
pub const MAX_MESSAGE_BYTES: usize = 8 << 20;
/// More blocks than this in one event is not a real engine talking.
pub const MAX_BLOCKS_PER_EVENT: usize = 1 << 16;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecodeError(pub String);

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "bad Dynamo KV event: {}", self.0)
    }
}

impl std::error::Error for DecodeError {}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouterEvent {
    pub worker_id: u64,
    #[serde(default, with = "tier")]
    pub storage_tier: StorageTier,
    /// Who holds the blocks (Dynamo 1.6): `worker` is the engine's own cache, the only
    /// domain kvgate indexes; absent in older versions, meaning `worker`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub residency_domain: Option<String>,
    pub event: KvCacheEvent,
}

/// One decoded NATS message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decoded {
    pub events: Vec<RouterEvent>,
    /// The envelope's `published_at` (Unix milliseconds).
    pub published_at: Option<u64>,
    /// The envelope's publisher and sequence number, which numbers that publisher's messages
    /// from 0 without gaps: a jump is a lost message.
    pub publisher: Option<PublisherSeq>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PublisherSeq {
    pub id: u64,
    pub sequence: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvCacheEvent {
    pub event_id: u64,
    pub data: KvCacheEventData,
    #[serde(default)]
    pub dp_rank: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KvCacheEventData {
    Stored(StoreData),
    Removed(RemoveData),
    Cleared,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreData {
    #[serde(default, deserialize_with = "opt_hash")]
    pub parent_hash: Option<u64>,
    /// Block position of the first stored block (Dynamo 1.6; `None`: after the parent, or
    /// at the start of the sequence when there is none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_position: Option<u64>,
    pub blocks: Vec<StoredBlockData>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredBlockData {
    #[serde(deserialize_with = "hash")]
    pub block_hash: u64,
    #[serde(deserialize_with = "hash")]
    pub tokens_hash: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoveData {
    #[serde(deserialize_with = "hashes")]
    pub block_hashes: Vec<u64>,
}

impl RouterEvent {
    /// Decodes one NATS message: a `RouterEvent` or a batch of them (`[...]`), bare JSON or
    /// wrapped in the event plane's envelope `{topic, publisher_id, sequence, published_at,
    /// payload}`, the envelope in MessagePack (named fields; payload a `bin` holding the
    /// MessagePack or JSON of the event or batch) or in JSON (payload an array of byte values,
    /// a string, or the event inline).
    pub fn decode_message(bytes: &[u8]) -> Result<Vec<RouterEvent>, DecodeError> {
        Self::decode_message_stamped(bytes).map(|(events, _)| events)
    }

    /// [`Self::decode_message`], with the envelope's `published_at` (Unix milliseconds) when
    /// the message has an envelope that carries one.
    pub fn decode_message_stamped(
        bytes: &[u8],
    ) -> Result<(Vec<RouterEvent>, Option<u64>), DecodeError> {
        Self::decode_envelope(bytes).map(|d| (d.events, d.published_at))
    }

    /// Decodes one NATS message with what its envelope says about the publisher.
    pub fn decode_envelope(bytes: &[u8]) -> Result<Decoded, DecodeError> {
        if bytes.len() > MAX_MESSAGE_BYTES {
            return Err(DecodeError(format!(
                "{} bytes, more than the {} accepted",
                bytes.len(),
                MAX_MESSAGE_BYTES
            )));
        }
        // Fast path: the common bare JSON event, parsed straight into the struct.
        let direct = match bytes.first() {
            Some(b'{') => serde_json::from_slice::<RouterEvent>(bytes)
                .ok()
                .map(|e| vec![e]),
            Some(b'[') => serde_json::from_slice::<Vec<RouterEvent>>(bytes).ok(),
            _ => None,
        };
        let (events, published_at, publisher) = match direct {
            Some(events) => (events, None, None),
            None => {
                let value = parse_any(bytes)?;
                let published_at = value.get("published_at").and_then(|v| v.as_u64());
                let publisher = match (
                    value.get("publisher_id").and_then(|v| v.as_u64()),
                    value.get("sequence").and_then(|v| v.as_u64()),
                ) {
                    (Some(id), Some(sequence)) if value.get("payload").is_some() => {
                        Some(PublisherSeq { id, sequence })
                    }
                    _ => None,
                };
                (events_of(value, 0)?, published_at, publisher)
            }
        };
        for event in &events {
            let n = match &event.event.data {
                KvCacheEventData::Stored(s) => s.blocks.len(),
                KvCacheEventData::Removed(r) => r.block_hashes.len(),
                KvCacheEventData::Cleared => 0,
            };
            if n > MAX_BLOCKS_PER_EVENT {
                return Err(DecodeError(format!(
                    "{n} blocks in one event, more than the {MAX_BLOCKS_PER_EVENT} accepted"
                )));
            }
        }
        Ok(Decoded {
            events,
            published_at,
            publisher,
        })
    }

    /// Why kvgate cannot index this event correctly, if so: such events are skipped (and
    /// counted), never applied as something they are not.
    pub fn unsupported(&self) -> Option<&'static str> {
        if let Some(domain) = &self.residency_domain
            && domain != "worker"
        {
            return Some("residency_domain");
        }
        if let KvCacheEventData::Stored(s) = &self.event.data
            && s.parent_hash.is_none()
            && s.start_position.is_some_and(|p| p > 0)
        {
            // Blocks that start mid-sequence with no parent to hang them on.
            return Some("start_position");
        }
        None
    }

    /// Decodes a message that must hold exactly one event.
    pub fn decode(bytes: &[u8]) -> Result<RouterEvent, DecodeError> {
        let mut events = Self::decode_message(bytes)?;
        match events.len() {
            1 => Ok(events.remove(0)),
            n => Err(DecodeError(format!("{n} events where one was expected"))),
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        // Serialising plain integers, strings and enums cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn source(&self) -> WorkerRank {
        WorkerRank {
            worker: WorkerId(self.worker_id),
            dp_rank: DpRank(self.event.dp_rank),
        }
    }

    /// The router's event model.
    pub fn to_kv_event(&self) -> KvEvent {
        let data = match &self.event.data {
            KvCacheEventData::Stored(s) => KvEventData::Stored {
                parent: s.parent_hash.map(ExternalHash),
                blocks: s
                    .blocks
                    .iter()
                    .map(|b| StoredBlock {
                        hash: ExternalHash(b.block_hash),
                        local: LocalHash(b.tokens_hash),
                    })
                    .collect(),
            },
            KvCacheEventData::Removed(r) => KvEventData::Removed {
                blocks: r.block_hashes.iter().copied().map(ExternalHash).collect(),
            },
            KvCacheEventData::Cleared => KvEventData::Cleared,
        };
        KvEvent {
            source: self.source(),
            event_id: self.event.event_id,
            tier: self.storage_tier,
            data,
        }
    }

    /// The wire form of a router event.
    pub fn from_kv_event(e: &KvEvent) -> RouterEvent {
        let data = match &e.data {
            KvEventData::Stored { parent, blocks } => KvCacheEventData::Stored(StoreData {
                parent_hash: parent.map(|p| p.0),
                start_position: None,
                blocks: blocks
                    .iter()
                    .map(|b| StoredBlockData {
                        block_hash: b.hash.0,
                        tokens_hash: b.local.0,
                    })
                    .collect(),
            }),
            KvEventData::Removed { blocks } => KvCacheEventData::Removed(RemoveData {
                block_hashes: blocks.iter().map(|h| h.0).collect(),
            }),
            KvEventData::Cleared => KvCacheEventData::Cleared,
        };
        RouterEvent {
            worker_id: e.source.worker.0,
            storage_tier: e.tier,
            residency_domain: None,
            event: KvCacheEvent {
                event_id: e.event_id,
                data,
                dp_rank: e.source.dp_rank.0,
            },
        }
    }
}

/// JSON or MessagePack, told apart by the first byte (`{`, `[` or whitespace start JSON).
fn parse_any(bytes: &[u8]) -> Result<serde_json::Value, DecodeError> {
    match bytes.iter().find(|b| !b.is_ascii_whitespace()) {
        None => Err(DecodeError("empty message".into())),
        Some(b'{') | Some(b'[') | Some(b'"') => {
            serde_json::from_slice(bytes).map_err(|e| DecodeError(e.to_string()))
        }
        Some(_) => {
            let mut cursor = bytes;
            let v = rmpv::decode::read_value_ref(&mut cursor)
                .map_err(|e| DecodeError(format!("neither JSON nor MessagePack: {e}")))?;
            if !cursor.is_empty() {
                return Err(DecodeError(format!(
                    "neither JSON nor one MessagePack value ({} trailing bytes)",
                    cursor.len()
                )));
            }
            msgpack_to_json(&v, 0)
        }
    }
}

/// Nesting deeper than this is refused (bounded recursion on hostile input).
const MAX_DEPTH: usize = 16;

fn msgpack_to_json(v: &rmpv::ValueRef<'_>, depth: usize) -> Result<serde_json::Value, DecodeError> {
    use rmpv::ValueRef as M;
    use serde_json::Value as J;
    if depth > MAX_DEPTH {
        return Err(DecodeError("nested too deeply".into()));
    }
    Ok(match v {
        M::Nil => J::Null,
        M::Boolean(b) => J::Bool(*b),
        M::Integer(i) => match (i.as_u64(), i.as_i64()) {
            (Some(u), _) => J::from(u),
            (None, Some(s)) => J::from(s),
            _ => return Err(DecodeError("integer out of range".into())),
        },
        M::F32(f) => J::from(f64::from(*f)),
        M::F64(f) => J::from(*f),
        M::String(s) => J::String(
            s.as_str()
                .ok_or_else(|| DecodeError("string is not UTF-8".into()))?
                .to_string(),
        ),
        M::Binary(b) => J::Array(b.iter().map(|&x| J::from(x)).collect()),
        M::Array(items) => J::Array(
            items
                .iter()
                .map(|x| msgpack_to_json(x, depth + 1))
                .collect::<Result<_, _>>()?,
        ),
        M::Map(entries) => {
            let mut m = serde_json::Map::with_capacity(entries.len());
            for (k, x) in entries {
                let M::String(k) = k else {
                    return Err(DecodeError("map key is not a string".into()));
                };
                let k = k
                    .as_str()
                    .ok_or_else(|| DecodeError("map key is not UTF-8".into()))?;
                m.insert(k.to_string(), msgpack_to_json(x, depth + 1)?);
            }
            J::Object(m)
        }
        M::Ext(..) => {
            return Err(DecodeError(
                "MessagePack extension types are not events".into(),
            ));
        }
    })
}

/// The events in a parsed message: an event, a batch, or an envelope around either.
fn events_of(value: serde_json::Value, depth: usize) -> Result<Vec<RouterEvent>, DecodeError> {
    use serde_json::Value as J;
    if depth > 2 {
        return Err(DecodeError("envelope nested in an envelope".into()));
    }
    match value {
        J::Object(mut m) if !m.contains_key("worker_id") && m.contains_key("payload") => {
            let payload = m.remove("payload").unwrap_or(J::Null);
            let inner = match payload {
                J::Array(items)
                    if items.iter().all(|x| x.as_u64().is_some_and(|b| b < 256))
                        && !items.is_empty() =>
                {
                    let bytes: Vec<u8> = items
                        .iter()
                        .filter_map(|x| x.as_u64())
                        .map(|b| b as u8)
                        .collect();
                    parse_any(&bytes)
                        .map_err(|e| DecodeError(format!("envelope payload: {}", e.0)))?
                }
                J::String(text) => serde_json::from_str(&text)
                    .map_err(|e| DecodeError(format!("envelope payload: {e}")))?,
                other => other,
            };
            events_of(inner, depth + 1).map_err(|e| {
                if e.0.starts_with("envelope payload") {
                    e
                } else {
                    DecodeError(format!("envelope payload: {}", e.0))
                }
            })
        }
        J::Array(items) => {
            if items.len() > MAX_BLOCKS_PER_EVENT {
                return Err(DecodeError(format!(
                    "{} events in one batch, more than the {MAX_BLOCKS_PER_EVENT} accepted",
                    items.len()
                )));
            }
            items
                .into_iter()
                .map(|x| {
                    serde_json::from_value::<RouterEvent>(x).map_err(|e| DecodeError(e.to_string()))
                })
                .collect()
        }
        other => serde_json::from_value::<RouterEvent>(other)
            .map(|e| vec![e])
            .map_err(|e| DecodeError(e.to_string())),
    }
}

/// NATS subject of a component's KV events.
pub fn kv_events_subject(namespace: &str, component: &str) -> String {
    format!("namespace.{namespace}.component.{component}.kv-events")
}

/// NATS subject on which a Dynamo 1.6 worker publishes its KV events (core NATS, one per
/// endpoint): `namespace.{ns}.component.{c}.endpoint.{e}.kv-events`. Its siblings
/// (`.kv_metrics`, `.forward-pass-metrics`, `.active_sequences_events`) share the prefix.
pub fn endpoint_kv_events_subject(namespace: &str, component: &str, endpoint: &str) -> String {
    format!("namespace.{namespace}.component.{component}.endpoint.{endpoint}.kv-events")
}

/// JetStream stream name for a subject, as Dynamo derives it: lower-cased, every character
/// other than `a-z`, `0-9` and `-` replaced by `-`.
pub fn stream_name(subject: &str) -> String {
    subject
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect()
}

/// Subject that JetStream publishers use inside a stream (Dynamo's queue layout:
/// `{stream}.queue`, the stream capturing `{stream}.*`).
pub fn stream_queue_subject(stream: &str) -> String {
    format!("{stream}.queue")
}

fn int_to_u64<E: serde::de::Error>(v: &serde_json::Number) -> Result<u64, E> {
    if let Some(u) = v.as_u64() {
        Ok(u)
    } else if let Some(i) = v.as_i64() {
        Ok(i as u64)
    } else {
        Err(E::custom(format!("hash {v} is not an integer")))
    }
}

fn hash<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    let n = serde_json::Number::deserialize(d)?;
    int_to_u64(&n)
}

fn opt_hash<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    match Option::<serde_json::Number>::deserialize(d)? {
        Some(n) => int_to_u64(&n).map(Some),
        None => Ok(None),
    }
}

fn hashes<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u64>, D::Error> {
    let v = Vec::<serde_json::Number>::deserialize(d)?;
    v.iter().map(int_to_u64).collect()
}

mod tier {
    use kvgate_core::StorageTier;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &StorageTier, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(t.as_str())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<StorageTier, D::Error> {
        let s = Option::<String>::deserialize(d)?;
        match s.as_deref() {
            None => Ok(StorageTier::Device),
            Some(name) => StorageTier::ALL
                .into_iter()
                .find(|t| t.as_str() == name)
                .ok_or_else(|| {
                    serde::de::Error::custom(format!(
                        "unknown storage_tier {name:?} (device, host_pinned, disk, external)"
                    ))
                }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn decodes_the_contract_examples() {
        let stored = br#"{"worker_id":42,"storage_tier":"device","event":{"event_id":7,"dp_rank":0,"data":{"stored":{
  "parent_hash":null,"start_position":null,"blocks":[{"block_hash":15310707395893867146,
  "tokens_hash":15310707395893867146,"mm_extra_info":null}]}}}}"#;
        let e = RouterEvent::decode(stored).unwrap();
        assert_eq!(e.worker_id, 42);
        assert_eq!(e.event.event_id, 7);
        let k = e.to_kv_event();
        assert_eq!(k.source, WorkerRank::new(42, 0));
        assert_eq!(
            k.data,
            KvEventData::Stored {
                parent: None,
                blocks: vec![StoredBlock {
                    hash: ExternalHash(15310707395893867146),
                    local: LocalHash(15310707395893867146)
                }]
            }
        );
        let removed = br#"{"worker_id":42,"storage_tier":"device","event":{"event_id":8,"dp_rank":1,"data":{"removed":{"block_hashes":[11879827756109914528]}}}}"#;
        let e = RouterEvent::decode(removed).unwrap();
        assert_eq!(e.source(), WorkerRank::new(42, 1));
        assert_eq!(
            e.to_kv_event().data,
            KvEventData::Removed {
                blocks: vec![ExternalHash(11879827756109914528)]
            }
        );
        let cleared = br#"{"worker_id":42,"storage_tier":"device","event":{"event_id":9,"dp_rank":0,"data":"cleared"}}"#;
        assert_eq!(
            RouterEvent::decode(cleared).unwrap().to_kv_event().data,
            KvEventData::Cleared
        );
    }

    #[test]
    fn defaults_unknown_fields_and_signed_hashes() {
        // No storage_tier, no dp_rank, extra fields, a negative hash.
        let e = RouterEvent::decode(
            br#"{"worker_id":1,"residency_domain":"x","event":{"event_id":1,"session_id":"s","data":{"stored":{"parent_hash":-1,"blocks":[{"block_hash":-2,"tokens_hash":3}]}}}}"#,
        )
        .unwrap();
        assert_eq!(e.storage_tier, StorageTier::Device);
        assert_eq!(e.event.dp_rank, 0);
        let KvCacheEventData::Stored(s) = &e.event.data else {
            panic!()
        };
        assert_eq!(s.parent_hash, Some(u64::MAX));
        assert_eq!(s.blocks[0].block_hash, u64::MAX - 1);
        let host = RouterEvent::decode(
            br#"{"worker_id":1,"storage_tier":"host_pinned","event":{"event_id":1,"data":"cleared"}}"#,
        )
        .unwrap();
        assert_eq!(host.storage_tier, StorageTier::HostPinned);
    }

    #[test]
    fn the_envelope_time_comes_with_the_events() {
        let inner = r#"{"worker_id":1,"event":{"event_id":0,"data":"cleared"}}"#;
        let msg = format!(
            r#"{{"topic":"kv-events","publisher_id":9,"sequence":3,"published_at":1700000000123,"payload":{inner}}}"#
        );
        let (events, at) = RouterEvent::decode_message_stamped(msg.as_bytes()).unwrap();
        assert_eq!((events.len(), at), (1, Some(1_700_000_000_123)));
        // A bare event has no publish time.
        let (events, at) = RouterEvent::decode_message_stamped(inner.as_bytes()).unwrap();
        assert_eq!((events.len(), at), (1, None));
    }

    #[test]
    fn decodes_enveloped_events_in_every_payload_shape() {
        let bare = RouterEvent::decode(
            br#"{"worker_id":5,"event":{"event_id":3,"dp_rank":2,"data":{"removed":{"block_hashes":[1,2]}}}}"#,
        )
        .unwrap();
        let inner = bare.encode();
        let as_bytes = format!(
            r#"{{"topic":"kv-events","publisher_id":9,"sequence":3,"published_at":1700000000000,"payload":{}}}"#,
            serde_json::to_string(&inner).unwrap()
        );
        assert_eq!(RouterEvent::decode(as_bytes.as_bytes()).unwrap(), bare);
        let as_text = format!(
            r#"{{"topic":"kv-events","payload":{}}}"#,
            serde_json::to_string(&String::from_utf8(inner.clone()).unwrap()).unwrap()
        );
        assert_eq!(RouterEvent::decode(as_text.as_bytes()).unwrap(), bare);
        let inline = format!(
            r#"{{"topic":"kv-events","payload":{}}}"#,
            String::from_utf8(inner).unwrap()
        );
        assert_eq!(RouterEvent::decode(inline.as_bytes()).unwrap(), bare);
        // A batch, bare and enveloped.
        let batch = format!("[{0},{0}]", String::from_utf8(bare.encode()).unwrap());
        assert_eq!(
            RouterEvent::decode_message(batch.as_bytes()).unwrap(),
            vec![bare.clone(), bare.clone()]
        );
    }

    /// Dynamo's event plane codec: the envelope is MessagePack with named fields, its payload a
    /// `bin` holding the named-MessagePack event (or a batch of them).
    #[test]
    fn decodes_the_msgpack_envelope() {
        use rmpv::Value as M;
        let event = M::Map(vec![
            (M::from("worker_id"), M::from(7u64)),
            (M::from("storage_tier"), M::from("device")),
            (
                M::from("event"),
                M::Map(vec![
                    (M::from("event_id"), M::from(11u64)),
                    (
                        M::from("data"),
                        M::Map(vec![(
                            M::from("stored"),
                            M::Map(vec![
                                (M::from("parent_hash"), M::from(u64::MAX)),
                                (M::from("start_position"), M::Nil),
                                (
                                    M::from("blocks"),
                                    M::Array(vec![M::Map(vec![
                                        (M::from("block_hash"), M::from(5u64)),
                                        (M::from("tokens_hash"), M::from(6u64)),
                                        (M::from("mm_extra_info"), M::Nil),
                                    ])]),
                                ),
                            ]),
                        )]),
                    ),
                    (M::from("dp_rank"), M::from(1u32)),
                ]),
            ),
        ]);
        let envelope = |payload: &M| {
            let mut inner = Vec::new();
            rmpv::encode::write_value(&mut inner, payload).unwrap();
            let env = M::Map(vec![
                (M::from("topic"), M::from("kv-events")),
                (M::from("publisher_id"), M::from(123u64)),
                (M::from("sequence"), M::from(0u64)),
                (M::from("published_at"), M::from(1_700_000_000_000u64)),
                (M::from("payload"), M::Binary(inner)),
            ]);
            let mut out = Vec::new();
            rmpv::encode::write_value(&mut out, &env).unwrap();
            out
        };
        let want = RouterEvent {
            residency_domain: None,
            worker_id: 7,
            storage_tier: StorageTier::Device,
            event: KvCacheEvent {
                event_id: 11,
                data: KvCacheEventData::Stored(StoreData {
                    start_position: None,
                    parent_hash: Some(u64::MAX),
                    blocks: vec![StoredBlockData {
                        block_hash: 5,
                        tokens_hash: 6,
                    }],
                }),
                dp_rank: 1,
            },
        };
        assert_eq!(RouterEvent::decode(&envelope(&event)).unwrap(), want);
        let batch = M::Array(vec![event.clone(), event]);
        assert_eq!(
            RouterEvent::decode_message(&envelope(&batch)).unwrap(),
            vec![want.clone(), want]
        );
    }

    #[test]
    fn refuses_malformed_events_with_a_reason() {
        for (bad, why) in [
            (&b"not json"[..], "neither JSON"),
            (&b"{not json"[..], "key must be a string"),
            (br#"{"worker_id":"a","event":{"event_id":1,"data":"cleared"}}"#, "invalid type"),
            (br#"{"worker_id":1,"event":{"event_id":1,"data":"exploded"}}"#, "unknown variant"),
            (br#"{"worker_id":1,"storage_tier":"tape","event":{"event_id":1,"data":"cleared"}}"#, "storage_tier"),
            (br#"{"worker_id":1,"event":{"event_id":1,"data":{"stored":{"blocks":[{"block_hash":1.5,"tokens_hash":1}]}}}}"#, "not an integer"),
            (br#"{"worker_id":1,"event":{"event_id":1,"data":{"stored":{"blocks":[{"block_hash":1"#, "EOF"),
            (br#"{"payload":[1,2,3]}"#, "envelope payload"),
        ] {
            let e = RouterEvent::decode(bad).unwrap_err();
            assert!(e.0.contains(why), "{e} should mention {why:?}");
        }
        let many: Vec<String> = (0..MAX_BLOCKS_PER_EVENT + 1)
            .map(|i| i.to_string())
            .collect();
        let huge = format!(
            r#"{{"worker_id":1,"event":{{"event_id":1,"data":{{"removed":{{"block_hashes":[{}]}}}}}}}}"#,
            many.join(",")
        );
        assert!(
            RouterEvent::decode(huge.as_bytes())
                .unwrap_err()
                .0
                .contains("more than")
        );
    }

    #[test]
    fn subject_and_stream_names() {
        assert_eq!(
            kv_events_subject("dynamo", "backend"),
            "namespace.dynamo.component.backend.kv-events"
        );
        assert_eq!(
            stream_name("namespace.My_ns.component.backend.kv-events"),
            "namespace-my-ns-component-backend-kv-events"
        );
        assert_eq!(
            stream_queue_subject("namespace-dynamo-component-backend-kv-events"),
            "namespace-dynamo-component-backend-kv-events.queue"
        );
    }

    fn arb_event() -> impl Strategy<Value = RouterEvent> {
        let data = prop_oneof![
            (
                proptest::option::of(any::<u64>()),
                proptest::collection::vec((any::<u64>(), any::<u64>()), 0..8)
            )
                .prop_map(|(p, b)| KvCacheEventData::Stored(StoreData {
                    start_position: None,
                    parent_hash: p,
                    blocks: b
                        .into_iter()
                        .map(|(h, t)| StoredBlockData {
                            block_hash: h,
                            tokens_hash: t
                        })
                        .collect()
                })),
            proptest::collection::vec(any::<u64>(), 0..8)
                .prop_map(|h| KvCacheEventData::Removed(RemoveData { block_hashes: h })),
            Just(KvCacheEventData::Cleared),
        ];
        (any::<u64>(), 0usize..4, any::<u64>(), any::<u32>(), data).prop_map(
            |(w, t, id, rank, data)| RouterEvent {
                residency_domain: None,
                worker_id: w,
                storage_tier: StorageTier::from_index(t),
                event: KvCacheEvent {
                    event_id: id,
                    data,
                    dp_rank: rank,
                },
            },
        )
    }

    proptest! {
        #[test]
        fn encode_decode_round_trips(e in arb_event()) {
            prop_assert_eq!(RouterEvent::decode(&e.encode()).unwrap(), e.clone());
            prop_assert_eq!(RouterEvent::from_kv_event(&e.to_kv_event()), e);
        }

    }

    proptest! {
        // 2,048 cases per run, each decoding three inputs.
        #![proptest_config(ProptestConfig::with_cases(2048))]

        /// Arbitrary bytes and damaged real events are refused or decoded, never a panic.
        #[test]
        fn fuzz_decode_never_panics(
            e in arb_event(),
            cut in any::<prop::sample::Index>(),
            flip in any::<prop::sample::Index>(),
            byte in any::<u8>(),
            junk in proptest::collection::vec(any::<u8>(), 0..256),
        ) {
            let _ = RouterEvent::decode(&junk);
            let mut bytes = e.encode();
            let n = bytes.len();
            let _ = RouterEvent::decode(&bytes[..cut.index(n)]);
            bytes[flip.index(n)] = byte;
            let _ = RouterEvent::decode(&bytes);
        }
    }
}
