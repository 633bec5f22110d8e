//! The subset of Dynamo's `DynamoGraphDeployment` (`nvidia.com/v1alpha1`) that kvgate needs:
//! its name, namespace and uid, and per service (component) its type, sub-type, replicas,
//! environment and Dynamo-namespace settings. Everything else in the object is ignored.

use crate::meta::ObjectMeta;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub const GROUP: &str = "nvidia.com";
pub const VERSION: &str = "v1alpha1";
pub const API_VERSION: &str = "nvidia.com/v1alpha1";
pub const KIND: &str = "DynamoGraphDeployment";

/// Pod labels Dynamo's operator puts on a graph's pods (and that kvgate selects by).
pub mod labels {
    pub const GRAPH: &str = "nvidia.com/dynamo-graph-deployment-name";
    pub const COMPONENT: &str = "nvidia.com/dynamo-component";
    pub const COMPONENT_TYPE: &str = "nvidia.com/dynamo-component-type";
    pub const SUB_COMPONENT_TYPE: &str = "nvidia.com/dynamo-sub-component-type";
    pub const COMPONENT_CLASS: &str = "nvidia.com/dynamo-component-class";
    pub const NAMESPACE: &str = "nvidia.com/dynamo-namespace";
}

/// The Dynamo namespace of a service with `globalDynamoNamespace: true`.
pub const GLOBAL_DYNAMO_NAMESPACE: &str = "dynamo";

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DynamoGraphDeployment {
    pub api_version: String,
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: DgdSpec,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DgdSpec {
    /// Components by name.
    #[serde(default)]
    pub services: BTreeMap<String, DgdService>,
    /// Environment for every component.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub envs: Vec<EnvVar>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend_framework: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DgdService {
    /// `frontend`, `worker`, `prefill`, `decode`, `planner`, `epp`, ...
    #[serde(default)]
    pub component_type: String,
    /// For workers: `prefill` or `decode`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub_component_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<i32>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub envs: Vec<EnvVar>,
    #[serde(default)]
    pub global_dynamo_namespace: bool,
    /// Deprecated in Dynamo; the graph's operator ignores it for graph services.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dynamo_namespace: Option<String>,
    /// The GAIE picker configuration of an EPP component (`configMapRef` or `config`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epp_config: Option<serde_json::Value>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EnvVar {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
}

impl DgdService {
    pub fn is_epp(&self) -> bool {
        self.component_type == "epp"
    }

    /// Serves requests (legacy `worker` with a sub-type, or `prefill`/`decode` components).
    pub fn is_worker(&self) -> bool {
        matches!(
            self.component_type.as_str(),
            "worker" | "prefill" | "decode"
        )
    }

    /// `prefill`, `decode`, or `None` for an aggregated worker.
    pub fn worker_role(&self) -> Option<&str> {
        match self.component_type.as_str() {
            "prefill" | "decode" => Some(self.component_type.as_str()),
            _ => self.sub_component_type.as_deref(),
        }
    }
}

impl DynamoGraphDeployment {
    pub fn name(&self) -> &str {
        self.metadata.name.as_deref().unwrap_or_default()
    }

    /// The Dynamo namespace of one of the graph's services, computed as Dynamo's operator does:
    /// `dynamo` for a service with `globalDynamoNamespace`, else `<k8s namespace>-<graph name>`
    /// with dots in the graph name turned into dashes.
    pub fn dynamo_namespace(&self, k8s_namespace: &str, service: &DgdService) -> String {
        if service.global_dynamo_namespace {
            GLOBAL_DYNAMO_NAMESPACE.to_string()
        } else {
            format!("{k8s_namespace}-{}", self.name().replace('.', "-"))
        }
    }
}
