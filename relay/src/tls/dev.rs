//! `--dev-tls`: a local certificate authority and a certificate it signed for
//! DOMAIN and *.DOMAIN, kept in the data directory, for trying HTTPS without
//! a public certificate.
//!
//! The CA is made once and kept, so that trusting it survives restarts and
//! a changed `--domain`; the certificate is made again when it is within
//! [`RENEW_BEFORE`] of expiry, no longer covers the domain, or was not
//! signed by the CA.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::client::danger::ServerCertVerifier;
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::sign::CertifiedKey;

use super::{certified_key, private_dir, write_synced, TlsFiles};

/// The folder inside the data directory.
pub const DIR: &str = "dev-tls";
/// The CA certificate, for clients to trust.
pub const CA_CERT: &str = "ca.pem";
/// The CA's private key.
pub const CA_KEY: &str = "ca-key.pem";
/// The certificate the relay serves.
pub const CERT: &str = "cert.pem";
/// Its private key.
pub const KEY: &str = "key.pem";

/// How long a new CA is valid: long, as trusting it again is a chore.
const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 86_400);
/// How long a new certificate is valid.
const CERT_VALIDITY: Duration = Duration::from_secs(365 * 86_400);
/// A certificate expiring sooner than this is made again at start.
pub const RENEW_BEFORE: Duration = Duration::from_secs(30 * 86_400);
/// How far back a new certificate's validity starts, for clocks behind ours.
const BACKDATE: Duration = Duration::from_secs(3600);
/// Certificates made on demand for names the wildcard cannot cover that are
/// kept; beyond it the cache starts over.
const ON_DEMAND_CACHE: usize = 1024;

/// What [`ensure`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Made {
    /// The CA and the certificate were made now.
    NewCa,
    /// The CA was kept and the certificate made again.
    NewCert,
    /// Both were kept.
    Reused,
}

/// The development CA and certificate, as files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevTls {
    /// The CA certificate (PEM), for clients to trust.
    pub ca_path: PathBuf,
    /// The served certificate (PEM).
    pub cert_path: PathBuf,
    /// Its private key (PEM).
    pub key_path: PathBuf,
    /// What was made at this call.
    pub made: Made,
}

impl DevTls {
    /// The served certificate's files, for [`super::CertResolver::load`].
    pub fn files(&self) -> TlsFiles {
        TlsFiles {
            cert: self.cert_path.clone(),
            key: self.key_path.clone(),
        }
    }
}

/// Why the development certificates cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DevTlsError {
    /// The folder or a file could not be written.
    #[error("cannot write the development certificates in {path}: {source}")]
    Write {
        /// The file or folder.
        path: PathBuf,
        /// What the system said.
        source: std::io::Error,
    },
    /// A file exists but cannot be read or used.
    #[error("the development TLS file {path} cannot be used ({cause}): delete the folder {dir} to start over with a new CA")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// The folder to delete.
        dir: PathBuf,
        /// Why.
        cause: String,
    },
    /// rcgen could not make a key or certificate.
    #[error("cannot make a development certificate: {0}")]
    Generate(#[from] rcgen::Error),
}

/// Makes or reuses the development CA and certificate for `domain` in
/// `data_dir`/[`DIR`].
pub fn ensure(data_dir: &Path, domain: &str) -> Result<DevTls, DevTlsError> {
    let dir = data_dir.join(DIR);
    private_dir(&dir).map_err(|source| DevTlsError::Write {
        path: dir.clone(),
        source,
    })?;
    let tls = DevTls {
        ca_path: dir.join(CA_CERT),
        cert_path: dir.join(CERT),
        key_path: dir.join(KEY),
        made: Made::Reused,
    };
    let ca_key_path = dir.join(CA_KEY);
    let corrupt = |path: &Path, cause: String| DevTlsError::Corrupt {
        path: path.to_owned(),
        dir: dir.clone(),
        cause,
    };

    let (ca_pem, made) = match (tls.ca_path.exists(), ca_key_path.exists()) {
        (false, false) => {
            let key = KeyPair::generate()?;
            let cert = ca_params(domain).self_signed(&key)?;
            write(&ca_key_path, key.serialize_pem().as_bytes(), true)?;
            write(&tls.ca_path, cert.pem().as_bytes(), false)?;
            (cert.pem(), Made::NewCa)
        }
        (true, false) => return Err(corrupt(&ca_key_path, "it is missing".into())),
        (false, true) => return Err(corrupt(&tls.ca_path, "it is missing".into())),
        (true, true) => (read_text(&tls.ca_path, &dir)?, Made::Reused),
    };
    let issuer = load_issuer(&tls.ca_path, &ca_key_path, &ca_pem, &dir)?;
    let ca_der = CertificateDer::from_pem_slice(ca_pem.as_bytes())
        .map_err(|err| corrupt(&tls.ca_path, err.to_string()))?;

    let made = match (tls.cert_path.exists(), tls.key_path.exists(), made) {
        (true, true, Made::Reused) => {
            let contents = (
                read_bytes(&tls.cert_path, &dir)?,
                read_bytes(&tls.key_path, &dir)?,
            );
            let certified = certified_key(&tls.files(), &contents).map_err(|err| {
                let path = match &err {
                    super::TlsError::Read { path, .. } => path.clone(),
                    _ => tls.key_path.clone(),
                };
                corrupt(&path, err.to_string())
            })?;
            if covers(
                &certified,
                &ca_der,
                domain,
                SystemTime::now() + RENEW_BEFORE,
            ) {
                Made::Reused
            } else {
                Made::NewCert
            }
        }
        (_, _, Made::NewCa) => Made::NewCa,
        _ => Made::NewCert,
    };
    if made != Made::Reused {
        let key = KeyPair::generate()?;
        let cert = leaf_params(&[domain.to_owned()], domain)?.signed_by(&key, &issuer)?;
        let contents = (cert.pem().into_bytes(), key.serialize_pem().into_bytes());
        let certified = certified_key(&tls.files(), &contents)
            .map_err(|err| corrupt(&ca_key_path, err.to_string()))?;
        if !covers(&certified, &ca_der, domain, SystemTime::now()) {
            return Err(corrupt(
                &ca_key_path,
                format!("a certificate it signed does not verify against {CA_CERT}: the key is not that CA's, or the CA has expired"),
            ));
        }
        write(&tls.key_path, &contents.1, true)?;
        write(&tls.cert_path, &contents.0, false)?;
    }
    Ok(DevTls { made, ..tls })
}

/// The CA: it may sign certificates for servers but no further CAs.
/// It carries no name constraints, so that a changed `--domain` keeps it;
/// whoever holds its key can pass for any site to a machine that trusts it.
fn ca_params(domain: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::OrganizationName, "Ferry");
    name.push(
        DnType::CommonName,
        format!("Ferry development CA ({domain})"),
    );
    params.distinguished_name = name;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = SystemTime::now();
    params.not_before = (now - BACKDATE).into();
    params.not_after = (now + CA_VALIDITY).into();
    params
}

/// A server certificate for `names`, each with its wildcard, and for the
/// loopback addresses when the domain is `localhost`.
fn leaf_params(names: &[String], domain: &str) -> Result<CertificateParams, rcgen::Error> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, names[0].clone());
    params.distinguished_name = dn;
    for name in names {
        params
            .subject_alt_names
            .push(SanType::DnsName(name.as_str().try_into()?));
        if name.contains('.') || name == domain {
            params
                .subject_alt_names
                .push(SanType::DnsName(format!("*.{name}").try_into()?));
        }
    }
    if domain == "localhost" {
        for ip in [
            std::net::IpAddr::from([127, 0, 0, 1]),
            std::net::IpAddr::from(std::net::Ipv6Addr::LOCALHOST),
        ] {
            params.subject_alt_names.push(SanType::IpAddress(ip));
        }
    }
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    let now = SystemTime::now();
    params.not_before = (now - BACKDATE).into();
    params.not_after = (now + CERT_VALIDITY).into();
    Ok(params)
}

/// Whether `certified` was signed by `ca` and is valid at `at` for `domain`
/// and, where a wildcard can cover them, its subdomains.
fn covers(certified: &CertifiedKey, ca: &CertificateDer<'_>, domain: &str, at: SystemTime) -> bool {
    let mut names = vec![domain.to_owned()];
    if domain.contains('.') {
        names.push(format!("ferry-check.{domain}"));
    }
    names.iter().all(|name| verifies(certified, ca, name, at))
}

/// Whether `certified` verifies against `ca` for `name` at `at`.
fn verifies(certified: &CertifiedKey, ca: &CertificateDer<'_>, name: &str, at: SystemTime) -> bool {
    let mut roots = rustls::RootCertStore::empty();
    if roots.add(ca.clone().into_owned()).is_err() {
        return false;
    }
    let Ok(verifier) =
        WebPkiServerVerifier::builder_with_provider(Arc::new(roots), super::provider()).build()
    else {
        return false;
    };
    let (Some(leaf), Ok(name)) = (
        certified.cert.first(),
        ServerName::try_from(name.to_owned()),
    ) else {
        return false;
    };
    let secs = at
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    verifier
        .verify_server_cert(
            leaf,
            &certified.cert[1..],
            &name,
            &[],
            UnixTime::since_unix_epoch(secs),
        )
        .is_ok()
}

fn load_issuer(
    ca_path: &Path,
    key_path: &Path,
    ca_pem: &str,
    dir: &Path,
) -> Result<Issuer<'static, KeyPair>, DevTlsError> {
    let corrupt = |path: &Path, cause: String| DevTlsError::Corrupt {
        path: path.to_owned(),
        dir: dir.to_owned(),
        cause,
    };
    let key = KeyPair::from_pem(&read_text(key_path, dir)?)
        .map_err(|err| corrupt(key_path, err.to_string()))?;
    Issuer::from_ca_cert_pem(ca_pem, key).map_err(|err| corrupt(ca_path, err.to_string()))
}

fn read_bytes(path: &Path, dir: &Path) -> Result<Vec<u8>, DevTlsError> {
    std::fs::read(path).map_err(|err| DevTlsError::Corrupt {
        path: path.to_owned(),
        dir: dir.to_owned(),
        cause: err.to_string(),
    })
}

fn read_text(path: &Path, dir: &Path) -> Result<String, DevTlsError> {
    String::from_utf8(read_bytes(path, dir)?).map_err(|_| DevTlsError::Corrupt {
        path: path.to_owned(),
        dir: dir.to_owned(),
        cause: "it is not text".into(),
    })
}

/// Writes `path` whole (a temporary file renamed over it), 0600 if
/// `private`, else 0644.
fn write(path: &Path, contents: &[u8], private: bool) -> Result<(), DevTlsError> {
    let failed = |source| DevTlsError::Write {
        path: path.to_owned(),
        source,
    };
    let temporary = path.with_extension("pem.new");
    write_synced(&temporary, contents, private).map_err(failed)?;
    std::fs::rename(&temporary, path).map_err(failed)
}

/// Signs, at handshake time, certificates for names under a domain that a
/// wildcard cannot cover: browsers, curl and rustls refuse `*.localhost`,
/// a wildcard over a single label, so NAME.localhost gets its own.
pub struct OnDemand {
    /// The CA.
    issuer: Issuer<'static, KeyPair>,
    /// The domain, lowercase.
    domain: String,
    /// Certificates made so far, by name.
    made: Mutex<HashMap<String, Arc<CertifiedKey>>>,
}

impl std::fmt::Debug for OnDemand {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OnDemand")
            .field("domain", &self.domain)
            .finish_non_exhaustive()
    }
}

impl OnDemand {
    /// For `domain`'s subdomains when a wildcard cannot cover them (a
    /// single-label domain such as `localhost`), signed by `tls`'s CA.
    pub fn for_domain(tls: &DevTls, domain: &str) -> Result<Option<Self>, DevTlsError> {
        if domain.contains('.') {
            return Ok(None);
        }
        let dir = tls.ca_path.parent().unwrap_or(Path::new("."));
        let ca_pem = read_text(&tls.ca_path, dir)?;
        let issuer = load_issuer(&tls.ca_path, &dir.join(CA_KEY), &ca_pem, dir)?;
        Ok(Some(Self {
            issuer,
            domain: domain.to_ascii_lowercase(),
            made: Mutex::new(HashMap::new()),
        }))
    }

    /// A certificate for `name` if it is a subdomain of the domain; `None`
    /// otherwise, or if one cannot be made.
    pub fn certificate(&self, name: &str) -> Option<Arc<CertifiedKey>> {
        let name = name.to_ascii_lowercase();
        let label = name.strip_suffix(&self.domain)?.strip_suffix('.')?;
        if label.is_empty() || label.contains('.') {
            return None;
        }
        let mut made = self.made.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(certified) = made.get(&name) {
            return Some(Arc::clone(certified));
        }
        let key = KeyPair::generate().ok()?;
        let cert = leaf_params(std::slice::from_ref(&name), &self.domain)
            .ok()?
            .signed_by(&key, &self.issuer)
            .ok()?;
        let key = PrivateKeyDer::try_from(key.serialize_der()).ok()?;
        let signing_key = rustls::crypto::ring::sign::any_supported_type(&key).ok()?;
        let certified = Arc::new(CertifiedKey::new(vec![cert.der().clone()], signing_key));
        if made.len() >= ON_DEMAND_CACHE {
            made.clear();
        }
        made.insert(name, Arc::clone(&certified));
        Some(certified)
    }
}
