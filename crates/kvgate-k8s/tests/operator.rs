//! `kvgate operator` against a mocked API server (tower-test, `fake_api`): creating a graph's
//! objects with server-side apply, updates, hand edits (kept where kvgate does not own the field,
//! put back where it does, never taken over when kvgate did not create the object), deletes
//! when the EPP or the mesh goes, missing Istio CRDs, API failures in the status condition, and
//! the controller loop itself.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod fake_api;

use fake_api::{Fake, Logged};
use kvgate_k8s::controller::{Operator, OperatorConfig, OperatorMetrics, run};
use kvgate_k8s::operator::{Action, CONDITION_TYPE, Kind, reason};
use kvgate_k8s::{RenderOptions, ServiceMesh};
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;

const NS: &str = "llm";
const DGDS: &str = "dynamographdeployments";
const SVCS: &str = "services";
const POOLS: &str = "inferencepools";
const RULES: &str = "destinationrules";

fn services() -> Value {
    json!({
        "Frontend": {"componentType": "frontend", "replicas": 1},
        "Epp": {"componentType": "epp", "replicas": 2},
        "VllmWorker": {"componentType": "worker", "replicas": 4},
    })
}

fn graph(services: Value) -> Value {
    json!({
        "apiVersion": "nvidia.com/v1alpha1",
        "kind": "DynamoGraphDeployment",
        "metadata": {"name": "llama", "namespace": NS, "generation": 1},
        "spec": {"services": services},
        "status": {
            "state": "successful",
            // Dynamo's own condition: must survive kvgate's status writes.
            "conditions": [{"type": "Ready", "status": "True", "reason": "AllReady", "message": "",
                            "lastTransitionTime": "2026-11-01T00:00:00Z"}],
        },
    })
}

fn operator(client: kube::Client, mesh: bool) -> Operator {
    Operator::new(
        client,
        OperatorConfig {
            render: RenderOptions {
                service_mesh: mesh.then(ServiceMesh::default),
                ..RenderOptions::default()
            },
            istio_recheck: Duration::ZERO,
            ..OperatorConfig::default()
        },
        Arc::new(OperatorMetrics::new()),
    )
}

/// A cluster holding graph `llama` (uid assigned by the fake).
fn cluster(istio: bool, services: Value) -> (Fake, kube::Client) {
    let (fake, client) = Fake::new(istio);
    fake.put(DGDS, graph(services));
    (fake, client)
}

/// Reconciles the graph as the controller's cache would hand it over (the stored object).
async fn reconcile(fake: &Fake, op: &Operator) -> Result<kvgate_k8s::controller::Outcome, String> {
    let g = fake.get(DGDS, NS, "llama").unwrap();
    op.reconcile(&g).await.map_err(|e| e.to_string())
}

fn condition(fake: &Fake) -> Value {
    let g = fake.get(DGDS, NS, "llama").unwrap();
    g["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == CONDITION_TYPE)
        .cloned()
        .unwrap_or(Value::Null)
}

/// `<plural>/<name>` of the logged requests that `pick`.
fn objects(w: &[Logged], pick: impl Fn(&Logged) -> bool) -> Vec<String> {
    w.iter()
        .filter(|l| pick(l))
        .map(|l| {
            let mut it = l.path.rsplit('/');
            let name = it.next().unwrap_or_default();
            format!("{}/{name}", it.next().unwrap_or_default())
        })
        .collect()
}

fn applied(w: &[Logged]) -> Vec<String> {
    objects(w, |l| l.content_type.starts_with("application/apply-patch"))
}

fn deleted(w: &[Logged]) -> Vec<String> {
    objects(w, |l| l.method == "DELETE")
}

fn status_writes(w: &[Logged]) -> usize {
    w.iter().filter(|l| l.path.ends_with("/status")).count()
}

#[tokio::test]
async fn a_graph_gets_its_objects_by_server_side_apply_and_a_ready_condition() {
    let (fake, client) = cluster(true, services());
    let op = operator(client, true);
    let out = reconcile(&fake, &op).await.unwrap();
    assert!(out.status_written);
    let w = fake.take_writes();
    assert_eq!(
        applied(&w),
        [
            "services/llama-epp",
            "inferencepools/llama-pool",
            "destinationrules/llama-epp"
        ]
    );
    for l in w
        .iter()
        .filter(|l| l.method == "PATCH" && !l.path.ends_with("/status"))
    {
        assert_eq!(l.content_type, "application/apply-patch+yaml");
        assert!(l.query.contains("fieldManager=kvgate"), "{}", l.query);
        assert!(l.query.contains("force=true"), "{}", l.query);
    }
    // The status patch is a merge patch guarded by the graph's resourceVersion.
    let s = w.iter().find(|l| l.path.ends_with("/status")).unwrap();
    assert_eq!(s.content_type, "application/merge-patch+json");
    assert!(s.body["metadata"]["resourceVersion"].is_string());

    let uid = fake.get(DGDS, NS, "llama").unwrap()["metadata"]["uid"].clone();
    let pool = fake.get(POOLS, NS, "llama-pool").unwrap();
    for o in [
        fake.get(SVCS, NS, "llama-epp").unwrap(),
        pool.clone(),
        fake.get(RULES, NS, "llama-epp").unwrap(),
    ] {
        let r = &o["metadata"]["ownerReferences"][0];
        assert_eq!(
            (r["uid"].clone(), r["controller"].clone()),
            (uid.clone(), json!(true))
        );
        assert_eq!(r["kind"], "DynamoGraphDeployment");
    }
    assert_eq!(pool["spec"]["endpointPickerRef"]["name"], "llama-epp");
    assert_eq!(pool["spec"]["targetPorts"], json!([{"number": 8000}]));
    assert_eq!(
        pool["spec"]["selector"]["matchLabels"]["nvidia.com/dynamo-namespace"],
        "llm-llama"
    );
    // What the operator wrote passes the upstream CRD's schema.
    let violations = common::pool_schema().validate(&pool);
    assert!(violations.is_empty(), "{violations:?}");

    let c = condition(&fake);
    assert_eq!(
        (c["status"].as_str(), c["reason"].as_str()),
        (Some("True"), Some(reason::APPLIED))
    );
    assert_eq!(c["observedGeneration"], 1);
    assert!(
        c["message"]
            .as_str()
            .unwrap()
            .contains("DestinationRule llama-epp"),
        "{c}"
    );
    let g = fake.get(DGDS, NS, "llama").unwrap();
    assert_eq!(
        g["status"]["conditions"][0]["type"], "Ready",
        "Dynamo's condition is kept"
    );
    assert_eq!(g["status"]["state"], "successful");

    // Idempotent: nothing changed, nothing written.
    let out = reconcile(&fake, &op).await.unwrap();
    assert!(out.plan.actions.is_empty() && !out.status_written);
    assert!(fake.take_writes().is_empty());
    assert_eq!(
        op.metrics().applies[0].load(std::sync::atomic::Ordering::Relaxed),
        1
    );
}

#[tokio::test]
async fn a_graph_update_rewrites_only_what_changed() {
    let (fake, client) = cluster(false, services());
    let op = operator(client, false);
    reconcile(&fake, &op).await.unwrap();
    let since = condition(&fake)["lastTransitionTime"].clone();
    fake.take_writes();

    // The workers move to the global Dynamo namespace: only the pool's selector changes.
    fake.edit(DGDS, NS, "llama", |g| {
        g["spec"]["services"]["VllmWorker"]["globalDynamoNamespace"] = json!(true);
        g["spec"]["services"]["Frontend"]["globalDynamoNamespace"] = json!(true);
        g["metadata"]["generation"] = json!(2);
    });
    reconcile(&fake, &op).await.unwrap();
    let w = fake.take_writes();
    assert_eq!(applied(&w), ["inferencepools/llama-pool"]);
    assert_eq!(
        fake.get(POOLS, NS, "llama-pool").unwrap()["spec"]["selector"]["matchLabels"]["nvidia.com/dynamo-namespace"],
        "dynamo"
    );
    let c = condition(&fake);
    assert_eq!(c["observedGeneration"], 2);
    assert_eq!(c["lastTransitionTime"], since, "still True: no transition");
    assert_eq!(status_writes(&w), 1);

    // The EPP component renamed: Service and pool labels and the Service selector follow.
    fake.edit(DGDS, NS, "llama", |g| {
        let epp = g["spec"]["services"]["Epp"].take();
        g["spec"]["services"].as_object_mut().unwrap().remove("Epp");
        g["spec"]["services"]["Picker"] = epp;
        g["metadata"]["generation"] = json!(3);
    });
    reconcile(&fake, &op).await.unwrap();
    let w = fake.take_writes();
    assert_eq!(
        applied(&w),
        ["services/llama-epp", "inferencepools/llama-pool"]
    );
    assert_eq!(
        fake.get(SVCS, NS, "llama-epp").unwrap()["spec"]["selector"]["nvidia.com/dynamo-component"],
        "Picker"
    );
}

#[tokio::test]
async fn hand_edits_are_kept_outside_kvgates_fields_and_put_back_inside_them() {
    let (fake, client) = cluster(false, services());
    let op = operator(client, false);
    reconcile(&fake, &op).await.unwrap();
    fake.take_writes();

    // Someone annotates the Service, adds a port, and labels the pool: not kvgate's fields.
    fake.edit(SVCS, NS, "llama-epp", |s| {
        s["metadata"]["annotations"]["team"] = json!("inference");
        s["spec"]["ports"]
            .as_array_mut()
            .unwrap()
            .push(json!({"name": "debug", "port": 6060, "targetPort": 6060, "protocol": "TCP"}));
        s["spec"]["clusterIP"] = json!("10.96.0.17");
    });
    fake.edit(POOLS, NS, "llama-pool", |p| {
        p["metadata"]["labels"]["cost-center"] = json!("42");
    });
    let out = reconcile(&fake, &op).await.unwrap();
    assert!(out.plan.actions.is_empty(), "{:?}", out.plan.actions);
    assert!(
        fake.take_writes().is_empty(),
        "no fight over fields kvgate does not set"
    );

    // Now someone changes fields kvgate sets: the pool's target ports and the Service selector.
    fake.edit(POOLS, NS, "llama-pool", |p| {
        p["spec"]["targetPorts"] = json!([{"number": 8000}, {"number": 9000}]);
    });
    fake.edit(SVCS, NS, "llama-epp", |s| {
        s["spec"]["selector"]["nvidia.com/dynamo-component"] = json!("Other");
        // The selector is replaced whole by an apply: an extra key is drift too.
        s["spec"]["selector"]["tier"] = json!("gold");
    });
    reconcile(&fake, &op).await.unwrap();
    let w = fake.take_writes();
    assert_eq!(
        applied(&w),
        ["services/llama-epp", "inferencepools/llama-pool"]
    );
    assert_eq!(status_writes(&w), 0, "the condition did not change");
    let pool = fake.get(POOLS, NS, "llama-pool").unwrap();
    assert_eq!(pool["spec"]["targetPorts"], json!([{"number": 8000}]));
    assert_eq!(pool["metadata"]["labels"]["cost-center"], "42");
    let svc = fake.get(SVCS, NS, "llama-epp").unwrap();
    assert_eq!(
        svc["spec"]["selector"]["nvidia.com/dynamo-component"],
        "Epp"
    );
    assert_eq!(svc["metadata"]["annotations"]["team"], "inference");
    assert_eq!(
        svc["spec"]["ports"].as_array().unwrap().len(),
        4,
        "the hand-added port stays"
    );
    // Those applies carried only kvgate's fields.
    let body = &w
        .iter()
        .find(|l| l.path.ends_with("/llama-epp"))
        .unwrap()
        .body;
    assert!(
        body["metadata"]["annotations"].get("team").is_none(),
        "{body}"
    );
    assert_eq!(body["spec"]["ports"].as_array().unwrap().len(), 3);
}

#[tokio::test]
async fn objects_kvgate_did_not_create_are_left_alone_until_labelled_for_adoption() {
    let (fake, client) = cluster(false, services());
    fake.put(
        SVCS,
        json!({"apiVersion": "v1", "kind": "Service",
               "metadata": {"name": "llama-epp", "namespace": NS, "labels": {"app": "mine"}},
               "spec": {"ports": [{"port": 80}]}}),
    );
    let op = operator(client, false);
    let out = reconcile(&fake, &op).await.unwrap();
    assert!(out.plan.actions.is_empty());
    let w = fake.take_writes();
    assert!(applied(&w).is_empty() && deleted(&w).is_empty(), "{w:?}");
    let c = condition(&fake);
    assert_eq!(
        (c["status"].as_str(), c["reason"].as_str()),
        (Some("False"), Some(reason::NOT_OWNED))
    );
    let msg = c["message"].as_str().unwrap();
    assert!(
        msg.contains("Service llm/llama-epp exists but kvgate did not create it"),
        "{msg}"
    );
    assert!(msg.contains("app.kubernetes.io/managed-by=kvgate"), "{msg}");
    assert_eq!(
        fake.get(SVCS, NS, "llama-epp").unwrap()["spec"]["ports"],
        json!([{"port": 80}])
    );

    // `kvgate render | kubectl apply` output carries both labels: the operator adopts it.
    fake.edit(SVCS, NS, "llama-epp", |s| {
        s["metadata"]["labels"]["app.kubernetes.io/managed-by"] = json!("kvgate");
        s["metadata"]["labels"]["nvidia.com/dynamo-graph-deployment-name"] = json!("llama");
    });
    reconcile(&fake, &op).await.unwrap();
    let w = fake.take_writes();
    assert_eq!(
        applied(&w),
        ["services/llama-epp", "inferencepools/llama-pool"]
    );
    assert_eq!(condition(&fake)["reason"], reason::APPLIED);
    let uid = fake.get(DGDS, NS, "llama").unwrap()["metadata"]["uid"].clone();
    assert_eq!(
        fake.get(SVCS, NS, "llama-epp").unwrap()["metadata"]["ownerReferences"][0]["uid"],
        uid
    );
}

#[tokio::test]
async fn objects_another_controller_made_for_the_graph_are_never_rewritten_or_deleted() {
    // Dynamo's operator makes `<graph>-epp` and `<graph>-pool` too, owned by the same graph,
    // but without kvgate's label: kvgate reports the conflict and leaves them be.
    let (fake, client) = cluster(false, services());
    let uid = fake.get(DGDS, NS, "llama").unwrap()["metadata"]["uid"].clone();
    let owner = json!([{"apiVersion": "nvidia.com/v1alpha1", "kind": "DynamoGraphDeployment",
                        "name": "llama", "uid": uid, "controller": true}]);
    fake.put(
        POOLS,
        json!({"apiVersion": "inference.networking.k8s.io/v1", "kind": "InferencePool",
               "metadata": {"name": "llama-pool", "namespace": NS, "ownerReferences": owner,
                            "labels": {"app.kubernetes.io/managed-by": "dynamo-operator"}},
               "spec": {"selector": {"matchLabels": {"x": "y"}}, "targetPorts": [{"number": 8000}]}}),
    );
    let op = operator(client, false);
    reconcile(&fake, &op).await.unwrap();
    let w = fake.take_writes();
    assert!(applied(&w).is_empty(), "{:?}", applied(&w));
    let c = condition(&fake);
    assert_eq!(c["reason"], reason::NOT_OWNED);
    assert!(
        c["message"]
            .as_str()
            .unwrap()
            .contains("InferencePool llm/llama-pool"),
        "{c}"
    );
    // The graph drops its EPP: still not kvgate's to delete.
    fake.edit(DGDS, NS, "llama", |g| {
        g["spec"]["services"].as_object_mut().unwrap().remove("Epp");
    });
    reconcile(&fake, &op).await.unwrap();
    assert!(deleted(&fake.take_writes()).is_empty());
    assert!(fake.get(POOLS, NS, "llama-pool").is_some());
}

#[tokio::test]
async fn a_field_kvgate_stops_setting_is_applied_away() {
    let (fake, client) = cluster(false, services());
    let with = Operator::new(
        client.clone(),
        OperatorConfig {
            render: RenderOptions {
                failure_mode: Some("FailOpen".into()),
                ..RenderOptions::default()
            },
            ..OperatorConfig::default()
        },
        Arc::new(OperatorMetrics::new()),
    );
    reconcile(&fake, &with).await.unwrap();
    assert_eq!(
        fake.get(POOLS, NS, "llama-pool").unwrap()["spec"]["endpointPickerRef"]["failureMode"],
        "FailOpen"
    );
    fake.take_writes();
    // The operator restarted without it: the pool is applied again, without the field, so
    // server-side apply removes it (the live pool alone cannot show that anything changed).
    reconcile(&fake, &operator(client, false)).await.unwrap();
    let w = fake.take_writes();
    assert_eq!(applied(&w), ["inferencepools/llama-pool"]);
    let body = &w
        .iter()
        .find(|l| l.path.ends_with("/llama-pool"))
        .unwrap()
        .body;
    assert!(
        body["spec"]["endpointPickerRef"]
            .get("failureMode")
            .is_none(),
        "{body}"
    );
}

#[tokio::test]
async fn dropping_the_mesh_or_the_epp_deletes_what_kvgate_created_and_nothing_else() {
    let (fake, client) = cluster(true, services());
    reconcile(&fake, &operator(client.clone(), true))
        .await
        .unwrap();
    assert!(fake.get(RULES, NS, "llama-epp").is_some());
    fake.take_writes();

    // The mesh turned off: the rule goes, with a uid precondition.
    let op = operator(client, false);
    let out = reconcile(&fake, &op).await.unwrap();
    assert_eq!(
        out.plan.actions,
        [Action::Delete(Kind::DestinationRule, "llama-epp".into())]
    );
    let w = fake.take_writes();
    assert_eq!(deleted(&w), ["destinationrules/llama-epp"]);
    assert!(
        w[0].body["preconditions"]["uid"].is_string(),
        "{:?}",
        w[0].body
    );
    assert!(fake.get(RULES, NS, "llama-epp").is_none());

    // Somebody else's Service in the namespace is never touched.
    fake.put(
        SVCS,
        json!({"apiVersion": "v1", "kind": "Service",
                          "metadata": {"name": "other", "namespace": NS}, "spec": {}}),
    );
    // The EPP component removed: the Service and pool go; the condition says why.
    fake.edit(DGDS, NS, "llama", |g| {
        g["spec"]["services"].as_object_mut().unwrap().remove("Epp");
        g["metadata"]["generation"] = json!(2);
    });
    reconcile(&fake, &op).await.unwrap();
    let w = fake.take_writes();
    assert_eq!(
        deleted(&w),
        ["services/llama-epp", "inferencepools/llama-pool"]
    );
    assert!(applied(&w).is_empty());
    assert!(fake.get(SVCS, NS, "other").is_some());
    let c = condition(&fake);
    assert_eq!(
        (c["status"].as_str(), c["reason"].as_str()),
        (Some("False"), Some(reason::NO_ENDPOINT_PICKER))
    );

    // A graph being deleted is left to garbage collection.
    fake.edit(DGDS, NS, "llama", |g| {
        g["spec"]["services"] = services();
        g["metadata"]["deletionTimestamp"] = json!("2026-11-24T00:00:00Z");
    });
    let out = reconcile(&fake, &op).await.unwrap();
    assert!(out.plan.actions.is_empty() && out.plan.condition.is_none());
    assert!(fake.take_writes().is_empty());
}

#[tokio::test]
async fn a_graph_that_never_had_an_epp_is_not_touched() {
    let (fake, client) = cluster(true, json!({"Worker": {"componentType": "worker"}}));
    let out = reconcile(&fake, &operator(client, true)).await.unwrap();
    assert!(out.plan.actions.is_empty() && out.plan.condition.is_none());
    assert!(fake.take_writes().is_empty());
}

#[tokio::test]
async fn without_istio_crds_the_rule_is_skipped_and_the_condition_says_why() {
    let (fake, client) = cluster(false, services());
    let op = operator(client, true);
    reconcile(&fake, &op).await.unwrap();
    let log = fake.take_log();
    assert_eq!(
        applied(&log),
        ["services/llama-epp", "inferencepools/llama-pool"]
    );
    // Only discovery asked about Istio: no DestinationRule request at all.
    let istio: Vec<&Logged> = log.iter().filter(|l| l.path.contains("istio")).collect();
    assert!(
        istio
            .iter()
            .all(|l| l.path == "/apis/networking.istio.io/v1beta1"),
        "{istio:?}"
    );
    let c = condition(&fake);
    assert_eq!(
        (c["status"].as_str(), c["reason"].as_str()),
        (Some("True"), Some(reason::ISTIO_CRD_MISSING))
    );
    assert!(
        c["message"].as_str().unwrap().contains("install Istio"),
        "{c}"
    );

    // Istio installed later: the next reconcile notices and adds the rule.
    fake.state().istio = true;
    reconcile(&fake, &op).await.unwrap();
    let w = fake.take_writes();
    assert_eq!(applied(&w), ["destinationrules/llama-epp"]);
    let rule = fake.get(RULES, NS, "llama-epp").unwrap();
    assert_eq!(rule["spec"]["host"], "llama-epp.llm.svc.cluster.local");
    assert_eq!(rule["spec"]["trafficPolicy"]["tls"]["mode"], "SIMPLE");
    assert_eq!(condition(&fake)["reason"], reason::APPLIED);
}

#[tokio::test]
async fn api_failures_land_in_the_condition_and_the_reconcile_fails() {
    let (fake, client) = cluster(false, services());
    fake.state().pools = false;
    let op = operator(client, false);
    let e = reconcile(&fake, &op).await.unwrap_err();
    assert!(e.contains("InferencePool CRD"), "{e}");
    let c = condition(&fake);
    assert_eq!(
        (c["status"].as_str(), c["reason"].as_str()),
        (Some("False"), Some(reason::APPLY_FAILED))
    );
    assert!(
        c["message"]
            .as_str()
            .unwrap()
            .contains("inference.networking.k8s.io/v1"),
        "{c}"
    );

    // CRD installed: the next reconcile recovers and the condition flips.
    fake.state().pools = true;
    reconcile(&fake, &op).await.unwrap();
    let c = condition(&fake);
    assert_eq!(
        (c["status"].as_str(), c["reason"].as_str()),
        (Some("True"), Some(reason::APPLIED))
    );

    // A status written meanwhile by someone else: the guarded patch is refused (409), the graph
    // read again, and the condition set on the new status; nothing of the other writer's is lost.
    let stale = fake.get(DGDS, NS, "llama").unwrap();
    fake.edit(DGDS, NS, "llama", |g| {
        g["status"]["conditions"][0]["message"] = json!("dynamo was here");
        g["metadata"]["generation"] = json!(2);
    });
    fake.take_writes();
    let mut stale = stale;
    stale["metadata"]["generation"] = json!(2);
    let out = op.reconcile(&stale).await.unwrap();
    assert!(out.status_written);
    let w = fake.take_log();
    assert_eq!(status_writes(&w), 2, "refused once, then written");
    assert!(
        w.iter()
            .any(|l| l.method == "GET" && l.path.ends_with("/dynamographdeployments/llama"))
    );
    let g = fake.get(DGDS, NS, "llama").unwrap();
    assert_eq!(g["status"]["conditions"][0]["message"], "dynamo was here");
    assert_eq!(condition(&fake)["observedGeneration"], 2);
}

#[tokio::test]
async fn the_controller_reconciles_graphs_and_repairs_what_is_deleted() {
    let (fake, client) = cluster(false, services());
    let metrics = Arc::new(OperatorMetrics::new());
    let op = Arc::new(Operator::new(
        client,
        // Requeues far apart: the repair below comes from the watch on owned objects.
        OperatorConfig {
            requeue: Duration::from_secs(300),
            ..OperatorConfig::default()
        },
        metrics.clone(),
    ));
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(run(op, async move {
        let _ = stop_rx.await;
    }));
    let wait = |what: &'static str, f: &dyn Fn() -> bool| {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !f() {
            assert!(
                std::time::Instant::now() < deadline,
                "timed out waiting for {what}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    // Polls from a blocking thread so the runtime keeps driving the controller.
    let f2 = fake.clone();
    let m2 = metrics.clone();
    tokio::task::spawn_blocking(move || {
        let ok = || m2.reconciles_ok.load(std::sync::atomic::Ordering::Relaxed);
        wait("the objects and the condition", &|| {
            f2.get(POOLS, NS, "llama-pool").is_some()
                && f2.get(DGDS, NS, "llama").unwrap()["status"]["conditions"]
                    .as_array()
                    .is_some_and(|c| c.iter().any(|c| c["type"] == CONDITION_TYPE))
        });
        // Quiet: the reconcile its own status write triggered is done, and nothing else comes
        // (the next requeue is minutes away).
        let mut settled = ok();
        loop {
            std::thread::sleep(Duration::from_millis(300));
            let now = ok();
            if now == settled {
                break;
            }
            settled = now;
        }
        f2.remove(POOLS, NS, "llama-pool");
        wait("the pool to come back", &|| {
            f2.get(POOLS, NS, "llama-pool").is_some()
        });
        wait("the repairing reconcile to finish", &|| ok() > settled);
    })
    .await
    .unwrap();
    assert!(metrics.ready.load(std::sync::atomic::Ordering::Relaxed));
    assert_eq!(condition(&fake)["reason"], reason::APPLIED);
    // The controller watched the graphs and the objects it owns (by the managed-by label).
    let log = fake.take_log();
    assert!(log.iter().any(
        |l| l.path == "/apis/nvidia.com/v1alpha1/dynamographdeployments"
            && l.query.contains("watch=true")
    ));
    assert!(
        log.iter().any(|l| l.path == "/api/v1/services"
            && l.query.contains("app.kubernetes.io%2Fmanaged-by%3Dkvgate")),
        "{:?}",
        log.iter()
            .map(|l| format!("{} {}", l.path, l.query))
            .collect::<Vec<_>>()
    );
    stop_tx.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .unwrap()
        .unwrap();
}
