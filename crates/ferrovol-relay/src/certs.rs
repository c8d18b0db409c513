//! `ferrovol link certs`: the link's CA (kept, key and all, to issue more
//! later), the relay's certificate, and one certificate per node whose
//! identity is that node: the relay lets a node's link in only from that
//! node's own certificate, so no agent can speak for another. As PEM files,
//! or as the relay's Kubernetes Secret.

use std::fmt::Write as _;
use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

use crate::tls::{CA_FILE, CERT_FILE, KEY_FILE, RELAY_NAME};

/// The Secret the relay's manifests mount (deploy/kubernetes/base).
pub const RELAY_SECRET: &str = "ferrovol-link-relay";

/// The CA's key, beside its certificate in `<out>/ca/`.
pub const CA_KEY_FILE: &str = "ca.key";

const CA_NAME: &str = "ferrovol link CA";

/// A certificate and its key, PEM.
pub struct Pair {
    pub cert: String,
    pub key: String,
}

/// The link's CA: its certificate, and what signs with it.
pub struct LinkCa {
    pub cert: String,
    key: KeyPair,
    params: CertificateParams,
}

fn validity(params: &mut CertificateParams, days: u32) {
    let now = std::time::SystemTime::now();
    // A day of slack for clocks that disagree.
    params.not_before = (now - std::time::Duration::from_secs(86_400)).into();
    params.not_after = (now + std::time::Duration::from_secs(86_400 * u64::from(days))).into();
}

/// The CA's own parameters: what its certificate says and what signing
/// with it needs (its name, the key identifier method, its usages).
fn ca_params(days: u32) -> Result<CertificateParams, rcgen::Error> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(DnType::CommonName, CA_NAME);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    validity(&mut params, days);
    Ok(params)
}

fn write_file(path: &Path, text: &str, mode: u32) -> Result<(), String> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .map_err(|e| format!("writing {}: {e}", path.display()))?;
    std::io::Write::write_all(&mut f, text.as_bytes())
        .map_err(|e| format!("writing {}: {e}", path.display()))
}

/// Writes `ca.crt`, `tls.crt` and `tls.key` into `dir` (the key owner-only).
pub fn write_end(dir: &Path, ca: &str, pair: &Pair) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    write_file(&dir.join(CA_FILE), ca, 0o644)?;
    write_file(&dir.join(CERT_FILE), &pair.cert, 0o644)?;
    write_file(&dir.join(KEY_FILE), &pair.key, 0o600)
}

impl LinkCa {
    pub fn generate(days: u32) -> Result<LinkCa, String> {
        let made = || -> Result<LinkCa, rcgen::Error> {
            let params = ca_params(days)?;
            let key = KeyPair::generate()?;
            let cert = params.self_signed(&key)?.pem();
            Ok(LinkCa { cert, key, params })
        };
        made().map_err(|e| format!("making the link CA: {e}"))
    }

    /// The CA kept in `dir` (`ca.crt`, `ca.key`).
    pub fn load(dir: &Path) -> Result<LinkCa, String> {
        let read = |name: &str| {
            std::fs::read_to_string(dir.join(name))
                .map_err(|e| format!("reading {}: {e}", dir.join(name).display()))
        };
        let (cert, key) = (read(CA_FILE)?, read(CA_KEY_FILE)?);
        let key = KeyPair::from_pem(&key).map_err(|e| format!("the link CA's key: {e}"))?;
        // Signing needs the CA's name and key, which are as made.
        let params = ca_params(1).map_err(|e| e.to_string())?;
        Ok(LinkCa { cert, key, params })
    }

    /// Writes `dir/ca.crt` and `dir/ca.key` (owner-only).
    pub fn write(&self, dir: &Path) -> Result<(), String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        write_file(&dir.join(CA_FILE), &self.cert, 0o644)?;
        write_file(&dir.join(CA_KEY_FILE), &self.key.serialize_pem(), 0o600)
    }

    fn leaf(
        &self,
        dns_name: &str,
        common_name: &str,
        usage: ExtendedKeyUsagePurpose,
        days: u32,
    ) -> Result<Pair, String> {
        let made = || -> Result<Pair, rcgen::Error> {
            let mut params = CertificateParams::new(vec![dns_name.to_string()])?;
            params.distinguished_name.push(DnType::CommonName, common_name);
            params.extended_key_usages = vec![usage];
            params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            validity(&mut params, days);
            let key = KeyPair::generate()?;
            let cert = params.signed_by(&key, &Issuer::from_params(&self.params, &self.key))?;
            Ok(Pair { cert: cert.pem(), key: key.serialize_pem() })
        };
        made().map_err(|e| format!("making the certificate of {common_name}: {e}"))
    }

    /// The relay's server certificate, for [`RELAY_NAME`].
    pub fn relay(&self, days: u32) -> Result<Pair, String> {
        self.leaf(RELAY_NAME, RELAY_NAME, ExtendedKeyUsagePurpose::ServerAuth, days)
    }

    /// A node's client certificate: its identity on the link is `node`.
    pub fn node(&self, node: &str, days: u32) -> Result<Pair, String> {
        let identity = crate::tls::node_identity(node)?;
        self.leaf(&identity, node, ExtendedKeyUsagePurpose::ClientAuth, days)
    }
}

/// `ferrovol link certs --out DIR [--node NAME]…`: the CA and the relay's
/// certificate when DIR has no CA (or with `force`, anew), then each
/// node's certificate from the CA in DIR. A CA already there is never
/// replaced unasked: every end that trusts it would break at its next
/// restart.
pub fn make(out: &Path, nodes: &[String], days: u32, force: bool) -> Result<(), String> {
    let ca_dir = out.join("ca");
    let there = ca_dir.join(CA_FILE).exists() || out.join("relay").join(CA_FILE).exists();
    if there && nodes.is_empty() && !force {
        return Err(format!(
            "{} already holds link certificates (its ca/ca.crt); a new CA breaks every relay and \
             agent that still trusts the old one at its next restart. Pass --force to replace \
             them, --node NAME to issue a node's certificate from this CA, or choose another --out",
            out.display()
        ));
    }
    let ca = if there && !force {
        LinkCa::load(&ca_dir)?
    } else {
        let ca = LinkCa::generate(days)?;
        ca.write(&ca_dir)?;
        write_end(&out.join("relay"), &ca.cert, &ca.relay(days)?)?;
        eprintln!(
            "made the link CA ({0}/ca) and the relay's certificate ({0}/relay)",
            out.display()
        );
        ca
    };
    for node in nodes {
        let dir = out.join("nodes").join(node);
        write_end(&dir, &ca.cert, &ca.node(node, days)?)?;
        eprintln!("issued node {node}'s certificate ({})", dir.display());
    }
    Ok(())
}

/// `ferrovol link secret --dir DIR`: the relay's Secret from what
/// [`make`] wrote.
pub fn relay_secret_from(dir: &Path, namespace: &str) -> Result<String, String> {
    let read = |name: &str| {
        let path = dir.join("relay").join(name);
        std::fs::read_to_string(&path).map_err(|e| format!("reading {}: {e}", path.display()))
    };
    let pair = Pair { cert: read(CERT_FILE)?, key: read(KEY_FILE)? };
    Ok(relay_secret(namespace, &read(CA_FILE)?, &pair))
}

/// The relay's Secret, for `kubectl apply -f -`.
pub fn relay_secret(namespace: &str, ca: &str, relay: &Pair) -> String {
    let mut out = String::new();
    let _ = write!(
        out,
        "---\napiVersion: v1\nkind: Secret\nmetadata:\n  name: {RELAY_SECRET}\n  namespace: {namespace}\n  \
         labels:\n    app.kubernetes.io/name: ferrovol\ntype: kubernetes.io/tls\nstringData:\n"
    );
    for (key, text) in
        [(CA_FILE, ca), (CERT_FILE, relay.cert.as_str()), (KEY_FILE, relay.key.as_str())]
    {
        let _ = writeln!(out, "  {key}: |");
        for line in text.lines() {
            let _ = writeln!(out, "    {line}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kept_ca_issues_certificates_both_ends_load() {
        let dir = tempfile_dir();
        let ca = LinkCa::generate(30).unwrap();
        ca.write(&dir.join("ca")).unwrap();
        write_end(&dir.join("relay"), &ca.cert, &ca.relay(30).unwrap()).unwrap();
        // Issued later, from the CA as kept.
        let kept = LinkCa::load(&dir.join("ca")).unwrap();
        write_end(&dir.join("node-a"), &kept.cert, &kept.node("node-a", 30).unwrap()).unwrap();
        let relay = crate::tls::Credentials::load(&dir.join("relay")).unwrap();
        let agent = crate::tls::Credentials::load(&dir.join("node-a")).unwrap();
        relay.server().unwrap();
        agent.client().unwrap();
        assert!(kept.node("Not A Node!", 30).is_err(), "node IDs must be DNS names");
        let yaml = relay_secret("ferrovol", &ca.cert, &ca.relay(30).unwrap());
        assert_eq!(yaml.matches("kind: Secret").count(), 1);
        assert!(yaml.contains("name: ferrovol-link-relay") && yaml.contains("    -----BEGIN"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn tempfile_dir() -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("ferrovol-certs-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
