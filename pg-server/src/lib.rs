//! A PostgreSQL server of its own in a temporary directory, for the tests
//! (tests/src/postgres.rs) and the bench (bench/src/pg.rs, `ferry-bench
//! --fleet`): Debian's `postgresql`, initialised in a temporary directory
//! and started on a free port of 127.0.0.1. Errors are returned, for the
//! tests to fail with and the bench to report.
//!
//! `initdb` and `postgres` refuse to run as root, and CI runs as root: then
//! the server runs as the `postgres` user the Debian package creates (or
//! `nobody`). A watchdog process holds the other end of a pipe from this
//! process; once it closes (at [`PgServer::stop`], when the server is
//! dropped, or however this process exits) the watchdog stops the server
//! and removes its directory.

use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

/// Where Debian installs PostgreSQL's versions.
const DEBIAN_ROOT: &str = "/usr/lib/postgresql";

/// How a server is set up.
#[derive(Clone, Copy, Debug)]
pub struct Settings<'a> {
    /// Who needs PostgreSQL and how to install it: the end of the error
    /// when it is not installed.
    pub needed_by: &'a str,
    /// The start of the temporary directory's name.
    pub prefix: &'a str,
    /// The server's `max_connections`.
    pub max_connections: u32,
    /// How the watchdog stops the server.
    pub shutdown: Shutdown,
}

/// How the watchdog stops the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shutdown {
    /// `pg_ctl -m fast -w`: connections are closed cleanly and the
    /// directory goes once the server has exited.
    Fast,
    /// `pg_ctl -m immediate`: at once, without waiting.
    Immediate,
}

impl Shutdown {
    fn pg_ctl_flags(self) -> &'static str {
        match self {
            Self::Fast => "-m fast -w",
            Self::Immediate => "-m immediate",
        }
    }
}

/// A server's directory, initialised but not started: its configuration
/// can still be changed (see [`Cluster::data`]).
pub struct Cluster {
    bin: PathBuf,
    dir: PathBuf,
    user: Option<(u32, u32)>,
    max_connections: u32,
    /// The watchdog; closing its standard input stops the server and
    /// removes `dir`.
    watchdog: Child,
}

impl Cluster {
    /// Makes the temporary directory and runs `initdb` in it: user
    /// `ferry`, trusted, UTF-8.
    pub fn init(settings: &Settings) -> Result<Self, String> {
        let bin = bin_dir(Path::new(DEBIAN_ROOT), settings.needed_by)?;
        let user = server_user()?;
        let dir = tempfile::Builder::new()
            .prefix(settings.prefix)
            .tempdir()
            .map_err(|err| format!("cannot make a temporary directory: {err}"))?
            .keep();
        if let Some((uid, gid)) = user {
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid)).map_err(|err| {
                format!("cannot give {} to the server's user: {err}", dir.display())
            })?;
        }
        // From here on the watchdog removes the directory, whatever fails.
        let watchdog = watchdog(&bin, &dir, user, settings.shutdown)?;
        let cluster = Self {
            bin,
            dir,
            user,
            max_connections: settings.max_connections,
            watchdog,
        };
        let mut initdb = cluster.as_server("initdb");
        initdb.arg("-D").arg(cluster.data()).args([
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
        Ok(cluster)
    }

    /// The data directory, with `postgresql.conf` and `pg_hba.conf`.
    pub fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// The uid and gid the server runs as, when not this process's: what
    /// is written into [`Cluster::data`] must be theirs.
    pub fn user(&self) -> Option<(u32, u32)> {
        self.user
    }

    /// Starts the server on a free port; returns once it accepts
    /// connections.
    pub fn start(self) -> Result<PgServer, String> {
        // A port can be taken between asking for it and the server binding
        // it: then the next one is tried.
        let mut last = String::new();
        for _ in 0..5 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|listener| listener.local_addr())
                .map_err(|err| format!("cannot find a free port on 127.0.0.1: {err}"))?
                .port();
            match self.start_on(port) {
                Ok(()) => {
                    return Ok(PgServer {
                        cluster: self,
                        port,
                    })
                }
                Err(err) => last = err,
            }
        }
        Err(format!("PostgreSQL did not start: {last}"))
    }

    /// Starts the server on `port`; returns once it accepts connections.
    fn start_on(&self, port: u16) -> Result<(), String> {
        let options = server_options(&self.dir, port, self.max_connections);
        let mut pg_ctl = self.as_server("pg_ctl");
        pg_ctl
            .arg("-D")
            .arg(self.data())
            .arg("-l")
            .arg(self.dir.join("server.log"))
            .args(["-w", "-t", "120", "-o", &options, "start"]);
        run(pg_ctl, "pg_ctl start").map_err(|err| {
            let log = std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default();
            format!("{err}\n{log}")
        })
    }

    /// PostgreSQL's `program`, run as the server's user.
    fn as_server(&self, program: &str) -> Command {
        as_server(self.bin.join(program), self.user)
    }
}

/// A running PostgreSQL server in a temporary directory. It stops, and its
/// directory goes, at [`PgServer::stop`], when it is dropped, or when this
/// process exits.
pub struct PgServer {
    cluster: Cluster,
    port: u16,
}

impl PgServer {
    /// Initialises and starts a server; returns once it accepts
    /// connections.
    pub fn start(settings: &Settings) -> Result<Self, String> {
        Cluster::init(settings)?.start()
    }

    /// The port it listens on, on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The temporary directory, which holds its Unix socket.
    pub fn dir(&self) -> &Path {
        &self.cluster.dir
    }

    /// The data directory.
    pub fn data(&self) -> PathBuf {
        self.cluster.data()
    }

    /// The URL of `database` over TCP.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://ferry@127.0.0.1:{}/{database}", self.port)
    }

    /// The `createdb` that creates the empty database `name`, for a caller
    /// that runs it its own way; [`check`] its output.
    pub fn createdb(&self, name: &str) -> Command {
        let mut createdb = Command::new(self.cluster.bin.join("createdb"));
        createdb.args([
            "-h",
            "127.0.0.1",
            "-p",
            &self.port.to_string(),
            "-U",
            "ferry",
            name,
        ]);
        createdb
    }

    /// Creates the empty database `name`; its URL.
    pub fn create(&self, name: &str) -> Result<String, String> {
        run(self.createdb(name), &format!("createdb {name}"))?;
        Ok(self.url(name))
    }

    /// Stops the server at once, as an outage would; [`PgServer::resume`]
    /// starts it again on the same port with the same data.
    pub fn pause(&self) -> Result<(), String> {
        let mut pg_ctl = self.cluster.as_server("pg_ctl");
        pg_ctl
            .arg("-D")
            .arg(self.data())
            .args(["-m", "immediate", "-w", "stop"]);
        run(pg_ctl, "pg_ctl stop")
    }

    /// Starts a paused server again; returns once it accepts connections.
    pub fn resume(&self) -> Result<(), String> {
        self.cluster.start_on(self.port)
    }

    /// Stops the server and removes its directory; returns once the
    /// watchdog is done.
    pub fn stop(mut self) -> Result<(), String> {
        drop(self.cluster.watchdog.stdin.take());
        self.cluster
            .watchdog
            .wait()
            .map(drop)
            .map_err(|err| format!("waiting for PostgreSQL to stop: {err}"))
    }
}

/// Whether a program `what` that ended with `out` succeeded; if not, the
/// error with what it printed.
pub fn check(out: &Output, what: &str) -> Result<(), String> {
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

fn run(mut command: Command, what: &str) -> Result<(), String> {
    let out = command
        .output()
        .map_err(|err| format!("cannot run {what}: {err}"))?;
    check(&out, what)
}

/// The newest PostgreSQL's programs under `root` (Debian's layout:
/// `root/VERSION/bin`).
fn bin_dir(root: &Path, needed_by: &str) -> Result<PathBuf, String> {
    let missing = || {
        format!(
            "PostgreSQL is not installed (nothing under {}): {needed_by}",
            root.display()
        )
    };
    let versions = std::fs::read_dir(root).map_err(|_| missing())?;
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
    passwd_user(&passwd, "postgres")
        .or_else(|| passwd_user(&passwd, "nobody"))
        .map(Some)
        .ok_or_else(|| {
            "running as root, and neither a `postgres` nor a `nobody` user exists to run \
             PostgreSQL as"
                .to_owned()
        })
}

/// The uid and gid of `wanted` in an `/etc/passwd` text.
fn passwd_user(passwd: &str, wanted: &str) -> Option<(u32, u32)> {
    passwd.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        (fields.first() == Some(&wanted))
            .then(|| Some((fields.get(2)?.parse().ok()?, fields.get(3)?.parse().ok()?)))?
    })
}

/// A command run as the server's user.
fn as_server(program: PathBuf, user: Option<(u32, u32)>) -> Command {
    let mut command = Command::new(program);
    if let Some((uid, gid)) = user {
        command.uid(uid).gid(gid);
    }
    command
}

/// The server's options: loopback only on `port`, its socket in `dir`.
fn server_options(dir: &Path, port: u16, max_connections: u32) -> String {
    // No fsync: the tests crash the server, never the machine, and what a
    // commit wrote reaches the kernel before the commit returns, so an
    // immediate stop ([`PgServer::pause`]) loses nothing committed; the
    // bench's figures then measure Ferry's and PostgreSQL's work rather
    // than this machine's disk flushes (BENCHMARKS.md says so).
    format!(
        "-c listen_addresses=127.0.0.1 -p {port} -k {} -c fsync=off \
         -c full_page_writes=off -c max_connections={max_connections}",
        dir.display()
    )
}

/// Starts the process that stops the server and removes `dir` once this
/// process's end of its standard input closes.
fn watchdog(
    bin: &Path,
    dir: &Path,
    user: Option<(u32, u32)>,
    shutdown: Shutdown,
) -> Result<Child, String> {
    let script = format!(
        r#"cat > /dev/null; "$0/pg_ctl" -D "$1/data" {} stop > /dev/null 2>&1; rm -rf "$1""#,
        shutdown.pg_ctl_flags()
    );
    let mut command = as_server("/bin/sh".into(), user);
    command
        .arg("-c")
        .arg(script)
        .arg(bin)
        .arg(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        // Its own group: a Ctrl-C meant for this process leaves it to
        // clean up.
        .process_group(0);
    command
        .spawn()
        .map_err(|err| format!("cannot start PostgreSQL's watchdog: {err}"))
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::{bin_dir, passwd_user, server_options, PgServer, Settings, Shutdown};

    const SETTINGS: Settings = Settings {
        needed_by: "this crate's tests need Debian's `postgresql` \
                    (`apt-get install postgresql`; scripts/test installs it)",
        prefix: "ferry-pg-server-test-",
        max_connections: 20,
        shutdown: Shutdown::Fast,
    };

    #[test]
    fn finds_users_in_passwd() {
        let passwd = "root:x:0:0:root:/root:/bin/bash\n\
                      postgres:x:104:110:PostgreSQL:/var/lib/postgresql:/bin/bash\n\
                      nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n";
        assert_eq!(passwd_user(passwd, "postgres"), Some((104, 110)));
        assert_eq!(passwd_user(passwd, "nobody"), Some((65534, 65534)));
        assert_eq!(passwd_user(passwd, "post"), None);
        assert_eq!(passwd_user("broken:x:abc:1::", "broken"), None);
    }

    #[test]
    fn takes_the_newest_installed_version() {
        let root = tempfile::tempdir().expect("a temporary directory");
        for (version, installed) in [("13", true), ("15", true), ("16", false), ("x", true)] {
            let bin = root.path().join(version).join("bin");
            std::fs::create_dir_all(&bin).expect("a bin folder");
            if installed {
                std::fs::write(bin.join("initdb"), "").expect("an initdb");
            }
        }
        assert_eq!(
            bin_dir(root.path(), "install it"),
            Ok(root.path().join("15/bin"))
        );
        let empty = tempfile::tempdir().expect("a temporary directory");
        let missing = bin_dir(empty.path(), "the tests need `apt-get install postgresql`")
            .expect_err("nothing installed");
        assert!(missing.starts_with("PostgreSQL is not installed (nothing under "));
        assert!(missing.ends_with(": the tests need `apt-get install postgresql`"));
        assert!(bin_dir(Path::new("/nonexistent/pg"), "install it").is_err());
    }

    #[test]
    fn the_server_listens_on_loopback_only() {
        let options = server_options(Path::new("/tmp/pg"), 5433, 200);
        assert!(options.contains("listen_addresses=127.0.0.1 -p 5433 -k /tmp/pg"));
        assert!(options.contains("max_connections=200"));
    }

    async fn connects(url: &str) -> Result<(), tokio_postgres::Error> {
        let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
        let connection = tokio::spawn(connection);
        let row = client.query_one("SELECT current_database()", &[]).await?;
        assert_eq!(row.get::<_, String>(0), "made");
        drop(client);
        connection.await.expect("the connection's task")
    }

    #[tokio::test]
    async fn starts_creates_a_database_pauses_resumes_and_stops_leaving_nothing() {
        let server = tokio::task::spawn_blocking(|| PgServer::start(&SETTINGS))
            .await
            .expect("the start's task")
            .unwrap_or_else(|err| panic!("{err}"));
        let dir = server.dir().to_owned();
        let server =
            tokio::task::spawn_blocking(move || server.create("made").map(|url| (server, url)))
                .await
                .expect("the createdb's task");
        let (server, url) = server.unwrap_or_else(|err| panic!("{err}"));
        assert_eq!(
            url,
            format!("postgres://ferry@127.0.0.1:{}/made", server.port())
        );
        connects(&url)
            .await
            .expect("a connection to the new database");
        assert!(server.create("made").is_err(), "a database made twice");

        server.pause().expect("the pause");
        assert!(connects(&url).await.is_err(), "a paused server answered");
        server.resume().expect("the resume");
        connects(&url).await.expect("a connection after the resume");

        tokio::task::spawn_blocking(move || server.stop())
            .await
            .expect("the stop's task")
            .expect("the stop");
        assert!(!dir.exists(), "{} is left behind", dir.display());
        assert!(connects(&url).await.is_err(), "a stopped server answered");
    }
}
