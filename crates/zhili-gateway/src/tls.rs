//! TLS for the gateway listener: several certificates chosen by SNI, ALPN h2 + http/1.1, and
//! optional client certificates verified against a CA (mTLS; routes decide whether they need one).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use tokio_rustls::TlsAcceptor;

fn open(path: &Path) -> Result<std::io::BufReader<std::fs::File>, String> {
    std::fs::File::open(path).map(std::io::BufReader::new).map_err(|e| format!("opening {}: {e}", path.display()))
}

pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs =
        rustls_pemfile::certs(&mut open(path)?).collect::<Result<Vec<_>, _>>().map_err(|e| format!("reading certificates from {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("no certificate found in {}", path.display()));
    }
    Ok(certs)
}

pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    rustls_pemfile::private_key(&mut open(path)?)
        .map_err(|e| format!("reading the private key from {}: {e}", path.display()))?
        .ok_or_else(|| format!("no private key found in {}", path.display()))
}

/// Picks the first certificate valid for the SNI name; the first one when none is (or no SNI).
#[derive(Debug)]
struct BySni {
    keys: Vec<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for BySni {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let name = hello.server_name().and_then(|n| ServerName::try_from(n.to_string()).ok());
        if let Some(name) = name {
            for k in &self.keys {
                let Some(leaf) = k.cert.first() else { continue };
                if webpki::EndEntityCert::try_from(leaf).is_ok_and(|c| c.verify_is_valid_for_subject_name(&name).is_ok()) {
                    return Some(k.clone());
                }
            }
        }
        self.keys.first().cloned()
    }
}

/// An acceptor for `pairs` of (certificate chain, key) PEM files; with `client_ca`, client
/// certificates are asked for and verified (but not required: routes with `auth.mtls` require them).
pub fn acceptor(pairs: &[(PathBuf, PathBuf)], client_ca: Option<&Path>) -> Result<TlsAcceptor, String> {
    if pairs.is_empty() {
        return Err("no certificate given".into());
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut keys = vec![];
    for (cert, key) in pairs {
        let certs = load_certs(cert)?;
        let key = load_key(key)?;
        let signing = provider.key_provider.load_private_key(key).map_err(|e| format!("{}: {e}", cert.display()))?;
        let ck = CertifiedKey::new(certs, signing);
        ck.keys_match().map_err(|e| format!("{} and its key do not form a valid pair: {e}", cert.display()))?;
        keys.push(Arc::new(ck));
    }
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone()).with_safe_default_protocol_versions().map_err(|e| e.to_string())?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in load_certs(ca)? {
                roots.add(c).map_err(|e| format!("{}: {e}", ca.display()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .allow_unauthenticated()
                .build()
                .map_err(|e| format!("client CA {}: {e}", ca.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_cert_resolver(Arc::new(BySni { keys }));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}
