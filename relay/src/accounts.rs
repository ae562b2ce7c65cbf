//! Accounts and the tokens that prove them.
//!
//! Everything a user owns (tunnels, held names, and next log entries,
//! webhooks and deliveries) is keyed on an [`AccountId`], never on a token:
//! the secret is held once, in [`Token`], where it is checked. On a relay
//! with `--token` flags each token is its own account, whose id is derived
//! from a hash of the token.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use hyper::header::{self, HeaderMap};
use ring::rand::{SecureRandom, SystemRandom};
use sha2::{Digest, Sha256};

use crate::limits::RateLimit;

/// Who owns something on the relay. Survives token rotation once a tokens
/// file maps several tokens to one account.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AccountId(String);

impl AccountId {
    /// The account of a token given with `--token`: `acct_` and the first 64
    /// bits of the token's SHA-256, so the id reveals nothing of the token.
    pub fn of_token(secret: &str) -> Self {
        Self(format!("acct_{}", short_hash(secret)))
    }

    /// An id read back from the store.
    pub(crate) fn from_stored(id: &str) -> Self {
        Self(id.to_owned())
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for AccountId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The first 64 bits of the SHA-256 of `secret`, in hex.
pub(crate) fn short_hash(secret: &str) -> String {
    Sha256::digest(secret.as_bytes())
        .iter()
        .take(8)
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

/// A secret bearer token and the account it proves. `Debug` never shows
/// the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct Token {
    /// The secret.
    secret: String,
    /// The account it belongs to.
    account: AccountId,
}

impl Token {
    /// A token that is its own account, as `--token` gives.
    pub fn new(secret: impl Into<String>) -> Self {
        let secret = secret.into();
        let account = AccountId::of_token(&secret);
        Self { secret, account }
    }

    /// The account this token proves.
    pub fn account(&self) -> &AccountId {
        &self.account
    }

    /// Compares in time independent of where the first difference is, so
    /// that response timing does not leak a token's prefix.
    pub fn matches(&self, presented: &str) -> bool {
        let (a, b) = (self.secret.as_bytes(), presented.as_bytes());
        a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Token({}, MASKED)", self.account)
    }
}

/// Why a caller was not let in.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    /// No bearer token was presented.
    #[error("this relay needs a token: pass --token TOKEN to ferry (or set FERRY_TOKEN), or send `Authorization: Bearer TOKEN`")]
    Missing,
    /// The token is not one of the relay's.
    #[error("the token was not accepted by this relay: check --token or FERRY_TOKEN")]
    Wrong,
    /// Too many wrong tokens came from this address.
    #[error("too many wrong tokens from your address: wait {} s and check the token", .0.as_secs().max(1))]
    Throttled(Duration),
    /// A session cookie the relay does not know (signed out, expired, or
    /// from before a restart).
    #[error("your dashboard session has ended: sign in again with your token")]
    SessionEnded,
    /// A session cookie sent by a page of another site (a tunnel's page
    /// included): only the dashboard itself may use it.
    #[error("the dashboard session may only be used by the dashboard's own pages")]
    ForeignPage,
    /// More than one session cookie: a page of a tunnel (a subdomain) may
    /// have planted one beside the dashboard's.
    #[error("your browser sent two dashboard session cookies, one perhaps planted by a tunnel's page: clear this site's cookies and sign in again (serving the relay over HTTPS prevents this)")]
    AmbiguousSession,
    /// The operating system's random source failed, so no session id
    /// could be made.
    #[error("the relay could not make a session id (its random source failed): try again, and see the relay's log")]
    NoRandomness,
}

/// The dashboard's session cookie over HTTPS. The `__Host-` prefix makes
/// browsers refuse it from anyone but the relay's own host, so a tunnel's
/// page (a subdomain) cannot plant its own session on the dashboard.
pub const SECURE_SESSION_COOKIE: &str = "__Host-ferry_session";

/// The dashboard's session cookie over plain HTTP, where that prefix is
/// not available.
pub const PLAIN_SESSION_COOKIE: &str = "ferry_session";

/// The session cookie's name for a call over HTTPS or not.
pub fn session_cookie_name(https: bool) -> &'static str {
    if https {
        SECURE_SESSION_COOKIE
    } else {
        PLAIN_SESSION_COOKIE
    }
}

/// How long a dashboard session lasts after sign-in.
pub const SESSION_LIFETIME: Duration = Duration::from_secs(7 * 24 * 3600);

/// Sessions one account may hold at once; signing in again ends its
/// oldest, so repeated sign-ins cannot grow the table.
const SESSIONS_PER_ACCOUNT: usize = 16;

/// Dashboard sessions, in memory: a restart signs everyone out. Keyed on
/// the SHA-256 of the cookie, so the table holds no usable secret.
#[derive(Debug, Default)]
struct Sessions(Mutex<HashMap<[u8; 32], Session>>);

#[derive(Debug)]
struct Session {
    account: AccountId,
    started: Instant,
}

impl Sessions {
    fn key(cookie: &str) -> [u8; 32] {
        Sha256::digest(cookie.as_bytes()).into()
    }

    fn start(&self, account: AccountId) -> Option<String> {
        let mut secret = [0u8; 32];
        SystemRandom::new().fill(&mut secret).ok()?;
        let cookie: String = secret.iter().map(|byte| format!("{byte:02x}")).collect();
        let mut sessions = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        sessions.retain(|_, s| s.started.elapsed() < SESSION_LIFETIME);
        let mut own: Vec<_> = sessions
            .iter()
            .filter(|(_, s)| s.account == account)
            .map(|(key, s)| (s.started, *key))
            .collect();
        if own.len() >= SESSIONS_PER_ACCOUNT {
            own.sort();
            for (_, key) in &own[..=own.len() - SESSIONS_PER_ACCOUNT] {
                sessions.remove(key);
            }
        }
        let started = Instant::now();
        sessions.insert(Self::key(&cookie), Session { account, started });
        Some(cookie)
    }

    fn find(&self, cookie: &str) -> Option<AccountId> {
        let sessions = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        sessions
            .get(&Self::key(cookie))
            .filter(|s| s.started.elapsed() < SESSION_LIFETIME)
            .map(|s| s.account.clone())
    }

    fn end(&self, cookie: &str) {
        let mut sessions = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        sessions.remove(&Self::key(cookie));
    }
}

/// The value of the session cookie `name` in `headers`, if any; more than
/// one is an error, since only one can be the dashboard's.
pub fn session_cookie<'h>(
    headers: &'h HeaderMap,
    name: &str,
) -> Result<Option<&'h str>, AuthError> {
    let mut values = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .filter(|(found, _)| *found == name)
        .map(|(_, value)| value.trim());
    let first = values.next();
    if values.next().is_some() {
        return Err(AuthError::AmbiguousSession);
    }
    Ok(first)
}

/// Checks bearer tokens, and throttles addresses that keep guessing.
#[derive(Debug)]
pub struct Accounts {
    /// The relay's tokens; empty for an open relay.
    tokens: Vec<Token>,
    /// Failed checks per address; only failures spend from it.
    failures: RateLimit,
    /// Dashboard sessions signed in with a token.
    sessions: Sessions,
}

impl Accounts {
    /// The accounts of `tokens`, allowing `failures_per_minute` wrong tokens
    /// a minute from one address.
    pub fn new(tokens: Vec<Token>, failures_per_minute: u32) -> Self {
        Self {
            tokens,
            failures: RateLimit::per_minute(failures_per_minute),
            sessions: Sessions::default(),
        }
    }

    /// Whether the relay is open (has no tokens).
    pub fn is_open(&self) -> bool {
        self.tokens.is_empty()
    }

    /// The account of the bearer token in `headers`: `Ok(None)` on an open
    /// relay. Tunnel clients prove themselves this way only, never with a
    /// dashboard session: a browser sends its cookies on a WebSocket
    /// handshake, whichever page opens it.
    pub fn authorize(
        &self,
        headers: &HeaderMap,
        from: IpAddr,
    ) -> Result<Option<AccountId>, AuthError> {
        self.authorize_as(headers, from, None)
    }

    /// The account of an API call: its bearer token, or else the dashboard
    /// session cookie (named for `https`). `Ok(None)` on an open relay.
    pub fn authorize_api(
        &self,
        headers: &HeaderMap,
        from: IpAddr,
        https: bool,
    ) -> Result<Option<AccountId>, AuthError> {
        self.authorize_as(headers, from, Some(session_cookie_name(https)))
    }

    fn authorize_as(
        &self,
        headers: &HeaderMap,
        from: IpAddr,
        cookie: Option<&str>,
    ) -> Result<Option<AccountId>, AuthError> {
        if self.is_open() {
            return Ok(None);
        }
        if let Some(wait) = self.failures.blocked(from) {
            return Err(AuthError::Throttled(wait));
        }
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim());
        let Some(presented) = presented else {
            return match cookie {
                Some(name) => self.session(headers, name).map(Some),
                None => Err(AuthError::Missing),
            };
        };
        self.check(presented, from).map(Some)
    }

    /// The account of a dashboard session. Tunnels are the relay's
    /// subdomains, so a tunnel's page is same-site with the dashboard and
    /// its browser would send the cookie: only the dashboard's own origin
    /// (or a navigation typed by the user) may use it.
    fn session(&self, headers: &HeaderMap, name: &str) -> Result<AccountId, AuthError> {
        let Some(cookie) = session_cookie(headers, name)? else {
            return Err(AuthError::Missing);
        };
        let fetch_site = headers.get("sec-fetch-site").map(|v| v.as_bytes());
        if !matches!(fetch_site, None | Some(b"same-origin" | b"none")) {
            return Err(AuthError::ForeignPage);
        }
        self.sessions.find(cookie).ok_or(AuthError::SessionEnded)
    }

    /// Checks `token` for a dashboard sign-in and starts a session for its
    /// account: the cookie's value.
    pub fn sign_in(&self, token: &str, from: IpAddr) -> Result<(AccountId, String), AuthError> {
        if let Some(wait) = self.failures.blocked(from) {
            return Err(AuthError::Throttled(wait));
        }
        let account = self.check(token.trim(), from)?;
        let cookie = self
            .sessions
            .start(account.clone())
            .ok_or(AuthError::NoRandomness)?;
        Ok((account, cookie))
    }

    /// Ends the dashboard session in `headers`, if there is exactly one.
    pub fn sign_out(&self, headers: &HeaderMap, https: bool) {
        if let Ok(Some(cookie)) = session_cookie(headers, session_cookie_name(https)) {
            self.sessions.end(cookie);
        }
    }

    /// The account of `presented`; a wrong token spends from its
    /// address's allowance.
    fn check(&self, presented: &str, from: IpAddr) -> Result<AccountId, AuthError> {
        match self.tokens.iter().find(|token| token.matches(presented)) {
            Some(token) => Ok(token.account().clone()),
            None => {
                // This failure may be the one that blocks the address; the
                // answer is the same either way.
                let _ = self.failures.spend(from);
                Err(AuthError::Wrong)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use hyper::header::{HeaderMap, HeaderValue, AUTHORIZATION};

    use super::{AccountId, Accounts, AuthError, Token};

    #[test]
    fn tokens_compare_exactly_and_never_print() {
        let token = Token::new("s3cret");
        assert!(token.matches("s3cret"));
        assert!(!token.matches("s3cre"));
        assert!(!token.matches("s3cret!"));
        assert!(!token.matches("S3cret"));
        assert!(!format!("{token:?}").contains("s3cret"));
        assert_eq!(token.account(), &AccountId::of_token("s3cret"));
        assert_ne!(token.account(), &AccountId::of_token("other"));
        assert!(!token.account().to_string().contains("s3cret"));
    }

    #[test]
    fn wrong_tokens_are_throttled_per_address() {
        let accounts = Accounts::new(vec![Token::new("right")], 3);
        let bearer = |token: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(
                AUTHORIZATION,
                HeaderValue::from_str(&format!("Bearer {token}")).unwrap(),
            );
            headers
        };
        let (guesser, other) = ("192.0.2.1".parse().unwrap(), "192.0.2.2".parse().unwrap());
        assert_eq!(
            accounts.authorize(&HeaderMap::new(), guesser),
            Err(AuthError::Missing)
        );
        for _ in 0..3 {
            assert_eq!(
                accounts.authorize(&bearer("wrong"), guesser),
                Err(AuthError::Wrong)
            );
        }
        assert!(
            matches!(
                accounts.authorize(&bearer("right"), guesser),
                Err(AuthError::Throttled(_))
            ),
            "even the right token waits once an address is blocked"
        );
        assert_eq!(
            accounts.authorize(&bearer("right"), other),
            Ok(Some(AccountId::of_token("right")))
        );
    }

    #[test]
    fn over_https_only_the_host_prefixed_cookie_is_a_session() {
        let accounts = Accounts::new(vec![Token::new("right")], 10);
        let from = "192.0.2.1".parse().unwrap();
        let (account, cookie) = accounts.sign_in("right", from).unwrap();
        let with = |cookie: String| {
            let mut headers = HeaderMap::new();
            headers.insert(
                hyper::header::COOKIE,
                HeaderValue::from_str(&cookie).unwrap(),
            );
            headers
        };
        // A subdomain can set `ferry_session` for the whole domain, but not
        // a `__Host-` cookie: over HTTPS only that one counts.
        let plain = with(format!("ferry_session={cookie}"));
        assert_eq!(
            accounts.authorize_api(&plain, from, true),
            Err(AuthError::Missing)
        );
        assert_eq!(
            accounts.authorize_api(&plain, from, false),
            Ok(Some(account.clone()))
        );
        let host = with(format!("__Host-ferry_session={cookie}"));
        assert_eq!(accounts.authorize_api(&host, from, true), Ok(Some(account)));
        // Tunnel clients never sign in with a dashboard session.
        assert_eq!(accounts.authorize(&host, from), Err(AuthError::Missing));
        assert_eq!(accounts.authorize(&plain, from), Err(AuthError::Missing));
    }
}
