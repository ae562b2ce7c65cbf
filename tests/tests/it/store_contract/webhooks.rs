//! The `Webhooks` contract: what every store of the dispatcher's queue must
//! do, written against the trait alone, so that another store (PostgreSQL)
//! runs the very same functions.

use bytes::Bytes;
use ferry_common::ids::ExchangeId;
use ferry_relay::store::{
    AttemptRecord, Claimed, DeliveryRecord, DeliveryState, Enqueued, Finished, Micros, NewEvent,
    Next, WebhookRecord, Webhooks,
};

use super::{fresh_postgres, Fresh};

const T0: Micros = 1_700_000_000_000_000;
const SECOND: Micros = 1_000_000;
const DAY: Micros = 86_400 * SECOND;
/// A lease that outlasts every case.
const LEASE: Micros = T0 + 30 * DAY;

/// A webhook of `owner` listening to `actions`, created at `created`.
fn hook(id: &str, owner: &str, actions: &[&str], created: Micros) -> WebhookRecord {
    WebhookRecord {
        id: id.to_owned(),
        owner: owner.to_owned(),
        name: format!("{id} hook"),
        method: "POST".to_owned(),
        url: format!("https://{id}.example.com/hooks"),
        actions: actions.iter().map(|a| (*a).to_owned()).collect(),
        headers: vec![("x-team".to_owned(), "core".to_owned())],
        enabled: true,
        ordered: false,
        secret: "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".to_owned(),
        previous_secret: None,
        disabled_reason: None,
        failing_since: None,
        created_at: created,
        updated_at: created,
    }
}

/// Event `id` of `owner` and type `kind`, accepted at `at`, three attempts.
fn event(owner: &str, id: &str, kind: &str, at: Micros) -> NewEvent {
    NewEvent {
        owner: owner.to_owned(),
        id: id.to_owned(),
        kind: kind.to_owned(),
        payload: Bytes::from(format!(r#"{{"type":"{kind}","data":{{"id":"{id}"}}}}"#)),
        at,
        only: None,
        max_attempts: 3,
    }
}

async fn save(store: &impl Webhooks, webhook: &WebhookRecord) {
    store
        .save_webhook(webhook.clone())
        .await
        .expect("save_webhook");
}

async fn queue(store: &impl Webhooks, event: NewEvent) -> usize {
    match store.enqueue(event, DAY).await.expect("enqueue") {
        Enqueued::Queued(n) => n,
        Enqueued::Duplicate => panic!("taken for a duplicate"),
    }
}

/// Every delivery of `webhook`, oldest first.
async fn all_of(store: &impl Webhooks, webhook: &str) -> Vec<DeliveryRecord> {
    let mut found: Vec<DeliveryRecord> = store
        .deliveries(webhook, None, None, 1_000)
        .await
        .expect("deliveries")
        .into_iter()
        .map(|(d, _)| d)
        .collect();
    found.reverse();
    found
}

async fn one(store: &impl Webhooks, id: &str) -> (DeliveryRecord, Vec<AttemptRecord>) {
    store
        .delivery(id, None)
        .await
        .expect("delivery")
        .unwrap_or_else(|| panic!("delivery {id} is stored"))
}

async fn claim(store: &impl Webhooks, now: Micros, skip: &[&str]) -> Vec<Claimed> {
    let skip = skip.iter().map(|s| (*s).to_owned()).collect();
    store.claim(now, 100, LEASE, skip).await.expect("claim")
}

fn ids(claimed: &[Claimed]) -> Vec<String> {
    claimed.iter().map(|c| c.delivery.id.clone()).collect()
}

fn attempt(number: u32, at: Micros, status: Option<u16>) -> AttemptRecord {
    AttemptRecord {
        number,
        at,
        status,
        error: status
            .filter(|s| !(200..300).contains(s))
            .map(|s| format!("the receiver answered {s}")),
        duration_ms: 12,
        exchange: ExchangeId::new(),
    }
}

fn finished(delivery: &str, attempt: AttemptRecord, next: Next) -> Finished {
    Finished {
        delivery: delivery.to_owned(),
        lease: LEASE,
        attempt,
        next,
        disable_after: 5 * DAY,
    }
}

pub(super) async fn enqueue_fans_out_to_listeners_and_refuses_an_id_seen_within_the_window(
    store: &impl Webhooks,
) {
    let docs = hook("wh_docs", "acct_a", &["document.*"], T0);
    let create = hook("wh_create", "acct_a", &["document.create"], T0 + 1);
    let blueprints = hook("wh_blueprints", "acct_a", &["blueprint.*"], T0 + 2);
    let off = WebhookRecord {
        enabled: false,
        ..hook("wh_off", "acct_a", &["*"], T0 + 3)
    };
    let other = hook("wh_other", "acct_b", &["*"], T0 + 4);
    for webhook in [&docs, &create, &blueprints, &off, &other] {
        save(store, webhook).await;
    }
    assert_eq!(
        store
            .webhook("wh_docs", Some("acct_a"))
            .await
            .expect("webhook"),
        Some(docs.clone()),
        "a webhook reads back as saved"
    );

    let first = event("acct_a", "evt_1", "document.create", T0);
    assert_eq!(
        queue(store, first.clone()).await,
        2,
        "docs and create listen"
    );
    for webhook in [&docs, &create] {
        let queued = all_of(store, &webhook.id).await;
        assert_eq!(queued.len(), 1, "{}", webhook.id);
        let delivery = &queued[0];
        assert!(delivery.id.starts_with("msg_"), "{}", delivery.id);
        assert_eq!(
            (
                delivery.webhook.as_str(),
                delivery.owner.as_str(),
                delivery.event.as_str(),
                delivery.kind.as_str()
            ),
            (webhook.id.as_str(), "acct_a", "evt_1", "document.create")
        );
        assert_eq!(delivery.payload, first.payload, "the body, exactly");
        assert_eq!(delivery.state, DeliveryState::Pending);
        assert_eq!((delivery.attempts, delivery.max_attempts), (0, 3));
        assert_eq!((delivery.next_at, delivery.created_at), (T0, T0));
        assert_eq!((delivery.last_status, &delivery.last_error), (None, &None));
    }
    for quiet in [&blueprints, &off, &other] {
        assert!(all_of(store, &quiet.id).await.is_empty(), "{}", quiet.id);
    }

    // The same id within the window queues nothing, up to its last moment.
    for at in [T0 + SECOND, T0 + DAY] {
        let again = event("acct_a", "evt_1", "document.update", at);
        assert_eq!(
            store.enqueue(again, DAY).await.expect("enqueue"),
            Enqueued::Duplicate
        );
    }
    assert_eq!(all_of(store, "wh_docs").await.len(), 1);
    // Ids are per owner, and the window ends.
    assert_eq!(
        queue(store, event("acct_b", "evt_1", "document.create", T0)).await,
        1
    );
    assert_eq!(
        queue(
            store,
            event("acct_a", "evt_1", "document.create", T0 + DAY + 1)
        )
        .await,
        2
    );
    // A test event goes to its one webhook, whatever it listens to.
    let test = NewEvent {
        only: Some("wh_blueprints".to_owned()),
        ..event("acct_a", "evt_test", "document.create", T0 + 5)
    };
    assert_eq!(queue(store, test).await, 1);
    assert_eq!(all_of(store, "wh_blueprints").await.len(), 1);
}

pub(super) async fn claim_takes_due_deliveries_in_order_an_ordered_webhook_s_oldest_only_and_skips(
    store: &impl Webhooks,
) {
    let fast = hook("wh_fast", "acct_a", &["*"], T0);
    let ordered = WebhookRecord {
        ordered: true,
        ..hook("wh_ordered", "acct_a", &["*"], T0 + 1)
    };
    save(store, &fast).await;
    save(store, &ordered).await;
    for i in 0..3 {
        queue(
            store,
            event("acct_a", &format!("evt_{i}"), "document.create", T0 + i),
        )
        .await;
    }
    // Not yet due.
    queue(
        store,
        event("acct_a", "evt_later", "document.create", T0 + 60 * SECOND),
    )
    .await;
    let f = all_of(store, "wh_fast").await;
    let o = all_of(store, "wh_ordered").await;
    assert!(f.windows(2).all(|w| w[0].seq < w[1].seq));
    assert!(
        f[0].seq < o[0].seq && o[0].seq < f[1].seq,
        "queue order is event order"
    );

    let now = T0 + 10 * SECOND;
    let claimed = claim(store, now, &[]).await;
    assert_eq!(
        ids(&claimed),
        [
            f[0].id.as_str(),
            o[0].id.as_str(),
            f[1].id.as_str(),
            f[2].id.as_str()
        ],
        "due ones, oldest first; the ordered webhook's oldest alone"
    );
    assert_eq!(claimed[1].webhook, ordered, "each with its webhook");
    assert_eq!(claimed[0].delivery, f[0], "the delivery as stored");
    assert!(claim(store, now, &[]).await.is_empty(), "leased");
    // While its oldest is leased the ordered webhook has nothing to give.
    assert_eq!(
        store.next_due(now, Vec::new()).await.expect("next_due"),
        Some(f[3].next_at)
    );

    // A lease that ran out is an attempt that died: claimed again.
    let expired = claim(store, LEASE + 1, &[]).await;
    assert_eq!(
        ids(&expired),
        [
            f[0].id.as_str(),
            o[0].id.as_str(),
            f[1].id.as_str(),
            f[2].id.as_str(),
            f[3].id.as_str()
        ]
    );
    assert_eq!(store.release_all().await.expect("release_all"), 5);
    assert_eq!(store.release_all().await.expect("release_all"), 0);

    assert_eq!(
        ids(&claim(store, now, &["wh_fast"]).await),
        [o[0].id.as_str()],
        "a skipped webhook is left alone"
    );
    assert_eq!(claim(store, now, &["wh_ordered"]).await.len(), 3);
    assert_eq!(
        store
            .next_due(now, vec!["wh_fast".to_owned()])
            .await
            .expect("next_due"),
        None,
        "nothing more for the ordered webhook until its oldest is done"
    );

    // Once the ordered webhook's oldest is done, its next one is due.
    store
        .finish(vec![finished(
            o[0].id.as_str(),
            attempt(1, now, Some(200)),
            Next::Succeeded,
        )])
        .await
        .expect("finish");
    assert_eq!(ids(&claim(store, now, &[]).await), [o[1].id.as_str()]);
}

pub(super) async fn release_gives_deliveries_back_without_an_attempt(store: &impl Webhooks) {
    save(store, &hook("wh_a", "acct_a", &["*"], T0)).await;
    for i in 0..3 {
        queue(
            store,
            event("acct_a", &format!("evt_{i}"), "document.create", T0),
        )
        .await;
    }
    let d = all_of(store, "wh_a").await;
    let now = T0 + SECOND;
    assert_eq!(claim(store, now, &[]).await.len(), 3);

    store
        .release(vec![(d[0].id.clone(), LEASE)], Some(T0 + 50 * SECOND))
        .await
        .expect("release");
    store
        .release(vec![(d[1].id.clone(), LEASE)], None)
        .await
        .expect("release");
    assert_eq!(
        ids(&claim(store, now, &[]).await),
        [d[1].id.as_str()],
        "released as it was due"
    );
    assert_eq!(
        store.next_due(now, Vec::new()).await.expect("next_due"),
        Some(T0 + 50 * SECOND),
        "released to be due later"
    );
    assert_eq!(
        ids(&claim(store, T0 + 50 * SECOND, &[]).await),
        [d[0].id.as_str()]
    );
    assert_eq!(store.release_all().await.expect("release_all"), 3);
    for delivery in &d {
        let (stored, attempts) = one(store, &delivery.id).await;
        assert_eq!((stored.state, stored.attempts), (DeliveryState::Pending, 0));
        assert!(attempts.is_empty());
    }
}

pub(super) async fn finish_stores_attempts_and_what_follows_each(store: &impl Webhooks) {
    save(store, &hook("wh_a", "acct_a", &["*"], T0)).await;
    for i in 0..4 {
        queue(
            store,
            event("acct_a", &format!("evt_{i}"), "document.create", T0 + i),
        )
        .await;
    }
    let d = all_of(store, "wh_a").await;
    let now = T0 + SECOND;
    assert_eq!(claim(store, now, &[]).await.len(), 4);

    let ok = attempt(1, now, Some(200));
    let retry = attempt(1, now + 1, Some(503));
    let failed = attempt(1, now + 2, Some(500));
    store
        .finish(vec![
            finished(d[0].id.as_str(), ok.clone(), Next::Succeeded),
            finished(
                d[1].id.as_str(),
                retry.clone(),
                Next::RetryAt(now + 300 * SECOND),
            ),
            finished(d[2].id.as_str(), failed.clone(), Next::Failed),
        ])
        .await
        .expect("finish");

    let (succeeded, attempts) = one(store, &d[0].id).await;
    assert_eq!(succeeded.state, DeliveryState::Succeeded);
    assert_eq!((succeeded.attempts, succeeded.last_status), (1, Some(200)));
    assert_eq!(attempts, [ok]);
    let (pending, attempts) = one(store, &d[1].id).await;
    assert_eq!(pending.state, DeliveryState::Pending);
    assert_eq!(pending.attempts, 1);
    assert_eq!(pending.next_at, now + 300 * SECOND);
    assert_eq!(pending.last_status, Some(503));
    assert_eq!(pending.last_error, retry.error);
    assert_eq!(attempts, [retry]);
    let (gone, attempts) = one(store, &d[2].id).await;
    assert_eq!((gone.state, gone.attempts), (DeliveryState::Failed, 1));
    assert_eq!(attempts, [failed]);

    // A retry's lease is gone: it is claimed again when due, not before.
    assert!(claim(store, now + 299 * SECOND, &[]).await.is_empty());
    assert_eq!(
        ids(&claim(store, now + 300 * SECOND, &[]).await),
        [d[1].id.as_str()]
    );
    let webhook = store
        .webhook("wh_a", None)
        .await
        .expect("webhook")
        .expect("stored");
    assert_eq!(
        webhook.failing_since,
        Some(now + 1),
        "failing since its first failure"
    );
    let listed = store.webhooks(Some("acct_a")).await.expect("webhooks");
    assert_eq!(listed.len(), 1);
    assert_eq!(
        listed[0].1,
        Some(DeliveryState::Pending),
        "the latest delivery's state"
    );

    let second = attempt(2, now + 300 * SECOND, Some(204));
    store
        .finish(vec![finished(
            d[1].id.as_str(),
            second.clone(),
            Next::Succeeded,
        )])
        .await
        .expect("finish");
    let (_, attempts) = one(store, &d[1].id).await;
    assert_eq!(attempts.len(), 2, "every attempt is kept");
    assert_eq!(attempts[1], second);
    let webhook = store
        .webhook("wh_a", None)
        .await
        .expect("webhook")
        .expect("stored");
    assert_eq!(webhook.failing_since, None, "a success ends the failing");

    // 410 Gone: the webhook is disabled and its queue fails with a reason.
    queue(store, event("acct_a", "evt_next", "document.create", now)).await;
    let waiting = all_of(store, "wh_a").await.pop().expect("the new delivery");
    store
        .finish(vec![finished(
            d[3].id.as_str(),
            attempt(1, now + 400 * SECOND, Some(410)),
            Next::DisableWebhook("the receiver answered 410 Gone".to_owned()),
        )])
        .await
        .expect("finish");
    let webhook = store
        .webhook("wh_a", None)
        .await
        .expect("webhook")
        .expect("stored");
    assert!(!webhook.enabled);
    assert_eq!(
        webhook.disabled_reason.as_deref(),
        Some("the receiver answered 410 Gone")
    );
    assert_eq!(one(store, &d[3].id).await.0.state, DeliveryState::Failed);
    let (waiting, attempts) = one(store, &waiting.id).await;
    assert_eq!(waiting.state, DeliveryState::Failed);
    assert!(attempts.is_empty(), "failed without an attempt");
    assert!(
        waiting
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("410")),
        "{:?}",
        waiting.last_error
    );
    assert_eq!(
        queue(store, event("acct_a", "evt_after", "document.create", now)).await,
        0,
        "a disabled webhook gets no deliveries"
    );
}

pub(super) async fn a_webhook_failing_for_the_disable_period_is_disabled(store: &impl Webhooks) {
    save(store, &hook("wh_a", "acct_a", &["*"], T0)).await;
    queue(store, event("acct_a", "evt_0", "document.create", T0)).await;
    let d = all_of(store, "wh_a").await;
    assert_eq!(claim(store, T0, &[]).await.len(), 1);
    store
        .finish(vec![finished(
            d[0].id.as_str(),
            attempt(1, T0, Some(500)),
            Next::RetryAt(T0 + 4 * DAY),
        )])
        .await
        .expect("finish");
    assert_eq!(claim(store, T0 + 4 * DAY, &[]).await.len(), 1);
    store
        .finish(vec![finished(
            d[0].id.as_str(),
            attempt(2, T0 + 4 * DAY, Some(500)),
            Next::RetryAt(T0 + 5 * DAY),
        )])
        .await
        .expect("finish");
    let webhook = store.webhook("wh_a", None).await.expect("webhook");
    assert!(webhook.is_some_and(|w| w.enabled), "four days is not five");

    assert_eq!(claim(store, T0 + 5 * DAY, &[]).await.len(), 1);
    store
        .finish(vec![finished(
            d[0].id.as_str(),
            attempt(3, T0 + 5 * DAY, Some(500)),
            Next::RetryAt(T0 + 6 * DAY),
        )])
        .await
        .expect("finish");
    let webhook = store
        .webhook("wh_a", None)
        .await
        .expect("webhook")
        .expect("stored");
    assert!(!webhook.enabled, "five days of failures disable it");
    assert!(webhook.disabled_reason.is_some());
    assert_eq!(one(store, &d[0].id).await.0.state, DeliveryState::Failed);
}

pub(super) async fn resend_and_recover_queue_finished_deliveries_for_one_more_attempt(
    store: &impl Webhooks,
) {
    save(store, &hook("wh_a", "acct_a", &["*"], T0)).await;
    for i in 0..4 {
        queue(
            store,
            event(
                "acct_a",
                &format!("evt_{i}"),
                "document.create",
                T0 + i * 100 * SECOND,
            ),
        )
        .await;
    }
    let d = all_of(store, "wh_a").await;
    let now = T0 + 1_000 * SECOND;
    assert_eq!(claim(store, now, &[]).await.len(), 4);
    store
        .finish(vec![
            finished(
                d[0].id.as_str(),
                attempt(1, now, Some(200)),
                Next::Succeeded,
            ),
            finished(d[1].id.as_str(), attempt(1, now, Some(500)), Next::Failed),
            finished(d[2].id.as_str(), attempt(1, now, Some(500)), Next::Failed),
        ])
        .await
        .expect("finish");
    // d[3] stays pending (leased).

    let later = now + 10 * SECOND;
    let resend = |id: &str, owner: Option<&'static str>| {
        let id = id.to_owned();
        async move { store.resend(&id, owner, later).await.expect("resend") }
    };
    assert!(
        !resend(d[3].id.as_str(), None).await,
        "a pending delivery is not resent"
    );
    assert!(
        !resend(d[1].id.as_str(), Some("acct_b")).await,
        "nor another owner's"
    );
    assert!(!resend("msg_missing", None).await);
    assert!(resend(d[1].id.as_str(), Some("acct_a")).await);
    assert!(
        resend(d[0].id.as_str(), None).await,
        "a succeeded one may be sent again"
    );
    for resent in [&d[0], &d[1]] {
        let (stored, _) = one(store, &resent.id).await;
        assert_eq!(stored.state, DeliveryState::Pending);
        assert_eq!(stored.next_at, later);
        assert_eq!(
            (stored.attempts, stored.max_attempts),
            (1, 2),
            "one more attempt"
        );
    }
    assert_eq!(
        ids(&claim(store, later, &[]).await),
        [d[0].id.as_str(), d[1].id.as_str()],
        "due at once"
    );

    // Recover takes the failed ones queued since a time.
    assert_eq!(
        store
            .recover("wh_a", T0 + 150 * SECOND, later)
            .await
            .expect("recover"),
        1,
        "d[2] alone: d[1] is pending again"
    );
    let (recovered, _) = one(store, &d[2].id).await;
    assert_eq!(recovered.state, DeliveryState::Pending);
    assert_eq!((recovered.attempts, recovered.max_attempts), (1, 2));
    assert_eq!(
        store.recover("wh_a", T0, later).await.expect("recover"),
        0,
        "nothing failed is left"
    );
}

pub(super) async fn prune_forgets_finished_deliveries_and_keeps_pending_ones(
    store: &impl Webhooks,
) {
    save(store, &hook("wh_a", "acct_a", &["*"], T0)).await;
    for i in 0..4 {
        queue(
            store,
            event("acct_a", &format!("evt_{i}"), "document.create", T0 + i),
        )
        .await;
    }
    queue(
        store,
        event("acct_a", "evt_new", "document.create", T0 + DAY),
    )
    .await;
    let d = all_of(store, "wh_a").await;
    let now = T0 + DAY;
    assert_eq!(claim(store, now, &[]).await.len(), 5);
    store
        .finish(vec![
            finished(
                d[0].id.as_str(),
                attempt(1, now, Some(200)),
                Next::Succeeded,
            ),
            finished(d[1].id.as_str(), attempt(1, now, Some(500)), Next::Failed),
            finished(
                d[2].id.as_str(),
                attempt(1, now, Some(500)),
                Next::RetryAt(now + SECOND),
            ),
            finished(
                d[4].id.as_str(),
                attempt(1, now, Some(200)),
                Next::Succeeded,
            ),
        ])
        .await
        .expect("finish");
    // d[3] is in flight, d[2] waits for its retry.

    assert_eq!(
        store
            .prune_deliveries(T0 + DAY / 2)
            .await
            .expect("prune_deliveries"),
        2
    );
    assert!(store
        .delivery(d[0].id.as_str(), None)
        .await
        .expect("delivery")
        .is_none());
    assert!(store
        .delivery(d[1].id.as_str(), None)
        .await
        .expect("delivery")
        .is_none());
    for kept in [&d[2], &d[3], &d[4]] {
        let (stored, attempts) = one(store, &kept.id).await;
        assert_eq!(stored.payload, kept.payload, "its event is kept too");
        assert_eq!(attempts.len(), usize::from(kept.id != d[3].id));
    }
    assert_eq!(all_of(store, "wh_a").await.len(), 3);
}

pub(super) async fn another_owner_s_webhooks_and_deliveries_are_out_of_reach(
    store: &impl Webhooks,
) {
    let mine = hook("wh_mine", "acct_a", &["*"], T0);
    save(store, &mine).await;
    queue(store, event("acct_a", "evt_0", "document.create", T0)).await;
    let delivery = all_of(store, "wh_mine").await.remove(0);

    let reach = store
        .webhook("wh_mine", Some("acct_b"))
        .await
        .expect("webhook");
    assert_eq!(reach, None);
    assert!(store
        .webhooks(Some("acct_b"))
        .await
        .expect("webhooks")
        .is_empty());
    assert_eq!(
        store
            .delivery(&delivery.id, Some("acct_b"))
            .await
            .expect("delivery"),
        None
    );
    assert!(!store
        .delete_webhook("wh_mine", Some("acct_b"))
        .await
        .expect("delete_webhook"));
    assert!(store
        .delivery(&delivery.id, Some("acct_a"))
        .await
        .expect("delivery")
        .is_some());
    let everyone = store.webhooks(None).await.expect("webhooks");
    assert_eq!(everyone.len(), 1, "a relay without tokens sees all");

    assert!(store
        .delete_webhook("wh_mine", Some("acct_a"))
        .await
        .expect("delete_webhook"));
    assert_eq!(
        store.delivery(&delivery.id, None).await.expect("delivery"),
        None,
        "its queue goes with it"
    );
    // An attempt that ends after the delete stores nothing, and fails not.
    store
        .finish(vec![finished(
            &delivery.id,
            attempt(1, T0, Some(200)),
            Next::Succeeded,
        )])
        .await
        .expect("finish after a delete");
    assert!(store.webhooks(None).await.expect("webhooks").is_empty());
}

/// Relay A's attempt outlives its lease; relay B claims the delivery
/// again and sends it (at least once). A's late finish, or a late release,
/// must not end B's lease: an ordered webhook would start its next
/// delivery beside B's attempt, and a third claim would send it again.
/// A's attempt is kept beside B's, neither overwriting the other.
pub(super) async fn a_finish_or_release_after_its_lease_ran_out_leaves_the_new_claim_alone(
    store: &impl Webhooks,
) {
    let ordered = WebhookRecord {
        ordered: true,
        ..hook("wh_ordered", "acct_a", &["*"], T0)
    };
    save(store, &ordered).await;
    for i in 0..2 {
        queue(
            store,
            event("acct_a", &format!("evt_{i}"), "document.create", T0 + i),
        )
        .await;
    }
    let d = all_of(store, "wh_ordered").await;
    let first = T0 + SECOND;
    let lease_a = first + 75 * SECOND;
    let a = store
        .claim(first, 10, lease_a, Vec::new())
        .await
        .expect("claim");
    assert_eq!(ids(&a), [d[0].id.as_str()]);
    assert_eq!(a[0].lease, lease_a);

    let second = lease_a + 1;
    let lease_b = second + 75 * SECOND;
    let b = store
        .claim(second, 10, lease_b, Vec::new())
        .await
        .expect("claim");
    assert_eq!(
        ids(&b),
        [d[0].id.as_str()],
        "claimed again once A's lease ran out"
    );
    assert_eq!(b[0].lease, lease_b);

    let late = second + SECOND;
    let by_a = attempt(1, first, Some(200));
    store
        .finish(vec![Finished {
            lease: lease_a,
            ..finished(&d[0].id, by_a.clone(), Next::Succeeded)
        }])
        .await
        .expect("A's late finish");
    store
        .release(vec![(d[0].id.clone(), lease_a)], Some(late))
        .await
        .expect("A's late release");
    let (stored, attempts) = one(store, &d[0].id).await;
    assert_eq!(
        stored.state,
        DeliveryState::Pending,
        "B's attempt decides what follows"
    );
    assert_eq!(attempts, std::slice::from_ref(&by_a), "A's attempt is kept");
    assert!(
        store
            .claim(late, 10, late + 75 * SECOND, Vec::new())
            .await
            .expect("claim")
            .is_empty(),
        "B's lease holds: neither its delivery nor the next one is claimed"
    );

    // B numbered its attempt as A did; it is stored after A's.
    let by_b = attempt(1, second, Some(204));
    store
        .finish(vec![Finished {
            lease: lease_b,
            ..finished(&d[0].id, by_b.clone(), Next::Succeeded)
        }])
        .await
        .expect("B's finish");
    let (stored, attempts) = one(store, &d[0].id).await;
    assert_eq!(
        (stored.state, stored.attempts),
        (DeliveryState::Succeeded, 2)
    );
    assert_eq!(stored.last_status, Some(204));
    assert_eq!(
        attempts,
        [by_a, AttemptRecord { number: 2, ..by_b }],
        "both attempts are kept, in the order they were stored"
    );
    assert_eq!(
        ids(&store
            .claim(late, 10, late + 75 * SECOND, Vec::new())
            .await
            .expect("claim")),
        [d[1].id.as_str()],
        "the next delivery starts once B's result is stored"
    );
}

/// One test per case, each on a fresh SQLite file and on a fresh
/// PostgreSQL database.
macro_rules! on_both {
    ($($case:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $case() {
                    let fresh = super::Fresh::new();
                    super::$case(&fresh.store).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $case() {
                    super::$case(&super::fresh_postgres().await).await;
                }
            )*
        }
    };
}

on_both!(
    enqueue_fans_out_to_listeners_and_refuses_an_id_seen_within_the_window,
    claim_takes_due_deliveries_in_order_an_ordered_webhook_s_oldest_only_and_skips,
    release_gives_deliveries_back_without_an_attempt,
    finish_stores_attempts_and_what_follows_each,
    a_webhook_failing_for_the_disable_period_is_disabled,
    resend_and_recover_queue_finished_deliveries_for_one_more_attempt,
    prune_forgets_finished_deliveries_and_keeps_pending_ones,
    another_owner_s_webhooks_and_deliveries_are_out_of_reach,
    a_finish_or_release_after_its_lease_ran_out_leaves_the_new_claim_alone,
);

/// PostgreSQL only: several relays' stores on one database, claiming from
/// one queue and accepting events at the same moment. (SQLite's store has
/// one relay, and one writer.)
mod postgres_only {
    use std::collections::HashSet;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    use ferry_relay::store::postgres::Postgres;
    use ferry_relay::store::{now_micros, DeliveryState, Enqueued, Next, WebhookRecord, Webhooks};
    use ferry_tests::within;

    use super::{
        all_of, attempt, claim, event, finished, hook, ids, queue, save, DAY, LEASE, SECOND, T0,
    };

    /// `count` stores, each with its own pool, on one fresh database: as
    /// many relays of a fleet.
    async fn fleet(count: usize) -> Vec<Arc<Postgres>> {
        let url = ferry_tests::postgres::fresh_database().await;
        let mut stores = Vec::new();
        for _ in 0..count {
            stores.push(Arc::new(Postgres::connect(&url).await.expect("connect")));
        }
        stores
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 3)]
    async fn concurrent_claims_from_several_stores_never_take_one_delivery_twice() {
        let stores = fleet(3).await;
        let owners = ["acct_a", "acct_b"];
        for (i, owner) in owners.iter().enumerate() {
            for j in 0..2 {
                let id = format!("wh_{owner}_{j}");
                save(
                    &*stores[0],
                    &hook(&id, owner, &["*"], T0 + (i * 2 + j) as i64),
                )
                .await;
            }
        }
        let events = 150;
        let mut queued = 0;
        for i in 0..events {
            for owner in owners {
                let at = T0 + i64::try_from(i).expect("small");
                queued += queue(
                    &*stores[0],
                    event(owner, &format!("evt_{i}"), "document.create", at),
                )
                .await;
            }
        }
        assert_eq!(queued, events * 4);

        let now = T0 + DAY;
        let claims: Vec<_> = stores
            .iter()
            .map(|store| {
                let store = Arc::clone(store);
                tokio::spawn(async move {
                    let mut mine = Vec::new();
                    loop {
                        let claimed = store.claim(now, 7, LEASE, Vec::new()).await.expect("claim");
                        if claimed.is_empty() {
                            // Done once nothing unleased is left; an empty claim
                            // may also mean that another store held the rows.
                            let next = store.next_due(now, Vec::new()).await.expect("next_due");
                            if next.is_none() {
                                return mine;
                            }
                        }
                        mine.extend(claimed.into_iter().map(|c| c.delivery.id));
                    }
                })
            })
            .collect();
        let mut all = Vec::new();
        let mut per_store = Vec::new();
        for claim in claims {
            let mine = within("the stores' claims", claim)
                .await
                .expect("a claim loop");
            per_store.push(mine.len());
            all.extend(mine);
        }
        let distinct: HashSet<&String> = all.iter().collect();
        assert_eq!(distinct.len(), all.len(), "a delivery was claimed twice");
        assert_eq!(all.len(), queued, "every delivery was claimed");
        assert!(
            per_store.iter().filter(|n| **n > 0).count() > 1,
            "the stores claimed side by side: {per_store:?}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 3)]
    async fn an_ordered_webhook_has_one_delivery_in_flight_across_stores() {
        let stores = fleet(3).await;
        let ordered = WebhookRecord {
            ordered: true,
            ..hook("wh_ordered", "acct_a", &["*"], T0)
        };
        save(&*stores[0], &ordered).await;
        let events = 40;
        for i in 0..events {
            queue(
                &*stores[0],
                event("acct_a", &format!("evt_{i}"), "document.create", T0 + i),
            )
            .await;
        }
        let expected: Vec<String> = all_of(&*stores[0], "wh_ordered")
            .await
            .into_iter()
            .map(|d| d.id)
            .collect();

        let now = T0 + DAY;
        // The delivery in flight, and every delivery attempted, in order.
        let in_flight: Arc<Mutex<Option<String>>> = Arc::default();
        let attempted: Arc<Mutex<Vec<String>>> = Arc::default();
        let done = Arc::new(AtomicUsize::new(0));
        let workers: Vec<_> = stores
            .iter()
            .map(|store| {
                let (store, in_flight, attempted, done) = (
                    Arc::clone(store),
                    Arc::clone(&in_flight),
                    Arc::clone(&attempted),
                    Arc::clone(&done),
                );
                tokio::spawn(async move {
                    while done.load(Ordering::SeqCst) < expected_len(events) {
                        let claimed = store
                            .claim(now, 10, LEASE, Vec::new())
                            .await
                            .expect("claim");
                        assert!(claimed.len() <= 1, "{} claimed at once", claimed.len());
                        let Some(claim) = claimed.into_iter().next() else {
                            tokio::task::yield_now().await;
                            continue;
                        };
                        let id = claim.delivery.id;
                        {
                            let mut slot = in_flight.lock().expect("the in-flight slot");
                            assert_eq!(*slot, None, "{id} claimed beside another in flight");
                            *slot = Some(id.clone());
                        }
                        attempted.lock().expect("the attempts").push(id.clone());
                        tokio::task::yield_now().await;
                        // Out of the slot before the result is stored: until
                        // then the lease keeps the next delivery back.
                        *in_flight.lock().expect("the in-flight slot") = None;
                        store
                            .finish(vec![finished(
                                &id,
                                attempt(1, now, Some(200)),
                                Next::Succeeded,
                            )])
                            .await
                            .expect("finish");
                        done.fetch_add(1, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        for worker in workers {
            within("the ordered webhook's deliveries", worker)
                .await
                .expect("a worker");
        }
        let attempted = attempted.lock().expect("the attempts").clone();
        assert_eq!(attempted, expected, "each once, oldest first");
        for delivery in all_of(&*stores[1], "wh_ordered").await {
            assert_eq!(delivery.state, DeliveryState::Succeeded);
        }
    }

    /// A resend makes an older delivery of an ordered webhook pending
    /// again, ahead of the one in flight: it waits for that one's result.
    #[tokio::test]
    async fn an_ordered_webhook_s_resent_delivery_waits_for_the_one_in_flight() {
        let stores = fleet(2).await;
        let ordered = WebhookRecord {
            ordered: true,
            ..hook("wh_ordered", "acct_a", &["*"], T0)
        };
        save(&*stores[0], &ordered).await;
        for i in 0..2 {
            queue(
                &*stores[0],
                event("acct_a", &format!("evt_{i}"), "document.create", T0 + i),
            )
            .await;
        }
        let d = all_of(&*stores[0], "wh_ordered").await;
        let now = T0 + SECOND;
        assert_eq!(ids(&claim(&*stores[0], now, &[]).await), [d[0].id.as_str()]);
        stores[0]
            .finish(vec![finished(
                &d[0].id,
                attempt(1, now, Some(500)),
                Next::Failed,
            )])
            .await
            .expect("finish");
        assert_eq!(ids(&claim(&*stores[0], now, &[]).await), [d[1].id.as_str()]);

        assert!(stores[1].resend(&d[0].id, None, now).await.expect("resend"));
        assert!(
            claim(&*stores[1], now, &[]).await.is_empty(),
            "the resent delivery waits while the newer one is in flight"
        );
        assert_eq!(
            stores[1].next_due(now, Vec::new()).await.expect("next_due"),
            None
        );
        stores[0]
            .finish(vec![finished(
                &d[1].id,
                attempt(1, now, Some(200)),
                Next::Succeeded,
            )])
            .await
            .expect("finish");
        assert_eq!(ids(&claim(&*stores[1], now, &[]).await), [d[0].id.as_str()]);
    }

    /// With several relays on one database, a relay that starts must not
    /// give back the leases of another's attempts in flight; a dead
    /// relay's deliveries are claimed again, under the same ids, once their
    /// leases run out.
    #[tokio::test]
    async fn release_all_leaves_live_leases_and_a_dead_store_s_deliveries_return_after_theirs() {
        let stores = fleet(2).await;
        save(&*stores[0], &hook("wh_a", "acct_a", &["*"], T0)).await;
        let now = now_micros();
        queue(
            &*stores[0],
            event("acct_a", "evt_0", "document.create", now),
        )
        .await;
        // As the dispatcher leases: the attempt's timeout and a margin.
        let lease = now + 75 * SECOND;
        let taken = stores[0]
            .claim(now, 10, lease, Vec::new())
            .await
            .expect("claim");
        assert_eq!(taken.len(), 1);
        let id = taken[0].delivery.id.clone();
        drop(taken);

        // The other relay starts while the first one's attempt runs.
        assert_eq!(stores[1].release_all().await.expect("release_all"), 0);
        assert!(stores[1]
            .claim(now, 10, lease, Vec::new())
            .await
            .expect("claim")
            .is_empty());
        // The first relay dies with its attempt; once the lease ran out
        // the delivery is claimed again, the same delivery, no attempt
        // stored.
        let later = lease + 1;
        let again = stores[1]
            .claim(later, 10, later + 75 * SECOND, Vec::new())
            .await
            .expect("claim");
        assert_eq!(ids(&again), [id.as_str()]);
        assert_eq!(again[0].delivery.attempts, 0);
    }

    /// A claim of `n` locks O(n): thousands of ordered webhooks with a
    /// pending delivery, and one account's 200 unordered webhooks with a
    /// backlog each, used to make every claim take an advisory lock per
    /// ordered webhook (the shared lock table, ~6,400 slots by default,
    /// then fails every claim with "out of shared memory") and lock up to
    /// `n` rows of each unordered webhook to keep `n` in all.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_claim_locks_as_many_rows_and_webhooks_as_it_may_take_however_many_wait() {
        const ORDERED: i64 = 3_000;
        const UNORDERED: i64 = 200;
        const BACKLOG: i64 = 100;
        const TAKE: usize = 256;
        let url = ferry_tests::postgres::fresh_database().await;
        let store = Arc::new(Postgres::connect(&url).await.expect("connect"));
        let admin = super::super::raw(&url).await;
        admin
            .batch_execute(&format!(
                "CREATE EXTENSION pgrowlocks;
                 INSERT INTO webhooks (id, owner, name, method, url, actions, headers, enabled,
                    ordered, secret, created_at, updated_at)
                 SELECT 'wh_o' || i, 'acct_o' || (i % 50), 'o', 'POST', 'https://o.example.com',
                    '[\"*\"]'::jsonb, '[]'::jsonb, TRUE, TRUE, 'whsec_x', {T0}, {T0}
                 FROM generate_series(1, {ORDERED}) i
                 UNION ALL
                 SELECT 'wh_u' || i, 'acct_u', 'u', 'POST', 'https://u.example.com',
                    '[\"*\"]'::jsonb, '[]'::jsonb, TRUE, FALSE, 'whsec_x', {T0}, {T0}
                 FROM generate_series(1, {UNORDERED}) i;
                 INSERT INTO events (owner, id, type, payload, created_at)
                 SELECT 'acct', 'evt_' || i, 'document.create', convert_to('{{}}', 'UTF8'), {T0}
                 FROM generate_series(1, {ORDERED} + {UNORDERED} * {BACKLOG}) i;
                 INSERT INTO deliveries (id, webhook_id, event, state, attempts, max_attempts,
                    next_at, created_at)
                 SELECT 'msg_' || k, CASE WHEN k <= {ORDERED} THEN 'wh_o' || k
                    ELSE 'wh_u' || ((k - {ORDERED}) % {UNORDERED} + 1) END,
                    k, 'pending', 0, 3, {T0}, {T0}
                 FROM generate_series(1, {ORDERED} + {UNORDERED} * {BACKLOG}) k;
                 ANALYZE;"
            ))
            .await
            .expect("the webhooks and their queues");

        // Holds the claim at its last statement (the lease, which reads
        // the events), with everything it locked before held.
        admin
            .batch_execute("BEGIN; LOCK TABLE events IN ACCESS EXCLUSIVE MODE")
            .await
            .expect("lock the events");
        let now = T0 + SECOND;
        let claim = tokio::spawn({
            let store = Arc::clone(&store);
            async move { store.claim(now, TAKE, LEASE, Vec::new()).await }
        });
        let watcher = super::super::raw(&url).await;
        let pid: i32 = within("the claim waits on the events", async {
            loop {
                let waiting = watcher
                    .query_opt(
                        "SELECT pid FROM pg_locks WHERE relation = 'events'::regclass
                         AND NOT granted",
                        &[],
                    )
                    .await
                    .expect("pg_locks");
                if let Some(row) = waiting {
                    break row.get(0);
                }
                tokio::task::yield_now().await;
            }
        })
        .await;
        let advisory: i64 = watcher
            .query_one(
                "SELECT COUNT(*) FROM pg_locks WHERE pid = $1 AND locktype = 'advisory'",
                &[&pid],
            )
            .await
            .expect("advisory locks")
            .get(0);
        let rows: i64 = watcher
            .query_one(
                "SELECT COUNT(*) FROM pgrowlocks('deliveries') WHERE $1 = ANY(pids)",
                &[&pid],
            )
            .await
            .expect("row locks")
            .get(0);
        admin.batch_execute("ROLLBACK").await.expect("unlock");
        let claimed = within("the claim", claim)
            .await
            .expect("a task")
            .expect("the claim succeeds");

        // A row locked and left as it was keeps the locker in `xmax`: the
        // rows the whole claim locked and did not take.
        let locked_not_taken: i64 = watcher
            .query_one(
                "SELECT COUNT(*) FROM deliveries WHERE xmax::text <> '0' AND leased_until IS NULL",
                &[],
            )
            .await
            .expect("rows locked")
            .get(0);

        assert_eq!(claimed.len(), TAKE);
        assert_eq!(
            locked_not_taken, 0,
            "rows the claim locked and did not take"
        );
        let take = i64::try_from(TAKE).expect("small");
        assert!(
            advisory <= take && rows <= take,
            "{advisory} advisory locks and {rows} rows locked for a claim of {TAKE}"
        );
    }

    fn expected_len(events: i64) -> usize {
        usize::try_from(events).expect("small")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_event_id_enqueued_by_two_stores_at_once_is_accepted_once() {
        let stores = fleet(2).await;
        save(&*stores[0], &hook("wh_a", "acct_a", &["*"], T0)).await;
        let ids = 60;
        for i in 0..ids {
            let id = format!("evt_{i}");
            let at = T0 + i * SECOND;
            let (a, b) = (Arc::clone(&stores[0]), Arc::clone(&stores[1]));
            let (first, second) = (
                event("acct_a", &id, "document.create", at),
                event("acct_a", &id, "document.create", at),
            );
            let (first, second) = tokio::join!(
                tokio::spawn(async move { a.enqueue(first, DAY).await }),
                tokio::spawn(async move { b.enqueue(second, DAY).await }),
            );
            let mut outcomes = [
                first.expect("a task").expect("enqueue"),
                second.expect("a task").expect("enqueue"),
            ];
            outcomes.sort_by_key(|o| matches!(o, Enqueued::Duplicate));
            assert_eq!(
                outcomes,
                [Enqueued::Queued(1), Enqueued::Duplicate],
                "event {id}"
            );
        }
        assert_eq!(
            all_of(&*stores[0], "wh_a").await.len(),
            usize::try_from(ids).expect("small")
        );
    }
}
