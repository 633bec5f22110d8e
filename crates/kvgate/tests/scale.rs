#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Small runs of the scale benchmarks in the suite, so that their figures and the JSON keys
//! operators script against stay real: `kvgate bench fleet` (in process) and the concurrent
//! phases of `kvgate bench epp` through real Envoy (needs `.tools` from scripts/setup.sh;
//! fails, never skips, without it).

mod common;

fn last_json(out: &std::process::Output) -> serde_json::Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "failed:\n{stdout}\n{stderr}");
    serde_json::from_str(stdout.lines().last().unwrap()).unwrap()
}

#[test]
fn bench_fleet_measures_decisions_memory_and_reloads() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kvgate"))
        .args([
            "bench",
            "fleet",
            "--ranks",
            "300",
            "--dp-size",
            "2",
            "--prompt-tokens",
            "256",
            "--requests",
            "300",
            "--json",
        ])
        .output()
        .unwrap();
    let j = last_json(&out);
    let f = &j["fleets"][0];
    assert_eq!(f["ranks"], 300, "{f}");
    assert_eq!(f["workers"], 150, "{f}");
    assert_eq!(f["requests"], 300, "{f}");
    for k in [
        "decision_p50_us",
        "decision_p99_us",
        "index_bytes_per_rank",
        "file_reload_ms",
        "discovery_first_sync_ms",
        "discovery_update_ms",
    ] {
        assert!(f[k].as_f64().unwrap() > 0.0, "{k}: {f}");
    }
    assert!(f["decision_p99_us"].as_f64() >= f["decision_p50_us"].as_f64());
    // Every rank holds its families' shared prefixes (3/4 of each prompt), and the requests
    // (families drawn at random) hit them.
    let blocks = f["indexed_blocks_per_rank"].as_f64().unwrap();
    assert!((blocks - 4.0 * 12.0).abs() < 1.0, "{f}");
    assert!(f["hit_rate"].as_f64().unwrap() > 0.5, "{f}");

    let (ok, err) = {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_kvgate"))
            .args(["bench", "fleet", "--ranks", "0"])
            .output()
            .unwrap();
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    assert!(!ok && err.contains("--ranks"), "{err}");
}

#[test]
fn bench_epp_reports_throughput_against_the_protocol_floor() {
    let tools = common::tools_dir();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kvgate"))
        .args([
            "bench",
            "epp",
            "--no-sequential",
            "--concurrency",
            "1,8",
            "--load-sizes",
            "2000",
            "--turns",
            "2",
            "--load-requests",
            "16",
            "--plaintext",
            "--json",
        ])
        .env("KVGATE_ENVOY", tools.join("bin/envoy"))
        .output()
        .unwrap();
    let j = last_json(&out);
    let keys = ["2k@1", "2k@8", "8k-multiturn@1", "8k-multiturn@8"];
    for k in keys {
        let r = j["throughput_ratio_vs_floor"][k]
            .as_f64()
            .unwrap_or(f64::NAN);
        assert!(r > 0.0, "{k}: {j}");
        assert!(j["added_p99_ms"][k].as_f64().is_some(), "{k}: {j}");
    }
    assert_eq!(
        j["throughput_ratio_vs_floor"].as_object().unwrap().len(),
        keys.len()
    );
    for p in j["load"].as_array().unwrap() {
        assert_eq!(p["errors"], 0, "{p}");
        // The EPP path tokenized and routed every request: its phase means are measured.
        assert!(p["tokenize_ms"].as_f64().unwrap() > 0.0, "{p}");
        assert!(p["decision_ms"].as_f64().unwrap() > 0.0, "{p}");
        assert!(p["epp_rps"].as_f64().unwrap() > 0.0 && p["floor_rps"].as_f64().unwrap() > 0.0);
    }
}
