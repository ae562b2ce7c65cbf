//! The tunnel registry: which subdomain is served by which live session.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use ferry_common::byte_stream::{CloseReason, CloseSignal};
use ferry_common::subdomain::Subdomain;
use hyper::client::conn::http2::SendRequest;
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

use crate::Body;

/// How many random names to try before giving up on a free one.
const RANDOM_NAME_ATTEMPTS: u32 = 64;
/// How long a public request waits for a tunnel whose client is still
/// completing its handshake (a fresh connect, a reconnect or a takeover).
const READY_WAIT: Duration = Duration::from_secs(5);

/// Who holds a tunnel, which decides who may take its name over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Owner {
    /// A client that presented this token (on a relay with tokens).
    Token(String),
    /// A client on an open relay that sent this reconnect key.
    Key(String),
    /// A client on an open relay that sent no key: nobody can take over.
    Anonymous,
}

impl Owner {
    fn may_take_over(&self, holder: &Owner) -> bool {
        match (self, holder) {
            (Owner::Token(a), Owner::Token(b)) | (Owner::Key(a), Owner::Key(b)) => a == b,
            _ => false,
        }
    }
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
    /// When the client connected.
    pub connected_at: SystemTime,
    /// Closes the session's WebSocket with a reason.
    pub close: CloseSignal,
    /// The HTTP/2 handle to the client, set once the WebSocket is up.
    sender: watch::Sender<Option<SendRequest<Body>>>,
    /// Public requests in flight may not exceed the relay's per-tunnel limit.
    in_flight: Arc<Semaphore>,
}

impl Tunnel {
    /// A handle for sending requests to the client, waiting briefly for a
    /// session that is still completing its handshake.
    pub async fn sender(&self) -> Option<SendRequest<Body>> {
        let mut ready = self.sender.subscribe();
        let sender = tokio::time::timeout(READY_WAIT, ready.wait_for(Option::is_some))
            .await
            .ok()?
            .ok()?;
        sender.as_ref().filter(|s| !s.is_closed()).cloned()
    }

    /// Records the HTTP/2 handle; public requests flow from now on.
    pub fn set_sender(&self, sender: SendRequest<Body>) {
        self.sender.send_replace(Some(sender));
    }

    /// A place for one more request in flight, or `None` when the tunnel is
    /// at its limit.
    pub fn admit(&self) -> Option<OwnedSemaphorePermit> {
        Arc::clone(&self.in_flight).try_acquire_owned().ok()
    }
}

/// Why a name could not be claimed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ClaimError {
    /// Another client holds the name.
    #[error("the subdomain `{0}` is in use by another client: choose another name with --subdomain, or stop the other client")]
    InUse(Subdomain),
    /// The token holds as many tunnels as it may.
    #[error("this token already holds {0} tunnels, the relay's limit: stop one of them first")]
    TooMany(usize),
    /// No free random name was found.
    #[error("no free subdomain could be found: ask for one with --subdomain")]
    Exhausted,
}

/// A successful claim.
pub struct Claim {
    /// The new tunnel, registered but not yet connected.
    pub tunnel: Arc<Tunnel>,
    /// The session it replaced, which the caller must close.
    pub replaced: Option<Arc<Tunnel>>,
}

/// Subdomain → tunnel.
pub struct Tunnels {
    /// The live tunnels by name.
    map: Mutex<HashMap<Subdomain, Arc<Tunnel>>>,
    /// The next session id.
    next_id: AtomicU64,
    /// Requests each tunnel may have in flight.
    max_in_flight: usize,
    /// Tunnels one token may hold at once.
    max_per_token: usize,
}

impl Tunnels {
    /// An empty registry whose tunnels each take `max_in_flight` requests,
    /// and where one token holds at most `max_per_token` tunnels.
    pub fn new(max_in_flight: usize, max_per_token: usize) -> Self {
        Self {
            map: Mutex::default(),
            next_id: AtomicU64::new(0),
            max_in_flight,
            max_per_token,
        }
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<Subdomain, Arc<Tunnel>>> {
        self.map.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Claims `wanted`, or a random free name, for `owner`. A name held by
    /// the same owner is taken over; one held by anybody else is refused.
    pub fn claim(
        &self,
        wanted: Option<Subdomain>,
        owner: Owner,
        public_url: impl Fn(&Subdomain) -> String,
    ) -> Result<Claim, ClaimError> {
        let mut map = self.map();
        let (name, replaced) = match wanted {
            Some(name) => match map.get(&name) {
                Some(holder) if !owner.may_take_over(&holder.owner) => {
                    return Err(ClaimError::InUse(name));
                }
                Some(holder) => {
                    let holder = Arc::clone(holder);
                    (name, Some(holder))
                }
                None => (name, None),
            },
            None => {
                let name = (0..RANDOM_NAME_ATTEMPTS)
                    .map(|attempt| Subdomain::random(attempt / 8))
                    .find(|name| !map.contains_key(name))
                    .ok_or(ClaimError::Exhausted)?;
                (name, None)
            }
        };
        // A takeover replaces a tunnel; anything else adds one to the token's.
        if replaced.is_none() && matches!(owner, Owner::Token(_)) {
            let held = map.values().filter(|t| t.owner == owner).count();
            if held >= self.max_per_token {
                return Err(ClaimError::TooMany(self.max_per_token));
            }
        }
        let tunnel = Arc::new(Tunnel {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            public_url: public_url(&name),
            name: name.clone(),
            owner,
            connected_at: SystemTime::now(),
            close: CloseSignal::default(),
            sender: watch::Sender::new(None),
            in_flight: Arc::new(Semaphore::new(self.max_in_flight)),
        });
        map.insert(name, Arc::clone(&tunnel));
        Ok(Claim { tunnel, replaced })
    }

    /// The tunnel serving `name`.
    pub fn get(&self, name: &Subdomain) -> Option<Arc<Tunnel>> {
        self.map().get(name).cloned()
    }

    /// Removes `tunnel` if it is still the one registered under its name.
    pub fn release(&self, tunnel: &Tunnel) {
        let mut map = self.map();
        if map.get(&tunnel.name).is_some_and(|t| t.id == tunnel.id) {
            map.remove(&tunnel.name);
        }
    }

    /// All tunnels, sorted by name.
    pub fn list(&self) -> Vec<Arc<Tunnel>> {
        let mut all: Vec<_> = self.map().values().cloned().collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }

    /// Closes every session with `reason`.
    pub fn close_all(&self, reason: &CloseReason) {
        for tunnel in self.map().values() {
            tunnel.close.close(reason.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use ferry_common::subdomain::Subdomain;

    use super::{ClaimError, Owner, Tunnels};

    fn url(name: &Subdomain) -> String {
        format!("http://{name}.localhost")
    }

    #[test]
    fn same_owner_takes_over_and_others_are_refused() {
        let tunnels = Tunnels::new(8, 3);
        let name = Subdomain::parse("demo").unwrap();
        let first = tunnels
            .claim(Some(name.clone()), Owner::Token("a".into()), url)
            .unwrap();
        assert!(first.replaced.is_none());
        let err = tunnels
            .claim(Some(name.clone()), Owner::Token("b".into()), url)
            .err();
        assert_eq!(err, Some(ClaimError::InUse(name.clone())));
        let second = tunnels
            .claim(Some(name.clone()), Owner::Token("a".into()), url)
            .unwrap();
        assert_eq!(second.replaced.map(|t| t.id), Some(first.tunnel.id));
        // The replaced session going away must not unregister its successor.
        tunnels.release(&first.tunnel);
        assert_eq!(tunnels.get(&name).map(|t| t.id), Some(second.tunnel.id));
        tunnels.release(&second.tunnel);
        assert!(tunnels.get(&name).is_none());
    }

    #[test]
    fn a_token_holds_a_limited_number_of_tunnels_but_may_take_its_own_over() {
        let tunnels = Tunnels::new(8, 3);
        let owner = || Owner::Token("a".into());
        for name in ["one", "two", "three"] {
            tunnels
                .claim(Some(name.parse().unwrap()), owner(), url)
                .unwrap();
        }
        let err = tunnels
            .claim(Some("four".parse().unwrap()), owner(), url)
            .err();
        assert_eq!(err, Some(ClaimError::TooMany(3)));
        assert!(tunnels.claim(None, owner(), url).is_err());
        assert!(
            tunnels
                .claim(Some("one".parse().unwrap()), owner(), url)
                .is_ok(),
            "a takeover adds none"
        );
        assert!(tunnels
            .claim(Some("four".parse().unwrap()), Owner::Token("b".into()), url)
            .is_ok());
    }

    #[test]
    fn anonymous_clients_never_take_over() {
        let tunnels = Tunnels::new(8, 3);
        let name = Subdomain::parse("demo").unwrap();
        tunnels
            .claim(Some(name.clone()), Owner::Anonymous, url)
            .unwrap();
        assert!(tunnels
            .claim(Some(name.clone()), Owner::Anonymous, url)
            .is_err());
        assert!(tunnels
            .claim(Some(name), Owner::Key("k".into()), url)
            .is_err());
    }

    #[test]
    fn random_names_avoid_taken_ones() {
        let tunnels = Tunnels::new(8, 3);
        for _ in 0..100 {
            tunnels.claim(None, Owner::Anonymous, url).unwrap();
        }
        assert_eq!(tunnels.list().len(), 100);
    }
}
