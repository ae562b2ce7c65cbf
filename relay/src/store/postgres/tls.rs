//! TLS to the database: the connector every connection uses (the public
//! roots and `--database-ca` are trusted, and the chain and the name are
//! always verified), libpq's `sslmode` spellings the driver lacks, and what
//! a failed handshake asks the operator to do.

use std::path::Path;

use tokio_postgres::error::{DbError, SqlState};
use tokio_postgres_rustls::MakeRustlsConnect;

use super::StoreError;

/// Makes the TLS sessions to the database, trusting the public web PKI
/// and the CA certificates in `ca_file` (`--database-ca`).
pub(super) fn connector(ca_file: Option<&Path>) -> Result<MakeRustlsConnect, StoreError> {
    let roots = crate::tls::roots_with(ca_file).map_err(|cause| {
        StoreError(format!(
            "--database-ca {}: {cause}: give a PEM file with the certificate of the CA that signed the database's certificate",
            ca_file.unwrap_or(Path::new("")).display()
        ))
    })?;
    let mut config = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()
        .expect("ring supports TLS 1.2 and 1.3")
        .with_root_certificates(roots)
        .with_no_client_auth();
    // What libpq offers: PostgreSQL 17 requires it with
    // `sslnegotiation=direct`, and checks it whenever a client sends one.
    config.alpn_protocols = vec![b"postgresql".to_vec()];
    Ok(MakeRustlsConnect::new(config))
}

/// `url` with libpq's `sslmode=verify-ca` and `sslmode=verify-full`, which
/// the driver does not parse, as `require`: Ferry verifies the chain and the
/// name whenever it uses TLS, so the three mean the same here. Works on a
/// URL's query and on a `key=value` string alike.
pub(super) fn libpq_modes(url: &str) -> String {
    url.split_inclusive(['?', '&', ' '])
        .map(|part| {
            let end = part.trim_end_matches(['?', '&', ' ']);
            match end {
                "sslmode=verify-ca" | "sslmode=verify-full" => {
                    format!("sslmode=require{}", &part[end.len()..])
                }
                _ => part.to_owned(),
            }
        })
        .collect()
}

/// Whether what travels to the database at `url` is safe from the network
/// between: TLS is required (and always verified), or every host is this
/// machine (a Unix socket or loopback). A URL that does not parse is not.
pub fn private_link(url: &str) -> bool {
    use tokio_postgres::config::{Host, SslMode};
    let Ok(config) = libpq_modes(url).parse::<tokio_postgres::Config>() else {
        return false;
    };
    if matches!(config.get_ssl_mode(), SslMode::Require) {
        return true;
    }
    let hosts = config.get_hosts();
    !hosts.is_empty()
        && hosts.iter().all(|host| match host {
            Host::Unix(_) => true,
            Host::Tcp(name) => {
                name == "localhost"
                    || name
                        .parse::<std::net::IpAddr>()
                        .is_ok_and(|ip| ip.is_loopback())
            }
        })
}

/// What the operator should do about `err`, when it is a TLS problem
/// between the relay and the database.
pub(super) fn hint(err: &(dyn std::error::Error + 'static)) -> Option<&'static str> {
    let mut cause = Some(err);
    while let Some(err) = cause {
        let rustls = err.downcast_ref::<rustls::Error>().or_else(|| {
            err.downcast_ref::<std::io::Error>()
                .and_then(std::io::Error::get_ref)
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        });
        if let Some(rustls::Error::InvalidCertificate(problem)) = rustls {
            return Some(match problem {
                // A CA of the same name as a trusted one fails the
                // signature rather than the issuer.
                rustls::CertificateError::UnknownIssuer
                | rustls::CertificateError::BadSignature => {
                    "the database's certificate is not signed by a CA this relay trusts: \
                     pass --database-ca with the PEM certificate of the CA that signed it \
                     (a self-signed certificate itself)"
                }
                rustls::CertificateError::NotValidForName
                | rustls::CertificateError::NotValidForNameContext { .. } => {
                    "the database's certificate is not issued for the host in --database-url: \
                     connect by a name or address the certificate holds"
                }
                _ => {
                    "the database's certificate was refused (Ferry always verifies it): \
                      give the database a valid certificate"
                }
            });
        }
        if err.to_string() == "server does not support TLS" {
            return Some(
                "the database does not offer TLS and --database-url asks for it (sslmode): \
                 turn on `ssl` in the database's configuration",
            );
        }
        if let Some(db) = err.downcast_ref::<DbError>() {
            if *db.code() == SqlState::INVALID_AUTHORIZATION_SPECIFICATION
                && db.message().ends_with("no encryption")
            {
                return Some(
                    "the database accepts only TLS connections: remove sslmode=disable from --database-url",
                );
            }
        }
        cause = err.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::{libpq_modes, private_link};

    #[test]
    fn a_link_is_private_with_tls_required_or_on_this_machine() {
        for url in [
            "postgres://u@db.example/ferry?sslmode=require",
            "postgres://u@db.example/ferry?sslmode=verify-full",
            "postgres://u@127.0.0.1:5432/ferry",
            "postgres://u@localhost/ferry?sslmode=disable",
            "postgres://u@[::1]/ferry",
            "host=/run/postgresql user=u dbname=ferry",
        ] {
            assert!(private_link(url), "{url}");
        }
        for url in [
            "postgres://u@db.example/ferry",
            "postgres://u@db.example/ferry?sslmode=prefer",
            "postgres://u@127.0.0.1,db.example/ferry",
            "postgres://u@10.0.0.5/ferry?sslmode=disable",
            "not a url",
        ] {
            assert!(!private_link(url), "{url}");
        }
    }

    #[test]
    fn verifying_ssl_modes_read_as_require() {
        assert_eq!(
            libpq_modes("postgres://u:p@db/ferry?sslmode=verify-full"),
            "postgres://u:p@db/ferry?sslmode=require"
        );
        assert_eq!(
            libpq_modes(
                "postgres://db/ferry?application_name=x&sslmode=verify-ca&connect_timeout=3"
            ),
            "postgres://db/ferry?application_name=x&sslmode=require&connect_timeout=3"
        );
        assert_eq!(
            libpq_modes("host=db sslmode=verify-full user=u"),
            "host=db sslmode=require user=u"
        );
        // Only a whole parameter is rewritten, never a password that
        // happens to hold the text.
        assert_eq!(
            libpq_modes("postgres://u:xsslmode=verify-full@db/ferry?sslmode=disable"),
            "postgres://u:xsslmode=verify-full@db/ferry?sslmode=disable"
        );
    }
}
