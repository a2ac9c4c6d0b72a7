//! `chatbridge store copy`: the real binary moves a SQLite store that the
//! real app filled (deliveries in every state) into PostgreSQL, and the app
//! started on PostgreSQL goes on from there: same ids, states and
//! histories, nothing sent again, the queue delivered, duplicates still
//! duplicates, the quota still counted. Also its refusals (a serve on the
//! file, a target with other data) and a rerun after a kill.
//!
//! The PostgreSQL tests are compiled only when `CHATBRIDGE_TEST_POSTGRES_URL`
//! was set at build time (see build.rs).

use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_chatbridge");

fn store_copy(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(["store", "copy"])
        .args(args)
        .env_remove("CHATBRIDGE_COPY_TO")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {BIN}: {e}"))
}

fn text(out: &[u8]) -> String {
    String::from_utf8_lossy(out).into_owned()
}

#[test]
fn a_wrong_scheme_or_an_unreachable_target_is_a_clear_error_without_the_password() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("chatbridge.db");
    chatbridge::store::SqliteStore::open(&db).unwrap();
    let from = format!("sqlite://{}", db.display());

    let swapped = store_copy(&["--from", "postgres://app:s3cret@db/x", "--to", &from]);
    assert_eq!(swapped.status.code(), Some(2));
    let err = text(&swapped.stderr);
    assert!(
        err.contains("the source must be a SQLite database"),
        "{err}"
    );
    assert!(!err.contains("s3cret"), "{err}");

    let not_pg = store_copy(&["--from", &from, "--to", "mysql://app:s3cret@db/x"]);
    assert_eq!(not_pg.status.code(), Some(2));
    let err = text(&not_pg.stderr);
    assert!(
        err.contains("the target must be a PostgreSQL database"),
        "{err}"
    );
    assert!(!err.contains("s3cret"), "{err}");

    // Port 1 on loopback: nothing listens there.
    let unreachable = store_copy(&[
        "--from",
        &from,
        "--to",
        "postgres://app:s3cret@127.0.0.1:1/chat",
    ]);
    assert_eq!(unreachable.status.code(), Some(1));
    let err = text(&unreachable.stderr);
    assert!(
        err.contains("cannot open the target postgres://app:***@127.0.0.1:1/chat"),
        "{err}"
    );
    assert!(!err.contains("s3cret"), "{err}");
    // The pool's error and the driver's are each said once.
    assert!(
        !err.contains("error connecting to server: error connecting to server"),
        "{err}"
    );
}

#[test]
fn a_target_url_serve_could_not_use_is_refused_before_connecting() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("chatbridge.db");
    chatbridge::store::SqliteStore::open(&db).unwrap();
    let from = format!("sqlite://{}", db.display());
    for (to, says) in [
        // Without a database name PostgreSQL would pick the user's, here
        // the maintenance database `postgres`. (Port 1: should the check
        // be gone, nothing listens there and no database is touched.)
        (
            "postgres://postgres:s3cret@127.0.0.1:1",
            "it names no database: write one after the host",
        ),
        (
            "postgres://app:s3c@ret@127.0.0.1:1/chat",
            "write each @ in them as %40",
        ),
        (
            "postgresql://app:s3cret@127.0.0.1:1/chat?sslmode=verify-full",
            "invalid value for option `sslmode`; sslmode may be disable, prefer or require",
        ),
        (
            "postgres://app:s3cret@127.0.0.1:99999/chat",
            "invalid value for option `port`; the port must be a number from 1 to 65535",
        ),
    ] {
        let out = store_copy(&["--from", &from, "--to", to]);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{to}: {err}");
        assert!(err.contains(says), "{to}: {err}");
        assert!(err.contains("--to \"postgres"), "{to}: {err}");
        assert!(
            !err.contains("s3cret") && !err.contains("ret@"),
            "{to}: {err}"
        );
    }
}

#[cfg(not(postgres_tests))]
#[test]
#[ignore = "CHATBRIDGE_TEST_POSTGRES_URL is not set: the store copy tests on PostgreSQL (every state moved, refusals, resume after a kill) did not run"]
fn store_copy_to_postgres_skipped() {}

#[cfg(postgres_tests)]
mod postgres {
    use std::collections::BTreeMap;
    use std::io::{BufRead, BufReader};
    use std::path::Path;
    use std::process::{Command, Stdio};
    use std::sync::Arc;
    use std::time::Duration;

    use chatbridge::clock::{Clock, ManualClock};
    use chatbridge::market::fake::{FakeConfig, FakeMethod, ScriptedAnswer};
    use chatbridge::settings::Settings;
    use chatbridge::store::ApiErrorEntry;
    use serde_json::{json, Value};

    use super::{store_copy, text, BIN};
    use crate::helpers::*;

    const START: i64 = 1_795_000_000_000;
    const CAMPAIGN: i64 = 21_000_001;
    /// Its key is refused: its deliveries are held.
    const REVOKED: i64 = 222;
    /// Two sends per window.
    const SMALL_QUOTA: i64 = 333;

    fn answer(status: u16, chat: i64, code: &str) -> ScriptedAnswer {
        ScriptedAnswer {
            status,
            errors: vec![ApiErrorEntry {
                code: code.into(),
                message: Some(format!("{code} (scripted)")),
            }],
            chat_id: Some(chat),
            ..Default::default()
        }
    }

    /// The app's options, on a manual clock, with the market source open to
    /// loopback, business 222's key revoked and business 333 at two sends
    /// per window. `postgres`: the copied database instead of a new one.
    fn options(clock: Arc<ManualClock>, fake: FakeConfig, postgres: Option<String>) -> TestOptions {
        TestOptions {
            clock: Some(clock),
            fake: FakeConfig {
                api_keys: vec![API_KEY.into()],
                ..fake
            },
            files: vec![shipped_settings_plus(&format!(
                "[market.businesses.{REVOKED}]\napi_key = \"revoked-key\"\n\
                 [market.businesses.{SMALL_QUOTA}]\nhourly_limit = 2\n"
            ))],
            tweak: Some(Box::new(move |s: &mut Settings| {
                if let Some(source) = s.sources.get_mut("market") {
                    source.allow_from = vec!["127.0.0.1/32".into(), "::1/128".into()];
                }
                if let Some(url) = &postgres {
                    s.storage.url = url.clone();
                }
            })),
            ..TestOptions::default()
        }
    }

    fn event(name: &str, id: &str, business: i64, chat: i64) -> Value {
        let mut e = sample_as(name, id, Some(chat));
        e["businessId"] = json!(business);
        e
    }

    async fn post(app: &TestApp, body: &Value) -> i64 {
        let (status, answer) = app.post_event("oms", body).await;
        assert_eq!(status, 202, "{answer}");
        answer["deliveries"][0]["id"].as_i64().expect("a delivery")
    }

    async fn notify(app: &TestApp, body: &Value) {
        let (status, answer) = app
            .post_raw(
                "/hooks/market/notification",
                &[("content-type", "application/json".into())],
                body.to_string().into_bytes(),
            )
            .await;
        assert_eq!(status, 200, "{answer}");
    }

    fn market_sample(name: &str) -> Value {
        let text =
            std::fs::read_to_string(repo().join(format!("examples/events/market/{name}.json")))
                .unwrap();
        serde_json::from_str(&text).unwrap()
    }

    /// A delivery's admin view without the event (the same either way).
    fn view(body: &Value) -> Value {
        json!({"delivery": body["delivery"], "attempts": body["attempts"]})
    }

    /// Posts events that leave the SQLite app with deliveries in every
    /// state, the last one `sending` (the Market answers it slowly).
    /// Returns the ids by what they are.
    async fn fill(app: &TestApp) -> BTreeMap<&'static str, i64> {
        let mut ids = BTreeMap::new();
        let delivered = post(app, &event("order_shipped", "mv-delivered", 111, 5001)).await;
        app.wait_for_state(delivered, "delivered").await;
        ids.insert("delivered", delivered);

        app.market.script(answer(400, 5002, "CHAT_NOT_FOUND"));
        let dead = post(app, &event("order_shipped", "mv-dead", 111, 5002)).await;
        app.wait_for_state(dead, "dead").await;
        ids.insert("dead", dead);

        let held = post(app, &event("order_shipped", "mv-held", REVOKED, 6001)).await;
        app.wait_for_state(held, "held").await;
        ids.insert("held", held);
        // Waits behind its business's held key.
        let behind_held = post(
            app,
            &event("order_shipped", "mv-behind-held", REVOKED, 6002),
        )
        .await;
        ids.insert("behind_held", behind_held);

        let mut untrackable = event("order_shipped", "mv-failed", 111, 5003);
        untrackable.as_object_mut().unwrap().remove("tracking");
        let failed = post(app, &untrackable).await;
        assert_eq!(app.delivery(failed).await["delivery"]["state"], "failed");
        ids.insert("failed", failed);

        // A 500: queued again for a retry seconds away on the manual clock.
        app.market.script(answer(500, 5004, "INTERNAL_ERROR"));
        let retrying = post(app, &event("order_shipped", "mv-retrying", 111, 5004)).await;
        app.wait_for_delivery(retrying, "its first attempt", |v| {
            v["attempts"].as_array().is_some_and(|a| a.len() == 1)
                && v["delivery"]["state"] == "queued"
        })
        .await;
        ids.insert("queued", retrying);

        app.market.script(answer(500, 5005, "INTERNAL_ERROR"));
        let cancelled = post(app, &event("order_shipped", "mv-cancelled", 111, 5005)).await;
        app.wait_for_delivery(cancelled, "its first attempt", |v| {
            v["attempts"].as_array().is_some_and(|a| a.len() == 1)
                && v["delivery"]["state"] == "queued"
        })
        .await;
        let (status, body) = app
            .admin_post(&format!("/admin/deliveries/{cancelled}/cancel"), &json!({}))
            .await;
        assert_eq!(status, 200, "{body}");
        ids.insert("cancelled", cancelled);

        // The chat of an order, found with chats/new and remembered.
        let by_order = post(app, &sample_as("order_ready_for_pickup", "mv-order", None)).await;
        app.wait_for_state(by_order, "delivered").await;
        ids.insert("by_order", by_order);

        // A Market notification: its campaign's business looked up and remembered.
        notify(app, &market_sample("order_in_delivery")).await;
        let notified = app.all_deliveries().await;
        let notified = notified
            .iter()
            .find(|d| d["source"] == "market")
            .and_then(|d| d["id"].as_i64())
            .expect("the notification's delivery");
        app.wait_for_state(notified, "delivered").await;
        ids.insert("notified", notified);

        // Business 333 uses up its two sends; the third waits for the window.
        for (i, chat) in [7001, 7002].into_iter().enumerate() {
            let id = post(
                app,
                &event("order_shipped", &format!("mv-quota-{i}"), SMALL_QUOTA, chat),
            )
            .await;
            app.wait_for_state(id, "delivered").await;
        }
        let over_quota = post(
            app,
            &event("order_shipped", "mv-quota-2", SMALL_QUOTA, 7003),
        )
        .await;
        ids.insert("over_quota", over_quota);

        // In flight when the file is taken: the Market answers in 5 s.
        app.market.configure(|c| c.latency_ms = 5_000);
        let sending = post(app, &event("order_shipped", "mv-sending", 111, 5006)).await;
        app.wait_for_state(sending, "sending").await;
        ids.insert("sending", sending);
        ids
    }

    /// The SQLite file as a process killed now would leave it.
    fn snapshot(db: &Path, to: &Path) {
        let conn = rusqlite::Connection::open(db).unwrap();
        conn.execute("VACUUM INTO ?1", [to.to_str().unwrap()])
            .unwrap();
    }

    fn state_in(file: &Path, id: i64) -> String {
        rusqlite::Connection::open(file)
            .unwrap()
            .query_row("SELECT state FROM deliveries WHERE id = ?1", [id], |r| {
                r.get(0)
            })
            .unwrap()
    }

    #[actix_rt::test]
    async fn a_store_with_every_state_moves_to_postgres_and_the_app_goes_on_from_there() {
        let clock = ManualClock::new(START);
        let sqlite_app = spawn_app_with(options(
            clock.clone(),
            FakeConfig {
                campaigns: [(CAMPAIGN.to_string(), 111)].into(),
                ..FakeConfig::default()
            },
            None,
        ))
        .await;
        let ids = fill(&sqlite_app).await;
        let mut before = BTreeMap::new();
        for d in sqlite_app.all_deliveries().await {
            let id = d["id"].as_i64().unwrap();
            before.insert(id, view(&sqlite_app.delivery(id).await));
        }
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("moved.db");
        snapshot(&sqlite_app.root.path().join("chatbridge.db"), &file);
        assert_eq!(
            state_in(&file, ids["sending"]),
            "sending",
            "the send was to be in flight when the file was taken"
        );
        assert_eq!(before[&ids["sending"]]["delivery"]["state"], "sending");
        let sent_before = sqlite_app.buyer_messages().len();
        let now = clock.now_ms();
        // (Its answer still comes in, to this app; the copy has the file as it was.)
        sqlite_app.stop().await;
        let database = TestDatabase::create().await;

        let copied = store_copy(&[
            "--from",
            &format!("sqlite://{}", file.display()),
            "--to",
            &database.url,
        ]);

        let (out, err) = (text(&copied.stdout), text(&copied.stderr));
        assert_eq!(copied.status.code(), Some(0), "{out}\n{err}");
        assert!(
            err.contains("store copy: deliveries: done"),
            "progress on stderr: {err}"
        );
        assert!(
            out.contains(&format!("{:<17} {:>10} rows", "deliveries", before.len())),
            "the summary counts every delivery: {out}"
        );
        assert!(out.contains("1 delivery(ies) were `sending`"), "{out}");

        let clock = ManualClock::new(now);
        let app = spawn_app_with(options(
            clock,
            FakeConfig::default(),
            Some(database.url.clone()),
        ))
        .await;
        // The one in flight goes back to the queue and is sent again; the
        // rest are as they were.
        let resent = app.wait_for_state(ids["sending"], "delivered").await;
        assert_eq!(view(&resent)["delivery"]["id"], ids["sending"]);
        for (id, was) in &before {
            let now = view(&app.delivery(*id).await);
            match *id {
                id if id == ids["sending"] => continue,
                id if id == ids["held"] => {
                    // Probed again at start (the key is still refused).
                    assert_eq!(now["delivery"]["state"], "held", "{now:#}");
                    let attempts = now["attempts"].as_array().unwrap();
                    let copied = was["attempts"].as_array().unwrap();
                    assert_eq!(&attempts[..copied.len()], &copied[..], "held history");
                }
                _ => assert_eq!(&now, was, "delivery {id} after the move"),
            }
        }
        assert_eq!(
            app.buyer_messages()
                .iter()
                .map(|m| m.chat_id)
                .collect::<Vec<_>>(),
            [5006],
            "only the send that was in flight reaches the Market again"
        );

        // The dedupe window holds: a repeat of an event moved is a duplicate.
        let (status, body) = app
            .post_event("oms", &event("order_shipped", "mv-delivered", 111, 5001))
            .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["duplicate"], true, "{body}");
        // New events take new ids.
        let newer = post(&app, &event("order_shipped", "mv-after", 111, 5010)).await;
        assert!(newer > *before.keys().max().unwrap(), "{newer}");
        app.wait_for_state(newer, "delivered").await;
        // The order's chat and the campaign's business are remembered: no
        // chats/new, no campaign lookup (this fake knows no campaign).
        let again = post(
            &app,
            &sample_as("order_ready_for_pickup", "mv-order-2", None),
        )
        .await;
        app.wait_for_state(again, "delivered").await;
        let mut later = market_sample("order_in_delivery");
        later["status"] = json!("DELIVERED");
        later["updatedAt"] = json!("2026-11-22T18:05:31.213Z");
        notify(&app, &later).await;
        app.caught_up().await;
        assert!(app.market.requests_of(FakeMethod::CreateChat).is_empty());
        assert!(app.market.requests_of(FakeMethod::GetCampaign).is_empty());
        assert_eq!(
            app.delivery(ids["over_quota"]).await["delivery"]["state"],
            "queued",
            "business 333 used its quota before the move"
        );
        assert!(app
            .buyer_requests()
            .iter()
            .all(|r| r.business_id != SMALL_QUOTA));

        // Time moves: the retry and the quota's window come due.
        app.advance(Duration::from_secs(3_601));
        let retried = app.wait_for_state(ids["queued"], "delivered").await;
        assert_eq!(retried["attempts"].as_array().unwrap().len(), 2);
        app.wait_for_state(ids["over_quota"], "delivered").await;
        assert_eq!(
            app.delivery(ids["behind_held"]).await["delivery"]["state"],
            "queued"
        );
        assert!(sent_before > 0);
        app.stop().await;
    }

    /// Runs `sql` on the database at `url`.
    async fn pg_exec(url: &str, sql: &str) {
        let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .expect("connect to the test database");
        let driver = actix_rt::spawn(connection);
        client.batch_execute(sql).await.expect(sql);
        drop(client);
        let _ = driver.await;
    }

    /// One number from the database at `url`.
    async fn pg_number(url: &str, sql: &str) -> i64 {
        let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .expect("connect to the test database");
        let driver = actix_rt::spawn(connection);
        let n: i64 = client.query_one(sql, &[]).await.expect(sql).get(0);
        drop(client);
        let _ = driver.await;
        n
    }

    #[actix_rt::test]
    async fn a_copy_is_refused_while_serve_runs_and_into_a_target_holding_other_data() {
        let app = spawn_app().await;
        post(&app, &event("order_shipped", "refused-1", 111, 5001)).await;
        let live = app.root.path().join("chatbridge.db");
        let target = TestDatabase::create().await;

        let while_serving = store_copy(&[
            "--from",
            &format!("sqlite://{}", live.display()),
            "--to",
            &target.url,
        ]);

        assert_eq!(while_serving.status.code(), Some(2));
        let err = text(&while_serving.stderr);
        assert!(err.contains("another chatbridge is serving"), "{err}");
        assert_eq!(
            pg_number(
                &target.url,
                "SELECT COUNT(*) FROM pg_tables WHERE tablename = 'events'"
            )
            .await,
            0,
            "the target was not touched"
        );

        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("stopped.db");
        snapshot(&live, &file);
        app.stop().await;
        let from = format!("sqlite://{}", file.display());
        let other = spawn_app_with(TestOptions {
            backend: Backend::Postgres,
            ..TestOptions::default()
        })
        .await;
        post(&other, &event("order_shipped", "already-there", 111, 5001)).await;
        let busy = other.database.as_ref().unwrap().url.clone();
        for extra in [&[][..], &["--resume"][..]] {
            let mut args = vec!["--from", &from, "--to", &busy];
            args.extend_from_slice(extra);
            let refused = store_copy(&args);
            assert_eq!(refused.status.code(), Some(2), "{args:?}");
            let err = text(&refused.stderr);
            assert!(
                err.contains("already holds data (1 events, 1 deliveries"),
                "{err}"
            );
        }
        assert_eq!(pg_number(&busy, "SELECT COUNT(*) FROM events").await, 1);
        other.stop().await;

        // A database another application uses: refused (exit 2, nothing
        // to resume), naming the tables in the way.
        let foreign = TestDatabase::create().await;
        pg_exec(&foreign.url, "CREATE TABLE events (x INTEGER)").await;
        let refused = store_copy(&["--from", &from, "--to", &foreign.url]);
        assert_eq!(refused.status.code(), Some(2), "{}", text(&refused.stderr));
        let err = text(&refused.stderr);
        assert!(
            err.contains("tables chatbridge did not make (events)"),
            "{err}"
        );
        assert_eq!(
            pg_number(
                &foreign.url,
                "SELECT COUNT(*) FROM pg_tables WHERE tablename = 'deliveries'"
            )
            .await,
            0,
            "nothing was created beside the other application's tables"
        );

        // Into an empty database it goes; once.
        let copied = store_copy(&["--from", &from, "--to", &target.url]);
        assert_eq!(copied.status.code(), Some(0), "{}", text(&copied.stderr));
        let again = store_copy(&["--from", &from, "--to", &target.url]);
        assert_eq!(again.status.code(), Some(2));
        assert!(text(&again.stderr).contains("already holds a finished copy of this file"));
        let resumed = store_copy(&["--from", &from, "--to", &target.url, "--resume"]);
        assert_eq!(resumed.status.code(), Some(0));
        assert!(
            text(&resumed.stdout).contains("was already copied"),
            "{}",
            text(&resumed.stdout)
        );
        assert_eq!(
            pg_number(&target.url, "SELECT COUNT(*) FROM events").await,
            1
        );
    }

    const EVENTS: i64 = 20_000;
    const DELIVERIES: i64 = 2 * EVENTS;
    const SENDING: i64 = 10;

    /// A store of 20,000 events with two deliveries each, written straight
    /// into the schema the app makes (the app would take minutes for it):
    /// each delivery has one attempt, every other one counted for the quota.
    fn big_store(file: &Path) {
        drop(chatbridge::store::SqliteStore::open(file).unwrap());
        let mut conn = rusqlite::Connection::open(file).unwrap();
        let tx = conn.transaction().unwrap();
        {
            let mut event = tx
                .prepare(
                    "INSERT INTO events (id, source, external_id, event_type, payload, received_at)
                     VALUES (?1, 'oms', 'big-' || ?1, 'order.shipped', '{}', ?2)",
                )
                .unwrap();
            let mut delivery = tx
                .prepare(
                    "INSERT INTO deliveries (id, event_id, route, template, business_id, chat_id,
                         text, state, created_at, queued_at, next_attempt_at, updated_at,
                         conversation, lease_until, claim_token)
                     VALUES (?1, ?2, 'order-shipped', 'order_shipped', 111, ?3, 'text ' || ?1,
                         ?4, ?5, ?5, ?5, ?5, 'chat:' || ?3, ?6, ?7)",
                )
                .unwrap();
            let mut attempt = tx
                .prepare(
                    "INSERT INTO attempts (id, delivery_id, business_id, started_at, finished_at,
                         latency_ms, http_status, outcome, api_errors, counts_quota, method)
                     VALUES (?1, ?1, 111, ?2, ?2, 5, 200, 'delivered', '[]', ?3, 'send')",
                )
                .unwrap();
            for e in 1..=EVENTS {
                event.execute(rusqlite::params![e, START + e]).unwrap();
                for d in [2 * e - 1, 2 * e] {
                    let sending = d > DELIVERIES - SENDING;
                    let state = if sending { "sending" } else { "delivered" };
                    let lease = sending.then_some(START + 60_000);
                    delivery
                        .execute(rusqlite::params![d, e, d, state, START + e, lease, lease])
                        .unwrap();
                    attempt
                        .execute(rusqlite::params![d, START + e, d % 2])
                        .unwrap();
                }
            }
            tx.execute_batch(
                "INSERT INTO chat_contexts VALUES (111, 'ORDER', 1, 9001, 1), (111, 'RETURN', 1, 9002, 1);
                 INSERT INTO market_campaigns VALUES (21000001, 111, 1);",
            )
            .unwrap();
        }
        tx.commit().unwrap();
    }

    #[actix_rt::test]
    async fn a_copy_killed_midway_is_finished_by_a_rerun_with_resume_and_serve_waits_for_it() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("big.db");
        big_store(&file);
        let from = format!("sqlite://{}", file.display());
        let target = TestDatabase::create().await;

        // Killed once it has started on the deliveries (the events are in).
        let mut child = Command::new(BIN)
            .args([
                "store",
                "copy",
                "--from",
                &from,
                "--to",
                &target.url,
                "--batch",
                "50",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let progress = BufReader::new(child.stderr.take().unwrap());
        let mut copying = ChildGuard::new(child, None);
        let mut seen = Vec::new();
        for line in progress.lines() {
            let line = line.unwrap();
            let started_deliveries = line.contains("store copy: deliveries:");
            seen.push(line);
            if started_deliveries {
                copying.kill();
                break;
            }
        }
        assert!(copying.try_wait().is_none(), "killed, not exited: {seen:?}");
        let events = pg_number(&target.url, "SELECT COUNT(*) FROM events").await;
        let deliveries = pg_number(&target.url, "SELECT COUNT(*) FROM deliveries").await;
        assert_eq!(events, EVENTS, "{seen:?}");
        assert!(
            deliveries < DELIVERIES,
            "the kill came too late to test a resume: {seen:?}"
        );

        // Nobody serves half a store.
        let refused = chatbridge::store::open(&chatbridge::settings::StorageSettings {
            url: target.url.clone(),
            pool_size: 1,
            ..Default::default()
        });
        let err = refused
            .err()
            .expect("serve refuses a database mid-copy")
            .to_string();
        assert!(
            err.contains("is not finished") && err.contains("--resume"),
            "{err}"
        );
        let without_flag = store_copy(&["--from", &from, "--to", &target.url]);
        assert_eq!(without_flag.status.code(), Some(2));
        assert!(text(&without_flag.stderr).contains("run the same command with --resume"));

        let resumed = store_copy(&[
            "--from",
            &from,
            "--to",
            &target.url,
            "--resume",
            "--batch",
            "500",
        ]);
        let err = text(&resumed.stderr);
        assert_eq!(resumed.status.code(), Some(0), "{err}");
        assert!(
            err.contains("events: 20000 rows; going on after id 20000"),
            "{err}"
        );

        for (table, rows) in [
            ("events", EVENTS),
            ("deliveries", DELIVERIES),
            ("attempts", DELIVERIES),
            ("chat_contexts", 2),
            ("market_campaigns", 1),
        ] {
            let there = pg_number(&target.url, &format!("SELECT COUNT(*) FROM {table}")).await;
            assert_eq!(there, rows, "{table}");
        }
        // No attempt counted twice: one slot per counted attempt and per
        // send that was in flight.
        assert_eq!(
            pg_number(&target.url, "SELECT COUNT(*) FROM quota_slots").await,
            DELIVERIES / 2 + SENDING
        );
        assert_eq!(
            pg_number(
                &target.url,
                "SELECT COUNT(*) FROM deliveries WHERE state = 'sending'"
            )
            .await,
            0
        );
        assert_eq!(
            pg_number(
                &target.url,
                "SELECT COUNT(*) FROM deliveries WHERE state = 'queued' AND lease_until IS NULL"
            )
            .await,
            SENDING
        );
        assert_eq!(
            pg_number(&target.url, "SELECT nextval('deliveries_id_seq')").await,
            DELIVERIES + 1
        );
        let store = chatbridge::store::open(&chatbridge::settings::StorageSettings {
            url: target.url.clone(),
            pool_size: 1,
            ..Default::default()
        });
        assert!(store.is_ok(), "serve may start once the copy is finished");
        drop(store);
    }
}
