//! TLS on the ext_proc port with real certificates: server certificates from a directory,
//! rotated in place without a restart, and mutual TLS with `--client-ca`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use kvgate_core::config::RouterConfig;
use kvgate_epp::{Bound, EppConfig};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name
            .push(rcgen::DnType::CommonName, name.to_string());
        Ca {
            issuer: CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap(),
        }
    }

    fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A leaf certificate and key (PEM) for `name`.
    fn leaf(&self, name: &str) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let p = CertificateParams::new(vec![name.to_string()]).unwrap();
        let cert = p.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

fn temp_dir(tag: &str) -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let d = std::env::temp_dir().join(format!("kvgate-tls-{tag}-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn write_pair(dir: &Path, (crt, key): &(String, String)) {
    // Write then rename, as a secret volume update does.
    std::fs::write(dir.join("tls.crt.tmp"), crt).unwrap();
    std::fs::write(dir.join("tls.key.tmp"), key).unwrap();
    std::fs::rename(dir.join("tls.crt.tmp"), dir.join("tls.crt")).unwrap();
    std::fs::rename(dir.join("tls.key.tmp"), dir.join("tls.key")).unwrap();
}

async fn start(dir: &Path, client_ca: Option<PathBuf>) -> Bound {
    let workers = dir.join("workers.yaml");
    std::fs::write(
        &workers,
        "model: qwen3\nblock_size: 16\nworkers:\n  - {name: a, url: 'http://10.0.0.1:8000'}\n",
    )
    .unwrap();
    let certs = dir.join("certs");
    let c = EppConfig {
        host: "127.0.0.1".into(),
        grpc_port: 0,
        health_port: 0,
        metrics_port: 0,
        secure_serving: true,
        cert_path: Some(certs),
        client_ca,
        workers: kvgate_epp::WorkerSource::File(workers),
        router: RouterConfig::default(),
        tokenizer: None,
        max_request_body_bytes: 1 << 20,
        max_endpoints: 1,
        tokenize_timeout: Duration::from_secs(10),
        accept_token_data: true,
        decision_log: 8,
        pool_name: "t".into(),
        event_plane: kvgate_runtime::routing::EventPlane::Zmq,
        replica_sync: None,
    };
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        if let Err(e) = kvgate_epp::serve(c, move |b| {
            let _ = tx.send(b);
        })
        .await
        {
            panic!("epp: {e}");
        }
    });
    rx.await.unwrap()
}

/// A gRPC health check over TLS trusting `ca`, optionally with a client identity.
async fn check(b: &Bound, ca: &str, identity: Option<&(String, String)>) -> Result<i32, String> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name("localhost");
    if let Some((crt, key)) = identity {
        tls = tls.identity(Identity::from_pem(crt, key));
    }
    let ch = Endpoint::from_shared(format!("https://{}", b.grpc))
        .unwrap()
        .tls_config(tls)
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| format!("{e:?}"))?;
    let r = HealthClient::new(ch)
        .check(HealthCheckRequest {
            service: "envoy.service.ext_proc.v3.ExternalProcessor".into(),
        })
        .await
        .map_err(|e| format!("{e:?}"))?;
    Ok(r.into_inner().status)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_from_a_directory_are_rotated_in_place() {
    let dir = temp_dir("rotate");
    std::fs::create_dir_all(dir.join("certs")).unwrap();
    let (ca1, ca2) = (Ca::new("ca one"), Ca::new("ca two"));
    write_pair(&dir.join("certs"), &ca1.leaf("localhost"));
    let b = start(&dir, None).await;
    assert_eq!(check(&b, &ca1.pem(), None).await, Ok(1));
    // A client trusting another CA is refused: the certificate really is verified.
    assert!(check(&b, &ca2.pem(), None).await.is_err());
    // Rotate to a certificate from the second CA; the server picks it up without a restart.
    write_pair(&dir.join("certs"), &ca2.leaf("localhost"));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        if check(&b, &ca2.pem(), None).await == Ok(1) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "rotated certificate never served"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(check(&b, &ca1.pem(), None).await.is_err());
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_requires_a_client_certificate_from_the_ca() {
    let dir = temp_dir("mtls");
    std::fs::create_dir_all(dir.join("certs")).unwrap();
    let server_ca = Ca::new("server ca");
    let client_ca = Ca::new("client ca");
    let other_ca = Ca::new("someone else");
    write_pair(&dir.join("certs"), &server_ca.leaf("localhost"));
    std::fs::write(dir.join("client-ca.pem"), client_ca.pem()).unwrap();
    let b = start(&dir, Some(dir.join("client-ca.pem"))).await;
    let good = client_ca.leaf("gateway");
    assert_eq!(check(&b, &server_ca.pem(), Some(&good)).await, Ok(1));
    assert!(check(&b, &server_ca.pem(), None).await.is_err());
    let bad = other_ca.leaf("gateway");
    assert!(check(&b, &server_ca.pem(), Some(&bad)).await.is_err());
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_client_ca_applies_without_restart() {
    let dir = temp_dir("ca-rotate");
    std::fs::create_dir_all(dir.join("certs")).unwrap();
    let server_ca = Ca::new("server ca");
    let (old_ca, new_ca) = (Ca::new("old client ca"), Ca::new("new client ca"));
    write_pair(&dir.join("certs"), &server_ca.leaf("localhost"));
    std::fs::write(dir.join("client-ca.pem"), old_ca.pem()).unwrap();
    let b = start(&dir, Some(dir.join("client-ca.pem"))).await;
    let (old_client, new_client) = (old_ca.leaf("gw"), new_ca.leaf("gw"));
    assert_eq!(check(&b, &server_ca.pem(), Some(&old_client)).await, Ok(1));
    assert!(
        check(&b, &server_ca.pem(), Some(&new_client))
            .await
            .is_err()
    );
    let tmp = dir.join("client-ca.pem.tmp");
    std::fs::write(&tmp, new_ca.pem()).unwrap();
    std::fs::rename(&tmp, dir.join("client-ca.pem")).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while check(&b, &server_ca.pem(), Some(&new_client)).await != Ok(1) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "new client CA never applied"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        check(&b, &server_ca.pem(), Some(&old_client))
            .await
            .is_err()
    );
    let _ = std::fs::remove_dir_all(&dir);
}
