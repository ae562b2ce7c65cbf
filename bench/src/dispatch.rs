//! The webhook dispatcher's throughput and queue delay, driven through the
//! relay's API as a sender would: webhooks pointing at the bench's
//! [`Receiver`], events posted by a few producers over keep-alive
//! connections, and every delivery matched to its event on arrival.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use ferry_common::api::{DeliveryPage, EventAccepted, EventInput, WebhookInput, WebhookView};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::{header, Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::metrics::Metrics;
use crate::receiver::Receiver;

/// The event type every bench event has: one of the built-in ones.
const EVENT_TYPE: &str = "document.create";
/// How long all deliveries of a run may take to arrive, from its first
/// POST: far beyond any rate worth measuring, short enough to end a stuck
/// run.
const DELIVERY_WAIT: Duration = Duration::from_secs(180);
/// How long the relay may take to store every attempt once all arrived.
const STORED_WAIT: Duration = Duration::from_secs(60);
/// How often the wait for stored attempts reads `/metrics`.
const POLL: Duration = Duration::from_millis(50);
/// Deliveries per page when counting them through the API: its maximum.
const PAGE: usize = 200;

/// One keep-alive HTTP/1.1 connection to the relay's API.
pub struct Api {
    /// The relay, also the Host of every call, so that the relay answers
    /// rather than a tunnel.
    relay: SocketAddr,
    /// The connection's sending half.
    sender: SendRequest<Full<Bytes>>,
    /// The connection's task, stopped when this handle drops.
    _connection: JoinSet<()>,
}

impl Api {
    /// Opens a connection to the relay at `relay`.
    pub async fn connect(relay: SocketAddr) -> Result<Self, String> {
        let stream = tokio::net::TcpStream::connect(relay)
            .await
            .map_err(|err| format!("cannot reach the relay's API: {err}"))?;
        let _ = stream.set_nodelay(true);
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|err| format!("cannot talk HTTP/1.1 to the relay: {err}"))?;
        let mut tasks = JoinSet::new();
        tasks.spawn(async move {
            let _ = connection.await;
        });
        Ok(Self {
            relay,
            sender,
            _connection: tasks,
        })
    }

    /// Sends one call and reads the whole answer.
    async fn call(
        &mut self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, Bytes), String> {
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, self.relay.to_string());
        if body.is_some() {
            request = request.header(header::CONTENT_TYPE, "application/json");
        }
        let request = request
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|err| format!("cannot build a call to {path}: {err}"))?;
        self.sender
            .ready()
            .await
            .map_err(|err| format!("the API connection closed: {err}"))?;
        let response = self
            .sender
            .send_request(request)
            .await
            .map_err(|err| format!("{path} failed: {err}"))?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|err| format!("{path}'s answer broke off: {err}"))?
            .to_bytes();
        Ok((status, body))
    }

    /// Sends `body` as JSON and reads the answer's JSON, which must come
    /// with `expect`.
    async fn post<T: serde::de::DeserializeOwned>(
        &mut self,
        path: &str,
        body: &impl Serialize,
        expect: StatusCode,
    ) -> Result<T, String> {
        let body = serde_json::to_vec(body).map_err(|err| err.to_string())?;
        let (status, answer) = self.call(Method::POST, path, Some(body)).await?;
        json_of(path, status, expect, &answer)
    }

    async fn get<T: serde::de::DeserializeOwned>(&mut self, path: &str) -> Result<T, String> {
        let (status, answer) = self.call(Method::GET, path, None).await?;
        json_of(path, status, StatusCode::OK, &answer)
    }
}

fn json_of<T: serde::de::DeserializeOwned>(
    path: &str,
    status: StatusCode,
    expect: StatusCode,
    answer: &[u8],
) -> Result<T, String> {
    if status != expect {
        return Err(format!(
            "{path} answered {status}, not {expect}: {}",
            String::from_utf8_lossy(answer)
        ));
    }
    serde_json::from_slice(answer).map_err(|err| format!("{path} answered unexpected JSON: {err}"))
}

/// Creates `count` webhooks listening to every event, webhook `k` pointing
/// at the receiver's `/hook/k`; returns their ids.
pub async fn create_webhooks(
    relay: SocketAddr,
    receiver: &Receiver,
    count: usize,
) -> Result<Vec<String>, String> {
    let mut api = Api::connect(relay).await?;
    let mut ids = Vec::with_capacity(count);
    for k in 0..count {
        let input = WebhookInput {
            name: Some(format!("bench {k}")),
            url: Some(receiver.url(k)),
            actions: Some(vec!["*".to_owned()]),
            ..WebhookInput::default()
        };
        let view: WebhookView = api
            .post("/api/v1/webhooks", &input, StatusCode::CREATED)
            .await?;
        ids.push(view.id);
    }
    Ok(ids)
}

/// How events are sent.
#[derive(Debug, Clone, Copy)]
struct Sending {
    /// Events in all.
    events: usize,
    /// Concurrent producers, each on a connection of its own.
    producers: usize,
    /// Event `i` is sent at `i * period` after the start; zero sends each
    /// as soon as the producer's previous one was accepted.
    period: Duration,
    /// Whether the receiver holds deliveries until every event has been
    /// accepted.
    backlog: bool,
}

/// One event as its producer saw it.
#[derive(Debug, Clone, Copy)]
struct Sent {
    /// The event's number.
    seq: usize,
    /// When its POST went out.
    sent: Instant,
    /// When its 202 had been read.
    accepted: Instant,
}

/// What a run saw, on one clock.
struct Run {
    /// When the first POST went out.
    start: Instant,
    /// Each event's POST and 202, indexed by its number.
    sent: Vec<Option<Sent>>,
    /// When the receiver began to answer: the start, or with a backlog
    /// once every event had been accepted.
    answering: Instant,
    /// Each delivery's arrival, indexed by webhook and event number.
    arrived: Vec<Vec<Option<Instant>>>,
    /// When the last delivery arrived.
    last_arrival: Instant,
    /// Deliveries that arrived more than once.
    duplicates: usize,
}

/// Sends events as `how` says to `relays`, round-robin (relays sharing one
/// database, whose `webhooks` webhooks point at `receiver`), and waits
/// until every delivery has arrived once.
async fn run(
    relays: &[SocketAddr],
    receiver: &mut Receiver,
    webhooks: usize,
    how: Sending,
) -> Result<Run, String> {
    let mut connections = Vec::with_capacity(how.producers);
    for _ in 0..how.producers {
        let mut apis = Vec::with_capacity(relays.len());
        for &relay in relays {
            apis.push(Api::connect(relay).await?);
        }
        connections.push(apis);
    }
    if how.backlog {
        receiver.hold();
    }
    let start = Instant::now();
    let mut answering = start;
    let mut producers = JoinSet::new();
    for (p, api) in connections.into_iter().enumerate() {
        producers.spawn(produce(api, p, how, start, webhooks));
    }
    let expected = how.events * webhooks;
    let mut arrived = vec![vec![None; how.events]; webhooks];
    let (mut unique, mut duplicates) = (0, 0);
    let mut last_arrival = start;
    let mut sent = vec![None; how.events];
    let deadline = start + DELIVERY_WAIT;
    let mut producing = true;
    while unique < expected || producing {
        tokio::select! {
            arrival = receiver.arrivals.recv() => {
                let Some(arrival) = arrival else {
                    return Err("the webhook receiver stopped".into());
                };
                if !arrival.signed {
                    return Err("a delivery came without the Standard Webhooks headers".into());
                }
                let slot = arrived
                    .get_mut(arrival.webhook)
                    .and_then(|events| events.get_mut(arrival.seq))
                    .ok_or_else(|| format!(
                        "a delivery for webhook {} of event {} that was never sent",
                        arrival.webhook, arrival.seq
                    ))?;
                if slot.is_some() {
                    duplicates += 1;
                } else {
                    *slot = Some(arrival.at);
                    unique += 1;
                    last_arrival = arrival.at;
                }
            }
            joined = producers.join_next(), if producing => match joined {
                Some(Ok(Ok(events))) => {
                    for event in events {
                        sent[event.seq] = Some(event);
                    }
                }
                Some(Ok(Err(err))) => return Err(err),
                Some(Err(err)) => return Err(format!("a producer failed: {err}")),
                None => {
                    producing = false;
                    if how.backlog {
                        receiver.answer();
                        answering = Instant::now();
                    }
                }
            },
            () = tokio::time::sleep_until(deadline) => {
                return Err(format!(
                    "{unique} of {expected} deliveries arrived within {DELIVERY_WAIT:?}"
                ));
            }
        }
    }
    Ok(Run {
        start,
        sent,
        answering,
        arrived,
        last_arrival,
        duplicates,
    })
}

/// Producer `p`: sends events `p`, `p + producers`, …, event `seq` to
/// relay `seq % relays`, and checks that each was accepted with a delivery
/// for every webhook.
async fn produce(
    mut apis: Vec<Api>,
    p: usize,
    how: Sending,
    start: Instant,
    webhooks: usize,
) -> Result<Vec<Sent>, String> {
    let mut sent = Vec::with_capacity(how.events / how.producers + 1);
    for seq in (p..how.events).step_by(how.producers) {
        if !how.period.is_zero() {
            let due = how.period * u32::try_from(seq).unwrap_or(u32::MAX);
            tokio::time::sleep_until(start + due).await;
        }
        let event = EventInput {
            kind: EVENT_TYPE.to_owned(),
            data: serde_json::json!({ "seq": seq, "document_id": format!("doc_{seq}") }),
            id: None,
        };
        let relays = apis.len();
        let api = apis
            .get_mut(seq % relays.max(1))
            .ok_or("a producer with no relay to send to")?;
        let at = Instant::now();
        let answer: EventAccepted = api
            .post("/api/v1/events", &event, StatusCode::ACCEPTED)
            .await?;
        let accepted = Instant::now();
        if answer.queued != webhooks || answer.duplicate {
            return Err(format!(
                "event {seq} queued {} deliveries (duplicate: {}), not {webhooks}",
                answer.queued, answer.duplicate
            ));
        }
        sent.push(Sent {
            seq,
            sent: at,
            accepted,
        });
    }
    Ok(sent)
}

/// What a throughput run found.
#[derive(Debug, Clone, Serialize)]
pub struct Throughput {
    /// Events accepted per second, from the first POST to the last 202.
    pub events_per_sec: f64,
    /// Deliveries received per second, from the first POST (with a
    /// backlog: from the receiver's first answer) to the last arrival.
    pub deliveries_per_sec: f64,
    /// Deliveries that arrived more than once.
    pub duplicates: usize,
}

/// Posts `events` events as fast as `producers` producers can, to
/// `relays` round-robin, whose `webhooks` webhooks point at `receiver`
/// (one relay, or several on one database), and times them until
/// every delivery has arrived. With `backlog`, the receiver holds every
/// delivery until the last event was accepted, and deliveries are timed
/// from its first answer: the dispatcher draining its queue with no
/// intake beside it.
pub async fn throughput(
    relays: &[SocketAddr],
    receiver: &mut Receiver,
    webhooks: usize,
    events: usize,
    producers: usize,
    backlog: bool,
) -> Result<Throughput, String> {
    let how = Sending {
        events,
        producers,
        period: Duration::ZERO,
        backlog,
    };
    let run = run(relays, receiver, webhooks, how).await?;
    let last_accepted = run
        .sent
        .iter()
        .flatten()
        .map(|s| s.accepted)
        .max()
        .unwrap_or(run.start);
    let per_sec = |count: usize, from: Instant, to: Instant| {
        count as f64 / to.duration_since(from).as_secs_f64().max(f64::EPSILON)
    };
    Ok(Throughput {
        events_per_sec: per_sec(events, run.start, last_accepted),
        deliveries_per_sec: per_sec(events * webhooks, run.answering, run.last_arrival),
        duplicates: run.duplicates,
    })
}

/// What a steady-rate run found, in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct QueueDelay {
    /// From each event's 202 to its delivery's arrival: the queue alone.
    pub accepted_p50_ms: f64,
    /// The same, 99th percentile.
    pub accepted_p99_ms: f64,
    /// From each event's POST to its delivery's arrival: what a sender sees.
    pub sent_p50_ms: f64,
    /// The same, 99th percentile.
    pub sent_p99_ms: f64,
    /// The slowest POST's answer.
    pub post_max_ms: f64,
}

/// Posts `rate` events per second for `duration` to a relay whose one
/// webhook points at `receiver`, and times each delivery from its event.
pub async fn queue_delay(
    relay: SocketAddr,
    receiver: &mut Receiver,
    rate: u32,
    duration: Duration,
) -> Result<QueueDelay, String> {
    let events = usize::try_from(u64::from(rate) * duration.as_millis() as u64 / 1000)
        .unwrap_or(usize::MAX)
        .max(1);
    // Four producers keep the schedule even when one POST is slow.
    let how = Sending {
        events,
        producers: 4,
        period: Duration::from_secs(1) / rate.max(1),
        backlog: false,
    };
    let run = run(&[relay], receiver, 1, how).await?;
    let (mut from_accepted, mut from_sent, mut post) = (Vec::new(), Vec::new(), Vec::new());
    for (sent, arrived) in run.sent.iter().zip(&run.arrived[0]) {
        let (Some(sent), Some(arrived)) = (sent, arrived) else {
            return Err("an event was neither sent nor delivered".into());
        };
        let ms =
            |from: Instant, to: Instant| to.saturating_duration_since(from).as_secs_f64() * 1e3;
        // A delivery may arrive before its 202 is read: that counts as 0.
        from_accepted.push(ms(sent.accepted, *arrived));
        from_sent.push(ms(sent.sent, *arrived));
        post.push(ms(sent.sent, sent.accepted));
    }
    Ok(QueueDelay {
        accepted_p50_ms: percentile(&mut from_accepted, 0.50),
        accepted_p99_ms: percentile(&mut from_accepted, 0.99),
        sent_p50_ms: percentile(&mut from_sent, 0.50),
        sent_p99_ms: percentile(&mut from_sent, 0.99),
        post_max_ms: percentile(&mut post, 1.0),
    })
}

/// The value below which `share` of `values` lie (nearest rank).
fn percentile(values: &mut [f64], share: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    let rank = (share * values.len() as f64).ceil() as usize;
    values[rank.clamp(1, values.len()) - 1]
}

/// What the relay stored of a run.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Stored {
    /// Attempts the relay made: more than the deliveries means retries.
    pub attempts: u64,
    /// Seconds from the call until every delivery was stored as succeeded.
    pub catch_up_secs: f64,
}

/// Waits until `relays` have stored `deliveries` succeeded deliveries
/// between them (each one's `/metrics` counts those it made once their
/// transaction commits), then counts them again page by page through the
/// first one's API for each of `webhooks`.
pub async fn stored(
    relays: &[SocketAddr],
    webhooks: &[String],
    deliveries: usize,
) -> Result<Stored, String> {
    let started = Instant::now();
    let attempts = loop {
        let (mut succeeded, mut failed, mut errors, mut attempts) = (0, 0, 0, 0);
        for &relay in relays {
            let metrics = Metrics::read(relay).await?;
            succeeded += metrics.value("ferry_dispatch_succeeded_total")?;
            failed += metrics.value("ferry_dispatch_failed_total")?;
            errors += metrics.value("ferry_dispatch_store_errors_total")?;
            attempts += metrics.value("ferry_dispatch_attempts_total")?;
        }
        if failed > 0 || errors > 0 {
            return Err(format!(
                "the relay counted {failed} failed deliveries and {errors} store errors"
            ));
        }
        if succeeded >= deliveries as u64 {
            break attempts;
        }
        if started.elapsed() > STORED_WAIT {
            return Err(format!(
                "the relay had stored {succeeded} of {deliveries} deliveries as succeeded {STORED_WAIT:?} after the last arrived"
            ));
        }
        tokio::time::sleep(POLL).await;
    };
    let catch_up_secs = started.elapsed().as_secs_f64();
    let first = relays.first().ok_or("no relay to count deliveries on")?;
    let mut api = Api::connect(*first).await?;
    let mut listed = 0;
    for id in webhooks {
        let mut before = None;
        loop {
            let mut path = format!("/api/v1/webhooks/{id}/deliveries?state=succeeded&limit={PAGE}");
            if let Some(cursor) = &before {
                path.push_str(&format!("&before={cursor}"));
            }
            let page: DeliveryPage = api.get(&path).await?;
            listed += page.items.len();
            match page.next_cursor {
                Some(cursor) => before = Some(cursor),
                None => break,
            }
        }
    }
    if listed != deliveries {
        return Err(format!(
            "the API lists {listed} succeeded deliveries, not {deliveries}"
        ));
    }
    Ok(Stored {
        attempts,
        catch_up_secs,
    })
}

#[cfg(test)]
mod tests {
    use super::percentile;

    #[test]
    fn percentiles_take_the_nearest_rank() {
        let mut values: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        assert_eq!(percentile(&mut values, 0.50), 50.0);
        assert_eq!(percentile(&mut values, 0.99), 99.0);
        assert_eq!(percentile(&mut values, 1.0), 100.0);
        assert_eq!(percentile(&mut [7.0], 0.99), 7.0);
        assert_eq!(percentile(&mut [], 0.5), 0.0);
    }
}
