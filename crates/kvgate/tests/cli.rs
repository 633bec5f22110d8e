//! The `kvgate` binary's debugging utilities, run as a user would.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

fn kvgate(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_kvgate"))
        .args(args)
        .env_remove("DYN_ROUTER_TEMPERATURE")
        .output()
        .expect("run kvgate");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn hash_prints_dynamo_hashes_as_json() {
    let tokens: Vec<String> = (0..64).map(|t: u32| t.to_string()).collect();
    let (ok, out, err) = kvgate(&["hash", "--block-size", "16", "--tokens", &tokens.join(",")]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["local"][0].as_u64(), Some(15310707395893867146));
    assert_eq!(v["sequence"][2].as_u64(), Some(11879827756109914528));
    assert_eq!(v["sequence"].as_array().unwrap().len(), 4);
    // decimal numbers, exactly as printed by Dynamo's vectors
    assert!(out.contains("15310707395893867146"));
}

#[test]
fn hash_with_lora_and_salt() {
    let (ok, out, _) = kvgate(&[
        "hash",
        "--block-size",
        "4",
        "--lora",
        "my-lora",
        "--salt",
        "tenant-a",
        "--tokens",
        "1,2,3,4,5,6,7,8",
    ]);
    assert!(ok);
    assert_eq!(
        out.trim(),
        r#"{"local":[6157910915076630503,3256431856703716508],"sequence":[6157910915076630503,9770935122131878621]}"#
    );
}

#[test]
fn hash_rejects_bad_tokens_clearly() {
    let (ok, _, err) = kvgate(&["hash", "--block-size", "4", "--tokens", "1,2,x"]);
    assert!(!ok);
    assert!(err.contains("token #3"), "{err}");
    let (ok, _, err) = kvgate(&["hash", "--block-size", "0", "--tokens", "1"]);
    assert!(!ok);
    assert!(err.contains("block-size"), "{err}");
    let (ok, _, err) = kvgate(&["hash", "--block-size", "4", "--tokens", "-1"]);
    assert!(!ok);
    assert!(err.contains("token #1"), "{err}");
}

#[test]
fn worker_id_for_pod_name() {
    let (ok, out, _) = kvgate(&["worker-id", "vllm-worker-0"]);
    assert!(ok);
    assert_eq!(out.trim(), "3637812819037538");
}

#[test]
fn config_refuses_bad_env_naming_it() {
    let out = Command::new(env!("CARGO_BIN_EXE_kvgate"))
        .arg("config")
        .env("DYN_ROUTER_TEMPERATURE", "-1")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("DYN_ROUTER_TEMPERATURE") && err.contains("[0, +inf)"),
        "{err}"
    );
    let (ok, out, _) = kvgate(&["config", "--router-temperature", "0.25"]);
    assert!(ok);
    assert!(
        out.contains("DYN_ROUTER_TEMPERATURE") && out.contains("0.25"),
        "{out}"
    );
}

#[test]
fn bench_replay_prints_every_policy_as_json_within_the_bound() {
    let plot = std::env::temp_dir().join(format!("kvgate-replay-{}.svg", std::process::id()));
    let (ok, out, err) = kvgate(&[
        "bench",
        "replay",
        "--requests",
        "300",
        "--workers",
        "4",
        "--tokens-per-trace-block",
        "64",
        "--rate-scale",
        "4",
        "--json",
        "--plot",
        plot.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let svg = std::fs::read_to_string(&plot).unwrap();
    let _ = std::fs::remove_file(&plot);
    assert!(svg.starts_with("<svg") && svg.ends_with("</svg>"), "{svg}");
    for name in ["random", "gaie-default", "kvgate", "reuse bound"] {
        assert!(svg.contains(name), "{name} missing from the plot");
    }
    assert_eq!(svg.matches("<polyline").count(), 9);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let bound = v["reuse_bound"].as_f64().unwrap();
    assert!(bound > 0.0 && bound < 1.0, "{v}");
    let policies = v["policies"].as_object().unwrap();
    assert_eq!(policies.len(), 9, "{v}");
    for (name, p) in policies {
        assert_eq!(p["completed"], 300, "{name}");
        let hit = p["hit_rate"].as_f64().unwrap();
        assert!(
            (0.0..=bound + 1e-9).contains(&hit),
            "{name}: {hit} vs {bound}"
        );
        for k in [
            "ttft_p50_ms",
            "ttft_p90_ms",
            "ttft_p99_ms",
            "e2e_p50_ms",
            "throughput_tok_s",
        ] {
            assert!(p[k].as_f64().unwrap() > 0.0, "{name} {k}");
        }
    }
    // The cache-aware policies find reuse that random routing mostly misses.
    let hit = |n: &str| policies[n]["hit_rate"].as_f64().unwrap();
    assert!(hit("kvgate") > hit("random"), "{v}");
}

/// The quick version of the capacity sweep: a short trace, a fixed grid from light load to far
/// past every knee, on 4 engines.
#[test]
fn bench_replay_sweep_reports_capacity_at_the_slo() {
    let plot = std::env::temp_dir().join(format!("kvgate-sweep-{}.svg", std::process::id()));
    let args = [
        "bench",
        "replay",
        "--sweep",
        "--requests",
        "400",
        "--workers",
        "4",
        "--tokens-per-trace-block",
        "64",
        "--num-gpu-blocks",
        "2048",
        "--policies",
        "round-robin,gaie-default,llm-d-default,lmetric,dynamo,kvgate",
        "--scales",
        "1,4,16,64",
        "--slo-ttft-p90-ms",
        "500",
        "--json",
        "--plot",
        plot.to_str().unwrap(),
    ];
    let (ok, out, err) = kvgate(&args);
    assert!(ok, "{err}");
    let svg = std::fs::read_to_string(&plot).unwrap();
    let _ = std::fs::remove_file(&plot);
    assert!(svg.starts_with("<svg") && svg.ends_with("</svg>"), "{svg}");
    // Two panels (TTFT p90, hit rate) per policy.
    assert_eq!(svg.matches("<polyline").count(), 12);
    let v: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    let sw = &v["sweep"];
    assert_eq!(sw["default_policy"], "kvgate");
    assert_eq!(sw["slo_ttft_p90_ms"], 500.0);
    assert_eq!(sw["scales"].as_array().unwrap().len(), 4);
    let cap = |n: &str| sw["capacity"][n]["rate_scale"].as_f64().unwrap();
    for n in [
        "round-robin",
        "gaie-default",
        "llm-d-default",
        "lmetric",
        "dynamo",
        "kvgate",
    ] {
        let pts = sw["points"][n].as_array().unwrap();
        assert_eq!(pts.len(), 4, "{n}");
        for p in pts {
            let p90 = p["ttft_p90_ms"].as_f64().unwrap();
            assert!(
                p90 > 0.0 && p["output_tok_s"].as_f64().unwrap() > 0.0,
                "{n}: {p}"
            );
        }
        // Light load meets the objective; 64x the trace's rate on 4 engines does not.
        let first = pts[0]["ttft_p90_ms"].as_f64().unwrap();
        let last = pts[3]["ttft_p90_ms"].as_f64().unwrap();
        assert!(first <= 500.0 && last > 500.0, "{n}: {first} .. {last}");
        assert!(cap(n) >= 1.0 && cap(n) < 64.0, "{n}: {}", cap(n));
    }
    assert!(cap("kvgate") > cap("round-robin"), "{sw}");
    let verdict = &v["verdict"];
    for k in ["ratio_to_best_other", "ratio_to_round_robin"] {
        assert!(verdict[k].as_f64().unwrap() > 0.0, "{k}: {verdict}");
    }
    // Deterministic: the same sweep gives the same figures.
    let (ok, again, err) = kvgate(&args);
    assert!(ok, "{err}");
    let w: serde_json::Value = serde_json::from_str(again.lines().last().unwrap()).unwrap();
    assert_eq!(v["sweep"], w["sweep"]);
}

#[test]
fn gen_trace_writes_a_deterministic_trace_that_replays() {
    let dir = std::env::temp_dir().join(format!("kvgate-gen-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let a = dir.join("a.jsonl");
    let b = dir.join("b.jsonl");
    for f in [&a, &b] {
        let (ok, _, err) = kvgate(&[
            "bench",
            "gen-trace",
            "--shape",
            "agent",
            "--seed",
            "7",
            "--requests",
            "200",
            "--out",
            f.to_str().unwrap(),
        ]);
        assert!(ok, "{err}");
    }
    let text = std::fs::read_to_string(&a).unwrap();
    assert_eq!(text, std::fs::read_to_string(&b).unwrap());
    assert_eq!(text.lines().count(), 200);
    let row: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    for k in ["timestamp", "input_length", "output_length", "hash_ids"] {
        assert!(!row[k].is_null(), "{k} missing: {row}");
    }
    let (ok, out, err) = kvgate(&[
        "bench",
        "replay",
        "--trace",
        a.to_str().unwrap(),
        "--policies",
        "kvgate",
        "--rate-scale",
        "1",
        "--workers",
        "2",
        "--json",
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(v["policies"]["kvgate"]["completed"], 200, "{v}");
    let (ok, _, err) = kvgate(&["bench", "gen-trace", "--shape", "essays"]);
    assert!(
        !ok && err.contains("unknown trace shape \"essays\""),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bench_replay_names_what_is_wrong() {
    let (ok, _, err) = kvgate(&[
        "bench",
        "replay",
        "--policies",
        "fastest",
        "--requests",
        "5",
    ]);
    assert!(!ok);
    assert!(err.contains("unknown policy \"fastest\""), "{err}");
    let (ok, _, err) = kvgate(&["bench", "replay", "--trace", "/nonexistent.jsonl"]);
    assert!(!ok);
    assert!(err.contains("cannot read the trace"), "{err}");
    let (ok, _, err) = kvgate(&["bench", "replay", "--requests", "5", "--plot", "out.png"]);
    assert!(!ok);
    assert!(err.contains("name the file *.svg"), "{err}");
}

#[test]
fn bench_replay_compares_router_replicas_with_one() {
    let (ok, out, err) = kvgate(&[
        "bench",
        "replay",
        "--router-replicas",
        "4",
        "--replica-sync",
        "on,off",
        "--replica-sync-delay-ms",
        "0,200",
        "--requests",
        "600",
        "--workers",
        "4",
        "--tokens-per-trace-block",
        "64",
        "--num-gpu-blocks",
        "4096",
        "--max-output-tokens",
        "32",
        "--rate-scale",
        "1",
        "--json",
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(v["router_replicas"], 4, "{v}");
    let rows = v["vs_single"].as_object().unwrap();
    let names: Vec<&str> = rows.keys().map(String::as_str).collect();
    for n in [
        "kvgate",
        "kvgate@4/sync-0ms/round-robin",
        "kvgate@4/sync-200ms/round-robin",
        "kvgate@4/unsynced/round-robin",
    ] {
        assert!(names.contains(&n), "{n} missing: {names:?}");
        // Every replica's bookings, own and synced, return to zero once all is finished.
        assert_eq!(rows[n]["open_bookings_at_end"], 0, "{n}: {v}");
        assert_eq!(v["policies"][n]["completed"], 600, "{n}");
    }
    assert_eq!(rows["kvgate"]["hit_ratio_vs_single"], 1.0);
    // Synced at once, four replicas see what one sees: the same events and the same load.
    let synced = rows["kvgate@4/sync-0ms/round-robin"]["hit_ratio_vs_single"]
        .as_f64()
        .unwrap();
    assert!(synced > 0.9, "{v}");
    let (ok, _, err) = kvgate(&[
        "bench",
        "replay",
        "--router-replicas",
        "4",
        "--replica-base-policy",
        "round-robin",
        "--requests",
        "5",
    ]);
    assert!(
        !ok && err.contains("only kvgate and dynamo can run as replicas"),
        "{err}"
    );
    let (ok, _, err) = kvgate(&[
        "bench",
        "replay",
        "--router-replicas",
        "4",
        "--replica-sync",
        "sometimes",
        "--requests",
        "5",
    ]);
    assert!(!ok && err.contains("--replica-sync \"sometimes\""), "{err}");
}

#[test]
fn bench_replay_real_agrees_with_the_simulation_on_real_engines() {
    // Needs `.tools/bin/envoy` (scripts/setup.sh) for the gateway path; fails without it.
    let envoy = concat!(env!("CARGO_MANIFEST_DIR"), "/../../.tools/bin/envoy");
    let (ok, out, err) = kvgate(&[
        "bench",
        "replay",
        "--real",
        "--envoy",
        envoy,
        // A debug build behind Envoy: wider than the release default of 1.5.
        "--ttft-tolerance",
        "2",
        "--requests",
        "80",
        "--workers",
        "2",
        "--tokens-per-trace-block",
        "64",
        "--max-output-tokens",
        "8",
        "--num-gpu-blocks",
        "2048",
        "--rate-scale",
        "2",
    ]);
    assert!(ok, "{out}\n{err}");
    for row in [
        "| round-robin vs round-robin |",
        "| kv vs kvgate |",
        "| envoy+epp vs kvgate |",
    ] {
        let line = out
            .lines()
            .find(|l| l.starts_with(row))
            .unwrap_or_else(|| panic!("{row} missing:\n{out}"));
        assert!(line.ends_with("| 0 | yes |"), "{line}");
    }
}

#[test]
fn render_prints_the_objects_for_a_graph_and_names_bad_input() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
    let example = format!("{root}/deploy/examples/dgd-aggregated.yaml");
    let (ok, out, err) = kvgate(&["render", "-f", &example]);
    assert!(ok, "{err}");
    let golden = std::fs::read_to_string(format!(
        "{root}/crates/kvgate-k8s/tests/golden/aggregated.yaml"
    ))
    .unwrap();
    assert_eq!(out, golden);
    let (ok, out, err) = kvgate(&[
        "render",
        "-f",
        &example,
        "--service-mesh",
        "--failure-mode",
        "FailOpen",
    ]);
    assert!(ok, "{err}");
    assert!(
        out.contains("kind: DestinationRule") && out.contains("failureMode: FailOpen"),
        "{out}"
    );
    let (ok, _, err) = kvgate(&[
        "render",
        "-f",
        &example,
        "--service-mesh",
        "--istio-tls-mode",
        "MUTUAL",
    ]);
    assert!(!ok);
    assert!(
        err.contains("MUTUAL needs --istio-client-certificate"),
        "{err}"
    );
    let (ok, _, err) = kvgate(&["render", "-f", "/nonexistent.yaml"]);
    assert!(!ok);
    assert!(err.contains("cannot read /nonexistent.yaml"), "{err}");
}

#[test]
fn operator_options_are_checked_before_it_needs_a_cluster() {
    let cases: [(&[&str], &str); 5] = [
        (
            &["operator", "--leader-election-renew-deadline-seconds", "20"],
            "must be longer than the renew deadline",
        ),
        (
            &["operator", "--service-mesh", "--istio-tls-mode", "MUTUAL"],
            "MUTUAL needs --istio-client-certificate",
        ),
        (
            &[
                "operator",
                "--service-mesh",
                "--service-mesh-provider",
                "linkerd",
            ],
            "only istio is supported",
        ),
        (
            &["operator", "--watch-namespace", "Not_A_Namespace"],
            "is not a namespace name",
        ),
        (&["operator", "--requeue-seconds", "0"], "--requeue-seconds"),
    ];
    for (args, want) in cases {
        let (ok, _, err) = kvgate(args);
        assert!(!ok && err.contains(want), "{args:?}: {err}");
    }
    // Valid options and no cluster: the error says what is missing.
    let (ok, _, err) = Command::new(env!("CARGO_BIN_EXE_kvgate"))
        .args(["operator", "--metrics-port", "0"])
        .env("KUBECONFIG", "/nonexistent/kubeconfig")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .output()
        .map(|o| {
            (
                o.status.success(),
                (),
                String::from_utf8_lossy(&o.stderr).into_owned(),
            )
        })
        .unwrap();
    assert!(
        !ok && err.contains("the operator needs the Kubernetes API"),
        "{err}"
    );
}

#[test]
fn epp_worker_sources_are_one_or_the_other() {
    let cases: [(&[&str], &str); 10] = [
        (
            &["epp"],
            "give --workers FILE, or --model for pod discovery",
        ),
        (
            &["epp", "--model", "m", "--unready-grace-secs", "-1"],
            "must be between 0 and 3600 seconds",
        ),
        (
            &["epp", "--model", "m", "--endpoint-selector", "app=x"],
            "--endpoint-selector needs --target-ports",
        ),
        (
            &["epp", "--model", "m", "--target-ports", "8000"],
            "--target-ports needs --endpoint-selector",
        ),
        (
            &["epp", "--workers", "w.yaml", "--model", "m"],
            "use one or the other",
        ),
        (
            &["epp", "--discovery-backend", "file"],
            "--discovery-backend file needs --discovery-file-dir (DYN_FILE_KV)",
        ),
        (
            &["epp", "--discovery-backend", "etcd"],
            "--discovery-backend etcd needs --etcd-endpoints (ETCD_ENDPOINTS)",
        ),
        (
            &[
                "epp",
                "--discovery-backend",
                "etcd",
                "--etcd-endpoints",
                "127.0.0.1:2379",
            ],
            "is not an http:// URL",
        ),
        (
            &[
                "epp",
                "--discovery-backend",
                "file",
                "--discovery-file-dir",
                "/tmp",
                "--dynamo-sidecar-url",
                "ftp://{host}:8000",
            ],
            "--dynamo-sidecar-url \"ftp://{host}:8000\" is not an http:// URL",
        ),
        (
            &[
                "epp",
                "--discovery-backend",
                "file",
                "--discovery-file-dir",
                "/tmp",
                "--dynamo-endpoint",
                "gen.erate",
            ],
            "--dynamo-endpoint \"gen.erate\" must be non-empty",
        ),
    ];
    for (args, want) in cases {
        let (ok, _, err) = kvgate(args);
        assert!(!ok, "{args:?}");
        assert!(err.contains(want), "{args:?}: {err}");
    }
}
