//! The activity log's sustained write rate, measured in this process on the
//! relay's own store: batches of realistic webhook exchanges appended as
//! the relay's capture writer appends them.

use std::time::{Duration, Instant};

use bytes::Bytes;
use ferry_common::ids::ExchangeId;
use ferry_relay::store::sqlite::Sqlite;
use ferry_relay::store::{
    now_micros, ActivityLog, CapturedBody, CapturedResponse, Exchange, Header, Kind, Outcome,
};
use serde::{Deserialize, Serialize};

/// Entries per append: the most the relay's writer puts in one transaction.
pub const BATCH: usize = 2048;
/// Bytes of each request body and each response body.
const BODY_BYTES: usize = 1024;

/// What the write measurement found.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WriteRate {
    /// Entries stored per second of appending.
    pub entries_per_sec: f64,
    /// The database's size on disk per entry, in bytes.
    pub bytes_per_entry: f64,
}

/// Appends `entries` webhook exchanges to a fresh database in batches of
/// [`BATCH`] and times the appends alone: building the entries is capture's
/// work, not the writer's.
pub async fn measure(entries: usize) -> Result<WriteRate, String> {
    let dir = tempfile::tempdir().map_err(|err| format!("cannot make a temporary dir: {err}"))?;
    let path = dir.path().join(ferry_relay::data_dir::DATABASE_FILE);
    let log =
        Sqlite::open(&path).map_err(|err| format!("cannot open {}: {err}", path.display()))?;
    let mut random = Random(0x5eed_f00d);
    let (mut stored, mut appending) = (0, Duration::ZERO);
    while stored < entries {
        let count = BATCH.min(entries - stored);
        let batch = (0..count).map(|_| webhook(&mut random)).collect();
        let started = Instant::now();
        log.append(batch)
            .await
            .map_err(|err| format!("the append failed: {err}"))?;
        appending += started.elapsed();
        stored += count;
    }
    drop(log);
    let on_disk: u64 = std::fs::read_dir(dir.path())
        .map_err(|err| format!("cannot list {}: {err}", dir.path().display()))?
        .filter_map(|entry| entry.ok()?.metadata().ok())
        .map(|metadata| metadata.len())
        .sum();
    Ok(WriteRate {
        entries_per_sec: stored as f64 / appending.as_secs_f64().max(f64::EPSILON),
        bytes_per_entry: on_disk as f64 / stored.max(1) as f64,
    })
}

/// A small deterministic generator (SplitMix64): every run stores the same
/// entries, and the bench needs no random-number crate.
struct Random(u64);

impl Random {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn pick<'a>(&mut self, from: &[&'a str]) -> &'a str {
        from[self.below(from.len() as u64) as usize]
    }

    /// `len` letters and digits, as in Stripe's object ids.
    fn token(&mut self, len: usize) -> String {
        const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
        (0..len)
            .map(|_| char::from(ALPHABET[self.below(ALPHABET.len() as u64) as usize]))
            .collect()
    }

    fn hex(&mut self, len: usize) -> String {
        (0..len)
            .map(|_| char::from(b"0123456789abcdef"[self.below(16) as usize]))
            .collect()
    }

    /// Words up to exactly `len` bytes, so that each body is the same size
    /// but its text (and so its trigrams) differs.
    fn words(&mut self, len: usize) -> String {
        const WORDS: &[&str] = &[
            "order",
            "shipped",
            "refund",
            "invoice",
            "customer",
            "payment",
            "subscription",
            "renewal",
            "failed",
            "succeeded",
            "card",
            "declined",
            "warehouse",
            "parcel",
            "express",
            "priority",
            "coupon",
            "annual",
            "monthly",
            "trial",
            "upgrade",
            "seat",
            "account",
            "receipt",
            "tax",
            "europe",
            "berlin",
            "lisbon",
            "oslo",
            "denver",
        ];
        let mut text = String::with_capacity(len + 16);
        while text.len() < len {
            if !text.is_empty() {
                text.push(' ');
            }
            text.push_str(self.pick(WORDS));
            if self.below(4) == 0 {
                text.push_str(&self.below(100_000).to_string());
            }
        }
        text.truncate(len);
        text
    }
}

/// `prefix`, then words, then `suffix`: JSON of exactly [`BODY_BYTES`].
fn padded(random: &mut Random, prefix: String, suffix: &str) -> Bytes {
    let room = BODY_BYTES.saturating_sub(prefix.len() + suffix.len());
    Bytes::from(format!("{prefix}{}{suffix}", random.words(room)))
}

fn header(name: &str, value: impl Into<Vec<u8>>) -> Header {
    Header {
        name: name.to_owned(),
        value: value.into(),
    }
}

/// One webhook delivery as the relay would log it: a signed JSON event
/// posted through a tunnel and the JSON its handler answered.
fn webhook(random: &mut Random) -> Exchange {
    const EVENTS: &[&str] = &[
        "charge.succeeded",
        "charge.refunded",
        "invoice.paid",
        "invoice.payment_failed",
        "customer.subscription.updated",
        "checkout.session.completed",
    ];
    let received_at = now_micros();
    let created = received_at / 1_000_000;
    let event = format!("evt_{}", random.token(24));
    let kind = random.pick(EVENTS);
    let request_id = random.hex(32);
    let event_prefix = format!(
        r#"{{"id":"{event}","object":"event","api_version":"2024-06-20","created":{created},"type":"{kind}","livemode":false,"pending_webhooks":1,"request":{{"id":"req_{}","idempotency_key":"{}"}},"data":{{"object":{{"id":"ch_{}","object":"charge","amount":{},"currency":"usd","customer":"cus_{}","receipt_email":"{}@example.com","metadata":{{"order_id":"{}","note":""#,
        random.token(14),
        random.hex(32),
        random.token(24),
        random.below(100_000),
        random.token(14),
        random.token(8).to_lowercase(),
        random.below(10_000_000),
    );
    let request_body = padded(random, event_prefix, r#""}}}}"#);
    let answer_prefix = format!(
        r#"{{"received":true,"event":"{event}","type":"{kind}","handled_at":{created},"handler":"webhooks.{}","log":""#,
        random.pick(&["billing", "orders", "accounts"]),
    );
    let response_body = padded(random, answer_prefix, r#""}"#);
    let request_headers = vec![
        header("host", "brave-otter.relay.example.com"),
        header(
            "user-agent",
            "Stripe/1.0 (+https://stripe.com/docs/webhooks)",
        ),
        header("content-type", "application/json; charset=utf-8"),
        header("content-length", BODY_BYTES.to_string()),
        header("accept", "*/*; q=0.5, application/xml"),
        header("cache-control", "no-cache"),
        header(
            "stripe-signature",
            format!("t={created},v1={},v0={}", random.hex(64), random.hex(64)),
        ),
        header("x-request-id", request_id.clone()),
        header(
            "x-forwarded-for",
            format!("54.187.{}.{}", random.below(256), random.below(256)),
        ),
        header("accept-encoding", "gzip"),
    ];
    let response_headers = vec![
        header("content-type", "application/json"),
        header("content-length", BODY_BYTES.to_string()),
        header("date", "Fri, 28 Nov 2026 10:00:00 GMT"),
        header("x-request-id", request_id),
        header("server", "uvicorn"),
    ];
    let body = |bytes: Bytes| CapturedBody {
        size: bytes.len() as u64,
        bytes,
        truncated: false,
    };
    Exchange {
        id: ExchangeId::new(),
        tunnel: "brave-otter".to_owned(),
        owner: String::new(),
        kind: Kind::Tunnel,
        replay_of: None,
        received_at,
        method: "POST".to_owned(),
        url: format!(
            "https://brave-otter.relay.example.com/webhooks/stripe?attempt={}",
            random.below(3) + 1
        ),
        http_version: "HTTP/1.1".to_owned(),
        remote_addr: format!(
            "54.187.{}.{}:{}",
            random.below(256),
            random.below(256),
            40_000 + random.below(20_000)
        ),
        request_headers,
        request_body: body(request_body),
        response: Some(CapturedResponse {
            status: 200,
            headers: response_headers,
            body: body(response_body),
        }),
        responded_at: Some(received_at + 1_800),
        done_at: Some(received_at + 2_100),
        outcome: Outcome::Answered,
        error: None,
        incomplete: false,
        replayed_at: None,
        dispatch: None,
    }
}

#[cfg(test)]
mod tests {
    use super::{webhook, Random, BODY_BYTES};

    #[test]
    fn webhooks_carry_distinct_json_bodies_of_one_kibibyte() {
        let mut random = Random(7);
        let (a, b) = (webhook(&mut random), webhook(&mut random));
        for entry in [&a, &b] {
            let request: serde_json::Value =
                serde_json::from_slice(&entry.request_body.bytes).expect("request JSON");
            assert_eq!(request["object"], "event");
            let response = entry.response.as_ref().expect("a response");
            let answer: serde_json::Value =
                serde_json::from_slice(&response.body.bytes).expect("response JSON");
            assert_eq!(answer["received"], true);
            assert_eq!(entry.request_body.bytes.len(), BODY_BYTES);
            assert_eq!(response.body.bytes.len(), BODY_BYTES);
            assert_eq!(entry.request_headers.len(), 10);
        }
        assert_ne!(a.request_body, b.request_body);
    }
}
