//! Certificates: the cluster CA, the identities it issues, and the rustls
//! configurations built from them.
//!
//! Every internal connection is mutual TLS with the cluster CA. A certificate
//! carries its role as a SAN URI (`urn:lumbung:role:node`, `...:gateway`,
//! `...:admin`) so the receiving side can tell what the peer may do.

use anyhow::Context;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose, SanType};
use std::path::Path;
use std::sync::Arc;

/// What a certificate allows its holder to do inside the cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Node,
    Gateway,
    Admin,
}

impl Role {
    const ALL: [Role; 3] = [Role::Node, Role::Gateway, Role::Admin];

    fn uri(self) -> &'static str {
        match self {
            Role::Node => "urn:lumbung:role:node",
            Role::Gateway => "urn:lumbung:role:gateway",
            Role::Admin => "urn:lumbung:role:admin",
        }
    }

    /// The role a DER certificate carries; `None` when it carries none, or
    /// more than one (a certificate has exactly one job).
    pub fn of_certificate(der: &[u8]) -> Option<Role> {
        use x509_parser::extensions::GeneralName;
        let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
        let san = cert.subject_alternative_name().ok()??;
        let mut roles = san.value.general_names.iter().filter_map(|n| match n {
            GeneralName::URI(uri) => Role::ALL.into_iter().find(|r| r.uri() == *uri),
            _ => None,
        });
        match (roles.next(), roles.next()) {
            (Some(role), None) => Some(role),
            _ => None,
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Node => "node",
            Role::Gateway => "gateway",
            Role::Admin => "admin",
        })
    }
}

/// A PEM certificate and its PEM private key.
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

/// The cluster CA: generates itself once, then signs every identity.
pub struct Authority {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl Authority {
    pub fn generate(name: &str) -> anyhow::Result<Authority> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{name} cluster CA"));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        Ok(Authority { cert, key })
    }

    /// Loads a CA written by `save`; needed to issue certificates later.
    pub fn load(cert_path: &Path, key_path: &Path) -> anyhow::Result<Authority> {
        let cert_pem = std::fs::read_to_string(cert_path)?;
        let key = KeyPair::from_pem(&std::fs::read_to_string(key_path)?)?;
        let params = CertificateParams::from_ca_cert_pem(&cert_pem)?;
        let cert = params.self_signed(&key)?;
        Ok(Authority { cert, key })
    }

    pub fn cert_pem(&self) -> String {
        self.cert.pem()
    }

    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// Issues a certificate for `names` (DNS names or IP addresses).
    pub fn issue(&self, common_name: &str, names: &[String], role: Role) -> anyhow::Result<Issued> {
        let mut params = CertificateParams::new(names.to_vec())?;
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params
            .subject_alt_names
            .push(SanType::URI(role.uri().try_into()?));
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.cert, &self.key)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// Writes `contents` to `path`, readable by the owner only when `secret`.
pub fn write_pem(path: &Path, contents: &str, secret: bool) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    if secret {
        opts.mode(0o600);
    }
    let mut f = opts
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(contents.as_bytes())?;
    f.sync_all()?;
    Ok(())
}

/// The rustls server configuration of the public S3 listener.
pub fn public_server_config(
    cert_path: &Path,
    key_path: &Path,
) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let certs = rustls_pemfile::certs(&mut read(cert_path)?.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parsing {}", cert_path.display()))?;
    let key = rustls_pemfile::private_key(&mut read(key_path)?.as_slice())?
        .with_context(|| format!("no private key in {}", key_path.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

fn read(path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading {}", path.display()))
}

/// tonic's server-side TLS: our identity, and client certificates required.
pub fn rpc_server_tls(
    files: &crate::config::TlsFiles,
) -> anyhow::Result<tonic::transport::ServerTlsConfig> {
    use tonic::transport::{Certificate, Identity, ServerTlsConfig};
    Ok(ServerTlsConfig::new()
        .identity(Identity::from_pem(read(&files.cert)?, read(&files.key)?))
        .client_ca_root(Certificate::from_pem(read(&files.ca)?)))
}

/// tonic's client-side TLS towards the node at `host`.
pub fn rpc_client_tls(
    files: &crate::config::TlsFiles,
    host: &str,
) -> anyhow::Result<tonic::transport::ClientTlsConfig> {
    use tonic::transport::{Certificate, ClientTlsConfig, Identity};
    Ok(ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read(&files.ca)?))
        .identity(Identity::from_pem(read(&files.cert)?, read(&files.key)?))
        .domain_name(host))
}
