//! `--dns-listen`: the relay's authoritative DNS for its domain, queried over
//! real UDP and TCP sockets with hickory's message types as the resolver.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use ferry_relay::dns::{serve, Challenges, Zone, ZoneConfig};
use ferry_tests::within;
use hickory_proto::op::{Edns, Message, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream, UdpSocket};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const DOMAIN: &str = "relay.test";
const V4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 7);
const V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 7);

/// A running DNS server for [`DOMAIN`].
struct Dns {
    /// UDP and TCP address (the same port).
    udp: SocketAddr,
    tcp: SocketAddr,
    challenges: Challenges,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Dns {
    async fn start_with(addresses: Vec<IpAddr>) -> Self {
        let challenges = Challenges::default();
        let zone = Zone::new(
            &ZoneConfig {
                domain: DOMAIN.into(),
                ns_name: format!("ns.{DOMAIN}"),
                addresses,
                caa_issuer: Some("letsencrypt.org".into()),
                contact: Some("ops@example.com".into()),
            },
            challenges.clone(),
        )
        .expect("zone builds");
        let udp = UdpSocket::bind("127.0.0.1:0").await.expect("bind udp");
        let tcp = TcpListener::bind("127.0.0.1:0").await.expect("bind tcp");
        let (udp_addr, tcp_addr) = (udp.local_addr().unwrap(), tcp.local_addr().unwrap());
        let stop = CancellationToken::new();
        let task = tokio::spawn(serve(Arc::new(zone), udp, tcp, stop.clone()));
        Self {
            udp: udp_addr,
            tcp: tcp_addr,
            challenges,
            stop,
            task,
        }
    }

    async fn start() -> Self {
        Self::start_with(vec![IpAddr::V4(V4), IpAddr::V6(V6)]).await
    }

    /// Sends raw bytes over UDP and returns the answer's bytes.
    async fn udp_raw(&self, packet: &[u8]) -> Vec<u8> {
        let socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        socket.send_to(packet, self.udp).await.expect("send");
        let mut buffer = vec![0u8; 65_535];
        let (len, _) = within("a dns answer over udp", socket.recv_from(&mut buffer))
            .await
            .expect("receive");
        buffer.truncate(len);
        buffer
    }

    async fn udp(&self, request: &Message) -> Message {
        let bytes = self.udp_raw(&request.to_vec().expect("encodes")).await;
        Message::from_vec(&bytes).expect("the answer decodes")
    }

    async fn tcp(&self, request: &Message) -> Message {
        let mut stream = TcpStream::connect(self.tcp).await.expect("connect");
        let bytes = request.to_vec().expect("encodes");
        let mut framed = (bytes.len() as u16).to_be_bytes().to_vec();
        framed.extend_from_slice(&bytes);
        stream.write_all(&framed).await.expect("send");
        read_tcp(&mut stream).await
    }

    async fn ask(&self, name: &str, kind: RecordType) -> Message {
        self.udp(&query(name, kind)).await
    }

    async fn stop(self) {
        self.stop.cancel();
        within("the dns server to stop", self.task)
            .await
            .expect("dns server ends cleanly");
    }
}

async fn read_tcp(stream: &mut TcpStream) -> Message {
    let mut length = [0u8; 2];
    within("a dns answer over tcp", stream.read_exact(&mut length))
        .await
        .expect("length");
    let mut answer = vec![0u8; usize::from(u16::from_be_bytes(length))];
    stream.read_exact(&mut answer).await.expect("answer");
    Message::from_vec(&answer).expect("the answer decodes")
}

fn query(name: &str, kind: RecordType) -> Message {
    let mut message = Message::query();
    message.metadata.recursion_desired = true;
    message.add_query(Query::query(
        Name::from_ascii(name).expect("valid name"),
        kind,
    ));
    message
}

fn addresses_v4(answer: &Message) -> Vec<Ipv4Addr> {
    answer
        .answers
        .iter()
        .filter_map(|record| match &record.data {
            RData::A(a) => Some(a.0),
            _ => None,
        })
        .collect()
}

/// An authoritative NOERROR with no answer and the SOA in authority.
fn assert_nodata(answer: &Message) {
    assert_eq!(answer.metadata.response_code, ResponseCode::NoError);
    assert!(answer.metadata.authoritative);
    assert!(answer.answers.is_empty(), "{:?}", answer.answers);
    assert!(
        matches!(answer.authorities.as_slice(), [soa] if soa.record_type() == RecordType::SOA),
        "{:?}",
        answer.authorities
    );
}

#[tokio::test]
async fn the_domain_and_every_tunnel_name_resolve_to_the_public_addresses() {
    let dns = Dns::start().await;
    for name in [
        "relay.test.",
        "brave-otter.relay.test.",
        "ns.relay.test.",
        "BRAVE-Otter.Relay.Test.",
        "*.relay.test.",
    ] {
        let answer = dns.ask(name, RecordType::A).await;
        assert_eq!(answer.metadata.response_code, ResponseCode::NoError);
        assert!(answer.metadata.authoritative, "{name}");
        assert_eq!(addresses_v4(&answer), vec![V4], "{name}");
        assert_eq!(
            answer.answers[0].name.to_ascii(),
            name,
            "the answer repeats the asked spelling"
        );
    }
    let answer = dns.ask("brave-otter.relay.test.", RecordType::AAAA).await;
    assert!(
        matches!(&answer.answers[..], [record] if matches!(&record.data, RData::AAAA(a) if a.0 == V6))
    );
    dns.stop().await;
}

#[tokio::test]
async fn a_relay_without_an_ipv6_address_answers_aaaa_with_nodata() {
    let dns = Dns::start_with(vec![IpAddr::V4(V4)]).await;
    assert_nodata(&dns.ask("relay.test.", RecordType::AAAA).await);
    assert_nodata(&dns.ask("x.relay.test.", RecordType::AAAA).await);
    dns.stop().await;
}

#[tokio::test]
async fn the_apex_holds_soa_ns_and_caa() {
    let dns = Dns::start().await;
    let soa = dns.ask("relay.test.", RecordType::SOA).await;
    let Some(RData::SOA(record)) = soa.answers.first().map(|r| &r.data) else {
        panic!("no SOA: {soa:?}");
    };
    assert_eq!(record.mname.to_ascii(), "ns.relay.test.");
    assert_eq!(record.rname.to_ascii(), "ops.example.com.");

    let ns = dns.ask("relay.test.", RecordType::NS).await;
    assert!(
        matches!(&ns.answers[..], [r] if matches!(&r.data, RData::NS(n) if n.0.to_ascii() == "ns.relay.test.")),
        "{ns:?}"
    );

    let caa = dns.ask("relay.test.", RecordType::CAA).await;
    let Some(RData::CAA(record)) = caa.answers.first().map(|r| &r.data) else {
        panic!("no CAA: {caa:?}");
    };
    assert_eq!(record.tag, "issue");
    assert_eq!(record.value, b"letsencrypt.org");
    dns.stop().await;
}

#[tokio::test]
async fn challenge_txt_records_exist_only_while_a_challenge_is_open() {
    let dns = Dns::start().await;
    let name = "_acme-challenge.relay.test.";
    assert_nodata(&dns.ask(name, RecordType::TXT).await);

    dns.challenges.add("first-value".into());
    dns.challenges.add("second-value".into());
    let answer = dns.ask(name, RecordType::TXT).await;
    let mut values: Vec<String> = answer
        .answers
        .iter()
        .filter_map(|record| match &record.data {
            RData::TXT(txt) => Some(String::from_utf8_lossy(&txt.txt_data[0]).into_owned()),
            _ => None,
        })
        .collect();
    values.sort();
    assert_eq!(values, ["first-value", "second-value"]);
    assert!(answer.answers.iter().all(|record| record.ttl == 0));

    dns.challenges.remove("first-value");
    dns.challenges.remove("second-value");
    assert_nodata(&dns.ask(name, RecordType::TXT).await);
    dns.stop().await;
}

#[tokio::test]
async fn in_a_fleet_challenges_not_loaded_lately_answer_servfail_so_the_ca_asks_another_relay() {
    let dns = Dns::start().await;
    let name = "_acme-challenge.relay.test.";
    let loaded = std::time::Instant::now();
    dns.challenges
        .set_fleet_loaded_at(vec!["fleet-value".into()], loaded);
    let answer = dns.ask(name, RecordType::TXT).await;
    assert_eq!(answer.metadata.response_code, ResponseCode::NoError);
    assert_eq!(answer.answers.len(), 1);

    // The database out of reach for longer than the fleet's challenges
    // count as current: this relay's answer may lack a new one.
    let long_ago = loaded
        .checked_sub(ferry_relay::dns::FLEET_CHALLENGES_FRESH + std::time::Duration::from_secs(1))
        .expect("an instant that long ago");
    dns.challenges
        .set_fleet_loaded_at(vec!["fleet-value".into()], long_ago);
    let answer = dns.ask(name, RecordType::TXT).await;
    assert_eq!(answer.metadata.response_code, ResponseCode::ServFail);
    assert!(answer.answers.is_empty());
    // Only the challenge name: the rest of the zone answers as ever.
    let apex = dns.ask("relay.test.", RecordType::A).await;
    assert_eq!(apex.metadata.response_code, ResponseCode::NoError);
    assert_eq!(addresses_v4(&apex), [V4]);
    dns.stop().await;
}

#[tokio::test]
async fn an_existing_name_without_the_type_asked_is_nodata() {
    let dns = Dns::start().await;
    assert_nodata(&dns.ask("relay.test.", RecordType::MX).await);
    assert_nodata(&dns.ask("brave-otter.relay.test.", RecordType::TXT).await);
    assert_nodata(&dns.ask("brave-otter.relay.test.", RecordType::CAA).await);
    dns.stop().await;
}

#[tokio::test]
async fn names_deeper_than_a_tunnel_do_not_exist_and_foreign_names_are_refused() {
    let dns = Dns::start().await;
    let deep = dns.ask("a.b.relay.test.", RecordType::A).await;
    assert_eq!(deep.metadata.response_code, ResponseCode::NXDomain);
    assert!(deep.metadata.authoritative);
    assert!(deep.answers.is_empty());
    assert_eq!(deep.authorities[0].record_type(), RecordType::SOA);

    for foreign in ["example.com.", "test.", "notrelay.test."] {
        let answer = dns.ask(foreign, RecordType::A).await;
        assert_eq!(
            answer.metadata.response_code,
            ResponseCode::Refused,
            "{foreign}: the relay is no open resolver"
        );
        assert!(!answer.metadata.authoritative);
        assert!(answer.answers.is_empty());
    }
    dns.stop().await;
}

#[tokio::test]
async fn tcp_answers_like_udp_and_serves_several_queries_per_connection() {
    let dns = Dns::start().await;
    let answer = dns.tcp(&query("x.relay.test.", RecordType::A)).await;
    assert_eq!(addresses_v4(&answer), vec![V4]);

    let mut stream = TcpStream::connect(dns.tcp).await.expect("connect");
    for kind in [RecordType::SOA, RecordType::NS] {
        let bytes = query("relay.test.", kind).to_vec().expect("encodes");
        let mut framed = (bytes.len() as u16).to_be_bytes().to_vec();
        framed.extend_from_slice(&bytes);
        stream.write_all(&framed).await.expect("send");
        let answer = read_tcp(&mut stream).await;
        assert_eq!(answer.answers[0].record_type(), kind);
    }
    dns.stop().await;
}

#[tokio::test]
async fn malformed_packets_get_formerr_or_nothing_and_the_server_keeps_answering() {
    let dns = Dns::start().await;
    // A header claiming one question, then garbage.
    let mut garbage = vec![0x12, 0x34, 0x01, 0x00, 0x00, 0x01, 0, 0, 0, 0, 0, 0];
    garbage.extend_from_slice(&[0xff; 20]);
    let answer = Message::from_vec(&dns.udp_raw(&garbage).await).expect("decodes");
    assert_eq!(answer.metadata.id, 0x1234);
    assert_eq!(answer.metadata.response_code, ResponseCode::FormErr);

    // Too short for a header, a response (QR set), and an oversized
    // datagram get no answer: sent first, they are followed by a real query
    // whose answer must be the next datagram back.
    let socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    socket.send_to(&[1, 2, 3], dns.udp).await.expect("send");
    let mut response = query("relay.test.", RecordType::A);
    response.metadata.message_type = hickory_proto::op::MessageType::Response;
    socket
        .send_to(&response.to_vec().unwrap(), dns.udp)
        .await
        .expect("send");
    socket
        .send_to(&vec![0u8; 8000], dns.udp)
        .await
        .expect("send");
    let mut real = query("relay.test.", RecordType::A);
    real.metadata.id = 4242;
    socket
        .send_to(&real.to_vec().unwrap(), dns.udp)
        .await
        .expect("send");
    let mut buffer = vec![0u8; 4096];
    let (len, _) = within("the real answer", socket.recv_from(&mut buffer))
        .await
        .expect("receive");
    let answer = Message::from_vec(&buffer[..len]).expect("decodes");
    assert_eq!(answer.metadata.id, 4242, "nothing came back for the junk");

    // Other opcodes (UPDATE, NOTIFY …) are not implemented; other classes
    // (CHAOS `version.bind`) are refused.
    let mut update = query("relay.test.", RecordType::SOA);
    update.metadata.op_code = hickory_proto::op::OpCode::Update;
    assert_eq!(
        dns.udp(&update).await.metadata.response_code,
        ResponseCode::NotImp
    );
    let mut chaos = query("version.bind.", RecordType::TXT);
    chaos.queries[0].set_query_class(hickory_proto::rr::DNSClass::CH);
    assert_eq!(
        dns.udp(&chaos).await.metadata.response_code,
        ResponseCode::Refused
    );

    // Two questions in one query: FORMERR.
    let mut two = query("relay.test.", RecordType::A);
    two.add_query(Query::query(
        Name::from_ascii("x.relay.test.").unwrap(),
        RecordType::A,
    ));
    assert_eq!(
        dns.udp(&two).await.metadata.response_code,
        ResponseCode::FormErr
    );

    // TCP: a length prefix promising more than is sent, then a close, ends
    // that connection only.
    let mut stream = TcpStream::connect(dns.tcp).await.expect("connect");
    stream
        .write_all(&[0xff, 0xff, 1, 2, 3])
        .await
        .expect("send");
    drop(stream);
    let answer = dns.tcp(&query("relay.test.", RecordType::A)).await;
    assert_eq!(addresses_v4(&answer), vec![V4]);
    dns.stop().await;
}

#[tokio::test]
async fn udp_answers_do_not_amplify_beyond_512_bytes_and_truncate_for_tcp() {
    // Forty IPv4 addresses make an A answer of about 700 bytes.
    let many: Vec<IpAddr> = (1..=40)
        .map(|i| IpAddr::V4(Ipv4Addr::new(198, 51, 100, i)))
        .collect();
    let dns = Dns::start_with(many).await;
    let request = query("x.relay.test.", RecordType::A);
    let request_len = request.to_vec().unwrap().len();
    let bytes = dns.udp_raw(&request.to_vec().unwrap()).await;
    let answer = Message::from_vec(&bytes).expect("decodes");
    assert!(
        answer.metadata.truncation,
        "TC tells the resolver to use TCP"
    );
    assert!(answer.answers.is_empty());
    assert!(
        bytes.len() <= request_len + 16,
        "a truncated answer is barely larger than the query: {} vs {request_len}",
        bytes.len()
    );

    // With EDNS the limit is the smaller of the asked size and 1232 bytes.
    let mut edns_request = request.clone();
    let mut edns = Edns::new();
    edns.set_max_payload(4096);
    edns_request.set_edns(edns);
    let bytes = dns.udp_raw(&edns_request.to_vec().unwrap()).await;
    assert!(bytes.len() <= 1232);
    let answer = Message::from_vec(&bytes).expect("decodes");
    assert_eq!(addresses_v4(&answer).len(), 40);

    let over_tcp = dns.tcp(&request).await;
    assert!(!over_tcp.metadata.truncation);
    assert_eq!(addresses_v4(&over_tcp).len(), 40);

    // ANY gets one small record (RFC 8482), not everything the apex holds.
    let any = dns.ask("relay.test.", RecordType::ANY).await;
    assert!(matches!(&any.answers[..], [r] if r.record_type() == RecordType::HINFO));
    dns.stop().await;
}

fn framed(request: &Message) -> Vec<u8> {
    let bytes = request.to_vec().expect("encodes");
    let mut framed = (bytes.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(&bytes);
    framed
}

#[tokio::test(start_paused = true)]
async fn a_silent_tcp_connection_is_closed_after_the_idle_timeout() {
    let dns = Dns::start().await;
    let mut stream = TcpStream::connect(dns.tcp).await.expect("connect");
    let opened = tokio::time::Instant::now();
    let mut byte = [0u8; 1];
    let read = within("the server to close", stream.read(&mut byte)).await;
    assert!(matches!(read, Ok(0)), "closed, not answered: {read:?}");
    assert!(opened.elapsed() >= ferry_relay::dns::TCP_IDLE);
    dns.stop().await;
}

#[tokio::test]
async fn one_tcp_connection_gets_a_bounded_number_of_answers() {
    let dns = Dns::start().await;
    let mut stream = TcpStream::connect(dns.tcp).await.expect("connect");
    let limit = ferry_relay::dns::TCP_QUERIES;
    let mut burst = Vec::new();
    for _ in 0..limit {
        burst.extend(framed(&query("relay.test.", RecordType::A)));
    }
    stream.write_all(&burst).await.expect("send");
    for _ in 0..limit {
        assert_eq!(addresses_v4(&read_tcp(&mut stream).await), vec![V4]);
    }
    // Then the server closes: a client wanting more opens a new connection.
    let mut rest = Vec::new();
    within("the server to close", stream.read_to_end(&mut rest))
        .await
        .expect("closed cleanly");
    assert!(rest.is_empty());
    dns.stop().await;
}

#[tokio::test(start_paused = true)]
async fn tcp_connections_beyond_the_limit_wait_for_a_free_slot() {
    let dns = Dns::start().await;
    let started = tokio::time::Instant::now();
    let quick = dns.tcp(&query("relay.test.", RecordType::A)).await;
    assert_eq!(addresses_v4(&quick), vec![V4]);
    assert!(started.elapsed() < ferry_relay::dns::TCP_IDLE);

    // Connections that say nothing, from as many addresses as the cap per
    // address needs, hold every slot until they idle out.
    let mut silent = Vec::new();
    for n in 0..ferry_relay::dns::TCP_CONNECTIONS {
        let per_address = ferry_relay::dns::TCP_PER_ADDRESS;
        let from = Ipv4Addr::new(127, 0, 1, u8::try_from(n / per_address).unwrap());
        silent.push(connect_from(from, dns.tcp).await);
    }
    let started = tokio::time::Instant::now();
    let late = dns.tcp(&query("relay.test.", RecordType::A)).await;
    assert_eq!(addresses_v4(&late), vec![V4]);
    assert!(
        started.elapsed() >= ferry_relay::dns::TCP_IDLE,
        "answered only once a slot freed: {:?}",
        started.elapsed()
    );
    drop(silent);
    dns.stop().await;
}

/// The SOA's RNAME for `--acme-email` `contact`, as its labels.
fn soa_contact(contact: &str) -> Vec<Vec<u8>> {
    let zone = Zone::new(
        &ZoneConfig {
            domain: DOMAIN.into(),
            ns_name: format!("ns.{DOMAIN}"),
            addresses: vec![IpAddr::V4(V4)],
            caa_issuer: None,
            contact: Some(contact.into()),
        },
        Challenges::default(),
    )
    .unwrap_or_else(|err| panic!("a zone with the contact {contact}: {err}"));
    let request = query("relay.test.", RecordType::SOA)
        .to_vec()
        .expect("encodes");
    let answer =
        Message::from_vec(&zone.respond(&request, true).expect("an answer")).expect("decodes");
    let Some(RData::SOA(record)) = answer.answers.first().map(|r| &r.data) else {
        panic!("no SOA: {answer:?}");
    };
    record.rname.iter().map(<[u8]>::to_vec).collect()
}

#[test]
fn the_soa_mailbox_keeps_plus_and_dots_of_the_local_part_in_its_first_label() {
    let labels = |names: &[&str]| {
        names
            .iter()
            .map(|n| n.as_bytes().to_vec())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        soa_contact("ops+ferry@example.com"),
        labels(&["ops+ferry", "example", "com"])
    );
    // A dot in the local part stays in the first label (`first\.last` in a
    // zone file), not a label of its own naming another mailbox.
    assert_eq!(
        soa_contact("first.last@example.com"),
        labels(&["first.last", "example", "com"])
    );
    // Not representable (a label over 63 bytes): hostmaster.DOMAIN.
    let long = format!("{}@example.com", "a".repeat(64));
    assert_eq!(soa_contact(&long), labels(&["hostmaster", "relay", "test"]));
}

/// A TCP connection to `to` from the loopback address `from` (any of
/// 127.0.0.0/8 on Linux).
async fn connect_from(from: Ipv4Addr, to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("a socket");
    socket
        .bind(SocketAddr::new(IpAddr::V4(from), 0))
        .expect("bind a loopback address");
    socket.connect(to).await.expect("connect")
}

#[tokio::test(start_paused = true)]
async fn one_address_holds_at_most_its_share_of_tcp_connections_while_others_are_served() {
    let dns = Dns::start().await;
    let attacker = Ipv4Addr::new(127, 0, 0, 1);
    let mut held = Vec::new();
    for _ in 0..ferry_relay::dns::TCP_PER_ADDRESS {
        held.push(connect_from(attacker, dns.tcp).await);
    }
    // One more from the same address is closed unanswered, at once.
    let started = tokio::time::Instant::now();
    let mut extra = connect_from(attacker, dns.tcp).await;
    let _ = extra
        .write_all(&framed(&query("relay.test.", RecordType::A)))
        .await;
    let mut byte = [0u8; 1];
    let read = within("the extra connection to close", extra.read(&mut byte)).await;
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "closed, not answered: {read:?}"
    );
    assert!(started.elapsed() < ferry_relay::dns::TCP_IDLE);
    // Another address is served meanwhile.
    let mut other = connect_from(Ipv4Addr::new(127, 0, 0, 2), dns.tcp).await;
    other
        .write_all(&framed(&query("relay.test.", RecordType::A)))
        .await
        .expect("send");
    assert_eq!(addresses_v4(&read_tcp(&mut other).await), vec![V4]);
    drop(held);
    dns.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_tcp_connection_that_keeps_asking_slowly_is_closed_after_its_lifetime() {
    let dns = Dns::start().await;
    let mut stream = TcpStream::connect(dns.tcp).await.expect("connect");
    let opened = tokio::time::Instant::now();
    let mut answers = 0;
    // A query just often enough never to idle out, well under the query cap.
    loop {
        if stream
            .write_all(&framed(&query("relay.test.", RecordType::A)))
            .await
            .is_err()
        {
            break;
        }
        let mut length = [0u8; 2];
        if within("an answer or the close", stream.read_exact(&mut length))
            .await
            .is_err()
        {
            break;
        }
        let mut answer = vec![0u8; usize::from(u16::from_be_bytes(length))];
        stream.read_exact(&mut answer).await.expect("the answer");
        answers += 1;
        assert!(answers < ferry_relay::dns::TCP_QUERIES, "never closed");
        tokio::time::sleep(ferry_relay::dns::TCP_IDLE / 2).await;
    }
    let lived = opened.elapsed();
    assert!(lived >= ferry_relay::dns::TCP_LIFETIME, "{lived:?}");
    assert!(
        lived < ferry_relay::dns::TCP_LIFETIME + ferry_relay::dns::TCP_IDLE,
        "{lived:?}"
    );
    dns.stop().await;
}
