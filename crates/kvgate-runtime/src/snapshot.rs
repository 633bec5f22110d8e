//! Where index snapshots live: a file, or an object in a JetStream object store bucket (so a
//! replacement pod without a volume restores the index). The format is
//! [`kvgate_core::snapshot`]; this module moves the bytes and turns them into an index.
//!
//! **Object store.** One object per router deployment (`--kv-snapshot-key`, default the event
//! stream's name), shared by its replicas: any replacement pod restores it. A put writes the
//! chunks under a fresh id and then publishes the object's metadata in one message, so a reader
//! sees either the previous object or the new one, never half of one; the reader checks the
//! SHA-256 digest the metadata names, and the snapshot carries its own checksum too.
//!
//! Replicas overwriting each other is harmless: every replica reads the same stream, and a
//! snapshot is an index together with the stream sequence it covers, so any replica's snapshot
//! is a valid starting point: a restore applies it and reads the stream from the sequence after.
//! A replica skips its write when the stored object already covers its sequence, so the newest
//! snapshot is not replaced by an older one in the common case; when two writes race, the older
//! may win, which only means reading a few more events after a restore.

use async_nats::jetstream;
use kvgate_core::incarnation::IncarnationRecord;
use kvgate_core::router::Router;
use kvgate_core::snapshot::{Encoder, SnapshotHeader};
use kvgate_wire::dynamo::RouterEvent;
use std::path::PathBuf;
use std::time::Instant;

/// Where the index snapshot is kept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SnapshotTarget {
    File(PathBuf),
    /// An object named `key` in the JetStream object store `bucket` (created when missing).
    Object {
        bucket: String,
        key: String,
    },
}

impl std::fmt::Display for SnapshotTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SnapshotTarget::File(p) => write!(f, "file {}", p.display()),
            SnapshotTarget::Object { bucket, key } => write!(f, "object {bucket}/{key}"),
        }
    }
}

/// Largest snapshot read back (a 1M-block index is ~26 MB).
pub const MAX_SNAPSHOT_BYTES: usize = 4 << 30;

/// Object store bucket names: what JetStream accepts.
pub fn check_bucket_name(b: &str) -> Result<(), String> {
    if b.is_empty()
        || !b
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(format!(
            "object store bucket {b:?} must be non-empty and made of ASCII letters, digits, '-' and '_'"
        ));
    }
    Ok(())
}

/// Object names: non-empty, not starting or ending with '.', printable ASCII without spaces.
pub fn check_object_key(k: &str) -> Result<(), String> {
    if k.is_empty()
        || k.starts_with('.')
        || k.ends_with('.')
        || !k.chars().all(|c| c.is_ascii_graphic())
    {
        return Err(format!(
            "snapshot key {k:?} must be non-empty printable ASCII without spaces, not starting or ending with '.'"
        ));
    }
    Ok(())
}

/// The index, the stream position and the ranks' publishers, encoded. The router is locked
/// while its index is dumped.
pub fn encode_router(
    router: &Router,
    stream: &str,
    stream_sequence: u64,
    incarnations: &[IncarnationRecord],
) -> Vec<u8> {
    let header = SnapshotHeader {
        stream: stream.to_string(),
        stream_sequence,
    };
    let mut enc = Encoder::new(&header, incarnations);
    router.index().dump_each(|e| enc.push(&e));
    enc.finish()
}

/// What a restore brought back.
#[derive(Debug)]
pub struct Restored {
    pub stream_sequence: u64,
    pub events: u64,
    pub incarnations: Vec<IncarnationRecord>,
    pub seconds: f64,
}

/// Checks `bytes` and applies them to `router`. A snapshot of another stream, of another
/// format, or damaged is an error, and nothing is applied.
pub fn restore_router(router: &mut Router, bytes: &[u8], stream: &str) -> Result<Restored, String> {
    let t0 = Instant::now();
    if bytes.first() == Some(&b'{') {
        return restore_json_v1(router, bytes, stream, t0);
    }
    let snap = kvgate_core::snapshot::decode(bytes).map_err(|e| e.to_string())?;
    if snap.header.stream != stream {
        return Err(format!(
            "snapshot of stream {:?}, not {stream:?}",
            snap.header.stream
        ));
    }
    // The checksum passed, so the events decode; check them all before applying any.
    if let Some(Err(e)) = snap.events().find(Result::is_err) {
        return Err(e.to_string());
    }
    let mut events = 0u64;
    for e in snap.events().flatten() {
        router.apply_event(&e);
        events += 1;
    }
    Ok(Restored {
        stream_sequence: snap.header.stream_sequence,
        events,
        incarnations: snap.incarnations,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// kvgate's first snapshot format (JSON, files only): still read, without incarnations.
#[derive(serde::Deserialize)]
struct JsonV1 {
    version: u32,
    stream: String,
    stream_sequence: u64,
    events: Vec<RouterEvent>,
}

fn restore_json_v1(
    router: &mut Router,
    bytes: &[u8],
    stream: &str,
    t0: Instant,
) -> Result<Restored, String> {
    let snap: JsonV1 = serde_json::from_slice(bytes).map_err(|e| format!("bad snapshot: {e}"))?;
    if snap.version != 1 || snap.stream != stream {
        return Err(format!(
            "snapshot of stream {:?} version {}, not {stream:?}",
            snap.stream, snap.version
        ));
    }
    for e in &snap.events {
        router.apply_event(&e.to_kv_event());
    }
    Ok(Restored {
        stream_sequence: snap.stream_sequence,
        events: snap.events.len() as u64,
        incarnations: Vec::new(),
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// A JetStream context on `client` (for callers that do not depend on async-nats themselves:
/// tests, benches).
pub fn context(client: async_nats::Client) -> jetstream::Context {
    jetstream::new(client)
}

/// The object store bucket, created when missing (by whichever replica comes first).
pub async fn object_store(
    js: &jetstream::Context,
    bucket: &str,
) -> Result<jetstream::object_store::ObjectStore, String> {
    if let Ok(s) = js.get_object_store(bucket).await {
        return Ok(s);
    }
    let created = js
        .create_object_store(jetstream::object_store::Config {
            bucket: bucket.to_string(),
            description: Some("kvgate router index snapshots".into()),
            storage: jetstream::stream::StorageType::File,
            ..Default::default()
        })
        .await;
    match created {
        Ok(s) => Ok(s),
        // Another replica created it meanwhile.
        Err(e) => js
            .get_object_store(bucket)
            .await
            .map_err(|e2| format!("object store {bucket}: cannot create ({e}) nor open ({e2})")),
    }
}

/// Reads the snapshot; `Ok(None)`: there is none yet.
pub async fn load(
    js: Option<&jetstream::Context>,
    target: &SnapshotTarget,
) -> Result<Option<Vec<u8>>, String> {
    match target {
        SnapshotTarget::File(path) => match tokio::fs::read(path).await {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("cannot read {}: {e}", path.display())),
        },
        SnapshotTarget::Object { bucket, key } => {
            use tokio::io::AsyncReadExt;
            let js = js.ok_or("an object store snapshot needs JetStream")?;
            let store = object_store(js, bucket).await?;
            let mut obj = match store.get(key).await {
                Ok(o) => o,
                Err(e) if e.kind() == jetstream::object_store::GetErrorKind::NotFound => {
                    return Ok(None);
                }
                Err(e) => return Err(format!("object {bucket}/{key}: {e}")),
            };
            let size = obj.info().size;
            if size > MAX_SNAPSHOT_BYTES {
                return Err(format!(
                    "object {bucket}/{key} is {size} bytes, over the {MAX_SNAPSHOT_BYTES} limit"
                ));
            }
            let mut bytes = Vec::with_capacity(size);
            // The reader checks the object's SHA-256 digest at the end.
            obj.read_to_end(&mut bytes)
                .await
                .map_err(|e| format!("object {bucket}/{key}: {e}"))?;
            if bytes.len() != size {
                return Err(format!(
                    "object {bucket}/{key}: read {} bytes of {size}",
                    bytes.len()
                ));
            }
            Ok(Some(bytes))
        }
    }
}

/// What a write did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stored {
    Written,
    /// The object store already holds a snapshot of this stream at this sequence or later
    /// (another replica wrote it).
    AlreadyNewer,
}

const META_STREAM: &str = "kvgate-stream";
const META_SEQUENCE: &str = "kvgate-stream-sequence";

/// Writes the snapshot: a file atomically (temp file + rename), an object by a put (readers
/// see the previous object or the new one). Unless `force`, an object is not replaced by an
/// older snapshot of the same stream (`force`: the stored one was found unusable).
pub async fn store(
    js: Option<&jetstream::Context>,
    target: &SnapshotTarget,
    stream: &str,
    stream_sequence: u64,
    bytes: Vec<u8>,
    force: bool,
) -> Result<Stored, String> {
    match target {
        SnapshotTarget::File(path) => {
            let path = path.clone();
            tokio::task::spawn_blocking(move || {
                let tmp = path.with_extension("tmp");
                std::fs::write(&tmp, &bytes)
                    .and_then(|()| std::fs::rename(&tmp, &path))
                    .map_err(|e| format!("cannot write {}: {e}", path.display()))
            })
            .await
            .map_err(|e| format!("snapshot writer: {e}"))??;
            Ok(Stored::Written)
        }
        SnapshotTarget::Object { bucket, key } => {
            let js = js.ok_or("an object store snapshot needs JetStream")?;
            let store = object_store(js, bucket).await?;
            if !force
                && let Ok(info) = store.info(key).await
                && info.metadata.get(META_STREAM).map(String::as_str) == Some(stream)
                && info
                    .metadata
                    .get(META_SEQUENCE)
                    .and_then(|s| s.parse::<u64>().ok())
                    .is_some_and(|s| s >= stream_sequence)
            {
                return Ok(Stored::AlreadyNewer);
            }
            let meta = jetstream::object_store::ObjectMetadata {
                name: key.clone(),
                description: Some("kvgate index snapshot".into()),
                metadata: [
                    (META_STREAM.to_string(), stream.to_string()),
                    (META_SEQUENCE.to_string(), stream_sequence.to_string()),
                ]
                .into_iter()
                .collect(),
                ..Default::default()
            };
            store
                .put(meta, &mut bytes.as_slice())
                .await
                .map_err(|e| format!("object {bucket}/{key}: {e}"))?;
            Ok(Stored::Written)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert!(check_bucket_name("kvgate-snapshots").is_ok());
        assert!(check_bucket_name("").is_err());
        assert!(check_bucket_name("a.b").is_err());
        assert!(check_bucket_name("a b").is_err());
        assert!(check_object_key("namespace-dynamo-component-backend-kv-events").is_ok());
        assert!(check_object_key("prod/epp").is_ok());
        assert!(check_object_key(".x").is_err());
        assert!(check_object_key("x y").is_err());
        assert!(check_object_key("").is_err());
    }
}
