#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The quick `kvgate bench abuse` in the suite: real Envoy, NATS, EPP, sidecars and mockers
//! under aborted streams, slow-loris bodies, oversized bodies, unknown models, a KV event
//! flood and a garbage replica-sync peer, with well-formed requests alongside. Needs `.tools`
//! (scripts/setup.sh); fails, never skips, without it.

mod common;

#[test]
fn abuse_leaves_no_damage() {
    let tools = common::tools_dir();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kvgate"))
        .args(["bench", "abuse", "--quick", "--json"])
        .env("KVGATE_ENVOY", tools.join("bin/envoy"))
        .env("KVGATE_NATS_SERVER", tools.join("bin/nats-server"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "bench abuse failed:\n{stdout}\n{stderr}"
    );
    let j: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    for (k, want) in [
        ("panics", 0),
        ("leaked_bookings", 0),
        ("good_requests_failed", 0),
        ("unexpected_answers", 0),
    ] {
        assert_eq!(j[k], want, "{k}: {j}");
    }
    assert!(
        j["rss_growth_mb"].as_f64().unwrap() <= j["rss_bound_mb"].as_f64().unwrap(),
        "{j}"
    );
    // The hostile inputs reached the EPP, and good traffic ran beside them.
    assert!(j["inputs_fuzzed"].as_u64().unwrap() >= 5000, "{j}");
    assert!(j["good_requests"].as_u64().unwrap() > 10, "{j}");
    for k in [
        "epp_events_unknown_worker",
        "epp_event_decode_errors",
        "epp_sync_malformed",
        "epp_streams_aborted",
        "epp_413",
    ] {
        assert!(j[k].as_f64().unwrap() > 0.0, "{k}: {j}");
    }
}
