//! `--dns-listen`: the relay answers DNS for its own domain, authoritatively,
//! over UDP and TCP, so that one NS record delegating DOMAIN to it is all
//! the DNS a public relay needs, and so that it can answer the DNS-01
//! challenges a wildcard certificate requires.
//!
//! The zone holds: SOA, NS and CAA at DOMAIN; A/AAAA (from `--public-ip`)
//! at DOMAIN, at every single-label name under it (`*.DOMAIN`, the tunnels)
//! and at the name server's own name; TXT at `_acme-challenge.DOMAIN` while
//! an ACME challenge is open. Names of two or more labels under DOMAIN
//! (`a.b.DOMAIN`) do not exist, as no tunnel or certificate covers them;
//! names outside DOMAIN are refused, as the relay is no resolver.
//!
//! Written on hickory-proto's message types rather than hickory-server: the
//! zone is a handful of computed records plus a table that changes while a
//! challenge is open, which a function answers in a few lines, while the
//! size rules below (truncation, no amplification) stay in plain sight.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use hickory_proto::op::{Edns, Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::domain::Label;
use hickory_proto::rr::rdata::{A, AAAA, CAA, HINFO, NS, SOA, TXT};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::limits::PerIp;

/// The label under DOMAIN where ACME DNS-01 challenges are answered.
pub const CHALLENGE_LABEL: &str = "_acme-challenge";
/// How long the fleet's challenges, once loaded, count as current: past
/// it, with no load since (the database is out of reach), the challenge
/// name answers SERVFAIL, so that the CA's resolver asks another relay.
pub const FLEET_CHALLENGES_FRESH: Duration = Duration::from_secs(30);
/// TTL of A, AAAA, NS and CAA records.
const TTL: u32 = 300;
/// TTL of the SOA record, and how long resolvers may cache "no such
/// record": short, so a TXT record set for a challenge is seen soon even by
/// a resolver that asked before it existed.
const NEGATIVE_TTL: u32 = 60;
/// Challenge TXT records are not cached: each challenge has new values.
const CHALLENGE_TTL: u32 = 0;
/// The largest UDP answer without EDNS (RFC 1035).
pub const UDP_PLAIN: usize = 512;
/// The largest UDP answer with EDNS: the size that avoids IP fragmentation
/// (DNS flag day 2020), whatever larger size a query asks for.
pub const UDP_EDNS: u16 = 1232;
/// TCP connections served at once; more wait in the kernel's backlog.
pub const TCP_CONNECTIONS: usize = 64;
/// How long a TCP connection may stay idle between queries (RFC 7766
/// suggests seconds, not minutes).
pub const TCP_IDLE: Duration = Duration::from_secs(10);
/// Queries answered on one TCP connection before it is closed.
pub const TCP_QUERIES: usize = 100;
/// TCP connections one address (an IPv4 address, an IPv6 /64) may hold at
/// once, so that one host cannot take all [`TCP_CONNECTIONS`]; resolvers
/// use one or two.
pub const TCP_PER_ADDRESS: usize = 4;
/// How long one TCP connection may last however it is used, so that a
/// client asking just often enough not to idle out frees its slot too.
pub const TCP_LIFETIME: Duration = Duration::from_secs(60);

/// What the zone is made of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZoneConfig {
    /// The relay's domain, lowercase, without a trailing dot.
    pub domain: String,
    /// The name server's own name, as the NS record names it.
    pub ns_name: String,
    /// The relay's public addresses, for A and AAAA.
    pub addresses: Vec<IpAddr>,
    /// The CA domain a CAA `issue` record names (`letsencrypt.org`);
    /// none: no CAA record, any CA may issue.
    pub caa_issuer: Option<String>,
    /// The SOA contact, as an email address.
    pub contact: Option<String>,
}

/// The ACME challenge values currently published as TXT records at
/// `_acme-challenge.DOMAIN`: this relay's own, and in a fleet those open
/// in the shared database, loaded by [`crate::tls::acme::mirror`].
/// Cloning shares the table.
#[derive(Debug, Clone, Default)]
pub struct Challenges(Arc<Mutex<Published>>);

/// The two sets of values.
#[derive(Debug, Default)]
struct Published {
    /// Published by this relay's ACME client.
    own: Vec<String>,
    /// Open in the fleet's database when last loaded, and when that was;
    /// `None` off a fleet.
    fleet: Option<(Vec<String>, Instant)>,
}

impl Challenges {
    /// Publishes `value`.
    pub fn add(&self, value: String) {
        let mut published = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if !published.own.contains(&value) {
            published.own.push(value);
        }
    }

    /// Withdraws `value`.
    pub fn remove(&self, value: &str) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .own
            .retain(|v| v != value);
    }

    /// Replaces the values open in the fleet's database, loaded now.
    pub fn set_fleet(&self, values: Vec<String>) {
        self.set_fleet_loaded_at(values, Instant::now());
    }

    /// Replaces the values open in the fleet's database, loaded `at`.
    pub fn set_fleet_loaded_at(&self, values: Vec<String>, at: Instant) {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).fleet = Some((values, at));
    }

    /// Whether the fleet's values were last loaded longer than
    /// [`FLEET_CHALLENGES_FRESH`] ago: they may lack an open challenge.
    pub fn stale(&self) -> bool {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .fleet
            .as_ref()
            .is_some_and(|(_, at)| at.elapsed() > FLEET_CHALLENGES_FRESH)
    }

    /// The values published now, each once.
    pub fn values(&self) -> Vec<String> {
        let published = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let mut values = published.own.clone();
        for value in published.fleet.iter().flat_map(|(fleet, _)| fleet) {
            if !values.contains(value) {
                values.push(value.clone());
            }
        }
        values
    }
}

/// Why a zone cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum ZoneError {
    /// A name is not a valid DNS name.
    #[error("`{name}` is not a valid DNS name for {what}: {cause}")]
    Name {
        /// Which setting.
        what: &'static str,
        /// The name given.
        name: String,
        /// Why.
        cause: String,
    },
}

/// The relay's zone, answering queries.
#[derive(Debug)]
pub struct Zone {
    /// DOMAIN as a lowercase, fully qualified name.
    origin: Name,
    /// `_acme-challenge.DOMAIN`.
    challenge_name: Name,
    /// The name server's name.
    ns_name: Name,
    /// The SOA's responsible-person mailbox.
    contact: Name,
    /// Public addresses.
    addresses: Vec<IpAddr>,
    /// CAA issuer domain.
    caa_issuer: Option<Name>,
    /// Open challenges.
    challenges: Challenges,
    /// The SOA serial: the start time, so a restarted relay's zone is newer.
    serial: u32,
}

fn name(what: &'static str, text: &str) -> Result<Name, ZoneError> {
    let fqdn = format!("{}.", text.trim_end_matches('.'));
    Name::from_ascii(&fqdn)
        .map(|name| name.to_lowercase())
        .map_err(|err| ZoneError::Name {
            what,
            name: text.to_owned(),
            cause: err.to_string(),
        })
}

/// The SOA's RNAME for `email`: a mailbox written as a name, the whole
/// local part as the first label (RFC 1035 3.3.13; dots and `+` in it stay
/// inside the label, `first\.last` in a zone file); `None` when it cannot
/// be one (an empty or over-long label, a bad domain).
fn mailbox(email: &str) -> Option<Name> {
    let (local, domain) = email.rsplit_once('@')?;
    let local = Label::from_raw_bytes(local.as_bytes()).ok()?;
    let domain = name("--acme-email", domain).ok()?;
    Name::from_labels([local])
        .ok()?
        .append_domain(&domain)
        .ok()
        .map(|name| name.to_lowercase())
}

impl Zone {
    /// Builds the zone; `challenges` is the table the ACME client fills.
    pub fn new(config: &ZoneConfig, challenges: Challenges) -> Result<Self, ZoneError> {
        let origin = name("--domain", &config.domain)?;
        let challenge_name =
            origin
                .prepend_label(CHALLENGE_LABEL)
                .map_err(|err| ZoneError::Name {
                    what: "--domain",
                    name: config.domain.clone(),
                    cause: err.to_string(),
                })?;
        let ns_name = name("--dns-name", &config.ns_name)?;
        let contact = match config.contact.as_deref().and_then(mailbox) {
            Some(contact) => contact,
            None => name("--domain", &format!("hostmaster.{}", config.domain))?,
        };
        // Not fully qualified: CAA names the CA as `letsencrypt.org`, and a
        // CA comparing it with its own domain would not match a final dot.
        let caa_issuer = config
            .caa_issuer
            .as_deref()
            .map(|issuer| {
                Name::from_ascii(issuer.trim_end_matches('.')).map_err(|err| ZoneError::Name {
                    what: "--acme-caa",
                    name: issuer.to_owned(),
                    cause: err.to_string(),
                })
            })
            .transpose()?;
        let serial = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |since| {
                u32::try_from(since.as_secs()).unwrap_or(u32::MAX)
            });
        Ok(Self {
            origin,
            challenge_name,
            ns_name,
            contact,
            addresses: config.addresses.clone(),
            caa_issuer,
            challenges,
            serial,
        })
    }

    fn soa(&self) -> Record {
        Record::from_rdata(
            self.origin.clone(),
            NEGATIVE_TTL,
            RData::SOA(SOA::new(
                self.ns_name.clone(),
                self.contact.clone(),
                self.serial,
                3600,
                600,
                604_800,
                NEGATIVE_TTL,
            )),
        )
    }

    fn addresses(&self, name: &Name, kind: RecordType) -> Vec<Record> {
        self.addresses
            .iter()
            .filter_map(|ip| match (ip, kind) {
                (IpAddr::V4(v4), RecordType::A) => Some(RData::A(A(*v4))),
                (IpAddr::V6(v6), RecordType::AAAA) => Some(RData::AAAA(AAAA(*v6))),
                _ => None,
            })
            .map(|rdata| Record::from_rdata(name.clone(), TTL, rdata))
            .collect()
    }

    /// Whether `name` (lowercase, inside the zone) exists, and the records of
    /// `kind` it holds.
    fn lookup(&self, name: &Name, kind: RecordType) -> Option<Vec<Record>> {
        // Saturating: hickory does not count a leading `*` label.
        let depth = name.num_labels().saturating_sub(self.origin.num_labels());
        let mut records = Vec::new();
        if depth > 1 && *name != self.ns_name {
            return None;
        }
        if matches!(kind, RecordType::A | RecordType::AAAA) {
            records.extend(self.addresses(name, kind));
        }
        if *name == self.origin {
            match kind {
                RecordType::SOA => records.push(self.soa()),
                RecordType::NS => records.push(Record::from_rdata(
                    name.clone(),
                    TTL,
                    RData::NS(NS(self.ns_name.clone())),
                )),
                RecordType::CAA => {
                    if let Some(issuer) = &self.caa_issuer {
                        records.push(Record::from_rdata(
                            name.clone(),
                            TTL,
                            RData::CAA(CAA::new_issue(false, Some(issuer.clone()), Vec::new())),
                        ));
                    }
                }
                _ => {}
            }
        }
        if *name == self.challenge_name && kind == RecordType::TXT {
            records.extend(self.challenges.values().into_iter().map(|value| {
                Record::from_rdata(
                    name.clone(),
                    CHALLENGE_TTL,
                    RData::TXT(TXT::new(vec![value])),
                )
            }));
        }
        Some(records)
    }

    /// The answer to one query, before size limits.
    fn answer(&self, request: &Message) -> Message {
        let mut response = Message::response(request.metadata.id, request.metadata.op_code);
        response.metadata.recursion_desired = request.metadata.recursion_desired;
        response.add_queries(request.queries.iter().cloned());
        if request.edns.is_some() {
            let mut edns = Edns::new();
            edns.set_max_payload(UDP_EDNS);
            response.set_edns(edns);
        }
        let code = |mut response: Message, code| {
            response.metadata.response_code = code;
            response
        };
        if request.metadata.op_code != OpCode::Query {
            return code(response, ResponseCode::NotImp);
        }
        let [query] = request.queries.as_slice() else {
            return code(response, ResponseCode::FormErr);
        };
        let qname = query.name().to_lowercase();
        if !matches!(query.query_class(), DNSClass::IN) || !self.origin.zone_of(&qname) {
            return code(response, ResponseCode::Refused);
        }
        response.metadata.authoritative = true;
        let kind = query.query_type();
        if kind == RecordType::ANY {
            // RFC 8482: one small synthesized record instead of everything
            // the name holds, so ANY cannot amplify.
            response.add_answer(Record::from_rdata(
                query.name().clone(),
                TTL,
                RData::HINFO(HINFO::new("RFC8482".into(), String::new())),
            ));
            return response;
        }
        if qname == self.challenge_name && kind == RecordType::TXT && self.challenges.stale() {
            response.metadata.authoritative = false;
            return code(response, ResponseCode::ServFail);
        }
        match self.lookup(&qname, kind) {
            None => {
                response.add_authority(self.soa());
                code(response, ResponseCode::NXDomain)
            }
            Some(records) if records.is_empty() => {
                response.add_authority(self.soa());
                response
            }
            Some(records) => {
                // Answers carry the query's own spelling of the name.
                response.add_answers(records.into_iter().map(|mut record| {
                    record.name = query.name().clone();
                    record
                }));
                response
            }
        }
    }

    /// The bytes answering `packet`, at most `limit` bytes long for UDP
    /// (truncated with TC set beyond it); `None` when the packet deserves
    /// no answer (too short to be a query, or itself a response).
    pub fn respond(&self, packet: &[u8], udp: bool) -> Option<Vec<u8>> {
        // Header: id (2 bytes), then QR as the top bit of the third.
        if packet.len() < 12 || packet[2] & 0x80 != 0 {
            return None;
        }
        let request = match Message::from_vec(packet) {
            Ok(request) if request.metadata.message_type == MessageType::Query => request,
            Ok(_) => return None,
            Err(_) => {
                let id = u16::from_be_bytes([packet[0], packet[1]]);
                let response = Message::error_msg(id, OpCode::Query, ResponseCode::FormErr);
                return response.to_vec().ok();
            }
        };
        let response = self.answer(&request);
        let bytes = response.to_vec().ok()?;
        let limit = match &request.edns {
            Some(edns) => usize::from(edns.max_payload().clamp(512, UDP_EDNS)),
            None => UDP_PLAIN,
        };
        if udp && bytes.len() > limit {
            return response.truncate().to_vec().ok();
        }
        Some(bytes)
    }
}

/// Serves `zone` on a UDP socket and a TCP listener until `shutdown`.
pub async fn serve(zone: Arc<Zone>, udp: UdpSocket, tcp: TcpListener, shutdown: CancellationToken) {
    let tasks = TaskTracker::new();
    tasks.spawn(serve_udp(Arc::clone(&zone), udp, shutdown.clone()));
    tasks.spawn(serve_tcp(zone, tcp, shutdown));
    tasks.close();
    tasks.wait().await;
}

async fn serve_udp(zone: Arc<Zone>, socket: UdpSocket, shutdown: CancellationToken) {
    // One byte more than any UDP DNS message we accept, to tell an
    // oversized datagram (dropped) from one that fits.
    let mut buffer = vec![0u8; 4097];
    loop {
        // Cancel-safe: a datagram is either received whole or not at all.
        let (len, from) = tokio::select! {
            received = socket.recv_from(&mut buffer) => match received {
                Ok(received) => received,
                Err(err) => {
                    tracing::debug!(%err, "dns udp receive failed");
                    continue;
                }
            },
            () = shutdown.cancelled() => return,
        };
        if len == buffer.len() {
            continue;
        }
        if let Some(answer) = zone.respond(&buffer[..len], true) {
            if let Err(err) = socket.send_to(&answer, from).await {
                tracing::debug!(%err, %from, "dns udp answer not sent");
            }
        }
    }
}

async fn serve_tcp(zone: Arc<Zone>, listener: TcpListener, shutdown: CancellationToken) {
    let slots = Arc::new(Semaphore::new(TCP_CONNECTIONS));
    let per_address = PerIp::new(TCP_PER_ADDRESS);
    let connections = TaskTracker::new();
    loop {
        let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
            break;
        };
        let (stream, from) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    tracing::debug!(%err, "dns tcp accept failed");
                    continue;
                }
            },
            () = shutdown.cancelled() => break,
        };
        // Over its share: closed at once, its slot free for the next.
        let Some(share) = per_address.acquire(from.ip()) else {
            tracing::debug!(%from, "dns tcp connection refused: too many from this address");
            continue;
        };
        let zone = Arc::clone(&zone);
        let stop = shutdown.clone();
        connections.spawn(async move {
            tokio::select! {
                _ = tokio::time::timeout(TCP_LIFETIME, serve_connection(&zone, stream, from)) => {}
                () = stop.cancelled() => {}
            }
            drop((slot, share));
        });
    }
    connections.close();
    connections.wait().await;
}

/// Answers length-prefixed queries on one TCP connection (RFC 7766) until
/// the peer closes, idles past [`TCP_IDLE`] or sends garbage.
async fn serve_connection(zone: &Zone, mut stream: TcpStream, from: SocketAddr) {
    for _ in 0..TCP_QUERIES {
        let mut length = [0u8; 2];
        match tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut length)).await {
            Ok(Ok(_)) => {}
            _ => return,
        }
        let mut packet = vec![0u8; usize::from(u16::from_be_bytes(length))];
        match tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut packet)).await {
            Ok(Ok(_)) => {}
            _ => return,
        }
        let Some(answer) = zone.respond(&packet, false) else {
            return;
        };
        let Ok(len) = u16::try_from(answer.len()) else {
            return;
        };
        let mut framed = Vec::with_capacity(answer.len() + 2);
        framed.extend_from_slice(&len.to_be_bytes());
        framed.extend_from_slice(&answer);
        if let Err(err) = stream.write_all(&framed).await {
            tracing::debug!(%err, %from, "dns tcp answer not sent");
            return;
        }
    }
}
