//! TLS for the ext_proc port: a self-signed certificate generated at start-up by default, or
//! `tls.crt`/`tls.key` from a directory, re-read when they change (cert-manager rotates them
//! in place); optional client-certificate verification for mutual TLS. ALPN h2 (gRPC).

use rustls_pemfile::Item;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use tokio_rustls::rustls::sign::CertifiedKey;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A certificate and key generated for this process (names: localhost, kvgate-epp, 127.0.0.1).
pub fn self_signed() -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), String> {
    let names = vec![
        "kvgate-epp".to_string(),
        "localhost".to_string(),
        "127.0.0.1".to_string(),
    ];
    let ck = rcgen::generate_simple_self_signed(names)
        .map_err(|e| format!("cannot generate a self-signed certificate: {e}"))?;
    let cert = ck.cert.der().clone();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(ck.signing_key.serialize_der()));
    Ok((vec![cert], key))
}

fn read_pem(path: &Path) -> Result<Vec<Item>, String> {
    let data = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    rustls_pemfile::read_all(&mut data.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{} is not valid PEM: {e}", path.display()))
}

/// Reads `dir/tls.crt` (chain) and `dir/tls.key`.
pub fn load_dir(
    dir: &Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), String> {
    let crt = dir.join("tls.crt");
    let key = dir.join("tls.key");
    let certs: Vec<CertificateDer<'static>> = read_pem(&crt)?
        .into_iter()
        .filter_map(|i| match i {
            Item::X509Certificate(c) => Some(c),
            _ => None,
        })
        .collect();
    if certs.is_empty() {
        return Err(format!("{} holds no certificate", crt.display()));
    }
    let key = read_pem(&key)?
        .into_iter()
        .find_map(|i| match i {
            Item::Pkcs1Key(k) => Some(PrivateKeyDer::Pkcs1(k)),
            Item::Pkcs8Key(k) => Some(PrivateKeyDer::Pkcs8(k)),
            Item::Sec1Key(k) => Some(PrivateKeyDer::Sec1(k)),
            _ => None,
        })
        .ok_or_else(|| format!("{} holds no private key", key.display()))?;
    Ok((certs, key))
}

fn certified(
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<CertifiedKey>, String> {
    let signer = provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| format!("unusable private key: {e}"))?;
    let ck = CertifiedKey::new(certs, signer);
    ck.keys_match()
        .map_err(|e| format!("the certificate does not match the key: {e}"))?;
    Ok(Arc::new(ck))
}

/// The server TLS configuration, rebuilt when its files change: the serving pair in
/// `cert_dir` (cert-manager rotates it in place) and the client CA bundle (a CA rotation must
/// not need a restart either). New connections get the current configuration; a bad file is
/// reported and the previous configuration kept.
pub struct ReloadingTls {
    cert_dir: Option<PathBuf>,
    client_ca: Option<PathBuf>,
    current: RwLock<Arc<rustls::ServerConfig>>,
}

type Stamp = Vec<Option<SystemTime>>;

impl ReloadingTls {
    /// `cert_dir`: `tls.crt`/`tls.key`, else a self-signed certificate (generated once).
    /// `client_ca`: PEM bundle; when given, clients must present a certificate it signed.
    pub fn new(cert_dir: Option<&Path>, client_ca: Option<&Path>) -> Result<Arc<Self>, String> {
        Ok(Arc::new(Self {
            cert_dir: cert_dir.map(Path::to_path_buf),
            client_ca: client_ca.map(Path::to_path_buf),
            current: RwLock::new(server_config(cert_dir, client_ca)?),
        }))
    }

    /// The configuration for a new connection.
    pub fn config(&self) -> Arc<rustls::ServerConfig> {
        match self.current.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    fn stamp(&self) -> Stamp {
        let m = |p: PathBuf| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        let mut files = Vec::new();
        if let Some(d) = &self.cert_dir {
            files.push(m(d.join("tls.crt")));
            files.push(m(d.join("tls.key")));
        }
        if let Some(ca) = &self.client_ca {
            files.push(m(ca.clone()));
        }
        files
    }

    /// Polls the files every `every` and rebuilds after a change. Nothing to watch for a
    /// self-signed configuration without a client CA.
    pub fn watch(self: &Arc<Self>, every: Duration) {
        if self.cert_dir.is_none() && self.client_ca.is_none() {
            return;
        }
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut last = match me.upgrade() {
                Some(me) => me.stamp(),
                None => return,
            };
            loop {
                tokio::time::sleep(every).await;
                let Some(me) = me.upgrade() else { return };
                let now = me.stamp();
                if now == last {
                    continue;
                }
                // (With no cert_dir, the rebuild also generates a new self-signed certificate;
                // gateways do not pin it.)
                match server_config(me.cert_dir.as_deref(), me.client_ca.as_deref()) {
                    Ok(cfg) => {
                        last = now;
                        match me.current.write() {
                            Ok(mut g) => *g = cfg,
                            Err(p) => *p.into_inner() = cfg,
                        }
                        tracing::info!("TLS configuration reloaded");
                    }
                    // Not marked as seen: a half-written file is retried.
                    Err(e) => {
                        tracing::warn!(error = %e, "TLS reload failed; keeping the previous configuration")
                    }
                }
            }
        });
    }
}

/// Builds the server TLS configuration (ALPN h2). `cert_dir`: `tls.crt`/`tls.key`, else a
/// self-signed certificate. `client_ca`: PEM bundle for mutual TLS.
pub fn server_config(
    cert_dir: Option<&Path>,
    client_ca: Option<&Path>,
) -> Result<Arc<rustls::ServerConfig>, String> {
    let (certs, key) = match cert_dir {
        Some(d) => load_dir(d)?,
        None => self_signed()?,
    };
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let mut roots = rustls::RootCertStore::empty();
            for item in read_pem(path)? {
                if let Item::X509Certificate(c) = item {
                    roots
                        .add(c)
                        .map_err(|e| format!("{}: bad CA certificate: {e}", path.display()))?;
                }
            }
            if roots.is_empty() {
                return Err(format!("{} holds no CA certificate", path.display()));
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .map_err(|e| format!("client CA {}: {e}", path.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let key = certified(certs, key)?;
    let mut config = builder.with_cert_resolver(Arc::new(FixedCert(key)));
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

#[derive(Debug)]
struct FixedCert(Arc<CertifiedKey>);

impl ResolvesServerCert for FixedCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn self_signed_config_builds_and_loads_from_files() {
        let c = server_config(None, None).unwrap();
        assert_eq!(c.alpn_protocols, vec![b"h2".to_vec()]);
        let dir = std::env::temp_dir().join(format!("kvgate-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ck = rcgen::generate_simple_self_signed(vec!["x".to_string()]).unwrap();
        std::fs::write(dir.join("tls.crt"), ck.cert.pem()).unwrap();
        std::fs::write(dir.join("tls.key"), ck.signing_key.serialize_pem()).unwrap();
        assert!(server_config(Some(&dir), None).is_ok());
        // The CA option takes a PEM bundle; a key file is not one.
        let err = server_config(Some(&dir), Some(&dir.join("tls.key"))).unwrap_err();
        assert!(err.contains("no CA certificate"), "{err}");
        std::fs::write(dir.join("tls.key"), "garbage").unwrap();
        let err = server_config(Some(&dir), None).unwrap_err();
        assert!(err.contains("no private key"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
