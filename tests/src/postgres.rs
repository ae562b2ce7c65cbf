//! A PostgreSQL server for the tests: Debian's `postgresql`, started once
//! per test process in a temporary directory on a free port, and a fresh
//! database per test on it ([`fresh_database`]); or a server of one test's
//! own that it can stop and start again ([`PgServer`]), with TLS if the
//! test asks ([`PgServer::own_with_tls`]).
//!
//! The server is [`ferry_pg_server`]'s, shared with the bench: as root it
//! runs as the `postgres` user the Debian package creates (or `nobody`),
//! and its watchdog stops it and removes its directory when the test
//! process exits, however it exits.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use ferry_pg_server::{Cluster, Settings, Shutdown};

/// A PostgreSQL server in a temporary directory. It stops, and its
/// directory goes, when it is dropped or the test process exits.
pub struct PgServer(Arc<ferry_pg_server::PgServer>);

/// The tests' servers: room for many relays' pools at once, and stopped at
/// once when the test process ends.
const SETTINGS: Settings = Settings {
    needed_by: "the tests need Debian's `postgresql` \
                (`apt-get install postgresql`; scripts/test installs it)",
    prefix: "ferry-pg-",
    max_connections: 400,
    shutdown: Shutdown::Immediate,
};

/// TLS for a server of a test's own.
pub struct PgTls {
    /// The server's certificate chain, PEM, leaf first.
    pub cert_pem: String,
    /// Its private key, PEM.
    pub key_pem: String,
    /// Whether connections over TCP without TLS are refused (`hostssl`
    /// only in `pg_hba.conf`).
    pub only: bool,
}

static SERVER: OnceLock<Result<PgServer, String>> = OnceLock::new();

/// The URL of a new, empty database on the test process's PostgreSQL
/// server, which is started on first use. Fails the test when PostgreSQL
/// is not installed or does not start.
pub async fn fresh_database() -> String {
    let made = tokio::task::spawn_blocking(|| {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let server = SERVER
            .get_or_init(PgServer::start)
            .as_ref()
            .map_err(Clone::clone)?;
        server
            .0
            .create(&format!("ferry_{}", NEXT.fetch_add(1, Ordering::Relaxed)))
    })
    .await
    .expect("the createdb task");
    made.unwrap_or_else(|err| panic!("{err}"))
}

impl PgServer {
    /// A server of the caller's own, with one empty database; its URL.
    /// Fails the test when PostgreSQL is not installed or does not start.
    pub async fn own() -> (Self, String) {
        let started = tokio::task::spawn_blocking(|| {
            let server = Self::start()?;
            let url = server.0.create("ferry")?;
            Ok::<_, String>((server, url))
        })
        .await
        .expect("the server's start");
        started.unwrap_or_else(|err| panic!("{err}"))
    }

    /// [`PgServer::own`] with `ssl = on` and the certificate of `tls`. The
    /// URL names no `sslmode`.
    pub async fn own_with_tls(tls: PgTls) -> (Self, String) {
        let started = tokio::task::spawn_blocking(move || {
            let server = Self::start_with(Some(&tls))?;
            let url = server.0.create("ferry")?;
            Ok::<_, String>((server, url))
        })
        .await
        .expect("the server's start");
        started.unwrap_or_else(|err| panic!("{err}"))
    }

    /// The `key=value` connection string of `database` over the server's
    /// Unix socket, which needs no TLS: for the test's own look at what
    /// the server sees.
    pub fn local_url(&self, database: &str) -> String {
        format!(
            "host={} port={} user=ferry dbname={database}",
            self.0.dir().display(),
            self.0.port()
        )
    }

    /// Stops the server at once, as an outage would; [`PgServer::resume`]
    /// starts it again on the same port with the same data.
    pub async fn pause(&self) {
        self.blocking(ferry_pg_server::PgServer::pause).await;
    }

    /// Starts a paused server again; returns once it accepts connections.
    pub async fn resume(&self) {
        self.blocking(ferry_pg_server::PgServer::resume).await;
    }

    /// Runs `work`, which waits for the server, off the runtime's threads;
    /// fails the test with its error.
    async fn blocking(&self, work: fn(&ferry_pg_server::PgServer) -> Result<(), String>) {
        let server = Arc::clone(&self.0);
        let done = tokio::task::spawn_blocking(move || work(&server))
            .await
            .expect("the server's task");
        done.unwrap_or_else(|err| panic!("{err}"));
    }

    fn start() -> Result<Self, String> {
        Self::start_with(None)
    }

    fn start_with(tls: Option<&PgTls>) -> Result<Self, String> {
        let cluster = Cluster::init(&SETTINGS)?;
        if let Some(tls) = tls {
            configure_tls(&cluster.data(), cluster.user(), tls)?;
        }
        Ok(Self(Arc::new(cluster.start()?)))
    }
}

/// Writes `tls`'s certificate and key into the data directory `data`,
/// owned by the server's user (the key readable by it alone, as the server
/// demands), and turns TLS on.
fn configure_tls(data: &Path, user: Option<(u32, u32)>, tls: &PgTls) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;

    let write = |name: &str, contents: &str, mode: u32| {
        let path = data.join(name);
        std::fs::write(&path, contents)
            .and_then(|()| std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)))
            .map_err(|err| format!("cannot write {}: {err}", path.display()))?;
        if let Some((uid, gid)) = user {
            std::os::unix::fs::chown(&path, Some(uid), Some(gid)).map_err(|err| {
                format!("cannot give {} to the server's user: {err}", path.display())
            })?;
        }
        Ok::<_, String>(())
    };
    write("server.crt", &tls.cert_pem, 0o644)?;
    write("server.key", &tls.key_pem, 0o600)?;
    let conf = data.join("postgresql.conf");
    std::fs::OpenOptions::new()
        .append(true)
        .open(&conf)
        .and_then(|mut file| {
            file.write_all(
                b"\nssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n",
            )
        })
        .map_err(|err| format!("cannot turn TLS on in {}: {err}", conf.display()))?;
    if tls.only {
        // The Unix socket stays open without TLS for the test's own checks
        // ([`PgServer::local_url`]).
        write(
            "pg_hba.conf",
            "local all all trust\nhostssl all all 127.0.0.1/32 trust\n",
            0o600,
        )?;
    }
    Ok(())
}
