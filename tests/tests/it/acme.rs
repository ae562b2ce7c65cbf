//! `--acme-email` against a real ACME server on loopback: Debian's `pebble`,
//! validating DNS-01 through the relay's own DNS server, issues a
//! certificate for DOMAIN and *.DOMAIN that a tunnel's subdomain then
//! serves to curl; a short-lived certificate is renewed and swapped in
//! while connections and the tunnel stay open.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_relay::dns::{serve, Challenges, Zone, ZoneConfig};
use ferry_relay::tls::acme::{Acme, AcmeConfig};
use ferry_relay::tls::CertResolver;
use ferry_relay::Listeners;
use ferry_tests::{full, within, ClientOptions, Origin, TestClient, TestRelay};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

const DOMAIN: &str = "relay.test";
/// Pebble's certificates live this long in the renewal test: long enough
/// for the first requests, short enough that renewal (at two thirds of the
/// lifetime) comes within the test's patience.
const SHORT_VALIDITY_SECS: u64 = 15;

/// The pebble binary, or a failure saying how to get it.
fn pebble_binary() -> PathBuf {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .map(|dir| dir.join("pebble"))
        .find(|path| path.is_file())
        .unwrap_or_else(|| {
            panic!(
                "the ACME tests need Debian's pebble ACME test server: `apt-get install pebble` \
                 (scripts/test installs it)"
            )
        })
}

/// A port free now, for pebble, which cannot listen on port 0.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port()
}

/// Waits until something accepts on `port`: pebble prints its addresses
/// just before it binds them.
async fn accepting(port: u16) {
    within("pebble to listen", async {
        while TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

/// A running pebble and the CA its own HTTPS uses.
struct Pebble {
    child: Child,
    directory: String,
    management: u16,
    https_ca: PathBuf,
}

impl Pebble {
    async fn start(dir: &Path, dns: SocketAddr, validity_secs: Option<u64>) -> Self {
        let binary = pebble_binary();
        // A CA and a certificate for pebble's HTTPS: Debian's package does
        // not ship the test certificates of pebble's repository.
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "pebble https test CA");
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        params
            .subject_alt_names
            .push(rcgen::SanType::IpAddress([127, 0, 0, 1].into()));
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &issuer).unwrap();
        let https_ca = dir.join("pebble-https-ca.pem");
        std::fs::write(&https_ca, ca_cert.pem()).unwrap();
        std::fs::write(dir.join("pebble-cert.pem"), cert.pem()).unwrap();
        std::fs::write(dir.join("pebble-key.pem"), key.serialize_pem()).unwrap();

        let (listen, management) = (free_port(), free_port());
        let mut settings = serde_json::json!({
            "listenAddress": format!("127.0.0.1:{listen}"),
            "managementListenAddress": format!("127.0.0.1:{management}"),
            "certificate": dir.join("pebble-cert.pem"),
            "privateKey": dir.join("pebble-key.pem"),
            "httpPort": free_port(),
            "tlsPort": free_port(),
            "ocspResponderURL": "",
            "externalAccountBindingRequired": false,
        });
        if let Some(secs) = validity_secs {
            settings["certificateValidityPeriod"] = secs.into();
        }
        let config = dir.join("pebble.json");
        std::fs::write(
            &config,
            serde_json::json!({ "pebble": settings }).to_string(),
        )
        .unwrap();
        let mut child = Command::new(binary)
            .arg("-config")
            .arg(&config)
            .arg("-dnsserver")
            .arg(dns.to_string())
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            // Every order proves its names again, so renewal goes through
            // the DNS server too.
            .env("PEBBLE_AUTHZREUSE", "0")
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("pebble starts");
        // Its log goes on in the background; the directory line means it
        // is about to listen.
        let mut lines = BufReader::new(child.stdout.take().expect("piped")).lines();
        within("pebble's directory line", async {
            while let Some(line) = lines.next_line().await.expect("pebble's output") {
                if line.contains("ACME directory available") {
                    return;
                }
            }
            panic!("pebble exited before serving");
        })
        .await;
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        accepting(listen).await;
        accepting(management).await;
        Self {
            child,
            directory: format!("https://127.0.0.1:{listen}/dir"),
            management,
            https_ca,
        }
    }

    async fn stop(mut self) {
        self.child.kill().await.expect("pebble stops");
    }

    /// The root of the chains pebble issues, written to a file for curl.
    async fn root(&self, dir: &Path) -> PathBuf {
        let path = dir.join("pebble-root.pem");
        let output = Command::new("curl")
            .args(["-sS", "--fail", "--cacert"])
            .arg(&self.https_ca)
            .arg(format!("https://127.0.0.1:{}/roots/0", self.management))
            .arg("-o")
            .arg(&path)
            .output()
            .await
            .expect("curl runs (apt-get install curl)");
        assert!(output.status.success(), "{output:?}");
        path
    }
}

/// The relay's DNS server on one port, UDP and TCP.
async fn start_dns(domain: &str, challenges: Challenges, stop: CancellationToken) -> SocketAddr {
    let zone = Zone::new(
        &ZoneConfig {
            domain: domain.into(),
            ns_name: format!("ns.{DOMAIN}"),
            addresses: vec!["127.0.0.1".parse().unwrap()],
            caa_issuer: None,
            contact: None,
        },
        challenges,
    )
    .expect("zone");
    // The TCP listener takes the port the UDP socket got; another
    // program may hold it over TCP, so a few tries.
    for _ in 0..20 {
        let udp = UdpSocket::bind("127.0.0.1:0").await.expect("bind udp");
        let addr = udp.local_addr().unwrap();
        if let Ok(tcp) = TcpListener::bind(addr).await {
            tokio::spawn(serve(Arc::new(zone), udp, tcp, stop));
            return addr;
        }
    }
    panic!("no port free over both UDP and TCP");
}

/// curl's GET of `/hook` on tunnel `name` over HTTPS, trusting `root` only.
async fn curl(root: &Path, name: &str, port: u16) -> String {
    let host = format!("{name}.{DOMAIN}");
    let output = Command::new("curl")
        .args(["-sS", "--fail", "--cacert"])
        .arg(root)
        .arg("--resolve")
        .arg(format!("{host}:{port}:127.0.0.1"))
        .arg(format!("https://{host}:{port}/hook"))
        .output()
        .await
        .expect("curl runs (apt-get install curl)");
    assert!(
        output.status.success(),
        "curl failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("text")
}

/// A TLS connection to `name` at `port` trusting `root`, and the leaf
/// certificate it was served.
async fn tls_connect(
    root: &Path,
    name: &str,
    port: u16,
) -> (
    tokio_rustls::client::TlsStream<TcpStream>,
    CertificateDer<'static>,
) {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(root).expect("root PEM"))
        .expect("root added");
    let mut config = ferry::local_tls::client_config()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let stream = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connects");
    let server_name = ServerName::try_from(format!("{name}.{DOMAIN}")).expect("name");
    let stream = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(server_name, stream)
        .await
        .expect("the certificate is trusted and names the host");
    let leaf = stream
        .get_ref()
        .1
        .peer_certificates()
        .expect("a certificate")[0]
        .clone();
    (stream, leaf)
}

#[tokio::test]
async fn pebble_issues_a_wildcard_that_a_tunnel_serves_and_a_short_lived_one_is_renewed_live() {
    let started = Instant::now();
    let dir = tempfile::tempdir().expect("temp dir");
    let data = tempfile::tempdir().expect("data dir");
    let stop = CancellationToken::new();
    let challenges = Challenges::default();
    let dns = start_dns(DOMAIN, challenges.clone(), stop.clone()).await;
    let pebble = Pebble::start(dir.path(), dns, Some(SHORT_VALIDITY_SECS)).await;

    let acme = Acme::new(
        AcmeConfig {
            domain: DOMAIN.into(),
            directory: pebble.directory.clone(),
            email: Some("ops@example.com".into()),
            ca_file: Some(pebble.https_ca.clone()),
            renew_before: ferry_relay::tls::acme::DEFAULT_RENEW_BEFORE,
        },
        data.path(),
        challenges.clone(),
    )
    .expect("acme client");
    assert!(acme.renewal_time().is_none(), "no certificate yet");
    let files = within("the first certificate", acme.ensure(&stop))
        .await
        .expect("issued");
    assert!(
        challenges.values().is_empty(),
        "challenge records are withdrawn once done"
    );
    assert!(data.path().join("acme/account.json").is_file());
    let resolver = Arc::new(CertResolver::load(files).expect("the issued certificate loads"));

    let tls = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let tls_port = tls.local_addr().unwrap().port();
    let plain = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let relay = TestRelay::start_with(
        Listeners {
            plain: Some(plain),
            tls: Some((tls, Arc::clone(&resolver))),
        },
        ferry_relay::Config {
            domain: DOMAIN.into(),
            data_dir: data.path().to_owned(),
            ..ferry_relay::Config::default()
        },
    )
    .await;
    let origin = Origin::start(|_req| async { Response::new(full("hello over acme")) }).await;
    let client = TestClient::start(
        &relay,
        &origin.target(),
        ClientOptions {
            subdomain: Some("brave-otter"),
            ..ClientOptions::default()
        },
    )
    .await;
    let root = pebble.root(dir.path()).await;
    assert_eq!(
        curl(&root, "brave-otter", tls_port).await,
        "hello over acme"
    );
    println!(
        "acme: fresh start to a served wildcard certificate (pebble start included): {:?}",
        started.elapsed()
    );

    // An HTTPS connection opened on the first certificate, kept open
    // across the renewal.
    let (stream, first_leaf) = tls_connect(&root, "brave-otter", tls_port).await;
    let (mut open, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("http/1.1");
    tokio::spawn(connection);

    let mut renewals = acme.renewals();
    let renewing = tokio::spawn(acme.renew_until(Arc::clone(&resolver), stop.clone()));
    within(
        "a renewal of the short-lived certificate",
        renewals.wait_for(|count| *count > 0),
    )
    .await
    .expect("the acme client lives");
    let (_, renewed_leaf) = tls_connect(&root, "brave-otter", tls_port).await;
    assert_ne!(
        renewed_leaf, first_leaf,
        "new connections get the renewed certificate"
    );

    assert_eq!(
        curl(&root, "brave-otter", tls_port).await,
        "hello over acme"
    );
    let request = Request::builder()
        .uri("/hook")
        .header("host", format!("brave-otter.{DOMAIN}:{tls_port}"))
        .body(full(""))
        .unwrap();
    let response = within(
        "a request on the connection opened before",
        open.send_request(request),
    )
    .await
    .expect("the old connection still works");
    assert_eq!(
        ferry_tests::read_body(response.into_body()).await,
        b"hello over acme"
    );

    stop.cancel();
    within("the renewal task to stop", renewing)
        .await
        .expect("renewal task ends");
    client.stop().await.expect("client stops cleanly");
    origin.stop().await;
    relay.stop().await;
    pebble.stop().await;
}

#[tokio::test]
async fn a_domain_whose_dns_is_not_the_relays_fails_with_the_cas_reason() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = tempfile::tempdir().expect("data dir");
    let stop = CancellationToken::new();
    let challenges = Challenges::default();
    // The DNS server pebble asks serves another domain: it refuses
    // relay.test, as a resolver would find no TXT record where the NS
    // record is missing.
    let dns = start_dns("elsewhere.test", challenges.clone(), stop.clone()).await;
    let pebble = Pebble::start(dir.path(), dns, None).await;
    let acme = Acme::new(
        AcmeConfig {
            domain: DOMAIN.into(),
            directory: pebble.directory.clone(),
            email: None,
            ca_file: Some(pebble.https_ca.clone()),
            renew_before: ferry_relay::tls::acme::DEFAULT_RENEW_BEFORE,
        },
        data.path(),
        challenges.clone(),
    )
    .expect("acme client");
    let err = within("the failed issuance", acme.issue())
        .await
        .expect_err("pebble cannot validate");
    let message = err.to_string();
    assert!(message.contains("could not validate"), "{message}");
    assert!(
        message.contains("_acme-challenge.relay.test"),
        "the CA's reason: {message}"
    );
    assert!(message.contains("NS record"), "what to check: {message}");
    assert!(
        challenges.values().is_empty(),
        "withdrawn after a failure too"
    );
    assert!(acme.renewal_time().is_none(), "no certificate written");
    stop.cancel();
    pebble.stop().await;
}

#[tokio::test]
async fn shutdown_during_an_issuance_stops_it_at_once_and_withdraws_the_challenge_values() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = tempfile::tempdir().expect("data dir");
    // A DNS server that reads pebble's queries and never answers: the
    // issuance waits in validation with its values published.
    let silent = UdpSocket::bind("127.0.0.1:0").await.expect("bind udp");
    let pebble = Pebble::start(dir.path(), silent.local_addr().unwrap(), None).await;
    let challenges = Challenges::default();
    let acme = Acme::new(
        AcmeConfig {
            domain: DOMAIN.into(),
            directory: pebble.directory.clone(),
            email: None,
            ca_file: Some(pebble.https_ca.clone()),
            renew_before: ferry_relay::tls::acme::DEFAULT_RENEW_BEFORE,
        },
        data.path(),
        challenges.clone(),
    )
    .expect("acme client");
    let shutdown = CancellationToken::new();
    let issuing = acme.ensure(&shutdown);
    tokio::pin!(issuing);
    let mut query = [0u8; 512];
    tokio::select! {
        _ = &mut issuing => panic!("an issuance without DNS answers ended"),
        received = within("pebble's DNS query", silent.recv_from(&mut query)) => {
            received.expect("a query");
        }
    }
    assert!(!challenges.values().is_empty(), "published while validated");
    shutdown.cancel();
    // The first poll after the cancel ends it. Without the race against
    // shutdown it went on until pebble gave up on its DNS query, seconds
    // later.
    let polled = std::future::poll_fn(|cx| {
        std::task::Poll::Ready(std::future::Future::poll(issuing.as_mut(), cx))
    })
    .await;
    assert!(
        matches!(polled, std::task::Poll::Ready(None)),
        "the issuance went on after the shutdown"
    );
    assert!(challenges.values().is_empty(), "withdrawn when stopped");
    pebble.stop().await;
}

/// An address free now over both UDP and TCP, for a relay's `--dns-listen`.
fn free_dns_addr() -> SocketAddr {
    (0..20)
        .find_map(|_| {
            let udp = std::net::UdpSocket::bind("127.0.0.1:0").ok()?;
            let addr = udp.local_addr().ok()?;
            std::net::TcpListener::bind(addr).ok().map(|_| addr)
        })
        .expect("a port free over both UDP and TCP")
}

#[tokio::test]
async fn a_fleet_orders_one_certificate_that_any_relays_dns_proves_and_every_relay_serves() {
    use ferry_tests::fleet::RelayProcess;

    let dir = tempfile::tempdir().expect("temp dir");
    let database = ferry_tests::postgres::fresh_database().await;
    let fleet = |dns: SocketAddr| {
        vec![
            "--database-url".to_owned(),
            database.clone(),
            "--domain".to_owned(),
            DOMAIN.to_owned(),
            "--dns-listen".to_owned(),
            dns.to_string(),
            "--public-ip".to_owned(),
            "127.0.0.1".to_owned(),
        ]
    };
    // The CA asks this relay's DNS server, and this relay orders nothing:
    // it answers the challenges the others open in the database.
    let answering_dns = free_dns_addr();
    let _answering = RelayProcess::start(&fleet(answering_dns)).await;
    let pebble = Pebble::start(dir.path(), answering_dns, None).await;
    let (directory, https_ca) = (pebble.directory.clone(), pebble.https_ca.clone());
    let ordering = |dns: SocketAddr| {
        let mut args = fleet(dns);
        args.extend([
            "--tls-listen".to_owned(),
            "127.0.0.1:0".to_owned(),
            "--acme-email".to_owned(),
            "ops@example.com".to_owned(),
            "--acme-directory".to_owned(),
            directory.clone(),
            "--acme-ca".to_owned(),
            https_ca.display().to_string(),
        ]);
        args
    };

    // Two relays that need a certificate start together: one orders, the
    // other waits its turn and takes the certificate the first stored.
    let (args_one, args_two) = (ordering(free_dns_addr()), ordering(free_dns_addr()));
    let (one, two) = tokio::join!(
        RelayProcess::start(&args_one),
        RelayProcess::start(&args_two)
    );
    let root = pebble.root(dir.path()).await;
    let tls_port = |relay: &RelayProcess| relay.tls_addr.expect("an https listener").port();
    let (_, first) = tls_connect(&root, "one", tls_port(&one)).await;
    let (_, second) = tls_connect(&root, "two", tls_port(&two)).await;
    assert_eq!(first, second, "one order, one certificate for the fleet");

    let (client, connection) = tokio_postgres::connect(&database, tokio_postgres::NoTls)
        .await
        .expect("the test connects to the database");
    tokio::spawn(connection);
    within("the challenges withdrawn", async {
        loop {
            let open: i64 = client
                .query_one("SELECT count(*) FROM ferry_acme_challenges", &[])
                .await
                .expect("the challenges are counted")
                .get(0);
            if open == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;

    // With the CA gone, a relay joining the fleet serves its certificate
    // at once.
    pebble.stop().await;
    let three = RelayProcess::start(&ordering(free_dns_addr())).await;
    let (_, third) = tls_connect(&root, "three", tls_port(&three)).await;
    assert_eq!(third, first, "the fleet's certificate, no order of its own");
}
