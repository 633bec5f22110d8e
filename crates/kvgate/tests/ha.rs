//! A quick `kvgate bench ha`: three EPP replicas behind a real Envoy (the fail-open gateway),
//! real nats-server, mockers and sidecars, through a replica SIGKILL and restart, a NATS
//! restart, every replica down and all back. Needs `.tools` (scripts/setup.sh): Envoy and
//! nats-server.

use std::process::Command;

#[test]
fn bench_ha_routes_as_one_and_users_never_see_the_failures() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
    let out = Command::new(env!("CARGO_BIN_EXE_kvgate"))
        .args([
            "bench",
            "ha",
            "--envoy",
            &format!("{root}/.tools/bin/envoy"),
            "--nats-server",
            &format!("{root}/.tools/bin/nats-server"),
            "--conversations",
            "10",
            "--turns",
            "3",
            "--phase-secs",
            "3",
            "--json",
        ])
        .env_remove("DYN_ROUTER_TEMPERATURE")
        .output()
        .expect("run kvgate");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let v: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap_or(""))
        .unwrap_or_else(|e| panic!("{e}: {stdout}"));
    for k in [
        "replicas",
        "hit_ratio_vs_single",
        "ttft_p90_ratio_vs_single",
        "failed_during_kill",
        "inflight_at_kill",
        "leaked_bookings",
        "ready_after_restart_s",
        "fail_open_success_ratio",
        "hit_after_recovery_ratio",
    ] {
        assert!(!v[k].is_null(), "{k} missing: {v}");
    }
    let f = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    assert_eq!(v["replicas"], 3);
    // Every replica sees every engine's events and every other's bookings: as good as one.
    assert!(f("hit_ratio_vs_single") >= 0.95, "{v}");
    // Only the killed replica's own requests may fail.
    assert!(f("failed_during_kill") <= f("inflight_at_kill"), "{v}");
    assert_eq!(v["leaked_bookings"], 0, "{v}");
    assert!(f("ready_after_restart_s") <= 10.0, "{v}");
    assert!(f("fail_open_success_ratio") >= 0.99, "{v}");
    assert!(f("hit_after_recovery_ratio") >= 0.9, "{v}");
    // The restarted replica routes at its old hit rate (its index came back from the stream).
    assert!(f("restarted_hit_ratio") >= 0.9, "{v}");
    // No phase lost requests it should not have: the NATS restart costs none.
    let phases = v["phases"].as_array().unwrap();
    let nats = phases.iter().find(|p| p["name"] == "nats-restart").unwrap();
    assert_eq!(nats["failed"], 0, "{v}");
}
