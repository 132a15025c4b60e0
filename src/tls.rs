//! Certificates: the cluster CA, the identities it issues, and the rustls
//! configurations built from them.
//!
//! Every internal connection is mutual TLS with the cluster CA. A certificate
//! carries its role as a SAN URI (`urn:lumbung:role:node`, `...:gateway`,
//! `...:admin`) so the receiving side can tell what the peer may do.

use anyhow::Context;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose, SanType};
use rustls::sign::CertifiedKey;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

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

/// A fresh CA and a gateway identity it issued for 127.0.0.1, written
/// into `dir`: what unit tests of internal clients connect with.
#[cfg(test)]
pub fn gateway_files_for_tests(dir: &Path) -> crate::config::TlsFiles {
    let ca = Authority::generate("test").unwrap();
    let issued = ca
        .issue("gateway", &["127.0.0.1".into()], Role::Gateway)
        .unwrap();
    let files = crate::config::TlsFiles {
        ca: dir.join("ca.pem"),
        cert: dir.join("gw.pem"),
        key: dir.join("gw.key"),
    };
    write_pem(&files.ca, &ca.cert_pem(), false).unwrap();
    write_pem(&files.cert, &issued.cert_pem, false).unwrap();
    write_pem(&files.key, &issued.key_pem, true).unwrap();
    files
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

/// A certificate chain and key read from files, which `reload` reads again
/// (on SIGHUP) so a renewed certificate is served to every new connection
/// without a restart; open connections keep the one they began with.
#[derive(Debug)]
pub struct ReloadableIdentity {
    cert: PathBuf,
    key: PathBuf,
    current: RwLock<Arc<CertifiedKey>>,
}

impl ReloadableIdentity {
    pub fn load(cert: &Path, key: &Path) -> anyhow::Result<Arc<ReloadableIdentity>> {
        Ok(Arc::new(ReloadableIdentity {
            current: RwLock::new(read_identity(cert, key)?),
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
        }))
    }

    /// Reads the files again; on any error the current identity stays.
    pub fn reload(&self) -> anyhow::Result<()> {
        let fresh = read_identity(&self.cert, &self.key)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = fresh;
        Ok(())
    }

    /// The certificate served now (DER), to tell identities apart.
    pub fn certificate(&self) -> Vec<u8> {
        let current = self.current.read().unwrap_or_else(|e| e.into_inner());
        current.cert[0].to_vec()
    }
}

impl rustls::server::ResolvesServerCert for ReloadableIdentity {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        )
    }
}

pub(crate) fn read_identity(
    cert_path: &Path,
    key_path: &Path,
) -> anyhow::Result<Arc<CertifiedKey>> {
    let certs = rustls_pemfile::certs(&mut read(cert_path)?.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parsing {}", cert_path.display()))?;
    anyhow::ensure!(
        !certs.is_empty(),
        "no certificate in {}",
        cert_path.display()
    );
    let key = rustls_pemfile::private_key(&mut read(key_path)?.as_slice())?
        .with_context(|| format!("no private key in {}", key_path.display()))?;
    let signing = rustls::crypto::ring::sign::any_supported_type(&key)
        .with_context(|| format!("unusable private key in {}", key_path.display()))?;
    let identity = CertifiedKey::new(certs, signing);
    identity.keys_match().with_context(|| {
        format!(
            "{} does not belong to {}",
            key_path.display(),
            cert_path.display()
        )
    })?;
    Ok(Arc::new(identity))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The rustls server configuration of the public S3 listener.
pub fn public_server_config(
    identity: Arc<ReloadableIdentity>,
) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(identity);
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// The cluster CA as the trust root of internal mutual TLS.
fn cluster_roots(ca: &Path) -> anyhow::Result<rustls::RootCertStore> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut read(ca)?.as_slice()) {
        roots.add(cert.with_context(|| format!("parsing {}", ca.display()))?)?;
    }
    Ok(roots)
}

fn read(path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading {}", path.display()))
}

/// The node's internal listener: our identity, and a certificate of the
/// cluster CA required from every peer (its role is checked per RPC).
pub fn rpc_server_config(
    ca: &Path,
    identity: Arc<ReloadableIdentity>,
) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let roots = cluster_roots(ca)?;
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(identity);
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}

/// Accepts a server certificate only when the cluster CA signed it for the
/// address dialled *and* it carries the node role: a stolen gateway or
/// admin certificate cannot pose as a node.
#[derive(Debug)]
struct NodesOnly(Arc<rustls::client::WebPkiServerVerifier>);

impl rustls::client::danger::ServerCertVerifier for NodesOnly {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        intermediates: &[rustls::pki_types::CertificateDer<'_>],
        server_name: &rustls::pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let verified = self.0.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        match Role::of_certificate(end_entity) {
            Some(Role::Node) => Ok(verified),
            other => Err(rustls::Error::General(format!(
                "the server's certificate is not a node's (its role: {})",
                other.map_or("none".to_string(), |r| r.to_string())
            ))),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// The client side of internal mutual TLS: our identity from `files`, and
/// only node certificates of the cluster CA accepted from servers.
pub fn rpc_client_config(
    files: &crate::config::TlsFiles,
) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let roots = cluster_roots(&files.ca)?;
    let webpki =
        rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()?;
    let identity = read_identity(&files.cert, &files.key)?;
    let key = rustls_pemfile::private_key(&mut read(&files.key)?.as_slice())?
        .with_context(|| format!("no private key in {}", files.key.display()))?;
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(NodesOnly(webpki)))
        .with_client_auth_cert(identity.cert.clone(), key)?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}
