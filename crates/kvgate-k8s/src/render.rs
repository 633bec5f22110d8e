//! The objects an EPP needs for one `DynamoGraphDeployment`, computed without a cluster: the
//! EPP Service, the `InferencePool` that points the gateway at it, and, with a service mesh, the
//! Istio `DestinationRule` that lets the gateway reach the EPP's TLS port through the mesh.
//! `kvgate render` prints them; the operator applies the same objects.

use crate::dgd::{self, DgdService, DynamoGraphDeployment};
use crate::meta::{self, ObjectMeta, OwnerReference};
use crate::pool::{self, EndpointPickerRef, InferencePool, InferencePoolSpec, LabelSelector, Port};
use serde_json::{Value, json};
use std::collections::BTreeMap;

/// The EPP's ports (the defaults of `kvgate epp`).
pub const EPP_GRPC_PORT: i32 = 9002;
pub const EPP_HEALTH_PORT: i32 = 9003;
pub const EPP_METRICS_PORT: i32 = 9090;
/// The port of the worker pods' frontend sidecar, every pool's target port.
pub const WORKER_PORT: i32 = 8000;
/// Set on every object kvgate generates.
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "kvgate");

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TlsMode {
    Simple,
    Mutual,
    IstioMutual,
    Disable,
}

impl TlsMode {
    pub fn parse(s: &str) -> Result<Self, RenderError> {
        match s {
            "SIMPLE" => Ok(Self::Simple),
            "MUTUAL" => Ok(Self::Mutual),
            "ISTIO_MUTUAL" => Ok(Self::IstioMutual),
            "DISABLE" => Ok(Self::Disable),
            other => Err(RenderError::Invalid(format!(
                "istio TLS mode {other:?}: expected SIMPLE, MUTUAL, ISTIO_MUTUAL or DISABLE"
            ))),
        }
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Simple => "SIMPLE",
            Self::Mutual => "MUTUAL",
            Self::IstioMutual => "ISTIO_MUTUAL",
            Self::Disable => "DISABLE",
        }
    }
}

/// `dynamo.serviceMesh.*`: with it, a `DestinationRule` per EPP Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceMesh {
    /// `istio`, the only provider.
    pub provider: String,
    pub tls_mode: TlsMode,
    pub insecure_skip_verify: bool,
    /// MUTUAL only: paths inside the gateway's proxy.
    pub client_certificate: String,
    pub private_key: String,
    pub ca_certificates: String,
}

impl Default for ServiceMesh {
    fn default() -> Self {
        Self {
            provider: "istio".into(),
            tls_mode: TlsMode::Simple,
            insecure_skip_verify: true,
            client_certificate: String::new(),
            private_key: String::new(),
            ca_certificates: String::new(),
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RenderOptions {
    /// The namespace for a graph whose metadata has none.
    pub default_namespace: Option<String>,
    /// `FailOpen` or `FailClose` (the CRD's default when unset).
    pub failure_mode: Option<String>,
    pub service_mesh: Option<ServiceMesh>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RenderError {
    #[error("{0}")]
    Invalid(String),
    #[error(
        "DynamoGraphDeployment {0:?} has no component with componentType: epp, so it needs no InferencePool"
    )]
    NoEpp(String),
}

/// What was rendered for one graph, in apply order.
#[derive(Clone, Debug, PartialEq)]
pub struct Rendered {
    pub service: Value,
    pub pool: InferencePool,
    pub destination_rule: Option<Value>,
}

impl Rendered {
    /// Every object as JSON, in apply order (Service, InferencePool, DestinationRule).
    pub fn objects(&self) -> Vec<Value> {
        let mut v = vec![
            self.service.clone(),
            serde_json::to_value(&self.pool).unwrap_or(Value::Null),
        ];
        v.extend(self.destination_rule.clone());
        v
    }

    /// A multi-document YAML stream of [`objects`](Self::objects).
    pub fn to_yaml(&self) -> Result<String, RenderError> {
        let mut out = String::new();
        for o in self.objects() {
            out.push_str("---\n");
            out.push_str(
                &serde_yaml_ng::to_string(&o)
                    .map_err(|e| RenderError::Invalid(format!("cannot write YAML: {e}")))?,
            );
        }
        Ok(out)
    }
}

/// Parses a DynamoGraphDeployment from YAML or JSON, naming what is wrong.
pub fn parse_dgd(text: &str) -> Result<DynamoGraphDeployment, RenderError> {
    let d: DynamoGraphDeployment = serde_yaml_ng::from_str(text)
        .map_err(|e| RenderError::Invalid(format!("not a DynamoGraphDeployment: {e}")))?;
    if d.api_version != dgd::API_VERSION || d.kind != dgd::KIND {
        return Err(RenderError::Invalid(format!(
            "expected apiVersion {} kind {}, found {} {}",
            dgd::API_VERSION,
            dgd::KIND,
            d.api_version,
            d.kind
        )));
    }
    Ok(d)
}

/// Every DynamoGraphDeployment of a multi-document YAML stream (empty documents are skipped).
pub fn parse_dgds(text: &str) -> Result<Vec<DynamoGraphDeployment>, RenderError> {
    let mut out = Vec::new();
    for (i, doc) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let v: serde_json::Value = serde::Deserialize::deserialize(doc)
            .map_err(|e| RenderError::Invalid(format!("document {}: not YAML: {e}", i + 1)))?;
        if v.is_null() {
            continue;
        }
        let text = serde_json::to_string(&v)
            .map_err(|e| RenderError::Invalid(format!("document {}: {e}", i + 1)))?;
        out.push(
            parse_dgd(&text)
                .map_err(|e| RenderError::Invalid(format!("document {}: {e}", i + 1)))?,
        );
    }
    if out.is_empty() {
        return Err(RenderError::Invalid(
            "no DynamoGraphDeployment in the input".into(),
        ));
    }
    Ok(out)
}

/// The EPP component: `(name, spec)`.
fn epp_service(d: &DynamoGraphDeployment) -> Result<(&str, &DgdService), RenderError> {
    let epps: Vec<(&String, &DgdService)> =
        d.spec.services.iter().filter(|(_, s)| s.is_epp()).collect();
    match epps.as_slice() {
        [] => Err(RenderError::NoEpp(d.name().to_string())),
        [(name, s)] => Ok((name.as_str(), s)),
        many => Err(RenderError::Invalid(format!(
            "DynamoGraphDeployment {:?} has {} EPP components ({}); one pool has one picker",
            d.name(),
            many.len(),
            many.iter()
                .map(|(n, _)| n.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

/// The Dynamo namespace the graph's workers register in (they must agree).
fn workers_namespace(
    d: &DynamoGraphDeployment,
    ns: &str,
    epp: &DgdService,
) -> Result<String, RenderError> {
    let mut found: BTreeMap<String, Vec<&str>> = BTreeMap::new();
    for (name, s) in d.spec.services.iter().filter(|(_, s)| s.is_worker()) {
        found
            .entry(d.dynamo_namespace(ns, s))
            .or_default()
            .push(name);
    }
    match found.len() {
        0 => Ok(d.dynamo_namespace(ns, epp)),
        1 => Ok(found.into_keys().next().unwrap_or_default()),
        _ => Err(RenderError::Invalid(format!(
            "the workers of {:?} are in different Dynamo namespaces ({}); one pool selects one",
            d.name(),
            found
                .iter()
                .map(|(k, v)| format!("{k}: {}", v.join(", ")))
                .collect::<Vec<_>>()
                .join("; ")
        ))),
    }
}

fn owner(d: &DynamoGraphDeployment) -> Vec<OwnerReference> {
    match &d.metadata.uid {
        Some(uid) if !uid.is_empty() => vec![OwnerReference {
            api_version: dgd::API_VERSION.into(),
            kind: dgd::KIND.into(),
            name: d.name().to_string(),
            uid: uid.clone(),
            controller: Some(true),
            block_owner_deletion: Some(true),
        }],
        // Rendered without a cluster (GitOps): nothing to own it yet.
        _ => Vec::new(),
    }
}

/// The Service, InferencePool and (with a mesh) DestinationRule for `d`.
pub fn render(d: &DynamoGraphDeployment, opts: &RenderOptions) -> Result<Rendered, RenderError> {
    let name = d.name();
    if !meta::is_dns1123_label(name) || name.len() > 63 - "-pool".len() {
        return Err(RenderError::Invalid(format!(
            "DynamoGraphDeployment name {name:?} must be a DNS-1123 label of at most 58 characters (it names <name>-epp and <name>-pool)"
        )));
    }
    let ns = d
        .metadata
        .namespace
        .clone()
        .or_else(|| opts.default_namespace.clone())
        .unwrap_or_else(|| "default".to_string());
    if !meta::is_dns1123_label(&ns) {
        return Err(RenderError::Invalid(format!(
            "namespace {ns:?} is not a DNS-1123 label"
        )));
    }
    if let Some(m) = &opts.failure_mode
        && m != "FailOpen"
        && m != "FailClose"
    {
        return Err(RenderError::Invalid(format!(
            "failure mode {m:?}: expected FailOpen or FailClose"
        )));
    }
    let (epp_name, epp) = epp_service(d)?;
    let epp_ns = d.dynamo_namespace(&ns, epp);
    let workers_ns = workers_namespace(d, &ns, epp)?;
    for v in [&epp_ns, &workers_ns] {
        if !meta::is_label_value(v) {
            return Err(RenderError::Invalid(format!(
                "Dynamo namespace {v:?} is not a valid label value (at most 63 characters); shorten the namespace or the graph name"
            )));
        }
    }
    if !meta::is_label_value(epp_name) {
        return Err(RenderError::Invalid(format!(
            "component name {epp_name:?} is not a valid label value"
        )));
    }
    let svc_name = format!("{name}-epp");
    let owners = owner(d);
    let common_labels = |component: &str| {
        let mut l = BTreeMap::new();
        l.insert(dgd::labels::GRAPH.to_string(), name.to_string());
        l.insert(dgd::labels::COMPONENT.to_string(), component.to_string());
        l.insert(dgd::labels::COMPONENT_TYPE.to_string(), "epp".to_string());
        l.insert(MANAGED_BY.0.to_string(), MANAGED_BY.1.to_string());
        l
    };

    let service = json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": ObjectMeta {
            name: Some(svc_name.clone()),
            namespace: Some(ns.clone()),
            labels: common_labels(epp_name),
            owner_references: owners.clone(),
            ..ObjectMeta::default()
        },
        "spec": {
            "type": "ClusterIP",
            "selector": {
                (dgd::labels::COMPONENT_TYPE): "epp",
                (dgd::labels::NAMESPACE): epp_ns,
                (dgd::labels::COMPONENT): epp_name,
            },
            "ports": [
                {"name": "grpc", "port": EPP_GRPC_PORT, "targetPort": EPP_GRPC_PORT, "protocol": "TCP", "appProtocol": "http2"},
                {"name": "grpc-health", "port": EPP_HEALTH_PORT, "targetPort": EPP_HEALTH_PORT, "protocol": "TCP"},
                {"name": "metrics", "port": EPP_METRICS_PORT, "targetPort": EPP_METRICS_PORT, "protocol": "TCP"},
            ],
        },
    });

    let mut match_labels = BTreeMap::new();
    match_labels.insert(
        dgd::labels::COMPONENT_CLASS.to_string(),
        "worker".to_string(),
    );
    match_labels.insert(dgd::labels::NAMESPACE.to_string(), workers_ns);
    let pool = InferencePool {
        api_version: pool::API_VERSION.into(),
        kind: pool::KIND.into(),
        metadata: ObjectMeta {
            name: Some(format!("{name}-pool")),
            namespace: Some(ns.clone()),
            labels: common_labels(epp_name),
            owner_references: owners.clone(),
            ..ObjectMeta::default()
        },
        spec: InferencePoolSpec {
            selector: LabelSelector { match_labels },
            target_ports: vec![Port {
                number: WORKER_PORT,
            }],
            app_protocol: None,
            endpoint_picker_ref: Some(EndpointPickerRef {
                group: None,
                kind: Some("Service".into()),
                name: svc_name.clone(),
                port: Some(Port {
                    number: EPP_GRPC_PORT,
                }),
                failure_mode: opts.failure_mode.clone(),
            }),
        },
        status: None,
    };

    let destination_rule = match &opts.service_mesh {
        None => None,
        Some(mesh) => Some(destination_rule(
            &svc_name,
            &ns,
            mesh,
            common_labels(epp_name),
            owners,
        )?),
    };
    Ok(Rendered {
        service,
        pool,
        destination_rule,
    })
}

fn destination_rule(
    svc: &str,
    ns: &str,
    mesh: &ServiceMesh,
    labels: BTreeMap<String, String>,
    owners: Vec<OwnerReference>,
) -> Result<Value, RenderError> {
    if mesh.provider != "istio" {
        return Err(RenderError::Invalid(format!(
            "service mesh provider {:?}: only istio is supported",
            mesh.provider
        )));
    }
    let mut tls = serde_json::Map::new();
    tls.insert("mode".into(), mesh.tls_mode.as_str().into());
    tls.insert(
        "insecureSkipVerify".into(),
        mesh.insecure_skip_verify.into(),
    );
    if mesh.tls_mode == TlsMode::Mutual {
        for (k, v) in [
            ("clientCertificate", &mesh.client_certificate),
            ("privateKey", &mesh.private_key),
            ("caCertificates", &mesh.ca_certificates),
        ] {
            if v.is_empty() && k != "caCertificates" {
                return Err(RenderError::Invalid(format!(
                    "istio TLS mode MUTUAL needs {k} (dynamo.serviceMesh.istio.{k})"
                )));
            }
            if !v.is_empty() {
                tls.insert(k.into(), v.as_str().into());
            }
        }
    }
    Ok(json!({
        "apiVersion": "networking.istio.io/v1beta1",
        "kind": "DestinationRule",
        "metadata": ObjectMeta {
            name: Some(svc.to_string()),
            namespace: Some(ns.to_string()),
            labels,
            owner_references: owners,
            ..ObjectMeta::default()
        },
        "spec": {
            "host": format!("{svc}.{ns}.svc.cluster.local"),
            "trafficPolicy": {"tls": tls},
        },
    }))
}
