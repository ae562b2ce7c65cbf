//! `ferry-relay`: parses flags, binds the listener and runs the relay.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use ferry_relay::{Config, Token};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

/// Ferry's public relay: gives each `ferry http` client a subdomain and
/// forwards the requests that arrive there through the client's tunnel.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Address to serve plain HTTP on.
    #[arg(long, env = "FERRY_RELAY_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Domain whose subdomains are tunnels: NAME.DOMAIN is tunnel NAME.
    #[arg(long, env = "FERRY_RELAY_DOMAIN", default_value = "localhost")]
    domain: String,
    /// A token clients and API callers must present (repeatable). Without
    /// any token the relay is open to everyone who can reach it.
    #[arg(
        long = "token",
        env = "FERRY_RELAY_TOKEN",
        hide_env_values = true,
        value_delimiter = ','
    )]
    tokens: Vec<String>,
    /// A file of tokens, one per line; blank lines and `#` comments are skipped.
    #[arg(long, env = "FERRY_RELAY_TOKENS_FILE")]
    tokens_file: Option<PathBuf>,
    /// Seconds a tunnel may take to answer a public request before the
    /// caller gets 504.
    #[arg(long, env = "FERRY_RELAY_REQUEST_TIMEOUT", value_name = "SECONDS",
          default_value_t = Config::DEFAULT_REQUEST_TIMEOUT.as_secs(),
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    request_timeout: u64,
    /// Public requests one tunnel may have in flight; more get 503.
    #[arg(long, env = "FERRY_RELAY_MAX_REQUESTS_PER_TUNNEL", value_name = "N",
          default_value_t = Config::DEFAULT_MAX_REQUESTS_PER_TUNNEL,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=100_000))]
    max_requests_per_tunnel: usize,
}

fn config(args: &Args) -> Result<Config, String> {
    let domain = args
        .domain
        .trim()
        .trim_end_matches('.')
        .to_ascii_lowercase();
    if domain.is_empty()
        || !domain
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
    {
        return Err(format!(
            "--domain `{}` is not a domain name such as relay.example.com",
            args.domain
        ));
    }
    let mut tokens: Vec<Token> = args
        .tokens
        .iter()
        .filter(|t| !t.is_empty())
        .map(Token::new)
        .collect();
    if let Some(path) = &args.tokens_file {
        let text = std::fs::read_to_string(path)
            .map_err(|err| format!("cannot read --tokens-file {}: {err}", path.display()))?;
        tokens.extend(
            text.lines()
                .map(str::trim)
                .filter(|line| !line.is_empty() && !line.starts_with('#'))
                .map(Token::new),
        );
        if tokens.is_empty() {
            return Err(format!("--tokens-file {} holds no token", path.display()));
        }
    }
    Ok(Config {
        domain,
        tokens,
        request_timeout: Duration::from_secs(args.request_timeout),
        max_requests_per_tunnel: args.max_requests_per_tunnel,
        keepalive: ferry_common::handshake::Keepalive::default(),
    })
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();
    let config = match config(&args) {
        Ok(config) => config,
        Err(message) => clap::Error::raw(
            clap::error::ErrorKind::ValueValidation,
            format!("{message}\n"),
        )
        .exit(),
    };
    let listener = match TcpListener::bind(args.listen).await {
        Ok(listener) => listener,
        Err(err) => {
            eprintln!("error: cannot listen on {}: {err}", args.listen);
            return ExitCode::FAILURE;
        }
    };
    let port = listener
        .local_addr()
        .map_or(args.listen.port(), |a| a.port());
    println!("ferry-relay serving http://{}:{port}", config.domain);
    println!("tunnels at http://NAME.{}:{port}", config.domain);
    if config.tokens.is_empty() {
        println!("no tokens configured: any client that can reach this relay may open a tunnel");
    }
    let shutdown = CancellationToken::new();
    let on_signal = shutdown.clone();
    tokio::spawn(async move {
        ferry_relay::shutdown::signal().await;
        tracing::info!("shutting down");
        on_signal.cancel();
    });
    match ferry_relay::run(config, listener, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}
