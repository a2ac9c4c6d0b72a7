//! Several instances on one PostgreSQL database: work one instance accepts
//! is sent promptly by another (LISTEN/NOTIFY); after the listening
//! connection was lost, the instance rescans the queue once it is back;
//! and a window the Market said is used up (`Remaining: 0`) holds for
//! every instance. PostgreSQL only (SQLite is one process).
//!
//! In the wake-up tests app A accepts the event with its dispatcher stopped, and
//! app B, whose polling fallback is set to ten minutes, must send it: only
//! a wake-up from the database can make B look at the queue within the
//! bound. The bounds are real time because what is tested is a wake-up
//! across processes through the database, which the injected clock does
//! not drive; 20 s (`wait_for_delivered`) is far above the milliseconds a
//! notification takes, and far below the ten-minute poll, so a pass is
//! the wake-up and nothing else.

#![cfg(postgres_tests)]

use std::time::{Duration, Instant};

use chatbridge::clock::ManualClock;
use chatbridge::market::fake::{FakeConfig, ScriptedAnswer};

use super::helpers::*;

/// B's polling fallback: far longer than any bound of these tests.
const POLL_MS: u64 = 600_000;

/// A, which only accepts, and B, which only polls every ten minutes, on
/// one database and one fake Market.
async fn two_instances() -> (TestApp, TestApp) {
    let b = spawn_app_with(TestOptions {
        backend: Backend::Postgres,
        tweak: Some(Box::new(|s| s.dispatch.poll_interval_ms = POLL_MS)),
        ..TestOptions::default()
    })
    .await;
    let a = b.another_without_dispatcher(TestOptions::default()).await;
    (a, b)
}

/// A connection of the test's own to the apps' database.
async fn connect(app: &TestApp) -> tokio_postgres::Client {
    connect_to(&app.database.as_ref().expect("a PostgreSQL app").url).await
}

async fn connect_to(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect to the test database");
    actix_rt::spawn(connection);
    client
}

/// How many connections of the database are listening for work.
async fn listeners(db: &tokio_postgres::Client) -> i64 {
    db.query_one(
        "SELECT COUNT(*) FROM pg_stat_activity
         WHERE datname = current_database() AND query = 'LISTEN chatbridge_work'",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

/// Waits (real time, bounded) until `n` connections listen.
async fn wait_for_listeners(db: &tokio_postgres::Client, n: i64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while listeners(db).await != n {
        assert!(
            Instant::now() < deadline,
            "never saw {n} listening connections (saw {})",
            listeners(db).await
        );
        actix_rt::time::sleep(Duration::from_millis(20)).await;
    }
}

#[actix_rt::test]
async fn work_accepted_by_one_instance_wakes_another() {
    let (a, b) = two_instances().await;
    let db = connect(&a).await;
    // Both listen (so the event below is heard, not found by B's rescan).
    wait_for_listeners(&db, 2).await;
    // Anything B's own start-up rounds do is over before the event arrives.
    b.caught_up().await;

    let (status, body) = a.post_event("oms", &sample("order_shipped")).await;
    assert_eq!(status, 202, "{body}");
    let sent = b.wait_for_delivered(2 + 1).await;
    let buyer = b.buyer_messages();
    assert_eq!(
        buyer.len(),
        1,
        "B sends what A accepted, woken by the database: {sent:?}"
    );
    a.stop().await;
    b.stop().await;
}

#[actix_rt::test]
async fn an_instance_whose_listening_connection_dropped_rescans_once_it_is_back() {
    let (a, b) = two_instances().await;
    let db = connect(&a).await;
    wait_for_listeners(&db, 2).await;
    b.caught_up().await;

    // The listeners go, and cannot come back while the event is stored:
    // its notification reaches nobody. (Only a connection to another
    // database may close this one's doors.)
    let name: String = db
        .query_one("SELECT current_database()", &[])
        .await
        .unwrap()
        .get(0);
    let server = connect_to(&std::env::var(POSTGRES_URL_VAR).unwrap()).await;
    server
        .batch_execute(&format!("ALTER DATABASE {name} ALLOW_CONNECTIONS false"))
        .await
        .unwrap();
    server
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE datname = $1 AND query = 'LISTEN chatbridge_work'",
            &[&name],
        )
        .await
        .unwrap();
    wait_for_listeners(&db, 0).await;
    // A stores it on a connection its pool already has.
    let (status, body) = a.post_event("oms", &sample("order_shipped")).await;
    assert_eq!(status, 202, "{body}");

    server
        .batch_execute(&format!("ALTER DATABASE {name} ALLOW_CONNECTIONS true"))
        .await
        .unwrap();
    // B reconnects (its backoff is capped) and rescans: the event is sent.
    let deadline = Instant::now() + Duration::from_secs(20);
    while b.buyer_messages().is_empty() {
        assert!(
            Instant::now() < deadline,
            "B never sent the event stored while it was not listening"
        );
        actix_rt::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(b.buyer_messages().len(), 1);
    wait_for_listeners(&db, 2).await;
    a.stop().await;
    b.stop().await;
}

#[actix_rt::test]
async fn cancelling_the_message_a_chat_waits_behind_wakes_another_instance() {
    // The first message of chat 901 failed once and waits for a retry time
    // the manual clock never reaches; the second waits behind it. When an
    // operator cancels the first through A, B (polling every ten minutes)
    // must hear that the second may go now.
    let clock = ManualClock::new(1_795_000_000_000);
    let b = spawn_app_with(TestOptions {
        backend: Backend::Postgres,
        clock: Some(clock.clone()),
        tweak: Some(Box::new(|s| s.dispatch.poll_interval_ms = POLL_MS)),
        ..TestOptions::default()
    })
    .await;
    let a = b
        .another_without_dispatcher(TestOptions {
            clock: Some(clock.clone()),
            ..TestOptions::default()
        })
        .await;
    b.market.script(ScriptedAnswer {
        status: 500,
        chat_id: Some(901),
        ..ScriptedAnswer::default()
    });
    let first = post(&a, "c-1", 901).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !b.market.requests().iter().any(|r| r.chat_id == 901) {
        assert!(Instant::now() < deadline, "B never tried the first message");
        actix_rt::time::sleep(Duration::from_millis(20)).await;
    }
    let second = post(&a, "c-2", 901).await;
    b.caught_up().await;
    a.wait_for_state(first, "queued").await;
    a.wait_for_state(second, "queued").await;
    assert!(b.buyer_messages().iter().all(|r| r.chat_id != 901));
    // B's last record (of caught_up's marker) notifies B itself after the
    // Market answered; the round that wakes is over in milliseconds, and
    // the cancel must not ride on it. Real time: B's rounds run on it.
    actix_rt::time::sleep(Duration::from_millis(500)).await;

    let (status, body) = a
        .admin_post(
            &format!("/admin/deliveries/{first}/cancel"),
            &serde_json::json!({}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    b.wait_for_state(second, "delivered").await;
    a.stop().await;
    b.stop().await;
}

/// Posts an `order.shipped` to `chat` of business 111; its delivery id.
async fn post(app: &TestApp, id: &str, chat: i64) -> i64 {
    let event = sample_as("order_shipped", id, Some(chat));
    let (status, body) = app.post_event("oms", &event).await;
    assert_eq!(status, 202, "{body}");
    body["deliveries"][0]["id"].as_i64().unwrap()
}

#[actix_rt::test]
async fn a_window_the_market_said_is_used_up_holds_for_every_instance() {
    // Two instances sending to one Market, which allows 2 sends a window:
    // one of them hears "Remaining: 0"; the other must not send either.
    let clock = ManualClock::new(1_795_000_000_000);
    let a = spawn_app_with(TestOptions {
        backend: Backend::Postgres,
        clock: Some(clock.clone()),
        fake: FakeConfig {
            api_keys: vec![API_KEY.into()],
            hourly_limit: 2,
            window_secs: 3600,
            ..FakeConfig::default()
        },
        ..TestOptions::default()
    })
    .await;
    let b = a
        .another(TestOptions {
            clock: Some(clock.clone()),
            ..TestOptions::default()
        })
        .await;
    let first = post(&a, "w-1", 701).await;
    let second = post(&b, "w-2", 702).await;
    a.wait_for_state(first, "delivered").await;
    a.wait_for_state(second, "delivered").await;

    let third = post(&a, "w-3", 703).await;
    let fourth = post(&b, "w-4", 704).await;
    // Each instance runs a round after the two above (its own marker's
    // webhook wakes it) and has finished what it sent.
    for (app, chat) in [(&a, 801), (&b, 802)] {
        let mut marker = sample_as("order_shipped", &format!("m-{chat}"), Some(chat));
        marker["businessId"] = serde_json::json!(MARKER_BUSINESS);
        let (status, body) = app.post_event("oms", &marker).await;
        assert_eq!(status, 202, "{body}");
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while a.market.delivered().len() < 4
        || !a
            .admin_get("/admin/deliveries?state=sending&limit=1")
            .await
            .1["deliveries"]
            .as_array()
            .is_some_and(Vec::is_empty)
    {
        assert!(Instant::now() < deadline, "the markers were never sent");
        actix_rt::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        a.buyer_requests().len(),
        2,
        "no instance calls into the window the Market said is used up"
    );
    for id in [third, fourth] {
        assert_eq!(a.delivery(id).await["delivery"]["state"], "queued");
    }

    // The window is over (the Market names whole seconds: one more).
    clock.advance(Duration::from_secs(3_602));
    a.wait_for_state(third, "delivered").await;
    a.wait_for_state(fourth, "delivered").await;
    assert_eq!(a.market.stats().by_status.get(&420), None);
    a.stop().await;
    b.stop().await;
}
