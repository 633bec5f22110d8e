//! The binary format of an index snapshot: the index as `Stored` events (as
//! [`PrefixIndex::dump_events`](crate::index::PrefixIndex::dump_events) gives them), the stream
//! position they cover, and what is known about each rank's publishers
//! ([`IncarnationRecord`]). Where it is stored (a file, a JetStream object) is the adapter's
//! business; this module only turns it into bytes and back.
//!
//! Layout, little-endian:
//!
//! ```text
//! magic "KVGSNAP\0"  version u32 (2)
//! stream: len u16, UTF-8 bytes      stream_sequence u64
//! incarnations: count u32, each { worker u64, dp_rank u32, has_publisher u8, publisher u64, next_event_id u64 }
//! groups: count u32, each { worker u64, dp_rank u32, event_id u64, records u32,
//!     each record { flags u8 (bits 0-1 tier, 2-3 kind: 0 stored 1 removed 2 cleared, 4 has parent),
//!                   [parent u64], stored: n u32, n x { block_hash u64, tokens_hash u64 }
//!                                 removed: n u32, n x block_hash u64 } }
//! checksum: xxh3-64 of every byte before it, u64
//! ```
//!
//! Consecutive events of one rank with one event id share a group header, so a block costs
//! about 26 bytes (1M blocks: ~26 MB). Decoding checks the magic, the version and the checksum
//! before anything else, and every count against the bytes left, so a truncated, corrupted or
//! foreign object is refused with an error, never half-applied or over-allocated. Events are
//! decoded one at a time ([`Decoded::events`]): a restore never holds the whole event list.

use crate::events::{KvEvent, KvEventData, StoredBlock};
use crate::ids::{DpRank, ExternalHash, LocalHash, StorageTier, WorkerId, WorkerRank};
use crate::incarnation::IncarnationRecord;

pub const MAGIC: &[u8; 8] = b"KVGSNAP\0";
pub const VERSION: u32 = 2;

/// Where the snapshot sits in the event stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotHeader {
    /// The stream the events came from (another stream's snapshot is refused by the caller).
    pub stream: String,
    /// The last stream sequence whose events the snapshot includes.
    pub stream_sequence: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SnapshotError {
    #[error("not a kvgate index snapshot (bad magic)")]
    NotASnapshot,
    #[error("index snapshot version {0}, this kvgate reads version {VERSION}")]
    Version(u32),
    #[error("index snapshot checksum mismatch (corrupted or truncated)")]
    Checksum,
    #[error("index snapshot truncated in {0}")]
    Truncated(&'static str),
    #[error("index snapshot invalid: {0}")]
    Invalid(&'static str),
}

/// Encodes a snapshot.
pub fn encode(
    header: &SnapshotHeader,
    incarnations: &[IncarnationRecord],
    events: &[KvEvent],
) -> Vec<u8> {
    let mut enc = Encoder::new(header, incarnations);
    for e in events {
        enc.push(e);
    }
    enc.finish()
}

/// Encodes a snapshot one event at a time (with
/// [`PrefixIndex::dump_each`](crate::index::PrefixIndex::dump_each), the event list is never
/// held whole).
pub struct Encoder {
    out: Vec<u8>,
    groups: u32,
    /// Where the group count is written.
    groups_at: usize,
    /// The open group: source, event id, where its record count is written, records so far.
    group: Option<(WorkerRank, u64, usize, u32)>,
}

impl Encoder {
    pub fn new(header: &SnapshotHeader, incarnations: &[IncarnationRecord]) -> Self {
        let mut out = Vec::with_capacity(1 << 16);
        out.extend_from_slice(MAGIC);
        put_u32(&mut out, VERSION);
        let stream = header.stream.as_bytes();
        let stream = &stream[..stream.len().min(u16::MAX as usize)];
        out.extend_from_slice(&(stream.len() as u16).to_le_bytes());
        out.extend_from_slice(stream);
        put_u64(&mut out, header.stream_sequence);
        put_u32(&mut out, incarnations.len() as u32);
        for r in incarnations {
            put_u64(&mut out, r.rank.worker.0);
            put_u32(&mut out, r.rank.dp_rank.0);
            out.push(u8::from(r.publisher.is_some()));
            put_u64(&mut out, r.publisher.unwrap_or(0));
            put_u64(&mut out, r.next_event_id);
        }
        let groups_at = out.len();
        put_u32(&mut out, 0);
        Self {
            out,
            groups: 0,
            groups_at,
            group: None,
        }
    }

    pub fn push(&mut self, e: &KvEvent) {
        let same = self
            .group
            .is_some_and(|(s, id, _, n)| s == e.source && id == e.event_id && n < u32::MAX);
        if !same {
            self.close_group();
            put_u64(&mut self.out, e.source.worker.0);
            put_u32(&mut self.out, e.source.dp_rank.0);
            put_u64(&mut self.out, e.event_id);
            let at = self.out.len();
            put_u32(&mut self.out, 0);
            self.group = Some((e.source, e.event_id, at, 0));
            self.groups += 1;
        }
        if let Some(g) = &mut self.group {
            g.3 += 1;
        }
        let out = &mut self.out;
        let tier = e.tier.index() as u8;
        match &e.data {
            KvEventData::Stored { parent, blocks } => {
                out.push(tier | (u8::from(parent.is_some()) << 4));
                if let Some(p) = parent {
                    put_u64(out, p.0);
                }
                put_u32(out, blocks.len() as u32);
                for b in blocks {
                    put_u64(out, b.hash.0);
                    put_u64(out, b.local.0);
                }
            }
            KvEventData::Removed { blocks } => {
                out.push(tier | (1 << 2));
                put_u32(out, blocks.len() as u32);
                for b in blocks {
                    put_u64(out, b.0);
                }
            }
            KvEventData::Cleared => out.push(tier | (2 << 2)),
        }
    }

    fn close_group(&mut self) {
        if let Some((_, _, at, n)) = self.group.take() {
            self.out[at..at + 4].copy_from_slice(&n.to_le_bytes());
        }
    }

    pub fn finish(mut self) -> Vec<u8> {
        self.close_group();
        let at = self.groups_at;
        self.out[at..at + 4].copy_from_slice(&self.groups.to_le_bytes());
        let sum = xxhash_rust::xxh3::xxh3_64(&self.out);
        put_u64(&mut self.out, sum);
        self.out
    }
}

/// A checked snapshot: header and incarnations decoded, events decoded on demand.
#[derive(Debug)]
pub struct Decoded<'a> {
    pub header: SnapshotHeader,
    pub incarnations: Vec<IncarnationRecord>,
    groups: u32,
    body: &'a [u8],
}

/// Checks and decodes a snapshot's header.
pub fn decode(bytes: &[u8]) -> Result<Decoded<'_>, SnapshotError> {
    if bytes.len() < MAGIC.len() + 4 || &bytes[..MAGIC.len()] != MAGIC {
        return Err(SnapshotError::NotASnapshot);
    }
    let mut c = Cursor(&bytes[MAGIC.len()..]);
    let version = c.u32("version")?;
    if version != VERSION {
        return Err(SnapshotError::Version(version));
    }
    let Some(split) = bytes.len().checked_sub(8) else {
        return Err(SnapshotError::Truncated("checksum"));
    };
    if split < MAGIC.len() + 4 {
        return Err(SnapshotError::Truncated("checksum"));
    }
    let (content, sum) = bytes.split_at(split);
    let mut s = [0u8; 8];
    s.copy_from_slice(sum);
    if xxhash_rust::xxh3::xxh3_64(content) != u64::from_le_bytes(s) {
        return Err(SnapshotError::Checksum);
    }
    let mut c = Cursor(&content[MAGIC.len() + 4..]);
    let len = c.u16("stream name")? as usize;
    let name = c.take(len, "stream name")?;
    let stream = std::str::from_utf8(name)
        .map_err(|_| SnapshotError::Invalid("stream name is not UTF-8"))?
        .to_string();
    let stream_sequence = c.u64("stream sequence")?;
    let n = c.u32("incarnations")? as usize;
    if n.saturating_mul(29) > c.0.len() {
        return Err(SnapshotError::Truncated("incarnations"));
    }
    let mut incarnations = Vec::with_capacity(n);
    for _ in 0..n {
        let worker = c.u64("incarnations")?;
        let dp = c.u32("incarnations")?;
        let has = c.u8("incarnations")?;
        let publisher = c.u64("incarnations")?;
        let next_event_id = c.u64("incarnations")?;
        incarnations.push(IncarnationRecord {
            rank: WorkerRank::new(worker, dp),
            publisher: match has {
                0 => None,
                1 => Some(publisher),
                _ => return Err(SnapshotError::Invalid("publisher flag")),
            },
            next_event_id,
        });
    }
    let groups = c.u32("groups")?;
    Ok(Decoded {
        header: SnapshotHeader {
            stream,
            stream_sequence,
        },
        incarnations,
        groups,
        body: c.0,
    })
}

impl<'a> Decoded<'a> {
    /// The events, in the order they were encoded. An error ends the iteration (the checksum
    /// passed, so only a snapshot written by something else than this encoder gets there).
    pub fn events(&self) -> Events<'a> {
        Events {
            c: Cursor(self.body),
            groups_left: self.groups,
            group: None,
            failed: false,
        }
    }
}

/// Iterator over a snapshot's events.
pub struct Events<'a> {
    c: Cursor<'a>,
    groups_left: u32,
    /// (source, event id, records left) of the group being read.
    group: Option<(WorkerRank, u64, u32)>,
    failed: bool,
}

impl Events<'_> {
    fn next_event(&mut self) -> Result<Option<KvEvent>, SnapshotError> {
        let (source, event_id) = loop {
            match &mut self.group {
                Some((source, id, left)) if *left > 0 => {
                    *left -= 1;
                    break (*source, *id);
                }
                _ => {
                    if self.groups_left == 0 {
                        if !self.c.0.is_empty() {
                            return Err(SnapshotError::Invalid("bytes after the last event"));
                        }
                        return Ok(None);
                    }
                    self.groups_left -= 1;
                    let worker = self.c.u64("group")?;
                    let dp = self.c.u32("group")?;
                    let id = self.c.u64("group")?;
                    let records = self.c.u32("group")?;
                    self.group = Some((
                        WorkerRank {
                            worker: WorkerId(worker),
                            dp_rank: DpRank(dp),
                        },
                        id,
                        records,
                    ));
                }
            }
        };
        let flags = self.c.u8("event")?;
        if flags >> 5 != 0 {
            return Err(SnapshotError::Invalid("event flags"));
        }
        let tier = StorageTier::from_index((flags & 3) as usize);
        let data = match (flags >> 2) & 3 {
            0 => {
                let parent = if flags & (1 << 4) != 0 {
                    Some(ExternalHash(self.c.u64("parent")?))
                } else {
                    None
                };
                let n = self.c.u32("blocks")? as usize;
                if n.saturating_mul(16) > self.c.0.len() {
                    return Err(SnapshotError::Truncated("blocks"));
                }
                let mut blocks = Vec::with_capacity(n);
                for _ in 0..n {
                    let hash = ExternalHash(self.c.u64("blocks")?);
                    let local = LocalHash(self.c.u64("blocks")?);
                    blocks.push(StoredBlock { hash, local });
                }
                KvEventData::Stored { parent, blocks }
            }
            1 => {
                let n = self.c.u32("blocks")? as usize;
                if n.saturating_mul(8) > self.c.0.len() {
                    return Err(SnapshotError::Truncated("blocks"));
                }
                let mut blocks = Vec::with_capacity(n);
                for _ in 0..n {
                    blocks.push(ExternalHash(self.c.u64("blocks")?));
                }
                KvEventData::Removed { blocks }
            }
            2 => KvEventData::Cleared,
            _ => return Err(SnapshotError::Invalid("event kind")),
        };
        Ok(Some(KvEvent {
            source,
            event_id,
            tier,
            data,
        }))
    }
}

impl Iterator for Events<'_> {
    type Item = Result<KvEvent, SnapshotError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        match self.next_event() {
            Ok(e) => e.map(Ok),
            Err(e) => {
                self.failed = true;
                Some(Err(e))
            }
        }
    }
}

fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], SnapshotError> {
        if self.0.len() < n {
            return Err(SnapshotError::Truncated(what));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, SnapshotError> {
        Ok(self.take(1, what)?[0])
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, SnapshotError> {
        let mut b = [0u8; 2];
        b.copy_from_slice(self.take(2, what)?);
        Ok(u16::from_le_bytes(b))
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, SnapshotError> {
        let mut b = [0u8; 4];
        b.copy_from_slice(self.take(4, what)?);
        Ok(u32::from_le_bytes(b))
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, SnapshotError> {
        let mut b = [0u8; 8];
        b.copy_from_slice(self.take(8, what)?);
        Ok(u64::from_le_bytes(b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::PrefixIndex;
    use proptest::prelude::*;

    fn header() -> SnapshotHeader {
        SnapshotHeader {
            stream: "namespace-dynamo-component-backend-kv-events".into(),
            stream_sequence: 4242,
        }
    }

    fn stored(w: u64, id: u64, parent: Option<u64>, hashes: &[u64]) -> KvEvent {
        KvEvent {
            source: WorkerRank::new(w, 0),
            event_id: id,
            tier: StorageTier::Device,
            data: KvEventData::Stored {
                parent: parent.map(ExternalHash),
                blocks: hashes
                    .iter()
                    .map(|&h| StoredBlock {
                        hash: ExternalHash(h),
                        local: LocalHash(h ^ 0xabc),
                    })
                    .collect(),
            },
        }
    }

    fn sample() -> (Vec<IncarnationRecord>, Vec<KvEvent>) {
        let inc = vec![
            IncarnationRecord {
                rank: WorkerRank::new(1, 0),
                publisher: Some(77),
                next_event_id: 9,
            },
            IncarnationRecord {
                rank: WorkerRank::new(2, 3),
                publisher: None,
                next_event_id: 1,
            },
        ];
        let mut events = vec![
            stored(1, 8, None, &[1, 2, 3]),
            stored(1, 8, Some(3), &[4]),
            stored(2, 0, None, &[10]),
        ];
        events.push(KvEvent {
            source: WorkerRank::new(2, 3),
            event_id: 5,
            tier: StorageTier::HostPinned,
            data: KvEventData::Removed {
                blocks: vec![ExternalHash(10)],
            },
        });
        events.push(KvEvent {
            source: WorkerRank::new(2, 3),
            event_id: 6,
            tier: StorageTier::Disk,
            data: KvEventData::Cleared,
        });
        (inc, events)
    }

    #[test]
    fn round_trip() {
        let (inc, events) = sample();
        let bytes = encode(&header(), &inc, &events);
        let d = decode(&bytes).unwrap();
        assert_eq!(d.header, header());
        assert_eq!(d.incarnations, inc);
        let back: Vec<KvEvent> = d.events().collect::<Result<_, _>>().unwrap();
        assert_eq!(back, events);
    }

    #[test]
    fn corrupted_truncated_and_foreign_bytes_are_refused() {
        let (inc, events) = sample();
        let bytes = encode(&header(), &inc, &events);
        // Every single flipped byte is caught (magic, version or checksum).
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x40;
            assert!(decode(&b).is_err(), "flip at {i} accepted");
        }
        for n in 0..bytes.len() {
            assert!(decode(&bytes[..n]).is_err(), "truncated to {n} accepted");
        }
        assert_eq!(
            decode(b"{\"version\":1}").unwrap_err(),
            SnapshotError::NotASnapshot
        );
        let mut v3 = bytes.clone();
        v3[8] = 3;
        assert_eq!(decode(&v3).unwrap_err(), SnapshotError::Version(3));
    }

    #[test]
    fn counts_larger_than_the_bytes_are_refused_without_allocating() {
        // A well-formed checksum over a group claiming 4 billion blocks.
        let mut out = Vec::new();
        out.extend_from_slice(MAGIC);
        put_u32(&mut out, VERSION);
        out.extend_from_slice(&0u16.to_le_bytes());
        put_u64(&mut out, 0);
        put_u32(&mut out, 0);
        put_u32(&mut out, 1);
        put_u64(&mut out, 1);
        put_u32(&mut out, 0);
        put_u64(&mut out, 0);
        put_u32(&mut out, 1);
        out.push(0);
        put_u32(&mut out, u32::MAX);
        let sum = xxhash_rust::xxh3::xxh3_64(&out);
        put_u64(&mut out, sum);
        let d = decode(&out).unwrap();
        let got: Vec<_> = d.events().collect();
        assert_eq!(got, vec![Err(SnapshotError::Truncated("blocks"))]);
    }

    proptest! {
        /// An index rebuilt from its encoded snapshot dumps exactly the same events.
        #[test]
        fn an_index_survives_encode_and_decode(
            chains in proptest::collection::vec((0u64..4, 1usize..12, 0u64..50), 1..40),
        ) {
            let mut idx = PrefixIndex::new();
            for (i, (w, len, seed)) in chains.iter().enumerate() {
                let hashes: Vec<u64> = (0..*len as u64).map(|k| seed * 100 + k + 1).collect();
                idx.apply(&stored(*w, i as u64, None, &hashes));
            }
            let dump = idx.dump_events();
            let bytes = encode(&header(), &[], &dump);
            let d = decode(&bytes).unwrap();
            let mut restored = PrefixIndex::new();
            for e in d.events() {
                restored.apply(&e.unwrap());
            }
            prop_assert_eq!(restored.dump_events(), dump);
        }
    }
}
