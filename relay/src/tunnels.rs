//! The tunnel registry: which subdomain is served by which live session,
//! which names are held for owners whose session ended, and how a request
//! is sent through a tunnel.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use ferry_common::byte_stream::{CloseReason, CloseSignal};
use ferry_common::handshake::meta::RequestMeta;
use ferry_common::handshake::MAX_REQUEST_HEADER_LIST;
use ferry_common::headers::header_list_size;
use ferry_common::subdomain::Subdomain;
use hyper::body::Incoming;
use hyper::client::conn::http2::SendRequest;
use hyper::{Request, Response};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

use crate::accounts::{short_hash, Account, AccountId, TokenHash};
use crate::limits::{Bucket, PerIp, PerIpGuard, PerIpRate};
use crate::store::OwnerKey;
use crate::Body;

/// How many random names to try before giving up on a free one.
const RANDOM_NAME_ATTEMPTS: u32 = 64;
/// How long a public request waits for a tunnel whose client is still
/// completing its handshake (a fresh connect, a reconnect or a takeover).
const READY_WAIT: Duration = Duration::from_secs(5);
/// How many callers' rates one tunnel keeps (64-byte entries in a table of
/// 2048 slots when full, so ~130 KiB a tunnel at most, given back as their
/// buckets refill and are swept out): far more than call one dev tunnel at
/// once; a flood from more addresses than that shares one caller's share.
const TRACKED_RATE_CALLERS: usize = 1024;
/// The most names held at once; past it the holds that expire soonest go
/// first, so a flood of short-lived tunnels cannot grow memory without end.
const MAX_HOLDS: usize = 100_000;

/// How the store marks the owner of an open relay's tunnel: by key hash.
const KEY_PREFIX: &str = "key_";

/// Who holds a tunnel or a name, which decides who may take it over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Owner {
    /// An account (on a relay with tokens).
    Account(AccountId),
    /// A client on an open relay, by a hash of the reconnect key it keeps.
    Key(String),
    /// A client on an open relay that sent no key: nobody can take over,
    /// and its name is not held after it leaves.
    Anonymous,
}

impl Owner {
    /// The owner on an open relay of a client that sent `key`.
    pub fn of_key(key: Option<&str>) -> Self {
        key.map_or(Owner::Anonymous, |key| Owner::Key(short_hash(key)))
    }

    /// The owner as the store keys it: the account id, `key_` and the key's
    /// hash, or empty for an anonymous client.
    pub fn key(&self) -> OwnerKey {
        match self {
            Owner::Account(id) => id.to_string(),
            Owner::Key(hash) => format!("{KEY_PREFIX}{hash}"),
            Owner::Anonymous => String::new(),
        }
    }

    /// The owner a stored key stands for.
    pub fn from_key(key: &str) -> Self {
        if let Some(hash) = key.strip_prefix(KEY_PREFIX) {
            Owner::Key(hash.to_owned())
        } else if key.is_empty() {
            Owner::Anonymous
        } else {
            Owner::Account(AccountId::from_stored(key))
        }
    }

    fn may_take_over(&self, holder: &Owner) -> bool {
        self != &Owner::Anonymous && self == holder
    }
}

/// What a client told the relay about itself, for display.
#[derive(Debug, Clone, Default)]
pub struct ClientInfo {
    /// Its program and version.
    pub version: Option<String>,
    /// The local target it forwards to.
    pub target: Option<String>,
    /// The token it connected with, so that removing the token ends it.
    pub token: Option<TokenHash>,
}

/// One connected (or connecting) tunnel.
#[derive(Debug)]
pub struct Tunnel {
    /// Unique per session, so that a replaced session cannot remove its
    /// successor from the registry.
    pub id: u64,
    /// The subdomain it serves.
    pub name: Subdomain,
    /// The URL public callers use.
    pub public_url: String,
    /// Who holds it.
    pub owner: Owner,
    /// What the client said about itself.
    pub client: ClientInfo,
    /// When the client connected.
    pub connected_at: SystemTime,
    /// Closes the session's WebSocket with a reason.
    pub close: CloseSignal,
    /// The session it takes over once it is up, if any.
    replaces: Mutex<Option<Arc<Tunnel>>>,
    /// Claimed here but not yet granted by the fleet's registry: until
    /// then requests for its name are not its (they may be another
    /// owner's, served by another relay).
    pending: AtomicBool,
    /// The HTTP/2 handle to the client, set once the WebSocket is up.
    sender: watch::Sender<Option<SendRequest<Body>>>,
    /// Public requests in flight may not exceed the relay's per-tunnel limit.
    in_flight: Arc<Semaphore>,
    /// The size of `in_flight`.
    max_in_flight: usize,
    /// Requests in flight per caller address.
    per_ip: Arc<PerIp>,
    /// Public requests admitted since the client connected.
    requests: AtomicU64,
    /// When the last one was admitted, in seconds since the Unix epoch (0:
    /// none yet).
    last_request: AtomicU64,
    /// Public requests per second it may take.
    rate: Bucket,
    /// Public requests per second each caller may take of `rate`.
    caller_rate: PerIpRate,
}

/// A request's place in its tunnel, held until its response ends (or its
/// WebSocket closes).
#[derive(Debug)]
pub struct Admission {
    /// The tunnel-wide slot.
    _slot: OwnedSemaphorePermit,
    /// The caller's share.
    _caller: PerIpGuard,
}

/// Why a request could not be sent through a tunnel. Each caller maps it to
/// its own answer (a public caller gets a status and a sentence).
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// No session serves the name (yet).
    #[error("no tunnel named `{0}` is connected. Start one with `ferry http 3000 --subdomain {0}` (3000 being your local port)")]
    NotConnected(Subdomain),
    /// The tunnel has as many requests in flight as it may.
    #[error("the tunnel `{0}` has {1} requests in flight, its limit: try again shortly")]
    Busy(Subdomain, usize),
    /// The caller has as many requests in flight on this tunnel as one
    /// caller may.
    #[error("you have {1} requests in flight on the tunnel `{0}`, the most one caller may: wait for some to finish")]
    CallerBusy(Subdomain, usize),
    /// The tunnel, or this caller's share of it, took as many requests as
    /// it may this second; the caller may retry after the given seconds.
    /// The flag says whether the refusal is worth recording (at most one a
    /// second per caller, so a flood does not fill the log).
    #[error("the tunnel `{0}` is receiving more requests per second than this relay allows: retry in {1} s, or send them more slowly")]
    RateLimited(Subdomain, u64, bool),
    /// The request's header list is larger than a tunnel carries.
    #[error("the request's headers total {0} bytes (counted as HTTP/2 does), above the {MAX_REQUEST_HEADER_LIST}-byte limit: send fewer or smaller headers")]
    HeadersTooLarge(usize),
    /// The tunnel did not answer in time.
    #[error("the tunnel `{0}` did not answer within {1} s")]
    Timeout(Subdomain, u64),
    /// The client's connection ended before it answered.
    #[error("the tunnel `{0}` lost its client before it answered: check the terminal running `ferry http`")]
    Gone(Subdomain, #[source] hyper::Error),
    /// The client refused this one exchange (its session carries on).
    #[error("the tunnel `{0}` refused the request: {1}")]
    Refused(Subdomain, #[source] hyper::Error),
}

impl Tunnel {
    /// Marks a tunnel claimed in a fleet as granted by the fleet's
    /// registry: from now on its name's requests are its.
    pub fn confirm(&self) {
        self.pending.store(false, Ordering::Relaxed);
    }

    /// Whether the fleet's registry has yet to grant this tunnel its name.
    pub fn is_pending(&self) -> bool {
        self.pending.load(Ordering::Relaxed)
    }

    /// A handle for sending requests to the client, waiting briefly for a
    /// session that is still completing its handshake.
    async fn sender(&self) -> Option<SendRequest<Body>> {
        let mut ready = self.sender.subscribe();
        let sender = tokio::time::timeout(READY_WAIT, ready.wait_for(Option::is_some))
            .await
            .ok()?
            .ok()?;
        sender.as_ref().filter(|s| !s.is_closed()).cloned()
    }

    /// Records the HTTP/2 handle; requests flow from now on.
    pub(crate) fn set_sender(&self, sender: SendRequest<Body>) {
        self.sender.send_replace(Some(sender));
    }

    /// A place for one more request from `caller`, or why not.
    pub fn admit(&self, caller: IpAddr) -> Result<Admission, SendError> {
        let slot = Arc::clone(&self.in_flight)
            .try_acquire_owned()
            .map_err(|_| SendError::Busy(self.name.clone(), self.max_in_flight))?;
        let caller = self
            .per_ip
            .acquire(caller)
            .ok_or_else(|| SendError::CallerBusy(self.name.clone(), self.per_ip.limit()))?;
        self.requests.fetch_add(1, Ordering::Relaxed);
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.last_request.store(now, Ordering::Relaxed);
        Ok(Admission {
            _slot: slot,
            _caller: caller,
        })
    }

    /// Counts one public request from `caller` against its share of the
    /// tunnel's rate, then against the tunnel's; `Err` with the wait when
    /// either is spent. Replays by the owner do not count.
    pub fn spend_rate(&self, caller: IpAddr) -> Result<(), SendError> {
        // The caller's share first: one that floods is refused before it
        // spends what others' requests need.
        self.caller_rate
            .spend(caller)
            .and_then(|()| self.rate.spend())
            .map_err(|wait| {
                // Whole seconds for Retry-After, at least one.
                let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
                let noted = self.caller_rate.note_refusal(caller);
                SendError::RateLimited(self.name.clone(), secs.max(1), noted)
            })
    }

    /// Public requests admitted since the client connected, and when the
    /// last one was (seconds since the Unix epoch).
    pub fn request_counts(&self) -> (u64, Option<u64>) {
        let last = self.last_request.load(Ordering::Relaxed);
        (
            self.requests.load(Ordering::Relaxed),
            (last > 0).then_some(last),
        )
    }

    /// Sends `request` (already admitted) to the client with `meta`, and
    /// waits up to `timeout` for the response headers. The request's URI
    /// must be absolute (`scheme://authority/path`); its version is set to
    /// HTTP/2 here.
    pub async fn send(
        &self,
        mut request: Request<Body>,
        meta: &RequestMeta,
        timeout: Duration,
    ) -> Result<Response<Incoming>, SendError> {
        meta.insert(request.headers_mut());
        *request.version_mut() = hyper::Version::HTTP_2;
        let size = request_header_list_size(&request);
        if size > MAX_REQUEST_HEADER_LIST {
            return Err(SendError::HeadersTooLarge(size));
        }
        let mut sender = self
            .sender()
            .await
            .ok_or_else(|| SendError::NotConnected(self.name.clone()))?;
        let sent = tokio::time::timeout(timeout, sender.send_request(request))
            .await
            .map_err(|_| SendError::Timeout(self.name.clone(), timeout.as_secs()))?;
        sent.map_err(|err| self.classify(err, &sender))
    }

    /// Tells a failed exchange from a lost client.
    fn classify(&self, err: hyper::Error, sender: &SendRequest<Body>) -> SendError {
        let stream_reset = std::error::Error::source(&err)
            .and_then(|source| source.downcast_ref::<h2::Error>())
            .is_some_and(|h2| h2.is_reset() && !h2.is_go_away());
        if stream_reset && !sender.is_closed() {
            SendError::Refused(self.name.clone(), err)
        } else {
            SendError::Gone(self.name.clone(), err)
        }
    }
}

/// The header list `request` makes on the tunnel, pseudo-headers included.
pub(crate) fn request_header_list_size<B>(request: &Request<B>) -> usize {
    let uri = request.uri();
    let pseudo = [
        (":method", request.method().as_str()),
        (":scheme", uri.scheme_str().unwrap_or("")),
        (":authority", uri.authority().map_or("", |a| a.as_str())),
        (":path", uri.path_and_query().map_or("/", |p| p.as_str())),
    ];
    header_list_size(&pseudo, request.headers())
}

/// Why a name could not be claimed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ClaimError {
    /// The name is reserved for another account.
    #[error("the subdomain `{0}` is reserved for another account on this relay: choose another name with --subdomain")]
    Reserved(Subdomain),
    /// Another client holds the name.
    #[error("the subdomain `{0}` is in use by another client: choose another name with --subdomain, or stop the other client")]
    InUse(Subdomain),
    /// The name's owner left recently and it is held for them.
    #[error("the subdomain `{0}` is held for the client that used it last (for {1} after it left): choose another name with --subdomain")]
    Held(Subdomain, String),
    /// The account holds as many tunnels as it may.
    #[error("this account already holds {0} tunnels, its limit: stop one of them first")]
    TooMany(usize),
    /// The relay holds as many tunnels as it may.
    #[error("this relay has {0} tunnels open, its limit: try again later")]
    Full(usize),
    /// No free random name was found.
    #[error("no free subdomain could be found: ask for one with --subdomain")]
    Exhausted,
    /// The token the tunnel connected with was removed from the relay.
    #[error("the token this tunnel connected with was removed from the relay")]
    TokenRemoved,
}

/// The limits the registry enforces.
#[derive(Debug, Clone, Copy)]
pub struct RegistryLimits {
    /// Requests each tunnel may have in flight.
    pub max_in_flight: usize,
    /// Requests one caller may have in flight on one tunnel.
    pub max_in_flight_per_ip: usize,
    /// Tunnels one account may hold at once.
    pub max_per_account: usize,
    /// Tunnels the relay holds at once.
    pub max_tunnels: usize,
    /// How long a name stays its owner's after the session ends.
    pub name_hold: Duration,
    /// Public requests each tunnel may take per second, and in a burst.
    pub requests_per_second: (u32, u32),
    /// Public requests one caller may take per second of each tunnel's,
    /// and in a burst.
    pub requests_per_second_per_ip: (u32, u32),
}

/// A name kept for its owner after the session ended.
#[derive(Debug)]
struct Hold {
    /// Who may claim it.
    owner: Owner,
    /// Until when.
    until: Instant,
}

#[derive(Debug, Default)]
struct Registry {
    /// Live tunnels by name.
    live: HashMap<Subdomain, Arc<Tunnel>>,
    /// Names held for owners whose session ended.
    held: HashMap<Subdomain, Hold>,
    /// Holds in the order they expire (the hold period is the same for
    /// all), so expired ones are swept from the front without a scan.
    /// Entries whose hold was taken back or renewed are skipped.
    expiries: VecDeque<(Instant, Subdomain)>,
    /// Names only one account may claim, online or not.
    reserved: HashMap<Subdomain, AccountId>,
    /// Tunnel limits of accounts that have their own.
    max_per_account: HashMap<AccountId, usize>,
    /// Every account the relay lists (empty: not known, or an open relay):
    /// a name is never held for an account that is gone.
    accounts: HashSet<AccountId>,
}

impl Registry {
    /// Drops expired holds, and the soonest-expiring ones beyond `cap`.
    fn sweep(&mut self, now: Instant, cap: usize) {
        while let Some((until, name)) = self.expiries.front() {
            let stale = self.held.get(name).is_none_or(|hold| hold.until != *until);
            if !stale && *until > now && self.held.len() < cap && self.expiries.len() < 2 * cap {
                break;
            }
            if !stale {
                self.held.remove(name);
            }
            self.expiries.pop_front();
        }
    }

    /// Whether `name` is reserved for an account other than `owner`.
    fn reserved_against(&self, name: &Subdomain, owner: &Owner) -> bool {
        self.reserved
            .get(name)
            .is_some_and(|account| !matches!(owner, Owner::Account(o) if o == account))
    }

    fn holder(&self, name: &Subdomain, now: Instant) -> Option<&Owner> {
        self.held
            .get(name)
            .filter(|hold| hold.until > now)
            .map(|hold| &hold.owner)
    }
}

/// Subdomain → tunnel.
pub struct Tunnels {
    /// Live tunnels and held names.
    registry: Mutex<Registry>,
    /// The next session id.
    next_id: AtomicU64,
    /// What the registry enforces.
    limits: RegistryLimits,
    /// Whether the relay is in a fleet: then a claimed tunnel serves no one
    /// until the fleet's registry granted it too ([`Tunnel::confirm`]).
    in_fleet: AtomicBool,
}

impl Tunnels {
    /// An empty registry enforcing `limits`.
    pub fn new(limits: RegistryLimits) -> Self {
        Self {
            registry: Mutex::default(),
            next_id: AtomicU64::new(0),
            limits,
            in_fleet: AtomicBool::new(false),
        }
    }

    /// Makes every later claim wait for the fleet's registry.
    pub fn join_fleet(&self) {
        self.in_fleet.store(true, Ordering::Relaxed);
    }

    fn registry(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Claims `wanted`, or a random free name, for `owner`. A name live or
    /// held for the same owner is taken over; one live or held for anybody
    /// else is refused. A takeover replaces the old session only once the
    /// new one is up ([`Tunnels::activate`]), so a newcomer that fails
    /// leaves the old one serving.
    pub fn claim(
        &self,
        wanted: Option<Subdomain>,
        owner: Owner,
        client: ClientInfo,
        public_url: impl Fn(&Subdomain) -> String,
    ) -> Result<Arc<Tunnel>, ClaimError> {
        let now = Instant::now();
        let mut registry = self.registry();
        let (name, replaces) = match wanted {
            Some(name) if registry.reserved_against(&name, &owner) => {
                return Err(ClaimError::Reserved(name))
            }
            Some(name) => match registry.live.get(&name) {
                Some(holder) if owner.may_take_over(&holder.owner) => {
                    let holder = Arc::clone(holder);
                    (name, Some(holder))
                }
                Some(_) => return Err(ClaimError::InUse(name)),
                None => match registry.holder(&name, now) {
                    Some(holder) if !owner.may_take_over(holder) => {
                        let hold = ferry_common::units::format_duration(self.limits.name_hold);
                        return Err(ClaimError::Held(name, hold));
                    }
                    _ => (name, None),
                },
            },
            None => {
                let name = (0..RANDOM_NAME_ATTEMPTS)
                    .map(|attempt| Subdomain::random(attempt / 8))
                    .find(|name| {
                        !registry.live.contains_key(name)
                            && registry.holder(name, now).is_none()
                            && !registry.reserved.contains_key(name)
                    })
                    .ok_or(ClaimError::Exhausted)?;
                (name, None)
            }
        };
        // A takeover replaces a tunnel; anything else adds one.
        if replaces.is_none() {
            if registry.live.len() >= self.limits.max_tunnels {
                return Err(ClaimError::Full(self.limits.max_tunnels));
            }
            if let Owner::Account(account) = &owner {
                let max = registry
                    .max_per_account
                    .get(account)
                    .copied()
                    .unwrap_or(self.limits.max_per_account);
                let held = registry.live.values().filter(|t| t.owner == owner).count();
                if held >= max {
                    return Err(ClaimError::TooMany(max));
                }
            }
        }
        let tunnel = Arc::new(Tunnel {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            public_url: public_url(&name),
            name: name.clone(),
            owner,
            client,
            connected_at: SystemTime::now(),
            close: CloseSignal::default(),
            sender: watch::Sender::new(None),
            in_flight: Arc::new(Semaphore::new(self.limits.max_in_flight)),
            max_in_flight: self.limits.max_in_flight,
            requests: AtomicU64::new(0),
            last_request: AtomicU64::new(0),
            rate: Bucket::new(
                self.limits.requests_per_second.0,
                self.limits.requests_per_second.1,
            ),
            caller_rate: PerIpRate::new(
                self.limits.requests_per_second_per_ip.0,
                self.limits.requests_per_second_per_ip.1,
                TRACKED_RATE_CALLERS,
            ),
            per_ip: PerIp::new(self.limits.max_in_flight_per_ip),
            replaces: Mutex::new(None),
            pending: AtomicBool::new(self.in_fleet.load(Ordering::Relaxed)),
        });
        registry.held.remove(&name);
        match replaces {
            Some(old) => {
                *tunnel
                    .replaces
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) = Some(old);
            }
            None => {
                registry.live.insert(name, Arc::clone(&tunnel));
            }
        }
        Ok(tunnel)
    }

    /// Marks `tunnel`'s session as up. A takeover now replaces whichever
    /// session of the same owner serves the name (the one it was claimed
    /// against, or another takeover that came up first), which is returned
    /// for the caller to close. Refused when the name went to someone else
    /// meanwhile, when it became reserved for another account, or when
    /// `valid` refuses the token it connected with: a takeover is not
    /// `live` until now, so a reload of the accounts since its claim did
    /// not end it ([`Tunnels::set_accounts`]).
    pub fn activate(
        &self,
        tunnel: &Arc<Tunnel>,
        valid: impl Fn(&TokenHash) -> bool,
    ) -> Result<Option<Arc<Tunnel>>, ClaimError> {
        let replaces = tunnel
            .replaces
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if replaces.is_none() {
            return Ok(None);
        }
        let now = Instant::now();
        let mut registry = self.registry();
        // Checked under the registry's lock, which a reload takes after
        // changing the accounts: either this sees the change, or the
        // reload sees this tunnel live and ends it.
        if tunnel.client.token.is_some_and(|token| !valid(&token)) {
            return Err(ClaimError::TokenRemoved);
        }
        if registry.reserved_against(&tunnel.name, &tunnel.owner) {
            return Err(ClaimError::Reserved(tunnel.name.clone()));
        }
        let ours = match registry.live.get(&tunnel.name) {
            Some(current) => tunnel.owner.may_take_over(&current.owner),
            None => registry
                .holder(&tunnel.name, now)
                .is_none_or(|holder| tunnel.owner.may_take_over(holder)),
        };
        if !ours {
            return Err(ClaimError::InUse(tunnel.name.clone()));
        }
        registry.held.remove(&tunnel.name);
        Ok(registry
            .live
            .insert(tunnel.name.clone(), Arc::clone(tunnel)))
    }

    /// Takes the reserved names and tunnel limits of `accounts`, and ends
    /// the live tunnels that may no longer be: those connected with a token
    /// that `valid` refuses, and those on a name now reserved for another
    /// account. Holds of a reserved name for anybody else, and holds of
    /// accounts no longer listed, are dropped.
    pub fn set_accounts(&self, accounts: &[Account], valid: impl Fn(&TokenHash) -> bool) {
        let mut registry = self.registry();
        registry.reserved = accounts
            .iter()
            .flat_map(|a| a.subdomains.iter().map(|name| (name.clone(), a.id.clone())))
            .collect();
        registry.max_per_account = accounts
            .iter()
            .filter_map(|a| Some((a.id.clone(), a.max_tunnels?)))
            .collect();
        registry.accounts = accounts.iter().map(|a| a.id.clone()).collect();
        let Registry {
            live,
            held,
            reserved,
            ..
        } = &mut *registry;
        let against = |name: &Subdomain, owner: &Owner| {
            reserved
                .get(name)
                .is_some_and(|account| !matches!(owner, Owner::Account(o) if o == account))
        };
        // A name held for an account that is gone would be nobody's until
        // the hold expires: it is free again.
        let gone = |owner: &Owner| match owner {
            Owner::Account(id) => !accounts.is_empty() && !accounts.iter().any(|a| &a.id == id),
            Owner::Key(_) | Owner::Anonymous => false,
        };
        held.retain(|name, hold| !against(name, &hold.owner) && !gone(&hold.owner));
        for tunnel in live.values() {
            let reason = if tunnel.client.token.is_some_and(|token| !valid(&token)) {
                "the token this tunnel connected with was removed from the relay"
            } else if against(&tunnel.name, &tunnel.owner) {
                "this subdomain is now reserved for another account"
            } else {
                continue;
            };
            tunnel.close.close(CloseReason::policy(reason));
        }
    }

    /// Whether `name` is reserved for `owner`'s account: then no hold of
    /// anybody else's counts.
    pub fn reserved_for(&self, name: &Subdomain, owner: &Owner) -> bool {
        let registry = self.registry();
        registry.reserved.contains_key(name) && !registry.reserved_against(name, owner)
    }

    /// How many tunnels `owner` may hold at once: its account's own limit
    /// or the relay's; `None` for owners without an account (open relays).
    pub fn tunnel_limit(&self, owner: &Owner) -> Option<usize> {
        let Owner::Account(account) = owner else {
            return None;
        };
        Some(
            self.registry()
                .max_per_account
                .get(account)
                .copied()
                .unwrap_or(self.limits.max_per_account),
        )
    }

    /// Who owns `name` now: its live tunnel's owner, or the holder of an
    /// unexpired hold.
    pub fn owner_of(&self, name: &Subdomain) -> Option<Owner> {
        let registry = self.registry();
        match registry
            .live
            .get(name)
            .filter(|tunnel| !tunnel.is_pending())
        {
            Some(tunnel) => Some(tunnel.owner.clone()),
            None => registry.holder(name, Instant::now()).cloned(),
        }
    }

    /// Holds `name` for `owner` for `left` from now, unless it is live: a
    /// hold read back from the store when the relay starts.
    pub fn restore_hold(&self, name: Subdomain, owner: Owner, left: Duration) {
        if owner == Owner::Anonymous {
            return;
        }
        let mut registry = self.registry();
        if registry.live.contains_key(&name) {
            return;
        }
        let now = Instant::now();
        registry.sweep(now, MAX_HOLDS);
        let until = now.checked_add(left).unwrap_or(now);
        registry.held.insert(name.clone(), Hold { owner, until });
        registry.expiries.push_back((until, name));
    }

    /// The tunnel serving `name`.
    pub fn get(&self, name: &Subdomain) -> Option<Arc<Tunnel>> {
        self.registry()
            .live
            .get(name)
            .filter(|tunnel| !tunnel.is_pending())
            .cloned()
    }

    /// Ends `tunnel`'s registration: removes it if it is still the one
    /// registered under its name, and holds the name for its owner.
    pub fn release(&self, tunnel: &Tunnel) {
        self.end(tunnel, true);
    }

    /// Ends `tunnel`'s registration as [`Tunnels::release`] does but holds
    /// nothing: for a claim whose token was removed before its session
    /// began, whose account may be gone.
    pub fn discard(&self, tunnel: &Tunnel) {
        self.end(tunnel, false);
    }

    fn end(&self, tunnel: &Tunnel, hold: bool) {
        if tunnel
            .replaces
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
            .is_some()
        {
            // A takeover that never came up: the old session still serves.
            return;
        }
        let mut registry = self.registry();
        if registry
            .live
            .get(&tunnel.name)
            .is_none_or(|t| t.id != tunnel.id)
        {
            return;
        }
        registry.live.remove(&tunnel.name);
        let gone = match &tunnel.owner {
            Owner::Account(id) => !registry.accounts.is_empty() && !registry.accounts.contains(id),
            Owner::Key(_) | Owner::Anonymous => false,
        };
        if !hold
            || gone
            || tunnel.owner == Owner::Anonymous
            || registry.reserved_against(&tunnel.name, &tunnel.owner)
        {
            return;
        }
        let now = Instant::now();
        registry.sweep(now, MAX_HOLDS);
        let until = now
            .checked_add(self.limits.name_hold)
            .unwrap_or(now + Duration::from_secs(100 * 365 * 86_400));
        registry.held.insert(
            tunnel.name.clone(),
            Hold {
                owner: tunnel.owner.clone(),
                until,
            },
        );
        registry.expiries.push_back((until, tunnel.name.clone()));
        if registry.live.is_empty() {
            registry.live.shrink_to_fit();
        }
    }

    /// All live tunnels, sorted by name.
    pub fn list(&self) -> Vec<Arc<Tunnel>> {
        let mut all: Vec<_> = self.registry().live.values().cloned().collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }

    /// Live tunnels.
    pub(crate) fn len(&self) -> usize {
        self.registry().live.len()
    }

    /// Closes every session with `reason`.
    pub fn close_all(&self, reason: &CloseReason) {
        for tunnel in self.registry().live.values() {
            tunnel.close.close(reason.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use ferry_common::subdomain::Subdomain;

    use super::{ClaimError, ClientInfo, Owner, RegistryLimits, Tunnels};
    use crate::accounts::AccountId;

    fn url(name: &Subdomain) -> String {
        format!("http://{name}.localhost")
    }

    fn registry(max_per_account: usize, max_tunnels: usize) -> Tunnels {
        Tunnels::new(RegistryLimits {
            max_in_flight: 8,
            max_in_flight_per_ip: 8,
            max_per_account,
            max_tunnels,
            name_hold: Duration::from_secs(3600),
            requests_per_second: (u32::MAX, u32::MAX),
            requests_per_second_per_ip: (u32::MAX, u32::MAX),
        })
    }

    fn account(name: &str) -> Owner {
        Owner::Account(AccountId::of_token(name))
    }

    fn claim(
        tunnels: &Tunnels,
        name: &str,
        owner: Owner,
    ) -> Result<std::sync::Arc<super::Tunnel>, ClaimError> {
        tunnels.claim(
            Some(name.parse().unwrap()),
            owner,
            ClientInfo::default(),
            url,
        )
    }

    #[test]
    fn a_takeover_replaces_the_old_session_only_once_it_is_up() {
        let tunnels = registry(3, 100);
        let name = Subdomain::parse("demo").unwrap();
        let first = claim(&tunnels, "demo", account("a")).unwrap();
        assert_eq!(
            claim(&tunnels, "demo", account("b")).err(),
            Some(ClaimError::InUse(name.clone()))
        );
        let second = claim(&tunnels, "demo", account("a")).unwrap();
        assert_eq!(
            tunnels.get(&name).map(|t| t.id),
            Some(first.id),
            "the old one serves meanwhile"
        );
        // A newcomer that never comes up leaves the old session in place.
        tunnels.release(&second);
        assert_eq!(tunnels.get(&name).map(|t| t.id), Some(first.id));
        let third = claim(&tunnels, "demo", account("a")).unwrap();
        let replaced = tunnels
            .activate(&third, |_| true)
            .unwrap()
            .expect("it replaces the first");
        assert_eq!(replaced.id, first.id);
        assert_eq!(tunnels.get(&name).map(|t| t.id), Some(third.id));
        // The replaced session going away must not unregister its successor.
        tunnels.release(&first);
        assert_eq!(tunnels.get(&name).map(|t| t.id), Some(third.id));
    }

    #[test]
    fn a_name_stays_its_owners_after_the_session_ends() {
        let tunnels = registry(3, 100);
        let name = Subdomain::parse("demo").unwrap();
        let first = claim(&tunnels, "demo", account("a")).unwrap();
        tunnels.release(&first);
        assert!(tunnels.get(&name).is_none());
        assert!(matches!(
            claim(&tunnels, "demo", account("b")),
            Err(ClaimError::Held(..))
        ));
        assert!(matches!(
            claim(&tunnels, "demo", Owner::of_key(Some("k"))),
            Err(ClaimError::Held(..))
        ));
        assert!(
            claim(&tunnels, "demo", account("a")).is_ok(),
            "the owner gets it back"
        );

        let keyed = claim(&tunnels, "keyed", Owner::of_key(Some("key-1"))).unwrap();
        tunnels.release(&keyed);
        assert!(claim(&tunnels, "keyed", Owner::of_key(Some("key-2"))).is_err());
        assert!(claim(&tunnels, "keyed", Owner::of_key(Some("key-1"))).is_ok());
    }

    #[test]
    fn racing_takeovers_each_replace_the_one_before_and_strangers_lose() {
        let tunnels = registry(3, 100);
        let name = Subdomain::parse("demo").unwrap();
        let first = claim(&tunnels, "demo", account("a")).unwrap();
        let second = claim(&tunnels, "demo", account("a")).unwrap();
        let third = claim(&tunnels, "demo", account("a")).unwrap();
        assert_eq!(
            tunnels.activate(&second, |_| true).unwrap().map(|t| t.id),
            Some(first.id)
        );
        assert_eq!(
            tunnels.activate(&third, |_| true).unwrap().map(|t| t.id),
            Some(second.id)
        );
        assert_eq!(tunnels.get(&name).map(|t| t.id), Some(third.id));

        // The old session ends and its hold lapses before the newcomer is
        // up; a stranger takes the name; the newcomer must not displace it.
        let tunnels = Tunnels::new(RegistryLimits {
            name_hold: Duration::ZERO,
            ..registry(3, 100).limits
        });
        let old = claim(&tunnels, "demo", account("a")).unwrap();
        let late = claim(&tunnels, "demo", account("a")).unwrap();
        tunnels.release(&old);
        let stranger = claim(&tunnels, "demo", account("b")).unwrap();
        assert!(tunnels.activate(&late, |_| true).is_err());
        assert_eq!(tunnels.get(&name).map(|t| t.id), Some(stranger.id));
    }

    #[test]
    fn holds_are_capped_and_swept_in_expiry_order() {
        let tunnels = registry(3, 1_000_000);
        let mut registry = tunnels.registry();
        let now = std::time::Instant::now();
        for i in 0..10 {
            let name: Subdomain = format!("n{i}").parse().unwrap();
            let until = now + Duration::from_secs(i);
            registry.held.insert(
                name.clone(),
                super::Hold {
                    owner: account("a"),
                    until,
                },
            );
            registry.expiries.push_back((until, name));
        }
        registry.sweep(now + Duration::from_millis(4500), 100);
        assert_eq!(registry.held.len(), 5, "the five expired ones are gone");
        registry.sweep(now, 3);
        assert_eq!(
            registry.held.len(),
            2,
            "beyond the cap, the soonest to expire go"
        );
        assert!(registry
            .held
            .contains_key(&"n9".parse::<Subdomain>().unwrap()));
    }

    #[test]
    fn holds_expire_and_anonymous_names_are_not_held() {
        let tunnels = Tunnels::new(RegistryLimits {
            name_hold: Duration::ZERO,
            ..registry(3, 100).limits
        });
        let first = claim(&tunnels, "demo", account("a")).unwrap();
        tunnels.release(&first);
        assert!(
            claim(&tunnels, "demo", account("b")).is_ok(),
            "an expired hold frees the name"
        );

        let tunnels = registry(3, 100);
        let anonymous = claim(&tunnels, "anon", Owner::Anonymous).unwrap();
        assert!(
            claim(&tunnels, "anon", Owner::Anonymous).is_err(),
            "nobody takes over an anonymous tunnel"
        );
        tunnels.release(&anonymous);
        assert!(claim(&tunnels, "anon", account("b")).is_ok());
    }

    #[test]
    fn in_a_fleet_a_claimed_tunnel_serves_its_name_only_once_the_fleet_granted_it() {
        let tunnels = registry(3, 5);
        tunnels.join_fleet();
        let name: Subdomain = "shop".parse().unwrap();
        let tunnel = claim(&tunnels, "shop", account("y")).unwrap();
        // Until the fleet's registry grants it, the name may be another
        // owner's on another relay: nothing here is routed to it, and its
        // requests are not recorded as this owner's.
        assert!(tunnel.is_pending());
        assert!(tunnels.get(&name).is_none());
        assert_eq!(tunnels.owner_of(&name), None);
        tunnel.confirm();
        assert!(tunnels.get(&name).is_some());
        assert_eq!(tunnels.owner_of(&name), Some(account("y")));
    }

    #[test]
    fn accounts_and_the_relay_hold_a_limited_number_of_tunnels() {
        let tunnels = registry(3, 5);
        for name in ["one", "two", "three"] {
            claim(&tunnels, name, account("a")).unwrap();
        }
        assert_eq!(
            claim(&tunnels, "four", account("a")).err(),
            Some(ClaimError::TooMany(3))
        );
        assert!(
            claim(&tunnels, "one", account("a")).is_ok(),
            "a takeover adds none"
        );
        claim(&tunnels, "four", account("b")).unwrap();
        tunnels
            .claim(None, Owner::Anonymous, ClientInfo::default(), url)
            .unwrap();
        assert_eq!(
            tunnels
                .claim(None, Owner::Anonymous, ClientInfo::default(), url)
                .err(),
            Some(ClaimError::Full(5))
        );
    }

    #[test]
    fn a_discarded_claim_holds_no_name() {
        let tunnels = registry(3, 100);
        let gone = claim(&tunnels, "shop", account("gone")).unwrap();
        tunnels.discard(&gone);
        assert_eq!(tunnels.owner_of(&gone.name), None);
        assert!(claim(&tunnels, "shop", account("other")).is_ok());
    }

    #[test]
    fn a_takeover_is_checked_again_as_it_comes_up() {
        let tunnels = registry(3, 100);
        let shop = Subdomain::parse("shop").unwrap();
        let token = crate::accounts::TokenHash::of("alice");
        let alice = |tunnels: &Tunnels| {
            let client = ClientInfo {
                token: Some(token),
                ..ClientInfo::default()
            };
            tunnels
                .claim(Some(shop.clone()), account("alice"), client, url)
                .unwrap()
        };
        alice(&tunnels);
        // Its token removed since the claim: refused, the old one stays.
        let pending = alice(&tunnels);
        assert_eq!(
            tunnels.activate(&pending, |t| t != &token).err(),
            Some(ClaimError::TokenRemoved)
        );
        // The name reserved for another account since the claim: refused.
        let pending = alice(&tunnels);
        reserving(&tunnels, "bob", std::slice::from_ref(&shop), None);
        assert_eq!(
            tunnels.activate(&pending, |_| true).err(),
            Some(ClaimError::Reserved(shop.clone()))
        );
    }

    #[test]
    fn random_names_avoid_live_and_held_ones() {
        let tunnels = registry(3, 1000);
        for _ in 0..100 {
            let tunnel = tunnels
                .claim(None, Owner::of_key(Some("k")), ClientInfo::default(), url)
                .unwrap();
            tunnels.release(&tunnel);
            tunnels
                .claim(None, Owner::Anonymous, ClientInfo::default(), url)
                .unwrap();
        }
        assert_eq!(tunnels.len(), 100);
    }

    fn reserving(tunnels: &Tunnels, owner: &str, names: &[Subdomain], max: Option<usize>) {
        let account = crate::accounts::Account {
            id: AccountId::of_token(owner),
            tokens: vec![crate::accounts::Token::new(owner)],
            subdomains: names.to_vec(),
            max_tunnels: max,
            admin: false,
        };
        tunnels.set_accounts(&[account], |_| true);
    }

    #[test]
    fn a_reserved_name_is_its_accounts_alone_online_and_offline() {
        let tunnels = registry(3, 100);
        let shop = Subdomain::parse("shop").unwrap();
        // A name held for someone else stops being theirs once reserved.
        let squatter = claim(&tunnels, "shop", account("mallory")).unwrap();
        tunnels.release(&squatter);
        let squatter = claim(&tunnels, "shop", account("mallory")).unwrap();
        reserving(&tunnels, "alice", std::slice::from_ref(&shop), None);
        assert_eq!(
            claim(&tunnels, "shop", account("mallory")).err(),
            Some(ClaimError::Reserved(shop.clone()))
        );
        tunnels.release(&squatter);
        // Offline, before the owner ever came: nobody else.
        for stranger in [
            account("mallory"),
            Owner::Anonymous,
            Owner::of_key(Some("k")),
        ] {
            assert_eq!(
                claim(&tunnels, "shop", stranger).err(),
                Some(ClaimError::Reserved(shop.clone()))
            );
        }
        let first = claim(&tunnels, "shop", account("alice")).unwrap();
        tunnels.activate(&first, |_| true).unwrap();
        // Online: nobody else.
        assert_eq!(
            claim(&tunnels, "shop", account("mallory")).err(),
            Some(ClaimError::Reserved(shop.clone()))
        );
        // Offline after the owner left, whatever the hold: nobody else.
        tunnels.release(&first);
        let short = Tunnels::new(RegistryLimits {
            name_hold: Duration::ZERO,
            ..tunnels.limits
        });
        reserving(&short, "alice", std::slice::from_ref(&shop), None);
        let gone = claim(&short, "shop", account("alice")).unwrap();
        short.release(&gone);
        assert_eq!(
            claim(&short, "shop", account("mallory")).err(),
            Some(ClaimError::Reserved(shop.clone()))
        );
        assert!(claim(&tunnels, "shop", account("alice")).is_ok());
    }

    #[test]
    fn names_held_for_a_removed_account_are_free_again() {
        let tunnels = registry(3, 100);
        reserving(&tunnels, "mallory", &[], None);
        let gone = claim(&tunnels, "demo", account("mallory")).unwrap();
        tunnels.release(&gone);
        assert!(matches!(
            claim(&tunnels, "demo", account("alice")),
            Err(ClaimError::Held(..))
        ));
        reserving(&tunnels, "alice", &[], None);
        assert!(claim(&tunnels, "demo", account("alice")).is_ok());
        // A session that ends after its account was removed (the reload
        // closed it) holds nothing either.
        reserving(&tunnels, "mallory", &[], None);
        let late = claim(&tunnels, "late", account("mallory")).unwrap();
        reserving(&tunnels, "alice", &[], None);
        tunnels.release(&late);
        assert_eq!(tunnels.owner_of(&late.name), None);
    }

    #[test]
    fn random_names_are_never_reserved_ones() {
        let tunnels = registry(1000, 1000);
        let names: Vec<Subdomain> = (0..5000).map(|_| Subdomain::random(0)).collect();
        reserving(&tunnels, "alice", &names, None);
        for _ in 0..200 {
            let tunnel = tunnels
                .claim(None, Owner::Anonymous, ClientInfo::default(), url)
                .unwrap();
            assert!(!names.contains(&tunnel.name), "{} is reserved", tunnel.name);
        }
    }

    #[test]
    fn an_account_may_have_its_own_tunnel_limit() {
        let tunnels = registry(3, 100);
        reserving(&tunnels, "alice", &[], Some(1));
        claim(&tunnels, "one", account("alice")).unwrap();
        assert_eq!(
            claim(&tunnels, "two", account("alice")).err(),
            Some(ClaimError::TooMany(1))
        );
        for name in ["b1", "b2", "b3"] {
            claim(&tunnels, name, account("bob")).unwrap();
        }
        assert_eq!(
            claim(&tunnels, "b4", account("bob")).err(),
            Some(ClaimError::TooMany(3))
        );
    }
}
