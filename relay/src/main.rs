//! `ferry-relay`: parses flags, binds the listeners and runs the relay.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::builder::TypedValueParser;
use clap::Parser;
use ferry_relay::dns::{Challenges, Zone, ZoneConfig};
use ferry_relay::egress::Allow;
use ferry_relay::proxy::ProxyProtocol;
use ferry_relay::store::postgres::Postgres;
use ferry_relay::tls::acme::{Acme, AcmeConfig};
use ferry_relay::tls::{CertResolver, TlsFiles};
use ferry_relay::{Config, Listeners, Token};
use tokio::net::{TcpListener, UdpSocket};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

/// Prints a line of the start-up banner. A reader that took what it wanted
/// and closed the pipe (`ferry-relay | head -1`, a test reading the bound
/// port) must not stop the relay, as `println!` would by panicking.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// Ferry's public relay: gives each `ferry http` client a subdomain and
/// forwards the requests that arrive there through the client's tunnel.
#[derive(Parser, Debug)]
#[command(version, about, args_conflicts_with_subcommands = true)]
#[command(group = clap::ArgGroup::new("certificate").args(["tls_cert", "dev_tls", "acme_email"]))]
struct Args {
    /// A helper instead of the relay.
    #[command(subcommand)]
    command: Option<Helper>,
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
    /// A file of tokens: one per line (blank lines and `#` comments are
    /// skipped), or TOML naming accounts with their token hashes, reserved
    /// subdomains, tunnel limit and admin flag. Reloaded when it changes.
    #[arg(long, env = "FERRY_RELAY_TOKENS_FILE")]
    tokens_file: Option<PathBuf>,
    /// How often --tokens-file is checked for changes; a removed token
    /// stops working, and its tunnels end, within it.
    #[arg(long, env = "FERRY_RELAY_TOKENS_FILE_CHECK", value_name = "DURATION",
          default_value = "2s", value_parser = duration)]
    tokens_file_check: Duration,
    /// Serve without tokens on an address other than loopback: anyone who
    /// can reach the relay may open tunnels and read every log.
    #[arg(long, env = "FERRY_RELAY_ALLOW_ANONYMOUS")]
    allow_anonymous: bool,
    /// How long a tunnel may take to answer a public request before the
    /// caller gets 504 (30s, 2m, …).
    #[arg(long, env = "FERRY_RELAY_REQUEST_TIMEOUT", value_name = "DURATION",
          default_value = "2m", value_parser = duration)]
    request_timeout: Duration,
    /// Public requests one tunnel may have in flight; more get 503.
    #[arg(long, env = "FERRY_RELAY_MAX_REQUESTS_PER_TUNNEL", value_name = "N",
          default_value_t = Config::DEFAULT_MAX_REQUESTS_PER_TUNNEL,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new()
              .range(1..=Config::MAX_REQUESTS_PER_TUNNEL_LIMIT as u64))]
    max_requests_per_tunnel: usize,
    /// Public requests one caller address (an IPv6 /64) may have in flight on
    /// one tunnel; more get 429, so one caller cannot starve the others.
    #[arg(long, env = "FERRY_RELAY_MAX_REQUESTS_PER_IP", value_name = "N",
          default_value_t = Config::DEFAULT_MAX_REQUESTS_PER_IP,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=100_000))]
    max_requests_per_ip: usize,
    /// Tunnels one token may hold at once; more are refused with 429.
    #[arg(long, env = "FERRY_RELAY_MAX_TUNNELS_PER_TOKEN", value_name = "N",
          default_value_t = Config::DEFAULT_MAX_TUNNELS_PER_TOKEN,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=100_000))]
    max_tunnels_per_token: usize,
    /// Tunnels the relay holds at once, for everybody; more get 503.
    #[arg(long, env = "FERRY_RELAY_MAX_TUNNELS", value_name = "N",
          default_value_t = Config::DEFAULT_MAX_TUNNELS,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1_000_000))]
    max_tunnels: usize,
    /// Tunnel connects one address may make per minute; more get 429.
    #[arg(long, env = "FERRY_RELAY_CONNECTS_PER_MINUTE", value_name = "N",
          default_value_t = Config::DEFAULT_CONNECTS_PER_MINUTE,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    connects_per_minute: u32,
    /// Wrong tokens one address may present per minute; beyond, its
    /// requests get 429 without a check.
    #[arg(long, env = "FERRY_RELAY_FAILED_AUTHS_PER_MINUTE", value_name = "N",
          default_value_t = Config::DEFAULT_FAILED_AUTHS_PER_MINUTE,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    failed_auths_per_minute: u32,
    /// How long a subdomain stays its owner's after the session ends (7d, 12h, …).
    #[arg(long, env = "FERRY_RELAY_NAME_HOLD", value_name = "DURATION",
          default_value = "7d", value_parser = duration)]
    name_hold: Duration,
    /// How long a public caller may pause while sending a request body; after
    /// it, the body must also average --body-min-rate.
    #[arg(long, env = "FERRY_RELAY_BODY_TIMEOUT", value_name = "DURATION",
          default_value = "30s", value_parser = duration)]
    body_timeout: Duration,
    /// The slowest average rate a request body may arrive at, per second (1KiB, …).
    #[arg(long, env = "FERRY_RELAY_BODY_MIN_RATE", value_name = "SIZE",
          default_value = "1KiB", value_parser = size)]
    body_min_rate: u64,
    /// How long a connection may take to send its first request's headers,
    /// counted from accept.
    #[arg(long, env = "FERRY_RELAY_HEADER_TIMEOUT", value_name = "DURATION",
          default_value = "30s", value_parser = duration)]
    header_timeout: Duration,
    /// How long a public connection with no request in flight stays open.
    #[arg(long, env = "FERRY_RELAY_IDLE_TIMEOUT", value_name = "DURATION",
          default_value = "2m", value_parser = duration)]
    idle_timeout: Duration,
    /// How long a write to a public caller may stay blocked (a caller that
    /// stopped reading) before its connection is closed.
    #[arg(long, env = "FERRY_RELAY_WRITE_TIMEOUT", value_name = "DURATION",
          default_value = "10s", value_parser = duration)]
    write_timeout: Duration,
    /// Public requests one tunnel may take per second, in bursts of up to
    /// five seconds' worth; one caller address may take half of that. More
    /// get 429 with Retry-After.
    #[arg(long, env = "FERRY_RELAY_MAX_REQUESTS_PER_SECOND", value_name = "N",
          default_value_t = Config::DEFAULT_MAX_REQUESTS_PER_SECOND,
          value_parser = clap::value_parser!(u32).range(1..))]
    max_requests_per_second: u32,
    /// Public requests one caller address (an IPv6 /64) may make per second
    /// on one tunnel, in bursts of up to five seconds' worth; more get 429
    /// with Retry-After. Defaults to half of --max-requests-per-second.
    #[arg(long, env = "FERRY_RELAY_MAX_REQUESTS_PER_SECOND_PER_IP", value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..))]
    max_requests_per_second_per_ip: Option<u32>,
    /// The largest request body a public caller may send through a tunnel
    /// (100MiB, 1GiB, …); larger ones get 413.
    #[arg(long, env = "FERRY_RELAY_MAX_BODY_SIZE", value_name = "SIZE",
          default_value = "100MiB", value_parser = size)]
    max_body_size: u64,
    /// Public connections open at once; beyond it the relay stops accepting
    /// until one closes.
    #[arg(long, env = "FERRY_RELAY_MAX_CONNECTIONS", value_name = "N",
          default_value_t = Config::DEFAULT_MAX_CONNECTIONS,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=10_000_000))]
    max_connections: usize,
    /// Public connections one address (an IPv6 /64) may hold open; more are
    /// closed at once.
    #[arg(long, env = "FERRY_RELAY_MAX_CONNECTIONS_PER_IP", value_name = "N",
          default_value_t = Config::DEFAULT_MAX_CONNECTIONS_PER_IP,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=10_000_000))]
    max_connections_per_ip: usize,
    /// Where the activity log's database and the relay's lock file live;
    /// created if missing.
    #[arg(long, env = "FERRY_RELAY_DATA_DIR", value_name = "DIR",
          default_value = Config::DEFAULT_DATA_DIR)]
    data_dir: PathBuf,
    /// A PostgreSQL database (postgres://USER:PASSWORD@HOST:PORT/DATABASE)
    /// that several relays share: the activity log, names, webhooks and the
    /// delivery queue live there instead of in DATA_DIR's SQLite file.
    #[arg(
        long,
        env = "FERRY_RELAY_DATABASE_URL",
        value_name = "URL",
        hide_env_values = true
    )]
    database_url: Option<String>,
    /// A PEM file of CA certificates to trust for TLS to --database-url,
    /// besides the public roots: for a database whose certificate a
    /// private CA signed. TLS is used as the URL's sslmode says (prefer by
    /// default); the certificate is always verified.
    #[arg(
        long,
        env = "FERRY_RELAY_DATABASE_CA",
        value_name = "FILE",
        requires = "database_url"
    )]
    database_ca: Option<PathBuf>,
    /// Where this relay takes the requests that the other relays of its
    /// fleet (relays sharing --database-url) forward to the tunnels it
    /// serves: HTTP/2 without TLS, for the fleet's private network only.
    /// Needs --advertise-url and --cluster-secret.
    #[arg(long, env = "FERRY_RELAY_CLUSTER_LISTEN", value_name = "ADDR")]
    cluster_listen: Option<SocketAddr>,
    /// The URL at which the fleet's other relays reach --cluster-listen,
    /// such as http://10.0.0.2:7070.
    #[arg(long, env = "FERRY_RELAY_ADVERTISE_URL", value_name = "URL")]
    advertise_url: Option<String>,
    /// The secret every relay of the fleet shares (at least 16 characters):
    /// a forwarded request without it gets 401.
    #[arg(
        long,
        env = "FERRY_RELAY_CLUSTER_SECRET",
        value_name = "SECRET",
        hide_env_values = true
    )]
    cluster_secret: Option<String>,
    /// How long a relay's hold on its tunnels' names lasts without a
    /// heartbeat (renewed every third of it): a relay that dies loses its
    /// names, and its clients may reconnect elsewhere, after it.
    #[arg(long, env = "FERRY_RELAY_CLUSTER_LEASE", value_name = "DURATION",
          default_value = "10s", value_parser = duration)]
    cluster_lease: Duration,
    /// Requests for tunnel names that no relay of the fleet serves one
    /// caller address may make per minute (each costs a query on the
    /// shared database); beyond it, its requests for names this relay does
    /// not serve get 429.
    #[arg(long, env = "FERRY_RELAY_UNKNOWN_NAMES_PER_MINUTE", value_name = "N",
          default_value_t = ferry_relay::config::Cluster::DEFAULT_UNKNOWN_NAMES_PER_MINUTE,
          value_parser = clap::value_parser!(u32).range(1..))]
    unknown_names_per_minute: u32,
    /// Connections one address (an IPv6 /64) may hold open at once on
    /// --cluster-listen (which holds 1024 in all); more are closed at once.
    /// Each other relay needs one or a few: raise it when many relays reach
    /// this one from one address (behind NAT, or in one IPv6 /64).
    #[arg(long, env = "FERRY_RELAY_CLUSTER_CONNECTIONS_PER_IP", value_name = "N",
          default_value_t = ferry_relay::config::Cluster::DEFAULT_MAX_CONNECTIONS_PER_IP,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1024))]
    cluster_connections_per_ip: usize,
    /// How long a new connection to --cluster-listen may take to send a
    /// request with the fleet's secret before it is closed.
    #[arg(long, env = "FERRY_RELAY_CLUSTER_FIRST_REQUEST_TIMEOUT", value_name = "DURATION",
          default_value = "10s", value_parser = duration)]
    cluster_first_request_timeout: Duration,
    /// Whether the activity log records the requests that pass through
    /// tunnels. `off` records none (a held name's callers still get 503,
    /// unrecorded; replays made through the API are still logged): for
    /// measuring what capture costs, and for operators who want no log.
    #[arg(long, env = "FERRY_RELAY_CAPTURE", value_name = "on|off", default_value = "on",
          action = clap::ArgAction::Set,
          value_parser = clap::builder::PossibleValuesParser::new(["on", "off"])
              .map(|value| value == "on"))]
    capture: bool,
    /// Body bytes the activity log keeps of each request and each response
    /// (1MiB, 64KiB, …); the rest streams through uncaptured and the entry
    /// is flagged truncated. 0 keeps metadata only.
    #[arg(long, env = "FERRY_RELAY_CAPTURE_BODY_LIMIT", value_name = "SIZE",
          default_value = "1MiB", value_parser = size_or_zero)]
    capture_body_limit: u64,
    /// How long the activity log keeps an entry (7d, 12h, …).
    #[arg(long, env = "FERRY_RELAY_RETENTION_MAX_AGE", value_name = "DURATION",
          default_value = "7d", value_parser = duration)]
    retention_max_age: Duration,
    /// How much the whole activity log may hold; the oldest entries go
    /// beyond it.
    #[arg(long, env = "FERRY_RELAY_RETENTION_MAX_BYTES", value_name = "SIZE",
          default_value = "1GiB", value_parser = size)]
    retention_max_bytes: u64,
    /// How much of the activity log one account may hold; its own oldest
    /// entries go beyond it, so one flooded tunnel cannot evict everyone's
    /// history. Defaults to a quarter of --retention-max-bytes.
    #[arg(long, env = "FERRY_RELAY_RETENTION_MAX_BYTES_PER_ACCOUNT", value_name = "SIZE",
          value_parser = size)]
    retention_max_bytes_per_account: Option<u64>,
    /// Worker threads. One serves a small team best; raise it on a machine
    /// with cores to spare for many busy tunnels.
    #[arg(long, env = "FERRY_RELAY_THREADS", default_value_t = 1,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1024))]
    threads: usize,
    /// Address to serve HTTPS on; needs --tls-cert and --tls-key, or
    /// --dev-tls. Public URLs then use https.
    #[arg(long, env = "FERRY_RELAY_TLS_LISTEN", requires = "certificate")]
    tls_listen: Option<SocketAddr>,
    /// PEM certificate chain for DOMAIN and *.DOMAIN, reloaded when the file
    /// changes.
    #[arg(long, env = "FERRY_RELAY_TLS_CERT", requires_all = ["tls_listen", "tls_key"])]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert, reloaded with it.
    #[arg(long, env = "FERRY_RELAY_TLS_KEY", requires_all = ["tls_listen", "tls_cert"])]
    tls_key: Option<PathBuf>,
    /// Serve HTTPS for trying it locally: a local CA and a certificate for
    /// DOMAIN and its subdomains, made in DATA_DIR/dev-tls on first use and
    /// kept. Prints how to trust the CA. HTTPS is on --tls-listen, by default
    /// 127.0.0.1:8443.
    #[arg(long, env = "FERRY_RELAY_DEV_TLS", conflicts_with_all = ["tls_cert", "tls_key"])]
    dev_tls: bool,
    /// Get the certificate for DOMAIN and *.DOMAIN from an ACME CA (Let's
    /// Encrypt unless --acme-directory says otherwise), registering an
    /// account with this contact address. Needs --tls-listen and
    /// --dns-listen: the wildcard is proven by DNS-01, which the relay
    /// answers itself. Account, certificate and key live in DATA_DIR/acme,
    /// or with --database-url in the fleet's database, where one relay
    /// orders at a time and any relay's --dns-listen answers the CA; the
    /// certificate is renewed before it expires.
    #[arg(long, env = "FERRY_RELAY_ACME_EMAIL", value_name = "EMAIL",
          requires_all = ["tls_listen", "dns_listen"],
          conflicts_with_all = ["tls_cert", "tls_key", "dev_tls"])]
    acme_email: Option<String>,
    /// The ACME server's directory URL.
    #[arg(long, env = "FERRY_RELAY_ACME_DIRECTORY", value_name = "URL",
          default_value = ferry_relay::tls::acme::LETS_ENCRYPT, requires = "acme_email")]
    acme_directory: String,
    /// Use Let's Encrypt's staging server: untrusted certificates, for
    /// trying the setup without meeting the production rate limits.
    #[arg(
        long,
        env = "FERRY_RELAY_ACME_STAGING",
        requires = "acme_email",
        conflicts_with = "acme_directory"
    )]
    acme_staging: bool,
    /// A PEM file of CA certificates to trust for the ACME server's own
    /// HTTPS, besides the public roots: for a private ACME server.
    #[arg(
        long,
        env = "FERRY_RELAY_ACME_CA",
        value_name = "FILE",
        requires = "acme_email"
    )]
    acme_ca: Option<PathBuf>,
    /// How long before expiry the certificate is renewed (at most a third
    /// of its lifetime).
    #[arg(long, env = "FERRY_RELAY_ACME_RENEW_BEFORE", value_name = "DURATION",
          default_value = "30d", value_parser = duration, requires = "acme_email")]
    acme_renew_before: Duration,
    /// The CA domain the zone's CAA record allows to issue certificates
    /// for DOMAIN. Defaults to letsencrypt.org with Let's Encrypt's
    /// directories, and to no CAA record (any CA) with another directory.
    #[arg(
        long,
        env = "FERRY_RELAY_ACME_CAA",
        value_name = "CA_DOMAIN",
        requires = "dns_listen"
    )]
    acme_caa: Option<String>,
    /// Address to answer DNS on, over UDP and TCP (port 53 in production),
    /// authoritatively for DOMAIN: A/AAAA for DOMAIN and *.DOMAIN from
    /// --public-ip, SOA, NS, CAA and ACME challenges. Delegate DOMAIN to
    /// it with an NS record.
    #[arg(
        long,
        env = "FERRY_RELAY_DNS_LISTEN",
        value_name = "ADDR",
        requires = "public_ips"
    )]
    dns_listen: Option<SocketAddr>,
    /// The relay's public address, for its A and AAAA records (repeatable:
    /// one IPv4 and one IPv6 address, say).
    #[arg(
        long = "public-ip",
        env = "FERRY_RELAY_PUBLIC_IP",
        value_name = "IP",
        value_delimiter = ',',
        requires = "dns_listen"
    )]
    public_ips: Vec<std::net::IpAddr>,
    /// The name server's own name, as the zone's NS and SOA records name it.
    /// Defaults to ns.DOMAIN, which the zone resolves to --public-ip; the
    /// parent zone then needs a glue record for it.
    #[arg(
        long,
        env = "FERRY_RELAY_DNS_NAME",
        value_name = "NAME",
        requires = "dns_listen"
    )]
    dns_name: Option<String>,
    /// A network (10.0.0.0/8, fd00::/8), address or host name that replays
    /// and webhook deliveries may reach although it is private, loopback or
    /// otherwise not public (repeatable). A host name is trusted whatever
    /// it resolves to.
    #[arg(
        long = "egress-allow",
        env = "FERRY_RELAY_EGRESS_ALLOW",
        value_name = "CIDR|HOST",
        value_delimiter = ','
    )]
    egress_allow: Vec<Allow>,
    /// A load balancer or HTTP proxy in front of the relay (a network such
    /// as 10.0.0.0/8, or an address; repeatable) that may name the caller:
    /// with a PROXY protocol v1/v2 header opening its connection, else with
    /// X-Forwarded-For. Everyone else's PROXY header is a bad request and
    /// their forwarding headers are dropped.
    #[arg(
        long = "trusted-proxy",
        env = "FERRY_RELAY_TRUSTED_PROXY",
        value_name = "CIDR",
        value_delimiter = ',',
        value_parser = network
    )]
    trusted_proxies: Vec<ipnet::IpNet>,
    /// Whether a trusted proxy must open each connection with a PROXY
    /// header: `optional` (an HTTP proxy's X-Forwarded-For is believed
    /// without one) or `required` (for a TCP load balancer that sends one:
    /// a connection without it is refused, and X-Forwarded-For is never
    /// believed). `required` needs `--trusted-proxy`: it applies to no one
    /// else.
    #[arg(long, env = "FERRY_RELAY_PROXY_PROTOCOL", value_name = "optional|required",
          default_value = "optional", value_parser = proxy_protocol,
          requires_if("required", "trusted_proxies"))]
    proxy_protocol: ProxyProtocol,
    /// How long one webhook delivery attempt may take, response included.
    #[arg(long, env = "FERRY_RELAY_DISPATCH_TIMEOUT", value_name = "DURATION",
          default_value = "15s", value_parser = duration)]
    dispatch_timeout: Duration,
    /// Webhook delivery attempts in flight at once, for all webhooks.
    #[arg(long, env = "FERRY_RELAY_DISPATCH_CONCURRENCY", default_value_t = ferry_relay::dispatch::Settings::DEFAULT_CONCURRENCY,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=10_000))]
    dispatch_concurrency: usize,
    /// Delivery attempts in flight at once for one webhook (an ordered
    /// webhook has one).
    #[arg(long, env = "FERRY_RELAY_DISPATCH_PER_WEBHOOK", default_value_t = ferry_relay::dispatch::Settings::DEFAULT_PER_WEBHOOK,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=10_000))]
    dispatch_per_webhook: usize,
    /// Delivery attempts in flight at once for one account's webhooks, so
    /// that one account's slow receivers leave room for others'.
    #[arg(long, env = "FERRY_RELAY_DISPATCH_PER_ACCOUNT", default_value_t = ferry_relay::dispatch::Settings::DEFAULT_PER_ACCOUNT,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=10_000))]
    dispatch_per_account: usize,
    /// Pending deliveries one account may have; its events beyond get 429
    /// until receivers catch up.
    #[arg(long, env = "FERRY_RELAY_MAX_PENDING_DELIVERIES", default_value_t = ferry_relay::dispatch::Settings::DEFAULT_MAX_PENDING,
          value_parser = clap::value_parser!(u64).range(1..=100_000_000))]
    max_pending_deliveries: u64,
    /// The waits before each delivery attempt, comma-separated: the number
    /// of waits is the number of attempts. Each gets up to a tenth of
    /// jitter.
    #[arg(
        long,
        env = "FERRY_RELAY_RETRY_SCHEDULE",
        value_name = "WAITS",
        default_value = "0,5s,5m,30m,2h,5h,10h,10h"
    )]
    retry_schedule: ferry_relay::dispatch::schedule::RetrySchedule,
    /// A webhook whose deliveries have only failed for this long is
    /// disabled.
    #[arg(long, env = "FERRY_RELAY_DISABLE_AFTER", value_name = "DURATION",
          default_value = "5d", value_parser = duration)]
    disable_after: Duration,
    /// An event type to offer besides the built-in ones, as
    /// NAME=DESCRIPTION (repeatable).
    #[arg(long = "event-type", env = "FERRY_RELAY_EVENT_TYPE", value_name = "NAME=DESCRIPTION",
          value_parser = event_type)]
    event_types: Vec<(String, String)>,
}

/// What `ferry-relay` can do besides relaying.
#[derive(clap::Subcommand, Debug)]
enum Helper {
    /// Reads a token from standard input (or asks for it) and prints its
    /// hash, `sha256:…`, for a TOML --tokens-file.
    HashToken,
    /// Prints a new random token and, on the next line, its hash.
    NewToken,
}

/// Turns off the terminal's echo on standard input until dropped, so that
/// a token typed in is not shown.
struct Unechoed(Option<libc::termios>);

impl Unechoed {
    fn start() -> Self {
        // SAFETY: termios is plain data that tcgetattr fills; both calls only
        // read and set the terminal's attributes of descriptor 0.
        unsafe {
            let mut attributes: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(libc::STDIN_FILENO, &mut attributes) != 0 {
                return Self(None);
            }
            let saved = attributes;
            attributes.c_lflag &= !libc::ECHO;
            if libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &attributes) != 0 {
                return Self(None);
            }
            Self(Some(saved))
        }
    }
}

impl Drop for Unechoed {
    fn drop(&mut self) {
        if let Some(saved) = &self.0 {
            // SAFETY: restores the attributes read in `start`.
            unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, saved) };
        }
    }
}

/// Runs `helper`.
fn help_with(helper: &Helper) -> ExitCode {
    use std::io::{BufRead as _, IsTerminal as _};
    match helper {
        Helper::HashToken => {
            let stdin = std::io::stdin();
            let quiet = stdin.is_terminal().then(|| {
                eprint!("token (not shown; Enter ends it): ");
                Unechoed::start()
            });
            let mut line = String::new();
            let read = stdin.lock().read_line(&mut line);
            if quiet.is_some() {
                eprintln!();
            }
            if let Err(err) = read {
                eprintln!("error: cannot read the token from standard input: {err}");
                return ExitCode::FAILURE;
            }
            let token = line.trim();
            if token.is_empty() {
                eprintln!("error: no token given: pipe it in, as in `printf %s \"$TOKEN\" | ferry-relay hash-token`");
                return ExitCode::FAILURE;
            }
            say!("{}", ferry_relay::accounts::TokenHash::of(token));
        }
        Helper::NewToken => {
            use ring::rand::SecureRandom as _;
            let mut secret = [0u8; 32];
            if ring::rand::SystemRandom::new().fill(&mut secret).is_err() {
                eprintln!("error: the system's random source failed");
                return ExitCode::FAILURE;
            }
            let token: String = secret.iter().map(|b| format!("{b:02x}")).collect();
            let token = format!("ferry_{token}");
            say!("{token}");
            say!("{}", ferry_relay::accounts::TokenHash::of(&token));
        }
    }
    ExitCode::SUCCESS
}

/// An `--event-type` flag: `NAME=DESCRIPTION`.
fn event_type(text: &str) -> Result<(String, String), String> {
    let (name, description) = text
        .split_once('=')
        .ok_or("write it as NAME=DESCRIPTION, such as invoice.paid=An invoice was paid")?;
    ferry_relay::dispatch::catalogue::check_name(name.trim())?;
    Ok((name.trim().to_owned(), description.trim().to_owned()))
}

/// The longest duration a flag takes: ten years, far below where adding it
/// to a clock reading would overflow.
const LONGEST: Duration = Duration::from_secs(10 * 365 * 86_400);

/// A duration flag, with units.
fn duration(text: &str) -> Result<Duration, String> {
    let value = ferry_common::units::parse_duration(text)?;
    if value.is_zero() || value > LONGEST {
        return Err("must be more than zero and at most 10 years".to_owned());
    }
    Ok(value)
}

/// A size flag, with units.
fn size(text: &str) -> Result<u64, String> {
    match ferry_common::units::parse_size(text)? {
        0 => Err("must be more than zero".to_owned()),
        value => Ok(value),
    }
}

/// A network, or one address as a network of one.
fn network(text: &str) -> Result<ipnet::IpNet, String> {
    text.parse::<ipnet::IpNet>()
        .or_else(|_| text.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
        .map_err(|_| {
            format!("`{text}` is not a network or address: write it like 10.0.0.0/8 or 192.0.2.7")
        })
}

/// `--proxy-protocol`'s value.
fn proxy_protocol(text: &str) -> Result<ProxyProtocol, String> {
    match text {
        "optional" => Ok(ProxyProtocol::Optional),
        "required" => Ok(ProxyProtocol::Required),
        _ => Err(format!("`{text}` is not `optional` or `required`")),
    }
}

/// A size flag that may be zero.
fn size_or_zero(text: &str) -> Result<u64, String> {
    ferry_common::units::parse_size(text)
}

/// Binds `addr`, saying which flag it came from when it fails.
async fn bind(addr: SocketAddr, flag: &str) -> Result<TcpListener, String> {
    TcpListener::bind(addr)
        .await
        .map_err(|err| format!("cannot listen on {addr} (--{flag}): {err}"))
}

/// Where `--dev-tls` serves HTTPS without `--tls-listen`.
const DEV_TLS_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 8443);

/// Loads the certificate and binds the listeners, then prints what is served.
async fn listeners(
    args: &Args,
    domain: &str,
    data_dir: &Path,
    acme: Option<&Acme>,
    shutdown: &CancellationToken,
) -> Result<Option<Listeners>, String> {
    let mut dev = None;
    let resolver = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => {
            let files = TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
            };
            Some(Arc::new(
                CertResolver::load(files).map_err(|err| err.to_string())?,
            ))
        }
        _ if args.dev_tls => {
            let made =
                ferry_relay::tls::dev::ensure(data_dir, domain).map_err(|err| err.to_string())?;
            let on_demand = ferry_relay::tls::dev::OnDemand::for_domain(&made, domain)
                .map_err(|err| err.to_string())?;
            let resolver = CertResolver::load(made.files())
                .map_err(|err| err.to_string())?
                .with_on_demand(on_demand);
            dev = Some(made);
            Some(Arc::new(resolver))
        }
        _ => match acme {
            Some(acme) => {
                // In a fleet, the certificate another relay got comes first.
                if let Err(err) = acme.pull().await {
                    say!("warning: {err}; ordering one if none is on disk");
                }
                // A stored certificate that has not expired is served even
                // when due: renewal happens in the background.
                let files = if acme.servable() {
                    acme.files()
                } else {
                    say!("obtaining a certificate for {domain} and *.{domain} by ACME; https and http start once it is issued");
                    let Some(files) = acme.ensure(shutdown).await else {
                        return Ok(None);
                    };
                    files
                };
                Some(Arc::new(
                    CertResolver::load(files).map_err(|err| err.to_string())?,
                ))
            }
            None => None,
        },
    };
    let tls_listen = args.tls_listen.or(args.dev_tls.then_some(DEV_TLS_LISTEN));
    let plain = bind(args.listen, "listen").await?;
    let tls = match (tls_listen, resolver) {
        (Some(addr), Some(resolver)) => Some((bind(addr, "tls-listen").await?, resolver)),
        _ => None,
    };
    let bound = |listener: &TcpListener| {
        listener
            .local_addr()
            .map_or_else(|_| "?".to_owned(), |a| a.to_string())
    };
    let port = |listener: &TcpListener| listener.local_addr().map(|a| a.port()).unwrap_or_default();
    say!(
        "ferry-relay listening on http://{} for {domain}",
        bound(&plain)
    );
    match &tls {
        Some((listener, _)) => {
            say!(
                "ferry-relay listening on https://{} for {domain}",
                bound(listener)
            );
            say!("tunnels at https://NAME.{domain}:{}", port(listener));
        }
        None => say!("tunnels at http://NAME.{domain}:{}", port(&plain)),
    }
    if let (Some(dev), Some((listener, _))) = (&dev, &tls) {
        trust_instructions(dev, domain, port(listener));
    }
    Ok(Some(Listeners {
        plain: Some(plain),
        tls,
    }))
}

/// The ACME client `--acme-email` asks for, sharing `challenges` with the
/// DNS server.
fn acme(
    args: &Args,
    domain: &str,
    data_dir: &Path,
    challenges: Challenges,
    fleet: Option<&Postgres>,
) -> Result<Option<Acme>, String> {
    let Some(email) = &args.acme_email else {
        return Ok(None);
    };
    let directory = if args.acme_staging {
        ferry_relay::tls::acme::LETS_ENCRYPT_STAGING.to_owned()
    } else {
        args.acme_directory.clone()
    };
    let config = AcmeConfig {
        domain: domain.to_owned(),
        directory,
        email: Some(email.clone()).filter(|email| !email.is_empty()),
        ca_file: args.acme_ca.clone(),
        renew_before: args.acme_renew_before,
    };
    let acme = Acme::new(config, data_dir, challenges).map_err(|err| err.to_string())?;
    Ok(Some(match fleet {
        Some(store) => acme.with_fleet(store.clone()),
        None => acme,
    }))
}

/// Binds `--dns-listen` (UDP and TCP) and builds the zone it serves.
async fn dns(
    args: &Args,
    domain: &str,
    challenges: Challenges,
) -> Result<Option<(Arc<Zone>, UdpSocket, TcpListener)>, String> {
    let Some(addr) = args.dns_listen else {
        return Ok(None);
    };
    let lets_encrypt = [
        ferry_relay::tls::acme::LETS_ENCRYPT,
        ferry_relay::tls::acme::LETS_ENCRYPT_STAGING,
    ];
    let caa_issuer = args.acme_caa.clone().or_else(|| {
        (args.acme_email.is_some()
            && (args.acme_staging || lets_encrypt.contains(&args.acme_directory.as_str())))
        .then(|| "letsencrypt.org".to_owned())
    });
    let config = ZoneConfig {
        domain: domain.to_owned(),
        ns_name: args
            .dns_name
            .clone()
            .unwrap_or_else(|| format!("ns.{domain}")),
        addresses: args.public_ips.clone(),
        caa_issuer,
        contact: args.acme_email.clone().filter(|email| email.contains('@')),
    };
    let zone = Zone::new(&config, challenges).map_err(|err| err.to_string())?;
    let dns_bind_error = |kind: &str, err: std::io::Error| {
        let mut message = format!("cannot listen on {kind} {addr} (--dns-listen): {err}");
        if err.kind() == std::io::ErrorKind::AddrInUse {
            message.push_str(&format!(
                "; another DNS server holds port {port} (on Ubuntu, systemd-resolved's stub on 127.0.0.53:53 blocks 0.0.0.0:53): bind the public address instead (--dns-listen {public}), or set DNSStubListener=no in /etc/systemd/resolved.conf and restart systemd-resolved; behind 1:1 NAT (EC2, GCE, Azure) bind the interface's own private address instead",
                port = addr.port(),
                public = config.addresses.first().map_or_else(
                    || format!("PUBLIC_IP:{}", addr.port()),
                    |ip| std::net::SocketAddr::new(*ip, addr.port()).to_string()
                ),
            ));
        }
        if err.kind() == std::io::ErrorKind::AddrNotAvailable {
            message.push_str(
                "; no interface has that address: behind 1:1 NAT (EC2, GCE, Azure) the public address is not on the machine, so bind the interface's own private address (see `ip -brief address`) instead",
            );
        }
        message
    };
    let udp = UdpSocket::bind(addr)
        .await
        .map_err(|err| dns_bind_error("udp", err))?;
    let tcp = TcpListener::bind(addr)
        .await
        .map_err(|err| dns_bind_error("tcp", err))?;
    say!("ferry-relay answering dns for {domain} on {addr} (udp and tcp)");
    say!(
        "  delegate it at the parent zone: {domain}. NS {}.",
        config.ns_name
    );
    if config.ns_name.ends_with(&format!(".{domain}")) {
        for ip in &config.addresses {
            let kind = if ip.is_ipv4() { "A" } else { "AAAA" };
            say!("  with the glue record: {}. {kind} {ip}", config.ns_name);
        }
    }
    Ok(Some((Arc::new(zone), udp, tcp)))
}

/// Prints where the development CA is and how to trust it.
fn trust_instructions(dev: &ferry_relay::tls::dev::DevTls, domain: &str, port: u16) {
    use ferry_relay::tls::dev::Made;
    let ca = dev.ca_path.display();
    let made = match dev.made {
        Made::NewCa => "made now",
        Made::NewCert => "kept; its certificate for this domain made now",
        Made::Reused => "kept from an earlier start",
    };
    say!("development CA in {ca} ({made}); trust it to use https:");
    say!("  curl --cacert {ca} https://NAME.{domain}:{port}/");
    say!("  ferry http 3000 --relay wss://{domain}:{port} --relay-ca {ca}");
    say!("  Debian/Ubuntu: sudo cp {ca} /usr/local/share/ca-certificates/ferry-dev.crt && sudo update-ca-certificates");
    say!("  browsers: import {ca} as a certificate authority (trusted to identify websites)");
}

fn config(args: &Args) -> Result<Config, String> {
    if let (Some(_), Some(url)) = (&args.acme_email, &args.database_url) {
        if !ferry_relay::store::postgres::private_link(url) {
            return Err("--acme-email with --database-url keeps the certificate's private key in the database: ask for TLS to it with sslmode=require in --database-url (Ferry always verifies the database's certificate; see --database-ca), or reach it over a Unix socket or loopback".to_owned());
        }
    }
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
    let tokens: Vec<Token> = args
        .tokens
        .iter()
        .filter(|t| !t.is_empty())
        .map(Token::new)
        .collect();
    if let Some(path) = &args.tokens_file {
        // Checked here too, so that a bad file is a usage error at start.
        ferry_relay::accounts::file::load(path)?;
    }
    let anonymous = tokens.is_empty() && args.tokens_file.is_none();
    let public = std::iter::once(args.listen)
        .chain(args.tls_listen)
        .find(|addr| !addr.ip().is_loopback());
    if let (true, Some(addr), false) = (anonymous, public, args.allow_anonymous) {
        return Err(format!(
            "this relay has no tokens and would listen on {addr}, beyond this machine: give clients tokens with --token or --tokens-file, or pass --allow-anonymous to let anyone who can reach it open tunnels"
        ));
    }
    Ok(Config {
        domain,
        tokens,
        tokens_file: args.tokens_file.clone(),
        tokens_file_check: args.tokens_file_check,
        request_timeout: args.request_timeout,
        max_requests_per_tunnel: args.max_requests_per_tunnel,
        max_requests_per_ip: args.max_requests_per_ip,
        max_requests_per_second: args.max_requests_per_second,
        max_requests_per_second_per_ip: args.max_requests_per_second_per_ip,
        max_body_size: args.max_body_size,
        max_tunnels_per_token: args.max_tunnels_per_token,
        max_tunnels: args.max_tunnels,
        connects_per_minute: args.connects_per_minute,
        failed_auths_per_minute: args.failed_auths_per_minute,
        name_hold: args.name_hold,
        body_timeout: args.body_timeout,
        body_min_rate: args.body_min_rate,
        header_timeout: args.header_timeout,
        idle_timeout: args.idle_timeout,
        write_timeout: args.write_timeout,
        max_connections: args.max_connections,
        max_connections_per_ip: args.max_connections_per_ip,
        keepalive: ferry_common::handshake::Keepalive::default(),
        trusted_proxies: args.trusted_proxies.clone(),
        proxy_protocol: args.proxy_protocol,
        egress_allow: args.egress_allow.clone(),
        data_dir: args.data_dir.clone(),
        database_url: args.database_url.clone(),
        database_ca: args.database_ca.clone(),
        cluster: cluster(args)?,
        capture: args.capture,
        capture_body_limit: usize::try_from(args.capture_body_limit)
            .ok()
            .filter(|limit| *limit <= Config::MAX_CAPTURE_BODY_LIMIT)
            .ok_or_else(|| {
                format!(
                    "--capture-body-limit may be at most {} MiB: the capture queue holds whole entries in memory",
                    Config::MAX_CAPTURE_BODY_LIMIT >> 20
                )
            })?,
        retention: ferry_relay::store::Retention {
            max_age: args.retention_max_age,
            max_bytes: args.retention_max_bytes,
            max_bytes_per_owner: args
                .retention_max_bytes_per_account
                .unwrap_or(args.retention_max_bytes / 4)
                .min(args.retention_max_bytes),
        },
        dispatch: ferry_relay::dispatch::Settings {
            timeout: args.dispatch_timeout,
            concurrency: args.dispatch_concurrency,
            per_webhook: args.dispatch_per_webhook,
            per_account: args.dispatch_per_account,
            max_pending: args.max_pending_deliveries,
            schedule: args.retry_schedule.clone(),
            disable_after: args.disable_after,
            event_types: args.event_types.clone(),
        },
    })
}

/// The fleet settings of `args`: --cluster-listen, --advertise-url and
/// --cluster-secret all or none, and only with --database-url.
fn cluster(args: &Args) -> Result<Option<ferry_relay::config::Cluster>, String> {
    let (listen, url, secret) = match (&args.cluster_listen, &args.advertise_url, &args.cluster_secret) {
        (None, None, None) => return Ok(None),
        (Some(listen), Some(url), Some(secret)) => (listen, url, secret),
        _ => {
            return Err(
                "--cluster-listen, --advertise-url and --cluster-secret go together: give all three to route requests within a fleet, or none"
                    .to_owned(),
            )
        }
    };
    if args.database_url.is_none() {
        return Err(format!(
            "--cluster-listen {listen} needs --database-url: the relays of a fleet share one PostgreSQL database"
        ));
    }
    let parsed: hyper::Uri = url
        .parse()
        .map_err(|_| format!("--advertise-url `{url}` is not a URL: use http://HOST:PORT"))?;
    if parsed.scheme_str() != Some("http")
        || parsed.port_u16().is_none()
        || parsed.path_and_query().is_some_and(|p| p.as_str() != "/")
    {
        return Err(format!(
            "--advertise-url `{url}` must be http://HOST:PORT, the address of --cluster-listen as the other relays reach it"
        ));
    }
    if secret.len() < ferry_relay::config::Cluster::MIN_SECRET_LEN
        || !secret.bytes().all(|b| b.is_ascii_graphic())
    {
        return Err(format!(
            "--cluster-secret must be at least {} printable characters without spaces: generate one with `openssl rand -hex 32`",
            ferry_relay::config::Cluster::MIN_SECRET_LEN
        ));
    }
    if args.cluster_lease < ferry_relay::config::Cluster::MIN_LEASE {
        return Err(format!(
            "--cluster-lease must be at least {} ms: a shorter lease would end live relays' leases whenever the database pauses",
            ferry_relay::config::Cluster::MIN_LEASE.as_millis()
        ));
    }
    Ok(Some(ferry_relay::config::Cluster {
        advertise_url: url.trim_end_matches('/').to_owned(),
        secret: ferry_relay::cluster::Secret::new(secret.as_str()),
        lease: args.cluster_lease,
        unknown_names_per_minute: args.unknown_names_per_minute,
        max_connections_per_ip: args.cluster_connections_per_ip,
        first_request_timeout: args.cluster_first_request_timeout,
    }))
}

/// How often the relay looks for memory to give back.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const TRIM_CHECK: std::time::Duration = std::time::Duration::from_secs(5);
/// Free memory inside the heap beyond which it is given back.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const TRIM_ABOVE: usize = 32 * 1024 * 1024;

/// Gives memory freed inside the heap back to the system. glibc's allocator
/// keeps it: 10,000 idle tunnels left about 390 MiB behind once they had all
/// closed (see BENCHMARKS.md), which `malloc_trim` returns. Checked
/// periodically, and only when enough sits free to be worth the walk.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
async fn return_free_memory(shutdown: CancellationToken) {
    let mut checks = tokio::time::interval(TRIM_CHECK);
    loop {
        tokio::select! {
            _ = checks.tick() => {}
            () = shutdown.cancelled() => return,
        }
        // SAFETY: both calls only read and adjust glibc's own allocator
        // state, and take its locks themselves.
        let free = unsafe { libc::mallinfo2() }.fordblks;
        if free > TRIM_ABOVE {
            // SAFETY: as above.
            unsafe { libc::malloc_trim(0) };
            tracing::debug!(free, "returned free memory to the system");
        }
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();
    if let Some(helper) = &args.command {
        return help_with(helper);
    }
    // One thread by default: on small machines the wake-ups between worker
    // threads cost more than a second thread brings (see BENCHMARKS.md).
    let runtime = match args.threads {
        1 => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        n => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(n)
            .enable_all()
            .build(),
    };
    match runtime {
        Ok(runtime) => runtime.block_on(serve(args)),
        Err(err) => {
            eprintln!("error: cannot start the runtime: {err}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(args: Args) -> ExitCode {
    let config = match config(&args) {
        Ok(config) => config,
        Err(message) => clap::Error::raw(
            clap::error::ErrorKind::ValueValidation,
            format!("{message}\n"),
        )
        .exit(),
    };
    let data_dir =
        std::path::absolute(&config.data_dir).unwrap_or_else(|_| config.data_dir.clone());
    let open = config.tokens.is_empty() && config.tokens_file.is_none();
    let capture = config.capture;
    let shared_database = config.database_url.is_some();
    let domain = config.domain.clone();
    // The data directory first: a relay that cannot keep its log says so
    // before it listens.
    let relay = match ferry_relay::Relay::open(config).await {
        Ok(relay) => relay,
        Err(err) => {
            eprintln!("error: {err}");
            return ExitCode::FAILURE;
        }
    };
    let shutdown = CancellationToken::new();
    let on_signal = shutdown.clone();
    tokio::spawn(async move {
        ferry_relay::shutdown::signal().await;
        // Cancel before logging: with stderr gone (a closed pipe), the
        // subscriber's report of the failed write panics this task, and a
        // cancel after it would never run.
        on_signal.cancel();
        tracing::info!("shutting down");
    });
    // DNS first: the ACME CA looks up the challenges there before the
    // first certificate exists.
    let challenges = Challenges::default();
    let dns_server = match dns(&args, &domain, challenges.clone()).await {
        Ok(dns) => dns.map(|(zone, udp, tcp)| {
            tokio::spawn(ferry_relay::dns::serve(zone, udp, tcp, shutdown.clone()))
        }),
        Err(message) => {
            eprintln!("error: {message}");
            return ExitCode::FAILURE;
        }
    };
    // In a fleet the DNS server also answers the challenges other relays
    // open, so the CA may ask any relay.
    let mirror = match (&dns_server, relay.postgres()) {
        (Some(_), Some(store)) => Some(
            ferry_relay::tls::acme::mirror(
                store.clone(),
                domain.clone(),
                challenges.clone(),
                shutdown.clone(),
            )
            .await,
        ),
        _ => None,
    };
    let acme = match acme(&args, &domain, &data_dir, challenges, relay.postgres()) {
        Ok(acme) => acme,
        Err(message) => {
            eprintln!("error: {message}");
            return ExitCode::FAILURE;
        }
    };
    let listeners = match listeners(&args, &domain, &data_dir, acme.as_ref(), &shutdown).await {
        Ok(Some(listeners)) => listeners,
        Ok(None) => return ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            return ExitCode::FAILURE;
        }
    };
    let relay = match (args.cluster_listen, &args.advertise_url) {
        (Some(addr), Some(url)) => match bind(addr, "cluster-listen").await {
            Ok(listener) => {
                let bound = listener.local_addr().map_or(addr, |a| a);
                say!("cluster listener on {bound}, advertised to the fleet as {url}");
                relay.with_cluster_listener(listener)
            }
            Err(message) => {
                eprintln!("error: {message}");
                return ExitCode::FAILURE;
            }
        },
        _ => relay,
    };
    let renewing = match (acme, &listeners.tls) {
        (Some(acme), Some((_, resolver))) => Some(tokio::spawn(
            acme.renew_until(Arc::clone(resolver), shutdown.clone()),
        )),
        _ => None,
    };
    let log_place = if shared_database {
        "the PostgreSQL database".to_owned()
    } else {
        data_dir.display().to_string()
    };
    if capture {
        say!("activity log in {log_place}");
    } else {
        say!(
            "activity log in {log_place} (capture off: requests through tunnels are not recorded)"
        );
    }
    if open && args.allow_anonymous {
        say!("warning: anonymous relay (--allow-anonymous): anyone who can reach it may open tunnels and read every log");
    } else if open {
        say!("no tokens configured: any client that can reach this relay may open a tunnel");
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    tokio::spawn(return_free_memory(shutdown.clone()));
    let result = relay.run(listeners, shutdown.clone()).await;
    shutdown.cancel();
    for task in [dns_server, renewing, mirror].into_iter().flatten() {
        if let Err(err) = task.await {
            tracing::warn!(%err, "a dns or certificate task failed");
        }
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}
