//! Accounts and the tokens that prove them.
//!
//! Everything a user owns (tunnels, held names, and next log entries,
//! webhooks and deliveries) is keyed on an [`AccountId`], never on a token:
//! the relay keeps only tokens' hashes, in [`Token`], where they are
//! checked. On a relay with `--token` flags each token is its own account,
//! whose id is derived from a hash of the token; a TOML tokens file
//! ([`file`]) names accounts, each with several tokens, reserved names, its
//! own tunnel limit and an admin flag, and may be reloaded while the relay
//! runs ([`Accounts::set_file`]).

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use ferry_common::subdomain::Subdomain;
use hyper::header::{self, HeaderMap};
use ring::rand::{SecureRandom, SystemRandom};
use sha2::{Digest, Sha256};

use crate::limits::RateLimit;

pub mod file;

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

    /// The account of a token known only by its hash (a `sha256:` line of
    /// a tokens file): the same id as [`AccountId::of_token`] gives.
    pub fn of_hash(hash: &TokenHash) -> Self {
        Self(format!("acct_{}", hex(&hash.0[..8])))
    }

    /// The account named `name` in a tokens file: `user_NAME`, which no
    /// token's `acct_` id can be, and which outlives any of its tokens.
    pub fn named(name: &str) -> Self {
        Self(format!("user_{name}"))
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
    hex(&Sha256::digest(secret.as_bytes())[..8])
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// The SHA-256 of a token: all the relay keeps of it. Tokens are long and
/// random, so a plain unsalted hash cannot be reversed by guessing (as
/// GitHub and Stripe keep theirs); a salt or a slow hash would only slow
/// every request.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TokenHash([u8; 32]);

impl TokenHash {
    /// What a tokens file writes before the hash's hex.
    pub const PREFIX: &'static str = "sha256:";

    /// The hash of `secret`.
    pub fn of(secret: &str) -> Self {
        Self(Sha256::digest(secret.as_bytes()).into())
    }

    /// Reads `sha256:` and 64 hex digits, as `ferry-relay hash-token`
    /// prints; `None` for anything else.
    pub fn parse(text: &str) -> Option<Self> {
        let digits = text.strip_prefix(Self::PREFIX)?.as_bytes();
        if digits.len() != 64 {
            return None;
        }
        let mut hash = [0u8; 32];
        for (byte, pair) in hash.iter_mut().zip(digits.chunks(2)) {
            let pair = std::str::from_utf8(pair).ok()?;
            *byte = u8::from_str_radix(pair, 16).ok()?;
        }
        Some(Self(hash))
    }

    /// Compares in time independent of where the first difference is, so
    /// that response timing does not leak a hash's prefix.
    fn same(&self, other: &Self) -> bool {
        self.0
            .iter()
            .zip(&other.0)
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
    }
}

impl fmt::Display for TokenHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", Self::PREFIX, hex(&self.0))
    }
}

impl fmt::Debug for TokenHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TokenHash({})", hex(&self.0[..4]))
    }
}

/// A bearer token, kept as its hash, and the account it proves.
#[derive(Clone, PartialEq, Eq)]
pub struct Token {
    /// The hash of the secret.
    hash: TokenHash,
    /// The account it belongs to.
    account: AccountId,
}

impl Token {
    /// A token that is its own account, as `--token` gives.
    pub fn new(secret: impl AsRef<str>) -> Self {
        let hash = TokenHash::of(secret.as_ref());
        Self::hashed(hash, AccountId::of_hash(&hash))
    }

    /// A token known by its hash, proving `account`.
    pub fn hashed(hash: TokenHash, account: AccountId) -> Self {
        Self { hash, account }
    }

    /// The account this token proves.
    pub fn account(&self) -> &AccountId {
        &self.account
    }

    /// The token's hash.
    pub fn hash(&self) -> &TokenHash {
        &self.hash
    }

    /// Whether `presented` is this token, compared by hash in constant time.
    pub fn matches(&self, presented: &str) -> bool {
        self.hash.same(&TokenHash::of(presented))
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Token({}, MASKED)", self.account)
    }
}

/// An account and what it may do: one per `--token`, one per line of a
/// line-form tokens file, one per `[[account]]` of a TOML one.
#[derive(Debug, Clone)]
pub struct Account {
    /// Who it is.
    pub id: AccountId,
    /// The tokens that prove it; several while one is being rotated.
    pub tokens: Vec<Token>,
    /// Names only this account may ever claim.
    pub subdomains: Vec<Subdomain>,
    /// Tunnels it may hold at once, instead of the relay's
    /// `max_tunnels_per_token`.
    pub max_tunnels: Option<usize>,
    /// Whether its API calls read every account's objects.
    pub admin: bool,
}

impl Account {
    /// The account of one `--token`.
    pub fn of_token(token: Token) -> Self {
        Self {
            id: token.account().clone(),
            tokens: vec![token],
            subdomains: Vec::new(),
            max_tunnels: None,
            admin: false,
        }
    }
}

/// Who made a call: the account its token proves, and that token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The account.
    pub account: AccountId,
    /// Whether the account is an admin.
    pub admin: bool,
    /// The token it used, so that removing the token ends what it opened.
    pub token: TokenHash,
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
    /// The token signed in with: the session ends when it is removed.
    token: TokenHash,
    started: Instant,
}

impl Sessions {
    fn key(cookie: &str) -> [u8; 32] {
        Sha256::digest(cookie.as_bytes()).into()
    }

    /// A new session's cookie, and whether older sessions ended to make
    /// room for it.
    fn start(&self, principal: &Principal) -> Option<(String, bool)> {
        let mut secret = [0u8; 32];
        SystemRandom::new().fill(&mut secret).ok()?;
        let cookie = hex(&secret);
        let account = principal.account.clone();
        let mut sessions = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        sessions.retain(|_, s| s.started.elapsed() < SESSION_LIFETIME);
        let mut own: Vec<_> = sessions
            .iter()
            .filter(|(_, s)| s.account == account)
            .map(|(key, s)| (s.started, *key))
            .collect();
        let evicted = own.len() >= SESSIONS_PER_ACCOUNT;
        if evicted {
            own.sort();
            for (_, key) in &own[..=own.len() - SESSIONS_PER_ACCOUNT] {
                sessions.remove(key);
            }
        }
        let started = Instant::now();
        let token = principal.token;
        sessions.insert(
            Self::key(&cookie),
            Session {
                account,
                token,
                started,
            },
        );
        Some((cookie, evicted))
    }

    fn find(&self, cookie: &str) -> Option<TokenHash> {
        self.find_key(&Self::key(cookie))
    }

    fn find_key(&self, key: &[u8; 32]) -> Option<TokenHash> {
        let sessions = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        sessions
            .get(key)
            .filter(|s| s.started.elapsed() < SESSION_LIFETIME)
            .map(|s| s.token)
    }

    /// Whether there was such a session.
    fn end(&self, cookie: &str) -> bool {
        let mut sessions = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        sessions.remove(&Self::key(cookie)).is_some()
    }

    /// Ends the sessions whose token `keep` refuses.
    fn retain(&self, keep: impl Fn(&TokenHash) -> bool) {
        let mut sessions = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        sessions.retain(|_, s| keep(&s.token));
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

/// How a lasting call (a live feed) proved itself, so that it can be
/// checked again while it lasts.
#[derive(Debug, Clone)]
pub struct Proof {
    /// Who it was let in as.
    pub principal: Principal,
    /// The key of the dashboard session it came with, if not a token.
    session: Option<[u8; 32]>,
}

/// The bearer token in `headers`, if any.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim())
}

/// Checks bearer tokens, and throttles addresses that keep guessing.
#[derive(Debug)]
pub struct Accounts {
    /// The accounts of `--token` flags, kept across reloads of the file.
    flags: Vec<Account>,
    /// Every account: the flags' and the tokens file's. Empty for an open
    /// relay.
    book: RwLock<Arc<Vec<Account>>>,
    /// Failed checks per address; only failures spend from it.
    failures: RateLimit,
    /// Dashboard sessions signed in with a token.
    sessions: Sessions,
    /// Told whenever the accounts change or a session ends, so that
    /// lasting calls check their caller again.
    changes: tokio::sync::watch::Sender<()>,
}

impl Accounts {
    /// The accounts of `tokens`, allowing `failures_per_minute` wrong tokens
    /// a minute from one address.
    pub fn new(tokens: Vec<Token>, failures_per_minute: u32) -> Self {
        let mut flags: Vec<Account> = Vec::new();
        for token in tokens {
            if flags.iter().any(|a| a.id == *token.account()) {
                tracing::warn!(account = %token.account(), "the same --token is given twice; it is one account");
                continue;
            }
            flags.push(Account::of_token(token));
        }
        Self {
            book: RwLock::new(Arc::new(flags.clone())),
            flags,
            failures: RateLimit::per_minute(failures_per_minute),
            sessions: Sessions::default(),
            changes: tokio::sync::watch::Sender::new(()),
        }
    }

    /// Replaces the tokens file's accounts with `file`, keeping the
    /// flags'. A line of the file that is also a `--token` is the same
    /// account and is left out, with a warning; a named account with a
    /// `--token` is refused, leaving the accounts as they were. Dashboard
    /// sessions of tokens no longer listed end; ending their tunnels is the
    /// caller's.
    pub fn set_file(&self, file: Vec<Account>) -> Result<(), String> {
        let flag = |hash: &TokenHash| {
            self.flags
                .iter()
                .flat_map(|a| &a.tokens)
                .any(|t| t.hash() == hash)
        };
        let (repeated, file): (Vec<Account>, Vec<Account>) = file.into_iter().partition(|a| {
            self.flags.iter().any(|f| f.id == a.id) && a.tokens.iter().all(|t| flag(t.hash()))
        });
        for account in repeated {
            tracing::warn!(
                account = %account.id,
                "a token of the tokens file is also given with --token; it is one account, listed once"
            );
        }
        if let Some(account) = file
            .iter()
            .find(|account| account.tokens.iter().any(|t| flag(t.hash())))
        {
            return Err(format!(
                "account {} has a token also given with --token: give each token once",
                account.id
            ));
        }
        let mut book = self.flags.clone();
        book.extend(file);
        let book = Arc::new(book);
        *self.book.write().unwrap_or_else(PoisonError::into_inner) = Arc::clone(&book);
        self.sessions
            .retain(|hash| principal_in(&book, hash).is_some());
        self.changes.send_replace(());
        Ok(())
    }

    /// Every account, as now configured.
    pub fn all(&self) -> Arc<Vec<Account>> {
        Arc::clone(&self.book.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Whether the relay is open (has no tokens).
    pub fn is_open(&self) -> bool {
        self.all().is_empty()
    }

    /// Who `token` proves now, if it is still one of the relay's.
    pub fn principal(&self, token: &TokenHash) -> Option<Principal> {
        principal_in(&self.all(), token)
    }

    /// The caller of the bearer token in `headers`: `Ok(None)` on an open
    /// relay. Tunnel clients prove themselves this way only, never with a
    /// dashboard session: a browser sends its cookies on a WebSocket
    /// handshake, whichever page opens it.
    pub fn authorize(
        &self,
        headers: &HeaderMap,
        from: IpAddr,
    ) -> Result<Option<Principal>, AuthError> {
        self.authorize_as(headers, from, None)
    }

    /// The caller of an API call: its bearer token, or else the dashboard
    /// session cookie (named for `https`). `Ok(None)` on an open relay.
    pub fn authorize_api(
        &self,
        headers: &HeaderMap,
        from: IpAddr,
        https: bool,
    ) -> Result<Option<Principal>, AuthError> {
        self.authorize_as(headers, from, Some(session_cookie_name(https)))
    }

    /// The caller of an API call that lasts, as [`Accounts::authorize_api`]
    /// finds it, with what it proved itself with: `Ok(None)` on an open
    /// relay.
    pub fn authorize_lasting(
        &self,
        headers: &HeaderMap,
        from: IpAddr,
        https: bool,
    ) -> Result<Option<Proof>, AuthError> {
        let Some(principal) = self.authorize_api(headers, from, https)? else {
            return Ok(None);
        };
        let session = match bearer(headers) {
            Some(_) => None,
            None => session_cookie(headers, session_cookie_name(https))?.map(Sessions::key),
        };
        Ok(Some(Proof { principal, session }))
    }

    /// Whether `proof` still lets its caller in as it did: its token is
    /// still listed for the same account with the same admin flag, and its
    /// dashboard session, if any, has not ended.
    pub fn holds(&self, proof: &Proof) -> bool {
        let token = proof.principal.token;
        proof
            .session
            .is_none_or(|key| self.sessions.find_key(&key) == Some(token))
            && self.principal(&token).as_ref() == Some(&proof.principal)
    }

    /// Changes whenever the accounts change or a dashboard session ends.
    pub fn changes(&self) -> tokio::sync::watch::Receiver<()> {
        self.changes.subscribe()
    }

    fn authorize_as(
        &self,
        headers: &HeaderMap,
        from: IpAddr,
        cookie: Option<&str>,
    ) -> Result<Option<Principal>, AuthError> {
        if self.is_open() {
            return Ok(None);
        }
        if let Some(wait) = self.failures.blocked(from) {
            return Err(AuthError::Throttled(wait));
        }
        let Some(presented) = bearer(headers) else {
            return match cookie {
                Some(name) => self.session(headers, name).map(Some),
                None => Err(AuthError::Missing),
            };
        };
        self.check(presented, from).map(Some)
    }

    /// The caller of a dashboard session. Tunnels are the relay's
    /// subdomains, so a tunnel's page is same-site with the dashboard and
    /// its browser would send the cookie: only the dashboard's own origin
    /// (or a navigation typed by the user) may use it.
    fn session(&self, headers: &HeaderMap, name: &str) -> Result<Principal, AuthError> {
        let Some(cookie) = session_cookie(headers, name)? else {
            return Err(AuthError::Missing);
        };
        let fetch_site = headers.get("sec-fetch-site").map(|v| v.as_bytes());
        if !matches!(fetch_site, None | Some(b"same-origin" | b"none")) {
            return Err(AuthError::ForeignPage);
        }
        self.sessions
            .find(cookie)
            .and_then(|token| self.principal(&token))
            .ok_or(AuthError::SessionEnded)
    }

    /// Checks `token` for a dashboard sign-in and starts a session for its
    /// account: the caller and the cookie's value.
    pub fn sign_in(&self, token: &str, from: IpAddr) -> Result<(Principal, String), AuthError> {
        if let Some(wait) = self.failures.blocked(from) {
            return Err(AuthError::Throttled(wait));
        }
        let principal = self.check(token.trim(), from)?;
        let (cookie, evicted) = self
            .sessions
            .start(&principal)
            .ok_or(AuthError::NoRandomness)?;
        if evicted {
            self.changes.send_replace(());
        }
        Ok((principal, cookie))
    }

    /// Ends the dashboard session in `headers`, if there is exactly one.
    pub fn sign_out(&self, headers: &HeaderMap, https: bool) {
        if let Ok(Some(cookie)) = session_cookie(headers, session_cookie_name(https)) {
            // Only a session that existed wakes the feeds, so a made-up
            // cookie cannot wake them all.
            if self.sessions.end(cookie) {
                self.changes.send_replace(());
            }
        }
    }

    /// The caller of `presented`; a wrong token spends from its address's
    /// allowance.
    fn check(&self, presented: &str, from: IpAddr) -> Result<Principal, AuthError> {
        match self.principal(&TokenHash::of(presented)) {
            Some(principal) => Ok(principal),
            None => {
                // This failure may be the one that blocks the address; the
                // answer is the same either way.
                let _ = self.failures.spend(from);
                Err(AuthError::Wrong)
            }
        }
    }
}

/// Who `token` proves among `book`. Every token is compared, in constant
/// time each.
fn principal_in(book: &[Account], token: &TokenHash) -> Option<Principal> {
    let mut found = None;
    for account in book {
        for known in &account.tokens {
            if known.hash().same(token) && found.is_none() {
                found = Some(Principal {
                    account: account.id.clone(),
                    admin: account.admin,
                    token: *token,
                });
            }
        }
    }
    found
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
            accounts
                .authorize(&bearer("right"), other)
                .map(|p| p.map(|p| p.account)),
            Ok(Some(AccountId::of_token("right")))
        );
    }

    #[test]
    fn a_lasting_call_stops_holding_once_its_session_ends() {
        let accounts = Accounts::new(vec![Token::new("right")], 10);
        let from = "192.0.2.1".parse().unwrap();
        let (_, cookie) = accounts.sign_in("right", from).unwrap();
        let mut headers = HeaderMap::new();
        headers.insert(
            hyper::header::COOKIE,
            HeaderValue::from_str(&format!("ferry_session={cookie}")).unwrap(),
        );
        let proof = accounts
            .authorize_lasting(&headers, from, false)
            .unwrap()
            .unwrap();
        let changes = accounts.changes();
        assert!(accounts.holds(&proof));
        accounts.sign_out(&headers, false);
        assert!(changes.has_changed().unwrap(), "lasting calls are woken");
        assert!(!accounts.holds(&proof));
        // The token itself still lets a new call in.
        headers.insert(AUTHORIZATION, HeaderValue::from_static("Bearer right"));
        let proof = accounts
            .authorize_lasting(&headers, from, false)
            .unwrap()
            .unwrap();
        assert!(accounts.holds(&proof));
    }

    #[test]
    fn signing_out_an_unknown_session_wakes_no_feed() {
        let accounts = Accounts::new(vec![Token::new("right")], 10);
        let mut headers = HeaderMap::new();
        headers.insert(
            hyper::header::COOKIE,
            HeaderValue::from_static("ferry_session=x"),
        );
        let changes = accounts.changes();
        accounts.sign_out(&headers, false);
        assert!(!changes.has_changed().unwrap(), "no session ended");
    }

    #[test]
    fn a_session_ended_by_a_newer_sign_in_wakes_its_feeds() {
        let accounts = Accounts::new(vec![Token::new("right")], 10);
        let from = "192.0.2.1".parse().unwrap();
        for _ in 0..super::SESSIONS_PER_ACCOUNT {
            accounts.sign_in("right", from).unwrap();
        }
        let changes = accounts.changes();
        accounts.sign_in("right", from).unwrap();
        assert!(changes.has_changed().unwrap(), "the oldest session ended");
    }

    #[test]
    fn a_token_both_in_the_flags_and_the_file_is_one_account() {
        let accounts = Accounts::new(vec![Token::new("a"), Token::new("a")], 10);
        assert_eq!(accounts.all().len(), 1);
        let file = super::file::parse("a\nb\n").unwrap();
        accounts.set_file(file).unwrap();
        let ids: Vec<_> = accounts.all().iter().map(|a| a.id.clone()).collect();
        assert_eq!(ids, [AccountId::of_token("a"), AccountId::of_token("b")]);
        // A named account holding a --token is a real conflict: which
        // account would the token prove?
        let named = format!(
            "[[account]]\nname = \"x\"\ntokens = [\"{}\"]\n",
            super::TokenHash::of("a")
        );
        let err = accounts
            .set_file(super::file::parse(&named).unwrap())
            .unwrap_err();
        assert!(err.contains("also given with --token"), "{err}");
        assert_eq!(accounts.all().len(), 2, "the accounts stay as they were");
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
