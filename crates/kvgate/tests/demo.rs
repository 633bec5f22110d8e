#![allow(clippy::unwrap_used, clippy::expect_used)]
//! `kvgate demo` runs end to end (a small, fast configuration) and reports both policies.

use std::process::Command;

#[test]
fn demo_runs_and_reports_both_policies() {
    let out = Command::new(env!("CARGO_BIN_EXE_kvgate"))
        .args([
            "demo",
            "--json",
            "--workers",
            "2",
            "--conversations",
            "8",
            "--duration-secs",
            "4",
            "--speedup-ratio",
            "20",
        ])
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    let policies = v["policies"].as_array().unwrap();
    assert_eq!(policies.len(), 2);
    let bound = v["reuse_bound"].as_f64().unwrap();
    assert!(bound > 0.3 && bound < 1.0, "{bound}");
    for p in policies {
        assert_eq!(p["errors"], 0, "{p}");
        assert!(p["requests"].as_u64().unwrap() > 20);
        let hit = p["hit_rate"].as_f64().unwrap();
        assert!((0.0..=bound + 1e-9).contains(&hit), "{p}");
        assert!(p["ttft_p50_ms"].as_f64().unwrap() > 0.0);
    }
    let kv = policies.iter().find(|p| p["policy"] == "kv").unwrap();
    assert!(kv["hit_rate"].as_f64().unwrap() > 0.2, "{kv}");
}
