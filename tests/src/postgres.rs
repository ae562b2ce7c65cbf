//! A PostgreSQL server for the tests: Debian's `postgresql`, started once
//! per test process in a temporary directory on a free port, and a fresh
//! database per test on it ([`fresh_database`]); or a server of one test's
//! own that it can stop and start again ([`PgServer`]), with TLS if the
//! test asks ([`PgServer::own_with_tls`]).
//!
//! `initdb` and `postgres` refuse to run as root, and CI runs as root: then
//! the server runs as the `postgres` user the Debian package creates (or
//! `nobody`). A watchdog process holds the other end of a pipe from this
//! process; when the test process exits, however it exits, the pipe closes
//! and the watchdog stops the server and removes its directory.

use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

/// A PostgreSQL server in a temporary directory. It stops, and its
/// directory goes, when it is dropped or the test process exits.
pub struct PgServer {
    port: u16,
    bin: PathBuf,
    dir: PathBuf,
    user: Option<(u32, u32)>,
    /// Closed when this is dropped or the process exits: the watchdog's
    /// signal.
    _watchdog: Mutex<ChildStdin>,
}

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
        server.create(&format!("ferry_{}", NEXT.fetch_add(1, Ordering::Relaxed)))
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
            let url = server.create("ferry")?;
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
            let url = server.create("ferry")?;
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
            self.dir.display(),
            self.port
        )
    }

    /// Stops the server at once, as an outage would; [`PgServer::resume`]
    /// starts it again on the same port with the same data.
    pub async fn pause(&self) {
        let (bin, dir, user) = (self.bin.clone(), self.dir.clone(), self.user);
        let stopped = tokio::task::spawn_blocking(move || {
            let mut pg_ctl = as_server(bin.join("pg_ctl"), user);
            pg_ctl
                .arg("-D")
                .arg(dir.join("data"))
                .args(["-m", "immediate", "-w", "stop"]);
            run(pg_ctl, "pg_ctl stop")
        })
        .await
        .expect("the server's stop");
        stopped.unwrap_or_else(|err| panic!("{err}"));
    }

    /// Starts a paused server again; returns once it accepts connections.
    pub async fn resume(&self) {
        let (bin, dir, user, port) = (self.bin.clone(), self.dir.clone(), self.user, self.port);
        let started = tokio::task::spawn_blocking(move || start_on(&bin, &dir, user, port))
            .await
            .expect("the server's start");
        started.unwrap_or_else(|err| panic!("{err}"));
    }

    fn url(&self, database: &str) -> String {
        format!("postgres://ferry@127.0.0.1:{}/{database}", self.port)
    }

    /// Creates database `name`; its URL.
    fn create(&self, name: &str) -> Result<String, String> {
        let mut createdb = Command::new(self.bin.join("createdb"));
        createdb.args([
            "-h",
            "127.0.0.1",
            "-p",
            &self.port.to_string(),
            "-U",
            "ferry",
            name,
        ]);
        run(createdb, "createdb")?;
        Ok(self.url(name))
    }

    fn start() -> Result<Self, String> {
        Self::start_with(None)
    }

    fn start_with(tls: Option<&PgTls>) -> Result<Self, String> {
        let bin = bin_dir()?;
        let user = server_user()?;
        let dir = tempfile::Builder::new()
            .prefix("ferry-pg-")
            .tempdir()
            .map_err(|err| format!("a temporary directory: {err}"))?
            .keep();
        if let Some((uid, gid)) = user {
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid)).map_err(|err| {
                format!("cannot give {} to the server's user: {err}", dir.display())
            })?;
        }
        let mut initdb = as_server(bin.join("initdb"), user);
        initdb.arg("-D").arg(dir.join("data")).args([
            "-U",
            "ferry",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--locale=C.UTF-8",
            "--no-sync",
        ]);
        run(initdb, "initdb")?;
        if let Some(tls) = tls {
            configure_tls(&dir.join("data"), user, tls)?;
        }
        let watchdog = watchdog(&bin, &dir, user)?;
        // A port can be taken between asking for it and the server binding
        // it: then the next one is tried.
        let mut last = String::new();
        for _ in 0..5 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|listener| listener.local_addr())
                .map_err(|err| format!("a free port: {err}"))?
                .port();
            match start_on(&bin, &dir, user, port) {
                Ok(()) => {
                    return Ok(Self {
                        port,
                        bin,
                        dir,
                        user,
                        _watchdog: Mutex::new(watchdog),
                    })
                }
                Err(err) => last = err,
            }
        }
        Err(format!("PostgreSQL did not start: {last}"))
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

/// The newest PostgreSQL's programs on this machine.
fn bin_dir() -> Result<PathBuf, String> {
    let missing = || {
        "PostgreSQL is not installed: the tests need Debian's `postgresql` \
         (`apt-get install postgresql`; scripts/test installs it)"
            .to_owned()
    };
    let versions = std::fs::read_dir("/usr/lib/postgresql").map_err(|_| missing())?;
    versions
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let version: u32 = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .max_by_key(|(version, _)| *version)
        .map(|(_, bin)| bin)
        .ok_or_else(missing)
}

/// The user and group the server runs as: this process's, unless that is
/// root, which PostgreSQL refuses.
fn server_user() -> Result<Option<(u32, u32)>, String> {
    let me = std::fs::metadata("/proc/self").map_err(|err| format!("/proc/self: {err}"))?;
    if me.uid() != 0 {
        return Ok(None);
    }
    let passwd =
        std::fs::read_to_string("/etc/passwd").map_err(|err| format!("/etc/passwd: {err}"))?;
    let user = |wanted: &str| {
        passwd.lines().find_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            (fields.first() == Some(&wanted))
                .then(|| Some((fields.get(2)?.parse().ok()?, fields.get(3)?.parse().ok()?)))?
        })
    };
    user("postgres")
        .or_else(|| user("nobody"))
        .map(Some)
        .ok_or_else(|| "running as root, and neither a `postgres` nor a `nobody` user exists to run PostgreSQL as".to_owned())
}

/// A command run as the server's user.
fn as_server(program: PathBuf, user: Option<(u32, u32)>) -> Command {
    let mut command = Command::new(program);
    if let Some((uid, gid)) = user {
        command.uid(uid).gid(gid);
    }
    command
}

fn run(mut command: Command, what: &str) -> Result<(), String> {
    let out = command
        .output()
        .map_err(|err| format!("cannot run {what}: {err}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{what} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// Starts the server in `dir` on `port`; returns once it accepts
/// connections.
fn start_on(bin: &Path, dir: &Path, user: Option<(u32, u32)>, port: u16) -> Result<(), String> {
    // No fsync: the tests never crash the machine, only the server, and
    // what a commit wrote reaches the kernel before the commit returns, so
    // an immediate stop ([`PgServer::pause`]) loses nothing committed.
    let options = format!(
        "-c listen_addresses=127.0.0.1 -p {port} -k {} -c fsync=off \
         -c full_page_writes=off -c max_connections=400",
        dir.display()
    );
    let mut pg_ctl = as_server(bin.join("pg_ctl"), user);
    pg_ctl
        .arg("-D")
        .arg(dir.join("data"))
        .arg("-l")
        .arg(dir.join("server.log"))
        .args(["-w", "-t", "120", "-o", &options, "start"]);
    run(pg_ctl, "pg_ctl start").map_err(|err| {
        let log = std::fs::read_to_string(dir.join("server.log")).unwrap_or_default();
        format!("{err}\n{log}")
    })
}

/// Starts the process that stops the server and removes `dir` once this
/// process's end of its standard input closes.
fn watchdog(bin: &Path, dir: &Path, user: Option<(u32, u32)>) -> Result<ChildStdin, String> {
    let mut command = as_server("/bin/sh".into(), user);
    command
        .args([
            "-c",
            r#"cat > /dev/null; "$0/pg_ctl" -D "$1/data" -m immediate stop > /dev/null 2>&1; rm -rf "$1""#,
        ])
        .arg(bin)
        .arg(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0);
    let mut child = command
        .spawn()
        .map_err(|err| format!("cannot start the server's watchdog: {err}"))?;
    child
        .stdin
        .take()
        .ok_or_else(|| "the watchdog has no standard input".to_owned())
}
