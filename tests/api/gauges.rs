//! The queue's gauges on `/metrics` follow every change of state, on both
//! backends (tests/api/postgres.rs runs this file again on PostgreSQL):
//! SQLite keeps its counts as states change, PostgreSQL refreshes them in
//! the background (`storage.gauge_refresh_ms`, 50 ms in tests), so each
//! check scrapes until the gauges show what the store holds.

use std::time::{Duration, Instant};

use chatbridge::clock::ManualClock;
use chatbridge::market::fake::ScriptedAnswer;
use chatbridge::store::ApiErrorEntry;
use serde_json::{json, Value};

use super::helpers::*;
use crate::prometheus::*;

const START: i64 = 1_795_000_000_000;

/// An expected sample: name, labels, value (`None`: absent).
type Want<'a> = (&'a str, &'a [(&'a str, &'a str)], Option<f64>);

/// Scrapes until every sample is as wanted. Bounded in real time: on
/// PostgreSQL the gauges follow the store within a background reading.
async fn wait_gauges(app: &TestApp, step: &str, want: &[Want<'_>]) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let samples = scrape(app).await;
        let wrong: Vec<String> = want
            .iter()
            .filter_map(|(name, labels, value)| {
                let got = metric(&samples, name, labels);
                (got != *value).then(|| format!("{name}{labels:?} is {got:?}, not {value:?}"))
            })
            .collect();
        if wrong.is_empty() {
            return;
        }
        if Instant::now() > deadline {
            panic!("{step}: {}", wrong.join("; "));
        }
        actix_rt::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn post_one(app: &TestApp, event: &Value) -> i64 {
    let (status, body) = app.post_event("oms", event).await;
    assert_eq!(status, 202, "{body}");
    body["deliveries"][0]["id"].as_i64().unwrap()
}

fn refused(status: u16, code: &str, business: Option<i64>, chat: Option<i64>) -> ScriptedAnswer {
    ScriptedAnswer {
        status,
        errors: vec![ApiErrorEntry {
            code: code.into(),
            message: Some("refused".into()),
        }],
        business_id: business,
        chat_id: chat,
        times: 100,
        ..Default::default()
    }
}

const DELIVERIES: &str = "chatbridge_deliveries";
const DEPTH: &str = "chatbridge_queue_depth";
const OLDEST: &str = "chatbridge_oldest_pending_age_seconds";

#[actix_rt::test]
async fn the_queue_gauges_follow_deliveries_through_every_state_and_the_prune() {
    let clock = ManualClock::new(START);
    let app = spawn_app_with(TestOptions {
        clock: Some(clock.clone()),
        tweak: Some(Box::new(|s| {
            s.market.hourly_limit = 2;
            s.storage.retention_days = 1;
            // The held one must outlive the prune (it is never dead).
            s.dispatch.max_age_secs = 30 * 86_400;
            // The dispatcher prunes every lease_secs / 2 of the clock.
            s.dispatch.lease_secs = 20;
            s.market.request_timeout_secs = 5;
        })),
        ..TestOptions::default()
    })
    .await;

    // Business 111: one delivered, one dead (the Market's 400): its quota
    // of two is used.
    let sent = post_one(&app, &sample_as("order_shipped", "g-1", Some(5601))).await;
    app.wait_for_state(sent, "delivered").await;
    app.market
        .script(refused(400, "CHAT_NOT_FOUND", Some(111), Some(5602)));
    let dead = post_one(&app, &sample_as("order_shipped", "g-2", Some(5602))).await;
    app.wait_for_state(dead, "dead").await;
    wait_gauges(
        &app,
        "delivered and dead",
        &[
            (DELIVERIES, &[("state", "queued")], Some(0.0)),
            (DELIVERIES, &[("state", "sending")], Some(0.0)),
            (DELIVERIES, &[("state", "dead")], Some(1.0)),
            // Listed for its dead one, with nothing waiting.
            (DEPTH, &[("business", "111")], Some(0.0)),
            (OLDEST, &[("business", "111")], Some(0.0)),
        ],
    )
    .await;

    // Business 222's key is refused: held, and waiting.
    app.market
        .script(refused(401, "UNAUTHORIZED", Some(222), None));
    let held = post_one(&app, &sample_as("return_approved", "g-h", None)).await;
    app.wait_for_state(held, "held").await;
    // One that does not render: failed, kept with its business.
    let mut broken = sample_as("order_shipped", "g-f", Some(5603));
    broken["tracking"].as_object_mut().unwrap().remove("number");
    let (status, body) = app.post_event("oms", &broken).await;
    assert_eq!(
        (status, &body["deliveries"][0]["state"]),
        (202, &json!("failed")),
        "{body}"
    );
    // Three for 111 wait for its next quota window.
    let mut waiting = Vec::new();
    for n in 4..7 {
        waiting.push(
            post_one(
                &app,
                &sample_as("order_shipped", &format!("g-{n}"), Some(5600 + n)),
            )
            .await,
        );
    }
    wait_gauges(
        &app,
        "held, failed and queued",
        &[
            (DELIVERIES, &[("state", "queued")], Some(3.0)),
            (DELIVERIES, &[("state", "held")], Some(1.0)),
            (DELIVERIES, &[("state", "failed")], Some(1.0)),
            (DELIVERIES, &[("state", "dead")], Some(1.0)),
            (DEPTH, &[("business", "111")], Some(3.0)),
            (DEPTH, &[("business", "222")], Some(1.0)),
            (OLDEST, &[("business", "111")], Some(0.0)),
        ],
    )
    .await;

    // Two minutes on: the oldest has waited that long.
    clock.advance(Duration::from_secs(120));
    wait_gauges(
        &app,
        "two minutes on",
        &[
            (OLDEST, &[("business", "111")], Some(120.0)),
            (DEPTH, &[("business", "111")], Some(3.0)),
        ],
    )
    .await;

    // An operator cancels the oldest.
    let (status, body) = app
        .admin_post(
            &format!("/admin/deliveries/{}/cancel", waiting[0]),
            &json!({}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    wait_gauges(
        &app,
        "cancelled",
        &[
            (DELIVERIES, &[("state", "queued")], Some(2.0)),
            (DELIVERIES, &[("state", "cancelled")], Some(1.0)),
            (DEPTH, &[("business", "111")], Some(2.0)),
        ],
    )
    .await;

    // The window passes: the two left are delivered.
    clock.advance(Duration::from_secs(3_600));
    for id in &waiting[1..] {
        app.wait_for_state(*id, "delivered").await;
    }
    wait_gauges(
        &app,
        "the backlog delivered",
        &[
            (DELIVERIES, &[("state", "queued")], Some(0.0)),
            (DELIVERIES, &[("state", "sending")], Some(0.0)),
            (DEPTH, &[("business", "111")], Some(0.0)),
            (DEPTH, &[("business", "222")], Some(1.0)),
        ],
    )
    .await;

    // Past the retention, every finished event goes with its deliveries;
    // the held one stays (its event is not finished).
    clock.advance(Duration::from_secs(2 * 86_400));
    wait_gauges(
        &app,
        "pruned",
        &[
            (DELIVERIES, &[("state", "dead")], Some(0.0)),
            (DELIVERIES, &[("state", "failed")], Some(0.0)),
            (DELIVERIES, &[("state", "cancelled")], Some(0.0)),
            (DELIVERIES, &[("state", "held")], Some(1.0)),
            (DEPTH, &[("business", "111")], None),
            (OLDEST, &[("business", "111")], None),
            (DEPTH, &[("business", "222")], Some(1.0)),
        ],
    )
    .await;
    let samples = scrape(&app).await;
    let age = metric(&samples, "chatbridge_queue_gauges_age_seconds", &[]);
    assert!(
        age.is_some_and(|a| a >= 0.0),
        "the reading's age is shown: {age:?}"
    );
    app.stop().await;
}
