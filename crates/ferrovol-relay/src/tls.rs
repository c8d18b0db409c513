//! The link's mutual TLS. Both ends hold a certificate signed by the link's
//! own CA (made by `ferrovol link certs`): the relay a server certificate
//! for [`RELAY_NAME`], the agents a client certificate. The relay accepts
//! no connection without a client certificate from that CA, and an agent
//! talks to no relay without a server certificate from it, so nothing else
//! can call through the link in either direction.

use std::path::Path;
use std::sync::Arc;

use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

/// The name in the relay's certificate, whatever address an agent dialled
/// (a headless Service resolves to each replica's pod IP).
pub const RELAY_NAME: &str = "ferrovol-relay";

/// File names in a link TLS directory: a Kubernetes TLS Secret's keys.
pub const CA_FILE: &str = "ca.crt";
pub const CERT_FILE: &str = "tls.crt";
pub const KEY_FILE: &str = "tls.key";

/// One end's credentials: the CA to trust, and its own chain and key.
pub struct Credentials {
    ca: Vec<CertificateDer<'static>>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl Credentials {
    /// Reads `ca.crt`, `tls.crt` and `tls.key` from `dir` (a mounted Secret).
    pub fn load(dir: &Path) -> Result<Credentials, String> {
        let certs = |name: &str| -> Result<Vec<CertificateDer<'static>>, String> {
            let path = dir.join(name);
            let certs = CertificateDer::pem_file_iter(&path)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| format!("reading {}: {e}", path.display()))?;
            if certs.is_empty() {
                return Err(format!("{} holds no certificate", path.display()));
            }
            Ok(certs)
        };
        let key_path = dir.join(KEY_FILE);
        let key = PrivateKeyDer::from_pem_file(&key_path)
            .map_err(|e| format!("reading {}: {e}", key_path.display()))?;
        Ok(Credentials { ca: certs(CA_FILE)?, chain: certs(CERT_FILE)?, key })
    }

    fn roots(&self) -> Result<Arc<rustls::RootCertStore>, String> {
        let mut roots = rustls::RootCertStore::empty();
        for c in &self.ca {
            roots.add(c.clone()).map_err(|e| format!("the link CA certificate: {e}"))?;
        }
        Ok(Arc::new(roots))
    }

    /// The relay's end: its certificate, and agents' certificates required.
    pub fn server(&self) -> Result<Arc<rustls::ServerConfig>, String> {
        let provider = provider();
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            self.roots()?,
            provider.clone(),
        )
        .build()
        .map_err(|e| format!("the link's client verifier: {e}"))?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| e.to_string())?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| format!("the relay's certificate: {e}"))?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }

    /// An agent's end: the relay must prove it is [`RELAY_NAME`].
    pub fn client(&self) -> Result<Arc<rustls::ClientConfig>, String> {
        let mut config = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| e.to_string())?
            .with_root_certificates(self.roots()?)
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| format!("the agent's certificate: {e}"))?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }
}

/// The name a node's certificate carries (a DNS subject alternative name):
/// the only identity under which the relay lets that node's link in.
/// Kubernetes node names are DNS subdomains, so this is a DNS name too.
pub fn node_identity(node_id: &str) -> Result<String, String> {
    let name = format!("{node_id}.node.ferrovol.link");
    let valid = !node_id.is_empty()
        && name.len() <= 253
        && node_id.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        });
    if !valid {
        return Err(format!(
            "node ID {:?} is not a DNS name (lowercase letters, digits, '-' and '.'), which a \
             node's link certificate must carry",
            ferrovol_error::bounded(node_id)
        ));
    }
    Ok(name)
}

/// Whether the certificate (DER) is one the link CA issued for `node_id`
/// (the chain itself was verified by the TLS handshake).
pub fn certifies_node(cert: &CertificateDer<'_>, node_id: &str) -> bool {
    let Ok(name) = node_identity(node_id) else { return false };
    let Ok(name) = ServerName::try_from(name) else { return false };
    webpki::EndEntityCert::try_from(cert)
        .is_ok_and(|c| c.verify_is_valid_for_subject_name(&name).is_ok())
}

pub fn relay_name() -> ServerName<'static> {
    ServerName::try_from(RELAY_NAME).expect("a valid DNS name")
}

/// ring, passed explicitly: no process-wide default to install or race.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}
