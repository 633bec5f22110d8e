//! `render`: the objects for the example graphs match golden files, every rendered
//! InferencePool passes the upstream CRD schema, and bad graphs or options get errors that name
//! the problem. `KVGATE_UPDATE_GOLDEN=1` rewrites the golden files (review the diff).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use kvgate_k8s::{RenderError, RenderOptions, ServiceMesh, TlsMode, parse_dgd, render};
use std::path::PathBuf;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn example(name: &str) -> String {
    std::fs::read_to_string(repo().join("deploy/examples").join(name)).unwrap()
}

fn golden(name: &str, got: &str) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name);
    if std::env::var_os("KVGATE_UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, got).unwrap();
        return;
    }
    let want = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (KVGATE_UPDATE_GOLDEN=1 writes it)", path.display()));
    assert_eq!(got, want, "{} differs from the rendering", path.display());
}

fn mesh(mode: TlsMode) -> ServiceMesh {
    ServiceMesh {
        tls_mode: mode,
        client_certificate: "/etc/certs/client.pem".into(),
        private_key: "/etc/certs/key.pem".into(),
        ca_certificates: "/etc/certs/ca.pem".into(),
        ..ServiceMesh::default()
    }
}

/// Every case: (example, options, golden file).
fn cases() -> Vec<(&'static str, RenderOptions, &'static str)> {
    vec![
        (
            "dgd-aggregated.yaml",
            RenderOptions::default(),
            "aggregated.yaml",
        ),
        (
            "dgd-disaggregated.yaml",
            RenderOptions {
                failure_mode: Some("FailOpen".into()),
                service_mesh: Some(ServiceMesh::default()),
                ..RenderOptions::default()
            },
            "disaggregated-mesh-simple.yaml",
        ),
        (
            "dgd-aggregated.yaml",
            RenderOptions {
                service_mesh: Some(mesh(TlsMode::Mutual)),
                ..RenderOptions::default()
            },
            "aggregated-mesh-mutual.yaml",
        ),
    ]
}

#[test]
fn examples_render_to_their_golden_files_and_pass_the_crd_schema() {
    let schema = common::pool_schema();
    for (file, opts, gold) in cases() {
        let d = parse_dgd(&example(file)).unwrap();
        let r = render(&d, &opts).unwrap();
        let pool = serde_json::to_value(&r.pool).unwrap();
        let v = schema.validate(&pool);
        assert!(v.is_empty(), "{file}: {v:?}");
        golden(gold, &r.to_yaml().unwrap());
    }
}

#[test]
fn the_pool_selects_the_graphs_workers_and_points_at_its_epp() {
    let d = parse_dgd(&example("dgd-aggregated.yaml")).unwrap();
    let r = render(&d, &RenderOptions::default()).unwrap();
    let pool = &r.pool;
    assert_eq!(pool.metadata.name.as_deref(), Some("llama-pool"));
    assert_eq!(pool.metadata.namespace.as_deref(), Some("inference"));
    let labels = &pool.spec.selector.match_labels;
    assert_eq!(labels["nvidia.com/dynamo-component-class"], "worker");
    assert_eq!(labels["nvidia.com/dynamo-namespace"], "inference-llama");
    assert_eq!(
        pool.spec.target_ports,
        vec![kvgate_k8s::pool::Port { number: 8000 }]
    );
    let epp = pool.spec.endpoint_picker_ref.as_ref().unwrap();
    assert_eq!(
        (epp.name.as_str(), epp.port.unwrap().number),
        ("llama-epp", 9002)
    );
    assert_eq!(r.service["metadata"]["name"], "llama-epp");
    assert_eq!(r.service["spec"]["ports"][0]["port"], 9002);
    assert_eq!(
        r.service["spec"]["selector"]["nvidia.com/dynamo-component"],
        "Epp"
    );
    assert!(r.destination_rule.is_none());
    // Without a uid (no cluster) nothing owns the objects; with one, the graph does.
    assert!(pool.metadata.owner_references.is_empty());
    let mut owned = d.clone();
    owned.metadata.uid = Some("0b6c-uid".into());
    let r = render(&owned, &RenderOptions::default()).unwrap();
    let o = &r.pool.metadata.owner_references[0];
    assert_eq!(
        (o.kind.as_str(), o.name.as_str(), o.uid.as_str()),
        ("DynamoGraphDeployment", "llama", "0b6c-uid")
    );
    assert_eq!(o.controller, Some(true));
    assert_eq!(
        r.service["metadata"]["ownerReferences"][0]["uid"],
        "0b6c-uid"
    );
}

#[test]
fn the_destination_rule_carries_the_mesh_tls_settings() {
    let d = parse_dgd(&example("dgd-disaggregated.yaml")).unwrap();
    let opts = RenderOptions {
        service_mesh: Some(ServiceMesh::default()),
        ..RenderOptions::default()
    };
    let dr = render(&d, &opts).unwrap().destination_rule.unwrap();
    assert_eq!(dr["apiVersion"], "networking.istio.io/v1beta1");
    assert_eq!(
        dr["spec"]["host"],
        "qwen-disagg-epp.inference.svc.cluster.local"
    );
    assert_eq!(dr["spec"]["trafficPolicy"]["tls"]["mode"], "SIMPLE");
    assert_eq!(
        dr["spec"]["trafficPolicy"]["tls"]["insecureSkipVerify"],
        true
    );
    assert!(
        dr["spec"]["trafficPolicy"]["tls"]
            .get("clientCertificate")
            .is_none()
    );
    let opts = RenderOptions {
        service_mesh: Some(mesh(TlsMode::Mutual)),
        ..RenderOptions::default()
    };
    let dr = render(&d, &opts).unwrap().destination_rule.unwrap();
    assert_eq!(dr["spec"]["trafficPolicy"]["tls"]["mode"], "MUTUAL");
    assert_eq!(
        dr["spec"]["trafficPolicy"]["tls"]["privateKey"],
        "/etc/certs/key.pem"
    );
}

fn err(yaml: &str, opts: &RenderOptions) -> String {
    match parse_dgd(yaml).and_then(|d| render(&d, opts)) {
        Ok(_) => panic!("rendered:\n{yaml}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_graphs_and_options_are_named() {
    let head = "apiVersion: nvidia.com/v1alpha1\nkind: DynamoGraphDeployment\nmetadata: {name: g, namespace: ns}\n";
    let none = RenderOptions::default();
    let cases: Vec<(String, RenderOptions, &str)> = vec![
        (format!("{head}spec: {{services: {{W: {{componentType: worker}}}}}}"), none.clone(), "has no component with componentType: epp"),
        (
            format!("{head}spec: {{services: {{A: {{componentType: epp}}, B: {{componentType: epp}}}}}}"),
            none.clone(),
            "has 2 EPP components (A, B)",
        ),
        (
            "apiVersion: v1\nkind: Pod\nmetadata: {name: g}\n".to_string(),
            none.clone(),
            "expected apiVersion nvidia.com/v1alpha1 kind DynamoGraphDeployment, found v1 Pod",
        ),
        ("{not yaml".to_string(), none.clone(), "not a DynamoGraphDeployment"),
        (
            "apiVersion: nvidia.com/v1alpha1\nkind: DynamoGraphDeployment\nmetadata: {name: Bad_Name}\nspec: {services: {E: {componentType: epp}}}".to_string(),
            none.clone(),
            "must be a DNS-1123 label",
        ),
        (
            format!("{head}spec: {{services: {{E: {{componentType: epp}}, W: {{componentType: worker}}, G: {{componentType: worker, globalDynamoNamespace: true}}}}}}"),
            none.clone(),
            "are in different Dynamo namespaces",
        ),
        (
            format!("{head}spec: {{services: {{E: {{componentType: epp}}}}}}"),
            RenderOptions { failure_mode: Some("Sometimes".into()), ..none.clone() },
            "failure mode \"Sometimes\"",
        ),
        (
            format!("{head}spec: {{services: {{E: {{componentType: epp}}}}}}"),
            RenderOptions {
                service_mesh: Some(ServiceMesh { tls_mode: TlsMode::Mutual, ..ServiceMesh::default() }),
                ..none.clone()
            },
            "MUTUAL needs clientCertificate",
        ),
        (
            format!("{head}spec: {{services: {{E: {{componentType: epp}}}}}}"),
            RenderOptions {
                service_mesh: Some(ServiceMesh { provider: "linkerd".into(), ..ServiceMesh::default() }),
                ..none.clone()
            },
            "only istio is supported",
        ),
    ];
    for (yaml, opts, want) in cases {
        let e = err(&yaml, &opts);
        assert!(e.contains(want), "{want:?} not in {e:?}");
    }
    assert!(
        matches!(TlsMode::parse("STRICT"), Err(RenderError::Invalid(m)) if m.contains("SIMPLE, MUTUAL"))
    );
}

#[test]
fn a_graph_without_workers_uses_the_epps_namespace_and_a_global_namespace_is_dynamo() {
    let yaml = "apiVersion: nvidia.com/v1alpha1\nkind: DynamoGraphDeployment\nmetadata: {name: a.b}\nspec: {services: {E: {componentType: epp}}}";
    // Dots are not DNS-1123 label characters for the Service name.
    assert!(err(yaml, &RenderOptions::default()).contains("DNS-1123"));
    let yaml = "apiVersion: nvidia.com/v1alpha1\nkind: DynamoGraphDeployment\nmetadata: {name: ab}\nspec: {services: {E: {componentType: epp}, W: {componentType: worker, globalDynamoNamespace: true}, X: {componentType: worker, globalDynamoNamespace: true}}}";
    let d = parse_dgd(yaml).unwrap();
    let r = render(
        &d,
        &RenderOptions {
            default_namespace: Some("team".into()),
            ..RenderOptions::default()
        },
    )
    .unwrap();
    assert_eq!(r.pool.metadata.namespace.as_deref(), Some("team"));
    assert_eq!(
        r.pool.spec.selector.match_labels["nvidia.com/dynamo-namespace"],
        "dynamo"
    );
    assert_eq!(
        r.service["spec"]["selector"]["nvidia.com/dynamo-namespace"],
        "team-ab"
    );
}
