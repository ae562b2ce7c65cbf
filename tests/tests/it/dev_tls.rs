//! `--dev-tls`: a local CA and certificate made in the data directory serve
//! wss:// and https:// to clients that trust the CA, and are kept across
//! starts.

use std::sync::Arc;

use ferry_relay::tls::dev::{self, Made};
use ferry_relay::tls::CertResolver;
use ferry_relay::Listeners;
use ferry_tests::{
    full, read_body, stop_all, within, ClientOptions, Origin, TestClient, TestRelay,
};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::{TcpListener, TcpStream};

/// The CA `ensure` wrote, as a client would load it from the printed path.
fn ca_of(tls: &dev::DevTls) -> CertificateDer<'static> {
    CertificateDer::from_pem_file(&tls.ca_path).expect("the CA file is PEM")
}

/// An HTTPS GET of `/hook` on `host` at `port`, trusting `roots`.
async fn https_get(
    port: u16,
    host: &str,
    roots: rustls::RootCertStore,
) -> Result<Response<hyper::body::Incoming>, String> {
    let mut config = ferry::local_tls::client_config()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let stream = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("relay accepts");
    let name = ServerName::try_from(host.to_owned()).expect("valid name");
    let stream = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, stream)
        .await
        .map_err(|err| err.to_string())?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("http/1.1 over tls");
    tokio::spawn(connection);
    let request = Request::builder()
        .uri("/hook")
        .header("host", format!("{host}:{port}"))
        .body(full(""))
        .expect("valid request");
    Ok(within("the https response", sender.send_request(request))
        .await
        .expect("response"))
}

#[tokio::test]
async fn a_relay_with_dev_tls_serves_clients_that_trust_its_ca() {
    let data = tempfile::tempdir().expect("data dir");
    let tls_files = dev::ensure(data.path(), "localhost").expect("dev tls made");
    assert_eq!(tls_files.made, Made::NewCa);
    let on_demand = dev::OnDemand::for_domain(&tls_files, "localhost").expect("ca loads");
    let resolver = CertResolver::load(tls_files.files())
        .expect("certificate loads")
        .with_on_demand(on_demand);
    let tls = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let tls_port = tls.local_addr().expect("addr").port();
    let relay = TestRelay::start_with(
        Listeners {
            plain: None,
            tls: Some((tls, Arc::new(resolver))),
        },
        ferry_relay::Config::default(),
    )
    .await;
    let origin = Origin::start(|_req| async { Response::new(full("hello over dev tls")) }).await;
    let ca = ca_of(&tls_files);
    let options = ClientOptions {
        subdomain: Some("devsite"),
        relay_url: Some(format!("wss://localhost:{tls_port}/api/v1/tunnels/connect")),
        relay_ca: vec![ca.clone()],
        ..ClientOptions::default()
    };
    let client = TestClient::start(&relay, &origin.target(), options).await;
    assert_eq!(
        client.public_url,
        format!("https://devsite.localhost:{tls_port}")
    );

    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca).expect("the CA is a valid root");
    let response = https_get(tls_port, "devsite.localhost", roots)
        .await
        .expect("NAME.localhost verifies against the dev CA");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(read_body(response.into_body()).await, b"hello over dev tls");

    let system = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    let refused = https_get(tls_port, "devsite.localhost", system)
        .await
        .expect_err("public roots do not trust the dev CA");
    assert!(refused.to_lowercase().contains("certificate"), "{refused}");

    stop_all(client, origin, relay).await;
}

#[test]
fn dev_tls_is_kept_and_the_certificate_follows_the_domain() {
    let data = tempfile::tempdir().expect("data dir");
    let first = dev::ensure(data.path(), "relay.test").expect("made");
    assert_eq!(first.made, Made::NewCa);
    let ca = std::fs::read(&first.ca_path).expect("ca");
    let cert = std::fs::read(&first.cert_path).expect("cert");

    let again = dev::ensure(data.path(), "relay.test").expect("reused");
    assert_eq!(again.made, Made::Reused);
    assert_eq!(std::fs::read(&again.ca_path).expect("ca"), ca, "same CA");
    assert_eq!(
        std::fs::read(&again.cert_path).expect("cert"),
        cert,
        "same certificate"
    );

    let moved = dev::ensure(data.path(), "other.test").expect("renewed");
    assert_eq!(moved.made, Made::NewCert);
    assert_eq!(
        std::fs::read(&moved.ca_path).expect("ca"),
        ca,
        "the CA is kept"
    );
    assert_ne!(std::fs::read(&moved.cert_path).expect("cert"), cert);
    CertResolver::load(moved.files()).expect("the new certificate loads");

    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &std::path::Path| {
            std::fs::metadata(p).expect("metadata").permissions().mode() & 0o777
        };
        assert_eq!(mode(&moved.key_path), 0o600);
        assert_eq!(mode(&moved.ca_path.with_file_name(dev::CA_KEY)), 0o600);
        assert_eq!(mode(&moved.cert_path), 0o644);
        assert_eq!(mode(&moved.ca_path), 0o644);
    }
}

#[test]
fn corrupt_dev_tls_files_are_refused_by_name() {
    for file in [dev::CA_CERT, dev::CA_KEY, dev::CERT, dev::KEY] {
        let data = tempfile::tempdir().expect("data dir");
        let made = dev::ensure(data.path(), "localhost").expect("made");
        let path = made.ca_path.with_file_name(file);
        std::fs::write(&path, "not PEM").expect("corrupt");
        let err = dev::ensure(data.path(), "localhost").expect_err("corrupt file refused");
        let message = err.to_string();
        assert!(message.contains(&path.display().to_string()), "{message}");
        assert!(message.contains("delete the folder"), "{message}");
    }
}
