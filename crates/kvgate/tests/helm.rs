//! The Helm chart `deploy/helm/kvgate`, rendered by the real `helm` (`.tools/bin/helm`, installed
//! by scripts/setup.sh; the tests fail, never skip, without it): it lints, its objects fit
//! together (selectors, names, ports, RBAC), its InferencePool passes the upstream CRD schema,
//! its DestinationRule is the operator's, bad values get errors that name them, and the
//! arguments and environment it gives the containers are ones `kvgate` accepts. Its optional
//! Grafana dashboard ConfigMap holds deploy/grafana/kvgate.json (the chart's copy, byte for byte)
//! with the panels and queries listed here.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::{Value, json};
use std::path::PathBuf;
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn chart() -> PathBuf {
    root().join("deploy/helm/kvgate")
}

fn helm(args: &[&str]) -> (bool, String, String) {
    let bin = root().join(".tools/bin/helm");
    // Helm's caches and config in a private folder: nothing from the user's home.
    let home = std::env::temp_dir().join(format!("kvgate-helm-{}", std::process::id()));
    let out = Command::new(&bin)
        .args(args)
        .env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_DATA_HOME", home.join("data"))
        .env_remove("KUBECONFIG")
        .output()
        .unwrap_or_else(|e| panic!("{}: {e} (run scripts/setup.sh)", bin.display()));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `helm template t <chart> -n llm <args>`: the objects, as JSON.
fn render(args: &[&str]) -> Vec<Value> {
    let chart = chart();
    let mut all = vec!["template", "t", chart.to_str().unwrap(), "-n", "llm"];
    all.extend_from_slice(args);
    let (ok, out, err) = helm(&all);
    assert!(ok, "helm template {args:?}: {err}");
    serde_yaml_ng::Deserializer::from_str(&out)
        .map(|d| <Value as serde::Deserialize>::deserialize(d).unwrap())
        .filter(|v| !v.is_null())
        .collect()
}

fn render_err(args: &[&str]) -> String {
    let chart = chart();
    let mut all = vec!["template", "t", chart.to_str().unwrap()];
    all.extend_from_slice(args);
    let (ok, _, err) = helm(&all);
    assert!(!ok, "helm template {args:?} should fail");
    err
}

fn find<'a>(objs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objs.iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in {:?}", kinds(objs)))
}

fn kinds(objs: &[Value]) -> Vec<String> {
    let mut k: Vec<String> = objs
        .iter()
        .map(|o| {
            format!(
                "{}/{}",
                o["kind"].as_str().unwrap(),
                o["metadata"]["name"].as_str().unwrap()
            )
        })
        .collect();
    k.sort();
    k
}

fn container<'a>(deploy: &'a Value, name: &str) -> &'a Value {
    deploy["spec"]["template"]["spec"]["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap()
}

fn env(c: &Value) -> Vec<(String, String)> {
    c["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let v = match e.get("value") {
                Some(v) => v.as_str().unwrap().to_string(),
                // The only valueFroms: the pod's namespace and name.
                None => match e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
                    Some("metadata.namespace") => "llm".to_string(),
                    Some("metadata.name") => "t-kvgate-operator-5d9c7b-x2x7k".to_string(),
                    other => panic!("unexpected valueFrom {other:?} in {e}"),
                },
            };
            (e["name"].as_str().unwrap().to_string(), v)
        })
        .collect()
}

fn env_value(c: &Value, name: &str) -> Option<String> {
    env(c).into_iter().find(|(k, _)| k == name).map(|(_, v)| v)
}

/// `(item[a], item[b])` for each item of a list.
fn pairs(list: &Value, a: &str, b: &str) -> Vec<(Value, Value)> {
    list.as_array()
        .unwrap()
        .iter()
        .map(|p| (p[a].clone(), p[b].clone()))
        .collect()
}

/// Whether an RBAC rule list grants `verb` on `group`/`resource`.
fn allows(rules: &Value, group: &str, resource: &str, verb: &str) -> bool {
    rules.as_array().unwrap().iter().any(|r| {
        r["apiGroups"].as_array().unwrap().contains(&json!(group))
            && r["resources"]
                .as_array()
                .unwrap()
                .contains(&json!(resource))
            && r["verbs"].as_array().unwrap().contains(&json!(verb))
    })
}

/// The upstream InferencePool CRD from `../shared/k8s/` (or `$KVGATE_SHARED_DIR/k8s/`).
fn pool_schema() -> kvgate_k8s::CrdSchema {
    const CRD: &str = "k8s/inference.networking.k8s.io_inferencepools.yaml";
    let dir = std::env::var_os("KVGATE_SHARED_DIR")
        .map(PathBuf::from)
        .or_else(|| {
            root()
                .ancestors()
                .map(|a| a.join("shared"))
                .find(|s| s.join(CRD).is_file())
        })
        .unwrap_or_else(|| root().join("../shared"));
    let text = std::fs::read_to_string(dir.join(CRD)).unwrap_or_else(|e| {
        panic!(
            "the upstream InferencePool CRD is needed at {}: {e}",
            dir.join(CRD).display()
        )
    });
    kvgate_k8s::CrdSchema::from_crd(&text, "v1").unwrap()
}

#[test]
fn the_chart_lints_and_its_default_objects_fit_together() {
    let (ok, out, err) = helm(&["lint", "--strict", chart().to_str().unwrap()]);
    assert!(ok, "helm lint:\n{out}{err}");
    let objs = render(&[]);
    assert_eq!(
        kinds(&objs),
        [
            "Deployment/t-kvgate-epp",
            "InferencePool/t-kvgate-pool",
            "PodDisruptionBudget/t-kvgate-epp",
            "Role/t-kvgate-epp",
            "RoleBinding/t-kvgate-epp",
            "Service/t-kvgate-epp",
            "ServiceAccount/t-kvgate-epp",
        ]
    );
    for o in &objs {
        assert_eq!(o["metadata"]["namespace"], "llm", "{o}");
    }
    let deploy = find(&objs, "Deployment", "t-kvgate-epp");
    let pod_labels = &deploy["spec"]["template"]["metadata"]["labels"];
    assert_eq!(&deploy["spec"]["selector"]["matchLabels"], pod_labels);
    let svc = find(&objs, "Service", "t-kvgate-epp");
    assert_eq!(&svc["spec"]["selector"], pod_labels);
    let pdb = find(&objs, "PodDisruptionBudget", "t-kvgate-epp");
    assert_eq!(&pdb["spec"]["selector"]["matchLabels"], pod_labels);
    assert_eq!(deploy["spec"]["replicas"], 2);

    // The pool: valid against the upstream CRD, pointing at the Service's gRPC port.
    let pool = find(&objs, "InferencePool", "t-kvgate-pool");
    let violations = pool_schema().validate(pool);
    assert!(violations.is_empty(), "{violations:?}");
    let epp_ref = &pool["spec"]["endpointPickerRef"];
    assert_eq!(epp_ref["name"], "t-kvgate-epp");
    assert_eq!(epp_ref["port"]["number"], 9002);
    // Service port -> the container port of that name.
    assert_eq!(
        pairs(&svc["spec"]["ports"], "port", "targetPort"),
        [
            (json!(9002), json!("grpc")),
            (json!(9003), json!("grpc-health")),
            (json!(9090), json!("metrics"))
        ]
    );
    let c = container(deploy, "epp");
    assert_eq!(
        pairs(&c["ports"], "name", "containerPort"),
        [
            (json!("grpc"), json!(9002)),
            (json!("grpc-health"), json!(9003)),
            (json!("metrics"), json!(9090))
        ]
    );
    // Probes on the plaintext health port, readiness on the service that waits for discovery.
    assert_eq!(
        c["readinessProbe"]["grpc"],
        json!({"port": 9003, "service": "readiness"})
    );
    assert_eq!(
        c["livenessProbe"]["grpc"],
        json!({"port": 9003, "service": "liveness"})
    );
    let args: Vec<&str> = c["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert!(args.contains(&"--pool-name=t-kvgate-pool"), "{args:?}");
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);

    // RBAC: the pool read, its pods listed and watched, by the Deployment's ServiceAccount.
    let role = find(&objs, "Role", "t-kvgate-epp");
    let allows = |g: &str, r: &str, v: &str| allows(&role["rules"], g, r, v);
    assert!(allows(
        "inference.networking.k8s.io",
        "inferencepools",
        "get"
    ));
    assert!(allows("", "pods", "list") && allows("", "pods", "watch"));
    assert!(!allows("", "pods", "delete"));
    let binding = find(&objs, "RoleBinding", "t-kvgate-epp");
    assert_eq!(binding["subjects"][0]["name"], "t-kvgate-epp");
    assert_eq!(
        deploy["spec"]["template"]["spec"]["serviceAccountName"],
        "t-kvgate-epp"
    );
}

#[test]
fn replica_sync_follows_the_replica_count_unless_the_env_sets_it() {
    let sync = |args: &[&str]| {
        let objs = render(args);
        let c = container(find(&objs, "Deployment", "t-kvgate-epp"), "epp").clone();
        let names: Vec<String> = env(&c).into_iter().map(|(k, _)| k).collect();
        let mut dedup = names.clone();
        dedup.sort();
        dedup.dedup();
        assert_eq!(dedup.len(), names.len(), "duplicate env vars: {names:?}");
        env_value(&c, "DYN_ROUTER_REPLICA_SYNC").unwrap()
    };
    assert_eq!(sync(&["--set", "epp.replicas=1"]), "false");
    assert_eq!(sync(&["--set", "epp.replicas=3"]), "true");
    assert_eq!(
        sync(&[
            "--set",
            "epp.replicas=3",
            "--set-string",
            "epp.env.DYN_ROUTER_REPLICA_SYNC=false"
        ]),
        "false"
    );
    let objs = render(&[
        "--set",
        "epp.env.DYN_ROUTER_TEMPERATURE=0.25",
        "--set",
        "epp.env.DYN_ADMISSION_CONTROL=token-capacity",
        "--set",
        "epp.env.DYN_ACTIVE_PREFILL_TOKENS_THRESHOLD=2000000",
    ]);
    let c = container(find(&objs, "Deployment", "t-kvgate-epp"), "epp");
    assert_eq!(
        env_value(c, "DYN_ROUTER_TEMPERATURE").as_deref(),
        Some("0.25")
    );
    assert_eq!(
        env_value(c, "DYN_ADMISSION_CONTROL").as_deref(),
        Some("token-capacity")
    );
    // A large whole number is written as one, not as 2e+06.
    assert_eq!(
        env_value(c, "DYN_ACTIVE_PREFILL_TOKENS_THRESHOLD").as_deref(),
        Some("2000000")
    );
}

#[test]
fn the_service_mesh_values_give_the_operators_destination_rule() {
    let istio = [
        "--api-versions",
        "networking.istio.io/v1beta1/DestinationRule",
    ];
    for (mode, extra) in [
        ("SIMPLE", &[][..]),
        (
            "MUTUAL",
            &[
                "--set",
                "dynamo.serviceMesh.istio.clientCertificate=/etc/certs/cert.pem",
                "--set",
                "dynamo.serviceMesh.istio.privateKey=/etc/certs/key.pem",
                "--set",
                "dynamo.serviceMesh.istio.caCertificates=/etc/certs/ca.pem",
            ][..],
        ),
    ] {
        let mode_arg = format!("dynamo.serviceMesh.istio.tlsMode={mode}");
        let mut args = vec![
            "--set",
            "dynamo.serviceMesh.enabled=true",
            "--set",
            &mode_arg,
        ];
        args.extend_from_slice(&istio);
        args.extend_from_slice(extra);
        let objs = render(&args);
        let rule = find(&objs, "DestinationRule", "t-kvgate-epp");
        // What `kvgate render` / the operator make for a graph whose EPP Service has this name.
        let d = kvgate_k8s::parse_dgd(
            "apiVersion: nvidia.com/v1alpha1\nkind: DynamoGraphDeployment\nmetadata: {name: t-kvgate, namespace: llm}\nspec: {services: {Epp: {componentType: epp}}}\n",
        )
        .unwrap();
        let mesh = kvgate_k8s::ServiceMesh {
            tls_mode: kvgate_k8s::TlsMode::parse(mode).unwrap(),
            client_certificate: "/etc/certs/cert.pem".into(),
            private_key: "/etc/certs/key.pem".into(),
            ca_certificates: "/etc/certs/ca.pem".into(),
            ..kvgate_k8s::ServiceMesh::default()
        };
        let want = kvgate_k8s::render(
            &d,
            &kvgate_k8s::RenderOptions {
                service_mesh: Some(mesh),
                ..Default::default()
            },
        )
        .unwrap()
        .destination_rule
        .unwrap();
        assert_eq!(rule["spec"], want["spec"], "{mode}");
        assert_eq!(rule["apiVersion"], want["apiVersion"]);
    }
    // No Istio API in the cluster: no rule (the operator does the same).
    let objs = render(&["--set", "dynamo.serviceMesh.enabled=true"]);
    assert!(!objs.iter().any(|o| o["kind"] == "DestinationRule"));
    // Mesh off: none either.
    assert!(
        !render(&istio)
            .iter()
            .any(|o| o["kind"] == "DestinationRule")
    );
}

#[test]
fn bad_values_get_errors_that_name_them() {
    let cases: [(&[&str], &str); 7] = [
        (
            &["--set", "dynamo.serviceMesh.istio.tlsMode=STRICT"],
            "/dynamo/serviceMesh/istio/tlsMode",
        ),
        (
            &["--set", "dynamo.serviceMesh.provider=linkerd"],
            "/dynamo/serviceMesh/provider",
        ),
        (
            &[
                "--set",
                "dynamo.serviceMesh.enabled=true",
                "--set",
                "dynamo.serviceMesh.istio.tlsMode=MUTUAL",
            ],
            "MUTUAL needs dynamo.serviceMesh.istio.clientCertificate",
        ),
        (&["--set", "epp.replicas=0"], "/epp/replicas"),
        (&["--set", "epp.eventPlane=kafka"], "/epp/eventPlane"),
        (
            &["--set", "inferencePool.targetPorts={8000,8000}"],
            "/inferencePool/targetPorts",
        ),
        (&["--set", "epp.replica=2"], "'replica' not allowed"),
    ];
    for (args, want) in cases {
        let err = render_err(args);
        assert!(err.contains(want), "{args:?}: {err}");
    }
}

#[test]
fn the_operator_gets_cluster_wide_or_namespaced_rbac_and_the_mesh_settings() {
    let objs = render(&["--set", "operator.enabled=true"]);
    // Cluster-scoped names carry the release namespace.
    let role = find(&objs, "ClusterRole", "llm-t-kvgate-operator");
    let allows = |g: &str, r: &str, v: &str| allows(&role["rules"], g, r, v);
    for (g, r, v) in [
        ("nvidia.com", "dynamographdeployments", "watch"),
        ("nvidia.com", "dynamographdeployments/status", "patch"),
        ("", "services", "patch"),
        ("", "services", "delete"),
        ("inference.networking.k8s.io", "inferencepools", "patch"),
        ("inference.networking.k8s.io", "inferencepools", "watch"),
        ("networking.istio.io", "destinationrules", "patch"),
        // blockOwnerDeletion under OwnerReferencesPermissionEnforcement.
        ("nvidia.com", "dynamographdeployments/finalizers", "update"),
    ] {
        assert!(allows(g, r, v), "{v} {g}/{r}");
    }
    assert!(!allows("nvidia.com", "dynamographdeployments", "patch"));
    let binding = find(&objs, "ClusterRoleBinding", "llm-t-kvgate-operator");
    assert_eq!(binding["roleRef"]["name"], "llm-t-kvgate-operator");
    assert_eq!(
        binding["subjects"][0],
        json!({"kind": "ServiceAccount", "name": "t-kvgate-operator", "namespace": "llm"})
    );
    let deploy = find(&objs, "Deployment", "t-kvgate-operator");
    assert_eq!(deploy["spec"]["replicas"], 1);
    // Leader election on: a new pod may start beside the old one, as a standby.
    assert_eq!(deploy["spec"]["strategy"]["type"], "RollingUpdate");
    let c = container(deploy, "operator");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(
        env_value(c, "DYNAMO_SERVICE_MESH_ENABLED").as_deref(),
        Some("false")
    );
    for (k, v) in [
        ("KVGATE_LEADER_ELECT", "true"),
        ("KVGATE_LEADER_ELECTION_LEASE_NAME", "t-kvgate-operator"),
        ("KVGATE_LEADER_ELECTION_NAMESPACE", "llm"),
        ("KVGATE_LEADER_ELECTION_LEASE_DURATION_SECONDS", "15"),
        ("KVGATE_LEADER_ELECTION_RENEW_DEADLINE_SECONDS", "10"),
        ("KVGATE_LEADER_ELECTION_RETRY_PERIOD_SECONDS", "2"),
    ] {
        assert_eq!(env_value(c, k).as_deref(), Some(v), "{k}");
    }
    let pod_name = c["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "POD_NAME")
        .unwrap();
    assert_eq!(
        pod_name["valueFrom"]["fieldRef"]["fieldPath"],
        "metadata.name"
    );
    // The Lease, in the release namespace: create, and get/update of that one name.
    let lease_role = find(&objs, "Role", "t-kvgate-operator-leader-election");
    assert_eq!(lease_role["metadata"]["namespace"], "llm");
    let lease_rules = lease_role["rules"].as_array().unwrap();
    for v in ["create", "get", "update"] {
        assert!(
            lease_rules
                .iter()
                .any(|r| r["apiGroups"] == json!(["coordination.k8s.io"])
                    && r["resources"] == json!(["leases"])
                    && r["verbs"].as_array().unwrap().iter().any(|x| x == v)
                    && (v == "create" || r["resourceNames"] == json!(["t-kvgate-operator"]))),
            "{v} on the Lease: {lease_rules:?}"
        );
    }
    let lease_binding = find(&objs, "RoleBinding", "t-kvgate-operator-leader-election");
    assert_eq!(lease_binding["metadata"]["namespace"], "llm");
    assert_eq!(
        lease_binding["roleRef"]["name"],
        "t-kvgate-operator-leader-election"
    );
    assert_eq!(lease_binding["subjects"], binding["subjects"]);

    // Several copies with leader election; without it, one copy and no overlap on upgrades.
    let objs = render(&[
        "--set",
        "operator.enabled=true",
        "--set",
        "operator.replicas=3",
    ]);
    assert_eq!(
        find(&objs, "Deployment", "t-kvgate-operator")["spec"]["replicas"],
        3
    );
    let off = [
        "--set",
        "operator.enabled=true",
        "--set",
        "operator.leaderElection.enabled=false",
    ];
    let objs = render(&off);
    let deploy = find(&objs, "Deployment", "t-kvgate-operator");
    assert_eq!(deploy["spec"]["strategy"]["type"], "Recreate");
    assert_eq!(
        env_value(container(deploy, "operator"), "KVGATE_LEADER_ELECT").as_deref(),
        Some("false")
    );
    assert!(
        !objs
            .iter()
            .any(|o| o["metadata"]["name"] == "t-kvgate-operator-leader-election"),
        "{:?}",
        kinds(&objs)
    );
    let mut two = off.to_vec();
    two.extend(["--set", "operator.replicas=2"]);
    let err = render_err(&two);
    assert!(
        err.contains("needs operator.leaderElection.enabled"),
        "{err}"
    );
    let err = render_err(&[
        "--set",
        "operator.enabled=true",
        "--set",
        "operator.leaderElection.renewDeadlineSeconds=20",
    ]);
    assert!(
        err.contains("leaseDurationSeconds > renewDeadlineSeconds"),
        "{err}"
    );

    let objs = render(&[
        "--set",
        "operator.enabled=true",
        "--set",
        "operator.watchNamespace=models",
    ]);
    assert!(!objs.iter().any(|o| o["kind"] == "ClusterRole"));
    let role = find(&objs, "Role", "t-kvgate-operator");
    assert_eq!(role["metadata"]["namespace"], "models");
    assert_eq!(
        find(&objs, "RoleBinding", "t-kvgate-operator")["metadata"]["namespace"],
        "models"
    );
    let c = container(find(&objs, "Deployment", "t-kvgate-operator"), "operator");
    assert_eq!(
        env_value(c, "KVGATE_WATCH_NAMESPACE").as_deref(),
        Some("models")
    );
    // Only the operator: no EPP objects.
    let objs = render(&[
        "--set",
        "operator.enabled=true",
        "--set",
        "epp.enabled=false",
    ]);
    assert!(
        objs.iter()
            .all(|o| o["metadata"]["labels"]["app.kubernetes.io/component"] == "operator"),
        "{:?}",
        kinds(&objs)
    );
}

/// Runs `kvgate` with a container's args and env from the chart. Without a cluster it must get
/// as far as asking for the Kubernetes API: every flag and variable was accepted and validated.
fn run_container(c: &Value) -> String {
    let args: Vec<&str> = c["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kvgate"));
    cmd.args(&args)
        .env_clear()
        .env("KUBECONFIG", "/nonexistent/kvgate-test-kubeconfig")
        .env("HOME", "/nonexistent");
    for (k, v) in env(c) {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    assert!(!out.status.success(), "{args:?} ran without a cluster");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn the_containers_get_arguments_kvgate_accepts() {
    let objs = render(&[
        "--set",
        "operator.enabled=true",
        "--set",
        "operator.failureMode=FailOpen",
        "--set",
        "operator.replicas=2",
        "--set",
        "operator.leaderElection.renewDeadlineSeconds=7.5",
        "--set",
        "operator.leaderElection.retryPeriodSeconds=0.5",
        "--set",
        "dynamo.serviceMesh.enabled=true",
        "--set",
        "dynamo.serviceMesh.istio.tlsMode=ISTIO_MUTUAL",
        "--set",
        "epp.replicas=3",
        "--set",
        "epp.eventPlane=nats",
        "--set",
        "epp.env.DYN_ROUTER_KV_OVERLAP_SCORE_CREDIT=0.5",
        "--set",
        "epp.env.DYN_ROUTER_TEMPERATURE=0.1",
    ]);
    let epp = container(find(&objs, "Deployment", "t-kvgate-epp"), "epp");
    let err = run_container(epp);
    assert!(
        err.contains("pod discovery needs the Kubernetes API"),
        "kvgate epp refused the chart's arguments: {err}"
    );
    let op = container(find(&objs, "Deployment", "t-kvgate-operator"), "operator");
    let err = run_container(op);
    assert!(
        err.contains("the operator needs the Kubernetes API"),
        "kvgate operator refused the chart's arguments: {err}"
    );
    // And a bad knob in epp.env is caught by kvgate itself, by name.
    let objs = render(&["--set", "epp.env.DYN_ROUTER_TEMPERATURE=-3"]);
    let err = run_container(container(find(&objs, "Deployment", "t-kvgate-epp"), "epp"));
    assert!(err.contains("DYN_ROUTER_TEMPERATURE"), "{err}");
}

/// One dashboard panel: title, unit, and each query with its legend.
type Panel = (
    &'static str,
    &'static str,
    &'static [(&'static str, &'static str)],
);

/// The dashboard's panels.
const DASHBOARD: [Panel; 10] = [
    (
        "Cache hit rate (block-weighted)",
        "percentunit",
        &[
            (
                "sum(rate(kvgate_router_actual_cached_tokens_total[1m])) / sum(rate(kvgate_router_reported_prompt_tokens_total[1m]))",
                "actual (workers' usage)",
            ),
            (
                "sum(rate(kvgate_router_predicted_cached_tokens_total[1m])) / sum(rate(kvgate_router_routed_prompt_tokens_total[1m]))",
                "predicted (router)",
            ),
            (
                "sum(rate(vllm:prefix_cache_hits_total[1m])) / sum(rate(vllm:prefix_cache_queries_total[1m]))",
                "engines' prefix cache",
            ),
        ],
    ),
    (
        "Predicted vs actual cached tokens/s",
        "short",
        &[
            (
                "sum(rate(kvgate_router_reported_predicted_cached_tokens_total[1m]))",
                "predicted (router)",
            ),
            (
                "sum(rate(kvgate_router_actual_cached_tokens_total[1m]))",
                "actual (workers' usage)",
            ),
        ],
    ),
    (
        "Routing decision latency p99",
        "s",
        &[
            (
                "histogram_quantile(0.99, sum by (le) (rate(kvgate_router_decision_seconds_bucket[1m])))",
                "router decision",
            ),
            (
                "histogram_quantile(0.99, sum by (le) (rate(inference_extension_scheduler_e2e_duration_seconds_bucket[1m])))",
                "EPP scheduler",
            ),
        ],
    ),
    (
        "EPP time per phase p99",
        "s",
        &[
            (
                "histogram_quantile(0.99, sum by (le) (rate(kvgate_epp_request_body_seconds_bucket[1m])))",
                "request body",
            ),
            (
                "histogram_quantile(0.99, sum by (le) (rate(kvgate_epp_parse_seconds_bucket[1m])))",
                "parse",
            ),
            (
                "histogram_quantile(0.99, sum by (le) (rate(kvgate_epp_tokenize_seconds_bucket[1m])))",
                "tokenize",
            ),
            (
                "histogram_quantile(0.99, sum by (le) (rate(kvgate_epp_request_processing_seconds_bucket[1m])))",
                "request processing",
            ),
        ],
    ),
    (
        "Requests/s",
        "reqps",
        &[
            (
                "sum(rate(inference_objective_request_total[1m]))",
                "EPP routed",
            ),
            (
                "sum by (code) (rate(kvgate_frontend_requests_total[1m]))",
                "frontend {{code}}",
            ),
            (
                "sum by (error_code) (rate(inference_objective_request_error_total[1m]))",
                "EPP error {{error_code}}",
            ),
        ],
    ),
    (
        "Booked load per worker (KV blocks)",
        "short",
        &[("sum by (name) (kvgate_router_active_blocks)", "{{name}}")],
    ),
    (
        "Booked prefill tokens per worker",
        "short",
        &[(
            "sum by (name) (kvgate_router_active_prefill_tokens)",
            "{{name}}",
        )],
    ),
    (
        "Engine running requests",
        "short",
        &[(
            "sum by (instance) (vllm:num_requests_running)",
            "{{instance}}",
        )],
    ),
    (
        "KV event apply lag p99",
        "s",
        &[(
            "histogram_quantile(0.99, sum by (le) (rate(kvgate_kv_event_apply_lag_seconds_bucket[1m])))",
            "apply lag",
        )],
    ),
    (
        "KV events applied/s",
        "short",
        &[("sum(rate(kvgate_kv_events_applied_total[1m]))", "applied")],
    ),
];

fn dashboard_configmaps(objs: &[Value]) -> Vec<&Value> {
    objs.iter()
        .filter(|o| {
            o["kind"] == "ConfigMap" && o["metadata"]["name"] == "t-kvgate-grafana-dashboard"
        })
        .collect()
}

#[test]
fn the_grafana_dashboard_configmap_is_off_by_default() {
    let objs = render(&[]);
    assert!(
        !objs.iter().any(|o| o["kind"] == "ConfigMap"),
        "{:?}",
        kinds(&objs)
    );
    // Nor with the operator on.
    let objs = render(&["--set", "operator.enabled=true"]);
    assert!(dashboard_configmaps(&objs).is_empty(), "{:?}", kinds(&objs));
}

#[test]
fn the_grafana_dashboard_configmap_holds_the_dashboard_for_the_sidecar() {
    let objs = render(&["--set", "grafana.dashboard.enabled=true"]);
    let cms = dashboard_configmaps(&objs);
    assert_eq!(cms.len(), 1, "{:?}", kinds(&objs));
    assert_eq!(objs.iter().filter(|o| o["kind"] == "ConfigMap").count(), 1);
    let cm = cms[0];
    assert_eq!(cm["metadata"]["namespace"], "llm");
    assert_eq!(cm["metadata"]["labels"]["grafana_dashboard"], "1");
    assert_eq!(cm["metadata"]["labels"]["app.kubernetes.io/name"], "kvgate");
    let data = cm["data"].as_object().unwrap();
    assert_eq!(data.len(), 1, "{:?}", data.keys());
    let (key, text) = data.iter().next().unwrap();
    assert!(key.ends_with(".json"), "{key}");
    let text = text.as_str().unwrap();
    // Exactly the chart's file: nothing lost or re-indented on the way through the template.
    let file = std::fs::read_to_string(chart().join("dashboards/kvgate.json")).unwrap();
    assert_eq!(text, file);

    let dash: Value = serde_json::from_str(text).unwrap();
    assert_eq!(dash["uid"], "kvgate");
    let schema = dash["schemaVersion"].as_u64().unwrap();
    assert!((36..=41).contains(&schema), "schemaVersion {schema}");
    let vars = dash["templating"]["list"].as_array().unwrap();
    let ds = vars
        .iter()
        .find(|v| v["name"] == "DS")
        .expect("a DS variable");
    assert_eq!(ds["type"], "datasource");
    assert_eq!(ds["query"], "prometheus");

    let panels = dash["panels"].as_array().unwrap();
    let titles: Vec<&str> = panels
        .iter()
        .map(|p| p["title"].as_str().unwrap())
        .collect();
    assert_eq!(
        titles,
        DASHBOARD.iter().map(|(t, _, _)| *t).collect::<Vec<_>>()
    );
    let mut ids: Vec<u64> = panels.iter().map(|p| p["id"].as_u64().unwrap()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), panels.len(), "panel ids must be unique");
    let mut all_exprs = Vec::new();
    for (panel, (title, unit, queries)) in panels.iter().zip(DASHBOARD) {
        assert_eq!(panel["type"], "timeseries", "{title}");
        assert_eq!(panel["datasource"]["uid"], "${DS}", "{title}");
        assert_eq!(panel["fieldConfig"]["defaults"]["unit"], unit, "{title}");
        let got: Vec<(&str, &str)> = panel["targets"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| {
                assert_eq!(t["datasource"]["uid"], "${DS}", "{title}");
                (
                    t["expr"].as_str().unwrap(),
                    t["legendFormat"].as_str().unwrap(),
                )
            })
            .collect();
        assert_eq!(got, queries, "{title}");
        let mut refs: Vec<&str> = panel["targets"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["refId"].as_str().unwrap())
            .collect();
        refs.sort_unstable();
        refs.dedup();
        assert_eq!(refs.len(), queries.len(), "{title}: refIds must differ");
        all_exprs.extend(got.into_iter().map(|(e, _)| e));
    }
    // Every query, wherever it is.
    for (_, _, queries) in DASHBOARD {
        for (expr, _) in queries {
            assert!(all_exprs.contains(expr), "{expr}");
        }
    }

    // Another namespace, the sidecar's own label, a folder annotation.
    let objs = render(&[
        "--set",
        "grafana.dashboard.enabled=true",
        "--set",
        "grafana.dashboard.namespace=monitoring",
        "--set-string",
        "grafana.dashboard.labels.grafana_dashboard=yes",
        "--set",
        "grafana.dashboard.annotations.grafana_folder=kvgate",
    ]);
    let cm = dashboard_configmaps(&objs)[0];
    assert_eq!(cm["metadata"]["namespace"], "monitoring");
    assert_eq!(cm["metadata"]["labels"]["grafana_dashboard"], "yes");
    assert_eq!(cm["metadata"]["annotations"]["grafana_folder"], "kvgate");
    // The rest of the release stays in its namespace.
    assert!(
        objs.iter()
            .filter(|o| o["kind"] != "ConfigMap")
            .all(|o| o["metadata"]["namespace"] == "llm")
    );
    let err = render_err(&["--set", "grafana.dashboard.enable=true"]);
    assert!(err.contains("'enable' not allowed"), "{err}");
}

#[test]
fn the_charts_dashboard_is_the_one_in_deploy_grafana() {
    let ours = std::fs::read(root().join("deploy/grafana/kvgate.json")).unwrap();
    let chart_copy = std::fs::read(chart().join("dashboards/kvgate.json")).unwrap();
    assert!(
        ours == chart_copy,
        "deploy/grafana/kvgate.json and deploy/helm/kvgate/dashboards/kvgate.json differ: \
         copy one onto the other"
    );
}
