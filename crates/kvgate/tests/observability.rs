#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Observability on the ecosystem's own tools, end to end with real processes:
//! - traces: real Envoy 1.40 with its OpenTelemetry tracer (`deploy/envoy/tracing.yaml`) →
//!   `kvgate epp` → `kvgate frontend --router-mode direct` → `kvgate mocker`, all exporting
//!   OTLP/gRPC to a real receiver (the official opentelemetry-proto TraceService on grpcio,
//!   `scripts/otlp_receiver.py`): one trace per request, with the spans and attributes the docs
//!   name;
//! - metrics: a real Prometheus 2.42 (Debian's) scrapes the EPP, the frontends and the mockers,
//!   and every query of the Grafana dashboard (`deploy/grafana/kvgate.json`) returns data.
//!   With `KVGATE_DASHBOARD_PNG=path` the test also draws the dashboard from those series
//!   (`scripts/render_dashboard.py`; how docs/img/dashboard.png was made).
//!
//! Needs `.tools` (scripts/setup.sh installs Envoy, Prometheus and the receiver's packages);
//! fails, never skips, without it.

mod common;

use common::*;
use serde_json::Value;
use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn python() -> PathBuf {
    let p = tools_dir().join("venv/bin/python");
    assert!(
        p.exists(),
        "{} missing: run scripts/setup.sh (the README's test command does)",
        p.display()
    );
    p
}

/// A child process killed on drop.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The OTLP receiver: its port and the file it writes spans to.
struct Receiver {
    _child: Killed,
    port: u16,
    out: PathBuf,
}

fn receiver(dir: &TempDir) -> Receiver {
    let out = dir.0.join("spans.jsonl");
    let mut child = Command::new(python())
        .arg(repo().join("scripts/otlp_receiver.py"))
        .args(["--port", "0", "--out"])
        .arg(&out)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the OTLP receiver");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let port = line
        .trim()
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("receiver printed {line:?}"));
    Receiver {
        _child: Killed(child),
        port,
        out,
    }
}

fn spans(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// `deploy/envoy/tracing.yaml`'s fragments, by marker.
fn tracing_fragments() -> HashMap<String, String> {
    let text = std::fs::read_to_string(repo().join("deploy/envoy/tracing.yaml")).unwrap();
    let mut out: HashMap<String, String> = HashMap::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# @") {
            current = rest.split(':').next().map(str::to_string);
            out.insert(current.clone().unwrap(), String::new());
        } else if line.starts_with('#') {
            continue;
        } else if let Some(c) = &current {
            let f = out.get_mut(c).unwrap();
            f.push_str(line);
            f.push('\n');
        }
    }
    for k in ["http_connection_manager", "clusters", "bootstrap"] {
        assert!(out.get(k).is_some_and(|f| !f.is_empty()), "fragment {k}");
    }
    out
}

fn indent(text: &str, by: &str) -> String {
    text.lines().map(|l| format!("{by}{l}\n")).collect()
}

/// The gateway with the tracing fragments spliced in where their markers say.
fn traced_gateway(cfg: String, otlp_port: u16) -> String {
    let f = tracing_fragments();
    let port = otlp_port.to_string();
    let sub = |s: &str| {
        s.replace("${OTLP_HOST}", "127.0.0.1")
            .replace("${OTLP_PORT}", &port)
    };
    let mut out = String::new();
    for line in cfg.lines() {
        out.push_str(line);
        out.push('\n');
        let pad = &line[..line.len() - line.trim_start().len()];
        if line.trim_start() == "stat_prefix: gateway" {
            out.push_str(&indent(&sub(&f["http_connection_manager"]), pad));
        } else if line.trim_start() == "clusters:" {
            out.push_str(&indent(&sub(&f["clusters"]), pad));
        }
    }
    out.push_str(&sub(&f["bootstrap"]));
    assert!(out.contains("envoy.tracers.opentelemetry") && out.contains("name: otlp"));
    out
}

/// Mockers, direct-mode sidecars and an EPP, every kvgate process with `env`.
struct Pool {
    mockers: Vec<Proc>,
    sidecars: Vec<Proc>,
    epp: Proc,
    dir: TempDir,
}

fn pool(n: usize, env: &[(&str, &str)]) -> Pool {
    let ids: Vec<u64> = (0..n as u64).map(|i| 2001 + i).collect();
    let mockers: Vec<Proc> = ids
        .iter()
        .map(|id| {
            let id = id.to_string();
            Proc::start_with_env(
                &[
                    "mocker",
                    "--port",
                    "0",
                    "--block-size",
                    "16",
                    "--num-gpu-blocks",
                    "4096",
                    "--worker-id",
                    &id,
                    "--speedup-ratio",
                    "20",
                    "--zmq-kv-events",
                    "tcp://127.0.0.1:0",
                ],
                2,
                env,
            )
        })
        .collect();
    let dir = TempDir::new("obs");
    let pairs: Vec<(&Proc, u64)> = mockers.iter().zip(ids.iter().copied()).collect();
    let sidecar_file = workers_file(&dir, &pairs, None);
    let sidecars: Vec<Proc> = (0..n)
        .map(|_| {
            Proc::start_with_env(
                &[
                    "frontend",
                    "--port",
                    "0",
                    "--workers",
                    sidecar_file.to_str().unwrap(),
                    "--router-mode",
                    "direct",
                ],
                1,
                env,
            )
        })
        .collect();
    let mut y = String::from("model: qwen3\nblock_size: 16\nworkers:\n");
    for (i, id) in ids.iter().enumerate() {
        y.push_str(&format!(
            "  - name: pod-{i}\n    id: {id}\n    url: {}\n    total_kv_blocks: 4096\n    kv_events: {}\n",
            sidecars[i].url(),
            mockers[i].zmq()
        ));
    }
    let epp_file = dir.0.join("epp-workers.yaml");
    std::fs::write(&epp_file, y).unwrap();
    let epp = Proc::start_with_env(
        &[
            "epp",
            "--host",
            "127.0.0.1",
            "--grpc-port",
            "0",
            "--health-port",
            "0",
            "--metrics-port",
            "0",
            "--workers",
            epp_file.to_str().unwrap(),
            "--secure-serving=false",
        ],
        3,
        env,
    );
    Pool {
        mockers,
        sidecars,
        epp,
        dir,
    }
}

fn gateway(p: &Pool, edit: impl FnOnce(String) -> String) -> Envoy {
    let grpc = p.epp.grpc();
    let (host, port) = grpc.rsplit_once(':').unwrap();
    Envoy::start_edited(
        "gateway.yaml",
        &[
            ("EPP_HOST", host),
            ("EPP_PORT", port),
            ("FAILURE_MODE_ALLOW", "false"),
        ],
        edit,
    )
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
}

async fn chat(url: &str, body: &Value, headers: &[(&str, &str)]) -> (u16, Value) {
    let mut rb = client()
        .post(format!("{url}/v1/chat/completions"))
        .json(body);
    for (k, v) in headers {
        rb = rb.header(*k, *v);
    }
    let r = rb.send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

fn attr<'a>(span: &'a Value, key: &str) -> &'a Value {
    &span["attributes"][key]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_gateway_request_is_one_trace_from_envoy_to_the_engine() {
    let dir = TempDir::new("otlp");
    let rx = receiver(&dir);
    let endpoint = format!("http://127.0.0.1:{}", rx.port);
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
    ];
    let p = pool(2, &env);
    let envoy = gateway(&p, |cfg| traced_gateway(cfg, rx.port));

    // A request without trace context (Envoy starts the trace) and one that brings its own.
    let body = chat_body(&text("trace", 120), 4, false);
    let (status, _) = chat(&envoy.url(), &body, &[]).await;
    assert_eq!(status, 200);
    // The first request's KV events reach the EPP before the second is routed.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let client_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let tp = format!("00-{client_trace}-00f067aa0ba902b7-01");
    let (status, _) = chat(&envoy.url(), &body, &[("traceparent", &tp)]).await;
    assert_eq!(status, 200);

    let wanted = [
        ("kvgate-epp", "epp.route"),
        ("kvgate-epp", "parse"),
        ("kvgate-epp", "tokenize"),
        ("kvgate-epp", "score"),
        ("kvgate-epp", "book"),
        ("kvgate-frontend", "frontend.request"),
        ("kvgate-mocker", "mocker.generate"),
    ];
    let deadline = Instant::now() + Duration::from_secs(20);
    let by_trace = loop {
        let mut by_trace: HashMap<String, Vec<Value>> = HashMap::new();
        for s in spans(&rx.out) {
            by_trace
                .entry(s["trace_id"].as_str().unwrap_or("").to_string())
                .or_default()
                .push(s);
        }
        let complete = by_trace
            .values()
            .filter(|t| {
                wanted
                    .iter()
                    .all(|(svc, n)| t.iter().any(|s| s["service"] == *svc && s["name"] == *n))
                    && t.iter().any(|s| s["service"] == "kvgate-gateway")
            })
            .count();
        if complete >= 2 {
            break by_trace;
        }
        assert!(
            Instant::now() < deadline,
            "traces incomplete after 20 s: {:#?}",
            by_trace
                .values()
                .map(|t| t
                    .iter()
                    .map(|s| format!("{}/{}", s["service"], s["name"]))
                    .collect::<Vec<_>>())
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // The client's trace id was kept.
    assert!(by_trace.contains_key(client_trace), "{:?}", by_trace.keys());
    for (id, t) in &by_trace {
        let one = |svc: &str, name: &str| {
            let v: Vec<&Value> = t
                .iter()
                .filter(|s| s["service"] == svc && s["name"] == name)
                .collect();
            assert_eq!(v.len(), 1, "trace {id}: {svc}/{name} ×{}", v.len());
            v[0]
        };
        let route = one("kvgate-epp", "epp.route");
        // The EPP's span hangs under Envoy's ext_proc call (its context came in the gRPC
        // metadata), the sidecar's under Envoy's request span, the engine's under the sidecar's.
        let parent_of = |s: &Value| {
            t.iter()
                .find(|x| x["span_id"] == s["parent_span_id"])
                .unwrap_or_else(|| panic!("trace {id}: no parent for {s}"))
        };
        let ext = parent_of(route);
        assert_eq!(ext["service"], "kvgate-gateway");
        assert!(
            ext["name"].as_str().unwrap().contains("ExternalProcessor"),
            "{ext}"
        );
        for child in ["parse", "tokenize", "score", "book"] {
            assert_eq!(
                one("kvgate-epp", child)["parent_span_id"],
                route["span_id"],
                "trace {id}: {child} is not a child of epp.route"
            );
        }
        let fe = one("kvgate-frontend", "frontend.request");
        assert_eq!(parent_of(fe)["service"], "kvgate-gateway");
        let engine = one("kvgate-mocker", "mocker.generate");
        assert_eq!(engine["parent_span_id"], fe["span_id"]);
        // The chosen worker and the predicted overlap, as attributes; the sidecar and the
        // engine agree with the EPP's choice.
        let worker = attr(route, "kvgate.worker_id")
            .as_str()
            .unwrap()
            .to_string();
        assert_eq!(
            attr(one("kvgate-epp", "score"), "kvgate.worker_id"),
            &worker
        );
        assert_eq!(attr(fe, "kvgate.worker_id"), &worker);
        assert_eq!(attr(engine, "kvgate.worker_id"), &worker);
        assert!(attr(route, "kvgate.overlap_blocks").is_i64(), "{route}");
        assert!(attr(route, "kvgate.predicted_cached_tokens").is_i64());
        assert!(attr(route, "kvgate.isl_tokens").as_i64().unwrap() > 100);
        assert_eq!(attr(engine, "kvgate.token_data"), true);
        assert_eq!(
            attr(engine, "kvgate.prompt_tokens"),
            attr(route, "kvgate.isl_tokens")
        );
    }
    // The second request reused the first one's prompt: the EPP predicted the hit and the
    // engine had it.
    let second = &by_trace[client_trace];
    let route = second.iter().find(|s| s["name"] == "epp.route").unwrap();
    let engine = second
        .iter()
        .find(|s| s["name"] == "mocker.generate")
        .unwrap();
    assert!(
        attr(route, "kvgate.overlap_blocks").as_i64().unwrap() > 0,
        "{route}"
    );
    assert_eq!(
        attr(engine, "kvgate.cached_tokens"),
        attr(route, "kvgate.predicted_cached_tokens")
    );
    // The decision-latency histogram links its buckets to these traces (OpenMetrics
    // exemplars carry the trace id).
    let m = reqwest::get(format!("{}/metrics", p.epp.url()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        m.lines()
            .any(|l| l.starts_with("kvgate_router_decision_seconds_bucket")
                && by_trace
                    .keys()
                    .any(|t| l.contains(&format!("# {{trace_id=\"{t}\"}}")))),
        "no exemplar with a trace id in\n{m}"
    );
    drop(p.dir);
}

/// A real Prometheus on loopback scraping `targets` every second.
struct Prometheus {
    _child: Killed,
    url: String,
    _dir: TempDir,
}

fn prometheus(targets: &[(String, String)]) -> Prometheus {
    let bin = tools_dir().join("bin/prometheus");
    assert!(
        bin.exists(),
        "Prometheus is not installed at {}: run scripts/setup.sh",
        bin.display()
    );
    let dir = TempDir::new("prom");
    let mut cfg =
        String::from("global:\n  scrape_interval: 1s\n  scrape_timeout: 900ms\nscrape_configs:\n");
    for (job, hostport) in targets {
        cfg.push_str(&format!(
            "- job_name: {job}\n  static_configs:\n  - targets: ['{hostport}']\n"
        ));
    }
    std::fs::write(dir.0.join("prometheus.yml"), cfg).unwrap();
    let port = free_port();
    let child = Command::new(bin)
        .arg(format!(
            "--config.file={}",
            dir.0.join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.0.join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .args(["--log.level=warn"])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start prometheus");
    let p = Prometheus {
        _child: Killed(child),
        url: format!("http://127.0.0.1:{port}"),
        _dir: dir,
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while admin_http::get(&format!("{}/-/ready", p.url)).is_err() {
        assert!(Instant::now() < deadline, "prometheus did not become ready");
        std::thread::sleep(Duration::from_millis(200));
    }
    p
}

impl Prometheus {
    async fn query(&self, q: &str) -> Vec<Value> {
        let r: Value = client()
            .get(format!("{}/api/v1/query?query={}", self.url, urlencode(q)))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(r["status"], "success", "{q}: {r}");
        r["data"]["result"].as_array().cloned().unwrap_or_default()
    }
}

/// Percent-encodes a query parameter (RFC 3986 unreserved characters stay).
fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn host_port(url: &str) -> String {
    url.trim_start_matches("http://").to_string()
}

/// Every query of the dashboard, with its panel's title.
fn dashboard_queries() -> Vec<(String, String)> {
    let d: Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("deploy/grafana/kvgate.json")).unwrap(),
    )
    .unwrap();
    let mut out = Vec::new();
    for p in d["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().into_iter().flatten() {
            out.push((
                p["title"].as_str().unwrap().to_string(),
                t["expr"].as_str().unwrap().to_string(),
            ));
        }
    }
    assert!(out.len() >= 15, "{out:?}");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_scrapes_every_component_and_the_dashboard_has_data() {
    let p = pool(2, &[]);
    let envoy = gateway(&p, |c| c);
    // The in-process router too (`frontend --router-mode kv`), over the same engines.
    let pairs: Vec<(&Proc, u64)> = p.mockers.iter().zip([2001u64, 2002]).collect();
    let kv_dir = TempDir::new("obs-kv");
    let kv_file = workers_file(&kv_dir, &pairs, None);
    let kv = frontend(&kv_file, "kv", &[]);
    let mut targets = vec![
        ("epp".to_string(), host_port(&p.epp.url())),
        ("frontend-kv".to_string(), host_port(&kv.url())),
    ];
    for (i, s) in p.sidecars.iter().enumerate() {
        targets.push((format!("sidecar-{i}"), host_port(&s.url())));
    }
    for (i, m) in p.mockers.iter().enumerate() {
        targets.push((format!("mocker-{i}"), host_port(&m.url())));
    }
    let prom = prometheus(&targets);
    // Prometheus applies new targets a few seconds after start: wait for every first scrape,
    // so that the counters are seen from before the traffic.
    let deadline = Instant::now() + Duration::from_secs(30);
    while prom.query("up == 1").await.len() < targets.len() {
        assert!(
            Instant::now() < deadline,
            "targets not scraped: {:?}",
            prom.query("up").await
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // Multi-turn sessions through the gateway and through the kv frontend, spread over a few
    // scrapes so that every counter is seen rising; one request for a model nobody serves.
    let base = [envoy.url(), kv.url()];
    let turns: usize = std::env::var("KVGATE_DASHBOARD_TURNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4);
    for turn in 0..turns {
        for s in 0..3 {
            let content = format!(
                "{}{}",
                text(&format!("s{s}"), 150),
                text(&format!("t{turn}"), 10 * turn)
            );
            for url in &base {
                let (status, _) = chat(url, &chat_body(&content, 4, turn % 2 == 1), &[]).await;
                assert_eq!(status, 200);
            }
        }
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    let mut wrong = chat_body("hi", 2, false);
    wrong["model"] = "nope".into();
    let (status, _) = chat(&envoy.url(), &wrong, &[]).await;
    assert_eq!(status, 404);
    // Let the last samples in (scrape every second) and keep some traffic flowing.
    for s in 0..3 {
        let (status, _) = chat(
            &envoy.url(),
            &chat_body(&text(&format!("s{s}"), 150), 2, false),
            &[],
        )
        .await;
        assert_eq!(status, 200);
        tokio::time::sleep(Duration::from_millis(1000)).await;
    }
    tokio::time::sleep(Duration::from_millis(2500)).await;

    let up = prom.query("up").await;
    assert_eq!(up.len(), targets.len(), "{up:?}");
    for s in &up {
        assert_eq!(s["value"][1], "1", "target down: {s}");
    }
    let mut empty = Vec::new();
    for (panel, q) in dashboard_queries() {
        let r = prom.query(&q).await;
        let finite = r.iter().any(|s| {
            s["value"][1]
                .as_str()
                .and_then(|v| v.parse::<f64>().ok())
                .is_some_and(f64::is_finite)
        });
        if !finite {
            empty.push(format!("{panel}: {q} -> {r:?}"));
        }
    }
    assert!(
        empty.is_empty(),
        "dashboard queries without data:\n{}",
        empty.join("\n")
    );
    // Every family each component exposes is in the metrics reference, with its type.
    let doc = std::fs::read_to_string(repo().join("docs/observability.md")).unwrap();
    let mut undocumented = Vec::new();
    for (job, hp) in &targets {
        let text = reqwest::get(format!("http://{hp}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        for line in text.lines().filter_map(|l| l.strip_prefix("# TYPE ")) {
            let (family, kind) = line.split_once(' ').unwrap();
            let exposed = if kind == "counter" {
                format!("{family}_total")
            } else {
                family.to_string()
            };
            let row = format!("| `{exposed}` | {kind} |");
            if !doc.contains(&row) {
                undocumented.push(format!("{job}: {row}"));
            }
        }
    }
    assert!(
        undocumented.is_empty(),
        "docs/observability.md lacks:\n{}",
        undocumented.join("\n")
    );
    // The block-weighted hit rates are real ratios, and the repeated prefixes hit.
    let hit = prom
        .query("sum(kvgate_router_actual_cached_tokens_total) / sum(kvgate_router_reported_prompt_tokens_total)")
        .await;
    let hit: f64 = hit[0]["value"][1].as_str().unwrap().parse().unwrap();
    assert!(hit > 0.3 && hit < 1.0, "hit rate {hit}");
    if let Ok(png) = std::env::var("KVGATE_DASHBOARD_PNG") {
        let out = Command::new(python())
            .arg(repo().join("scripts/render_dashboard.py"))
            .args(["--prometheus", &prom.url, "--out", &png, "--minutes", "2"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!("{}", String::from_utf8_lossy(&out.stdout));
    }
}
