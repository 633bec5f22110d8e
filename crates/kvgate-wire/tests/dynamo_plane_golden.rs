#![allow(clippy::unwrap_used, clippy::expect_used)]
//! kvgate's Dynamo event plane encoder against messages captured from a real Dynamo 1.6.1 worker
//! (`tests/fixtures/dynamo-1.6.1/`, see its README): decoding a captured message with kvgate's
//! decoder and encoding the result again gives the captured bytes back, exactly.

use kvgate_wire::dynamo::RouterEvent;
use kvgate_wire::dynamo_plane::{
    KV_EVENTS_TOPIC, KV_METRICS_TOPIC, KvMetrics, encode_envelope, encode_kv_events,
    encode_kv_metrics,
};
use std::path::PathBuf;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/dynamo-1.6.1")
}

fn read(name: &str) -> Vec<u8> {
    std::fs::read(fixtures().join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// The envelope's fields: (publisher_id, sequence, published_at, topic, payload).
fn envelope(msg: &[u8]) -> (u64, u64, u64, String, Vec<u8>) {
    let mut cursor = msg;
    let v = rmpv::decode::read_value(&mut cursor).unwrap();
    assert!(cursor.is_empty(), "one value per message");
    let map = v.as_map().unwrap();
    let get = |k: &str| {
        map.iter()
            .find(|(key, _)| key.as_str() == Some(k))
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("no {k}"))
    };
    let rmpv::Value::Binary(payload) = get("payload") else {
        panic!("payload is not bin")
    };
    (
        get("publisher_id").as_u64().unwrap(),
        get("sequence").as_u64().unwrap(),
        get("published_at").as_u64().unwrap(),
        get("topic").as_str().unwrap().to_string(),
        payload,
    )
}

fn reencode_kv_events(msg: &[u8]) -> Vec<u8> {
    let (publisher, seq, at, topic, _) = envelope(msg);
    assert_eq!(topic, KV_EVENTS_TOPIC);
    let (events, stamped) = RouterEvent::decode_message_stamped(msg).unwrap();
    assert_eq!(stamped, Some(at));
    encode_envelope(publisher, seq, at, &topic, &encode_kv_events(&events))
}

const KV_EVENT_FIXTURES: [&str; 7] = [
    "kv-events.stored-root.rank0.msgpack",
    "kv-events.stored-with-parent.rank0.msgpack",
    "kv-events.stored-14-blocks.rank0.msgpack",
    "kv-events.removed-1.rank0.msgpack",
    "kv-events.batch-removed-then-stored.rank0.msgpack",
    "kv-events.stored-root-15-blocks.rank1.msgpack",
    "kv-events.removed-1.rank1.msgpack",
];

#[test]
fn kv_events_reencode_to_the_captured_bytes() {
    for name in KV_EVENT_FIXTURES {
        let msg = read(name);
        assert_eq!(reencode_kv_events(&msg), msg, "{name}");
    }
}

#[test]
fn the_captured_fixtures_hold_what_their_names_say() {
    use kvgate_wire::dynamo::KvCacheEventData as D;
    let events = |name: &str| RouterEvent::decode_message(&read(name)).unwrap();
    let root = events("kv-events.stored-root.rank0.msgpack");
    assert_eq!(root.len(), 1);
    assert_eq!(root[0].worker_id, 9_450_797_095_980_962_858);
    assert_eq!(root[0].event.event_id, 1);
    let D::Stored(s) = &root[0].event.data else {
        panic!("{root:?}")
    };
    assert_eq!((s.parent_hash, s.blocks.len()), (None, 3));
    // A block's first block: its sequence hash is its tokens hash.
    assert_eq!(s.blocks[0].block_hash, s.blocks[0].tokens_hash);
    let child = events("kv-events.stored-with-parent.rank0.msgpack");
    let D::Stored(c) = &child[0].event.data else {
        panic!()
    };
    assert_eq!(c.parent_hash, Some(s.blocks[2].block_hash));
    let batch = events("kv-events.batch-removed-then-stored.rank0.msgpack");
    assert!(matches!(
        (&batch[0].event.data, &batch[1].event.data),
        (D::Removed(r), D::Stored(s)) if r.block_hashes.len() == 14 && s.blocks.len() == 14
    ));
    assert_eq!(batch[1].event.event_id, batch[0].event.event_id + 1);
    let rank1 = events("kv-events.stored-root-15-blocks.rank1.msgpack");
    assert_eq!(rank1[0].event.dp_rank, 1);
    let (p0, ..) = envelope(&read("kv-events.stored-root.rank0.msgpack"));
    let (p1, s1, ..) = envelope(&read("kv-events.stored-root-15-blocks.rank1.msgpack"));
    // One publisher per dp rank, each counting from 0.
    assert_ne!(p0, p1);
    assert_eq!(s1, 0);
}

/// Every kv-events message of the capture (both ranks, in order): the same bytes, and the
/// sequence of each publisher counts from 0 without a gap.
#[test]
fn the_whole_captured_stream_reencodes_exactly() {
    let text = String::from_utf8(read("kv-events.all.jsonl")).unwrap();
    let mut next: std::collections::HashMap<u64, u64> = Default::default();
    let mut n = 0;
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(
            v["subject"],
            "namespace.dynamo.component.backend.endpoint.generate.kv-events"
        );
        let msg = base64(v["data"].as_str().unwrap());
        assert_eq!(reencode_kv_events(&msg), msg, "line {n}");
        let (publisher, seq, ..) = envelope(&msg);
        let want = next.entry(publisher).or_insert(0);
        assert_eq!(seq, *want);
        *want += 1;
        n += 1;
    }
    assert!(n >= 40, "{n} messages");
    assert_eq!(next.len(), 2, "one publisher per dp rank");
}

#[test]
fn kv_metrics_reencode_to_the_captured_bytes() {
    for (name, rank, used) in [
        ("kv_metrics.rank0.msgpack", 0, 4),
        ("kv_metrics.rank1.msgpack", 1, 16),
    ] {
        let msg = read(name);
        let (publisher, seq, at, topic, payload) = envelope(&msg);
        assert_eq!(topic, KV_METRICS_TOPIC);
        let m = KvMetrics {
            worker_id: 9_450_797_095_980_962_858,
            dp_rank: rank,
            active_decode_blocks: None,
            active_prefill_tokens: None,
            kv_used_blocks: used,
        };
        assert_eq!(encode_kv_metrics(&m), payload, "{name}");
        assert_eq!(
            encode_envelope(publisher, seq, at, &topic, &payload),
            msg,
            "{name}"
        );
    }
}

fn base64(s: &str) -> Vec<u8> {
    base64::Engine::decode(&base64::engine::general_purpose::STANDARD, s).expect("base64")
}
