//! TLS between the relay and PostgreSQL: `--database-url` honours libpq's
//! `sslmode`, every connection of the store (the pool, the followers of
//! channels, the fleet's session listener) is encrypted when TLS is used,
//! the certificate is always verified against the public roots and
//! `--database-ca`, and each refusal says what to do.

use std::path::{Path, PathBuf};

use ferry_relay::store::postgres::{channel, Postgres};
use ferry_relay::store::Database;
use ferry_tests::fleet::RelayProcess;
use ferry_tests::postgres::{PgServer, PgTls};
use ferry_tests::{empty, send, within};
use hyper::{Request, StatusCode};

/// A CA of the test's own and a server certificate it signed.
struct Pki {
    /// The CA's certificate, PEM.
    ca_pem: String,
    /// The server's certificate and key.
    server: PgTls,
}

/// A new CA and a certificate it signed for `names`; `only` refuses
/// connections without TLS.
fn pki(names: &[&str], only: bool) -> Pki {
    // Each CA has a name of its own, as two real CAs do.
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let ca_key = rcgen::KeyPair::generate().expect("ca key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, format!("ferry test CA {n}"));
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).expect("ca certificate");
    let issuer = rcgen::Issuer::from_params(&ca_params, &ca_key);
    let key = rcgen::KeyPair::generate().expect("key");
    let names: Vec<String> = names.iter().map(|name| (*name).to_owned()).collect();
    let cert = rcgen::CertificateParams::new(names)
        .expect("params")
        .signed_by(&key, &issuer)
        .expect("certificate");
    Pki {
        ca_pem: ca.pem(),
        server: PgTls {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            only,
        },
    }
}

/// `pem` written to a file in `dir`.
fn ca_file(dir: &Path, pem: &str) -> PathBuf {
    let path = dir.join("database-ca.pem");
    std::fs::write(&path, pem).expect("the CA file is written");
    path
}

/// How many connections named `ferry-relay` the server holds with TLS and
/// without, as the server itself sees them.
async fn relay_connections(server: &PgServer) -> (i64, i64) {
    let (client, connection) =
        tokio_postgres::connect(&server.local_url("ferry"), tokio_postgres::NoTls)
            .await
            .expect("the test connects over the Unix socket");
    tokio::spawn(connection);
    let row = client
        .query_one(
            "SELECT count(*) FILTER (WHERE ssl), count(*) FILTER (WHERE NOT ssl) \
             FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) \
             WHERE application_name = 'ferry-relay'",
            &[],
        )
        .await
        .expect("the connections are counted");
    (row.get(0), row.get(1))
}

/// The error of connecting the store to `url`, trusting `ca`.
async fn refused(url: &str, ca: Option<&Path>) -> String {
    match within("the store to connect", Postgres::connect_trusting(url, ca)).await {
        Ok(_) => panic!("the store connected to {url}"),
        Err(err) => err.to_string(),
    }
}

#[tokio::test]
async fn with_sslmode_require_every_connection_of_the_store_is_encrypted() {
    let pki = pki(&["localhost", "127.0.0.1"], false);
    let dir = tempfile::tempdir().expect("a directory");
    let ca = ca_file(dir.path(), &pki.ca_pem);
    // The server also takes connections without TLS: none of the relay's
    // may be one.
    let (server, url) = PgServer::own_with_tls(pki.server).await;
    let store = Postgres::connect_trusting(&format!("{url}?sslmode=require"), Some(&ca))
        .await
        .expect("the store connects over TLS");
    // The follower of the activity log's channel, once it listens.
    let mut commits = store.commits().expect("PostgreSQL has a commit feed");
    within("the log's follower to listen", commits.changed())
        .await
        .expect("the follower runs");
    // A fleet's session listener.
    let _listener = store
        .listen(&channel("0a1b"))
        .await
        .expect("the listener connects over TLS");
    let (encrypted, plain) = relay_connections(&server).await;
    assert_eq!(plain, 0, "no connection of the store is in the clear");
    assert!(
        encrypted >= 3,
        "the pool's, the follower's and the listener's connections use TLS: {encrypted}"
    );
}

#[tokio::test]
async fn tls_is_used_when_the_server_offers_it_and_verify_modes_mean_require() {
    let pki = pki(&["localhost", "127.0.0.1"], false);
    let dir = tempfile::tempdir().expect("a directory");
    let ca = ca_file(dir.path(), &pki.ca_pem);
    let (server, url) = PgServer::own_with_tls(pki.server).await;
    // No sslmode is `prefer`; libpq's verifying modes are accepted.
    for url in [
        url.clone(),
        format!("{url}?sslmode=verify-ca"),
        format!("{url}?sslmode=verify-full"),
    ] {
        let store = Postgres::connect_trusting(&url, Some(&ca))
            .await
            .unwrap_or_else(|err| panic!("{url}: {err}"));
        store.check().await.expect("the store answers");
        let (encrypted, plain) = relay_connections(&server).await;
        assert_eq!(plain, 0, "{url}: no connection is in the clear");
        assert!(encrypted >= 1, "{url}: the pool's connection uses TLS");
    }
}

#[tokio::test]
async fn a_certificate_from_an_untrusted_ca_is_refused_and_names_database_ca() {
    let server_pki = pki(&["localhost", "127.0.0.1"], false);
    let other = pki(&["localhost", "127.0.0.1"], false);
    let dir = tempfile::tempdir().expect("a directory");
    let other_ca = ca_file(dir.path(), &other.ca_pem);
    let (_server, url) = PgServer::own_with_tls(server_pki.server).await;
    // Trusting only the public roots, or another private CA; `prefer` does
    // not fall back to a connection in the clear either.
    for (url, ca) in [
        (format!("{url}?sslmode=require"), None),
        (
            format!("{url}?sslmode=verify-full"),
            Some(other_ca.as_path()),
        ),
        (url.clone(), Some(other_ca.as_path())),
    ] {
        let message = refused(&url, ca).await;
        assert!(
            message.contains("invalid peer certificate: UnknownIssuer")
                && message.contains("not signed by a CA this relay trusts")
                && message.contains("pass --database-ca"),
            "{url}: {message}"
        );
    }
}

#[tokio::test]
async fn a_self_signed_certificate_is_trusted_when_passed_as_database_ca() {
    // As Debian's "snakeoil" certificate is.
    let certified =
        rcgen::generate_simple_self_signed(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
            .expect("a self-signed certificate");
    let dir = tempfile::tempdir().expect("a directory");
    let ca = ca_file(dir.path(), &certified.cert.pem());
    let (server, url) = PgServer::own_with_tls(PgTls {
        cert_pem: certified.cert.pem(),
        key_pem: certified.signing_key.serialize_pem(),
        only: false,
    })
    .await;
    let message = refused(&url, None).await;
    assert!(
        message.contains("(a self-signed certificate itself)"),
        "{message}"
    );
    let _store = Postgres::connect_trusting(&url, Some(&ca))
        .await
        .expect("the store connects over TLS");
    let (encrypted, plain) = relay_connections(&server).await;
    assert_eq!((plain, encrypted > 0), (0, true));
}

#[tokio::test]
async fn a_certificate_for_another_name_is_refused() {
    let pki = pki(&["db.example.com"], false);
    let dir = tempfile::tempdir().expect("a directory");
    let ca = ca_file(dir.path(), &pki.ca_pem);
    let (_server, url) = PgServer::own_with_tls(pki.server).await;
    let message = refused(&format!("{url}?sslmode=require"), Some(&ca)).await;
    assert!(
        message.contains("certificate not valid for name \"127.0.0.1\"")
            && message.contains("not issued for the host in --database-url"),
        "{message}"
    );
}

#[tokio::test]
async fn sslmode_disable_against_a_tls_only_server_says_to_remove_it() {
    let pki = pki(&["localhost", "127.0.0.1"], true);
    let dir = tempfile::tempdir().expect("a directory");
    let ca = ca_file(dir.path(), &pki.ca_pem);
    let (_server, url) = PgServer::own_with_tls(pki.server).await;
    let message = refused(&format!("{url}?sslmode=disable"), Some(&ca)).await;
    assert!(
        message.contains("no encryption")
            && message.contains("remove sslmode=disable from --database-url"),
        "{message}"
    );
}

#[tokio::test]
async fn sslmode_require_against_a_server_without_tls_fails_clearly() {
    let (_server, url) = PgServer::own().await;
    let message = refused(&format!("{url}?sslmode=require"), None).await;
    assert!(
        message.contains("server does not support TLS")
            && message.contains("turn on `ssl` in the database's configuration"),
        "{message}"
    );
}

#[tokio::test]
async fn an_unusable_database_ca_file_is_refused_before_connecting() {
    let dir = tempfile::tempdir().expect("a directory");
    // Nothing listens on port 1: the file is read first.
    let url = "postgres://ferry@127.0.0.1:1/ferry?sslmode=require";
    let missing = dir.path().join("missing.pem");
    let empty_file = ca_file(dir.path(), "not a certificate\n");
    for (path, why) in [
        (&missing, "No such file"),
        (&empty_file, "no CERTIFICATE block"),
    ] {
        let message = refused(url, Some(path)).await;
        assert!(
            message.contains(&format!("--database-ca {}", path.display()))
                && message.contains(why)
                && message.contains("give a PEM file"),
            "{message}"
        );
    }
}

#[tokio::test]
async fn a_relay_process_serves_on_a_database_that_requires_tls() {
    let pki = pki(&["localhost", "127.0.0.1"], true);
    let dir = tempfile::tempdir().expect("a directory");
    let ca = ca_file(dir.path(), &pki.ca_pem);
    let (server, url) = PgServer::own_with_tls(pki.server).await;
    let relay = RelayProcess::start(&[
        "--database-url".to_owned(),
        format!("{url}?sslmode=require"),
        "--database-ca".to_owned(),
        ca.display().to_string(),
    ])
    .await;
    let host = relay.addr.to_string();
    let request = Request::get("/healthz")
        .body(empty())
        .expect("a valid request");
    // Health asks the database.
    assert_eq!(
        send(relay.addr, &host, request).await.status(),
        StatusCode::OK
    );
    let (encrypted, plain) = relay_connections(&server).await;
    assert_eq!(plain, 0);
    assert!(encrypted >= 1, "the relay's connections use TLS");
    relay.kill().await;
}
