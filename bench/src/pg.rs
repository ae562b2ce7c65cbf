//! A PostgreSQL server of the bench's own for `--fleet`: Debian's
//! `postgresql`, initialised in a temporary directory and started on a
//! free port of 127.0.0.1, with a fresh database per measured setup.
//!
//! The approach of the tests' server (tests/src/postgres.rs), in a module
//! of the bench's own that returns errors instead of failing a test:
//! `initdb` and `postgres` refuse to run as root, so as root the server
//! runs as the `postgres` user (or `nobody`); a watchdog holds a pipe from
//! this process and, once it closes (at [`PgServer::stop`], or however the
//! bench exits), stops the server and removes its directory.

use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// A running PostgreSQL server in a temporary directory.
pub struct PgServer {
    port: u16,
    bin: PathBuf,
    dir: PathBuf,
    /// The watchdog; closing its standard input stops the server.
    watchdog: Child,
}

impl PgServer {
    /// Initialises and starts a server; returns once it accepts connections.
    pub fn start() -> Result<Self, String> {
        let bin = bin_dir(Path::new("/usr/lib/postgresql"))?;
        let user = server_user()?;
        let dir = tempfile::Builder::new()
            .prefix("ferry-bench-pg-")
            .tempdir()
            .map_err(|err| format!("cannot make a temporary directory: {err}"))?
            .keep();
        if let Some((uid, gid)) = user {
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid)).map_err(|err| {
                format!("cannot give {} to the server's user: {err}", dir.display())
            })?;
        }
        // From here on the watchdog removes the directory, whatever fails.
        let watchdog = watchdog(&bin, &dir, user)?;
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
        let mut server = Self {
            port: 0,
            bin,
            dir,
            watchdog,
        };
        run(initdb, "initdb")?;
        // A port can be taken between asking for it and the server binding
        // it: then the next one is tried.
        let mut last = String::new();
        for _ in 0..5 {
            let port = crate::peers::free_port()?.port();
            match start_on(&server.bin, &server.dir, user, port) {
                Ok(()) => {
                    server.port = port;
                    return Ok(server);
                }
                Err(err) => last = err,
            }
        }
        Err(format!("PostgreSQL did not start: {last}"))
    }

    /// Creates the empty database `name`; its URL.
    pub async fn create(&self, name: &str) -> Result<String, String> {
        let mut createdb = tokio::process::Command::new(self.bin.join("createdb"));
        createdb.args([
            "-h",
            "127.0.0.1",
            "-p",
            &self.port.to_string(),
            "-U",
            "ferry",
            name,
        ]);
        let out = createdb
            .output()
            .await
            .map_err(|err| format!("cannot run createdb: {err}"))?;
        if !out.status.success() {
            return Err(format!(
                "createdb {name} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(format!("postgres://ferry@127.0.0.1:{}/{name}", self.port))
    }

    /// CPU seconds the server has used so far: the postmaster, its live
    /// processes (one per relay connection, the writers) and those that
    /// have ended.
    pub fn cpu_secs(&self) -> f64 {
        let Some(postmaster) = std::fs::read_to_string(self.dir.join("data/postmaster.pid"))
            .ok()
            .and_then(|pid| pid.lines().next()?.trim().parse::<u32>().ok())
        else {
            return 0.0;
        };
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return 0.0;
        };
        let mut ticks = 0;
        for entry in entries.filter_map(Result::ok) {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|p| p.parse::<u32>().ok())
            else {
                continue;
            };
            let Some(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|stat| Stat::parse(&stat))
            else {
                continue;
            };
            if pid == postmaster {
                ticks += stat.own + stat.children;
            } else if stat.parent == postmaster {
                ticks += stat.own;
            }
        }
        // Linux reports them in USER_HZ, 100 per second on every platform.
        ticks as f64 / 100.0
    }

    /// Stops the server and removes its directory; returns once both are
    /// done.
    pub fn stop(mut self) -> Result<(), String> {
        drop(self.watchdog.stdin.take());
        self.watchdog
            .wait()
            .map(drop)
            .map_err(|err| format!("waiting for PostgreSQL to stop: {err}"))
    }
}

/// What the bench reads of a `/proc/PID/stat` line, in clock ticks.
#[derive(Debug, PartialEq, Eq)]
struct Stat {
    /// The parent's process id.
    parent: u32,
    /// utime + stime.
    own: u64,
    /// cutime + cstime: the children it has waited for.
    children: u64,
}

impl Stat {
    fn parse(line: &str) -> Option<Self> {
        // The command name, in parentheses, may hold spaces: count fields
        // after it. ppid is field 4, utime to cstime are fields 14 to 17.
        let fields: Vec<&str> = line.rsplit_once(')')?.1.split_whitespace().collect();
        let field = |i: usize| fields.get(i)?.parse::<u64>().ok();
        Some(Self {
            parent: fields.get(1)?.parse().ok()?,
            own: field(11)? + field(12)?,
            children: field(13)? + field(14)?,
        })
    }
}

/// The newest PostgreSQL's programs under `root` (Debian's layout:
/// `root/VERSION/bin`).
fn bin_dir(root: &Path) -> Result<PathBuf, String> {
    let missing = || {
        format!(
            "PostgreSQL is not installed (nothing under {}): `--fleet` needs Debian's \
             `postgresql` (`apt-get install postgresql`)",
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

/// The server's options: loopback only on `port`, its socket in `dir`,
/// room for three relays' pools and their live tails.
fn server_options(dir: &Path, port: u16) -> String {
    // No fsync: as in the tests, a commit still reaches the kernel before
    // it returns, and the figures then measure Ferry and PostgreSQL's
    // work rather than this machine's disk flushes (BENCHMARKS.md says so).
    format!(
        "-c listen_addresses=127.0.0.1 -p {port} -k {} -c fsync=off \
         -c full_page_writes=off -c max_connections=200",
        dir.display()
    )
}

/// Starts the server in `dir` on `port`; returns once it accepts
/// connections.
fn start_on(bin: &Path, dir: &Path, user: Option<(u32, u32)>, port: u16) -> Result<(), String> {
    let options = server_options(dir, port);
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
fn watchdog(bin: &Path, dir: &Path, user: Option<(u32, u32)>) -> Result<Child, String> {
    let mut command = as_server("/bin/sh".into(), user);
    command
        .args([
            "-c",
            r#"cat > /dev/null; "$0/pg_ctl" -D "$1/data" -m fast -w stop > /dev/null 2>&1; rm -rf "$1""#,
        ])
        .arg(bin)
        .arg(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        // Its own group: a Ctrl-C meant for the bench leaves it to clean up.
        .process_group(0);
    command
        .spawn()
        .map_err(|err| format!("cannot start PostgreSQL's watchdog: {err}"))
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::{bin_dir, passwd_user, server_options, Stat};

    #[test]
    fn reads_cpu_and_parent_from_a_stat_line_with_spaces_in_the_name() {
        let line = "4242 (postgres: ferry ferry_1 127.0.0.1(5) idle) S 4200 4200 4200 0 -1 \
                    4194560 500 0 0 0 120 30 7 3 20 0 1 0 100 200000 300";
        assert_eq!(
            Stat::parse(line),
            Some(Stat {
                parent: 4200,
                own: 150,
                children: 10
            })
        );
        assert_eq!(Stat::parse("4242 (cut short) S 1"), None);
    }

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
        assert_eq!(bin_dir(root.path()), Ok(root.path().join("15/bin")));
        let empty = tempfile::tempdir().expect("a temporary directory");
        assert!(bin_dir(empty.path())
            .unwrap_err()
            .contains("apt-get install postgresql"));
        assert!(bin_dir(Path::new("/nonexistent/pg")).is_err());
    }

    #[test]
    fn the_server_listens_on_loopback_only_with_room_for_a_fleet() {
        let options = server_options(Path::new("/tmp/pg"), 5433);
        assert!(options.contains("listen_addresses=127.0.0.1 -p 5433 -k /tmp/pg"));
        assert!(options.contains("max_connections=200"));
    }
}
