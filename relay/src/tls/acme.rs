//! `--acme-email`: a certificate for DOMAIN and *.DOMAIN from an ACME CA
//! (RFC 8555; Let's Encrypt by default), proven with DNS-01 challenges that
//! the relay's own DNS server ([`crate::dns`]) answers, kept in
//! DATA_DIR/acme and renewed before it expires.
//!
//! The account key, the certificate and its key are files in [`DIR`]; a
//! renewed certificate is written over them and handed to the
//! [`CertResolver`] at once, so new handshakes get it while open
//! connections and tunnels carry on.
//!
//! In a fleet (`--database-url`, [`Acme::with_fleet`]) the account and the
//! certificate live in the shared database, and the files are this relay's
//! copy: one relay orders at a time, under the database's lock, and the
//! others take what it stored. Its challenges are opened in the database
//! too, and every relay's DNS server answers them ([`mirror`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, BodyWrapper, ChallengeType, Identifier,
    LetsEncrypt, NewAccount, NewOrder, OrderStatus, RetryPolicy,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{private_dir, write_synced, CertResolver, TlsFiles};
use crate::dns::Challenges;
use crate::store::postgres::Postgres;
use crate::store::StoreError;

/// The folder inside the data directory.
pub const DIR: &str = "acme";
/// The ACME account: its key and URL, and the directory it belongs to.
pub const ACCOUNT: &str = "account.json";
/// The certificate chain the relay serves.
pub const CERT: &str = "cert.pem";
/// Its private key.
pub const KEY: &str = "key.pem";

/// Let's Encrypt's production directory, the default.
pub const LETS_ENCRYPT: &str = LetsEncrypt::Production.url();
/// Let's Encrypt's staging directory (`--acme-staging`): untrusted
/// certificates, generous rate limits.
pub const LETS_ENCRYPT_STAGING: &str = LetsEncrypt::Staging.url();
/// Renew this long before expiry (Let's Encrypt's advice for its 90-day
/// certificates).
pub const DEFAULT_RENEW_BEFORE: Duration = Duration::from_secs(30 * 86_400);
/// How long one issuance (account, order, challenges, finalization) may
/// take before it counts as failed and is retried.
const ISSUE_TIMEOUT: Duration = Duration::from_secs(300);
/// How long the CA may take to validate the challenges, and to sign.
const ORDER_TIMEOUT: Duration = Duration::from_secs(120);
/// The first wait after a failed issuance; it doubles up to [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_secs(30);
/// The first wait against Let's Encrypt's directories: each attempt may
/// fail one validation per name, and 15 minutes doubling leaves at most 3
/// attempts in any hour, clear of its limit of 5 failed validations per
/// name and hour.
pub const RETRY_FIRST_LETS_ENCRYPT: Duration = Duration::from_secs(15 * 60);
/// The longest wait between attempts.
const RETRY_MAX: Duration = Duration::from_secs(3600);
/// The wait after issuing a certificate that is already due (a clock ahead
/// of the CA's), which no retry soon would fix: each such issuance is a
/// duplicate certificate, and 2 days apart (less a tenth at most) make at
/// most 4 in any week, under Let's Encrypt's limit of 5.
const SKEWED_RETRY: Duration = Duration::from_secs(2 * 24 * 3600);
/// The longest the renewal task sleeps before looking again, so that a
/// suspended machine or a changed clock does not postpone a renewal.
const RENEW_CHECK: Duration = Duration::from_secs(3600);
/// How often a fleet relay's DNS server loads the open challenges even
/// without a notification, and says it is still running.
const MIRROR_BEAT: Duration = Duration::from_secs(10);
/// How long a DNS server counts as running after it last said so: an order
/// waits for it that long at most once it stopped.
const MIRROR_ALIVE: Duration = crate::dns::FLEET_CHALLENGES_FRESH;
/// How long an order waits for every running DNS server of the fleet to
/// load a challenge before it gives up (and tries again later) rather than
/// have the CA ask one that cannot answer.
const PROPAGATION_TIMEOUT: Duration = Duration::from_secs(45);
/// How often an order looks whether the DNS servers loaded its challenge.
const PROPAGATION_POLL: Duration = Duration::from_millis(50);

/// What the ACME client needs.
#[derive(Debug, Clone)]
pub struct AcmeConfig {
    /// The relay's domain: the certificate covers it and `*.`it.
    pub domain: String,
    /// The ACME directory URL.
    pub directory: String,
    /// The account's contact address, if any.
    pub email: Option<String>,
    /// A PEM file of CA certificates to trust for the ACME server's own
    /// HTTPS besides the public roots (a private CA, pebble's test CA).
    pub ca_file: Option<PathBuf>,
    /// How long before expiry to renew; at most a third of the
    /// certificate's lifetime is used, so a CA's short-lived certificates
    /// are not renewed in a loop.
    pub renew_before: Duration,
}

/// Why a certificate could not be had.
#[derive(Debug, thiserror::Error)]
pub enum AcmeError {
    /// A file in the ACME folder could not be written.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file or folder.
        path: PathBuf,
        /// What the system said.
        source: std::io::Error,
    },
    /// The account file is unreadable.
    #[error(
        "the ACME account in {path} cannot be used ({cause}): delete it to register a new account"
    )]
    Account {
        /// The file.
        path: PathBuf,
        /// Why.
        cause: String,
    },
    /// `--acme-ca` holds no usable certificate.
    #[error("--acme-ca {path}: {cause}")]
    CaFile {
        /// The file.
        path: PathBuf,
        /// Why.
        cause: String,
    },
    /// The CA refused or failed a step.
    #[error("the ACME server at {directory} failed while {step}: {cause}")]
    Ca {
        /// The directory URL.
        directory: String,
        /// What was being done.
        step: &'static str,
        /// What it said.
        cause: String,
    },
    /// An authorization could not be proven.
    #[error("the ACME server could not validate {name} ({status}): check that DOMAIN's NS record delegates it to this relay's --dns-listen, reachable on port 53 from the internet")]
    Invalid {
        /// The name.
        name: String,
        /// The state it ended in, or the CA's reason.
        status: String,
    },
    /// The whole issuance took too long.
    #[error("no certificate within {0:?}")]
    Timeout(Duration),
    /// The fleet's database failed.
    #[error("the fleet's database failed while {step}: {source}")]
    Fleet {
        /// What was being done.
        step: &'static str,
        /// What it said.
        source: StoreError,
    },
    /// Another relay's order failed lately: the fleet waits before the next.
    #[error("an order of the fleet failed lately (see that relay's log); the next is made in {} s", .0.as_secs())]
    Deferred(Duration),
    /// Some relays' DNS servers did not load a challenge in time.
    #[error("the DNS servers of relays {relays} did not load the challenge within {PROPAGATION_TIMEOUT:?}: check their connection to the database")]
    Propagation {
        /// Their ids, comma-separated.
        relays: String,
    },
    /// A key or a certificate signing request could not be made.
    #[error("cannot make the certificate's key: {0}")]
    Generate(#[from] rcgen::Error),
}

/// Obtains and renews the relay's certificate.
pub struct Acme {
    /// The settings.
    config: AcmeConfig,
    /// DATA_DIR/acme.
    dir: PathBuf,
    /// Where challenge values are published for the DNS server.
    challenges: Challenges,
    /// The HTTPS client that talks to the CA.
    http: Client<hyper_rustls::HttpsConnector<HttpConnector>, BodyWrapper<Bytes>>,
    /// Counts the renewed certificates now served, for whoever waits for
    /// one.
    renewed: tokio::sync::watch::Sender<u64>,
    /// The first wait after a failure ([`retry_first`]).
    retry_first: Duration,
    /// In a fleet, the shared database.
    fleet: Option<Fleet>,
}

/// The fleet's database, and a counter bumped when its ACME state changes.
struct Fleet {
    store: Postgres,
    changes: watch::Receiver<u64>,
}

/// Maps a database error to [`AcmeError::Fleet`] for `step`.
fn fleet_error(step: &'static str) -> impl Fn(StoreError) -> AcmeError {
    move |source| AcmeError::Fleet { step, source }
}

impl std::fmt::Debug for Acme {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Acme")
            .field("config", &self.config)
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl Acme {
    /// Prepares DATA_DIR/acme and the HTTPS client that trusts the public
    /// roots and `--acme-ca`.
    pub fn new(
        config: AcmeConfig,
        data_dir: &Path,
        challenges: Challenges,
    ) -> Result<Self, AcmeError> {
        let dir = data_dir.join(DIR);
        private_dir(&dir).map_err(|source| AcmeError::Write {
            path: dir.clone(),
            source,
        })?;
        let roots =
            super::roots_with(config.ca_file.as_deref()).map_err(|cause| AcmeError::CaFile {
                path: config.ca_file.clone().unwrap_or_default(),
                cause,
            })?;
        let tls = rustls::ClientConfig::builder_with_provider(super::provider())
            .with_safe_default_protocol_versions()
            .expect("ring supports TLS 1.2 and 1.3")
            .with_root_certificates(roots)
            .with_no_client_auth();
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_only()
            .enable_http1()
            .enable_http2()
            .build();
        let acme = Self {
            http: Client::builder(TokioExecutor::new()).build(connector),
            retry_first: retry_first(&config.directory),
            config,
            dir,
            challenges,
            renewed: tokio::sync::watch::Sender::new(0),
            fleet: None,
        };
        acme.finish_interrupted_write()?;
        Ok(acme)
    }

    /// Completes a certificate write that a crash interrupted between its
    /// two renames (see [`Self::issue`]): the new key is in place and the
    /// new certificate, matching it, is still in its temporary file.
    fn finish_interrupted_write(&self) -> Result<(), AcmeError> {
        let files = self.files();
        let pending = files.cert.with_extension("new");
        let (Ok(cert), Ok(key)) = (std::fs::read(&pending), std::fs::read(&files.key)) else {
            return Ok(());
        };
        if super::certified_key(&files, &(cert, key)).is_ok() {
            tracing::info!(path = %pending.display(), "finishing an interrupted certificate write");
            rename(&pending, &files.cert)?;
        }
        Ok(())
    }

    /// Shares the account and the certificate with the relays of a fleet
    /// through `store`.
    pub fn with_fleet(mut self, store: Postgres) -> Self {
        self.fleet = Some(Fleet {
            changes: store.follow_acme(),
            store,
        });
        self
    }

    /// In a fleet, takes the certificate in the database when it is usable
    /// and lasts longer than the copy on disk; returns whether it did. A
    /// copy on disk that lasts longer (one whose storing failed, or one from
    /// before the relay joined the fleet) is stored for the others.
    pub async fn pull(&self) -> Result<bool, AcmeError> {
        let Some(fleet) = &self.fleet else {
            return Ok(false);
        };
        let shared = fleet
            .store
            .acme_certificate(&self.config.domain)
            .await
            .map_err(fleet_error("reading the certificate"))?
            .map(|(cert, key)| (cert.into_bytes(), key.into_bytes()));
        let shared_until = shared
            .as_ref()
            .and_then(|(cert, key)| self.validity(cert, key))
            .map(|(_, until)| until);
        let local_until = self.stored().map(|(_, until)| until);
        match (shared, shared_until, local_until) {
            (Some((cert, key)), Some(shared), local)
                if local.is_none_or(|local| shared > local) =>
            {
                self.write_pair(&cert, &key)?;
                tracing::info!(domain = %self.config.domain, "tls certificate taken from the fleet's database");
                Ok(true)
            }
            (_, shared, Some(local)) if shared.is_none_or(|shared| local > shared) => {
                self.push(fleet).await?;
                Ok(false)
            }
            _ => Ok(false),
        }
    }

    /// Stores the certificate on disk in the fleet's database.
    async fn push(&self, fleet: &Fleet) -> Result<(), AcmeError> {
        let files = self.files();
        let read = |path: &Path| {
            std::fs::read_to_string(path).map_err(|source| AcmeError::Write {
                path: path.to_owned(),
                source,
            })
        };
        fleet
            .store
            .save_acme_certificate(&self.config.domain, &read(&files.cert)?, &read(&files.key)?)
            .await
            .map_err(fleet_error("storing the certificate"))?;
        tracing::info!(domain = %self.config.domain, "tls certificate stored for the fleet");
        Ok(())
    }

    /// Sees the count of renewed certificates served by [`Self::renew_until`]
    /// go up.
    pub fn renewals(&self) -> tokio::sync::watch::Receiver<u64> {
        self.renewed.subscribe()
    }

    /// The certificate's files.
    pub fn files(&self) -> TlsFiles {
        TlsFiles {
            cert: self.dir.join(CERT),
            key: self.dir.join(KEY),
        }
    }

    /// The validity (not before, not after) of the certificate on disk, if
    /// it is for the domain and its wildcard and its key matches.
    fn stored(&self) -> Option<(SystemTime, SystemTime)> {
        let files = self.files();
        let pem = std::fs::read(&files.cert).ok()?;
        let key = std::fs::read(&files.key).ok()?;
        self.validity(&pem, &key)
    }

    /// The validity (not before, not after) of the certificate `pem`, if
    /// it is for the domain and its wildcard and `key` matches it.
    fn validity(&self, pem: &[u8], key: &[u8]) -> Option<(SystemTime, SystemTime)> {
        // A pair that cannot be served (an interrupted write) is replaced.
        super::certified_key(&self.files(), &(pem.to_vec(), key.to_vec())).ok()?;
        let leaf = CertificateDer::pem_slice_iter(pem).next()?.ok()?;
        let (_, cert) = x509_parser::parse_x509_certificate(&leaf).ok()?;
        let wildcard = format!("*.{}", self.config.domain);
        let names: Vec<String> = cert
            .subject_alternative_name()
            .ok()
            .flatten()
            .map(|san| {
                san.value
                    .general_names
                    .iter()
                    .filter_map(|name| match name {
                        x509_parser::extensions::GeneralName::DNSName(name) => {
                            Some(name.to_ascii_lowercase())
                        }
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default();
        if !names.contains(&self.config.domain) || !names.contains(&wildcard) {
            return None;
        }
        let at = |seconds: i64| {
            SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(seconds).unwrap_or(0))
        };
        Some((
            at(cert.validity().not_before.timestamp()),
            at(cert.validity().not_after.timestamp()),
        ))
    }

    /// When the certificate on disk should be renewed; `None` when there is
    /// none usable for the domain, which calls for one now.
    pub fn renewal_time(&self) -> Option<SystemTime> {
        self.stored().map(|(not_before, not_after)| {
            renewal_time(not_before, not_after, self.config.renew_before)
        })
    }

    /// Whether the certificate on disk can be served now, due for renewal
    /// or not: a relay restarted while the CA is unreachable keeps serving
    /// it, and renewal is the renewal task's business.
    pub fn servable(&self) -> bool {
        self.stored()
            .is_some_and(|(_, not_after)| not_after > SystemTime::now())
    }

    /// Returns the certificate's files: at once when the one on disk needs
    /// no renewal yet, else once a new one is issued, retrying failures
    /// with backoff until `shutdown` (then `None`), which also stops an
    /// issuance under way.
    pub async fn ensure(&self, shutdown: &CancellationToken) -> Option<TlsFiles> {
        let mut failures = 0;
        loop {
            if let Err(err) = self.pull().await {
                tracing::warn!(%err, "the fleet's certificate could not be read");
            }
            if self.renewal_time().is_some_and(|at| at > SystemTime::now()) {
                return Some(self.files());
            }
            // Shutdown drops the issuance mid-way; its challenge values are
            // withdrawn as it is dropped (`Published`), and its turn ends.
            let issued = tokio::select! {
                issued = self.issue_in_turn() => issued,
                () = shutdown.cancelled() => return None,
            };
            match issued {
                // Served as it is even if already "due" (a clock ahead of
                // the CA's): asking again at once would only repeat it.
                Ok(()) => return Some(self.files()),
                // The fleet's backoff, not a failure of this relay's.
                Err(AcmeError::Deferred(wait)) => {
                    tracing::info!(retry_in = ?wait, "waiting for the fleet's next acme order");
                    tokio::select! {
                        () = tokio::time::sleep(wait.min(RETRY_MAX)) => {}
                        () = shutdown.cancelled() => return None,
                    }
                }
                Err(err) => {
                    let wait = retry_delay(self.retry_first, failures, rand::random());
                    failures += 1;
                    tracing::error!(%err, retry_in = ?wait, "no certificate from the ACME server");
                    tokio::select! {
                        () = tokio::time::sleep(wait) => {}
                        () = shutdown.cancelled() => return None,
                    }
                }
            }
        }
    }

    /// Renews the certificate when it is due, hands each new one to
    /// `resolver`, until `shutdown`. A failed renewal is retried with
    /// backoff while the old certificate is served.
    /// In a fleet, a certificate another relay stored is served as soon as
    /// the database says so.
    pub async fn renew_until(self, resolver: Arc<CertResolver>, shutdown: CancellationToken) {
        let mut changes = self.fleet.as_ref().map(|fleet| fleet.changes.clone());
        loop {
            let wait = self.renewal_time().map_or(Duration::ZERO, |at| {
                at.duration_since(SystemTime::now())
                    .unwrap_or(Duration::ZERO)
            });
            if !wait.is_zero() {
                tokio::select! {
                    () = tokio::time::sleep(wait.min(RENEW_CHECK)) => {}
                    () = changed(&mut changes) => {}
                    () = shutdown.cancelled() => return,
                }
                match self.pull().await {
                    Ok(true) => self.serve_renewed(&resolver),
                    Ok(false) => {}
                    Err(err) => tracing::warn!(%err, "the fleet's certificate could not be read"),
                }
                continue;
            }
            tracing::info!(domain = %self.config.domain, "renewing the tls certificate");
            if self.ensure(&shutdown).await.is_none() {
                return;
            }
            self.serve_renewed(&resolver);
            let renew_at = self.renewal_time();
            let Some(wait) = wait_after_issue(renew_at, SystemTime::now(), rand::random()) else {
                continue;
            };
            tracing::error!(
                now = %humantime::format_rfc3339_seconds(SystemTime::now()),
                renew_at = %renew_at.map_or_else(|| "-".to_owned(), |at| humantime::format_rfc3339_seconds(at).to_string()),
                retry_in = ?wait,
                "the certificate just issued is already due for renewal by this machine's clock: the clock is probably ahead of the CA's (check NTP); asking again later"
            );
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = shutdown.cancelled() => return,
            }
        }
    }

    /// Hands the certificate on disk to `resolver`.
    fn serve_renewed(&self, resolver: &CertResolver) {
        match resolver.reload_if_changed() {
            Ok(_) => {
                tracing::info!("renewed tls certificate now served");
                self.renewed.send_modify(|count| *count += 1);
            }
            Err(err) => tracing::error!(%err, "renewed tls certificate not loaded"),
        }
    }

    /// One issuance; in a fleet, in this relay's turn, and only when no
    /// other relay stored a certificate meanwhile, which is then kept.
    async fn issue_in_turn(&self) -> Result<(), AcmeError> {
        let Some(fleet) = &self.fleet else {
            return self.issue().await;
        };
        let _turn = fleet
            .store
            .acme_order_lock(&self.config.domain)
            .await
            .map_err(fleet_error("waiting for its turn to order"))?;
        if self.pull().await? && self.renewal_time().is_some_and(|at| at > SystemTime::now()) {
            return Ok(());
        }
        // Failures count for the fleet: relays taking turns would
        // otherwise each fail against the CA's limits.
        let domain = &self.config.domain;
        let (failures, wait) = fleet
            .store
            .acme_order_backoff(domain)
            .await
            .map_err(fleet_error("reading the fleet's failed orders"))?;
        if !wait.is_zero() {
            return Err(AcmeError::Deferred(wait));
        }
        if let Err(err) = self.issue().await {
            let wait = retry_delay(self.retry_first, failures, rand::random());
            if let Err(err) = fleet
                .store
                .acme_order_failed(domain, failures + 1, wait)
                .await
            {
                tracing::warn!(%err, "the failed order is not recorded for the fleet");
            }
            return Err(err);
        }
        if let Err(err) = fleet.store.acme_order_succeeded(domain).await {
            tracing::warn!(%err, "the fleet's failed orders are not cleared");
        }
        // The certificate is this relay's now whatever happens next; the
        // others get it once it is stored, at this relay's next look.
        if let Err(err) = self.push(fleet).await {
            tracing::warn!(%err, "the new certificate is served here, and stored for the fleet later");
        }
        Ok(())
    }

    /// One issuance: account, order, challenges, finalization; writes the
    /// certificate and key. Challenge records are withdrawn whatever the
    /// outcome.
    pub async fn issue(&self) -> Result<(), AcmeError> {
        let mut published = Published {
            challenges: &self.challenges,
            values: Vec::new(),
            fleet: self
                .fleet
                .as_ref()
                .map(|fleet| (fleet.store.clone(), self.config.domain.clone())),
        };
        tokio::time::timeout(ISSUE_TIMEOUT, self.issue_with(&mut published))
            .await
            .map_err(|_| AcmeError::Timeout(ISSUE_TIMEOUT))?
    }

    async fn issue_with(&self, published: &mut Published<'_>) -> Result<(), AcmeError> {
        let started = std::time::Instant::now();
        let ca = |step: &'static str| {
            let directory = self.config.directory.clone();
            move |err: instant_acme::Error| AcmeError::Ca {
                directory,
                step,
                cause: err.to_string(),
            }
        };
        let account = self.account().await?;
        let domain = &self.config.domain;
        let identifiers = [
            Identifier::Dns(domain.clone()),
            Identifier::Dns(format!("*.{domain}")),
        ];
        let mut order = account
            .new_order(&NewOrder::new(&identifiers))
            .await
            .map_err(ca("placing the order"))?;
        let mut authorizations = order.authorizations();
        while let Some(authorization) = authorizations.next().await {
            let mut authorization = authorization.map_err(ca("reading an authorization"))?;
            let name = authorization.identifier().to_string();
            match authorization.status {
                AuthorizationStatus::Valid => continue,
                AuthorizationStatus::Pending => {}
                status => {
                    return Err(AcmeError::Invalid {
                        name,
                        status: format!("{status:?}"),
                    })
                }
            }
            let mut challenge = authorization
                .challenge(ChallengeType::Dns01)
                .ok_or_else(|| AcmeError::Ca {
                    directory: self.config.directory.clone(),
                    step: "offering challenges",
                    cause: format!("no dns-01 challenge for {name}"),
                })?;
            let value = challenge.key_authorization().dns_value();
            // The DNS server answers from this table in-process, and in a
            // fleet every relay's has loaded it: the record is live before
            // the CA is told to look.
            published.add(value).await?;
            challenge
                .set_ready()
                .await
                .map_err(ca("starting a challenge"))?;
        }
        let retries = RetryPolicy::new().timeout(ORDER_TIMEOUT);
        let status = match order.poll_ready(&retries).await {
            Ok(status) => status,
            // A problem document here is the CA's verdict on the challenges.
            Err(instant_acme::Error::Api(problem)) => {
                return Err(AcmeError::Invalid {
                    name: format!("{domain} and *.{domain}"),
                    status: problem.to_string(),
                })
            }
            Err(err) => return Err(ca("validating the challenges")(err)),
        };
        if status != OrderStatus::Ready {
            // The CA's reasons are on the challenges: say them.
            let mut reasons = Vec::new();
            let mut authorizations = order.authorizations();
            while let Some(Ok(mut authorization)) = authorizations.next().await {
                let name = authorization.identifier().to_string();
                if let Ok(state) = authorization.refresh().await {
                    reasons.extend(state.challenges.iter().filter_map(|challenge| {
                        challenge
                            .error
                            .as_ref()
                            .map(|problem| format!("{name}: {problem}"))
                    }));
                }
            }
            return Err(AcmeError::Invalid {
                name: format!("{domain} and *.{domain}"),
                status: if reasons.is_empty() {
                    format!("order {status:?}")
                } else {
                    reasons.join("; ")
                },
            });
        }
        let key = rcgen::KeyPair::generate()?;
        let mut params =
            rcgen::CertificateParams::new(vec![domain.clone(), format!("*.{domain}")])?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        let csr = params.serialize_request(&key)?;
        order
            .finalize_csr(csr.der())
            .await
            .map_err(ca("finalizing the order"))?;
        let chain = order
            .poll_certificate(&retries)
            .await
            .map_err(ca("downloading the certificate"))?;
        self.write_pair(chain.as_bytes(), key.serialize_pem().as_bytes())?;
        tracing::info!(domain = %domain, took = ?started.elapsed(), "tls certificate issued by the ACME server");
        Ok(())
    }

    /// Puts a certificate and its key in place. Both new files are written
    /// in full before either is renamed into place, the key first: a crash
    /// before the renames keeps the old pair, and one between them leaves
    /// the new certificate in its temporary file, which `Acme::new` renames
    /// into place at the next start (`finish_interrupted_write`).
    fn write_pair(&self, cert: &[u8], key: &[u8]) -> Result<(), AcmeError> {
        let key_new = write_temporary(&self.dir.join(KEY), key, true)?;
        let cert_new = write_temporary(&self.dir.join(CERT), cert, false)?;
        rename(&key_new, &self.dir.join(KEY))?;
        rename(&cert_new, &self.dir.join(CERT))
    }

    /// The account for this directory, or a new one, stored: in the
    /// fleet's database, or in [`ACCOUNT`].
    async fn account(&self) -> Result<Account, AcmeError> {
        let Some(fleet) = &self.fleet else {
            return self.file_account().await;
        };
        let directory = &self.config.directory;
        let stored = fleet
            .store
            .acme_account(directory)
            .await
            .map_err(fleet_error("reading the ACME account"))?;
        if let Some(json) = stored {
            let credentials = serde_json::from_str(&json).map_err(|err| AcmeError::Fleet {
                step: "reading the ACME account",
                source: StoreError(format!("the stored credentials are not valid: {err}")),
            })?;
            return Account::builder_with_http(Box::new(self.http.clone()))
                .from_credentials(credentials)
                .await
                .map_err(|err| AcmeError::Ca {
                    directory: directory.clone(),
                    step: "loading the account",
                    cause: err.to_string(),
                });
        }
        let (account, credentials) = self.register().await?;
        let json = serde_json::to_string(&credentials).map_err(|err| AcmeError::Fleet {
            step: "storing the ACME account",
            source: StoreError(err.to_string()),
        })?;
        fleet
            .store
            .save_acme_account(directory, &json)
            .await
            .map_err(fleet_error("storing the ACME account"))?;
        Ok(account)
    }

    /// Registers a new account with the directory.
    async fn register(&self) -> Result<(Account, AccountCredentials), AcmeError> {
        let contact = self
            .config
            .email
            .as_ref()
            .map(|email| format!("mailto:{email}"));
        let contacts: Vec<&str> = contact.iter().map(String::as_str).collect();
        let (account, credentials) = Account::builder_with_http(Box::new(self.http.clone()))
            .create(
                &NewAccount {
                    contact: &contacts,
                    terms_of_service_agreed: true,
                    only_return_existing: false,
                },
                self.config.directory.clone(),
                None,
            )
            .await
            .map_err(|err| AcmeError::Ca {
                directory: self.config.directory.clone(),
                step: "registering the account",
                cause: err.to_string(),
            })?;
        tracing::info!(id = %account.id(), "acme account registered");
        Ok((account, credentials))
    }

    /// The account in [`ACCOUNT`] for this directory, or a new one, stored
    /// there.
    async fn file_account(&self) -> Result<Account, AcmeError> {
        let path = self.dir.join(ACCOUNT);
        let ca = |step: &'static str| {
            let directory = self.config.directory.clone();
            move |err: instant_acme::Error| AcmeError::Ca {
                directory,
                step,
                cause: err.to_string(),
            }
        };
        match std::fs::read(&path) {
            Ok(bytes) => {
                let stored: StoredAccount =
                    serde_json::from_slice(&bytes).map_err(|err| AcmeError::Account {
                        path: path.clone(),
                        cause: err.to_string(),
                    })?;
                if stored.directory == self.config.directory {
                    return Account::builder_with_http(Box::new(self.http.clone()))
                        .from_credentials(stored.credentials)
                        .await
                        .map_err(ca("loading the account"));
                }
                tracing::info!(old = %stored.directory, new = %self.config.directory, "acme directory changed; registering a new account");
            }
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => {
                return Err(AcmeError::Account {
                    path,
                    cause: err.to_string(),
                })
            }
        }
        let (account, credentials) = self.register().await?;
        let stored = StoredAccount {
            directory: self.config.directory.clone(),
            credentials,
        };
        let json = serde_json::to_vec_pretty(&stored).map_err(|err| AcmeError::Account {
            path: path.clone(),
            cause: err.to_string(),
        })?;
        write(&path, &json, true)?;
        Ok(account)
    }
}

/// The challenge values one issuance published, withdrawn when it ends
/// however it ends: done, failed, timed out, or dropped at shutdown.
struct Published<'a> {
    /// The DNS server's table.
    challenges: &'a Challenges,
    /// What this issuance added to it.
    values: Vec<String>,
    /// In a fleet, the database where they are opened too, and the domain.
    fleet: Option<(Postgres, String)>,
}

impl Published<'_> {
    /// Publishes `value` until the issuance ends; in a fleet, returns once
    /// every running relay's DNS server has loaded it.
    async fn add(&mut self, value: String) -> Result<(), AcmeError> {
        self.challenges.add(value.clone());
        self.values.push(value.clone());
        let Some((store, domain)) = &self.fleet else {
            return Ok(());
        };
        let id = store
            .publish_acme_challenge(domain, &value, ISSUE_TIMEOUT)
            .await
            .map_err(fleet_error("opening a challenge"))?;
        let deadline = tokio::time::Instant::now() + PROPAGATION_TIMEOUT;
        loop {
            let behind = store
                .acme_mirrors_behind(domain, id)
                .await
                .map_err(fleet_error("waiting for the DNS servers"))?;
            if behind.is_empty() {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(AcmeError::Propagation {
                    relays: behind.join(", "),
                });
            }
            tokio::time::sleep(PROPAGATION_POLL).await;
        }
    }
}

impl Drop for Published<'_> {
    fn drop(&mut self) {
        for value in &self.values {
            self.challenges.remove(value);
        }
        // Withdrawn from the database in the background; should that fail,
        // the rows expire with the issuance's timeout.
        if let (Some((store, domain)), Ok(runtime)) =
            (self.fleet.take(), tokio::runtime::Handle::try_current())
        {
            let values = std::mem::take(&mut self.values);
            if !values.is_empty() {
                runtime.spawn(async move {
                    if let Err(err) = store.withdraw_acme_challenges(&domain, &values).await {
                        tracing::warn!(%err, "acme challenges left to expire in the database");
                    }
                });
            }
        }
    }
}

/// Waits until `changes` is bumped; forever when there is nothing to
/// follow.
async fn changed(changes: &mut Option<watch::Receiver<u64>>) {
    if let Some(receiver) = changes {
        if receiver.changed().await.is_ok() {
            return;
        }
        *changes = None;
    }
    std::future::pending().await
}

/// In a fleet, keeps `challenges` (what this relay's DNS server answers)
/// in step with the challenges open in the database for `domain`, and
/// records that this DNS server is running and what it loaded, so that
/// orders wait for it. Loads once before it returns; the returned task
/// goes on until `shutdown`, then says the DNS server stopped.
pub async fn mirror(
    store: Postgres,
    domain: String,
    challenges: Challenges,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let relay = format!("{:016x}", rand::random::<u64>());
    let mut changes = Some(store.follow_acme());
    load_challenges(&store, &relay, &domain, &challenges).await;
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = changed(&mut changes) => {}
                () = tokio::time::sleep(MIRROR_BEAT) => {}
                () = shutdown.cancelled() => break,
            }
            load_challenges(&store, &relay, &domain, &challenges).await;
        }
        if let Err(err) = store.forget_acme_mirror(&relay).await {
            tracing::warn!(%err, "this dns server stays on the fleet's list until its time runs out");
        }
    })
}

/// One load of [`mirror`]'s.
async fn load_challenges(store: &Postgres, relay: &str, domain: &str, challenges: &Challenges) {
    // Answered before it is said to be: an order may tell the CA to look
    // as soon as it is recorded.
    let loaded = match store.acme_challenges(domain).await {
        Ok((values, seen)) => {
            challenges.set_fleet(values);
            store
                .record_acme_mirror(relay, domain, seen, MIRROR_ALIVE)
                .await
        }
        Err(err) => Err(err),
    };
    if let Err(err) = loaded {
        tracing::warn!(%err, "the fleet's acme challenges could not be loaded");
    }
}

/// The account file's contents.
#[derive(serde::Serialize, serde::Deserialize)]
struct StoredAccount {
    /// The directory the account was registered with.
    directory: String,
    /// Its key and URL.
    credentials: AccountCredentials,
}

/// When a certificate valid from `not_before` to `not_after` is renewed:
/// `renew_before` ahead of expiry, but no earlier than two thirds into its
/// lifetime.
pub fn renewal_time(
    not_before: SystemTime,
    not_after: SystemTime,
    renew_before: Duration,
) -> SystemTime {
    let lifetime = not_after.duration_since(not_before).unwrap_or_default();
    not_after
        .checked_sub(renew_before.min(lifetime / 3))
        .unwrap_or(not_before)
}

/// The wait before looking again after a certificate was issued: none when
/// it is not due yet at `now`; when even the new one is due (a clock ahead
/// of the CA's) or unusable, [`SKEWED_RETRY`] less up to a tenth by
/// `jitter`, so the CA's duplicate-certificate limit is never reached.
pub fn wait_after_issue(
    renew_at: Option<SystemTime>,
    now: SystemTime,
    jitter: u32,
) -> Option<Duration> {
    match renew_at {
        Some(at) if at > now => None,
        _ => Some(SKEWED_RETRY - SKEWED_RETRY / 10 * jitter / u32::MAX),
    }
}

/// The first wait after a failure against `directory`: long for Let's
/// Encrypt, whose limits count failures per hour, short for others (a
/// private CA, pebble). A trailing slash names the same directory.
pub fn retry_first(directory: &str) -> Duration {
    let directory = directory.strip_suffix('/').unwrap_or(directory);
    if [LETS_ENCRYPT, LETS_ENCRYPT_STAGING].contains(&directory) {
        RETRY_FIRST_LETS_ENCRYPT
    } else {
        RETRY_FIRST
    }
}

/// The wait after `failures` failed attempts: doubling from `first` up to
/// [`RETRY_MAX`], less up to a tenth by `jitter` (any u32), so relays that
/// failed together do not retry together.
pub fn retry_delay(first: Duration, failures: u32, jitter: u32) -> Duration {
    let base = first
        .saturating_mul(2u32.saturating_pow(failures.min(16)))
        .min(RETRY_MAX);
    base - base / 10 * jitter / u32::MAX
}

/// Writes `path` whole (a temporary file renamed over it), 0600 if
/// `private`, else 0644.
fn write(path: &Path, contents: &[u8], private: bool) -> Result<(), AcmeError> {
    let temporary = write_temporary(path, contents, private)?;
    rename(&temporary, path)
}

/// Renames `from` over `to`.
fn rename(from: &Path, to: &Path) -> Result<(), AcmeError> {
    std::fs::rename(from, to).map_err(|source| AcmeError::Write {
        path: to.to_owned(),
        source,
    })
}

/// Writes and syncs `path`'s temporary file (`path` with the extension
/// `new`), returning its path.
fn write_temporary(path: &Path, contents: &[u8], private: bool) -> Result<PathBuf, AcmeError> {
    let temporary = path.with_extension("new");
    let failed = |source| AcmeError::Write {
        path: temporary.clone(),
        source,
    };
    write_synced(&temporary, contents, private).map_err(failed)?;
    Ok(temporary)
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::{Duration, SystemTime};

    use super::{
        renewal_time, retry_delay, retry_first, wait_after_issue, Acme, AcmeConfig, CERT, DIR, KEY,
        RETRY_FIRST, RETRY_MAX, SKEWED_RETRY,
    };
    use crate::dns::Challenges;

    const DAY: Duration = Duration::from_secs(86_400);

    fn acme(data: &Path, renew_before: Duration) -> Acme {
        let config = AcmeConfig {
            domain: "relay.test".into(),
            directory: "https://ca.invalid/dir".into(),
            email: None,
            ca_file: None,
            renew_before,
        };
        Acme::new(config, data, Challenges::default()).unwrap()
    }

    /// Writes a certificate for `names` valid from `start` to `end` where
    /// the ACME client keeps its own.
    fn write_cert(data: &Path, names: &[&str], start: SystemTime, end: SystemTime) {
        let mut params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.not_before = start.into();
        params.not_after = end.into();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        std::fs::write(data.join(DIR).join(CERT), cert.pem()).unwrap();
        std::fs::write(data.join(DIR).join(KEY), key.serialize_pem()).unwrap();
    }

    #[test]
    fn a_certificate_on_disk_is_renewed_when_due_and_replaced_when_missing_or_for_another_domain() {
        let data = tempfile::tempdir().unwrap();
        let acme = acme(data.path(), 30 * DAY);
        assert_eq!(acme.renewal_time(), None, "no certificate: get one now");

        // Whole seconds: certificates carry no fractions.
        let now = SystemTime::UNIX_EPOCH
            + Duration::from_secs(
                SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .unwrap()
                    .as_secs(),
            );
        write_cert(
            data.path(),
            &["relay.test", "*.relay.test"],
            now,
            now + 90 * DAY,
        );
        assert_eq!(acme.renewal_time(), Some(now + 60 * DAY));

        // A short-lived certificate (an hour) is renewed 20 minutes ahead.
        let hour = Duration::from_secs(3600);
        write_cert(
            data.path(),
            &["relay.test", "*.relay.test"],
            now,
            now + hour,
        );
        assert_eq!(acme.renewal_time(), Some(now + hour * 2 / 3));

        write_cert(
            data.path(),
            &["other.test", "*.other.test"],
            now,
            now + 90 * DAY,
        );
        assert_eq!(
            acme.renewal_time(),
            None,
            "a changed --domain needs a new one"
        );
        write_cert(data.path(), &["relay.test"], now, now + 90 * DAY);
        assert_eq!(acme.renewal_time(), None, "without the wildcard");
        std::fs::write(data.path().join(DIR).join(CERT), "garbage").unwrap();
        assert_eq!(acme.renewal_time(), None);

        // A key of another certificate beside a good one: replaced too.
        write_cert(
            data.path(),
            &["relay.test", "*.relay.test"],
            now,
            now + 90 * DAY,
        );
        let other = rcgen::KeyPair::generate().unwrap();
        std::fs::write(data.path().join(DIR).join(KEY), other.serialize_pem()).unwrap();
        assert_eq!(acme.renewal_time(), None);
    }

    #[test]
    fn a_due_certificate_is_servable_until_it_expires() {
        let data = tempfile::tempdir().unwrap();
        let acme = acme(data.path(), 30 * DAY);
        assert!(!acme.servable(), "no certificate");
        let now = SystemTime::now();
        let names = ["relay.test", "*.relay.test"];
        write_cert(data.path(), &names, now - 80 * DAY, now + 10 * DAY);
        assert!(acme.renewal_time().unwrap() < now, "due");
        assert!(acme.servable(), "due but not expired");
        write_cert(data.path(), &names, now - 91 * DAY, now - DAY);
        assert!(!acme.servable(), "expired");
    }

    #[test]
    fn a_crash_between_the_key_and_the_certificate_renames_is_finished_at_the_next_start() {
        let data = tempfile::tempdir().unwrap();
        let names = ["relay.test", "*.relay.test"];
        let now = SystemTime::now();
        drop(acme(data.path(), 30 * DAY));
        // The new pair, then the state a crash after the key's rename
        // leaves: the new key beside the old certificate, the new
        // certificate in its temporary file.
        write_cert(data.path(), &names, now, now + 90 * DAY);
        let dir = data.path().join(DIR);
        std::fs::rename(dir.join(CERT), dir.join("cert.new")).unwrap();
        let old_key = rcgen::KeyPair::generate().unwrap();
        let old = rcgen::CertificateParams::new(vec!["relay.test".to_owned()])
            .unwrap()
            .self_signed(&old_key)
            .unwrap();
        std::fs::write(dir.join(CERT), old.pem()).unwrap();

        let acme = acme(data.path(), 30 * DAY);
        assert!(acme.servable(), "the new pair is in place");
        assert!(!dir.join("cert.new").exists());
    }

    #[tokio::test]
    async fn an_unreachable_ca_is_an_error_naming_it_and_the_step_and_publishes_nothing() {
        let data = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .unwrap()
            .port();
        let challenges = Challenges::default();
        let config = AcmeConfig {
            domain: "relay.test".into(),
            directory: format!("https://127.0.0.1:{port}/dir"),
            email: Some("ops@example.com".into()),
            ca_file: None,
            renew_before: 30 * DAY,
        };
        let acme = Acme::new(config, data.path(), challenges.clone()).unwrap();
        let message = acme.issue().await.unwrap_err().to_string();
        assert!(message.contains(&format!("127.0.0.1:{port}")), "{message}");
        assert!(message.contains("registering the account"), "{message}");
        assert!(challenges.values().is_empty());
        assert!(!data.path().join(DIR).join(CERT).exists());
    }

    #[test]
    fn a_90_day_certificate_is_renewed_30_days_before_expiry() {
        let start = SystemTime::UNIX_EPOCH + 1000 * DAY;
        let end = start + 90 * DAY;
        assert_eq!(renewal_time(start, end, 30 * DAY), end - 30 * DAY);
    }

    #[test]
    fn a_short_lived_certificate_is_renewed_two_thirds_in_not_at_once() {
        let start = SystemTime::UNIX_EPOCH + 1000 * DAY;
        let end = start + 6 * DAY;
        assert_eq!(renewal_time(start, end, 30 * DAY), end - 2 * DAY);
    }

    #[test]
    fn retries_back_off_to_an_hour_with_jitter() {
        assert_eq!(retry_delay(RETRY_FIRST, 0, 0), RETRY_FIRST);
        assert_eq!(retry_delay(RETRY_FIRST, 1, 0), 2 * RETRY_FIRST);
        assert_eq!(retry_delay(RETRY_FIRST, 50, 0), RETRY_MAX);
        assert!(retry_delay(RETRY_FIRST, 50, u32::MAX) >= RETRY_MAX * 9 / 10);
        assert!(retry_delay(RETRY_FIRST, 50, u32::MAX) < RETRY_MAX);
    }

    #[test]
    fn certificates_due_as_soon_as_issued_stay_under_5_a_week() {
        let now = SystemTime::UNIX_EPOCH + 1000 * DAY;
        assert_eq!(
            wait_after_issue(Some(now + 60 * DAY), now, 0),
            None,
            "a good certificate: wait for its renewal time"
        );
        // A clock 70 days ahead: a new 90-day certificate is due at once.
        // With the shortest waits (most jitter), count the issuances in
        // the first week.
        let due = Some(now - 10 * DAY);
        let mut at = Duration::ZERO;
        let mut issued = 1;
        loop {
            at += wait_after_issue(due, now, u32::MAX).unwrap();
            if at >= 7 * DAY {
                break;
            }
            issued += 1;
        }
        assert!(issued < 5, "{issued} duplicate certificates in a week");
        assert_eq!(wait_after_issue(None, now, 0), Some(SKEWED_RETRY));
    }

    #[test]
    fn failing_attempts_against_lets_encrypt_stay_under_5_an_hour() {
        let first = retry_first(super::LETS_ENCRYPT);
        assert_eq!(first, retry_first(super::LETS_ENCRYPT_STAGING));
        assert_eq!(retry_first("https://127.0.0.1:14000/dir"), RETRY_FIRST);
        assert_eq!(
            retry_first(&format!("{}/", super::LETS_ENCRYPT)),
            first,
            "a trailing slash is the same directory"
        );
        // The shortest waits (most jitter): attempt times over a day.
        let mut at = vec![Duration::ZERO];
        for failures in 0..30 {
            let last = *at.last().unwrap();
            at.push(last + retry_delay(first, failures, u32::MAX));
        }
        let most = at
            .iter()
            .map(|start| {
                at.iter()
                    .filter(|t| **t >= *start && **t < *start + Duration::from_secs(3600))
                    .count()
            })
            .max()
            .unwrap();
        assert!(most <= 4, "{most} attempts in an hour");
    }
}
