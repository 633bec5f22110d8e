//! vLLM's KV event wire format (ZMQ PUB/SUB): multipart `[topic, seq (8-byte BE), msgpack batch]`.
//!
//! The batch is `[ts, [events...], dp_rank]` (older vLLM: a map `{ts, events, data_parallel_rank}`).
//! Events are maps tagged by `"type"` (vLLM 0.33) or arrays `["BlockStored", hashes, parent,
//! token_ids, block_size, lora_id, medium, lora_name, ...]` (older vLLM): both are accepted.
//! Block hashes are integers (possibly negative: reinterpreted as u64) or bytes (hashed to u64).
//! We encode either layout ([`EventLayout`]) with integer hashes.

use kvgate_core::hashing::{HashSeed, local_hash};
use kvgate_core::{ExternalHash, KvEvent, KvEventData, StorageTier, StoredBlock, WorkerRank};
use rmpv::Value;
use std::fmt;

#[derive(Clone, Debug, PartialEq)]
pub enum VllmEvent {
    BlockStored {
        block_hashes: Vec<u64>,
        parent_block_hash: Option<u64>,
        token_ids: Vec<u32>,
        block_size: u32,
        lora_name: Option<String>,
        medium: Option<String>,
    },
    BlockRemoved {
        block_hashes: Vec<u64>,
        medium: Option<String>,
    },
    AllBlocksCleared,
}

#[derive(Clone, Debug, PartialEq)]
pub struct VllmBatch {
    pub ts: f64,
    pub events: Vec<VllmEvent>,
    pub dp_rank: Option<u32>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecodeError(pub String);

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "bad vLLM KV event: {}", self.0)
    }
}

impl std::error::Error for DecodeError {}

fn err<T>(m: impl Into<String>) -> Result<T, DecodeError> {
    Err(DecodeError(m.into()))
}

/// Batches larger than this are refused (a real batch is a few KB to a few MB).
pub const MAX_BATCH_BYTES: usize = 64 << 20;

fn hash(v: &Value) -> Result<u64, DecodeError> {
    match v {
        Value::Integer(i) => match (i.as_u64(), i.as_i64()) {
            (Some(u), _) => Ok(u),
            (None, Some(s)) => Ok(s as u64),
            _ => err("block hash out of range"),
        },
        Value::Binary(b) => Ok(xxhash_rust::xxh3::xxh3_64(b)),
        other => err(format!(
            "block hash must be an integer or bytes, not {other}"
        )),
    }
}

fn hashes(v: &Value) -> Result<Vec<u64>, DecodeError> {
    match v {
        Value::Array(a) => a.iter().map(hash).collect(),
        _ => err("block_hashes must be an array"),
    }
}

fn opt_hash(v: Option<&Value>) -> Result<Option<u64>, DecodeError> {
    match v {
        None | Some(Value::Nil) => Ok(None),
        Some(v) => hash(v).map(Some),
    }
}

fn tokens(v: &Value) -> Result<Vec<u32>, DecodeError> {
    match v {
        Value::Array(a) => a
            .iter()
            .map(|t| {
                t.as_u64()
                    .and_then(|t| u32::try_from(t).ok())
                    .ok_or_else(|| DecodeError("token id must be a u32".into()))
            })
            .collect(),
        _ => err("token_ids must be an array"),
    }
}

fn opt_str(v: Option<&Value>) -> Option<String> {
    v.and_then(Value::as_str).map(str::to_string)
}

fn u32_of(v: Option<&Value>, what: &str) -> Result<u32, DecodeError> {
    v.and_then(Value::as_u64)
        .and_then(|x| u32::try_from(x).ok())
        .ok_or_else(|| DecodeError(format!("{what} must be a u32")))
}

fn event_from_map(m: &[(Value, Value)]) -> Result<VllmEvent, DecodeError> {
    let get = |k: &str| {
        m.iter()
            .find(|(key, _)| key.as_str() == Some(k))
            .map(|(_, v)| v)
    };
    let Some(kind) = get("type").and_then(Value::as_str) else {
        return err("event map without a \"type\"");
    };
    event(kind, |field, _| get(field))
}

fn event_from_array(a: &[Value]) -> Result<VllmEvent, DecodeError> {
    let Some(kind) = a.first().and_then(Value::as_str) else {
        return err("event array without a type tag");
    };
    // positions after the tag: hashes, parent, token_ids, block_size, lora_id, medium, lora_name
    event(kind, |_, pos| a.get(pos))
}

/// Builds an event from a field getter (by name for maps, by position for arrays).
fn event<'a>(
    kind: &str,
    get: impl Fn(&str, usize) -> Option<&'a Value>,
) -> Result<VllmEvent, DecodeError> {
    match kind {
        "BlockStored" => Ok(VllmEvent::BlockStored {
            block_hashes: hashes(get("block_hashes", 1).unwrap_or(&Value::Nil))?,
            parent_block_hash: opt_hash(get("parent_block_hash", 2))?,
            token_ids: tokens(get("token_ids", 3).unwrap_or(&Value::Nil))?,
            block_size: u32_of(get("block_size", 4), "block_size")?,
            medium: opt_str(get("medium", 6)),
            lora_name: opt_str(get("lora_name", 7)),
        }),
        "BlockRemoved" => Ok(VllmEvent::BlockRemoved {
            block_hashes: hashes(get("block_hashes", 1).unwrap_or(&Value::Nil))?,
            medium: opt_str(get("medium", 2)),
        }),
        "AllBlocksCleared" => Ok(VllmEvent::AllBlocksCleared),
        other => err(format!("unknown event type {other:?}")),
    }
}

pub fn decode_batch(payload: &[u8]) -> Result<VllmBatch, DecodeError> {
    if payload.len() > MAX_BATCH_BYTES {
        return err(format!(
            "batch of {} bytes is over the limit",
            payload.len()
        ));
    }
    let mut rd = payload;
    let v = rmpv::decode::read_value_with_max_depth(&mut rd, 16)
        .map_err(|e| DecodeError(format!("msgpack: {e}")))?;
    let (ts, events, rank) = match &v {
        Value::Array(a) => (a.first(), a.get(1), a.get(2)),
        Value::Map(m) => {
            let get = |k: &str| {
                m.iter()
                    .find(|(key, _)| key.as_str() == Some(k))
                    .map(|(_, v)| v)
            };
            (get("ts"), get("events"), get("data_parallel_rank"))
        }
        _ => return err("batch must be an array or a map"),
    };
    let ts = ts.and_then(Value::as_f64).unwrap_or(0.0);
    let Some(Value::Array(raw)) = events else {
        return err("batch without an events array");
    };
    let events = raw
        .iter()
        .map(|e| match e {
            Value::Map(m) => event_from_map(m),
            Value::Array(a) => event_from_array(a),
            _ => err("event must be a map or an array"),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let dp_rank = match rank {
        None | Some(Value::Nil) => None,
        Some(v) => Some(u32_of(Some(v), "data_parallel_rank")?),
    };
    Ok(VllmBatch {
        ts,
        events,
        dp_rank,
    })
}

fn s(k: &str) -> Value {
    Value::from(k)
}

fn opt(v: Option<&str>) -> Value {
    v.map_or(Value::Nil, Value::from)
}

/// How events are laid out in a batch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum EventLayout {
    /// vLLM 0.33: maps tagged by `"type"`.
    #[default]
    Map,
    /// Older vLLM: positional arrays, the type tag first.
    Array,
}

/// Encodes in vLLM 0.33's layout (batch array, events as tagged maps, integer hashes).
pub fn encode_batch(batch: &VllmBatch) -> Vec<u8> {
    encode_batch_as(batch, EventLayout::Map)
}

/// Positional form of an event (older vLLM): the tag, then the fields in declaration order.
fn event_array(e: &VllmEvent) -> Value {
    let hashes = |h: &[u64]| Value::Array(h.iter().map(|&h| Value::from(h)).collect());
    match e {
        VllmEvent::BlockStored {
            block_hashes,
            parent_block_hash,
            token_ids,
            block_size,
            lora_name,
            medium,
        } => Value::Array(vec![
            s("BlockStored"),
            hashes(block_hashes),
            parent_block_hash.map_or(Value::Nil, Value::from),
            Value::Array(token_ids.iter().map(|&t| Value::from(t)).collect()),
            Value::from(*block_size),
            Value::Nil,
            opt(medium.as_deref()),
            opt(lora_name.as_deref()),
        ]),
        VllmEvent::BlockRemoved {
            block_hashes,
            medium,
        } => Value::Array(vec![
            s("BlockRemoved"),
            hashes(block_hashes),
            opt(medium.as_deref()),
        ]),
        VllmEvent::AllBlocksCleared => Value::Array(vec![s("AllBlocksCleared")]),
    }
}

/// Encodes a batch `[ts, [events...], dp_rank]` with events in `layout`.
pub fn encode_batch_as(batch: &VllmBatch, layout: EventLayout) -> Vec<u8> {
    let events: Vec<Value> = batch
        .events
        .iter()
        .map(|e| match e {
            _ if layout == EventLayout::Array => event_array(e),
            VllmEvent::BlockStored {
                block_hashes,
                parent_block_hash,
                token_ids,
                block_size,
                lora_name,
                medium,
            } => Value::Map(vec![
                (s("type"), s("BlockStored")),
                (
                    s("block_hashes"),
                    Value::Array(block_hashes.iter().map(|&h| Value::from(h)).collect()),
                ),
                (
                    s("parent_block_hash"),
                    parent_block_hash.map_or(Value::Nil, Value::from),
                ),
                (
                    s("token_ids"),
                    Value::Array(token_ids.iter().map(|&t| Value::from(t)).collect()),
                ),
                (s("block_size"), Value::from(*block_size)),
                (s("lora_id"), Value::Nil),
                (s("medium"), opt(medium.as_deref())),
                (s("lora_name"), opt(lora_name.as_deref())),
            ]),
            VllmEvent::BlockRemoved {
                block_hashes,
                medium,
            } => Value::Map(vec![
                (s("type"), s("BlockRemoved")),
                (
                    s("block_hashes"),
                    Value::Array(block_hashes.iter().map(|&h| Value::from(h)).collect()),
                ),
                (s("medium"), opt(medium.as_deref())),
            ]),
            VllmEvent::AllBlocksCleared => Value::Map(vec![(s("type"), s("AllBlocksCleared"))]),
        })
        .collect();
    let v = Value::Array(vec![
        Value::from(batch.ts),
        Value::Array(events),
        batch.dp_rank.map_or(Value::Nil, Value::from),
    ]);
    let mut buf = Vec::new();
    // Writing to a Vec cannot fail.
    let _ = rmpv::encode::write_value(&mut buf, &v);
    buf
}

fn tier_of(medium: Option<&str>) -> StorageTier {
    match medium.map(str::to_ascii_uppercase).as_deref() {
        None | Some("GPU") | Some("DEVICE") => StorageTier::Device,
        Some("CPU") | Some("HOST") | Some("CPU_PINNED") => StorageTier::HostPinned,
        Some("DISK") => StorageTier::Disk,
        Some(_) => StorageTier::External,
    }
}

/// Why an event could not become router events.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConvertError {
    /// The engine's block size differs from the router's: indexing would silently never match.
    BlockSizeMismatch { event: u32, configured: u32 },
    /// `token_ids` do not cover the stored blocks.
    TokenCount { blocks: usize, tokens: usize },
}

impl fmt::Display for ConvertError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConvertError::BlockSizeMismatch { event, configured } => write!(
                f,
                "worker block size {event} differs from the configured {configured}: events refused"
            ),
            ConvertError::TokenCount { blocks, tokens } => {
                write!(f, "{blocks} stored blocks but {tokens} token ids")
            }
        }
    }
}

/// Turns one vLLM event into the router's event model: local hashes come from the token ids,
/// seeded with the LoRA name as the router seeds requests.
pub fn to_kv_event(
    e: &VllmEvent,
    source: WorkerRank,
    event_id: u64,
    block_size: u32,
) -> Result<KvEvent, ConvertError> {
    let (tier, data) = match e {
        VllmEvent::BlockStored {
            block_hashes,
            parent_block_hash,
            token_ids,
            block_size: bs,
            lora_name,
            medium,
        } => {
            if *bs != block_size {
                return Err(ConvertError::BlockSizeMismatch {
                    event: *bs,
                    configured: block_size,
                });
            }
            let bsz = block_size as usize;
            if token_ids.len() != block_hashes.len() * bsz {
                return Err(ConvertError::TokenCount {
                    blocks: block_hashes.len(),
                    tokens: token_ids.len(),
                });
            }
            let seed = HashSeed::new(lora_name.as_deref(), None);
            let blocks = block_hashes
                .iter()
                .zip(token_ids.chunks_exact(bsz))
                .map(|(&h, toks)| StoredBlock {
                    hash: ExternalHash(h),
                    local: local_hash(toks, seed),
                })
                .collect();
            (
                tier_of(medium.as_deref()),
                KvEventData::Stored {
                    parent: parent_block_hash.map(ExternalHash),
                    blocks,
                },
            )
        }
        VllmEvent::BlockRemoved {
            block_hashes,
            medium,
        } => (
            tier_of(medium.as_deref()),
            KvEventData::Removed {
                blocks: block_hashes.iter().map(|&h| ExternalHash(h)).collect(),
            },
        ),
        VllmEvent::AllBlocksCleared => (StorageTier::Device, KvEventData::Cleared),
    };
    Ok(KvEvent {
        source,
        event_id,
        tier,
        data,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> VllmBatch {
        VllmBatch {
            ts: 1.5,
            events: vec![
                VllmEvent::BlockStored {
                    block_hashes: vec![1, u64::MAX],
                    parent_block_hash: None,
                    token_ids: (0..8).collect(),
                    block_size: 4,
                    lora_name: None,
                    medium: Some("GPU".into()),
                },
                VllmEvent::BlockRemoved {
                    block_hashes: vec![1],
                    medium: Some("GPU".into()),
                },
                VllmEvent::AllBlocksCleared,
            ],
            dp_rank: Some(1),
        }
    }

    #[test]
    fn round_trips_the_033_layout() {
        let b = sample();
        assert_eq!(decode_batch(&encode_batch(&b)).unwrap(), b);
    }

    #[test]
    fn round_trips_the_array_layout() {
        let mut b = sample();
        if let VllmEvent::BlockStored { lora_name, .. } = &mut b.events[0] {
            *lora_name = Some("adapter".into());
        }
        let bytes = encode_batch_as(&b, EventLayout::Array);
        assert_ne!(bytes, encode_batch(&b));
        let v = rmpv::decode::read_value(&mut bytes.as_slice()).unwrap();
        assert_eq!(v[1][0][0].as_str(), Some("BlockStored"));
        assert_eq!(v[1][2], Value::Array(vec![s("AllBlocksCleared")]));
        assert_eq!(decode_batch(&bytes).unwrap(), b);
    }

    #[test]
    fn accepts_legacy_arrays_signed_and_byte_hashes() {
        let legacy = Value::Array(vec![
            Value::from(2.0),
            Value::Array(vec![
                Value::Array(vec![
                    s("BlockStored"),
                    Value::Array(vec![Value::from(-1i64), Value::Binary(vec![7; 32])]),
                    Value::Nil,
                    Value::Array((0..8u32).map(Value::from).collect()),
                    Value::from(4u32),
                    Value::Nil,
                    s("GPU"),
                ]),
                Value::Array(vec![s("AllBlocksCleared")]),
            ]),
            Value::Nil,
        ]);
        let mut buf = Vec::new();
        rmpv::encode::write_value(&mut buf, &legacy).unwrap();
        let b = decode_batch(&buf).unwrap();
        match &b.events[0] {
            VllmEvent::BlockStored { block_hashes, .. } => {
                assert_eq!(block_hashes[0], u64::MAX);
                assert_eq!(block_hashes[1], xxhash_rust::xxh3::xxh3_64(&[7; 32]));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(b.dp_rank, None);
        // batch as a map (older vLLM)
        let map = Value::Map(vec![
            (s("ts"), Value::from(1.0)),
            (s("events"), Value::Array(vec![])),
            (s("data_parallel_rank"), Value::from(0)),
        ]);
        let mut buf = Vec::new();
        rmpv::encode::write_value(&mut buf, &map).unwrap();
        assert_eq!(decode_batch(&buf).unwrap().dp_rank, Some(0));
    }

    #[test]
    fn converts_with_local_hashes_from_tokens() {
        let b = sample();
        let e = to_kv_event(&b.events[0], WorkerRank::new(3, 1), 9, 4).unwrap();
        match e.data {
            KvEventData::Stored { blocks, parent } => {
                assert_eq!(parent, None);
                assert_eq!(
                    blocks[0].local,
                    local_hash(&[0, 1, 2, 3], HashSeed::default())
                );
                assert_eq!(blocks[1].hash, ExternalHash(u64::MAX));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            to_kv_event(&b.events[0], WorkerRank::new(3, 1), 9, 16),
            Err(ConvertError::BlockSizeMismatch {
                event: 4,
                configured: 16
            })
        );
    }

    proptest::proptest! {
        // 2,048 inputs per run (CI runs it every time).
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2048))]

        /// Garbage, truncated and bit-flipped batches (both layouts) are refused or decoded,
        /// never a panic.
        #[test]
        fn decoder_never_panics(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256),
            cut in 0usize..200,
            flip in 0usize..200,
            bit in 0u8..8,
            array: bool,
        ) {
            let _ = decode_batch(&bytes);
            let layout = if array { EventLayout::Array } else { EventLayout::Map };
            let mut good = encode_batch_as(&sample(), layout);
            let _ = decode_batch(&good[..cut.min(good.len())]);
            let i = flip % good.len();
            good[i] ^= 1 << bit;
            let _ = decode_batch(&good);
        }
    }
}
