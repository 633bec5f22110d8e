//! `kvgate render -f dgd.yaml`: the Kubernetes objects an EPP needs for a DynamoGraphDeployment
//! (EPP Service, InferencePool, and with a service mesh an Istio DestinationRule), printed as
//! YAML without a cluster, for GitOps and review. The operator applies the same objects.

use kvgate_k8s::{RenderOptions, ServiceMesh, TlsMode};
use std::io::Read;
use std::path::PathBuf;

#[derive(clap::Args, Debug, Clone)]
pub struct RenderArgs {
    /// The DynamoGraphDeployment(s), YAML or JSON; several documents are allowed; `-` reads stdin.
    #[arg(short = 'f', long = "filename", value_name = "FILE")]
    pub file: PathBuf,
    /// Namespace for a graph whose metadata names none.
    #[arg(short = 'n', long, default_value = "default")]
    pub namespace: String,
    #[command(flatten)]
    pub objects: ObjectArgs,
}

/// How the objects are rendered; shared by `kvgate render` and `kvgate operator` (whose Helm
/// values `dynamo.serviceMesh.*` set the env vars).
#[derive(clap::Args, Debug, Clone)]
pub struct ObjectArgs {
    /// What the gateway does while the EPP is unreachable: FailOpen or FailClose (the CRD's
    /// default when not given).
    #[arg(long, env = "KVGATE_FAILURE_MODE", value_parser = ["FailOpen", "FailClose"])]
    pub failure_mode: Option<String>,
    /// Also render an Istio DestinationRule per EPP Service (Helm: dynamo.serviceMesh.enabled).
    #[arg(long, env = "DYNAMO_SERVICE_MESH_ENABLED")]
    pub service_mesh: bool,
    /// dynamo.serviceMesh.provider: istio is the only one.
    #[arg(long, env = "DYNAMO_SERVICE_MESH_PROVIDER", default_value = "istio")]
    pub service_mesh_provider: String,
    /// dynamo.serviceMesh.istio.tlsMode: SIMPLE, MUTUAL, ISTIO_MUTUAL or DISABLE.
    #[arg(
        long,
        env = "DYNAMO_SERVICE_MESH_ISTIO_TLS_MODE",
        default_value = "SIMPLE"
    )]
    pub istio_tls_mode: String,
    /// dynamo.serviceMesh.istio.insecureSkipVerify (the EPP's certificate is self-signed by default).
    #[arg(long, env = "DYNAMO_SERVICE_MESH_ISTIO_INSECURE_SKIP_VERIFY", default_value_t = true, action = clap::ArgAction::Set)]
    pub istio_insecure_skip_verify: bool,
    /// dynamo.serviceMesh.istio.clientCertificate (MUTUAL).
    #[arg(
        long,
        env = "DYNAMO_SERVICE_MESH_ISTIO_CLIENT_CERTIFICATE",
        default_value = ""
    )]
    pub istio_client_certificate: String,
    /// dynamo.serviceMesh.istio.privateKey (MUTUAL).
    #[arg(
        long,
        env = "DYNAMO_SERVICE_MESH_ISTIO_PRIVATE_KEY",
        default_value = ""
    )]
    pub istio_private_key: String,
    /// dynamo.serviceMesh.istio.caCertificates (MUTUAL, optional).
    #[arg(
        long,
        env = "DYNAMO_SERVICE_MESH_ISTIO_CA_CERTIFICATES",
        default_value = ""
    )]
    pub istio_ca_certificates: String,
}

impl ObjectArgs {
    pub fn options(&self, default_namespace: Option<String>) -> Result<RenderOptions, String> {
        let service_mesh = if self.service_mesh {
            Some(ServiceMesh {
                provider: self.service_mesh_provider.clone(),
                tls_mode: TlsMode::parse(&self.istio_tls_mode).map_err(|e| e.to_string())?,
                insecure_skip_verify: self.istio_insecure_skip_verify,
                client_certificate: self.istio_client_certificate.clone(),
                private_key: self.istio_private_key.clone(),
                ca_certificates: self.istio_ca_certificates.clone(),
            })
        } else {
            None
        };
        if let Some(m) = &service_mesh
            && m.provider != "istio"
        {
            return Err(format!(
                "service mesh provider {:?}: only istio is supported",
                m.provider
            ));
        }
        if let Some(m) = &service_mesh
            && m.tls_mode == TlsMode::Mutual
            && (m.client_certificate.is_empty() || m.private_key.is_empty())
        {
            return Err(
                "istio TLS mode MUTUAL needs --istio-client-certificate and --istio-private-key (dynamo.serviceMesh.istio.clientCertificate, privateKey)"
                    .into(),
            );
        }
        Ok(RenderOptions {
            default_namespace,
            failure_mode: self.failure_mode.clone(),
            service_mesh,
        })
    }
}

/// Reads the input, renders every graph, prints one YAML stream.
pub fn run(a: &RenderArgs) -> Result<String, String> {
    let text = if a.file.as_os_str() == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .map_err(|e| format!("cannot read stdin: {e}"))?;
        s
    } else {
        std::fs::read_to_string(&a.file)
            .map_err(|e| format!("cannot read {}: {e}", a.file.display()))?
    };
    let opts = a.objects.options(Some(a.namespace.clone()))?;
    let mut out = String::new();
    for d in kvgate_k8s::parse_dgds(&text).map_err(|e| e.to_string())? {
        let r = kvgate_k8s::render(&d, &opts).map_err(|e| e.to_string())?;
        out.push_str(&r.to_yaml().map_err(|e| e.to_string())?);
    }
    Ok(out)
}
