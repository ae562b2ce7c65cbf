//! TLS for the public listener: the certificate (a wildcard for
//! `*.DOMAIN` plus `DOMAIN`) comes from PEM files and is reloaded when they
//! change, so a renewal needs no restart.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use rustls::crypto::ring::sign::any_supported_type;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;

pub mod acme;
pub mod dev;

/// How often the PEM files are checked for a new certificate.
pub const RELOAD_CHECK: Duration = Duration::from_secs(10);

/// Where the certificate chain and its private key are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// Why a certificate could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or holds no PEM of the kind expected.
    #[error("cannot read {what} from {path}: {cause}")]
    Read {
        /// "certificates" or "a private key".
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        cause: String,
    },
    /// The key is of a kind rustls cannot sign with.
    #[error("the private key in {0} is not a supported RSA, ECDSA or Ed25519 key")]
    UnsupportedKey(PathBuf),
    /// The key does not belong to the certificate.
    #[error("the private key in {key} does not match the certificate in {cert}")]
    Mismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
    },
}

/// The files' bytes, to tell when they change.
type Contents = (Vec<u8>, Vec<u8>);

fn read(path: &Path, what: &'static str) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|err| TlsError::Read {
        what,
        path: path.to_owned(),
        cause: err.to_string(),
    })
}

/// Parses a certificate chain and key, checking that they belong together.
fn certified_key(files: &TlsFiles, contents: &Contents) -> Result<Arc<CertifiedKey>, TlsError> {
    let read_error = |what, path: &Path, cause: String| TlsError::Read {
        what,
        path: path.to_owned(),
        cause,
    };
    let chain = CertificateDer::pem_slice_iter(&contents.0)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| read_error("certificates", &files.cert, err.to_string()))?;
    if chain.is_empty() {
        return Err(read_error(
            "certificates",
            &files.cert,
            "no CERTIFICATE block".into(),
        ));
    }
    let key = PrivateKeyDer::from_pem_slice(&contents.1)
        .map_err(|err| read_error("a private key", &files.key, err.to_string()))?;
    let signing_key =
        any_supported_type(&key).map_err(|_| TlsError::UnsupportedKey(files.key.clone()))?;
    let certified = CertifiedKey::new(chain, signing_key);
    certified.keys_match().map_err(|_| TlsError::Mismatch {
        cert: files.cert.clone(),
        key: files.key.clone(),
    })?;
    Ok(Arc::new(certified))
}

/// Serves the current certificate to every handshake and swaps in a new
/// one when the files change.
pub struct CertResolver {
    /// Where the PEM files are.
    files: TlsFiles,
    /// The certificate in use and the file contents it came from.
    current: RwLock<(Arc<CertifiedKey>, Contents)>,
    /// With `--dev-tls`, signs certificates for names a wildcard cannot
    /// cover.
    on_demand: Option<dev::OnDemand>,
}

impl fmt::Debug for CertResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertResolver")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl CertResolver {
    /// Loads the certificate, failing if it cannot be used.
    pub fn load(files: TlsFiles) -> Result<Self, TlsError> {
        let contents = (
            read(&files.cert, "certificates")?,
            read(&files.key, "a private key")?,
        );
        let key = certified_key(&files, &contents)?;
        Ok(Self {
            files,
            current: RwLock::new((key, contents)),
            on_demand: None,
        })
    }

    /// Also serves names under the domain that the files' wildcard cannot
    /// cover, with certificates `on_demand` signs.
    pub fn with_on_demand(mut self, on_demand: Option<dev::OnDemand>) -> Self {
        self.on_demand = on_demand;
        self
    }

    /// Reloads the certificate if the files changed. Returns `Ok(true)` when
    /// a new certificate is now served; on an error the old one stays.
    pub fn reload_if_changed(&self) -> Result<bool, TlsError> {
        let contents = (
            read(&self.files.cert, "certificates")?,
            read(&self.files.key, "a private key")?,
        );
        if self
            .current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .1
            == contents
        {
            return Ok(false);
        }
        let key = certified_key(&self.files, &contents)?;
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = (key, contents);
        Ok(true)
    }

    /// The certificate served now.
    pub fn current(&self) -> Arc<CertifiedKey> {
        Arc::clone(
            &self
                .current
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .0,
        )
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        if let (Some(on_demand), Some(name)) = (&self.on_demand, client_hello.server_name()) {
            if let Some(certified) = on_demand.certificate(name) {
                return Some(certified);
            }
        }
        Some(self.current())
    }
}

/// The relay's TLS provider, ring, named rather than left to the process
/// default: another crate in the same build may enable a second provider,
/// and rustls then refuses to pick one.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The public web PKI's roots and the CA certificates in the PEM file
/// `extra` (a private CA, a test CA), for the relay's own HTTPS clients;
/// the error says why the file cannot be used.
pub fn roots_with(extra: Option<&Path>) -> Result<rustls::RootCertStore, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = extra {
        let certs = CertificateDer::pem_file_iter(path)
            .and_then(Iterator::collect::<Result<Vec<_>, _>>)
            .map_err(|err| err.to_string())?;
        if certs.is_empty() {
            return Err("no CERTIFICATE block".into());
        }
        for cert in certs {
            roots.add(cert).map_err(|err| err.to_string())?;
        }
    }
    Ok(roots)
}

/// A rustls server configuration serving `resolver`'s certificate, offering
/// HTTP/2 and HTTP/1.1 by ALPN.
pub fn server_config(resolver: Arc<CertResolver>) -> Arc<ServerConfig> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("ring supports TLS 1.2 and 1.3")
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Arc::new(config)
}

/// Creates `dir` and its parents, 0700 where made: it holds private keys.
fn private_dir(dir: &Path) -> std::io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir)
}

/// Writes and syncs `path` (0600 if `private`, else 0644), to be renamed
/// over the file it replaces so that no reader sees it half written.
fn write_synced(path: &Path, contents: &[u8], private: bool) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, if private { 0o600 } else { 0o644 });
    let mut file = options.open(path)?;
    file.write_all(contents)?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::{CertResolver, TlsError, TlsFiles};

    fn write_pair(dir: &std::path::Path, name: &str) -> TlsFiles {
        let cert = rcgen::generate_simple_self_signed(vec![name.to_owned()]).unwrap();
        let files = TlsFiles {
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
        };
        std::fs::write(&files.cert, cert.cert.pem()).unwrap();
        std::fs::write(&files.key, cert.signing_key.serialize_pem()).unwrap();
        files
    }

    fn temp_dir(test: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("ferry-tls-{test}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_changed_certificate_is_reloaded_and_a_broken_one_is_not() {
        let dir = temp_dir("reload");
        let files = write_pair(&dir, "one.test");
        let resolver = CertResolver::load(files.clone()).unwrap();
        let first = resolver.current();
        assert!(
            !resolver.reload_if_changed().unwrap(),
            "unchanged files are not reloaded"
        );

        write_pair(&dir, "two.test");
        assert!(resolver.reload_if_changed().unwrap());
        assert_ne!(resolver.current().cert, first.cert);

        std::fs::write(&files.key, "not a key").unwrap();
        assert!(matches!(
            resolver.reload_if_changed(),
            Err(TlsError::Read { .. })
        ));
        assert_ne!(
            resolver.current().cert,
            first.cert,
            "the last good certificate stays"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_key_of_another_certificate_is_refused() {
        let dir = temp_dir("mismatch");
        let files = write_pair(&dir, "one.test");
        let other = rcgen::generate_simple_self_signed(vec!["other.test".to_owned()]).unwrap();
        std::fs::write(&files.key, other.signing_key.serialize_pem()).unwrap();
        assert!(matches!(
            CertResolver::load(files),
            Err(TlsError::Mismatch { .. })
        ));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
