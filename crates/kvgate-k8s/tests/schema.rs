//! The schema checker against the upstream InferencePool CRD: it accepts valid pools and names
//! each kind of violation the API server would reject (or prune).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use proptest::prelude::*;
use serde_json::{Value, json};

fn valid_pool() -> Value {
    json!({
        "apiVersion": "inference.networking.k8s.io/v1",
        "kind": "InferencePool",
        "metadata": {"name": "p", "namespace": "ns", "labels": {"a": "b"}},
        "spec": {
            "selector": {"matchLabels": {"app": "vllm"}},
            "targetPorts": [{"number": 8000}],
            "endpointPickerRef": {"name": "p-epp", "port": {"number": 9002}},
        },
    })
}

fn violations(obj: &Value) -> Vec<String> {
    common::pool_schema()
        .validate(obj)
        .iter()
        .map(ToString::to_string)
        .collect()
}

/// `obj` with the field at `pointer` set (created in its parent object if absent).
fn with(mut obj: Value, pointer: &str, v: Value) -> Value {
    let (parent, key) = pointer.rsplit_once('/').expect(pointer);
    match obj.pointer_mut(parent).expect(parent) {
        Value::Object(m) => {
            m.insert(key.to_string(), v);
        }
        Value::Array(a) => a[key.parse::<usize>().expect(key)] = v,
        other => panic!("{parent} is {other}"),
    }
    obj
}

#[test]
fn a_valid_pool_passes() {
    assert_eq!(violations(&valid_pool()), Vec::<String>::new());
    // The minimum: no picker reference, no protocol.
    let mut min = valid_pool();
    min["spec"]
        .as_object_mut()
        .unwrap()
        .remove("endpointPickerRef");
    assert_eq!(violations(&min), Vec::<String>::new());
}

#[test]
fn each_violation_is_named_with_its_path() {
    let cases: Vec<(Value, &str)> = vec![
        (
            {
                let mut p = valid_pool();
                p["spec"].as_object_mut().unwrap().remove("targetPorts");
                p
            },
            ".spec: required field \"targetPorts\" is missing",
        ),
        (
            with(valid_pool(), "/spec/targetPorts", json!([])),
            ".spec.targetPorts: has 0 items, at least 1 required",
        ),
        (
            with(
                valid_pool(),
                "/spec/targetPorts",
                json!(
                    (1..=9)
                        .map(|n| json!({"number": 8000 + n}))
                        .collect::<Vec<_>>()
                ),
            ),
            ".spec.targetPorts: has 9 items, at most 8 allowed",
        ),
        (
            with(
                valid_pool(),
                "/spec/targetPorts",
                json!([{"number": 80}, {"number": 80}]),
            ),
            ".spec.targetPorts: port number must be unique",
        ),
        (
            with(valid_pool(), "/spec/targetPorts/0/number", json!(70000)),
            ".spec.targetPorts[0].number: 70000 is above the maximum 65535",
        ),
        (
            with(valid_pool(), "/spec/targetPorts/0/number", json!("8000")),
            ".spec.targetPorts[0].number: must be of type integer, found string",
        ),
        (
            with(valid_pool(), "/spec/selector/matchLabels", json!({})),
            ".spec.selector.matchLabels: has 0 entries, at least 1 required",
        ),
        (
            with(
                valid_pool(),
                "/spec/selector/matchLabels/app",
                json!("-bad"),
            ),
            ".spec.selector.matchLabels.app: \"-bad\" does not match",
        ),
        (
            with(valid_pool(), "/spec/appProtocol", json!("grpc")),
            ".spec.appProtocol: \"grpc\" is not one of",
        ),
        (
            with(
                valid_pool(),
                "/spec/endpointPickerRef",
                json!({"name": "x"}),
            ),
            ".spec.endpointPickerRef: port is required when kind is 'Service'",
        ),
        (
            with(
                valid_pool(),
                "/spec/endpointPickerRef/failureMode",
                json!("Retry"),
            ),
            ".spec.endpointPickerRef.failureMode: \"Retry\" is not one of",
        ),
        (
            with(valid_pool(), "/spec/replicas", json!(3)),
            ".spec.replicas: is not in the schema (the API server would prune it)",
        ),
        (
            with(
                valid_pool(),
                "/apiVersion",
                json!("inference.networking.x-k8s.io/v1alpha2"),
            ),
            ".apiVersion: is \"inference.networking.x-k8s.io/v1alpha2\"",
        ),
    ];
    for (obj, want) in cases {
        let got = violations(&obj);
        assert!(
            got.iter().any(|v| v.starts_with(want)),
            "expected a violation starting with {want:?}, got {got:?}"
        );
    }
}

#[test]
fn a_picker_reference_of_another_kind_needs_no_port() {
    let p = with(
        valid_pool(),
        "/spec/endpointPickerRef",
        json!({"group": "example.com", "kind": "Picker", "name": "x"}),
    );
    assert_eq!(violations(&p), Vec::<String>::new());
}

#[test]
fn an_unknown_cel_rule_is_reported_not_skipped() {
    let crd = r#"
spec:
  group: example.com
  names: {kind: Thing}
  versions:
  - name: v1
    served: true
    schema:
      openAPIV3Schema:
        type: object
        properties:
          apiVersion: {type: string}
          kind: {type: string}
          spec:
            type: object
            x-kubernetes-validations:
            - rule: self.size() > 2
"#;
    let s = kvgate_k8s::CrdSchema::from_crd(crd, "v1").unwrap();
    let v = s.validate(&json!({"apiVersion": "example.com/v1", "kind": "Thing", "spec": {}}));
    assert_eq!(v.len(), 1, "{v:?}");
    assert!(v[0].message.contains("not supported"), "{v:?}");
    assert!(kvgate_k8s::CrdSchema::from_crd(crd, "v2").is_err());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]
    /// Random target-port lists: the checker's verdict is exactly the CRD's rules (1-8 ports,
    /// each in 1..=65535, numbers unique).
    #[test]
    fn target_ports_follow_the_crd(ports in proptest::collection::vec(-2i64..70_000, 0..11), small in any::<bool>()) {
        let ports: Vec<i64> = if small { ports.iter().map(|p| p.rem_euclid(4)).collect() } else { ports };
        let p = with(valid_pool(), "/spec/targetPorts", json!(ports.iter().map(|n| json!({"number": n})).collect::<Vec<_>>()));
        let mut unique = ports.clone();
        unique.sort_unstable();
        unique.dedup();
        let valid = (1..=8).contains(&ports.len())
            && ports.iter().all(|n| (1..=65535).contains(n))
            && unique.len() == ports.len();
        let v = violations(&p);
        prop_assert_eq!(v.is_empty(), valid, "{:?} -> {:?}", ports, v);
    }
}
