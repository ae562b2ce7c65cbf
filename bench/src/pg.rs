//! A PostgreSQL server of the bench's own for `--fleet`: Debian's
//! `postgresql`, initialised in a temporary directory and started on a
//! free port of 127.0.0.1, with a fresh database per measured setup.
//!
//! The server is [`ferry_pg_server`]'s, shared with the tests; here it is
//! stopped cleanly, and its directory removed, at [`PgServer::stop`] or
//! however the bench exits.

use ferry_pg_server::{Settings, Shutdown};

/// Room for three relays' pools and their live tails.
const SETTINGS: Settings = Settings {
    needed_by: "`--fleet` needs Debian's `postgresql` (`apt-get install postgresql`)",
    prefix: "ferry-bench-pg-",
    max_connections: 200,
    shutdown: Shutdown::Fast,
};

/// A running PostgreSQL server in a temporary directory.
pub struct PgServer(ferry_pg_server::PgServer);

impl PgServer {
    /// Initialises and starts a server; returns once it accepts connections.
    pub fn start() -> Result<Self, String> {
        ferry_pg_server::PgServer::start(&SETTINGS).map(Self)
    }

    /// Creates the empty database `name`; its URL.
    pub async fn create(&self, name: &str) -> Result<String, String> {
        let out = tokio::process::Command::from(self.0.createdb(name))
            .output()
            .await
            .map_err(|err| format!("cannot run createdb: {err}"))?;
        ferry_pg_server::check(&out, &format!("createdb {name}"))?;
        Ok(self.0.url(name))
    }

    /// CPU seconds the server has used so far: the postmaster, its live
    /// processes (one per relay connection, the writers) and those that
    /// have ended.
    pub fn cpu_secs(&self) -> f64 {
        let Some(postmaster) = std::fs::read_to_string(self.0.data().join("postmaster.pid"))
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
    pub fn stop(self) -> Result<(), String> {
        self.0.stop()
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

#[cfg(test)]
mod tests {
    use super::Stat;

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
}
