//! The TCP tunnels Ferry is measured against (`--peers`): bore and
//! rathole, installed once with cargo into a cache folder outside the
//! repository, each run as its own server and client processes on
//! 127.0.0.1 in front of the same origin as Ferry.

use std::ffi::OsString;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use crate::procs::Proc;

/// bore's control port: fixed, bore has no flag for it.
const BORE_CONTROL_PORT: u16 = 7835;
/// How long a tunnel may take to forward its first request.
const READY_WAIT: Duration = Duration::from_secs(60);
/// How long to wait between two probes while a tunnel comes up.
const READY_POLL: Duration = Duration::from_millis(5);
/// The token rathole's server and client share for the one service.
const RATHOLE_TOKEN: &str = "ferry-bench";

/// A tunnel Ferry is compared with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    /// bore (crate `bore-cli`): a plain TCP tunnel, a connection per
    /// forwarded connection.
    Bore,
    /// rathole over its WebSocket transport, as Ferry's tunnel rides one.
    Rathole,
}

impl Peer {
    /// Both, in the order their rows appear.
    pub const ALL: [Peer; 2] = [Peer::Bore, Peer::Rathole];

    /// Its name in the rows.
    pub fn name(self) -> &'static str {
        match self {
            Peer::Bore => "bore",
            Peer::Rathole => "rathole",
        }
    }

    /// The `cargo install` arguments that put it under `root`.
    fn install_args(self, root: &Path) -> Vec<String> {
        let mut args: Vec<String> = match self {
            Peer::Bore => ["install", "--locked", "bore-cli", "--version", "^0.6"]
                .map(str::to_owned)
                .to_vec(),
            // Its lockfile pins a `time` that no longer compiles, so not
            // `--locked`. 0.5's WebSocket transport needs its native-tls
            // feature (rustls came after 0.5): OpenSSL's headers.
            Peer::Rathole => [
                "install",
                "rathole",
                "--version",
                "^0.5",
                "--no-default-features",
                "--features",
                "server,client,websocket",
            ]
            .map(str::to_owned)
            .to_vec(),
        };
        args.extend(["--root".to_owned(), root.display().to_string()]);
        args
    }

    /// Its installation folder under the cache.
    fn root(self, cache: &Path) -> PathBuf {
        cache.join(self.name())
    }

    /// Its binary under the cache.
    fn binary(self, cache: &Path) -> PathBuf {
        let name = match self {
            Peer::Bore => "bore",
            Peer::Rathole => "rathole",
        };
        self.root(cache).join("bin").join(name)
    }
}

/// Where the peers are installed: `$FERRY_BENCH_CACHE`, else
/// `$XDG_CACHE_HOME/ferry-bench/peers`, else `~/.cache/ferry-bench/peers`.
pub fn cache_dir() -> Result<PathBuf, String> {
    cache_dir_from(
        std::env::var_os("FERRY_BENCH_CACHE"),
        std::env::var_os("XDG_CACHE_HOME"),
        std::env::var_os("HOME"),
    )
    .ok_or_else(|| "no folder to install bore and rathole into: set FERRY_BENCH_CACHE".into())
}

fn cache_dir_from(
    bench_cache: Option<OsString>,
    xdg_cache: Option<OsString>,
    home: Option<OsString>,
) -> Option<PathBuf> {
    let set = |value: Option<OsString>| value.filter(|v| !v.is_empty()).map(PathBuf::from);
    set(bench_cache)
        .or_else(|| set(xdg_cache).map(|xdg| xdg.join("ferry-bench").join("peers")))
        .or_else(|| set(home).map(|home| home.join(".cache/ferry-bench/peers")))
}

/// The peer's binary, installed into `cache` first unless it is there.
pub async fn install(peer: Peer, cache: &Path) -> Result<PathBuf, String> {
    let binary = peer.binary(cache);
    if binary.exists() {
        return Ok(binary);
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let args = peer.install_args(&peer.root(cache));
    let command = format!("{} {}", cargo.to_string_lossy(), args.join(" "));
    eprintln!(
        "installing {} into {} (once; it builds from crates.io and takes minutes): {command}",
        peer.name(),
        cache.display()
    );
    // Without the caller's target folder, cargo builds in a temporary one
    // and leaves no peer's build among Ferry's.
    let status = tokio::process::Command::new(&cargo)
        .args(&args)
        .env_remove("CARGO_TARGET_DIR")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .status()
        .await
        .map_err(|e| format!("cannot run `{command}`: {e}"))?;
    if !status.success() || !binary.exists() {
        let needs = match peer {
            Peer::Bore => "",
            Peer::Rathole => " and OpenSSL's headers (`apt-get install libssl-dev pkg-config`)",
        };
        return Err(format!(
            "`{command}` failed ({status}); its output is above. It needs crates.io once{needs}."
        ));
    }
    Ok(binary)
}

/// A free port on 127.0.0.1, for programs that take a port rather than a
/// listener: bound and released, so another process could take it in
/// between, which a failed start then reports.
pub fn free_port() -> Result<SocketAddr, String> {
    std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|listener| listener.local_addr())
        .map_err(|e| format!("cannot find a free port on 127.0.0.1: {e}"))
}

/// A running tunnel: its server and client processes and where its public
/// side listens.
pub struct Tunnel {
    /// The server side (relay).
    pub server: Proc,
    /// The client side, next to the origin.
    pub client: Proc,
    /// Where requests to the origin go in.
    pub addr: SocketAddr,
}

impl Tunnel {
    /// CPU seconds the server and the client have used so far.
    pub fn cpu_secs(&self) -> f64 {
        self.server.cpu_secs().unwrap_or(0.0) + self.client.cpu_secs().unwrap_or(0.0)
    }

    /// Stops both processes.
    pub async fn stop(self) -> Result<(), String> {
        self.client.terminate().await?;
        self.server.terminate().await
    }
}

/// Starts `peer` (installed at `binary`) in front of `origin`.
pub async fn start(peer: Peer, binary: &Path, origin: SocketAddr) -> Result<Tunnel, String> {
    match peer {
        Peer::Bore => start_bore(binary, origin).await,
        Peer::Rathole => start_rathole(binary, origin).await,
    }
}

/// The peers log at `info`, their level as shipped (bore's client prints
/// its public port at that level, and a line per connection).
const SHIPPED_LOG: &[(&str, &str)] = &[("RUST_LOG", "info"), ("NO_COLOR", "1")];

async fn start_bore(binary: &Path, origin: SocketAddr) -> Result<Tunnel, String> {
    // bore binds its control port with no way to pick another: a taken one
    // would make the client talk to whoever holds it.
    drop(
        std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, BORE_CONTROL_PORT)).map_err(|e| {
            format!(
                "bore's control port 127.0.0.1:{BORE_CONTROL_PORT} is taken ({e}): \
                 stop whatever holds it (another bore server?) and run again"
            )
        })?,
    );
    let args = ["server", "--bind-addr", "127.0.0.1"].map(str::to_owned);
    let mut server = Proc::spawn_in(binary, &args, SHIPPED_LOG, None)?;
    let control = SocketAddr::from((Ipv4Addr::LOCALHOST, BORE_CONTROL_PORT));
    server
        .accepting(control, READY_WAIT)
        .await
        .map_err(|e| format!("bore server did not start: {e}"))?;
    let args = [
        "local".to_owned(),
        origin.port().to_string(),
        "--local-host".into(),
        origin.ip().to_string(),
        "--to".into(),
        "127.0.0.1".into(),
    ];
    let mut client = Proc::spawn_in(binary, &args, SHIPPED_LOG, None)?;
    let port = client
        .wait_line("bore's public port", bore_port)
        .await
        .map_err(|e| format!("bore local: {e}"))?;
    Ok(Tunnel {
        server,
        client,
        addr: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
    })
}

/// The public port in bore's `listening at HOST:PORT` line, colored or not.
fn bore_port(line: &str) -> Option<u16> {
    let plain = strip_ansi(line);
    let (_, at) = plain.split_once("listening at ")?;
    at.trim().rsplit_once(':')?.1.parse().ok()
}

/// `text` without its terminal color sequences (`ESC [ ... m`).
fn strip_ansi(text: &str) -> String {
    let mut plain = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            plain.push(c);
        }
    }
    plain
}

/// rathole's two configuration files: a server with its control port at
/// `control` and the one service at `public`, a client forwarding that
/// service to `origin`, both over WebSocket without TLS.
fn rathole_configs(
    control: SocketAddr,
    public: SocketAddr,
    origin: SocketAddr,
) -> (String, String) {
    let transport = |side: &str| {
        format!(
            "[{side}.transport]\ntype = \"websocket\"\n\n[{side}.transport.websocket]\ntls = false\n"
        )
    };
    let server = format!(
        "[server]\nbind_addr = \"{control}\"\ndefault_token = \"{RATHOLE_TOKEN}\"\n\n{}\n\
         [server.services.bench]\nbind_addr = \"{public}\"\n",
        transport("server")
    );
    let client = format!(
        "[client]\nremote_addr = \"{control}\"\ndefault_token = \"{RATHOLE_TOKEN}\"\n\n{}\n\
         [client.services.bench]\nlocal_addr = \"{origin}\"\n",
        transport("client")
    );
    (server, client)
}

async fn start_rathole(binary: &Path, origin: SocketAddr) -> Result<Tunnel, String> {
    let dir = tempfile::Builder::new()
        .prefix("ferry-bench-rathole-")
        .tempdir()
        .map_err(|e| format!("cannot make a temporary directory: {e}"))?;
    let (control, public) = (free_port()?, free_port()?);
    let (server_toml, client_toml) = rathole_configs(control, public, origin);
    let (server_path, client_path) = (
        dir.path().join("server.toml"),
        dir.path().join("client.toml"),
    );
    for (path, text) in [(&server_path, server_toml), (&client_path, client_toml)] {
        std::fs::write(path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    let arg = |flag: &str, path: &Path| [flag.to_owned(), path.display().to_string()];
    let mut server = Proc::spawn_in(
        binary,
        &arg("--server", &server_path),
        SHIPPED_LOG,
        Some(dir),
    )?;
    server
        .accepting(control, READY_WAIT)
        .await
        .map_err(|e| format!("rathole server did not start: {e}"))?;
    let mut client = Proc::spawn_in(binary, &arg("--client", &client_path), SHIPPED_LOG, None)?;
    // The service port opens once the client has connected; it is ready
    // when a request comes back through it.
    let forwarding = async {
        while !crate::scenarios::probe(public, &origin.to_string()).await {
            for (process, side) in [(&mut server, "server"), (&mut client, "client")] {
                if let Some(status) = process.exited() {
                    return Err(format!("rathole {side} exited with {status}"));
                }
            }
            tokio::time::sleep(READY_POLL).await;
        }
        Ok(())
    };
    tokio::time::timeout(READY_WAIT, forwarding)
        .await
        .map_err(|_| format!("rathole did not forward {public} within {READY_WAIT:?}"))??;
    Ok(Tunnel {
        server,
        client,
        addr: public,
    })
}

#[cfg(test)]
mod tests {
    use std::ffi::OsString;
    use std::path::PathBuf;

    use super::{bore_port, cache_dir_from, rathole_configs};

    #[test]
    fn reads_the_public_port_from_bores_line_colored_or_not() {
        let plain =
            "2026-11-28T21:00:00.000000Z  INFO bore_cli::client: listening at 127.0.0.1:40123";
        assert_eq!(bore_port(plain), Some(40123));
        let colored = "\u{1b}[2m2026-11-28T21:00:00Z\u{1b}[0m \u{1b}[32m INFO\u{1b}[0m \
                       \u{1b}[2mbore_cli::client\u{1b}[0m\u{1b}[2m:\u{1b}[0m listening at 127.0.0.1:40124";
        assert_eq!(bore_port(colored), Some(40124));
        assert_eq!(
            bore_port("INFO bore_cli::client: connected to server remote_port=40123"),
            None
        );
    }

    #[test]
    fn the_cache_is_the_bench_variable_then_xdg_then_home() {
        let some = |s: &str| Some(OsString::from(s));
        assert_eq!(
            cache_dir_from(some("/c"), some("/x"), some("/h")),
            Some(PathBuf::from("/c"))
        );
        assert_eq!(
            cache_dir_from(some(""), some("/x"), some("/h")),
            Some(PathBuf::from("/x/ferry-bench/peers"))
        );
        assert_eq!(
            cache_dir_from(None, None, some("/h")),
            Some(PathBuf::from("/h/.cache/ferry-bench/peers"))
        );
        assert_eq!(cache_dir_from(None, None, None), None);
    }

    #[test]
    fn rathole_runs_one_service_over_websocket_without_tls() {
        let addr = |port: u16| std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let (server, client) = rathole_configs(addr(1), addr(2), addr(3));
        for (config, side) in [(&server, "server"), (&client, "client")] {
            assert!(config.contains(&format!("[{side}.transport]\ntype = \"websocket\"")));
            assert!(config.contains(&format!("[{side}.transport.websocket]\ntls = false")));
            assert!(config.contains("default_token = \"ferry-bench\""));
        }
        assert!(server.contains("[server]\nbind_addr = \"127.0.0.1:1\""));
        assert!(server.contains("[server.services.bench]\nbind_addr = \"127.0.0.1:2\""));
        assert!(client.contains("remote_addr = \"127.0.0.1:1\""));
        assert!(client.contains("[client.services.bench]\nlocal_addr = \"127.0.0.1:3\""));
    }
}
