//! The webhook dispatcher's queue from the outside: the retry schedule as
//! it unfolds in (paused) hours, the egress guard's refusals recorded as
//! attempts, and many producers against one relay.
//!
//! The first two drive a [`Dispatcher`] built by hand over a SQLite store,
//! so that time and the resolver can be the test's; the third goes through
//! a whole relay and its API.

use std::collections::{HashMap, HashSet};
use std::io;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use ferry_relay::activity::capture::{Recorder, QUEUE_BYTES};
use ferry_relay::dispatch::schedule::RetrySchedule;
use ferry_relay::dispatch::{sign, Dispatcher, Settings};
use ferry_relay::egress::{Allow, Egress, Resolve, SystemResolver};
use ferry_relay::store::sqlite::Sqlite;
use ferry_relay::store::{
    ActivityLog, DeliveryState, Enqueued, Filter, Kind, Micros, NewEvent, Outcome, WebhookRecord,
    Webhooks,
};
use ferry_relay::tunnels::{RegistryLimits, Tunnels};
use ferry_tests::{empty, within, Api, Origin, TestRelay};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{HeaderMap, Request, Response, StatusCode};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// The dedup window the API uses: a day.
const DAY: Micros = 86_400_000_000;

/// A request a receiver got.
struct Arrival {
    /// When it arrived, on tokio's clock (virtual under paused time).
    at: Instant,
    /// The path it was sent to.
    path: String,
    /// Its header fields.
    headers: HeaderMap,
    /// Its body.
    body: Bytes,
}

impl Arrival {
    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .unwrap_or_else(|| panic!("every delivery carries {name}"))
            .to_str()
            .expect("an ASCII header")
    }
}

/// A webhook receiver on loopback answering every request with `status`,
/// and the channel each request is reported on once its body is read.
async fn receiver(status: StatusCode) -> (Origin, mpsc::Receiver<Arrival>) {
    // Room for every request of the busiest test, so the receiver never
    // waits on the test.
    let (sender, arrivals) = mpsc::channel(16_384);
    let origin = Origin::start(move |request: Request<Incoming>| {
        let sender = sender.clone();
        async move {
            let at = Instant::now();
            let (parts, body) = request.into_parts();
            let body = body
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            let _ = sender
                .send(Arrival {
                    at,
                    path: parts.uri.path().to_owned(),
                    headers: parts.headers,
                    body,
                })
                .await;
            Response::builder()
                .status(status)
                .body(empty())
                .expect("a valid response")
        }
    })
    .await;
    (origin, arrivals)
}

/// A webhook of the relay's single (open) owner listening to everything.
fn webhook(id: &str, url: &str, secret: &str) -> WebhookRecord {
    WebhookRecord {
        id: id.to_owned(),
        owner: String::new(),
        name: id.to_owned(),
        method: "POST".to_owned(),
        url: url.to_owned(),
        actions: vec!["*".to_owned()],
        headers: Vec::new(),
        enabled: true,
        ordered: false,
        secret: secret.to_owned(),
        previous_secret: None,
        disabled_reason: None,
        failing_since: None,
        created_at: 1,
        updated_at: 1,
    }
}

/// A dispatcher over a fresh SQLite store, running, with the activity
/// log's writer.
struct Rig {
    /// The queue and the log.
    store: Arc<Sqlite>,
    /// The dispatcher.
    dispatcher: Arc<Dispatcher>,
    /// Stops the dispatcher.
    dispatch_stop: CancellationToken,
    /// The dispatcher's task.
    dispatching: JoinHandle<()>,
    /// Stops the log's writer once it stored what is queued.
    writer_stop: CancellationToken,
    /// The log's writer.
    writer: JoinHandle<()>,
    /// Holds the database.
    _dir: tempfile::TempDir,
}

impl Rig {
    fn start(egress: Egress) -> Self {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let store =
            Arc::new(Sqlite::open(&dir.path().join("ferry.sqlite")).expect("the store opens"));
        let writer_stop = CancellationToken::new();
        let (recorder, writer) = Recorder::new(
            Arc::clone(&store) as Arc<dyn ActivityLog>,
            64 * 1024,
            QUEUE_BYTES,
            writer_stop.clone(),
        );
        let writer = tokio::spawn(writer);
        let tunnels = Arc::new(Tunnels::new(RegistryLimits {
            max_in_flight: 64,
            max_in_flight_per_ip: 64,
            max_per_account: 8,
            max_tunnels: 64,
            name_hold: Duration::from_secs(60),
            requests_per_second: (u32::MAX, u32::MAX),
            requests_per_second_per_ip: (u32::MAX, u32::MAX),
        }));
        let dispatcher = Dispatcher::new(
            Arc::clone(&store) as Arc<dyn Webhooks>,
            egress,
            recorder,
            (tunnels, None),
            "relay.test",
            Settings::default(),
        );
        let dispatch_stop = CancellationToken::new();
        let dispatching = tokio::spawn(Arc::clone(&dispatcher).run(dispatch_stop.clone()));
        Self {
            store,
            dispatcher,
            dispatch_stop,
            dispatching,
            writer_stop,
            writer,
            _dir: dir,
        }
    }

    /// Queues `id` for every webhook with `max_attempts` and wakes the
    /// dispatcher; returns how many deliveries were queued.
    async fn send_event(&self, id: &str, max_attempts: u32) -> usize {
        let event = NewEvent {
            owner: String::new(),
            id: id.to_owned(),
            kind: "document.create".to_owned(),
            payload: Bytes::from(format!(
                r#"{{"type":"document.create","data":{{"id":"{id}"}}}}"#
            )),
            at: self.dispatcher.now(),
            only: None,
            max_attempts,
        };
        let queued = self.store.enqueue(event, DAY).await.expect("enqueue");
        self.dispatcher.poke();
        match queued {
            Enqueued::Queued(n) => n,
            Enqueued::Duplicate => panic!("event {id} was taken for a duplicate"),
        }
    }

    /// Stops the dispatcher, then the writer once it stored every entry;
    /// the store stays readable.
    async fn stop(&mut self) {
        self.dispatch_stop.cancel();
        within("the dispatcher to stop", &mut self.dispatching)
            .await
            .expect("the dispatcher ends");
        self.writer_stop.cancel();
        within("the log writer to stop", &mut self.writer)
            .await
            .expect("the writer ends");
    }
}

/// Every dispatch entry of the activity log.
async fn dispatch_entries(store: &Sqlite) -> Vec<ferry_relay::store::Exchange> {
    let filter = Filter {
        kind: Some(Kind::Dispatch),
        ..Filter::default()
    };
    store
        .list(&filter, None, 10_000, false)
        .await
        .expect("list the log")
}

/// Calls `check` until it returns something, every few milliseconds,
/// failing the test after [`ferry_tests::PATIENCE`].
async fn poll_until<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    within(what, async {
        loop {
            if let Some(found) = check().await {
                return found;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
}

/// The waits of the standard schedule between attempts, without jitter.
const STANDARD_WAITS: [Duration; 7] = [
    Duration::from_secs(5),
    Duration::from_secs(5 * 60),
    Duration::from_secs(30 * 60),
    Duration::from_secs(2 * 3600),
    Duration::from_secs(5 * 3600),
    Duration::from_secs(10 * 3600),
    Duration::from_secs(10 * 3600),
];

/// Keeps tokio's paused clock from moving on its own while it lives: a
/// running blocking task holds auto-advance off (`tokio::time::pause`).
struct ClockHold {
    /// Dropped to end the blocking task.
    release: std::sync::mpsc::Sender<()>,
    /// The blocking task.
    task: JoinHandle<()>,
}

impl ClockHold {
    fn new() -> Self {
        let (release, held) = std::sync::mpsc::channel::<()>();
        let task = tokio::task::spawn_blocking(move || {
            let _ = held.recv();
        });
        Self { release, task }
    }

    /// Lets the clock auto-advance again.
    async fn release(self) {
        drop(self.release);
        self.task.await.expect("the clock hold ends");
    }
}

/// How far before a retry is due the test stops moving the clock itself
/// and lets the dispatcher's own timers bring the attempt.
const LEAD: Duration = Duration::from_secs(2);

// Paused time, with the receiver in this runtime: the clock auto-advances
// only while the dispatcher, the receiver and the test all wait on timers
// (a store call runs on the blocking pool, which holds the clock still).
// An idle dispatcher looks at its queue every second, so letting the clock
// crawl through the 28 hours would take 100,000 rounds (15 to 25 s): the
// test jumps to shortly before each retry is due, in one step, and checks
// that no attempt came before its time.
#[tokio::test(start_paused = true)]
async fn a_failing_delivery_is_retried_on_the_schedule_under_one_id_with_fresh_signatures() {
    let (origin, mut arrivals) = receiver(StatusCode::INTERNAL_SERVER_ERROR).await;
    let mut rig = Rig::start(Egress::new(Allow::loopback(), Arc::new(SystemResolver)));
    let secret = sign::generate().expect("a secret");
    let url = format!("http://{}/hook", origin.addr);
    rig.store
        .save_webhook(webhook("wh_retry", &url, &secret))
        .await
        .expect("save the webhook");
    let schedule = RetrySchedule::standard();
    assert_eq!(schedule.attempts(), 8);
    assert_eq!(rig.send_event("evt_retry", schedule.attempts()).await, 1);

    let mut got: Vec<Arrival> = Vec::new();
    let mut due_at = Vec::new();
    for n in 1..=8 {
        if n > 1 {
            let webhook_id = got[0].header("webhook-id").to_owned();
            let made = n - 1;
            let (delivery, _) = poll_until("the attempt to be stored", || async {
                let found = rig
                    .store
                    .delivery(&webhook_id, None)
                    .await
                    .expect("read the delivery")
                    .expect("the delivery is stored");
                (found.0.attempts == made).then_some(found)
            })
            .await;
            assert_eq!(delivery.state, DeliveryState::Pending, "attempt {made}");
            due_at.push(delivery.next_at);
            let hold = ClockHold::new();
            let to_go = u64::try_from(delivery.next_at - rig.dispatcher.now()).unwrap_or(0);
            let to_go = Duration::from_micros(to_go);
            if to_go > LEAD {
                tokio::time::advance(to_go - LEAD).await;
            }
            hold.release().await;
        }
        // Virtual hours: a dispatcher that never tries again ends the test
        // at once rather than hanging it.
        let arrival = tokio::time::timeout(Duration::from_secs(12 * 3600), arrivals.recv())
            .await
            .unwrap_or_else(|_| panic!("attempt {n} did not come within 12 hours"))
            .expect("the receiver is running");
        got.push(arrival);
    }

    // Each wait is the schedule's within its tenth of jitter; an attempt's
    // own round trip adds to it, which paused time keeps to well under a
    // second.
    let slack = Duration::from_secs(1);
    for (i, (pair, wait)) in got.windows(2).zip(STANDARD_WAITS).enumerate() {
        let gap = pair[1].at - pair[0].at;
        let (low, high) = (wait.mul_f64(0.9), wait.mul_f64(1.1) + slack);
        assert!(
            (low..=high).contains(&gap),
            "the wait before attempt {} was {gap:?}, not {wait:?} ± 10%",
            i + 2
        );
    }
    let webhook_id = got[0].header("webhook-id").to_owned();
    assert!(webhook_id.starts_with("msg_"), "{webhook_id}");
    let verifier = standardwebhooks::Webhook::new(&secret).expect("a valid secret");
    let mut timestamps = Vec::new();
    let mut signatures = HashSet::new();
    for (i, arrival) in got.iter().enumerate() {
        assert_eq!(
            arrival.header("webhook-id"),
            webhook_id,
            "attempt {}",
            i + 1
        );
        let timestamp: i64 = arrival
            .header("webhook-timestamp")
            .parse()
            .expect("a timestamp in seconds");
        let signature = arrival.header("webhook-signature");
        let expected = verifier
            .sign(&webhook_id, timestamp, &arrival.body)
            .expect("a UTF-8 body");
        assert_eq!(signature, expected, "attempt {}", i + 1);
        timestamps.push(timestamp);
        signatures.insert(signature.to_owned());
    }
    assert!(
        timestamps.windows(2).all(|t| t[0] < t[1]),
        "each attempt is stamped afresh: {timestamps:?}"
    );
    assert_eq!(signatures.len(), 8, "each attempt is signed afresh");

    let (delivery, attempts) = poll_until("the delivery to fail for good", || async {
        let found = rig
            .store
            .delivery(&webhook_id, None)
            .await
            .expect("read the delivery")
            .expect("the delivery is stored");
        (found.0.state != DeliveryState::Pending).then_some(found)
    })
    .await;
    assert_eq!(delivery.state, DeliveryState::Failed);
    assert_eq!(delivery.attempts, 8);
    assert_eq!(delivery.last_status, Some(500));
    let numbers: Vec<u32> = attempts.iter().map(|a| a.number).collect();
    assert_eq!(numbers, (1..=8).collect::<Vec<_>>());
    assert!(attempts.iter().all(|a| a.status == Some(500)));
    for (attempt, due) in attempts[1..].iter().zip(&due_at) {
        assert!(
            (*due..due + 1_000_000).contains(&attempt.at),
            "attempt {} was made at {}, due at {due}",
            attempt.number,
            attempt.at
        );
    }
    assert!(
        arrivals.try_recv().is_err(),
        "no attempt after the last one"
    );

    // Every attempt is in the activity log, numbered.
    rig.stop().await;
    let mut logged: Vec<u32> = dispatch_entries(&rig.store)
        .await
        .iter()
        .filter_map(|e| e.dispatch.as_ref())
        .filter(|d| d.delivery == webhook_id)
        .map(|d| d.attempt)
        .collect();
    logged.sort_unstable();
    assert_eq!(logged, (1..=8).collect::<Vec<_>>());
    origin.stop().await;
}

/// DNS as an attacker would run it: names that lead to private and local
/// addresses; every other name fails to resolve.
struct HostileDns(HashMap<&'static str, Vec<IpAddr>>);

#[async_trait]
impl Resolve for HostileDns {
    async fn resolve(&self, host: &str, _port: u16) -> io::Result<Vec<IpAddr>> {
        self.0.get(host).cloned().ok_or_else(|| {
            io::Error::new(io::ErrorKind::NotFound, "no such name in the test's DNS")
        })
    }
}

fn ip(text: &str) -> IpAddr {
    text.parse().expect("a literal address")
}

#[tokio::test]
async fn deliveries_to_private_and_local_targets_are_refused_attempts_and_send_nothing() {
    // Listeners where a delivery that slipped through would land: the
    // loopback URLs below name their ports.
    let v4 = std::net::TcpListener::bind("127.0.0.1:0").expect("bind IPv4 loopback");
    v4.set_nonblocking(true).expect("non-blocking");
    let p4 = v4.local_addr().expect("bound").port();
    let v6 = std::net::TcpListener::bind("[::1]:0").ok();
    if let Some(v6) = &v6 {
        v6.set_nonblocking(true).expect("non-blocking");
    }
    let p6 = v6
        .as_ref()
        .map_or(p4, |l| l.local_addr().expect("bound").port());

    let dns = HostileDns(HashMap::from([
        ("evil.test", vec![ip("127.0.0.1")]),
        ("ten.test", vec![ip("10.0.0.1")]),
        ("link.test", vec![ip("169.254.169.254")]),
        ("v6.test", vec![ip("::1")]),
        ("mapped.test", vec![ip("::ffff:127.0.0.1")]),
        ("mixed.test", vec![ip("93.184.216.34"), ip("10.0.0.1")]),
    ]));
    // (URL, what the attempt's error must say)
    let cases: Vec<(String, &str)> = vec![
        (
            format!("http://127.1:{p4}/"),
            "127.0.0.1, a loopback address",
        ),
        (
            format!("http://0x7f000001:{p4}/"),
            "127.0.0.1, a loopback address",
        ),
        (
            format!("http://0177.0.0.1:{p4}/"),
            "127.0.0.1, a loopback address",
        ),
        (
            format!("http://2130706433:{p4}/"),
            "127.0.0.1, a loopback address",
        ),
        (format!("http://[::1]:{p6}/"), "::1 is a loopback address"),
        (format!("http://0.0.0.0:{p4}/"), "the unspecified address"),
        (
            format!("http://[::ffff:7f00:1]:{p4}/"),
            "127.0.0.1, a loopback address",
        ),
        (
            format!("http://169.254.169.254:{p4}/latest/meta-data"),
            "169.254.169.254 is a link-local address",
        ),
        (
            format!("http://evil.test:{p4}/"),
            "evil.test resolves to 127.0.0.1",
        ),
        (
            format!("http://EVIL.test.:{p4}/"),
            "evil.test. resolves to 127.0.0.1",
        ),
        (
            format!("http://ten.test:{p4}/"),
            "ten.test resolves to 10.0.0.1, a private",
        ),
        (
            format!("http://link.test:{p4}/latest/meta-data"),
            "link.test resolves to 169.254.169.254, a link-local",
        ),
        (
            format!("http://v6.test:{p6}/"),
            "v6.test resolves to ::1, a loopback",
        ),
        (
            format!("http://mapped.test:{p4}/"),
            "mapped.test resolves to 127.0.0.1",
        ),
        (
            format!("http://mixed.test:{p4}/"),
            "mixed.test resolves to 10.0.0.1, a private",
        ),
        (
            format!("http://fail.test:{p4}/"),
            "cannot resolve fail.test",
        ),
    ];

    // The guard is asked first, without sending: were a case let through,
    // the test stops here, before the dispatcher could connect anywhere.
    let egress = Egress::new(Vec::new(), Arc::new(dns));
    for (url, _) in &cases {
        let uri = url.parse().expect("a valid URI");
        assert!(
            egress.check(&uri).await.is_err(),
            "the guard lets {url} through"
        );
    }

    let mut rig = Rig::start(egress);
    let secret = sign::generate().expect("a secret");
    let mut expected = HashMap::new();
    for (i, (url, error)) in cases.iter().enumerate() {
        let id = format!("wh_ssrf_{i:02}");
        rig.store
            .save_webhook(webhook(&id, url, &secret))
            .await
            .expect("save the webhook");
        expected.insert(id, (url.clone(), *error));
    }
    assert_eq!(rig.send_event("evt_ssrf", 1).await, cases.len());

    for (id, (url, error)) in &expected {
        let (delivery, attempts) = poll_until("the delivery's attempt", || async {
            let page = rig
                .store
                .deliveries(id, None, None, 10)
                .await
                .expect("read the deliveries");
            assert_eq!(page.len(), 1, "{url}: one delivery");
            page.into_iter()
                .next()
                .filter(|(d, _)| d.state != DeliveryState::Pending)
        })
        .await;
        assert_eq!(delivery.state, DeliveryState::Failed, "{url}");
        assert_eq!(attempts.len(), 1, "{url}: one attempt, recorded");
        let said = attempts[0].error.as_deref().unwrap_or_default();
        assert!(said.contains(error), "{url}: `{said}`");
        assert_eq!(attempts[0].status, None, "{url}");
        assert_eq!(delivery.last_error.as_deref(), Some(said), "{url}");
    }

    rig.stop().await;
    let entries = dispatch_entries(&rig.store).await;
    assert_eq!(entries.len(), cases.len(), "one log entry per attempt");
    for entry in &entries {
        let webhook = &entry.dispatch.as_ref().expect("a dispatch entry").webhook;
        let (url, error) = expected.get(webhook).expect("a webhook of the test");
        assert_eq!(&entry.url, url);
        assert!(entry.response.is_none(), "{url}: nothing answered");
        let said = entry.error.as_deref().unwrap_or_default();
        assert!(said.contains(error), "{url}: `{said}`");
        let outcome = if url.contains("fail.test") {
            Outcome::Failed
        } else {
            Outcome::EgressRefused
        };
        assert_eq!(entry.outcome, outcome, "{url}: `{said}`");
        if outcome == Outcome::EgressRefused {
            assert!(said.contains("--egress-allow"), "{url}: `{said}`");
        }
    }

    for listener in [Some(&v4), v6.as_ref()].into_iter().flatten() {
        match listener.accept() {
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
            other => panic!("something connected to {listener:?}: {other:?}"),
        }
    }
}

/// Producers posting at once, and events each posts.
const PRODUCERS: usize = 20;
const EVENTS_EACH: usize = 200;

/// Every delivery of `webhook` in `state`, newest first, read page by page
/// through the API.
async fn listed_deliveries(api: &Api, webhook: &str, state: &str) -> Vec<serde_json::Value> {
    let mut all = Vec::new();
    let mut before = String::new();
    loop {
        let page = api
            .get_json(&format!(
                "/api/v1/webhooks/{webhook}/deliveries?state={state}&limit=200{before}"
            ))
            .await;
        let items = page["items"].as_array().expect("a page of items");
        all.extend(items.iter().cloned());
        match page["next_cursor"].as_str() {
            Some(cursor) => before = format!("&before={cursor}"),
            None => return all,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_producers_get_every_event_to_both_webhooks_exactly_once_and_in_order() {
    let (origin, mut arrivals) = receiver(StatusCode::OK).await;
    let relay = TestRelay::start(ferry_relay::Config {
        egress_allow: Allow::loopback(),
        ..ferry_relay::Config::default()
    })
    .await;
    let api = Api::of(&relay);
    let mut hooks = HashMap::new();
    for (path, ordered) in [("/plain", false), ("/ordered", true)] {
        let (status, created) = api
            .post_json(
                "/api/v1/webhooks",
                &serde_json::json!({
                    "name": path,
                    "url": format!("http://{}{path}", origin.addr),
                    "actions": ["*"],
                    "ordered": ordered,
                }),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{created}");
        let id = created["id"].as_str().expect("an id").to_owned();
        assert!(created["secret"]
            .as_str()
            .is_some_and(|s| s.starts_with("whsec_")));
        hooks.insert(path, id);
    }

    let producers: Vec<_> = (0..PRODUCERS)
        .map(|p| {
            let api = api.clone();
            tokio::spawn(async move {
                for e in 0..EVENTS_EACH {
                    let id = format!("evt_p{p:02}_e{e:03}");
                    let (status, answer) = api
                        .post_json(
                            "/api/v1/events",
                            &serde_json::json!({
                                "type": "document.create",
                                "id": id,
                                "data": {"event": id},
                            }),
                        )
                        .await;
                    assert_eq!(status, StatusCode::ACCEPTED, "{id}: {answer}");
                    assert_eq!(answer["id"], id.as_str());
                    assert_eq!(answer["queued"], 2, "{id}: {answer}");
                    assert_eq!(answer["duplicate"], false, "{id}: {answer}");
                }
            })
        })
        .collect();
    for producer in producers {
        within("a producer", producer)
            .await
            .expect("a producer ran");
    }

    let total = PRODUCERS * EVENTS_EACH * 2;
    let mut received: Vec<(String, String, String)> = Vec::with_capacity(total);
    within("every delivery to arrive", async {
        while received.len() < total {
            let arrival = arrivals.recv().await.expect("the receiver is running");
            let body: serde_json::Value =
                serde_json::from_slice(&arrival.body).expect("a JSON delivery");
            let event = body["data"]["event"].as_str().expect("the event's id");
            received.push((
                arrival.path.clone(),
                event.to_owned(),
                arrival.header("webhook-id").to_owned(),
            ));
        }
    })
    .await;

    // Every delivery is stored as succeeded, and nothing is left pending.
    for id in hooks.values() {
        poll_until("the queue to drain", || async {
            let path = format!("/api/v1/webhooks/{id}/deliveries?state=pending&limit=1");
            let page = api.get_json(&path).await;
            page["items"]
                .as_array()
                .is_some_and(|items| items.is_empty())
                .then_some(())
        })
        .await;
    }
    let mut listed = HashMap::new();
    for (path, id) in &hooks {
        let succeeded = listed_deliveries(&api, id, "succeeded").await;
        assert_eq!(succeeded.len(), PRODUCERS * EVENTS_EACH, "{path}");
        assert!(listed_deliveries(&api, id, "failed").await.is_empty());
        listed.insert(*path, succeeded);
    }
    assert!(
        arrivals.try_recv().is_err(),
        "nothing arrives after the queue drained"
    );

    // Each (event, webhook) exactly once, under the delivery's own id.
    let mut seen: HashMap<(&str, &str), Vec<&str>> = HashMap::new();
    for (path, event, message) in &received {
        seen.entry((path, event)).or_default().push(message);
    }
    for (path, deliveries) in &listed {
        for delivery in deliveries {
            let event = delivery["event_id"].as_str().expect("an event id");
            let message = delivery["id"].as_str().expect("a delivery id");
            let got = seen
                .get(&(*path, event))
                .map(Vec::as_slice)
                .unwrap_or_default();
            assert_eq!(got, [message], "{path} {event}");
        }
    }
    assert_eq!(seen.len(), total, "no arrival the API does not list");

    // The ordered webhook got its deliveries in queue order: the API lists
    // them newest (highest seq) first.
    let queue_order: Vec<&str> = listed["/ordered"]
        .iter()
        .rev()
        .map(|d| d["id"].as_str().expect("a delivery id"))
        .collect();
    let arrival_order: Vec<&str> = received
        .iter()
        .filter(|(path, _, _)| path == "/ordered")
        .map(|(_, _, message)| message.as_str())
        .collect();
    assert!(
        arrival_order == queue_order,
        "the ordered webhook's deliveries arrived out of queue order"
    );

    origin.stop().await;
    relay.stop().await;
}
