//! kvgate's decoder on bytes captured from real Dynamo 1.6.1 workers (`fixtures/dynamo-1.6.1/`,
//! its README says how they were captured): every field kvgate reads, and the envelope's
//! per-publisher sequence.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use kvgate_core::envelope::{EnvelopeCheck, EnvelopeTracker};
use kvgate_core::{KvEventData, StorageTier};
use kvgate_wire::dynamo::{KvCacheEventData, RouterEvent};
use std::path::PathBuf;

const WORKER: u64 = 9450797095980962858;

fn fixture(name: &str) -> Vec<u8> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/dynamo-1.6.1")
        .join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn base64(s: &str) -> Vec<u8> {
    base64::Engine::decode(&base64::engine::general_purpose::STANDARD, s).expect("base64")
}

#[test]
fn stored_removed_and_batched_events_decode_with_their_envelope() {
    let d = RouterEvent::decode_envelope(&fixture("kv-events.stored-root.rank0.msgpack")).unwrap();
    let p = d
        .publisher
        .expect("a real worker's message has an envelope");
    assert_eq!(p.sequence, 0);
    assert!(d.published_at.unwrap() > 1_700_000_000_000);
    assert_eq!(d.events.len(), 1);
    let e = &d.events[0];
    assert_eq!(e.worker_id, WORKER);
    assert_eq!(e.event.dp_rank, 0);
    assert_eq!(e.storage_tier, StorageTier::Device);
    assert_eq!(e.residency_domain.as_deref(), Some("worker"));
    assert_eq!(e.unsupported(), None);
    let KvCacheEventData::Stored(root) = &e.event.data else {
        panic!("stored expected: {e:?}")
    };
    assert_eq!(root.parent_hash, None);
    assert_eq!(root.start_position, None);
    assert_eq!(root.blocks.len(), 3);
    // Dynamo's first block: the sequence hash is the block's own tokens hash.
    assert_eq!(root.blocks[0].block_hash, root.blocks[0].tokens_hash);
    assert_ne!(root.blocks[1].block_hash, root.blocks[1].tokens_hash);

    let d = RouterEvent::decode_envelope(&fixture("kv-events.stored-with-parent.rank0.msgpack"))
        .unwrap();
    assert_eq!(d.publisher.unwrap().id, p.id, "one publisher per rank");
    let KvCacheEventData::Stored(child) = &d.events[0].event.data else {
        panic!()
    };
    assert_eq!(child.parent_hash, Some(root.blocks[2].block_hash));
    assert_eq!(child.blocks.len(), 1);
    // The router's model: parent and blocks by engine hash, matched by tokens hash.
    match d.events[0].to_kv_event().data {
        KvEventData::Stored { parent, blocks } => {
            assert_eq!(parent.map(|h| h.0), Some(root.blocks[2].block_hash));
            assert_eq!(blocks[0].local.0, child.blocks[0].tokens_hash);
        }
        other => panic!("{other:?}"),
    }

    let d = RouterEvent::decode_envelope(&fixture("kv-events.removed-1.rank0.msgpack")).unwrap();
    let KvCacheEventData::Removed(r) = &d.events[0].event.data else {
        panic!()
    };
    assert_eq!(r.block_hashes.len(), 1);

    let d = RouterEvent::decode_envelope(&fixture(
        "kv-events.batch-removed-then-stored.rank0.msgpack",
    ))
    .unwrap();
    assert_eq!(d.events.len(), 2);
    assert!(
        matches!(&d.events[0].event.data, KvCacheEventData::Removed(r) if r.block_hashes.len() == 14)
    );
    assert!(matches!(&d.events[1].event.data, KvCacheEventData::Stored(s) if s.blocks.len() == 14));
    assert!(d.events[1].event.event_id > d.events[0].event.event_id);

    let d = RouterEvent::decode_envelope(&fixture("kv-events.stored-root-15-blocks.rank1.msgpack"))
        .unwrap();
    assert_eq!(d.events[0].event.dp_rank, 1);
    assert_eq!(d.events[0].worker_id, WORKER);
    let p1 = d.publisher.unwrap();
    assert_ne!(p1.id, p.id, "each dp rank has a publisher of its own");
    assert_eq!(p1.sequence, 0);
}

#[test]
fn a_whole_capture_decodes_in_sequence_and_each_rank_keeps_its_own_ids() {
    let text = String::from_utf8(fixture("kv-events.all.jsonl")).unwrap();
    let mut tracker = EnvelopeTracker::new(16);
    let mut events = 0;
    let mut last_id: std::collections::HashMap<u32, u64> = Default::default();
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(
            v["subject"],
            "namespace.dynamo.component.backend.endpoint.generate.kv-events"
        );
        let bytes = base64(v["data"].as_str().unwrap());
        let d = RouterEvent::decode_envelope(&bytes).unwrap();
        let p = d.publisher.unwrap();
        let check = tracker.offer(p.id, p.sequence, d.events.iter().map(|e| e.source()), false);
        assert_eq!(
            check,
            EnvelopeCheck::InOrder,
            "sequence {} of {}",
            p.sequence,
            p.id
        );
        for e in &d.events {
            assert_eq!(e.worker_id, WORKER);
            assert_eq!(e.unsupported(), None);
            // Event ids go up per rank without gaps.
            let prev = last_id.insert(e.event.dp_rank, e.event.event_id);
            if let Some(prev) = prev {
                assert_eq!(e.event.event_id, prev + 1, "rank {}", e.event.dp_rank);
            }
            events += 1;
        }
    }
    assert_eq!(tracker.len(), 2, "two publishers: one per dp rank");
    assert!(events >= 43, "{events} events");
}

#[test]
fn the_sibling_topics_are_not_kv_events() {
    // kv_metrics and forward-pass-metrics share the envelope, not the payload: a router that
    // subscribed to them by mistake must count errors, not index garbage.
    for f in [
        "kv_metrics.rank0.msgpack",
        "forward-pass-metrics.prefill.rank0.msgpack",
    ] {
        assert!(RouterEvent::decode_envelope(&fixture(f)).is_err(), "{f}");
    }
}
