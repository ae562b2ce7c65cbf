//! The relay's settings, already validated by `main` or the embedding code.

use std::time::Duration;

use ferry_common::handshake::{
    Keepalive, CONNECTION_WINDOW, MAX_CONCURRENT_STREAMS, STREAM_WINDOW,
};

use crate::accounts::Token;
use crate::egress::Allow;
use crate::store::Retention;

/// How the relay is set up. Every limit has a default here and a flag in
/// `main`.
#[derive(Debug, Clone)]
pub struct Config {
    /// The domain tunnels are subdomains of, lowercase, without a trailing
    /// dot: `localhost` or `relay.example.com`.
    pub domain: String,
    /// Tokens that clients and API callers must present, each its own
    /// account; empty, with no [`Config::tokens_file`], means the relay is
    /// open, as suits a relay on loopback.
    pub tokens: Vec<Token>,
    /// A file of more accounts (see [`crate::accounts::file`]), read at
    /// start and again whenever it changes.
    pub tokens_file: Option<std::path::PathBuf>,
    /// How often the tokens file is checked for changes.
    pub tokens_file_check: Duration,
    /// How long a tunnel may take to answer a public request with headers
    /// before the caller gets 504.
    pub request_timeout: Duration,
    /// Public requests one tunnel may have in flight; more get 503. At most
    /// the client's HTTP/2 stream limit.
    pub max_requests_per_tunnel: usize,
    /// Public requests one caller IP (an IPv6 /64) may have in flight on one
    /// tunnel; more get 429, so one caller cannot starve the others.
    pub max_requests_per_ip: usize,
    /// Public requests one tunnel may take per second, in bursts of up to
    /// [`RATE_BURST_SECONDS`] seconds' worth; more get 429 with Retry-After.
    pub max_requests_per_second: u32,
    /// Public requests one caller address (an IPv6 /64) may make per second
    /// on one tunnel, in bursts like the tunnel's; `None` is
    /// [`share_per_ip`] of [`Config::max_requests_per_second`].
    pub max_requests_per_second_per_ip: Option<u32>,
    /// The largest request body a public caller may send through a tunnel,
    /// in bytes; larger ones get 413.
    pub max_body_size: u64,
    /// Tunnels one account may hold at once; more are refused with 429.
    pub max_tunnels_per_token: usize,
    /// Tunnels the relay holds at once, for everybody; more get 503.
    pub max_tunnels: usize,
    /// Tunnel connects one IP may make per minute; more get 429.
    pub connects_per_minute: u32,
    /// Failed token checks one IP may make per minute before its requests
    /// get 429 without a check.
    pub failed_auths_per_minute: u32,
    /// How long a name stays its owner's after its session ends.
    pub name_hold: Duration,
    /// How long a public caller may pause between parts of a request body,
    /// and the grace before [`Config::body_min_rate`] applies.
    pub body_timeout: Duration,
    /// The slowest average rate, in bytes per second, at which a request
    /// body may arrive once [`Config::body_timeout`] has passed.
    pub body_min_rate: u64,
    /// How long a connection may take to send a request's headers, from
    /// accept for its first request.
    pub header_timeout: Duration,
    /// How long a connection with no request in flight stays open.
    pub idle_timeout: Duration,
    /// How long a write to a public caller may stay blocked before the
    /// connection is closed.
    pub write_timeout: Duration,
    /// Public connections open at once; the relay stops accepting beyond.
    pub max_connections: usize,
    /// Public connections one IP (an IPv6 /64) may hold open at once.
    pub max_connections_per_ip: usize,
    /// How the relay pings each client to notice dead links.
    pub keepalive: Keepalive,
    /// Peers (load balancers, HTTP proxies) that may name the caller, with
    /// a PROXY protocol header or `X-Forwarded-For`; empty trusts none.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Whether a trusted proxy must open each connection with a PROXY
    /// header.
    pub proxy_protocol: crate::proxy::ProxyProtocol,
    /// Networks and host names the relay may send replays and deliveries
    /// to although the egress guard would refuse them (private, loopback …).
    pub egress_allow: Vec<Allow>,
    /// Where the database and the lock file live.
    pub data_dir: std::path::PathBuf,
    /// A PostgreSQL database shared with the fleet's other relays; `None`
    /// keeps everything in the SQLite file in [`Config::data_dir`].
    pub database_url: Option<String>,
    /// A PEM file of CA certificates trusted for TLS to
    /// [`Config::database_url`] besides the public roots (a private CA).
    pub database_ca: Option<std::path::PathBuf>,
    /// How this relay routes requests to the fleet's other relays on the
    /// same database; `None` serves only the tunnels it holds itself.
    pub cluster: Option<Cluster>,
    /// Whether requests through tunnels are recorded in the activity log.
    /// Off, none is (held names still answer 503, unrecorded); for
    /// measuring what capture costs, and for operators who want no log.
    pub capture: bool,
    /// Body bytes the activity log keeps per direction of an exchange; 0
    /// keeps metadata only.
    pub capture_body_limit: usize,
    /// How much history the activity log keeps.
    pub retention: Retention,
    /// How webhooks are delivered.
    pub dispatch: crate::dispatch::Settings,
}

impl Config {
    /// The default for [`Config::tokens_file_check`]: a removed token
    /// stops working within it.
    pub const DEFAULT_TOKENS_FILE_CHECK: Duration = Duration::from_secs(2);
    /// The default for [`Config::request_timeout`]: above the client's own
    /// default local timeout, so that the client's clearer 504 comes first.
    pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
    /// The default for [`Config::max_requests_per_tunnel`]: below the
    /// client's HTTP/2 stream limit, so that no request queues unseen.
    pub const DEFAULT_MAX_REQUESTS_PER_TUNNEL: usize = 1000;
    /// The most [`Config::max_requests_per_tunnel`] may be.
    pub const MAX_REQUESTS_PER_TUNNEL_LIMIT: usize = MAX_CONCURRENT_STREAMS as usize;
    /// The default for [`Config::max_requests_per_ip`]: few enough that one
    /// caller's stalled responses cannot fill the tunnel's flow-control
    /// window, which would stall everyone else's (see the check below).
    pub const DEFAULT_MAX_REQUESTS_PER_IP: usize = 32;
    /// The default for [`Config::max_requests_per_second`]: far above what
    /// webhook senders and a developer's browser send, low enough that a
    /// flood cannot keep a developer's laptop busy. One caller may take
    /// only [`share_per_ip`] of it, and the log records at most one of a
    /// caller's refusals a second.
    pub const DEFAULT_MAX_REQUESTS_PER_SECOND: u32 = 200;
    /// The default for [`Config::max_body_size`]: 100 MiB. Webhooks are
    /// small, but a dev tunnel also carries file uploads to the app behind
    /// it, which callers expect to work as they do on a hosted app.
    pub const DEFAULT_MAX_BODY_SIZE: u64 = 100 * 1024 * 1024;
    /// The default for [`Config::max_tunnels_per_token`].
    pub const DEFAULT_MAX_TUNNELS_PER_TOKEN: usize = 32;
    /// The default for [`Config::max_tunnels`].
    pub const DEFAULT_MAX_TUNNELS: usize = 10_000;
    /// The default for [`Config::connects_per_minute`].
    pub const DEFAULT_CONNECTS_PER_MINUTE: u32 = 60;
    /// The default for [`Config::failed_auths_per_minute`].
    pub const DEFAULT_FAILED_AUTHS_PER_MINUTE: u32 = 10;
    /// The default for [`Config::name_hold`]: a week, as long as the
    /// activity log keeps a tunnel's requests.
    pub const DEFAULT_NAME_HOLD: Duration = Duration::from_secs(7 * 86_400);
    /// The default for [`Config::body_timeout`].
    pub const DEFAULT_BODY_TIMEOUT: Duration = Duration::from_secs(30);
    /// The default for [`Config::body_min_rate`]: 1 KiB/s.
    pub const DEFAULT_BODY_MIN_RATE: u64 = 1024;
    /// The default for [`Config::header_timeout`].
    pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(30);
    /// The default for [`Config::idle_timeout`].
    pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(120);
    /// The default for [`Config::write_timeout`].
    pub const DEFAULT_WRITE_TIMEOUT: Duration = Duration::from_secs(10);
    /// The default for [`Config::max_connections`].
    pub const DEFAULT_MAX_CONNECTIONS: usize = 20_000;
    /// The default for [`Config::data_dir`], relative to the working
    /// directory.
    pub const DEFAULT_DATA_DIR: &'static str = "ferry-data";
    /// The default for [`Config::capture_body_limit`]: 1 MiB.
    pub const DEFAULT_CAPTURE_BODY_LIMIT: usize = 1024 * 1024;
    /// The most [`Config::capture_body_limit`] may be: a quarter of the
    /// capture queue, so a few full entries always fit.
    pub const MAX_CAPTURE_BODY_LIMIT: usize = crate::activity::capture::QUEUE_BYTES / 4;
    /// The default for [`Config::retention`]: a week, 1 GiB in all, and a
    /// quarter of it per owner.
    pub const DEFAULT_RETENTION: Retention = Retention {
        max_age: Duration::from_secs(7 * 86_400),
        max_bytes: 1024 * 1024 * 1024,
        max_bytes_per_owner: 256 * 1024 * 1024,
    };
    /// The default for [`Config::max_connections_per_ip`].
    pub const DEFAULT_MAX_CONNECTIONS_PER_IP: usize = 256;
}

/// A relay's place in a fleet of relays sharing one database: where the
/// others reach it, what they must present, and how long its hold on a
/// tunnel name lasts without a heartbeat.
#[derive(Debug, Clone)]
pub struct Cluster {
    /// The `http://HOST:PORT` URL at which the fleet's other relays reach
    /// this relay's cluster listener.
    pub advertise_url: String,
    /// The secret every relay of the fleet shares.
    pub secret: crate::cluster::Secret,
    /// How long a relay's claim on a name lasts unless renewed: a relay
    /// that dies loses its tunnels' names after it. Renewed every third.
    pub lease: Duration,
    /// Requests for names no relay of the fleet serves that one caller
    /// address (an IPv6 /64) may make per minute, each costing a query on
    /// the shared database; beyond it its requests for names this relay
    /// does not serve get 429.
    pub unknown_names_per_minute: u32,
    /// Connections one address (an IPv6 /64) may hold open at once on the
    /// cluster listener; more are closed at accept.
    pub max_connections_per_ip: usize,
    /// How long a new connection to the cluster listener may take to send
    /// its first request carrying the fleet's secret before it is closed.
    pub first_request_timeout: Duration,
}

impl Cluster {
    /// The default for [`Cluster::lease`]: a dead relay's names are free
    /// again within 10 s, and the database sees one renewal per relay
    /// every 3⅓ s, whatever the number of tunnels.
    pub const DEFAULT_LEASE: Duration = Duration::from_secs(10);
    /// The shortest [`Cluster::lease`]: below it, a database that pauses
    /// (a checkpoint, a failover) would end leases of live relays.
    pub const MIN_LEASE: Duration = Duration::from_millis(300);
    /// The default for [`Cluster::unknown_names_per_minute`]: ten a second
    /// on average, far above a sender retrying a tunnel that went away.
    pub const DEFAULT_UNKNOWN_NAMES_PER_MINUTE: u32 = 600;
    /// The default for [`Cluster::max_connections_per_ip`]. Another relay
    /// keeps one pooled HTTP/2 connection here (a few while a burst races
    /// to open it, or while a dead one is replaced); 16 leaves room for
    /// that and for relays sharing one address behind NAT, while a
    /// stranger on the fleet's network holds at most 16 of the 1024
    /// places instead of all of them.
    pub const DEFAULT_MAX_CONNECTIONS_PER_IP: usize = 16;
    /// The default for [`Cluster::first_request_timeout`]: another relay
    /// sends its request as soon as it connects (its connect timeout is
    /// 5 s), so a connection silent for 10 s is not one of the fleet's.
    pub const DEFAULT_FIRST_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
    /// The fewest bytes a [`Cluster::secret`] may have.
    pub const MIN_SECRET_LEN: usize = 16;
}

/// How many seconds of [`Config::max_requests_per_second`] a tunnel may take
/// at once: a dev server's page load (hundreds of module requests at once)
/// or a webhook sender catching up after an outage comes in bursts.
pub const RATE_BURST_SECONDS: u32 = 5;

/// One caller's share of a tunnel's rate (and burst): half, rounded up. A
/// caller flooding a tunnel is refused while half of it is left for the
/// webhook senders and the developer's browser; taking all of it needs
/// several addresses, and one caller's page load still gets half the burst.
pub fn share_per_ip(tunnel: u32) -> u32 {
    tunnel.div_ceil(2)
}

// One address's share of a tunnel's slots, each response holding a full
// stream window unread, fills at most half the tunnel's connection window.
const _: () = assert!(
    Config::DEFAULT_MAX_REQUESTS_PER_IP * STREAM_WINDOW as usize <= CONNECTION_WINDOW as usize / 2
);

impl Default for Config {
    fn default() -> Self {
        Self {
            domain: "localhost".to_owned(),
            tokens: Vec::new(),
            tokens_file: None,
            tokens_file_check: Self::DEFAULT_TOKENS_FILE_CHECK,
            request_timeout: Self::DEFAULT_REQUEST_TIMEOUT,
            max_requests_per_tunnel: Self::DEFAULT_MAX_REQUESTS_PER_TUNNEL,
            max_requests_per_ip: Self::DEFAULT_MAX_REQUESTS_PER_IP,
            max_requests_per_second: Self::DEFAULT_MAX_REQUESTS_PER_SECOND,
            max_requests_per_second_per_ip: None,
            max_body_size: Self::DEFAULT_MAX_BODY_SIZE,
            max_tunnels_per_token: Self::DEFAULT_MAX_TUNNELS_PER_TOKEN,
            max_tunnels: Self::DEFAULT_MAX_TUNNELS,
            connects_per_minute: Self::DEFAULT_CONNECTS_PER_MINUTE,
            failed_auths_per_minute: Self::DEFAULT_FAILED_AUTHS_PER_MINUTE,
            name_hold: Self::DEFAULT_NAME_HOLD,
            body_timeout: Self::DEFAULT_BODY_TIMEOUT,
            body_min_rate: Self::DEFAULT_BODY_MIN_RATE,
            header_timeout: Self::DEFAULT_HEADER_TIMEOUT,
            idle_timeout: Self::DEFAULT_IDLE_TIMEOUT,
            write_timeout: Self::DEFAULT_WRITE_TIMEOUT,
            max_connections: Self::DEFAULT_MAX_CONNECTIONS,
            max_connections_per_ip: Self::DEFAULT_MAX_CONNECTIONS_PER_IP,
            keepalive: Keepalive::default(),
            trusted_proxies: Vec::new(),
            proxy_protocol: crate::proxy::ProxyProtocol::Optional,
            egress_allow: Vec::new(),
            data_dir: Self::DEFAULT_DATA_DIR.into(),
            database_url: None,
            database_ca: None,
            cluster: None,
            capture: true,
            capture_body_limit: Self::DEFAULT_CAPTURE_BODY_LIMIT,
            retention: Self::DEFAULT_RETENTION,
            dispatch: crate::dispatch::Settings::default(),
        }
    }
}
