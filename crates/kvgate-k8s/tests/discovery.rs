//! Pod discovery: which pods become endpoints (sans-IO), and the kube watcher around it driven
//! by a mocked API server (tower-test): list, then watch events that make pods ready, unready,
//! deleted and relabelled.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use kvgate_k8s::discovery::{PodFacts, PoolConfig, endpoints, parse_selector};
use kvgate_wire::workers::Role;
use serde_json::{Value, json};
use std::collections::BTreeMap;

fn pool() -> PoolConfig {
    PoolConfig {
        selector: BTreeMap::from([("app".to_string(), "vllm".to_string())]),
        target_ports: vec![8000],
        block_size: 16,
        kv_events_port: Some(5557),
    }
}

fn pod(name: &str, ready: bool, labels: &[(&str, &str)], annotations: &[(&str, &str)]) -> Value {
    let labels: serde_json::Map<String, Value> = labels
        .iter()
        .map(|(k, v)| ((*k).to_string(), json!(v)))
        .collect();
    let annotations: serde_json::Map<String, Value> = annotations
        .iter()
        .map(|(k, v)| ((*k).to_string(), json!(v)))
        .collect();
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "ns", "resourceVersion": "1", "labels": labels, "annotations": annotations},
        "status": {
            "podIP": format!("10.0.0.{}", name.len()),
            "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}],
        },
    })
}

fn facts(v: &Value) -> PodFacts {
    PodFacts::from_json(v)
}

const APP: (&str, &str) = ("app", "vllm");

#[test]
fn only_ready_live_matching_pods_with_an_ip_are_endpoints() {
    let mut terminating = pod("gone", true, &[APP], &[]);
    terminating["metadata"]["deletionTimestamp"] = json!("2026-11-24T00:00:00Z");
    let mut no_ip = pod("fresh", true, &[APP], &[]);
    no_ip["status"].as_object_mut().unwrap().remove("podIP");
    let pods: Vec<PodFacts> = [
        pod("a", true, &[APP], &[]),
        pod("bb", false, &[APP], &[]),
        pod("other", true, &[("app", "sglang")], &[]),
        terminating,
        no_ip,
    ]
    .iter()
    .map(facts)
    .collect();
    let (eps, skipped) = endpoints(&pods, &pool());
    assert_eq!(eps.len(), 1);
    let a = &eps[0];
    assert_eq!(
        (a.name.as_str(), a.url.as_str()),
        ("a", "http://10.0.0.1:8000")
    );
    assert_eq!(a.kv_events.as_deref(), Some("tcp://10.0.0.1:5557"));
    assert_eq!(a.role, Role::Aggregated);
    // The instance id is Dynamo's, from the pod name.
    assert_eq!(
        a.instance_id(),
        kvgate_core::worker_id::worker_id_for_pod("a")
    );
    let reasons: Vec<(&str, &str)> = skipped
        .iter()
        .map(|s| (s.pod.as_str(), s.reason.as_str()))
        .collect();
    assert_eq!(
        reasons,
        vec![
            ("bb", "not Ready"),
            ("fresh", "no pod IP yet"),
            ("gone", "terminating")
        ]
    );
}

#[test]
fn roles_annotations_ports_and_misconfigured_pods() {
    let role = "nvidia.com/dynamo-sub-component-type";
    let pods: Vec<PodFacts> = [
        pod(
            "p",
            true,
            &[APP, (role, "prefill")],
            &[
                ("kvgate.io/total-kv-blocks", "4096"),
                ("kvgate.io/dp-size", "2"),
            ],
        ),
        pod(
            "dd",
            true,
            &[APP, (role, "decode")],
            &[
                ("kvgate.io/kv-events-port", "6000"),
                ("kvgate.io/kv-events-replay-port", "6001"),
            ],
        ),
        pod("bad", true, &[APP, (role, "verifier")], &[]),
        pod("wrong-bs", true, &[APP], &[("kvgate.io/block-size", "32")]),
        pod(
            "nan",
            true,
            &[APP],
            &[("kvgate.io/max-num-batched-tokens", "lots")],
        ),
    ]
    .iter()
    .map(facts)
    .collect();
    let mut cfg = pool();
    cfg.target_ports = vec![8000, 8001];
    let (eps, skipped) = endpoints(&pods, &cfg);
    let names: Vec<&str> = eps.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, vec!["dd", "dd-8001", "p", "p-8001"]);
    let p = eps.iter().find(|e| e.name == "p").unwrap();
    assert_eq!(
        (p.role, p.dp_size, p.total_kv_blocks),
        (Role::Prefill, 2, Some(4096))
    );
    let p2 = eps.iter().find(|e| e.name == "p-8001").unwrap();
    assert_eq!(p2.url, "http://10.0.0.1:8001");
    assert_ne!(
        p.instance_id(),
        p2.instance_id(),
        "each endpoint has its own id"
    );
    let d = eps.iter().find(|e| e.name == "dd").unwrap();
    assert_eq!(d.role, Role::Decode);
    assert_eq!(d.kv_events.as_deref(), Some("tcp://10.0.0.2:6000"));
    assert_eq!(d.kv_events_replay.as_deref(), Some("tcp://10.0.0.2:6001"));
    // The pod's one publisher speaks for its first port's engine only.
    let d2 = eps.iter().find(|e| e.name == "dd-8001").unwrap();
    assert_eq!(
        (d2.kv_events.as_deref(), d2.kv_events_replay.as_deref()),
        (None, None)
    );
    let reasons: BTreeMap<&str, &str> = skipped
        .iter()
        .map(|s| (s.pod.as_str(), s.reason.as_str()))
        .collect();
    assert!(
        reasons["bad"].contains("expected prefill or decode"),
        "{reasons:?}"
    );
    assert!(reasons["wrong-bs"].contains("block size 32"), "{reasons:?}");
    assert!(reasons["nan"].contains("is not a number"), "{reasons:?}");
}

#[test]
fn colliding_ids_and_absurd_dp_sizes_leave_the_pod_out() {
    let mut cfg = pool();
    cfg.target_ports = vec![8000, 8001];
    let pods: Vec<PodFacts> = [
        // Listed second on purpose: the decision follows pod names, not arrival order.
        pod("vllm-8001", true, &[APP], &[]),
        pod("vllm", true, &[APP], &[]),
        pod("huge", true, &[APP], &[("kvgate.io/dp-size", "100000000")]),
    ]
    .iter()
    .map(facts)
    .collect();
    let (eps, skipped) = endpoints(&pods, &cfg);
    let names: Vec<&str> = eps.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, vec!["vllm", "vllm-8001"]);
    assert_eq!(
        eps[1].url, "http://10.0.0.4:8001",
        "the second port of pod vllm"
    );
    let reasons: BTreeMap<&str, &str> = skipped
        .iter()
        .map(|s| (s.pod.as_str(), s.reason.as_str()))
        .collect();
    assert!(
        reasons["vllm-8001"].contains("has the worker id of pod vllm"),
        "{reasons:?}"
    );
    assert!(
        reasons["huge"].contains("must be in [1, 1024]"),
        "{reasons:?}"
    );
}

#[test]
fn ipv6_pods_get_bracketed_urls() {
    let mut v6 = pod("six", true, &[APP], &[]);
    v6["status"]["podIP"] = json!("fd00::7");
    let (eps, _) = endpoints(&[facts(&v6)], &pool());
    assert_eq!(eps[0].url, "http://[fd00::7]:8000");
}

#[test]
fn selectors_parse_or_say_why_not() {
    assert_eq!(
        parse_selector("app=vllm, tier = gpu").unwrap(),
        BTreeMap::from([("app".into(), "vllm".into()), ("tier".into(), "gpu".into())])
    );
    assert!(parse_selector("").unwrap_err().contains("every pod"));
    assert!(parse_selector("app").unwrap_err().contains("key=value"));
    assert!(
        parse_selector("app=-x")
            .unwrap_err()
            .contains("not a valid")
    );
    // Only equality: `app!=x` must not turn into a label named `app!`.
    assert!(
        parse_selector("app!=x")
            .unwrap_err()
            .contains("only equality")
    );
    assert!(parse_selector("nvidia.com/dynamo-namespace=ns-g").is_ok());
}

// ---------- the watcher, against a mocked API server ----------

mod mock {
    use super::*;
    use http::{Request, Response};
    use kube::client::Body;
    use tower_test::mock::Handle;

    pub type ApiHandle = Handle<Request<Body>, Response<Body>>;

    fn ok(body: String) -> Response<Body> {
        Response::builder()
            .status(200)
            .header("content-type", "application/json")
            .body(Body::from(body.into_bytes()))
            .unwrap()
    }

    /// Serves a list (resourceVersion 10), then one watch response carrying `events`, then
    /// holds the next watch open. Returns the URIs it was asked for.
    pub async fn serve(
        mut handle: ApiHandle,
        items: Vec<Value>,
        events: Vec<(&'static str, Value)>,
    ) -> Vec<String> {
        let mut uris = Vec::new();
        let (req, send) = handle.next_request().await.expect("a list request");
        uris.push(req.uri().to_string());
        send.send_response(ok(json!({
            "apiVersion": "v1", "kind": "PodList",
            "metadata": {"resourceVersion": "10"},
            "items": items,
        })
        .to_string()));
        let (req, send) = handle.next_request().await.expect("a watch request");
        uris.push(req.uri().to_string());
        let body: String = events
            .into_iter()
            .enumerate()
            .map(|(i, (t, mut o))| {
                o["metadata"]["resourceVersion"] = json!((11 + i).to_string());
                format!("{}\n", json!({"type": t, "object": o}))
            })
            .collect();
        send.send_response(ok(body));
        // The watcher comes back for more after the body ends: keep that request pending.
        if let Some((req, send)) = handle.next_request().await {
            uris.push(req.uri().to_string());
            std::mem::forget(send);
        }
        uris
    }
}

#[tokio::test]
async fn the_watcher_follows_pods_becoming_ready_deleted_and_relabelled() {
    let (svc, handle) = tower_test::mock::pair::<
        http::Request<kube::client::Body>,
        http::Response<kube::client::Body>,
    >();
    let client = kube::Client::new(svc, "ns");
    let relabelled = pod("ccc", true, &[("app", "other")], &[]);
    let server = tokio::spawn(mock::serve(
        handle,
        vec![pod("a", true, &[APP], &[]), pod("bb", false, &[APP], &[])],
        vec![
            ("MODIFIED", pod("bb", true, &[APP], &[])),
            ("ADDED", pod("ccc", true, &[APP], &[])),
            ("DELETED", pod("a", true, &[APP], &[])),
            ("MODIFIED", relabelled),
            // Changes nothing an endpoint carries: no update.
            ("MODIFIED", pod("bb", true, &[APP, ("extra", "x")], &[])),
            ("MODIFIED", pod("bb", false, &[APP], &[])),
        ],
    ));
    let mut seen: Vec<Vec<String>> = Vec::new();
    let expected = 6;
    let watch = kvgate_k8s::watch::watch_pods(client, "ns", pool(), |eps, _| {
        seen.push(eps.into_iter().map(|e| e.name).collect());
        seen.len() < expected
    });
    tokio::time::timeout(std::time::Duration::from_secs(10), watch)
        .await
        .expect("the watcher delivered every update");
    let want: Vec<Vec<&str>> = vec![
        vec!["a"],       // the list: bb is not Ready
        vec!["a", "bb"], // bb became Ready
        vec!["a", "bb", "ccc"],
        vec!["bb", "ccc"], // a deleted
        vec!["bb"],        // ccc relabelled out of the selector
        vec![],            // bb not Ready any more
    ];
    assert_eq!(seen, want);
    server.abort();
}

#[tokio::test]
async fn the_watch_asks_for_the_selector_and_resumes_from_the_list() {
    let (svc, handle) = tower_test::mock::pair::<
        http::Request<kube::client::Body>,
        http::Response<kube::client::Body>,
    >();
    let client = kube::Client::new(svc, "ns");
    let server = tokio::spawn(mock::serve(
        handle,
        vec![pod("a", true, &[APP], &[])],
        vec![("DELETED", pod("a", true, &[APP], &[]))],
    ));
    let mut n = 0;
    let watch = kvgate_k8s::watch::watch_pods(client, "ns", pool(), |_, _| {
        n += 1;
        n < 2
    });
    tokio::time::timeout(std::time::Duration::from_secs(10), watch)
        .await
        .expect("the deletion reached the caller");
    let uris = tokio::time::timeout(std::time::Duration::from_secs(10), server)
        .await
        .unwrap()
        .unwrap();
    assert!(
        uris[0].starts_with("/api/v1/namespaces/ns/pods?"),
        "{uris:?}"
    );
    assert!(uris[0].contains("labelSelector=app%3Dvllm"), "{uris:?}");
    assert!(
        uris[1].contains("watch=true") && uris[1].contains("resourceVersion=10"),
        "{uris:?}"
    );
}

#[tokio::test]
async fn a_pool_is_read_from_the_api() {
    let (svc, mut handle) = tower_test::mock::pair::<
        http::Request<kube::client::Body>,
        http::Response<kube::client::Body>,
    >();
    let client = kube::Client::new(svc, "ns");
    let server = tokio::spawn(async move {
        let (req, send) = handle.next_request().await.unwrap();
        let uri = req.uri().to_string();
        let body = json!({
            "apiVersion": "inference.networking.k8s.io/v1", "kind": "InferencePool",
            "metadata": {"name": "llama-pool", "namespace": "ns"},
            "spec": {"selector": {"matchLabels": {"app": "vllm"}}, "targetPorts": [{"number": 8000}, {"number": 8001}],
                     "endpointPickerRef": {"name": "llama-epp", "port": {"number": 9002}}},
        });
        send.send_response(
            http::Response::builder()
                .status(200)
                .body(kube::client::Body::from(body.to_string().into_bytes()))
                .unwrap(),
        );
        uri
    });
    let (selector, ports) = kvgate_k8s::watch::read_pool(client, "ns", "llama-pool")
        .await
        .unwrap();
    assert_eq!(selector, BTreeMap::from([("app".into(), "vllm".into())]));
    assert_eq!(ports, vec![8000, 8001]);
    assert_eq!(
        server.await.unwrap(),
        "/apis/inference.networking.k8s.io/v1/namespaces/ns/inferencepools/llama-pool"
    );
}

#[tokio::test]
async fn a_missing_pool_is_a_clear_error() {
    let (svc, mut handle) = tower_test::mock::pair::<
        http::Request<kube::client::Body>,
        http::Response<kube::client::Body>,
    >();
    let client = kube::Client::new(svc, "ns");
    tokio::spawn(async move {
        let (_, send) = handle.next_request().await.unwrap();
        let status = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
            "message": "inferencepools.inference.networking.k8s.io \"nope\" not found", "reason": "NotFound", "code": 404});
        send.send_response(
            http::Response::builder()
                .status(404)
                .body(kube::client::Body::from(status.to_string().into_bytes()))
                .unwrap(),
        );
    });
    let e = kvgate_k8s::watch::read_pool(client, "ns", "nope")
        .await
        .unwrap_err();
    assert!(
        e.contains("cannot read InferencePool ns/nope") && e.contains("not found"),
        "{e}"
    );
}

// ---------- following the InferencePool itself ----------

mod fake_api;

fn pool_object(selector: Value, ports: &[i64]) -> Value {
    json!({
        "apiVersion": "inference.networking.k8s.io/v1",
        "kind": "InferencePool",
        "metadata": {"name": "pool", "namespace": "ns"},
        "spec": {
            "selector": {"matchLabels": selector},
            "targetPorts": ports.iter().map(|p| json!({"number": p})).collect::<Vec<_>>(),
            "endpointPickerRef": {"name": "epp", "port": {"number": 9002}},
        },
    })
}

async fn next(rx: &mut tokio::sync::mpsc::UnboundedReceiver<Vec<String>>) -> Vec<String> {
    tokio::time::timeout(std::time::Duration::from_secs(10), rx.recv())
        .await
        .expect("an endpoint update")
        .unwrap()
}

#[tokio::test]
async fn a_changed_pool_selector_or_port_list_restarts_the_pod_watch() {
    use kvgate_k8s::watch::{read_pool, watch_pool_pods};
    let (fake, client) = fake_api::Fake::new(false);
    fake.put(
        "inferencepools",
        pool_object(json!({"app": "vllm"}), &[8000]),
    );
    fake.put("pods", pod("a", true, &[APP], &[]));
    fake.put("pods", pod("bb", true, &[("app", "sglang")], &[]));
    let initial = read_pool(client.clone(), "ns", "pool").await.unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        watch_pool_pods(client, "ns", "pool", initial, pool(), move |eps, _| {
            tx.send(eps.iter().map(|e| e.url.clone()).collect::<Vec<_>>())
                .is_ok()
        })
        .await;
    });
    assert_eq!(next(&mut rx).await, ["http://10.0.0.1:8000"]);

    // The operator points the pool at other pods and another port.
    fake.edit("inferencepools", "ns", "pool", |p| {
        p["spec"]["selector"]["matchLabels"] = json!({"app": "sglang"});
        p["spec"]["targetPorts"] = json!([{"number": 9000}]);
    });
    assert_eq!(next(&mut rx).await, ["http://10.0.0.2:9000"]);

    // A change outside the spec (a label), a broken spec, and a deletion: no new endpoints.
    fake.edit("inferencepools", "ns", "pool", |p| {
        p["metadata"]["labels"] = json!({"team": "x"});
    });
    fake.edit("inferencepools", "ns", "pool", |p| {
        p["spec"]["targetPorts"] = json!([]);
    });
    fake.remove("inferencepools", "ns", "pool");
    // Meanwhile the pods keep being followed with the last good spec.
    fake.put("pods", pod("ccc", true, &[("app", "sglang")], &[]));
    assert_eq!(
        next(&mut rx).await,
        ["http://10.0.0.2:9000", "http://10.0.0.3:9000"]
    );
    assert!(
        tokio::time::timeout(std::time::Duration::from_millis(300), rx.recv())
            .await
            .is_err(),
        "nothing else changed"
    );
    // Back, as it was first: the first selector again.
    fake.put(
        "inferencepools",
        pool_object(json!({"app": "vllm"}), &[8000]),
    );
    assert_eq!(next(&mut rx).await, ["http://10.0.0.1:8000"]);
    task.abort();
}
