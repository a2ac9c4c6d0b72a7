//! Several instances on one PostgreSQL database wake each other: work one
//! instance accepts is sent promptly by another (LISTEN/NOTIFY), and after
//! the listening connection was lost, the instance rescans the queue once
//! it is back. PostgreSQL only (SQLite is one process).
//!
//! In each test app A accepts the event with its dispatcher stopped, and
//! app B, whose polling fallback is set to ten minutes, must send it: only
//! a wake-up from the database can make B look at the queue within the
//! bound. The bounds are real time because what is tested is a wake-up
//! across processes through the database, which the injected clock does
//! not drive; 20 s (`wait_for_delivered`) is far above the milliseconds a
//! notification takes, and far below the ten-minute poll, so a pass is
//! the wake-up and nothing else.

#![cfg(postgres_tests)]

use std::time::{Duration, Instant};

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
