//! The processes a benchmark runs: release builds of the relay, the client
//! and the origin, each read for its readiness line and its memory.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

/// How long a process may take to print its readiness line.
const READY_WAIT: Duration = Duration::from_secs(60);
/// How long a process may take to exit after SIGTERM before it is killed.
const EXIT_WAIT: Duration = Duration::from_secs(15);
/// How long to wait between two connection attempts while a server starts.
const ACCEPT_POLL: Duration = Duration::from_millis(5);

/// The folder holding this executable and its sibling release binaries.
pub fn bin_dir() -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this executable: {e}"))?;
    let dir = exe
        .parent()
        .ok_or("this executable has no folder")?
        .to_path_buf();
    for name in ["ferry", "ferry-relay"] {
        if !dir.join(name).exists() {
            return Err(format!(
                "{} is missing: build everything first with `cargo build --release --workspace`",
                dir.join(name).display()
            ));
        }
    }
    Ok(dir)
}

/// A child process whose stdout lines are read as they come.
pub struct Proc {
    /// The child.
    child: Child,
    /// Its process id.
    pub pid: u32,
    /// Its stdout, line by line; lines are dropped when nobody reads them
    /// fast enough, so a chatty child never blocks on a full pipe.
    lines: mpsc::Receiver<String>,
    /// A directory of its own (the relay's data, the client's keys), removed
    /// when this handle drops: after the child has exited, when it was
    /// terminated.
    _scratch: Option<TempDir>,
}

impl Proc {
    /// Starts `program` with `args`.
    pub fn spawn(program: &Path, args: &[String]) -> Result<Self, String> {
        Self::start(program, args, &[], None)
    }

    /// Starts `program` with `args` and the flag `dir_flag` naming a fresh
    /// temporary directory, which lives as long as the process.
    pub fn spawn_with_dir(program: &Path, args: &[String], dir_flag: &str) -> Result<Self, String> {
        let scratch = tempfile::Builder::new()
            .prefix("ferry-bench-")
            .tempdir()
            .map_err(|e| format!("cannot make a temporary directory: {e}"))?;
        let mut args = args.to_vec();
        args.push(dir_flag.to_owned());
        args.push(scratch.path().display().to_string());
        Self::start(program, &args, &[], Some(scratch))
    }

    /// Starts `program` with `args` and the variables `env`, keeping
    /// `scratch` (its configuration, its logs) until the process has ended.
    pub fn spawn_in(
        program: &Path,
        args: &[String],
        env: &[(&str, &str)],
        scratch: Option<TempDir>,
    ) -> Result<Self, String> {
        Self::start(program, args, env, scratch)
    }

    fn start(
        program: &Path,
        args: &[String],
        env: &[(&str, &str)],
        scratch: Option<TempDir>,
    ) -> Result<Self, String> {
        let mut child = Command::new(program)
            .args(args)
            .env("RUST_LOG", "warn")
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", program.display()))?;
        let pid = child.id().ok_or("child exited at once")?;
        let stdout = child.stdout.take().ok_or("child has no stdout")?;
        let (tx, lines) = mpsc::channel(256);
        tokio::spawn(async move {
            let mut reader = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                let _ = tx.try_send(line);
            }
        });
        Ok(Self {
            child,
            pid,
            lines,
            _scratch: scratch,
        })
    }

    /// Waits for the first line `parse` accepts.
    pub async fn wait_line<T>(
        &mut self,
        what: &str,
        parse: impl Fn(&str) -> Option<T>,
    ) -> Result<T, String> {
        let wait = async {
            while let Some(line) = self.lines.recv().await {
                if let Some(value) = parse(&line) {
                    return Ok(value);
                }
            }
            Err(format!("the process ended before {what}"))
        };
        tokio::time::timeout(READY_WAIT, wait)
            .await
            .map_err(|_| format!("timed out waiting for {what}"))?
    }

    /// The exit status, once the process has ended.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Waits until `addr` accepts a connection, for servers that print no
    /// readiness line; fails as soon as the process exits (a port taken, a
    /// bad configuration).
    pub async fn accepting(&mut self, addr: SocketAddr, wait: Duration) -> Result<(), String> {
        let poll = async {
            loop {
                if TcpStream::connect(addr).await.is_ok() {
                    return Ok(());
                }
                if let Some(status) = self.exited() {
                    return Err(format!("it exited with {status}"));
                }
                tokio::time::sleep(ACCEPT_POLL).await;
            }
        };
        tokio::time::timeout(wait, poll)
            .await
            .map_err(|_| format!("{addr} accepted no connection within {wait:?}"))?
    }

    /// Sends SIGTERM and waits for the exit, killing it if it hangs.
    pub async fn terminate(mut self) -> Result<(), String> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status()
            .await;
        match tokio::time::timeout(EXIT_WAIT, self.child.wait()).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(format!("waiting for {}: {e}", self.pid)),
            Err(_) => {
                let _ = self.child.kill().await;
                Err(format!(
                    "process {} ignored SIGTERM for {EXIT_WAIT:?}",
                    self.pid
                ))
            }
        }
    }

    /// Resident memory now, in KiB.
    pub fn rss_kib(&self) -> Option<u64> {
        status_field(self.pid, "VmRSS:")
    }

    /// Peak resident memory since start or the last [`Proc::reset_peak`], in KiB.
    pub fn peak_kib(&self) -> Option<u64> {
        status_field(self.pid, "VmHWM:")
    }

    /// CPU time used so far, user and system, all threads, in seconds.
    pub fn cpu_secs(&self) -> Option<f64> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid)).ok()?;
        // The command name, in parentheses, may hold spaces: count fields
        // after it. utime and stime are fields 14 and 15 of the line.
        let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        let ticks = |i: usize| fields.get(i)?.parse::<u64>().ok();
        // Linux reports them in USER_HZ, 100 per second on every platform.
        Some((ticks(11)? + ticks(12)?) as f64 / 100.0)
    }

    /// Resets the peak resident memory to the current one (Linux
    /// `clear_refs` value 5).
    pub fn reset_peak(&self) {
        let _ = std::fs::write(format!("/proc/{}/clear_refs", self.pid), "5");
    }
}

fn status_field(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
}
