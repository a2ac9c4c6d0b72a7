//! Several instances on one PostgreSQL database, one guarantee at a time
//! (issue 12): two apps on one database and one fake Market
//! (`TestApp::another`), or two stores opened on one database as two
//! processes would (`chatbridge::store::open`). The three-process crash
//! test is several_processes.rs.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chatbridge::clock::SystemClock;
use chatbridge::domain::BusinessId;
use chatbridge::market::fake::{FakeConfig, FakeMarket};
use chatbridge::settings::{Settings, StorageSettings};
use chatbridge::store::{ClaimLimits, NewEvent, SharedCaps, Verdict};
use serde_json::json;

use crate::helpers::*;
use crate::process::ServeRoot;

async fn postgres_app(options: TestOptions) -> TestApp {
    spawn_app_with(TestOptions {
        backend: Backend::Postgres,
        ..options
    })
    .await
}

/// The business's deliveries, markers left out, from the admin API.
async fn deliveries_of(app: &TestApp, business: i64) -> Vec<serde_json::Value> {
    let mut all = app.all_deliveries().await;
    all.retain(|d| d["business_id"] == business);
    all
}

#[actix_rt::test]
async fn one_webhook_posted_to_two_instances_at_the_same_moment_makes_one_event() {
    const ROUNDS: i64 = 8;
    let first = postgres_app(TestOptions::default()).await;
    let second = first.another(TestOptions::default()).await;

    let mut answers = Vec::new();
    for round in 0..ROUNDS {
        let event = sample_as(
            "order_shipped",
            &format!("twice-{round}"),
            Some(6100 + round),
        );
        let (a, b) = futures_util::future::join(
            first.post_event("oms", &event),
            second.post_event("oms", &event),
        )
        .await;
        answers.push((round, a, b));
    }
    first.caught_up().await;
    second.caught_up().await;

    for (round, a, b) in &answers {
        let mut statuses = [a.0, b.0];
        statuses.sort_unstable();
        assert_eq!(
            statuses,
            [200, 202],
            "round {round}: one new event and one duplicate: {} / {}",
            a.1,
            b.1
        );
        assert_eq!(a.1["event_id"], b.1["event_id"], "round {round}");
        assert_eq!(
            a.1["deliveries"][0]["id"], b.1["deliveries"][0]["id"],
            "round {round}: both answers name the one delivery"
        );
    }
    let messages = first.buyer_messages();
    let mut chats: Vec<i64> = messages.iter().map(|m| m.chat_id).collect();
    chats.sort_unstable();
    assert_eq!(
        chats,
        (0..ROUNDS).map(|r| 6100 + r).collect::<Vec<_>>(),
        "one message per event: {messages:#?}"
    );
    assert_eq!(deliveries_of(&first, 111).await.len(), ROUNDS as usize);
    second.stop().await;
    first.stop().await;
}

#[actix_rt::test]
async fn max_in_flight_and_the_quota_hold_across_two_instances() {
    const BUSINESS: i64 = 222;
    const QUOTA: u32 = 6;
    const EVENTS: i64 = 14;
    fn caps(s: &mut Settings) {
        s.market.max_in_flight = 2;
        s.market.hourly_limit = QUOTA;
    }
    let first = postgres_app(TestOptions {
        // The Market's own limits match, so it would refuse (420) what
        // goes beyond them; its latency makes sends overlap.
        fake: FakeConfig {
            api_keys: vec![API_KEY.into()],
            hourly_limit: QUOTA,
            max_in_flight: 2,
            latency_ms: 200,
            ..FakeConfig::default()
        },
        tweak: Some(Box::new(caps)),
        ..TestOptions::default()
    })
    .await;
    let second = first
        .another(TestOptions {
            tweak: Some(Box::new(caps)),
            ..TestOptions::default()
        })
        .await;

    for i in 0..EVENTS {
        let mut event = sample_as("order_shipped", &format!("capped-{i}"), Some(7100 + i));
        event["businessId"] = json!(BUSINESS);
        let app = if i % 2 == 0 { &first } else { &second };
        let (status, body) = app.post_event("oms", &event).await;
        assert_eq!(status, 202, "{body}");
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while first
        .buyer_requests()
        .iter()
        .filter(|r| r.business_id == BUSINESS)
        .count()
        < QUOTA as usize
    {
        assert!(Instant::now() < deadline, "the quota's sends never came");
        actix_rt::time::sleep(Duration::from_millis(20)).await;
    }
    // Both dispatchers have run whole rounds since: whatever they would
    // send beyond the quota has been sent by now.
    first.caught_up().await;
    second.caught_up().await;

    let sends: Vec<_> = first
        .buyer_requests()
        .into_iter()
        .filter(|r| r.business_id == BUSINESS)
        .collect();
    let stats = first.market.stats();
    assert_eq!(
        sends.len(),
        QUOTA as usize,
        "the two instances together sent {} of business {BUSINESS}'s messages; its quota is {QUOTA}: {:?}",
        sends.len(),
        sends.iter().map(|r| (r.chat_id, r.status)).collect::<Vec<_>>()
    );
    assert!(sends.iter().all(|r| r.status == 200), "{sends:#?}");
    let seen = stats
        .max_in_flight_seen
        .get(&BUSINESS)
        .copied()
        .unwrap_or(0);
    assert!(
        seen <= 2,
        "{seen} requests of business {BUSINESS} at once at the Market; max_in_flight is 2 across both"
    );
    let queued = deliveries_of(&first, BUSINESS)
        .await
        .iter()
        .filter(|d| d["state"] == "queued")
        .count();
    assert_eq!(queued, EVENTS as usize - QUOTA as usize, "the rest wait");
    second.stop().await;
    first.stop().await;
}

fn storage(url: &str) -> StorageSettings {
    StorageSettings {
        url: url.to_owned(),
        pool_size: 2,
        connect_timeout_secs: 5,
        ..StorageSettings::default()
    }
}

/// An event with one delivery to `chat` of business 333.
fn one_message(id: &str, chat: i64) -> NewEvent {
    chat_event(id, 333, chat, &format!("message of {id}"))
}

fn limits() -> ClaimLimits {
    ClaimLimits {
        sends: 4,
        chat_lookups: 4,
        total: 4,
        caps: SharedCaps {
            max_in_flight: 4,
            send_limit: 1000,
            lookup_limit: 1000,
            window_ms: 3_600_000,
        },
    }
}

#[actix_rt::test]
async fn a_late_answer_under_a_lease_taken_over_cannot_overwrite_the_new_owners_record() {
    let database = TestDatabase::create().await;
    // Two processes on one database.
    let old = chatbridge::store::open(&storage(&database.url)).unwrap();
    let new = chatbridge::store::open(&storage(&database.url)).unwrap();
    old.insert_event(one_message("fenced", 9001)).await.unwrap();

    let first = old
        .claim(BusinessId(333), 1_000, 2_000, limits(), false)
        .await
        .unwrap();
    assert_eq!(first.len(), 1);
    // The old owner stalls past its lease; the other process takes it over.
    assert_eq!(new.reclaim_expired(3_000, Vec::new()).await.unwrap(), 1);
    let second = new
        .claim(BusinessId(333), 3_000, 4_000, limits(), false)
        .await
        .unwrap();
    assert_eq!(second.len(), 1);
    let (first, second) = (&first[0], &second[0]);
    assert_eq!(first.id, second.id);
    assert_ne!(first.claim_token, second.claim_token);

    // While the new owner sends, the old one's failure comes in.
    let retry = Verdict::Retry {
        at: 60_000,
        reason: "HTTP 500".into(),
    };
    old.record(answer(first, 3_100, retry.clone()), 3_100)
        .await
        .unwrap();
    let (row, _) = new.delivery(first.id).await.unwrap().unwrap();
    assert_eq!(
        row.state.as_str(),
        "sending",
        "the late answer took the delivery from its new owner: {row:?}"
    );
    new.record(answer(second, 3_200, Verdict::Delivered), 3_200)
        .await
        .unwrap();
    // And after the new owner recorded it: still nothing to overwrite.
    old.record(
        answer(
            first,
            3_300,
            Verdict::Dead {
                reason: "late".into(),
            },
        ),
        3_300,
    )
    .await
    .unwrap();
    old.release(vec![(first.id, first.claim_token)], 3_400)
        .await
        .unwrap();

    let (row, attempts) = new.delivery(first.id).await.unwrap().unwrap();
    assert_eq!(row.state.as_str(), "delivered", "{row:?}");
    assert_eq!(row.reason, None, "{row:?}");
    assert_eq!(
        row.attempts, 1,
        "only the new owner's attempt moved it: {row:?}"
    );
    assert_eq!(
        attempts.len(),
        3,
        "every answer is kept as an attempt: {attempts:?}"
    );
    assert!(
        new.claim(BusinessId(333), 5_000, 6_000, limits(), false)
            .await
            .unwrap()
            .is_empty(),
        "nothing goes out again"
    );
    drop((old, new));
}

#[actix_rt::test]
async fn a_send_lost_with_its_process_keeps_its_quota_slot_as_long_as_the_market_may_count_it() {
    const WINDOW: i64 = 10_000;
    let database = TestDatabase::create().await;
    let dead = chatbridge::store::open(&storage(&database.url)).unwrap();
    let alive = chatbridge::store::open(&storage(&database.url)).unwrap();
    dead.insert_event(one_message("lost-1", 9101))
        .await
        .unwrap();
    alive
        .insert_event(one_message("lost-2", 9102))
        .await
        .unwrap();
    let one_per_window = ClaimLimits {
        caps: SharedCaps {
            send_limit: 1,
            window_ms: WINDOW,
            ..limits().caps
        },
        ..limits()
    };
    let claim = |store: &Arc<dyn chatbridge::store::Store>, now: i64| {
        let store = store.clone();
        async move {
            store
                .claim(BusinessId(333), now, now + 5_000, one_per_window, false)
                .await
                .unwrap()
                .len()
        }
    };

    // Claimed at T with a lease to T + 5 s; the process dies with the
    // request out. The Market counted it when it came, as late as the
    // request timeout (shorter than the lease) allowed: its window may
    // last to T + 15 s.
    const T: i64 = 1_000;
    assert_eq!(claim(&dead, T).await, 1);
    drop(dead);
    let still_in_flight = claim(&alive, T + WINDOW + 1).await;
    let reclaimed = alive
        .reclaim_expired(T + WINDOW + 500, Vec::new())
        .await
        .unwrap();
    assert_eq!(reclaimed, 1);
    let after_reclaim = claim(&alive, T + 12_000).await;
    let after_its_window = claim(&alive, T + 5_000 + WINDOW + 1).await;

    assert_eq!(
        (still_in_flight, after_reclaim),
        (0, 0),
        "a second send within the window the Market may still count the lost one in"
    );
    assert_eq!(
        after_its_window, 1,
        "the slot is free once the window surely ended"
    );
    drop(alive);
}

/// The schema versions recorded in a database, in order.
async fn schema_versions(url: &str) -> Vec<i32> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    let driver = actix_rt::spawn(connection);
    let versions = client
        .query(
            "SELECT version FROM chatbridge_schema ORDER BY version",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    drop(client);
    let _ = driver.await;
    versions
}

#[actix_rt::test]
async fn instances_starting_at_once_on_a_fresh_database_all_migrate_it_once() {
    const INSTANCES: usize = 6;
    let (database, alone) = (TestDatabase::create().await, TestDatabase::create().await);
    let url = database.url.clone();

    let opened: Vec<Result<(), String>> = (0..INSTANCES)
        .map(|_| {
            let settings = storage(&url);
            std::thread::spawn(move || {
                chatbridge::store::open(&settings)
                    .map(drop)
                    .map_err(|e| e.to_string())
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|t| t.join().expect("open panicked"))
        .collect();
    // What one instance alone records, for comparison.
    drop(chatbridge::store::open(&storage(&alone.url)).unwrap());

    let failed: Vec<&String> = opened.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(failed.is_empty(), "opens that failed: {failed:?}");
    let (versions, expected) = (
        schema_versions(&url).await,
        schema_versions(&alone.url).await,
    );
    assert!(!expected.is_empty());
    assert_eq!(
        versions, expected,
        "each migration ran once, as for one instance alone"
    );
}

#[actix_rt::test]
async fn sslmode_require_encrypts_the_connections_to_the_local_server() {
    let database = TestDatabase::create().await;
    let url = format!(
        "{}{}sslmode=require&application_name=chatbridge-tls-test",
        database.url,
        if database.url.contains('?') { '&' } else { '?' }
    );
    let store = chatbridge::store::open(&storage(&url)).unwrap();
    store
        .insert_event(one_message("over-tls", 9002))
        .await
        .unwrap();

    let (client, connection) = tokio_postgres::connect(&database.url, tokio_postgres::NoTls)
        .await
        .unwrap();
    let driver = actix_rt::spawn(connection);
    let ssl: Vec<bool> = client
        .query(
            "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
             WHERE a.application_name = 'chatbridge-tls-test'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    drop(client);
    let _ = driver.await;
    assert!(!ssl.is_empty(), "the store has no connection open");
    assert!(
        ssl.iter().all(|&s| s),
        "connections without TLS despite sslmode=require: {ssl:?}"
    );
    drop(store);
}

/// A PostgreSQL server without TLS answers the client's SSLRequest with
/// `N`: this one does only that, for each connection.
fn server_without_tls() -> u16 {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            let mut request = [0u8; 8];
            if stream.read_exact(&mut request).is_ok() {
                let _ = stream.write_all(b"N");
            }
        }
    });
    port
}

#[actix_rt::test]
async fn sslmode_require_against_a_server_without_tls_says_so_without_the_password() {
    let port = server_without_tls();
    let url = format!("postgres://app:pw-s3cret-1234@127.0.0.1:{port}/chatbridge?sslmode=require");
    let market =
        FakeMarket::start("127.0.0.1:0", FakeConfig::default(), Arc::new(SystemClock)).unwrap();
    let root = ServeRoot::new(&market).with_storage(&url);

    let mut serve = root.spawn(&[("CHATBRIDGE__STORAGE__CONNECT_TIMEOUT_SECS", "3")]);
    let status = serve
        .wait_exit(Duration::from_secs(30))
        .await
        .expect("serve gives up on a database it cannot reach");
    let said = serve.log_text();

    assert!(!status.success(), "{said}");
    assert!(
        said.contains("TLS"),
        "the error names the problem (TLS): {said}"
    );
    assert!(
        said.contains(&format!("127.0.0.1:{port}")),
        "the error names the database: {said}"
    );
    assert!(
        !said.contains("pw-s3cret-1234"),
        "the password leaked: {said}"
    );
    market.stop().await;
}
