//! TLS for inspected endpoints: each sandbox's certificate authority, the leaf certificates it
//! issues per server name (cached), the upstream rustls client configuration, and the trust
//! bundle that makes programs inside the sandbox accept the sandbox CA.
//!
//! The CA key stays in the gateway process: [`SandboxCa`] signs leaves in memory and only the CA
//! certificate (never the key) goes into the bundle file handed to the sandbox. Crypto is rustls
//! with the `ring` provider; certificates are made with rcgen (ECDSA P-256).

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::crypto::ring as provider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

/// ALPN protocols offered on both sides, most preferred first.
pub const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// Most leaves kept per sandbox; past this the cache is emptied and refilled on demand.
const LEAF_CACHE_CAPACITY: usize = 1024;

/// Distro paths where tools look for the system CA bundle when no variable names one.
const DISTRO_CA_PATHS: [&str; 3] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/cert.pem",
];

/// Environment variables that point common tools at a CA bundle.
pub const TRUST_ENV_VARS: [&str; 6] = [
    "SSL_CERT_FILE",
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
    "NODE_EXTRA_CA_CERTS",
    "GIT_SSL_CAINFO",
    "PIP_CERT",
];

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("generating the certificate authority of sandbox {sandbox}: {source}")]
    GenerateCa {
        sandbox: String,
        source: rcgen::Error,
    },
    #[error("loading the certificate authority of sandbox {sandbox}: {source}")]
    LoadCa {
        sandbox: String,
        source: rcgen::Error,
    },
    #[error("issuing a certificate for {name:?}: {source}")]
    IssueLeaf { name: String, source: rcgen::Error },
    #[error("the signing key for {name:?} is not usable by rustls: {source}")]
    LeafKey { name: String, source: rustls::Error },
    #[error("building a TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    #[error("extra upstream root {index} is not a usable certificate: {source}")]
    ExtraRoot { index: usize, source: rustls::Error },
    #[error(
        "writing the CA bundle {path}: {source}; check that the directory exists and is writable"
    )]
    WriteBundle {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// One sandbox's certificate authority and its cache of issued leaves.
pub struct SandboxCa {
    sandbox: String,
    cert_der: CertificateDer<'static>,
    cert_pem: String,
    key_pem: String,
    issuer: Issuer<'static, KeyPair>,
    leaves: Mutex<HashMap<String, Arc<CertifiedKey>>>,
}

impl fmt::Debug for SandboxCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SandboxCa")
            .field("sandbox", &self.sandbox)
            .finish_non_exhaustive()
    }
}

fn ca_params(sandbox: &str) -> Result<CertificateParams, rcgen::Error> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(
        DnType::CommonName,
        format!("openshell sandbox {sandbox} CA"),
    );
    params
        .distinguished_name
        .push(DnType::OrganizationName, "openshell");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(params)
}

impl SandboxCa {
    /// Makes a new CA for `sandbox`.
    pub fn generate(sandbox: &str) -> Result<Self, TlsError> {
        let err = |source| TlsError::GenerateCa {
            sandbox: sandbox.to_owned(),
            source,
        };
        let key = KeyPair::generate().map_err(err)?;
        let params = ca_params(sandbox).map_err(err)?;
        let cert = params.self_signed(&key).map_err(err)?;
        let key_pem = key.serialize_pem();
        Ok(Self::assemble(
            sandbox,
            cert.der().clone(),
            cert.pem(),
            key_pem,
            Issuer::new(params, key),
        ))
    }

    /// Reloads a CA saved with [`SandboxCa::cert_pem`] and [`SandboxCa::key_pem`] (the gateway
    /// keeps both in its own state, so a restart does not change what the sandbox trusts).
    pub fn from_pem(sandbox: &str, cert_pem: &str, key_pem: &str) -> Result<Self, TlsError> {
        let err = |source| TlsError::LoadCa {
            sandbox: sandbox.to_owned(),
            source,
        };
        let key = KeyPair::from_pem(key_pem).map_err(err)?;
        let key_pem = key.serialize_pem();
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key).map_err(err)?;
        let der = rustls::pki_types::pem::PemObject::from_pem_slice(cert_pem.as_bytes())
            .map_err(|_| err(rcgen::Error::CouldNotParseCertificate))?;
        Ok(Self::assemble(
            sandbox,
            der,
            cert_pem.to_owned(),
            key_pem,
            issuer,
        ))
    }

    fn assemble(
        sandbox: &str,
        cert_der: CertificateDer<'static>,
        cert_pem: String,
        key_pem: String,
        issuer: Issuer<'static, KeyPair>,
    ) -> Self {
        Self {
            sandbox: sandbox.to_owned(),
            cert_der,
            cert_pem,
            key_pem,
            issuer,
            leaves: Mutex::new(HashMap::new()),
        }
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate, DER.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// The CA private key, PEM, for the gateway's own state. Never give this to a sandbox.
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// The leaf for `name` (a DNS name or an IP literal), issued on first use and cached.
    pub fn leaf(&self, name: &str) -> Result<Arc<CertifiedKey>, TlsError> {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        if let Some(hit) = self.lock_leaves().get(&name) {
            return Ok(Arc::clone(hit));
        }
        let issued = Arc::new(self.issue(&name)?);
        let mut leaves = self.lock_leaves();
        if leaves.len() >= LEAF_CACHE_CAPACITY {
            leaves.clear();
        }
        Ok(Arc::clone(leaves.entry(name).or_insert(issued)))
    }

    /// Number of cached leaves.
    pub fn cached_leaves(&self) -> usize {
        self.lock_leaves().len()
    }

    fn lock_leaves(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<CertifiedKey>>> {
        // A panic while holding the lock cannot leave the map inconsistent (single inserts).
        self.leaves
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn issue(&self, name: &str) -> Result<CertifiedKey, TlsError> {
        let err = |source| TlsError::IssueLeaf {
            name: name.to_owned(),
            source,
        };
        let key = KeyPair::generate().map_err(err)?;
        let mut params = CertificateParams::new(vec![name.to_owned()]).map_err(err)?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer).map_err(err)?;
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let signing =
            provider::sign::any_supported_type(&key_der).map_err(|source| TlsError::LeafKey {
                name: name.to_owned(),
                source,
            })?;
        Ok(CertifiedKey::new(
            vec![cert.der().clone(), self.cert_der.clone()],
            signing,
        ))
    }

    /// Server configuration for a connection tied to `name`: the leaf presented is always the
    /// one for `name` (whatever SNI the client sent; a mismatch is answered with 421 after the
    /// handshake), and ALPN offers h2 and http/1.1.
    pub fn server_config(&self, name: &str) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let leaf = self.leaf(name)?;
        let mut config =
            rustls::ServerConfig::builder_with_provider(Arc::new(provider::default_provider()))
                .with_safe_default_protocol_versions()?
                .with_no_client_auth()
                .with_cert_resolver(Arc::new(FixedLeaf(leaf)));
        config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
        Ok(Arc::new(config))
    }
}

#[derive(Debug)]
struct FixedLeaf(Arc<CertifiedKey>);

impl ResolvesServerCert for FixedLeaf {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.0))
    }
}

/// The rustls client configuration for dialing upstream: Mozilla's roots (webpki-roots), the
/// system store, and `extra_roots` from the gateway configuration. ALPN offers h2 and
/// http/1.1. System certificates that fail to load are skipped (the store often holds a few
/// that rustls does not accept); an unusable extra root is an error.
pub fn upstream_client_config(
    extra_roots: &[CertificateDer<'static>],
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    let native = rustls_native_certs::load_native_certs();
    for cert in native.certs {
        // Skipped on purpose: see the function docs.
        let _ = roots.add(cert);
    }
    for (index, cert) in extra_roots.iter().enumerate() {
        roots
            .add(cert.clone())
            .map_err(|source| TlsError::ExtraRoot { index, source })?;
    }
    let mut config =
        rustls::ClientConfig::builder_with_provider(Arc::new(provider::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
    config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// What a sandbox needs to trust its CA: the bundle file, the environment, and a bind mount.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SandboxTrust {
    /// The bundle: the sandbox CA followed by the system roots.
    pub bundle: PathBuf,
    /// Variables to set in the sandbox's environment (each names `bundle`).
    pub env: Vec<(&'static str, PathBuf)>,
    /// Bind-mount `bundle` read-only over this path (the distro's default CA bundle) in the
    /// sandbox's mount namespace, so tools that ignore the variables trust it too. `None` when
    /// the host has no known default bundle path.
    pub mount_target: Option<PathBuf>,
}

/// The host's default CA bundle path, if it has one of the known ones.
pub fn distro_ca_path() -> Option<PathBuf> {
    DISTRO_CA_PATHS
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
}

/// Writes `dir/ca-bundle.pem` (the sandbox CA, then the host's default bundle when there is
/// one) and says how to hand it to the sandbox.
pub fn write_trust_bundle(ca: &SandboxCa, dir: &Path) -> Result<SandboxTrust, TlsError> {
    let bundle = dir.join("ca-bundle.pem");
    let system = distro_ca_path();
    let mut text = ca.cert_pem().to_owned();
    if let Some(path) = &system {
        let roots = std::fs::read_to_string(path).map_err(|source| TlsError::WriteBundle {
            path: path.clone(),
            source,
        })?;
        if !text.ends_with('\n') {
            text.push('\n');
        }
        text.push_str(&roots);
    }
    std::fs::write(&bundle, text).map_err(|source| TlsError::WriteBundle {
        path: bundle.clone(),
        source,
    })?;
    Ok(SandboxTrust {
        env: TRUST_ENV_VARS
            .iter()
            .map(|&var| (var, bundle.clone()))
            .collect(),
        bundle,
        mount_target: system,
    })
}

#[cfg(test)]
mod tests;
