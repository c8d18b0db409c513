//! `ferrovol link certs`: makes the link's CA and the two certificates (the
//! relay's, one shared by every agent), as PEM files or as the two
//! Kubernetes Secrets the manifests mount.

use std::fmt::Write as _;
use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

use crate::tls::{CA_FILE, CERT_FILE, KEY_FILE, RELAY_NAME};

/// The Secrets the manifests mount (deploy/kubernetes/base).
pub const RELAY_SECRET: &str = "ferrovol-link-relay";
pub const AGENT_SECRET: &str = "ferrovol-link-agent";

/// A certificate and its key, PEM.
pub struct Pair {
    pub cert: String,
    pub key: String,
}

/// A fresh link CA and the certificates it signs.
pub struct LinkCerts {
    pub ca: String,
    pub relay: Pair,
    pub agent: Pair,
}

fn leaf(
    name: &str,
    usage: ExtendedKeyUsagePurpose,
    days: u32,
    issuer: &Issuer<'_, KeyPair>,
) -> Result<Pair, rcgen::Error> {
    let mut params = CertificateParams::new(vec![name.to_string()])?;
    params.distinguished_name.push(DnType::CommonName, name);
    params.extended_key_usages = vec![usage];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    validity(&mut params, days);
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, issuer)?;
    Ok(Pair { cert: cert.pem(), key: key.serialize_pem() })
}

fn validity(params: &mut CertificateParams, days: u32) {
    let now = std::time::SystemTime::now();
    // A day of slack for clocks that disagree.
    params.not_before = (now - std::time::Duration::from_secs(86_400)).into();
    params.not_after = (now + std::time::Duration::from_secs(86_400 * u64::from(days))).into();
}

impl LinkCerts {
    pub fn generate(days: u32) -> Result<LinkCerts, String> {
        let made = || -> Result<LinkCerts, rcgen::Error> {
            let mut params = CertificateParams::new(Vec::<String>::new())?;
            params.distinguished_name.push(DnType::CommonName, "ferrovol link CA");
            params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            validity(&mut params, days);
            let key = KeyPair::generate()?;
            let ca = params.self_signed(&key)?.pem();
            let issuer = Issuer::new(params, key);
            Ok(LinkCerts {
                ca,
                relay: leaf(RELAY_NAME, ExtendedKeyUsagePurpose::ServerAuth, days, &issuer)?,
                agent: leaf("ferrovol-agent", ExtendedKeyUsagePurpose::ClientAuth, days, &issuer)?,
            })
        };
        made().map_err(|e| format!("making the link certificates: {e}"))
    }

    /// Writes `dir/relay/` and `dir/agent/`, each with ca.crt, tls.crt and
    /// tls.key (keys readable by the owner only). Certificates already
    /// there are refused unless `force`: replacing a CA silently breaks
    /// every end that still holds the old one at its next restart.
    pub fn write(&self, dir: &Path, force: bool) -> Result<(), String> {
        use std::os::unix::fs::OpenOptionsExt;
        if !force {
            let there: Vec<String> = ["relay", "agent"]
                .iter()
                .flat_map(|end| [CA_FILE, CERT_FILE, KEY_FILE].map(|f| dir.join(end).join(f)))
                .filter(|p| p.exists())
                .map(|p| p.display().to_string())
                .collect();
            if !there.is_empty() {
                return Err(format!(
                    "{} already hold link certificates ({}); a new CA breaks every relay and \
                     agent that still trusts the old one at its next restart. Pass --force to \
                     replace them, or choose another --out",
                    dir.display(),
                    there.join(", ")
                ));
            }
        }
        for (end, pair) in [("relay", &self.relay), ("agent", &self.agent)] {
            let d = dir.join(end);
            std::fs::create_dir_all(&d).map_err(|e| format!("creating {}: {e}", d.display()))?;
            for (name, text, mode) in [
                (CA_FILE, &self.ca, 0o644),
                (CERT_FILE, &pair.cert, 0o644),
                (KEY_FILE, &pair.key, 0o600),
            ] {
                let path = d.join(name);
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(mode)
                    .open(&path)
                    .map_err(|e| format!("writing {}: {e}", path.display()))?;
                std::io::Write::write_all(&mut f, text.as_bytes())
                    .map_err(|e| format!("writing {}: {e}", path.display()))?;
            }
        }
        Ok(())
    }

    /// The two Secrets as one YAML stream, for `kubectl apply -f -`.
    pub fn secrets_manifest(&self, namespace: &str) -> String {
        let mut out = String::new();
        for (name, pair) in [(RELAY_SECRET, &self.relay), (AGENT_SECRET, &self.agent)] {
            let _ = write!(
                out,
                "---\napiVersion: v1\nkind: Secret\nmetadata:\n  name: {name}\n  namespace: {namespace}\n  \
                 labels:\n    app.kubernetes.io/name: ferrovol\ntype: kubernetes.io/tls\nstringData:\n"
            );
            for (key, text) in [(CA_FILE, &self.ca), (CERT_FILE, &pair.cert), (KEY_FILE, &pair.key)]
            {
                let _ = writeln!(out, "  {key}: |");
                for line in text.lines() {
                    let _ = writeln!(out, "    {line}");
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_certificates_load_as_both_ends() {
        let certs = LinkCerts::generate(30).unwrap();
        let dir = tempfile_dir();
        certs.write(&dir, false).unwrap();
        let again = LinkCerts::generate(30).unwrap();
        let refused = again.write(&dir, false).unwrap_err();
        assert!(refused.contains("--force") && refused.contains("ca.crt"), "{refused}");
        assert_eq!(std::fs::read_to_string(dir.join("relay").join(CA_FILE)).unwrap(), certs.ca);
        again.write(&dir, true).unwrap();
        assert_eq!(std::fs::read_to_string(dir.join("relay").join(CA_FILE)).unwrap(), again.ca);
        let relay = crate::tls::Credentials::load(&dir.join("relay")).unwrap();
        let agent = crate::tls::Credentials::load(&dir.join("agent")).unwrap();
        relay.server().unwrap();
        agent.client().unwrap();
        let yaml = certs.secrets_manifest("ferrovol");
        assert_eq!(yaml.matches("kind: Secret").count(), 2);
        assert!(yaml.contains("name: ferrovol-link-relay") && yaml.contains("    -----BEGIN"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn tempfile_dir() -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("ferrovol-certs-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
