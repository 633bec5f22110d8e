//! vLLM's KV event wire format (ZMQ PUB/SUB): multipart `[topic, seq (8-byte BE), msgpack batch]`.
//!
//! The batch is `[ts, [events...], dp_rank]` (older vLLM: a map `{ts, events, data_parallel_rank}`).
//! Events are maps tagged by `"type"` (vLLM 0.33) or arrays `["BlockStored", hashes, parent,
//! token_ids, block_size, lora_id, medium, lora_name, ...]` (older vLLM): both are accepted.
//! Block hashes are integers (possibly negative: reinterpreted as u64) or bytes (hashed to u64).
//! We encode either layout ([`EventLayout`]) with integer hashes. SGLang's publisher uses the
//! same format (its batch's third field is the attention-DP rank).
//!
//! Newer vLLM (0.34) adds fields for hybrid models, read by [`decode_batch_detailed`] into
//! [`EventMeta`]: the KV cache group of the blocks (`group_idx`), and on stored events the
//! group's KV cache spec (`kv_cache_spec_kind`, `kv_cache_spec_sliding_window`), plus
//! `locality`; SGLang adds `cache_salt`. Only a full-attention group's blocks form the token
//! prefix cache the router's index models: [`GroupFilter`] tells a rank's usable events from
//! the ones to skip.

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

impl VllmEvent {
    /// The event's type tag (`BlockStored`, ...).
    pub fn kind(&self) -> &'static str {
        match self {
            VllmEvent::BlockStored { .. } => "BlockStored",
            VllmEvent::BlockRemoved { .. } => "BlockRemoved",
            VllmEvent::AllBlocksCleared => "AllBlocksCleared",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct VllmBatch {
    pub ts: f64,
    pub events: Vec<VllmEvent>,
    pub dp_rank: Option<u32>,
}

/// What newer engines say about an event beyond [`VllmEvent`]; `None` where the engine does not
/// send the field (older versions, or fields of the other engine).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EventMeta {
    /// vLLM: the KV cache group of the blocks. Hybrid models (full attention with sliding-window,
    /// Mamba, ... layers) have one group per kind of layer, each publishing its own events for
    /// the same block hashes.
    pub group_idx: Option<u32>,
    /// vLLM, stored events: the group's KV cache spec (`KVCacheSpecKind`: `full_attention`,
    /// `mla_attention`, `sink_full_attention`, `sliding_window`, `sliding_window_mla`, `mamba`,
    /// `chunked_local_attention`, `encoder_only_attention`, `cross_attention`, `unknown`).
    pub kv_cache_spec_kind: Option<String>,
    /// vLLM, stored events: the group's sliding window in tokens, if it has one.
    pub kv_cache_spec_sliding_window: Option<u32>,
    /// vLLM: `LOCAL` or `REMOTE` relative to the publisher.
    pub locality: Option<String>,
    /// SGLang, stored events: the salt of the request that stored the blocks.
    pub cache_salt: Option<String>,
}

/// An event with what [`EventMeta`] the engine sent along.
#[derive(Clone, Debug, PartialEq)]
pub struct DetailedEvent {
    pub event: VllmEvent,
    pub meta: EventMeta,
}

/// A batch as [`decode_batch_detailed`] reads it.
#[derive(Clone, Debug, PartialEq)]
pub struct DetailedBatch {
    pub ts: f64,
    pub events: Vec<DetailedEvent>,
    pub dp_rank: Option<u32>,
}

/// KV cache spec kinds whose blocks hold every token's KV (vLLM's `FullAttentionSpec` and its
/// subclasses): a token prefix cache, as the router's index models it.
const PREFIX_CACHE_KINDS: &[&str] = &["full_attention", "mla_attention", "sink_full_attention"];

/// Skip reasons (the `reason` label of `kvgate_kv_events_skipped_total`).
pub const SKIP_SPEC_KIND: &str = "kv_cache_spec_kind";
pub const SKIP_SLIDING_WINDOW: &str = "kv_cache_spec_sliding_window";
pub const SKIP_GROUP: &str = "group_idx";

impl EventMeta {
    /// Why a stored event's KV cache spec is not a prefix cache kvgate can index, if so: a
    /// sliding-window group drops blocks behind its window while the request's prefix lives on
    /// in the full-attention group, a Mamba group's blocks are state snapshots, not per-token
    /// KV. Unannotated events (older vLLM, SGLang) are taken as full attention.
    pub fn unusable_spec(&self) -> Option<&'static str> {
        if let Some(kind) = &self.kv_cache_spec_kind
            && !PREFIX_CACHE_KINDS.contains(&kind.as_str())
        {
            return Some(SKIP_SPEC_KIND);
        }
        if self.kv_cache_spec_sliding_window.is_some() {
            return Some(SKIP_SLIDING_WINDOW);
        }
        None
    }
}

/// Which of one publisher's KV cache groups the index follows, learned from its events as vLLM
/// intends ("store events carry cache-spec metadata so consumers can classify and filter groups
/// as they are learned; remove events only need group_idx + hash").
///
/// Exactly one group is indexed per rank: the first full-attention one seen (a hybrid model's
/// other full-attention groups hold the same blocks under the same hashes; indexing them too
/// would let one group's eviction remove what another still holds). Events without a
/// `group_idx` (older vLLM, SGLang) are a single-group publisher's and always admitted.
/// Stored events that name a group but no spec (a publisher without the spec fields) are
/// admitted for group 0 only, taken as a single-group model's. Removals are admitted for the
/// indexed group, and for a group not classified yet while no group is indexed (the rank's
/// index is then empty: they remove nothing). Make a new filter when the publisher may be
/// another process (restart, reconnection), together with dropping the rank's blocks.
#[derive(Clone, Debug, Default)]
pub struct GroupFilter {
    indexed: Option<u32>,
    /// Groups learned not to be usable, with why.
    unusable: std::collections::BTreeMap<u32, &'static str>,
}

impl GroupFilter {
    pub fn new() -> Self {
        Self::default()
    }

    /// The group whose events are indexed, once known.
    pub fn indexed_group(&self) -> Option<u32> {
        self.indexed
    }

    /// `Ok` to index the event, or the reason to skip it.
    pub fn admit(&mut self, e: &DetailedEvent) -> Result<(), &'static str> {
        let group = e.meta.group_idx;
        match &e.event {
            VllmEvent::AllBlocksCleared => Ok(()),
            VllmEvent::BlockStored { .. } => {
                if let Some(reason) = e.meta.unusable_spec() {
                    if let Some(g) = group {
                        self.unusable.insert(g, reason);
                    }
                    return Err(reason);
                }
                let Some(g) = group else { return Ok(()) };
                if let Some(&reason) = self.unusable.get(&g) {
                    return Err(reason);
                }
                match self.indexed {
                    Some(i) if i == g => Ok(()),
                    Some(_) => Err(SKIP_GROUP),
                    None if e.meta.kv_cache_spec_kind.is_some() || g == 0 => {
                        self.indexed = Some(g);
                        Ok(())
                    }
                    None => Err(SKIP_GROUP),
                }
            }
            VllmEvent::BlockRemoved { .. } => match (group, self.indexed) {
                (None, _) => Ok(()),
                (Some(g), Some(i)) if g == i => Ok(()),
                (Some(g), indexed) => match self.unusable.get(&g) {
                    Some(&reason) => Err(reason),
                    None if indexed.is_none() => Ok(()),
                    None => Err(SKIP_GROUP),
                },
            },
        }
    }
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

fn event_from_map(m: &[(Value, Value)]) -> Result<DetailedEvent, DecodeError> {
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

fn event_from_array(a: &[Value]) -> Result<DetailedEvent, DecodeError> {
    let Some(kind) = a.first().and_then(Value::as_str) else {
        return err("event array without a type tag");
    };
    // Positions after the tag follow vLLM's field declaration order: BlockStored: hashes,
    // parent, token_ids, block_size, lora_id, medium, lora_name, extra_keys, group_idx,
    // kv_cache_spec_kind, kv_cache_spec_sliding_window, locality; BlockRemoved: hashes, medium,
    // group_idx, locality.
    event(kind, |_, pos| a.get(pos))
}

/// An optional field that must be a string when present.
fn opt_string(v: Option<&Value>, what: &str) -> Result<Option<String>, DecodeError> {
    match v {
        None | Some(Value::Nil) => Ok(None),
        Some(Value::String(s)) => match s.as_str() {
            Some(s) => Ok(Some(s.to_string())),
            None => err(format!("{what} is not UTF-8")),
        },
        Some(_) => err(format!("{what} must be a string")),
    }
}

fn opt_u32(v: Option<&Value>, what: &str) -> Result<Option<u32>, DecodeError> {
    match v {
        None | Some(Value::Nil) => Ok(None),
        Some(v) => u32_of(Some(v), what).map(Some),
    }
}

/// Builds an event from a field getter (by name for maps, by position for arrays).
fn event<'a>(
    kind: &str,
    get: impl Fn(&str, usize) -> Option<&'a Value>,
) -> Result<DetailedEvent, DecodeError> {
    match kind {
        "BlockStored" => Ok(DetailedEvent {
            event: VllmEvent::BlockStored {
                block_hashes: hashes(get("block_hashes", 1).unwrap_or(&Value::Nil))?,
                parent_block_hash: opt_hash(get("parent_block_hash", 2))?,
                token_ids: tokens(get("token_ids", 3).unwrap_or(&Value::Nil))?,
                block_size: u32_of(get("block_size", 4), "block_size")?,
                medium: opt_str(get("medium", 6)),
                lora_name: opt_str(get("lora_name", 7)),
            },
            meta: EventMeta {
                group_idx: opt_u32(get("group_idx", 9), "group_idx")?,
                kv_cache_spec_kind: opt_string(
                    get("kv_cache_spec_kind", 10),
                    "kv_cache_spec_kind",
                )?,
                kv_cache_spec_sliding_window: opt_u32(
                    get("kv_cache_spec_sliding_window", 11),
                    "kv_cache_spec_sliding_window",
                )?,
                locality: opt_string(get("locality", 12), "locality")?,
                // SGLang only (a map field; its events are never positional).
                cache_salt: opt_string(get("cache_salt", usize::MAX), "cache_salt")?,
            },
        }),
        "BlockRemoved" => Ok(DetailedEvent {
            event: VllmEvent::BlockRemoved {
                block_hashes: hashes(get("block_hashes", 1).unwrap_or(&Value::Nil))?,
                medium: opt_str(get("medium", 2)),
            },
            meta: EventMeta {
                group_idx: opt_u32(get("group_idx", 3), "group_idx")?,
                locality: opt_string(get("locality", 4), "locality")?,
                ..EventMeta::default()
            },
        }),
        "AllBlocksCleared" => Ok(DetailedEvent {
            event: VllmEvent::AllBlocksCleared,
            meta: EventMeta::default(),
        }),
        other => err(format!("unknown event type {other:?}")),
    }
}

/// Decodes a batch; [`decode_batch_detailed`] also reads what newer engines add.
pub fn decode_batch(payload: &[u8]) -> Result<VllmBatch, DecodeError> {
    let d = decode_batch_detailed(payload)?;
    Ok(VllmBatch {
        ts: d.ts,
        events: d.events.into_iter().map(|e| e.event).collect(),
        dp_rank: d.dp_rank,
    })
}

pub fn decode_batch_detailed(payload: &[u8]) -> Result<DetailedBatch, DecodeError> {
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
    Ok(DetailedBatch {
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

/// The tier of blocks in `medium`: blocks a publisher reports as `REMOTE` are not in its own
/// memory, whatever the medium, and count as external.
fn tier_with(medium: Option<&str>, meta: &EventMeta) -> StorageTier {
    if meta
        .locality
        .as_deref()
        .is_some_and(|l| l.eq_ignore_ascii_case("REMOTE"))
    {
        return StorageTier::External;
    }
    tier_of(medium)
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
    to_kv_event_with(e, &EventMeta::default(), source, event_id, block_size)
}

/// [`to_kv_event`] of a [`DetailedEvent`]: SGLang's `cache_salt` seeds the local hashes too (as
/// the router seeds a request's with its salt), `REMOTE` blocks are external. Whether the event
/// should be indexed at all is [`GroupFilter`]'s call.
pub fn to_kv_event_detailed(
    e: &DetailedEvent,
    source: WorkerRank,
    event_id: u64,
    block_size: u32,
) -> Result<KvEvent, ConvertError> {
    to_kv_event_with(&e.event, &e.meta, source, event_id, block_size)
}

fn to_kv_event_with(
    e: &VllmEvent,
    meta: &EventMeta,
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
            let seed = HashSeed::new(lora_name.as_deref(), meta.cache_salt.as_deref());
            let blocks = block_hashes
                .iter()
                .zip(token_ids.chunks_exact(bsz))
                .map(|(&h, toks)| StoredBlock {
                    hash: ExternalHash(h),
                    local: local_hash(toks, seed),
                })
                .collect();
            (
                tier_with(medium.as_deref(), meta),
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
            tier_with(medium.as_deref(), meta),
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

    fn map(fields: Vec<(&str, Value)>) -> Value {
        Value::Map(fields.into_iter().map(|(k, v)| (s(k), v)).collect())
    }

    fn ints(v: &[u64]) -> Value {
        Value::Array(v.iter().map(|&x| Value::from(x)).collect())
    }

    fn batch_bytes(events: Vec<Value>, rank: Value) -> Vec<u8> {
        let v = Value::Array(vec![Value::from(3.0), Value::Array(events), rank]);
        let mut buf = Vec::new();
        rmpv::encode::write_value(&mut buf, &v).unwrap();
        buf
    }

    /// A vLLM 0.34 BlockStored map as its msgspec encoder writes it (defaults omitted).
    fn stored_034(group: u64, kind: &str, window: Option<u64>) -> Value {
        let mut f = vec![
            ("type", s("BlockStored")),
            ("block_hashes", ints(&[11, 12])),
            ("parent_block_hash", Value::Nil),
            ("token_ids", ints(&[1, 2, 3, 4, 5, 6, 7, 8])),
            ("block_size", Value::from(4)),
            ("lora_id", Value::Nil),
            ("medium", s("GPU")),
            ("lora_name", Value::Nil),
            ("extra_keys", Value::Array(vec![Value::Nil, Value::Nil])),
            ("group_idx", Value::from(group)),
            ("kv_cache_spec_kind", s(kind)),
        ];
        if let Some(w) = window {
            f.push(("kv_cache_spec_sliding_window", Value::from(w)));
        }
        f.extend([
            ("locality", s("LOCAL")),
            ("session_id", s("s1")),
            (
                "lookahead_token_ids",
                Value::Array(vec![ints(&[5]), ints(&[9])]),
            ),
        ]);
        map(f)
    }

    fn removed_034(hash: u64, group: u64) -> Value {
        map(vec![
            ("type", s("BlockRemoved")),
            ("block_hashes", ints(&[hash])),
            ("medium", s("GPU")),
            ("group_idx", Value::from(group)),
        ])
    }

    #[test]
    fn reads_the_034_hybrid_model_fields() {
        let bytes = batch_bytes(
            vec![
                stored_034(1, "sliding_window", Some(128)),
                removed_034(11, 1),
            ],
            Value::from(2),
        );
        let d = decode_batch_detailed(&bytes).unwrap();
        assert_eq!(d.dp_rank, Some(2));
        assert_eq!(
            d.events[0].meta,
            EventMeta {
                group_idx: Some(1),
                kv_cache_spec_kind: Some("sliding_window".into()),
                kv_cache_spec_sliding_window: Some(128),
                locality: Some("LOCAL".into()),
                cache_salt: None,
            }
        );
        assert_eq!(
            d.events[0].event,
            VllmEvent::BlockStored {
                block_hashes: vec![11, 12],
                parent_block_hash: None,
                token_ids: (1..=8).collect(),
                block_size: 4,
                lora_name: None,
                medium: Some("GPU".into()),
            }
        );
        assert_eq!(
            d.events[1].meta,
            EventMeta {
                group_idx: Some(1),
                ..EventMeta::default()
            }
        );
        assert_eq!(d.events[0].meta.unusable_spec(), Some(SKIP_SPEC_KIND));
        // The plain decoder reads the same events, without the extra fields.
        let plain = decode_batch(&bytes).unwrap();
        let events: Vec<VllmEvent> = d.events.into_iter().map(|e| e.event).collect();
        assert_eq!(plain.events, events);
    }

    #[test]
    fn reads_sglang_fields() {
        let bytes = batch_bytes(
            vec![map(vec![
                ("type", s("BlockStored")),
                ("block_hashes", Value::Array(vec![Value::from(-5i64)])),
                ("parent_block_hash", Value::Nil),
                ("token_ids", ints(&[1, 2, 3, 4])),
                ("block_size", Value::from(4)),
                ("lora_id", Value::Nil),
                ("medium", s("CPU_PINNED")),
                ("cache_salt", s("tenant-1")),
                ("session_id", s("s1")),
                ("lora_name", s("adapter")),
            ])],
            Value::from(0),
        );
        let d = decode_batch_detailed(&bytes).unwrap();
        assert_eq!(d.events[0].meta.cache_salt.as_deref(), Some("tenant-1"));
        assert_eq!(d.events[0].meta.unusable_spec(), None);
        let e = to_kv_event_detailed(&d.events[0], WorkerRank::new(1, 0), 0, 4).unwrap();
        assert_eq!(e.tier, StorageTier::HostPinned);
        match e.data {
            KvEventData::Stored { blocks, .. } => {
                assert_eq!(blocks[0].hash, ExternalHash(u64::MAX - 4));
                // Seeded as the router seeds a request with this LoRA and salt.
                assert_eq!(
                    blocks[0].local,
                    local_hash(
                        &[1, 2, 3, 4],
                        HashSeed::new(Some("adapter"), Some("tenant-1"))
                    )
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn reads_the_new_fields_by_position_in_arrays() {
        let stored = Value::Array(vec![
            s("BlockStored"),
            ints(&[7]),
            Value::Nil,
            ints(&[1, 2, 3, 4]),
            Value::from(4),
            Value::Nil,
            s("GPU"),
            Value::Nil,
            Value::Nil,
            Value::from(2),
            s("mamba"),
            Value::Nil,
            s("REMOTE"),
        ]);
        let removed = Value::Array(vec![
            s("BlockRemoved"),
            ints(&[7]),
            s("GPU"),
            Value::from(2),
        ]);
        let d = decode_batch_detailed(&batch_bytes(vec![stored, removed], Value::Nil)).unwrap();
        assert_eq!(d.events[0].meta.group_idx, Some(2));
        assert_eq!(
            d.events[0].meta.kv_cache_spec_kind.as_deref(),
            Some("mamba")
        );
        assert_eq!(d.events[0].meta.locality.as_deref(), Some("REMOTE"));
        assert_eq!(d.events[1].meta.group_idx, Some(2));
    }

    #[test]
    fn refuses_mistyped_new_fields() {
        let with = |k: &str, v: Value| {
            let mut e = stored_034(0, "full_attention", None);
            if let Value::Map(m) = &mut e {
                for (key, val) in m.iter_mut() {
                    if key.as_str() == Some(k) {
                        *val = v.clone();
                    }
                }
            }
            decode_batch_detailed(&batch_bytes(vec![e], Value::Nil))
        };
        assert!(with("group_idx", Value::from(-1i64)).is_err());
        assert!(with("group_idx", s("0")).is_err());
        assert!(with("kv_cache_spec_kind", Value::from(1)).is_err());
        assert!(with("locality", Value::from(1)).is_err());
        assert!(with("group_idx", Value::Nil).is_ok());
    }

    fn detailed(bytes: &[u8]) -> Vec<DetailedEvent> {
        decode_batch_detailed(bytes).unwrap().events
    }

    #[test]
    fn one_full_attention_group_is_indexed_per_rank() {
        let events = detailed(&batch_bytes(
            vec![
                stored_034(1, "sliding_window", Some(128)),
                stored_034(0, "full_attention", None),
                // A second full-attention group holds the same blocks: not indexed twice.
                stored_034(3, "full_attention", None),
                stored_034(2, "mamba", None),
                stored_034(4, "full_attention", Some(64)),
                removed_034(11, 1),
                removed_034(11, 3),
                removed_034(12, 2),
                removed_034(12, 9),
                removed_034(12, 0),
                map(vec![("type", s("AllBlocksCleared"))]),
            ],
            Value::Nil,
        ));
        let mut f = GroupFilter::new();
        let got: Vec<_> = events.iter().map(|e| f.admit(e)).collect();
        assert_eq!(
            got,
            vec![
                Err(SKIP_SPEC_KIND),
                Ok(()),
                Err(SKIP_GROUP),
                Err(SKIP_SPEC_KIND),
                Err(SKIP_SLIDING_WINDOW),
                // The sliding window's eviction must not remove what group 0 still holds.
                Err(SKIP_SPEC_KIND),
                Err(SKIP_GROUP),
                Err(SKIP_SPEC_KIND),
                Err(SKIP_GROUP),
                Ok(()),
                Ok(()),
            ]
        );
        assert_eq!(f.indexed_group(), Some(0));
        // MLA is a full-prefix cache too.
        let mut f = GroupFilter::new();
        let mla = detailed(&batch_bytes(
            vec![stored_034(0, "mla_attention", None)],
            Value::Nil,
        ));
        assert_eq!(f.admit(&mla[0]), Ok(()));
    }

    #[test]
    fn unannotated_events_are_a_single_group() {
        let mut f = GroupFilter::new();
        // No group at all (older vLLM, SGLang): always indexed.
        for e in &sample().events {
            let d = DetailedEvent {
                event: e.clone(),
                meta: EventMeta::default(),
            };
            assert_eq!(f.admit(&d), Ok(()));
        }
        assert_eq!(f.indexed_group(), None);
        // A group but no spec: group 0 is taken as the model's only (full attention) group,
        // another one cannot be told apart.
        let stored = |g| DetailedEvent {
            event: sample().events[0].clone(),
            meta: EventMeta {
                group_idx: Some(g),
                ..EventMeta::default()
            },
        };
        let removed = |g| DetailedEvent {
            event: sample().events[1].clone(),
            meta: EventMeta {
                group_idx: Some(g),
                ..EventMeta::default()
            },
        };
        let mut f = GroupFilter::new();
        // Before anything is indexed a removal removes nothing: admitted.
        assert_eq!(f.admit(&removed(1)), Ok(()));
        assert_eq!(f.admit(&stored(1)), Err(SKIP_GROUP));
        assert_eq!(f.admit(&stored(0)), Ok(()));
        assert_eq!(f.admit(&removed(0)), Ok(()));
        assert_eq!(f.admit(&removed(1)), Err(SKIP_GROUP));
    }

    #[test]
    fn remote_blocks_are_external() {
        let mut e = DetailedEvent {
            event: sample().events[0].clone(),
            meta: EventMeta {
                locality: Some("REMOTE".into()),
                ..EventMeta::default()
            },
        };
        let tier = |e: &DetailedEvent| {
            to_kv_event_detailed(e, WorkerRank::new(1, 0), 0, 4)
                .unwrap()
                .tier
        };
        assert_eq!(tier(&e), StorageTier::External);
        e.meta.locality = Some("LOCAL".into());
        assert_eq!(tier(&e), StorageTier::Device);
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
