//! The relay's HTTPS listener: clients connect over wss:// and public
//! callers over https://, with a certificate from PEM files.

use std::sync::Arc;

use ferry_relay::tls::{CertResolver, TlsFiles};
use ferry_relay::Listeners;
use ferry_tests::{
    full, read_body, stop_all, within, ClientOptions, Origin, TestClient, TestRelay,
};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::{TcpListener, TcpStream};

/// A private CA and a certificate it signed for `localhost` and its
/// subdomains, written as PEM files.
struct Certificates {
    /// The CA, for clients to trust.
    ca: CertificateDer<'static>,
    /// The relay's PEM files.
    files: TlsFiles,
    /// Where the files are, removed at the end.
    dir: std::path::PathBuf,
}

fn certificates() -> Certificates {
    let ca_key = rcgen::KeyPair::generate().expect("ca key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).expect("ca certificate");
    let key = rcgen::KeyPair::generate().expect("key");
    let names = vec![
        "localhost".to_owned(),
        "secure.localhost".to_owned(),
        "*.localhost".to_owned(),
    ];
    let issuer = rcgen::Issuer::from_params(&ca_params, &ca_key);
    let cert = rcgen::CertificateParams::new(names)
        .expect("params")
        .signed_by(&key, &issuer)
        .expect("certificate");
    // Tests run in parallel in one process: each gets its own folder.
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("ferry-tls-test-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let files = TlsFiles {
        cert: dir.join("cert.pem"),
        key: dir.join("key.pem"),
    };
    std::fs::write(&files.cert, cert.pem()).expect("write cert");
    std::fs::write(&files.key, key.serialize_pem()).expect("write key");
    Certificates {
        ca: ca.der().clone(),
        files,
        dir,
    }
}

#[tokio::test]
async fn tunnels_work_over_wss_and_https_with_a_private_ca() {
    let certs = certificates();
    let plain = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let tls = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let tls_port = tls.local_addr().expect("addr").port();
    let resolver = Arc::new(CertResolver::load(certs.files.clone()).expect("certificate loads"));
    let listeners = Listeners {
        plain: Some(plain),
        tls: Some((tls, resolver)),
    };
    let relay = TestRelay::start_with(listeners, ferry_relay::Config::default()).await;

    let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
    let origin = Origin::start(move |req: Request<hyper::body::Incoming>| {
        let proto = req.headers().get("x-forwarded-proto").cloned();
        let _ = seen_tx.send(proto);
        async { Response::new(full("hello over tls")) }
    })
    .await;
    let options = ClientOptions {
        subdomain: Some("secure"),
        relay_url: Some(format!("wss://localhost:{tls_port}/api/v1/tunnels/connect")),
        relay_ca: vec![certs.ca.clone()],
        ..ClientOptions::default()
    };
    let client = TestClient::start(&relay, &origin.target(), options).await;
    assert_eq!(
        client.public_url,
        format!("https://secure.localhost:{tls_port}")
    );

    let mut roots = rustls::RootCertStore::empty();
    roots.add(certs.ca.clone()).expect("ca is a valid root");
    let mut config = ferry::local_tls::client_config()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let stream = TcpStream::connect(("127.0.0.1", tls_port))
        .await
        .expect("relay accepts");
    let name = ServerName::try_from("secure.localhost").expect("valid name");
    let stream = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, stream)
        .await
        .expect("tls handshake with the relay's certificate");
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("http/1.1 over tls");
    tokio::spawn(connection);
    let request = Request::builder()
        .uri("/hook")
        .header("host", format!("secure.localhost:{tls_port}"))
        .body(full(""))
        .expect("valid request");
    let response = within("the https response", sender.send_request(request))
        .await
        .expect("response");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(read_body(response.into_body()).await, b"hello over tls");
    let proto = within("the origin", seen.recv())
        .await
        .expect("origin saw the request");
    assert_eq!(proto.as_ref().map(|v| v.as_bytes()), Some(&b"https"[..]));

    stop_all(client, origin, relay).await;
    std::fs::remove_dir_all(certs.dir).expect("remove temp dir");
}

#[tokio::test]
async fn a_client_that_does_not_trust_the_relay_certificate_says_so() {
    let certs = certificates();
    let tls = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let tls_port = tls.local_addr().expect("addr").port();
    let resolver = Arc::new(CertResolver::load(certs.files.clone()).expect("certificate loads"));
    let relay = TestRelay::start_with(
        Listeners {
            plain: None,
            tls: Some((tls, resolver)),
        },
        ferry_relay::Config::default(),
    )
    .await;
    let options = ClientOptions {
        relay_url: Some(format!("wss://localhost:{tls_port}/api/v1/tunnels/connect")),
        ..ClientOptions::default()
    };
    let client = TestClient::spawn(&relay, "3000", options);
    match client.finished().await {
        Err(ferry::Error::Unreachable(_, cause)) => {
            assert!(cause.to_lowercase().contains("certificate"), "{cause}")
        }
        other => panic!("expected a certificate error, got {other:?}"),
    }
    relay.stop().await;
    std::fs::remove_dir_all(certs.dir).expect("remove temp dir");
}

/// Behind a TCP load balancer that passes TLS through, the PROXY header
/// comes first and the TLS handshake after it, on the same connection.
#[tokio::test]
async fn a_trusted_proxys_header_before_the_tls_handshake_names_the_caller() {
    let certs = certificates();
    let plain = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let tls = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let tls_port = tls.local_addr().expect("addr").port();
    let resolver = Arc::new(CertResolver::load(certs.files.clone()).expect("certificate loads"));
    let listeners = Listeners {
        plain: Some(plain),
        tls: Some((tls, resolver)),
    };
    let config = ferry_relay::Config {
        trusted_proxies: vec!["127.0.0.1/32".parse().expect("network")],
        ..ferry_relay::Config::default()
    };
    let relay = TestRelay::start_with(listeners, config).await;
    let origin = Origin::start(|req: Request<hyper::body::Incoming>| async move {
        let seen = |name: &str| {
            req.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("none")
                .to_owned()
        };
        Response::new(full(format!(
            "{} {}",
            seen("x-forwarded-for"),
            seen("x-forwarded-proto")
        )))
    })
    .await;
    let options = ClientOptions {
        subdomain: Some("secure"),
        ..ClientOptions::default()
    };
    let client = TestClient::start(&relay, &origin.target(), options).await;

    let mut roots = rustls::RootCertStore::empty();
    roots.add(certs.ca.clone()).expect("ca is a valid root");
    let mut config = ferry::local_tls::client_config()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let mut stream = TcpStream::connect(("127.0.0.1", tls_port))
        .await
        .expect("relay accepts");
    tokio::io::AsyncWriteExt::write_all(
        &mut stream,
        b"PROXY TCP4 203.0.113.9 192.0.2.1 5555 443\r\n",
    )
    .await
    .expect("proxy header written");
    let name = ServerName::try_from("secure.localhost").expect("valid name");
    let stream = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, stream)
        .await
        .expect("tls handshake after the proxy header");
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("http/1.1 over tls");
    tokio::spawn(connection);
    let request = Request::builder()
        .uri("/hook")
        .header("host", format!("secure.localhost:{tls_port}"))
        .body(full(""))
        .expect("valid request");
    let response = within("the https response", sender.send_request(request))
        .await
        .expect("response");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(read_body(response.into_body()).await, b"203.0.113.9 https");

    stop_all(client, origin, relay).await;
    std::fs::remove_dir_all(certs.dir).expect("remove temp dir");
}
