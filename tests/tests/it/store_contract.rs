//! The store's contract: what every implementation of `ActivityLog` and
//! `NameRegistry` must do (and, in [`webhooks`], of `Webhooks`). Each case
//! is a function generic over the traits, run below against a fresh SQLite
//! file and against a fresh PostgreSQL database: both stores run the very
//! same functions. The last cases are about each store itself: reopening
//! it, reading it read-only, refusing a newer schema, and for PostgreSQL
//! several relays on one database, its time limit and its connection
//! errors.

use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use ferry_common::ids::ExchangeId;
use ferry_relay::store::postgres::Postgres;
use ferry_relay::store::sqlite::Sqlite;
use ferry_relay::store::{
    ActivityLog, CapturedBody, CapturedResponse, Exchange, Filter, Header, Kind, Micros,
    NameRecord, NameRegistry, Outcome, Pruned, Retention, StatusFilter,
};

/// A time the entries are received at, in microseconds.
const T0: Micros = 1_700_000_000_000_000;
const SECOND: Micros = 1_000_000;

/// A plain answered GET, received at `received_at`.
fn entry(owner: &str, tunnel: &str, received_at: Micros) -> Exchange {
    Exchange {
        id: ExchangeId::new(),
        tunnel: tunnel.to_owned(),
        owner: owner.to_owned(),
        kind: Kind::Tunnel,
        replay_of: None,
        received_at,
        method: "GET".to_owned(),
        url: format!("https://{tunnel}.relay.test/hook"),
        http_version: "HTTP/1.1".to_owned(),
        remote_addr: "192.0.2.7:40000".to_owned(),
        request_headers: vec![header("host", format!("{tunnel}.relay.test"))],
        request_body: CapturedBody::default(),
        response: Some(CapturedResponse {
            status: 200,
            headers: vec![header("content-type", "text/plain")],
            body: body("ok"),
        }),
        responded_at: Some(received_at + 1_000),
        done_at: Some(received_at + 2_000),
        outcome: Outcome::Answered,
        error: None,
        incomplete: false,
        replayed_at: None,
        dispatch: None,
    }
}

fn header(name: &str, value: impl Into<Vec<u8>>) -> Header {
    Header {
        name: name.to_owned(),
        value: value.into(),
    }
}

fn body(bytes: impl Into<Bytes>) -> CapturedBody {
    let bytes = bytes.into();
    CapturedBody {
        size: bytes.len() as u64,
        bytes,
        truncated: false,
    }
}

fn owned_by(owner: &str) -> Filter {
    Filter {
        owner: Some(owner.to_owned()),
        ..Filter::default()
    }
}

fn ids_of(entries: &[Exchange]) -> Vec<ExchangeId> {
    entries.iter().map(|e| e.id).collect()
}

/// Every entry `filter` lists, newest first.
async fn listed(store: &impl ActivityLog, filter: &Filter) -> Vec<ExchangeId> {
    ids_of(&store.list(filter, None, 10_000, true).await.expect("list"))
}

/// Every entry `filter` tails, in commit order.
async fn tailed(store: &impl ActivityLog, filter: &Filter) -> Vec<ExchangeId> {
    let logged = store
        .committed_after(filter, 0, 10_000)
        .await
        .expect("committed_after");
    logged.iter().map(|l| l.exchange.id).collect()
}

/// A retention that keeps everything `prune` is not told to remove.
fn keep_all() -> Retention {
    Retention {
        max_age: Duration::from_secs(100 * 365 * 24 * 3600),
        max_bytes: u64::MAX / 2,
        max_bytes_per_owner: u64::MAX / 2,
    }
}

async fn round_trip_is_byte_exact(store: &(impl ActivityLog + NameRegistry)) {
    assert_eq!(store.last_seq().await.expect("last_seq"), 0, "empty log");
    let mut binary = entry("acct_a", "brave-otter", T0);
    binary.method = "POST".to_owned();
    binary.url = "https://brave-otter.relay.test/upload?x=%FF&y=1".to_owned();
    binary.http_version = "HTTP/2".to_owned();
    binary.request_headers = vec![
        header("x-dup", "first"),
        header("content-type", "application/octet-stream"),
        header("x-dup", "second"),
        header("x-raw", vec![0x80, 0xFF, b'a', 0x00, 0xFE]),
        header("x-empty", ""),
        header("x-quote", "\"quoted\" \\ back"),
    ];
    binary.request_body = CapturedBody {
        bytes: Bytes::from_static(&[0x00, 0xFF, 0x00, b'x', 0xC3, 0x28, 0xFF]),
        size: 1_000_000,
        truncated: true,
    };
    binary.response = None;
    binary.responded_at = None;
    binary.outcome = Outcome::CallerHungUp;
    binary.error = Some("the caller hung up".to_owned());
    binary.incomplete = true;

    let mut answered = entry("acct_a", "brave-otter", T0 + 1);
    answered.kind = Kind::Replay;
    answered.replay_of = Some(binary.id);
    answered.remote_addr = "relay".to_owned();
    answered.response = Some(CapturedResponse {
        status: 201,
        headers: vec![
            header("set-cookie", "a=1"),
            header("set-cookie", "b=2"),
            header("x-bin", vec![0xFF, 0x00]),
        ],
        body: CapturedBody {
            bytes: Bytes::from_static(b"\x00\xFFpartial"),
            size: 42,
            truncated: true,
        },
    });
    answered.replayed_at = Some(T0 + 5);

    let mut empty_response = entry("", "calm-heron", T0 + 2);
    empty_response.response = Some(CapturedResponse {
        status: 204,
        headers: Vec::new(),
        body: CapturedBody::default(),
    });
    empty_response.request_headers = Vec::new();

    let all = vec![binary.clone(), answered.clone(), empty_response.clone()];
    store.append(all.clone().into()).await.expect("append");
    for expected in &all {
        let got = store.get(expected.id, None).await.expect("get");
        assert_eq!(got.as_ref(), Some(expected));
    }
    let listed = store
        .list(&Filter::default(), None, 10, true)
        .await
        .expect("list");
    assert_eq!(listed, all.iter().rev().cloned().collect::<Vec<_>>());
    let tailed = store
        .committed_after(&Filter::default(), 0, 10)
        .await
        .expect("committed_after");
    // The tail carries no bodies' bytes, only their sizes and flags.
    let tailed: Vec<Exchange> = tailed.into_iter().map(|l| l.exchange).collect();
    let without_bodies: Vec<Exchange> = all
        .iter()
        .cloned()
        .map(|mut e| {
            e.request_body.bytes = Default::default();
            if let Some(response) = &mut e.response {
                response.body.bytes = Default::default();
            }
            e
        })
        .collect();
    assert_eq!(tailed, without_bodies);
}

async fn list_pages_newest_first_without_gaps_or_repeats(
    store: &(impl ActivityLog + NameRegistry),
) {
    let entries: Vec<Exchange> = (0..25)
        .map(|i| {
            let owner = if i % 3 == 0 { "acct_b" } else { "acct_a" };
            entry(owner, "brave-otter", T0 + i)
        })
        .collect();
    store
        .append(entries[..10].to_vec().into())
        .await
        .expect("append");
    store
        .append(entries[10..].to_vec().into())
        .await
        .expect("append");

    for filter in [Filter::default(), owned_by("acct_a")] {
        let expected: Vec<ExchangeId> = entries
            .iter()
            .rev()
            .filter(|e| filter.owner.as_ref().is_none_or(|o| *o == e.owner))
            .map(|e| e.id)
            .collect();
        let mut paged = Vec::new();
        let mut before = None;
        loop {
            let page = store.list(&filter, before, 7, true).await.expect("list");
            assert!(page.len() <= 7);
            let Some(last) = page.last() else { break };
            before = Some(last.id);
            paged.extend(ids_of(&page));
        }
        assert_eq!(paged, expected, "{filter:?}");
    }
    assert!(store
        .list(&Filter::default(), None, 0, true)
        .await
        .expect("list")
        .is_empty());
}

async fn filters_select_alone_and_combined(store: &(impl ActivityLog + NameRegistry)) {
    let e1 = entry("acct_a", "t-one", T0 + SECOND);
    let mut e2 = entry("acct_a", "t-two", T0 + 2 * SECOND);
    e2.kind = Kind::Replay;
    e2.method = "POST".to_owned();
    if let Some(r) = e2.response.as_mut() {
        r.status = 404;
    }
    let mut e3 = entry("acct_b", "t-three", T0 + 3 * SECOND);
    e3.method = "POST".to_owned();
    if let Some(r) = e3.response.as_mut() {
        r.status = 503;
    }
    let mut e4 = entry("acct_a", "t-one", T0 + 4 * SECOND);
    e4.method = "PUT".to_owned();
    e4.response = None;
    e4.outcome = Outcome::TargetUnreachable;
    store
        .append(vec![e1.clone(), e2.clone(), e3.clone(), e4.clone()].into())
        .await
        .expect("append");
    let [e1, e2, e3, e4] = [e1.id, e2.id, e3.id, e4.id];

    let cases: Vec<(Filter, Vec<ExchangeId>)> = vec![
        (Filter::default(), vec![e4, e3, e2, e1]),
        (owned_by("acct_a"), vec![e4, e2, e1]),
        (owned_by("acct_b"), vec![e3]),
        (owned_by("acct_nobody"), vec![]),
        (
            Filter {
                tunnel: Some("t-one".to_owned()),
                ..Filter::default()
            },
            vec![e4, e1],
        ),
        (
            Filter {
                kind: Some(Kind::Replay),
                ..Filter::default()
            },
            vec![e2],
        ),
        (
            Filter {
                kind: Some(Kind::Tunnel),
                ..Filter::default()
            },
            vec![e4, e3, e1],
        ),
        (
            Filter {
                method: Some("POST".to_owned()),
                ..Filter::default()
            },
            vec![e3, e2],
        ),
        (
            Filter {
                status: Some(StatusFilter::Code(404)),
                ..Filter::default()
            },
            vec![e2],
        ),
        (
            Filter {
                status: Some(StatusFilter::Class(2)),
                ..Filter::default()
            },
            vec![e1],
        ),
        (
            Filter {
                status: Some(StatusFilter::Class(4)),
                ..Filter::default()
            },
            vec![e2],
        ),
        (
            Filter {
                status: Some(StatusFilter::Class(5)),
                ..Filter::default()
            },
            vec![e3],
        ),
        (
            Filter {
                since: Some(T0 + 2 * SECOND),
                ..Filter::default()
            },
            vec![e4, e3, e2],
        ),
        (
            Filter {
                until: Some(T0 + 3 * SECOND),
                ..Filter::default()
            },
            vec![e2, e1],
        ),
        (
            Filter {
                since: Some(T0 + 2 * SECOND),
                until: Some(T0 + 4 * SECOND),
                ..Filter::default()
            },
            vec![e3, e2],
        ),
        (
            Filter {
                owner: Some("acct_a".to_owned()),
                method: Some("POST".to_owned()),
                ..Filter::default()
            },
            vec![e2],
        ),
        (
            Filter {
                owner: Some("acct_a".to_owned()),
                tunnel: Some("t-one".to_owned()),
                status: Some(StatusFilter::Class(2)),
                ..Filter::default()
            },
            vec![e1],
        ),
        (
            Filter {
                owner: Some("acct_b".to_owned()),
                kind: Some(Kind::Replay),
                ..Filter::default()
            },
            vec![],
        ),
    ];
    for (filter, expected) in cases {
        assert_eq!(listed(store, &filter).await, expected, "list {filter:?}");
        let in_commit_order: Vec<ExchangeId> = expected.iter().rev().copied().collect();
        assert_eq!(
            tailed(store, &filter).await,
            in_commit_order,
            "tail {filter:?}"
        );
    }
}

async fn text_search_is_case_insensitive_and_owner_scoped(
    store: &(impl ActivityLog + NameRegistry),
) {
    let mut in_path = entry("acct_a", "t", T0 + 1);
    in_path.url = "https://t.relay.test/Orders/Shipped?Customer=ACME&n=1".to_owned();
    let mut in_header = entry("acct_a", "t", T0 + 2);
    in_header
        .request_headers
        .push(header("x-signature", "t=1,Sig-MARKER-123"));
    let mut in_request_body = entry("acct_a", "t", T0 + 3);
    in_request_body.method = "POST".to_owned();
    in_request_body.request_body = body(r#"{"event":"Invoice.Paid","amount":10}"#);
    let mut in_response_body = entry("acct_a", "t", T0 + 4);
    if let Some(r) = in_response_body.response.as_mut() {
        r.body = body("Grüße aus der Wörld");
    }
    let mut in_response_header = entry("acct_a", "t", T0 + 5);
    if let Some(r) = in_response_header.response.as_mut() {
        r.headers.push(header("location", "/Thanks-Page"));
    }
    let mut other_owner = entry("acct_b", "u", T0 + 6);
    other_owner.request_body = body(r#"{"event":"invoice.paid"}"#);
    let mut binary = entry("acct_a", "t", T0 + 7);
    binary.request_body = body(&b"invoice.paid\xFF\xFE\x00"[..]);
    let mut short = entry("acct_a", "t", T0 + 8);
    short.url = "https://t.relay.test/zq".to_owned();
    // Characters that mean something to SQL patterns or search syntax.
    let mut literal = entry("acct_a", "t", T0 + 9);
    literal.url = "https://t.relay.test/sale?deal=100%_OFF\"*(NEAR)".to_owned();
    // Text that holds NUL, which PostgreSQL's text type cannot.
    let mut with_nul = entry("acct_a", "t", T0 + 10);
    with_nul.request_body = body(&b"nul\0inside-the-body"[..]);
    with_nul
        .request_headers
        .push(header("x-nul", &b"nul\0inside-a-header"[..]));
    let all = [
        &in_path,
        &in_header,
        &in_request_body,
        &in_response_body,
        &in_response_header,
        &other_owner,
        &binary,
        &short,
        &literal,
        &with_nul,
    ];
    store
        .append(all.iter().map(|e| (*e).clone()).collect::<Vec<_>>().into())
        .await
        .expect("append");

    let search = |owner: Option<&str>, text: &str| Filter {
        owner: owner.map(str::to_owned),
        text: Some(text.to_owned()),
        ..Filter::default()
    };
    let a = Some("acct_a");
    let cases: Vec<(Filter, Vec<ExchangeId>)> = vec![
        (search(a, "orders/ship"), vec![in_path.id]),
        (search(a, "CUSTOMER=acme"), vec![in_path.id]),
        (search(a, "sig-marker-1"), vec![in_header.id]),
        (search(a, "INVOICE.PAID"), vec![in_request_body.id]),
        (search(a, "WÖRLD"), vec![in_response_body.id]),
        (search(a, "grüße"), vec![in_response_body.id]),
        (search(a, "thanks-page"), vec![in_response_header.id]),
        (
            search(None, "invoice.paid"),
            vec![other_owner.id, in_request_body.id],
        ),
        (search(Some("acct_b"), "orders"), vec![]),
        (search(a, "ZQ"), vec![short.id]),
        (search(a, "%_off\"*(near)"), vec![literal.id]),
        (search(a, "%"), vec![literal.id]),
        (search(a, "_"), vec![literal.id]),
        (search(a, "0%x"), vec![]),
        (search(a, "sale\0deal"), vec![]),
        (search(a, "inside-the-body"), vec![with_nul.id]),
        (search(a, "inside-a-header"), vec![with_nul.id]),
        (search(a, "nowhere-to-be-found"), vec![]),
        (
            Filter {
                method: Some("POST".to_owned()),
                ..search(a, "paid")
            },
            vec![in_request_body.id],
        ),
        (
            Filter {
                method: Some("GET".to_owned()),
                ..search(a, "paid")
            },
            vec![],
        ),
    ];
    for (filter, expected) in cases {
        assert_eq!(listed(store, &filter).await, expected, "list {filter:?}");
        let in_commit_order: Vec<ExchangeId> = expected.iter().rev().copied().collect();
        assert_eq!(
            tailed(store, &filter).await,
            in_commit_order,
            "tail {filter:?}"
        );
    }
}

async fn get_is_owner_scoped(store: &(impl ActivityLog + NameRegistry)) {
    let mine = entry("acct_a", "t", T0);
    store
        .append(vec![mine.clone()].into())
        .await
        .expect("append");
    let get = |owner| store.get(mine.id, owner);
    assert_eq!(get(Some("acct_a")).await.expect("get"), Some(mine.clone()));
    assert_eq!(get(None).await.expect("get"), Some(mine.clone()));
    assert_eq!(get(Some("acct_b")).await.expect("get"), None);
    assert_eq!(get(Some("")).await.expect("get"), None);
    let unknown = ExchangeId::new();
    assert_eq!(store.get(unknown, None).await.expect("get"), None);
    assert_eq!(store.seq_of(unknown, None).await.expect("seq_of"), None);
}

async fn committed_after_follows_commits_not_ids(store: &(impl ActivityLog + NameRegistry)) {
    let older = entry("acct_a", "t", T0);
    let newer = entry("acct_a", "t", T0 + 1);
    assert!(older.id < newer.id);
    // The newer request completes first.
    store
        .append(vec![newer.clone()].into())
        .await
        .expect("append");
    store
        .append(vec![older.clone()].into())
        .await
        .expect("append");

    let tail = store
        .committed_after(&Filter::default(), 0, 10)
        .await
        .expect("committed_after");
    assert_eq!(
        tail.iter().map(|l| l.exchange.id).collect::<Vec<_>>(),
        vec![newer.id, older.id]
    );
    assert!(tail[0].seq < tail[1].seq);
    let newer_seq = store.seq_of(newer.id, None).await.expect("seq_of");
    let older_seq = store.seq_of(older.id, None).await.expect("seq_of");
    assert_eq!(newer_seq, Some(tail[0].seq));
    assert_eq!(older_seq, Some(tail[1].seq));
    assert_eq!(store.last_seq().await.expect("last_seq"), tail[1].seq);

    let after_first = store
        .committed_after(&Filter::default(), tail[0].seq, 10)
        .await
        .expect("committed_after");
    assert_eq!(
        ids_of(
            &after_first
                .into_iter()
                .map(|l| l.exchange)
                .collect::<Vec<_>>()
        ),
        vec![older.id]
    );
    let limited = store
        .committed_after(&Filter::default(), 0, 1)
        .await
        .expect("committed_after");
    assert_eq!(limited.len(), 1);
    assert_eq!(limited[0].exchange.id, newer.id);
    assert!(store
        .committed_after(&Filter::default(), tail[1].seq, 10)
        .await
        .expect("committed_after")
        .is_empty());
    // The list still sorts by id.
    assert_eq!(
        listed(store, &Filter::default()).await,
        vec![newer.id, older.id]
    );
}

async fn append_of_a_stored_id_replaces_it_as_a_new_commit(
    store: &(impl ActivityLog + NameRegistry),
) {
    let mut first = entry("acct_a", "t", T0);
    first.response = None;
    first.outcome = Outcome::CallerHungUp;
    first.request_body = body("searchable-before");
    let other = entry("acct_a", "t", T0 + 1);
    store
        .append(vec![first.clone(), other.clone()].into())
        .await
        .expect("append");
    let before = store
        .seq_of(first.id, None)
        .await
        .expect("seq_of")
        .expect("stored");

    let mut fuller = first.clone();
    fuller.response = entry("acct_a", "t", T0).response;
    fuller.outcome = Outcome::Answered;
    fuller.request_body = body("searchable-after");
    store
        .append(vec![fuller.clone()].into())
        .await
        .expect("append");

    assert_eq!(
        store.get(first.id, None).await.expect("get"),
        Some(fuller.clone())
    );
    assert_eq!(
        listed(store, &Filter::default()).await,
        vec![other.id, first.id]
    );
    let after = store
        .seq_of(first.id, None)
        .await
        .expect("seq_of")
        .expect("stored");
    assert!(after > before, "a replacement is a new commit");
    assert_eq!(store.last_seq().await.expect("last_seq"), after);
    let tail = store
        .committed_after(&Filter::default(), before, 10)
        .await
        .expect("committed_after");
    assert_eq!(
        tail.iter().map(|l| l.exchange.id).collect::<Vec<_>>(),
        vec![other.id, first.id]
    );
    let text = |text: &str| Filter {
        text: Some(text.to_owned()),
        ..Filter::default()
    };
    assert_eq!(
        listed(store, &text("searchable-after")).await,
        vec![first.id]
    );
    assert_eq!(listed(store, &text("searchable-before")).await, vec![]);

    // Twice in one batch: the last one stays.
    let mut last = fuller.clone();
    last.error = Some("the last word".to_owned());
    store
        .append(vec![fuller.clone(), last.clone()].into())
        .await
        .expect("append");
    assert_eq!(
        store.get(first.id, None).await.expect("get"),
        Some(last.clone())
    );
    assert_eq!(listed(store, &Filter::default()).await.len(), 2);

    // A replaced entry counts once towards retention.
    let both = other.stored_size() + last.stored_size();
    let retention = Retention {
        max_bytes: both,
        max_bytes_per_owner: both,
        ..keep_all()
    };
    assert_eq!(
        store.prune(retention, T0).await.expect("prune"),
        Pruned::default()
    );
}

async fn mark_replayed_succeeds_once(store: &(impl ActivityLog + NameRegistry)) {
    let mut offline = entry("acct_a", "t", T0);
    offline.outcome = Outcome::ClientOffline;
    store
        .append(vec![offline.clone()].into())
        .await
        .expect("append");
    assert!(store
        .mark_replayed(offline.id, T0 + 10)
        .await
        .expect("mark"));
    assert!(!store
        .mark_replayed(offline.id, T0 + 20)
        .await
        .expect("mark"));
    let got = store
        .get(offline.id, None)
        .await
        .expect("get")
        .expect("stored");
    assert_eq!(got.replayed_at, Some(T0 + 10));
    assert!(!store
        .mark_replayed(ExchangeId::new(), T0)
        .await
        .expect("mark"));
}

async fn missed_lists_offline_captures_not_yet_replayed(store: &(impl ActivityLog + NameRegistry)) {
    let mut offline = entry("acct_a", "t", T0);
    offline.outcome = Outcome::ClientOffline;
    offline.response = None;
    let mut replayed = entry("acct_a", "t", T0 + 1);
    replayed.outcome = Outcome::ClientOffline;
    replayed.replayed_at = Some(T0 + 2);
    let answered = entry("acct_a", "t", T0 + 3);
    let mut other_owner = entry("acct_b", "t", T0 + 4);
    other_owner.outcome = Outcome::ClientOffline;
    store
        .append(
            vec![
                offline.clone(),
                replayed.clone(),
                answered.clone(),
                other_owner.clone(),
            ]
            .into(),
        )
        .await
        .expect("append");
    let missed = |owner: Option<&str>| Filter {
        owner: owner.map(str::to_owned),
        missed: true,
        ..Filter::default()
    };
    assert_eq!(
        listed(store, &missed(Some("acct_a"))).await,
        vec![offline.id]
    );
    assert_eq!(
        listed(store, &missed(None)).await,
        vec![other_owner.id, offline.id]
    );
    assert_eq!(
        tailed(store, &missed(Some("acct_a"))).await,
        vec![offline.id]
    );
    assert!(store.mark_replayed(offline.id, T0 + 9).await.expect("mark"));
    assert_eq!(listed(store, &missed(Some("acct_a"))).await, vec![]);
}

async fn prune_removes_entries_past_the_age(store: &(impl ActivityLog + NameRegistry)) {
    // More old entries than a prune removes in one step.
    let old: Vec<Exchange> = (0..1_203).map(|i| entry("acct_a", "t", T0 + i)).collect();
    let young: Vec<Exchange> = (0..5)
        .map(|i| entry("acct_a", "t", T0 + 100 * SECOND + i))
        .collect();
    store.append(old.clone().into()).await.expect("append");
    store.append(young.clone().into()).await.expect("append");

    let retention = Retention {
        max_age: Duration::from_secs(50),
        ..keep_all()
    };
    let pruned = store
        .prune(retention, T0 + 150 * SECOND)
        .await
        .expect("prune");
    assert_eq!(
        pruned,
        Pruned {
            entries: old.len() as u64,
            bytes: old.iter().map(Exchange::stored_size).sum(),
        }
    );
    assert_eq!(
        listed(store, &Filter::default()).await,
        ids_of(&young).into_iter().rev().collect::<Vec<_>>()
    );
    assert_eq!(store.get(old[0].id, None).await.expect("get"), None);
    // Removed entries no longer match a search.
    let search = Filter {
        text: Some("/hook".to_owned()),
        ..Filter::default()
    };
    assert_eq!(listed(store, &search).await.len(), young.len());
    assert_eq!(
        store
            .prune(retention, T0 + 150 * SECOND)
            .await
            .expect("prune"),
        Pruned::default()
    );
}

async fn prune_removes_the_oldest_beyond_the_total_size(store: &(impl ActivityLog + NameRegistry)) {
    let entries: Vec<Exchange> = (0..10)
        .map(|i| entry(if i % 2 == 0 { "acct_a" } else { "acct_b" }, "t", T0 + i))
        .collect();
    let size = entries[0].stored_size();
    assert!(entries.iter().all(|e| e.stored_size() == size));
    store.append(entries.clone().into()).await.expect("append");

    let retention = Retention {
        max_bytes: 4 * size + size / 2,
        ..keep_all()
    };
    let pruned = store.prune(retention, T0 + 10).await.expect("prune");
    assert_eq!(
        pruned,
        Pruned {
            entries: 6,
            bytes: 6 * size
        }
    );
    assert_eq!(
        listed(store, &Filter::default()).await,
        ids_of(&entries[6..]).into_iter().rev().collect::<Vec<_>>()
    );
}

async fn prune_takes_a_flooding_owner_s_oldest_and_spares_the_others(
    store: &(impl ActivityLog + NameRegistry),
) {
    let quiet: Vec<Exchange> = (0..3).map(|i| entry("acct_quiet", "q", T0 + i)).collect();
    let flood: Vec<Exchange> = (0..12)
        .map(|i| entry("acct_flood", "f", T0 + 10 + i))
        .collect();
    let size = quiet[0].stored_size();
    assert!(flood.iter().all(|e| e.stored_size() == size));
    store.append(quiet.clone().into()).await.expect("append");
    store.append(flood.clone().into()).await.expect("append");

    let retention = Retention {
        max_bytes_per_owner: 4 * size,
        ..keep_all()
    };
    let pruned = store.prune(retention, T0 + 100).await.expect("prune");
    assert_eq!(
        pruned,
        Pruned {
            entries: 8,
            bytes: 8 * size
        }
    );
    assert_eq!(
        listed(store, &owned_by("acct_flood")).await,
        ids_of(&flood[8..]).into_iter().rev().collect::<Vec<_>>()
    );
    assert_eq!(
        listed(store, &owned_by("acct_quiet")).await,
        ids_of(&quiet).into_iter().rev().collect::<Vec<_>>()
    );
}

async fn names_are_saved_updated_listed_and_forgotten(store: &(impl ActivityLog + NameRegistry)) {
    let alpha = NameRecord {
        name: "alpha".to_owned(),
        owner: "acct_a".to_owned(),
        last_seen: 10,
        hold_until: None,
        target: Some("http://localhost:3000".to_owned()),
    };
    store.save_name(alpha.clone()).await.expect("save");
    assert_eq!(
        store.name("alpha").await.expect("name"),
        Some(alpha.clone())
    );
    assert_eq!(store.name("missing").await.expect("name"), None);

    let alpha = NameRecord {
        hold_until: Some(100),
        target: None,
        ..alpha
    };
    store.save_name(alpha.clone()).await.expect("save");
    assert_eq!(
        store.name("alpha").await.expect("name"),
        Some(alpha.clone())
    );
    let beta = NameRecord {
        name: "beta".to_owned(),
        owner: "acct_b".to_owned(),
        last_seen: 5,
        hold_until: Some(50),
        target: None,
    };
    let gamma = NameRecord {
        name: "gamma".to_owned(),
        owner: "".to_owned(),
        last_seen: 20,
        hold_until: None,
        target: Some("http://localhost:8080".to_owned()),
    };
    store.save_name(beta.clone()).await.expect("save");
    store.save_name(gamma.clone()).await.expect("save");

    // Held or served, the longest unserved (earliest seen) first; a hold
    // ends at its `hold_until`.
    assert_eq!(
        store.names(49).await.expect("names"),
        vec![beta.clone(), alpha.clone(), gamma.clone()]
    );
    assert_eq!(
        store.names(50).await.expect("names"),
        vec![alpha.clone(), gamma.clone()]
    );
    assert_eq!(store.forget_expired(60).await.expect("forget"), 1);
    assert_eq!(store.name("beta").await.expect("name"), None);
    assert_eq!(
        store.names(0).await.expect("names"),
        vec![alpha.clone(), gamma.clone()]
    );
    assert_eq!(store.forget_expired(100).await.expect("forget"), 1);
    assert_eq!(store.names(0).await.expect("names"), vec![gamma]);
}

/// A SQLite store in a file of its own, removed with it.
struct Fresh {
    _dir: tempfile::TempDir,
    path: PathBuf,
    store: Sqlite,
}

impl Fresh {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let path = dir.path().join("ferry.sqlite");
        let store = Sqlite::open(&path).expect("open");
        Self {
            _dir: dir,
            path,
            store,
        }
    }
}

/// A PostgreSQL store on a database of its own.
async fn fresh_postgres() -> Postgres {
    let url = ferry_tests::postgres::fresh_database().await;
    Postgres::connect(&url).await.expect("connect")
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
    round_trip_is_byte_exact,
    list_pages_newest_first_without_gaps_or_repeats,
    filters_select_alone_and_combined,
    text_search_is_case_insensitive_and_owner_scoped,
    get_is_owner_scoped,
    committed_after_follows_commits_not_ids,
    append_of_a_stored_id_replaces_it_as_a_new_commit,
    mark_replayed_succeeds_once,
    missed_lists_offline_captures_not_yet_replayed,
    prune_removes_entries_past_the_age,
    prune_removes_the_oldest_beyond_the_total_size,
    prune_takes_a_flooding_owner_s_oldest_and_spares_the_others,
    names_are_saved_updated_listed_and_forgotten,
);

#[tokio::test]
async fn sqlite_file_keeps_everything_across_a_reopen() {
    let Fresh { _dir, path, store } = Fresh::new();
    let entries: Vec<Exchange> = (0..5).map(|i| entry("acct_a", "t", T0 + i)).collect();
    store.append(entries.clone().into()).await.expect("append");
    let name = NameRecord {
        name: "alpha".to_owned(),
        owner: "acct_a".to_owned(),
        last_seen: 1,
        hold_until: Some(T0),
        target: None,
    };
    store.save_name(name.clone()).await.expect("save");
    let last = store.last_seq().await.expect("last_seq");
    drop(store);

    let store = Sqlite::open(&path).expect("reopen");
    let listed = store
        .list(&Filter::default(), None, 10, true)
        .await
        .expect("list");
    assert_eq!(listed, entries.iter().rev().cloned().collect::<Vec<_>>());
    assert_eq!(store.name("alpha").await.expect("name"), Some(name));
    assert_eq!(store.last_seq().await.expect("last_seq"), last);
    let later = entry("acct_a", "t", T0 + 9);
    store
        .append(vec![later.clone()].into())
        .await
        .expect("append");
    assert!(store.seq_of(later.id, None).await.expect("seq_of") > Some(last));
    let search = Filter {
        text: Some("/HOOK".to_owned()),
        ..Filter::default()
    };
    assert_eq!(
        store
            .list(&search, None, 10, true)
            .await
            .expect("list")
            .len(),
        6
    );
}

#[tokio::test]
async fn sqlite_read_only_reads_and_refuses_writes() {
    let Fresh { _dir, path, store } = Fresh::new();
    let first = entry("acct_a", "t", T0);
    store
        .append(vec![first.clone()].into())
        .await
        .expect("append");

    // Beside a running writer, as a command beside the relay.
    let reader = Sqlite::open_read_only(&path).expect("open read-only");
    assert_eq!(
        reader.get(first.id, None).await.expect("get"),
        Some(first.clone())
    );
    let second = entry("acct_a", "t", T0 + 1);
    store
        .append(vec![second.clone()].into())
        .await
        .expect("append");
    assert_eq!(
        listed(&reader, &Filter::default()).await,
        vec![second.id, first.id]
    );
    drop(reader);
    drop(store);

    // Alone, as a command when no relay runs.
    let reader = Sqlite::open_read_only(&path).expect("open read-only");
    assert_eq!(
        listed(&reader, &Filter::default()).await,
        vec![second.id, first.id]
    );
    assert!(reader
        .append(vec![entry("acct_a", "t", T0 + 2)].into())
        .await
        .is_err());
    assert!(reader.mark_replayed(first.id, T0).await.is_err());
    assert!(reader.prune(keep_all(), T0).await.is_err());
    let name = NameRecord {
        name: "alpha".to_owned(),
        owner: "acct_a".to_owned(),
        last_seen: 1,
        hold_until: None,
        target: None,
    };
    assert!(reader.save_name(name).await.is_err());
    assert!(reader.forget_expired(T0).await.is_err());
    assert_eq!(
        listed(&reader, &Filter::default()).await,
        vec![second.id, first.id]
    );

    let missing = path.with_file_name("missing.sqlite");
    assert!(Sqlite::open_read_only(&missing).is_err());
    assert!(!missing.exists(), "read-only never creates a file");
}

#[tokio::test]
async fn sqlite_refuses_a_database_from_a_newer_schema() {
    let Fresh { _dir, path, store } = Fresh::new();
    drop(store);
    let conn = rusqlite::Connection::open(&path).expect("open raw");
    conn.pragma_update(None, "user_version", 1_000)
        .expect("set the version");
    drop(conn);

    for opened in [Sqlite::open(&path), Sqlite::open_read_only(&path)] {
        let Err(err) = opened else {
            panic!("a database from a newer Ferry was opened");
        };
        let message = err.to_string();
        assert!(message.contains("schema version 1000"), "{message}");
    }
}

/// A plain connection to the database at `url`, for what no store call
/// does.
async fn raw(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("a raw connection");
    tokio::spawn(connection);
    client
}

async fn schema_version(url: &str) -> i32 {
    raw(url)
        .await
        .query_one("SELECT version FROM ferry_schema", &[])
        .await
        .expect("the schema version")
        .get(0)
}

#[tokio::test]
async fn postgres_refuses_a_database_from_a_newer_schema() {
    let url = ferry_tests::postgres::fresh_database().await;
    drop(Postgres::connect(&url).await.expect("connect"));
    raw(&url)
        .await
        .execute("UPDATE ferry_schema SET version = 1000", &[])
        .await
        .expect("set the version");
    let Err(err) = Postgres::connect(&url).await else {
        panic!("a database from a newer Ferry was opened");
    };
    let message = err.to_string();
    assert!(message.contains("schema version 1000"), "{message}");
}

#[tokio::test]
async fn postgres_stores_on_one_database_see_each_others_entries_and_names() {
    let url = ferry_tests::postgres::fresh_database().await;
    let one = Postgres::connect(&url).await.expect("connect");
    let first: Vec<Exchange> = (0..3).map(|i| entry("acct_a", "t", T0 + i)).collect();
    one.append(first.clone().into()).await.expect("append");
    let alpha = NameRecord {
        name: "alpha".to_owned(),
        owner: "acct_a".to_owned(),
        last_seen: 1,
        hold_until: None,
        target: Some("http://localhost:3000".to_owned()),
    };
    one.save_name(alpha.clone()).await.expect("save");
    let version = schema_version(&url).await;

    // The second relay finds the schema current: its migration changes
    // nothing and loses nothing.
    let two = Postgres::connect(&url).await.expect("connect");
    assert_eq!(schema_version(&url).await, version);
    assert_eq!(
        two.list(&Filter::default(), None, 10, true)
            .await
            .expect("list"),
        first.iter().rev().cloned().collect::<Vec<_>>()
    );
    assert_eq!(tailed(&two, &Filter::default()).await, ids_of(&first));
    assert_eq!(
        two.get(first[0].id, Some("acct_a")).await.expect("get"),
        Some(first[0].clone())
    );
    assert_eq!(two.name("alpha").await.expect("name"), Some(alpha.clone()));

    // And the other way round.
    let last_of_one = one.last_seq().await.expect("last_seq");
    let second = entry("acct_b", "u", T0 + 10);
    two.append(vec![second.clone()].into())
        .await
        .expect("append");
    let beta = NameRecord {
        name: "beta".to_owned(),
        owner: "acct_b".to_owned(),
        last_seen: 2,
        hold_until: Some(T0),
        target: None,
    };
    two.save_name(beta.clone()).await.expect("save");
    let tail = one
        .committed_after(&Filter::default(), last_of_one, 10)
        .await
        .expect("committed_after");
    assert_eq!(
        tail.iter().map(|l| l.exchange.id).collect::<Vec<_>>(),
        vec![second.id]
    );
    assert_eq!(
        one.last_seq().await.expect("last_seq"),
        two.last_seq().await.expect("last_seq")
    );
    assert_eq!(one.names(0).await.expect("names"), vec![alpha, beta]);
    assert!(one.mark_replayed(second.id, T0 + 11).await.expect("mark"));
    assert!(!two.mark_replayed(second.id, T0 + 12).await.expect("mark"));
    assert_eq!(
        two.get(second.id, None)
            .await
            .expect("get")
            .and_then(|e| e.replayed_at),
        Some(T0 + 11)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_tail_never_skips_an_entry_committed_by_another_relay() {
    const WRITERS_PER_RELAY: usize = 4;
    const BATCHES: usize = 150;
    const PER_BATCH: usize = 2;
    let url = ferry_tests::postgres::fresh_database().await;
    let relays = [
        Postgres::connect(&url).await.expect("connect"),
        Postgres::connect(&url).await.expect("connect"),
    ];
    let follower = Postgres::connect(&url).await.expect("connect");
    let mut expected = std::collections::HashSet::new();
    let mut writers = Vec::new();
    for relay in &relays {
        for _ in 0..WRITERS_PER_RELAY {
            let batches: Vec<Vec<Exchange>> = (0..BATCHES)
                .map(|_| (0..PER_BATCH).map(|_| entry("acct_a", "t", T0)).collect())
                .collect();
            expected.extend(batches.iter().flatten().map(|e| e.id));
            let relay = relay.clone();
            writers.push(tokio::spawn(async move {
                for batch in batches {
                    relay.append(batch.into()).await.expect("append");
                }
            }));
        }
    }
    let seen = ferry_tests::within("the tail to catch up", async {
        let mut seen = Vec::new();
        let mut last = 0;
        loop {
            // Read before the query: once every writer is done, one more
            // empty page means nothing committed is left unseen.
            let finished = writers.iter().all(|w| w.is_finished());
            let page = follower
                .committed_after(&Filter::default(), last, 10_000)
                .await
                .expect("committed_after");
            if page.is_empty() && finished {
                break seen;
            }
            for logged in page {
                assert!(logged.seq > last, "the tail went back");
                last = logged.seq;
                seen.push(logged.exchange.id);
            }
        }
    })
    .await;
    for writer in writers {
        writer.await.expect("a writer");
    }
    let distinct: std::collections::HashSet<ExchangeId> = seen.iter().copied().collect();
    assert_eq!(distinct.len(), seen.len(), "the tail saw an entry twice");
    let skipped = expected.difference(&distinct).count();
    assert_eq!(
        skipped,
        0,
        "the tail skipped {skipped} of {} entries",
        expected.len()
    );
    assert_eq!(distinct, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_relays_pruning_at_once_remove_the_excess_once() {
    const KEEP: usize = 40;
    let url = ferry_tests::postgres::fresh_database().await;
    let relays = [
        Postgres::connect(&url).await.expect("connect"),
        Postgres::connect(&url).await.expect("connect"),
    ];
    let mut kept: Vec<Exchange> = Vec::new();
    // A race is not lost every time: several rounds.
    for round in 0..10 {
        let entries: Vec<Exchange> = (0..100)
            .map(|i| entry("acct_a", "t", T0 + round * 1000 + i))
            .collect();
        let size = entries[0].stored_size();
        relays[0]
            .append(entries.clone().into())
            .await
            .expect("append");
        let excess = (kept.len() + entries.len() - KEEP) as u64;
        kept.extend(entries);
        kept.drain(..kept.len() - KEEP);
        let retention = Retention {
            max_bytes: KEEP as u64 * size,
            ..keep_all()
        };
        let (one, two) = tokio::join!(
            relays[0].prune(retention, T0),
            relays[1].prune(retention, T0)
        );
        let (one, two) = (one.expect("prune"), two.expect("prune"));
        assert_eq!(one.entries + two.entries, excess, "{one:?} {two:?}");
        assert_eq!(one.bytes + two.bytes, excess * size);
        assert_eq!(
            listed(&relays[1], &Filter::default()).await,
            ids_of(&kept).into_iter().rev().collect::<Vec<_>>()
        );
    }
}

#[tokio::test]
async fn postgres_connect_fails_clearly_when_the_server_is_unreachable_or_the_url_malformed() {
    // Nothing listens on a port just freed.
    let free = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let closed = format!("postgres://ferry@127.0.0.1:{free}/ferry");
    // Something accepts but never answers: the pool's timeouts end the wait.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a listener");
    let silent_url = format!(
        "postgres://ferry@{}/ferry",
        silent.local_addr().expect("its address")
    );
    for (url, why) in [(&closed, "Connection refused"), (&silent_url, "Timeout")] {
        let Err(err) = ferry_tests::within("connect", Postgres::connect(url)).await else {
            panic!("connected to {url}");
        };
        let message = err.to_string();
        assert!(
            message.contains("the database is unavailable") && message.contains(why),
            "{url}: {message}"
        );
    }
    for url in [
        "postgres://ferry@127.0.0.1:notaport/ferry",
        "not a url at all",
    ] {
        let Err(err) = ferry_tests::within("connect", Postgres::connect(url)).await else {
            panic!("connected to {url}");
        };
        let message = err.to_string();
        assert!(
            message.contains("not a PostgreSQL URL")
                && message.contains("postgres://USER:PASSWORD@HOST:PORT/DATABASE"),
            "{url}: {message}"
        );
    }
}

#[tokio::test]
async fn postgres_a_search_past_its_time_fails_as_too_slow() {
    let url = ferry_tests::postgres::fresh_database().await;
    let store = Postgres::connect(&url).await.expect("connect");
    store
        .append(vec![entry("acct_a", "t", T0)].into())
        .await
        .expect("append");
    // A query stuck behind another session's lock runs as long as one
    // scanning a huge log: both are cut off.
    let mut blocker = raw(&url).await;
    let lock = blocker.transaction().await.expect("a transaction");
    lock.batch_execute("LOCK TABLE exchanges IN ACCESS EXCLUSIVE MODE")
        .await
        .expect("lock");
    let search = Filter {
        text: Some("/hook".to_owned()),
        ..Filter::default()
    };
    let list = ferry_tests::within("list", store.list(&search, None, 10, false)).await;
    let tail = ferry_tests::within("tail", store.committed_after(&search, 0, 10)).await;
    for result in [list.map(|_| ()), tail.map(|_| ())] {
        let Err(err) = result else {
            panic!("a query ran past its time");
        };
        let message = err.to_string();
        assert!(
            message.starts_with(ferry_relay::store::TOO_SLOW),
            "{message}"
        );
    }
    lock.rollback().await.expect("rollback");
    assert_eq!(listed(&store, &search).await.len(), 1);
}

mod webhooks;

#[tokio::test]
async fn postgres_a_nul_in_a_text_field_is_stored_as_a_replacement_not_a_failed_batch() {
    let store = fresh_postgres().await;
    let mut odd = entry("acct_a", "t", T0);
    odd.error = Some("the target said \0 and hung up".to_owned());
    let plain = entry("acct_a", "t", T0 + 1);
    store
        .append(vec![odd.clone(), plain.clone()].into())
        .await
        .expect("a NUL does not fail the batch");
    let got = store.get(odd.id, None).await.expect("get").expect("stored");
    assert_eq!(
        got.error.as_deref(),
        Some("the target said \u{FFFD} and hung up")
    );
    assert_eq!(store.get(plain.id, None).await.expect("get"), Some(plain));

    let name = NameRecord {
        name: "alpha".to_owned(),
        owner: "acct_a".to_owned(),
        last_seen: 1,
        hold_until: None,
        target: Some("http://localhost:3000/\0".to_owned()),
    };
    store
        .save_name(name)
        .await
        .expect("a NUL does not fail the save");
    let saved = store.name("alpha").await.expect("name").expect("saved");
    assert_eq!(
        saved.target.as_deref(),
        Some("http://localhost:3000/\u{FFFD}")
    );
}

#[tokio::test]
async fn postgres_an_acme_order_waits_its_turn_and_for_every_running_dns_server_of_its_domain() {
    let url = ferry_tests::postgres::fresh_database().await;
    let store = Postgres::connect(&url).await.expect("connect");
    let domain = "relay.test";
    let alive = Duration::from_secs(30);
    let mirror = |relay: &'static str, domain: &'static str, alive: Duration| {
        let store = store.clone();
        async move {
            let (values, seen) = store.acme_challenges(domain).await.expect("load");
            store
                .record_acme_mirror(relay, domain, seen, alive)
                .await
                .expect("record");
            values
        }
    };
    for relay in ["a", "b"] {
        assert!(mirror(relay, domain, alive).await.is_empty());
    }
    // One whose time ran out, and one of another domain: not waited for.
    mirror("stopped", domain, Duration::ZERO).await;
    mirror("other", "other.test", alive).await;

    let id = store
        .publish_acme_challenge(domain, "v1", Duration::from_secs(60))
        .await
        .expect("publish");
    assert_eq!(
        store.acme_mirrors_behind(domain, id).await.expect("behind"),
        ["a", "b"]
    );
    assert_eq!(mirror("a", domain, alive).await, ["v1"]);
    assert_eq!(
        store.acme_mirrors_behind(domain, id).await.expect("behind"),
        ["b"]
    );
    store.forget_acme_mirror("b").await.expect("forget");
    assert!(store
        .acme_mirrors_behind(domain, id)
        .await
        .expect("behind")
        .is_empty());

    // An expired challenge (its relay died mid-order) is not answered.
    store
        .publish_acme_challenge(domain, "stale", Duration::ZERO)
        .await
        .expect("publish");
    store
        .withdraw_acme_challenges(domain, &["v1".to_owned()])
        .await
        .expect("withdraw");
    assert!(mirror("a", domain, alive).await.is_empty());

    // One order at a time: the second waits until the first lock is gone.
    let first = store.acme_order_lock(domain).await.expect("the first turn");
    let second = tokio::spawn({
        let store = store.clone();
        async move { store.acme_order_lock(domain).await.map(drop) }
    });
    let db = raw(&url).await;
    ferry_tests::within("the second order to wait", async {
        loop {
            let waiting: i64 = db
                .query_one(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted",
                    &[],
                )
                .await
                .expect("the locks")
                .get(0);
            if waiting == 1 {
                break;
            }
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert!(!second.is_finished());
    drop(first);
    ferry_tests::within("the second turn", second)
        .await
        .expect("the task")
        .expect("the second turn");

    // A failed order holds back the fleet's next one, whichever relay
    // takes the next turn; a success clears it.
    let backoff = |store: &Postgres| {
        let store = store.clone();
        async move { store.acme_order_backoff(domain).await.expect("backoff") }
    };
    assert_eq!(backoff(&store).await, (0, Duration::ZERO));
    store
        .acme_order_failed(domain, 1, Duration::from_secs(900))
        .await
        .expect("failed");
    let other = Postgres::connect(&url).await.expect("connect");
    let (failures, wait) = backoff(&other).await;
    assert_eq!(failures, 1);
    assert!(
        wait > Duration::from_secs(890) && wait <= Duration::from_secs(900),
        "{wait:?}"
    );
    other
        .acme_order_failed(domain, 2, Duration::ZERO)
        .await
        .expect("failed");
    assert_eq!(backoff(&store).await, (2, Duration::ZERO), "due again");
    store.acme_order_succeeded(domain).await.expect("succeeded");
    assert_eq!(backoff(&other).await, (0, Duration::ZERO));
}

#[tokio::test]
async fn postgres_a_dead_relays_session_holds_its_name_for_its_owner_until_the_hold_ends() {
    use ferry_relay::store::postgres::{SessionClaim, SessionClaimed};

    let url = ferry_tests::postgres::fresh_database().await;
    let (dead, survivor) = (
        Postgres::connect(&url).await.expect("connect"),
        Postgres::connect(&url).await.expect("connect"),
    );
    let claim = |name, relay, owner, lease, hold| SessionClaim {
        name,
        relay,
        url: "http://127.0.0.1:1",
        owner,
        session: 1,
        lease,
        max_per_owner: None,
        hold,
    };
    let lease = Duration::from_millis(100);
    let week = Some(Duration::from_secs(7 * 86_400));
    for (name, owner) in [("kept", "key_owner"), ("anonymous", "")] {
        let claimed = dead
            .claim_session(&claim(name, "dead", owner, lease, week))
            .await
            .expect("claim");
        assert_eq!(claimed, SessionClaimed::Yes(None));
    }
    // The relay dies: nothing renews the leases, and the rows stay.
    ferry_tests::within("the dead relay's leases to end", async {
        while survivor
            .held_after_crash("kept", Duration::from_secs(60))
            .await
            .expect("held")
            .is_none()
            || survivor
                .session_holder("anonymous", "survivor")
                .await
                .expect("holder")
                .is_some()
        {
            tokio::task::yield_now().await;
        }
    })
    .await;

    let stranger = |name, hold| claim(name, "survivor", "key_stranger", lease, hold);
    assert_eq!(
        survivor
            .claim_session(&stranger("kept", week))
            .await
            .expect("claim"),
        SessionClaimed::Held
    );
    // Anonymous sessions hold nothing, as on one relay.
    assert_eq!(
        survivor
            .held_after_crash("anonymous", Duration::from_secs(60))
            .await
            .expect("held"),
        None
    );
    assert_eq!(
        survivor
            .claim_session(&stranger("anonymous", week))
            .await
            .expect("claim"),
        SessionClaimed::Yes(None)
    );
    // Once the hold has run its time from the lease's end, the name is
    // anyone's.
    assert_eq!(
        survivor
            .held_after_crash("kept", Duration::ZERO)
            .await
            .expect("held"),
        None
    );
    assert_eq!(
        survivor
            .claim_session(&stranger("kept", Some(Duration::ZERO)))
            .await
            .expect("claim"),
        SessionClaimed::Yes(None)
    );
}
