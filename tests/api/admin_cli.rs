//! The admin command line as an operator meets it: the `chatbridge` binary
//! run against a running instance. Retrying many is previewed and needs a
//! filter; the exit status says whether everything was requeued; `--url`
//! and token mistakes are explained; `queue` shows pauses and waits.

use std::time::Duration;

use chatbridge::clock::ManualClock;
use serde_json::{json, Value};

use crate::helpers::*;
use crate::operations::{args, cli, stdout};

const START: i64 = 1_795_000_000_000;

async fn post_one(app: &TestApp, event: &Value) -> i64 {
    let (status, body) = app.post_event("oms", event).await;
    assert_eq!(status, 202, "{body}");
    body["deliveries"][0]["id"].as_i64().unwrap()
}

fn deliveries(app: &TestApp, action: &[&str]) -> Vec<String> {
    let mut all = args(&["deliveries", "--url", &app.base, "--token", ADMIN_TOKEN]);
    all.extend(args(action));
    all
}

fn stderr(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

async fn state_of(app: &TestApp, id: i64) -> Value {
    app.delivery(id).await["delivery"]["state"].clone()
}

/// One delivered, one cancelled (it waited for the quota), one failed.
async fn delivered_cancelled_failed(app: &TestApp) -> (i64, i64) {
    let first = post_one(app, &sample_as("order_shipped", "K-1", Some(5801))).await;
    app.wait_for_state(first, "delivered").await;
    let cancelled = post_one(app, &sample_as("order_shipped", "K-2", Some(5802))).await;
    let (status, body) = app
        .admin_post(&format!("/admin/deliveries/{cancelled}/cancel"), &json!({}))
        .await;
    assert_eq!(status, 200, "{body}");
    let mut broken = sample_as("order_shipped", "K-3", Some(5803));
    broken["tracking"].as_object_mut().unwrap().remove("number");
    let failed = post_one(app, &broken).await;
    assert_eq!(state_of(app, failed).await, "failed");
    (cancelled, failed)
}

#[actix_rt::test]
async fn a_bare_retry_is_refused_many_are_previewed_and_the_exit_status_counts_what_still_fails() {
    let clock = ManualClock::new(START);
    let app = spawn_app_with(TestOptions {
        clock: Some(clock.clone()),
        tweak: Some(Box::new(|s| s.market.hourly_limit = 1)),
        ..TestOptions::default()
    })
    .await;
    let (cancelled, failed) = delivered_cancelled_failed(&app).await;

    // No id, no filter: nothing is touched, and the way forward is named.
    let out = cli(deliveries(&app, &["retry"])).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--all"), "{}", stderr(&out));
    assert_eq!(state_of(&app, cancelled).await, "cancelled");

    // --all without --yes: a preview of the failed one, nothing changed.
    let out = cli(deliveries(&app, &["retry", "--all"])).await;
    assert_eq!(out.status.code(), Some(0));
    let text = stdout(&out);
    assert!(text.contains("would retry 1 "), "{text}");
    assert!(
        text.lines()
            .any(|l| l.trim_start().starts_with(&format!("{failed} "))),
        "{text}"
    );
    assert!(text.contains("--yes"), "{text}");
    assert!(!text.contains(&format!("{cancelled} ")), "{text}");
    assert_eq!(state_of(&app, failed).await, "failed");

    // --all --yes: the failed one still fails (exit 1, said why); the
    // cancelled one is left alone.
    let out = cli(deliveries(&app, &["retry", "--all", "--yes"])).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(stdout(&out).contains("queued 0 of 1"), "{}", stdout(&out));
    assert!(stdout(&out).contains("tracking.number"), "{}", stdout(&out));
    assert!(stderr(&out).contains("1 deliver(y/ies) still fail"));
    assert_eq!(state_of(&app, cancelled).await, "cancelled");

    // Asked for by state, the cancelled one is queued: exit 0.
    let out = cli(deliveries(
        &app,
        &["retry", "--state", "cancelled", "--yes"],
    ))
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).contains("queued 1 of 1"), "{}", stdout(&out));
    clock.advance(Duration::from_secs(3_601));
    app.wait_for_state(cancelled, "delivered").await;
    app.stop().await;
}

#[actix_rt::test]
async fn the_cli_takes_a_url_without_a_scheme_and_says_what_is_wrong_with_a_bad_one() {
    let app = spawn_app().await;
    let bare = app.base.trim_start_matches("http://").to_owned();
    let out = cli(args(&[
        "deliveries",
        "list",
        "--url",
        &bare,
        "--token",
        ADMIN_TOKEN,
    ]))
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));

    let out = cli(args(&[
        "queue",
        "--url",
        "ftp://127.0.0.1:1",
        "--token",
        "x",
    ]))
    .await;
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("the scheme must be http or https"),
        "{}",
        stderr(&out)
    );
    app.stop().await;
}

#[actix_rt::test]
async fn the_cli_tells_a_wrong_token_from_a_missing_one_and_says_how_to_fix_it() {
    let app = spawn_app().await;
    let out = cli(args(&["queue", "--url", &app.base, "--token", "wrong"])).await;
    assert_eq!(out.status.code(), Some(1));
    let text = stderr(&out);
    assert!(text.contains("not accepted"), "{text}");
    assert!(text.contains("admin.token"), "{text}");
    assert!(!text.contains("wrong"), "the token is not echoed: {text}");

    let out = cli(args(&["queue", "--url", &app.base])).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--token"), "{}", stderr(&out));
    app.stop().await;
}

#[actix_rt::test]
async fn the_cli_says_when_the_url_is_not_a_chatbridge_admin_api() {
    let app = spawn_app().await;
    // The fake Market answers, but it is not chatbridge.
    let out = cli(args(&[
        "deliveries",
        "list",
        "--url",
        &app.market.base_url(),
        "--token",
        ADMIN_TOKEN,
    ]))
    .await;
    assert_eq!(out.status.code(), Some(1));
    let text = stderr(&out);
    assert!(
        text.contains("does not look like a chatbridge admin API"),
        "{text}"
    );
    assert!(!text.contains("no details"), "{text}");
    app.stop().await;
}

#[actix_rt::test]
async fn chatbridge_queue_shows_the_markets_pause_and_what_waits_behind_a_chat() {
    let clock = ManualClock::new(START);
    let mut options = TestOptions {
        clock: Some(clock.clone()),
        ..TestOptions::default()
    };
    options.fake.hourly_limit = 1;
    let app = spawn_app_with(options).await;
    let first = post_one(&app, &sample_as("order_shipped", "W-1", Some(5901))).await;
    app.wait_for_state(first, "delivered").await;
    post_one(&app, &sample_as("order_shipped", "W-2", Some(5902))).await;
    post_one(&app, &sample_as("order_delivered", "W-3", Some(5902))).await;

    let out = cli(args(&["queue", "--url", &app.base, "--token", ADMIN_TOKEN])).await;

    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("business 111"), "{text}");
    assert!(text.contains("paused until "), "{text}");
    assert!(text.contains("Remaining: 0"), "{text}");
    assert!(text.contains("1 waiting for chat turn"), "{text}");
    assert!(text.contains("1 waiting for pause"), "{text}");
    assert!(!text.contains("drains in about 0 s"), "{text}");
    app.stop().await;
}
