//! `deploy/`: the systemd unit passes `systemd-analyze verify`, keeps its
//! hardening, and its `ExecStart` line starts a working relay.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The installed binary's path in the unit, replaced by the built one.
const INSTALLED: &str = "/usr/local/bin/ferry-relay";

fn deploy(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(file)
}

fn unit() -> String {
    std::fs::read_to_string(deploy("ferry-relay.service")).expect("deploy/ferry-relay.service")
}

/// Runs `systemd-analyze` with `args`, failing the test with what to install
/// when it is missing.
fn systemd_analyze(args: &[&str]) -> std::process::Output {
    Command::new("systemd-analyze")
        .args(args)
        .output()
        .unwrap_or_else(|err| {
            panic!("cannot run systemd-analyze ({err}): install Debian's `systemd` package")
        })
}

/// The unit with the built binary in place of the installed one, written
/// where `systemd-analyze` can read it.
fn built_unit(dir: &Path) -> PathBuf {
    let text = unit().replace(INSTALLED, env!("CARGO_BIN_EXE_ferry-relay"));
    let path = dir.join("ferry-relay.service");
    std::fs::write(&path, text).expect("unit written");
    path
}

#[test]
fn the_systemd_unit_verifies_cleanly_and_stays_hardened() {
    assert!(unit().contains(&format!("ExecStart={INSTALLED} ")));
    let dir = tempfile::tempdir().expect("temp dir");
    let path = built_unit(dir.path());
    let path = path.to_str().expect("UTF-8 temp path");

    // Warnings (an unknown or misspelled key) exit 0 too: none may appear.
    let verify = systemd_analyze(&["verify", path]);
    let stderr = String::from_utf8_lossy(&verify.stderr);
    assert!(verify.status.success(), "{stderr}");
    assert_eq!(stderr.trim(), "", "systemd-analyze verify warned");

    // Exposure 0 (locked down) to 10 (exposed); the unit scores 1.5, and a
    // hardening option lost would push it past 2.
    let security = systemd_analyze(&["security", "--offline=true", "--threshold=20", path]);
    assert!(
        security.status.success(),
        "{}",
        String::from_utf8_lossy(&security.stdout)
    );
}

/// The `ExecStart=` line's words.
fn exec_start() -> Vec<String> {
    let text = unit();
    let line = text
        .lines()
        .find_map(|line| line.strip_prefix("ExecStart="))
        .expect("an ExecStart= line");
    line.split_whitespace().map(str::to_owned).collect()
}

/// `deploy/relay.env`'s settings.
fn relay_env() -> Vec<(String, String)> {
    std::fs::read_to_string(deploy("relay.env"))
        .expect("deploy/relay.env")
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(|line| {
            let (key, value) = line.split_once('=').expect("KEY=VALUE");
            (key.to_owned(), value.to_owned())
        })
        .collect()
}

#[test]
fn every_setting_of_the_example_environment_file_is_a_flag() {
    let help = Command::new(env!("CARGO_BIN_EXE_ferry-relay"))
        .arg("--help")
        .output()
        .expect("ferry-relay --help runs");
    let help = String::from_utf8_lossy(&help.stdout);
    for (key, _) in relay_env() {
        assert!(
            help.contains(&format!("[env: {key}=")),
            "{key} is not a ferry-relay setting"
        );
    }
}

#[test]
fn the_units_exec_start_line_starts_a_relay_that_answers() {
    let data = tempfile::tempdir().expect("data dir");
    let config = tempfile::tempdir().expect("config dir");
    let tokens = config.path().join("tokens.toml");
    std::fs::write(
        &tokens,
        "[[account]]\nname = \"ops\"\ntokens = [\"sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08\"]\n",
    )
    .expect("tokens file written");
    let words = exec_start();
    assert_eq!(words[0], INSTALLED);
    let args: Vec<String> = words[1..]
        .iter()
        .map(|word| match word.as_str() {
            "/var/lib/ferry-relay" => data.path().display().to_string(),
            "/etc/ferry-relay/tokens.toml" => tokens.display().to_string(),
            other => other.to_owned(),
        })
        .collect();
    // The example's settings on loopback ports of the system's choosing,
    // without ACME: a relay waits for its first certificate before it serves
    // HTTP, and tests/acme.rs runs the ACME flags against pebble.
    let mut command = Command::new(env!("CARGO_BIN_EXE_ferry-relay"));
    command
        .args(&args)
        .envs(relay_env())
        .env("FERRY_RELAY_LISTEN", "127.0.0.1:0")
        .env("FERRY_RELAY_DNS_LISTEN", "127.0.0.1:0")
        .env_remove("FERRY_RELAY_TLS_LISTEN")
        .env_remove("FERRY_RELAY_ACME_EMAIL")
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut child = command.spawn().expect("ferry-relay starts");
    let stdout = child.stdout.take().expect("piped stdout");
    let said = BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .find(|line| line.starts_with("ferry-relay listening on http://"));
    let healthz = said.as_deref().and_then(|line| {
        let addr = line
            .strip_prefix("ferry-relay listening on http://")?
            .split_whitespace()
            .next()?;
        let mut stream = std::net::TcpStream::connect(addr).ok()?;
        use std::io::{Read, Write};
        stream
            .write_all(
                b"GET /healthz HTTP/1.1\r\nHost: relay.example.com\r\nConnection: close\r\n\r\n",
            )
            .ok()?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer).ok()?;
        Some(answer)
    });
    let _ = child.kill();
    let _ = child.wait();
    let said = said.expect("ferry-relay started from the unit's ExecStart line");
    let healthz = healthz.unwrap_or_default();
    assert!(healthz.starts_with("HTTP/1.1 200"), "{said}\n{healthz}");
}
