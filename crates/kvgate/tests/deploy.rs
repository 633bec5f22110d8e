//! The deployment files: the Dockerfile passes hadolint (`.tools/bin/hadolint`, installed by
//! scripts/setup.sh; fails, never skips, without it) and builds with the toolchain the
//! repository pins; the example manifests in deploy/examples refer to each other and to the
//! objects kvgate makes, and the NATS example's configuration runs in the real nats-server.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

#[test]
fn the_dockerfile_passes_hadolint() {
    let hadolint = root().join(".tools/bin/hadolint");
    let out = Command::new(&hadolint)
        .arg(root().join("Dockerfile"))
        .output()
        .unwrap_or_else(|e| panic!("{}: {e} (run scripts/setup.sh)", hadolint.display()));
    assert!(
        out.status.success(),
        "hadolint:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_dockerfile_builds_the_kvgate_binary_with_the_pinned_toolchain_as_non_root() {
    let docker = std::fs::read_to_string(root().join("Dockerfile")).unwrap();
    let toolchain = std::fs::read_to_string(root().join("rust-toolchain.toml")).unwrap();
    let channel = toolchain
        .lines()
        .find_map(|l| l.strip_prefix("channel = "))
        .map(|c| c.trim_matches('"'))
        .unwrap();
    assert!(
        docker.contains(&format!("FROM rust:{channel}-")),
        "the build stage must use rust {channel} (rust-toolchain.toml)"
    );
    assert!(docker.contains(&format!("RUSTUP_TOOLCHAIN={channel}")));
    assert!(docker.contains("cargo build --release --locked -p kvgate"));
    assert!(docker.contains("USER 65532:65532"));
    assert!(docker.contains(r#"ENTRYPOINT ["/usr/local/bin/kvgate"]"#));
    let ignore = std::fs::read_to_string(root().join(".dockerignore")).unwrap();
    for p in ["target/", ".tools/"] {
        assert!(ignore.lines().any(|l| l == p), "{p} not in .dockerignore");
    }
}

// ---------- deploy/examples ----------

fn example_objects(file: &str) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(root().join("deploy/examples").join(file)).unwrap();
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|d| <serde_json::Value as serde::Deserialize>::deserialize(d).unwrap())
        .filter(|v| !v.is_null())
        .collect()
}

fn one<'a>(objs: &'a [serde_json::Value], kind: &str) -> &'a serde_json::Value {
    let found: Vec<_> = objs.iter().filter(|o| o["kind"] == kind).collect();
    assert_eq!(found.len(), 1, "one {kind} expected");
    found[0]
}

#[test]
fn the_gateway_examples_point_at_each_other_and_at_the_operators_pool() {
    let gw = example_objects("gateway.yaml");
    let route = example_objects("httproute.yaml");
    let params = example_objects("agentgateway-parameters.yaml");
    for o in gw.iter().chain(&route).chain(&params) {
        assert_eq!(o["metadata"]["namespace"], "inference", "{o}");
    }
    let gateway = one(&gw, "Gateway");
    let route = one(&route, "HTTPRoute");
    let params = one(&params, "AgentgatewayParameters");
    assert_eq!(
        route["spec"]["parentRefs"][0]["name"],
        gateway["metadata"]["name"]
    );
    let pref = &gateway["spec"]["infrastructure"]["parametersRef"];
    assert_eq!(pref["kind"], "AgentgatewayParameters");
    assert_eq!(
        pref["group"],
        params["apiVersion"]
            .as_str()
            .unwrap()
            .split('/')
            .next()
            .unwrap()
    );
    assert_eq!(pref["name"], params["metadata"]["name"]);
    // The proxy stays out of the Istio sidecar and ambient meshes.
    let pod = &params["spec"]["deployment"]["spec"]["template"]["metadata"];
    assert_eq!(pod["labels"]["sidecar.istio.io/inject"], "false");
    assert_eq!(pod["annotations"]["sidecar.istio.io/inject"], "false");
    assert_eq!(pod["labels"]["istio.io/dataplane-mode"], "none");

    // The route's backend is the pool kvgate makes for the aggregated example graph.
    let dgd = std::fs::read_to_string(root().join("deploy/examples/dgd-aggregated.yaml")).unwrap();
    let rendered =
        kvgate_k8s::render(&kvgate_k8s::parse_dgd(&dgd).unwrap(), &Default::default()).unwrap();
    let backend = &route["spec"]["rules"][0]["backendRefs"][0];
    assert_eq!(backend["group"], "inference.networking.k8s.io");
    assert_eq!(backend["kind"], "InferencePool");
    assert_eq!(
        backend["name"].as_str(),
        rendered.pool.metadata.name.as_deref()
    );
    assert_eq!(
        route["metadata"]["namespace"].as_str(),
        rendered.pool.metadata.namespace.as_deref()
    );
}

/// The NATS example's configuration, run by the real nats-server (`.tools/bin/nats-server`):
/// it starts with JetStream, and the probe path the StatefulSet uses answers 200.
#[test]
fn the_nats_example_runs_jetstream_and_its_probe_answers() {
    let objs = example_objects("nats.yaml");
    let conf = one(&objs, "ConfigMap")["data"]["nats.conf"]
        .as_str()
        .unwrap()
        .to_string();
    let sts = one(&objs, "StatefulSet");
    let c = &sts["spec"]["template"]["spec"]["containers"][0];
    let probe = c["readinessProbe"]["httpGet"]["path"]
        .as_str()
        .unwrap()
        .to_string();
    let svc = one(&objs, "Service");
    // The chart's default nats.url is this Service's client port.
    assert_eq!(svc["metadata"]["name"], "nats");
    assert_eq!(svc["spec"]["ports"][0]["port"], 4222);

    let free = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    };
    let (client, monitor) = (free(), free());
    let dir = std::env::temp_dir().join(format!("kvgate-nats-example-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let conf = conf
        .replace("port: 4222", &format!("port: {client}\nhost: 127.0.0.1"))
        .replace("http_port: 8222", &format!("http: 127.0.0.1:{monitor}"))
        .replace("/data/jetstream", dir.join("js").to_str().unwrap());
    let conf_path = dir.join("nats.conf");
    std::fs::write(&conf_path, conf).unwrap();
    let bin = root().join(".tools/bin/nats-server");
    let mut server = Command::new(&bin)
        .args(["-c", conf_path.to_str().unwrap()])
        .env("POD_NAME", "nats-0")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("{}: {e} (run scripts/setup.sh)", bin.display()));
    let get = |path: &str| -> Option<String> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", monitor)).ok()?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        Some(out)
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    // The monitor port answers while the server is still starting (a 500 "failed to be ready");
    // the probe, like Kubernetes', is retried until it passes or the deadline ends.
    let ok = |r: &str| r.starts_with("HTTP/1.0 200") || r.starts_with("HTTP/1.1 200");
    let mut health = String::new();
    loop {
        if let Some(r) = get(&probe) {
            health = r;
            if ok(&health) {
                break;
            }
        }
        if std::time::Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let varz = get("/varz").unwrap_or_default();
    let jsz = get("/jsz").unwrap_or_default();
    let _ = server.kill();
    let _ = server.wait();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(ok(&health), "nats-server's probe never passed: {health:?}");
    assert!(varz.contains("\"server_name\": \"nats-0\""), "{varz}");
    assert!(
        jsz.contains("\"max_storage\": 10737418240"),
        "JetStream with the example's limits: {jsz}"
    );
}

// ---------- deploy/envoy ----------

/// Every bootstrap template in deploy/envoy (not `tracing.yaml`, whose fragments are spliced into
/// the gateways elsewhere), rendered with sample values for its placeholders, passes Envoy's own
/// `--mode validate`; the fail-open one also as `kvgate_bench::procs` renders it for benches.
#[test]
fn every_envoy_config_renders_and_passes_envoy_validate() {
    let envoy = root().join(".tools/bin/envoy");
    assert!(
        envoy.exists(),
        "{} missing: run scripts/setup.sh",
        envoy.display()
    );
    let dir = std::env::temp_dir().join(format!("kvgate-envoy-validate-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let endpoints = "[{endpoint: {address: {socket_address: {address: 10.0.0.7, port_value: 8000}}}, metadata: {filter_metadata: {kvgate: {worker_id: \"1001\"}}}}]";
    let vars = [
        ("LISTEN_PORT", "10000"),
        ("ADMIN_PORT", "10001"),
        ("EPP_HOST", "127.0.0.1"),
        ("EPP_PORT", "9002"),
        ("FAILURE_MODE_ALLOW", "false"),
        ("UPSTREAM_HOST", "127.0.0.1"),
        ("UPSTREAM_PORT", "8001"),
        ("WORKER_ID", "1"),
        ("FALLBACK_ENDPOINTS", endpoints),
    ];
    let mut files: Vec<(String, String)> = std::fs::read_dir(root().join("deploy/envoy"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .filter(|p| !p.ends_with("tracing.yaml"))
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().to_string();
            (name, std::fs::read_to_string(&p).unwrap())
        })
        .collect();
    files.sort();
    let names: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
    for expected in [
        "direct.yaml",
        "gateway-fail-open.yaml",
        "gateway-tls.yaml",
        "gateway.yaml",
    ] {
        assert!(names.contains(&expected), "{expected} not in {names:?}");
    }
    let bench = kvgate_bench::procs::fail_open_gateway_template(
        &["127.0.0.1:9002", "127.0.0.1:9004"],
        &[("http://127.0.0.1:8001", 1001), ("127.0.0.1:8002", 1002)],
    )
    .unwrap();
    assert_eq!(bench.matches("port_value: 9004").count(), 1);
    assert_eq!(bench.matches("worker_id: \"1002\"").count(), 1);
    files.push(("bench-rendered-gateway-fail-open.yaml".into(), bench));
    for (name, text) in &files {
        let mut cfg = text.clone();
        for (k, v) in vars {
            cfg = cfg.replace(&format!("${{{k}}}"), v);
        }
        assert!(!cfg.contains("${"), "{name}: a placeholder is left");
        let path = dir.join(name);
        std::fs::write(&path, &cfg).unwrap();
        let out = Command::new(&envoy)
            .args(["--mode", "validate", "-l", "error", "-c"])
            .arg(&path)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("OK"),
            "{name}: envoy --mode validate failed:\n{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
